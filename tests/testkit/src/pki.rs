//! A test PKI minted at test time with rcgen: certificate authorities, serving certificates,
//! client certificates (valid, expired, not yet valid, from an unknown CA).
//!
//! Nothing here is checked in: every test run gets fresh keys, so no test depends on a key that
//! could leak or expire.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// A certificate and its private key, both PEM, plus the leaf's DER.
#[derive(Clone, Debug)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
}

impl CertKey {
    /// Writes `<name>.crt` and `<name>.key` into `dir` and returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let crt = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&crt, &self.cert_pem).expect("write cert");
        std::fs::write(&key, &self.key_pem).expect("write key");
        (crt, key)
    }
}

/// A certificate authority that can issue leaves.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
}

/// What kind of leaf to issue.
#[derive(Clone, Debug, Default)]
pub struct LeafSpec {
    pub common_name: String,
    /// Each entry becomes one `O` attribute (kube-apiserver reads each O as a group).
    /// At most two are supported by the underlying encoder.
    pub organizations: Vec<String>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<std::net::IpAddr>,
    pub uris: Vec<String>,
    pub server: bool,
    pub client: bool,
    pub not_before: Option<OffsetDateTime>,
    pub not_after: Option<OffsetDateTime>,
}

impl Ca {
    pub fn new(common_name: &str) -> Ca {
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(365);
        let cert = params.self_signed(&key).expect("self-sign ca");
        Ca { cert, key }
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn cert_der(&self) -> Vec<u8> {
        self.cert.der().to_vec()
    }

    pub fn issue(&self, spec: &LeafSpec) -> CertKey {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if !spec.common_name.is_empty() {
            dn.push(DnType::CommonName, spec.common_name.as_str());
        }
        // rcgen keys its distinguished name by attribute type, so a second `O` is encoded
        // through the custom-type door with the same OID (2.5.4.10).
        for (i, o) in spec.organizations.iter().enumerate() {
            match i {
                0 => dn.push(DnType::OrganizationName, o.as_str()),
                1 => dn.push(DnType::CustomDnType(vec![2, 5, 4, 10]), o.as_str()),
                _ => panic!("at most two organizations are supported"),
            }
        }
        params.distinguished_name = dn;
        for d in &spec.dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(d.clone().try_into().expect("dns name")));
        }
        for ip in &spec.ip_addresses {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        for u in &spec.uris {
            params
                .subject_alt_names
                .push(SanType::URI(u.clone().try_into().expect("uri")));
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if spec.server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        let now = OffsetDateTime::now_utc();
        params.not_before = spec.not_before.unwrap_or(now - Duration::hours(1));
        params.not_after = spec.not_after.unwrap_or(now + Duration::days(30));
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign leaf");
        CertKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
        }
    }

    /// A serving certificate for `localhost` and `127.0.0.1`.
    pub fn issue_localhost_server(&self, cn: &str) -> CertKey {
        self.issue(&LeafSpec {
            common_name: cn.into(),
            dns_names: vec!["localhost".into()],
            ip_addresses: vec!["127.0.0.1".parse().unwrap()],
            server: true,
            ..Default::default()
        })
    }

    /// A client certificate the way kube-apiserver reads them: CN is the user, each O a group.
    pub fn issue_client(&self, user: &str, groups: &[&str]) -> CertKey {
        self.issue(&LeafSpec {
            common_name: user.into(),
            organizations: groups.iter().map(|g| g.to_string()).collect(),
            client: true,
            ..Default::default()
        })
    }
}

/// The set of authorities and leaves a gateway test needs.
pub struct TestPki {
    /// Signs the stand-in kube-apiserver's serving cert and the gateway's upstream client cert.
    pub cluster_ca: Ca,
    /// The `users` client-certificate bundle of the gateway.
    pub users_ca: Ca,
    /// Signs the gateway's own serving certificate.
    pub gateway_ca: Ca,
    /// An authority nobody trusts.
    pub unknown_ca: Ca,
    pub apiserver_serving: CertKey,
    pub gateway_serving: CertKey,
    /// The gateway's client certificate to the stand-in (user `ztgate`, allowed to impersonate).
    pub gateway_client: CertKey,
}

/// The user name the stand-in allows to impersonate.
pub const GATEWAY_USER: &str = "ztgate";

impl TestPki {
    pub fn new() -> TestPki {
        let cluster_ca = Ca::new("test-cluster-ca");
        let users_ca = Ca::new("test-users-ca");
        let gateway_ca = Ca::new("test-gateway-ca");
        let unknown_ca = Ca::new("unknown-ca");
        let apiserver_serving = cluster_ca.issue_localhost_server("kube-apiserver");
        let gateway_serving = gateway_ca.issue_localhost_server("ztgate");
        let gateway_client = cluster_ca.issue_client(GATEWAY_USER, &[]);
        TestPki {
            cluster_ca,
            users_ca,
            gateway_ca,
            unknown_ca,
            apiserver_serving,
            gateway_serving,
            gateway_client,
        }
    }

    /// A user certificate from the trusted users CA.
    pub fn user(&self, name: &str, groups: &[&str]) -> CertKey {
        self.users_ca.issue_client(name, groups)
    }

    /// A user certificate that expired an hour ago.
    pub fn expired_user(&self, name: &str) -> CertKey {
        let now = OffsetDateTime::now_utc();
        self.users_ca.issue(&LeafSpec {
            common_name: name.into(),
            client: true,
            not_before: Some(now - Duration::days(2)),
            not_after: Some(now - Duration::hours(1)),
            ..Default::default()
        })
    }

    /// A user certificate whose validity starts tomorrow.
    pub fn not_yet_valid_user(&self, name: &str) -> CertKey {
        let now = OffsetDateTime::now_utc();
        self.users_ca.issue(&LeafSpec {
            common_name: name.into(),
            client: true,
            not_before: Some(now + Duration::days(1)),
            not_after: Some(now + Duration::days(2)),
            ..Default::default()
        })
    }

    /// A user certificate signed by an authority the gateway does not trust.
    pub fn unknown_ca_user(&self, name: &str) -> CertKey {
        self.unknown_ca.issue_client(name, &["system:masters"])
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}
