//! Budgets across replicas: reservations race on one Redis without overspending, and spend
//! that Redis forgets comes back from the replicas' ledgers.

use std::time::Duration;

use serde_json::Value;

use super::support::budget::{account_of, cents, config, generate, spend_json, spend_report};
use super::support::redis::Redis;
use super::support::{mock, Gateway};

async fn three_buyers(
    redis: &Redis,
    m: &mock_ollama::MockServer,
) -> Vec<(Gateway, tempfile::TempDir)> {
    let mut out = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        // $0.01 per completion token, 5 tokens per request: $0.05; the budget fits 10.
        // A call past its deadline falls back to this replica's own book (`on_error: local`,
        // tested in failures.rs): under a loaded test run 100 ms is too short to count on.
        // Settlements wait 200 ms, so those of one replica reach Redis joined in one call.
        let body = format!(
            "{}{}",
            redis
                .state()
                .replace("timeout: 100ms", "timeout: 2s, settle_window: 200ms"),
            config(dir.path(), m, 0.5, 0.0, 10000.0, "")
        );
        out.push((Gateway::start(&body).await, dir));
    }
    out
}

/// The buyer's account as `/admin/spend` of `gw` shows it.
async fn account(gw: &Gateway) -> Value {
    account_of(&spend_report(gw).await, "buyer")
        .cloned()
        .unwrap_or(Value::Null)
}

