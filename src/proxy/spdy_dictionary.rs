//! The zlib dictionary of SPDY/3 header compression (SPDY/3 draft, section 2.6.10.1).
//!
//! One file for two crates: the gateway's frame-aware relay (`proxy::frames`) and the test kit's
//! SPDY stand-in include it (the test kit cannot depend on the gateway, which depends on it for
//! the demo). It uses nothing but `std`.
//!
//! The dictionary is a run of length-prefixed words (a 4-byte big-endian length, then the word)
//! followed by a tail of concatenated status lines, dates and media types. It is rebuilt here
//! from that structure instead of being spelled out byte by byte; the tests pin its length and
//! its Adler-32 checksum (the dictionary id a zlib stream advertises), so a typo cannot slip
//! through unnoticed.

use std::sync::OnceLock;

/// The length-prefixed words, in dictionary order.
const WORDS: [&str; 65] = [
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

/// The tail, appended without length prefixes (and without a trailing NUL).
const TAIL: [&str; 7] = [
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request\
     401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented\
     503 Service Unavailable",
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,\
     text/plain,text/javascript,",
    "publicprivatemax-age=gzip,deflate,sdch",
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
];

/// Length of the dictionary in bytes.
pub const DICTIONARY_LEN: usize = 1423;

/// Adler-32 of the dictionary: the DICTID that a zlib stream using it carries in its header.
pub const DICTIONARY_ID: u32 = 0xe3c6_a7c2;

/// The SPDY/3 header-compression dictionary.
pub fn dictionary() -> &'static [u8] {
    static DICT: OnceLock<Vec<u8>> = OnceLock::new();
    DICT.get_or_init(|| {
        let mut d = Vec::with_capacity(DICTIONARY_LEN);
        for w in WORDS {
            let len = u32::try_from(w.len()).unwrap_or(u32::MAX);
            d.extend_from_slice(&len.to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        for t in TAIL {
            d.extend_from_slice(t.as_bytes());
        }
        d
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adler32(data: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &byte in data {
            a = (a + u32::from(byte)) % 65521;
            b = (b + a) % 65521;
        }
        (b << 16) | a
    }

    #[test]
    fn spdy_dictionary_is_byte_exact() {
        let d = dictionary();
        assert_eq!(d.len(), DICTIONARY_LEN);
        assert_eq!(adler32(d), DICTIONARY_ID);
        assert_eq!(&d[..11], b"\0\0\0\x07options");
        assert!(d.ends_with(b",utf-,*,enq=0."));
    }
}
