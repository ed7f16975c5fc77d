//! Where a client's token comes from: [`extract_token`] reads it from an upgrade request (`Authorization: Bearer`,
//! the `token` query parameter, or the cookie named by `auth.cookie`), and [`redact_uri`] is what logs print instead
//! of a request URI, so a token passed in the query never reaches the logs. Both decide "is this the `token`
//! parameter" the same way (`is_token_key`), so whatever the extraction reads, the redaction hides. Verifying the
//! token is `auth`'s job.

use hyper::http::{HeaderMap, Uri, header};
use percent_encoding::percent_decode;

/// The token presented with an upgrade request, from (in this order) `Authorization: Bearer <t>`, the `token`
/// query parameter (form-decoded: `%XX` escapes and `+` as a space; a value that does not decode to UTF-8 is
/// skipped) or the cookie named `cookie`. Empty values count as absent.
pub fn extract_token(headers: &HeaderMap, uri: &Uri, cookie: Option<&str>) -> Option<String> {
    bearer(headers)
        .or_else(|| uri.query().and_then(query_token))
        .or_else(|| cookie.and_then(|name| cookie_token(headers, name)))
}

/// Path and query of `uri` with the value of every `token` query parameter replaced by `REDACTED`: what logs print
/// instead of the URI. Every other byte is kept as it came (empty pairs included), so the log still shows what the
/// client sent.
pub fn redact_uri(uri: &Uri) -> String {
    let mut out = uri.path().to_owned();
    if let Some(query) = uri.query() {
        out.push('?');
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            let (key, _) = split_pair(pair);
            if is_token_key(key) {
                out.push_str(key);
                out.push_str("=REDACTED");
            } else {
                out.push_str(pair);
            }
        }
    }
    out
}

/// The first non-empty `Authorization: Bearer` token (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<String> {
    headers.get_all(header::AUTHORIZATION).iter().find_map(|v| {
        let (scheme, t) = v.to_str().ok()?.trim().split_once(' ')?;
        let t = t.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !t.is_empty()).then(|| t.to_owned())
    })
}

/// The first `token` parameter of `query` whose value decodes to a non-empty UTF-8 string.
fn query_token(query: &str) -> Option<String> {
    query
        .split('&')
        .map(split_pair)
        .filter(|(key, _)| is_token_key(key))
        .find_map(|(_, value)| form_decode(value).filter(|t| !t.is_empty()))
}

/// The first non-empty value of the cookie `name` (surrounding quotes removed).
fn cookie_token(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (k, val) = c.trim().split_once('=')?;
            let val = val.trim().trim_matches('"');
            (k.trim() == name && !val.is_empty()).then(|| val.to_owned())
        })
}

/// `key=value` split at the first `=`; a pair without one is a key with an empty value.
fn split_pair(pair: &str) -> (&str, &str) {
    pair.split_once('=').unwrap_or((pair, ""))
}

/// Whether a raw (still encoded) query key names the token: it decodes to exactly `token` (so `%74oken` does too).
fn is_token_key(key: &str) -> bool {
    form_decode(key).as_deref() == Some("token")
}

/// `application/x-www-form-urlencoded` decoding of one component: `+` is a space, `%XX` an escaped byte (a `%` not
/// followed by two hex digits stays as it is). `None` if the bytes are not UTF-8: such a value is skipped rather than
/// turned into replacement characters, so a later `token` parameter or the cookie can still be used.
fn form_decode(s: &str) -> Option<String> {
    // `+` becomes a space before the `%XX` escapes are decoded, so that `%2B` stays a plus.
    let spaced = s.replace('+', " ");
    percent_decode(spaced.as_bytes())
        .decode_utf8()
        .ok()
        .map(|d| d.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn query_values_are_form_decoded() {
        let q = |uri: &str| extract_token(&HeaderMap::new(), &uri.parse().expect("uri"), None);
        assert_eq!(q("/ws?token=a+b%2Bc").as_deref(), Some("a b+c"));
        assert_eq!(q("/ws?%74oken=x%").as_deref(), Some("x%"), "a lone % stays");
        assert_eq!(q("/ws?token=%zz1").as_deref(), Some("%zz1"));
        // Not UTF-8 once decoded: skipped, the next `token` parameter is used.
        assert_eq!(q("/ws?token=%FF&token=next").as_deref(), Some("next"));
        assert_eq!(q("/ws?token=%FF"), None);
        assert_eq!(q("/ws?&&token&token=&tok%65n=z").as_deref(), Some("z"));
        assert_eq!(q("/ws?tokens=a&xtoken=b&token+=c"), None);
        assert_eq!(
            redact_uri(&"/ws?&&token&a=b=c".parse().expect("uri")),
            "/ws?&&token=REDACTED&a=b=c"
        );
    }
}
