//! Proxy behaviour of the real binary against the mock model server.

use std::time::{Duration, Instant};

use crate::support::*;
use futures_util::StreamExt;
use mock_ollama::FailMode;
use serde_json::{json, Value};

const MODEL: &str = "llama3.1:8b";

/// (path, body) for every inference route; the mock counts one prompt token per word.
fn inference_routes() -> Vec<(&'static str, serde_json::Value)> {
    let msgs = json!([{"role": "user", "content": "why is the sky blue"}]);
    vec![
        ("/api/chat", json!({"model": MODEL, "messages": msgs})),
        (
            "/api/chat",
            json!({"model": MODEL, "messages": msgs, "stream": false}),
        ),
        (
            "/api/generate",
            json!({"model": MODEL, "prompt": "why is the sky blue"}),
        ),
        (
            "/api/generate",
            json!({"model": MODEL, "prompt": "why is the sky blue", "stream": false}),
        ),
        (
            "/api/embed",
            json!({"model": MODEL, "input": "why is the sky blue"}),
        ),
        (
            "/api/embeddings",
            json!({"model": MODEL, "prompt": "why is the sky blue"}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": msgs}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": msgs, "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "why is the sky blue"}),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "why is the sky blue", "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/embeddings",
            json!({"model": MODEL, "input": "why is the sky blue"}),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_inference_route_is_proxied_unchanged_with_usage() {
    let m = mock().await;
    let gw = Gateway::start(&backends(&[("local", &m.url())])).await;
    let c = client();
    for (path, body) in inference_routes() {
        let direct = c
            .post(format!("{}{path}", m.url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        let direct_ct = direct.headers()["content-type"].clone();
        let direct_body = direct.bytes().await.unwrap();

        let before = m.hits(path);
        let resp = c.post(gw.url(path)).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["content-type"], direct_ct, "{path}");
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(id.len(), 32);
        let got = resp.bytes().await.unwrap();
        assert_eq!(got, direct_body, "{path}: body differs from the backend's");
        assert_eq!(m.hits(path), before + 1);

        let line = gw.access_line(&id).await;
        assert_eq!(field(&line, "status"), "200");
        assert_eq!(field(&line, "model"), MODEL);
        assert_eq!(field(&line, "backend"), "local");
        // Usage is in every format except the legacy /api/embeddings (no counts there) and
        // completion tokens are 0 for embeddings.
        let (p, c_tok) = (
            field(&line, "prompt_tokens"),
            field(&line, "completion_tokens"),
        );
        match path {
            "/api/embeddings" => assert_eq!((p, c_tok), ("-1", "-1"), "{line}"),
            "/api/embed" => assert_eq!((p, c_tok), ("5", "0"), "{line}"),
            "/v1/embeddings" => assert_eq!((p, c_tok), ("5", "0"), "{line}"),
            _ => assert_eq!((p, c_tok), ("5", "5"), "{path}: {line}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn model_lists_and_other_routes_are_forwarded_unchanged() {
    let m = mock().await;
    let gw = Gateway::start(&backends(&[("local", &m.url())])).await;
    let c = client();
    for path in ["/api/tags", "/v1/models", "/api/version", "/api/ps"] {
        let direct = c
            .get(format!("{}{path}", m.url()))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let resp = c.get(gw.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().contains_key("x-request-id"));
        assert_eq!(resp.bytes().await.unwrap(), direct, "{path}");
    }
    // Query strings and headers reach the backend; the Host is the backend's own.
    let resp = c
        .get(gw.url("/v1/models?x=1"))
        .header("x-custom", "yes")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = m.requests().into_iter().last().unwrap();
    let h = |k: &str| {
        seen.headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(h("x-custom").as_deref(), Some("yes"));
    assert_eq!(h("host").as_deref(), Some(m.addr().to_string().as_str()));
    assert_eq!(h("accept-encoding").as_deref(), Some("identity"));
}

/// Reads a streamed response and returns the arrival time of each chunk.
async fn arrivals(resp: reqwest::Response, start: Instant) -> (Vec<Duration>, Vec<u8>) {
    let mut times = Vec::new();
    let mut all = Vec::new();
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.unwrap();
        times.push(start.elapsed());
        all.extend_from_slice(&chunk);
    }
    (times, all)
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_stream_chunk_by_chunk() {
    let m = mock().await;
    let gw = Gateway::start(&backends(&[("local", &m.url())])).await;
    let c = client();
    let cases = [
        (
            "/api/chat",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ];
    for (path, body) in cases {
        let start = Instant::now();
        let resp = c
            .post(gw.url(path))
            .header("x-mock-chunks", "6")
            .header("x-mock-delay-ms", "150")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let (times, body) = arrivals(resp, start).await;
        let first = times[0];
        let last = *times.last().unwrap();
        // The mock sends 7 pieces 150 ms apart (~900 ms): the first must arrive long before
        // the mock is done, and the pieces must arrive spread out, not in one lump.
        assert!(last >= Duration::from_millis(850), "{path}: total {last:?}");
        assert!(
            first < Duration::from_millis(400),
            "{path}: first chunk after {first:?}"
        );
        assert!(times.len() >= 5, "{path}: only {} reads", times.len());
        assert!(String::from_utf8_lossy(&body).contains("tok5"), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn large_body_is_forwarded_whole_and_replayed_after_connect_failure() {
    let m = mock().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    // Round-robin starts at the dead backend, so the body must be replayed to the second.
    let gw = Gateway::start(&backends(&[("dead", &dead), ("live", &m.url())])).await;
    let filler = "word ".repeat(900 * 1024 / 5);
    let body =
        json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": filler}]});
    let raw = serde_json::to_vec(&body).unwrap();
    assert!(
        raw.len() > 900 * 1024 && raw.len() < 1 << 20,
        "{}",
        raw.len()
    );
    let resp = client()
        .post(gw.url("/api/chat"))
        .header("content-type", "application/json")
        .body(raw.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["prompt_eval_count"], 900 * 1024 / 5);
    let seen = m.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].body_len,
        raw.len(),
        "the backend got the whole body"
    );
    assert_eq!(seen[0].model.as_deref(), Some(MODEL));
    let line = gw.access_line(&id).await;
    assert_eq!(field(&line, "backend"), "live");
    assert_eq!(field(&line, "retries"), "1");
    // The attempt moved away from the dead backend is counted against it.
    assert_eq!(
        gw.metric("llm_gateway_retries_total{backend=\"dead\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_bodies_get_413_json_and_never_reach_the_backend() {
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "{}limits: {{ max_body: 64KiB }}\n",
        backends(&[("local", &m.url())])
    ))
    .await;
    let c = client();
    let big = format!(
        "{{\"model\":\"{MODEL}\",\"prompt\":\"{}\"}}",
        "x".repeat(70 * 1024)
    );
    // With Content-Length.
    let resp = c
        .post(gw.url("/api/generate"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(error_of(resp).await.0, "request_too_large");
    // Chunked, no Content-Length: the cap applies to what actually arrives.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big
        .into_bytes()
        .chunks(8192)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let resp = c
        .post(gw.url("/api/generate"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(error_of(resp).await.0, "request_too_large");
    assert_eq!(m.total(), 0);
    // Just under the cap passes.
    let ok = format!(
        "{{\"model\":\"{MODEL}\",\"prompt\":\"{}\",\"stream\":false}}",
        "x".repeat(60 * 1024)
    );
    let resp = c
        .post(gw.url("/api/generate"))
        .header("content-type", "application/json")
        .body(ok)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// Attacker review: a body the gateway writes again (an output cap written into every token
/// field) had its numbers written in full (`1e15` as `1000000000000000.0`): 60 KiB of them
/// under a 64 KiB `max_body` reached the backend as 228 KiB. Written again, a body keeps to
/// the limit (and the few fields the gateway adds), on both wire formats.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_written_again_keeps_to_max_body() {
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "{}limits: {{ max_body: 64KiB }}\nfilters:\n  - use: policy\n    max_output_tokens: 100\n",
        backends(&[("local", &m.url())])
    ))
    .await;
    let c = client();
    let numbers = vec!["1e15"; 12_000].join(",");
    for (path, body) in [
        (
            "/v1/chat/completions",
            format!("{{\"model\":\"{MODEL}\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"stream\":false,\"x\":[{numbers}]}}"),
        ),
        (
            "/api/generate",
            format!("{{\"model\":\"{MODEL}\",\"prompt\":\"hi\",\"stream\":false,\"x\":[{numbers}]}}"),
        ),
    ] {
        assert!(body.len() < 64 * 1024);
        let resp = c
            .post(gw.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 413, "{path}");
        assert_eq!(error_of(resp).await.0, "request_too_large", "{path}");
    }
    assert_eq!(m.total(), 0);
    // A body near the limit that is written again (its cap added) still passes.
    for (path, body) in [
        (
            "/v1/chat/completions",
            format!("{{\"model\":\"{MODEL}\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}],\"stream\":false}}", "x".repeat(63 * 1024)),
        ),
        (
            "/api/generate",
            format!("{{\"model\":\"{MODEL}\",\"prompt\":\"{}\",\"stream\":false}}", "x".repeat(63 * 1024)),
        ),
    ] {
        let resp = c
            .post(gw.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    let seen = m.requests();
    assert_eq!(seen.len(), 2);
    assert!(seen
        .iter()
        .all(|r| r.body_len > 63 * 1024 && r.body_len < 64 * 1024 + 4096));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_json_gets_400_with_position() {
    let m = mock().await;
    let gw = Gateway::start(&backends(&[("local", &m.url())])).await;
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .body("{\"model\": \"m\",\n  oops}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let (code, msg) = error_of(resp).await;
    assert_eq!(code, "invalid_json");
    assert!(msg.contains("line 2 column 3"), "{msg}");
    assert_eq!(m.total(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_is_answered_by_the_gateway() {
    let m = mock().await;
    let gw = Gateway::start(&backends(&[("local", &m.url())])).await;
    let resp = client().get(gw.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        json!({"status": "ok", "state": "local", "backends": [{"name": "local", "kind": "ollama", "state": "up"}]})
    );
    assert_eq!(m.total(), 0, "/health must not be proxied");
}

#[tokio::test(flavor = "multi_thread")]
async fn request_ids_are_unique_and_forwarded() {
    let m = mock().await;
    let gw = Gateway::start(&backends(&[("local", &m.url())])).await;
    let c = client();
    let mut ids = std::collections::HashSet::new();
    for _ in 0..20 {
        let resp = c
            .post(gw.url("/api/generate"))
            .header("x-request-id", "client-chosen")
            .json(&json!({"model": MODEL, "prompt": "x", "stream": false}))
            .send()
            .await
            .unwrap();
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        assert_ne!(id, "client-chosen");
        ids.insert(id);
    }
    assert_eq!(ids.len(), 20);
    let upstream_ids: std::collections::HashSet<String> = m
        .requests()
        .iter()
        .filter_map(|r| {
            r.headers
                .iter()
                .find(|(k, _)| k == "x-request-id")
                .map(|(_, v)| v.clone())
        })
        .collect();
    assert_eq!(
        upstream_ids, ids,
        "the backend sees the same ids as the client"
    );
    // Errors carry one too.
    let resp = c
        .post(gw.url("/api/chat"))
        .body("nope")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().contains_key("x-request-id"));
}

#[tokio::test(flavor = "multi_thread")]
async fn round_robin_spreads_over_backends() {
    let a = mock().await;
    let b = mock().await;
    let gw = Gateway::start(&format!(
        "{}routing: {{ strategy: round-robin, discovery: {{ enabled: false }}, health: {{ enabled: false }} }}\n",
        backends(&[("a", &a.url()), ("b", &b.url())])
    ))
    .await;
    let c = client();
    let mut order = Vec::new();
    for _ in 0..10 {
        let r = c
            .post(gw.url("/api/generate"))
            .json(&json!({"model": MODEL, "prompt": "x", "stream": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        order.push(
            if a.hits("/api/generate") > order.iter().filter(|b| **b == 'a').count() as u64 {
                'a'
            } else {
                'b'
            },
        );
    }
    // Strictly alternating: round-robin, not whichever backend happens to score lower.
    assert!(
        order.windows(2).all(|w| w[0] != w[1]),
        "{}",
        order.iter().collect::<String>()
    );
    assert_eq!((a.hits("/api/generate"), b.hits("/api/generate")), (5, 5));
    // One goes away: everything goes to the other, nothing fails.
    a.set_fail(FailMode::Refuse);
    for _ in 0..6 {
        let r = c
            .post(gw.url("/api/generate"))
            .json(&json!({"model": MODEL, "prompt": "x", "stream": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(b.hits("/api/generate"), 11);
}

/// An HTTP/1 client that gives up on a generation frees the backend at once, whether it
/// closes its connection or only its sending side (as nginx and Ollama's Go server read a
/// half-close): the request's task used to wait for the whole generation, holding the backend's
/// slot, and the backend kept generating for nobody. Bytes after the request do not hide a
/// close behind them, and are not taken for leaving: a pipelined request's client still gets
/// its answer.
#[tokio::test]
async fn an_http1_client_that_gives_up_frees_the_backend_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = mock().await;
    let gw = Gateway::start(&backends(&[("local", &m.url())])).await;
    let body = json!({"model": MODEL, "prompt": "hi", "stream": false}).to_string();
    let waits = |ms: u64| format!("x-mock-first-byte-ms: {ms}\r\n");
    // Closed; half-closed; closed behind a byte that a peek would see first.
    for (how, trailer, half_close) in [
        ("closed", "", false),
        ("half-closed", "", true),
        ("closed behind a stray byte", "\n", false),
    ] {
        let mut s = post_raw(gw.port, "/api/generate", &waits(4000), &body, trailer).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            gw.backend_in_flight("local").await,
            1.0,
            "the generation is under way"
        );
        if half_close {
            s.shutdown().await.unwrap();
        } else {
            drop(s);
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            gw.backend_in_flight("local").await,
            0.0,
            "{how}: the backend's slot is still held"
        );
    }
    // The start of a next request behind the first: the first is answered all the same.
    let mut s = post_raw(
        gw.port,
        "/api/generate",
        &waits(500),
        &body,
        "GET /health HTTP/1.1\r\n",
    )
    .await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let t = Instant::now();
    while !String::from_utf8_lossy(&got).contains("\"done\":true")
        && t.elapsed() < Duration::from_secs(5)
    {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        t.elapsed() >= Duration::from_millis(450),
        "answered after the backend's wait"
    );
}

/// A client that leaves while its request waits in the queue for a busy backend gives its
/// place back at once: the queue holds one, so the next client is queued (and answered)
/// instead of being refused as if the one who left were still waiting.
#[tokio::test]
async fn a_client_that_leaves_the_queue_gives_its_place_back() {
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "backends:\n  - {{ name: local, url: '{}', kind: ollama, max_in_flight: 1 }}\nrouting: {{ queue: {{ size: 1, timeout: 5s }} }}\n",
        m.url()
    ))
    .await;
    let body = json!({"model": MODEL, "prompt": "hi", "stream": false});
    let c = client();
    let busy = {
        let (c, url, body) = (c.clone(), gw.url("/api/generate"), body.clone());
        tokio::spawn(async move {
            c.post(url)
                .header("x-mock-first-byte-ms", "1500")
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queued = post_raw(gw.port, "/api/generate", "", &body.to_string(), "").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(queued);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = c
        .post(gw.url("/api/generate"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(busy.await.unwrap(), 200);
}

/// Reads one whole answer (head and Content-Length body) from `s`: its head and body.
async fn read_answer(s: &mut tokio::net::TcpStream) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return (head.to_string(), body.to_string());
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn expect_100_continue_keeps_the_connection_and_is_for_http_1_1_only() {
    use tokio::io::AsyncWriteExt;
    let m = mock().await;
    let gw = Gateway::start(&backends(&[("local", &m.url())])).await;
    let body = serde_json::to_string(&chat()).unwrap();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    for i in 0..2 {
        let head = format!(
            "POST /api/chat HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // The interim answer first (curl waits for it before it sends a body over 1 KiB).
        let (interim, _) = read_answer(&mut s).await;
        assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
        s.write_all(body.as_bytes()).await.unwrap();
        let (head, answer) = read_answer(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "request {i}: {head}");
        // Asking leave does not cost the connection its keep-alive (it did).
        assert!(
            head.to_ascii_lowercase().contains("connection: keep-alive"),
            "request {i}: {head}"
        );
        assert!(answer.contains("\"done\":true"), "{answer}");
    }
    assert_eq!(m.hits("/api/chat"), 2);
    // An HTTP/1.0 client sends its body at once and reads no interim answer (RFC 9110
    // §10.1.1: the expectation is ignored).
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    let request = format!(
        "POST /api/chat HTTP/1.0\r\nHost: gw\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let (head, _) = read_answer(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// Sends a streamed `/api/chat` of `body` by hand (`extra`: header lines) and reads the
/// start of its `200` answer.
async fn start_chat(s: &mut tokio::net::TcpStream, extra: &str, body: &Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let head = format!(
        "POST /api/chat HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 512];
    let n = s.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
}

/// The last line of the audit log once it has `n` lines (`null` if it never gets there).
async fn audit_line(audit: &std::path::Path, n: usize) -> Value {
    for _ in 0..100 {
        let text = std::fs::read_to_string(audit).unwrap_or_default();
        if text.lines().count() >= n {
            if let Some(l) = text.lines().last() {
                return serde_json::from_str(l).unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Value::Null
}

/// Billing review: a client that stops reading a stream (its receive window full) and then
/// leaves was charged only what had passed: while the gateway's write to it was blocked, the
/// backend went on generating into the buffers between them. What is already there, the
/// finished answer's usage among it, is read before the backend's connection is dropped.
#[tokio::test]
async fn a_client_that_stops_reading_is_charged_what_the_backend_generated() {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: audit\n    file: {}\n",
        backends(&[("local", &m.url())]),
        audit.display()
    ))
    .await;
    const CHUNKS: u64 = 60_000;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock
        .connect(format!("127.0.0.1:{}", gw.port).parse().unwrap())
        .await
        .unwrap();
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    start_chat(&mut s, &format!("x-mock-chunks: {CHUNKS}\r\n"), &body).await;
    // Reads nothing more while the backend fills the buffers between them, then leaves.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.set_zero_linger().unwrap();
    drop(s);
    let line = audit_line(&audit, 1).await;
    assert_eq!(line["decision"], "failed:client_disconnected", "{line}");
    assert_eq!(line["completion_tokens"], CHUNKS, "{line}");
}

/// Billing review: a client that left a stream offering tools was charged what had passed,
/// while the backend may have been writing a tool call it streams only once whole (Ollama):
/// the reservation is charged instead. Without tools, what passed stands.
#[tokio::test]
async fn leaving_a_stream_that_offers_tools_is_charged_its_reservation() {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: policy\n    max_output_tokens: 100\n  - use: budget\n    ledger: {}\n    prices: [{{ model: '*', prompt_per_1m: 0, completion_per_1m: 1000000 }}]\n    global: {{ max_usd: 100000, period: 1d }}\n  - use: audit\n    file: {}\n",
        backends(&[("local", &m.url())]),
        dir.path().join("spend.db").display(),
        audit.display()
    ))
    .await;
    let mut costs = Vec::new();
    let offered =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    // No tools; an empty list (clients send one by default: no tools offered); a tool.
    for tools in [None, Some(json!([])), Some(offered)] {
        let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
        if let Some(t) = tools {
            body["tools"] = t;
        }
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
            .await
            .unwrap();
        start_chat(
            &mut s,
            "x-mock-chunks: 50\r\nx-mock-delay-ms: 100\r\n",
            &body,
        )
        .await;
        s.set_zero_linger().unwrap();
        drop(s);
        let line = audit_line(&audit, costs.len() + 1).await;
        assert_eq!(line["decision"], "failed:client_disconnected", "{line}");
        costs.push(line["cost_usd"].as_f64().unwrap());
    }
    // What passed (a token or a few, within the 1 s read after the client left), against
    // the whole reservation: 100 output tokens at $1.
    assert!(costs[0] < 20.0 && costs[1] < 20.0, "{costs:?}");
    assert!(costs[2] >= 100.0, "{costs:?}");
}
