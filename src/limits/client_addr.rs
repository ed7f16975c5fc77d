//! The client's address behind trusted proxies: [`TrustedProxies`] (`server.trusted_proxies`, and the one
//! `server.forwarded_header` read from them) tells whether a peer is a proxy and, for one, which entry of its
//! forwarding header is the client. A malformed header is a [`ForwardedError`] (HTTP 400), never replaced by the
//! proxy's own address. A leaf: it uses no other part of `limits`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use hyper::http::HeaderMap;
use ipnet::IpNet;

use crate::{Config, config::ForwardedHeader};

/// Why a trusted proxy's forwarding header gave no client address (answered with HTTP 400). The texts are fixed:
/// they never echo the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ForwardedError {
    /// A line of the header has bytes outside visible ASCII.
    #[error("forwarding header is not ASCII")]
    NonAscii,
    /// The header, or the entry that decides the client, is empty (or a `Forwarded` element has no `for=`).
    #[error("forwarding header is empty")]
    Empty,
    /// The deciding entry is not an IP address (with an optional port).
    #[error("forwarding header is malformed")]
    Unparsable,
    /// The deciding entry is `unknown` or an obfuscated identifier (`_hidden`): there is no address to count.
    #[error("forwarded address is unknown or obfuscated")]
    Obfuscated,
    /// `X-Real-IP` appears on more than one line: the proxy appended instead of replacing the client's own.
    #[error("forwarding header repeated")]
    Repeated,
}

/// `server.trusted_proxies` and the forwarding header read from them. Built once from the config, read-only.
pub(super) struct TrustedProxies {
    nets: Vec<IpNet>,
    /// `server.forwarded_header`: the only header read from trusted proxies.
    header: ForwardedHeader,
}

impl TrustedProxies {
    pub(super) fn new(config: &Config) -> Self {
        Self {
            nets: config.server.trusted_proxies.clone(),
            header: config.server.forwarded_header,
        }
    }

    /// Whether `ip` (an IPv4-mapped address as IPv4) is in `server.trusted_proxies`.
    pub(super) fn trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The client's IP, by the rule documented on [`Limits::client_ip`](super::Limits::client_ip).
    pub(super) fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> Result<IpAddr, ForwardedError> {
        let peer_ip = peer.ip().to_canonical();
        if !self.trusted(peer_ip) {
            return Ok(peer_ip);
        }
        let mut lines = Vec::new();
        for v in headers.get_all(self.header.name()) {
            lines.push(v.to_str().map_err(|_| ForwardedError::NonAscii)?);
        }
        if lines.is_empty() {
            return Ok(peer_ip);
        }
        let chain: Vec<Result<&str, ForwardedError>> = match self.header {
            ForwardedHeader::XForwardedFor => lines.iter().flat_map(|l| l.split(',')).map(Ok).collect(),
            ForwardedHeader::Forwarded => lines.iter().flat_map(|l| forwarded_for_values(l)).collect(),
            ForwardedHeader::XRealIp if lines.len() > 1 => return Err(ForwardedError::Repeated),
            ForwardedHeader::XRealIp => vec![Ok(lines[0])],
        };
        let mut leftmost = None;
        for entry in chain.iter().rev() {
            let ip = parse_forwarded_ip(entry.as_ref().map_err(|e| *e)?)?.to_canonical();
            if !self.trusted(ip) {
                return Ok(ip);
            }
            leftmost = Some(ip);
        }
        // Every hop is a trusted proxy: the left-most is the client as the first proxy saw it.
        leftmost.ok_or(ForwardedError::Empty)
    }
}

/// The `for=` value of each element of one `Forwarded` line (RFC 7239), in order, respecting quoted strings. An
/// element without `for=`, or with two, gives an error in its position (it matters only if that position decides).
fn forwarded_for_values(line: &str) -> Vec<Result<&str, ForwardedError>> {
    split_unquoted(line, b',')
        .into_iter()
        .map(|element| {
            let mut found = Err(ForwardedError::Empty);
            for pair in split_unquoted(element, b';') {
                if let Some((k, v)) = pair.split_once('=')
                    && k.trim().eq_ignore_ascii_case("for")
                {
                    if found.is_ok() {
                        return Err(ForwardedError::Unparsable);
                    }
                    found = Ok(v);
                }
            }
            found
        })
        .collect()
}

