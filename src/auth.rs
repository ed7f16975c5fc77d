//! Authentication: turns the token a client presents at the upgrade (bearer header, `?token=` or a cookie) into an
//! [`Identity`] carrying the user and the room patterns it may join and publish to. An [`Authenticator`] is built
//! once at startup from `[auth]` (HMAC secrets, PEM public keys, a JWKS file), shared via `Arc`, and is read-only
//! afterwards. A token is accepted only if its header `alg` equals the configured algorithm of a key (so `alg: none`
//! and RS/HS confusion are refused), its signature verifies, `exp` is in the future and `nbf` in the past (both
//! with `auth.leeway_secs`), and `iss`/`aud` match when configured. [`redact_uri`] is what logs print instead of
//! a request URI, so tokens never reach the logs.

use std::path::Path;

use hyper::http::{HeaderMap, Uri, header};
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm},
};
use serde_json::Value;

use crate::config::{AuthConfig, Permissions};
use crate::protocol::glob_match;

/// Longest token accepted, in bytes; longer ones are `Malformed` before any parsing or crypto.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a token (or its absence) was refused, or why the `[auth]` section could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token and anonymous access is disabled.
    #[error("no token presented")]
    Missing,
    /// Not a JWT (shape, base64, JSON, unknown `alg` such as `none`) or a claim has the wrong type.
    #[error("malformed token")]
    Malformed,
    /// A required claim (`exp`, `sub`, and `iss`/`aud` when configured) is absent.
    #[error("token lacks the `{0}` claim")]
    MissingClaim(&'static str),
    /// `exp` (plus leeway) is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` (minus leeway) is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// No candidate key verified the signature.
    #[error("bad token signature")]
    BadSignature,
    /// No configured key has the token's `alg` (and `kid`, if the token names one).
    #[error("no key for this token's alg/kid")]
    UnknownKey,
    /// `iss` differs from `auth.issuer`.
    #[error("wrong token issuer")]
    WrongIssuer,
    /// `aud` is not one of `auth.audience`.
    #[error("wrong token audience")]
    WrongAudience,
    /// The `[auth]` section could not be turned into keys (startup only).
    #[error("invalid `{key}`: {message}")]
    Config {
        /// Config key or file at fault, e.g. `auth.keys.public_key_file`.
        key: String,
        /// What is wrong (names the file where there is one).
        message: String,
    },
}

impl AuthError {
    /// Short public text for the 401 body or the error frame. Never contains token material.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "token required",
            AuthError::Malformed => "malformed token",
            AuthError::MissingClaim(_) => "token lacks a required claim",
            AuthError::Expired => "token expired",
            AuthError::NotYetValid => "token not yet valid",
            AuthError::BadSignature => "invalid token signature",
            AuthError::UnknownKey => "unknown token key",
            AuthError::WrongIssuer => "wrong token issuer",
            AuthError::WrongAudience => "wrong token audience",
            AuthError::Config { .. } => "authentication misconfigured",
        }
    }

    fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        AuthError::Config {
            key: key.into(),
            message: message.into(),
        }
    }
}

fn map_jwt_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm => AuthError::UnknownKey,
        ErrorKind::MissingRequiredClaim(c) => match c.as_str() {
            "exp" => AuthError::MissingClaim("exp"),
            "iss" => AuthError::MissingClaim("iss"),
            "aud" => AuthError::MissingClaim("aud"),
            "sub" => AuthError::MissingClaim("sub"),
            _ => AuthError::Malformed,
        },
        ErrorKind::InvalidToken
        | ErrorKind::InvalidClaimFormat(_)
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => AuthError::Malformed,
        // Key-format problems surfacing at verification: the token is not accepted.
        _ => AuthError::BadSignature,
    }
}

/// One verification key: its algorithm is fixed by configuration, never taken from the token.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
    /// Validation for this key's algorithm with the configured leeway, issuer and audience.
    validation: Validation,
}

