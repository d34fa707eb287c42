//! Audit IDs: random (version 4) UUIDs, from aws-lc's CSPRNG.

use std::cell::RefCell;

/// A new audit ID: a random (version 4) UUID in its canonical lower-case form.
pub fn new_audit_id() -> String {
    let mut b = random_16();
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(char::from(HEX[usize::from(byte >> 4)]));
        s.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    s
}

/// 16 bytes from aws-lc's CSPRNG, drawn 512 at a time per thread: one ID per request, and each
/// draw pays the generator's set-up (an AES key schedule, RDRAND) whatever its size. Each byte
/// is handed out once.
fn random_16() -> [u8; 16] {
    const POOL: usize = 512;
    thread_local! {
        static BYTES: RefCell<(usize, [u8; POOL])> = const { RefCell::new((POOL, [0; POOL])) };
    }
    BYTES.with(|pool| {
        let mut pool = pool.borrow_mut();
        let (next, bytes) = &mut *pool;
        if *next + 16 > POOL {
            fill_random(bytes);
            *next = 0;
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&bytes[*next..*next + 16]);
        bytes[*next..*next + 16].fill(0);
        *next += 16;
        out
    })
}

/// Fills `buf` from aws-lc's CSPRNG (the one rustls uses for TLS).
fn fill_random(buf: &mut [u8]) {
    if aws_lc_rs::rand::fill(buf).is_ok() {
        return;
    }
    // The system RNG failing is not something a request can fix; an audit ID only needs to be
    // unique, so fall back to a per-process random key hashed with a counter and the clock.
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::SystemTime;
    static FALLBACK: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let state = FALLBACK.get_or_init(std::collections::hash_map::RandomState::new);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let mut h = state.build_hasher();
        h.write_u64(n);
        h.write_u128(now);
        h.write_usize(i);
        let v = h.finish().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_ids_are_uuid_v4() {
        let a = new_audit_id();
        let b = new_audit_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
        assert!(matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'));
        assert!(a
            .bytes()
            .all(|c| c == b'-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        // Drawn from a per-thread pool refilled every 32 IDs: never the same ID twice, across
        // refills and threads.
        let ids: Vec<String> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..1000).map(|_| new_audit_id()).collect::<Vec<_>>()))
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect()
        });
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), 4000);
    }
}
