//! Far from a limit, a replica serves a key's requests from quota it took ahead (`state.chunk`)
//! instead of asking Redis per request; near the limit every request is asked, and what a
//! chunk did not use goes back, so the counts stay exact across replicas.

use std::time::Duration;

use serde_json::{json, Value};

use super::round_trip::slow_relay;
use super::support::budget::{account_of, spend_report};
use super::support::redis::Redis;
use super::support::{client, mock, Gateway};
use super::KEY;

/// An address limit, the key's rate and tokens, and a budget, all far from their limits (the
/// rates as the shared benchmark has them: a burst of 1,000 gives chunks of 62).
fn far_chain(redis: &Redis, m: &mock_ollama::MockServer, dir: &std::path::Path) -> String {
    format!(
        "{}{}filters:\n  - use: ratelimit\n    key: ip\n    rate: 1000000/s\n    burst: 1000\n  - use: auth\n    keys_file: {}\n  - use: ratelimit\n    key: api_key\n    rate: 1000000/s\n    burst: 1000\n    tokens_per_minute: 1000000000\n  - use: budget\n    ledger: {}\n    prices: [{{ model: '*', prompt_per_1m: 1.0, completion_per_1m: 1.0 }}]\n    default: {{ max_usd: 100000, period: 1d }}\n",
        redis
            .state()
            .replace("timeout: 100ms", "timeout: 2s, chunk_life: 300ms"),
        super::one_backend(&m.url()),
        super::keys_file(dir),
        dir.join("spend.db").display()
    )
}

/// One chat completion with `KEY`: its status and its usage's total tokens.
async fn chat(c: &reqwest::Client, gw: &Gateway) -> (u16, u64) {
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "llama3.1:8b", "max_tokens": 8,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    (status, body["usage"]["total_tokens"].as_u64().unwrap_or(0))
}

