use super::*;
use gateway_filter::http::Method;
use gateway_filter::{Decision, Overrides, Principal};
use serde_json::json;

fn filter(dir: &std::path::Path, extra: serde_json::Value) -> Arc<dyn Filter> {
    let mut o = json!({
        "ledger": "spend.db",
        "prices": [{"model": "llama3.1:*", "prompt_per_1m": 0.0, "completion_per_1m": 1000000.0}],
        "commit_interval": "20ms",
    });
    for (k, v) in extra.as_object().unwrap() {
        o[k] = v.clone();
    }
    build(
        &o,
        &BuildContext {
            config_dir: dir.to_path_buf(),
            ..Default::default()
        },
    )
    .unwrap()
}

fn ctx(principal: &str, max_usd: Option<f64>) -> RequestCtx {
    let mut c = RequestCtx::new(String::new(), Method::POST, "/api/chat".into());
    c.model = Some("llama3.1:8b".into());
    c.max_tokens = Some(5); // completion price $1/token: reservation $5
    c.principal = Some(Arc::new(Principal {
        id: principal.into(),
        overrides: Overrides {
            max_usd,
            period: Some(Period::Day),
            ..Default::default()
        },
        ..Default::default()
    }));
    c
}

/// The backend answered with 3 prompt and `completion` tokens.
fn answered(c: &mut RequestCtx, completion: u64) {
    c.backend = Some("local".into());
    c.reached_backend = true;
    c.status = 200;
    c.usage = Some(Usage {
        prompt_tokens: 3,
        completion_tokens: completion,
        ..Default::default()
    });
}

