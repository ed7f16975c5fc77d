//! Checking one token: a [`Verifier`] holds the keys and the claim rules, shared (via `Arc`) with the blocking
//! threads that run signature checks. [`Verifier::candidates`] is the cheap part (size, header, which keys a check
//! would try, at most `auth.max_keys_per_token`), [`Verifier::check`] the costly one (signatures), which then turns
//! the claims into an [`Identity`]. Running checks off the async workers, bounded, is
//! [`Authenticator`](super::Authenticator)'s job. Uses [`super::keys`], [`super::identity`] and [`super::error`].

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use jsonwebtoken::errors::ErrorKind;
use serde_json::Value;

use super::{
    error::{AuthError, map_jwt_error},
    identity::{Identity, MAX_JTI_LEN, pattern_list, room_list, valid_sub},
    keys::Key,
};
use crate::protocol;

/// Longest token accepted, in bytes; longer ones are `Malformed` before any parsing or crypto.
pub(super) const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The keys and claim rules: everything a signature check needs, shared with the blocking threads that run them.
pub(super) struct Verifier {
    /// All keys from `auth.keys` then the JWKS file, in that order.
    pub(super) keys: Vec<Key>,
    pub(super) personal_room: Option<String>,
    pub(super) rooms_claim: String,
    pub(super) publish_claim: String,
    pub(super) rpc_claim: String,
    pub(super) subs_claim: String,
    /// `auth.join_personal_room`: the personal room is a server-side room too.
    pub(super) join_personal_room: bool,
    /// `auth.leeway_secs`: a token is accepted, and its connection lives, until `exp` plus this.
    pub(super) leeway: Duration,
    /// `auth.max_keys_per_token`: most candidate keys (signature checks) one token may cost.
    pub(super) max_keys_per_token: usize,
    /// Signature checks performed (one per candidate key tried); read by tests and operators.
    pub(super) verifications: AtomicU64,
}

impl Verifier {
    /// The cheap part: size, header, and the indices of the keys a signature check would try.
    pub(super) fn candidates(&self, token: &str) -> Result<Vec<usize>, AuthError> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let candidates: Vec<usize> = self
            .keys
            .iter()
            .enumerate()
            .filter(|(_, k)| {
                k.alg == header.alg
                    && match (&header.kid, &k.kid) {
                        (Some(want), Some(have)) => want == have,
                        _ => true,
                    }
            })
            .map(|(i, _)| i)
            .collect();
        if candidates.is_empty() || candidates.len() > self.max_keys_per_token {
            // Too many: the token must name its key with `kid` (one bogus token must not cost N checks).
            return Err(AuthError::UnknownKey);
        }
        Ok(candidates)
    }

    /// The costly part: tries each candidate key, then builds the identity.
    pub(super) fn check(&self, token: &str, candidates: &[usize]) -> Result<Identity, AuthError> {
        let mut data = None;
        for k in candidates.iter().filter_map(|&i| self.keys.get(i)) {
            self.verifications.fetch_add(1, Ordering::Relaxed);
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &k.key, &k.validation) {
                Ok(d) => {
                    data = Some(d);
                    break;
                }
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
        }
        let data = data.ok_or(AuthError::BadSignature)?;
        self.identity_from_claims(&data.claims, SystemTime::now())
    }

    pub(super) fn identity_from_claims(
        &self,
        claims: &serde_json::Map<String, Value>,
        now: SystemTime,
    ) -> Result<Identity, AuthError> {
        let sub = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(_) => return Err(AuthError::Malformed),
            None => return Err(AuthError::MissingClaim("sub")),
        };
        // `sub` becomes the NATS header `Roomwire-User` (a CR or LF there panics async-nats), a log field and maybe
        // a room name: only visible ASCII, bounded.
        if !valid_sub(&sub) {
            return Err(AuthError::InvalidClaim("sub"));
        }
        let personal = self.personal_room.as_ref().map(|t| t.replace("{sub}", &sub));
        if personal.as_deref().is_some_and(|room| !protocol::valid_room(room)) {
            return Err(AuthError::InvalidClaim("sub"));
        }
        // jsonwebtoken has already refused a negative, non-numeric or past `exp`; a fractional one is rounded.
        let expires_at = match claims.get("exp") {
            Some(v) => v.as_u64().or_else(|| v.as_f64().map(|f| f.round() as u64)),
            None => None,
        };
        let join: std::sync::Arc<[_]> = pattern_list(claims.get(&self.rooms_claim))?.unwrap_or_default().into();
        // Without a publish claim the join patterns are shared, not copied.
        let publish = match pattern_list(claims.get(&self.publish_claim))? {
            Some(p) => p.into(),
            None => join.clone(),
        };
        let rpc = pattern_list(claims.get(&self.rpc_claim))?.unwrap_or_default().into();
        let mut subs = room_list(claims.get(&self.subs_claim))?;
        if self.join_personal_room
            && let Some(room) = &personal
            && !subs.contains(room)
        {
            subs.push(room.clone());
        }
        // `jti` is matched by revocations and may reach a log line: visible ASCII, bounded, like `sub`.
        let jti = match claims.get("jti") {
            None | Some(Value::Null) => None,
            Some(Value::String(j))
                if !j.is_empty() && j.len() <= MAX_JTI_LEN && j.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Some(j.clone())
            }
            Some(_) => return Err(AuthError::InvalidClaim("jti")),
        };
        let issued_at = match claims.get("iat") {
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
            None => None,
        };
        let identity = Identity {
            user: Some(sub),
            expires_at,
            grace: self.leeway,
            join,
            publish,
            rpc,
            personal,
            subs,
            jti,
            issued_at,
        };
        // jsonwebtoken compares whole seconds; decide with the same instant the connection's deadline will use, so
        // an accepted token never gives a connection that is closed at once.
        if identity.expires_in(now).is_some_and(|left| left.is_zero()) {
            return Err(AuthError::Expired);
        }
        Ok(identity)
    }
}

