//! Signing keys of the development issuer: generation, JWK rendering, JWS signing.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
    RSA_PKCS1_SHA256,
};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Value};

use super::SigningAlg;

enum Material {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

/// One signing key with its kid and the public parameters of its JWK.
pub(super) struct SigningKey {
    pub(super) alg: SigningAlg,
    pub(super) kid: String,
    /// The key-type specific members of the JWK (`kty`, `n`/`e`, `crv`/`x`/`y`).
    public: Value,
    material: Material,
}

impl SigningKey {
    /// A fresh key for `alg`. The kid is derived from the RFC 7638 thumbprint, so two keys never
    /// share a kid; `kid_prefix` makes it readable in logs.
    pub(super) fn generate(alg: SigningAlg, kid_prefix: &str) -> SigningKey {
        let (material, public, thumbprint_input) = match alg {
            SigningAlg::RS256 => {
                let kp = RsaKeyPair::generate(KeySize::Rsa2048).expect("generate RSA key");
                let c = PublicKeyComponents::<Vec<u8>>::from(kp.public_key());
                let n = URL_SAFE_NO_PAD.encode(&c.n);
                let e = URL_SAFE_NO_PAD.encode(&c.e);
                // RFC 7638: required members, lexicographic order, no whitespace.
                let tp = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
                (Material::Rsa(kp), json!({"kty": "RSA", "n": n, "e": e}), tp)
            }
            SigningAlg::ES256 => {
                let kp = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
                    .expect("generate P-256 key");
                // Uncompressed point: 0x04 || x (32 bytes) || y (32 bytes).
                let point = kp.public_key().as_ref();
                assert_eq!(point.len(), 65, "uncompressed P-256 point");
                let x = URL_SAFE_NO_PAD.encode(&point[1..33]);
                let y = URL_SAFE_NO_PAD.encode(&point[33..65]);
                let tp = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
                (
                    Material::Ec(kp),
                    json!({"kty": "EC", "crv": "P-256", "x": x, "y": y}),
                    tp,
                )
            }
            SigningAlg::EdDSA => {
                let kp = Ed25519KeyPair::generate().expect("generate Ed25519 key");
                let x = URL_SAFE_NO_PAD.encode(kp.public_key().as_ref());
                let tp = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
                (
                    Material::Ed(kp),
                    json!({"kty": "OKP", "crv": "Ed25519", "x": x}),
                    tp,
                )
            }
        };
        let thumbprint = URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            thumbprint_input.as_bytes(),
        ));
        SigningKey {
            alg,
            kid: format!("{kid_prefix}-{}", &thumbprint[..16]),
            public,
            material,
        }
    }

    /// The JWK as served in the JWKS, with `use` set to `key_use` ("sig" or "enc").
    pub(super) fn jwk(&self, key_use: &str) -> Value {
        let mut jwk = self.public.clone();
        let obj = jwk.as_object_mut().expect("jwk is an object");
        obj.insert("kid".into(), Value::String(self.kid.clone()));
        obj.insert("use".into(), Value::String(key_use.into()));
        obj.insert("alg".into(), Value::String(self.alg.as_str().into()));
        jwk
    }

    /// The standard JOSE header for this key.
    pub(super) fn header(&self) -> Value {
        json!({"alg": self.alg.as_str(), "typ": "JWT", "kid": self.kid})
    }

    /// A compact JWS over exactly these header and claims values.
    pub(super) fn sign_compact(&self, header: &Value, claims: &Value) -> String {
        let header = serde_json::to_vec(header).expect("serialize header");
        let claims = serde_json::to_vec(claims).expect("serialize claims");
        let mut out = URL_SAFE_NO_PAD.encode(header);
        out.push('.');
        out.push_str(&URL_SAFE_NO_PAD.encode(claims));
        let signature = self.raw_sign(out.as_bytes());
        out.push('.');
        out.push_str(&URL_SAFE_NO_PAD.encode(signature));
        out
    }

    fn raw_sign(&self, msg: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.material {
            Material::Rsa(kp) => {
                let mut sig = vec![0u8; kp.public_modulus_len()];
                kp.sign(&RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                    .expect("RSA sign");
                sig
            }
            Material::Ec(kp) => kp.sign(&rng, msg).expect("ECDSA sign").as_ref().to_vec(),
            Material::Ed(kp) => kp.sign(msg).as_ref().to_vec(),
        }
    }

    /// SPKI ("PUBLIC KEY") PEM of the public key.
    pub(super) fn public_key_pem(&self) -> String {
        let der: Vec<u8> = match &self.material {
            Material::Rsa(kp) => kp
                .public_key()
                .as_der()
                .expect("encode RSA SPKI")
                .as_ref()
                .to_vec(),
            Material::Ec(kp) => kp
                .public_key()
                .as_der()
                .expect("encode EC SPKI")
                .as_ref()
                .to_vec(),
            Material::Ed(kp) => kp
                .public_key()
                .as_der()
                .expect("encode Ed25519 SPKI")
                .as_ref()
                .to_vec(),
        };
        let b64 = STANDARD.encode(der);
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        pem
    }
}
