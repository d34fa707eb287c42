//! Authentication and impersonation: the TLS client-certificate verifier (certificate requested,
//! verified after the handshake like kube-apiserver's x509 authenticator, so a bad certificate
//! yields 401 rather than a handshake failure), static bearer tokens, kube-apiserver's
//! impersonation rules (k8s.io/apiserver `WithImpersonation`) and the SelfSubjectReview body.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use http::HeaderMap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use serde_json::{json, Value};

use super::rbac::{self, Attributes, AUTHENTICATED, UNAUTHENTICATED};
use super::UserInfo;

pub(crate) const ANONYMOUS: &str = "system:anonymous";
const SA_PREFIX: &str = "system:serviceaccount:";

/// Asks for a client certificate but accepts the handshake whatever is presented (the
/// handshake signature is still checked); the chain is verified afterwards with
/// [`verify_client_chain`].
#[derive(Debug)]
pub(crate) struct RequestClientCert {
    inner: Arc<dyn ClientCertVerifier>,
}

impl RequestClientCert {
    pub(crate) fn new(inner: Arc<dyn ClientCertVerifier>) -> Self {
        RequestClientCert { inner }
    }
}

impl ClientCertVerifier for RequestClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The chain verifier for certificates signed by the client CA bundle (PEM, one or more CAs).
pub(crate) fn chain_verifier(
    client_ca_pem: &str,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> std::io::Result<Arc<dyn ClientCertVerifier>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(client_ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| std::io::Error::other(format!("client CA PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| std::io::Error::other(format!("client CA: {e}")))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| std::io::Error::other(format!("client verifier: {e}")))
}

/// Verifies a presented chain against the client CA and reads the user the way kube-apiserver's
/// x509 authenticator does: user = subject CN, groups = every subject O.
pub(crate) fn verify_client_chain(
    verifier: &dyn ClientCertVerifier,
    chain: &[CertificateDer<'_>],
) -> Option<UserInfo> {
    let (leaf, intermediates) = chain.split_first()?;
    verifier
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .ok()?;
    user_from_cert(leaf)
}

/// CN and every O attribute of the certificate subject.
pub(crate) fn user_from_cert(der: &[u8]) -> Option<UserInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let username = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())?
        .to_string();
    if username.is_empty() {
        return None;
    }
    let groups = subject
        .iter_organization()
        .filter_map(|a| a.as_str().ok())
        .map(str::to_string)
        .collect();
    Some(UserInfo {
        username,
        groups,
        ..Default::default()
    })
}

/// Authenticates a request: a verified client certificate wins, then `Authorization: Bearer`.
/// The result carries `system:authenticated`.
pub(crate) fn authenticate(
    cert_user: Option<&UserInfo>,
    headers: &HeaderMap,
    tokens: &HashMap<String, UserInfo>,
) -> Option<UserInfo> {
    let mut user = match cert_user {
        Some(u) => u.clone(),
        None => {
            let auth = headers
                .get(http::header::AUTHORIZATION)?
                .to_str()
                .ok()?
                .trim();
            let (scheme, token) = auth.split_once(' ')?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return None;
            }
            let token = token.trim();
            if token.is_empty() {
                return None;
            }
            tokens.get(token)?.clone()
        }
    };
    if !user.groups.iter().any(|g| g == AUTHENTICATED) {
        user.groups.push(AUTHENTICATED.to_string());
    }
    Some(user)
}

/// Why impersonation was refused.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ImpersonationError {
    /// Groups, extra or uid without Impersonate-User (kube answers with an internal error).
    Internal(String),
    /// The caller may not impersonate: a Forbidden Status body.
    Forbidden(Value),
}

/// One thing the caller asks to act as (kube builds one ObjectReference per header value).
#[derive(Debug, Clone, PartialEq)]
enum Request {
    User(String),
    ServiceAccount { namespace: String, name: String },
    Group(String),
    Extra { key: String, value: String },
    Uid(String),
}

impl Request {
    fn describe(&self) -> String {
        match self {
            Request::User(n) => format!("{{User {n}}}"),
            Request::ServiceAccount { namespace, name } => {
                format!("{{ServiceAccount {namespace}/{name}}}")
            }
            Request::Group(n) => format!("{{Group {n}}}"),
            Request::Extra { key, value } => format!("{{UserExtra {key}={value}}}"),
            Request::Uid(n) => format!("{{UID {n}}}"),
        }
    }
}

/// `system:serviceaccount:NS:NAME` → (NS, NAME).
fn split_service_account(user: &str) -> Option<(String, String)> {
    let rest = user.strip_prefix(SA_PREFIX)?;
    let mut it = rest.split(':');
    let (ns, name) = (it.next()?, it.next()?);
    if it.next().is_some() || ns.is_empty() || name.is_empty() {
        return None;
    }
    Some((ns.to_string(), name.to_string()))
}

