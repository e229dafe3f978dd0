//! The config file's format, as serde reads it. Validation and conversion to the running
//! model ([`super::Settings`]) happen in `settings.rs`, so format and model stay apart.

use serde::Deserialize;

use gateway_filter::units::{HumanDuration, HumanSize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Public listeners; `127.0.0.1:8080` when absent.
    pub listen: Option<Vec<ListenEntry>>,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub backends: Vec<BackendEntry>,
    #[serde(default)]
    pub routing: RoutingSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub server: ServerSection,
    /// `none` removes the built-in default policy from a chain that has no `policy` filter.
    pub policy: Option<PolicyDefault>,
    /// Each entry is `use: NAME` plus that filter's options; read by the chain builder.
    #[serde(default)]
    pub filters: Vec<serde_norway::Value>,
    /// OpenTelemetry export; off when absent.
    #[serde(default)]
    pub telemetry: super::telemetry::TelemetrySection,
    /// Shared state for several replicas; local when absent.
    #[serde(default)]
    pub state: super::state::StateSection,
}

/// The admin listener: `/metrics` and `/health`, never on a public listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    pub enabled: bool,
    pub addr: String,
    /// Bearer token for `/admin/*`; required when `addr` is not loopback.
    pub token: Option<String>,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            enabled: true,
            addr: "127.0.0.1:9091".into(),
            token: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Label request and token counters with the principal id (else `any`).
    pub principal_label: bool,
    /// Distinct model label values; later models are counted as `other`.
    pub max_models: usize,
    /// Distinct principal label values named from outside the config (JWT subjects,
    /// forward-auth answers, trusted headers, certificates); later ones count as `other`.
    pub max_principals: usize,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            principal_label: true,
            max_models: 100,
            max_principals: 1000,
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PolicyDefault {
    /// Add the built-in policy when the chain has none (the default).
    Default,
    /// No policy at all: every route and model is reachable.
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenEntry {
    pub addr: String,
    pub tls: Option<TlsEntry>,
    /// Only these client networks may connect (empty = all).
    #[serde(default)]
    pub allow_cidrs: Vec<String>,
    /// These client networks may not connect (checked after `allow_cidrs`).
    #[serde(default)]
    pub deny_cidrs: Vec<String>,
    /// Accept a network-reachable listener without TLS or without an auth filter.
    #[serde(default)]
    pub allow_insecure: bool,
    /// Proxies in front (load balancer, `tailscale serve`): only for connections from these
    /// networks is the client address taken from `X-Forwarded-For` / `Forwarded`.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Which header those proxies write: `x-forwarded-for` or `forwarded` (absent: the first,
    /// else the second).
    pub forwarded_header: Option<String>,
    /// Most client connections open at once on this listener (nginx `worker_connections`).
    pub max_connections: Option<usize>,
    /// Most connections open at once from one client address (IPv6: one
    /// `limits.ipv6_prefix` network), as nginx's `limit_conn`.
    pub max_connections_per_client: Option<u32>,
    /// Host names requests may name besides local ones (`*`: any); checked by default on
    /// loopback listeners only (DNS rebinding).
    pub allowed_hosts: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsEntry {
    /// PEM certificate chain.
    pub cert: String,
    /// PEM private key.
    pub key: String,
    /// PEM CA bundle: when set, clients must present a certificate it signed.
    pub client_ca: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Ollama,
    Openai,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Ollama => "ollama",
            BackendKind::Openai => "openai",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendEntry {
    /// Shown in /health, errors and logs; defaults to `host:port` of the URL.
    pub name: Option<String>,
    pub url: String,
    pub kind: BackendKind,
    /// Relative share of traffic (default 1).
    #[serde(default = "one")]
    pub weight: u32,
    /// Requests the backend takes at once (e.g. Ollama's OLLAMA_NUM_PARALLEL).
    pub max_in_flight: Option<u32>,
    /// Pinned model list; discovery is not used for this backend's models.
    pub models: Option<Vec<String>>,
    /// This backend's first-byte deadline (overrides `routing.first_byte_timeout`).
    pub first_byte_timeout: Option<HumanDuration>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    Usage,
    LeastBusy,
    Latency,
    RoundRobin,
    Random,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingSection {
    pub strategy: Strategy,
    /// Strategy per model glob, e.g. `{ "llama3.1:70b*": least-busy }`.
    pub per_model: std::collections::BTreeMap<String, Strategy>,
    /// Extra attempts on other backends before anything reached the client.
    pub retries: u32,
    /// No response byte within this: the attempt is abandoned and the request moves to
    /// another backend (off when absent).
    pub first_byte_timeout: Option<HumanDuration>,
    /// The first-byte deadline when the model is not loaded on the backend (`/api/ps`): a
    /// cold load is expected, not a failure.
    pub cold_start_timeout: HumanDuration,
    /// While an OpenAI stream waits for its first byte, send the response headers and an SSE
    /// comment (`: keep-alive`) this often, so proxies in front do not cut it (off when absent).
    pub sse_keepalive: Option<HumanDuration>,
    pub fail_threshold: u32,
    pub cooldown: HumanDuration,
    pub cooldown_max: HumanDuration,
    /// Latency strategy: pick among backends within this fraction of the fastest.
    pub latency_tolerance: f64,
    /// Residency: a backend with the model loaded is preferred while it has fewer than this
    /// many requests in flight.
    pub residency_max_in_flight: u32,
    pub queue: QueueSection,
    pub discovery: PollSection,
    pub health: PollSection,
}

impl Default for RoutingSection {
    fn default() -> Self {
        use std::time::Duration;
        RoutingSection {
            strategy: Strategy::Usage,
            per_model: Default::default(),
            retries: 2,
            first_byte_timeout: None,
            cold_start_timeout: HumanDuration(Duration::from_secs(300)),
            sse_keepalive: None,
            fail_threshold: 3,
            cooldown: HumanDuration(Duration::from_secs(10)),
            cooldown_max: HumanDuration(Duration::from_secs(300)),
            latency_tolerance: 0.2,
            residency_max_in_flight: 4,
            queue: QueueSection::default(),
            discovery: PollSection {
                enabled: true,
                interval: None,
                timeout: HumanDuration(Duration::from_secs(2)),
            },
            health: PollSection {
                enabled: true,
                interval: None,
                timeout: HumanDuration(Duration::from_secs(2)),
            },
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSection {
    /// Requests that may wait for a free backend when all are at max_in_flight.
    pub size: usize,
    pub timeout: HumanDuration,
}

impl Default for QueueSection {
    fn default() -> Self {
        QueueSection {
            size: 100,
            timeout: HumanDuration(std::time::Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Default per section: 10 s for discovery, 5 s for health probes.
    pub interval: Option<HumanDuration>,
    #[serde(default = "two_seconds")]
    pub timeout: HumanDuration,
}

impl Default for PollSection {
    fn default() -> Self {
        PollSection {
            enabled: true,
            interval: None,
            timeout: two_seconds(),
        }
    }
}

fn yes() -> bool {
    true
}

fn two_seconds() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(2))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub max_body: HumanSize,
    pub connect_timeout: HumanDuration,
    pub read_timeout: HumanDuration,
    pub send_timeout: HumanDuration,
    /// How long a client may take to send its request body.
    pub client_body_timeout: HumanDuration,
    /// How long a client may take to send a whole request head (nginx
    /// `client_header_timeout`): a slow drip of header bytes is cut off.
    pub client_header_timeout: HumanDuration,
    /// How long a write to a client may wait for it to read (nginx `send_timeout`): a client
    /// that stops reading a stream frees its backend slot when it fires.
    pub client_send_timeout: HumanDuration,
    /// How long an idle keep-alive connection is kept for its next request (nginx
    /// `keepalive_timeout`).
    pub keepalive_timeout: HumanDuration,
    /// Requests served on one connection before it is closed (nginx `keepalive_requests`).
    pub keepalive_requests: u32,
    /// IPv6 clients are counted by this prefix for address limits and lockout: one host
    /// usually holds a whole /64.
    pub ipv6_prefix: u8,
}

impl Default for LimitsSection {
    fn default() -> Self {
        use std::time::Duration;
        LimitsSection {
            max_body: HumanSize(1 << 20),
            connect_timeout: HumanDuration(Duration::from_secs(10)),
            read_timeout: HumanDuration(Duration::from_secs(120)),
            send_timeout: HumanDuration(Duration::from_secs(60)),
            client_body_timeout: HumanDuration(Duration::from_secs(30)),
            client_header_timeout: HumanDuration(Duration::from_secs(60)),
            client_send_timeout: HumanDuration(Duration::from_secs(60)),
            keepalive_timeout: HumanDuration(Duration::from_secs(75)),
            keepalive_requests: 1000,
            ipv6_prefix: 64,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Proxy worker threads; defaults to the number of CPUs.
    pub threads: Option<usize>,
    /// On SIGTERM, how long in-flight requests may take to finish.
    pub drain_timeout: HumanDuration,
    /// Unix socket through which a running gateway hands its listening sockets to the one
    /// started with `--upgrade`; both must name the same path.
    pub upgrade_sock: Option<String>,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            threads: None,
            drain_timeout: HumanDuration(std::time::Duration::from_secs(10)),
            upgrade_sock: None,
        }
    }
}
