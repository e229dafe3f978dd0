//! Audit lines and Prometheus metrics after known traffic, the audit report command, and
//! SIGTERM under load losing no audit line.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

const KEY: &str = DEMO_KEY;

async fn observed(m: &mock_ollama::MockServer, audit: &std::path::Path) -> Gateway {
    Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n  - use: policy\n  - use: ratelimit\n    key: api_key\n    rate: 100/m\n    burst: 2\n  - use: audit\n    file: {}\n",
        backends(&[("local", &m.url())]),
        conf("keys.yaml"),
        audit.display()
    ))
    .await
}

fn read_audit(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn wait_lines(path: &std::path::Path, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let lines = read_audit(path);
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    panic!("fewer than {n} audit lines: {:?}", read_audit(path));
}

/// Sends the known traffic: a 401, a 403, three 200s (two streamed), a 429.
async fn traffic(gw: &Gateway) -> Vec<(u16, String)> {
    let c = client();
    let chat =
        json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hello world"}]});
    let mut out = Vec::new();
    let mut push = |r: &reqwest::Response| {
        out.push((
            r.status().as_u16(),
            r.headers()["x-request-id"].to_str().unwrap().to_string(),
        ))
    };
    let r = c
        .post(gw.url("/api/chat"))
        .json(&chat)
        .send()
        .await
        .unwrap();
    push(&r);
    let r = c
        .post(gw.url("/api/pull"))
        .bearer_auth(KEY)
        .json(&json!({"model": "x"}))
        .send()
        .await
        .unwrap();
    push(&r);
    let r = c
        .post(gw.url("/api/chat"))
        .bearer_auth(KEY)
        .header("user-agent", "obs-test/1")
        .json(&chat)
        .send()
        .await
        .unwrap();
    push(&r);
    let mut s = r.bytes_stream();
    while s.next().await.is_some() {}
    let sse = json!({"model": "llama3.1:8b", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hello world"}]});
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&sse)
        .send()
        .await
        .unwrap();
    push(&r);
    r.bytes().await.unwrap();
    let r = c
        .post(gw.url("/api/generate"))
        .bearer_auth(KEY)
        .json(&json!({"model": "llama3.1:8b", "prompt": "hi", "stream": false}))
        .send()
        .await
        .unwrap();
    push(&r);
    r.bytes().await.unwrap();
    let r = c
        .post(gw.url("/api/chat"))
        .bearer_auth(KEY)
        .json(&chat)
        .send()
        .await
        .unwrap();
    push(&r);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_lines_for_real_traffic() {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let gw = observed(&m, &audit).await;
    let sent = traffic(&gw).await;
    assert_eq!(
        sent.iter().map(|s| s.0).collect::<Vec<_>>(),
        [401, 403, 200, 200, 200, 429]
    );
    let lines = wait_lines(&audit, 6).await;
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(!text.contains(KEY), "the key never reaches the audit log");
    assert!(
        !text.contains("hello world"),
        "prompts are not written by default"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&audit).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let by_id: HashMap<&str, &Value> = lines
        .iter()
        .map(|l| (l["request_id"].as_str().unwrap(), l))
        .collect();
    let line = |i: usize| by_id[sent[i].1.as_str()];

    let l = line(0);
    assert_eq!(
        (
            l["status"].as_u64(),
            l["decision"].as_str(),
            l["reason"].as_str()
        ),
        (Some(401), Some("auth:invalid_api_key"), Some("missing"))
    );
    assert!(l["principal"].is_null() && l["backend"].is_null());
    let l = line(1);
    assert_eq!(
        (l["status"].as_u64(), l["decision"].as_str()),
        (Some(403), Some("policy:endpoint_not_allowed"))
    );
    assert_eq!(l["path"], "/api/pull");
    assert_eq!(l["principal"], "demo");
    assert_eq!(l["auth_method"], "api_key");
    assert_eq!(l["key_sha256_prefix"], "4daadee04989");

    let l = line(2);
    let want_hash = filter_audit::prompt_sha256(&["hello world"]);
    for (k, v) in [
        ("status", json!(200)),
        ("decision", json!("allowed")),
        ("principal", json!("demo")),
        ("client_ip", json!("127.0.0.1")),
        ("method", json!("POST")),
        ("path", json!("/api/chat")),
        ("route", json!("ollama_chat")),
        ("model", json!("llama3.1:8b")),
        ("prompt_sha256", json!(want_hash)),
        ("prompt_chars", json!(11)),
        ("stream", json!(true)),
        ("backend", json!("local")),
        ("retries", json!(0)),
        ("prompt_tokens", json!(2)),
        ("completion_tokens", json!(5)),
        ("user_agent", json!("obs-test/1")),
        ("cost_usd", Value::Null),
    ] {
        assert_eq!(l[k], v, "{k} in {l}");
    }
    assert!(
        l["ttfb_ms"].as_f64().unwrap() > 0.0
            && l["duration_ms"].as_f64().unwrap() >= l["ttfb_ms"].as_f64().unwrap()
    );
    assert!(l["bytes_in"].as_u64().unwrap() > 0 && l["bytes_out"].as_u64().unwrap() > 500);
    assert!(l["ts"].as_str().unwrap().ends_with('Z'));
    let l = line(3);
    assert_eq!(
        (
            l["route"].as_str(),
            l["stream"].as_bool(),
            l["completion_tokens"].as_u64()
        ),
        (Some("openai_chat"), Some(true), Some(5))
    );
    assert_eq!(
        l["prompt_sha256"], want_hash,
        "the same prompt hashes the same in both APIs"
    );
    let l = line(5);
    assert_eq!(
        (
            l["status"].as_u64(),
            l["decision"].as_str(),
            l["reason"].as_str()
        ),
        (
            Some(429),
            Some("ratelimit:rate_limit_exceeded"),
            Some("request_rate")
        )
    );

    // The report command on this file, and on a gzip'd copy.
    let gz = dir.path().join("audit.jsonl.1.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::default(),
    );
    enc.write_all(text.as_bytes()).unwrap();
    enc.finish().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN).arg("audit").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let a = audit.to_str().unwrap();
    let top: Value =
        serde_json::from_str(&run(&["--top", "keys", "--json", gz.to_str().unwrap(), a])).unwrap();
    assert_eq!(
        top[0],
        json!({"principal": "demo", "requests": 10, "errors": 4, "prompt_tokens": 10, "completion_tokens": 30})
    );
    let fails: Value = serde_json::from_str(&run(&["--failures", "--json", a])).unwrap();
    assert_eq!(fails.as_array().unwrap().len(), 3);
    let table = run(&["--top", "models", a]);
    assert!(
        table.starts_with("MODEL") && table.contains("llama3.1:8b"),
        "{table}"
    );
    let recent: Value =
        serde_json::from_str(&run(&["--since", "1h", "--key", "demo", "--json", a])).unwrap();
    assert_eq!(recent["requests"], 5);
    let none: Value = serde_json::from_str(&run(&["--since", "1ms", "--json", a])).unwrap();
    assert_eq!(none["requests"], 0);

    // --follow prints lines as they are written.
    let mut child = Command::new(BIN)
        .args(["audit", "--follow", "--json", a])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = client()
        .get(gw.url("/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let got = tokio::task::spawn_blocking(move || {
        let mut l = String::new();
        reader.read_line(&mut l).map(|_| l)
    });
    let line = tokio::time::timeout(Duration::from_secs(5), got)
        .await
        .expect("a followed line")
        .unwrap()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        serde_json::from_str::<Value>(&line).unwrap()["request_id"],
        id.as_str()
    );
}

fn samples(text: &str) -> Vec<prometheus_parse::Sample> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines)
        .expect("valid Prometheus text")
        .samples
}

