//! The command line: `check`, `--help`, and startup errors an operator can make.

mod support;

use std::process::Command;

use support::BIN;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("RUST_LOG", "error");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// Each config is refused by `check`, naming its file and containing its message, without a
/// panic.
fn refused_by_check<Y: AsRef<str>>(dir: &tempfile::TempDir, cases: &[(Y, &str)]) {
    for (i, (yaml, want)) in cases.iter().enumerate() {
        let yaml = yaml.as_ref();
        let f = write(dir, &format!("bad{i}.yaml"), yaml);
        let (code, out, err) = run(&["check", "--config", &f], &[]);
        assert_eq!(code, 1, "{yaml}: {out}");
        assert!(err.contains(&f), "error must name the file: {err}");
        assert!(err.contains(want), "{yaml}\nwant {want}\ngot {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn check_accepts_the_shipped_configs() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/gateway.yaml");
    let (code, out, err) = run(&["check", "--config", root], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(": OK"), "{out}");
    assert!(
        out.contains("backend:  local (ollama) at 127.0.0.1:11434"),
        "{out}"
    );
}

#[test]
fn check_accepts_the_production_example() {
    let f = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/production.yaml");
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/keys.yaml");
    let dir = tempfile::tempdir().unwrap();
    let pki = support::certs::make(dir.path());
    let audit = dir.path().join("audit.jsonl");
    let ledger = dir.path().join("spend.db");
    let env = [
        ("GATEWAY_ADDR", "0.0.0.0:8443"),
        ("TLS_CERT", pki.server_cert.to_str().unwrap()),
        ("TLS_KEY", pki.server_key.to_str().unwrap()),
        ("KEYS_FILE", keys),
        ("AUDIT_FILE", audit.to_str().unwrap()),
        ("LEDGER_FILE", ledger.to_str().unwrap()),
        ("OLLAMA_A", "http://127.0.0.1:11434"),
        ("OLLAMA_B", "http://127.0.0.1:11435"),
    ];
    let (code, out, err) = run(&["check", "--config", f], &env);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("listen:   0.0.0.0:8443 (TLS) (3 allowed / 0 denied networks)"),
        "{out}"
    );
    assert!(
        out.contains("backend:  gpu-a") && out.contains("backend:  gpu-b"),
        "{out}"
    );
    assert!(
        out.contains("filters:  ratelimit → auth → policy → ratelimit → budget → audit"),
        "{out}"
    );
    let (code, _, err) = run(&["check", "--config", f], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("environment variable GATEWAY_ADDR is not set"),
        "{err}"
    );
}

#[test]
fn network_listeners_need_tls_and_auth_or_an_explicit_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(&dir, "open.yaml", "listen:\n  - addr: 0.0.0.0:18080\n");
    let (code, _, err) = run(&["check", "--config", &f], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("listen[0]: 0.0.0.0:18080 is reachable from the network but has no TLS and the chain has no auth filter"), "{err}");
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/keys.yaml");
    let f = write(
        &dir,
        "notls.yaml",
        &format!(
            "listen:\n  - addr: 0.0.0.0:18080\nfilters:\n  - use: auth\n    keys_file: {keys}\n"
        ),
    );
    let (code, _, err) = run(&["check", "--config", &f], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("has no TLS, so keys and prompts cross the network in plain text"),
        "{err}"
    );
    let f = write(
        &dir,
        "optout.yaml",
        "listen:\n  - addr: 0.0.0.0:18080\n    allow_insecure: true\n",
    );
    let (code, out, err) = run(&["check", "--config", &f], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("INSECURE"), "{out}");
}

