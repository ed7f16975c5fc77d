//! Static files the gateway serves itself, compiled into the binary with `include_str!`: the browser client library
//! (`/client/roomwire.js` and its types `/client/roomwire.d.ts`, always) and the demo chat (`/`, `/demo/demo.js`,
//! `/demo/demo.css`, only with `server.demo = true`).
//!
//! Each file's ETag is a hash of its bytes computed at compile time, so it changes exactly when the file does and is
//! the same on every gateway of a cluster built from the same sources; `If-None-Match` with it answers 304 with no
//! body. The client library's URL carries no version, so caches keep it only briefly (`max-age=300`) and then
//! revalidate (a 304 costs a few header bytes); the demo page is revalidated every time.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    HeaderMap, Method, Response, StatusCode,
    header::{self, HeaderValue},
};

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    cache_control: &'static str,
    body: &'static str,
    /// Quoted strong ETag, `"<16 hex digits>"`.
    etag: &'static str,
    /// Served only when `server.demo` is on.
    demo: bool,
}

/// FNV-1a 64: a stable content hash (the same bytes give the same ETag on every build and every gateway). Not a
/// security boundary: an ETag only saves a download.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `"` + 16 lower-case hex digits of `hash` + `"`, built at compile time.
const fn etag_bytes(hash: u64) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[1 + i] = HEX[((hash >> (60 - 4 * i)) & 0xf) as usize];
        i += 1;
    }
    out
}

/// Declares an embedded file: its bytes, and its ETag as a `&'static str` made at compile time.
macro_rules! asset {
    ($path:literal, $file:literal, $type:literal, $cache:expr, $demo:literal) => {{
        const BODY: &str = include_str!($file);
        const TAG: [u8; 18] = etag_bytes(fnv1a(BODY.as_bytes()));
        Asset {
            path: $path,
            content_type: $type,
            cache_control: $cache,
            body: BODY,
            etag: match std::str::from_utf8(&TAG) {
                Ok(s) => s,
                Err(_) => panic!("an ETag is ASCII"),
            },
            demo: $demo,
        }
    }};
}

const CLIENT_CACHE: &str = "public, max-age=300";
const DEMO_CACHE: &str = "no-cache";

static ASSETS: [Asset; 5] = [
    asset!(
        "/client/roomwire.js",
        "../client/roomwire.js",
        "text/javascript; charset=utf-8",
        CLIENT_CACHE,
        false
    ),
    asset!(
        "/client/roomwire.d.ts",
        "../client/roomwire.d.ts",
        "application/typescript",
        CLIENT_CACHE,
        false
    ),
    asset!(
        "/",
        "../client/demo/index.html",
        "text/html; charset=utf-8",
        DEMO_CACHE,
        true
    ),
    asset!(
        "/demo/demo.js",
        "../client/demo/demo.js",
        "text/javascript; charset=utf-8",
        DEMO_CACHE,
        true
    ),
    asset!(
        "/demo/demo.css",
        "../client/demo/demo.css",
        "text/css; charset=utf-8",
        DEMO_CACHE,
        true
    ),
];

/// The demo page's Content-Security-Policy: its own script and style only, so a chat message can never run as code
/// even if a future change rendered it as HTML; WebSockets to the same host (`'self'` covers `wss:` there).
const DEMO_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The response for `path` if it names an embedded file (`None` otherwise: the caller answers 404). GET and HEAD
/// only (405 otherwise); 304 when `If-None-Match` holds the file's ETag.
pub fn serve(path: &str, method: &Method, headers: &HeaderMap, demo: bool) -> Option<Response<Full<Bytes>>> {
    let asset = ASSETS.iter().find(|a| a.path == path && (demo || !a.demo))?;
    let mut resp = Response::new(Full::new(Bytes::new()));
    if method != Method::GET && method != Method::HEAD {
        *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Some(resp);
    }
    let h = resp.headers_mut();
    h.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(asset.cache_control));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if asset.demo {
        h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(DEMO_CSP));
    }
    if not_modified(headers, asset.etag) {
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        return Some(resp);
    }
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    if method == Method::GET {
        *resp.body_mut() = Full::new(Bytes::from_static(asset.body.as_bytes()));
    } else {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(asset.body.len()));
    }
    Some(resp)
}

/// RFC 9110 section 13.1.2: `If-None-Match` is `*` or a list of entity tags, weak ones compared weakly.
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim())
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, demo: bool, inm: Option<&str>) -> Option<Response<Full<Bytes>>> {
        let mut headers = HeaderMap::new();
        if let Some(v) = inm {
            headers.insert(header::IF_NONE_MATCH, HeaderValue::from_str(v).expect("ascii"));
        }
        serve(path, &Method::GET, &headers, demo)
    }

    #[test]
    fn client_always_demo_only_when_on() {
        let js = get("/client/roomwire.js", false, None).expect("client served");
        assert_eq!(js.headers()[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
        assert_eq!(js.headers()[header::CACHE_CONTROL], CLIENT_CACHE);
        let dts = get("/client/roomwire.d.ts", false, None).expect("types served");
        assert_eq!(dts.headers()[header::CONTENT_TYPE], "application/typescript");
        assert!(get("/", false, None).is_none());
        assert!(get("/demo/demo.js", false, None).is_none());
        let page = get("/", true, None).expect("demo on");
        assert_eq!(page.headers()[header::CACHE_CONTROL], DEMO_CACHE);
        assert!(page.headers().contains_key(header::CONTENT_SECURITY_POLICY));
        assert!(get("/client/other.js", true, None).is_none());
    }

    #[test]
    fn etag_is_content_hash_and_revalidates() {
        let js = get("/client/roomwire.js", false, None).expect("client served");
        let tag = js.headers()[header::ETAG].to_str().expect("ascii").to_owned();
        let expected = format!("\"{:016x}\"", fnv1a(include_str!("../client/roomwire.js").as_bytes()));
        assert_eq!(tag, expected);
        let tags: Vec<&str> = ASSETS.iter().map(|a| a.etag).collect();
        let mut unique = tags.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), tags.len(), "distinct files, distinct tags");
        for inm in [tag.clone(), format!("W/{tag}"), format!("\"x\", {tag}"), "*".into()] {
            let r = get("/client/roomwire.js", false, Some(&inm)).expect("served");
            assert_eq!(r.status(), StatusCode::NOT_MODIFIED, "{inm}");
            assert!(!r.headers().contains_key(header::CONTENT_TYPE));
        }
        let r = get("/client/roomwire.js", false, Some("\"0000000000000000\"")).expect("served");
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[test]
    fn other_methods_are_refused() {
        let r = serve("/client/roomwire.js", &Method::POST, &HeaderMap::new(), false).expect("known path");
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        let r = serve("/client/roomwire.js", &Method::HEAD, &HeaderMap::new(), false).expect("known path");
        assert_eq!(r.status(), StatusCode::OK);
    }
}
