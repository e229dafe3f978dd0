use std::collections::HashSet;
use std::time::Duration;

use gateway_filter::http::Method;

use super::*;
use crate::config::{BackendKind, BackendSpec, Limits};

fn spec(strategy: Strategy) -> RoutingSpec {
    RoutingSpec {
        strategy,
        per_model: vec![("big:*".into(), Strategy::LeastBusy)],
        retries: 2,
        fail_threshold: 3,
        cooldown: Duration::from_millis(100),
        cooldown_max: Duration::from_millis(300),
        latency_tolerance: 0.2,
        residency_max_in_flight: 2,
        queue_size: 10,
        queue_timeout: Duration::from_secs(1),
        first_byte_timeout: None,
        cold_start_timeout: Duration::from_secs(300),
        sse_keepalive: None,
        discovery_interval: None,
        health_interval: None,
        probe_timeout: Duration::from_secs(1),
        discovery_timeout: Duration::from_secs(1),
    }
}

fn specs(weights: &[u32]) -> Vec<BackendSpec> {
    weights
        .iter()
        .enumerate()
        .map(|(i, w)| BackendSpec {
            name: format!("b{i}").into(),
            kind: BackendKind::Ollama,
            weight: *w,
            max_in_flight: None,
            first_byte_timeout: None,
            models: None,
            addr: ([127, 0, 0, 1], 10_000 + i as u16).into(),
            authority: format!("127.0.0.1:{}", 10_000 + i),
        })
        .collect()
}

fn limits() -> Limits {
    Limits {
        max_body: 1,
        connect_timeout: Duration::from_secs(1),
        read_timeout: Duration::from_secs(1),
        send_timeout: Duration::from_secs(1),
        client_body_timeout: Duration::from_secs(1),
        client_header_timeout: Duration::from_secs(1),
        client_send_timeout: Duration::from_secs(1),
        keepalive_timeout: Duration::from_secs(1),
        keepalive_requests: 10,
        ipv6_prefix: 64,
    }
}

fn router(strategy: Strategy, weights: &[u32]) -> ModelRouter {
    let s = spec(strategy);
    ModelRouter::new(BackendPool::new(&specs(weights), &limits(), &s), s)
}

fn ctx(model: Option<&str>) -> RequestCtx {
    let mut c = RequestCtx::new(String::new(), Method::POST, "/api/chat".into());
    c.model = model.map(str::to_string);
    c
}

fn set(names: &[&str]) -> HashSet<String> {
    names
        .iter()
        .map(|s| canonical_model(s).into_owned())
        .collect()
}

fn counts(r: &ModelRouter, c: &RequestCtx, n: usize) -> Vec<usize> {
    let mut out = vec![0; r.pool().len()];
    for _ in 0..n {
        match r.pick(c, &[]) {
            Pick::Backend(i) => out[i] += 1,
            p => panic!("{p:?}"),
        }
    }
    out
}

#[test]
fn round_robin_is_even_and_weighted() {
    let r = router(Strategy::RoundRobin, &[1, 1, 1]);
    let c = counts(&r, &ctx(None), 100);
    assert!(
        c.iter().max().unwrap() - c.iter().min().unwrap() <= 1,
        "{c:?}"
    );
    let r = router(Strategy::RoundRobin, &[1, 3]);
    assert_eq!(counts(&r, &ctx(None), 400), [100, 300]);
    let r = router(Strategy::Random, &[1, 3]);
    let c = counts(&r, &ctx(None), 4000);
    assert!((2700..3300).contains(&c[1]), "{c:?}");
}

