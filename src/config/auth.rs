//! `[auth]`: how tokens are checked ([`AuthConfig`], its `[[auth.keys]]` entries as [`JwtKey`], the permissions of
//! anonymous connections as [`Permissions`]), and the one list of JWT algorithms the gateway supports
//! ([`SUPPORTED_ALGORITHMS`]), which config validation, key loading and JWKS loading all consult.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use jsonwebtoken::{Algorithm, AlgorithmFamily};
use serde::{Deserialize, Deserializer, Serialize};

use super::{
    error::{ConfigError, invalid},
    secret::SecretSource,
};
use crate::room_pattern::RoomPattern;

/// The JWT algorithms a key may use (`[[auth.keys]] algorithm`, and the keys of `auth.jwks_file`): the one list that
/// config validation, key loading and JWKS loading consult. HMAC ones take a `secret`, the others a public key.
pub const SUPPORTED_ALGORITHMS: [Algorithm; 6] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
];

/// Whether the gateway verifies tokens signed with `alg` (see [`SUPPORTED_ALGORITHMS`]).
pub fn is_supported_algorithm(alg: Algorithm) -> bool {
    SUPPORTED_ALGORITHMS.contains(&alg)
}

/// The text `[[auth.keys]] algorithm` uses for `alg` (`HS256`, `EdDSA`, ...).
pub fn algorithm_name(alg: Algorithm) -> String {
    format!("{alg:?}")
}

/// `[[auth.keys]] algorithm`: one of [`SUPPORTED_ALGORITHMS`], by the name jsonwebtoken gives it.
fn deserialize_algorithm<'de, D: Deserializer<'de>>(d: D) -> Result<Algorithm, D::Error> {
    let name = String::deserialize(d)?;
    name.parse::<Algorithm>()
        .ok()
        .filter(|&alg| is_supported_algorithm(alg))
        .ok_or_else(|| {
            let names: Vec<String> = SUPPORTED_ALGORITHMS.iter().map(|&a| algorithm_name(a)).collect();
            serde::de::Error::custom(format!(
                "unsupported algorithm {name:?} (use one of {})",
                names.join(", ")
            ))
        })
}

/// One `[[auth.keys]]` entry: a key tokens may be signed with, and the one algorithm it accepts.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JwtKey {
    /// Key id matched against the token header's `kid`; a key without `kid` matches any token of its algorithm.
    pub kid: Option<String>,
    /// One of [`SUPPORTED_ALGORITHMS`]: `HS256`, `HS384`, `HS512`, `RS256`, `ES256` or `EdDSA`.
    #[serde(deserialize_with = "deserialize_algorithm")]
    pub algorithm: Algorithm,
    /// HMAC secret source (HS* only).
    pub secret: Option<SecretSource>,
    /// PEM public key file (RS256, ES256, EdDSA).
    pub public_key_file: Option<PathBuf>,
}

/// Permissions granted to a connection: room patterns it may join and publish to.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Permissions {
    /// Patterns of rooms that may be joined. Default `["*"]`.
    pub join: Vec<RoomPattern>,
    /// Patterns of rooms that may be published to. Default `["*"]`.
    pub publish: Vec<RoomPattern>,
    /// Patterns of RPC methods that may be called. Default empty (none).
    pub rpc: Vec<RoomPattern>,
}