fn value(samples: &[prometheus_parse::Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_after_known_traffic() {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = observed(&m, &dir.path().join("audit.jsonl")).await;
    traffic(&gw).await;
    wait_lines(&dir.path().join("audit.jsonl"), 6).await;
    // Metrics are recorded just after a request's audit line is queued: poll briefly.
    let mut text = String::new();
    for _ in 0..50 {
        let resp = client().get(gw.admin_url("/metrics")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        text = resp.text().await.unwrap();
        if value(&samples(&text), "llm_gateway_requests_total", &[]) >= 6.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = samples(&text);
    let req = |status: &str| value(&s, "llm_gateway_requests_total", &[("status", status)]);
    assert_eq!(
        (req("401"), req("403"), req("200"), req("429")),
        (1.0, 1.0, 3.0, 1.0)
    );
    assert_eq!(
        value(
            &s,
            "llm_gateway_requests_total",
            &[
                ("status", "200"),
                ("principal", "demo"),
                ("route", "ollama_chat")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "llm_gateway_tokens_total",
            &[("kind", "completion"), ("model", "llama3.1:8b")]
        ),
        15.0
    );
    assert_eq!(
        value(&s, "llm_gateway_tokens_total", &[("kind", "prompt")]),
        5.0
    );
    assert_eq!(
        value(
            &s,
            "llm_gateway_auth_failures_total",
            &[("reason", "missing")]
        ),
        1.0
    );
    // Exported at 0 before any lockout: an alert on its increase sees the first one.
    assert!(s
        .iter()
        .any(|x| x.metric == "llm_gateway_auth_failures_total"
            && x.labels.get("reason") == Some("locked_out")));
    // The same for the rate limits' fixed few.
    assert!(s.iter().any(|x| x.metric == "llm_gateway_ratelimited_total"
        && x.labels.get("limit") == Some("tokens_per_minute")));
    assert_eq!(
        value(
            &s,
            "llm_gateway_auth_failures_total",
            &[("reason", "locked_out")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &s,
            "llm_gateway_ratelimited_total",
            &[("limit", "request_rate")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "llm_gateway_rejections_total",
            &[("filter", "policy"), ("code", "endpoint_not_allowed")]
        ),
        1.0
    );
    assert_eq!(
        value(&s, "llm_gateway_backend_up", &[("backend", "local")]),
        1.0
    );
    assert_eq!(
        value(&s, "llm_gateway_backend_in_flight", &[("backend", "local")]),
        0.0
    );
    assert_eq!(value(&s, "llm_gateway_in_flight_requests", &[]), 0.0);
    assert_eq!(
        value(
            &s,
            "llm_gateway_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(value(&s, "llm_gateway_audit_lines_total", &[]), 6.0);
    assert_eq!(value(&s, "llm_gateway_audit_queue_stalls_total", &[]), 0.0);
    for h in [
        "llm_gateway_request_duration_seconds",
        "llm_gateway_time_to_first_byte_seconds",
        "llm_gateway_upstream_duration_seconds",
    ] {
        assert!(text.contains(&format!("{h}_bucket")), "{h} missing");
    }
    assert!(
        text.contains("llm_gateway_upstream_duration_seconds_count{backend=\"local\"} 3"),
        "{text}"
    );
    // The admin listener also answers /health; the public one does not serve /metrics.
    assert_eq!(
        client()
            .get(gw.admin_url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = client()
        .get(gw.url("/metrics"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // The Grafana dashboard uses only metric names the gateway exposes.
    let dash = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/grafana/llm-gateway.json"
    ))
    .unwrap();
    let _: Value = serde_json::from_str(&dash).expect("the dashboard is valid JSON");
    let mut names: Vec<&str> = dash
        .match_indices("llm_gateway_")
        .map(|(i, _)| {
            let rest = &dash[i..];
            &rest[..rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len())]
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 10, "{names:?}");
    for n in names {
        assert!(
            text.contains(&format!("\n{n}")) || text.contains(&format!("\n{n}{{")),
            "dashboard metric {n} is not exposed"
        );
    }

    // promtool (from Debian's prometheus package) accepts the exposition.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (apt-get install prometheus; .ci/run does it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_in_flight_counts_running_requests() {
    let m = mock_with(mock_ollama::MockConfig {
        chunks: 20,
        chunk_delay: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let gw = observed(&m, &dir.path().join("audit.jsonl")).await;
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let url = gw.url("/api/chat");
            tokio::spawn(async move {
                let r = client()
                    .post(url)
                    .header("authorization", format!("Bearer {DEMO_KEY}"))
                    .json(&serde_json::json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .unwrap();
                r.text().await.unwrap()
            })
        })
        .collect();
    let gauge = || gw.backend_in_flight("local");
    let mut seen = 0.0;
    for _ in 0..100 {
        seen = gauge().await;
        if seen >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen, 2.0, "two streams are running at the backend");
    for s in streams {
        s.await.unwrap();
    }
    // The client may read the last chunk a moment before the gateway hands the backend
    // connection back and counts the request out.
    let mut left = gauge().await;
    for _ in 0..100 {
        if left == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        left = gauge().await;
    }
    assert_eq!(left, 0.0, "and none once they ended");
}

/// An admin listener reachable from the network (its token is then required) asks for the
/// token on `/metrics` too: the series name principals, models and backends. `/health` stays
/// open for load balancers, the scheme is read in any case, and on loopback `/metrics` is
/// open as before.
#[tokio::test]
async fn metrics_need_the_admin_token_off_loopback() {
    let m = mock().await;
    let admin = free_port();
    let gw = Gateway::start(&format!(
        "admin: {{ addr: '0.0.0.0:{admin}', token: s3cret-admin-token }}\n{}",
        backends(&[("local", &m.url())])
    ))
    .await;
    let url = |path: &str| format!("http://127.0.0.1:{admin}{path}");
    let c = client();
    for _ in 0..100 {
        if c.get(url("/health")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for (path, auth, want) in [
        ("/metrics", None, 401),
        ("/metrics", Some("Bearer wrong"), 401),
        ("/metrics", Some("Bearer s3cret-admin-token-and-more"), 401),
        ("/metrics", Some("Basic s3cret-admin-token"), 401),
        ("/metrics", Some("Bearer s3cret-admin-token"), 200),
        ("/metrics", Some("bearer s3cret-admin-token"), 200),
        ("/admin/spend", None, 401),
        ("/health", None, 200),
    ] {
        let mut r = c.get(url(path));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let resp = r.send().await.unwrap();
        assert_eq!(resp.status(), want, "{path} with {auth:?}");
        if want == 401 {
            assert!(resp.headers().contains_key("www-authenticate"));
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], "invalid_admin_token", "{body}");
        } else if path == "/metrics" {
            assert!(resp.text().await.unwrap().contains("llm_gateway_"));
        }
    }
    // On loopback the token guards /admin/* only.
    let local = free_port();
    let _local_gw = Gateway::start(&format!(
        "admin: {{ addr: '127.0.0.1:{local}', token: s3cret-admin-token }}\n{}",
        backends(&[("local", &m.url())])
    ))
    .await;
    let mut status = Vec::new();
    for path in ["/metrics", "/admin/spend"] {
        for _ in 0..100 {
            let local_url = format!("http://127.0.0.1:{local}{path}");
            if let Ok(r) = c.get(local_url).send().await {
                status.push(r.status().as_u16());
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    assert_eq!(status, [200, 401]);
    drop(gw);
}
