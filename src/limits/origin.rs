//! The `Origin` allow-list: [`Origins`] parses each `server.allowed_origins` entry once (an exact origin or a `*.`
//! wildcard) and tells whether a request's `Origin` is allowed. A leaf: it uses no other part of `limits`.

use hyper::http::{HeaderMap, header};

/// Parsed `server.allowed_origins`; empty = allow all. Built once from the config, read-only.
pub(super) struct Origins(Vec<OriginRule>);

impl Origins {
    pub(super) fn new(allowed: &[String]) -> Self {
        Self(allowed.iter().map(|o| OriginRule::parse(o)).collect())
    }

    /// Whether the request's `Origin` is allowed, by the rules documented on
    /// [`Limits::origin_allowed`](super::Limits::origin_allowed).
    pub(super) fn allowed(&self, headers: &HeaderMap) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let origin = origin.trim().to_ascii_lowercase();
        self.0.iter().any(|r| r.matches(&origin))
    }
}

/// One parsed `server.allowed_origins` entry (lower-cased).
#[derive(Debug)]
enum OriginRule {
    /// Whole origin, e.g. `https://app.example.com` (trailing `/` removed).
    Exact(String),
    /// `[scheme://]*.suffix[:port]`; `suffix` starts with `.`.
    Wildcard {
        scheme: Option<String>,
        suffix: String,
        port: Option<String>,
    },
}

impl OriginRule {
    fn parse(rule: &str) -> Self {
        let rule = rule.trim().trim_end_matches('/').to_ascii_lowercase();
        let (scheme, rest) = match rule.split_once("://") {
            Some((s, r)) => (Some(s.to_owned()), r.to_owned()),
            None => (None, rule.clone()),
        };
        match rest.strip_prefix('*') {
            Some(tail) if tail.starts_with('.') => {
                let (suffix, port) = match tail.rsplit_once(':') {
                    Some((h, p)) => (h.to_owned(), Some(p.to_owned())),
                    None => (tail.to_owned(), None),
                };
                OriginRule::Wildcard { scheme, suffix, port }
            }
            _ => OriginRule::Exact(rule),
        }
    }

    /// `origin` is lower-cased.
    fn matches(&self, origin: &str) -> bool {
        match self {
            OriginRule::Exact(o) => o == origin,
            OriginRule::Wildcard { scheme, suffix, port } => {
                let Some((o_scheme, authority)) = origin.split_once("://") else {
                    return false;
                };
                if scheme.as_deref().is_some_and(|s| s != o_scheme) {
                    return false;
                }
                let (host, o_port) = match authority.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (authority, None),
                };
                let Some(label) = host.strip_suffix(suffix.as_str()) else {
                    return false;
                };
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                    && !label.starts_with('.')
                    && port.as_deref() == o_port
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use hyper::http::HeaderMap;

    use crate::Config;
    use crate::limits::{Limits, testkit::*};

    #[test]
    fn origins_exact_wildcard_and_missing() {
        let l = Limits::new(&config());
        let ok = |o: &str| l.origin_allowed(&headers(&[("origin", o)]));
        assert!(ok("https://app.example.com") && ok("HTTPS://App.Example.com"));
        assert!(!ok("http://app.example.com") && !ok("https://app.example.com.evil.io"));
        assert!(ok("https://a.example.org") && ok("http://a.b.example.org"));
        assert!(!ok("https://example.org") && !ok("https://evilexample.org") && !ok("https://a.example.org:8443"));
        assert!(ok("https://x.example.net") && !ok("http://x.example.net"));
        assert!(!ok("null"));
        assert!(!l.origin_allowed(&HeaderMap::new()));
        let open = Limits::new(&Config::default());
        assert!(open.origin_allowed(&HeaderMap::new()));
    }
}
