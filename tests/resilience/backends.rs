//! Backends that refuse, hang, die mid-stream or fail every request; clients that leave.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mock_ollama::{FailMode, MockConfig};
use serde_json::{json, Value};

use crate::support::routing::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn backend_down_gives_502_naming_only_the_backend_then_503() {
    let port = free_port();
    let gw = Gateway::start(&backends(&[("gpu-a", &format!("http://127.0.0.1:{port}"))])).await;
    let c = client();
    // Three failures in a row (fail_threshold) each get a 502 naming only the backend.
    for path in ["/api/chat", "/api/tags", "/api/chat"] {
        let req = if path == "/api/chat" {
            c.post(gw.url(path))
                .json(&json!({"model": MODEL, "messages": []}))
        } else {
            c.get(gw.url(path))
        };
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 502, "{path}");
        let (code, msg) = error_of(resp).await;
        assert_eq!(code, "backend_unavailable");
        assert_eq!(msg, "backend gpu-a is unavailable");
        assert!(!msg.contains(&port.to_string()));
    }
    let h = gw.health().await;
    assert_eq!(h["backends"][0]["state"], "down");
    assert_eq!(h["status"], "degraded");
    // Now every backend is known down: 503 at once, without trying.
    let start = Instant::now();
    let resp = c
        .post(gw.url("/api/chat"))
        .json(&json!({"model": MODEL, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(error_of(resp).await.0, "no_backend_available");
    assert!(start.elapsed() < Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_backend_gives_504() {
    let m = mock_with(MockConfig {
        fail: FailMode::Hang,
        ..MockConfig::default()
    })
    .await;
    let gw = Gateway::start(&format!(
        "{}limits: {{ read_timeout: 1s }}\n",
        backends(&[("slow", &m.url())])
    ))
    .await;
    let start = Instant::now();
    let resp = client()
        .post(gw.url("/api/chat"))
        .json(&json!({"model": MODEL, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    let (code, msg) = error_of(resp).await;
    assert_eq!(code, "backend_timeout");
    assert_eq!(msg, "backend slow did not answer in time");
    assert!(start.elapsed() < Duration::from_secs(5));
    let resp = client().get(gw.url("/api/tags")).send().await.unwrap();
    assert_eq!(resp.status(), 504);
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_dying_mid_stream_truncates_the_client_stream() {
    let m = mock().await;
    let gw = Gateway::start(&backends(&[("local", &m.url())])).await;
    let resp = client()
        .post(gw.url("/api/chat"))
        .header("x-mock-fail", "close-mid-stream")
        .header("x-mock-chunks", "10")
        .header("x-mock-delay-ms", "20")
        .json(&json!({"model": MODEL, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut s = resp.bytes_stream();
    let mut got = Vec::new();
    let mut failed = false;
    while let Some(chunk) = s.next().await {
        match chunk {
            Ok(c) => got.extend_from_slice(&c),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the client must see an error, not a clean end");
    assert!(!String::from_utf8_lossy(&got).contains("\"done\":true"));
    // The gateway is still fine.
    assert_eq!(
        client()
            .get(gw.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_leaving_mid_stream_is_harmless() {
    let m = mock().await;
    let gw = Gateway::start(&backends(&[("local", &m.url())])).await;
    // More clients walk away than the backend failure threshold: none of it is the
    // backend's fault, so it must stay up and nothing is logged as an error.
    for _ in 0..4 {
        let resp = client()
            .post(gw.url("/api/chat"))
            .header("x-mock-chunks", "20")
            .header("x-mock-delay-ms", "50")
            .json(&json!({"model": MODEL, "messages": []}))
            .send()
            .await
            .unwrap();
        let mut s = resp.bytes_stream();
        let _ = s.next().await;
        drop(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let h = gw.health().await;
    assert_eq!(h["backends"][0]["state"], "up");
    assert!(!gw.log().contains("ERROR"), "{}", gw.log());
    let resp = client()
        .post(gw.url("/api/chat"))
        .json(&json!({"model": MODEL, "stream": false, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
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
    // A tenth of the run first (a fixed sleep let a fast run end before the backend died).
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while ok.load(Ordering::SeqCst) < 100 && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
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
    let retries = gw
        .metric("llm_gateway_retries_total{backend=\"b\"}")
        .await
        .unwrap_or(0.0);
    // The dead backend was met: requests that found it refusing moved on (counted), or had
    // been written to it already and failed (above). Under a loaded machine every meeting
    // can be of the second kind before the backend is taken out, so either counts.
    assert!(
        retries >= 1.0 || failed >= 1,
        "the dead backend was never met: {retries} retries, {failed} failed"
    );
    let h = gw.health().await;
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
async fn slow_requests_of_one_client_do_not_take_out_a_backend_that_serves_others() {
    // Attacker review: a client whose requests outlast `read_timeout` (a long answer, a slow
    // model) took backends out for everyone, three timeouts a cooldown.
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "{}limits: {{ read_timeout: 300ms }}\nrouting: {{ cooldown: 30s, discovery: {{ enabled: false, interval: 1h }}, health: {{ enabled: false, interval: 1h }} }}\n",
        backends(&[("gpu", &m.url())])
    ))
    .await;
    let c = client();
    let slow = || {
        c.post(gw.url("/api/generate"))
            .header("x-mock-first-byte-ms", "700")
            .json(&json!({"model": MODEL, "prompt": "write a lot", "stream": false}))
            .send()
    };
    let fast = || {
        c.post(gw.url("/api/generate"))
            .json(&json!({"model": MODEL, "prompt": "hi", "stream": false}))
            .send()
    };
    for round in 0..2 {
        let slow_ones = futures_util::future::join_all((0..3).map(|_| slow()));
        // Someone else is served while they wait.
        let other = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            fast().await.unwrap().status()
        };
        let (slow_ones, other) = tokio::join!(slow_ones, other);
        assert_eq!(other, 200, "round {round}");
        for r in slow_ones {
            assert_eq!(r.unwrap().status(), 504, "round {round}");
        }
        assert_eq!(
            gw.health().await["backends"][0]["state"],
            "up",
            "round {round}"
        );
        assert_eq!(fast().await.unwrap().status(), 200, "round {round}");
    }
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
    // Probes run while a backend is idle (between requests, and now).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(m[2].hits("/api/version") > 0, "its probe kept passing");
    let h = gw.health().await;
    assert_eq!(h["backends"][2]["state"], "down");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_that_fail_on_every_backend_do_not_take_backends_out() {
    let m = mocks([ALL, ALL, ALL]).await;
    let gw = Gateway::start(&format!("{}routing: {{ strategy: round-robin, cooldown: 30s, discovery: {{ enabled: false, interval: 1h }}, health: {{ interval: 100ms }} }}\n", three(&m))).await;
    let c = client();
    let hits = || m.iter().map(|s| s.hits("/api/generate")).sum::<u64>();
    // A client's requests that every backend answers with a server error (as llama.cpp does
    // for a malformed tool call), many at once.
    let poison = || {
        c.post(gw.url("/api/generate"))
            .header("x-mock-fail", "error500")
            .json(&gen(MODEL))
            .send()
    };
    for _ in 0..5 {
        let all = futures_util::future::join_all((0..6).map(|_| poison())).await;
        for r in all {
            // The backend's own answer comes back, after two backends at most.
            assert_eq!(r.unwrap().status(), 500);
        }
    }
    assert!(
        hits() <= 60,
        "each went to two backends at most: {}",
        hits()
    );
    // Every backend still serves everyone else.
    for _ in 0..6 {
        let r = c
            .post(gw.url("/api/generate"))
            .json(&gen(MODEL))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let h = gw.health().await;
    for b in h["backends"].as_array().unwrap() {
        assert_eq!(b["state"], "up", "{h}");
    }
}

/// Review: with no retry (`retries: 0`, or nothing else to try) a backend that answers 500 to
/// every request was never taken out once server errors counted only when another backend
/// served the request. Such an error now counts when the backend's previous one went to
/// another caller: one client's failing requests build no streak, many clients' do.
#[tokio::test(flavor = "multi_thread")]
async fn without_retries_a_backend_failing_everyone_is_still_taken_out() {
    let m = mocks([ALL, ALL, ALL]).await;
    m[2].set_fail(FailMode::Error500Inference);
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<String> = (0..4)
        .map(|i| format!("sk-caller-{i}-0123456789abcdef"))
        .collect();
    std::fs::write(
        dir.path().join("keys.yaml"),
        format!(
            "keys:\n{}",
            keys.iter()
                .enumerate()
                .map(|(i, k)| format!(
                    "  - {{ id: caller-{i}, key_sha256: {} }}\n",
                    filter_auth::keygen::hash_key(k)
                ))
                .collect::<String>()
        ),
    )
    .unwrap();
    let gw = Gateway::start(&format!(
        "{}routing: {{ strategy: round-robin, retries: 0, cooldown: 30s, discovery: {{ enabled: false, interval: 1h }}, health: {{ interval: 100ms }} }}\nfilters:\n  - use: auth\n    keys_file: {}\n",
        three(&m),
        dir.path().join("keys.yaml").display()
    ))
    .await;
    let c = client();
    let send = |key: String| {
        c.post(gw.url("/api/generate"))
            .bearer_auth(key)
            .json(&gen(MODEL))
            .send()
    };
    // One caller: c answers every third request with 500, and stays in.
    for _ in 0..12 {
        send(keys[0].clone()).await.unwrap();
    }
    assert_eq!(m[2].hits("/api/generate"), 4);
    assert_eq!(gw.health().await["backends"][2]["state"], "up");
    // Several callers: its errors go to one after another, and it is taken out.
    for i in 0..12 {
        send(keys[i % 4].clone()).await.unwrap();
    }
    let h = gw.health().await;
    assert_eq!(h["backends"][2]["state"], "down", "{h}");
    for i in 0..6 {
        let r = send(keys[i % 4].clone()).await.unwrap();
        assert_eq!(r.status(), 200);
    }
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

/// A streamed Ollama generation (the first-byte deadline is for streams).
fn streamed(model: &str) -> Value {
    json!({"model": model, "prompt": "x"})
}

/// A streamed `/api/generate` of `model`, its first byte `first_byte_ms` late at the mock.
async fn send_streamed(gw: &Gateway, model: &str, first_byte_ms: u64) -> reqwest::Response {
    client()
        .post(gw.url("/api/generate"))
        .header("x-mock-first-byte-ms", first_byte_ms.to_string())
        .json(&streamed(model))
        .send()
        .await
        .unwrap()
}

/// `routing.first_byte_timeout` and the rest, with probes and discovery off.
fn first_byte_routing(extra: &str) -> String {
    format!("routing: {{ strategy: round-robin, first_byte_timeout: 400ms, {extra} discovery: {{ enabled: false }}, health: {{ enabled: false }} }}\n")
}

// Slow starts: a backend that sits on a request past the first-byte deadline is left for
// another, before anything reached the client.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_silent_past_the_first_byte_deadline_is_left_for_another() {
    let a = mock().await;
    let b = mock().await;
    a.set_fail(FailMode::Hang);
    let gw = Gateway::start(&format!(
        "{}{}",
        backends(&[("a", &a.url()), ("b", &b.url())]),
        first_byte_routing("")
    ))
    .await;
    let c = client();
    for _ in 0..4 {
        let start = Instant::now();
        let r = c
            .post(gw.url("/api/generate"))
            .json(&streamed(MODEL))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "{:?}",
            start.elapsed()
        );
    }
    let timeouts = gw
        .metric("llm_gateway_first_byte_timeouts_total{backend=\"a\"}")
        .await;
    assert!(timeouts.is_some_and(|n| n >= 1.0), "{timeouts:?}");
    // Both silent: 504 in the route's shape, code first_byte_timeout, not a hang.
    b.set_fail(FailMode::Hang);
    let start = Instant::now();
    let r = c
        .post(gw.url("/api/generate"))
        .json(&streamed(MODEL))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "first_byte_timeout", "{v}");
}

/// A hung backend is still taken out under one caller: the same request answered in time by
/// another backend shows the one that missed its deadline at fault.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_misses_what_another_answers_in_time_is_taken_out() {
    let a = mock().await;
    let b = mock().await;
    a.set_fail(FailMode::Hang);
    let gw = Gateway::start(&format!(
        "{}routing: {{ strategy: round-robin, first_byte_timeout: 300ms, cooldown: 30s, discovery: {{ enabled: false }}, health: {{ enabled: false }} }}\n",
        backends(&[("a", &a.url()), ("b", &b.url())])
    ))
    .await;
    let send = || async {
        let start = Instant::now();
        let r = send_streamed(&gw, MODEL, 0).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        start.elapsed()
    };
    for _ in 0..6 {
        send().await;
    }
    assert_eq!(gw.health().await["backends"][0]["state"], "down");
    let timeouts = || gw.metric("llm_gateway_first_byte_timeouts_total{backend=\"a\"}");
    let missed = timeouts().await;
    assert_eq!(missed, Some(3.0), "fail_threshold misses took it out");
    for _ in 0..4 {
        assert!(send().await < Duration::from_millis(300));
    }
    assert_eq!(timeouts().await, missed, "nothing more was sent to it");
}

/// Attacker review (2026-12-05): one client's streams that are slow to their first byte by
/// themselves (a long prompt, a model loaded nowhere) were retried on every backend, and each
/// missed deadline on a quiet backend counted in full: a few such requests took every backend
/// out for the cooldown, for everyone.
#[tokio::test(flavor = "multi_thread")]
async fn one_clients_slow_first_bytes_do_not_take_the_backends_out() {
    let m = mocks([ALL, ALL, ALL]).await;
    for (retries, sent, out) in [("", 4, 0), ("retries: 0,", 9, 1)] {
        let gw = Gateway::start(&format!(
            "{}routing: {{ strategy: round-robin, first_byte_timeout: 250ms, cooldown: 30s, {retries} discovery: {{ enabled: false }}, health: {{ enabled: false }} }}\n",
            three(&m)
        ))
        .await;
        for i in 0..sent {
            let r = send_streamed(&gw, MODEL, 700).await;
            assert_eq!(r.status(), 504, "{retries} request {i}");
        }
        // Retried, each missed on all three: slow by itself, none is out. Without retries each
        // reached one backend, one after another: one at most is out.
        let h = gw.health().await;
        let down = h["backends"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["state"] != "up")
            .count();
        assert_eq!(down, out, "{retries}: {h}");
        // Everyone else is served as before.
        for _ in 0..3 {
            let r = send_streamed(&gw, MODEL, 0).await;
            assert_eq!(r.status(), 200, "{retries}");
            r.bytes().await.unwrap();
        }
    }
}

/// Backend a breaks every stream after its first chunks (a runner that crashes mid-way), b
/// works; round-robin, no probes.
async fn a_breaks_b_works() -> (Vec<mock_ollama::MockServer>, Gateway) {
    let a = mock().await;
    let b = mock().await;
    a.set_fail(FailMode::CloseMidStream);
    let gw = Gateway::start(&format!(
        "{}routing: {{ strategy: round-robin, cooldown: 30s, discovery: {{ enabled: false }}, health: {{ enabled: false }} }}\n",
        backends(&[("a", &a.url()), ("b", &b.url())])
    ))
    .await;
    (vec![a, b], gw)
}

/// A stream of 10 chunks 20 ms apart: whether it broke.
async fn stream_broke(gw: &Gateway) -> bool {
    let r = client()
        .post(gw.url("/api/generate"))
        .header("x-mock-chunks", "10")
        .header("x-mock-delay-ms", "20")
        .json(&streamed(MODEL))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.is_err()
}

/// Review: a backend that breaks every stream after its first bytes (a runner that crashes
/// mid-generation) stayed in under one caller: its first bytes to each request counted as
/// serving, which explained the request's own break.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_breaks_every_stream_is_taken_out_under_one_caller() {
    let (_m, gw) = a_breaks_b_works().await;
    // One after another: three broken streams take it out.
    let mut broken = 0;
    for _ in 0..10 {
        broken += usize::from(stream_broke(&gw).await);
    }
    assert_eq!(broken, 3, "three broken streams took it out");
    let h = gw.health().await;
    assert_eq!(h["backends"][0]["state"], "down");
    // Out on failures its requests may have caused: it stands by for what b cannot take.
    assert_eq!(h["backends"][0]["standby"], true, "{h}");
    assert!(h["backends"][1].get("standby").is_none(), "{h}");
    assert_eq!(
        gw.metric("llm_gateway_backend_standby{backend=\"a\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        gw.metric("llm_gateway_backend_standby{backend=\"b\"}")
            .await,
        Some(0.0)
    );
    // Overlapping (review): other streams' first bytes on it while one breaks explain
    // nothing; a burst's breaks count once in full, the next burst's again.
    let (_m, gw) = a_breaks_b_works().await;
    let mut rounds = 0;
    while gw.health().await["backends"][0]["state"] == "up" {
        rounds += 1;
        assert!(
            rounds <= 4,
            "still in after {} overlapping rounds",
            rounds - 1
        );
        futures_util::future::join_all((0..6).map(|_| stream_broke(&gw))).await;
    }
    assert!(rounds >= 2, "one burst's breaks counted in full each");
}

/// Review: a write the backend broke off (a head with more headers than it takes, a body it
/// stops reading) counted against it in full, unbounded, on every backend it was retried on:
/// one client's requests took every backend out. Such a failure may be the request's doing:
/// judged like a missed deadline (here: several backends, so once per caller).
#[tokio::test(flavor = "multi_thread")]
async fn writes_the_backends_break_off_do_not_take_them_all_out() {
    // Backends that read a little of each request and close the connection.
    let mut urls = Vec::new();
    for _ in 0..3 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        urls.push(format!("http://{}", l.local_addr().unwrap()));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                });
            }
        });
    }
    let gw = Gateway::start(&format!(
        "{}limits: {{ max_body: 8MiB }}\nrouting: {{ strategy: round-robin, cooldown: 30s, discovery: {{ enabled: false }}, health: {{ enabled: false }} }}\n",
        backends(&[("a", &urls[0]), ("b", &urls[1]), ("c", &urls[2])])
    ))
    .await;
    let body = json!({"model": MODEL, "prompt": "x".repeat(4 << 20), "stream": false});
    for i in 0..4 {
        let r = client()
            .post(gw.url("/api/generate"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502, "request {i}");
    }
    let h = gw.health().await;
    for b in h["backends"].as_array().unwrap() {
        assert_eq!(b["state"], "up", "{h}");
    }
}

/// Review: a request slow everywhere (700 ms to its first byte) missed the 300 ms deadline
/// on the two backends that have its model loaded and was answered by the third under the
/// cold-start deadline: that answer "confirmed" both misses, and three such requests of one
/// client took two backends of three out. An answer clears a request only when it began
/// sooner than a backend had waited when it missed it.
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_under_a_longer_deadline_does_not_blame_the_backends_that_missed() {
    const QWEN: &str = "qwen2.5:7b";
    // The mock's /api/ps lists its first model: a and b have qwen loaded, c has it cold.
    let m = mocks([&[QWEN, MODEL], &[QWEN, MODEL], &[MODEL, QWEN]]).await;
    let gw = Gateway::start(&format!(
        "{}routing: {{ strategy: round-robin, first_byte_timeout: 300ms, cold_start_timeout: 5s, cooldown: 30s, discovery: {{ interval: 100ms }}, health: {{ enabled: false }} }}\n",
        three(&m)
    ))
    .await;
    // Model lists known, then a whole discovery round more: each backend's /api/ps read.
    discovered(&gw, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..4 {
        let r = send_streamed(&gw, QWEN, 700).await;
        assert_eq!(r.status(), 200, "request {i}");
        r.bytes().await.unwrap();
    }
    assert_eq!(
        gw.metric("llm_gateway_first_byte_timeouts_total{backend=\"a\"}")
            .await,
        Some(4.0),
        "each went to a and b first"
    );
    let h = gw.health().await;
    for b in h["backends"].as_array().unwrap() {
        assert_eq!(b["state"], "up", "{h}");
    }
}

// Slow starts: a model the backend has not loaded (not in /api/ps) gets the cold-start
// deadline; a loaded one the first-byte deadline.
#[tokio::test(flavor = "multi_thread")]
async fn a_cold_model_gets_the_longer_deadline() {
    // The mock's /api/ps lists its first model only: llama3.1:8b is loaded, qwen2.5:7b cold.
    let m = mock_with(MockConfig {
        first_byte_delay: Duration::from_millis(700),
        ..MockConfig::default()
    })
    .await;
    let gw = Gateway::start(&format!(
        "{}routing: {{ first_byte_timeout: 300ms, cold_start_timeout: 5s, discovery: {{ interval: 100ms }}, health: {{ enabled: false }} }}\n",
        backends(&[("local", &m.url())])
    ))
    .await;
    // Wait for discovery to have read /api/ps.
    for _ in 0..100 {
        if m.hits("/api/ps") > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = client();
    let r = c
        .post(gw.url("/api/generate"))
        .json(&streamed("qwen2.5:7b"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a cold load is expected, not a failure");
    let r = c
        .post(gw.url("/api/generate"))
        .json(&streamed(MODEL))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504, "a loaded model has no excuse");
    // A whole (non-streamed) answer starts when the generation ends: no first-byte deadline.
    let r = c
        .post(gw.url("/api/generate"))
        .json(&gen(MODEL))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

// Probes and discovery leave a busy backend alone (llama-cpp-python cuts a running stream
// short when any other request arrives).
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_backend_is_not_polled() {
    let m = mock_with(MockConfig {
        chunks: 12,
        chunk_delay: Duration::from_millis(100),
        ..MockConfig::default()
    })
    .await;
    // An OpenAI-compatible backend (llama-cpp-python's kind): neither probed nor discovered
    // while busy.
    let gw = Gateway::start(&format!(
        "backends:\n  - {{ name: local, url: '{}', kind: openai }}\nrouting: {{ discovery: {{ interval: 50ms }}, health: {{ interval: 50ms }} }}\n",
        m.url()
    ))
    .await;
    let polls = |m: &mock_ollama::MockServer| m.hits("/v1/models");
    for _ in 0..100 {
        if polls(&m) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = gw.url("/v1/completions");
    let stream = tokio::spawn(async move {
        client()
            .post(url)
            .json(&json!({"model": MODEL, "prompt": "x", "stream": true}))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    for _ in 0..100 {
        if m.hits("/v1/completions") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let during = polls(&m);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(polls(&m), during, "no poll while the stream runs");
    stream.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(polls(&m) > during, "polling resumes once it is idle");
}

/// An OpenAI chat stream through the gateway: the whole body, as the client received it.
async fn openai_stream(gw: &Gateway) -> String {
    client()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

// Slow starts: SSE keep-alive comments while the backend loads, then the real events,
// unchanged, also for the official openai client.
#[tokio::test(flavor = "multi_thread")]
async fn sse_keepalives_hold_a_slow_stream_open() {
    let m = mock_with(MockConfig {
        first_byte_delay: Duration::from_millis(1100),
        ..MockConfig::default()
    })
    .await;
    let gw = Gateway::start(&format!(
        "{}routing: {{ sse_keepalive: 300ms, discovery: {{ enabled: false }}, health: {{ enabled: false }} }}\n",
        backends(&[("local", &m.url())])
    ))
    .await;
    let text = openai_stream(&gw).await;
    let (before, events) = text.split_once("data: ").expect("events follow");
    assert!(
        (2..=4).contains(&before.matches(": keep-alive\n\n").count()),
        "a comment every 300 ms for 1.1 s: {before:?}"
    );
    assert!(
        events.contains("tok4") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    // The official client reads through the comments.
    let url = gw.url("/v1");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", "import sys, openai\nc = openai.OpenAI(base_url=sys.argv[1], api_key='x')\nparts = [ch.choices[0].delta.content or '' for ch in c.chat.completions.create(model='llama3.1:8b', messages=[{'role': 'user', 'content': 'hi'}], stream=True) if ch.choices]\nprint(''.join(parts))", &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("tok0 tok1"),
        "{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// Slow starts: once a keep-alive went out, nothing is retried (the client has its 200); a
// deadline that passes before the first keep-alive still fails over.
#[tokio::test(flavor = "multi_thread")]
async fn keepalives_and_failover_exclude_each_other() {
    let a = mock().await;
    let b = mock().await;
    a.set_fail(FailMode::Hang);
    let both = backends(&[("a", &a.url()), ("b", &b.url())]);
    // Keep-alives every 100 ms, deadline 500 ms: keep-alives went out, so no failover; the
    // stream ends with an error event.
    let gw = Gateway::start(&format!(
        "{both}routing: {{ strategy: round-robin, sse_keepalive: 100ms, first_byte_timeout: 500ms, discovery: {{ enabled: false }}, health: {{ enabled: false }} }}\n"
    ))
    .await;
    let text = openai_stream(&gw).await;
    assert!(text.starts_with(": keep-alive\n\n"), "{text}");
    assert!(
        text.contains("\n\ndata: {\"error\":{") && text.contains("\"code\":\"first_byte_timeout\""),
        "the failure is the stream's last event: {text}"
    );
    assert_eq!(b.hits("/v1/chat/completions"), 0, "not sent twice");
    drop(gw);
    // Deadline 300 ms before the first keep-alive at 2 s: failover as usual.
    let gw = Gateway::start(&format!(
        "{both}routing: {{ strategy: round-robin, sse_keepalive: 2s, first_byte_timeout: 300ms, discovery: {{ enabled: false }}, health: {{ enabled: false }} }}\n"
    ))
    .await;
    let text = openai_stream(&gw).await;
    assert!(
        !text.contains("keep-alive") && text.contains("tok4"),
        "{text}"
    );
    assert_eq!(b.hits("/v1/chat/completions"), 1);
}

/// A backend that answers `100 Continue` without end (or switches protocols unasked) is an
/// error at once, not a request held until the read deadline (attacker review, 2026-12-04).
#[tokio::test(flavor = "multi_thread")]
async fn informational_answers_without_end_are_an_error_not_a_hold() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for endless in [true, false] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    let _ = s.read(&mut buf).await;
                    if endless {
                        loop {
                            if s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n")
                        .await;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                });
            }
        });
        let gw = Gateway::start(&format!(
            "{}limits: {{ read_timeout: 20s }}\nrouting: {{ retries: 0 }}\n",
            backends(&[("odd", &format!("http://127.0.0.1:{port}"))])
        ))
        .await;
        let start = Instant::now();
        let resp = client()
            .post(gw.url("/api/chat"))
            .json(&json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 502, "endless 100s: {endless}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "answered after {:?}",
            start.elapsed()
        );
        error_of(resp).await;
    }
}

// A client that half-closes (or closes) its connection while keep-alive comments hold its
// stream open is seen through the socket's TCP state: its keep-alive writes still succeed
// after a half-close, so without that the backend's slot was held to the generation's end.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_during_keepalives_frees_the_backend() {
    use tokio::io::AsyncWriteExt;
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "{}routing: {{ sse_keepalive: 150ms, discovery: {{ enabled: false }}, health: {{ enabled: false }} }}\n",
        backends(&[("local", &m.url())])
    ))
    .await;
    let body = json!({"model": "llama3.1:8b", "stream": true, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let mut s = post_raw(
        gw.port,
        "/v1/chat/completions",
        "x-mock-first-byte-ms: 4000\r\n",
        &body,
        "",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(gw.backend_in_flight("local").await, 1.0, "under way");
    s.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        gw.backend_in_flight("local").await,
        0.0,
        "the backend's slot is still held"
    );
}

// Review: a backend that sent its stream's last event and then never ended its body (its
// read deadline passed) was counted as failing and the client's complete answer aborted.
// The answer is ended cleanly now, and the backend keeps its health.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_stalling_after_the_stream_s_end_neither_fails_nor_cuts_the_answer() {
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "{}limits: {{ read_timeout: 300ms }}\nrouting: {{ fail_threshold: 1, health: {{ enabled: false, interval: 1h }} }}\n",
        backends(&[("stalls", &m.url())])
    ))
    .await;
    for path in ["/api/chat", "/v1/chat/completions"] {
        let resp = client()
            .post(gw.url(path))
            .header("x-mock-chunks", "3")
            .header("x-mock-end-delay-ms", "1500")
            .json(&json!({"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let body = resp.text().await.expect("a whole body, not a cut one");
        assert!(
            body.contains("[DONE]") || body.contains("\"done\":true"),
            "{path}: {body}"
        );
    }
    // Still up: with fail_threshold 1 a counted failure would have taken it out.
    assert_eq!(
        gw.metric("llm_gateway_backend_up{backend=\"stalls\"}")
            .await,
        Some(1.0)
    );
    let resp = client()
        .post(gw.url("/api/chat"))
        .json(&json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
