//! Loading `gateway.yaml`: read, parse, interpolate `${VAR}`, deserialize with the path of any
//! bad key, validate into [`Settings`]. Every error names the file, the YAML path and a fix.
//!
//! The YAML parser is `serde_norway`, the maintained successor of the archived `serde_yaml`.

mod file;
mod interpolate;
mod settings;
mod state;
mod telemetry;

use std::path::{Path, PathBuf};

pub use file::{BackendKind, Strategy};
pub use settings::{
    by_local_addr, BackendSpec, FilterSpec, Limits, ListenerSpec, RoutingSpec, Settings, TlsSpec,
};
pub use state::{OnError, StateSpec};
pub use telemetry::{OtlpProtocol, TelemetrySpec};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the config file: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: not valid YAML: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: {path}: {message}")]
    Invalid {
        file: String,
        path: String,
        message: String,
    },
}

impl ConfigError {
    pub fn invalid(file: &Path, path: impl Into<String>, message: impl Into<String>) -> Self {
        let path = path.into();
        ConfigError::Invalid {
            file: file.display().to_string(),
            path: if path.is_empty() {
                "(top level)".into()
            } else {
                path
            },
            message: message.into(),
        }
    }
}

/// Reads and validates a config file, taking `${VAR}` values from the process environment.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.display().to_string(),
        source,
    })?;
    parse(path, &text, &|name| std::env::var(name).ok())
}

/// Applies YAML merge keys (`<<: *common`), which operators use to share a filter's
/// settings. A merged mapping may merge another in turn (serde_norway merges one level a
/// pass): passes repeat while a `<<` is left, as deep as anchors can nest in a config.
fn merge_keys(tree: &mut serde_norway::Value) -> Result<(), String> {
    fn has_merge(v: &serde_norway::Value) -> bool {
        match v {
            serde_norway::Value::Mapping(m) => m.contains_key("<<") || m.values().any(has_merge),
            serde_norway::Value::Sequence(s) => s.iter().any(has_merge),
            serde_norway::Value::Tagged(t) => has_merge(&t.value),
            _ => false,
        }
    }
    for _ in 0..16 {
        if !has_merge(tree) {
            return Ok(());
        }
        tree.apply_merge().map_err(|e| {
            format!("a merge key (`<<`): {e}; it takes an anchored mapping (`<<: *common`) or a list of them")
        })?;
    }
    Err("merge keys (`<<`) nest more than 16 deep".into())
}