/// The tokens the key's window in Redis counts.
fn tokens_counted(redis: &Redis) -> u64 {
    let script = "local k = redis.call('KEYS', ARGV[1])[1] \
                  if not k then return -1 end \
                  return tonumber(redis.call('HGET', k, 'u') or '0')";
    let a = redis
        .cmd(&["EVAL", script, "0", "*rl:*:tokens:{key:team}"])
        .unwrap();
    a.trim_start_matches(':').parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn far_from_the_limits_requests_are_served_from_chunks_and_the_counts_stay_exact() {
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&far_chain(&redis, &m, dir.path())).await;
    let c = client();
    let scripts = redis.calls("evalsha");
    // Eight at a time: a chunk half used starts a taking while the last one's timer runs,
    // and what it puts in place must still end and give back (attacker review: it did not,
    // and the budget stayed held while the key was idle).
    let n = 200;
    let mut used = 0;
    for _ in 0..n / 8 {
        let burst = futures_util::future::join_all((0..8).map(|_| chat(&c, &gw))).await;
        for (status, tokens) in burst {
            assert_eq!(status, 200);
            assert!(tokens > 0);
            used += tokens;
        }
    }
    let scripts = redis.calls("evalsha") - scripts;
    // Asked per request, it would be 3 a request (600). With chunks: the first requests of
    // each key ask, then a taking per chunk and what it gives back as it ends, and the
    // budget's settlements (joined: a call per 5 ms).
    assert!(
        scripts < n * 3 / 4,
        "{scripts} script calls for {n} requests"
    );
    eprintln!("{scripts} script calls for {n} requests");

    // Once the chunks' life is over, what they did not use is given back: Redis counts
    // exactly the tokens the requests used, and holds nothing of the budget.
    let mut counted = 0;
    for _ in 0..100 {
        counted = tokens_counted(&redis);
        if counted == used {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counted, used, "tokens counted in Redis against tokens used");
    let mut acct = Value::Null;
    for _ in 0..100 {
        acct = account_of(&spend_report(&gw).await, "team")
            .cloned()
            .unwrap_or(Value::Null);
        if acct["shared_reserved_usd"].as_f64() == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(acct["shared_reserved_usd"].as_f64(), Some(0.0), "{acct}");
    // Every request's spend reached the shared total: this replica's book and Redis agree.
    let (book, shared) = (
        acct["spent_usd"].as_f64().unwrap(),
        acct["shared_spent_usd"].as_f64().unwrap(),
    );
    assert!(book > 0.0 && (book - shared).abs() < 1e-9, "{acct}");
}

#[tokio::test(flavor = "multi_thread")]
async fn what_a_chunk_did_not_use_goes_back_to_the_other_replicas() {
    // 200 requests at once for the key (burst 199 at 1 an hour), chunks of 8: taken only
    // while 128 more stay free. One replica serves 60 requests (from chunks while it can),
    // the other then gets exactly the rest once the first one's chunks ended.
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{}{}",
        redis
            .state()
            .replace("timeout: 100ms", "timeout: 2s, chunk: 8"),
        super::keyed_chain(
            &m,
            dir.path(),
            "  - use: ratelimit\n    key: api_key\n    rate: 1/h\n    burst: 199\n"
        )
    );
    let (a, b) = (Gateway::start(&body).await, Gateway::start(&body).await);
    let c = client();
    let scripts = redis.calls("evalsha");
    for i in 0..60 {
        assert_eq!(
            chat(&c, &a).await.0,
            200,
            "request {i} on the first replica"
        );
    }
    let scripts = redis.calls("evalsha") - scripts;
    assert!(scripts < 40, "{scripts} script calls for 60 requests");
    // The first replica's chunks end (50 ms) and give back what they held.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut on_b = 0;
    loop {
        match chat(&c, &b).await.0 {
            200 => on_b += 1,
            429 => break,
            s => panic!("unexpected {s}"),
        }
        assert!(on_b <= 200, "no limit on the second replica");
    }
    assert_eq!(60 + on_b, 200, "exactly the burst, across both replicas");
    assert_eq!(chat(&c, &a).await.0, 429);
}

#[tokio::test(flavor = "multi_thread")]
async fn far_from_the_limits_a_request_does_not_wait_for_redis() {
    // Redis 100 ms away: a request that asks it waits that long at least. Chunks live
    // 300 ms: the next one is taken at 225 ms and is there before the last one ends.
    const DELAY: Duration = Duration::from_millis(100);
    let redis = Redis::start();
    let relay = slow_relay(redis.port, DELAY).await;
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let chain = far_chain(&redis, &m, dir.path()).replace(
        &format!("127.0.0.1:{}/0', timeout: 2s", redis.port),
        &format!("127.0.0.1:{relay}/0', timeout: 2s, connect_timeout: 5s"),
    );
    assert!(chain.contains(&relay.to_string()), "{chain}");
    let gw = Gateway::start(&chain).await;
    let c = client();
    let timed = || async {
        let t = std::time::Instant::now();
        assert_eq!(chat(&c, &gw).await.0, 200);
        t.elapsed()
    };
    // The first requests ask (each a round trip) and start the takings: the address's rate,
    // the key's rate, then its tokens, and the budget.
    let mut warm = Vec::new();
    while warm.last().is_none_or(|t| *t >= DELAY / 2) {
        assert!(warm.len() < 40, "never served from chunks: {warm:?}");
        warm.push(timed().await);
    }
    assert!(warm[0] >= DELAY, "never went through Redis: {warm:?}");
    // Then requests are served from the chunks, taken again as they end.
    let mut took = Vec::new();
    for _ in 0..40 {
        took.push(timed().await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let slow = took.iter().filter(|t| **t >= DELAY / 2).count();
    assert!(slow <= 2, "{slow} of 40 waited for Redis: {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lower_limit_reloaded_applies_while_the_key_is_busy() {
    // Attacker review: a keys file reloaded with a lower burst went unheeded for as long as
    // the key stayed busy (the task taking its chunks kept the limits it started with).
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    let write = |burst: u32| {
        std::fs::write(
            &keys,
            format!(
                "keys:\n  - id: team\n    key_sha256: {}\n    rate: 1/h\n    burst: {burst}\n",
                filter_auth::keygen::hash_key(KEY)
            ),
        )
        .unwrap()
    };
    write(100_000);
    let gw = Gateway::start(&format!(
        "{}{}filters:\n  - use: auth\n    keys_file: {}\n  - use: ratelimit\n    key: api_key\n    rate: 1000/s\n    burst: 1000\n",
        redis.state().replace("timeout: 100ms", "timeout: 2s"),
        super::one_backend(&m.url()),
        keys.display()
    ))
    .await;
    let c = client();
    // Busy: served from chunks.
    let mut served = 0;
    for _ in 0..150 {
        assert_eq!(chat(&c, &gw).await.0, 200);
        served += 1;
    }
    let before = redis.calls("evalsha");
    for _ in 0..50 {
        assert_eq!(chat(&c, &gw).await.0, 200);
        served += 1;
    }
    assert!(
        redis.calls("evalsha") - before < 25,
        "not served from chunks"
    );
    // A burst of 100, more than used up already: every request from now on is refused,
    // the key kept as busy as before.
    write(100);
    gw.signal("HUP");
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while !gw.log().contains("SIGHUP: reloaded") {
        assert!(std::time::Instant::now() < until, "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut after = Vec::new();
    for _ in 0..100 {
        after.push(chat(&c, &gw).await.0);
    }
    assert!(
        after.iter().all(|s| *s == 429),
        "{served} served before, then {after:?}"
    );
}