/// URL path-unescape of an extra key; a malformed escape leaves the key as it is.
pub(crate) fn unescape_extra_key(key: &str) -> String {
    let b = key.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let ok =
                i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit();
            if !ok {
                return key.to_string();
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    percent_encoding::percent_decode_str(key)
        .decode_utf8_lossy()
        .into_owned()
}

fn header_first<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .map(|v| std::str::from_utf8(v.as_bytes()).unwrap_or(""))
        .filter(|s| !s.is_empty())
}

fn build_requests(headers: &HeaderMap) -> Result<Vec<Request>, String> {
    let mut reqs = Vec::new();
    let user = header_first(headers, "impersonate-user");
    if let Some(u) = user {
        match split_service_account(u) {
            Some((namespace, name)) => reqs.push(Request::ServiceAccount { namespace, name }),
            None => reqs.push(Request::User(u.to_string())),
        }
    }
    let mut has_other = false;
    for g in headers.get_all("impersonate-group") {
        has_other = true;
        reqs.push(Request::Group(
            String::from_utf8_lossy(g.as_bytes()).into_owned(),
        ));
    }
    for (name, value) in headers.iter() {
        let Some(key) = name.as_str().strip_prefix("impersonate-extra-") else {
            continue;
        };
        has_other = true;
        reqs.push(Request::Extra {
            key: unescape_extra_key(&key.to_ascii_lowercase()),
            value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
        });
    }
    if let Some(uid) = header_first(headers, "impersonate-uid") {
        has_other = true;
        reqs.push(Request::Uid(uid.to_string()));
    }
    if has_other && user.is_none() {
        let list: Vec<String> = reqs.iter().map(Request::describe).collect();
        return Err(format!(
            "requested [{}] without impersonating a user",
            list.join(" ")
        ));
    }
    Ok(reqs)
}

/// Applies impersonation headers. `Ok(None)`: no impersonation requested.
pub(crate) fn impersonate(
    caller: &UserInfo,
    headers: &HeaderMap,
    impersonators: &[String],
) -> Result<Option<UserInfo>, ImpersonationError> {
    let reqs = build_requests(headers).map_err(ImpersonationError::Internal)?;
    if reqs.is_empty() {
        return Ok(None);
    }
    let allowed = impersonators.contains(&caller.username);
    let groups_specified = headers.contains_key("impersonate-group");
    let mut username = String::new();
    let mut groups: Vec<String> = Vec::new();
    let mut uid = None;
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &reqs {
        let mut attrs = Attributes {
            user: &caller.username,
            verb: "impersonate",
            resource_request: true,
            ..Default::default()
        };
        match r {
            Request::User(name) => {
                attrs.resource = "users";
                attrs.name = name;
                username = name.clone();
            }
            Request::ServiceAccount { namespace, name } => {
                attrs.resource = "serviceaccounts";
                attrs.namespace = namespace;
                attrs.name = name;
                username = format!("{SA_PREFIX}{namespace}:{name}");
                if !groups_specified {
                    groups = vec![
                        "system:serviceaccounts".to_string(),
                        format!("system:serviceaccounts:{namespace}"),
                    ];
                }
            }
            Request::Group(g) => {
                attrs.resource = "groups";
                attrs.name = g;
                groups.push(g.clone());
            }
            Request::Extra { key, value } => {
                attrs.group = "authentication.k8s.io";
                attrs.resource = "userextras";
                attrs.subresource = key;
                attrs.name = value;
                extra.entry(key.clone()).or_default().push(value.clone());
            }
            Request::Uid(u) => {
                attrs.group = "authentication.k8s.io";
                attrs.resource = "uids";
                attrs.name = u;
                uid = Some(u.clone());
            }
        }
        if !allowed {
            return Err(ImpersonationError::Forbidden(rbac::forbidden_value(&attrs)));
        }
    }
    let implied = if username == ANONYMOUS {
        UNAUTHENTICATED
    } else {
        AUTHENTICATED
    };
    if !groups.iter().any(|g| g == implied) {
        groups.push(implied.to_string());
    }
    Ok(Some(UserInfo {
        username,
        uid,
        groups,
        extra,
    }))
}

