//! The verification keys, loaded once at startup by [`load_keys`]: HMAC secrets and PEM public keys from
//! `auth.keys`, then the keys of the `auth.jwks_file` (read from a file; there is no fetching, key rotation is a
//! restart). Each [`Key`]'s algorithm is fixed by configuration, never taken from a token, and carries the
//! [`Validation`] (leeway, issuer, audience, required claims) every token checked against it must pass. Uses only
//! [`super::error`].

use std::path::Path;

use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, Validation,
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyOperations, PublicKeyUse},
};

use super::error::AuthError;
use crate::config::{AuthConfig, ConfigError, KeyMaterial, SUPPORTED_ALGORITHMS};

/// One verification key: its algorithm is fixed by configuration, never taken from the token.
pub(super) struct Key {
    pub(super) kid: Option<String>,
    pub(super) alg: Algorithm,
    pub(super) key: DecodingKey,
    /// Validation for this key's algorithm with the configured leeway, issuer and audience.
    pub(super) validation: Validation,
}

/// Every key named by `cfg`: `auth.keys` then the JWKS file, in that order (see
/// [`Authenticator::from_config`](super::Authenticator::from_config) for what is accepted). Errors name the config key
/// and file.
pub(super) fn load_keys(cfg: &AuthConfig) -> Result<Vec<Key>, AuthError> {
    let mut keys = Vec::new();
    for k in &cfg.keys {
        // A supported algorithm with the secret or public key file it needs: the rule validation applies.
        let material = k.material().map_err(|e| match e {
            ConfigError::Invalid { key, message } => AuthError::config(key, message),
            other => AuthError::config("auth.keys", other.to_string()),
        })?;
        let alg = k.algorithm;
        let key = match material {
            KeyMaterial::Secret(src) => {
                let secret = src
                    .load("auth.keys.secret")
                    .map_err(|e| AuthError::config("auth.keys.secret", e.to_string()))?;
                if secret.expose().is_empty() {
                    return Err(AuthError::config("auth.keys.secret", "secret is empty"));
                }
                DecodingKey::from_secret(secret.expose().as_bytes())
            }
            KeyMaterial::PublicKeyFile(path) => load_pem(alg, path)?,
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
    // Keys without `kid` are candidates for every token of their algorithm: more of them than a token may cost
    // would refuse every such token, so say it now rather than at the first connection.
    for k in &keys {
        let kidless = keys.iter().filter(|o| o.alg == k.alg && o.kid.is_none()).count();
        if kidless > cfg.max_keys_per_token {
            return Err(AuthError::config(
                "auth.keys",
                format!(
                    "{kidless} {:?} keys have no `kid`, more than auth.max_keys_per_token ({}): give them a `kid`",
                    k.alg, cfg.max_keys_per_token
                ),
            ));
        }
    }
    Ok(keys)
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
        // A key published for encryption (or anything but signatures) must not verify signatures.
        match &jwk.common.public_key_use {
            None | Some(PublicKeyUse::Signature) => {}
            Some(other) => {
                return Err(bad(format!(
                    "key {kid:?}: `use` is {other:?}, not \"sig\": only signature keys may verify tokens"
                )));
            }
        }
        if let Some(ops) = &jwk.common.key_operations
            && !ops.contains(&KeyOperations::Verify)
        {
            return Err(bad(format!("key {kid:?}: `key_ops` lacks \"verify\"")));
        }
        // The key type fixes the algorithm family (and the curve, the one its supported algorithm uses).
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => AlgorithmFamily::Ec,
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => AlgorithmFamily::Ed,
            _ => {
                return Err(bad(format!(
                    "key {kid:?}: only RSA, EC P-256 and OKP Ed25519 keys are supported"
                )));
            }
        };
        let of_family: Vec<Algorithm> = SUPPORTED_ALGORITHMS
            .iter()
            .copied()
            .filter(|a| a.family() == family)
            .collect();
        // A declared `alg` must be a supported one of the key's family (an RSA key declared RS512 is refused, not
        // reinterpreted); without one, the family's only supported algorithm.
        let alg = match jwk.common.key_algorithm {
            Some(declared) => Algorithm::try_from(declared).ok().filter(|a| of_family.contains(a)),
            None => match of_family.as_slice() {
                [only] => Some(*only),
                _ => None,
            },
        }
        .ok_or_else(|| bad(format!("key {kid:?}: unsupported or inconsistent `alg`")))?;
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

#[cfg(test)]
mod tests {
    use jsonwebtoken::EncodingKey;
    use serde_json::{Value, json};

    use super::*;
    use crate::auth::{Authenticator, testkit::*};
    use crate::config::{JwtKey, SecretSource};

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
            algorithm: Algorithm::HS256,
            secret: Some(SecretSource::Env("ROOMWIRE_TEST_UNSET_VAR".into())),
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
    fn jwks_encryption_keys_are_refused() {
        let (_, _, ec_raw) = ec_pair(&rcgen::PKCS_ECDSA_P256_SHA256);
        let jwk = |extra: Value| {
            let mut k = json!({ "kty": "EC", "crv": "P-256", "kid": "ec-1",
                "x": b64url(&ec_raw[1..33]), "y": b64url(&ec_raw[33..65]) });
            for (name, v) in extra.as_object().expect("object") {
                k[name] = v.clone();
            }
            json!({ "keys": [k] }).to_string()
        };
        for (extra, want) in [
            (json!({ "use": "enc" }), "`use`"),
            (json!({ "use": "other" }), "`use`"),
            (json!({ "key_ops": ["encrypt"] }), "key_ops"),
            (json!({ "alg": "RS256" }), "alg"),
        ] {
            let mut f = Fixture::new();
            f.cfg.jwks_file = Some(f.file("jwks.json", &jwk(extra.clone())));
            let err = Authenticator::from_config(&f.cfg).unwrap_err().to_string();
            assert!(err.contains("auth.jwks_file") && err.contains(want), "{extra}: {err}");
        }
        for extra in [
            json!({ "use": "sig" }),
            json!({ "key_ops": ["verify"] }),
            json!({ "alg": "ES256" }),
        ] {
            let mut f = Fixture::new();
            f.cfg.jwks_file = Some(f.file("jwks.json", &jwk(extra.clone())));
            assert!(Authenticator::from_config(&f.cfg).is_ok(), "{extra}");
        }
    }
}
