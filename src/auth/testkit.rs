//! Test-only helpers shared by the unit tests of `auth`'s parts: a fixed RSA key pair, fresh EC and Ed25519 key
//! pairs, token signing, and a [`Fixture`] that writes key files and builds an [`Authenticator`] from them.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

use super::Authenticator;
use crate::config::{AuthConfig, JwtKey, SecretSource};

/// Test-only RSA 2048 key pair (generated with `openssl genpkey -algorithm RSA`); not used anywhere else.
pub(super) const RSA_PRIVATE: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQDLwG/L8mlEbnWx\n\
GLOuPCMIv5Sp4xSsCQHoCCV6gtYwMR34ZmBZwoWqHvZj6rPJTq1t1a88An7fxVuD\n\
6MT7+rPlkSXDQXfndGLAIXWUygnIFf56tdzAX3kcYHeaa7GBUqufB/sltPxFgslU\n\
bHwoeayQ7W98CAkWdqq+gw+uGQNB/0IYPnNErrHcX8amTi5VC0bQU1xNnIxz9M6S\n\
bc6Vzd1VLogr4qCzy0JrtiIYn02At3rmlpSocGMkw4dqSVOQreOCD5dqZHWy4VdN\n\
y+EAt37yvt41NPloz+s0gd2XSILC1GTP0Crw+ZgbW+3rIrhf5G+ufoNdRJga1ovI\n\
nNl2Jei5AgMBAAECgf8ahJpy2v725Nk31smWTT9Rojbk2H898wL1HXvF2I11sRMz\n\
3gfFkho9T8mpiKMNAuS1140kKKFYrc2PfkYdJ+b53uS1NqGjv2Mw7PC2IlSByocz\n\
iV6B/PGIParwktcvVGfrBOs+G0+8mnoQcEsyn7betNg2lrnaVqkDa/xm5celoJbM\n\
ZhAECJlfLhcIuIr8JJKW3z7EbH+ROT3MW+MHJ3f9IlbDnLo7spQLJ2hJ6v3s0JPJ\n\
tADaOmFgs45yAGWFAzIYcJNjDbcUR6oZRq5AY52RHHPSUH/LugnPv+e7pW8SHS3Z\n\
0Eso4WoMXWd8aYOzDQaxoctt7ATQ1WovvepUTW0CgYEA/Jo5VVSImgSpJCiFlBvc\n\
fflMh13dtbQ+AgOB2Yc+ppg9SqDVJE7wSIn4ZL83Sr+DpHSH4vDVlM4m6AARn04p\n\
llBlQN6J8CldyK+H2YBgbbZl3JbSB7NuITOQA1V0qurWNSYMJsewiEPzgYmhabiW\n\
mKQGTqF4wfWRQQ7MaWiFegUCgYEAzn4BxxqiVE0hKQ+kZu8VsWteBlgr/kIUc1Q0\n\
FU2fb2bOSsbCka11WgqRDzJhnO/fO9odeyA8Ab1UTUfDJvfpkHjT0VcdM3/wBZcb\n\
fqUydjqOvVsQ4uEN7AMjtYie85gIR26nu1qt96u05ozmxxA+hj/T+nX01fKSCp4M\n\
2XmjDiUCgYEA5FrPpdJLw2CfP67aQzCEveVXR7CVs6QDwnJFOs9G1fgewI5w4Ofz\n\
1L/Vq84pQAuuCEfIaGJr0qAjD+ywAaH5eoenYWNMs63RuJDmcLvbcJNJtocpzAhr\n\
cNxaPolMdQ7jIx0IMy6m6ijzw5EWOKrEia0Ofpr+vekvrO6h4FC7CbkCgYEAuoT7\n\
mhum0bsx3uMwP4Jq9+3h6p0ub+bEjkBbI3sQLxKP+N981RX30LOGwFFj9tx9qpSk\n\
2JkPWwrn4T6XOtXo9gUOYCPuTpyb9JC/1y/lWwId+VEO+cEMUEmtscaMvcBwigWc\n\
IRIR3owNRcu0kc9MivuQwMZXuAH6hPiq5q6G6LkCgYAFScZyy7hT0A0UMFSj46/m\n\
dd2t5eCKuDdcdAfaxTzxUwnzjBRwHW7f4/0yI99xeAcIsK010CWWWAvxwzKsEYrN\n\
AvBQLskZlA80r/BTSZKdQNspeJvc9TibDOD6UCHlVf3nzKUQn+2B6bNF5lJOLTmt\n\
YXXW2n4Xq+xKXl0fj38Myg==\n\
-----END PRIVATE KEY-----\n\
";
pub(super) const RSA_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAy8Bvy/JpRG51sRizrjwj\n\
CL+UqeMUrAkB6AgleoLWMDEd+GZgWcKFqh72Y+qzyU6tbdWvPAJ+38Vbg+jE+/qz\n\
5ZElw0F353RiwCF1lMoJyBX+erXcwF95HGB3mmuxgVKrnwf7JbT8RYLJVGx8KHms\n\
kO1vfAgJFnaqvoMPrhkDQf9CGD5zRK6x3F/Gpk4uVQtG0FNcTZyMc/TOkm3Olc3d\n\
VS6IK+Kgs8tCa7YiGJ9NgLd65paUqHBjJMOHaklTkK3jgg+XamR1suFXTcvhALd+\n\
8r7eNTT5aM/rNIHdl0iCwtRkz9Aq8PmYG1vt6yK4X+Rvrn6DXUSYGtaLyJzZdiXo\n\
uQIDAQAB\n\
-----END PUBLIC KEY-----\n\
";

pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

pub(super) fn claims(sub: &str) -> Value {
    json!({ "sub": sub, "exp": now() + 600 })
}

pub(super) fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    encode(&h, claims, key).expect("sign")
}

pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    pub(super) cfg: AuthConfig,
}

/// A directory holding key files; `add_*` append keys to `cfg.keys`.
impl Fixture {
    pub(super) fn new() -> Self {
        Self {
            _dir: tempfile::tempdir().expect("tempdir"),
            cfg: AuthConfig::default(),
        }
    }
    pub(super) fn file(&self, name: &str, text: &str) -> std::path::PathBuf {
        let path = self._dir.path().join(name);
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .expect("write fixture");
        path
    }
    pub(super) fn add_hs(&mut self, alg: &str, kid: Option<&str>, secret: &str) {
        let path = self.file(&format!("secret-{alg}-{kid:?}-{secret}"), &format!("{secret}\n"));
        self.cfg.keys.push(JwtKey {
            kid: kid.map(str::to_owned),
            algorithm: alg.parse().expect("algorithm"),
            secret: Some(SecretSource::File(path)),
            public_key_file: None,
        });
    }
    pub(super) fn add_pem(&mut self, alg: &str, kid: Option<&str>, pem: &str) {
        let path = self.file(&format!("pub-{alg}-{kid:?}.pem"), pem);
        self.cfg.keys.push(JwtKey {
            kid: kid.map(str::to_owned),
            algorithm: alg.parse().expect("algorithm"),
            secret: None,
            public_key_file: Some(path),
        });
    }
    pub(super) fn auth(&self) -> Authenticator {
        Authenticator::from_config(&self.cfg).expect("auth config loads")
    }
}

/// A fresh P-256 or Ed25519 key pair: signing key, public key PEM, raw public key (SEC1 point or 32 bytes).
pub(super) fn ec_pair(alg: &'static rcgen::SignatureAlgorithm) -> (EncodingKey, String, Vec<u8>) {
    let kp = rcgen::KeyPair::generate_for(alg).expect("keygen");
    let private = kp.serialize_pem();
    let enc = if std::ptr::eq(alg, &rcgen::PKCS_ED25519) {
        EncodingKey::from_ed_pem(private.as_bytes())
    } else {
        EncodingKey::from_ec_pem(private.as_bytes())
    };
    (
        enc.expect("private key"),
        kp.public_key_pem(),
        kp.public_key_raw().to_vec(),
    )
}

pub(super) fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub(super) fn hs_auth(tweak: impl FnOnce(&mut AuthConfig)) -> (Fixture, Authenticator) {
    let mut f = Fixture::new();
    f.add_hs("HS256", None, "s");
    tweak(&mut f.cfg);
    let auth = f.auth();
    (f, auth)
}

pub(super) fn hs(claims: &Value) -> String {
    sign(Algorithm::HS256, None, claims, &EncodingKey::from_secret(b"s"))
}