#[test]
fn models_decide_the_candidates() {
    let r = router(Strategy::RoundRobin, &[1, 1, 1]);
    let p = r.pool();
    p.get(0).set_models(set(&["llama3.1:8b"]), vec![]);
    p.get(1).set_models(set(&["qwen2.5:7b"]), vec![]);
    // b2's list is unknown: it may serve anything.
    assert_eq!(counts(&r, &ctx(Some("qwen2.5:7b")), 10)[0], 0);
    p.get(2).set_models(set(&["llama3.1:8b"]), vec![]);
    assert_eq!(
        counts(&r, &ctx(Some("qwen2.5:7b")), 10),
        [0, 10, 0],
        "a model on one backend only always goes there"
    );
    assert_eq!(r.pick(&ctx(Some("mistral")), &[]), Pick::UnknownModel);
    assert_eq!(r.pick(&ctx(Some("qwen2.5:7b")), &[1]), Pick::NoneAvailable);
}

#[test]
fn residency_prefers_loaded_until_busy() {
    let r = router(Strategy::RoundRobin, &[1, 1]);
    let p = r.pool();
    p.get(1).set_loaded(set(&["llama3.1:8b"]));
    assert_eq!(counts(&r, &ctx(Some("llama3.1:8b")), 6), [0, 6]);
    let _a = p.lease(1, 0);
    let _b = p.lease(1, 0); // at the residency threshold (2): the cold box is used too
    assert!(counts(&r, &ctx(Some("llama3.1:8b")), 6)[0] > 0);
}

#[test]
fn usage_counts_reserved_tokens_in_flight() {
    let r = router(Strategy::Usage, &[1, 1]);
    let p = r.pool();
    p.record(0, 5_000, None);
    assert_eq!(r.pick(&ctx(None), &[]), Pick::Backend(1));
    let _long = p.lease(1, 8_000); // a long generation is running on b1
    assert_eq!(r.pick(&ctx(None), &[]), Pick::Backend(0));
}

#[test]
fn least_busy_skips_full_and_per_model_strategy() {
    let r = router(Strategy::Usage, &[1, 1]);
    assert_eq!(r.strategy_for(Some("big:70b")), Strategy::LeastBusy);
    assert_eq!(r.strategy_for(Some("small")), Strategy::Usage);
    let p = r.pool();
    let _x = p.lease(0, 0);
    assert_eq!(r.pick(&ctx(Some("big:70b")), &[]), Pick::Backend(1));
}

#[test]
fn passive_health_cools_down_with_backoff() {
    let r = router(Strategy::RoundRobin, &[1, 1]);
    let p = r.pool();
    p.mark_failed(0);
    p.mark_failed(0);
    assert!(p.is_up(0), "below the threshold");
    p.mark_failed(0);
    assert!(!p.is_up(0));
    assert_eq!(counts(&r, &ctx(None), 4), [0, 4]);
    std::thread::sleep(Duration::from_millis(120));
    assert!(p.is_up(0), "after the cooldown it is tried again");
    // A new streak: one failure after the cooldown does not take it out again (one slow
    // request a cooldown from one client kept backends out).
    p.mark_failed(0);
    p.mark_failed(0);
    assert!(p.is_up(0), "below the threshold again");
    p.mark_failed(0); // still failing: 200 ms now
    std::thread::sleep(Duration::from_millis(120));
    assert!(!p.is_up(0), "the cooldown doubled");
    p.set_probe(1, false);
    assert_eq!(r.pick(&ctx(None), &[]), Pick::NoneAvailable, "all down");
    p.mark_ok(0);
    p.set_probe(1, true);
    assert!(p.is_up(0) && p.is_up(1));
}

#[test]
fn latency_prefers_fast_backends_within_tolerance() {
    let r = router(Strategy::Latency, &[1, 1, 1]);
    let p = r.pool();
    p.record(0, 0, Some(Duration::from_millis(100)));
    p.record(1, 0, Some(Duration::from_millis(110)));
    assert_eq!(
        r.pick(&ctx(None), &[]),
        Pick::Backend(2),
        "an unmeasured backend is tried first"
    );
    p.record(2, 0, Some(Duration::from_millis(500)));
    let c = counts(&r, &ctx(None), 200);
    assert_eq!(c[2], 0);
    assert!(c[0] > 50 && c[1] > 50, "both fast ones share: {c:?}");
}

