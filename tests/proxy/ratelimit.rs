//! Rate limits through the real binary: the nginx seed case, a steady offered rate,
//! concurrency caps (with client disconnects) and tokens per minute.

use std::time::{Duration, Instant};

use crate::support::*;
use futures_util::StreamExt;
use serde_json::json;

const KEY: &str = DEMO_KEY;

#[tokio::test(flavor = "multi_thread")]
async fn seed_case_fifty_quick_requests_six_pass() {
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: ratelimit\n    key: ip\n    rate: 10/m\n    burst: 5\n    mode: nodelay\n",
        backends(&[("local", &m.url())])
    ))
    .await;
    let c = client();
    let (mut ok, mut limited) = (0, 0);
    for i in 0..50 {
        let r = c
            .post(gw.url("/api/chat"))
            .json(&chat())
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-ratelimit-limit"], "6", "request {i}");
        match r.status().as_u16() {
            200 => {
                ok += 1;
                assert_eq!(
                    r.headers()["x-ratelimit-remaining"].to_str().unwrap(),
                    (5 - i).to_string()
                );
            }
            429 => {
                limited += 1;
                let retry: u64 = r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=6).contains(&retry), "Retry-After {retry}");
                assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
                let (code, msg) = error_of(r).await;
                assert_eq!(code, "rate_limit_exceeded");
                assert!(msg.contains("request rate"), "{msg}");
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!((ok, limited), (6, 44));
    assert_eq!(m.total(), 6, "refused requests never reach the backend");
}