#[test]
fn keys_new_prints_a_key_once_and_an_entry_with_its_hash() {
    let (code, out, _) = run(&["keys", "new", "--id", "alice", "--name", "Alice A."], &[]);
    assert_eq!(code, 0);
    let key = out
        .lines()
        .find(|l| l.starts_with("sk-gw-"))
        .expect("a key line")
        .to_string();
    assert_eq!(key.len(), 6 + 64);
    let entry: String = out
        .lines()
        .filter(|l| l.starts_with("  "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        entry.contains("- id: \"alice\"") && entry.contains("name: \"Alice A.\""),
        "{entry}"
    );
    assert!(!entry.contains(&key), "the entry must hold only the hash");
    // `keys hash` of the printed key gives the hash in the entry.
    let mut child = std::process::Command::new(BIN)
        .args(["keys", "hash"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{key}\n").as_bytes())
        .unwrap();
    let out2 = child.wait_with_output().unwrap();
    let hash = String::from_utf8_lossy(&out2.stdout).trim().to_string();
    assert_eq!(hash.len(), 64);
    assert!(
        entry.contains(&format!("key_sha256: {hash}")),
        "{entry} vs {hash}"
    );
    let (_, again, _) = run(&["keys", "new", "--id", "alice"], &[]);
    assert_ne!(again, out, "every key is fresh");
}

#[test]
fn hash_password_writes_an_htpasswd_line_from_stdin() {
    let mut child = std::process::Command::new(BIN)
        .args(["hash-password", "--user", "bob", "--cost", "4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(line.starts_with("bob:$2y$04$"), "{line}");
    // The line works as an htpasswd file for the gateway's config check.
    let dir = tempfile::tempdir().unwrap();
    let ht = write(&dir, "htpasswd", &format!("{line}\n"));
    let f = write(
        &dir,
        "gw.yaml",
        &format!("filters:\n  - use: auth\n    htpasswd: {ht}\n"),
    );
    let (code, out, err) = run(&["check", "--config", &f], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("identity: htpasswd basic auth ("), "{out}");
    let bad = write(&dir, "md5", "bob:$apr1$xyz$abc\n");
    let f = write(
        &dir,
        "gw2.yaml",
        &format!("filters:\n  - use: auth\n    htpasswd: {bad}\n"),
    );
    let (code, _, err) = run(&["check", "--config", &f], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("filters[0].htpasswd") && err.contains("only bcrypt is accepted"),
        "{err}"
    );
}

#[test]
fn check_summarises_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        &dir,
        "gw.yaml",
        "listen:\n  - addr: 127.0.0.1:${GW_PORT}\nbackends:\n  - { name: gpu-a, url: 'http://127.0.0.1:11434', kind: ollama }\nlimits: { max_body: 2MiB }\n",
    );
    let (code, out, err) = run(&["check", "--config", &f], &[("GW_PORT", "9999")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("listen:   127.0.0.1:9999"), "{out}");
    assert!(out.contains("max_body 2097152 bytes"), "{out}");
    assert!(out.contains("filters:  policy"), "{out}");
    assert!(out.contains("policy:   built-in default"), "{out}");
    assert!(
        out.contains("identity: none (every request is anonymous)"),
        "{out}"
    );
    assert!(out.contains("upgrades: through "), "{out}");
    // A folder others can write: upgrades are off, said before a SIGUSR2 finds out.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, out, err) = run(&["check", "--config", &f], &[("GW_PORT", "9999")]);
    assert_eq!(code, 0, "{err}");
    if !std::path::Path::new("/run/llm-gateway").exists() {
        assert!(out.contains("upgrades: OFF: no folder is safe"), "{out}");
    }
}

#[test]
fn check_names_every_identity_source_and_trusted_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/keys.yaml");
    let f = write(
        &dir,
        "gw.yaml",
        &format!(
            "listen:\n  - addr: 127.0.0.1:9999\n    trusted_proxies: [10.0.1.2, 100.64.0.0/10]\nfilters:\n  - use: auth\n    keys_file: {keys}\n    trusted_identity_header: Tailscale-User-Login\n"
        ),
    );
    let (code, out, err) = run(&["check", "--config", &f], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("identity: API keys ("), "{out}");
    assert!(out.contains("keys.yaml)"), "{out}");
    assert!(
        out.contains("header tailscale-user-login from listen[].trusted_proxies"),
        "{out}"
    );
    assert!(
        out.contains("proxies:  127.0.0.1:9999 trusts 10.0.1.2/32, 100.64.0.0/10"),
        "{out}"
    );
}

#[test]
fn check_says_where_traces_go() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        &dir,
        "gw.yaml",
        "listen:\n  - addr: 127.0.0.1:9999\ntelemetry:\n  otlp: { endpoint: 'https://cloud.langfuse.com/api/public/otel/', sample: 0.25 }\n",
    );
    let (code, out, err) = run(&["check", "--config", &f], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("traces:   OTLP http/protobuf to https://cloud.langfuse.com/api/public/otel/v1/traces (sample 0.25, prompts never)"),
        "{out}"
    );
}

#[test]
fn check_rejects_bad_configs_naming_file_path_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "limits:\n  max_bdy: 1MiB\n",
            "limits.max_bdy: unknown field `max_bdy`",
        ),
        (
            "listen:\n  - addr: ${NOT_SET_ANYWHERE}\n",
            "listen[0].addr: environment variable NOT_SET_ANYWHERE is not set",
        ),
        (
            "filters:\n  - use: frobnicate\n",
            "filters[0].use: unknown filter \"frobnicate\"",
        ),
        (
            "backends:\n  - { url: 'http://127.0.0.1:1/v1', kind: ollama }\n",
            "backends[0].url",
        ),
        (
            "backends:\n  - { url: 'http://user:pw@127.0.0.1:1', kind: ollama }\n",
            "backends[0].url: has a user name or password",
        ),
        (
            "backends:\n  - { url: 'http://127.0.0.1:1', kind: llamacpp }\n",
            "backends[0].kind: unknown variant `llamacpp`, expected `ollama` or `openai`",
        ),
        (
            "limits: { connect_timeout: 10 }\n",
            "limits.connect_timeout: a bare number is ambiguous here; give a unit",
        ),
        (
            "listen: [ {addr: 'localhost'} ]\n",
            "listen[0].addr: \"localhost\" is not an ip:port address",
        ),
        ("backends: [\n", "not valid YAML"),
        (
            "telemetry:\n  otlp: { endpoint: 'collector:4318' }\n",
            "telemetry.otlp.endpoint: `collector:4318` is not an http:// or https:// URL",
        ),
        (
            "telemetry:\n  otlp: { endpoint: 'http://127.0.0.1:4318', protocol: http/json }\n",
            "telemetry.otlp.protocol: unknown variant `http/json`, expected `http/protobuf` or `grpc`",
        ),
        (
            "telemetry:\n  otlp: { endpoint: 'http://127.0.0.1:4318', sample: 5 }\n",
            "telemetry.otlp.sample: a fraction from 0",
        ),
        (
            "telemetry:\n  otlp: { endpoint: 'http://127.0.0.1:4318', headers: { 'bad header': x } }\n",
            "telemetry.otlp.headers.bad header: not a valid HTTP header",
        ),
        (
            "telemetry:\n  service_name: gw\n",
            "telemetry.service_name: has no effect without",
        ),
    ];
    refused_by_check(&dir, &cases);
    let (code, _, err) = run(&["check", "--config", "/nonexistent/gw.yaml"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/nonexistent/gw.yaml: cannot read the config file"),
        "{err}"
    );
}

