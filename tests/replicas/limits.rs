//! Rate, in-flight, backend slots and lockout across three replicas on one Redis.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::support::redis::Redis;
use super::support::{chat, client, mock, Gateway};
use super::{key_chat, keyed_chain, replicas, three, Replicas, KEY};

#[tokio::test(flavor = "multi_thread")]
async fn a_key_rate_holds_across_replicas_exactly() {
    let Replicas {
        redis: _redis,
        mock: m,
        gws,
        dir: _dir,
    } = replicas("  - use: ratelimit\n    key: api_key\n    rate: 10/m\n    burst: 5\n").await;
    let c = client();
    let mut ok = 0;
    let mut refused = 0;
    for i in 0..30 {
        let r = key_chat(&c, &gws[i % 3]).await;
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["code"], "rate_limit_exceeded", "{v}");
                refused += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    // nginx semantics, across the replicas together: burst + 1 quick requests pass.
    assert_eq!((ok, refused), (6, 24));
    assert_eq!(m.hits("/api/chat"), 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_on_one_host_share_limits_through_a_unix_socket() {
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let body = keyed_chain(
        &m,
        dir.path(),
        "  - use: ratelimit\n    key: api_key\n    rate: 10/m\n    burst: 2\n",
    );
    let mut gws = Vec::new();
    for _ in 0..2 {
        gws.push(Gateway::start(&format!("{}{body}", redis.state_unix(3))).await);
    }
    let c = client();
    let mut ok = 0;
    for i in 0..10 {
        if key_chat(&c, &gws[i % 2]).await.status() == 200 {
            ok += 1;
        }
    }
    // One count for both: burst + 1 pass, not that on each replica.
    assert_eq!(ok, 3);
    assert_eq!(m.hits("/api/chat"), 3);
    for gw in &gws {
        assert_eq!(gw.health().await["state"], "shared", "{}", gw.log());
        assert_eq!(gw.metric("llm_gateway_state_degraded").await, Some(0.0));
    }
    // In the database the URL names (nothing in the default one).
    let keyspace = redis.info("keyspace");
    assert!(keyspace.contains("db3:keys="), "{keyspace}");
    assert!(!keyspace.contains("db0:"), "{keyspace}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_in_flight_cap_holds_across_replicas() {
    let Replicas {
        redis: _redis,
        mock: _m,
        gws,
        dir: _dir,
    } = replicas("  - use: ratelimit\n    key: api_key\n    max_in_flight: 2\n").await;
    let slow = |url: String| async move {
        let r = client()
            .post(url)
            .bearer_auth(KEY)
            .header("x-mock-chunks", "6")
            .header("x-mock-delay-ms", "100")
            .json(&json!({"model": "llama3.1:8b", "messages": [], "stream": true}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        (status, body)
    };
    // Two per replica at once: only two of the six may run.
    let tasks: Vec<_> = (0..6)
        .map(|i| tokio::spawn(slow(gws[i % 3].url("/api/chat"))))
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let (s, body) = t.await.unwrap();
        if s == 429 {
            assert!(body.contains("concurrency"), "{body}");
        }
        statuses.push(s);
    }
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 429, 429, 429, 429]);
    // Slots are given back (just after each response ends: one call to Redis): the next one
    // passes on any replica.
    let mut s = 0;
    for _ in 0..20 {
        s = slow(gws[2].url("/api/chat")).await.0;
        if s == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_max_in_flight_holds_across_replicas() {
    let redis = Redis::start();
    let m = mock().await;
    let list = format!(
        "backends:\n  - {{ name: gpu, url: '{}', kind: ollama, max_in_flight: 1 }}\n",
        m.url()
    );
    let slow = |url: String| async move {
        let r = client()
            .post(url)
            .header("x-mock-chunks", "10")
            .header("x-mock-delay-ms", "100")
            .json(&json!({"model": "llama3.1:8b", "messages": []}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = r.bytes().await.unwrap();
        (status, body)
    };
    for (timeout, want) in [("150ms", 503u16), ("5s", 200)] {
        let gws = three(
            &redis,
            &format!(
                "{list}routing: {{ queue: {{ size: 10, timeout: {timeout} }}, discovery: {{ enabled: false, interval: 1h }}, health: {{ enabled: false, interval: 1h }} }}\n"
            ),
        )
        .await;
        let before = m.hits("/api/chat");
        let running = tokio::spawn(slow(gws[0].url("/api/chat")));
        for _ in 0..200 {
            if m.hits("/api/chat") > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Another replica sees the backend's only slot taken.
        let start = Instant::now();
        let (status, body) = slow(gws[1].url("/api/chat")).await;
        assert_eq!(
            status,
            want,
            "queue {timeout}: {}",
            String::from_utf8_lossy(&body)
        );
        if want == 503 {
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["code"], "backends_busy");
        } else {
            assert!(
                start.elapsed() >= Duration::from_millis(300),
                "it waited for the other replica's request: {:?}",
                start.elapsed()
            );
        }
        assert_eq!(running.await.unwrap().0, 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_logins_lock_an_address_out_on_every_replica() {
    let Replicas {
        redis,
        mock: _m,
        gws,
        dir: _dir,
    } = replicas("    brute_force: { max_failures: 3, window: 1m }\n").await;
    let c = client();
    let ok = |gw: usize| {
        c.post(gws[gw].url("/api/chat"))
            .bearer_auth(KEY)
            .json(&chat())
            .send()
    };
    // Once a replica has read the locks, a request costs no call to Redis for them: locks
    // are announced to every replica.
    for i in 0..3 {
        assert_eq!(ok(i).await.unwrap().status(), 200);
    }
    // (Background work calls too: each replica's probe and usage sync, a few a second.)
    assert_eq!(redis.cmd(&["CONFIG", "RESETSTAT"]).as_deref(), Some("+OK"));
    for i in 0..30 {
        assert_eq!(ok(i % 3).await.unwrap().status(), 200);
    }
    let calls = redis.calls("evalsha") + redis.calls("eval");
    assert!(calls < 10, "{calls} calls for 30 requests");
    for gw in &gws {
        let r = c
            .post(gw.url("/api/chat"))
            .bearer_auth("sk-wrong")
            .json(&chat())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    // The failure counts are written without waiting, and the lock reaches the other
    // replicas by pub/sub: give each a moment.
    for (i, gw) in gws.iter().enumerate() {
        let mut last = 0;
        for _ in 0..50 {
            let r = key_chat(&c, gw).await;
            last = r.status().as_u16();
            if last == 429 {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["code"], "too_many_auth_failures");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            last, 429,
            "three failures, one on each replica, lock the address out on replica {i} too"
        );
    }
    assert!(
        redis.calls("evalsha") >= 3,
        "the failures were counted on the server"
    );
    assert_eq!(redis.cmd(&["CONFIG", "RESETSTAT"]).as_deref(), Some("+OK"));
    for i in 0..30 {
        assert_eq!(ok(i % 3).await.unwrap().status(), 429);
    }
    let calls = redis.calls("evalsha") + redis.calls("eval");
    assert!(calls < 10, "{calls} calls for 30 locked requests");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_per_minute_hold_across_replicas() {
    let Replicas {
        redis: _redis,
        mock: _m,
        gws,
        dir: _dir,
    } = replicas("  - use: ratelimit\n    key: api_key\n    rate: 5/m\n    burst: 5\n    tokens_per_minute: 20\n").await;
    // Each request reserves 8 output + 1 prompt token and uses 5 + 1: the first two fit the
    // minute's 20 tokens together, a third does not, whichever replica it reaches.
    let c = client();
    let mut statuses = Vec::new();
    for i in 0..6 {
        let r = c
            .post(gws[i % 3].url("/api/chat"))
            .bearer_auth(KEY)
            .json(
                &json!({"model": "llama3.1:8b", "stream": false, "options": {"num_predict": 8},
                          "messages": [{"role": "user", "content": "hi"}]}),
            )
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            let v: Value = r.json().await.unwrap();
            assert!(v["error"].as_str().unwrap().contains("token limit"), "{v}");
        }
    }
    assert_eq!(statuses, vec![200, 200, 429, 429, 429, 429]);
    // The rate is checked in the same call: the six passed it (burst 5 + 1); a seventh is
    // refused by the rate, on any replica.
    let r = key_chat(&c, &gws[0]).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("request rate"), "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_usage_strategy_routes_on_every_replicas_figures() {
    let redis = Redis::start();
    let (a, b) = (mock().await, mock().await);
    let gws = three(
        &redis,
        &format!(
            "backends:\n  - {{ name: a, url: '{}', kind: ollama }}\n  - {{ name: b, url: '{}', kind: ollama }}\nrouting: {{ strategy: usage, discovery: {{ enabled: false, interval: 1h }}, health: {{ enabled: false, interval: 1h }} }}\n",
            a.url(),
            b.url()
        ),
    )
    .await;
    // A long generation through the first replica lands on `a` (both idle: the first wins).
    let r = client()
        .post(gws[0].url("/api/chat"))
        .header("x-mock-chunks", "400")
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    assert_eq!((a.hits("/api/chat"), b.hits("/api/chat")), (1, 0));
    // Once the replicas have synced (every second), the second one knows `a` is busier.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = client()
        .post(gws[1].url("/api/chat"))
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        (a.hits("/api/chat"), b.hits("/api/chat")),
        (1, 1),
        "the second replica routed away from the backend the first one loaded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn settlements_of_many_requests_share_calls_and_add_up_exactly() {
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    // A deadline a loaded test run always meets (a call past it would fall back to local
    // state and leave the shared count short), and settlements joined over half a second.
    // Every request asks (no chunks taken ahead): its settlement is what is counted here.
    let state = redis
        .state()
        .replace(
            "timeout: 100ms",
            "timeout: 2s, settle_window: 500ms, chunk: 0",
        )
        .replace("lease_ttl: 1s", "lease_ttl: 3s");
    let chain = super::keyed_chain(
        &m,
        dir.path(),
        "  - use: ratelimit\n    key: api_key\n    rate: 1000/s\n    burst: 1000\n    tokens_per_minute: 100000\n",
    );
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(super::support::Gateway::start(&format!("{state}{chain}")).await);
    }
    let c = client();
    let ask = |i: usize| {
        c.post(gws[i % 3].url("/api/chat"))
            .bearer_auth(KEY)
            .json(
                &json!({"model": "llama3.1:8b", "stream": false, "options": {"num_predict": 8},
                          "messages": [{"role": "user", "content": "hi"}]}),
            )
            .send()
    };
    // HGET runs twice in each settlement call (the window's start and count), and nowhere
    // else in this chain (a request's check reads both with one HMGET).
    let before = redis.calls("hget");
    // 60 requests at once over three replicas; each reserves 8 output + 1 prompt token and
    // uses 5 + 1, settled when it ends.
    let answers = futures_util::future::join_all((0..60).map(ask)).await;
    assert!(answers.iter().all(|r| r.as_ref().unwrap().status() == 200));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let settlements = (redis.calls("hget") - before) / 2;
    // Each replica sends its 20 settlements in one call (or a few, if the burst outlasted
    // the window); one call each would be 60.
    assert!(
        (3..=12).contains(&settlements),
        "{settlements} settlement calls for 60 requests on three replicas"
    );
    // The minute's count is exactly what the 60 used, whichever replica settled them and
    // however they were joined: the next request sees 60 × 6 used plus its own 9 reserved.
    let r = ask(0).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-ratelimit-remaining-tokens"],
        (100_000 - 60 * 6 - 9).to_string().as_str()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keys_limits_and_budget_share_one_round_trip() {
    // The chain operators run: an address limit before auth, then the key's rate and tokens,
    // and a budget. Three script calls per request, in one round trip: the address's answer
    // travels while the key is looked up and the body read, and the key's and the budget's
    // calls go out before it is awaited.
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("spend.db");
    // Settlements wait long enough not to be sent during the requests. No chunks taken
    // ahead: every request asks (chunks.rs tests those).
    let state = redis.state().replace(
        "timeout: 100ms",
        "timeout: 2s, settle_window: 300ms, chunk: 0",
    );
    let gw = super::support::Gateway::start(&format!(
        "{state}{}filters:\n  - use: ratelimit\n    key: ip\n    rate: 1000/s\n    burst: 1000\n  - use: auth\n    keys_file: {}\n  - use: ratelimit\n    key: api_key\n    rate: 1000/s\n    burst: 1000\n    tokens_per_minute: 1000000\n  - use: budget\n    ledger: {}\n    prices: [{{ model: '*', prompt_per_1m: 1.0, completion_per_1m: 1.0 }}]\n    default: {{ max_usd: 100, period: 1d }}\n",
        super::one_backend(&m.url()),
        super::keys_file(dir.path()),
        ledger.display()
    ))
    .await;
    let c = client();
    let ask = || async {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&json!({"model": "llama3.1:8b", "max_tokens": 8,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers().contains_key("x-ratelimit-remaining-tokens"));
    };
    // Warm: the proxy thread's own connection is made on its first call.
    for _ in 0..3 {
        ask().await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (reads, scripts) = (redis.stat("total_reads_processed"), redis.calls("evalsha"));
    let n = 40;
    for _ in 0..n {
        ask().await;
    }
    let reads = redis.stat("total_reads_processed") - reads;
    let scripts = redis.calls("evalsha") - scripts;
    // Three checks each, and a few settlement calls.
    assert!(
        (3 * n..=3 * n + 6).contains(&scripts),
        "{scripts} script calls"
    );
    // Besides one per request (the three calls reach Redis together): the health probe
    // (every 200 ms), a settlement call or two and this test's own INFO. With the address's
    // answer awaited before the key's checks are sent, it would be two per request.
    assert!(reads <= n + 12, "{reads} reads of Redis for {n} requests");
    eprintln!("{reads} reads, {scripts} script calls for {n} requests");

    // Each script's calls are timed, under its own name: one of each check per request.
    for script in ["gcra", "rate_and_tokens", "budget_reserve"] {
        let calls = gw
            .metric(&format!(
                "llm_gateway_state_call_duration_seconds_count{{script=\"{script}\"}}"
            ))
            .await;
        assert_eq!(calls, Some((n + 3) as f64), "{script}");
        let within_1s = gw
            .metric(&format!(
                "llm_gateway_state_call_duration_seconds_bucket{{script=\"{script}\",le=\"1\"}}"
            ))
            .await;
        assert_eq!(within_1s, calls, "{script}");
    }

    // Key names stay byte for byte what earlier versions made (replicas of two versions
    // share them during a rolling upgrade).
    // (The rate keys end within a millisecond here: see the next test.)
    for name in [
        "*rl:*:tokens:{key:team}",
        "*spend:1d:20??-??-??:{budget:team}",
    ] {
        assert_one_key(&redis, name);
    }

    // The scripts set a key's lifetime when they make it, not on every call; every key must
    // still end: the budget's a day after its period, the tokens' window two minutes after
    // it starts, the rate's once its bucket is full again.
    let ttl = |pattern: &str, agg: &str| -> i64 {
        let script = format!(
            "local m = nil for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
             local t = redis.call('PTTL', k) if m == nil or t {agg} m then m = t end end \
             return m or -3"
        );
        let a = redis.cmd(&["EVAL", &script, "0", pattern]).unwrap();
        a.trim_start_matches(':').parse().unwrap()
    };
    // PTTL -1: no lifetime (0 is a key ending this millisecond, as the rate's do).
    let forever = redis.cmd(&[
        "EVAL",
        "for _, k in ipairs(redis.call('KEYS', '*')) do \
         if redis.call('PTTL', k) == -1 then return {ok = k} end end return {ok = ''}",
        "0",
    ]);
    assert_eq!(forever.as_deref(), Some("+"), "a key without a lifetime");
    // A `1d` budget's keys end a day after the next UTC midnight (a day less if that midnight
    // passed during the test). The reservations' set may be gone: a settlement batch that
    // left meanwhile took its last member.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let ends = (now_ms / 86_400_000 + 2) * 86_400_000 - now_ms;
    let right = |t: i64| (t - ends).abs() < 10_000 || (t - ends + 86_400_000).abs() < 10_000;
    for (budget, may_be_gone) in [("*spend:*", false), ("*resv:*", true)] {
        let (min, max) = (ttl(budget, "<"), ttl(budget, ">"));
        assert!(
            (right(min) && right(max)) || (may_be_gone && min == -3),
            "{budget}: {min}..{max} ms, not about {ends}"
        );
    }
    let max = ttl("*:tokens:*", ">");
    assert!((60_000..=120_000).contains(&max), "tokens: {max} ms");
    let rate = ttl("*:rate:*", ">");
    assert!(rate <= 1_001, "rate: {rate} ms (its bucket refills in 1 s)");
    // Not per request: the budget's keys get theirs when made, the tokens' once a window
    // (and the settlements, a call per batch). The reservations' set is made again whenever
    // it empties, which is at most once per settlement batch here (300 ms); with one request
    // at a time and the default 5 ms window, it is most requests.
    let pexpire = redis.calls("pexpire");
    assert!(pexpire < n / 2, "{pexpire} PEXPIRE for {} requests", n + 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_later_limiter_never_counts_what_an_earlier_one_refused() {
    // The key's limit, then an address limit after it: a rate counts the moment its script
    // runs, so the address limit must not be asked for requests the key's limit refuses.
    let Replicas {
        redis,
        mock: _m,
        gws,
        dir: _dir,
    } = replicas(
        "  - use: ratelimit\n    key: api_key\n    rate: 1/m\n    burst: 1\n  - use: ratelimit\n    key: ip\n    rate: 1/m\n    burst: 10\n",
    )
    .await;
    let c = client();
    let mut codes = Vec::new();
    for _ in 0..6 {
        let r = key_chat(&c, &gws[0]).await;
        codes.push(r.status().as_u16());
    }
    assert_eq!(codes, [200, 200, 429, 429, 429, 429]);
    // Key names stay what earlier versions made (see the previous test).
    assert_one_key(&redis, "*rl:*:rate:{ip:127.0.0.1}");
    assert_one_key(&redis, "*rl:*:rate:{key:team}");
    // Requests the address's bucket holds: how far its TAT is ahead of now, in intervals.
    // The first refused request's count there is given back by a call nobody waits for
    // (the client has its 429 first): it settles within moments, and must settle at 2.
    let counted = "local t = redis.call('TIME'); local now = t[1] * 1000000 + t[2]; \
        local k = redis.call('KEYS', '*{ip:*')[1]; \
        return math.ceil((tonumber(redis.call('GET', k)) - now) / 60000000)";
    let mut held = None;
    for _ in 0..150 {
        held = redis.cmd(&["EVAL", counted, "0"]);
        if held.as_deref() == Some(":2") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(held.as_deref(), Some(":2"));
}

/// Exactly one key matches `pattern`.
fn assert_one_key(redis: &Redis, pattern: &str) {
    let found = redis.cmd(&["EVAL", "return #redis.call('KEYS', ARGV[1])", "0", pattern]);
    assert_eq!(found.as_deref(), Some(":1"), "{pattern}");
}
