//! DNS rebinding: a page whose name an attacker points at 127.0.0.1 is same-origin with
//! whatever listens there, so only the name it asks for (`Host`) tells it apart. The proxy
//! rewrites `Host` for the backend, so Ollama's own check of it never sees the page's name:
//! the gateway checks it, on the proxy's listeners and the admin listener.

use gateway_filter::http::{header, HeaderMap};
use pingora_core::protocols::l4::socket::SocketAddr;

/// Which requests' `Host` a listener checks against its names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HostCheck {
    /// Those a browser sent ([`from_browser`]) over a loopback connection: only a browser
    /// can be led there by a name.
    #[default]
    Browsers,
    /// Those a browser sent over any connection: a listener reachable from the network with
    /// no authentication (`allow_insecure`), which a page rebound to its LAN address would
    /// reach from inside `allow_cidrs`.
    AllBrowsers,
    /// Every request (the operator listed `allowed_hosts`).
    All,
    /// None (`allowed_hosts: ['*']`).
    Any,
}

/// A listener's rule: the names besides local ones a request's `Host` may be (lower-case:
/// this machine's name and the operator's `allowed_hosts`), and which requests are checked.
#[derive(Debug, Clone, Default)]
pub struct HostRule {
    pub names: Vec<String>,
    pub check: HostCheck,
}

impl HostRule {
    /// The default: browsers' requests over loopback, local names and this machine's.
    pub fn local() -> HostRule {
        HostRule {
            names: with_machine_name(&[]),
            check: HostCheck::Browsers,
        }
    }

    /// Whether a request naming `host` (port and all) may pass. `from_browser`: it carries
    /// what browsers add; `via_loopback`: its connection came in on a loopback address.
    pub fn admits(&self, host: &str, from_browser: bool, via_loopback: bool) -> bool {
        match self.check {
            HostCheck::Any => true,
            HostCheck::Browsers if !(from_browser && via_loopback) => true,
            HostCheck::AllBrowsers if !from_browser => true,
            _ => is_local(host, &self.names),
        }
    }

    /// The host `req` names when this rule refuses it. Reads nothing of a request it does not
    /// check (`via_loopback` is asked last). `via_trusted_proxy`: a proxy the operator trusts
    /// sent it, whose own checks of the name stand (it passes the browser's name on).
    pub fn refused<'a>(
        &self,
        req: &'a pingora_http::RequestHeader,
        via_trusted_proxy: bool,
        via_loopback: impl FnOnce() -> bool,
    ) -> Option<&'a str> {
        let checked = match self.check {
            HostCheck::Any => false,
            HostCheck::Browsers | HostCheck::AllBrowsers if via_trusted_proxy => false,
            HostCheck::Browsers => from_browser(&req.headers) && via_loopback(),
            HostCheck::AllBrowsers => from_browser(&req.headers),
            HostCheck::All => true,
        };
        if !checked {
            return None;
        }
        let host = host_of(req);
        (!is_local(host, &self.names)).then_some(host)
    }
}

/// Whether a connection's local address is a loopback one.
pub fn loopback(local: Option<&SocketAddr>) -> bool {
    local
        .and_then(|a| a.as_inet())
        .is_some_and(|a| a.ip().to_canonical().is_loopback())
}

/// Whether `host` (a `Host` header, port and all) names this machine: an IP address,
/// `localhost`, a name under `.localhost`, `.local`, `.internal`, `.lan` or `.home.arpa`
/// (names no page on the internet can have), or one of `names`
/// (lower-case: this machine's name, the operator's `allowed_hosts`).
pub fn is_local(host: &str, names: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name.is_empty()
        || name == "localhost"
        || name.parse::<std::net::IpAddr>().is_ok()
        || [".localhost", ".local", ".internal", ".lan", ".home.arpa"]
            .iter()
            .any(|tld| name.ends_with(tld))
        || names.contains(&name)
}

/// Whether a browser sent the request: `Sec-Fetch-*` (sent only to secure or local
/// origins), `Origin` (not on a same-origin GET), or a browser's `User-Agent` (always).
pub fn from_browser(headers: &HeaderMap) -> bool {
    ["origin", "sec-fetch-site", "sec-fetch-mode"]
        .iter()
        .any(|n| headers.contains_key(*n))
        || headers
            .get(header::USER_AGENT)
            .is_some_and(|ua| ua.as_bytes().starts_with(b"Mozilla/"))
}

/// The request's `Host` (HTTP/2: its authority); `?` when it is not text.
pub fn host_of(req: &pingora_http::RequestHeader) -> &str {
    req.headers
        .get(header::HOST)
        .map(|v| v.to_str().unwrap_or("?"))
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or_default()
}

/// `names` and this machine's own name, lower-case, as [`is_local`] reads them.
pub fn with_machine_name(names: &[String]) -> Vec<String> {
    let mut all: Vec<String> = names
        .iter()
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
        .collect();
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its whole length, which is passed.
    let got = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if got == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        if let Ok(name) = std::str::from_utf8(&buf[..end]) {
            if !name.is_empty() {
                all.push(name.to_ascii_lowercase());
            }
        }
    }
    all
}

/// The refusal's message.
pub fn refusal_message(host: &str) -> String {
    format!(
        "this listener does not answer to the host {} (a page can point its own name at this address); add the name to the listener's allowed_hosts if clients use it",
        gateway_filter::echo(host)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review: a listener reachable from the network with no authentication
    /// (`allow_insecure`) checked no browser's `Host`, so a page rebound to its LAN address
    /// used it from inside `allow_cidrs`. Its browsers are checked on every connection now.
    #[test]
    fn an_unauthenticated_network_listener_checks_browsers_on_every_connection() {
        let lan = HostRule {
            names: vec!["gpu-box".into()],
            check: HostCheck::AllBrowsers,
        };
        let evil = "rebind.attacker.example:8080";
        assert!(!lan.admits(evil, true, false), "a browser over the LAN");
        assert!(
            lan.admits(evil, false, false),
            "curl and SDKs send no browser headers"
        );
        for local in [
            "192.168.1.5:8080",
            "gpu-box:8080",
            "gpu.lan",
            "gpu.home.arpa:8080",
        ] {
            assert!(lan.admits(local, true, false), "{local}");
        }
        // A proxy the operator trusts passes the browser's name on: its checks stand.
        let mut req = pingora_http::RequestHeader::build("POST", b"/api/chat", None).unwrap();
        req.insert_header("host", evil).unwrap();
        req.insert_header("origin", "http://rebind.attacker.example:8080")
            .unwrap();
        assert_eq!(lan.refused(&req, false, || false), Some(evil));
        assert_eq!(lan.refused(&req, true, || false), None);
        // The default rule still checks loopback connections only.
        let default = HostRule {
            names: Vec::new(),
            check: HostCheck::Browsers,
        };
        assert!(default.admits(evil, true, false));
        assert!(!default.admits(evil, true, true));
    }
}