/// Splits `s` at `sep` outside double-quoted strings (a backslash escapes the next byte inside quotes).
fn split_unquoted(s: &str, sep: u8) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, b) in s.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            _ if b == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Parses one `X-Forwarded-For` / `X-Real-IP` entry or `Forwarded` `for=` value: `1.2.3.4`, `1.2.3.4:80`, `::1`,
/// `[::1]`, `"[::1]:80"`, `"[::1]:_port"` (surrounding quotes optional). `unknown` and obfuscated identifiers
/// (`_hidden`) are [`ForwardedError::Obfuscated`]; anything else that is not an address is
/// [`ForwardedError::Unparsable`].
fn parse_forwarded_ip(entry: &str) -> Result<IpAddr, ForwardedError> {
    let mut s = entry.trim();
    if s.is_empty() {
        return Err(ForwardedError::Empty);
    }
    if s.starts_with('"') || s.ends_with('"') {
        s = s
            .strip_prefix('"')
            .and_then(|r| r.strip_suffix('"'))
            .ok_or(ForwardedError::Unparsable)?;
    }
    if s.eq_ignore_ascii_case("unknown") || s.starts_with('_') {
        return Err(ForwardedError::Obfuscated);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(ip);
    }
    let (host, port) = match s.strip_prefix('[') {
        // `[v6]` or `[v6]:port`
        Some(rest) => {
            let (host, after) = rest.split_once(']').ok_or(ForwardedError::Unparsable)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or(ForwardedError::Unparsable)?),
            };
            (host.parse::<Ipv6Addr>().map(IpAddr::V6), port)
        }
        // `v4:port` (a bare IPv6 address parsed above)
        None => {
            let (host, port) = s.split_once(':').ok_or(ForwardedError::Unparsable)?;
            (host.parse::<std::net::Ipv4Addr>().map(IpAddr::V4), Some(port))
        }
    };
    let port_ok = port.is_none_or(|p| {
        p.parse::<u16>().is_ok()
            || (p.len() > 1
                && p.starts_with('_')
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')))
    });
    match host {
        Ok(ip) if port_ok => Ok(ip),
        _ => Err(ForwardedError::Unparsable),
    }
}

#[cfg(test)]
mod tests {
    use hyper::http::HeaderValue;

    use super::*;
    use crate::limits::{Limits, testkit::*};

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    fn limits_with(header: ForwardedHeader) -> Limits {
        let mut c = config();
        c.server.forwarded_header = header;
        Limits::new(&c)
    }

