use super::*;
use gateway_filter::http::Method;
use gateway_filter::{Principal, Usage};
use serde_json::json;

fn filter(options: serde_json::Value) -> Arc<dyn Filter> {
    build(&options, &BuildContext::default()).unwrap()
}

fn req(ip: &str) -> RequestCtx {
    let mut c = RequestCtx::new(String::new(), Method::POST, "/api/chat".into());
    c.set_client(ip.parse().unwrap(), 64);
    c
}

fn header(ctx: &RequestCtx, name: &str) -> Option<String> {
    ctx.response_headers
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.to_str().unwrap().to_string())
}

#[tokio::test]
async fn seed_case_six_of_fifty_then_429_with_retry_after() {
    let f = filter(json!({"key": "ip", "rate": "10/m", "burst": 5}));
    let mut allowed = 0;
    for i in 0..50 {
        let mut c = req("10.0.0.1");
        match f.on_request(&mut c).await {
            Ok(()) => {
                allowed += 1;
                assert_eq!(header(&c, "x-ratelimit-limit").as_deref(), Some("6"));
                assert_eq!(
                    header(&c, "x-ratelimit-remaining"),
                    Some((5 - i).to_string())
                );
            }
            Err(r) => {
                assert_eq!((r.status.as_u16(), r.code), (429, "rate_limit_exceeded"));
                let retry: u64 = r
                    .headers
                    .iter()
                    .find(|(k, _)| k == "retry-after")
                    .unwrap()
                    .1
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=6).contains(&retry), "{retry}");
                assert_eq!(header(&c, "x-ratelimit-remaining").as_deref(), Some("0"));
                assert_eq!(c.reject_reason, Some("request_rate"));
            }
        }
    }
    assert_eq!(allowed, 6);
    let mut other = req("10.0.0.2");
    f.on_request(&mut other).await.unwrap();
}

#[tokio::test]
async fn principal_keys_and_overrides() {
    let f = filter(json!({"key": "api_key", "rate": "100/m", "burst": 0}));
    let p = |id: &str, rate: Option<&str>| {
        Some(Arc::new(Principal {
            id: id.into(),
            overrides: gateway_filter::Overrides {
                rate: rate.map(|r| Rate::parse(r).unwrap()),
                burst: Some(1),
                ..Default::default()
            },
            ..Default::default()
        }))
    };
    // Same IP, different keys: independent.
    for id in ["a", "b"] {
        let mut c = req("10.0.0.3");
        c.principal = p(id, None);
        f.on_request(&mut c).await.unwrap();
    }
    // Override burst 1: two quick requests pass, the third does not.
    let mut results = Vec::new();
    for _ in 0..3 {
        let mut c = req("10.0.0.3");
        c.principal = p("c", Some("1/h"));
        results.push(f.on_request(&mut c).await.is_ok());
    }
    assert_eq!(results, [true, true, false]);
}

