use std::time::{Duration as StdDuration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};
use ztgate_testkit::pki::{Ca, CertKey, LeafSpec};

use super::*;
use crate::tls::bundles::{Bundle, TrustBundles};

// ---------------------------------------------------------------------------------------------
// helpers

fn chain(ck: &CertKey) -> Vec<CertificateDer<'static>> {
    vec![CertificateDer::from(ck.cert_der.clone())]
}

fn bundles(named: &[(&str, &Ca)]) -> TrustBundles {
    TrustBundles::new(
        named
            .iter()
            .map(|(name, ca)| Bundle::from_der(name, &[ca.cert_der().into()]).unwrap())
            .collect(),
    )
}

fn client_leaf(ca: &Ca, cn: &str, uris: &[&str]) -> CertKey {
    ca.issue(&LeafSpec {
        common_name: cn.into(),
        uris: uris.iter().map(|u| u.to_string()).collect(),
        client: true,
        ..Default::default()
    })
}

fn cfg(source: DeviceIdSource) -> DeviceConfig {
    DeviceConfig {
        bundle: "devices".into(),
        device_id: source,
        posture: None,
    }
}

/// A self-signed leaf of a chosen shape, for the SVID rules (no chain verification involved).
fn shaped(uris: &[&str], is_ca: IsCa, key_usages: Vec<KeyUsagePurpose>) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "svid");
    params.distinguished_name = dn;
    for u in uris {
        params
            .subject_alt_names
            .push(SanType::URI((*u).try_into().unwrap()));
    }
    params.is_ca = is_ca;
    params.key_usages = key_usages;
    params.self_signed(&key).unwrap().der().to_vec()
}

fn svid_ku() -> Vec<KeyUsagePurpose> {
    vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ]
}

// ---------------------------------------------------------------------------------------------
// SPIFFE ID syntax

#[test]
fn spiffe_id_rules_table() {
    use SpiffeIdError::*;
    let long_path = format!("spiffe://example.org/{}", "a".repeat(2048 - 21));
    assert_eq!(long_path.len(), 2048);
    let too_long = format!("{long_path}b");
    let long_td = format!("spiffe://{}/a", "a".repeat(256));
    let max_td = format!("spiffe://{}/a", "a".repeat(255));

    // (input, expected, the rule it exercises)
    let table: Vec<(&str, Result<(), SpiffeIdError>, &str)> = vec![
        (
            "spiffe://example.org",
            Ok(()),
            "path is optional (trust domain ID)",
        ),
        ("spiffe://example.org/workload", Ok(()), "one segment"),
        (
            "spiffe://example.org/ns/prod/sa/api",
            Ok(()),
            "several segments",
        ),
        (
            "spiffe://my-td_1.example/A.b-c_D9",
            Ok(()),
            "all allowed characters",
        ),
        (
            "spiffe://example.org/.../a",
            Ok(()),
            "only . and .. are dot segments",
        ),
        (
            "spiffe://example.org/.hidden",
            Ok(()),
            "a segment may start with a dot",
        ),
        (
            "spiffe://192.168.0.1/a",
            Ok(()),
            "digits and dots in the trust domain",
        ),
        (&long_path, Ok(()), "exactly 2048 bytes"),
        (&max_td, Ok(()), "trust domain of 255 bytes"),
        ("", Err(Empty), "must not be empty"),
        (&too_long, Err(TooLong), "at most 2048 bytes"),
        ("http://example.org/a", Err(WrongScheme), "scheme is spiffe"),
        (
            "SPIFFE://example.org/a",
            Err(WrongScheme),
            "scheme is exactly lowercase spiffe",
        ),
        (
            "spiffe:/example.org/a",
            Err(WrongScheme),
            "scheme is followed by //",
        ),
        (
            "spiffe:example.org/a",
            Err(WrongScheme),
            "an authority is required",
        ),
        ("example.org/a", Err(WrongScheme), "a scheme is required"),
        (
            "spiffe://",
            Err(MissingTrustDomain),
            "trust domain is required",
        ),
        (
            "spiffe:///a",
            Err(MissingTrustDomain),
            "trust domain is required before the path",
        ),
        (
            "spiffe://Example.org/a",
            Err(TrustDomainNotLowercase),
            "trust domain lowercase only",
        ),
        (
            "spiffe://exa mple.org/a",
            Err(TrustDomainChar),
            "trust domain chars [a-z0-9.-_]",
        ),
        (
            "spiffe://ex%41.org/a",
            Err(TrustDomainChar),
            "no percent-encoding in the trust domain",
        ),
        (
            "spiffe://ex\u{e4}mple.org/a",
            Err(TrustDomainChar),
            "trust domain is ASCII",
        ),
        (
            &long_td,
            Err(TrustDomainTooLong),
            "trust domain at most 255 bytes",
        ),
        ("spiffe://example.org:8443/a", Err(Port), "no port"),
        ("spiffe://user@example.org/a", Err(UserInfo), "no user info"),
        (
            "spiffe://user:pw@example.org/a",
            Err(UserInfo),
            "no user info with a password",
        ),
        ("spiffe://example.org/a?x=1", Err(Query), "no query"),
        (
            "spiffe://example.org?x=1",
            Err(Query),
            "no query on a trust domain ID",
        ),
        ("spiffe://example.org/a#frag", Err(Fragment), "no fragment"),
        (
            "spiffe://example.org/",
            Err(EmptySegment),
            "no trailing slash",
        ),
        (
            "spiffe://example.org/a/",
            Err(EmptySegment),
            "no trailing slash after a segment",
        ),
        (
            "spiffe://example.org//a",
            Err(EmptySegment),
            "no empty segment",
        ),
        ("spiffe://example.org/./a", Err(DotSegment), "no . segment"),
        (
            "spiffe://example.org/a/..",
            Err(DotSegment),
            "no .. segment",
        ),
        (
            "spiffe://example.org/a%2Fb",
            Err(PathChar),
            "no percent-encoding in the path",
        ),
        (
            "spiffe://example.org/a b",
            Err(PathChar),
            "path chars [A-Za-z0-9.-_]",
        ),
        (
            "spiffe://example.org/caf\u{e9}",
            Err(PathChar),
            "path is ASCII",
        ),
        (
            "spiffe://example.org/a:b",
            Err(PathChar),
            "no colon in the path",
        ),
    ];
    for (input, want, rule) in table {
        let got = SpiffeId::parse(input).map(|_| ());
        assert_eq!(got, want, "{rule}: {input:?}");
    }
}