async fn served(f: &Arc<dyn Filter>, c: &mut RequestCtx, completion: u64) {
    answered(c, completion);
    f.on_response_end(c);
    f.on_complete(c).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reserve_then_charge_real_usage() {
    let dir = tempfile::tempdir().unwrap();
    let f = filter(dir.path(), json!({}));
    let mut c = ctx("alice", Some(12.0));
    f.on_request(&mut c).await.unwrap();
    served(&f, &mut c, 2).await; // charged $2, not the $5 reserved
    assert_eq!(c.cost_usd, Some(2.0));
    let mut c = ctx("alice", Some(12.0));
    f.on_request(&mut c).await.unwrap(); // 2 spent + 5 reserved ≤ 12
    let mut d = ctx("alice", Some(12.0));
    f.on_request(&mut d).await.unwrap(); // 2 + 5 + 5 = 12 ≤ 12
    let mut e = ctx("alice", Some(12.0));
    assert_eq!(
        f.on_request(&mut e).await.unwrap_err().code,
        "budget_exceeded",
        "17 > 12"
    );
    // Another principal has its own budget.
    let mut other = ctx("carol", Some(12.0));
    f.on_request(&mut other).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn refusal_names_the_reset() {
    let dir = tempfile::tempdir().unwrap();
    let f = filter(dir.path(), json!({}));
    let mut a = ctx("bob", Some(9.0));
    f.on_request(&mut a).await.unwrap();
    let mut b = ctx("bob", Some(9.0));
    let r = f.on_request(&mut b).await.unwrap_err();
    assert_eq!((r.status.as_u16(), r.code), (429, "budget_exceeded"));
    assert!(
        r.message.contains("$9.00 per 1d") && r.message.contains("resets at"),
        "{}",
        r.message
    );
    assert!(r.headers.iter().any(|(k, _)| k == "retry-after"));
    assert_eq!(b.reject_reason, Some("principal_budget"));
    // Rejected elsewhere before reaching a backend: the reservation is released, not charged.
    f.on_response_end(&mut a);
    f.on_complete(&mut a).await;
    let mut c = ctx("bob", Some(9.0));
    f.on_request(&mut c).await.unwrap();
    // Sent, answered 200, but usage unknown and nothing counted: the reservation is charged.
    c.backend = Some("local".into());
    c.reached_backend = true;
    c.status = 200;
    f.on_response_end(&mut c);
    f.on_complete(&mut c).await;
    assert_eq!(c.cost_usd, Some(5.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn global_budget_and_unpriced_models() {
    let dir = tempfile::tempdir().unwrap();
    let f = filter(
        dir.path(),
        json!({"global": {"max_usd": 7, "period": "1mo"}, "unpriced": "reject"}),
    );
    let mut a = ctx("x", None);
    f.on_request(&mut a).await.unwrap();
    let mut b = ctx("y", None);
    let r = f.on_request(&mut b).await.unwrap_err();
    assert!(r.message.contains("the gateway's budget"), "{}", r.message);
    let mut c = ctx("x", None);
    c.model = Some("qwen2.5:7b".into());
    assert_eq!(
        f.on_request(&mut c).await.unwrap_err().code,
        "model_unpriced"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn soft_limit_warns() {
    let dir = tempfile::tempdir().unwrap();
    let f = filter(dir.path(), json!({"soft_limit": 0.5}));
    let mut a = ctx("s", Some(20.0));
    f.on_request(&mut a).await.unwrap(); // 5 of 20 reserved: no warning
    assert!(!a
        .response_headers
        .iter()
        .any(|(k, _)| k == "x-budget-warning"));
    let mut b = ctx("s", Some(20.0));
    f.on_request(&mut b).await.unwrap(); // 10 of 20
    let warn = b
        .response_headers
        .iter()
        .find(|(k, _)| k == "x-budget-warning")
        .map(|(_, v)| v.to_str().unwrap().to_string());
    assert_eq!(
        warn.as_deref(),
        Some("50% of the 1d budget of this key used")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ledger_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let f = filter(dir.path(), json!({}));
        let mut c = ctx("r", Some(10.0));
        f.on_request(&mut c).await.unwrap();
        served(&f, &mut c, 4).await;
        f.shutdown();
    }
    let f = filter(dir.path(), json!({}));
    let mut c = ctx("r", Some(10.0));
    c.max_tokens = Some(7); // 4 spent + 7 > 10
    assert_eq!(
        f.on_request(&mut c).await.unwrap_err().code,
        "budget_exceeded"
    );
    let mut c = ctx("r", Some(10.0));
    c.max_tokens = Some(6);
    f.on_request(&mut c).await.unwrap();
    let rows = report(&dir.path().join("spend.db"), None, None, Some("r")).unwrap();
    assert_eq!(
        rows,
        vec![ReportRow {
            principal: "r".into(),
            model: "llama3.1:8b".into(),
            usd: 4.0,
            requests: 1
        }]
    );
}

#[test]
fn option_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cx = BuildContext {
        config_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let e = build(
        &json!({"ledger": "s.db", "default": {"max_usd": 5, "period": "1y"}}),
        &cx,
    )
    .err()
    .unwrap();
    assert_eq!(e.path, "default.period");
    let e = build(
        &json!({"ledger": "s.db", "prices": [{"model": "*", "per_second": -1}]}),
        &cx,
    )
    .err()
    .unwrap();
    assert_eq!(e.path, "prices");
    let e = build(&json!({"ledger": "/nonexistent/dir/s.db"}), &cx)
        .err()
        .unwrap();
    assert_eq!(e.path, "ledger");
    let e = build(
        &json!({"ledger": "s.db", "prices": [{"model": "*", "cost": 1}]}),
        &cx,
    )
    .err()
    .unwrap();
    assert!(e.path.starts_with("prices"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_dropped_without_completing_settles_its_reservation_once() {
    let dir = tempfile::tempdir().unwrap();
    let f = filter(dir.path(), json!({}));
    let mut c = ctx("carol", Some(12.0));
    f.on_request(&mut c).await.unwrap();
    // Shutdown cuts the request short: on_complete never runs.
    drop(c);
    let report = f.admin_report().await.unwrap().1;
    let carol = &report["accounts"][0];
    assert_eq!(carol["principal"], "carol");
    assert_eq!(
        (carol["spent_usd"].as_f64(), carol["reserved_usd"].as_f64()),
        (Some(5.0), Some(0.0)),
        "the reservation is charged, not left held"
    );
    // Completed requests settle once: a late drop of the context changes nothing.
    let mut c = ctx("carol", Some(12.0));
    f.on_request(&mut c).await.unwrap();
    served(&f, &mut c, 1).await;
    drop(c);
    let report = f.admin_report().await.unwrap().1;
    assert_eq!(report["accounts"][0]["spent_usd"].as_f64(), Some(6.0));
    assert_eq!(report["accounts"][0]["reserved_usd"].as_f64(), Some(0.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn only_requests_a_backend_may_have_run_are_charged_without_usage() {
    let dir = tempfile::tempdir().unwrap();
    let f = filter(dir.path(), json!({}));
    async fn spent(f: &Arc<dyn Filter>) -> f64 {
        f.admin_report().await.unwrap().1["accounts"][0]["spent_usd"]
            .as_f64()
            .unwrap()
    }
    // Every attempt failed to connect: the backend never got it.
    let mut c = ctx("dave", Some(100.0));
    f.on_request(&mut c).await.unwrap();
    c.backend = Some("local".into());
    c.status = 502;
    c.decision = Decision::Failed {
        code: "backend_unavailable",
    };
    f.on_response_end(&mut c);
    f.on_complete(&mut c).await;
    assert_eq!(spent(&f).await, 0.0);
    // The backend refused it (404 model not found): nothing was generated.
    let mut c = ctx("dave", Some(100.0));
    f.on_request(&mut c).await.unwrap();
    c.backend = Some("local".into());
    c.reached_backend = true;
    c.status = 404;
    f.on_response_end(&mut c);
    f.on_complete(&mut c).await;
    assert_eq!(spent(&f).await, 0.0);
    // It had the request and never answered (the gateway's 504): it may have run.
    let mut c = ctx("dave", Some(100.0));
    f.on_request(&mut c).await.unwrap();
    c.backend = Some("local".into());
    c.reached_backend = true;
    c.status = 504;
    c.decision = Decision::Failed {
        code: "backend_timeout",
    };
    f.on_response_end(&mut c);
    f.on_complete(&mut c).await;
    assert_eq!(spent(&f).await, 5.0, "the reservation");
}

/// The reservation is settled as the answer ends (`on_response_end`), so the next request
/// sees the real charge, not the reservation; the charge reaches the ledger in `on_complete`,
/// or, if that never runs (shutdown cutting the request short), when the context is dropped.
#[tokio::test(flavor = "multi_thread")]
async fn the_answer_s_end_settles_and_the_ledger_gets_every_charge_once() {
    let dir = tempfile::tempdir().unwrap();
    {
        let f = filter(dir.path(), json!({}));
        let mut a = ctx("s", Some(7.0));
        f.on_request(&mut a).await.unwrap();
        answered(&mut a, 2);
        f.on_response_end(&mut a);
        assert_eq!(a.cost_usd, Some(2.0));
        // 2 spent + 5 reserved ≤ 7: the first reservation ($5) is no longer held.
        let mut b = ctx("s", Some(7.0));
        f.on_request(&mut b).await.unwrap();
        f.on_complete(&mut a).await;
        f.on_response_end(&mut a);
        f.on_complete(&mut a).await;
        drop(a);
        answered(&mut b, 1);
        f.on_response_end(&mut b);
        // No on_complete: the booked charge goes to the ledger as the context is dropped.
        drop(b);
        let report = f.admin_report().await.unwrap().1;
        assert_eq!(report["accounts"][0]["spent_usd"].as_f64(), Some(3.0));
        assert_eq!(report["accounts"][0]["reserved_usd"].as_f64(), Some(0.0));
        f.shutdown();
    }
    let rows = report(&dir.path().join("spend.db"), None, None, Some("s")).unwrap();
    assert_eq!(
        rows,
        vec![ReportRow {
            principal: "s".into(),
            model: "llama3.1:8b".into(),
            usd: 3.0,
            requests: 2
        }]
    );
}

/// A request charged nothing (the backend refused a made-up model name) adds no spend series:
/// otherwise every name a client invents would be a series of its own, kept for the
/// process's life.
#[tokio::test(flavor = "multi_thread")]
async fn what_costs_nothing_adds_no_spend_series() {
    let dir = tempfile::tempdir().unwrap();
    let f = filter(dir.path(), json!({}));
    let series = |model: &str| {
        prometheus::default_registry()
            .gather()
            .iter()
            .filter(|m| m.name() == "llm_gateway_spend_usd_total")
            .flat_map(|m| m.get_metric())
            .any(|m| m.get_label().iter().any(|l| l.value() == model))
    };
    let mut c = ctx("mallory", Some(100.0));
    c.model = Some("llama3.1:made-up-4711".into());
    f.on_request(&mut c).await.unwrap();
    c.backend = Some("local".into());
    c.reached_backend = true;
    c.status = 404;
    f.on_response_end(&mut c);
    f.on_complete(&mut c).await;
    assert_eq!(c.cost_usd, Some(0.0));
    assert!(!series("llama3.1:made-up-4711"));
    let mut c = ctx("mallory", Some(100.0));
    c.model = Some("llama3.1:served-4712".into());
    f.on_request(&mut c).await.unwrap();
    served(&f, &mut c, 1).await;
    assert!(series("llama3.1:served-4712"));
}

/// Attacker review: with no output cap, a request naming no limit reserved a flat
/// `output_reserve` (whatever `n` asked) and then generated without bound before its usage
/// was known. It is now given `output_reserve` per completion, written into its body.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_without_an_output_limit_is_given_the_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let f = filter(dir.path(), json!({"output_reserve": 4}));
    let mut c = RequestCtx::new(String::new(), Method::POST, "/v1/chat/completions".into());
    c.model = Some("llama3.1:8b".into());
    c.principal = ctx("alice", Some(12.0)).principal;
    c.json = Some(json!({"model": "llama3.1:8b", "n": 3, "max_tokens": -1, "messages": []}));
    c.max_tokens = None;
    f.on_request(&mut c).await.unwrap();
    assert_eq!(c.max_tokens, Some(12), "4 per completion, 3 completions");
    assert!(c.body_rewritten);
    let body = c.json.as_ref().unwrap();
    assert_eq!(
        (
            body["max_tokens"].as_u64(),
            body["max_completion_tokens"].as_u64()
        ),
        (Some(4), Some(4))
    );
    // $12 reserved of a $12 budget: the next one does not fit.
    let mut d = ctx("alice", Some(12.0));
    d.max_tokens = Some(1);
    assert_eq!(
        f.on_request(&mut d).await.unwrap_err().code,
        "budget_exceeded"
    );

    // Ollama: options.num_predict, -1 (no limit) included.
    let mut c = RequestCtx::new(String::new(), Method::POST, "/api/generate".into());
    c.model = Some("llama3.1:8b".into());
    c.principal = ctx("bob", Some(12.0)).principal;
    c.json = Some(json!({"model": "llama3.1:8b", "prompt": "x", "options": {"num_predict": -1}}));
    f.on_request(&mut c).await.unwrap();
    assert_eq!(c.json.as_ref().unwrap()["options"]["num_predict"], 4);
    assert_eq!(c.max_tokens, Some(4));

    // Review: a caller with no budget, or a model without a price, is left as it asked.
    for (who, model) in [("carol", "llama3.1:8b"), ("bob", "qwen2.5:7b")] {
        let mut c = RequestCtx::new(String::new(), Method::POST, "/api/generate".into());
        c.model = Some(model.into());
        c.principal = ctx(who, (who == "bob").then_some(12.0)).principal;
        c.json = Some(json!({"model": model, "prompt": "x"}));
        f.on_request(&mut c).await.unwrap();
        assert_eq!(
            c.json.as_ref().unwrap(),
            &json!({"model": model, "prompt": "x"})
        );
        assert!(!c.body_rewritten && c.max_tokens.is_none(), "{who}");
    }
}

/// Attacker review: a route the gateway cannot read (opened by a custom rule) was served
/// without a charge to a caller with a budget.
#[tokio::test(flavor = "multi_thread")]
async fn a_route_whose_cost_cannot_be_read_is_refused_to_a_caller_with_a_budget() {
    let dir = tempfile::tempdir().unwrap();
    let f = filter(dir.path(), json!({}));
    let mut c = RequestCtx::new(String::new(), Method::POST, "/v1/responses".into());
    c.unknown_format = true;
    c.principal = ctx("alice", Some(12.0)).principal;
    assert_eq!(
        f.on_request(&mut c).await.unwrap_err().code,
        "budget_unenforceable"
    );
    // No budget for this caller: nothing to enforce.
    c.principal = ctx("carol", None).principal;
    f.on_request(&mut c).await.unwrap();
    // Review: a global budget alone does not close such routes to everyone; but what they
    // report using is charged to it, and once it is spent they are refused too (billing
    // review: they were served free and never recorded).
    // Priced by the model the body names (a custom route has no `model` of the gateway's).
    let f = filter(
        dir.path(),
        json!({"ledger": "global.db", "global": {"max_usd": 100.0, "period": "1d"},
               "unpriced": "reject",
               "prices": [{"model": "m", "prompt_per_1m": 0.0, "completion_per_1m": 1000000.0},
                          {"model": "dear", "prompt_per_1m": 0.0, "completion_per_1m": 2000000.0}]}),
    );
    let named = |models: &[&str]| {
        let mut c = RequestCtx::new(String::new(), Method::POST, "/v1/responses".into());
        c.unknown_format = true;
        c.named_models = models.iter().map(|m| m.to_string()).collect();
        c.principal = ctx("carol", None).principal;
        c
    };
    let custom = |model: &str| named(&[model]);
    // Review: a body naming two models (`model` and `Model`: Go's decoder takes the last)
    // is priced at the dearer, and refused when either has no price.
    let mut c = named(&["m", "dear"]);
    f.on_request(&mut c).await.unwrap();
    served(&f, &mut c, 5).await;
    assert_eq!(c.cost_usd, Some(10.0));
    let r = f
        .on_request(&mut named(&["m", "unpriced-x"]))
        .await
        .unwrap_err();
    assert_eq!(r.code, "model_unpriced");
    // A body that names no model (a multipart upload, a server's default model) passes.
    let mut c = named(&[]);
    f.on_request(&mut c).await.unwrap();
    served(&f, &mut c, 5).await;
    let mut c = custom("m");
    f.on_request(&mut c).await.unwrap();
    served(&f, &mut c, 60).await;
    assert_eq!(c.cost_usd, Some(60.0));
    let mut c = custom("m");
    f.on_request(&mut c).await.unwrap();
    served(&f, &mut c, 30).await;
    let r = f.on_request(&mut custom("m")).await.unwrap_err();
    assert_eq!((r.status.as_u16(), r.code), (429, "budget_exceeded"));
    // `unpriced: reject` holds on custom routes too.
    let r = f.on_request(&mut custom("unpriced-x")).await.unwrap_err();
    assert_eq!((r.status.as_u16(), r.code), (403, "model_unpriced"));
}

/// Attacker review: a prompt whose prefill outlasts `first_byte_timeout` ran on every backend
/// the gateway gave up on, but only the last one's usage was charged.
#[tokio::test(flavor = "multi_thread")]
async fn backends_given_up_on_are_charged_the_prompt_they_read() {
    let dir = tempfile::tempdir().unwrap();
    let f = filter(
        dir.path(),
        json!({"prices": [{"model": "llama3.1:*", "prompt_per_1m": 1000000.0, "completion_per_1m": 1000000.0}]}),
    );
    let mut c = ctx("alice", Some(100.0));
    c.bytes_in = 40; // 10 prompt tokens by the estimate: $10
    f.on_request(&mut c).await.unwrap();
    c.abandoned = 2;
    c.abandoned_secs = 6.0;
    served(&f, &mut c, 2).await; // the last backend: 3 prompt + 2 completion tokens
    assert_eq!(c.cost_usd, Some(5.0 + 2.0 * 10.0));

    // Per-second prices: the seconds the backends given up on held it.
    let f = filter(
        dir.path(),
        json!({"ledger": "seconds.db", "prices": [{"model": "llama3.1:*", "per_second": 1.0}]}),
    );
    let mut c = ctx("alice", Some(100.0));
    f.on_request(&mut c).await.unwrap();
    c.abandoned = 2;
    c.abandoned_secs = 6.0;
    served(&f, &mut c, 2).await;
    assert!(c.cost_usd.is_some_and(|usd| usd >= 6.0), "{:?}", c.cost_usd);

    // Completions run side by side each hold the batch for those seconds: `n: 64` was
    // charged what one was.
    let charge = |n: u64| {
        let f = f.clone();
        async move {
            let mut c = ctx("bob", Some(10_000.0));
            c.completions = n;
            f.on_request(&mut c).await.unwrap();
            c.sent = Some(std::time::Duration::from_secs(1));
            c.duration = Some(std::time::Duration::from_secs(3));
            served(&f, &mut c, 2).await;
            c.cost_usd.unwrap()
        }
    };
    let (one, many) = (charge(1).await, charge(64).await);
    assert!((one - 2.0).abs() < 1e-6, "{one}");
    assert!((many - 128.0).abs() < 1e-6, "{many}");
}

/// Review: `"n": 1e300` (or `num_predict` near 2^63) made a reservation near the integers'
/// end; `spent + reserved + amount` wrapped negative and the request was admitted, every
/// other request after it too, and a client that left made `spent` wrap: budgets off for the
/// period and a ledger the next start could not read. Such a request is refused now (it can
/// never pass), and the sums saturate.
#[tokio::test(flavor = "multi_thread")]
async fn a_reservation_beyond_the_budget_is_refused_and_nothing_wraps() {
    let dir = tempfile::tempdir().unwrap();
    let f = filter(dir.path(), json!({}));
    let mut c = ctx("overflow", Some(10.0));
    f.on_request(&mut c).await.unwrap();
    served(&f, &mut c, 2).await;
    for bound in [u64::MAX, 1 << 62, 11] {
        let mut c = ctx("overflow", Some(10.0));
        c.max_tokens = Some(bound);
        let r = f.on_request(&mut c).await.unwrap_err();
        assert_eq!((r.status.as_u16(), r.code), (429, "budget_exceeded"));
        assert!(r.message.contains("can never pass"), "{}", r.message);
        assert!(!r.headers.iter().any(|(k, _)| k == "retry-after"));
        assert_eq!(c.reject_reason, Some("request_over_budget"));
    }
    // A budget of $0 is used up, not too small: answered as such (with its reset time).
    let mut z = ctx("nothing", Some(0.0));
    let r = f.on_request(&mut z).await.unwrap_err();
    assert_eq!(z.reject_reason, Some("principal_budget"));
    assert!(r.headers.iter().any(|(k, _)| k == "retry-after"));
    // The budget still holds: $2 spent, $5 fits, $5 more does not.
    let mut c = ctx("overflow", Some(10.0));
    f.on_request(&mut c).await.unwrap();
    let mut d = ctx("overflow", Some(10.0));
    assert_eq!(
        f.on_request(&mut d).await.unwrap_err().code,
        "budget_exceeded"
    );
    drop(c);
}

/// Review: the budget estimated a prompt from the body's bytes alone, so ten tiny images
/// (a few hundred bytes, thousands of tokens to the model) were reserved as a few dozen
/// tokens. It takes the text-and-media estimate tokens per minute use where that is more.
#[tokio::test(flavor = "multi_thread")]
async fn images_count_in_the_prompt_the_budget_reserves() {
    let dir = tempfile::tempdir().unwrap();
    let f = filter(
        dir.path(),
        json!({"prices": [{"model": "llama3.1:*", "prompt_per_1m": 1000000.0, "completion_per_1m": 0.0}]}),
    );
    let body = json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "what is it?", "images": vec!["iVBORw0KGgo="; 10]}]});
    let mut c = ctx("pictures", Some(5000.0));
    c.bytes_in = serde_json::to_vec(&body).unwrap().len() as u64;
    assert!(c.bytes_in < 400);
    c.json = Some(body);
    // 768 tokens an image at $1 a token: more than the whole $5,000.
    let r = f.on_request(&mut c).await.unwrap_err();
    assert_eq!(r.code, "budget_exceeded");
    assert!(r.message.contains("can never pass"), "{}", r.message);
}

/// Review: a negative `reserve_seconds` made negative reservations (room added to budgets),
/// and a keys-file `max_usd` below zero or not a number was taken as given.
#[test]
fn budgets_and_reservations_are_never_negative() {
    let dir = tempfile::tempdir().unwrap();
    let o = json!({"ledger": "spend.db", "prices": [], "reserve_seconds": -60.0});
    let cx = BuildContext {
        config_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let e = build(&o, &cx).err().unwrap();
    assert_eq!(e.path, "reserve_seconds");
}