#[tokio::test]
async fn delay_mode_queues_the_burst_and_refuses_beyond_it() {
    let f = filter(json!({"key": "ip", "rate": "20/s", "burst": 3, "mode": "delay"}));
    let start = Instant::now();
    // Five requests at once: the first passes now, three wait their turn (50 ms apart),
    // the fifth is beyond the burst and refused at once.
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let f = f.clone();
            tokio::spawn(async move {
                let mut c = req("10.0.0.4");
                let r = f.on_request(&mut c).await;
                (r.is_ok(), start.elapsed())
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let passed: Vec<Duration> = results.iter().filter(|r| r.0).map(|r| r.1).collect();
    let refused: Vec<Duration> = results.iter().filter(|r| !r.0).map(|r| r.1).collect();
    assert_eq!((passed.len(), refused.len()), (4, 1));
    assert!(
        refused[0] < Duration::from_millis(40),
        "refused at once: {:?}",
        refused[0]
    );
    let slowest = passed.iter().max().unwrap();
    assert!(
        *slowest >= Duration::from_millis(140),
        "the last queued one waited 3 × 50 ms: {slowest:?}"
    );
}

#[tokio::test]
async fn in_flight_slots_follow_the_request_context() {
    let f = filter(json!({"key": "ip", "max_in_flight": 2}));
    let mut a = req("10.0.0.5");
    let mut b = req("10.0.0.5");
    f.on_request(&mut a).await.unwrap();
    f.on_request(&mut b).await.unwrap();
    let mut c = req("10.0.0.5");
    let r = f.on_request(&mut c).await.unwrap_err();
    assert!(r.message.contains("concurrency"), "{}", r.message);
    drop(a); // the request ended (or its client went away)
    let mut d = req("10.0.0.5");
    f.on_request(&mut d).await.unwrap();
    // Two limiters in one chain keep both slots.
    let g = filter(json!({"key": "ip", "max_in_flight": 1}));
    let mut e = req("10.0.0.6");
    f.on_request(&mut e).await.unwrap();
    g.on_request(&mut e).await.unwrap();
    let mut x = req("10.0.0.6");
    assert!(g.on_request(&mut x).await.is_err());
    drop(e);
    let mut y = req("10.0.0.6");
    g.on_request(&mut y).await.unwrap();
}

/// As the answer ends (`on_response_end`) a request gives back its slot and its token hold,
/// each exactly once, and only its own limiter's: the context that lives on a little longer
/// (the last bytes, the audit line) holds nothing any more.
#[tokio::test]
async fn the_answer_s_end_gives_slot_and_tokens_back_once() {
    let f = filter(json!({"key": "ip", "max_in_flight": 1, "tokens_per_minute": 100}));
    let g = filter(json!({"key": "ip", "max_in_flight": 1}));
    let mut a = req("10.0.0.8");
    a.max_tokens = Some(60);
    f.on_request(&mut a).await.unwrap();
    g.on_request(&mut a).await.unwrap();
    a.reached_backend = true;
    a.usage = Some(Usage {
        prompt_tokens: 5,
        completion_tokens: 5,
        ..Default::default()
    });
    f.on_response_end(&mut a);
    // f's slot and tokens are back (10 used + 60 reserved ≤ 100); g's slot is still held.
    let mut b = req("10.0.0.8");
    b.max_tokens = Some(60);
    f.on_request(&mut b).await.unwrap();
    assert!(g.on_request(&mut req("10.0.0.8")).await.is_err());
    g.on_response_end(&mut a);
    f.on_response_end(&mut a);
    f.on_complete(&mut a).await;
    drop(a);
    // Nothing was given back twice: b still holds f's only slot, and 70 tokens are counted.
    assert!(f.on_request(&mut req("10.0.0.8")).await.is_err());
    let mut c = req("10.0.0.8");
    c.max_tokens = Some(30);
    g.on_request(&mut c).await.unwrap();
    drop(b);
    let mut d = req("10.0.0.8");
    d.max_tokens = Some(31);
    let r = f.on_request(&mut d).await.unwrap_err();
    assert!(r.message.contains("70 used"), "{}", r.message);
}

#[tokio::test]
async fn tokens_per_minute_reserve_then_charge() {
    let f = filter(json!({"key": "api_key", "tokens_per_minute": 100}));
    let mk = || {
        let mut c = req("10.0.0.7");
        c.principal = Some(Arc::new(Principal {
            id: "t".into(),
            ..Default::default()
        }));
        c
    };
    let mut c = mk();
    c.max_tokens = Some(150);
    assert_eq!(
        f.on_request(&mut c).await.unwrap_err().code,
        "rate_limit_exceeded",
        "the reservation alone is too big"
    );
    let mut c = mk();
    c.max_tokens = Some(50);
    f.on_request(&mut c).await.unwrap();
    c.usage = Some(Usage {
        prompt_tokens: 30,
        completion_tokens: 50,
        ..Default::default()
    });
    f.on_response_end(&mut c);
    f.on_complete(&mut c).await;
    let mut c = mk();
    c.max_tokens = Some(30);
    let r = f.on_request(&mut c).await.unwrap_err();
    assert!(r.message.contains("80 used"), "{}", r.message);
    assert_eq!(
        header(&c, "x-ratelimit-remaining-tokens").as_deref(),
        Some("20")
    );
    let mut c = mk();
    c.max_tokens = Some(20);
    f.on_request(&mut c).await.unwrap();
}

#[test]
fn option_errors() {
    let cx = BuildContext::default();
    assert_eq!(build(&json!({"key": "ip"}), &cx).err().unwrap().path, "");
    assert_eq!(
        build(&json!({"key": "cookie", "rate": "1/s"}), &cx)
            .err()
            .unwrap()
            .path,
        "key"
    );
    assert_eq!(
        build(&json!({"key": "ip", "rate": "fast"}), &cx)
            .err()
            .unwrap()
            .path,
        "rate"
    );
    assert_eq!(
        build(&json!({"key": "ip", "rate": "1/s", "mode": "later"}), &cx)
            .err()
            .unwrap()
            .path,
        "mode"
    );
    assert!(build(&json!({"key": "header:x-team", "rate": "1/s"}), &cx).is_ok());
}

#[tokio::test]
async fn tokens_per_minute_holds_room_for_requests_in_flight() {
    let f = filter(json!({"key": "api_key", "tokens_per_minute": 100}));
    let mk = || {
        let mut c = req("10.0.0.8");
        c.principal = Some(Arc::new(Principal {
            id: "par".into(),
            ..Default::default()
        }));
        c.max_tokens = Some(40);
        c
    };
    // Three requests at once, none finished: only two fit (2 × 40 ≤ 100 < 3 × 40).
    let (mut a, mut b, mut c) = (mk(), mk(), mk());
    f.on_request(&mut a).await.unwrap();
    f.on_request(&mut b).await.unwrap();
    assert_eq!(
        f.on_request(&mut c).await.unwrap_err().code,
        "rate_limit_exceeded"
    );
    // One ends having used 5 tokens: its unused room comes back.
    a.reached_backend = true;
    a.usage = Some(Usage {
        prompt_tokens: 2,
        completion_tokens: 3,
        ..Default::default()
    });
    f.on_response_end(&mut a);
    f.on_complete(&mut a).await;
    let mut d = mk();
    f.on_request(&mut d).await.unwrap();
    // One that never reached a backend gives everything back.
    f.on_response_end(&mut b);
    f.on_complete(&mut b).await;
    let mut e = mk();
    f.on_request(&mut e).await.unwrap();
    assert_eq!(
        header(&e, "x-ratelimit-remaining-tokens").as_deref(),
        Some("15"),
        "5 used + 40 + 40 held"
    );
}

#[tokio::test]
async fn ipv6_clients_share_their_prefix() {
    // One request per minute per client network; a /64 is one client.
    let f = filter(json!({"key": "ip", "rate": "1/m", "burst": 0}));
    f.on_request(&mut req("2001:db8:1:2::1")).await.unwrap();
    let r = f.on_request(&mut req("2001:db8:1:2:ffff::9")).await;
    assert_eq!(r.unwrap_err().code, "rate_limit_exceeded", "same /64");
    f.on_request(&mut req("2001:db8:1:3::1"))
        .await
        .expect("another /64 is another client");
}

#[tokio::test]
async fn a_model_written_two_ways_is_one_bucket() {
    let f = filter(json!({"key": "api_key+model", "rate": "1/h", "burst": 0}));
    let principal = Some(Arc::new(Principal {
        id: "a".into(),
        ..Default::default()
    }));
    let mut results = Vec::new();
    for model in [
        "llama3",
        "llama3:latest",
        "LLAMA3",
        "library/llama3",
        "registry.ollama.ai/library/llama3:latest",
        " llama3 ",
        "qwen2.5:7b",
    ] {
        let mut c = req("10.0.0.4");
        c.principal = principal.clone();
        c.model = Some(model.into());
        results.push(f.on_request(&mut c).await.is_ok());
    }
    // Ollama runs one model for all of these: one bucket (a respelling was a fresh one).
    assert_eq!(results, [true, false, false, false, false, false, true]);
}

#[tokio::test]
async fn a_repeated_key_header_counts_against_the_address() {
    let f = filter(json!({"key": "header:x-team", "rate": "1/h", "burst": 0}));
    let mut results = Vec::new();
    for team in ["red", "blue", "green"] {
        let mut c = req("10.0.0.5");
        // The client's own value first, then the one a proxy appends.
        c.headers
            .append("x-team", HeaderValue::from_str(team).unwrap());
        c.headers
            .append("x-team", HeaderValue::from_static("proxy-set"));
        results.push(f.on_request(&mut c).await.is_ok());
    }
    assert_eq!(
        results,
        [true, false, false],
        "a second value cannot pick a fresh bucket"
    );
}

#[test]
fn shared_key_names_are_byte_for_byte_what_display_wrote() {
    // Replicas of two versions share keys during a rolling upgrade.
    for ip in [
        "0.0.0.0",
        "255.255.255.255",
        "10.0.100.9",
        "192.168.1.10",
        "1.20.0.99",
        "::1",
        "2001:db8::1",
        "::ffff:10.1.2.3",
    ] {
        let a: IpAddr = ip.parse().unwrap();
        assert_eq!(ip_text(a), a.to_string());
    }
    for n in [0u64, 1, 0xabc, u64::MAX, 0x0123_4567_89ab_cdef] {
        assert_eq!(Hex16::of(n).as_str(), format!("{n:016x}"));
    }
}

#[test]
fn header_numbers_read_the_same_from_the_table_and_beyond_it() {
    for v in [
        0u64,
        1,
        59,
        1000,
        1023,
        1024,
        1025,
        1_000_000_000_000,
        u64::MAX,
    ] {
        assert_eq!(number(v), HeaderValue::from(v), "{v}");
        assert_eq!(number(v).to_str().unwrap(), v.to_string());
    }
}

/// An unbounded request used to reserve its prompt alone: any number of them, started at
/// once, fitted in one minute's limit and then generated without bound. Each is now given
/// `output_reserve` per completion (no more than the limit leaves beside its prompt), written
/// into its body, and holds that.
#[tokio::test]
async fn requests_that_name_no_output_limit_hold_a_bound_of_their_own() {
    let f = filter(json!({"key": "api_key", "tokens_per_minute": 10000}));
    let mk = |path: &str, body: serde_json::Value| {
        let mut c = RequestCtx::new(String::new(), Method::POST, path.into());
        c.set_client("10.0.0.9".parse().unwrap(), 64);
        c.principal = Some(Arc::new(Principal {
            id: "u".into(),
            ..Default::default()
        }));
        c.json = Some(body);
        c
    };
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let mut a = mk("/v1/chat/completions", chat.clone());
    f.on_request(&mut a).await.unwrap();
    let body = a.json.as_ref().unwrap();
    assert_eq!(body["max_tokens"], 4096, "{body}");
    assert_eq!(a.max_tokens, Some(4096));
    assert!(a.body_rewritten);
    // Ollama's "no limit" (-1) is bounded the same way, in the field Ollama reads.
    let mut b = mk(
        "/api/chat",
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
               "options": {"num_predict": -1}}),
    );
    f.on_request(&mut b).await.unwrap();
    assert_eq!(b.json.as_ref().unwrap()["options"]["num_predict"], 4096);
    // Two are held (2 × 4097 of 10,000): a third does not fit while they run.
    let mut c = mk("/v1/chat/completions", chat.clone());
    let r = f.on_request(&mut c).await.unwrap_err();
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.message.contains("4097 requested"), "{}", r.message);
    // Embeddings generate nothing: their prompt alone is held.
    let mut e = mk("/v1/embeddings", json!({"model": "m", "input": "hi"}));
    f.on_request(&mut e).await.unwrap();
    assert_eq!((e.max_tokens, e.body_rewritten), (None, false));

    // A small limit: the bound is what the limit leaves beside the prompt, shared by the
    // completions asked for, so the request can pass.
    let f = filter(json!({"key": "api_key", "tokens_per_minute": 1000, "output_reserve": 5000}));
    let mut c = mk(
        "/v1/chat/completions",
        json!({"model": "m", "n": 3, "messages": [{"role": "user", "content": "hi"}]}),
    );
    f.on_request(&mut c).await.unwrap();
    assert_eq!(c.json.as_ref().unwrap()["max_tokens"], 333);
    assert_eq!(c.max_tokens, Some(999));
    assert_eq!(
        build(
            &json!({"key": "ip", "tokens_per_minute": 10, "output_reserve": 0}),
            &BuildContext::default()
        )
        .err()
        .unwrap()
        .path,
        "output_reserve"
    );
}