#[test]
fn max_in_flight_cannot_be_overfilled_by_a_race() {
    let specs = vec![BackendSpec {
        name: "solo".into(),
        kind: BackendKind::Ollama,
        weight: 1,
        max_in_flight: Some(3),
        first_byte_timeout: None,
        models: None,
        addr: ([127, 0, 0, 1], 10_000).into(),
        authority: "127.0.0.1:10000".into(),
    }];
    let pool = BackendPool::new(&specs, &limits(), &spec(Strategy::LeastBusy));
    let leases = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                for _ in 0..100 {
                    if let Some(l) = pool.try_lease(0, 0) {
                        leases.lock().unwrap().push(l);
                    }
                }
            });
        }
    });
    assert_eq!(leases.lock().unwrap().len(), 3);
    assert_eq!(pool.get(0).in_flight(), 3);
    leases.lock().unwrap().clear();
    assert_eq!(pool.get(0).in_flight(), 0, "leases give their slot back");
    // A client's `max_tokens` near u64::MAX (no output cap) or a backend's absurd usage does
    // not wrap the figures the `usage` strategy routes on (attacker review).
    let held: Vec<_> = (0..2).filter_map(|_| pool.try_lease(0, u64::MAX)).collect();
    pool.record(0, u64::MAX, None);
    pool.record(0, u64::MAX, None);
    let score = pool.usage_score(0);
    assert!(score >= 4 * super::MAX_TOKENS_COUNTED, "{score}");
    drop(held);
    assert!(pool.usage_score(0) >= 2 * super::MAX_TOKENS_COUNTED);
}

#[test]
fn retries_stop_at_the_limit_and_when_no_backend_is_left() {
    let r = router(Strategy::RoundRobin, &[1, 1, 1, 1]);
    let c = RequestCtx::new("r".into(), Method::POST, "/api/chat".into());
    // `retries: 2`: after the first attempt and after the second, not after the third.
    assert!(r.may_retry(&c, &[0]));
    assert!(r.may_retry(&c, &[0, 1]));
    assert!(!r.may_retry(&c, &[0, 1, 2]));
    // Two backends: after both failed, nothing is left to try.
    let two = router(Strategy::RoundRobin, &[1, 1]);
    assert!(two.may_retry(&c, &[0]));
    assert!(!two.may_retry(&c, &[0, 1]));
}

/// A router whose cooldowns outlast a test (10 s), for the rules that bound outs.
fn lasting(n: usize) -> ModelRouter {
    lasting_with(specs(&vec![1; n]))
}

fn lasting_with(specs: Vec<BackendSpec>) -> ModelRouter {
    let mut s = spec(Strategy::RoundRobin);
    s.cooldown = Duration::from_secs(10);
    s.cooldown_max = Duration::from_secs(20);
    let pool = BackendPool::new(&specs, &limits(), &s);
    // Older than the misses' waits below, so their windows start after the pool's clock.
    std::thread::sleep(Duration::from_millis(120));
    ModelRouter::new(pool, s)
}

const MS: fn(u64) -> Duration = Duration::from_millis;

/// A miss (before the answer) judged alone on `idx`, `waited` long, at `at` (pool ms).
fn miss_at(r: &ModelRouter, idx: usize, caller: u64, waited: u64, at: u64) {
    r.pool().mark_slow(idx, judged(caller, waited, at, false));
}

fn judged(caller: u64, waited: u64, at_ms: u64, broke: bool) -> Judged {
    Judged {
        caller,
        waited: MS(waited),
        at_ms,
        broke,
    }
}

/// The same, now, 1 ms long: misses made a few ms apart never overlap.
fn miss(r: &ModelRouter, idx: usize, caller: u64) {
    let at = r.pool().now_ms();
    miss_at(r, idx, caller, 1, at);
    std::thread::sleep(MS(3));
}

fn down(r: &ModelRouter) -> usize {
    (0..r.pool().len()).filter(|&i| !r.pool().is_up(i)).count()
}

