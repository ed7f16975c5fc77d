//! Tokens for the tests: an HS256 secret on disk and a gateway config that requires it ([`Keys`]), tokens signed
//! with it, an ES256 key pair, and the small encodings tests put tokens in (`Bearer`, base64url).
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use roomwire::{
    Config,
    config::{JwtKey, SecretSource},
};
use serde_json::{Value, json};

/// The HMAC secret every [`Keys`] writes and [`signed`] signs with.
pub const SECRET: &str = "test-hs256-secret-for-roomwire";

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// HMAC key material on disk (the secret is read from a file, never from the config itself).
pub struct Keys {
    pub dir: tempfile::TempDir,
}

impl Keys {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hs.secret"), format!("{SECRET}\n")).unwrap();
        Keys { dir }
    }

    /// Requires tokens (no anonymous), HS256 with the secret file; the leeway stays the default.
    pub fn require(&self, c: &mut Config) {
        c.auth.allow_anonymous = false;
        c.auth.keys = vec![JwtKey {
            kid: None,
            algorithm: Algorithm::HS256,
            secret: Some(SecretSource::File(self.dir.path().join("hs.secret"))),
            public_key_file: None,
        }];
    }

    /// [`Keys::require`] with no leeway.
    pub fn apply(&self, c: &mut Config) {
        self.require(c);
        c.auth.leeway_secs = 0;
    }

    /// Writes `text` to `name` in the keys' directory.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// An HS256 token with exactly these claims, signed with `secret`.
pub fn hs256(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// An HS256 token with exactly these claims, signed with [`SECRET`].
pub fn signed(claims: &Value) -> String {
    hs256(SECRET.as_bytes(), claims)
}

/// A token for `sub` valid `ttl` seconds, with `extra` claims merged in.
pub fn token_ttl(sub: &str, ttl: i64, extra: Value) -> String {
    let mut claims = json!({ "sub": sub, "exp": (now() as i64 + ttl) });
    if let Value::Object(m) = extra {
        for (k, v) in m {
            claims[k] = v;
        }
    }
    signed(&claims)
}

/// A token for `sub` valid 10 minutes, with `extra` claims merged in.
pub fn token(sub: &str, extra: Value) -> String {
    token_ttl(sub, 600, extra)
}

/// A token for `sub` valid `ttl` seconds that may join every room (`"rooms": ["*"]`).
pub fn token_all_rooms(sub: &str, ttl: u64) -> String {
    signed(&json!({ "sub": sub, "exp": now() + ttl, "rooms": ["*"] }))
}

/// The `Authorization` header value for `t`.
pub fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// Base64url without padding, as in a JWT.
pub fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An ES256 key pair: the signing key, and the public key written as `es256.pem` in `dir`.
pub fn es256(dir: &Path) -> (EncodingKey, PathBuf) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let path = dir.join("es256.pem");
    std::fs::write(&path, kp.public_key_pem()).unwrap();
    (EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(), path)
}
