//! `llm-gateway init`: a safe starting point for a real box: a config with auth, policy, a
//! per-key rate limit and audit, a keys file with one fresh admin key (shown once, stored as
//! its hash), and, for a listener other machines reach, a TLS certificate. Every file 0600,
//! nothing overwritten unless asked, and what it writes passes `check`.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use filter_auth::keygen;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0} exists; pass --force to overwrite it")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--listen {0:?} is not an ip:port address such as 127.0.0.1:8080")]
    Listen(String),
    #[error("--backend {0:?}: {1}")]
    Backend(String, &'static str),
    #[error("--tls-cert and --tls-key go together")]
    TlsPair,
    #[error("cannot make a TLS certificate: {0}")]
    Cert(String),
    #[error("cannot make a key: {0}")]
    Key(String),
    #[error("the written config does not pass check ({0}); nothing was kept")]
    Invalid(String),
}

#[derive(Debug, clap::Args)]
pub struct InitOptions {
    /// Folder to write into.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Address to listen on; anything but loopback gets TLS.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// The model server: Ollama's URL, or an OpenAI-compatible server's ending in /v1.
    #[arg(long, default_value = "http://127.0.0.1:11434")]
    pub backend: String,
    /// A certificate to use instead of a self-signed one (with --tls-key).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Overwrite gateway.yaml and the TLS files; keys already in keys.yaml are kept.
    #[arg(long)]
    pub force: bool,
}

/// What `init` wrote, and the admin key to show once.
pub struct Written {
    pub files: Vec<PathBuf>,
    pub config: PathBuf,
    pub admin_key: String,
}