#[test]
fn settled_outcomes_decide_health_and_figures() {
    let r = lasting(3);
    let failed = |health| Outcome::Failed { health };
    let answered = |status| Outcome::Answered {
        status,
        tokens: 40,
        ttfb: Some(Duration::from_millis(5)),
        inference: true,
    };
    // A 429 does not count against a backend, however often.
    for _ in 0..5 {
        r.settle(0, failed(Health::Kept));
    }
    assert!(r.pool().is_up(0));
    // A server error answered is not one by itself (`forward` counts it once another
    // backend served the same request).
    for _ in 0..5 {
        r.settle(0, answered(500));
    }
    assert!(r.pool().is_up(0));
    // What a request may cause itself (a deadline missed, a stream that broke) counts once
    // per caller while the backend serves others: one client's slow requests do not take
    // out a backend that works. (Each miss began 100 ms before it was judged, and the
    // backend started an answer in between.)
    for caller in [7, 7, 7, 7, 8] {
        let at = r.pool().now_ms();
        r.pool().mark_serving(0);
        miss_at(&r, 0, caller, 100, at);
    }
    assert!(r.pool().is_up(0));
    // `fail_threshold: 3` failures in a row take it out (a third caller's, or the
    // backend's own).
    r.settle(0, failed(Health::Failed));
    assert!(!r.pool().is_up(0));
    // A good answer clears the count, and its latency is what `latency` ranks by.
    r.settle(1, failed(Health::Failed));
    r.settle(1, failed(Health::Failed));
    r.settle(1, answered(200));
    r.settle(1, failed(Health::Failed));
    assert!(r.pool().is_up(1));
    assert!(r.pool().get(1).ttfb_us() > 0);
    // Only a generation or embedding served clears it: a model list, a version or a
    // client's error also comes from a backend whose runner fails every request.
    r.settle(1, failed(Health::Failed));
    r.settle(
        1,
        Outcome::Answered {
            status: 200,
            tokens: 0,
            ttfb: None,
            inference: false,
        },
    );
    r.settle(1, answered(400));
    r.settle(1, failed(Health::Failed));
    assert!(!r.pool().is_up(1), "polling it kept it in");
}

#[test]
fn a_quiet_backend_that_misses_one_request_after_another_is_taken_out() {
    // Serving nobody while requests waited on it, one after another (hung), it fails on its
    // own, whoever waited.
    let r = lasting(3);
    miss(&r, 1, 7);
    miss(&r, 1, 7);
    assert!(r.pool().is_up(1));
    miss(&r, 1, 7);
    assert!(!r.pool().is_up(1), "a hung backend stays in");
    // Requests still running on it when it is out add nothing (they would double the
    // cooldown), nor do several callers' misses or server errors judged then.
    let down_until = r.pool().get(1).down_until();
    for caller in 8..12 {
        miss(&r, 1, caller);
        r.pool().mark_failed_for(1, caller);
        r.pool().mark_server_error(1);
    }
    assert_eq!(r.pool().get(1).down_until(), down_until);
    // A burst of slow requests of one client on a quiet backend (their waits overlap: each
    // began 100 ms before it was judged) is one failure, not one each.
    let r = lasting(2);
    let at = r.pool().now_ms();
    for _ in 0..8 {
        miss_at(&r, 0, 9, 100, at);
    }
    assert_eq!(r.pool().get(0).failures(), 1);
    // Judged one after another, each its own (so the one above counted through the burst
    // rule, not by chance).
    let r = lasting(2);
    for at in [10, 30, 50] {
        miss_at(&r, 0, 9, 5, r.pool().now_ms() - 100 + at);
    }
    assert!(!r.pool().is_up(0));
    // A backend that began answering others while the request waited has a busy queue at
    // worst: once per caller.
    let r = lasting(2);
    for _ in 0..3 {
        let at = r.pool().now_ms();
        r.pool().mark_serving(0);
        miss_at(&r, 0, 7, 50, at);
        std::thread::sleep(MS(60));
    }
    assert_eq!(
        r.pool().get(0).failures(),
        1,
        "served others, still counted in full"
    );
    // A break (a stream broken once begun) is explained only by answers completed meanwhile:
    // a backend that breaks every stream after its first bytes begins answers all the time.
    let r = lasting(2);
    for _ in 0..3 {
        r.pool().mark_serving(0);
        let at = r.pool().now_ms();
        r.pool().mark_slow(0, judged(7, 50, at, true));
        std::thread::sleep(MS(60));
    }
    assert!(!r.pool().is_up(0), "answers begun kept a broken backend in");
}

