//! Routing across three mock backends through the real binary: distribution, usage, model
//! residency, model-aware choice, failover without client-visible errors, cooldown, probes.

use std::time::{Duration, Instant};

use crate::support::routing::*;
use crate::support::*;
use serde_json::{json, Value};

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
