//! `llm-gateway doctor`: read-only checks of this machine and the config, each finding with
//! what is wrong, why it matters and the exact fix. It looks only at this machine: its own
//! listening sockets (`/proc/net/tcp`, `tcp6`), asked on their own addresses, and the files
//! the config names. It never scans other hosts.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::config::{BackendKind, Settings};

/// SHA-256 of the demo key shipped in `conf/keys.yaml`.
const DEMO_KEY_SHA256: &str = "4daadee049895fc0ac656b1efe8c7d9802c62d5343d85ffab82bfe03673c4b91";
/// How long a probe may take to connect, and to answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);
/// Most listening sockets probed.
const MAX_PROBES: usize = 128;

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Finding {
    /// Which check: `exposed_model_server`, `backend`, `file_permissions`, `demo_credentials`,
    /// `tls_certificate`, `config`.
    pub check: &'static str,
    pub what: String,
    pub why: String,
    pub fix: String,
}

/// Every finding for this machine and, with `config`, that config and its files.
pub fn run(config: Option<&Path>) -> Vec<Finding> {
    let mut out = Vec::new();
    let settings = match config.map(crate::config::load) {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            out.push(Finding {
                check: "config",
                what: e.to_string(),
                why: "the gateway will not start with this config".into(),
                fix: "correct the key the message names; `llm-gateway check --config FILE` shows the same".into(),
            });
            None
        }
        None => None,
    };
    let own: Vec<SocketAddr> = settings
        .iter()
        .flat_map(|s| s.listen.iter().map(|l| l.addr).chain(s.admin))
        .collect();
    exposed_model_servers(&own, &mut out);
    if let Some(s) = &settings {
        // The filters too, as `check` builds them (nothing created or written).
        let registry = crate::registry::Registry::builtin();
        if let Err(e) = crate::chain::FilterChain::check(s, &registry) {
            out.push(Finding {
                check: "config",
                what: e.to_string(),
                why: "the gateway will not start with this config".into(),
                fix: "correct the key the message names; `llm-gateway check --config FILE` shows the same".into(),
            });
        }
        config_findings(s, &mut out);
        backends(s, &mut out);
        files(s, &mut out);
    }
    out
}