/// Attacker review (2026-12-05): one client's requests that are slow by themselves (a long
/// prompt, a model loaded nowhere), each retried on every backend, took every backend out:
/// each missed deadline on a quiet backend counted in full.
#[test]
fn slow_requests_cannot_take_every_backend_out() {
    let r = lasting(3);
    let pool = r.pool();
    // Retried on all three and missed on all three, again and again: slow by itself, once
    // for its caller on each; also when the last backend answered it, slowly (a longer
    // deadline of its own, a cold model's).
    for round in 0..6 {
        let mut m = MissedDeadlines::default();
        m.push(pool, 0, 7, MS(1), false);
        m.push(pool, 1, 7, MS(1), false);
        if round % 2 == 0 {
            m.push(pool, 2, 7, MS(1), false);
        } else {
            m.answered(MS(1));
        }
        drop(m);
        std::thread::sleep(MS(3));
    }
    assert_eq!(down(&r), 0, "slow everywhere took a backend out");
    // One miss, answered slowly by another backend: slow by itself too.
    let r = lasting(2);
    for _ in 0..4 {
        let mut m = MissedDeadlines::default();
        m.push(r.pool(), 0, 7, MS(1), false);
        m.answered(MS(1));
        drop(m);
        std::thread::sleep(MS(3));
    }
    assert!(
        r.pool().is_up(0),
        "a slower answer elsewhere blamed the first backend"
    );
    // Each reaching one backend (no retries), from one caller or several: one backend out
    // at a time, and the others' counts stop before the one that would take them out.
    let r = lasting(3);
    for (idx, caller) in [
        (0, 7),
        (0, 7),
        (0, 7),
        (1, 7),
        (1, 8),
        (1, 9),
        (2, 10),
        (2, 11),
        (2, 12),
    ] {
        miss(&r, idx, caller);
    }
    assert!(!r.pool().is_up(0));
    assert_eq!(down(&r), 1, "a second one went out");
    // The same when the counts were built up first (staged by one key, finished by another).
    let r = lasting(3);
    for idx in [0, 1, 2, 0, 1, 2] {
        miss(&r, idx, 7);
    }
    for idx in 0..3 {
        r.pool().mark_failed_for(idx, 8);
    }
    assert_eq!(down(&r), 1);
    // Server errors another backend did not return (a context size only one GPU holds)
    // are held to the same.
    let r = lasting(3);
    for _ in 0..3 {
        r.pool().mark_server_error(0);
        r.pool().mark_server_error(1);
    }
    assert_eq!(down(&r), 1);
    // A refused connection is the backend's own: not held back.
    r.pool().mark_failed(1);
    assert_eq!(down(&r), 2);
    // With nothing else to take it (one backend), out or not, it still takes every request.
    let r = lasting(1);
    for caller in 0..6 {
        miss(&r, 0, caller);
        r.pool().mark_failed_for(0, caller);
    }
    assert_eq!(
        r.pick(&ctx(None), &[]),
        Pick::Backend(0),
        "the only backend was left"
    );
}