/// Operator review (2026-12-05): settings that `check` passed but that switched a protection
/// off, refused everyone, or failed only at start (or exhausted memory there).
#[test]
fn check_refuses_settings_that_disable_a_protection_or_fail_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = support::certs::make(dir.path());
    write(&dir, "keys.yaml", "keys: []\n");
    write(&dir, "notpem.txt", "this is not a certificate\n");
    let tls = format!(
        "tls: {{ cert: {}, key: {} }}",
        pki.server_cert.display(),
        pki.server_key.display()
    );
    let auth = "  - use: auth\n    keys_file: keys.yaml\n";
    let cases = [
        (
            format!("listen:\n  - addr: 127.0.0.1:0\n    trusted_proxies: [0.0.0.0/0]\nfilters:\n{auth}"),
            "listen[0].trusted_proxies[0]: 0.0.0.0/0 trusts every address",
        ),
        (
            format!("listen:\n  - addr: 127.0.0.1:0\n    trusted_proxies: ['::/0']\nfilters:\n{auth}"),
            "listen[0].trusted_proxies[0]: ::/0 trusts every address",
        ),
        (
            format!("listen:\n  - addr: 127.0.0.1:0\n    {tls}\nfilters:\n{auth}    mtls: require\n"),
            "filters[0].mtls: `mtls: require` needs a listener that asks clients for certificates",
        ),
        (
            format!("listen:\n  - addr: 127.0.0.1:0\n    tls: {{ cert: {}, key: {}, client_ca: notpem.txt }}\n", pki.server_cert.display(), pki.server_key.display()),
            "listen[0].tls.client_ca: cannot load",
        ),
        (
            format!("filters:\n{auth}    brute_force: {{ window: 0s }}\n"),
            "filters[0].brute_force.window: auth filter: must be greater than 0",
        ),
        (
            format!("filters:\n{auth}    basic_cache: {{ size: 100000000000 }}\n"),
            "filters[0].basic_cache.size: auth filter: at most 1000000",
        ),
        (
            "filters:\n  - use: audit\n    file: audit.jsonl\n    rotate: { max_size: 10MiB, keep: 0 }\n".to_string(),
            "filters[0].rotate.keep: audit filter: must be at least 1",
        ),
        (
            "filters:\n  - use: audit\n    file: audit.jsonl\n    queue: 4611686018427387904\n".to_string(),
            "filters[0].queue: audit filter: from 1 to 10000000",
        ),
        (
            "state: { on_error: reject, timeout: 10ms }\n".to_string(),
            "state.timeout: is used only with `backend: redis`",
        ),
        (
            "backends:\n  - { name: gpu-a, url: 'http://127.0.0.1:1', kind: ollama }\nfilters:\n  - use: budget\n    ledger: spend.db\n    prices: [{ model: '*', backend: gpu-z, prompt_per_1m: 1, completion_per_1m: 1 }]\n    global: { max_usd: 10, period: 1d }\n".to_string(),
            "filters[0].prices[0].backend: \"gpu-z\" is not the name of a backend, so this price would never apply; name one of: gpu-a",
        ),
        (
            "server: { threads: 100000 }\n".to_string(),
            "server.threads: at most 1024",
        ),
        (
            "backends:\n  - { url: 'http://127.0.0.1:1', kind: ollama, first_byte_timeout: 0s }\n".to_string(),
            "backends[0].first_byte_timeout: must be greater than 0",
        ),
        (
            "routing:\n  health: { timeout: 0s }\n".to_string(),
            "routing.health.timeout: must be greater than 0",
        ),
        (
            format!("filters:\n{auth}  - use: policy\n    allow: [{{ path: /api/show, method: [POST] }}]\n"),
            "filters[1].allow[0]: policy filter: unknown field `method`",
        ),
        (
            format!("filters:\n{auth}  - use: policy\n    max_messages: 0\n"),
            "filters[1].max_messages: policy filter: must be at least 1",
        ),
        (
            "filters:\n  - use: budget\n    ledger: spend.db\n    prices: [{ model: '*', prompt_per_1m: 1, completion_per_1m: 1 }]\n    global: { max_usd: 10, period: 1d }\n  - use: budget\n    ledger: ./spend.db\n    prices: [{ model: '*', prompt_per_1m: 1, completion_per_1m: 1 }]\n    global: { max_usd: 10, period: 1d }\n".to_string(),
            "filters[1].ledger: ",
        ),
    ];
    refused_by_check(&dir, &cases);
    // A keys file with one entry of `extra`, checked.
    let check_keys = |name: &str, extra: &str| {
        write(
            &dir,
            &format!("{name}.keys.yaml"),
            &format!(
                "keys:\n  - id: a\n    key_sha256: {}\n    {extra}\n",
                "0".repeat(64)
            ),
        );
        let f = write(
            &dir,
            &format!("{name}.yaml"),
            &format!("filters:\n  - use: auth\n    keys_file: {name}.keys.yaml\n"),
        );
        run(&["check", "--config", &f], &[])
    };
    // A zero token limit is named with its key.
    let (code, _, err) = check_keys("tpm0", "tokens_per_minute: 0");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("keys[0].tokens_per_minute: must be at least 1"),
        "{err}"
    );
    // An expiry with a UTC offset is RFC 3339 too.
    let (code, out, err) = check_keys("expires", "expires: 2099-01-31T12:00:00+02:00");
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn run_refuses_a_busy_port_with_a_clear_error() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        &dir,
        "gw.yaml",
        &format!("listen:\n  - addr: 127.0.0.1:{port}\n"),
    );
    let (code, _, err) = run(&["--config", &f], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "listen[0].addr: cannot listen on 127.0.0.1:{port}"
        )),
        "{err}"
    );
}

