//! `init` writes a safe starting point that passes `check`; `doctor` finds a model server
//! reachable around the gateway, a world-readable keys file and demo credentials, and is
//! quiet about a clean setup.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use mock_ollama::MockConfig;
use serde_json::Value;

use crate::support::{mock, mock_with, BIN};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_writes_a_safe_config_that_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, out, err) = run(&["init", "--dir", d, "--backend", "http://127.0.0.1:11434"]);
    assert_eq!(code, 0, "{err}");
    // The admin key is printed once and stored only as its hash.
    let key = out
        .lines()
        .find(|l| l.starts_with("sk-gw-"))
        .expect("the key is printed")
        .to_string();
    let keys = std::fs::read_to_string(dir.path().join("keys.yaml")).unwrap();
    assert!(!keys.contains(&key));
    assert!(
        keys.contains(&filter_auth::keygen::hash_key(&key)),
        "{keys}"
    );
    assert!(keys.contains("scopes: [admin]"));
    assert!(!keys.contains("4daadee0"), "no demo key");
    for f in ["gateway.yaml", "keys.yaml"] {
        assert_eq!(mode(&dir.path().join(f)), 0o600, "{f}");
    }
    let config = dir.path().join("gateway.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    for part in [
        "use: auth",
        "use: policy",
        "use: ratelimit",
        "key: api_key",
        "use: audit",
        "# - use: budget",
    ] {
        assert!(text.contains(part), "{part}:\n{text}");
    }
    let (code, out, err) = run(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("filters:  auth → policy → ratelimit → audit"),
        "{out}"
    );
    // Nothing is overwritten without --force; with it, a new key.
    let (code, _, err) = run(&["init", "--dir", d]);
    assert_eq!(code, 1);
    assert!(err.contains("exists; pass --force"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("keys.yaml")).unwrap(),
        keys
    );
    let (code, out, _) = run(&["init", "--dir", d, "--force"]);
    assert_eq!(code, 0);
    assert!(!out.contains(&key));
    // --force keeps the keys that were there: the new admin key joins them.
    let again = std::fs::read_to_string(dir.path().join("keys.yaml")).unwrap();
    assert!(
        again.contains(&filter_auth::keygen::hash_key(&key)),
        "{again}"
    );
    assert_eq!(again.matches("- id: ").count(), 2, "{again}");
    // Under ids of their own (a second `admin` made a file that does not load), and the
    // result still passes `check`.
    assert!(again.contains("- id: \"admin-2\""), "{again}");
    let (code, _, err) = run(&["init", "--dir", d, "--force"]);
    assert_eq!(code, 0, "{err}");
    let third = std::fs::read_to_string(dir.path().join("keys.yaml")).unwrap();
    assert!(third.contains("- id: \"admin-3\""), "{third}");
    let (code, _, err) = run(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // What cannot work is refused before anything is written.
    let bad = tempfile::tempdir().unwrap();
    let b = bad.path().to_str().unwrap();
    let (code, _, err) = run(&["init", "--dir", b, "--backend", "https://gpu.example:11434"]);
    assert_eq!(code, 1);
    assert!(err.contains("http://"), "{err}");
    assert!(std::fs::read_dir(bad.path()).unwrap().next().is_none());
    // An IPv6 wildcard is written so that YAML reads it as an address.
    let (code, out, err) = run(&["init", "--dir", b, "--listen", "[::]:8443"]);
    assert_eq!(code, 0, "{out}{err}");

    // A listener other machines reach gets a certificate, and passes the safe defaults.
    let public = tempfile::tempdir().unwrap();
    let p = public.path().to_str().unwrap();
    let (code, _, err) = run(&[
        "init",
        "--dir",
        p,
        "--listen",
        "0.0.0.0:8443",
        "--backend",
        "http://127.0.0.1:8081/v1",
    ]);
    assert_eq!(code, 0, "{err}");
    for f in ["tls/cert.pem", "tls/key.pem"] {
        assert_eq!(mode(&public.path().join(f)), 0o600, "{f}");
    }
    let config = public.path().join("gateway.yaml");
    let (code, out, err) = run(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("listen:   0.0.0.0:8443 (TLS)"), "{out}");
    assert!(
        out.contains("backend:  local (openai) at 127.0.0.1:8081"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_finds_what_is_open_around_the_gateway() {
    let backend = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, _, err) = run(&["init", "--dir", d, "--backend", &backend.url()]);
    assert_eq!(code, 0, "{err}");
    let config = dir.path().join("gateway.yaml");
    let config = config.to_str().unwrap();
    // A clean setup: the backend on loopback answers like Ollama, files are 0600.
    let (code, out, err) = run(&["doctor", "--config", config]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("nothing found"), "{out}");

    // An Ollama bound to every interface, as `ollama serve` does with OLLAMA_HOST=0.0.0.0.
    let exposed = mock_with(MockConfig {
        addr: "0.0.0.0:0".parse().unwrap(),
        ..MockConfig::default()
    })
    .await;
    let port = exposed
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let (code, out, _) = run(&["doctor"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("port {port}")), "{out}");
    assert!(
        out.contains(&format!("OLLAMA_HOST=127.0.0.1:{port}")),
        "{out}"
    );

    // A keys file every user can read, and the demo key back in it.
    let keys = dir.path().join("keys.yaml");
    let mut text = std::fs::read_to_string(&keys).unwrap();
    text += "  - id: demo\n    key_sha256: 4daadee049895fc0ac656b1efe8c7d9802c62d5343d85ffab82bfe03673c4b91\n";
    std::fs::write(&keys, text).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    // And its folder writable by everyone (anyone could rename a keys file of theirs over it).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, out, _) = run(&["doctor", "--config", config, "--json"]);
    assert_eq!(code, 1, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], false);
    let findings = report["findings"].as_array().unwrap();
    let of = |check: &str| {
        findings
            .iter()
            .filter(|f| f["check"] == check)
            .map(|f| f["what"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let perms = of("file_permissions");
    assert!(
        perms
            .iter()
            .any(|w| w.contains("keys.yaml") && w.contains("644")),
        "{findings:?}"
    );
    assert!(
        perms
            .iter()
            .any(|w| w.contains("folder") && w.contains("777")),
        "{findings:?}"
    );
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(of("demo_credentials").len(), 1, "{findings:?}");
    assert!(of("exposed_model_server").iter().any(|w| w.contains(&port)));
    for f in findings {
        assert!(!f["fix"].as_str().unwrap().is_empty() && !f["why"].as_str().unwrap().is_empty());
    }
}

/// Review: `doctor` read the config file but never built the filters, so a config that could
/// not start (an unknown filter, a broken keys file) came out clean.
#[test]
fn doctor_builds_the_filters_as_check_does() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.yaml");
    std::fs::write(
        dir.path().join("keys.yaml"),
        "keys: [ { id: x, bogus: 1 } ]\n",
    )
    .unwrap();
    std::fs::write(
        &config,
        "listen:\n  - addr: 127.0.0.1:9998\nbackends: []\nfilters:\n  - use: auth\n    keys_file: keys.yaml\n",
    )
    .unwrap();
    let (code, out, _) = run(&["doctor", "--config", config.to_str().unwrap(), "--json"]);
    assert_eq!(code, 1, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let findings = report["findings"].as_array().unwrap();
    assert!(
        findings
            .iter()
            .any(|f| f["check"] == "config" && f["what"].as_str().unwrap().contains("bogus")),
        "{out}"
    );
}
