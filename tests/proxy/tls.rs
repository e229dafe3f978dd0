//! TLS and mTLS on the public listener, checked with curl and certificates made at test time.

use std::path::Path;
use std::process::Command;

use crate::support::certs::{self, Pki};
use crate::support::*;

/// curl exit code, HTTP status (empty when no response) and HTTP version.
fn curl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            "--max-time",
            "10",
            "-H",
            "content-type: application/json",
        ])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut parts = text.split(' ');
    let code = parts.next().unwrap_or_default().to_string();
    let version = parts.next().unwrap_or_default().to_string();
    (out.status.code().unwrap_or(-1), code, version)
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

async fn tls_gateway(
    pki: &Pki,
    m: &mock_ollama::MockServer,
    client_ca: bool,
    mtls: &str,
    keys: &Path,
) -> Gateway {
    let port = free_port();
    let ca_line = if client_ca {
        format!(", client_ca: {}", p(&pki.ca))
    } else {
        String::new()
    };
    Gateway::start_raw(
        &format!(
            "listen:\n  - addr: 127.0.0.1:{port}\n    tls: {{ cert: {}, key: {}{ca_line} }}\n{}filters:\n  - use: auth\n    keys_file: {}\n    mtls: {mtls}\n",
            p(&pki.server_cert),
            p(&pki.server_key),
            backends(&[("local", &m.url())]),
            p(keys)
        ),
        port,
    )
    .await
}

/// The key of `ops`, whose keys-file entry names its certificate (`dns:ops.internal`).
const OPS_KEY: &str = "sk-gw-ops-key";