#[test]
fn help_documents_every_subcommand() {
    let (code, out, _) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for word in ["run", "check", "keys", "hash-password", "--config"] {
        assert!(out.contains(word), "{word} missing from:\n{out}");
    }
    let (code, _, err) = run(&[], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--config"), "{err}");
}

#[test]
fn a_tls_key_of_another_certificate_is_a_config_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let pki = support::certs::make(dir.path());
    let cfg = write(
        &dir,
        "gw.yaml",
        &format!(
            "listen:\n  - addr: 127.0.0.1:0\n    tls: {{ cert: {}, key: {} }}\n",
            pki.server_cert.display(),
            pki.client_key.display()
        ),
    );
    let (code, _, err) = run(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("listen[0].tls"), "{err}");
    assert!(err.contains("does not match the certificate"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Starting says the same, without a panic.
    let (code, _, err) = run(&["--config", &cfg], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("listen[0].tls") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn discovery_and_health_can_be_switched_off_without_an_interval() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        &dir,
        "gw.yaml",
        "routing:\n  discovery: { enabled: false }\n  health: { enabled: false }\n",
    );
    let (code, out, err) = run(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(": OK"), "{out}");
}

/// Review: a budget bounds requests that name no output limit with its `output_reserve`; a
/// cap after it would judge that bound instead of the request's ask.
#[test]
fn an_output_cap_must_come_before_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/keys.yaml");
    let budget = "  - use: budget\n    ledger: spend.db\n    prices: [{ model: '*', prompt_per_1m: 1, completion_per_1m: 1 }]\n";
    let cap = "  - use: policy\n    max_output_tokens: 100\n";
    let cfg = write(
        &dir,
        "gw.yaml",
        &format!("filters:\n  - use: auth\n    keys_file: {keys}\n{budget}{cap}"),
    );
    let (code, _, err) = run(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("filters[2]") && err.contains("must come before `- use: budget`"),
        "{err}"
    );
    let cfg = write(
        &dir,
        "gw.yaml",
        &format!("filters:\n  - use: auth\n    keys_file: {keys}\n{cap}{budget}"),
    );
    let (code, _, err) = run(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn filters_that_read_the_body_must_come_after_auth() {
    let dir = tempfile::tempdir().unwrap();
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/keys.yaml");
    for (filter, name) in [
        ("  - use: policy\n", "policy"),
        (
            "  - use: ratelimit\n    key: ip\n    tokens_per_minute: 1000\n",
            "ratelimit",
        ),
    ] {
        let cfg = write(
            &dir,
            "gw.yaml",
            &format!("filters:\n{filter}  - use: auth\n    keys_file: {keys}\n"),
        );
        let (code, _, err) = run(&["check", "--config", &cfg], &[]);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("filters[0]")
                && err.contains(&format!("the {name} filter reads the request body")),
            "{err}"
        );
    }
    // An address limit in front of auth is the point.
    let cfg = write(
        &dir,
        "gw.yaml",
        &format!("filters:\n  - use: ratelimit\n    key: ip\n    rate: 10/s\n  - use: auth\n    keys_file: {keys}\n  - use: policy\n"),
    );
    let (code, _, err) = run(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 0, "{err}");
}

/// Review: `check` built the filters as a run does, so it created the audit log and the
/// ledger; run as root before a service that runs as its own user, it left them root's and
/// the service could not start. It creates and writes nothing now, and still says when they
/// could not be made.
#[test]
fn check_creates_nothing_and_says_what_could_not_be_opened() {
    let dir = tempfile::tempdir().unwrap();
    let keys = write(&dir, "keys.yaml", "keys: []\n");
    let config = |audit: &str, ledger: &str| {
        format!(
            "listen:\n  - addr: 127.0.0.1:9999\nbackends:\n  - {{ name: a, url: 'http://127.0.0.1:11434', kind: ollama }}\nfilters:\n  - use: auth\n    keys_file: {keys}\n  - use: budget\n    ledger: {ledger}\n    prices: [ {{ model: '*', prompt_per_1m: 1, completion_per_1m: 1 }} ]\n  - use: audit\n    file: {audit}\n"
        )
    };
    let (audit, ledger) = (dir.path().join("audit.jsonl"), dir.path().join("spend.db"));
    let f = write(
        &dir,
        "gw.yaml",
        &config(&audit.display().to_string(), &ledger.display().to_string()),
    );
    let (code, _, err) = run(&["check", "--config", &f], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!audit.exists() && !ledger.exists(), "check created files");
    // A folder that does not exist is still a config error, naming the key.
    for (audit, ledger, key) in [
        ("/nonexistent-dir/audit.jsonl", "spend.db", "audit"),
        ("audit.jsonl", "/nonexistent-dir/spend.db", "ledger"),
    ] {
        let f = write(&dir, "bad.yaml", &config(audit, ledger));
        let (code, _, err) = run(&["check", "--config", &f], &[]);
        assert_eq!(code, 1, "{key}");
        assert!(
            err.contains("/nonexistent-dir") && err.contains("does not exist"),
            "{err}"
        );
    }
    // An existing ledger is read, not written: a file that is not one is refused.
    std::fs::write(&ledger, "not a database").unwrap();
    let (code, _, err) = run(&["check", "--config", &f], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("ledger"), "{err}");
    assert_eq!(std::fs::read(&ledger).unwrap(), b"not a database");
}

/// Operator review: `check` said OK for an audit log the service's user could not write (the
/// gateway then refused to start); it asks the system whether this user may write it.
#[test]
fn check_says_when_this_user_cannot_write_the_audit_log_or_create_the_ledger() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    let keys = write(&dir, "keys.yaml", "keys: []\n");
    let audit = dir.path().join("audit.jsonl");
    std::fs::write(&audit, "").unwrap();
    // Nobody but its owner may write it, and its owner only after a chmod.
    mode(&audit, 0o444);
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let config_with = |ledger: &std::path::Path, audit_extra: &str| {
        write(
            &dir,
            "gw.yaml",
            &format!(
                "listen:\n  - addr: 127.0.0.1:9999\nbackends:\n  - {{ name: a, url: 'http://127.0.0.1:11434', kind: ollama }}\nfilters:\n  - use: auth\n    keys_file: {keys}\n  - use: budget\n    ledger: {}\n    prices: [ {{ model: '*', prompt_per_1m: 1, completion_per_1m: 1 }} ]\n  - use: audit\n    file: {}\n{audit_extra}",
                ledger.display(),
                audit.display()
            ),
        )
    };
    let config = |ledger: &std::path::Path| config_with(ledger, "");
    // Root may write anything: the check runs as `nobody` then, as a service user would.
    let root = unsafe { libc::geteuid() } == 0;
    let check = |f: &str| {
        let mut cmd = if root {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
            c
        } else {
            Command::new(BIN)
        };
        let out = cmd
            .args(["check", "--config", f])
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for p in [dir.path(), data.as_path()] {
        mode(p, 0o755);
    }
    mode(&dir.path().join("keys.yaml"), 0o644);
    let f = config(&data.join("spend.db"));
    mode(std::path::Path::new(&f), 0o644);
    // The ledger's folder is root's (or read-only for its owner).
    if !root {
        mode(&data, 0o555);
    }
    let (code, err) = check(&f);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("spend.db cannot be created in") && err.contains("ledger"),
        "{err}"
    );
    mode(&data, 0o777);
    let (code, err) = check(&f);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("audit.jsonl cannot be written by this user"),
        "{err}"
    );
    mode(&audit, 0o666);
    let (code, err) = check(&f);
    assert_eq!(code, 0, "{err}");
    // An existing ledger this user may not write.
    let ledger = data.join("spend.db");
    std::fs::write(&ledger, b"SQLite format 3\0").unwrap();
    mode(&ledger, 0o444);
    let (code, err) = check(&f);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("spend.db cannot be written"), "{err}");
    std::fs::remove_file(&ledger).unwrap();
    // Rotating renames in the log's folder, which this user may not write (root's, or
    // read-only for its owner), though it may write the log itself.
    let rotating = config_with(
        &data.join("spend.db"),
        "    rotate: { max_size: 100MiB, keep: 2 }\n",
    );
    mode(std::path::Path::new(&rotating), 0o644);
    if !root {
        mode(dir.path(), 0o555);
    }
    let (code, err) = check(&rotating);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot be rotated in its folder"), "{err}");
    mode(dir.path(), 0o755);
    let f = config(&data.join("spend.db"));
    mode(std::path::Path::new(&f), 0o644);
    // A link where the audit log goes: the gateway never writes through one.
    std::fs::remove_file(&audit).unwrap();
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), &audit).unwrap();
    let (code, err) = check(&f);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("symbolic link"), "{err}");
}