#[tokio::test(flavor = "multi_thread")]
async fn steady_offered_rate_allows_the_theoretical_count() {
    for mode in ["nodelay", "delay"] {
        let m = mock().await;
        let gw = Gateway::start(&format!(
            "{}filters:\n  - use: ratelimit\n    key: ip\n    rate: 10/s\n    burst: 2\n    mode: {mode}\n",
            backends(&[("local", &m.url())])
        ))
        .await;
        let c = client();
        // Offer 25/s for 2 s (50 requests, 40 ms apart), each on its own task so a delayed one
        // does not hold back the next.
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..50u32 {
            let at = start + Duration::from_millis(40 * u64::from(i));
            tokio::time::sleep_until(at.into()).await;
            let (c, url) = (c.clone(), gw.url("/api/generate"));
            tasks.push(tokio::spawn(async move {
                c.post(url)
                    .json(&json!({"model": "llama3.1:8b", "prompt": "x", "stream": false}))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }));
        }
        let span = start.elapsed();
        let mut allowed = 0;
        for t in tasks {
            if t.await.unwrap() == 200 {
                allowed += 1;
            }
        }
        // burst + 1 at once, then one per 100 ms of the span.
        let theory = 3 + (span.as_millis() / 100) as i64;
        assert!(
            (allowed - theory).abs() <= 1,
            "{mode}: allowed {allowed}, theory {theory} over {span:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn in_flight_cap_counts_streams_and_frees_slots_on_disconnect() {
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n  - use: ratelimit\n    key: api_key\n    max_in_flight: 2\n",
        backends(&[("local", &m.url())]),
        conf("keys.yaml")
    ))
    .await;
    let c = client();
    let slow = || {
        c.post(gw.url("/api/chat"))
            .bearer_auth(KEY)
            .header("x-mock-chunks", "10")
            .header("x-mock-delay-ms", "100")
            .json(&json!({"model": "llama3.1:8b", "messages": []}))
            .send()
    };
    let a = slow().await.unwrap();
    let b = slow().await.unwrap();
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let third = slow().await.unwrap();
    assert_eq!(
        third.status(),
        429,
        "N+1 concurrent streams: exactly one refused"
    );
    assert!(error_of(third).await.1.contains("concurrency"));
    // One stream finishes: a new one passes.
    a.bytes().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let d = slow().await.unwrap();
    assert_eq!(d.status(), 200);
    // A client that walks away mid-stream frees its slot.
    let mut s = d.bytes_stream();
    let _ = s.next().await;
    drop(s);
    drop(b);
    let mut freed = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let e = slow().await.unwrap();
        if e.status() == 200 {
            freed = true;
            break;
        }
    }
    assert!(freed, "slots of disconnected clients come back");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_per_minute_refuses_once_usage_adds_up() {
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n  - use: ratelimit\n    key: api_key\n    tokens_per_minute: 25\n    output_reserve: 5\n",
        backends(&[("local", &m.url())]),
        conf("keys.yaml")
    ))
    .await;
    let c = client();
    // Each request names no output limit: it is given 5 (`output_reserve`) and holds 1 prompt
    // + 5 output tokens, and uses as much (the mock's counts): 4 pass (the 4th starts at 18
    // used), then the window has no room for another 6.
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let r = c
            .post(gw.url("/api/chat"))
            .bearer_auth(KEY)
            .json(&chat())
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            assert!(
                r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    <= 60
            );
            assert!(error_of(r).await.1.contains("token limit"));
        } else {
            r.bytes().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429, 429]);
    // The reserved output cap counts before the request: a big cap is refused at once.
    let r = c
        .post(gw.url("/api/chat"))
        .bearer_auth(KEY)
        .json(&json!({"model": "llama3.1:8b", "messages": [], "options": {"num_predict": 1000}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
}

#[tokio::test(flavor = "multi_thread")]
async fn per_ip_before_auth_and_per_key_after() {
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: ratelimit\n    key: ip\n    rate: 100/m\n    burst: 3\n  - use: auth\n    keys_file: {}\n  - use: ratelimit\n    key: api_key\n    rate: 100/m\n    burst: 1\n",
        backends(&[("local", &m.url())]),
        conf("keys.yaml")
    ))
    .await;
    let c = client();
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(
            c.post(gw.url("/api/chat"))
                .bearer_auth(KEY)
                .json(&chat())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    // The per-key limiter (burst 1) refuses the 3rd; the per-IP one (burst 3) the 5th anyway.
    assert_eq!(codes, [200, 200, 429, 429, 429]);
    // Unauthenticated floods are cut by the per-IP limiter before any key check.
    let r = c
        .post(gw.url("/api/chat"))
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
}

/// A backend's own error answer, passed to the client because no other backend could take
/// the request, generated nothing: its tokens-per-minute hold is given back, as the budget
/// charges it nothing. (It used to keep the whole hold: the next request was refused.)
#[tokio::test(flavor = "multi_thread")]
async fn a_relayed_backend_error_gives_its_token_hold_back() {
    let m = mock().await;
    m.set_fail(mock_ollama::FailMode::Error429);
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n  - use: policy\n    max_output_tokens: 4000\n  - use: ratelimit\n    key: api_key\n    tokens_per_minute: 6000\n",
        backends(&[("local", &m.url())]),
        conf("keys.yaml")
    ))
    .await;
    for i in 0..3 {
        // Sent the moment the answer before it ended: its hold was given back before that.
        let r = client()
            .post(gw.url("/api/generate"))
            .bearer_auth(KEY)
            .json(&json!({"model": "llama3.1:8b", "prompt": "x", "stream": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429, "request {i}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            body["error"], "mock: server busy",
            "the backend's own answer: {body}"
        );
    }
    assert_eq!(m.total(), 3, "every request reached the backend");
}

/// What a request holds (its in-flight slot, its tokens-per-minute and budget reservations)
/// is given back before the client can see the end of its answer: a client that sends its
/// next request, on a new connection, the moment it has the answer never finds them still
/// held. A stream's answer ends with its last event (`[DONE]`, Ollama's `"done": true`), which
/// a backend may send well before the body's own end (here 500 ms before): the next request
/// goes out while the first's connection is still open. Each limit lets one request hold at a
/// time (`max_in_flight: 1`; two token or spend reservations do not fit, what is used does).
#[tokio::test(flavor = "multi_thread")]
async fn the_next_request_sent_as_an_answer_ends_finds_its_holds_given_back() {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    // Reserved per request: 4,000 output tokens ($4 at $1,000 per million) and the prompt.
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n  - use: policy\n    max_output_tokens: 4000\n  - use: ratelimit\n    key: api_key\n    max_in_flight: 1\n    tokens_per_minute: 6000\n  - use: budget\n    ledger: {}/spend.db\n    prices:\n      - {{ model: '*', prompt_per_1m: 1000, completion_per_1m: 1000 }}\n    default: {{ max_usd: 6, period: 1d }}\n",
        backends(&[("local", &m.url())]),
        conf("keys.yaml"),
        dir.path().display()
    ))
    .await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    // (path, body, the answer's last event for a stream)
    let cases = [
        (
            "/api/chat",
            json!({"model": "llama3.1:8b", "messages": msgs, "stream": false}),
            None,
        ),
        (
            "/api/chat",
            json!({"model": "llama3.1:8b", "messages": msgs}),
            Some("\"done\":true"),
        ),
        (
            "/api/generate",
            json!({"model": "llama3.1:8b", "prompt": "hi"}),
            Some("\"done\":true"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "llama3.1:8b", "messages": msgs, "stream": true}),
            Some("data: [DONE]"),
        ),
        (
            "/v1/completions",
            json!({"model": "llama3.1:8b", "prompt": "hi", "stream": true, "stream_options": {"include_usage": true}}),
            Some("data: [DONE]"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "llama3.1:8b", "messages": msgs}),
            None,
        ),
    ];
    let mut open = None;
    for i in 0..24 {
        let (path, body, last_event) = &cases[i % cases.len()];
        // A client of its own: a new connection for every request.
        let c = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let r = c
            .post(gw.url(path))
            .bearer_auth(KEY)
            .header("x-mock-end-delay-ms", "500")
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        if status != 200 {
            panic!(
                "request {i} on {path}: {status} {}",
                r.text().await.unwrap()
            );
        }
        let Some(last_event) = last_event else {
            let text = r.text().await.unwrap();
            assert!(text.contains("tok4"), "request {i} on {path}: {text}");
            open = None;
            continue;
        };
        // Read up to the last event, and keep the connection open (the body's end is still
        // half a second away) while the next request goes out.
        let mut seen = String::new();
        let mut body = r.bytes_stream();
        while !seen.contains(last_event) {
            let chunk = tokio::time::timeout(Duration::from_millis(400), body.next())
                .await
                .unwrap_or_else(|_| panic!("request {i} on {path}: no last event in time: {seen}"))
                .expect("more of the stream")
                .unwrap();
            seen.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        assert!(seen.contains("tok4"), "request {i} on {path}: {seen}");
        open = Some(body);
    }
    drop(open);
    assert_eq!(m.total(), 24);
}