fn keys_file(dir: &Path) -> std::path::PathBuf {
    let f = dir.join("keys.yaml");
    std::fs::write(
        &f,
        format!(
            "keys:\n  - id: demo\n    key_sha256: {}\n  - id: svc\n    mtls_subject: svc-a.internal\n  - id: ops\n    key_sha256: {}\n    mtls_subject: 'dns:ops.internal'\n    scopes: [admin]\n",
            filter_auth::keygen::hash_key(DEMO_KEY),
            filter_auth::keygen::hash_key(OPS_KEY)
        ),
    )
    .unwrap();
    f
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_listener_serves_http2_and_refuses_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let pki = certs::make(dir.path());
    let m = mock().await;
    let gw = tls_gateway(&pki, &m, false, "off", &keys_file(dir.path())).await;
    let https = format!("https://127.0.0.1:{}", gw.port);
    let auth = format!("Authorization: Bearer {DEMO_KEY}");
    let body = r#"{"model":"llama3.1:8b","prompt":"hi","stream":false}"#;

    let (rc, code, version) = curl(&["--cacert", p(&pki.ca), &format!("{https}/health")]);
    assert_eq!(
        (rc, code.as_str(), version.as_str()),
        (0, "200", "2"),
        "HTTP/2 by ALPN"
    );
    let (rc, code, _) = curl(&[
        "--http1.1",
        "--cacert",
        p(&pki.ca),
        "-H",
        &auth,
        "-d",
        body,
        &format!("{https}/api/generate"),
    ]);
    assert_eq!((rc, code.as_str()), (0, "200"));
    let (rc, code, _) = curl(&[
        "--cacert",
        p(&pki.ca),
        "-H",
        &auth,
        "-d",
        body,
        &format!("{https}/api/generate"),
    ]);
    assert_eq!((rc, code.as_str()), (0, "200"), "inference over HTTP/2");
    let (_, code, _) = curl(&[
        "--cacert",
        p(&pki.ca),
        "-d",
        body,
        &format!("{https}/api/generate"),
    ]);
    assert_eq!(code, "401");
    // A GET whose stream carries data (no length announced on HTTP/2) is refused, not
    // forwarded with a body the backend would not read; an empty one is served.
    let (rc, code, _) = curl(&[
        "--cacert",
        p(&pki.ca),
        "-H",
        &auth,
        "-X",
        "GET",
        "-H",
        "Content-Length:",
        "--data-binary",
        body,
        &format!("{https}/api/tags"),
    ]);
    assert_eq!(
        (rc, code.as_str()),
        (0, "400"),
        "a GET with data over HTTP/2"
    );
    let (rc, code, _) = curl(&[
        "--cacert",
        p(&pki.ca),
        "-H",
        &auth,
        &format!("{https}/api/tags"),
    ]);
    assert_eq!((rc, code.as_str()), (0, "200"));
    assert_eq!(m.hits("/api/tags"), 1);

    // Plain HTTP to the TLS port fails cleanly and the gateway keeps serving.
    let (rc, code, _) = curl(&[&format!("http://127.0.0.1:{}/health", gw.port)]);
    assert!(
        rc != 0 || code == "400",
        "plain HTTP must not be served: rc {rc} code {code}"
    );
    // A client that does not trust the certificate refuses it.
    let (rc, _, _) = curl(&[&format!("{https}/health")]);
    assert_eq!(rc, 60, "curl: peer certificate cannot be authenticated");
    let (rc, code, _) = curl(&["--cacert", p(&pki.ca), &format!("{https}/health")]);
    assert_eq!((rc, code.as_str()), (0, "200"));
    assert_eq!(m.hits("/api/generate"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_accepts_only_good_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = certs::make(dir.path());
    let m = mock().await;
    let gw = tls_gateway(&pki, &m, true, "accept", &keys_file(dir.path())).await;
    let url = format!("https://127.0.0.1:{}/api/generate", gw.port);
    let body = r#"{"model":"llama3.1:8b","prompt":"hi","stream":false}"#;
    let with = |cert: &Path, key: &Path| {
        curl(&[
            "--cacert",
            p(&pki.ca),
            "--cert",
            p(cert),
            "--key",
            p(key),
            "-d",
            body,
            &url,
        ])
    };

    // The good certificate authenticates as `svc` by its subject, with no key.
    let (rc, code, _) = with(&pki.client_cert, &pki.client_key);
    assert_eq!((rc, code.as_str()), (0, "200"));
    // A certificate of the same CA whose common name reads like `ops`'s DNS name: the
    // common name is whatever its requester wrote, and `ops` names a DNS name.
    let (rc, code, _) = with(&pki.lookalike_cert, &pki.lookalike_key);
    assert_eq!((rc, code.as_str()), (0, "401"));
    // Another CA's certificate, an expired one, and none at all fail at the handshake.
    for (what, (rc, code, _)) in [
        ("rogue", with(&pki.rogue_cert, &pki.rogue_key)),
        ("expired", with(&pki.expired_cert, &pki.expired_key)),
        ("none", curl(&["--cacert", p(&pki.ca), "-d", body, &url])),
    ] {
        assert!(rc != 0 && code == "000", "{what}: rc {rc} code {code}");
    }
    assert_eq!(m.hits("/api/generate"), 1);
    // A chain of more than four intermediates is refused before it is searched (ten that
    // name one issuer cost 0.16 s of a proxy thread a handshake); a short one still passes.
    let chain = |extra: usize| {
        let mut pem = std::fs::read_to_string(&pki.client_cert).unwrap();
        for _ in 0..extra {
            pem += &std::fs::read_to_string(&pki.ca).unwrap();
        }
        let path = dir.path().join(format!("chain-{extra}.pem"));
        std::fs::write(&path, pem).unwrap();
        path
    };
    let (rc, code, _) = with(&chain(1), &pki.client_key);
    assert_eq!((rc, code.as_str()), (0, "200"));
    let (rc, code, _) = with(&chain(5), &pki.client_key);
    assert!(
        rc != 0 && code == "000",
        "a long chain: rc {rc} code {code}"
    );
    assert_eq!(m.hits("/api/generate"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_can_be_required_in_addition_to_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let pki = certs::make(dir.path());
    let m = mock().await;
    let gw = tls_gateway(&pki, &m, true, "require", &keys_file(dir.path())).await;
    let url = format!("https://127.0.0.1:{}/api/generate", gw.port);
    let body = r#"{"model":"llama3.1:8b","prompt":"hi","stream":false}"#;
    let cert = [
        "--cacert",
        p(&pki.ca),
        "--cert",
        p(&pki.client_cert),
        "--key",
        p(&pki.client_key),
    ];
    let auth = format!("Authorization: Bearer {DEMO_KEY}");
    let (_, code, _) = curl(&[&cert[..], &["-d", body, &url]].concat());
    assert_eq!(
        code, "401",
        "a certificate alone is not enough in require mode"
    );
    let (_, code, _) = curl(&[&cert[..], &["-H", &auth, "-d", body, &url]].concat());
    assert_eq!(code, "200");
    // `ops`'s key names its certificate: with another one of the same CA it does not pass.
    let ops = format!("Authorization: Bearer {OPS_KEY}");
    let (_, code, _) = curl(&[&cert[..], &["-H", &ops, "-d", body, &url]].concat());
    assert_eq!(code, "401", "a stolen key with another certificate");
}

/// Over TLS with `--http2` or `--http1.1`: a client gives up on a 4 s generation after half a
/// second, and the next request (the backend's `max_in_flight` is 1) must be answered within
/// 1.5 s, in the same HTTP version. Returns the gateway, for a look at its log.
async fn gives_up_then_asks_again(http: &str, version: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let pki = certs::make(dir.path());
    let m = mock().await;
    let port = free_port();
    let gw = Gateway::start_raw(
        &format!(
            "listen:\n  - addr: 127.0.0.1:{port}\n    tls: {{ cert: {}, key: {} }}\nbackends:\n  - {{ name: local, url: '{}', kind: ollama, max_in_flight: 1 }}\nfilters:\n  - use: auth\n    keys_file: {}\n",
            p(&pki.server_cert),
            p(&pki.server_key),
            m.url(),
            p(&keys_file(dir.path()))
        ),
        port,
    )
    .await;
    let url = format!("https://127.0.0.1:{}/api/generate", gw.port);
    let auth = format!("Authorization: Bearer {DEMO_KEY}");
    let body = r#"{"model":"llama3.1:8b","prompt":"hi","stream":false}"#;
    // A generation of 4 s, given up after half a second.
    let (rc, _, _) = curl(&[
        http,
        "--cacert",
        p(&pki.ca),
        "-H",
        &auth,
        "-H",
        "x-mock-first-byte-ms: 4000",
        "--max-time",
        "0.5",
        "-d",
        body,
        &url,
    ]);
    assert_eq!(rc, 28, "curl gave up (timeout)");
    let start = std::time::Instant::now();
    let (rc, code, got) = curl(&[http, "--cacert", p(&pki.ca), "-H", &auth, "-d", body, &url]);
    assert_eq!((rc, code.as_str(), got.as_str()), (0, "200", version));
    assert!(
        start.elapsed() < std::time::Duration::from_millis(1500),
        "the backend's only slot was still held: answered after {:?}",
        start.elapsed()
    );
    gw
}

/// An HTTP/2 client that gives up on a generation (its stream reset, its connection closed)
/// frees the backend at once: the stream's task used to go on waiting for the backend,
/// holding its `max_in_flight` slot past the connection's caps (attacker review, 2026-12-04).
/// The backend's connection is dropped too, which makes a model server stop generating.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_client_that_gives_up_frees_the_backend_at_once() {
    let gw = gives_up_then_asks_again("--http2", "2").await;
    // A client leaving is normal: no answer attempted on the reset stream, no error logged.
    let log = gw.log();
    assert!(!log.contains("Fail to proxy"), "{log}");
}

/// The same over HTTP/1.1 on TLS, where the socket's bytes are the TLS layer's and cannot be
/// peeked at: the connection's TCP state shows the client's close, and the backend's slot is
/// free within a few hundred milliseconds instead of at the generation's end.
#[tokio::test(flavor = "multi_thread")]
async fn an_http1_tls_client_that_gives_up_frees_the_backend() {
    gives_up_then_asks_again("--http1.1", "1.1").await;
}

/// Review: an HTTP/2 client that reset its stream after the answer had begun, while the
/// backend was silent between two chunks, was found only at the next chunk: its task held
/// the backend's slot meanwhile, and reset streams do not count against the connection's
/// streams. It is let go at once now.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_client_that_gives_up_mid_stream_frees_the_backend_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let pki = certs::make(dir.path());
    let m = mock().await;
    let port = free_port();
    let gw = Gateway::start_raw(
        &format!(
            "listen:\n  - addr: 127.0.0.1:{port}\n    tls: {{ cert: {}, key: {} }}\nbackends:\n  - {{ name: local, url: '{}', kind: ollama, max_in_flight: 1 }}\nfilters:\n  - use: auth\n    keys_file: {}\n",
            p(&pki.server_cert),
            p(&pki.server_key),
            m.url(),
            p(&keys_file(dir.path()))
        ),
        port,
    )
    .await;
    let url = format!("https://127.0.0.1:{}/api/generate", gw.port);
    let auth = format!("Authorization: Bearer {DEMO_KEY}");
    // The first chunk at once, the next one 4 s later: given up after half a second.
    let (rc, _, _) = curl(&[
        "--http2",
        "--cacert",
        p(&pki.ca),
        "-H",
        &auth,
        "-H",
        "x-mock-chunks: 3",
        "-H",
        "x-mock-delay-ms: 4000",
        "--max-time",
        "0.5",
        "-d",
        r#"{"model":"llama3.1:8b","prompt":"hi","stream":true}"#,
        &url,
    ]);
    assert_eq!(rc, 28, "curl gave up (timeout)");
    let start = std::time::Instant::now();
    let body = r#"{"model":"llama3.1:8b","prompt":"hi","stream":false}"#;
    let (rc, code, _) = curl(&[
        "--http2",
        "--cacert",
        p(&pki.ca),
        "-H",
        &auth,
        "-d",
        body,
        &url,
    ]);
    assert_eq!((rc, code.as_str()), (0, "200"));
    assert!(
        start.elapsed() < std::time::Duration::from_millis(1500),
        "the backend's only slot was still held: answered after {:?}",
        start.elapsed()
    );
}

/// Attacker review: a client certificate kept working after it expired, through TLS 1.3
/// session resumption (the certificate is not checked again; each resumed session handed out
/// a new ticket) and on a connection kept alive. An expired certificate names nobody now.
#[tokio::test(flavor = "multi_thread")]
async fn an_expired_client_certificate_names_nobody_on_a_resumed_session() {
    let dir = tempfile::tempdir().unwrap();
    let pki = certs::make(dir.path());
    let made = std::time::Instant::now();
    let m = mock().await;
    let gw = tls_gateway(&pki, &m, true, "accept", &keys_file(dir.path())).await;
    let session = dir.path().join("session.pem");
    let addr = format!("127.0.0.1:{}", gw.port);
    // One request over `openssl s_client`, saving or resuming the TLS session: the status.
    let ask = |resume: bool| {
        use std::io::Write;
        let mut args = vec![
            "s_client",
            "-connect",
            &addr,
            "-CAfile",
            p(&pki.ca),
            "-cert",
            p(&pki.short_cert),
            "-key",
            p(&pki.short_key),
            "-quiet",
            "-ign_eof",
        ];
        args.extend([if resume { "-sess_in" } else { "-sess_out" }, p(&session)]);
        let mut child = Command::new("openssl")
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"GET /api/tags HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines().next().unwrap_or_default().to_string()
    };
    let first = tokio::task::block_in_place(|| ask(false));
    assert!(first.starts_with("HTTP/1.1 200"), "valid: {first}");
    let left =
        certs::SHORT_LIVED.saturating_sub(made.elapsed()) + std::time::Duration::from_millis(1500);
    tokio::time::sleep(left).await;
    let resumed = tokio::task::block_in_place(|| ask(true));
    assert!(
        resumed.starts_with("HTTP/1.1 401"),
        "expired, resumed: {resumed}"
    );
}