impl Default for Permissions {
    fn default() -> Self {
        Self {
            join: vec![RoomPattern::new("*")],
            publish: vec![RoomPattern::new("*")],
            rpc: Vec::new(),
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accept connections without a token. Default false; the shipped dev config sets true.
    pub allow_anonymous: bool,
    /// Permissions of anonymous connections.
    pub anonymous: Permissions,
    /// Keys accepted for JWT verification.
    pub keys: Vec<JwtKey>,
    /// JWKS file (JSON) with further public keys, selected by `kid`.
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud` (one of), if set.
    pub audience: Vec<String>,
    /// Clock leeway for `exp`/`nbf`, in seconds: a token is accepted until `exp + leeway_secs`, and a connection
    /// authenticated by it lives until that same instant. At most 3600. Default 30.
    pub leeway_secs: u64,
    /// Cookie carrying the token, if any (besides `Authorization: Bearer` and `?token=`).
    pub cookie: Option<String>,
    /// Personal room template granted to every user for join and publish; `{sub}` is replaced. Default none.
    pub personal_room: Option<String>,
    /// Name of the JWT claim holding join patterns (array of strings). Default `rooms`.
    pub rooms_claim: String,
    /// Name of the claim holding publish patterns. Default `publish`.
    pub publish_claim: String,
    /// Name of the claim holding RPC method patterns. Default `rpc`.
    pub rpc_claim: String,
    /// Name of the claim listing server-side rooms: room names (not patterns) the gateway joins for the connection
    /// before its `welcome`, at most `rooms.max_rooms_per_connection`. Default `subs`.
    pub subs_claim: String,
    /// Also join the personal room (`auth.personal_room`) as a server-side room. Default false.
    pub join_personal_room: bool,
    /// JetStream KV bucket keeping token revocations (`revoke` commands), so a gateway started later honours them.
    /// Created when missing; entries expire on their own. Default `ROOMWIRE_REVOKED`.
    pub revocation_bucket: String,
    /// Replicas of the revocation bucket when the gateway creates it. Default 1.
    pub revocation_replicas: usize,
    /// Revocations kept at once (in memory, and in the bucket); past it a new one is refused, logged at error
    /// level and counted (`roomwire_control_commands_total{reason="full"}`). Default 100000.
    pub max_revocations: usize,
    /// A `token_expiring` warning is sent this long before `exp`. Default `60s`.
    #[serde(with = "humantime_serde")]
    pub expiry_warning: Duration,
    /// An authenticated connection is closed with 4001 this long after it was opened, whatever `refresh` requests
    /// arrived (a `token_expiring` warning comes `expiry_warning` before). Between 1s and 365 days. Default `24h`.
    #[serde(with = "humantime_serde")]
    pub max_session: Duration,
    /// A token without `kid` is refused (`unknown token key`) when more than this many configured keys share its
    /// algorithm, so one bogus token costs at most this many signature checks. Default 3.
    pub max_keys_per_token: usize,
    /// Signature checks running at once in the whole gateway, on tokio's blocking threads (never on the async
    /// workers). 0 = twice the number of CPU cores. Default 0.
    pub max_concurrent_verifications: usize,
    /// A token check that waited this long for one of the `max_concurrent_verifications` slots is given up: the
    /// upgrade is answered 503 and a `refresh` `unavailable`. Default `1s`.
    #[serde(with = "humantime_serde")]
    pub max_verification_wait: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            allow_anonymous: false,
            anonymous: Permissions::default(),
            keys: Vec::new(),
            jwks_file: None,
            issuer: None,
            audience: Vec::new(),
            leeway_secs: 30,
            cookie: None,
            personal_room: None,
            rooms_claim: "rooms".into(),
            publish_claim: "publish".into(),
            rpc_claim: "rpc".into(),
            subs_claim: "subs".into(),
            join_personal_room: false,
            revocation_bucket: "ROOMWIRE_REVOKED".into(),
            revocation_replicas: 1,
            max_revocations: 100_000,
            expiry_warning: Duration::from_secs(60),
            max_session: Duration::from_secs(24 * 3600),
            max_keys_per_token: 3,
            max_concurrent_verifications: 0,
            max_verification_wait: Duration::from_secs(1),
        }
    }
}

impl AuthConfig {
    /// Checks `[auth]` and its `[[auth.keys]]` entries.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.allow_anonymous && self.keys.is_empty() && self.jwks_file.is_none() {
            return Err(invalid(
                "auth.keys",
                "no key configured and auth.allow_anonymous is false: nobody could connect",
            ));
        }
        for key in &self.keys {
            key.validate()?;
        }
        if let Some(t) = &self.personal_room
            && !t.contains("{sub}")
        {
            return Err(invalid("auth.personal_room", "must contain {sub}"));
        }
        if let Some(t) = &self.personal_room
            && !crate::room_name::valid_room(&t.replace("{sub}", "u"))
        {
            return Err(invalid(
                "auth.personal_room",
                "must be a valid room name (A-Z a-z 0-9 _ - : @ = +) once {sub} is replaced",
            ));
        }
        if self.leeway_secs > 3600 {
            // jsonwebtoken computes `now - leeway` in u64: an absurd leeway must not reach it.
            return Err(invalid("auth.leeway_secs", "must be at most 3600"));
        }
        if self.max_session < Duration::from_secs(1) || self.max_session > Duration::from_secs(365 * 86_400) {
            return Err(invalid("auth.max_session", "must be between 1s and 365 days"));
        }
        if self.max_keys_per_token == 0 {
            return Err(invalid("auth.max_keys_per_token", "must be at least 1"));
        }
        if self.max_verification_wait.is_zero() {
            return Err(invalid("auth.max_verification_wait", "must be positive"));
        }
        if self.join_personal_room && self.personal_room.is_none() {
            return Err(invalid("auth.join_personal_room", "needs `auth.personal_room`"));
        }
        let bucket_ok =
            |b: &str| !b.is_empty() && b.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
        if !bucket_ok(&self.revocation_bucket) {
            return Err(invalid("auth.revocation_bucket", "use [A-Za-z0-9_-]"));
        }
        if self.revocation_replicas == 0 || self.revocation_replicas > 5 {
            return Err(invalid("auth.revocation_replicas", "must be between 1 and 5"));
        }
        if self.max_revocations == 0 {
            return Err(invalid("auth.max_revocations", "must be at least 1"));
        }
        Ok(())
    }
}

/// What verifies a key's signatures, by its algorithm's family (see [`JwtKey::material`]).
#[derive(Debug, Clone, Copy)]
pub enum KeyMaterial<'a> {
    /// An HMAC secret (HS256, HS384, HS512).
    Secret(&'a SecretSource),
    /// A PEM public key (RS256, ES256, EdDSA).
    PublicKeyFile(&'a Path),
}

impl JwtKey {
    /// Checks one `[[auth.keys]]` entry (see [`JwtKey::material`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.material().map(|_| ())
    }

    /// The key material this entry's algorithm needs: a `secret` for HMAC, a `public_key_file` otherwise. Refuses an
    /// unsupported algorithm (a file naming one fails to parse already; this catches a configuration built in code)
    /// and a missing secret or file. Config validation and key loading both go through here.
    pub fn material(&self) -> Result<KeyMaterial<'_>, ConfigError> {
        let name = algorithm_name(self.algorithm);
        if !is_supported_algorithm(self.algorithm) {
            return Err(invalid(
                "auth.keys.algorithm",
                format!("unsupported algorithm {name:?}"),
            ));
        }
        if self.algorithm.family() == AlgorithmFamily::Hmac {
            let secret = self.secret.as_ref();
            secret
                .map(KeyMaterial::Secret)
                .ok_or_else(|| invalid("auth.keys.secret", format!("{name} needs `secret`")))
        } else {
            let file = self.public_key_file.as_deref();
            file.map(KeyMaterial::PublicKeyFile)
                .ok_or_else(|| invalid("auth.keys.public_key_file", format!("{name} needs `public_key_file`")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, SecretSource};

    #[test]
    fn auth_hardening_keys_are_validated() {
        let c = Config::parse("[auth]\nallow_anonymous = true\n").unwrap();
        assert_eq!(c.auth.max_session, Duration::from_secs(86_400));
        assert_eq!(c.limits.refreshes_per_minute, 4);
        assert_eq!(c.auth.max_keys_per_token, 3);
        for (bad, key) in [
            (
                "[auth]\nallow_anonymous = true\nleeway_secs = 3601\n",
                "auth.leeway_secs",
            ),
            (
                "[auth]\nallow_anonymous = true\nmax_session = \"0s\"\n",
                "auth.max_session",
            ),
            (
                "[auth]\nallow_anonymous = true\nmax_session = \"400days\"\n",
                "auth.max_session",
            ),
            (
                "[auth]\nallow_anonymous = true\nmax_keys_per_token = 0\n",
                "auth.max_keys_per_token",
            ),
            (
                "[auth]\nallow_anonymous = true\nmax_verification_wait = \"0s\"\n",
                "auth.max_verification_wait",
            ),
            (
                "[auth]\nallow_anonymous = true\npersonal_room = \"u.{sub}\"\n",
                "auth.personal_room",
            ),
            (
                "[auth]\nallow_anonymous = true\n[limits]\nrefreshes_per_minute = 0\n",
                "limits.refreshes_per_minute",
            ),
        ] {
            let err = Config::parse(bad).unwrap_err().to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn key_algorithms_and_secret_sources_are_typed() {
        let key = |body: &str| format!("[auth]\n[[auth.keys]]\n{body}\n");
        for alg in SUPPORTED_ALGORITHMS {
            let name = algorithm_name(alg);
            let material = if alg.family() == AlgorithmFamily::Hmac {
                "secret = { env = \"RW_SECRET\" }"
            } else {
                "public_key_file = \"k.pem\""
            };
            let c = Config::parse(&key(&format!("algorithm = \"{name}\"\n{material}"))).expect(&name);
            assert_eq!(c.auth.keys[0].algorithm, alg);
        }
        let c = Config::parse(&key("algorithm = \"HS512\"\nsecret = { file = \"s.txt\" }")).unwrap();
        assert_eq!(c.auth.keys[0].secret, Some(SecretSource::File("s.txt".into())));
        // Known to jsonwebtoken but not supported here, unknown, wrong case: refused where the file is parsed.
        for bad in ["PS256", "RS512", "ES384", "none", "hs256", ""] {
            let err = Config::parse(&key(&format!("algorithm = \"{bad}\"\npublic_key_file = \"k.pem\"")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("algorithm") && err.contains("unsupported"), "{bad}: {err}");
        }
        // Built in code: validation still refuses it, naming the key.
        let mut c = Config::parse("[auth]\nallow_anonymous = true\n").unwrap();
        c.auth.keys.push(JwtKey {
            kid: None,
            algorithm: Algorithm::PS256,
            secret: None,
            public_key_file: Some("k.pem".into()),
        });
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("auth.keys.algorithm") && err.contains("\"PS256\""),
            "{err}"
        );
        for (body, want) in [
            ("algorithm = \"HS256\"", "auth.keys.secret"),
            ("algorithm = \"EdDSA\"", "auth.keys.public_key_file"),
            (
                "algorithm = \"HS256\"\nsecret = { file = \"a\", env = \"B\" }",
                "exactly one of `file` or `env`",
            ),
            ("algorithm = \"HS256\"\nsecret = {}", "exactly one of `file` or `env`"),
            ("algorithm = \"HS256\"\nsecret = { path = \"a\" }", "path"),
        ] {
            let err = Config::parse(&key(body)).unwrap_err().to_string();
            assert!(err.contains(want), "{body}: {err}");
        }
        let c = Config::parse(
            "[auth]\nallow_anonymous = true\n[nats]\nuser = \"u\"\npassword = { env = \"RW_NATS_PASSWORD\" }\n",
        )
        .unwrap();
        assert_eq!(c.nats.password, Some(SecretSource::Env("RW_NATS_PASSWORD".into())));
        let err = c
            .nats
            .password
            .as_ref()
            .map(|p| p.load("nats.password"))
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("nats.password"), "{err}");
    }

    #[test]
    fn room_patterns_are_compiled_at_load() {
        let c = Config::parse(
            "[auth]\nallow_anonymous = true\n[auth.anonymous]\njoin = [\"public-*\", \"lobby\"]\npublish = []\n",
        )
        .unwrap();
        assert_eq!(
            c.auth.anonymous.join,
            vec![RoomPattern::new("public-*"), RoomPattern::new("lobby")]
        );
        assert!(c.auth.anonymous.join[0].matches("public-1") && !c.auth.anonymous.join[1].matches("lobby2"));
        assert!(c.auth.anonymous.publish.is_empty());
        let err =
            Config::parse("[auth]\nallow_anonymous = true\n[[rooms.policy]]\npattern = \"\"\noverflow = \"latest\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("rooms.policy.pattern"), "{err}");
    }
}