/// The buyer's account on `gw` once `ready` says so, or as it is after 5 s.
async fn account_when(gw: &Gateway, ready: impl Fn(&Value) -> bool) -> Value {
    let mut acct = Value::Null;
    for _ in 0..250 {
        acct = account(gw).await;
        if ready(&acct) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    acct
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_requests_on_three_replicas_never_overspend() {
    let redis = Redis::start();
    let m = mock().await;
    let mut gws = three_buyers(&redis, &m).await;
    let tasks: Vec<_> = (0..100)
        .map(|i| tokio::spawn(generate(gws[i % 3].0.url("/api/generate"))))
        .collect();
    let mut ok = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            200 => ok += 1,
            429 => assert_eq!(body["code"], "budget_exceeded", "{body}"),
            s => panic!("unexpected {s}: {body}"),
        }
    }
    assert_eq!(
        ok, 10,
        "exactly the 10 requests the budget fits, on all replicas together"
    );
    assert_eq!(m.hits("/api/generate"), 10);
    // Every replica's admin report shows the shared total.
    let acct = account_when(&gws[0].0, |a| {
        cents(a["shared_reserved_usd"].as_f64().unwrap_or(1.0)) == 0
    })
    .await;
    assert_eq!(
        cents(acct["shared_spent_usd"].as_f64().unwrap()),
        50,
        "{acct}"
    );
    assert_eq!(
        cents(acct["shared_reserved_usd"].as_f64().unwrap()),
        0,
        "every reservation given back: {acct}"
    );
    // Each replica's ledger holds its own share; together they are the budget, never more.
    let mut total = 0;
    for (gw, dir) in gws.iter_mut() {
        gw.signal("TERM");
        tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10))).expect("exits");
        total += spend_json(dir.path())
            .first()
            .map_or(0, |r| cents(r["usd"].as_f64().unwrap()));
    }
    assert_eq!(total, 50);
    // `spend` sums several ledgers.
    let mut args = vec!["spend".to_string()];
    for (_, dir) in &gws {
        args.push("--ledger".into());
        args.push(dir.path().join("spend.db").display().to_string());
    }
    args.extend(["--period", "all", "--json"].map(String::from));
    let out = std::process::Command::new(super::support::BIN)
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(cents(rows[0]["usd"].as_f64().unwrap()), 50);
    assert_eq!(rows[0]["requests"], 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn spend_forgotten_by_redis_comes_back_from_the_ledgers() {
    let redis = Redis::start();
    let m = mock().await;
    let gws = three_buyers(&redis, &m).await;
    // Two requests on each of the first two replicas: $0.20.
    for gw in [&gws[0].0, &gws[0].0, &gws[1].0, &gws[1].0] {
        assert_eq!(generate(gw.url("/api/generate")).await.0, 200);
    }
    let shared = |a: &Value| cents(a["shared_spent_usd"].as_f64().unwrap_or(-1.0));
    let acct = account_when(&gws[0].0, |a| shared(a) == 20).await;
    assert_eq!(shared(&acct), 20, "{acct}");
    assert_eq!(redis.cmd(&["FLUSHALL"]).as_deref(), Some("+OK"));
    // The replicas notice within a probe interval and put their own totals back.
    let back = shared(&account_when(&gws[0].0, |a| shared(a) == 20).await);
    assert_eq!(back, 20, "the period's spend came back from the ledgers");
    // And it still counts: $0.30 left fits 6 more, not 7.
    let mut ok = 0;
    for i in 0..8 {
        if generate(gws[i % 3].0.url("/api/generate")).await.0 == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn settlements_still_waiting_at_exit_are_sent() {
    let redis = Redis::start();
    let m = mock().await;
    // Replica `a` joins settlements over a whole second, longer than it lives; `b` sends
    // each at once.
    let state = redis.state().replace("timeout: 100ms", "timeout: 2s");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let slow = state
        .replace("timeout: 2s", "timeout: 2s, settle_window: 1s")
        .replace("lease_ttl: 1s", "lease_ttl: 5s");
    let chain = |dir: &tempfile::TempDir| config(dir.path(), &m, 0.5, 0.0, 10000.0, "");
    let mut a = Gateway::start(&format!("{slow}{}", chain(&dir_a))).await;
    let now = state.replace("timeout: 2s", "timeout: 2s, settle_window: 0s");
    let b = Gateway::start(&format!("{now}{}", chain(&dir_b))).await;
    assert_eq!(generate(b.url("/api/generate")).await.0, 200);
    assert_eq!(generate(a.url("/api/generate")).await.0, 200);
    a.signal("TERM");
    tokio::task::block_in_place(|| a.wait_exit(Duration::from_secs(10))).expect("exits");
    // `b` sees both requests' spend and no reservation left, at once: `a`'s settlement was
    // sent at its exit, not left to the lease's expiry (and its spend not lost).
    let acct = account(&b).await;
    assert_eq!(
        cents(acct["shared_spent_usd"].as_f64().unwrap()),
        10,
        "{acct}"
    );
    assert_eq!(
        cents(acct["shared_reserved_usd"].as_f64().unwrap()),
        0,
        "{acct}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_settlement_that_never_arrives_is_put_back_from_the_ledger() {
    let redis = Redis::start();
    let m = mock().await;
    // Settlements wait 200 ms; a call gives up after 300 ms; the circuit opens only after
    // 10 failures, so this short hang never opens it (which would put spend back anyway).
    let state = redis.state().replace(
        "timeout: 100ms",
        "timeout: 2s, settle_window: 200ms, connect_timeout: 300ms, breaker_failures: 10",
    );
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let chain = |dir: &tempfile::TempDir| config(dir.path(), &m, 0.5, 0.0, 10000.0, "");
    let a = Gateway::start(&format!("{state}{}", chain(&dir_a))).await;
    let b = Gateway::start(&format!("{state}{}", chain(&dir_b))).await;
    assert_eq!(generate(b.url("/api/generate")).await.0, 200);
    assert_eq!(generate(a.url("/api/generate")).await.0, 200);
    // Redis hangs while `a`'s settlement waits, so the settlement is lost.
    redis.signal("STOP");
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.signal("CONT");
    // `a` notices at its next probe and puts its spend back from its own book and ledger.
    let acct = account_when(&b, |a| {
        cents(a["shared_spent_usd"].as_f64().unwrap_or(0.0)) == 10
    })
    .await;
    assert_eq!(
        cents(acct["shared_spent_usd"].as_f64().unwrap()),
        10,
        "the lost settlement's spend is counted again: {acct}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn holds_taken_alongside_a_refused_rate_are_given_back() {
    // The key's rate limit (with its tokens per minute) and the budget ask Redis together;
    // when the rate refuses, the budget's reservation, already taken, goes back (and the
    // tokens were never taken: the limiter's script reserves them only past the rate).
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{}{}",
        redis
            .state()
            .replace("timeout: 100ms", "timeout: 2s, settle_window: 100ms")
            .replace("lease_ttl: 1s", "lease_ttl: 30s"),
        config(dir.path(), &m, 0.5, 0.0, 10000.0, "").replace(
            "  - use: budget\n",
            "  - use: ratelimit\n    key: api_key\n    rate: 1/m\n    burst: 1\n    tokens_per_minute: 100000\n  - use: budget\n",
        )
    );
    let gw = Gateway::start(&body).await;
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(generate(gw.url("/api/generate"))))
        .collect();
    let (mut ok, mut used) = (0, 0);
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            200 => {
                ok += 1;
                used += body["prompt_eval_count"].as_i64().unwrap()
                    + body["eval_count"].as_i64().unwrap();
            }
            429 => assert_eq!(body["code"], "rate_limit_exceeded", "{body}"),
            s => panic!("unexpected {s}: {body}"),
        }
    }
    assert_eq!(ok, 2, "burst 1: two pass");
    // Nothing stays reserved (the leases live 30 s: only giving back frees them), and only
    // the two that passed are charged: 5 tokens at $0.01.
    let acct = account_when(&gw, |a| {
        cents(a["shared_reserved_usd"].as_f64().unwrap_or(1.0)) == 0
            && cents(a["reserved_usd"].as_f64().unwrap_or(1.0)) == 0
    })
    .await;
    assert_eq!(
        cents(acct["shared_reserved_usd"].as_f64().unwrap()),
        0,
        "{acct}"
    );
    assert_eq!(cents(acct["reserved_usd"].as_f64().unwrap()), 0, "{acct}");
    assert_eq!(
        cents(acct["shared_spent_usd"].as_f64().unwrap()),
        10,
        "{acct}"
    );
    // The minute's token count is what the two used.
    let count =
        "local k = redis.call('KEYS', '*tokens*')[1]; return tonumber(redis.call('HGET', k, 'u'))";
    let mut in_redis = None;
    for _ in 0..100 {
        in_redis = redis.cmd(&["EVAL", count, "0"]);
        if in_redis.as_deref() == Some(format!(":{used}").as_str()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(in_redis, Some(format!(":{used}")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_ledger_is_put_back_at_a_pace_that_keeps_running_requests_held() {
    // Attacker review: every account of the ledger was put back at once (four calls for each
    // principal it ever saw), which filled the state's thread and connection: the holds of
    // running requests went unrenewed and lapsed, calls passed their deadlines, and each
    // such failure asked for the whole put-back again.
    let redis = Redis::start();
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    const PRINCIPALS: usize = 20_000;
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    let script = format!(
        "import sqlite3, datetime, sys\n\
         c = sqlite3.connect(sys.argv[1])\n\
         c.execute('CREATE TABLE spend (day TEXT NOT NULL, principal TEXT NOT NULL, model TEXT NOT NULL, usd_nano INTEGER NOT NULL, requests INTEGER NOT NULL, PRIMARY KEY (day, principal, model))')\n\
         day = (datetime.date(1970, 1, 1) + datetime.timedelta(days={today})).isoformat()\n\
         c.executemany('INSERT INTO spend VALUES (?, ?, ?, ?, ?)', [(day, 'p%d' % i, 'llama3.1:8b', 1000000, 1) for i in range({PRINCIPALS})])\n\
         c.commit()\n"
    );
    let made = std::process::Command::new("python3")
        .args(["-c", &script])
        .arg(dir.path().join("spend.db"))
        .status()
        .unwrap();
    assert!(made.success());
    let state = redis
        .state()
        .replace("timeout: 100ms", "timeout: 2s")
        .replace("lease_ttl: 1s", "lease_ttl: 600ms");
    let gw = Gateway::start(&format!(
        "{state}{}",
        config(dir.path(), &m, 0.5, 0.0, 10000.0, "")
    ))
    .await;
    let keys = || {
        redis
            .info("keyspace")
            .split("keys=")
            .nth(1)
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
    };
    // Every principal's day, week, month and total come back.
    let wait_all = || async {
        for _ in 0..300 {
            if keys() >= PRINCIPALS * 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        keys()
    };
    assert!(wait_all().await >= PRINCIPALS * 4, "{} keys", keys());
    // A stream that outlives several lease times while the server forgets everything and
    // the replica puts it all back.
    let stream = tokio::spawn(
        reqwest::Client::new()
            .post(gw.url("/api/generate"))
            .bearer_auth(super::support::budget::KEY)
            .header("x-mock-chunks", "5")
            .header("x-mock-delay-ms", "400")
            .json(&serde_json::json!({"model": "llama3.1:8b", "prompt": "x"}))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(redis.cmd(&["FLUSHALL"]).as_deref(), Some("+OK"));
    assert!(wait_all().await >= PRINCIPALS * 4, "{} keys", keys());
    let r = stream.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let log = gw.log();
    assert!(!log.contains("could not be renewed"), "{log}");
    assert!(!log.contains("did not reach the server"), "{log}");
    assert_eq!(gw.metric("llm_gateway_state_degraded").await, Some(0.0));
    assert_eq!(
        gw.metric("llm_gateway_state_errors_total")
            .await
            .unwrap_or(0.0),
        0.0
    );
}