/// Parses config text; `path` is only used in messages and to resolve relative paths.
pub fn parse(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, ConfigError> {
    let file = path.display().to_string();
    let mut tree: serde_norway::Value =
        serde_norway::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.clone(),
            message: e.to_string(),
        })?;
    if tree.is_null() {
        tree = serde_norway::Value::Mapping(Default::default());
    }
    merge_keys(&mut tree).map_err(|message| ConfigError::Syntax {
        file: file.clone(),
        message,
    })?;
    interpolate::interpolate(&mut tree, &mut String::new(), env)
        .map_err(|(p, m)| ConfigError::invalid(path, p, m))?;
    let cfg: file::FileConfig = serde_path_to_error::deserialize(tree).map_err(|e| {
        let p = e.path().to_string();
        ConfigError::invalid(
            path,
            if p == "." { String::new() } else { p },
            e.into_inner().to_string(),
        )
    })?;
    settings::build(PathBuf::from(path), cfg).map_err(|(p, m)| ConfigError::invalid(path, p, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Settings, ConfigError> {
        parse(Path::new("gw.yaml"), text, &|n| {
            (n == "PORT").then(|| "9000".to_string())
        })
    }

    #[test]
    fn defaults() {
        let s = parse_str("").unwrap();
        assert_eq!(s.listen[0].addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.limits.max_body, 1 << 20);
        assert_eq!(s.limits.read_timeout, std::time::Duration::from_secs(120));
        assert_eq!(s.drain_timeout, std::time::Duration::from_secs(10));
    }

    #[test]
    fn full_example() {
        let s = parse_str(
            "listen:\n  - addr: 127.0.0.1:${PORT}\nbackends:\n  - { name: a, url: 'http://localhost:11434', kind: ollama }\n  - { url: 'http://127.0.0.1:8000', kind: openai }\nlimits: { max_body: 2MiB, connect_timeout: 1s }\nfilters:\n  - use: thing\n    rate: 10/m\n",
        )
        .unwrap();
        assert_eq!(s.listen[0].addr.port(), 9000);
        assert_eq!(&*s.backends[0].name, "a");
        assert_eq!(s.backends[0].authority, "localhost:11434");
        assert_eq!(&*s.backends[1].name, "127.0.0.1:8000");
        assert_eq!(s.limits.max_body, 2 << 20);
        assert_eq!(s.filters[0].name, "thing");
        assert_eq!(s.filters[0].options["rate"], "10/m");
    }

    #[test]
    fn shared_state_section() {
        assert!(parse_str("").unwrap().state.is_none(), "local by default");
        let s = parse_str(
            "state: { backend: redis, url: 'redis://10.0.0.5:6379/1', password: pw, timeout: 15ms, on_error: reject }\n",
        )
        .unwrap()
        .state
        .unwrap();
        assert_eq!(s.timeout, std::time::Duration::from_millis(15));
        assert_eq!(s.on_error, OnError::Reject);
        assert_eq!(s.prefix, "llm-gateway:");
        assert_eq!(s.lease_ttl, std::time::Duration::from_secs(30));
        assert_eq!(s.settle_window, std::time::Duration::from_millis(5));
        let unix = "state: { backend: redis, url: 'unix:///run/redis/redis.sock?db=2' }\n";
        assert_eq!(
            parse_str(unix).unwrap().state.unwrap().url,
            "unix:///run/redis/redis.sock?db=2"
        );
        for (yaml, path, hint) in [
            (
                "state: { backend: redis, url: 'unix://redis.sock' }",
                "state.url",
                "absolute path",
            ),
            (
                "state: { backend: redis, url: 'unix:///run/redis.sock?db=1&password=x' }",
                "state.url",
                "only db, user, pass and protocol",
            ),
            (
                "state: { backend: redis, url: 'unix:///run/redis.sock', ca_file: ca.pem }",
                "state.ca_file",
                "rediss://",
            ),
            ("state: { backend: redis }", "state.url", "redis://"),
            (
                "state: { backend: redis, url: 'http://x:6379' }",
                "state.url",
                "rediss://",
            ),
            ("state: { url: 'redis://x' }", "state.url", "backend: redis"),
            (
                "state: { backend: redis, url: 'redis://x:99999/0' }",
                "state.url",
                "cannot be read",
            ),
            (
                "state: { backend: redis, url: 'rediss://x:6380/#insecure' }",
                "state.url",
                "ca_file",
            ),
            (
                "state: { backend: redis, url: 'redis://x', timeout: 10s }",
                "state.timeout",
                "5s",
            ),
            (
                "state: { backend: redis, url: 'redis://x', prefix: 'a{b}' }",
                "state.prefix",
                "hash tags",
            ),
            (
                "state: { backend: redis, url: 'redis://x', ca_file: ca.pem }",
                "state.ca_file",
                "rediss://",
            ),
            ("state: { backend: memcached }", "state.backend", "redis"),
            (
                "state: { backend: redis, url: 'redis://x', lease_ttl: 10ms }",
                "state.lease_ttl",
                "300ms",
            ),
            (
                "state: { backend: redis, url: 'redis://x', settle_window: 2s }",
                "state.settle_window",
                "at most 1s",
            ),
            (
                "state: { backend: redis, url: 'redis://x', lease_ttl: 900ms, settle_window: 400ms }",
                "state.settle_window",
                "a third of lease_ttl",
            ),
            (
                "state: { backend: redis, url: 'redis://x', chunk: 20000 }",
                "state.chunk",
                "at most 10000",
            ),
            (
                "state: { backend: redis, url: 'redis://x', chunk_life: 0s }",
                "state.chunk_life",
                "from 1ms",
            ),
            (
                "state: { backend: redis, url: 'redis://x', lease_ttl: 300ms, chunk_life: 200ms }",
                "state.chunk_life",
                "a third of lease_ttl",
            ),
            ("state: { chunk: 8 }", "state.chunk", "backend: redis"),
        ] {
            let e = parse_str(yaml).unwrap_err().to_string();
            assert!(e.contains(path) && e.contains(hint), "{yaml}: {e}");
        }
    }

    #[test]
    fn network_listeners() {
        let s = parse_str("listen: [ { addr: '0.0.0.0:8080', allow_insecure: true, allow_cidrs: [10.0.0.0/8, '::1'], deny_cidrs: [10.0.0.7] } ]\n").unwrap();
        let l = &s.listen[0];
        assert!(l.insecure);
        assert!(l.admits(&"10.1.2.3".parse().unwrap()));
        assert!(!l.admits(&"10.0.0.7".parse().unwrap()));
        assert!(!l.admits(&"192.168.0.1".parse().unwrap()));
        assert!(l.admits(&"::1".parse().unwrap()));
        assert!(
            l.admits(&"::ffff:10.1.2.3".parse().unwrap()),
            "v4-mapped addresses match v4 rules"
        );
        // Rules written in the mapped form are IPv4 rules too (a deny entry denied nobody).
        let s = parse_str("listen: [ { addr: '[::]:8080', allow_insecure: true, allow_cidrs: ['::ffff:10.0.0.0/104'], deny_cidrs: ['::ffff:10.0.0.7'], trusted_proxies: ['::ffff:10.9.0.0/112'] } ]\n").unwrap();
        let l = &s.listen[0];
        assert!(l.admits(&"10.1.2.3".parse().unwrap()));
        assert!(!l.admits(&"10.0.0.7".parse().unwrap()));
        assert!(!l.admits(&"::ffff:10.0.0.7".parse().unwrap()));
        assert!(!l.admits(&"192.168.0.1".parse().unwrap()));
        assert_eq!(
            l.trusted_proxies,
            ["10.9.0.0/16".parse::<ipnet::IpNet>().unwrap()]
        );
    }

    #[test]
    fn a_port_is_listened_on_once() {
        for (a, b) in [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("127.0.0.1:8080", "0.0.0.0:8080"),
            ("'[::]:8080'", "127.0.0.1:8080"),
            ("'[::ffff:127.0.0.1]:8080'", "127.0.0.1:8080"),
            ("'[::ffff:0.0.0.0]:8080'", "127.0.0.1:8080"),
        ] {
            let e = parse_str(&format!(
                "listen: [ {{ addr: {a}, allow_insecure: true }}, {{ addr: {b}, allow_insecure: true }} ]\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("listen[1].addr") && e.contains("overlaps listen[0]"),
                "{a} {b}: {e}"
            );
        }
        // Another port, or a wildcard of the other family only: both fine.
        for (a, b) in [
            ("127.0.0.1:8080", "127.0.0.1:8081"),
            ("0.0.0.0:8080", "'[::1]:8080'"),
        ] {
            parse_str(&format!(
                "listen: [ {{ addr: {a}, allow_insecure: true }}, {{ addr: {b}, allow_insecure: true }} ]\n"
            ))
            .unwrap();
        }
    }

    #[test]
    fn merge_keys_share_settings() {
        let s = parse_str(
            "x-limits: &rl { rate: 10/m, burst: 5 }\nfilters:\n  - use: ratelimit\n    key: ip\n    <<: *rl\n  - use: ratelimit\n    key: ip\n    <<: *rl\n    burst: 2\n",
        );
        // `x-` keys are not config: the anchor has to live somewhere the schema allows.
        let e = s.unwrap_err().to_string();
        assert!(e.contains("unknown field `x-limits`"), "{e}");
        let s = parse_str(
            "filters:\n  - use: ratelimit\n    key: ip\n    <<: &rl { rate: 10/m, burst: 5 }\n  - use: ratelimit\n    key: api_key\n    <<: *rl\n    burst: 2\n",
        )
        .unwrap();
        assert_eq!(s.filters[0].options["burst"], 5);
        assert_eq!(s.filters[1].options["rate"], "10/m");
        assert_eq!(
            s.filters[1].options["burst"], 2,
            "the mapping's own key wins"
        );
        // A merged mapping that merges another in turn.
        let s = parse_str(
            "filters:\n  - use: ratelimit\n    key: ip\n    <<: &base { burst: 5, rate: 1/s }\n  - use: ratelimit\n    key: api_key\n    <<: &rl\n      <<: *base\n      rate: 10/m\n",
        )
        .unwrap();
        assert_eq!(s.filters[1].options["burst"], 5);
        assert_eq!(s.filters[1].options["rate"], "10/m");
        let e = parse_str("filters:\n  - use: ratelimit\n    <<: 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("it takes an anchored mapping"), "{e}");
    }

    #[test]
    fn errors_name_file_path_and_fix() {
        let e = parse_str("limits:\n  max_bdy: 1MiB\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("gw.yaml: limits.max_bdy: unknown field `max_bdy`"),
            "{e}"
        );
        let e = parse_str("backends:\n  - { url: 'ftp://x', kind: ollama }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("backends[0].url") && e.contains("http://"),
            "{e}"
        );
        let e = parse_str("backends:\n  - { url: 'http://x:1', kind: vllm }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("backends[0].kind") && e.contains("ollama"),
            "{e}"
        );
        let e = parse_str("listen:\n  - addr: ${MISSING}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("listen[0].addr") && e.contains("MISSING is not set"),
            "{e}"
        );
        let e = parse_str("limits: { read_timeout: 5 }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("limits.read_timeout") && e.contains("unit"),
            "{e}"
        );
        let e = parse_str("filters:\n  - rate: 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("filters[0]") && e.contains("use"), "{e}");
        let e = parse_str(
            "listen:\n  - { addr: '127.0.0.1:8080', trusted_proxies: [10.0.0.1], forwarded_header: x-real-ip }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("listen[0].forwarded_header") && e.contains("x-forwarded-for or forwarded"),
            "{e}"
        );
        let e = parse_str("listen: [ { addr: '0.0.0.0:8080' } ]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen[0]: 0.0.0.0:8080 is reachable from the network but has no TLS and the chain has no auth filter"), "{e}");
        assert!(e.contains("allow_insecure: true"), "{e}");
        // A token of spaces is no token (it would match an empty `Bearer `).
        let e = parse_str(
            "listen: [ { addr: '127.0.0.1:8080' } ]\nadmin: { addr: '0.0.0.0:9091', token: '   ' }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("admin.token"), "{e}");
        // A guessable one is refused off loopback (the admin listener has no lockout).
        let e = parse_str(
            "listen: [ { addr: '127.0.0.1:8080' } ]\nadmin: { addr: '0.0.0.0:9091', token: admin123 }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("admin.token") && e.contains("at least 16"),
            "{e}"
        );
        assert!(parse_str(
            "listen: [ { addr: '127.0.0.1:8080' } ]\nadmin: { addr: '127.0.0.1:9091', token: admin123 }\n",
        )
        .is_ok());
        let e = parse_str("listen: [ { addr: '127.0.0.1:1', allow_cidrs: [10.0.0.0/33] } ]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen[0].allow_cidrs[0]"), "{e}");
        let e = parse_str(
            "listen: [ { addr: '127.0.0.1:1', allowed_hosts: [gpu.example.com, 'http://x:1'] } ]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("listen[0].allowed_hosts[1]") && e.contains("no port"),
            "{e}"
        );
        // Loopback listeners check a browser's `Host` by default; others do not, unless listed.
        let s = parse_str("listen: [ { addr: '127.0.0.1:1' }, { addr: '0.0.0.0:2', allow_insecure: true }, { addr: '0.0.0.0:3', allow_insecure: true, allowed_hosts: ['*'] } ]\n").unwrap();
        let l = &s.listen;
        assert!(!l[0].hosts.admits("rebind.example", true, true));
        assert!(l[0].hosts.admits("rebind.example", false, true));
        assert!(l[0].hosts.admits("LOCALHOST.:8080", true, true));
        // A network listener without authentication checks browsers on every connection (a
        // page rebound to its LAN address); curl and SDKs are not checked.
        assert!(!l[1].hosts.admits("rebind.example", true, true));
        assert!(!l[1].hosts.admits("rebind.example", true, false));
        assert!(l[1].hosts.admits("rebind.example", false, false));
        assert!(l[1].hosts.admits("192.168.1.5:2", true, false));
        assert!(l[2].hosts.admits("rebind.example", true, true));
        let e = parse_str(
            "listen: [ { addr: '127.0.0.1:1', tls: { cert: /no/c.pem, key: /no/k.pem } } ]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("listen[0].tls.cert: cannot read /no/c.pem"),
            "{e}"
        );
        let e = parse_str("a: [\n").unwrap_err().to_string();
        assert!(e.starts_with("gw.yaml: not valid YAML"), "{e}");
    }
}