/// Review: a second, smaller token limit after a first one (a key's own minute after the
/// key-and-model one, or after a budget) lowers the bound the first gave, instead of
/// refusing the request as one that can never pass.
#[tokio::test]
async fn a_later_smaller_token_limit_lowers_the_bound_an_earlier_one_gave() {
    let wide = filter(json!({"key": "api_key+model", "tokens_per_minute": 100000}));
    let narrow = filter(json!({"key": "api_key", "tokens_per_minute": 2000}));
    let mut c = RequestCtx::new(String::new(), Method::POST, "/v1/chat/completions".into());
    c.set_client("10.0.0.11".parse().unwrap(), 64);
    c.principal = Some(Arc::new(Principal {
        id: "v".into(),
        ..Default::default()
    }));
    c.model = Some("m".into());
    c.json = Some(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
    wide.on_request(&mut c).await.unwrap();
    assert_eq!(c.max_tokens, Some(4096));
    narrow.on_request(&mut c).await.unwrap();
    assert_eq!(c.max_tokens, Some(1999));
    assert_eq!(c.json.as_ref().unwrap()["max_tokens"], 1999);
    // What the client asked itself is held to: too large for the minute, refused.
    let mut c = RequestCtx::new(String::new(), Method::POST, "/v1/chat/completions".into());
    c.set_client("10.0.0.12".parse().unwrap(), 64);
    c.json = Some(json!({"model": "m", "max_tokens": 3000, "messages": []}));
    c.max_tokens = Some(3000);
    assert_eq!(
        narrow.on_request(&mut c).await.unwrap_err().status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

/// Review: a body on a route the gateway cannot read (a custom rule's `/v1/responses`) was
/// reserved nothing and its usage (`input_tokens`/`output_tokens`) read as none: a caller held
/// to tokens per minute generated without a count. Refused now, as the budget refuses it.
#[tokio::test]
async fn a_route_whose_usage_cannot_be_read_is_refused_under_tokens_per_minute() {
    let f = filter(json!({"key": "ip", "tokens_per_minute": 1000}));
    let mut c = RequestCtx::new(String::new(), Method::POST, "/v1/responses".into());
    c.set_client("10.0.0.1".parse().unwrap(), 64);
    c.unknown_format = true;
    let r = f.on_request(&mut c).await.unwrap_err();
    assert_eq!((r.status.as_u16(), r.code), (403, "tokens_unenforceable"));
    // A rate alone counts requests, which it can.
    let rate = filter(json!({"key": "ip", "rate": "10/m"}));
    rate.on_request(&mut c).await.unwrap();
}

/// Review: a backend left after a late error may have generated to the request's bound; the
/// minute counted only what the next backend used. It counts the reservation again for each.
#[tokio::test]
async fn a_backend_left_after_a_late_error_counts_its_reservation() {
    let f = filter(json!({"key": "api_key", "tokens_per_minute": 1000}));
    let mk = || {
        let mut c = req("10.0.0.8");
        c.principal = Some(Arc::new(Principal {
            id: "late".into(),
            ..Default::default()
        }));
        c
    };
    let mut c = mk();
    c.max_tokens = Some(100);
    f.on_request(&mut c).await.unwrap();
    c.reached_backend = true;
    c.status = 200;
    c.late_errors = 1;
    c.usage = Some(Usage {
        prompt_tokens: 0,
        completion_tokens: 40,
        ..Default::default()
    });
    f.on_response_end(&mut c);
    f.on_complete(&mut c).await;
    // 40 used by the backend that answered, 100 held for the one left behind.
    let mut c = mk();
    c.max_tokens = Some(10);
    f.on_request(&mut c).await.unwrap();
    assert_eq!(
        header(&c, "x-ratelimit-remaining-tokens").as_deref(),
        Some("850")
    );
}
