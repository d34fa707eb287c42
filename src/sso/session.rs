//! Signed cookies for the web login: the sign-in in progress (state, nonce, PKCE verifier) and
//! the page session (who signed in, until when).
//!
//! A cookie is `base64url(JSON) "." base64url(HMAC-SHA256(key, kind || JSON))`; the kind is
//! part of the MAC, so one kind of cookie can never be replayed as the other. The JSON carries
//! its own expiry. Cookies are `__Host-` prefixed, `Secure`, `HttpOnly`, `SameSite=Lax`,
//! `Path=/`. They are signed, not encrypted: they hold nothing the browser's user may not see.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::HeaderMap;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub const FLOW_COOKIE: &str = "__Host-ztgate-login";
pub const SESSION_COOKIE: &str = "__Host-ztgate-session";

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A sign-in started by `/login`, finished by `/callback`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Flow {
    pub state: String,
    pub nonce: String,
    /// The PKCE verifier; a flow without one is refused at the callback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifier: Option<String>,
    pub redirect_uri: String,
    pub exp: u64,
}

/// Who is signed in on the pages.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Session {
    pub user: String,
    pub groups: Vec<String>,
    pub issuer: String,
    pub exp: u64,
    /// The identity provider's session (the ID token's `sid`), for session locks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
}

impl Session {
    /// The subject locks are matched against: the signed-in user, its groups and session.
    pub fn lock_subject(&self) -> crate::state::LockSubject<'_> {
        crate::state::LockSubject {
            user: Some(&self.user),
            groups: &self.groups,
            session: self.sid.as_deref(),
            ..Default::default()
        }
    }
}

trait Expiring {
    const KIND: &'static [u8];
    fn exp(&self) -> u64;
}
impl Expiring for Flow {
    const KIND: &'static [u8] = b"flow";
    fn exp(&self) -> u64 {
        self.exp
    }
}
impl Expiring for Session {
    const KIND: &'static [u8] = b"session";
    fn exp(&self) -> u64 {
        self.exp
    }
}

/// The HMAC key.
pub struct CookieKey(Vec<u8>);

impl CookieKey {
    pub fn new(key: Vec<u8>) -> CookieKey {
        CookieKey(key)
    }

    pub fn random() -> CookieKey {
        let mut k = vec![0u8; 32];
        aws_lc_rs::rand::fill(&mut k).expect("the system random number generator works");
        CookieKey(k)
    }

    fn mac(&self, kind: &[u8], payload: &[u8]) -> Vec<u8> {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.0);
        let mut m = aws_lc_rs::hmac::Context::with_key(&key);
        m.update(kind);
        m.update(&[0]);
        m.update(payload);
        m.sign().as_ref().to_vec()
    }

    fn seal<T: Serialize + Expiring>(&self, value: &T) -> String {
        let json = serde_json::to_vec(value).expect("cookie payload serializes");
        let mac = self.mac(T::KIND, &json);
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&json),
            URL_SAFE_NO_PAD.encode(mac)
        )
    }

    fn open<T: DeserializeOwned + Expiring>(&self, cookie: &str) -> Option<T> {
        let (payload, mac) = cookie.split_once('.')?;
        let json = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        if !crate::ct::eq(&self.mac(T::KIND, &json), &mac) {
            return None;
        }
        let v: T = serde_json::from_slice(&json).ok()?;
        (v.exp() > now_unix()).then_some(v)
    }

    pub fn seal_flow(&self, f: &Flow) -> String {
        self.seal(f)
    }
    pub fn open_flow(&self, cookie: &str) -> Option<Flow> {
        self.open(cookie)
    }
    pub fn seal_session(&self, s: &Session) -> String {
        self.seal(s)
    }
    pub fn open_session(&self, cookie: &str) -> Option<Session> {
        self.open(cookie)
    }
}

/// The value of cookie `name` in the request (every `Cookie` header is looked at).
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value; `max_age` zero deletes the cookie.
pub fn set_cookie(name: &str, value: &str, max_age: Duration) -> String {
    format!(
        "{name}={value}; Path=/; Max-Age={}; Secure; HttpOnly; SameSite=Lax",
        max_age.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(exp: u64) -> Flow {
        Flow {
            state: "s".into(),
            nonce: "n".into(),
            verifier: Some("v".into()),
            redirect_uri: "https://gw/callback".into(),
            exp,
        }
    }

    #[test]
    fn sealed_cookie_opens_with_its_key_only() {
        let k = CookieKey::random();
        let c = k.seal_flow(&flow(now_unix() + 60));
        assert_eq!(k.open_flow(&c).unwrap().state, "s");
        assert!(CookieKey::random().open_flow(&c).is_none());
    }

    #[test]
    fn tampered_or_expired_cookie_is_refused() {
        let k = CookieKey::random();
        let c = k.seal_flow(&flow(now_unix() + 60));
        let (p, m) = c.split_once('.').unwrap();
        let mut json = URL_SAFE_NO_PAD.decode(p).unwrap();
        json[2] ^= 1;
        let forged = format!("{}.{m}", URL_SAFE_NO_PAD.encode(json));
        assert!(k.open_flow(&forged).is_none());
        assert!(k.open_flow(&k.seal_flow(&flow(now_unix() - 1))).is_none());
    }

    #[test]
    fn flow_cookie_is_not_a_session_cookie() {
        let k = CookieKey::random();
        let c = k.seal_flow(&flow(now_unix() + 60));
        assert!(k.open_session(&c).is_none());
    }

    #[test]
    fn cookie_attributes() {
        let s = set_cookie(SESSION_COOKIE, "x", Duration::from_secs(900));
        for attr in [
            "Secure",
            "HttpOnly",
            "SameSite=Lax",
            "Path=/",
            "Max-Age=900",
        ] {
            assert!(s.contains(attr), "{s}");
        }
    }
}
