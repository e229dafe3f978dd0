//! The systemd unit.

use std::process::Command;

use crate::support::BIN;

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
        "KillSignal=SIGTERM",
    ] {
        assert!(unit.lines().any(|l| l.trim() == line), "missing `{line}`");
    }
    // The stop timeout covers the default drain time (10 s) and the final flush.
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim().parse().ok())
        .expect("TimeoutStopSec");
    assert!(stop >= 15, "{stop}");
}

/// `systemd-analyze verify` where the machine has it (the unit, with ExecStart pointing at
/// the binary just built).
#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed: verify skipped");
        return;
    }
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
