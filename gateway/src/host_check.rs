//! DNS rebinding: a page whose name an attacker points at 127.0.0.1 is same-origin with
//! whatever listens there, so only the name it asks for (`Host`) tells it apart. The proxy
//! rewrites `Host` for the backend, so Ollama's own check of it never sees the page's name:
//! the gateway checks it, on the proxy's listeners and the admin listener.

use gateway_filter::http::{header, HeaderMap};

/// Whether `host` (a `Host` header, port and all) names this machine: an IP address,
/// `localhost`, a name under `.localhost`, `.local` or `.internal`, or one of `names`
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
        || [".localhost", ".local", ".internal"]
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