/// Review: a request that named no output limit reserved its prompt alone against
/// `tokens_per_minute`, so any number of them started at once all fitted in the minute and
/// then generated without bound. Each is now given `output_reserve` (4,096) in its body and
/// holds it; a policy cap after the limiter still judges what the client asked.
#[tokio::test(flavor = "multi_thread")]
async fn requests_without_an_output_limit_cannot_all_start_within_one_minutes_tokens() {
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n  - use: ratelimit\n    key: api_key\n    tokens_per_minute: 10000\n",
        backends(&[("local", &m.url())]),
        conf("keys.yaml")
    ))
    .await;
    let c = client();
    let msgs = json!([{"role": "user", "content": "hi"}]);
    // Two held at the backend (1.5 s before it answers), until the model stops: -1 to Ollama,
    // nothing at all on /v1.
    let held: Vec<_> = [
        ("/api/chat", json!({"model": "llama3.1:8b", "stream": false, "messages": msgs, "options": {"num_predict": -1}})),
        ("/v1/chat/completions", json!({"model": "llama3.1:8b", "messages": msgs})),
    ]
    .into_iter()
    .map(|(path, body)| {
        tokio::spawn(
            c.post(gw.url(path))
                .bearer_auth(KEY)
                .header("x-mock-first-byte-ms", "1500")
                .json(&body)
                .send(),
        )
    })
    .collect();
    let until = Instant::now() + Duration::from_secs(5);
    while m.total() < 2 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(m.total(), 2, "both reached the backend");
    // They hold 4,097 tokens each of 10,000: a third does not fit while they run.
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "llama3.1:8b", "messages": msgs}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(error_of(r).await.1.contains("4097 requested"));
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(m.total(), 2);
    for r in m.requests().into_iter().filter_map(|r| r.json) {
        let bound = r
            .get("max_tokens")
            .or_else(|| r["options"].get("num_predict"));
        assert_eq!(bound, Some(&json!(4096)), "{r}");
    }

    // A policy cap after the limiter judges the client's ask, not the limiter's bound, and
    // lowers it: nothing asked passes with the cap; "no limit" is refused under `reject`.
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n  - use: ratelimit\n    key: api_key\n    tokens_per_minute: 10000\n  - use: policy\n    max_output_tokens: 100\n    over_output_cap: reject\n",
        backends(&[("local", &m.url())]),
        conf("keys.yaml")
    ))
    .await;
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "llama3.1:8b", "messages": msgs}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = m.requests().pop().and_then(|r| r.json).unwrap();
    assert_eq!(seen["max_tokens"], 100, "{seen}");
    let r = c
        .post(gw.url("/api/chat"))
        .bearer_auth(KEY)
        .json(&json!({"model": "llama3.1:8b", "stream": false, "messages": msgs, "options": {"num_predict": -1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(m.total(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_faster_rate_reloaded_applies_at_once() {
    // Operator review: a key's `rate: 1/h` raised to `100/m` and reloaded kept refusing for
    // the old rate's hour (Retry-After: 3596).
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    let write = |rate: &str| {
        std::fs::write(
            &keys,
            format!(
                "keys:\n  - id: team\n    key_sha256: {}\n    rate: {rate}\n    burst: 0\n",
                filter_auth::keygen::hash_key(KEY)
            ),
        )
        .unwrap()
    };
    write("1/h");
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n  - use: ratelimit\n    key: api_key\n    rate: 1/h\n",
        backends(&[("local", &m.url())]),
        keys.display()
    ))
    .await;
    let c = client();
    let status = || async {
        let r = c
            .post(gw.url("/api/chat"))
            .bearer_auth(KEY)
            .json(&chat())
            .send()
            .await
            .unwrap();
        let retry = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        (r.status().as_u16(), retry)
    };
    assert_eq!(status().await.0, 200);
    let (code, retry) = status().await;
    assert_eq!(code, 429);
    assert!(retry.unwrap() > 3000, "{retry:?}");
    write("100/m");
    gw.signal("HUP");
    // The reload is applied by a thread of its own: asked before it is done, the old rate
    // answers.
    for _ in 0..100 {
        if gw.log().contains("SIGHUP: reloaded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gw.log().contains("SIGHUP: reloaded"), "{}", gw.log());
    let mut seen = Vec::new();
    for _ in 0..40 {
        let (code, retry) = status().await;
        seen.push((code, retry));
        if code == 200 {
            break;
        }
        // At most the new rate's interval away.
        assert!(retry.unwrap_or(0) <= 1, "{seen:?}\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen.last().unwrap().0, 200, "{seen:?}");
}