/// The `sub` of a token's payload, read WITHOUT verifying anything: only to refuse early a token that could not be
/// accepted anyway. `None` if the payload is not base64url JSON or has no string `sub`.
pub(super) fn unverified_sub(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Sub {
        sub: Option<String>,
    }
    serde_json::from_slice::<Sub>(&bytes).ok()?.sub
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{Algorithm, EncodingKey};
    use serde_json::json;

    use super::*;
    use crate::auth::{AuthError, Authenticator, testkit::*};

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
    fn leeway_is_one_rule_for_accepting_and_for_closing() {
        let (f, _auth) = hs_auth(|c| c.leeway_secs = 5);
        let verifier = Authenticator::from_config(&f.cfg).expect("loads").verifier;
        let exp = 1_700_000_000u64;
        let claims = |exp: u64| match json!({ "sub": "a", "exp": exp }) {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let at = |secs: f64| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs);
        // Past exp but inside the leeway: accepted, and it stays open for the rest of the leeway, not 0 s.
        let id = verifier
            .identity_from_claims(&claims(exp), at(exp as f64 + 4.5))
            .expect("inside leeway");
        assert_eq!(id.expires_in(at(exp as f64 + 4.5)), Some(Duration::from_millis(500)));
        // At exp + leeway: refused (it would be closed at once).
        assert!(matches!(
            verifier.identity_from_claims(&claims(exp), at(exp as f64 + 5.0)),
            Err(AuthError::Expired)
        ));
        // Through the whole path: a token 2 s past exp with 5 s leeway has ~3 s left.
        let auth = f.auth();
        let id = auth
            .verify(&hs(&json!({ "sub": "a", "exp": now() - 2 })))
            .expect("inside leeway");
        let left = id.expires_in(SystemTime::now()).expect("exp");
        assert!(
            left > Duration::from_secs(1) && left <= Duration::from_secs(3),
            "{left:?}"
        );
    }

    #[test]
    fn many_keys_without_kid_are_bounded() {
        // Four kid-less keys of one algorithm: every kid-less token would cost four checks; refused at load.
        let mut f = Fixture::new();
        for s in ["a", "b", "c", "d"] {
            f.add_hs("HS256", None, s);
        }
        let err = Authenticator::from_config(&f.cfg).unwrap_err().to_string();
        assert!(err.contains("auth.keys") && err.contains("max_keys_per_token"), "{err}");
        f.cfg.max_keys_per_token = 4;
        assert!(Authenticator::from_config(&f.cfg).is_ok());

        // Keys with kids: a token naming one costs one check; a token naming none is refused before any check.
        let mut f = Fixture::new();
        for k in ["k1", "k2", "k3", "k4"] {
            f.add_hs("HS256", Some(k), k);
        }
        let auth = f.auth();
        let t = sign(Algorithm::HS256, None, &claims("a"), &EncodingKey::from_secret(b"k4"));
        assert!(matches!(auth.verify(&t), Err(AuthError::UnknownKey)));
        assert_eq!(auth.verifications(), 0);
        let t = sign(
            Algorithm::HS256,
            Some("k4"),
            &claims("a"),
            &EncodingKey::from_secret(b"k4"),
        );
        assert!(auth.verify(&t).is_ok());
        assert_eq!(auth.verifications(), 1);
        // Two keys without kid under the default bound of 3: both tried.
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "old");
        f.add_hs("HS256", None, "new");
        let auth = f.auth();
        let t = sign(Algorithm::HS256, None, &claims("a"), &EncodingKey::from_secret(b"new"));
        assert!(auth.verify(&t).is_ok());
        assert_eq!(auth.verifications(), 2);
    }
}
