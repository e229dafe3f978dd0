//! The running model of the configuration, built from the file format and validated.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use ipnet::IpNet;

use crate::host_check::{HostCheck, HostRule};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::file::{
    BackendEntry, BackendKind, FileConfig, ListenEntry, PolicyDefault, RoutingSection, Strategy,
};

/// A problem found while validating, as (YAML path, message).
pub type Invalid = (String, String);

#[derive(Debug, Clone)]
pub struct Settings {
    pub file: PathBuf,
    pub listen: Vec<ListenerSpec>,
    pub backends: Vec<BackendSpec>,
    pub limits: Limits,
    pub routing: RoutingSpec,
    pub threads: usize,
    pub drain_timeout: Duration,
    /// Where a running gateway hands its sockets to an `--upgrade` one (`None`: no folder
    /// safe for it, upgrades refused).
    pub upgrade_sock: Option<PathBuf>,
    pub filters: Vec<FilterSpec>,
    /// Add the built-in policy when the chain has no `policy` filter.
    pub default_policy: bool,
    /// Admin listener (`/metrics`, `/health`), if enabled.
    pub admin: Option<SocketAddr>,
    pub admin_token: Option<String>,
    /// What bounds metric label values (`metrics:`).
    pub metric_labels: gateway_filter::labels::LabelLimits,
    /// OTLP trace export, when configured.
    pub telemetry: Option<super::telemetry::TelemetrySpec>,
    /// Shared state (`state: { backend: redis }`); `None` keeps it in this process.
    pub state: Option<super::state::StateSpec>,
}

#[derive(Debug, Clone)]
pub struct ListenerSpec {
    pub addr: SocketAddr,
    pub tls: Option<TlsSpec>,
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    /// Set when the operator accepted a network-reachable listener without TLS or auth.
    pub insecure: bool,
    pub max_connections: Option<usize>,
    pub max_connections_per_client: Option<u32>,
    /// Peers whose `X-Forwarded-For` / `Forwarded` name the real client.
    pub trusted_proxies: Vec<IpNet>,
    /// Which of the two headers they write.
    pub forwarded_header: ForwardedHeader,
    /// Which requests' `Host` is checked, and the names it may be besides local ones.
    pub hosts: HostRule,
}

/// The header a listener's trusted proxies name the client in. A proxy passes on what the
/// client sent in the header it does not write itself: naming the one it writes keeps a
/// client from choosing its own address there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For`, else (when the request has none) `Forwarded`.
    #[default]
    Either,
    XForwardedFor,
    Forwarded,
}

/// Shortest admin token accepted on a listener reachable from the network.
const MIN_ADMIN_TOKEN: usize = 16;

/// Most proxy threads `server.threads` may ask for.
const MAX_THREADS: usize = 1024;

/// The item whose listener address a connection's local address `local` is: an exact match,
/// else a wildcard (`0.0.0.0` / `::`) on the same port.
pub fn by_local_addr<T>(
    items: &[T],
    local: SocketAddr,
    addr: impl Fn(&T) -> SocketAddr,
) -> Option<&T> {
    items.iter().find(|i| addr(i) == local).or_else(|| {
        items.iter().find(|i| {
            let a = addr(i);
            a.port() == local.port() && a.ip().is_unspecified()
        })
    })
}

impl ListenerSpec {
    /// Whether `ip` is one of the listener's `trusted_proxies`.
    pub fn is_trusted_proxy(&self, ip: &IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }

    /// The client behind a trusted proxy: the rightmost address of `X-Forwarded-For` (or
    /// `Forwarded: for=`) that is not itself a trusted proxy. Hops are read from the right and
    /// only as far as that one: what a client wrote to the left of it (anything, not even
    /// text) is never read, so it cannot make the whole header unreadable and the client count
    /// as the proxy. A hop may carry a port (`1.2.3.4:5678`, `[2001:db8::1]:443`). `None` when
    /// `peer` is not a trusted proxy (its headers are then ignored), or the headers name no
    /// address that can be read where the client's should be.
    pub fn forwarded_client(&self, peer: IpAddr, headers: &http::HeaderMap) -> Option<IpAddr> {
        let trusted = |ip: &IpAddr| self.is_trusted_proxy(ip);
        if !trusted(&peer) {
            return None;
        }
        let mut hops: Vec<&[u8]> = Vec::new();
        if self.forwarded_header != ForwardedHeader::Forwarded {
            hops.extend(
                headers
                    .get_all("x-forwarded-for")
                    .iter()
                    .flat_map(|v| v.as_bytes().split(|&b| b == b',')),
            );
        }
        if hops.is_empty() && self.forwarded_header != ForwardedHeader::XForwardedFor {
            for v in headers.get_all("forwarded") {
                for element in v.as_bytes().split(|&b| b == b',') {
                    for pair in element.split(|&b| b == b';') {
                        let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                            continue;
                        };
                        if pair[..eq].trim_ascii().eq_ignore_ascii_case(b"for") {
                            hops.push(&pair[eq + 1..]);
                        }
                    }
                }
            }
        }
        for hop in hops.into_iter().rev() {
            let ip = parse_hop(hop)?;
            if !trusted(&ip) {
                return Some(ip.to_canonical());
            }
        }
        None
    }

    /// Whether a client address may use this listener.
    pub fn admits(&self, ip: &IpAddr) -> bool {
        let ip = ip.to_canonical();
        (self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip)))
            && !self.deny.iter().any(|n| n.contains(&ip))
    }
}