/// Verifies tokens and builds identities. Built once at startup by [`Authenticator::from_config`], shared via
/// `Arc`, immutable afterwards (key rotation = restart).
pub struct Authenticator {
    /// All keys from `auth.keys` then the JWKS file, in that order.
    keys: Vec<Key>,
    allow_anonymous: bool,
    anonymous: Permissions,
    personal_room: Option<String>,
    rooms_claim: String,
    publish_claim: String,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are secrets (HMAC) or at least noise: print only their shape.
        let keys: Vec<_> = self.keys.iter().map(|k| (k.kid.as_deref(), k.alg)).collect();
        f.debug_struct("Authenticator")
            .field("keys", &keys)
            .field("allow_anonymous", &self.allow_anonymous)
            .finish()
    }
}

fn parse_alg(name: &str) -> Option<Algorithm> {
    Some(match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "ES256" => Algorithm::ES256,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

impl Authenticator {
    /// Loads every key named by `cfg`: HMAC secrets through [`crate::config::SecretSource::load`], PEM public
    /// keys (RS256, ES256, EdDSA) and the JWKS file (every key needs a `kid`; RSA `n`/`e`, EC P-256 `x`/`y`, OKP
    /// Ed25519 `x`). Errors name the config key and file.
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, AuthError> {
        let mut keys = Vec::new();
        for k in &cfg.keys {
            let alg = parse_alg(&k.algorithm).ok_or_else(|| {
                AuthError::config(
                    "auth.keys.algorithm",
                    format!("unsupported algorithm {:?}", k.algorithm),
                )
            })?;
            let key = match alg {
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                    let src = k.secret.as_ref().ok_or_else(|| {
                        AuthError::config("auth.keys.secret", format!("{} needs `secret`", k.algorithm))
                    })?;
                    let secret = src
                        .load("auth.keys.secret")
                        .map_err(|e| AuthError::config("auth.keys.secret", e.to_string()))?;
                    if secret.expose().is_empty() {
                        return Err(AuthError::config("auth.keys.secret", "secret is empty"));
                    }
                    DecodingKey::from_secret(secret.expose().as_bytes())
                }
                _ => {
                    let path = k.public_key_file.as_deref().ok_or_else(|| {
                        AuthError::config(
                            "auth.keys.public_key_file",
                            format!("{} needs `public_key_file`", k.algorithm),
                        )
                    })?;
                    load_pem(alg, path)?
                }
            };
            keys.push(Key {
                kid: k.kid.clone(),
                alg,
                key,
                validation: validation(cfg, alg),
            });
        }
        if let Some(path) = &cfg.jwks_file {
            keys.extend(load_jwks(cfg, path)?);
        }
        Ok(Self {
            keys,
            allow_anonymous: cfg.allow_anonymous,
            anonymous: cfg.anonymous.clone(),
            personal_room: cfg.personal_room.clone(),
            rooms_claim: cfg.rooms_claim.clone(),
            publish_claim: cfg.publish_claim.clone(),
        })
    }

    /// No token: an anonymous identity (permissions `auth.anonymous`) if `auth.allow_anonymous`, else
    /// [`AuthError::Missing`]. A token is always verified, even when anonymous access is allowed.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        match token {
            Some(t) => self.verify(t),
            None if self.allow_anonymous => Ok(Identity::anonymous(&self.anonymous)),
            None => Err(AuthError::Missing),
        }
    }

    /// Verifies a JWT and builds the user's identity from its claims.
    ///
    /// Candidate keys are those whose configured algorithm equals the header's `alg`; if the header has a `kid`,
    /// only keys with that `kid` or without any `kid` are candidates. The first candidate whose signature verifies
    /// decides (claim errors such as `Expired` are reported from it).
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let mut candidates = self.keys.iter().filter(|k| {
            k.alg == header.alg
                && match (&header.kid, &k.kid) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                }
        });
        let mut tried = false;
        let data = loop {
            let Some(k) = candidates.next() else {
                return Err(if tried {
                    AuthError::BadSignature
                } else {
                    AuthError::UnknownKey
                });
            };
            tried = true;
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &k.key, &k.validation) {
                Ok(data) => break data,
                // Signature or key-format failure: another candidate may still verify. Claim errors come only after
                // a verified signature, so they are final.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::InvalidSignature
                            | ErrorKind::InvalidEcdsaKey
                            | ErrorKind::InvalidEddsaKey
                            | ErrorKind::InvalidRsaKey(_)
                            | ErrorKind::InvalidKeyFormat
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(map_jwt_error(&e)),
            }
        };
        self.identity_from_claims(&data.claims)
    }

    fn identity_from_claims(&self, claims: &serde_json::Map<String, Value>) -> Result<Identity, AuthError> {
        let sub = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(_) => return Err(AuthError::Malformed),
            None => return Err(AuthError::MissingClaim("sub")),
        };
        let expires_at = match claims.get("exp") {
            Some(v) => v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)),
            None => None,
        };
        let join = string_list(claims.get(&self.rooms_claim))?.unwrap_or_default();
        let publish = string_list(claims.get(&self.publish_claim))?.unwrap_or_else(|| join.clone());
        let personal = self.personal_room.as_ref().map(|t| t.replace("{sub}", &sub));
        Ok(Identity {
            user: Some(sub),
            expires_at,
            join,
            publish,
            personal,
        })
    }
}