pub fn run(o: &InitOptions) -> Result<Written, InitError> {
    let listen: SocketAddr = o
        .listen
        .parse()
        .map_err(|_| InitError::Listen(o.listen.clone()))?;
    let (backend, kind) = backend(&o.backend)?;
    if o.tls_cert.is_some() != o.tls_key.is_some() {
        return Err(InitError::TlsPair);
    }
    let config = o.dir.join("gateway.yaml");
    let keys = o.dir.join("keys.yaml");
    let mut planned = vec![config.clone(), keys.clone()];
    let public = !listen.ip().is_loopback();
    let generate_tls = public && o.tls_cert.is_none();
    let (cert, key) = (o.dir.join("tls/cert.pem"), o.dir.join("tls/key.pem"));
    if generate_tls {
        planned.extend([cert.clone(), key.clone()]);
    }
    if !o.force {
        if let Some(p) = planned.iter().find(|p| p.exists()) {
            return Err(InitError::Exists(p.clone()));
        }
    }
    // What every file held before, so a config that does not pass is undone entirely.
    let before: Vec<Option<Vec<u8>>> = planned.iter().map(|p| std::fs::read(p).ok()).collect();
    let tls = match (&o.tls_cert, &o.tls_key) {
        (Some(c), Some(k)) => Some((absolute(c), absolute(k))),
        _ if generate_tls => {
            let (cert_pem, key_pem) = self_signed(listen)?;
            write_private(&cert, cert_pem.as_bytes(), o.force)?;
            write_private(&key, key_pem.as_bytes(), o.force)?;
            Some((PathBuf::from("tls/cert.pem"), PathBuf::from("tls/key.pem")))
        }
        _ => None,
    };
    let admin_key = keygen::new_key().map_err(|e| InitError::Key(e.to_string()))?;
    // Keys already there stay: the new admin key joins them, under an id of its own (a
    // second `admin` made a file that does not load).
    let old_keys = std::fs::read_to_string(&keys).ok().filter(|_| o.force);
    let id = free_admin_id(old_keys.as_deref().unwrap_or_default());
    let mut entry = keygen::key_entry(&id, Some("Administrator (made by init)"), &admin_key);
    entry += "    scopes: [admin]\n";
    let keys_text = match &old_keys {
        Some(old) => add_entry(old, &entry),
        None => keys_file(&entry),
    };
    write_private(&keys, keys_text.as_bytes(), o.force)?;
    write_private(
        &config,
        config_file(listen, tls.as_ref(), &backend, kind).as_bytes(),
        o.force,
    )?;
    // What was written must start (its filters too: the keys file is theirs): otherwise put
    // back what was there and print no key.
    let registry = crate::registry::Registry::builtin();
    let started = crate::config::load(&config)
        .and_then(|s| crate::chain::FilterChain::check(&s, &registry).map(|_| ()));
    if let Err(e) = started {
        for (path, old) in planned.iter().zip(before) {
            match old {
                Some(bytes) => {
                    let _ = std::fs::write(path, bytes);
                }
                None => {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        return Err(InitError::Invalid(e.to_string()));
    }
    Ok(Written {
        files: planned,
        config,
        admin_key,
    })
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The backend URL and its kind: `…/v1` is an OpenAI-compatible server (llama.cpp, vLLM),
/// anything else Ollama.
fn backend(url: &str) -> Result<(String, &'static str), InitError> {
    let url = url.trim().trim_end_matches('/');
    let (base, kind) = match url.strip_suffix("/v1") {
        Some(base) => (base, "openai"),
        None => (url, "ollama"),
    };
    let Some(rest) = base.strip_prefix("http://") else {
        return Err(InitError::Backend(
            url.into(),
            "must be an http:// URL such as http://127.0.0.1:11434 (or …/v1 for an OpenAI-compatible server)",
        ));
    };
    if rest.is_empty() || rest.contains('/') {
        return Err(InitError::Backend(
            url.into(),
            "give the server's address only, such as http://127.0.0.1:11434 or http://127.0.0.1:8000/v1",
        ));
    }
    Ok((base.to_string(), kind))
}

/// `entry` added to an existing keys file's list.
/// `admin`, or `admin-2`, `admin-3`… when the keys file `old` already has that id (read as
/// YAML: flow style, comments and quoting as the loader reads them).
fn free_admin_id(old: &str) -> String {
    let ids: Vec<String> = serde_norway::from_str::<serde_norway::Value>(old)
        .ok()
        .and_then(|v| v.get("keys").and_then(|k| k.as_sequence()).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e.get("id").and_then(|i| i.as_str()).map(str::to_string))
        .collect();
    let taken = |id: &str| ids.iter().any(|i| i == id);
    (1..)
        .map(|n| match n {
            1 => "admin".to_string(),
            n => format!("admin-{n}"),
        })
        .find(|id| !taken(id))
        .unwrap_or_else(|| "admin".into())
}

fn add_entry(old: &str, entry: &str) -> String {
    if let Some(at) = old.find("keys: []") {
        let mut s = old.to_string();
        s.replace_range(
            at..at + "keys: []".len(),
            &format!("keys:\n{}", entry.trim_end()),
        );
        if !s.ends_with('\n') {
            s.push('\n');
        }
        return s;
    }
    let mut s = old.to_string();
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s + entry
}

/// A new file readable by its owner only (0600, folders 0700).
fn write_private(path: &Path, content: &[u8], force: bool) -> Result<(), InitError> {
    let err = |source| InitError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    let mut open = std::fs::OpenOptions::new();
    // Never through a symbolic link someone put in its place.
    open.write(true).mode(0o600).custom_flags(libc::O_NOFOLLOW);
    if force {
        open.create(true).truncate(true);
    } else {
        open.create_new(true);
    }
    let mut f = open.open(path).map_err(err)?;
    // An existing file keeps its mode on truncation: make it 0600 too (on the open file).
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(err)?;
    f.write_all(content).map_err(err)
}

fn self_signed(listen: SocketAddr) -> Result<(String, String), InitError> {
    let mut names = vec!["localhost".to_string()];
    if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
        let host = host.trim();
        if !host.is_empty() && host != "localhost" {
            names.push(host.to_string());
        }
    }
    let mut params =
        rcgen::CertificateParams::new(names).map_err(|e| InitError::Cert(e.to_string()))?;
    // A wildcard listener is reached by this machine's addresses: name them all, so that
    // clients connecting by IP pass the hostname check.
    let ips = if listen.ip().is_unspecified() {
        let mut ips = local_addresses();
        ips.push(std::net::IpAddr::from([127, 0, 0, 1]));
        ips
    } else {
        vec![listen.ip()]
    };
    for ip in ips {
        params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
    }
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "llm-gateway");
    // Valid from the start of last year to the end of next year (a year or more): `doctor`
    // says when it nears its end.
    let year = 1970
        + (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 1, 12, 31);
    let key = rcgen::KeyPair::generate().map_err(|e| InitError::Cert(e.to_string()))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| InitError::Cert(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// This machine's interface addresses (loopback and IPv6 link-local left out).
fn local_addresses() -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list it allocates; it is walked read-only
    // and freed once with freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cur = list;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let a = &*(addr as *const libc::sockaddr_in);
                        out.push(std::net::IpAddr::from(
                            u32::from_be(a.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let a = &*(addr as *const libc::sockaddr_in6);
                        out.push(std::net::IpAddr::from(a.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out.retain(|ip| match ip {
        std::net::IpAddr::V4(v4) => !v4.is_loopback(),
        std::net::IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    });
    out.sort_unstable();
    out.dedup();
    out
}

fn keys_file(entry: &str) -> String {
    format!(
        "# Principals allowed through the `auth` filter; only SHA-256 hashes of keys are stored.\n\
         # Add one:   llm-gateway keys new --id alice --name \"Alice\"   (then paste the entry)\n\
         # Reload:    kill -HUP $(pidof llm-gateway)   or   systemctl reload llm-gateway\n\
         keys:\n{entry}    # Optional per principal: models: [\"llama3.1:*\"], rate: 10/m, burst: 5,\n    # tokens_per_minute: 50000, max_usd: 10, period: 1mo, expires: 2027-01-31\n"
    )
}

fn config_file(
    listen: SocketAddr,
    tls: Option<&(PathBuf, PathBuf)>,
    backend: &str,
    kind: &str,
) -> String {
    let tls = tls.map_or(String::new(), |(c, k)| {
        format!(
            "    tls: {{ cert: {}, key: {} }}\n",
            yaml_path(c),
            yaml_path(k)
        )
    });
    format!(
        "# Written by `llm-gateway init`. Check it: llm-gateway check --config gateway.yaml\n\
         # Then look for anything still open around it: llm-gateway doctor --config gateway.yaml\n\
         listen:\n  - addr: \"{listen}\"\n{tls}\
         admin:\n  addr: 127.0.0.1:9091           # /metrics and /health, loopback only\n\
         backends:\n  - name: local\n    url: {backend}\n    kind: {kind}\n\
         limits:\n  max_body: 1MiB\n\
         filters:\n\
         \x20 - use: auth\n    keys_file: keys.yaml          # next to this file\n\
         \x20 - use: policy\n    allow: [openai-inference, ollama-inference, {{ preset: ollama-admin, scope: admin }}]\n    max_output_tokens: 4096       # no unbounded generations\n\
         \x20 - use: ratelimit\n    key: api_key\n    rate: 60/m\n    burst: 10\n    max_in_flight: 4\n\
         \x20 - use: audit\n    file: audit.jsonl             # one JSON line per request, 0600\n    rotate: {{ max_size: 100MiB, keep: 5 }}\n\
         \x20 # Spend budgets from real token usage (prices in USD per million tokens):\n\
         \x20 # - use: budget\n\
         \x20 #   ledger: spend.db\n\
         \x20 #   prices:\n\
         \x20 #     - {{ model: \"llama3.1:*\", prompt_per_1m: 0.10, completion_per_1m: 0.40 }}\n\
         \x20 #   default: {{ max_usd: 20, period: 1mo }}\n"
    )
}

fn yaml_path(p: &Path) -> String {
    serde_json::to_string(&p.display().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_new_admin_key_takes_an_id_no_entry_has() {
        assert_eq!(free_admin_id("keys: []\n"), "admin");
        assert_eq!(free_admin_id(""), "admin");
        // However the file writes its ids: block or flow style, quoted, with comments.
        for old in [
            "keys:\n  - id: admin\n    key_sha256: x\n",
            "keys:\n  - { id: admin, key_sha256: x }\n",
            "keys:\n  - id: \"admin\"  # the first\n    key_sha256: x\n",
        ] {
            assert_eq!(free_admin_id(old), "admin-2", "{old}");
        }
        assert_eq!(
            free_admin_id("keys:\n  - { id: admin }\n  - { id: admin-2 }\n"),
            "admin-3"
        );
    }
}