#[test]
fn spiffe_id_parts_and_display_round_trip() {
    let id: SpiffeId = "spiffe://prod.example.org/ns/default/sa/api"
        .parse()
        .unwrap();
    assert_eq!(id.trust_domain, "prod.example.org");
    assert_eq!(id.path, "/ns/default/sa/api");
    assert!(!id.is_trust_domain_id());
    assert_eq!(
        id.to_string(),
        "spiffe://prod.example.org/ns/default/sa/api"
    );
    let td = SpiffeId::parse("spiffe://prod.example.org").unwrap();
    assert!(td.is_trust_domain_id());
    assert_eq!(td.to_string(), "spiffe://prod.example.org");
}

// ---------------------------------------------------------------------------------------------
// X509-SVID leaf rules

#[test]
fn a_well_formed_svid_yields_its_spiffe_id() {
    for is_ca in [IsCa::NoCa, IsCa::ExplicitNoCa] {
        let der = shaped(&["spiffe://example.org/w"], is_ca, svid_ku());
        let id = validate_x509_svid(&der).unwrap();
        assert_eq!(id.to_string(), "spiffe://example.org/w");
    }
}

#[test]
fn svid_needs_exactly_one_uri_san() {
    let none = shaped(&[], IsCa::NoCa, svid_ku());
    assert_eq!(validate_x509_svid(&none), Err(DeviceError::NoUriSan));
    let two = shaped(
        &["spiffe://example.org/a", "spiffe://example.org/b"],
        IsCa::NoCa,
        svid_ku(),
    );
    assert_eq!(
        validate_x509_svid(&two),
        Err(DeviceError::MultipleUriSans(2))
    );
}

#[test]
fn svid_uri_must_be_a_spiffe_id_with_a_path() {
    let https = shaped(&["https://example.org/a"], IsCa::NoCa, svid_ku());
    assert_eq!(
        validate_x509_svid(&https),
        Err(DeviceError::InvalidSpiffeId(SpiffeIdError::WrongScheme))
    );
    let upper = shaped(&["spiffe://Example.org/a"], IsCa::NoCa, svid_ku());
    assert_eq!(
        validate_x509_svid(&upper),
        Err(DeviceError::InvalidSpiffeId(
            SpiffeIdError::TrustDomainNotLowercase
        ))
    );
    let td_only = shaped(&["spiffe://example.org"], IsCa::NoCa, svid_ku());
    assert_eq!(
        validate_x509_svid(&td_only),
        Err(DeviceError::SpiffeIdWithoutPath)
    );
}