/// A claim that must be an array of strings: `None` if absent, `Malformed` if of another type.
fn string_list(v: Option<&Value>) -> Result<Option<Vec<String>>, AuthError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned).ok_or(AuthError::Malformed))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(AuthError::Malformed),
    }
}

fn validation(cfg: &AuthConfig, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = cfg.leeway_secs;
    v.validate_exp = true;
    v.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    if let Some(iss) = &cfg.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    if cfg.audience.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&cfg.audience);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    v
}

fn load_pem(alg: Algorithm, path: &Path) -> Result<DecodingKey, AuthError> {
    let key = "auth.keys.public_key_file";
    let pem =
        std::fs::read(path).map_err(|e| AuthError::config(key, format!("cannot read {}: {e}", path.display())))?;
    let parsed = match alg {
        Algorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => DecodingKey::from_ec_pem(&pem),
        _ => DecodingKey::from_ed_pem(&pem),
    };
    parsed.map_err(|e| AuthError::config(key, format!("{}: not a {alg:?} public key PEM: {e}", path.display())))
}

fn load_jwks(cfg: &AuthConfig, path: &Path) -> Result<Vec<Key>, AuthError> {
    let ckey = "auth.jwks_file";
    let bad = |msg: String| AuthError::config(ckey, format!("{}: {msg}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| bad(format!("not a JWKS: {e}")))?;
    let mut keys = Vec::with_capacity(set.keys.len());
    for (i, jwk) in set.keys.iter().enumerate() {
        let kid = jwk
            .common
            .key_id
            .clone()
            .ok_or_else(|| bad(format!("key #{i} has no `kid`")))?;
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => Algorithm::EdDSA,
            _ => {
                return Err(bad(format!(
                    "key {kid:?}: only RSA, EC P-256 and OKP Ed25519 keys are supported"
                )));
            }
        };
        // A declared `alg` must agree with the key type (an RSA key declared RS512 is refused, not reinterpreted).
        let declared_ok = match jwk.common.key_algorithm {
            None => true,
            Some(KeyAlgorithm::RS256) => alg == Algorithm::RS256,
            Some(KeyAlgorithm::ES256) => alg == Algorithm::ES256,
            Some(KeyAlgorithm::EdDSA) => alg == Algorithm::EdDSA,
            Some(_) => false,
        };
        if !declared_ok {
            return Err(bad(format!("key {kid:?}: unsupported or inconsistent `alg`")));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(format!("key {kid:?}: {e}")))?;
        keys.push(Key {
            kid: Some(kid),
            alg,
            key,
            validation: validation(cfg, alg),
        });
    }
    Ok(keys)
}

/// Who a connection is and which rooms it may use. Cheap enough to clone once per connection.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The JWT `sub`; `None` for anonymous connections.
    pub user: Option<String>,
    /// The JWT `exp` (unix seconds); `None` for anonymous connections.
    pub expires_at: Option<u64>,
    /// `*` glob patterns of rooms that may be joined.
    join: Vec<String>,
    /// `*` glob patterns of rooms that may be published to.
    publish: Vec<String>,
    /// The personal room (`auth.personal_room` with `{sub}` replaced), matched exactly, never as a glob: a `sub`
    /// containing `*` must not widen the grant.
    personal: Option<String>,
}

