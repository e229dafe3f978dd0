//! Redis dying, Redis refusing, and a replica dying with holds open.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::support::budget::{config, KEY as BUYER};
use super::support::redis::Redis;
use super::support::{chat, client, mock, Gateway};
use super::{key_chat, keyed_chain, replicas, Replicas, KEY};

/// The buyer's streamed generation of four chunks, `delay` ms apart: (status, body).
async fn buyer_stream(url: String, delay: &'static str) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(url)
        .bearer_auth(BUYER)
        .header("x-mock-chunks", "4")
        .header("x-mock-delay-ms", delay)
        .json(&json!({"model": "llama3.1:8b", "prompt": "x", "stream": true}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// Waits (2 s at most) until the mock has had its first request on `path`.
async fn wait_hits(m: &mock_ollama::MockServer, path: &str) {
    for _ in 0..200 {
        if m.hits(path) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn state_of(gw: &Gateway) -> (String, Option<f64>) {
    let h = gw.health().await;
    (
        h["state"].as_str().unwrap_or_default().to_string(),
        gw.metric("llm_gateway_state_degraded").await,
    )
}

/// Waits (5 s at most) until `gw` shares state again.
async fn wait_shared(gw: &Gateway) {
    let mut s = String::new();
    for _ in 0..100 {
        s = state_of(gw).await.0;
        if s == "shared" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s, "shared", "{}", gw.log());
}

/// Sends `n` requests round robin; returns (OK count, slowest answer).
async fn burst(gws: &[Gateway], n: usize) -> (usize, Duration) {
    let c = client();
    let mut ok = 0;
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let start = Instant::now();
        let r = c
            .post(gws[i % gws.len()].url("/api/chat"))
            .bearer_auth(KEY)
            .json(&chat())
            .send()
            .await
            .unwrap();
        slowest = slowest.max(start.elapsed());
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["code"], "rate_limit_exceeded", "{v}");
            }
            s => panic!("a valid key got {s}: {}", r.text().await.unwrap()),
        }
    }
    (ok, slowest)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_redis_never_hangs_a_request_and_sharing_comes_back() {
    let Replicas {
        mut redis,
        mock: _m,
        mut gws,
        dir: _dir,
    } = replicas("  - use: ratelimit\n    key: api_key\n    rate: 10/m\n    burst: 5\n").await;
    gws.truncate(2);
    assert_eq!(state_of(&gws[0]).await, ("shared".into(), Some(0.0)));
    redis.kill();
    // Every request is answered at once, on each replica's own limit (6 quick ones each).
    let (ok, slowest) = burst(&gws, 20).await;
    eprintln!("slowest answer with Redis dead: {slowest:?}");
    assert!(
        slowest < Duration::from_millis(600),
        "deadline 100 ms, answered in {slowest:?}"
    );
    assert_eq!(ok, 12, "each replica enforced the limit on its own");
    for gw in &gws {
        assert_eq!(state_of(gw).await, ("degraded".into(), Some(1.0)));
        let h = client().get(gw.admin_url("/health")).send().await.unwrap();
        assert_eq!(h.status(), 200, "degraded, not down");
    }
    assert_eq!(
        gws[0].log().matches("state: degraded").count(),
        1,
        "one warning per change, not per request:\n{}",
        gws[0].log()
    );
    redis.restart();
    for gw in &gws {
        wait_shared(gw).await;
        assert_eq!(gw.metric("llm_gateway_state_degraded").await, Some(0.0));
    }
    // Shared again: 6 across both replicas together.
    let (ok, _) = burst(&gws, 20).await;
    assert_eq!(ok, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_redis_costs_a_request_one_deadline_at_most() {
    let Replicas {
        redis,
        mock: _m,
        mut gws,
        dir: _dir,
    } = replicas("  - use: ratelimit\n    key: api_key\n    rate: 10/m\n    burst: 5\n").await;
    gws.truncate(2);
    // The server stops answering but keeps its connections open: only deadlines help.
    redis.signal("STOP");
    let (ok, slowest) = burst(&gws, 20).await;
    eprintln!("slowest answer with Redis hung: {slowest:?}");
    assert!(
        slowest < Duration::from_millis(600),
        "deadline 100 ms, answered in {slowest:?}"
    );
    assert_eq!(ok, 12, "each replica enforced the limit on its own");
    for gw in &gws {
        assert_eq!(state_of(gw).await, ("degraded".into(), Some(1.0)));
    }
    redis.signal("CONT");
    for gw in &gws {
        wait_shared(gw).await;
    }
    // Shared again, with the counts the server kept: every key's window there is still full
    // from before the outage? No: nothing reached it during the hang, so 6 pass together.
    let (ok, _) = burst(&gws, 20).await;
    assert_eq!(ok, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn on_error_reject_answers_503_in_each_routes_shape() {
    let mut redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&format!(
        "{}{}",
        redis
            .state()
            .replace("lease_ttl", "on_error: reject, lease_ttl"),
        keyed_chain(
            &m,
            dir.path(),
            "  - use: ratelimit\n    key: api_key\n    rate: 100/s\n"
        )
    ))
    .await;
    let ok = client()
        .post(gw.url("/api/chat"))
        .bearer_auth(KEY)
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    redis.kill();
    for _ in 0..5 {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "state_unavailable", "{v}");
        let r = client()
            .post(gw.url("/api/chat"))
            .bearer_auth(KEY)
            .json(&chat())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains("shared state"), "{v}");
    }
    assert_eq!(
        m.hits("/api/chat"),
        1,
        "nothing reached the backend unchecked"
    );
    assert_eq!(state_of(&gw).await.0, "degraded");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_replicas_holds_expire() {
    let redis = Redis::start();
    let m = mock().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The budget fits one request ($0.05), and the key one request at a time.
    let limit = "  - use: ratelimit\n    key: api_key\n    max_in_flight: 1\n";
    let a = Gateway::start(&format!(
        "{}{}",
        redis.state(),
        config(da.path(), &m, 0.05, 0.0, 10000.0, limit)
    ))
    .await;
    let b = Gateway::start(&format!(
        "{}{}",
        redis.state(),
        config(db.path(), &m, 0.05, 0.0, 10000.0, limit)
    ))
    .await;
    let running = tokio::spawn(buyer_stream(a.url("/api/generate"), "2000"));
    wait_hits(&m, "/api/generate").await;
    // The running request's reservation and slot keep another replica out…
    let (s, body) = buyer_stream(b.url("/api/generate"), "0").await;
    assert_eq!(s, 429, "{body}");
    assert!(body.contains("budget_exceeded"), "{body}");
    // …until its replica dies and they expire (lease_ttl 1s).
    a.signal("KILL");
    let _ = running.await;
    let killed = Instant::now();
    let mut status = 0;
    while killed.elapsed() < Duration::from_secs(10) {
        status = buyer_stream(b.url("/api/generate"), "0").await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "the dead replica's holds expired");
    let freed = killed.elapsed();
    eprintln!("holds of the killed replica freed after {freed:?}");
    assert!(
        freed >= Duration::from_millis(500),
        "{freed:?}: not before they expire"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rediss_with_a_password_and_a_private_ca() {
    let redis = Redis::start_tls("s3cret-pw");
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let filters = keyed_chain(
        &m,
        dir.path(),
        "  - use: ratelimit\n    key: api_key\n    rate: 10/m\n    burst: 2\n",
    );
    let state = |password: &str| {
        format!(
            "state: {{ backend: redis, url: 'rediss://localhost:{}/0', password: '{password}', ca_file: '{}', timeout: 200ms }}\n",
            redis.port,
            redis.ca()
        )
    };
    let mut gws = Vec::new();
    for _ in 0..2 {
        gws.push(Gateway::start(&format!("{}{filters}", state("s3cret-pw"))).await);
    }
    for gw in &gws {
        assert_eq!(gw.health().await["state"], "shared", "{}", gw.log());
    }
    let (ok, _) = burst(&gws, 9).await;
    assert_eq!(ok, 3, "burst + 1 across both replicas, over TLS");
    // A wrong password: the gateway runs on local state and says so; the password is never
    // logged.
    let wrong = Gateway::start(&format!("{}{filters}", state("wrong-pw"))).await;
    assert_eq!(wrong.health().await["state"], "degraded");
    assert!(!wrong.log().contains("wrong-pw"), "{}", wrong.log());
    let (ok, _) = burst(std::slice::from_ref(&wrong), 3).await;
    assert_eq!(ok, 3, "its own limit: a valid key is served");
}

/// A server that answers the probe but refuses a request's script (here an ACL user that may
/// touch only the probe's key: `NOPERM`; in life a key of the wrong type, a script error, a
/// full memory) must not have the circuit closed and opened again every retry interval: each
/// time it reopens soon after closing, the next close waits twice as long.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_refusing_the_scripts_does_not_flap_every_retry() {
    let redis = Redis::start();
    redis
        .cmd(&[
            "ACL",
            "SETUSER",
            "gw",
            "on",
            ">pw",
            "~*alive:*",
            "&*",
            "+@all",
        ])
        .expect("ACL SETUSER");
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let state = format!(
        "state: {{ backend: redis, url: 'redis://gw:pw@127.0.0.1:{}/0', timeout: 100ms, breaker_failures: 1, breaker_retry: 100ms }}\n",
        redis.port
    );
    let gw = Gateway::start(&format!(
        "{state}{}",
        keyed_chain(
            &m,
            dir.path(),
            "  - use: ratelimit\n    key: api_key\n    rate: 1000/s\n    burst: 1000\n"
        )
    ))
    .await;
    let c = client();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let r = c
            .post(gw.url("/api/chat"))
            .bearer_auth(KEY)
            .json(&chat())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "the local limit serves meanwhile");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = gw.log();
    let opened = log.matches("state: degraded").count();
    eprintln!("a server refusing the scripts: the circuit opened {opened} times in 3 s");
    // Without the back-off: about 3 s / (100 ms + the next request) ≈ 25 openings. With it:
    // 100, 200, 400, 800, 1600 ms between them.
    assert!((2..=7).contains(&opened), "{opened} openings:\n{log}");
}

/// A server that forgot the scripts (restarted from a snapshot, `SCRIPT FLUSH`, a failover to
/// a replica that never saw them) answers `NOSCRIPT`: the gateway loads the script and runs
/// it again within the same call, and the shared count goes on where it was.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_forgot_the_scripts_is_given_them_again() {
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&format!(
        "{}{}",
        redis.state(),
        keyed_chain(
            &m,
            dir.path(),
            "  - use: ratelimit\n    key: api_key\n    rate: 10/m\n    burst: 2\n"
        )
    ))
    .await;
    let c = client();
    let ask = || async { key_chat(&c, &gw).await.status().as_u16() };
    assert_eq!(ask().await, 200);
    assert_eq!(redis.cmd(&["SCRIPT", "FLUSH"]).as_deref(), Some("+OK"));
    let loads = redis.calls("script|load");
    let mut after = Vec::new();
    for _ in 0..4 {
        after.push(ask().await);
    }
    // Burst 2: three quick requests in all, one of them before the flush.
    assert_eq!(after, [200, 200, 429, 429], "{}", gw.log());
    assert!(
        redis.calls("script|load") > loads,
        "the script was not loaded again"
    );
    // Three requests counted in Redis: the bucket (one request per 6 s) is full for 18 s.
    let tat = redis
        .cmd(&[
            "EVAL",
            "local t = -3 for _, k in ipairs(redis.call('KEYS', '*:rate:*')) do \
             t = redis.call('PTTL', k) end return t",
            "0",
        ])
        .unwrap();
    let tat: i64 = tat.trim_start_matches(':').parse().unwrap();
    assert!(
        tat > 12_000,
        "the shared bucket holds {tat} ms, not three requests"
    );
    assert_eq!(state_of(&gw).await.0, "shared");
    assert!(!gw.log().contains("state: degraded"), "{}", gw.log());
}

/// Live holds (members scored by an expiry still ahead) of the sorted sets whose names
/// match `pattern`, all together.
fn held(redis: &Redis, pattern: &str) -> String {
    let count = "local t = redis.call('TIME') \
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) \
        local n = 0 \
        for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
          n = n + redis.call('ZCOUNT', k, '(' .. now, '+inf') end \
        return n";
    redis
        .cmd(&["EVAL", count, "0", pattern])
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_requests_holds_come_back_after_redis_loses_them() {
    let mut redis = Redis::start();
    let m = mock().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The budget fits one request ($0.05), and the key one request at a time.
    let limit = "  - use: ratelimit\n    key: api_key\n    max_in_flight: 1\n";
    let conf = |dir: &std::path::Path| {
        format!(
            "{}{}",
            redis.state(),
            config(dir, &m, 0.05, 0.0, 10000.0, limit)
        )
    };
    let a = Gateway::start(&conf(da.path())).await;
    let b = Gateway::start(&conf(db.path())).await;
    // One long stream on replica A (about 8 s).
    let running = tokio::spawn(buyer_stream(a.url("/api/generate"), "2000"));
    wait_hits(&m, "/api/generate").await;
    let (slot, reservation) = ("*rl:*slots*", "*resv:*");
    assert_eq!(held(&redis, slot), ":1");
    assert_eq!(held(&redis, reservation), ":1");
    // Redis forgets everything; within a renewal (a third of lease_ttl 1s) A puts the
    // stream's slot and budget reservation back, so B still may not start another.
    assert_eq!(redis.cmd(&["FLUSHALL"]).as_deref(), Some("+OK"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(held(&redis, slot), ":1", "{}", a.log());
    assert_eq!(held(&redis, reservation), ":1", "{}", a.log());
    let (s, body) = buyer_stream(b.url("/api/generate"), "0").await;
    assert_eq!(s, 429, "{body}");
    // The same after an outage longer than lease_ttl (the server comes back empty).
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart();
    wait_shared(&a).await;
    wait_shared(&b).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(held(&redis, slot), ":1", "{}", a.log());
    assert_eq!(held(&redis, reservation), ":1", "{}", a.log());
    let (s, body) = buyer_stream(b.url("/api/generate"), "0").await;
    assert_eq!(s, 429, "{body}");
    assert!(a.log().contains("holds of running requests"), "{}", a.log());
    // When the stream ends, both are given back (the release made again on the connection
    // the restart broke), and not put back once more.
    assert_eq!(running.await.unwrap().0, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(held(&redis, slot), ":0", "{}", a.log());
    assert_eq!(held(&redis, reservation), ":0", "{}", a.log());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(held(&redis, slot), ":0");
    assert_eq!(held(&redis, reservation), ":0");
    assert!(!a.log().contains("not applied"), "{}", a.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fallback_to_local_state_counts_the_requests_already_running() {
    let mut redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let chain = keyed_chain(
        &m,
        dir.path(),
        "  - use: ratelimit\n    key: api_key\n    max_in_flight: 1\n",
    );
    let gw = Gateway::start(&format!("{}{chain}", redis.state())).await;
    let c = client();
    let stream = tokio::spawn(
        client()
            .post(gw.url("/api/chat"))
            .bearer_auth(KEY)
            .header("x-mock-chunks", "4")
            .header("x-mock-delay-ms", "1000")
            .json(&json!({"model": "llama3.1:8b", "messages": [], "stream": true}))
            .send(),
    );
    wait_hits(&m, "/api/chat").await;
    redis.kill();
    let mut degraded = false;
    for _ in 0..100 {
        if state_of(&gw).await.0 == "degraded" {
            degraded = true;
            break;
        }
        // Requests while it fails: each must still be refused (the stream holds the slot).
        let r = key_chat(&c, &gw).await;
        assert_eq!(r.status().as_u16(), 429, "{}", r.text().await.unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(degraded, "{}", gw.log());
    // On local state now: the stream running here still takes this replica's one slot.
    let r = key_chat(&c, &gw).await;
    assert_eq!(r.status().as_u16(), 429, "{}", r.text().await.unwrap());
    let body = stream.await.unwrap().unwrap().text().await.unwrap();
    assert!(body.contains("\"done\":true"), "{body}");
    assert_eq!(key_chat(&c, &gw).await.status().as_u16(), 200);
}
