//! Shared harness: starts the real `llm-gateway` binary on an ephemeral port with a config
//! written to a temp dir, and the mock model server in-process.
#![allow(dead_code)]

pub mod budget;
pub mod certs;
pub mod redis;
pub mod routing;

use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mock_ollama::{MockConfig, MockServer};

pub const BIN: &str = env!("CARGO_BIN_EXE_llm-gateway");

/// The demo key of `conf/keys.yaml` (principal `demo`).
pub const DEMO_KEY: &str = "sk-gw-demo-key-change-me";

/// A file of the shipped `conf/` folder.
pub fn conf(name: &str) -> String {
    format!("{}/../conf/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A small non-streamed Ollama chat request.
pub fn chat() -> serde_json::Value {
    serde_json::json!({"model": "llama3.1:8b", "stream": false, "messages": [{"role": "user", "content": "hi"}]})
}

/// A port nobody listens on right now (bound then released).
/// A port nothing listens on now, never handed out before in this test process: two tests
/// given the same released port would cross (the second gateway waits for the port, as for
/// a closing process's, while its test finds the first one answering there).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free port");
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub async fn mock() -> MockServer {
    mock_with(MockConfig::default()).await
}

pub async fn mock_with(cfg: MockConfig) -> MockServer {
    MockServer::start(cfg).await.expect("mock starts")
}

/// YAML for a backend list.
pub fn backends(urls: &[(&str, &str)]) -> String {
    let mut s = String::from("backends:\n");
    for (name, url) in urls {
        s += &format!("  - {{ name: {name}, url: '{url}', kind: ollama }}\n");
    }
    s
}

/// Not an environment variable: given to [`Gateway::start_env`], it starts the gateway with
/// this open-file limit (soft and hard), through `prlimit`.
pub const OPEN_FILE_LIMIT: &str = "open file limit";

/// The binary with `config` and `args`, logging (debug access lines too) to `log_dir`.
fn spawn(
    config: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    log_dir: &std::path::Path,
) -> Child {
    let log = std::fs::File::create(log_dir.join("gateway.log")).expect("log file");
    let (limit, env): (Vec<_>, Vec<_>) = env.iter().partition(|(k, _)| *k == OPEN_FILE_LIMIT);
    let mut command = match limit.first() {
        // `prlimit` execs the gateway: the child's pid is the gateway's.
        Some((_, n)) => {
            let mut c = Command::new("prlimit");
            c.arg(format!("--nofile={n}:{n}")).arg("--").arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info,llm_gateway=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("gateway starts")
}

pub struct Gateway {
    child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts the binary with `body` as config (a `listen:` entry is added) and waits until
    /// `/health` answers.
    pub async fn start(body: &str) -> Gateway {
        Gateway::start_env(body, &[]).await
    }

    /// [`Gateway::start`] with extra environment variables for the process. A "free" port
    /// can be taken by another test before the gateway binds it: then another is tried.
    pub async fn start_env(body: &str, env: &[(&str, &str)]) -> Gateway {
        for _ in 0..3 {
            let port = free_port();
            let config = format!("listen:\n  - addr: 127.0.0.1:{port}\n{body}");
            match Self::start_raw_env_result(&config, port, env).await {
                Ok(gw) => return gw,
                Err(log) if log.contains("listen[0].addr: cannot listen") => continue,
                Err(log) => panic!("gateway exited before serving:\n{log}"),
            }
        }
        panic!("no free port after three tries");
    }

    /// Starts with `config` as is (it must listen on 127.0.0.1:`port`) and waits until the
    /// port accepts connections.
    pub async fn start_raw(config: &str, port: u16) -> Gateway {
        Gateway::start_raw_env(config, port, &[]).await
    }

    async fn start_raw_env(config: &str, port: u16, env: &[(&str, &str)]) -> Gateway {
        match Self::start_raw_env_result(config, port, env).await {
            Ok(gw) => gw,
            Err(log) => panic!("gateway exited before serving:\n{log}"),
        }
    }

    /// Starts as [`Gateway::start_raw`] does; the log when it exits first.
    async fn start_raw_env_result(
        config: &str,
        port: u16,
        env: &[(&str, &str)],
    ) -> Result<Gateway, String> {
        // A "free" port can be taken by another test's outgoing connection before the gateway
        // binds it: when the admin port (ours to choose) was, try another.
        for _ in 0..3 {
            match Self::try_start(config, port, env).await {
                Err(log) if log.contains("admin.addr: cannot listen") => continue,
                result => return result,
            }
        }
        Err("no free admin port after three tries".into())
    }

    async fn try_start(config: &str, port: u16, env: &[(&str, &str)]) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = if config.contains("server:") {
            ""
        } else {
            "server: { threads: 2 }\n"
        };
        // Every gateway gets its own admin port, so tests can run side by side.
        // Two released ports can be the same one: never the listener's.
        let admin_port = std::iter::repeat_with(free_port)
            .find(|p| *p != port)
            .unwrap_or(0);
        let admin = if config.contains("admin:") {
            String::new()
        } else {
            format!("admin: {{ addr: 127.0.0.1:{admin_port} }}\n")
        };
        // Background polling of backends would show up in the mock's request counts, which
        // many tests use to prove a request did or did not reach it: off unless asked for.
        let routing = if config.contains("routing:") {
            ""
        } else {
            "routing: { discovery: { enabled: false, interval: 1h }, health: { enabled: false, interval: 1h } }\n"
        };
        let config = format!("{server}{admin}{routing}{config}");
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, config).expect("write config");
        let child = spawn(&path, &[], env, dir.path());
        let mut gw = Gateway {
            child,
            port,
            admin_port,
            dir,
        };
        gw.try_wait_port(gw.port).await?;
        if !admin.is_empty() {
            // The admin listener is a service of its own: it may open a moment later.
            gw.try_wait_port(admin_port).await?;
        }
        Ok(gw)
    }

    /// Waits until `port` accepts connections; the log when the gateway exits first.
    async fn try_wait_port(&mut self, port: u16) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}:\n{}", self.log()));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(format!("did not start in time:\n{}", self.log()))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// `llm_gateway_backend_in_flight` for `backend` as the admin listener reports it now.
    pub async fn backend_in_flight(&self, backend: &str) -> f64 {
        self.metric(&format!(
            "llm_gateway_backend_in_flight{{backend=\"{backend}\"}}"
        ))
        .await
        .unwrap_or(-1.0)
    }

    /// The admin listener's `/metrics` text now.
    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("metrics text")
    }

    /// The value of one series (`name{labels}` exactly as exposed) on the admin listener now.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics().await;
        let prefix = format!("{series} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
    }

    /// The `/health` document of the proxy listener.
    pub async fn health(&self) -> serde_json::Value {
        client()
            .get(self.url("/health"))
            .send()
            .await
            .expect("health answer")
            .json()
            .await
            .expect("health JSON")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.yaml")
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("gateway.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The access line the gateway logged for a request id (waits briefly: it is written
    /// after the response ends).
    pub async fn access_line(&self, request_id: &str) -> String {
        let needle = format!("access id={request_id} ");
        for _ in 0..100 {
            // A whole line only: the log may be read while the gateway is still writing it.
            if let Some(line) = self
                .log()
                .split_inclusive('\n')
                .find(|l| l.ends_with('\n') && l.contains(&needle))
            {
                return line.trim_end().to_string();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no access line for {request_id}:\n{}", self.log());
    }

    /// Starts a second gateway with this one's config and `--upgrade`, and waits until it
    /// has asked this one for its sockets. Its log is its own.
    pub async fn start_upgrade(&self) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = spawn(&self.config_path(), &["--upgrade"], &[], dir.path());
        let mut gw = Gateway {
            child,
            port: self.port,
            admin_port: self.admin_port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !gw.log().contains("upgrade: asked the running gateway") {
            if let Ok(Some(status)) = gw.child.try_wait() {
                panic!("the new gateway exited with {status}:\n{}", gw.log());
            }
            assert!(
                Instant::now() < deadline,
                "the new gateway did not start:\n{}",
                gw.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        gw
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses `key=value` fields of an access line.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    // Read as logfmt: values a client chose are quoted (see proxy/logging.rs), and a key
    // inside a quoted value is not a key.
    let mut rest = line;
    let mut quoted = false;
    let mut escaped = false;
    let mut at = 0;
    for (i, c) in line.char_indices() {
        if quoted {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => quoted = false,
                _ => {}
            }
            continue;
        }
        if c == '"' {
            quoted = true;
        } else if c == ' ' && line[i + 1..].starts_with(&format!("{key}=")) {
            at = i + 1 + key.len() + 1;
            rest = &line[at..];
            break;
        }
    }
    assert!(at > 0, "no {key} in {line}");
    match rest.strip_prefix('"') {
        Some(q) => {
            let mut end = q.len();
            let mut escaped = false;
            for (i, c) in q.char_indices() {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            &q[..end]
        }
        None => rest.split(' ').next().unwrap_or_default(),
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Asserts an error body in the route's shape (Ollama's `{"error": "…", "code": …}` on
/// `/api/…`, OpenAI's elsewhere) and returns (code, message).
pub async fn error_of(resp: reqwest::Response) -> (String, String) {
    let ollama = resp.url().path().starts_with("/api/");
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ct.starts_with("application/json"), "content-type {ct}");
    assert!(resp.headers().contains_key("x-request-id"));
    let v: serde_json::Value = resp.json().await.expect("JSON error body");
    if ollama {
        assert!(v["error"].is_string() && v["code"].is_string(), "{v}");
        return (
            v["code"].as_str().unwrap_or_default().to_string(),
            v["error"].as_str().unwrap_or_default().to_string(),
        );
    }
    let e = &v["error"];
    assert!(e["type"].is_string() && e["message"].is_string(), "{v}");
    (
        e["code"].as_str().unwrap_or_default().to_string(),
        e["message"].as_str().unwrap_or_default().to_string(),
    )
}

/// Sends `head` and then `body` over a plain TCP connection exactly as given (no client-side
/// normalisation or framing, unlike URL-based clients) and reads the answer: the status code,
/// how long it took, and the body. Stops reading once the announced body is complete, the
/// connection closes, or after 10 s.
pub async fn send_raw(port: u16, head: &str, body: &[u8]) -> (u16, Duration, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let t = Instant::now();
    s.write_all(head.as_bytes()).await.expect("write");
    let _ = s.write_all(body).await;
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got);
                if let Some((h, b)) = text.split_once("\r\n\r\n") {
                    let len = h
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if b.len() >= len {
                        break;
                    }
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&got).to_string();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, t.elapsed(), body)
}

/// Opens a plain TCP connection, writes one JSON `POST` to `path` (its Content-Length, the
/// `headers` lines as given, each ending in CRLF) and then `after` (bytes behind the request),
/// and hands the open connection back: for tests of a client that leaves or lingers.
pub async fn post_raw(
    port: u16,
    path: &str,
    headers: &str,
    body: &str,
    after: &str,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n{body}{after}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.expect("write");
    s
}

/// One whole request over a plain TCP connection (with its Content-Length): status and body.
pub async fn raw_request(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    let (code, _, out) = send_raw(port, &head, body.as_bytes()).await;
    (code, out)
}