/// Review: "never the last one" held for the failing request's own model and route only:
/// slow `/v1` requests took out the one Ollama backend (an OpenAI-compatible one served the
/// model too), leaving Ollama's routes nowhere to go; or the one backend of another model.
/// A backend out on failures requests may have caused stands by: what no backend up can
/// take still goes to it.
#[test]
fn a_backend_out_on_misses_still_takes_what_no_other_can() {
    let backend = |i: u16, kind, models: Option<&[&str]>| BackendSpec {
        name: format!("b{i}").into(),
        kind,
        weight: 1,
        max_in_flight: None,
        first_byte_timeout: None,
        models: models.map(|m| m.iter().map(|s| s.to_string()).collect()),
        addr: ([127, 0, 0, 1], 10_000 + i).into(),
        authority: format!("127.0.0.1:{}", 10_000 + i),
    };
    let at = |path: &str, model: &str| {
        let mut c = RequestCtx::new(String::new(), Method::POST, path.into());
        c.model = Some(model.into());
        c
    };
    // b0: the only Ollama backend, and the only one of model n.
    let r = lasting_with(vec![
        backend(0, BackendKind::Ollama, Some(&["m", "n"])),
        backend(1, BackendKind::Openai, Some(&["m"])),
    ]);
    for caller in 0..4 {
        miss(&r, 0, caller);
    }
    assert!(!r.pool().is_up(0));
    assert_eq!(
        r.pick(&at("/v1/chat/completions", "m"), &[]),
        Pick::Backend(1)
    );
    assert_eq!(r.pick(&at("/api/chat", "m"), &[]), Pick::Backend(0));
    assert_eq!(
        r.pick(&at("/v1/chat/completions", "n"), &[]),
        Pick::Backend(0)
    );
    // Not once it was tried, nor when its probe fails (it is down, not standing by).
    assert_eq!(r.pick(&at("/api/chat", "m"), &[0]), Pick::NoneAvailable);
    r.pool().set_probe(0, false);
    assert_eq!(r.pick(&at("/api/chat", "m"), &[]), Pick::NoneAvailable);
    r.pool().set_probe(0, true);
    assert_eq!(r.pick(&at("/api/chat", "m"), &[]), Pick::Backend(0));
    // Requests sent to it while it stands by change nothing (a refused connection does not
    // double its cooldown, nor end its standing by: its probe decides).
    let until = r.pool().get(0).down_until();
    r.pool().mark_failed(0);
    assert_eq!(r.pool().get(0).down_until(), until);
    assert_eq!(r.pick(&at("/api/chat", "m"), &[]), Pick::Backend(0));
    // A generation served there brings it back.
    r.pool().mark_ok(0);
    assert!(r.pool().is_up(0));
    // Out on its own failures (refused connections), it takes nothing.
    let r = lasting_with(vec![
        backend(0, BackendKind::Ollama, Some(&["m", "n"])),
        backend(1, BackendKind::Openai, Some(&["m"])),
    ]);
    for _ in 0..3 {
        r.pool().mark_failed(0);
    }
    assert_eq!(r.pick(&at("/api/chat", "m"), &[]), Pick::NoneAvailable);
}

/// Review: a write the backend broke off, then served whole by another backend, is the
/// backend's failure, whoever sent it: judged alone, however quickly the other answered.
#[test]
fn a_write_broken_off_and_served_elsewhere_counts_in_full() {
    let r = lasting(2);
    for _ in 0..3 {
        let mut m = MissedDeadlines::default();
        m.push(r.pool(), 0, 7, MS(0), true);
        m.answered(MS(30));
        drop(m);
        std::thread::sleep(MS(5));
    }
    assert!(!r.pool().is_up(0));
}

/// A backend that hangs is still found: another backend starting its answer to the same
/// request sooner judges the miss alone, and a quiet backend's misses count in full.
#[test]
fn a_miss_that_another_backend_answered_sooner_counts_in_full() {
    let r = lasting(3);
    let pool = r.pool();
    for round in 0..3 {
        let mut m = MissedDeadlines::default();
        m.push(pool, 0, 7, MS(2), false);
        // Another answered within the deadline the first missed (an operator's deadline
        // near the usual time to first byte still finds a hung backend).
        m.answered(MS(1));
        drop(m);
        assert_eq!(pool.is_up(0), round < 2, "round {round}");
        std::thread::sleep(MS(5));
    }
}
