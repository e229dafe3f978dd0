//! `state:`: where limits, leases, lockout counts, backend slots and live spend live. `local`
//! (the default) keeps them in this process; `redis` shares them with the other replicas
//! through Redis or Valkey.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gateway_filter::units::HumanDuration;
use serde::Deserialize;

use super::settings::Invalid;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSection {
    #[serde(default)]
    pub backend: StateBackend,
    /// `redis://[:PASSWORD@]HOST:PORT/DB`, `rediss://` for TLS, `valkey://`/`valkeys://` too;
    /// `unix:///PATH/redis.sock?db=DB` (or `redis+unix://`, `valkey+unix://`) for a server on
    /// this host's Unix socket.
    pub url: Option<String>,
    /// Overrides a password in the URL (write it as `${REDIS_PASSWORD}`).
    pub password: Option<String>,
    /// Prepended to every key, so several gateways can share one Redis.
    pub prefix: Option<String>,
    /// How long one call may take before the request goes on without it.
    pub timeout: Option<HumanDuration>,
    /// How long connecting may take (at start and on reconnect).
    pub connect_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub on_error: OnError,
    /// How long a hold (in-flight slot, budget reservation) outlives a replica that died.
    pub lease_ttl: Option<HumanDuration>,
    /// Failed calls in a row that open the circuit.
    pub breaker_failures: Option<u32>,
    /// How often an open circuit tries the server again.
    pub breaker_retry: Option<HumanDuration>,
    /// PEM CA certificate(s) trusted for `rediss://` besides the system's roots.
    pub ca_file: Option<String>,
    /// How long a settlement (tokens, spend) waits to be sent together with others on the
    /// same keys; 0 sends each at once.
    pub settle_window: Option<HumanDuration>,
    /// Requests' worth of a limit a replica takes ahead while the limit is far off (0: every
    /// request asks the server).
    pub chunk: Option<u64>,
    /// How long a chunk serves before what it has left is given back.
    pub chunk_life: Option<HumanDuration>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    #[default]
    Local,
    Redis,
}

/// What a request meets when shared state is out of reach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// This replica's own limits, with the same settings (warned once per change).
    #[default]
    Local,
    /// 503 JSON: fail closed.
    Reject,
}

/// Validated `state:` for `backend: redis`.
#[derive(Debug, Clone)]
pub struct StateSpec {
    pub url: String,
    pub password: Option<String>,
    pub prefix: String,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub on_error: OnError,
    pub lease_ttl: Duration,
    pub breaker_failures: u32,
    pub breaker_retry: Duration,
    pub ca_file: Option<PathBuf>,
    pub settle_window: Duration,
    /// `None`: chunks off (`chunk: 0`).
    pub chunk: Option<gateway_filter::chunk::ChunkSpec>,
}