/// Listening TCP sockets of this machine: address and port; `None` when the kernel's
/// tables cannot be read (not Linux, or `/proc` hidden).
fn listening() -> Option<Vec<SocketAddr>> {
    let mut out = Vec::new();
    let mut read_any = false;
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        read_any = true;
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // `sl local_address rem_address st …`; state 0A is LISTEN.
            if cols.len() < 4 || cols[3] != "0A" {
                continue;
            }
            if let Some(a) = proc_addr(cols[1], v6) {
                out.push(a);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    read_any.then_some(out)
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6), each 32-bit word in the kernel's byte
/// order, then the port in hex.
fn proc_addr(field: &str, v6: bool) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = if v6 {
        if ip.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for w in 0..4 {
            let word = u32::from_str_radix(&ip[w * 8..w * 8 + 8], 16).ok()?;
            bytes[w * 4..w * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        let word = u32::from_str_radix(ip, 16).ok()?;
        IpAddr::V4(Ipv4Addr::from(word.to_ne_bytes()))
    };
    Some(SocketAddr::new(ip, port))
}

/// What answered a probe.
#[derive(Debug, PartialEq, Eq)]
enum Speaks {
    Ollama,
    OpenAi,
}

/// A wildcard socket is asked through loopback, which reaches it too.
fn wildcard_to_loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(v6) if v6.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// GET `path` on `addr`; the status and body when something HTTP answered in time.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).ok()?;
    s.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
    s.set_write_timeout(Some(PROBE_TIMEOUT)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: llm-gateway-doctor\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    // Read until the server closes, 64 KiB, or the whole answer took too long (a server
    // that drips bytes cannot hold the probe).
    let deadline = std::time::Instant::now() + 2 * PROBE_TIMEOUT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    while buf.len() < 64 << 10 && std::time::Instant::now() < deadline {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Whether `addr` answers like Ollama (`/api/version`) or an OpenAI-compatible server
/// (`/v1/models`) without credentials.
fn speaks(addr: SocketAddr) -> Option<Speaks> {
    let json = |path| {
        get(addr, path)
            .filter(|(status, _)| *status == 200)
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
    };
    if json("/api/version").is_some_and(|v| v.get("version").is_some_and(|v| v.is_string())) {
        return Some(Speaks::Ollama);
    }
    if json("/v1/models").is_some_and(|v| v.get("data").is_some_and(|d| d.is_array())) {
        return Some(Speaks::OpenAi);
    }
    None
}

fn exposed_model_servers(own: &[SocketAddr], out: &mut Vec<Finding>) {
    let Some(sockets) = listening() else {
        out.push(Finding {
            check: "exposed_model_server",
            what: "this machine's listening sockets cannot be read (/proc/net/tcp)".into(),
            why: "a model server reachable around the gateway would go unnoticed".into(),
            fix: "run doctor on the gateway's host, as a user that can read /proc/net/tcp; or check by hand with `ss -tlnp`".into(),
        });
        return;
    };
    let is_own = |a: &SocketAddr| {
        own.iter()
            .any(|o| o.port() == a.port() && (o.ip() == a.ip() || o.ip().is_unspecified()))
    };
    let candidates: Vec<SocketAddr> = sockets
        .into_iter()
        .filter(|a| !a.ip().to_canonical().is_loopback() && !is_own(a))
        .take(MAX_PROBES)
        .collect();
    // All at once, each bounded by its timeouts: a machine with many sockets is not asked
    // one after the other.
    let answers: Vec<(SocketAddr, Option<Speaks>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = candidates
            .iter()
            .map(|&addr| scope.spawn(move || (addr, speaks(wildcard_to_loopback(addr)))))
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    for (addr, kind) in answers {
        let Some(kind) = kind else {
            continue;
        };
        let port = addr.port();
        let (server, fix) = match kind {
            Speaks::Ollama => (
                "an Ollama server",
                format!(
                    "bind Ollama to loopback and let only the gateway reach it: `sudo systemctl edit ollama`, add\n      [Service]\n      Environment=\"OLLAMA_HOST=127.0.0.1:{port}\"\n    then `sudo systemctl restart ollama` and check with `ss -tlnp | grep {port}`; or drop other hosts with a firewall rule: `sudo iptables -A INPUT -p tcp --dport {port} ! -i lo -j DROP`"
                ),
            ),
            Speaks::OpenAi => (
                "an OpenAI-compatible model server",
                format!(
                    "start it on 127.0.0.1 (llama.cpp and vLLM: `--host 127.0.0.1`), or drop other hosts with a firewall rule: `sudo iptables -A INPUT -p tcp --dport {port} ! -i lo -j DROP`"
                ),
            ),
        };
        out.push(Finding {
            check: "exposed_model_server",
            what: format!("{server} listens on {addr} (port {port}) and answers without credentials"),
            why: "anyone who reaches this machine can use the GPU, pull or delete models and read prompts around the gateway: its keys, limits and audit do not apply".into(),
            fix,
        });
    }
}

fn config_findings(s: &Settings, out: &mut Vec<Finding>) {
    for (i, l) in s.listen.iter().enumerate() {
        if l.insecure {
            out.push(Finding {
                check: "config",
                what: format!("listen[{i}] {} is reachable from the network without TLS or without authentication (allow_insecure: true)", l.addr),
                why: "keys and prompts cross the network in plain text, or anyone who reaches it is served".into(),
                fix: format!("add `tls: {{ cert, key }}` to listen[{i}] (`llm-gateway init --listen {}` writes a pair) and `- use: auth`, then remove allow_insecure; or listen on 127.0.0.1", l.addr),
            });
        }
    }
    let has = |name: &str| s.filters.iter().any(|f| f.name == name);
    if !has("auth") {
        out.push(Finding {
            check: "config",
            what: "the filter chain has no `auth` filter: every request is anonymous".into(),
            why: "anyone who reaches the gateway can use every model it serves".into(),
            fix: "add `- use: auth` with `keys_file: keys.yaml` to filters (`llm-gateway init` writes both)".into(),
        });
    }
    if !s.default_policy && !has("policy") {
        out.push(Finding {
            check: "config",
            what: "`policy: none` and no policy filter: every backend route is reachable".into(),
            why: "model pulls and deletes are open to every client the chain lets through".into(),
            fix: "remove `policy: none`, or add `- use: policy`".into(),
        });
    }
}

fn backends(s: &Settings, out: &mut Vec<Finding>) {
    for b in &s.backends {
        let name = &b.name;
        let private = match b.addr.ip() {
            // 100.64.0.0/10: carrier-grade NAT, where tailnets (Tailscale) live.
            IpAddr::V4(v4) => {
                v4.is_loopback()
                    || v4.is_private()
                    || v4.is_link_local()
                    || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
            }
            IpAddr::V6(v6) => {
                v6.is_loopback()
                    || (v6.segments()[0] & 0xfe00) == 0xfc00
                    || (v6.segments()[0] & 0xffc0) == 0xfe80
            }
        };
        if !private {
            out.push(Finding {
                check: "backend",
                what: format!("backend {name} is at {}, a public address", b.addr),
                why: "prompts and answers cross the internet, and the model server is reachable by others".into(),
                fix: "run the model server on this machine (127.0.0.1) or a private network, or reach it through a VPN or tailnet".into(),
            });
        }
        let answered = match b.kind {
            BackendKind::Ollama => speaks(b.addr) == Some(Speaks::Ollama),
            // An OpenAI-compatible server may want its own key: 401 is still one.
            BackendKind::Openai => {
                get(b.addr, "/v1/models").is_some_and(|(status, _)| status == 200 || status == 401)
            }
        };
        if !answered {
            let reachable = TcpStream::connect_timeout(&b.addr, PROBE_TIMEOUT).is_ok();
            out.push(Finding {
                check: "backend",
                what: if reachable {
                    format!(
                        "backend {name} at {} does not answer like an {} server",
                        b.addr,
                        b.kind.as_str()
                    )
                } else {
                    format!("backend {name} at {} cannot be reached", b.addr)
                },
                why: "requests routed to it fail with 502".into(),
                fix: format!(
                    "start the model server, or correct backends[].url and kind ({}) for {name}",
                    b.kind.as_str()
                ),
            });
        }
    }
}

/// A file the config names, and what it holds.
struct Named {
    path: PathBuf,
    what: &'static str,
}

fn named_files(s: &Settings) -> Vec<Named> {
    let dir = s.file.parent().unwrap_or(Path::new("."));
    // The config itself may hold the admin token and collector credentials.
    let mut out = vec![Named {
        path: s.file.clone(),
        what: "config file",
    }];
    for f in &s.filters {
        for (key, what) in [
            ("keys_file", "keys file"),
            ("htpasswd", "htpasswd file"),
            ("ledger", "budget ledger"),
            ("file", "audit log"),
        ] {
            if let Some(p) = f.options.get(key).and_then(|v| v.as_str()) {
                out.push(Named {
                    path: dir.join(p),
                    what,
                });
            }
        }
    }
    for l in &s.listen {
        if let Some(t) = &l.tls {
            out.push(Named {
                path: t.key.clone(),
                what: "TLS private key",
            });
        }
    }
    out
}

/// The folders of the files the gateway reads or writes: one that every user may write (and
/// that is not sticky, like /tmp) lets anyone replace a file in it by renaming another over
/// it (a keys file of their own), or plant a link where the audit log will be made.
fn folders(named: &[Named], out: &mut Vec<Finding>) {
    let mut seen = std::collections::HashSet::new();
    for f in named {
        let Some(dir) = f.path.parent().filter(|d| !d.as_os_str().is_empty()) else {
            continue;
        };
        if !seen.insert(dir.to_path_buf()) {
            continue;
        }
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        let mode = meta.permissions().mode();
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            out.push(Finding {
                check: "file_permissions",
                what: format!(
                    "the folder {} of the {} can be written by every user of this machine (mode {:o})",
                    dir.display(),
                    f.what,
                    mode & 0o7777
                ),
                why: "anyone with an account here can replace the files in it (a keys file of their own) or plant a link where the gateway writes".into(),
                fix: format!("chmod o-w {}", dir.display()),
            });
        }
    }
}

fn files(s: &Settings, out: &mut Vec<Finding>) {
    let mut named = named_files(s);
    // SQLite's journal beside the ledger holds the same figures.
    let journals: Vec<Named> = named
        .iter()
        .filter(|f| f.what == "budget ledger")
        .map(|f| Named {
            path: gateway_filter::with_suffix(&f.path, "-wal"),
            what: "budget ledger",
        })
        .collect();
    named.extend(journals);
    folders(&named, out);
    for f in named {
        let meta = match std::fs::metadata(&f.path) {
            Ok(m) => m,
            // The ledger and audit log are made at the first start.
            Err(_) if matches!(f.what, "budget ledger" | "audit log") => continue,
            Err(e) => {
                out.push(Finding {
                    check: "config",
                    what: format!("the {} {} cannot be read: {e}", f.what, f.path.display()),
                    why: "the gateway will not start without it".into(),
                    fix: "create it or correct its path in the config".into(),
                });
                continue;
            }
        };
        let mode = meta.permissions().mode();
        if mode & 0o002 != 0 {
            out.push(Finding {
                check: "file_permissions",
                what: format!(
                    "the {} {} can be changed by every user of this machine (mode {:o})",
                    f.what,
                    f.path.display(),
                    mode & 0o777
                ),
                why:
                    "anyone with an account here can add keys, change the rules or rewrite the log"
                        .into(),
                fix: format!("chmod o-w {}", f.path.display()),
            });
        }
        if mode & 0o004 != 0 {
            out.push(Finding {
                check: "file_permissions",
                what: format!(
                    "the {} {} is readable by every user of this machine (mode {:o})",
                    f.what,
                    f.path.display(),
                    meta.permissions().mode() & 0o777
                ),
                why:
                    "other accounts can read who may use the gateway, what they did, or the TLS key"
                        .into(),
                fix: format!(
                    "chmod 600 {} (or 640 with the gateway's group)",
                    f.path.display()
                ),
            });
        }
        let text = || std::fs::read_to_string(&f.path).unwrap_or_default();
        if f.what == "keys file" && has_demo_key(&text()) {
            out.push(Finding {
                check: "demo_credentials",
                what: format!("{} still holds the demo key of conf/keys.yaml", f.path.display()),
                why: "its key (sk-gw-demo-key-change-me) is published in the README: anyone can use it".into(),
                fix: format!("delete the `id: demo` entry from {} and `kill -HUP` the gateway; make keys with `llm-gateway keys new --id NAME`", f.path.display()),
            });
        }
        if f.what == "htpasswd file" && text().lines().any(|l| l.starts_with("demo:")) {
            out.push(Finding {
                check: "demo_credentials",
                what: format!("{} still holds the demo user of conf/htpasswd", f.path.display()),
                why: "its password (demo) is published in the README".into(),
                fix: format!("delete the `demo:` line from {}; add users with `llm-gateway hash-password --user NAME`", f.path.display()),
            });
        }
    }
    for (i, l) in s.listen.iter().enumerate() {
        let Some(t) = &l.tls else { continue };
        match cert_days_left(&t.cert) {
            Some(days) if days < 30 => out.push(Finding {
                check: "tls_certificate",
                what: if days < 0 {
                    format!("listen[{i}]'s certificate {} has expired", t.cert.display())
                } else {
                    format!("listen[{i}]'s certificate {} expires in {days} days", t.cert.display())
                },
                why: "clients will refuse the gateway once it has expired".into(),
                fix: "renew it (certbot renew, or `llm-gateway init --force --listen ADDR` for a self-signed one) and restart or upgrade the gateway".into(),
            }),
            _ => {}
        }
    }
}

/// Whether a keys file holds an enabled entry for the demo key (any case of its hash).
fn has_demo_key(text: &str) -> bool {
    let Ok(doc) = serde_norway::from_str::<serde_norway::Value>(text) else {
        return false;
    };
    doc.get("keys")
        .and_then(|k| k.as_sequence())
        .into_iter()
        .flatten()
        .any(|k| {
            k.get("key_sha256")
                .and_then(|h| h.as_str())
                .is_some_and(|h| h.eq_ignore_ascii_case(DEMO_KEY_SHA256))
                && k.get("enabled").and_then(|e| e.as_bool()) != Some(false)
        })
}

/// Days until the first certificate in `path` expires (negative: expired).
fn cert_days_left(path: &Path) -> Option<i64> {
    let pem = std::fs::read(path).ok()?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    Some((cert.validity().not_after.timestamp() - now).div_euclid(86_400))
}

/// The findings as a person reads them.
pub fn report(findings: &[Finding]) -> String {
    if findings.is_empty() {
        return "doctor: nothing found: no model server answers around the gateway, and the config and its files look safe\n".into();
    }
    let mut s = format!("doctor: {} finding(s)\n", findings.len());
    for f in findings {
        s += &format!(
            "\n✗ [{}] {}\n    why: {}\n    fix: {}\n",
            f.check, f.what, f.why, f.fix
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_net_addresses() {
        assert_eq!(
            proc_addr("0100007F:1F90", false),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            proc_addr("00000000:2CAA", false),
            Some("0.0.0.0:11434".parse().unwrap())
        );
        assert_eq!(
            proc_addr("00000000000000000000000001000000:2CAA", true),
            Some("[::1]:11434".parse().unwrap())
        );
        assert_eq!(
            proc_addr("00000000000000000000000000000000:0050", true),
            Some("[::]:80".parse().unwrap())
        );
        assert_eq!(proc_addr("zz:1", false), None);
    }
}

#[cfg(test)]
mod demo_tests {
    use super::*;

    #[test]
    fn the_demo_key_counts_only_as_an_enabled_entry() {
        let entry = |extra: &str| {
            format!(
                "keys:\n  - id: demo\n    key_sha256: {}\n{extra}",
                DEMO_KEY_SHA256.to_uppercase()
            )
        };
        assert!(has_demo_key(&entry("")));
        assert!(!has_demo_key(&entry("    enabled: false\n")));
        assert!(!has_demo_key(&format!(
            "keys: []\n# key_sha256: {DEMO_KEY_SHA256}\n"
        )));
    }
}