impl Identity {
    /// An anonymous identity with the given permissions.
    pub fn anonymous(perms: &Permissions) -> Identity {
        Identity {
            user: None,
            expires_at: None,
            join: perms.join.clone(),
            publish: perms.publish.clone(),
            personal: None,
        }
    }

    /// Whether `room` may be joined.
    pub fn may_join(&self, room: &str) -> bool {
        self.personal.as_deref() == Some(room) || self.join.iter().any(|p| glob_match(p, room))
    }

    /// Whether messages may be published to `room`.
    pub fn may_publish(&self, room: &str) -> bool {
        self.personal.as_deref() == Some(room) || self.publish.iter().any(|p| glob_match(p, room))
    }
}

/// The token presented with an upgrade request, from (in this order) `Authorization: Bearer <t>`, the `token`
/// query parameter (percent-decoded) or the cookie named `cookie`. Empty values count as absent.
pub fn extract_token(headers: &HeaderMap, uri: &Uri, cookie: Option<&str>) -> Option<String> {
    for v in headers.get_all(header::AUTHORIZATION) {
        let Ok(v) = v.to_str() else { continue };
        let v = v.trim();
        if let Some((scheme, t)) = v.split_once(' ')
            && scheme.eq_ignore_ascii_case("bearer")
            && !t.trim().is_empty()
        {
            return Some(t.trim().to_owned());
        }
    }
    if let Some(query) = uri.query() {
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if percent_decode(k).as_deref() == Some("token")
                && let Some(t) = percent_decode(v)
                && !t.is_empty()
            {
                return Some(t);
            }
        }
    }
    let name = cookie?;
    for v in headers.get_all(header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for c in v.split(';') {
            if let Some((k, val)) = c.trim().split_once('=')
                && k.trim() == name
            {
                let val = val.trim().trim_matches('"');
                if !val.is_empty() {
                    return Some(val.to_owned());
                }
            }
        }
    }
    None
}