pub fn build(s: StateSection, config_dir: &Path) -> Result<Option<StateSpec>, Invalid> {
    let bad = |key: &str, msg: &str| Err((format!("state.{key}"), msg.to_string()));
    if s.backend == StateBackend::Local {
        if s.url.is_some() {
            return bad(
                "url",
                "is used only with `backend: redis`; add it, or remove the url",
            );
        }
        // Settings of a shared state that is not there: an operator who set them believes
        // replicas share limits.
        let set = [
            ("password", s.password.is_some()),
            ("prefix", s.prefix.is_some()),
            ("timeout", s.timeout.is_some()),
            ("connect_timeout", s.connect_timeout.is_some()),
            ("on_error", s.on_error != OnError::Local),
            ("lease_ttl", s.lease_ttl.is_some()),
            ("breaker_failures", s.breaker_failures.is_some()),
            ("breaker_retry", s.breaker_retry.is_some()),
            ("ca_file", s.ca_file.is_some()),
            ("settle_window", s.settle_window.is_some()),
            ("chunk", s.chunk.is_some()),
            ("chunk_life", s.chunk_life.is_some()),
        ];
        if let Some((key, _)) = set.iter().find(|(_, set)| *set) {
            return bad(
                key,
                "is used only with `backend: redis` (and `url:`); without them every replica keeps its own limits: add them, or remove this setting",
            );
        }
        return Ok(None);
    }
    let Some(url) = s.url.filter(|u| !u.trim().is_empty()) else {
        return bad(
            "url",
            "`backend: redis` needs the server, e.g. url: redis://127.0.0.1:6379/0",
        );
    };
    let scheme = url.split("://").next().unwrap_or_default();
    let unix = matches!(scheme, "unix" | "redis+unix" | "valkey+unix");
    if !(unix || matches!(scheme, "redis" | "rediss" | "valkey" | "valkeys"))
        || !url.contains("://")
    {
        return bad(
            "url",
            "write it as redis://HOST:PORT/DB (rediss:// for TLS, unix:///PATH/redis.sock?db=DB for a Unix socket; valkey:// and valkeys:// work too)",
        );
    }
    if unix && !url[scheme.len() + 3..].starts_with('/') {
        return bad(
            "url",
            "a Unix socket is named by its absolute path after unix://, such as unix:///run/redis/redis-server.sock?db=0",
        );
    }
    // The client ignores what it does not know (`?password=` connected without one), and
    // logs show the query masked: a misspelt name would go unseen.
    if unix {
        let query = url.split_once('?').map_or("", |(_, q)| q);
        let unknown = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').map_or(p, |(k, _)| k))
            .find(|k| !matches!(*k, "db" | "user" | "pass" | "protocol"));
        if unknown.is_some() {
            // Not named: it may be a secret written without its `pass=`.
            return bad(
                "url",
                "has a query parameter a Unix socket URL does not take: only db, user, pass and protocol (or give the password with `password:`)",
            );
        }
    }
    if url.contains('#') {
        return bad(
            "url",
            "must not end in a #fragment (#insecure, which skips the certificate check, is not supported: give the server's CA with ca_file)",
        );
    }
    if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
        return bad(
            "url",
            &format!("cannot be read ({e}); write it as redis://HOST:PORT/DB, such as redis://127.0.0.1:6379/0, or unix:///PATH/redis.sock?db=0"),
        );
    }
    let tls = matches!(scheme, "rediss" | "valkeys");
    if s.ca_file.is_some() && !tls {
        return bad("ca_file", "is used only with a rediss:// or valkeys:// url");
    }
    let ca_file = s.ca_file.map(|f| {
        let p = PathBuf::from(f);
        if p.is_absolute() {
            p
        } else {
            config_dir.join(p)
        }
    });
    if let Some(ca) = &ca_file {
        if let Err(e) = std::fs::read(ca) {
            return bad("ca_file", &format!("cannot read {}: {e}", ca.display()));
        }
    }
    let ms =
        |d: Option<HumanDuration>, default: u64| d.map_or(Duration::from_millis(default), |d| d.0);
    let timeout = ms(s.timeout, 20);
    if timeout.is_zero() || timeout > Duration::from_secs(5) {
        return bad(
            "timeout",
            "from 1ms to 5s (a request waits this long at most for each shared check), such as 20ms",
        );
    }
    let connect_timeout = ms(s.connect_timeout, 1000);
    if connect_timeout.is_zero() {
        return bad("connect_timeout", "must be more than 0, such as 1s");
    }
    let lease_ttl = ms(s.lease_ttl, 30_000);
    if lease_ttl < Duration::from_millis(300) {
        return bad(
            "lease_ttl",
            "at least 300ms (holds are renewed every third of it), such as 30s",
        );
    }
    let breaker_failures = s.breaker_failures.unwrap_or(3);
    if breaker_failures == 0 {
        return bad("breaker_failures", "at least 1, such as 3");
    }
    let breaker_retry = ms(s.breaker_retry, 500);
    if breaker_retry.is_zero() {
        return bad("breaker_retry", "must be more than 0, such as 500ms");
    }
    let settle_window = ms(s.settle_window, 5);
    if settle_window > Duration::from_secs(1) {
        return bad(
            "settle_window",
            "at most 1s (what requests give back stays held this long), such as 5ms",
        );
    }
    // A finished request's holds are renewed no more: they must still be there when its
    // settlement arrives, or its spend would be counted nowhere in between.
    if settle_window > lease_ttl / 3 {
        return bad(
            "settle_window",
            "at most a third of lease_ttl (a finished request's reservations must outlive the wait), such as 5ms",
        );
    }
    let chunk = s.chunk.unwrap_or(64);
    if chunk > 10_000 {
        return bad(
            "chunk",
            "at most 10000 requests' worth (0 turns chunks off: every request asks the server), such as 64",
        );
    }
    let chunk_life = ms(s.chunk_life, 50);
    if chunk_life.is_zero() || chunk_life > Duration::from_secs(1) || chunk_life > lease_ttl / 3 {
        return bad(
            "chunk_life",
            "from 1ms to 1s and at most a third of lease_ttl (a chunk's unused part is given back after it), such as 50ms",
        );
    }
    let prefix = s.prefix.unwrap_or_else(|| "llm-gateway:".into());
    if prefix.contains(['{', '}']) {
        return bad(
            "prefix",
            "must not contain { or } (they mark Redis Cluster hash tags)",
        );
    }
    Ok(Some(StateSpec {
        url,
        password: s.password.filter(|p| !p.is_empty()),
        prefix,
        timeout,
        connect_timeout,
        on_error: s.on_error,
        lease_ttl,
        breaker_failures,
        breaker_retry,
        ca_file,
        settle_window,
        chunk: (chunk > 0).then_some(gateway_filter::chunk::ChunkSpec {
            requests: chunk,
            life: chunk_life,
        }),
    }))
}
