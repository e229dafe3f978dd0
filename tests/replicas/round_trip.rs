//! A request's shared checks share one round trip to Redis: the address limit's answer
//! travels while the key is looked up, the body read and the key's limits and budget asked.
//! What that must not change: a request refused for its address takes nothing from its key,
//! and its body is not read to the end.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::support::redis::Redis;
use super::support::{chat, client, free_port, mock, send_raw, Gateway};
use super::{keys_file, one_backend, KEY};

/// A TCP relay to `target` that holds every byte coming back for `delay`: each round trip
/// through it takes at least that long, however many calls it carries.
pub async fn slow_relay(target: u16, delay: Duration) -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                continue;
            };
            let (mut client_rx, mut client_tx) = client.into_split();
            let (mut server_rx, mut server_tx) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
            });
            let (held_tx, mut held_rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match server_rx.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let _ = held_tx.send((Instant::now() + delay, buf[..n].to_vec()));
                        }
                    }
                }
            });
            tokio::spawn(async move {
                while let Some((at, bytes)) = held_rx.recv().await {
                    tokio::time::sleep_until(at.into()).await;
                    if client_tx.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn the_whole_chain_waits_for_one_round_trip() {
    const DELAY: Duration = Duration::from_millis(200);
    let redis = Redis::start();
    let relay = slow_relay(redis.port, DELAY).await;
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    // An address limit before auth, the key's rate and tokens, a budget: three scripts,
    // asked by every request (no chunks taken ahead: chunks.rs tests those).
    let gw = Gateway::start(&format!(
        "state: {{ backend: redis, url: 'redis://127.0.0.1:{relay}/0', timeout: 2s, connect_timeout: 5s, chunk: 0 }}\n{}filters:\n  - use: ratelimit\n    key: ip\n    rate: 1000/s\n    burst: 1000\n  - use: auth\n    keys_file: {}\n  - use: ratelimit\n    key: api_key\n    rate: 1000/s\n    burst: 1000\n    tokens_per_minute: 1000000000\n  - use: budget\n    ledger: {d}/spend.db\n    prices:\n      - {{ model: '*', prompt_per_1m: 1, completion_per_1m: 1 }}\n    default: {{ max_usd: 1000, period: 1mo }}\n",
        one_backend(&m.url()),
        keys_file(dir.path()),
        d = dir.path().display()
    ))
    .await;
    let c = client();
    let send = || {
        c.post(gw.url("/api/chat"))
            .bearer_auth(KEY)
            .json(&chat())
            .send()
    };
    // Connected, subscribed, scripts loaded: the first calls take several round trips.
    let until = Instant::now() + Duration::from_secs(20);
    while gw.health().await["state"] != "shared" || m.hits("/api/chat") < 3 {
        assert!(Instant::now() < until, "the gateway never shared its state");
        assert_eq!(send().await.unwrap().status(), 200);
    }
    let mut took = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let r = send().await.unwrap();
        took.push(t.elapsed());
        assert_eq!(r.status(), 200);
        assert!(
            r.headers().contains_key("x-ratelimit-remaining-tokens"),
            "the key's limits were asked"
        );
    }
    took.sort();
    assert!(
        took[0] >= DELAY,
        "went through Redis, one round trip at least: {took:?}"
    );
    // Two round trips (the address limit's answer awaited before the key's checks are
    // sent) take 2 × DELAY at least.
    assert!(
        took[2] < DELAY * 7 / 4,
        "more than one round trip per request: {took:?}"
    );
}

/// A gateway on `redis` behind a trusted proxy (so a test names its clients in
/// X-Forwarded-For), with `filters` (YAML list items; `KEYS` stands for the keys file).
async fn behind_proxy(
    redis: &Redis,
    m: &mock_ollama::MockServer,
    dir: &std::path::Path,
    filters: &str,
) -> Gateway {
    let port = free_port();
    Gateway::start_raw(
        &format!(
            "listen:\n  - addr: 127.0.0.1:{port}\n    trusted_proxies: [127.0.0.1]\n{}{}filters:\n{}",
            redis.state(),
            one_backend(&m.url()),
            filters.replace("KEYS", &keys_file(dir))
        ),
        port,
    )
    .await
}

/// A chat from client `addr` (named in X-Forwarded-For) with `key`.
async fn chat_from(gw: &Gateway, key: &str, addr: &str) -> reqwest::Response {
    client()
        .post(gw.url("/api/chat"))
        .bearer_auth(key)
        .header("x-forwarded-for", addr)
        .json(&chat())
        .send()
        .await
        .unwrap()
}

/// A stream from client `addr` that holds its in-flight slot for about ten chunks of
/// `delay_ms`.
fn hold_a_slot(
    gw: &Gateway,
    addr: &str,
    delay_ms: u32,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    tokio::spawn(
        client()
            .post(gw.url("/api/chat"))
            .bearer_auth(KEY)
            .header("x-forwarded-for", addr)
            .header("x-mock-chunks", "10")
            .header("x-mock-delay-ms", delay_ms.to_string())
            .json(&json!({"model": "llama3.1:8b", "messages": [], "stream": true}))
            .send(),
    )
}

/// [`behind_proxy`] with audit (which defers nothing, so the limiter after it is still the
/// first to decide), an address limit of one request per `per` before auth, then `rest`
/// (more of auth's options, the key's own limit).
async fn address_then_key(
    redis: &Redis,
    m: &mock_ollama::MockServer,
    dir: &std::path::Path,
    per: &str,
    rest: &str,
) -> Gateway {
    let audit = dir.join("audit.jsonl");
    behind_proxy(
        redis,
        m,
        dir,
        &format!(
            "  - use: audit\n    file: {}\n  - use: ratelimit\n    key: ip\n    rate: 1/{per}\n    burst: 0\n  - use: auth\n    keys_file: KEYS\n{rest}",
            audit.display()
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_refused_for_its_address_takes_nothing_from_its_key() {
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = address_then_key(
        &redis,
        &m,
        dir.path(),
        "m",
        "  - use: ratelimit\n    key: api_key\n    rate: 10/m\n    burst: 2\n",
    )
    .await;
    let from = |addr: &'static str| chat_from(&gw, KEY, addr);
    // `X-RateLimit-Limit` tells the limits apart: 1 for the address, 3 for the key (the
    // last one written is the limiter that refused).
    let limit = |r: &reqwest::Response| {
        let all = r.headers().get_all("x-ratelimit-limit");
        all.iter()
            .next_back()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(from("203.0.113.1").await.status(), 200);
    for _ in 0..10 {
        let r = from("203.0.113.1").await;
        assert_eq!(r.status(), 429);
        assert_eq!(limit(&r), "1", "refused for its address");
    }
    // The key's three quick requests: one was used; the ten refused ones took none.
    for addr in ["203.0.113.2", "203.0.113.3"] {
        let r = from(addr).await;
        assert_eq!(
            r.status(),
            200,
            "the key's rate was taken by refused requests"
        );
    }
    let r = from("203.0.113.4").await;
    assert_eq!(r.status(), 429);
    assert_eq!(limit(&r), "3", "now the key's own limit");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_address_stops_the_body_read() {
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = address_then_key(
        &redis,
        &m,
        dir.path(),
        "m",
        "  - use: ratelimit\n    key: api_key\n    tokens_per_minute: 1000000\n",
    )
    .await;
    let head = |extra: &str| {
        format!(
            "POST /api/chat HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\nX-Forwarded-For: 198.51.100.1\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n{extra}\r\n"
        )
    };
    let body = json!({"model": "llama3.1:8b", "messages": []}).to_string();
    let (first, _, _) = send_raw(
        gw.port,
        &head("").replace("1000000", &body.len().to_string()),
        body.as_bytes(),
    )
    .await;
    assert_eq!(first, 200);
    // A valid key from a refused address announces a megabyte and sends a few bytes: the
    // refusal comes at once, not after the body (30 s of client_body_timeout).
    let (code, took, answer) = send_raw(gw.port, &head(""), b"{\"model\":").await;
    assert_eq!(code, 429, "{answer}");
    assert!(
        took < Duration::from_secs(5),
        "waited for the body: {took:?}"
    );
    // Asked for leave to send: refused without it.
    let (code, took, answer) = send_raw(gw.port, &head("Expect: 100-continue\r\n"), b"").await;
    assert_eq!(
        code, 429,
        "leave to send before the address was judged: {answer}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guess_checked_while_its_address_is_refused_counts_and_gets_the_refusal() {
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = address_then_key(
        &redis,
        &m,
        dir.path(),
        "s",
        "    brute_force: { max_failures: 2, window: 1m }\n",
    )
    .await;
    let c = client();
    let guess = || async {
        let r = c
            .post(gw.url("/api/chat"))
            .bearer_auth("sk-a-guess")
            .header("x-forwarded-for", "192.0.2.9")
            .json(&chat())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap();
        (status, v["code"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(guess().await, (401, "invalid_api_key".to_string()));
    // The second is checked while Redis answers for the address (and counted), then gets
    // the address's refusal, as a valid key would; the rest meet the remembered refusal
    // before authentication.
    for _ in 0..5 {
        assert_eq!(guess().await, (429, "rate_limit_exceeded".to_string()));
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        guess().await,
        (429, "too_many_auth_failures".to_string()),
        "the guess checked while its address was refused was not counted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_limit_whose_refusals_are_not_remembered_answers_before_authentication() {
    // An address's in-flight cap is asked again with every request: guesses from an
    // address it refuses are never checked (nor counted).
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = behind_proxy(
        &redis,
        &m,
        dir.path(),
        "  - use: ratelimit\n    key: ip\n    max_in_flight: 1\n  - use: auth\n    keys_file: KEYS\n    brute_force: { max_failures: 2, window: 1m }\n",
    )
    .await;
    let addr = "192.0.2.40";
    let slow = hold_a_slot(&gw, addr, 150);
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..4 {
        let r = chat_from(&gw, "sk-a-guess", addr).await;
        assert_eq!(r.status(), 429, "the address's slot is taken");
    }
    let slow = slow.await.unwrap().unwrap();
    assert_eq!(slow.status(), 200);
    slow.text().await.unwrap();
    // The slot is given back by a call of its own, just after the answer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = chat_from(&gw, "sk-a-guess", addr).await;
    let status = r.status().as_u16();
    let (code, _) = super::support::error_of(r).await;
    assert_eq!(
        (status, code.as_str()),
        (401, "invalid_api_key"),
        "guesses refused for the address were checked and counted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_address_is_refused_without_a_call_until_its_retry_time() {
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = address_then_key(
        &redis,
        &m,
        dir.path(),
        "s",
        "  - use: ratelimit\n    key: api_key\n    rate: 1/m\n    burst: 2\n",
    )
    .await;
    let from = |addr: &'static str| chat_from(&gw, KEY, addr);
    assert_eq!(from("192.0.2.20").await.status(), 200);
    let r = from("192.0.2.20").await;
    let t = Instant::now();
    assert_eq!(r.status(), 429, "refused by Redis");
    // What the refused request's key check took is given back by a call of its own.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let scripts = redis.calls("evalsha");
    for _ in 0..20 {
        let r = from("192.0.2.20").await;
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "1");
        assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    }
    if t.elapsed() < Duration::from_millis(900) {
        assert_eq!(
            redis.calls("evalsha"),
            scripts,
            "a refusal known until its retry time was asked again"
        );
    }
    assert_eq!(
        from("192.0.2.21").await.status(),
        200,
        "another address is not refused"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        from("192.0.2.20").await.status(),
        200,
        "the refusal ends at its retry time"
    );
    // The key's three are used: its limiter, not the chain's first, asks Redis every time
    // (its counts may be given back, so its refusals are not remembered).
    for addr in ["192.0.2.22", "192.0.2.23"] {
        let before = redis.calls("evalsha");
        let r = from(addr).await;
        assert_eq!(r.status(), 429);
        let limits: Vec<_> = r.headers().get_all("x-ratelimit-limit").iter().collect();
        assert_eq!(limits.last().unwrap().to_str().unwrap(), "3", "the key's");
        assert!(redis.calls("evalsha") > before, "asked again");
    }
}

/// Sends `request` whole on a fresh connection, reads the answer's status, and says whether
/// the gateway then closed the connection.
async fn status_and_closed(port: u16, request: &str) -> (u16, bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let closed = matches!(
        tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    );
    (status, closed)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_address_cannot_tell_a_valid_key_from_a_guess() {
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = address_then_key(&redis, &m, dir.path(), "m", "").await;
    let body = json!({"model": "llama3.1:8b", "messages": []}).to_string();
    let request = |key: &str, addr: &str| {
        format!(
            "POST /api/chat HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nX-Forwarded-For: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    // Each address's first request passes; its second is refused by Redis's answer, which
    // comes after the body (sent with the head) was read for the valid key.
    for (key, addr) in [(KEY, "192.0.2.30"), ("sk-a-guess", "192.0.2.31")] {
        assert_eq!(status_and_closed(gw.port, &request(KEY, addr)).await.0, 200);
        assert_eq!(
            status_and_closed(gw.port, &request(key, addr)).await,
            (429, true),
            "{key}: refused, and the connection closed"
        );
    }
    // A valid key with a body the gateway refuses: the address's refusal is the answer.
    let bad_body = format!(
        "POST /api/chat HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\nX-Forwarded-For: 192.0.2.32\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    assert_eq!(
        status_and_closed(gw.port, &request(KEY, "192.0.2.32"))
            .await
            .0,
        200
    );
    assert_eq!(
        status_and_closed(gw.port, &bad_body).await,
        (429, true),
        "a body error answered before the address's refusal"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_keys_own_refusal_keeps_the_connection() {
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = address_then_key(
        &redis,
        &m,
        dir.path(),
        "m",
        "  - use: ratelimit\n    key: api_key\n    rate: 1/m\n    burst: 0\n",
    )
    .await;
    let body = json!({"model": "llama3.1:8b", "messages": []}).to_string();
    let request = |addr: &str| {
        format!(
            "POST /api/chat HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\nX-Forwarded-For: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    assert_eq!(
        status_and_closed(gw.port, &request("192.0.2.50")).await,
        (200, false)
    );
    // Another address, under its limit: the key's own limit refuses; nothing to hide.
    assert_eq!(
        status_and_closed(gw.port, &request("192.0.2.51")).await,
        (429, false),
        "a refusal by a check after the body closed the connection"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_limiter_behind_a_cap_is_not_asked_for_requests_the_cap_refuses() {
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = behind_proxy(
        &redis,
        &m,
        dir.path(),
        "  - use: ratelimit\n    key: ip\n    max_in_flight: 1\n  - use: ratelimit\n    key: ip\n    rate: 100/s\n    burst: 100\n  - use: auth\n    keys_file: KEYS\n",
    )
    .await;
    let addr = "192.0.2.60";
    let slow = hold_a_slot(&gw, addr, 100);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gcra = r#"llm_gateway_state_call_duration_seconds_count{script="gcra"}"#;
    let before = gw.metric(gcra).await;
    for _ in 0..4 {
        let r = chat_from(&gw, KEY, addr).await;
        assert_eq!(r.status(), 429, "the address's slot is taken");
    }
    assert_eq!(
        gw.metric(gcra).await,
        before,
        "the rate behind the cap was asked for requests the cap refused"
    );
    let slow = slow.await.unwrap().unwrap();
    assert_eq!(slow.status(), 200);
    slow.text().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_guesses_meet_the_lockout_while_the_address_check_travels() {
    // The address limit's answer travels while the key is checked: a guess was counted
    // only once that answer was back, so a burst of parallel guesses all passed the lock
    // check with nothing counted (44 to 295 of 300 answered 401 with `max_failures: 5`).
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let gw = Gateway::start_raw(
        &format!(
            "listen:\n  - addr: 127.0.0.1:{port}\n    trusted_proxies: [127.0.0.1]\nserver: {{ threads: 1 }}\n{}{}filters:\n  - use: ratelimit\n    key: ip\n    rate: 1000/s\n    burst: 1000\n  - use: auth\n    keys_file: {}\n    brute_force: {{ max_failures: 5, window: 1m }}\n",
            redis.state(),
            one_backend(&m.url()),
            keys_file(dir.path())
        ),
        port,
    )
    .await;
    let guesses = (0..100).map(|i| {
        let gw = &gw;
        async move {
            let r = chat_from(gw, &format!("sk-guess-{i}"), "192.0.2.77").await;
            r.status().as_u16()
        }
    });
    let answers = futures_util::future::join_all(guesses).await;
    let checked = answers.iter().filter(|s| **s == 401).count();
    let locked = answers.iter().filter(|s| **s == 429).count();
    assert_eq!((checked, locked), (5, 95), "{answers:?}");
    // The valid key from that address is locked out too.
    assert_eq!(chat_from(&gw, KEY, "192.0.2.77").await.status(), 429);
    assert_eq!(m.hits("/api/chat"), 0);
}