/// Decodes `%XX` escapes (and `+` as a space, as in form encoding). `None` if the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' => match (b.get(i + 1).and_then(|&c| hex(c)), b.get(i + 2).and_then(|&c| hex(c))) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Path and query of `uri` with the value of every `token` query parameter replaced by `REDACTED`: what logs print
/// instead of the URI.
pub fn redact_uri(uri: &Uri) -> String {
    let mut out = uri.path().to_owned();
    if let Some(query) = uri.query() {
        out.push('?');
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            if percent_decode(key).as_deref() == Some("token") {
                out.push_str(key);
                out.push_str("=REDACTED");
            } else {
                out.push_str(pair);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::{SystemTime, UNIX_EPOCH};

    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;
    use crate::config::{JwtKey, SecretSource};

    /// Test-only RSA 2048 key pair (generated with `openssl genpkey -algorithm RSA`); not used anywhere else.
    const RSA_PRIVATE: &str = "\
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
    const RSA_PUBLIC: &str = "\
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

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs()
    }

    fn claims(sub: &str) -> Value {
        json!({ "sub": sub, "exp": now() + 600 })
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_owned);
        encode(&h, claims, key).expect("sign")
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        cfg: AuthConfig,
    }

    /// A directory holding key files; `add_*` append keys to `cfg.keys`.
    impl Fixture {
        fn new() -> Self {
            Self {
                _dir: tempfile::tempdir().expect("tempdir"),
                cfg: AuthConfig::default(),
            }
        }
        fn file(&self, name: &str, text: &str) -> std::path::PathBuf {
            let path = self._dir.path().join(name);
            std::fs::File::create(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .expect("write fixture");
            path
        }
        fn add_hs(&mut self, alg: &str, kid: Option<&str>, secret: &str) {
            let path = self.file(&format!("secret-{alg}-{kid:?}"), &format!("{secret}\n"));
            self.cfg.keys.push(JwtKey {
                kid: kid.map(str::to_owned),
                algorithm: alg.into(),
                secret: Some(SecretSource {
                    file: Some(path),
                    env: None,
                }),
                public_key_file: None,
            });
        }
        fn add_pem(&mut self, alg: &str, kid: Option<&str>, pem: &str) {
            let path = self.file(&format!("pub-{alg}-{kid:?}.pem"), pem);
            self.cfg.keys.push(JwtKey {
                kid: kid.map(str::to_owned),
                algorithm: alg.into(),
                secret: None,
                public_key_file: Some(path),
            });
        }
        fn auth(&self) -> Authenticator {
            Authenticator::from_config(&self.cfg).expect("auth config loads")
        }
    }

    /// A fresh P-256 or Ed25519 key pair: signing key, public key PEM, raw public key (SEC1 point or 32 bytes).
    fn ec_pair(alg: &'static rcgen::SignatureAlgorithm) -> (EncodingKey, String, Vec<u8>) {
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

    fn b64url(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn hmac_family_signs_and_verifies() {
        for (name, alg) in [
            ("HS256", Algorithm::HS256),
            ("HS384", Algorithm::HS384),
            ("HS512", Algorithm::HS512),
        ] {
            let mut f = Fixture::new();
            f.add_hs(name, None, "correct horse battery staple");
            let t = sign(
                alg,
                None,
                &claims("alice"),
                &EncodingKey::from_secret(b"correct horse battery staple"),
            );
            let id = f.auth().verify(&t).expect(name);
            assert_eq!(id.user.as_deref(), Some("alice"));
            assert!(id.expires_at.is_some());
        }
    }

    #[test]
    fn rsa_ec_ed_sign_and_verify() {
        let mut f = Fixture::new();
        f.add_pem("RS256", None, RSA_PUBLIC);
        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).expect("rsa private");
        let (ec, ec_pub, _) = ec_pair(&rcgen::PKCS_ECDSA_P256_SHA256);
        f.add_pem("ES256", None, &ec_pub);
        let (ed, ed_pub, _) = ec_pair(&rcgen::PKCS_ED25519);
        f.add_pem("EdDSA", None, &ed_pub);
        let auth = f.auth();
        for (alg, key) in [
            (Algorithm::RS256, &rsa),
            (Algorithm::ES256, &ec),
            (Algorithm::EdDSA, &ed),
        ] {
            let id = auth
                .verify(&sign(alg, None, &claims("bob"), key))
                .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(id.user.as_deref(), Some("bob"));
        }
    }

    #[test]
    fn expired_and_not_yet_valid_are_refused() {
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "s3cret");
        f.cfg.leeway_secs = 5;
        let auth = f.auth();
        let key = EncodingKey::from_secret(b"s3cret");
        let old = json!({ "sub": "a", "exp": now() - 60 });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &old, &key)),
            Err(AuthError::Expired)
        ));
        let within_leeway = json!({ "sub": "a", "exp": now() - 2 });
        assert!(auth.verify(&sign(Algorithm::HS256, None, &within_leeway, &key)).is_ok());
        let future = json!({ "sub": "a", "exp": now() + 600, "nbf": now() + 300 });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &future, &key)),
            Err(AuthError::NotYetValid)
        ));
        let no_exp = json!({ "sub": "a" });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &no_exp, &key)),
            Err(AuthError::MissingClaim("exp"))
        ));
        let no_sub = json!({ "exp": now() + 60 });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &no_sub, &key)),
            Err(AuthError::MissingClaim("sub"))
        ));
    }

    #[test]
    fn alg_none_and_alg_confusion_are_refused() {
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "s3cret");
        f.add_pem("RS256", None, RSA_PUBLIC);
        let auth = f.auth();
        let b64 = |v: &Value| b64url(v.to_string().as_bytes());
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&claims("eve"))
        );
        assert!(matches!(auth.verify(&none), Err(AuthError::Malformed)));
        // HS256 signed with the RSA *public* key as HMAC secret: must not verify.
        let confused = sign(
            Algorithm::HS256,
            None,
            &claims("eve"),
            &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
        );
        assert!(matches!(auth.verify(&confused), Err(AuthError::BadSignature)));
        // An algorithm no key is configured for.
        let hs512 = sign(
            Algorithm::HS512,
            None,
            &claims("eve"),
            &EncodingKey::from_secret(b"s3cret"),
        );
        assert!(matches!(auth.verify(&hs512), Err(AuthError::UnknownKey)));
        assert!(matches!(auth.verify("not.a.jwt"), Err(AuthError::Malformed)));
        assert!(matches!(auth.verify(""), Err(AuthError::Malformed)));
    }

    #[test]
    fn wrong_key_is_refused() {
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "right");
        let (_, ec_pub, _) = ec_pair(&rcgen::PKCS_ECDSA_P256_SHA256);
        f.add_pem("ES256", None, &ec_pub);
        let auth = f.auth();
        let t = sign(
            Algorithm::HS256,
            None,
            &claims("a"),
            &EncodingKey::from_secret(b"wrong"),
        );
        assert!(matches!(auth.verify(&t), Err(AuthError::BadSignature)));
        let (other_ec, _, _) = ec_pair(&rcgen::PKCS_ECDSA_P256_SHA256);
        let t = sign(Algorithm::ES256, None, &claims("a"), &other_ec);
        assert!(matches!(auth.verify(&t), Err(AuthError::BadSignature)));
    }

    #[test]
    fn kid_selects_the_key_and_jwks_loads() {
        let mut f = Fixture::new();
        f.add_hs("HS256", Some("k1"), "one");
        f.add_hs("HS256", Some("k2"), "two");
        // JWKS with an EC and an Ed key, built from fresh key pairs.
        let (ec, _, ec_raw) = ec_pair(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (ed, _, ed_raw) = ec_pair(&rcgen::PKCS_ED25519);
        let ec_jwk = json!({ "kty": "EC", "crv": "P-256", "kid": "ec-1", "alg": "ES256",
            "x": b64url(&ec_raw[1..33]), "y": b64url(&ec_raw[33..65]) });
        let ed_jwk = json!({ "kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "x": b64url(&ed_raw) });
        // RSA: n and e pulled from the SPKI DER of the fixture (fixed offsets of a 2048-bit key with e = 65537).
        let der = {
            use base64::Engine;
            let body: String = RSA_PUBLIC.lines().filter(|l| !l.starts_with("-----")).collect();
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .expect("fixture base64")
        };
        let rsa_jwk = json!({ "kty": "RSA", "kid": "rsa-1", "n": b64url(&der[33..289]), "e": b64url(&der[291..294]) });
        let jwks = json!({ "keys": [ec_jwk, ed_jwk, rsa_jwk] }).to_string();
        f.cfg.jwks_file = Some(f.file("jwks.json", &jwks));
        let auth = f.auth();

        let two = EncodingKey::from_secret(b"two");
        assert!(
            auth.verify(&sign(Algorithm::HS256, Some("k2"), &claims("a"), &two))
                .is_ok()
        );
        // Right secret, wrong kid: the k1 key is the only candidate.
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, Some("k1"), &claims("a"), &two)),
            Err(AuthError::BadSignature)
        ));
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, Some("k9"), &claims("a"), &two)),
            Err(AuthError::UnknownKey)
        ));
        // No kid in the token: every key of the algorithm is tried.
        assert!(auth.verify(&sign(Algorithm::HS256, None, &claims("a"), &two)).is_ok());
        assert!(
            auth.verify(&sign(Algorithm::ES256, Some("ec-1"), &claims("a"), &ec))
                .is_ok()
        );
        assert!(
            auth.verify(&sign(Algorithm::EdDSA, Some("ed-1"), &claims("a"), &ed))
                .is_ok()
        );
        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).expect("rsa private");
        assert!(
            auth.verify(&sign(Algorithm::RS256, Some("rsa-1"), &claims("a"), &rsa))
                .is_ok()
        );
        // The Ed key's kid with an ES256 token: alg must match the key's.
        assert!(matches!(
            auth.verify(&sign(Algorithm::ES256, Some("ed-1"), &claims("a"), &ec)),
            Err(AuthError::UnknownKey)
        ));

        let mut bad = Fixture::new();
        bad.cfg.jwks_file = Some(bad.file("jwks.json", r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AAAA"}]}"#));
        let err = Authenticator::from_config(&bad.cfg).unwrap_err().to_string();
        assert!(err.contains("auth.jwks_file") && err.contains("kid"), "{err}");
    }

    #[test]
    fn config_errors_name_the_key() {
        let mut f = Fixture::new();
        f.add_pem("ES256", None, "not a pem");
        let err = Authenticator::from_config(&f.cfg).unwrap_err().to_string();
        assert!(
            err.contains("auth.keys.public_key_file") && err.contains(".pem"),
            "{err}"
        );
        let mut f = Fixture::new();
        f.cfg.keys.push(JwtKey {
            kid: None,
            algorithm: "HS256".into(),
            secret: Some(SecretSource {
                file: None,
                env: Some("ROOMWIRE_TEST_UNSET_VAR".into()),
            }),
            public_key_file: None,
        });
        let err = Authenticator::from_config(&f.cfg).unwrap_err().to_string();
        assert!(err.contains("auth.keys.secret"), "{err}");
    }

    #[test]
    fn issuer_and_audience() {
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "s");
        f.cfg.issuer = Some("https://idp".into());
        f.cfg.audience = vec!["roomwire".into()];
        let auth = f.auth();
        let key = EncodingKey::from_secret(b"s");
        let ok = json!({ "sub": "a", "exp": now() + 60, "iss": "https://idp", "aud": "roomwire" });
        assert!(auth.verify(&sign(Algorithm::HS256, None, &ok, &key)).is_ok());
        let iss = json!({ "sub": "a", "exp": now() + 60, "iss": "https://evil", "aud": "roomwire" });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &iss, &key)),
            Err(AuthError::WrongIssuer)
        ));
        let aud = json!({ "sub": "a", "exp": now() + 60, "iss": "https://idp", "aud": ["other"] });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &aud, &key)),
            Err(AuthError::WrongAudience)
        ));
        let no_iss = json!({ "sub": "a", "exp": now() + 60, "aud": "roomwire" });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &no_iss, &key)),
            Err(AuthError::MissingClaim("iss"))
        ));
    }

    #[test]
    fn permissions_patterns_and_personal_room() {
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "s");
        f.cfg.personal_room = Some("user-{sub}".into());
        let auth = f.auth();
        let key = EncodingKey::from_secret(b"s");
        let c = json!({ "sub": "ann", "exp": now() + 60, "rooms": ["chat-*", "lobby"], "publish": ["chat-*"] });
        let id = auth.verify(&sign(Algorithm::HS256, None, &c, &key)).expect("valid");
        assert!(id.may_join("chat-42") && id.may_join("lobby") && !id.may_join("admin"));
        assert!(id.may_publish("chat-42") && !id.may_publish("lobby"));
        assert!(id.may_join("user-ann") && id.may_publish("user-ann") && !id.may_join("user-bob"));

        // No publish claim: publish = join patterns.
        let c = json!({ "sub": "ann", "exp": now() + 60, "rooms": ["lobby"] });
        let id = auth.verify(&sign(Algorithm::HS256, None, &c, &key)).expect("valid");
        assert!(id.may_publish("lobby") && !id.may_publish("chat-1"));

        // A `*` in sub does not widen the personal room into a glob.
        let c = json!({ "sub": "*", "exp": now() + 60 });
        let id = auth.verify(&sign(Algorithm::HS256, None, &c, &key)).expect("valid");
        assert!(id.may_join("user-*") && !id.may_join("user-bob"));

        let c = json!({ "sub": "ann", "exp": now() + 60, "rooms": "lobby" });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &c, &key)),
            Err(AuthError::Malformed)
        ));
    }

    #[test]
    fn anonymous_only_when_allowed_and_tokens_still_verified() {
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "s");
        assert!(matches!(f.auth().authenticate(None), Err(AuthError::Missing)));
        f.cfg.allow_anonymous = true;
        f.cfg.anonymous = Permissions {
            join: vec!["public-*".into()],
            publish: vec![],
        };
        let auth = f.auth();
        let id = auth.authenticate(None).expect("anonymous");
        assert!(id.user.is_none() && id.may_join("public-1") && !id.may_publish("public-1"));
        // The text the client gets comes from the refusal itself (not a variant built by the test).
        let refused = auth.authenticate(Some("garbage")).err();
        assert!(matches!(refused, Some(AuthError::Malformed)));
        assert_eq!(refused.map(|e| e.reason()), Some("malformed token"));
    }

    #[test]
    fn extract_token_from_each_source_in_order() {
        let uri: Uri = "/ws?room=a&token=abc%2Edef".parse().expect("uri");
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "x=1; rw_token=fromcookie".parse().expect("header"));
        assert_eq!(extract_token(&h, &uri, Some("rw_token")).as_deref(), Some("abc.def"));
        let plain: Uri = "/ws?room=a".parse().expect("uri");
        assert_eq!(
            extract_token(&h, &plain, Some("rw_token")).as_deref(),
            Some("fromcookie")
        );
        assert_eq!(extract_token(&h, &plain, None), None);
        h.insert(header::AUTHORIZATION, "Bearer fromheader".parse().expect("header"));
        assert_eq!(extract_token(&h, &uri, Some("rw_token")).as_deref(), Some("fromheader"));
        h.insert(header::AUTHORIZATION, "Basic dXNlcjpwYXNz".parse().expect("header"));
        assert_eq!(extract_token(&h, &uri, None).as_deref(), Some("abc.def"));
        assert_eq!(
            extract_token(&HeaderMap::new(), &"/ws?token=".parse().expect("uri"), None),
            None
        );
    }

    #[test]
    fn redact_uri_hides_the_token() {
        let uri: Uri = "/ws?room=a&token=eyJhbGciOi.secret.sig&x=1".parse().expect("uri");
        let r = redact_uri(&uri);
        assert_eq!(r, "/ws?room=a&token=REDACTED&x=1");
        assert!(!r.contains("secret"));
        assert_eq!(redact_uri(&"/ws".parse().expect("uri")), "/ws");
        assert_eq!(
            redact_uri(&"/ws?%74oken=s3".parse().expect("uri")),
            "/ws?%74oken=REDACTED"
        );
    }
}