/// Operator review: `audit --follow` noticed a rotation only when the new file was shorter
/// than what it had read of the old one, and did not read the old one to its end first: 11
/// of 60 lines were shown across rotations.
#[test]
fn audit_follow_reads_across_a_rotation() {
    use std::io::{BufRead, Write};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let line = |id: &str| format!("{{\"request_id\":\"{id}\",\"status\":200}}\n");
    std::fs::write(&path, line("old").repeat(5)).unwrap();
    let mut child = Command::new(BIN)
        .args(["audit", "--follow", "--json"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    // A last line, then at once the rotation, and a new file longer than the old one.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(line("a").as_bytes()).unwrap();
    drop(f);
    std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
    let next: String = ["b", "c", "d"]
        .iter()
        .map(|id| line(id))
        .collect::<String>()
        + &line("pad").repeat(10);
    std::fs::write(&path, next).unwrap();
    // The gateway writes on into the moved file until its SIGHUP (logrotate's `create`).
    std::thread::sleep(std::time::Duration::from_millis(600));
    let mut moved = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("audit.jsonl.1"))
        .unwrap();
    moved.write_all(line("e").as_bytes()).unwrap();
    drop(moved);
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = Vec::new();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..15 {
            let mut l = String::new();
            if reader.read_line(&mut l).unwrap_or(0) == 0 {
                break;
            }
            let _ = tx.send(l);
        }
    });
    while let Ok(l) = rx.recv_timeout(std::time::Duration::from_secs(5)) {
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        seen.push(v["request_id"].as_str().unwrap().to_string());
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen.len(), 15, "{seen:?}");
    seen.retain(|id| id != "pad");
    assert_eq!(seen, ["a", "b", "c", "d", "e"]);
}