    /// The client address a trusted proxy (10.1.2.3) forwarding `pairs` yields.
    fn via_proxy(l: &Limits, pairs: &[(&'static str, &str)]) -> Result<IpAddr, ForwardedError> {
        l.client_ip(sa("10.1.2.3:1000"), &headers(pairs))
    }

    #[test]
    fn client_ip_trusts_only_configured_proxies() {
        let l = Limits::new(&config());
        let xff = headers(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.7")]);
        // Untrusted peer: its header is ignored (spoofing), even a malformed one.
        assert_eq!(l.client_ip(sa("5.5.5.5:1000"), &xff), Ok(ip("5.5.5.5")));
        let junk = headers(&[("x-forwarded-for", "junk")]);
        assert_eq!(l.client_ip(sa("5.5.5.5:1000"), &junk), Ok(ip("5.5.5.5")));
        // Trusted peer: right-most untrusted entry, skipping a trusted hop; the spoofed left entry is ignored.
        assert_eq!(l.client_ip(sa("10.1.2.3:1000"), &xff), Ok(ip("1.2.3.4")));
        // No header: the proxy is its own client (its health checks).
        assert_eq!(l.client_ip(sa("10.1.2.3:1000"), &HeaderMap::new()), Ok(ip("10.1.2.3")));
        // Only trusted hops: the left-most one, as the first proxy saw it (not the peer).
        assert_eq!(
            via_proxy(&l, &[("x-forwarded-for", "10.9.9.9, 10.0.0.7")]),
            Ok(ip("10.9.9.9"))
        );
        // IPv4-mapped peer counts as its IPv4 address; IPv4-mapped entries too.
        assert_eq!(l.client_ip(sa("[::ffff:10.1.2.3]:1"), &xff), Ok(ip("1.2.3.4")));
        assert_eq!(
            via_proxy(&l, &[("x-forwarded-for", "::ffff:1.2.3.4")]),
            Ok(ip("1.2.3.4"))
        );
        assert!(l.is_trusted_proxy(ip("10.1.2.3")) && !l.is_trusted_proxy(ip("5.5.5.5")));
    }

    #[test]
    fn only_the_configured_header_is_read() {
        let both = [
            ("x-forwarded-for", "1.1.1.1"),
            ("forwarded", "for=2.2.2.2"),
            ("x-real-ip", "3.3.3.3"),
        ];
        let xff = limits_with(ForwardedHeader::XForwardedFor);
        let fwd = limits_with(ForwardedHeader::Forwarded);
        let real = limits_with(ForwardedHeader::XRealIp);
        assert_eq!(via_proxy(&xff, &both), Ok(ip("1.1.1.1")));
        assert_eq!(via_proxy(&fwd, &both), Ok(ip("2.2.2.2")));
        assert_eq!(via_proxy(&real, &both), Ok(ip("3.3.3.3")));
        // A client-written X-Forwarded-For does not override a proxy that writes only `Forwarded`: the client
        // (behind a proxy that ignores XFF) cannot pick its own address.
        assert_eq!(
            via_proxy(&fwd, &[("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=1.2.3.4")]),
            Ok(ip("1.2.3.4"))
        );
        // ... and a proxy that writes only XFF ignores a client-written `Forwarded`.
        assert_eq!(
            via_proxy(&xff, &[("forwarded", "for=6.6.6.6")]),
            Ok(ip("10.1.2.3")),
            "configured header absent: the proxy itself"
        );
        assert_eq!(
            via_proxy(&xff, &[("forwarded", "for=6.6.6.6"), ("x-forwarded-for", "1.2.3.4")]),
            Ok(ip("1.2.3.4"))
        );
    }

    #[test]
    fn x_forwarded_for_rightmost_untrusted_hop() {
        let l = limits_with(ForwardedHeader::XForwardedFor);
        let xff = |v: &str| via_proxy(&l, &[("x-forwarded-for", v)]);
        assert_eq!(xff("1.2.3.4"), Ok(ip("1.2.3.4")));
        assert_eq!(xff("6.6.6.6,1.2.3.4"), Ok(ip("1.2.3.4")));
        assert_eq!(xff("  6.6.6.6 ,  1.2.3.4  "), Ok(ip("1.2.3.4")));
        assert_eq!(xff("6.6.6.6, 1.2.3.4, 10.0.0.7, ::1"), Ok(ip("1.2.3.4")));
        // Ports and IPv6 forms.
        assert_eq!(xff("1.2.3.4:5678"), Ok(ip("1.2.3.4")));
        assert_eq!(xff("2001:db8::1"), Ok(ip("2001:db8::1")));
        assert_eq!(xff("[2001:db8::1]"), Ok(ip("2001:db8::1")));
        assert_eq!(xff("[2001:db8::1]:443"), Ok(ip("2001:db8::1")));
        assert_eq!(xff("\"[2001:db8::1]:443\""), Ok(ip("2001:db8::1")));
        // Garbage left of the deciding entry is the client's own business.
        assert_eq!(xff("junk, unknown, _x, , 1.2.3.4"), Ok(ip("1.2.3.4")));
        // Several header lines form one list, in order: the last line's right-most entry decides.
        let multi = [("x-forwarded-for", "6.6.6.6"), ("x-forwarded-for", "1.2.3.4, 10.0.0.1")];
        assert_eq!(via_proxy(&l, &multi), Ok(ip("1.2.3.4")));
        let multi = [("x-forwarded-for", "1.2.3.4"), ("x-forwarded-for", "junk")];
        assert_eq!(via_proxy(&l, &multi), Err(ForwardedError::Unparsable));
    }

    #[test]
    fn x_forwarded_for_malformed_is_refused_not_replaced_by_the_proxy() {
        let l = limits_with(ForwardedHeader::XForwardedFor);
        let xff = |v: &str| via_proxy(&l, &[("x-forwarded-for", v)]);
        assert_eq!(xff(""), Err(ForwardedError::Empty));
        assert_eq!(xff("   "), Err(ForwardedError::Empty));
        assert_eq!(xff("1.2.3.4,"), Err(ForwardedError::Empty));
        assert_eq!(
            xff("1.2.3.4, , 10.0.0.1"),
            Err(ForwardedError::Empty),
            "empty entry decides"
        );
        assert_eq!(xff("junk"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("1.2.3.4, junk"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("1.2.3"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("01.2.3.4"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("1.2.3.4:99999"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("1.2.3.4:"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("[2001:db8::1"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("[2001:db8::1]x"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("[1.2.3.4]"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("\"1.2.3.4"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("fe80::1%eth0"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("unknown"), Err(ForwardedError::Obfuscated));
        assert_eq!(xff("1.2.3.4, UNKNOWN"), Err(ForwardedError::Obfuscated));
        assert_eq!(xff("_hidden"), Err(ForwardedError::Obfuscated));
        // Non-ASCII (obs-text) anywhere in any line: refused, not read as "no header".
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes("1.2.3.4".as_bytes()).expect("value"),
        );
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes("5.6.7.8, caf\u{e9}".as_bytes()).expect("value"),
        );
        assert_eq!(l.client_ip(sa("10.1.2.3:1"), &h), Err(ForwardedError::NonAscii));
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_bytes(b"\xff\xfe").expect("value"));
        assert_eq!(l.client_ip(sa("10.1.2.3:1"), &h), Err(ForwardedError::NonAscii));
    }

    #[test]
    fn forwarded_rfc7239_rightmost_untrusted_hop() {
        let l = limits_with(ForwardedHeader::Forwarded);
        let fwd = |v: &str| via_proxy(&l, &[("forwarded", v)]);
        assert_eq!(fwd("for=1.2.3.4"), Ok(ip("1.2.3.4")));
        assert_eq!(fwd("For=1.2.3.4;proto=https;by=10.0.0.1"), Ok(ip("1.2.3.4")));
        assert_eq!(fwd("proto=https;for=1.2.3.4"), Ok(ip("1.2.3.4")));
        assert_eq!(
            fwd("for=6.6.6.6, for=\"[2001:db8::1]:4711\";proto=https"),
            Ok(ip("2001:db8::1"))
        );
        assert_eq!(fwd("for=\"[2001:db8::1]\""), Ok(ip("2001:db8::1")));
        assert_eq!(fwd("for=\"1.2.3.4:80\""), Ok(ip("1.2.3.4")));
        assert_eq!(
            fwd("for=\"[2001:db8::1]:_port\""),
            Ok(ip("2001:db8::1")),
            "obfuscated port"
        );
        assert_eq!(fwd("for=6.6.6.6, for=1.2.3.4, for=10.0.0.9"), Ok(ip("1.2.3.4")));
        // A quoted string may hold `,` and `;`: they do not split elements (here left of the deciding one).
        assert_eq!(fwd("for=\"x,y;z\", for=1.2.3.4"), Ok(ip("1.2.3.4")));
        // Several lines.
        let multi = [("forwarded", "for=6.6.6.6"), ("forwarded", "for=1.2.3.4;proto=https")];
        assert_eq!(via_proxy(&l, &multi), Ok(ip("1.2.3.4")));
        // Only trusted hops: the left-most.
        assert_eq!(fwd("for=10.0.0.1, for=10.0.0.2"), Ok(ip("10.0.0.1")));
    }

    #[test]
    fn forwarded_malformed_is_refused() {
        let l = limits_with(ForwardedHeader::Forwarded);
        let fwd = |v: &str| via_proxy(&l, &[("forwarded", v)]);
        assert_eq!(fwd(""), Err(ForwardedError::Empty));
        assert_eq!(
            fwd("proto=https"),
            Err(ForwardedError::Empty),
            "no for= in the deciding element"
        );
        assert_eq!(fwd("for=1.2.3.4, proto=https"), Err(ForwardedError::Empty));
        assert_eq!(fwd("for="), Err(ForwardedError::Empty));
        assert_eq!(
            fwd("for=1.2.3.4;for=5.6.7.8"),
            Err(ForwardedError::Unparsable),
            "for= twice"
        );
        assert_eq!(fwd("for=junk"), Err(ForwardedError::Unparsable));
        assert_eq!(
            fwd("for=\"[2001:db8::1]:4711"),
            Err(ForwardedError::Unparsable),
            "unterminated quote"
        );
        assert_eq!(fwd("for=unknown"), Err(ForwardedError::Obfuscated));
        assert_eq!(fwd("for=_hidden"), Err(ForwardedError::Obfuscated));
        assert_eq!(fwd("for=\"_gazonk\""), Err(ForwardedError::Obfuscated));
        assert_eq!(
            fwd("for=1.2.3.4, for=_hidden;proto=https"),
            Err(ForwardedError::Obfuscated)
        );
        // An obfuscated hop left of the deciding one does not matter.
        assert_eq!(fwd("for=_hidden, for=1.2.3.4"), Ok(ip("1.2.3.4")));
        let mut h = HeaderMap::new();
        h.append(
            "forwarded",
            HeaderValue::from_bytes("for=1.2.3.4;host=caf\u{e9}".as_bytes()).expect("value"),
        );
        assert_eq!(l.client_ip(sa("10.1.2.3:1"), &h), Err(ForwardedError::NonAscii));
    }

    #[test]
    fn x_real_ip_single_value() {
        let l = limits_with(ForwardedHeader::XRealIp);
        let real = |v: &str| via_proxy(&l, &[("x-real-ip", v)]);
        assert_eq!(real("1.2.3.4"), Ok(ip("1.2.3.4")));
        assert_eq!(real("[2001:db8::1]:80"), Ok(ip("2001:db8::1")));
        assert_eq!(real("10.0.0.5"), Ok(ip("10.0.0.5")), "the only value, trusted or not");
        assert_eq!(real(""), Err(ForwardedError::Empty));
        assert_eq!(real("1.2.3.4, 5.6.7.8"), Err(ForwardedError::Unparsable), "not a list");
        assert_eq!(real("unknown"), Err(ForwardedError::Obfuscated));
        let twice = [("x-real-ip", "6.6.6.6"), ("x-real-ip", "1.2.3.4")];
        assert_eq!(via_proxy(&l, &twice), Err(ForwardedError::Repeated));
    }
}
