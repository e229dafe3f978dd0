//! The systemd unit.

use std::process::Command;

use crate::support::{conf, BIN};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/llm-gateway.service");

#[test]
fn systemd_unit_is_sandboxed_and_drains_on_stop() {
    let unit = std::fs::read_to_string(UNIT).unwrap();
    for line in [
        "User=llm-gateway",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "StateDirectory=llm-gateway",
        "LogsDirectory=llm-gateway",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Type=notify",
        "NotifyAccess=all",
        "KillSignal=SIGTERM",
    ] {
        assert!(unit.lines().any(|l| l.trim() == line), "missing `{line}`");
    }
    // The stop timeout covers the production example's drain time and the final flush (a
    // SIGKILL in between loses queued audit lines and uncommitted charges).
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim().parse().ok())
        .expect("TimeoutStopSec");
    let production = std::fs::read_to_string(conf("production.yaml")).unwrap();
    let drain: u64 = production
        .lines()
        .find_map(|l| l.trim().strip_prefix("drain_timeout:"))
        .and_then(|v| v.split('#').next()?.trim().strip_suffix('s')?.parse().ok())
        .expect("drain_timeout in production.yaml");
    assert!(
        stop >= drain + 10,
        "TimeoutStopSec={stop}, drain_timeout: {drain}s"
    );
}

/// `systemd-analyze verify` (installed by `tests/bootstrap.sh`) accepts the unit, with
/// ExecStart pointing at the binary just built.
#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(UNIT)
        .unwrap()
        .replace("/usr/bin/llm-gateway", BIN);
    let path = dir.path().join("llm-gateway.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("Unknown key") && !text.contains("Failed to parse"),
        "{text}"
    );
}

/// `systemd-analyze security` (offline: no running systemd needed) rates the unit's sandbox:
/// 1.9 ("OK") when measured; what is left open is what a network proxy needs (see
/// docs/operations.md).
#[test]
fn systemd_security_exposure_stays_low() {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager", UNIT])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let score: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("→ Overall exposure level for llm-gateway.service: "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(score <= 2.5, "exposure {score}:\n{text}");
}

const DOCKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docker");

fn yaml(path: &str) -> serde_norway::Value {
    serde_norway::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The compose file parses, every file it mounts is in the repository, Ollama is reachable
/// only through the gateway, published ports are on loopback, the GPU is reserved.
#[test]
fn compose_file_mounts_only_what_the_repository_has() {
    let compose = yaml(&format!("{DOCKER}/compose.yaml"));
    let services = compose["services"].as_mapping().expect("services");
    for name in ["ollama", "gateway", "prometheus", "grafana"] {
        assert!(
            services.contains_key(serde_norway::Value::from(name)),
            "{name}"
        );
    }
    let mut mounted = 0;
    for (name, service) in services {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with('.') {
                let path = std::path::Path::new(DOCKER).join(source);
                assert!(
                    path.exists(),
                    "{name:?} mounts {source}, which is not in the repository"
                );
                mounted += 1;
            }
        }
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let port = port.as_str().unwrap();
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name:?} publishes {port} beyond loopback"
            );
        }
    }
    assert_eq!(mounted, 11, "bind mounts from the repository");
    let ollama = &compose["services"]["ollama"];
    assert!(ollama["ports"].is_null(), "Ollama must not be published");
    // Ollama's only network is internal and shared with the gateway alone.
    assert_eq!(ollama["networks"][0].as_str(), Some("models"));
    assert_eq!(ollama["networks"].as_sequence().map(Vec::len), Some(1));
    assert_eq!(
        compose["networks"]["models"]["internal"].as_bool(),
        Some(true)
    );
    for (name, service) in services {
        let on_models = service["networks"]
            .as_sequence()
            .is_some_and(|n| n.iter().any(|n| n.as_str() == Some("models")));
        let name = name.as_str().unwrap();
        assert_eq!(
            on_models,
            name == "ollama" || name.starts_with("gateway"),
            "{name}"
        );
    }
    let device = &ollama["deploy"]["resources"]["reservations"]["devices"][0];
    assert_eq!(device["driver"].as_str(), Some("nvidia"));
    assert_eq!(device["capabilities"][0].as_str(), Some("gpu"));
    // Prometheus scrapes the admin listener on the gateway's loopback.
    assert_eq!(
        compose["services"]["prometheus"]["network_mode"].as_str(),
        Some("service:gateway")
    );
}

/// The gateway config compose mounts passes `check` (with the compose network's `ollama`
/// host name, which only resolves inside compose, replaced by an address), and names no
/// key: the keys file ships empty.
#[test]
fn compose_gateway_config_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(format!("{DOCKER}/gateway.yaml"))
        .unwrap()
        .replace("http://ollama:11434", "http://127.0.0.1:11434");
    std::fs::write(dir.path().join("gateway.yaml"), config).unwrap();
    std::fs::copy(format!("{DOCKER}/keys.yaml"), dir.path().join("keys.yaml")).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(dir.path().join("gateway.yaml"))
        .env("LLM_GATEWAY_STATE", dir.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("INSECURE: allow_insecure"), "{text}");
    let keys = yaml(&format!("{DOCKER}/keys.yaml"));
    assert_eq!(keys["keys"].as_sequence().map(Vec::len), Some(0));
}