/// A SelfSubjectReview of `user` (what `kubectl auth whoami` prints).
pub(crate) fn self_subject_review(user: &UserInfo, api_version: &str) -> Value {
    let mut ui = json!({ "username": user.username, "groups": user.groups });
    if let Some(uid) = &user.uid {
        if !uid.is_empty() {
            ui["uid"] = Value::String(uid.clone());
        }
    }
    if !user.extra.is_empty() {
        ui["extra"] = json!(user.extra);
    }
    json!({
        "kind": "SelfSubjectReview",
        "apiVersion": format!("authentication.k8s.io/{api_version}"),
        "metadata": { "creationTimestamp": null },
        "status": { "userInfo": ui },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn gateway() -> UserInfo {
        UserInfo {
            username: "ztgate".into(),
            groups: vec![AUTHENTICATED.into()],
            ..Default::default()
        }
    }

    fn imps() -> Vec<String> {
        vec!["ztgate".to_string()]
    }

    #[test]
    fn no_headers_no_impersonation() {
        assert_eq!(
            impersonate(&gateway(), &HeaderMap::new(), &imps()),
            Ok(None)
        );
    }

    #[test]
    fn user_groups_uid_extra() {
        let h = headers(&[
            ("Impersonate-User", "alice"),
            ("Impersonate-Group", "team-a"),
            ("Impersonate-Group", "devs"),
            ("Impersonate-Uid", "1234"),
            ("Impersonate-Extra-Device-Id", "d1"),
            ("Impersonate-Extra-Device-Id", "d2"),
            ("Impersonate-Extra-acme.com%2Fposture", "ok"),
        ]);
        let u = impersonate(&gateway(), &h, &imps()).unwrap().unwrap();
        assert_eq!(u.username, "alice");
        assert_eq!(u.groups, vec!["team-a", "devs", AUTHENTICATED]);
        assert_eq!(u.uid.as_deref(), Some("1234"));
        assert_eq!(u.extra["device-id"], vec!["d1", "d2"]);
        assert_eq!(u.extra["acme.com/posture"], vec!["ok"]);
    }

    #[test]
    fn authenticated_group_not_duplicated() {
        let h = headers(&[
            ("Impersonate-User", "alice"),
            ("Impersonate-Group", AUTHENTICATED),
        ]);
        let u = impersonate(&gateway(), &h, &imps()).unwrap().unwrap();
        assert_eq!(u.groups, vec![AUTHENTICATED]);
    }

    #[test]
    fn anonymous_gets_unauthenticated() {
        let h = headers(&[("Impersonate-User", ANONYMOUS)]);
        let u = impersonate(&gateway(), &h, &imps()).unwrap().unwrap();
        assert_eq!(u.groups, vec![UNAUTHENTICATED]);
    }

    #[test]
    fn service_accounts() {
        let h = headers(&[("Impersonate-User", "system:serviceaccount:ci:builder")]);
        let u = impersonate(&gateway(), &h, &imps()).unwrap().unwrap();
        assert_eq!(u.username, "system:serviceaccount:ci:builder");
        assert_eq!(
            u.groups,
            vec![
                "system:serviceaccounts",
                "system:serviceaccounts:ci",
                AUTHENTICATED
            ]
        );
        // Explicit groups replace the service-account groups, as in kube-apiserver.
        let h = headers(&[
            ("Impersonate-User", "system:serviceaccount:ci:builder"),
            ("Impersonate-Group", "x"),
        ]);
        let u = impersonate(&gateway(), &h, &imps()).unwrap().unwrap();
        assert_eq!(u.groups, vec!["x", AUTHENTICATED]);
    }

    #[test]
    fn groups_without_user_is_internal_error() {
        for h in [
            headers(&[("Impersonate-Group", "team-a")]),
            headers(&[("Impersonate-Uid", "1")]),
            headers(&[("Impersonate-Extra-Foo", "bar")]),
        ] {
            match impersonate(&gateway(), &h, &imps()) {
                Err(ImpersonationError::Internal(m)) => {
                    assert!(m.ends_with("without impersonating a user"), "{m}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn non_impersonator_is_forbidden() {
        let alice = UserInfo {
            username: "alice".into(),
            groups: vec!["team-a".into(), AUTHENTICATED.into()],
            ..Default::default()
        };
        let h = headers(&[("Impersonate-User", "bob")]);
        match impersonate(&alice, &h, &imps()) {
            Err(ImpersonationError::Forbidden(v)) => {
                assert_eq!(
                    v["message"],
                    r#"users "bob" is forbidden: User "alice" cannot impersonate resource "users" in API group "" at the cluster scope"#
                );
                assert_eq!(v["code"], 403);
                assert_eq!(v["details"], json!({"kind": "users", "name": "bob"}));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn extra_key_unescape() {
        assert_eq!(unescape_extra_key("acme.com%2fposture"), "acme.com/posture");
        assert_eq!(unescape_extra_key("bad%zz"), "bad%zz");
        assert_eq!(unescape_extra_key("bad%2"), "bad%2");
        assert_eq!(unescape_extra_key("plain"), "plain");
    }

    #[test]
    fn bearer_tokens() {
        let mut tokens = HashMap::new();
        tokens.insert(
            "t1".to_string(),
            UserInfo {
                username: "carol".into(),
                groups: vec!["team-b".into()],
                ..Default::default()
            },
        );
        let u = authenticate(None, &headers(&[("authorization", "Bearer t1")]), &tokens).unwrap();
        assert_eq!(u.groups, vec!["team-b", AUTHENTICATED]);
        assert!(
            authenticate(None, &headers(&[("authorization", "Bearer nope")]), &tokens).is_none()
        );
        assert!(authenticate(None, &HeaderMap::new(), &tokens).is_none());
    }

    #[test]
    fn review_omits_empty_uid_and_extra() {
        let v = self_subject_review(&gateway(), "v1");
        assert_eq!(
            v["status"]["userInfo"],
            json!({"username": "ztgate", "groups": [AUTHENTICATED]})
        );
        assert_eq!(v["metadata"], json!({"creationTimestamp": null}));
    }
}