/// One hop of `X-Forwarded-For` or `Forwarded: for=`: an address, perhaps quoted, perhaps
/// with a port (`1.2.3.4:5678`, `[2001:db8::1]:443`, `"[2001:db8::1]"`).
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let hop = std::str::from_utf8(hop).ok()?.trim().trim_matches('"');
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .or_else(|| hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

#[derive(Debug, Clone)]
pub struct TlsSpec {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Built once, when the config is read (`check` refuses a file that holds no CA).
    pub client_ca: Option<crate::tls::ClientCa>,
}

/// How backends are chosen, retried and watched.
#[derive(Debug, Clone)]
pub struct RoutingSpec {
    pub strategy: Strategy,
    pub per_model: Vec<(String, Strategy)>,
    pub retries: u32,
    pub fail_threshold: u32,
    pub cooldown: Duration,
    pub cooldown_max: Duration,
    pub latency_tolerance: f64,
    pub residency_max_in_flight: u32,
    pub queue_size: usize,
    pub queue_timeout: Duration,
    pub first_byte_timeout: Option<Duration>,
    pub cold_start_timeout: Duration,
    pub sse_keepalive: Option<Duration>,
    pub discovery_interval: Option<Duration>,
    pub health_interval: Option<Duration>,
    /// Health probes' deadline (`routing.health.timeout`).
    pub probe_timeout: Duration,
    /// Model-list reads' deadline (`routing.discovery.timeout`).
    pub discovery_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct BackendSpec {
    pub name: Arc<str>,
    pub kind: BackendKind,
    pub weight: u32,
    pub max_in_flight: Option<u32>,
    pub models: Option<Vec<String>>,
    /// Resolved once at load; never looked up on the request path.
    pub addr: SocketAddr,
    /// `host:port` from the URL, sent as the `Host` header (Ollama rejects foreign hosts).
    pub authority: String,
    /// Overrides `routing.first_byte_timeout` for this backend.
    pub first_byte_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body: usize,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub send_timeout: Duration,
    pub client_body_timeout: Duration,
    pub client_header_timeout: Duration,
    pub client_send_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub keepalive_requests: u32,
    pub ipv6_prefix: u8,
}

/// One `filters:` entry: the registry name, where it stands in the file, and its options.
#[derive(Debug, Clone)]
pub struct FilterSpec {
    pub name: String,
    pub yaml_path: String,
    pub options: serde_json::Value,
}

pub fn build(file: PathBuf, cfg: FileConfig) -> Result<Settings, Invalid> {
    let has_auth = cfg
        .filters
        .iter()
        .any(|f| f.get("use").and_then(|u| u.as_str()) == Some("auth"));
    let config_dir = file.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    let listen = match cfg.listen {
        None => vec![ListenerSpec {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls: None,
            allow: Vec::new(),
            deny: Vec::new(),
            insecure: false,
            max_connections: None,
            max_connections_per_client: None,
            trusted_proxies: Vec::new(),
            forwarded_header: Default::default(),
            hosts: HostRule::local(),
        }],
        Some(list) if list.is_empty() => {
            return Err((
                "listen".into(),
                "needs at least one entry, e.g. `- addr: 127.0.0.1:8080`".into(),
            ))
        }
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, l)| {
                listener(l, has_auth, &config_dir).map_err(|(k, m)| (format!("listen[{i}]{k}"), m))
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    for (i, l) in listen.iter().enumerate() {
        let a = l.addr;
        if let Some(j) = listen[..i].iter().position(|o| overlaps(o.addr, a)) {
            return Err((
                format!("listen[{i}].addr"),
                format!(
                    "{a} overlaps listen[{j}] ({}): one port cannot be listened on twice; remove one of them",
                    listen[j].addr
                ),
            ));
        }
    }

    let mut backends: Vec<BackendSpec> = Vec::with_capacity(cfg.backends.len());
    for (i, b) in cfg.backends.iter().enumerate() {
        let spec = backend(b).map_err(|(k, m)| (format!("backends[{i}]{k}"), m))?;
        if backends.iter().any(|o| o.name == spec.name) {
            return Err((
                format!("backends[{i}].name"),
                format!(
                    "duplicate backend name {:?}; names must be unique",
                    spec.name
                ),
            ));
        }
        backends.push(spec);
    }

    let l = &cfg.limits;
    if l.max_body.0 == 0 {
        return Err(("limits.max_body".into(), "must be greater than 0".into()));
    }
    for (key, d) in [
        ("connect_timeout", l.connect_timeout),
        ("read_timeout", l.read_timeout),
        ("send_timeout", l.send_timeout),
        ("client_body_timeout", l.client_body_timeout),
        ("client_header_timeout", l.client_header_timeout),
        ("client_send_timeout", l.client_send_timeout),
        ("keepalive_timeout", l.keepalive_timeout),
    ] {
        if d.0.is_zero() {
            return Err((format!("limits.{key}"), "must be greater than 0".into()));
        }
    }
    if l.ipv6_prefix == 0 || l.ipv6_prefix > 128 {
        return Err((
            "limits.ipv6_prefix".into(),
            "must be between 1 and 128 (64 is one customer network)".into(),
        ));
    }
    let limits = Limits {
        max_body: usize::try_from(l.max_body.0).unwrap_or(usize::MAX),
        connect_timeout: l.connect_timeout.0,
        read_timeout: l.read_timeout.0,
        send_timeout: l.send_timeout.0,
        client_body_timeout: l.client_body_timeout.0,
        client_header_timeout: l.client_header_timeout.0,
        client_send_timeout: l.client_send_timeout.0,
        keepalive_timeout: l.keepalive_timeout.0,
        keepalive_requests: l.keepalive_requests.max(1),
        ipv6_prefix: l.ipv6_prefix,
    };

    let admin = if cfg.admin.enabled {
        let addr = cfg.admin.addr.parse::<SocketAddr>().map_err(|_| {
            (
                "admin.addr".to_string(),
                format!(
                    "{:?} is not an ip:port address, e.g. 127.0.0.1:9091",
                    cfg.admin.addr
                ),
            )
        })?;
        if listen.iter().any(|l| overlaps(l.addr, addr)) {
            return Err((
                "admin.addr".into(),
                format!("{addr} is also a public listener; metrics must not be served there: pick another port"),
            ));
        }
        if !addr.ip().is_loopback()
            && cfg
                .admin
                .token
                .as_deref()
                .is_none_or(|t| t.trim().is_empty())
        {
            return Err((
                "admin.token".into(),
                format!("{addr} is reachable from the network: set `token: ${{ADMIN_TOKEN}}` so /admin/* and /metrics need it, or listen on 127.0.0.1"),
            ));
        }
        // Reachable from the network, the token is all that guards reloads and spend, and the
        // admin listener has no lockout: one that can be guessed is refused.
        if !addr.ip().is_loopback()
            && cfg
                .admin
                .token
                .as_deref()
                .is_some_and(|t| t.trim().chars().count() < MIN_ADMIN_TOKEN)
        {
            return Err((
                "admin.token".into(),
                format!("must be at least {MIN_ADMIN_TOKEN} characters when {addr} is reachable from the network, such as the output of `openssl rand -hex 24`"),
            ));
        }
        Some(addr)
    } else {
        None
    };

    let threads = match cfg.server.threads {
        Some(0) => return Err(("server.threads".into(), "must be at least 1".into())),
        // Each thread is a runtime with its own stack and buffers: thousands only exhaust
        // memory at start (the process aborted without naming the key).
        Some(n) if n > MAX_THREADS => {
            return Err((
                "server.threads".into(),
                format!("at most {MAX_THREADS} (one per core is the usual; leave it out for that)"),
            ))
        }
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };

    let filters = cfg
        .filters
        .into_iter()
        .enumerate()
        .map(|(i, v)| filter_spec(i, v))
        .collect::<Result<Vec<_>, _>>()?;
    chain_against_file(&filters, &listen, &backends, &config_dir)?;
    let telemetry = super::telemetry::build(cfg.telemetry, &filters, &config_dir)?;
    let state = super::state::build(cfg.state, &config_dir)?;
    let upgrade_sock = upgrade_sock(cfg.server.upgrade_sock.as_deref(), &config_dir)?;

    Ok(Settings {
        file,
        listen,
        backends,
        limits,
        routing: routing(&cfg.routing)?,
        threads,
        drain_timeout: cfg.server.drain_timeout.0,
        upgrade_sock,
        filters,
        default_policy: cfg.policy != Some(PolicyDefault::None),
        admin,
        // Blank is unset: a token of spaces would match an empty `Bearer ` (tokens are trimmed).
        admin_token: cfg.admin.token.clone().filter(|t| !t.trim().is_empty()),
        metric_labels: gateway_filter::labels::LabelLimits {
            principal_label: cfg.metrics.principal_label,
            max_models: cfg.metrics.max_models,
            max_principals: cfg.metrics.max_principals,
        },
        telemetry,
        state,
    })
}

/// What filters ask of the rest of the file: client certificates need a listener that asks
/// for them (`mtls: require` would otherwise refuse everyone, `accept` never map anyone), two
/// budgets writing one ledger would each read the other's spend as an older process's, and a
/// price for a backend that does not exist never applies.
fn chain_against_file(
    filters: &[FilterSpec],
    listen: &[ListenerSpec],
    backends: &[BackendSpec],
    config_dir: &Path,
) -> Result<(), Invalid> {
    let asks_certs = listen
        .iter()
        .any(|l| l.tls.as_ref().is_some_and(|t| t.client_ca.is_some()));
    let mut ledgers: Vec<(PathBuf, &str)> = Vec::new();
    for f in filters {
        let text = |key: &str| f.options.get(key).and_then(serde_json::Value::as_str);
        match (f.name.as_str(), text("mtls")) {
            ("auth", Some(mode @ ("require" | "accept"))) if !asks_certs => {
                return Err((
                    format!("{}.mtls", f.yaml_path),
                    format!("`mtls: {mode}` needs a listener that asks clients for certificates, and none has `tls.client_ca`: add `client_ca: ca.pem` (the CA that issues client certificates) to a listener's `tls`"),
                ));
            }
            _ => {}
        }
        if f.name == "budget" {
            let prices = f
                .options
                .get("prices")
                .and_then(serde_json::Value::as_array);
            for (j, p) in prices.into_iter().flatten().enumerate() {
                let Some(name) = p.get("backend").and_then(serde_json::Value::as_str) else {
                    continue;
                };
                if !backends.iter().any(|b| &*b.name == name) {
                    return Err((
                        format!("{}.prices[{j}].backend", f.yaml_path),
                        format!(
                            "{name:?} is not the name of a backend, so this price would never apply; name one of: {}",
                            backends
                                .iter()
                                .map(|b| &*b.name)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
        }
        if let ("budget", Some(ledger)) = (f.name.as_str(), text("ledger")) {
            // `./spend.db` and `spend.db` are one file.
            let path: PathBuf = resolve(config_dir, ledger)
                .components()
                .filter(|c| *c != std::path::Component::CurDir)
                .collect();
            if let Some((_, first)) = ledgers.iter().find(|(p, _)| *p == path) {
                return Err((
                    format!("{}.ledger", f.yaml_path),
                    format!("{} is also the ledger of {first}: each budget needs a ledger file of its own", path.display()),
                ));
            }
            ledgers.push((path, &f.yaml_path));
        }
    }
    Ok(())
}

/// `server.upgrade_sock`, relative to the config file's folder. Whoever can create the
/// socket there first would be handed the listening sockets, so its folder must not be
/// writable by other users. By default `/run/llm-gateway/upgrade.sock` when that folder
/// exists (systemd's `RuntimeDirectory`), else `llm-gateway-upgrade.sock` next to the config;
/// `None` when neither folder is safe (upgrades are then refused).
fn upgrade_sock(configured: Option<&str>, config_dir: &Path) -> Result<Option<PathBuf>, Invalid> {
    let dir = if config_dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        config_dir
    };
    let path = match configured {
        Some(p) => {
            let path = dir.join(p);
            let folder = path.parent().unwrap_or(Path::new("."));
            if let Err(why) = private_folder(folder) {
                return Err((
                    "server.upgrade_sock".into(),
                    format!("{}: {why}; the running gateway hands its listening sockets to whoever listens there: use a folder only this user can write, such as /run/llm-gateway", folder.display()),
                ));
            }
            path
        }
        None => {
            let run = Path::new("/run/llm-gateway");
            if private_folder(run).is_ok() {
                run.join("upgrade.sock")
            } else if private_folder(dir).is_ok() {
                dir.join("llm-gateway-upgrade.sock")
            } else {
                return Ok(None);
            }
        }
    };
    // sockaddr_un holds 108 bytes with its NUL.
    if path.as_os_str().len() > 107 {
        return Err((
            "server.upgrade_sock".into(),
            format!("{} is longer than a Unix socket path may be (107 bytes); use a shorter path such as /run/llm-gateway/upgrade.sock", path.display()),
        ));
    }
    Ok(Some(path))
}

/// Whether two listening addresses claim the same socket: the same port on the same address,
/// or on a wildcard of the family (IPv6's `[::]` takes IPv4 too). An IPv4-mapped IPv6
/// address is the IPv4 address it maps.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    let (ia, ib) = (a.ip().to_canonical(), b.ip().to_canonical());
    let covers = |w: IpAddr, o: IpAddr| w.is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    a.port() == b.port() && (ia == ib || covers(ia, ib) || covers(ib, ia))
}

/// A folder that exists, belongs to this user or root, and that no other user or group can
/// write to (whoever can would be handed the listening sockets).
fn private_folder(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err("not a folder".into());
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "owned by user {}, not by this user or root",
            meta.uid()
        ));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err("writable by its group or every user".into());
    }
    Ok(())
}

fn routing(r: &RoutingSection) -> Result<RoutingSpec, Invalid> {
    if !(0.0..=10.0).contains(&r.latency_tolerance) {
        return Err((
            "routing.latency_tolerance".into(),
            "a fraction such as 0.2 (within 20% of the fastest)".into(),
        ));
    }
    if r.cooldown.0.is_zero() {
        return Err((
            "routing.cooldown".into(),
            "must be greater than 0: how long a failing backend is left alone".into(),
        ));
    }
    if r.cooldown_max.0 < r.cooldown.0 {
        return Err((
            "routing.cooldown_max".into(),
            "must be at least cooldown".into(),
        ));
    }
    if r.sse_keepalive.is_some_and(|d| d.0.is_zero()) {
        return Err((
            "routing.sse_keepalive".into(),
            "must be greater than 0 (leave it out for none)".into(),
        ));
    }
    if r.cold_start_timeout.0.is_zero() {
        return Err((
            "routing.cold_start_timeout".into(),
            "must be greater than 0".into(),
        ));
    }
    if r.first_byte_timeout.is_some_and(|d| d.0.is_zero()) {
        return Err((
            "routing.first_byte_timeout".into(),
            "must be greater than 0 (leave it out for none)".into(),
        ));
    }
    let mut intervals = [None, None];
    for (i, (key, p, default)) in [
        ("discovery", &r.discovery, Duration::from_secs(10)),
        ("health", &r.health, Duration::from_secs(5)),
    ]
    .into_iter()
    .enumerate()
    {
        let interval = p.interval.map_or(default, |d| d.0);
        if p.enabled && interval.is_zero() {
            return Err((
                format!("routing.{key}.interval"),
                "must be greater than 0".into(),
            ));
        }
        intervals[i] = p.enabled.then_some(interval);
    }
    for (key, p) in [
        ("routing.health.timeout", &r.health),
        ("routing.discovery.timeout", &r.discovery),
    ] {
        if p.enabled && p.timeout.0.is_zero() {
            return Err((
                key.into(),
                "must be greater than 0: every probe would fail (a few seconds, such as 2s)".into(),
            ));
        }
    }
    Ok(RoutingSpec {
        strategy: r.strategy,
        per_model: r.per_model.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        retries: r.retries,
        fail_threshold: r.fail_threshold.max(1),
        cooldown: r.cooldown.0,
        cooldown_max: r.cooldown_max.0,
        latency_tolerance: r.latency_tolerance,
        residency_max_in_flight: r.residency_max_in_flight.max(1),
        queue_size: r.queue.size,
        queue_timeout: r.queue.timeout.0,
        first_byte_timeout: r.first_byte_timeout.map(|d| d.0),
        cold_start_timeout: r.cold_start_timeout.0,
        sse_keepalive: r.sse_keepalive.map(|d| d.0),
        discovery_interval: intervals[0],
        health_interval: intervals[1],
        probe_timeout: r.health.timeout.0,
        discovery_timeout: r.discovery.timeout.0,
    })
}

/// An IPv4 network written in its IPv6-mapped form (`::ffff:10.0.0.0/104`) as the IPv4
/// network it is: clients reaching an IPv6 listener over IPv4 are judged by their IPv4
/// address, so the mapped form would match nobody (and a `deny_cidrs` entry deny nothing).
fn ipv4_as_written(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

fn listener(l: &ListenEntry, has_auth: bool, config_dir: &Path) -> Result<ListenerSpec, Invalid> {
    let addr = l.addr.parse::<SocketAddr>().map_err(|_| {
        (
            ".addr".to_string(),
            format!(
                "{:?} is not an ip:port address, e.g. 127.0.0.1:8080",
                l.addr
            ),
        )
    })?;
    let nets = |key: &str, list: &[String]| {
        list.iter()
            .enumerate()
            .map(|(j, s)| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map(ipv4_as_written)
                    .map_err(|_| (format!(".{key}[{j}]"), format!("{s:?} is not a network such as 10.0.0.0/8, 192.168.1.7 or fd00::/8")))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let allow = nets("allow_cidrs", &l.allow_cidrs)?;
    let trusted_proxies = nets("trusted_proxies", &l.trusted_proxies)?;
    // Every address trusted to name the client: any client could then name itself anyone
    // (another address for limits and audit; another user through an identity header).
    if let Some(j) = trusted_proxies.iter().position(|n| n.prefix_len() == 0) {
        return Err((
            format!(".trusted_proxies[{j}]"),
            format!(
                "{} trusts every address to name the client, so any client could pose as another address (or user, with trusted_identity_header); list your proxies' own addresses, such as 10.0.0.5 or 10.0.0.0/24",
                trusted_proxies[j]
            ),
        ));
    }
    let deny = nets("deny_cidrs", &l.deny_cidrs)?;
    let forwarded_header = match l.forwarded_header.as_deref() {
        None => ForwardedHeader::Either,
        Some(h) if h.eq_ignore_ascii_case("x-forwarded-for") => ForwardedHeader::XForwardedFor,
        Some(h) if h.eq_ignore_ascii_case("forwarded") => ForwardedHeader::Forwarded,
        Some(h) => {
            return Err((
                ".forwarded_header".into(),
                format!(
                    "{h:?} is not a header the client is named in: use x-forwarded-for or forwarded (the one your proxy writes)"
                ),
            ))
        }
    };
    let tls = match &l.tls {
        None => None,
        Some(t) => {
            let file = |key: &str, p: &str| {
                let path = resolve(config_dir, p);
                std::fs::File::open(&path)
                    .map(|_| path.clone())
                    .map_err(|e| {
                        (
                            format!(".tls.{key}"),
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })
            };
            let (cert, key) = (file("cert", &t.cert)?, file("key", &t.key)?);
            crate::tls::check_pair(&cert, &key).map_err(|e| (".tls".to_string(), e.to_string()))?;
            Some(TlsSpec {
                cert,
                key,
                client_ca: t
                    .client_ca
                    .as_deref()
                    .map(|p| {
                        let path = file("client_ca", p)?;
                        let verifier = crate::tls::client_verifier(&path).map_err(|e| {
                            let why = match e {
                                crate::tls::TlsError::ClientCa { reason, .. } => reason,
                                e => e.to_string(),
                            };
                            (
                                ".tls.client_ca".to_string(),
                                format!("cannot load {}: {why}; it must hold the PEM certificates of the CAs that issue client certificates", path.display()),
                            )
                        })?;
                        Ok::<_, Invalid>(crate::tls::ClientCa { path, verifier })
                    })
                    .transpose()?,
            })
        }
    };
    let exposed = !addr.ip().is_loopback();
    if exposed && !l.allow_insecure && (tls.is_none() || !has_auth) {
        let missing = match (tls.is_none(), !has_auth) {
            (true, true) => "has no TLS and the chain has no auth filter",
            (true, false) => "has no TLS, so keys and prompts cross the network in plain text",
            _ => "has no auth filter in the chain, so anyone who can reach it can use the models",
        };
        let add = match (tls.is_none(), !has_auth) {
            (true, true) => {
                "add `tls: { cert, key }` to this listener and `- use: auth` to filters"
            }
            (true, false) => "add `tls: { cert, key }` to this listener",
            _ => "add `- use: auth` to filters",
        };
        return Err((
            String::new(),
            format!(
                "{addr} is reachable from the network but {missing}; {add}, or set `allow_insecure: true` on this listener if something else protects it"
            ),
        ));
    }
    for (key, zero) in [
        (".max_connections", l.max_connections == Some(0)),
        (
            ".max_connections_per_client",
            l.max_connections_per_client == Some(0),
        ),
    ] {
        if zero {
            return Err((
                key.into(),
                "connection caps must be at least 1 (leave them out for no cap)".into(),
            ));
        }
    }
    let hosts = match &l.allowed_hosts {
        Some(names) if names.iter().any(|n| n == "*") => HostRule {
            names: Vec::new(),
            check: HostCheck::Any,
        },
        Some(names) => {
            if let Some(j) = names
                .iter()
                .position(|n| n.is_empty() || n.contains(['/', ':', ' ', '*', '[', ']']))
            {
                return Err((
                    format!(".allowed_hosts[{j}]"),
                    format!(
                        "{:?} is not a host name such as gpu.example.com (no port, scheme or wildcard; `*` alone allows any)",
                        names[j]
                    ),
                ));
            }
            HostRule {
                names: crate::host_check::with_machine_name(names),
                check: HostCheck::All,
            }
        }
        // Reachable from the network without authentication: a page rebound to the
        // listener's LAN address reaches it from inside the network too.
        None if exposed && !has_auth => HostRule {
            check: HostCheck::AllBrowsers,
            ..HostRule::local()
        },
        None => HostRule::local(),
    };
    Ok(ListenerSpec {
        addr,
        tls,
        allow,
        deny,
        insecure: exposed && l.allow_insecure && (l.tls.is_none() || !has_auth),
        max_connections: l.max_connections,
        max_connections_per_client: l.max_connections_per_client,
        trusted_proxies,
        forwarded_header,
        hosts,
    })
}

fn resolve(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

fn backend(b: &BackendEntry) -> Result<BackendSpec, Invalid> {
    let uri: http::Uri = b.url.parse().map_err(|e| {
        (
            ".url".to_string(),
            format!(
                "{:?} is not a URL ({e}); write it like http://127.0.0.1:11434",
                b.url
            ),
        )
    })?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err((
                ".url".into(),
                format!("scheme {other:?} is not supported for backends yet; use http://"),
            ))
        }
        None => {
            return Err((
                ".url".into(),
                format!(
                    "{:?} has no scheme; write it like http://127.0.0.1:11434",
                    b.url
                ),
            ))
        }
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err((
            ".url".into(),
            format!("{:?} has a path; give only scheme, host and port: the client's path is forwarded as is", b.url),
        ));
    }
    // A user and password in the URL were dropped without a word: the backend answered 401
    // to every request.
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err((
            ".url".into(),
            "has a user name or password, which the gateway does not send to backends; give only scheme, host and port, and put the model server behind no password of its own (bind it to loopback or a private network)".into(),
        ));
    }
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    // A name with both kinds of address takes its IPv4 one: model servers usually listen on
    // IPv4 only (Ollama on 127.0.0.1), and `localhost` resolves to `::1` first on most systems.
    let addr = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|it| {
            let all: Vec<_> = it.collect();
            all.iter().find(|a| a.is_ipv4()).or(all.first()).copied()
        })
        .ok_or_else(|| {
            (
                ".url".to_string(),
                format!("cannot resolve host {host:?}; check the name or use an IP address"),
            )
        })?;
    let authority = match uri.port_u16() {
        Some(p) => format!("{}:{p}", uri.host().unwrap_or_default()),
        None => uri.host().unwrap_or_default().to_string(),
    };
    let name = b.name.clone().unwrap_or_else(|| format!("{host}:{port}"));
    if name.is_empty() {
        return Err((".name".into(), "must not be empty".into()));
    }
    if b.weight == 0 {
        return Err((".weight".into(), "must be at least 1".into()));
    }
    if b.max_in_flight == Some(0) {
        return Err((".max_in_flight".into(), "must be at least 1".into()));
    }
    if b.first_byte_timeout.is_some_and(|d| d.0.is_zero()) {
        return Err((
            ".first_byte_timeout".into(),
            "must be greater than 0: every streamed request would fail (leave it out for routing.first_byte_timeout)".into(),
        ));
    }
    Ok(BackendSpec {
        name: name.into(),
        kind: b.kind,
        weight: b.weight,
        max_in_flight: b.max_in_flight,
        first_byte_timeout: b.first_byte_timeout.map(|d| d.0),
        models: b.models.clone(),
        addr,
        authority,
    })
}

fn filter_spec(i: usize, v: serde_norway::Value) -> Result<FilterSpec, Invalid> {
    let at = format!("filters[{i}]");
    let serde_norway::Value::Mapping(mut map) = v else {
        return Err((
            at,
            "each filter is a mapping with `use: NAME` and that filter's options".into(),
        ));
    };
    let name = match map.remove("use") {
        Some(serde_norway::Value::String(s)) => s,
        Some(_) => {
            return Err((
                format!("{at}.use"),
                "must be a filter name such as auth or ratelimit".into(),
            ))
        }
        None => return Err((at, "missing `use: NAME` naming the filter".into())),
    };
    let options = serde_json::to_value(serde_norway::Value::Mapping(map))
        .map_err(|e| (at.clone(), format!("options cannot be read: {e}")))?;
    Ok(FilterSpec {
        name,
        yaml_path: at,
        options,
    })
}

#[cfg(test)]
mod forwarded_tests {
    use super::*;

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let l = ListenerSpec {
            addr: "127.0.0.1:8080".parse().unwrap(),
            tls: None,
            allow: Vec::new(),
            deny: Vec::new(),
            insecure: false,
            max_connections: None,
            max_connections_per_client: None,
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            forwarded_header: Default::default(),
            hosts: HostRule::default(),
        };
        let h = |k: &'static str, v: &'static str| {
            let mut m = http::HeaderMap::new();
            m.append(k, http::HeaderValue::from_static(v));
            m
        };
        let lb: IpAddr = "10.0.0.2".parse().unwrap();
        // A spoofed first hop is not taken: the rightmost untrusted one is the client.
        let xff = h("x-forwarded-for", "6.6.6.6, 203.0.113.5, 10.0.0.9");
        assert_eq!(
            l.forwarded_client(lb, &xff),
            Some("203.0.113.5".parse().unwrap())
        );
        let fwd = h("forwarded", "for=\"[2001:db8::7]:4711\";proto=https");
        assert_eq!(
            l.forwarded_client(lb, &fwd),
            Some("2001:db8::7".parse().unwrap())
        );
        // From an untrusted peer the headers mean nothing.
        let peer: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(l.forwarded_client(peer, &xff), None);
        // A hop that cannot be read where the client's should be: the proxy's own address.
        let bad = h("x-forwarded-for", "not-an-ip");
        assert_eq!(l.forwarded_client(lb, &bad), None);
        // What a client writes to the left of the hop its proxy adds is never read: junk, an
        // unknown, bytes that are not text, do not make it count as the proxy (which would
        // lock out everyone behind it) nor choose its address.
        let client: IpAddr = "198.51.100.7".parse().unwrap();
        for xff in [
            &b"junk, 198.51.100.7"[..],
            b"unknown,198.51.100.7",
            b"\xff\xfe, 198.51.100.7",
            b"6.6.6.6:80, 198.51.100.7, 10.0.0.9",
        ] {
            let mut m = http::HeaderMap::new();
            m.insert(
                "x-forwarded-for",
                http::HeaderValue::from_bytes(xff).unwrap(),
            );
            assert_eq!(l.forwarded_client(lb, &m), Some(client), "{xff:?}");
        }
        let fwd = h(
            "forwarded",
            "for=unknown, for=_hidden;proto=http, for=198.51.100.7",
        );
        assert_eq!(l.forwarded_client(lb, &fwd), Some(client));
        // A listener told which header its proxies write reads only that one: what a client
        // sent in the other (passed on by the proxy) is not its address.
        let mut both = h("x-forwarded-for", "203.0.113.66");
        both.insert("forwarded", "for=198.51.100.7".parse().unwrap());
        let only = |which| ListenerSpec {
            forwarded_header: which,
            ..l.clone()
        };
        assert_eq!(
            only(ForwardedHeader::Forwarded).forwarded_client(lb, &both),
            Some(client)
        );
        assert_eq!(
            only(ForwardedHeader::XForwardedFor).forwarded_client(lb, &fwd),
            None
        );
        assert_eq!(
            l.forwarded_client(lb, &both),
            Some("203.0.113.66".parse().unwrap()),
            "unset: X-Forwarded-For first"
        );
        // Ports (as some load balancers add them) and IPv4-mapped forms.
        for xff in [
            "198.51.100.7:4711",
            "[::ffff:198.51.100.7]:80",
            "::ffff:198.51.100.7",
        ] {
            assert_eq!(
                l.forwarded_client(lb, &h("x-forwarded-for", xff)),
                Some(client),
                "{xff}"
            );
        }
    }
}