#[test]
fn svid_leaf_must_not_be_a_ca() {
    let der = shaped(
        &["spiffe://example.org/w"],
        IsCa::Ca(BasicConstraints::Unconstrained),
        svid_ku(),
    );
    assert_eq!(validate_x509_svid(&der), Err(DeviceError::LeafIsCa));
}

#[test]
fn svid_key_usage_rules() {
    let uri = &["spiffe://example.org/w"];
    assert_eq!(
        validate_x509_svid(&shaped(uri, IsCa::NoCa, vec![])),
        Err(DeviceError::KeyUsageMissing)
    );
    assert_eq!(
        validate_x509_svid(&shaped(
            uri,
            IsCa::NoCa,
            vec![KeyUsagePurpose::KeyEncipherment]
        )),
        Err(DeviceError::NoDigitalSignature)
    );
    assert_eq!(
        validate_x509_svid(&shaped(
            uri,
            IsCa::NoCa,
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign
            ]
        )),
        Err(DeviceError::ForbiddenKeyUsage("keyCertSign"))
    );
    assert_eq!(
        validate_x509_svid(&shaped(
            uri,
            IsCa::NoCa,
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign]
        )),
        Err(DeviceError::ForbiddenKeyUsage("cRLSign"))
    );
}

#[test]
fn svid_garbage_is_unparseable() {
    assert!(matches!(
        validate_x509_svid(b"not a certificate"),
        Err(DeviceError::Unparseable(_))
    ));
    let mut der = shaped(&["spiffe://example.org/w"], IsCa::NoCa, svid_ku());
    der.push(0);
    assert!(matches!(
        validate_x509_svid(&der),
        Err(DeviceError::Unparseable(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// device identity from a chain

#[test]
fn device_id_from_common_name() {
    let ca = Ca::new("device-ca");
    let leaf = client_leaf(&ca, "laptop-42", &[]);
    let now = SystemTime::now();
    let dev = device_from_chain(
        &cfg(DeviceIdSource::CommonName),
        &bundles(&[("devices", &ca)]),
        &chain(&leaf),
        now,
    )
    .unwrap();
    assert_eq!(dev.id, "laptop-42");
    assert_eq!(dev.spiffe_id, None);
    assert_eq!(
        dev.cert_sha256.as_slice(),
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &leaf.cert_der).as_ref()
    );
    assert!(dev.not_after > now && !dev.is_expired(now));
    assert!(dev.is_expired(now + StdDuration::from_secs(40 * 86_400)));
    assert_eq!(dev.x5t_s256(), x5t_s256(&leaf.cert_der));
}

#[test]
fn device_id_from_common_name_needs_one() {
    let ca = Ca::new("device-ca");
    let b = bundles(&[("devices", &ca)]);
    let no_cn = client_leaf(&ca, "", &["urn:device:1"]);
    assert_eq!(
        device_from_chain(
            &cfg(DeviceIdSource::CommonName),
            &b,
            &chain(&no_cn),
            SystemTime::now()
        ),
        Err(DeviceError::NoCommonName)
    );
}

#[test]
fn device_id_from_uri_prefix() {
    let ca = Ca::new("device-ca");
    let b = bundles(&[("devices", &ca)]);
    let source = DeviceIdSource::UriPrefix("urn:example:device:".into());
    let now = SystemTime::now();

    let leaf = client_leaf(
        &ca,
        "alice-laptop",
        &["https://mdm.example.com/x", "urn:example:device:ABC-123"],
    );
    let dev = device_from_chain(&cfg(source.clone()), &b, &chain(&leaf), now).unwrap();
    assert_eq!(dev.id, "ABC-123");

    let none = client_leaf(&ca, "x", &["urn:other:ABC"]);
    assert_eq!(
        device_from_chain(&cfg(source.clone()), &b, &chain(&none), now),
        Err(DeviceError::NoMatchingUri)
    );
    let two = client_leaf(&ca, "x", &["urn:example:device:A", "urn:example:device:B"]);
    assert_eq!(
        device_from_chain(&cfg(source.clone()), &b, &chain(&two), now),
        Err(DeviceError::AmbiguousUri(2))
    );
    let empty_rest = client_leaf(&ca, "x", &["urn:example:device:"]);
    assert_eq!(
        device_from_chain(&cfg(source), &b, &chain(&empty_rest), now),
        Err(DeviceError::InvalidDeviceId("empty"))
    );
}

#[test]
fn device_id_from_spiffe() {
    let ca = Ca::new("device-ca");
    let b = bundles(&[("devices", &ca)]);
    let now = SystemTime::now();
    let leaf = client_leaf(&ca, "", &["spiffe://devices.example.org/device/abc"]);

    let any_td = DeviceIdSource::Spiffe { trust_domain: None };
    let dev = device_from_chain(&cfg(any_td), &b, &chain(&leaf), now).unwrap();
    assert_eq!(dev.id, "spiffe://devices.example.org/device/abc");
    let sid = dev.spiffe_id.unwrap();
    assert_eq!(sid.trust_domain, "devices.example.org");
    assert_eq!(sid.path, "/device/abc");

    let pinned = DeviceIdSource::Spiffe {
        trust_domain: Some("devices.example.org".into()),
    };
    assert!(device_from_chain(&cfg(pinned), &b, &chain(&leaf), now).is_ok());

    let other = DeviceIdSource::Spiffe {
        trust_domain: Some("corp.example.org".into()),
    };
    assert_eq!(
        device_from_chain(&cfg(other), &b, &chain(&leaf), now),
        Err(DeviceError::WrongTrustDomain {
            expected: "corp.example.org".into(),
            found: "devices.example.org".into()
        })
    );

    // SVID rules apply to device certificates read as SPIFFE too.
    let two = client_leaf(
        &ca,
        "",
        &[
            "spiffe://devices.example.org/a",
            "spiffe://devices.example.org/b",
        ],
    );
    assert_eq!(
        device_from_chain(
            &cfg(DeviceIdSource::Spiffe { trust_domain: None }),
            &b,
            &chain(&two),
            now
        ),
        Err(DeviceError::MultipleUriSans(2))
    );
}

#[test]
fn chain_from_an_unknown_ca_is_refused() {
    let trusted = Ca::new("device-ca");
    let unknown = Ca::new("someone-else");
    let leaf = client_leaf(&unknown, "laptop-1", &[]);
    let err = device_from_chain(
        &cfg(DeviceIdSource::CommonName),
        &bundles(&[("devices", &trusted)]),
        &chain(&leaf),
        SystemTime::now(),
    )
    .unwrap_err();
    assert!(matches!(err, DeviceError::CertificateRejected(_)), "{err}");
    assert_eq!(err.reason_label(), "certificate_rejected");
}

#[test]
fn another_bundle_does_not_vouch_for_devices() {
    // A user CA loaded under another name is not a device CA.
    let users = Ca::new("users-ca");
    let devices = Ca::new("device-ca");
    let leaf = client_leaf(&users, "alice", &[]);
    let err = device_from_chain(
        &cfg(DeviceIdSource::CommonName),
        &bundles(&[("users", &users), ("devices", &devices)]),
        &chain(&leaf),
        SystemTime::now(),
    )
    .unwrap_err();
    assert!(matches!(err, DeviceError::CertificateRejected(_)), "{err}");
}

#[test]
fn expired_and_not_yet_valid_are_refused() {
    let ca = Ca::new("device-ca");
    let b = bundles(&[("devices", &ca)]);
    let now = OffsetDateTime::now_utc();
    let expired = ca.issue(&LeafSpec {
        common_name: "laptop-old".into(),
        client: true,
        not_before: Some(now - Duration::days(2)),
        not_after: Some(now - Duration::hours(1)),
        ..Default::default()
    });
    assert_eq!(
        device_from_chain(
            &cfg(DeviceIdSource::CommonName),
            &b,
            &chain(&expired),
            SystemTime::now()
        ),
        Err(DeviceError::CertificateExpired)
    );
    let early = ca.issue(&LeafSpec {
        common_name: "laptop-new".into(),
        client: true,
        not_before: Some(now + Duration::days(1)),
        not_after: Some(now + Duration::days(2)),
        ..Default::default()
    });
    assert_eq!(
        device_from_chain(
            &cfg(DeviceIdSource::CommonName),
            &b,
            &chain(&early),
            SystemTime::now()
        ),
        Err(DeviceError::CertificateNotYetValid)
    );
    // A valid certificate checked at a time past its notAfter is expired too.
    let valid = client_leaf(&ca, "laptop", &[]);
    assert_eq!(
        device_from_chain(
            &cfg(DeviceIdSource::CommonName),
            &b,
            &chain(&valid),
            SystemTime::now() + StdDuration::from_secs(31 * 86_400)
        ),
        Err(DeviceError::CertificateExpired)
    );
}

#[test]
fn server_only_certificate_is_refused() {
    let ca = Ca::new("device-ca");
    let server = ca.issue_localhost_server("laptop");
    let err = device_from_chain(
        &cfg(DeviceIdSource::CommonName),
        &bundles(&[("devices", &ca)]),
        &chain(&server),
        SystemTime::now(),
    )
    .unwrap_err();
    assert_eq!(
        err,
        DeviceError::CertificateRejected("no clientAuth extended key usage".into())
    );
}

#[test]
fn no_chain_and_missing_bundle() {
    let ca = Ca::new("device-ca");
    assert_eq!(
        device_from_chain(
            &cfg(DeviceIdSource::CommonName),
            &bundles(&[("devices", &ca)]),
            &[],
            SystemTime::now()
        ),
        Err(DeviceError::NoCertificate)
    );
    let leaf = client_leaf(&ca, "laptop", &[]);
    assert_eq!(
        device_from_chain(
            &cfg(DeviceIdSource::CommonName),
            &bundles(&[("users", &ca)]),
            &chain(&leaf),
            SystemTime::now()
        ),
        Err(DeviceError::BundleNotLoaded("devices".into()))
    );
}

#[test]
fn chain_through_an_intermediate() {
    // Built with rcgen directly: root -> intermediate -> leaf, bundle holds only the root.
    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::default();
    root.distinguished_name.push(DnType::CommonName, "root");
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let root_cert = root.self_signed(&root_key).unwrap();

    let int_key = KeyPair::generate().unwrap();
    let mut int = CertificateParams::default();
    int.distinguished_name
        .push(DnType::CommonName, "intermediate");
    int.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    int.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let int_cert = int.signed_by(&int_key, &root_cert, &root_key).unwrap();

    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name.push(DnType::CommonName, "laptop-7");
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let leaf_cert = leaf.signed_by(&leaf_key, &int_cert, &int_key).unwrap();

    let b = TrustBundles::new(vec![Bundle::from_der(
        "devices",
        &[root_cert.der().clone()],
    )
    .unwrap()]);
    let full = vec![leaf_cert.der().clone(), int_cert.der().clone()];
    let dev = device_from_chain(
        &cfg(DeviceIdSource::CommonName),
        &b,
        &full,
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(dev.id, "laptop-7");
    // Without the intermediate the leaf does not chain.
    assert!(matches!(
        device_from_chain(
            &cfg(DeviceIdSource::CommonName),
            &b,
            &full[..1],
            SystemTime::now()
        ),
        Err(DeviceError::CertificateRejected(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// workloads

fn mapping(td: &str, bundle: &str) -> WorkloadMapping {
    WorkloadMapping {
        trust_domain: td.into(),
        bundle: bundle.into(),
        username_prefix: "spiffe:".into(),
    }
}

#[test]
fn workload_svid_maps_to_a_user() {
    let prod = Ca::new("spire-prod");
    let b = bundles(&[("spiffe-prod", &prod)]);
    let leaf = client_leaf(&prod, "", &["spiffe://prod.example.org/ns/default/sa/api"]);
    let w = workload_from_chain(
        &[mapping("prod.example.org", "spiffe-prod")],
        &b,
        &chain(&leaf),
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(
        w.username,
        "spiffe:spiffe://prod.example.org/ns/default/sa/api"
    );
    assert_eq!(w.spiffe_id.trust_domain, "prod.example.org");
    assert_eq!(w.bundle, "spiffe-prod");
    assert_eq!(
        w.cert_sha256.as_slice(),
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &leaf.cert_der).as_ref()
    );
}

#[test]
fn one_trust_domain_cannot_mint_another_ones_ids() {
    let prod = Ca::new("spire-prod");
    let staging = Ca::new("spire-staging");
    let b = bundles(&[("spiffe-prod", &prod), ("spiffe-staging", &staging)]);
    let maps = [
        mapping("prod.example.org", "spiffe-prod"),
        mapping("staging.example.org", "spiffe-staging"),
    ];
    // Signed by staging's CA but claiming a prod ID.
    let forged = client_leaf(
        &staging,
        "",
        &["spiffe://prod.example.org/ns/default/sa/api"],
    );
    assert!(matches!(
        workload_from_chain(&maps, &b, &chain(&forged), SystemTime::now()),
        Err(DeviceError::CertificateRejected(_))
    ));
    let unknown = client_leaf(&prod, "", &["spiffe://other.example.org/a"]);
    assert_eq!(
        workload_from_chain(&maps, &b, &chain(&unknown), SystemTime::now()),
        Err(DeviceError::UnknownTrustDomain("other.example.org".into()))
    );
    let not_svid = client_leaf(&prod, "x", &[]);
    assert_eq!(
        workload_from_chain(&maps, &b, &chain(&not_svid), SystemTime::now()),
        Err(DeviceError::NoUriSan)
    );
}

#[test]
fn workload_mappings_are_checked() {
    assert!(validate_workload_mappings(&[
        mapping("prod.example.org", "a"),
        mapping("staging.example.org", "b"),
    ])
    .is_ok());
    for bad in [
        vec![
            mapping("prod.example.org", "a"),
            mapping("prod.example.org", "b"),
        ],
        vec![mapping("Prod.example.org", "a")],
        vec![mapping("spiffe://prod.example.org", "a")],
        vec![mapping("prod.example.org", "")],
    ] {
        assert!(
            matches!(
                validate_workload_mappings(&bad),
                Err(DeviceError::InvalidConfig(_))
            ),
            "{bad:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// RFC 8705 binding

#[test]
fn x5t_s256_is_unpadded_base64url_sha256() {
    // SHA-256 of the empty string.
    assert_eq!(x5t_s256(b""), "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU");
}

#[test]
fn binding_outcomes() {
    let ca = Ca::new("device-ca");
    let b = bundles(&[("devices", &ca)]);
    let now = SystemTime::now();
    let mine = client_leaf(&ca, "laptop-1", &[]);
    let theirs = client_leaf(&ca, "laptop-2", &[]);
    let c = cfg(DeviceIdSource::CommonName);
    let my_dev = device_from_chain(&c, &b, &chain(&mine), now).unwrap();
    let their_dev = device_from_chain(&c, &b, &chain(&theirs), now).unwrap();
    let cnf = x5t_s256(&mine.cert_der);

    // Matching.
    assert_eq!(check_binding(Some(&cnf), Some(&my_dev)), Binding::Bound);
    assert_eq!(
        check_binding_der(Some(&cnf), Some(&mine.cert_der)),
        Binding::Bound
    );
    assert!(Binding::Bound.is_bound() && !Binding::Bound.rejects_request());
    // Another device's certificate.
    assert_eq!(
        check_binding(Some(&cnf), Some(&their_dev)),
        Binding::Mismatch
    );
    assert_eq!(
        check_binding_der(Some(&cnf), Some(&theirs.cert_der)),
        Binding::Mismatch
    );
    assert!(Binding::Mismatch.rejects_request());
    // A token without cnf, with or without a certificate.
    assert_eq!(check_binding(None, Some(&my_dev)), Binding::Unbound);
    assert_eq!(check_binding(None, None), Binding::Unbound);
    assert!(!Binding::Unbound.is_bound() && !Binding::Unbound.rejects_request());
    // cnf without a certificate.
    assert_eq!(check_binding(Some(&cnf), None), Binding::NoCertificate);
    assert_eq!(check_binding_der(Some(&cnf), None), Binding::NoCertificate);
    assert!(Binding::NoCertificate.rejects_request());
}

#[test]
fn malformed_cnf_never_binds() {
    let der = b"certificate".as_slice();
    let good = x5t_s256(der);
    let hex: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let std_b64 = good.replace('-', "+").replace('_', "/");
    for bad in [
        String::new(),
        format!("{good}="),            // padded
        good[..good.len() - 1].into(), // truncated
        format!("{good}AA"),           // too long
        hex,                           // hex, not base64url
        good.to_uppercase(),           // different bytes
    ]
    .into_iter()
    .chain((std_b64 != good).then_some(std_b64))
    {
        assert_eq!(
            check_binding_der(Some(&bad), Some(der)),
            Binding::Mismatch,
            "{bad:?}"
        );
    }
    // The last character carries 2 spare bits: flipping one gives a non-canonical encoding of
    // the very same hash, which strict decoding refuses.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut tweaked = good.clone().into_bytes();
    let last = tweaked.last_mut().unwrap();
    let index = ALPHABET.iter().position(|c| c == last).unwrap();
    *last = ALPHABET[index ^ 1];
    let tweaked = String::from_utf8(tweaked).unwrap();
    assert_ne!(tweaked, good);
    assert_eq!(
        check_binding_der(Some(&tweaked), Some(der)),
        Binding::Mismatch
    );
}

// ---------------------------------------------------------------------------------------------
// configuration

fn parse_cfg(yaml: &str) -> Result<DeviceConfig, String> {
    serde_yaml_ng::from_str::<DeviceConfig>(yaml).map_err(|e| e.to_string())
}

#[test]
fn config_forms() {
    assert_eq!(
        parse_cfg("bundle: devices\ndeviceId: {from: spiffe, trustDomain: devices.example.org}")
            .unwrap()
            .device_id,
        DeviceIdSource::Spiffe {
            trust_domain: Some("devices.example.org".into())
        }
    );
    assert_eq!(
        parse_cfg("bundle: devices\ndeviceId: {from: spiffe}")
            .unwrap()
            .device_id,
        DeviceIdSource::Spiffe { trust_domain: None }
    );
    assert_eq!(
        parse_cfg("bundle: devices\ndeviceId: {from: commonName}")
            .unwrap()
            .device_id,
        DeviceIdSource::CommonName
    );
    let c = parse_cfg("bundle: devices\ndeviceId: {from: uriPrefix, prefix: 'urn:dev:'}").unwrap();
    assert_eq!(c.device_id, DeviceIdSource::UriPrefix("urn:dev:".into()));
    assert!(c.validate().is_ok());
    // Round trip through the wire form.
    let yaml = serde_yaml_ng::to_string(&c).unwrap();
    assert_eq!(parse_cfg(&yaml).unwrap(), c);
}

#[test]
fn config_mistakes_are_refused() {
    for (yaml, why) in [
        (
            "bundle: devices\ndeviceId: {from: uriPrefix}",
            "needs `prefix`",
        ),
        (
            "bundle: devices\ndeviceId: {from: uriPrefix, prefix: ''}",
            "empty URI prefix",
        ),
        (
            "bundle: devices\ndeviceId: {from: spiffe, prefix: x}",
            "only with `from: uriPrefix`",
        ),
        (
            "bundle: devices\ndeviceId: {from: commonName, trustDomain: a.b}",
            "only with `from: spiffe`",
        ),
        (
            "bundle: devices\ndeviceId: {from: spiffe, trustDomain: Example.org}",
            "lowercase",
        ),
        (
            "bundle: devices\ndeviceId: {from: serialNumber}",
            "unknown variant",
        ),
        (
            "bundle: devices\ndeviceId: {from: spiffe, extra: 1}",
            "unknown field",
        ),
        (
            "bundle: devices\ndeviceId: {from: spiffe}\npostur: {required: true}",
            "unknown field",
        ),
        (
            "bundle: devices\ndeviceId: {from: spiffe}\nposture: x",
            "expected struct PostureConfig",
        ),
        ("deviceId: {from: spiffe}", "missing field `bundle`"),
    ] {
        let err = parse_cfg(yaml).unwrap_err();
        assert!(err.contains(why), "{yaml:?}: {err}");
    }
    let empty_bundle = DeviceConfig {
        bundle: String::new(),
        device_id: DeviceIdSource::CommonName,
        posture: None,
    };
    assert!(matches!(
        empty_bundle.validate(),
        Err(DeviceError::InvalidConfig(_))
    ));
}

#[test]
fn workload_mapping_config() {
    let m: WorkloadMapping = serde_yaml_ng::from_str(
        "trustDomain: prod.example.org\nbundle: spiffe-prod\nusernamePrefix: 'spiffe:'",
    )
    .unwrap();
    assert_eq!(m, mapping("prod.example.org", "spiffe-prod"));
    assert!(serde_yaml_ng::from_str::<WorkloadMapping>(
        "trustDomain: a\nbundle: b\nusernamePrefix: ''\ngroups: []"
    )
    .is_err());
}