/// The replicas profile: Redis keeps its data (AOF), both replicas mount the same config,
/// which shares state through the compose service `redis` and passes `check`.
#[test]
fn compose_replicas_share_state_through_redis() {
    let compose = yaml(&format!("{DOCKER}/compose.yaml"));
    let s = &compose["services"];
    let redis_cmd: Vec<&str> = s["redis"]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        redis_cmd.windows(2).any(|w| w == ["--appendonly", "yes"]),
        "{redis_cmd:?}"
    );
    for name in ["redis", "gateway-a", "gateway-b", "balancer"] {
        assert_eq!(s[name]["profiles"][0].as_str(), Some("replicas"), "{name}");
    }
    assert!(s["redis"]["ports"].is_null(), "Redis must not be published");
    // The replicas see clients, not the balancer: it names them, and they trust it alone.
    let balancer = s["balancer"]["networks"]["shared"]["ipv4_address"]
        .as_str()
        .expect("the balancer has a fixed address");
    let haproxy = std::fs::read_to_string(format!("{DOCKER}/haproxy.cfg")).unwrap();
    assert!(
        haproxy.lines().any(|l| l.trim() == "option forwardfor"),
        "{haproxy}"
    );
    let config = std::fs::read_to_string(format!("{DOCKER}/gateway-replica.yaml")).unwrap();
    let replica = yaml(&format!("{DOCKER}/gateway-replica.yaml"));
    assert_eq!(replica["state"]["backend"].as_str(), Some("redis"));
    assert_eq!(
        replica["listen"][0]["trusted_proxies"][0].as_str(),
        Some(balancer)
    );
    assert_eq!(
        replica["state"]["url"].as_str(),
        Some("redis://redis:6379/0")
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("gateway.yaml"),
        config.replace("http://ollama:11434", "http://127.0.0.1:11434"),
    )
    .unwrap();
    std::fs::copy(format!("{DOCKER}/keys.yaml"), dir.path().join("keys.yaml")).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(dir.path().join("gateway.yaml"))
        .env("LLM_GATEWAY_STATE", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Prometheus's config in compose, with its rule file, is what promtool accepts.
#[test]
fn compose_prometheus_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let rules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/prometheus/alerts.yaml"
    );
    let config = std::fs::read_to_string(format!("{DOCKER}/prometheus.yml"))
        .unwrap()
        .replace("/etc/prometheus/alerts.yaml", rules);
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(&path)
        .output()
        .expect("promtool is installed");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The image: built in stages, runs as a user, carries no demo credentials (the shipped
/// `conf/` with its demo key and user is not copied), checks its own health.
#[test]
fn dockerfile_ships_no_credentials_and_runs_unprivileged() {
    let file = std::fs::read_to_string(format!("{DOCKER}/Dockerfile")).unwrap();
    let instructions: Vec<&str> = file
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    assert_eq!(
        instructions
            .iter()
            .filter(|l| l.starts_with("FROM "))
            .count(),
        2
    );
    assert!(!instructions
        .iter()
        .any(|l| l.starts_with("COPY") && l.contains("conf")));
    assert!(instructions
        .iter()
        .any(|l| l.starts_with("USER llm-gateway")));
    assert!(instructions.iter().any(|l| l.starts_with("HEALTHCHECK")));
    assert!(file.contains("/health"));
    // Every workspace member's folder is in the build (or the workspace does not load).
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml")).unwrap();
    let members = manifest
        .split("members = [")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap();
    for member in members
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
    {
        let top = member.split('/').next().unwrap();
        assert!(
            instructions
                .iter()
                .any(|l| l.starts_with(&format!("COPY {top} "))),
            "the image build does not copy {member}"
        );
    }
}

const DEBIAN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/debian");

/// The config the Debian package installs listens on loopback only, requires keys, ships
/// none, and passes `check` (with its log folder moved to a temp dir).
#[test]
fn debian_config_is_loopback_only_and_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(format!("{DEBIAN}/gateway.yaml")).unwrap();
    let config = serde_norway::from_str::<serde_norway::Value>(&text).unwrap();
    for l in config["listen"].as_sequence().unwrap() {
        let addr: std::net::SocketAddr = l["addr"].as_str().unwrap().parse().unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
    }
    let text = text.replace("/var/log/llm-gateway", dir.path().to_str().unwrap());
    std::fs::write(dir.path().join("gateway.yaml"), text).unwrap();
    std::fs::copy(format!("{DEBIAN}/keys.yaml"), dir.path().join("keys.yaml")).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(dir.path().join("gateway.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let postinst = std::fs::read_to_string(format!("{DEBIAN}/postinst")).unwrap();
    let commands: Vec<&str> = postinst
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert!(
        !commands
            .iter()
            .any(|l| l.contains("systemctl enable") || l.contains("systemctl start")),
        "{postinst}"
    );
}

/// `cargo deb` where the machine has cargo-deb: the package holds the binary, the unit and
/// the config, and its scripts create the user without starting anything.
#[test]
fn debian_package_builds_with_cargo_deb() {
    let has = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        eprintln!("cargo-deb not installed: package build skipped");
        return;
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new("cargo")
        .args(["deb", "-p", "llm-gateway", "--locked"])
        .current_dir(root)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let deb = text
        .lines()
        .rev()
        .find(|l| l.trim().ends_with(".deb"))
        .unwrap()
        .trim()
        .to_string();
    let list = Command::new("dpkg-deb")
        .args(["--contents", &deb])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for path in [
        "./usr/bin/llm-gateway",
        "./usr/lib/systemd/system/llm-gateway.service",
        "./etc/llm-gateway/gateway.yaml",
        "./etc/llm-gateway/keys.yaml",
    ] {
        assert!(list.contains(path), "{path} missing:\n{list}");
    }
}
