//! Fuzz target: the token presented with an upgrade request (`token::extract_token`) and the URI logs print instead of
//! the real one (`token::redact_uri`).
//!
//! Input: `uri \0 cookie_name \0 header \0 header ...`, where each header's first byte picks its name (`A`
//! Authorization, `C` Cookie, anything else an unrelated header) and the rest is its value. Never panics. A token is
//! never empty. The redacted URI keeps every query pair except the values of `token` parameters, which read
//! `REDACTED`; so when the token came from the query, the redacted URI does not contain it, unless the same text also
//! appears somewhere the redaction leaves alone (the path, another parameter, a key).
#![no_main]

use hyper::http::header::{AUTHORIZATION, COOKIE, HeaderName, HeaderValue};
use hyper::http::{HeaderMap, Uri};
use libfuzzer_sys::fuzz_target;
use roomwire::token::{extract_token, redact_uri};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let Ok(uri) = Uri::try_from(parts.next().unwrap_or_default()) else {
        return;
    };
    let cookie = parts
        .next()
        .and_then(|c| std::str::from_utf8(c).ok())
        .filter(|c| !c.is_empty());
    let mut headers = HeaderMap::new();
    for h in parts {
        let Some((&kind, value)) = h.split_first() else {
            continue;
        };
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        let name = match kind {
            b'A' => AUTHORIZATION,
            b'C' => COOKIE,
            _ => HeaderName::from_static("x-other"),
        };
        headers.append(name, value);
    }

    let token = extract_token(&headers, &uri, cookie);
    let redacted = redact_uri(&uri);
    if let Some(t) = &token {
        assert!(!t.is_empty());
    }
    assert!(redacted.starts_with(uri.path()));

    let Some(query) = uri.query() else {
        assert_eq!(redacted, uri.path());
        return;
    };
    // Pair by pair: `token` values replaced, everything else unchanged.
    let (_, rquery) = redacted.split_once('?').expect("a query stays a query");
    let original: Vec<&str> = query.split('&').collect();
    let kept: Vec<&str> = rquery.split('&').collect();
    assert_eq!(original.len(), kept.len(), "{query:?} -> {rquery:?}");
    let mut left_alone = vec![uri.path()];
    let mut token_values = Vec::new();
    for (o, r) in original.iter().zip(&kept) {
        let key = o.split_once('=').map_or(*o, |(k, _)| k);
        if is_token_key(key) {
            assert_eq!(*r, format!("{key}=REDACTED"), "token parameter {o:?} printed as {r:?}");
            left_alone.push(key);
            token_values.push(o.split_once('=').map_or("", |(_, v)| v));
        } else {
            assert_eq!(o, r);
            left_alone.push(o);
        }
    }
    // The token itself (decoded) and the raw text it came from never show, unless the same text is also found where
    // the redaction rightly leaves things alone. Texts containing a separator could straddle two pieces: skip those.
    let from_query = headers.get(AUTHORIZATION).is_none() && token.is_some() && !token_values.is_empty();
    let secrets = token_values
        .iter()
        .copied()
        .chain(token.as_deref().filter(|_| from_query));
    for secret in secrets {
        let plain = !secret.contains(['?', '&', '=']) && secret.len() >= 4;
        let elsewhere = left_alone.iter().any(|p| p.contains(secret)) || "REDACTED".contains(secret);
        if plain && !elsewhere {
            assert!(!redacted.contains(secret), "{secret:?} shows in {redacted:?}");
        }
    }
});

/// The same test `redact_uri` and `extract_token` apply: the key percent-decodes to `token`.
fn is_token_key(key: &str) -> bool {
    let b = key.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (b.get(i + 1).and_then(|&c| hex(c)), b.get(i + 2).and_then(|&c| hex(c)))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    out == b"token"
}
