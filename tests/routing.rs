//! Routing across three mock backends through the real binary: distribution, usage, model
//! residency, model-aware choice, failover without client-visible errors, cooldown, probes.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mock_ollama::{FailMode, MockConfig, MockServer};
use serde_json::{json, Value};
use support::*;

const MODEL: &str = "llama3.1:8b";

async fn mocks(models: [&[&str]; 3]) -> Vec<MockServer> {
    let mut out = Vec::new();
    for m in models {
        out.push(
            mock_with(MockConfig {
                models: m.iter().map(|s| s.to_string()).collect(),
                ..MockConfig::default()
            })
            .await,
        );
    }
    out
}

fn three(m: &[MockServer]) -> String {
    backends(&[("a", &m[0].url()), ("b", &m[1].url()), ("c", &m[2].url())])
}

const ALL: &[&str] = &["llama3.1:8b", "qwen2.5:7b", "nomic-embed-text:latest"];

fn gen(model: &str) -> Value {
    json!({"model": model, "prompt": "x", "stream": false})
}

fn hits(m: &[MockServer], path: &str) -> Vec<u64> {
    m.iter().map(|s| s.hits(path)).collect()
}

/// Waits for the first discovery round (model lists known on every backend).
async fn discovered(gw: &Gateway, want: usize) {
    for _ in 0..100 {
        let r = client().get(gw.url("/v1/models")).send().await.unwrap();
        if let Ok(v) = r.json::<Value>().await {
            if v["data"].as_array().is_some_and(|d| d.len() == want) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("discovery did not finish");
}

#[tokio::test(flavor = "multi_thread")]
async fn round_robin_is_even_across_three() {
    let m = mocks([ALL, ALL, ALL]).await;
    let gw = Gateway::start(&format!("{}routing: {{ strategy: round-robin, discovery: {{ enabled: false, interval: 1h }}, health: {{ enabled: false, interval: 1h }} }}\n", three(&m))).await;
    let c = client();
    for _ in 0..100 {
        assert_eq!(
            c.post(gw.url("/api/generate"))
                .json(&gen(MODEL))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let h = hits(&m, "/api/generate");
    assert_eq!(h.iter().sum::<u64>(), 100);
    assert!(
        h.iter().max().unwrap() - h.iter().min().unwrap() <= 1,
        "{h:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_steers_away_from_long_generations() {
    let m = mocks([ALL, ALL, ALL]).await;
    let gw = Gateway::start(&format!("{}routing: {{ strategy: usage, discovery: {{ enabled: false, interval: 1h }}, health: {{ enabled: false, interval: 1h }} }}\n", three(&m))).await;
    let c = client();
    // Two long generations (large output caps) start and keep running on two backends.
    let long = |c: reqwest::Client, url: String| async move {
        c.post(url)
            .header("x-mock-chunks", "20")
            .header("x-mock-delay-ms", "100")
            .json(&json!({"model": MODEL, "messages": [], "options": {"num_predict": 4000}}))
            .send()
            .await
            .unwrap()
    };
    let l1 = long(c.clone(), gw.url("/api/chat")).await;
    let l2 = long(c.clone(), gw.url("/api/chat")).await;
    let busy = hits(&m, "/api/chat");
    assert_eq!(busy.iter().filter(|&&n| n == 1).count(), 2, "{busy:?}");
    let free = busy.iter().position(|&n| n == 0).unwrap();
    // Short requests go to the third backend while the long ones run.
    for _ in 0..10 {
        let r = c.post(gw.url("/api/generate")).json(&json!({"model": MODEL, "prompt": "x", "stream": false, "options": {"num_predict": 5}})).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        hits(&m, "/api/generate")[free],
        10,
        "{:?}",
        hits(&m, "/api/generate")
    );
    drop((l1, l2));
}

#[tokio::test(flavor = "multi_thread")]
async fn model_aware_choice_residency_catalogue_and_unknown_models() {
    // The mock reports its first model as loaded (/api/ps). qwen is on b and c, loaded on c;
    // the embedding model only on a.
    let m = mocks([
        &["llama3.1:8b", "nomic-embed-text:latest"],
        &["llama3.1:8b", "qwen2.5:7b"],
        &["qwen2.5:7b", "llama3.1:8b"],
    ])
    .await;
    let gw = Gateway::start(&format!("{}routing: {{ strategy: round-robin, discovery: {{ interval: 200ms }}, health: {{ interval: 200ms }} }}\n", three(&m))).await;
    discovered(&gw, 3).await;
    let c = client();
    for _ in 0..6 {
        assert_eq!(
            c.post(gw.url("/api/embed"))
                .json(&json!({"model": "nomic-embed-text", "input": "x"}))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(
            c.post(gw.url("/api/generate"))
                .json(&gen("qwen2.5:7b"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    assert_eq!(
        hits(&m, "/api/embed"),
        [6, 0, 0],
        "only a has the embedding model"
    );
    assert_eq!(
        hits(&m, "/api/generate"),
        [0, 0, 6],
        "qwen goes to c, where it is loaded, not b"
    );
    let r = c
        .post(gw.url("/api/generate"))
        .json(&gen("mistral:7b"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let (code, msg) = error_of(r).await;
    assert_eq!(code, "model_not_found");
    assert!(!msg.contains("127.0.0.1"), "{msg}");
    // The gateway answers model lists itself: each model once.
    let tags: Value = c
        .get(gw.url("/api/tags"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut names: Vec<&str> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["llama3.1:8b", "nomic-embed-text:latest", "qwen2.5:7b"]
    );
    assert_eq!(
        tags["models"][0]["details"]["family"], "llama",
        "Ollama's own entries are kept"
    );
    let before = hits(&m, "/api/tags").iter().sum::<u64>();
    let models: Value = c
        .get(gw.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 3);
    assert!(
        hits(&m, "/api/tags").iter().sum::<u64>() <= before + 3,
        "answered from the catalogue, not proxied"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_dying_mid_run_costs_at_most_the_requests_it_had_taken() {
    let m = mocks([ALL, ALL, ALL]).await;
    let gw = Gateway::start(&format!("{}routing: {{ strategy: round-robin, discovery: {{ enabled: false, interval: 1h }}, health: {{ enabled: false, interval: 1h }} }}\n", three(&m))).await;
    let ok = Arc::new(AtomicU32::new(0));
    let failed = Arc::new(AtomicU32::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (url, ok, failed) = (gw.url("/api/generate"), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            for _ in 0..125 {
                let r = c.post(&url).json(&gen(MODEL)).send().await.unwrap();
                if r.status() == 200 && r.bytes().await.is_ok() {
                    ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Passive detection only (no probes), so requests do meet the dead backend and move on.
    m[1].set_fail(FailMode::Refuse);
    for w in workers {
        w.await.unwrap();
    }
    // A request the backend may already have (written into a connection it was closing) is
    // not sent again, since it may have started generating: only those can fail, at most one
    // per worker; every other request moves on to a live backend.
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    assert_eq!(ok + failed, 1000);
    assert!(failed <= 8, "{failed} failed");
    let metrics = client()
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let retries: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("llm_gateway_retries_total{backend=\"b\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(retries >= 1.0, "retries are counted:\n{metrics}");
    let h: Value = client()
        .get(gw.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["backends"][1]["state"], "down");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_backend_times_out_without_a_second_generation_and_is_cooled_down() {
    let m = mocks([ALL, ALL, ALL]).await;
    m[0].set_fail(FailMode::Hang);
    let gw = Gateway::start(&format!(
        "{}limits: {{ read_timeout: 300ms }}\nrouting: {{ strategy: round-robin, cooldown: 30s, discovery: {{ enabled: false, interval: 1h }}, health: {{ enabled: false, interval: 1h }} }}\n",
        three(&m)
    ))
    .await;
    let c = client();
    let mut timeouts = 0;
    for _ in 0..12 {
        let r = c
            .post(gw.url("/api/generate"))
            .json(&gen(MODEL))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => {}
            // The backend has the prompt and may be generating: it is not sent elsewhere too.
            504 => timeouts += 1,
            s => panic!("unexpected {s}"),
        }
    }
    // It took three timeouts to cool it down; after that nothing is sent there.
    assert_eq!((timeouts, m[0].hits("/api/generate")), (3, 3));
    assert_eq!(
        m[1].hits("/api/generate") + m[2].hits("/api/generate"),
        9,
        "no request was run twice"
    );
    let start = Instant::now();
    for _ in 0..6 {
        c.post(gw.url("/api/generate"))
            .json(&gen(MODEL))
            .send()
            .await
            .unwrap();
    }
    assert!(
        start.elapsed() < Duration::from_millis(300),
        "no more timeouts: {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_every_request_ejects_a_backend_that_passes_its_probe() {
    let m = mocks([ALL, ALL, ALL]).await;
    m[2].set_fail(FailMode::Error500Inference);
    let gw = Gateway::start(&format!("{}routing: {{ strategy: round-robin, cooldown: 30s, discovery: {{ enabled: false, interval: 1h }}, health: {{ interval: 100ms }} }}\n", three(&m))).await;
    let c = client();
    for _ in 0..30 {
        let r = c
            .post(gw.url("/api/generate"))
            .json(&gen(MODEL))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "retried on a healthy backend");
    }
    assert_eq!(
        m[2].hits("/api/generate"),
        3,
        "ejected after fail_threshold failures"
    );
    assert!(m[2].hits("/api/version") > 0, "its probe kept passing");
    let h: Value = c
        .get(gw.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["backends"][2]["state"], "down");
}

#[tokio::test(flavor = "multi_thread")]
async fn all_backends_down_answers_503_at_once() {
    let m = mocks([ALL, ALL, ALL]).await;
    let gw = Gateway::start(&format!("{}limits: {{ connect_timeout: 5s }}\nrouting: {{ discovery: {{ enabled: false, interval: 1h }}, health: {{ interval: 100ms }} }}\n", three(&m))).await;
    for s in &m {
        s.set_fail(FailMode::Refuse);
    }
    tokio::time::sleep(Duration::from_millis(400)).await; // the probes notice
    let start = Instant::now();
    let r = client()
        .post(gw.url("/api/generate"))
        .json(&gen(MODEL))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(error_of(r).await.0, "no_backend_available");
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "{:?}",
        start.elapsed()
    );
    // They come back: the probes see it and traffic flows again.
    for s in &m {
        s.set_fail(FailMode::None);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        client()
            .post(gw.url("/api/generate"))
            .json(&gen(MODEL))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_broken_mid_way_ends_with_an_error_and_is_audited() {
    let m = mocks([ALL, ALL, ALL]).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: audit\n    file: {}\n",
        three(&m),
        audit.display()
    ))
    .await;
    let r = client()
        .post(gw.url("/api/chat"))
        .header("x-mock-fail", "close-mid-stream")
        .header("x-mock-chunks", "10")
        .header("x-mock-delay-ms", "20")
        .json(&json!({"model": MODEL, "messages": []}))
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let result = tokio::time::timeout(Duration::from_secs(5), r.bytes())
        .await
        .expect("no hang");
    assert!(result.is_err(), "the client sees an error, not a clean end");
    let mut line = None;
    for _ in 0..50 {
        line = std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|l| l["request_id"] == id.as_str());
        if line.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let line = line.expect("audited");
    assert_eq!(line["decision"], "failed:backend_broke_stream");
    assert_eq!(line["status"], 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn full_backends_queue_requests_until_a_slot_frees_or_the_deadline() {
    let m = mocks([ALL, ALL, ALL]).await;
    let list = format!(
        "backends:\n  - {{ name: a, url: '{}', kind: ollama, max_in_flight: 1 }}\n  - {{ name: b, url: '{}', kind: ollama, max_in_flight: 1 }}\n",
        m[0].url(),
        m[1].url()
    );
    for (timeout, want) in [("5s", 200u16), ("150ms", 503)] {
        let gw = Gateway::start(&format!(
            "{list}routing: {{ strategy: least-busy, queue: {{ size: 10, timeout: {timeout} }}, discovery: {{ enabled: false, interval: 1h }}, health: {{ enabled: false, interval: 1h }} }}\n"
        ))
        .await;
        let slow = |c: reqwest::Client, url: String| async move {
            let r = c
                .post(url)
                .header("x-mock-chunks", "10")
                .header("x-mock-delay-ms", "100")
                .json(&json!({"model": MODEL, "messages": []}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body = r.bytes().await.unwrap();
            (status, body)
        };
        let c = client();
        let a = tokio::spawn(slow(c.clone(), gw.url("/api/chat")));
        let b = tokio::spawn(slow(c.clone(), gw.url("/api/chat")));
        // Both backends are busy once the mocks have seen both requests.
        for _ in 0..200 {
            if m[0].hits("/api/chat") + m[1].hits("/api/chat") >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let start = Instant::now();
        let (status, body) = slow(c.clone(), gw.url("/api/chat")).await;
        assert_eq!(
            status,
            want,
            "queue timeout {timeout}: {}",
            String::from_utf8_lossy(&body)
        );
        if want == 200 {
            assert!(
                start.elapsed() >= Duration::from_millis(250),
                "it waited for a slot: {:?}",
                start.elapsed()
            );
        } else {
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["code"], "backends_busy");
        }
        assert_eq!((a.await.unwrap().0, b.await.unwrap().0), (200, 200));
        m[0].reset();
        m[1].reset();
    }
}
