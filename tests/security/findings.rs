//! Security: every check holds against every field, route and encoding that means the same
//! thing (hardening round 2). Each test names the finding it closes.

use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

const USER_KEY: &str = "sk-gw-user";
const LLAMA_KEY: &str = "sk-gw-llama-only";
const LLAMA_ADMIN_KEY: &str = "sk-gw-llama-admin";

/// A gateway with a user key, a llama-only key and a llama-only admin key, and `policy`.
async fn gateway(m: &mock_ollama::MockServer, extra: &str) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let h = filter_auth::keygen::hash_key;
    std::fs::write(
        dir.path().join("keys.yaml"),
        format!(
            "keys:\n  - {{ id: user, key_sha256: {} }}\n  - {{ id: llama, key_sha256: {}, models: ['llama3.1:8b'] }}\n  - {{ id: llama-admin, key_sha256: {}, models: ['llama3.1:8b'], scopes: [admin] }}\n",
            h(USER_KEY),
            h(LLAMA_KEY),
            h(LLAMA_ADMIN_KEY)
        ),
    )
    .unwrap();
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n    htpasswd: {}\n    brute_force: {{ max_failures: 0 }}\n{extra}",
        backends(&[("local", &m.url())]),
        dir.path().join("keys.yaml").display(),
        conf("htpasswd"),
    ))
    .await;
    (gw, dir)
}

/// A JSON POST with the ordinary user's key.
async fn as_user(c: &reqwest::Client, gw: &Gateway, path: &str, body: &Value) -> reqwest::Response {
    c.post(gw.url(path))
        .header("authorization", bearer(USER_KEY))
        .json(body)
        .send()
        .await
        .unwrap()
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// The JSON body the mock received for the last request on `path`.
fn last_body(m: &mock_ollama::MockServer, path: &str) -> Value {
    m.requests()
        .into_iter()
        .rev()
        .find(|r| r.path == path)
        .and_then(|r| r.json)
        .unwrap_or_else(|| panic!("the mock saw no JSON request on {path}"))
}

/// Reads a token count as the laxest backend does (pydantic: numbers and numeric strings).
fn as_count(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse::<f64>().ok().map(|f| f as i64),
        _ => None,
    }
}

const CAP_POLICY: &str = "  - use: policy\n    max_output_tokens: 100\n";

// Finding 1: the output cap reads every field a backend of the wire format honours, and
// writes every one of them.
#[tokio::test(flavor = "multi_thread")]
async fn output_cap_holds_for_every_token_field() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, CAP_POLICY).await;
    let c = client();
    let openai_cases = [
        json!({"max_tokens": 1, "max_completion_tokens": 1000000}),
        json!({"max_completion_tokens": 500}),
        json!({"max_tokens": 1e6}),
        json!({"max_tokens": "1000000"}),
        json!({"max_tokens": -1}),
        json!({"max_tokens": 5, "n_predict": -1}),
        json!({}),
    ];
    for extra in openai_cases {
        let mut body =
            json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = as_user(&c, &gw, "/v1/chat/completions", &body).await;
        assert_eq!(r.status(), 200, "{extra}");
        let seen = last_body(&m, "/v1/chat/completions");
        // Every backend's reading: vLLM (max_completion_tokens, else max_tokens),
        // llama-cpp-python (max_tokens), llama.cpp (n_predict, else max_tokens).
        for field in ["max_tokens", "max_completion_tokens"] {
            let n = as_count(&seen[field]).unwrap_or_else(|| panic!("{field} missing: {seen}"));
            assert!((1..=100).contains(&n), "{extra} forwarded {field}={n}");
        }
        if let Some(n) = seen.get("n_predict") {
            assert!(
                as_count(n).is_some_and(|n| (1..=100).contains(&n)),
                "{seen}"
            );
        }
    }
    assert_eq!(
        last_body(&m, "/v1/chat/completions")["max_tokens"],
        100,
        "a request without a limit gets the cap"
    );

    let ollama_cases = [
        json!({"max_tokens": 1, "options": {"num_predict": 1000000}}),
        json!({"options": {"num_predict": "1000000"}}),
        json!({"options": {"num_predict": -2}}),
        json!({"options": {"num_predict": 1e6}}),
        json!({"max_tokens": 1}),
    ];
    for extra in ollama_cases {
        let mut body = chat();
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = as_user(&c, &gw, "/api/chat", &body).await;
        assert_eq!(r.status(), 200, "{extra}");
        let seen = last_body(&m, "/api/chat");
        let n = seen["options"]["num_predict"].as_i64();
        assert!(
            n.is_some_and(|n| (1..=100).contains(&n)),
            "{extra} forwarded {seen}"
        );
    }

    for bad in [json!(1.5), json!("lots"), json!(true), json!([1])] {
        let r = as_user(
            &c,
            &gw,
            "/v1/chat/completions",
            &json!({"model": "llama3.1:8b", "messages": [], "max_completion_tokens": bad}),
        )
        .await;
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(error_of(r).await.0, "invalid_max_tokens");
    }
}

// Finding 1: reservations see the real figure: `n` completions of the cap each.
#[tokio::test(flavor = "multi_thread")]
async fn several_completions_reserve_several_caps() {
    let m = mock().await;
    let (gw, _d) = gateway(
        &m,
        "  - use: policy\n    max_output_tokens: 100\n    max_choices: 4\n  - use: ratelimit\n    key: api_key\n    tokens_per_minute: 250\n",
    )
    .await;
    let c = client();
    let ask = |n: u64| {
        c.post(gw.url("/v1/completions"))
            .header("authorization", bearer(USER_KEY))
            .json(&json!({"model": "llama3.1:8b", "prompt": "hi", "max_tokens": 1000, "n": n}))
            .send()
    };
    let r = ask(3).await.unwrap();
    assert_eq!(
        r.status(),
        429,
        "3 completions × 100 tokens = 300 > 250 tokens per minute"
    );
    // It can never fit: the answer says so, and names no time to come back.
    assert!(r.headers().get("retry-after").is_none());
    let (code, message) = error_of(r).await;
    assert_eq!(code, "rate_limit_exceeded");
    assert!(message.contains("can never pass"), "{message}");
    let r = ask(5).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_of(r).await.0, "too_many_choices");
    let r = ask(2).await.unwrap();
    assert_eq!(r.status(), 200);
    // llama.cpp's server reads `n_cmpl` before `n`: it counts the same.
    let r = as_user(
        &c,
        &gw,
        "/v1/completions",
        &json!({"model": "llama3.1:8b", "prompt": "hi", "max_tokens": 1000, "n": 1, "n_cmpl": 8}),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_of(r).await.0, "too_many_choices");
}

// Finding 2: every route that names a model is gated like inference; lists are filtered.
#[tokio::test(flavor = "multi_thread")]
async fn model_allow_list_holds_on_every_route_that_names_a_model() {
    let m = mock_with(mock_ollama::MockConfig {
        // /api/ps lists the first model: make it the forbidden one.
        models: vec!["qwen2.5:7b".into(), "llama3.1:8b".into()],
        ..Default::default()
    })
    .await;
    let (gw, _d) = gateway(
        &m,
        "  - use: policy\n    allow: [openai-inference, ollama-inference, { preset: ollama-admin, scope: admin }, { path: '/v1/models/**', methods: [GET] }]\n",
    )
    .await;
    let c = client();
    let post = |path: &str, key: &str, body: Value| {
        c.post(gw.url(path))
            .header("authorization", bearer(key))
            .json(&body)
            .send()
    };
    for body in [
        json!({"model": "qwen2.5:7b"}),
        json!({"name": "qwen2.5:7b"}),
        json!({"model": "llama3.1:8b", "name": "qwen2.5:7b"}),
    ] {
        let r = post("/api/show", LLAMA_KEY, body.clone()).await.unwrap();
        assert_eq!(r.status(), 403, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["code"], "model_not_allowed", "{v}");
    }
    let r = post("/api/show", LLAMA_KEY, json!({"model": 7}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let before = m.hits("/api/show");
    let r = post("/api/show", LLAMA_KEY, json!({"model": "llama3.1:8b"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(m.hits("/api/show"), before + 1, "only the allowed show");

    // Management routes (admin scope) are gated too, on every model they name.
    for (path, body) in [
        ("/api/pull", json!({"model": "qwen2.5:7b"})),
        (
            "/api/copy",
            json!({"source": "llama3.1:8b", "destination": "qwen2.5:7b"}),
        ),
        (
            "/api/create",
            json!({"model": "llama3.1:8b", "from": "qwen2.5:7b"}),
        ),
        (
            "/api/create",
            json!({"name": "llama3.1:8b", "modelfile": "FROM qwen2.5:7b\n"}),
        ),
    ] {
        let r = post(path, LLAMA_ADMIN_KEY, body.clone()).await.unwrap();
        assert_eq!(r.status(), 403, "{path} {body}");
    }
    let r = c
        .delete(gw.url("/api/delete"))
        .header("authorization", bearer(LLAMA_ADMIN_KEY))
        .json(&json!({"model": "qwen2.5:7b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        m.hits("/api/pull") + m.hits("/api/copy") + m.hits("/api/create") + m.hits("/api/delete"),
        0
    );
    let r = post(
        "/api/pull",
        LLAMA_ADMIN_KEY,
        json!({"model": "llama3.1:8b"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);

    // Lists: /api/ps, /api/tags, /v1/models show only the allowed model.
    for (path, list, name) in [
        ("/api/ps", "models", "name"),
        ("/api/tags", "models", "name"),
        ("/v1/models", "data", "id"),
    ] {
        let v: Value = c
            .get(gw.url(path))
            .header("authorization", bearer(LLAMA_KEY))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let names: Vec<&str> = v[list]
            .as_array()
            .unwrap_or_else(|| panic!("{path}: {v}"))
            .iter()
            .filter_map(|e| e[name].as_str())
            .collect();
        assert!(!names.contains(&"qwen2.5:7b"), "{path} lists {names:?}");
    }
    // One model by path, in any encoding.
    for path in [
        "/v1/models/qwen2.5:7b",
        "/v1/models/qwen2.5%3A7b",
        "/v1/models/%71wen2.5:7b",
    ] {
        let r = c
            .get(gw.url(path))
            .header("authorization", bearer(LLAMA_KEY))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
    }
    let r = c
        .get(gw.url("/v1/models/llama3.1:8b"))
        .header("authorization", bearer(LLAMA_KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Embeddings name a model too.
    let r = post(
        "/v1/embeddings",
        LLAMA_KEY,
        json!({"model": "qwen2.5:7b", "input": "x"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
}

// A refusal answered before the body was read is not lost to a reset: the gateway shuts its
// side and drops what the client still sends for a while (nginx's lingering close), so a
// client that sends its whole body before reading (curl without `Expect`) gets the answer.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_sent_whole_after_a_refusal_still_gets_the_answer() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, CAP_POLICY).await;
    let port = gw.port;
    let (wrote, answer) = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body = vec![b'a'; 2_000_000];
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        // Slowly enough that the refusal is sent (and, without lingering, the socket closed)
        // long before the last byte.
        let mut wrote = Ok(());
        for chunk in body.chunks(100_000) {
            wrote = s.write_all(chunk);
            if wrote.is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut answer = Vec::new();
        let read = s.read_to_end(&mut answer);
        (wrote.map_err(|e| e.to_string()), (read.map_err(|e| e.to_string()), answer))
    })
    .await
    .unwrap();
    assert_eq!(wrote, Ok(()), "the gateway closed on the client's body");
    let (read, answer) = answer;
    let text = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "{read:?}: {text}");
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(
        text.contains("\"invalid_api_key\"") || text.contains("\"code\""),
        "{text}"
    );
}

// Finding 3: authentication runs before the body is read.
#[tokio::test(flavor = "multi_thread")]
async fn strangers_are_refused_before_their_body_is_read() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, CAP_POLICY).await;
    // Announces a megabyte and sends nothing: answered at once, not after 30 s.
    let (code, took, body) = send_raw(
        gw.port,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n",
        b"",
    )
    .await;
    assert_eq!(code, 401, "{body}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // A 100 MB chunked body (first chunk only sent): 401, not 413.
    let (code, _, _) = send_raw(
        gw.port,
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"6400000\r\n{\"model\":",
    )
    .await;
    assert_eq!(code, 401);
    // A bad key is a stranger too.
    let (code, took, _) = send_raw(
        gw.port,
        "POST /api/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-wrong\r\nContent-Length: 1000000\r\n\r\n",
        b"",
    )
    .await;
    assert_eq!((code, took < Duration::from_secs(2)), (401, true));

    // Model label slots of the metrics cannot be filled by strangers.
    let c = client();
    for i in 0..20 {
        c.post(gw.url("/v1/chat/completions"))
            .json(&json!({"model": format!("stranger-model-{i}"), "messages": []}))
            .send()
            .await
            .unwrap();
    }
    let metrics = gw.metrics().await;
    assert!(metrics.contains("llm_gateway_requests_total"));
    assert!(!metrics.contains("stranger-model"), "{metrics}");
    assert_eq!(m.hits("/v1/chat/completions"), 0);
}

// Finding 12: header-authenticated clients need no JSON content type; ambient credentials do.
#[tokio::test(flavor = "multi_thread")]
async fn content_type_rule_only_for_credentials_a_browser_sends_by_itself() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "").await;
    let body = serde_json::to_string(&chat()).unwrap();
    let (code, body_out) = raw_request(
        gw.port,
        "POST",
        "/api/chat",
        &[("Authorization", &bearer(USER_KEY))],
        &body,
    )
    .await;
    assert_eq!(code, 200, "{body_out}");
    let (code, _) = raw_request(
        gw.port,
        "POST",
        "/api/chat",
        &[("x-api-key", USER_KEY)],
        &body,
    )
    .await;
    assert_eq!(code, 200);
    // demo:demo from conf/htpasswd, as a browser would replay it.
    let (code, out) = raw_request(
        gw.port,
        "POST",
        "/api/chat",
        &[
            ("Authorization", "Basic ZGVtbzpkZW1v"),
            ("Content-Type", "text/plain"),
        ],
        &body,
    )
    .await;
    assert_eq!(code, 415, "{out}");
    // The body must still be a JSON object.
    let (code, _) = raw_request(
        gw.port,
        "POST",
        "/api/chat",
        &[("Authorization", &bearer(USER_KEY))],
        "model=llama3.1:8b",
    )
    .await;
    assert_eq!(code, 400);
}

// Finding 12: errors on Ollama's routes in Ollama's shape, on OpenAI's in OpenAI's.
#[tokio::test(flavor = "multi_thread")]
async fn errors_come_in_the_routes_shape() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "").await;
    let c = client();
    let r = c
        .post(gw.url("/api/chat"))
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].is_string(), "{v}");
    assert_eq!(v["code"], "invalid_api_key", "{v}");
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .json(&chat())
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string(), "{v}");
}

// Finding 10: echoed client input is cut.
#[tokio::test(flavor = "multi_thread")]
async fn echoed_input_is_cut_short() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "").await;
    let long = "x".repeat(1_000_000);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", bearer(LLAMA_KEY))
        .json(&json!({"model": long, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let text = r.text().await.unwrap();
    assert!(text.len() < 1000, "{} bytes", text.len());
}

// Attacker review: Go reads field names without regard to case (Ollama), `0` is no limit.
#[tokio::test(flavor = "multi_thread")]
async fn case_folded_fields_and_zero_limits_do_not_slip_past() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, CAP_POLICY).await;
    let c = client();
    for body in [
        json!({"model": "llama3.1:8b", "Model": "qwen2.5:7b", "prompt": "x"}),
        json!({"model": "llama3.1:8b", "prompt": "x", "Options": {"num_predict": -1}}),
        json!({"model": "llama3.1:8b", "prompt": "x", "options": {"Num_Predict": -1}}),
    ] {
        let r = c
            .post(gw.url("/api/generate"))
            .header("authorization", bearer(LLAMA_KEY))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(error_of(r).await.0, "invalid_field_name");
    }
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", bearer(LLAMA_KEY))
        .json(&json!({"model": "llama3.1:8b", "MODEL": "qwen2.5:7b", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(m.total(), 0);
    // 0 means "no limit" to Ollama and llama-cpp-python: it is capped like -1.
    for (path, body) in [
        (
            "/api/generate",
            json!({"model": "llama3.1:8b", "prompt": "x", "stream": false, "options": {"num_predict": 0}}),
        ),
        (
            "/v1/completions",
            json!({"model": "llama3.1:8b", "prompt": "x", "max_tokens": 0}),
        ),
    ] {
        let r = as_user(&c, &gw, path, &body).await;
        assert_eq!(r.status(), 200, "{body}");
        let seen = last_body(&m, path);
        let n = seen
            .pointer("/options/num_predict")
            .or_else(|| seen.get("max_tokens"))
            .and_then(Value::as_u64);
        assert_eq!(n, Some(100), "{path}: {seen}");
    }
}

// Attacker review: several prompts in one completions request multiply the output.
#[tokio::test(flavor = "multi_thread")]
async fn prompt_lists_count_as_several_completions() {
    let m = mock().await;
    let (gw, _d) = gateway(
        &m,
        "  - use: policy\n    max_output_tokens: 100\n    max_choices: 4\n",
    )
    .await;
    let r = client()
        .post(gw.url("/v1/completions"))
        .header("authorization", bearer(USER_KEY))
        .json(
            &json!({"model": "llama3.1:8b", "prompt": ["a", "b", "c", "d", "e"], "max_tokens": 10}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_of(r).await.0, "too_many_choices");
}

// Attacker review: routes the gateway has no parser for, model management by digest, globs
// across registries.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_formats_weights_by_digest_and_other_registries_are_refused() {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let h = filter_auth::keygen::hash_key;
    std::fs::write(
        dir.path().join("keys.yaml"),
        format!(
            "keys:\n  - {{ id: glob-admin, key_sha256: {}, models: ['llama*'], scopes: [admin] }}\n  - {{ id: user, key_sha256: {} }}\n",
            h(LLAMA_ADMIN_KEY),
            h(USER_KEY)
        ),
    )
    .unwrap();
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n  - use: policy\n    max_output_tokens: 100\n    allow: [ollama-inference, {{ preset: ollama-admin, scope: admin }}, {{ path: '/v1/**', methods: [POST] }}]\n",
        backends(&[("local", &m.url())]),
        dir.path().join("keys.yaml").display(),
    ))
    .await;
    let c = client();
    let post = |path: &str, key: &str, body: Value| {
        c.post(gw.url(path))
            .header("authorization", bearer(key))
            .json(&body)
            .send()
    };
    // /v1/responses (a rule allows /v1/**): its output limit cannot be written.
    let r = post(
        "/v1/responses",
        USER_KEY,
        json!({"model": "llama3.1:8b", "input": "hi", "max_output_tokens": 100000}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_of(r).await.0, "output_cap_unenforceable");
    for (path, body) in [
        (
            "/api/create",
            json!({"model": "llama3.1:8b", "files": {"m.gguf": "sha256:abc"}}),
        ),
        (
            "/api/create",
            json!({"model": "llama3.1:8b", "modelfile": "FROM\tqwen2.5:7b"}),
        ),
        // A quote left open on the FROM line goes on over the next lines in Ollama's parser:
        // the name it reads is on a line of its own.
        (
            "/api/create",
            json!({"model": "llama3.1:8b", "modelfile": "FROM \"\"\"\nqwen2.5:7b\n\"\"\"\n"}),
        ),
        // Attacker review: draft weights by digest, a model relayed to another server, a
        // Modelfile's adapter, a cloud source behind a space.
        (
            "/api/create",
            json!({"model": "llama3.1:x", "from": "llama3.1:8b", "draft_files": {"d.gguf": "sha256:abc"}}),
        ),
        (
            "/api/create",
            json!({"model": "llama3.1:relay", "from": "llama3.1:8b", "remote_host": "https://ollama.com"}),
        ),
        (
            "/api/create",
            json!({"model": "llama3.1:x", "modelfile": "FROM llama3.1:8b\nADAPTER @sha256:abc\n"}),
        ),
        (
            "/api/create",
            json!({"model": "llama3.1:box", "from": "llama3.1:405b: cloud"}),
        ),
        ("/api/pull", json!({"model": "llama.evil.example/x/y:z"})),
    ] {
        let r = post(path, LLAMA_ADMIN_KEY, body.clone()).await.unwrap();
        assert_eq!(r.status(), 403, "{path} {body}");
    }
    assert_eq!(m.total(), 0);
    // A FROM line inside another command's open quote is text, not a command: the Modelfile
    // creates from the FROM after it, which the key may use.
    let r = post(
        "/api/create",
        LLAMA_ADMIN_KEY,
        json!({"model": "llama3.1:mine", "modelfile": "SYSTEM \"\"\"\nFROM qwen2.5:7b\n\"\"\"\nFROM llama3.1:8b\n"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(m.total(), 1);
}

// Finding 4: one Content-Length or chunked, nothing else; hop-by-hop headers stay here.
#[tokio::test(flavor = "multi_thread")]
async fn framing_is_the_gateways_own_and_hop_headers_stay_behind() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "").await;
    let auth = format!("Authorization: Bearer {USER_KEY}\r\n");
    let body = r#"{"model":"llama3.1:8b"}"#;
    for framing in [
        format!("Content-Length: {0}, {0}\r\n", body.len()),
        format!("Content-Length: {0}\r\nContent-Length: {0}\r\n", body.len()),
        "Transfer-Encoding: gzip, chunked\r\n".to_string(),
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n".to_string(),
        // Pingora drops the length beside chunked framing before the gateway's code runs.
        format!(
            "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
            body.len()
        ),
        format!(
            "Transfer-Encoding: chunked\r\ncontent-length: {}\r\n",
            body.len()
        ),
    ] {
        let chunked = framing.contains("chunked");
        let payload = if chunked {
            format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len())
        } else {
            body.to_string()
        };
        let (code, _, out) = send_raw(
            gw.port,
            &format!("POST /api/show HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n{framing}\r\n"),
            payload.as_bytes(),
        )
        .await;
        assert_eq!(code, 400, "{framing:?}: {out}");
    }
    assert_eq!(m.total(), 0, "nothing ambiguous reaches the backend");

    let (code, _, out) = send_raw(
        gw.port,
        &format!("POST /api/show HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nTransfer_Encoding: chunked\r\nConnection: keep-alive, X-Secret, Upgrade, HTTP2-Settings\r\nX-Secret: 1\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nX-Kept: yes\r\n\r\n", body.len()),
        body.as_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{out}");
    let seen = m.requests().into_iter().last().unwrap();
    let names: Vec<&str> = seen.headers.iter().map(|(k, _)| k.as_str()).collect();
    assert!(names.contains(&"x-kept"), "{names:?}");
    for gone in [
        "transfer_encoding",
        "x-secret",
        "upgrade",
        "http2-settings",
        "transfer-encoding",
    ] {
        assert!(!names.contains(&gone), "{gone} was forwarded: {names:?}");
    }
    let length = seen.headers.iter().find(|(k, _)| k == "content-length");
    assert_eq!(length.map(|(_, v)| v.as_str()), Some("23"));
}

// A body on a GET is not read by every server (cpp-httplib, llama.cpp's server, reads one only
// for POST, PUT, PATCH and DELETE): forwarded, it would be taken for the next request on the
// pooled connection, unchecked, and its answer given to the next client.
#[tokio::test(flavor = "multi_thread")]
async fn a_get_with_a_body_is_refused_not_forwarded() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "").await;
    let auth = format!("Authorization: Bearer {USER_KEY}\r\n");
    let hidden = "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: 46\r\n\r\n{\"prompt\":\"ATTACKER TEXT\",\"n_predict\":1000000}";
    for (target, framing, payload, shape) in [
        (
            "/v1/models",
            format!("Content-Length: {}\r\n", hidden.len()),
            hidden.to_string(),
            "openai",
        ),
        (
            "/api/tags",
            "Transfer-Encoding: chunked\r\n".to_string(),
            format!("{:x}\r\n{hidden}\r\n0\r\n\r\n", hidden.len()),
            "ollama",
        ),
        (
            "/api/ps",
            format!("Content-Length: {}\r\n", hidden.len()),
            hidden.to_string(),
            "ollama",
        ),
    ] {
        let (code, _, out) = send_raw(
            gw.port,
            &format!("GET {target} HTTP/1.1\r\nHost: x\r\n{auth}{framing}\r\n"),
            payload.as_bytes(),
        )
        .await;
        assert_eq!(code, 400, "{target}: {out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let code = match shape {
            "openai" => &v["error"]["code"],
            _ => &v["code"],
        };
        assert_eq!(code, "body_not_allowed", "{target}: {out}");
    }
    assert_eq!(m.total(), 0, "nothing reached the backend");
    // Without a body (or with an empty one) the same requests are served.
    for framing in ["", "Content-Length: 0\r\n"] {
        let (code, _, out) = send_raw(
            gw.port,
            &format!(
                "GET /api/tags HTTP/1.1\r\nHost: x\r\n{auth}{framing}Connection: close\r\n\r\n"
            ),
            b"",
        )
        .await;
        assert_eq!(code, 200, "{framing:?}: {out}");
    }
}

// Ollama reloads a model whenever a request's runner options differ from the loaded ones, and
// `keep_alive: 0` unloads it: alternating them, an empty embedding request reloads a model of
// many gigabytes for every other user. Requests may not set runner options (nor a template the
// server runs) unless the operator says so; `keep_alive` is removed, so the server's own
// setting applies (Continue sends 30 minutes on every request).
#[tokio::test(flavor = "multi_thread")]
async fn requests_do_not_reload_or_unload_models_for_everyone() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "  - use: policy\n").await;
    let c = client();
    for (path, body) in [
        (
            "/api/embed",
            json!({"model": "llama3.1:8b", "input": [], "options": {"num_batch": 511}}),
        ),
        (
            "/api/chat",
            json!({"model": "llama3.1:8b", "messages": [], "options": {"num_gpu": 0}}),
        ),
        (
            "/api/generate",
            json!({"model": "llama3.1:8b", "prompt": "x", "template": "{{.Prompt}}{{.Prompt}}"}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ messages }}"}),
        ),
    ] {
        let r = as_user(&c, &gw, path, &body).await;
        assert_eq!(r.status(), 403, "{path} {body}");
        assert_eq!(
            error_of(r).await.0,
            "server_setting_not_allowed",
            "{path} {body}"
        );
    }
    assert_eq!(m.total(), 0, "nothing reached the backend");
    // Sampling options and the server's defaults pass.
    let r = as_user(&c, &gw, "/api/chat", &json!({"model": "llama3.1:8b", "stream": false, "messages": [{"role": "user", "content": "hi"}], "options": {"temperature": 0.2, "num_ctx": 2048}, "keep_alive": null})).await;
    assert_eq!(r.status(), 200);
    for keep_alive in [json!(0), json!("1s"), json!(1800)] {
        let r = as_user(
            &c,
            &gw,
            "/api/embed",
            &json!({"model": "llama3.1:8b", "input": ["x"], "keep_alive": keep_alive}),
        )
        .await;
        assert_eq!(r.status(), 200);
        let seen = last_body(&m, "/api/embed");
        assert!(
            seen.get("keep_alive").is_none(),
            "{keep_alive} reached the backend: {seen}"
        );
    }
    // With `server_settings: allow` they go through as sent.
    let (gw, _d) = gateway(&m, "  - use: policy\n    server_settings: allow\n").await;
    let r = as_user(&c, &gw, "/api/embed", &json!({"model": "llama3.1:8b", "input": ["x"], "keep_alive": "10m", "options": {"num_batch": 256}})).await;
    assert_eq!(r.status(), 200);
    let seen = last_body(&m, "/api/embed");
    assert_eq!(
        (&seen["keep_alive"], &seen["options"]["num_batch"]),
        (&json!("10m"), &json!(256))
    );
    // …but an adapter picked by id or path (llama.cpp's `lora`, SGLang's `lora_path`) runs
    // a model the allow-list never judged: a key limited to some models is still refused.
    for body in [
        json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}], "lora": [{"id": 3, "scale": 1.0}]}),
        json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}], "lora_path": "/models/finetune"}),
    ] {
        let send = |key: &'static str| {
            c.post(gw.url("/v1/chat/completions"))
                .header("authorization", bearer(key))
                .json(&body)
                .send()
        };
        let r = send(LLAMA_KEY).await.unwrap();
        assert_eq!(r.status(), 403, "{body}");
        assert_eq!(error_of(r).await.0, "model_not_allowed", "{body}");
        assert_eq!(send(USER_KEY).await.unwrap().status(), 200, "{body}");
    }
}

// The debug access line quotes what a client chose: a model name (or a token's subject) with a
// newline or spaces cannot forge a line or a field.
#[tokio::test(flavor = "multi_thread")]
async fn client_chosen_names_cannot_forge_access_lines() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "").await;
    let r = client()
        .post(gw.url("/api/chat"))
        .header("authorization", bearer(USER_KEY))
        .json(&json!({"model": "m\n[2026] access id=forged principal=admin status=200", "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let line = gw.access_line(&id).await;
    assert_eq!(field(&line, "principal"), "user", "{line}");
    assert!(
        !gw.log().lines().any(|l| l.starts_with("[2026] access")),
        "{}",
        gw.log()
    );
}

// Finding 4: limits hold on every route, not only inference.
#[tokio::test(flavor = "multi_thread")]
async fn body_limits_hold_on_every_route() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "limits: { max_body: 64KiB, client_body_timeout: 1s }\n").await;
    let auth = format!("Authorization: Bearer {USER_KEY}\r\n");
    // A large chunked body to /api/show: 413 once the limit is passed.
    let chunk = format!("{:x}\r\n{}\r\n", 32 << 10, "x".repeat(32 << 10));
    let (code, _, _) = send_raw(
        gw.port,
        &format!("POST /api/show HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"),
        chunk.repeat(4).as_bytes(),
    )
    .await;
    assert_eq!(code, 413);
    // A slow body: 408 at client_body_timeout, not never.
    let (code, took, _) = send_raw(
        gw.port,
        &format!("POST /api/show HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"),
        b"{\"model\":",
    )
    .await;
    assert_eq!(code, 408);
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(m.total(), 0);
}

// Finding 8: a request the backend may already be running is never sent again.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_the_backend_took_is_not_sent_twice() {
    let a = mock().await;
    let b = mock().await;
    let gw = Gateway::start(&format!(
        "{}routing: {{ strategy: round-robin, discovery: {{ enabled: false }}, health: {{ enabled: false }} }}\n",
        backends(&[("a", &a.url()), ("b", &b.url())])
    ))
    .await;
    let c = client();
    // Warm both pooled connections.
    for _ in 0..2 {
        let r = c
            .post(gw.url("/api/generate"))
            .json(&json!({"model": "llama3.1:8b", "prompt": "x", "stream": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let before = a.total() + b.total();
    // The backend reads the request, then drops the connection without answering.
    let r = c
        .post(gw.url("/api/generate"))
        .header("x-mock-fail", "refuse")
        .json(&json!({"model": "llama3.1:8b", "prompt": "x", "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(
        a.total() + b.total(),
        before + 1,
        "the prompt reached one backend, once"
    );
}

// Finding 4: a backend's max_in_flight counts every request, not only inference.
#[tokio::test(flavor = "multi_thread")]
async fn backend_slots_count_every_route() {
    let m = mock_with(mock_ollama::MockConfig {
        chunks: 20,
        chunk_delay: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(&format!(
        "backends:\n  - {{ name: local, url: '{}', kind: ollama, max_in_flight: 1 }}\nrouting: {{ queue: {{ size: 4, timeout: 200ms }}, discovery: {{ enabled: false }}, health: {{ enabled: false }} }}\n",
        m.url()
    ))
    .await;
    let url = gw.url("/api/chat");
    let stream = tokio::spawn(async move {
        let body = json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]});
        client()
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    for _ in 0..100 {
        if m.hits("/api/chat") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = client().get(gw.url("/api/version")).send().await.unwrap();
    assert_eq!(r.status(), 503, "the backend's only slot is taken");
    assert_eq!(m.hits("/api/version"), 0);
    stream.await.unwrap();
    let r = client().get(gw.url("/api/version")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

// Second attacker review: a body the gateway cannot read on a custom rule's route names no
// model it could judge; a model-restricted caller is refused for it.
#[tokio::test(flavor = "multi_thread")]
async fn unreadable_bodies_on_unknown_routes_fail_closed() {
    let m = mock().await;
    let (gw, _d) = gateway(
        &m,
        "  - use: policy\n    allow: [ollama-inference, openai-inference, { path: '/v1/**', methods: [POST] }]\n",
    )
    .await;
    let c = client();
    let send = |body: Vec<u8>| {
        c.post(gw.url("/v1/responses"))
            .header("authorization", bearer(LLAMA_KEY))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let deep = format!(
        "{{\"model\":\"qwen2.5:7b\",\"x\":{}1{}}}",
        "[".repeat(200),
        "]".repeat(200)
    );
    for body in [
        br#"{"input":"hi"}"#.to_vec(),
        b"\xef\xbb\xbf{\"model\":\"qwen2.5:7b\"}".to_vec(),
        br#"{"model":"qwen2.5:7b","temperature":NaN}"#.to_vec(),
        deep.into_bytes(),
    ] {
        let r = send(body.clone()).await.unwrap();
        assert_eq!(
            r.status(),
            403,
            "{}",
            String::from_utf8_lossy(&body[..40.min(body.len())])
        );
    }
    let r = send(br#"{"model":"llama3.1:8b","input":"hi"}"#.to_vec())
        .await
        .unwrap();
    assert_ne!(r.status(), 403, "an allowed model passes");
    assert_eq!(m.hits("/v1/responses"), 1);
}

// Second attacker review: usage is asked for whatever `stream_options` holds, and `stream`
// must be a boolean.
#[tokio::test(flavor = "multi_thread")]
async fn usage_is_asked_for_however_stream_options_is_written() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "").await;
    let c = client();
    let r = as_user(&c, &gw, "/v1/chat/completions", &json!({"model": "llama3.1:8b", "stream": true, "stream_options": null, "messages": [{"role": "user", "content": "hi"}]})).await;
    let text = r.text().await.unwrap();
    assert!(
        !text.contains("\"choices\":[]"),
        "the client did not ask for usage: {text}"
    );
    assert_eq!(
        last_body(&m, "/v1/chat/completions")["stream_options"],
        json!({"include_usage": true})
    );
    // Ollama reads `stream_options` without regard to case, the last spelling winning: a
    // second spelling that would turn the usage off is refused.
    let r = as_user(&c, &gw, "/v1/chat/completions", &json!({"model": "llama3.1:8b", "stream": true, "stream_options": {"include_usage": true, "Include_usage": false}, "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_of(r).await.0, "invalid_field_name");
    let r = as_user(
        &c,
        &gw,
        "/v1/chat/completions",
        &json!({"model": "llama3.1:8b", "stream": "true", "messages": []}),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_of(r).await.0, "invalid_stream");
}

// Review of finding 3: a stranger's answer is not lost to a connection reset when it already
// sent a small body (closing with unread bytes makes the kernel reset the connection).
#[tokio::test(flavor = "multi_thread")]
async fn strangers_with_a_small_body_get_their_401() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "").await;
    let body =
        serde_json::to_vec(&json!({"model": "llama3.1:8b", "prompt": "x".repeat(30_000)})).unwrap();
    for i in 0..20 {
        let r = reqwest::Client::new()
            .post(gw.url("/api/generate"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status(), 401, "request {i}");
    }
    assert_eq!(m.total(), 0);
}

// Finding 12: heads Pingora's parser cannot read, or its checks refuse, are answered in JSON
// too, in the route's shape, not with an empty 400.
#[tokio::test(flavor = "multi_thread")]
async fn unreadable_request_heads_get_json_errors() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "").await;
    let many: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    for (head, status, code) in [
        (
            format!("GET /api/tags HTTP/1.1\r\nHost: x\r\n{many}\r\n"),
            431,
            "request_header_fields_too_large",
        ),
        (
            "GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n".to_string(),
            400,
            "invalid_request",
        ),
        (
            format!(
                "GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "a".repeat(70_000)
            ),
            431,
            "request_header_fields_too_large",
        ),
        // Heads `httparse` takes but Pingora's checks refuse: framing it cannot trust.
        (
            "POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
                .to_string(),
            400,
            "invalid_request",
        ),
        (
            "POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_string(),
            400,
            "invalid_request",
        ),
        (
            "POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n".to_string(),
            400,
            "invalid_request",
        ),
        (
            "CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n".to_string(),
            405,
            "method_not_allowed",
        ),
    ] {
        let (got, _, body) = send_raw(gw.port, &head, b"").await;
        assert_eq!(got, status, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
        let found = v["code"].as_str().or_else(|| v["error"]["code"].as_str());
        assert_eq!(found, Some(code), "{v}");
        if head.contains(" /api/") {
            assert!(v["error"].is_string(), "Ollama's shape on /api: {v}");
        }
    }
    assert_eq!(m.total(), 0);
}

// Trusted proxies (identity issue, first part): behind a listed proxy the client is the one
// X-Forwarded-For names; from any other peer the header is ignored.
#[tokio::test(flavor = "multi_thread")]
async fn forwarded_clients_only_behind_trusted_proxies() {
    let m = mock().await;
    let limiter = "filters:\n  - use: ratelimit\n    key: ip\n    rate: 1/m\n    burst: 0\n";
    let ask = |gw: &Gateway, xff: &'static str| {
        client()
            .get(gw.url("/api/version"))
            .header("x-forwarded-for", xff)
            .send()
    };
    let port = free_port();
    let trusted = Gateway::start_raw(
        &format!(
            "listen:\n  - addr: 127.0.0.1:{port}\n    trusted_proxies: [127.0.0.1]\n{}{limiter}",
            backends(&[("local", &m.url())])
        ),
        port,
    )
    .await;
    assert_eq!(ask(&trusted, "203.0.113.5").await.unwrap().status(), 200);
    assert_eq!(ask(&trusted, "203.0.113.5").await.unwrap().status(), 429);
    assert_eq!(
        ask(&trusted, "203.0.113.6").await.unwrap().status(),
        200,
        "another client behind the same proxy"
    );
    let plain = Gateway::start(&format!("{}{limiter}", backends(&[("local", &m.url())]))).await;
    assert_eq!(ask(&plain, "203.0.113.7").await.unwrap().status(), 200);
    assert_eq!(
        ask(&plain, "203.0.113.8").await.unwrap().status(),
        429,
        "an untrusted peer cannot pick its own address"
    );
    let seen = m.requests().into_iter().last().unwrap();
    assert!(
        !seen.headers.iter().any(|(k, _)| k == "x-forwarded-for"),
        "never forwarded"
    );
}

// Identity headers from a trusted proxy (e.g. `tailscale serve`): believed from it only.
#[tokio::test(flavor = "multi_thread")]
async fn identity_headers_only_from_trusted_proxies() {
    let m = mock().await;
    let auth = format!(
        "filters:\n  - use: auth\n    keys_file: {}\n    trusted_identity_header: Tailscale-User-Login\n",
        conf("keys.yaml")
    );
    let port = free_port();
    let behind = Gateway::start_raw(
        &format!(
            "listen:\n  - addr: 127.0.0.1:{port}\n    trusted_proxies: [127.0.0.1]\n{}{auth}",
            backends(&[("local", &m.url())])
        ),
        port,
    )
    .await;
    let ask = |gw: &Gateway| {
        client()
            .get(gw.url("/api/tags"))
            .header("tailscale-user-login", "someone@example.com")
            .send()
    };
    assert_eq!(ask(&behind).await.unwrap().status(), 200);
    let seen = m.requests().into_iter().last().unwrap();
    assert!(!seen
        .headers
        .iter()
        .any(|(k, _)| k == "tailscale-user-login"));
    // A proxy naming one of the gateway's own accounts (`anonymous`, `*`) is refused.
    for name in ["anonymous", "*"] {
        let resp = client()
            .get(behind.url("/api/tags"))
            .header("tailscale-user-login", name)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{name}");
        assert_eq!(error_of(resp).await.0, "principal_reserved");
    }
    let direct = Gateway::start(&format!("{}{auth}", backends(&[("local", &m.url())]))).await;
    assert_eq!(
        ask(&direct).await.unwrap().status(),
        401,
        "not from an untrusted peer"
    );
}

// Options a demanding operator sets and the suite had no test for: Ollama's context window is
// clamped on every route and however the number is written, and inference POSTs without JSON
// are refused to browsers' simple requests (basic auth) but not to API-key clients.
#[tokio::test(flavor = "multi_thread")]
async fn the_context_window_is_capped_and_json_is_required() {
    let m = mock().await;
    let (gw, _d) = gateway(
        &m,
        "  - use: policy\n    max_context_tokens: 8192\n    require_json_content_type: true\n",
    )
    .await;
    let c = client();
    for (path, body) in [
        (
            "/api/chat",
            json!({"model": "llama3.1:8b", "stream": false, "messages": [], "options": {"num_ctx": 131072}}),
        ),
        (
            "/api/generate",
            json!({"model": "llama3.1:8b", "stream": false, "prompt": "x", "options": {"num_ctx": "1e6"}}),
        ),
        (
            "/api/generate",
            json!({"model": "llama3.1:8b", "stream": false, "prompt": "x", "options": {"num_ctx": -1}}),
        ),
        (
            "/api/embed",
            json!({"model": "llama3.1:8b", "input": "x", "options": {"num_ctx": 1e9}}),
        ),
    ] {
        let r = as_user(&c, &gw, path, &body).await;
        assert_eq!(r.status(), 200, "{path} {body}");
        assert_eq!(
            last_body(&m, path)["options"]["num_ctx"],
            8192,
            "{path} {body}"
        );
    }
    let small = json!({"model": "llama3.1:8b", "stream": false, "prompt": "x", "options": {"num_ctx": 2048}});
    let r = as_user(&c, &gw, "/api/generate", &small).await;
    assert_eq!(r.status(), 200);
    assert_eq!(last_body(&m, "/api/generate")["options"]["num_ctx"], 2048);
    // A form post with a password (what a page could make a browser send): 415. With an API
    // key in a header, which no page can set cross-site, the type is not required.
    let text = r#"{"model": "llama3.1:8b", "stream": false, "prompt": "x"}"#;
    let r = c
        .post(gw.url("/api/generate"))
        .basic_auth("demo", Some("demo"))
        .header("content-type", "text/plain")
        .body(text)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = c
        .post(gw.url("/api/generate"))
        .header("authorization", bearer(USER_KEY))
        .header("content-type", "text/plain")
        .body(text)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

// Attacker review (2026-12-04): a field written twice in one object. serde_json (and Python's
// parsers) keep the last, Go's `encoding/json` (Ollama) merges a repeated object into the
// first: `"options":{"num_ctx":131072},"options":{"num_predict":64}` hid a context size from
// the context cap. Every repeated name, at any depth and on every route whose body the
// gateway reads, is refused before a backend sees it.
#[tokio::test(flavor = "multi_thread")]
async fn a_field_written_twice_is_refused_on_every_route() {
    let m = mock().await;
    let (gw, _d) = gateway(
        &m,
        "  - use: policy\n    max_output_tokens: 100\n    max_context_tokens: 4096\n",
    )
    .await;
    let c = client();
    for (path, body) in [
        (
            "/api/chat",
            r#"{"model":"llama3.1:8b","messages":[{"role":"user","content":"hi"}],"options":{"num_ctx":131072},"options":{"num_predict":64}}"#,
        ),
        (
            "/api/generate",
            r#"{"model":"llama3.1:8b","prompt":"x","stream":false,"stream":true}"#,
        ),
        (
            "/api/generate",
            r#"{"model":"llama3.1:8b","prompt":"x","options":{"num_predict":10,"num_predict":-1}}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"llama3.1:8b","messages":[{"role":"user","content":"a","content":"b"}]}"#,
        ),
        (
            "/v1/completions",
            r#"{"model":"llama3.1:8b","prompt":"x","stream_options":{"include_usage":true},"stream_options":{}}"#,
        ),
        (
            "/api/show",
            r#"{"model":"llama3.1:8b","\u006dodel":"qwen2.5:7b"}"#,
        ),
    ] {
        let r = c
            .post(gw.url(path))
            .header("authorization", bearer(LLAMA_KEY))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path} {body}");
        let (code, message) = error_of(r).await;
        assert_eq!(code, "duplicate_field", "{path} {body}");
        assert!(message.contains("appears twice"), "{message}");
    }
    assert_eq!(m.total(), 0, "none reached the backend");
    // The same body with each field once passes, its context capped.
    let r = c
        .post(gw.url("/api/chat"))
        .header("authorization", bearer(LLAMA_KEY))
        .header("content-type", "application/json")
        .body(r#"{"model":"llama3.1:8b","stream":false,"messages":[{"role":"user","content":"hi"}],"options":{"num_ctx":131072,"num_predict":64}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(last_body(&m, "/api/chat")["options"]["num_ctx"], 4096);
}

// Attacker review (2026-12-04): the content-type rule held only on inference routes. A page
// could make an administrator's browser, holding a password (or a client certificate),
// create, pull or copy models with a form post (`text/plain`), which Ollama reads as JSON.
#[tokio::test(flavor = "multi_thread")]
async fn management_routes_need_json_from_browser_held_credentials() {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    // The htpasswd user `demo` is an administrator here.
    std::fs::write(
        dir.path().join("keys.yaml"),
        format!(
            "keys:\n  - {{ id: demo, key_sha256: {}, scopes: [admin] }}\n",
            filter_auth::keygen::hash_key(USER_KEY)
        ),
    )
    .unwrap();
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n    htpasswd: {}\n  - use: policy\n",
        backends(&[("local", &m.url())]),
        dir.path().join("keys.yaml").display(),
        conf("htpasswd"),
    ))
    .await;
    let c = client();
    // The same holds for Ollama's management routes (attacker review): a page must not make
    // an administrator's browser create, pull or copy models with its password.
    for (path, body) in [
        (
            "/api/create",
            r#"{"model": "llama3.1:8b", "from": "llama3.1:8b", "system": "x"}"#,
        ),
        ("/api/pull", r#"{"model": "llama3.1:8b"}"#),
        (
            "/api/copy",
            r#"{"source": "llama3.1:8b", "destination": "llama3.1:mine"}"#,
        ),
        ("/api/show", r#"{"model": "llama3.1:8b"}"#),
    ] {
        let r = c
            .post(gw.url(path))
            .basic_auth("demo", Some("demo"))
            .header("content-type", "text/plain")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415, "{path}");
        assert_eq!(error_of(r).await.0, "unsupported_media_type", "{path}");
    }
    assert_eq!(m.total(), 0, "none reached the backend");
    let r = c
        .post(gw.url("/api/show"))
        .basic_auth("demo", Some("demo"))
        .header("content-type", "application/json")
        .body(r#"{"model": "llama3.1:8b"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // An API key in a header (which no page can set cross-site) needs no content type.
    let r = c
        .post(gw.url("/api/show"))
        .header("authorization", bearer(USER_KEY))
        .header("content-type", "text/plain")
        .body(r#"{"model": "llama3.1:8b"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

// Principals named from outside (here a trusted proxy's identity header; JWT subjects and
// forward-auth answers alike) are as many as the outside source has users: each takes a
// metrics label slot only while `metrics.max_principals` allows, and counts as `other` after,
// so a large directory cannot grow the metrics without bound. Keys-file ids are always named.
#[tokio::test(flavor = "multi_thread")]
async fn principals_from_outside_have_bounded_metric_labels() {
    let m = mock().await;
    let port = free_port();
    let gw = Gateway::start_raw(
        &format!(
            "listen:\n  - addr: 127.0.0.1:{port}\n    trusted_proxies: [127.0.0.1]\nmetrics: {{ max_principals: 2 }}\n{}filters:\n  - use: auth\n    keys_file: {}\n    trusted_identity_header: Tailscale-User-Login\n",
            backends(&[("local", &m.url())]),
            conf("keys.yaml")
        ),
        port,
    )
    .await;
    for i in 0..6 {
        let resp = client()
            .get(gw.url("/api/tags"))
            .header("tailscale-user-login", format!("user-{i}@example.com"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // The keys file's `demo`, once named by the proxy's header and once by its key: always
    // named, whatever the slots.
    for by_header in [true, false] {
        let mut req = client().get(gw.url("/api/tags"));
        req = if by_header {
            req.header("tailscale-user-login", "demo")
        } else {
            req.bearer_auth(DEMO_KEY)
        };
        assert_eq!(req.send().await.unwrap().status(), 200);
    }
    // A request's counters are written after its answer: the scrape waits for all eight.
    let mut text = String::new();
    for _ in 0..100 {
        text = gw.metrics().await;
        let counted: f64 = text
            .lines()
            .filter(|l| l.starts_with("llm_gateway_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if counted >= 8.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let demo: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("llm_gateway_requests_total{") && l.contains("principal=\"demo\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(demo, 2.0, "{text}");
    let principals: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("llm_gateway_requests_total{"))
        .filter_map(|l| l.split("principal=\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    // Two of the six outside principals took the two slots (which two depends on the order
    // their counters were written, after each answer), the rest count as `other`.
    let users = principals.iter().filter(|p| p.starts_with("user-")).count();
    assert!(
        principals.contains("demo") && principals.contains("other") && users == 2,
        "{principals:?} {text}"
    );
    assert_eq!(principals.len(), 4, "{text}");
}

// Attacker review (2026-12-05, second): the budget's own series (`llm_gateway_spend_usd_total`
// by principal and model, `llm_gateway_budget_remaining_usd` by principal) took every
// principal a proxy, a JWT or a validator named, and every model name charged, as a label:
// they now take the gateway's bounded label slots too.
#[tokio::test(flavor = "multi_thread")]
async fn the_budgets_series_have_bounded_labels_too() {
    let m = mock().await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start_raw(
        &format!(
            "listen:\n  - addr: 127.0.0.1:{port}\n    trusted_proxies: [127.0.0.1]\nmetrics: {{ max_principals: 2 }}\n{}filters:\n  - use: auth\n    keys_file: {}\n    trusted_identity_header: Tailscale-User-Login\n  - use: budget\n    ledger: {}\n    default: {{ max_usd: 100, period: 1d }}\n    prices:\n      - {{ model: '*', prompt_per_1m: 1000, completion_per_1m: 1000 }}\n",
            backends(&[("local", &m.url())]),
            conf("keys.yaml"),
            dir.path().join("spend.db").display()
        ),
        port,
    )
    .await;
    for i in 0..6 {
        let resp = client()
            .post(gw.url("/api/chat"))
            .header("tailscale-user-login", format!("user-{i}@example.com"))
            .json(&json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}], "stream": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let labels = |text: &str, metric: &str| -> std::collections::BTreeSet<String> {
        text.lines()
            .filter(|l| l.starts_with(metric))
            .filter_map(|l| l.split("principal=\"").nth(1))
            .filter_map(|rest| rest.split('"').next())
            .map(str::to_string)
            .collect()
    };
    let mut text = String::new();
    for _ in 0..100 {
        text = gw.metrics().await;
        let spent: f64 = text
            .lines()
            .filter(|l| l.starts_with("llm_gateway_spend_usd_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if labels(&text, "llm_gateway_spend_usd_total{").contains("other") && spent > 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Two of the six principals took the two slots (which two depends on the order their
    // series were first written), the rest are charged as `other`.
    let spent = labels(&text, "llm_gateway_spend_usd_total{");
    let named: Vec<&String> = spent.iter().filter(|p| p.starts_with("user-")).collect();
    assert!(spent.contains("other") && named.len() == 2, "{text}");
    assert_eq!(spent.len(), 3, "{text}");
    // A gauge for "other" would hold whichever account wrote last: none is kept.
    let remaining = labels(&text, "llm_gateway_budget_remaining_usd{");
    assert_eq!(
        remaining.iter().collect::<Vec<_>>(),
        named,
        "the named principals only: {text}"
    );
}

// Attacker review (2026-12-05): on a custom rule's route, an allowed `model` beside adapter
// fields (vLLM's `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) let a model-restricted
// key load adapters from any server path or unload another team's; SGLang's `lora_path` on
// the default routes picked any loaded adapter.
#[tokio::test(flavor = "multi_thread")]
async fn adapters_named_beside_an_allowed_model_are_refused() {
    let m = mock().await;
    let (gw, _d) = gateway(
        &m,
        "  - use: policy\n    allow: [ollama-inference, openai-inference, { path: '/v1/**', methods: [POST] }]\n",
    )
    .await;
    let c = client();
    for (path, body) in [
        (
            "/v1/load_lora_adapter",
            json!({"model": "llama3.1:8b", "lora_name": "x", "lora_path": "/srv/other-team/adapter"}),
        ),
        (
            "/v1/unload_lora_adapter",
            json!({"model": "llama3.1:8b", "LoRA_Name": "other-team"}),
        ),
        // LoRAX and TGI pick (and LoRAX loads) an adapter from a nested field.
        (
            "/v1/generate",
            json!({"model": "llama3.1:8b", "inputs": "x", "parameters": {"Adapter_Id": "org/any-lora", "adapter_source": "hub"}}),
        ),
    ] {
        let r = c
            .post(gw.url(path))
            .header("authorization", bearer(LLAMA_KEY))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path} {body}");
    }
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", bearer(LLAMA_KEY))
        .json(&json!({"model": "llama3.1:8b", "lora_path": "other-team", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(m.total(), 0);
}

// Attacker review (2026-12-05): llama.cpp's router reads `model` from the query on its GET
// routes (and loads it), and `autoload` on every route (against `--no-models-autoload`).
// A custom rule's route has its query's models judged; the built-in routes' query, which
// their APIs do not read, is not forwarded.
#[tokio::test(flavor = "multi_thread")]
async fn models_named_in_the_query_are_judged_and_built_in_routes_forward_no_query() {
    let m = mock().await;
    let (gw, _d) = gateway(
        &m,
        "  - use: policy\n    allow: [ollama-inference, openai-inference, { path: /props, methods: [GET] }]\n",
    )
    .await;
    let c = client();
    let get = |target: &'static str| {
        c.get(gw.url(target))
            .header("authorization", bearer(LLAMA_KEY))
            .send()
    };
    for target in [
        "/props?model=qwen2.5:7b&autoload=1",
        "/props?autoload=1&MODEL=qwen2%2E5:7b",
        "/props?model=llama3.1:8b&model=qwen2.5:7b",
        "/props?model=qwen2.5+7b",
    ] {
        assert_eq!(get(target).await.unwrap().status(), 403, "{target}");
    }
    for target in [
        "/props?model=%ff",
        "/props?%u006dodel=qwen2.5:7b",
        "/props?x=%4",
    ] {
        assert_eq!(get(target).await.unwrap().status(), 400, "{target}");
    }
    assert_eq!(m.total(), 0);
    let r = get("/props?model=llama3.1:8b&autoload=1").await.unwrap();
    assert_ne!(r.status(), 403);
    let seen = m.requests().pop().unwrap();
    assert_eq!(
        (seen.path.as_str(), seen.query.as_deref()),
        ("/props", Some("model=llama3.1:8b&autoload=1"))
    );
    let r = c
        .post(gw.url("/v1/chat/completions?autoload=true"))
        .header("authorization", bearer(LLAMA_KEY))
        .json(&json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = m.requests().pop().unwrap();
    assert_eq!(
        (seen.path.as_str(), seen.query),
        ("/v1/chat/completions", None)
    );
}

// Attacker review (2026-12-05, second): the gateway rewrites `Host` to the backend's, which
// defeats Ollama's own loopback `Host` check, so a page whose name an attacker points at
// 127.0.0.1 (DNS rebinding) was same-origin with an unauthenticated loopback gateway and
// could read its answers. A browser's request (it carries `Origin` or `Sec-Fetch-*`) naming a
// host that is not local is refused on a loopback listener, as Ollama refuses it; other
// clients (curl, SDKs) are not checked, unless the listener lists `allowed_hosts`.
#[tokio::test(flavor = "multi_thread")]
async fn a_browser_led_to_a_loopback_gateway_by_another_name_is_refused() {
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "{}filters: []\n",
        backends(&[("local", &m.url())])
    ))
    .await;
    let ask = |method: &str, path: &str, host: &str, extra: &str| {
        let body = if method == "POST" {
            r#"{"model":"llama3.1:8b","messages":[{"role":"user","content":"hi"}]}"#
        } else {
            ""
        };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n",
            body.len()
        );
        let port = gw.port;
        async move { send_raw(port, &head, body.as_bytes()).await }
    };
    let evil = format!("rebind.example:{}", gw.port);
    let fetch = "Sec-Fetch-Site: same-origin\r\nSec-Fetch-Mode: cors\r\n";
    let (code, _, body) = ask("GET", "/api/tags", &evil, fetch).await;
    assert_eq!(code, 403, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("allowed_hosts"),
        "{v}"
    );
    // A plain-HTTP page gets no Sec-Fetch-* and a same-origin GET no Origin: the browser's
    // User-Agent tells it.
    let firefox =
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0\r\n";
    assert_eq!(ask("GET", "/v1/models", &evil, firefox).await.0, 403);
    let origin = format!("Origin: http://{evil}\r\n");
    let (code, _, body) = ask("POST", "/v1/chat/completions", &evil, &origin).await;
    assert_eq!(code, 403, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "host_not_allowed", "{v}");
    assert_eq!(m.total(), 0, "nothing reached the backend");
    // Local names pass, from a browser too; so does a client that is not a browser, and the
    // health check.
    for host in [
        format!("localhost:{}", gw.port),
        format!("127.0.0.1:{}", gw.port),
        format!("[::1]:{}", gw.port),
        "gpu-box.local".to_string(),
    ] {
        assert_eq!(ask("GET", "/api/tags", &host, fetch).await.0, 200, "{host}");
    }
    assert_eq!(ask("GET", "/api/tags", &evil, "").await.0, 200);
    assert_eq!(ask("GET", "/health", &evil, fetch).await.0, 200);
    // The admin listener (its /metrics needs no token on loopback) likewise.
    let admin = |host: &str, extra: &str| {
        let head =
            format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n");
        let port = gw.admin_port;
        async move { send_raw(port, &head, b"").await.0 }
    };
    assert_eq!(admin("rebind.example", firefox).await, 403);
    assert_eq!(
        admin("rebind.example", "").await,
        200,
        "a scraper is not a browser"
    );
    assert_eq!(
        admin(&format!("127.0.0.1:{}", gw.admin_port), firefox).await,
        200
    );
    // Names the operator lists pass; with a list, every request's name is checked.
    let port = free_port();
    let listed = Gateway::start_raw(
        &format!(
            "listen:\n  - addr: 127.0.0.1:{port}\n    allowed_hosts: [gpu.example.com]\n{}filters: []\n",
            backends(&[("local", &m.url())])
        ),
        port,
    )
    .await;
    let get = |host: &str, extra: &str| {
        let head =
            format!("GET /api/tags HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n");
        async move { send_raw(port, &head, b"").await.0 }
    };
    assert_eq!(get("GPU.example.com", fetch).await, 200);
    assert_eq!(get(&format!("localhost:{port}"), fetch).await, 200);
    assert_eq!(get("rebind.example", "").await, 403);
    drop(listed);
}

// Attacker review (2026-12-05, second): vLLM, SGLang and llama.cpp's server fetch media a
// request gives by URL (or read it from a path), on the chat route and on routes a custom
// rule opens (the Responses API, SGLang's /generate): the model server became a proxy into
// its own network. Media must be carried in the request unless `media_urls: allow`.
#[tokio::test(flavor = "multi_thread")]
async fn media_by_reference_is_refused_on_every_route() {
    let m = mock().await;
    let (gw, _d) = gateway(
        &m,
        "  - use: policy\n    allow: [ollama-inference, openai-inference, { path: '/v1/**', methods: [POST] }, { path: /generate, methods: [POST] }]\n",
    )
    .await;
    let c = client();
    let post = |path: &str, body: Value| {
        c.post(gw.url(path))
            .header("authorization", bearer(USER_KEY))
            .json(&body)
            .send()
    };
    let metadata = "http://169.254.169.254/latest/meta-data/";
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": [{"type": "text", "text": "?"}, {"type": "image_url", "image_url": {"url": metadata}}]}]}),
        ),
        (
            "/v1/responses",
            json!({"model": "llama3.1:8b", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": metadata}]}]}),
        ),
        (
            "/generate",
            json!({"text": "describe", "image_data": [metadata]}),
        ),
        (
            "/generate",
            json!({"text": "describe", "image_data": "/etc/ssl/private/server.key"}),
        ),
    ] {
        let r = post(path, body.clone()).await.unwrap();
        assert_eq!(r.status(), 403, "{path} {body}");
        assert_eq!(
            error_of(r).await.0,
            "media_url_not_allowed",
            "{path} {body}"
        );
    }
    // A body Python reads and serde does not (a byte-order mark) cannot be checked.
    let r = c
        .post(gw.url("/generate"))
        .header("authorization", bearer(USER_KEY))
        .header("content-type", "application/json")
        .body(b"\xef\xbb\xbf{\"text\":\"x\",\"image_data\":\"http://10.0.0.1/\"}".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Nor UTF-16, which Python's reader detects.
    let utf16: Vec<u8> = "{\"text\":\"x\",\"image_data\":\"http://10.0.0.1/\"}"
        .encode_utf16()
        .flat_map(|u| u.to_be_bytes())
        .collect();
    let r = c
        .post(gw.url("/generate"))
        .header("authorization", bearer(USER_KEY))
        .header("content-type", "application/json")
        .body(utf16)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(m.total(), 0, "nothing reached the backend");
    // JSON that is read but is not an object is checked and passes.
    let r = post("/generate", json!([{"text": "x"}])).await.unwrap();
    assert!(![400, 403].contains(&r.status().as_u16()), "{}", r.status());
    let inline = "data:image/png;base64,aGk=";
    let r = post(
        "/v1/responses",
        json!({"model": "llama3.1:8b", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": inline}]}]}),
    )
    .await
    .unwrap();
    assert_ne!(r.status(), 403);
}

// Final review: llama.cpp's server answers Ollama's `/api/chat` too, but reads the body as
// OpenAI's (`n_predict`, `n_cmpl`, `lora`), none of which the gateway checks on Ollama's
// routes. Ollama's routes go to Ollama backends only.
#[tokio::test(flavor = "multi_thread")]
async fn ollama_routes_never_reach_an_openai_backend() {
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "backends:\n  - {{ name: llama, url: '{}', kind: openai }}\nfilters: []\n",
        m.url()
    ))
    .await;
    let r = client()
        .post(gw.url("/api/chat"))
        .json(&json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 50}, "n_predict": -1, "n_cmpl": 8}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    assert!(status == 404 || status == 503, "{status} {body}");
    assert_eq!(m.hits("/api/chat"), 0);
    // Its own wire format still goes through.
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

// Review: server settings were checked only on the inference routes the gateway parses; a
// custom rule's route (SGLang's `/generate`, vLLM's `/v1/responses`) passed them as sent, a
// serialized logit processor (code SGLang runs where enabled) included.
#[tokio::test(flavor = "multi_thread")]
async fn server_settings_are_refused_on_routes_of_custom_rules_too() {
    let m = mock().await;
    let (gw, _d) = gateway(
        &m,
        "  - use: policy\n    media_urls: allow\n    allow: [ollama-inference, openai-inference, { path: '/generate', methods: [POST] }, { path: '/v1/**', methods: [POST] }]\n",
    )
    .await;
    let c = client();
    let send = |path: &'static str, body: serde_json::Value| {
        c.post(gw.url(path))
            .header("authorization", bearer(USER_KEY))
            .json(&body)
            .send()
    };
    for (path, body, field) in [
        (
            "/generate",
            json!({"model": "llama3.1:8b", "text": "hi", "custom_logit_processor": "gASV..."}),
            "custom_logit_processor",
        ),
        (
            "/v1/responses",
            json!({"model": "llama3.1:8b", "input": "hi", "chat_template_kwargs": {"chat_template": "{{ x }}"}}),
            "chat_template_kwargs.chat_template",
        ),
        (
            "/v1/responses",
            json!({"model": "llama3.1:8b", "input": "hi", "Priority": -100}),
            "priority",
        ),
        // Read as `options.use_mmap` by Go's decoder (`ſ` folds to `s`).
        (
            "/generate",
            json!({"model": "llama3.1:8b", "options": {"u\u{17f}e_mmap": false}}),
            "options.u\u{17f}e_mmap",
        ),
    ] {
        let r = send(path, body).await.unwrap();
        assert_eq!(r.status(), 403, "{path} {field}");
        let (code, message) = error_of(r).await;
        assert_eq!(code, "server_setting_not_allowed");
        assert!(message.contains(field), "{message}");
    }
    // A body that cannot be read here (Python's reader takes `NaN`; a name twice is merged
    // by Go's), even with media URLs allowed: nothing in it was checked.
    for body in [
        r#"{"model":"llama3.1:8b","text":"x","custom_logit_processor":"gASV","temperature":NaN}"#,
        r#"{"model":"llama3.1:8b","options":{"num_ctx":8},"options":{"use_mmap":false}}"#,
    ] {
        let r = c
            .post(gw.url("/generate"))
            .header("authorization", bearer(USER_KEY))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(error_of(r).await.0, "invalid_request_body");
    }
    assert_eq!(m.total(), 0, "none reached the backend");
    // Without them, the same routes pass.
    let r = send(
        "/v1/responses",
        json!({"model": "llama3.1:8b", "input": "hi"}),
    )
    .await
    .unwrap();
    assert_ne!(r.status(), 403);
    assert_eq!(m.hits("/v1/responses"), 1);
    // Adapters are judged as adapters there (refused only to model-restricted callers): an
    // adapter-loading route opened to a caller who may use every model still works.
    let r = send(
        "/v1/load_lora_adapter",
        json!({"lora_name": "sql", "lora_path": "/adapters/sql"}),
    )
    .await
    .unwrap();
    assert_ne!(r.status(), 403);
}

// Review: a body with `Content-Encoding: gzip` was checked as the bytes it is (nothing in it
// read as JSON on a custom rule's route) and forwarded with its encoding, for any hop that
// decompresses bodies to act on. Refused now, before the body is read, on every route.
#[tokio::test(flavor = "multi_thread")]
async fn encoded_request_bodies_are_refused() {
    let m = mock().await;
    let (gw, _d) = gateway(
        &m,
        "  - use: policy\n    allow: [ollama-inference, openai-inference, { path: '/v1/**', methods: [POST] }]\n",
    )
    .await;
    for (path, shape_openai) in [
        ("/v1/responses", true),
        ("/v1/chat/completions", true),
        ("/api/chat", false),
    ] {
        let r = client()
            .post(gw.url(path))
            .header("authorization", bearer(USER_KEY))
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        let code = if shape_openai {
            &body["error"]["code"]
        } else {
            &body["code"]
        };
        assert_eq!(code, "unsupported_content_encoding", "{path}: {body}");
    }
    // A large one is answered, not reset: the refused body is drained as others are.
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", bearer(USER_KEY))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(vec![0u8; 1 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert_eq!(m.total(), 0);
    // A request without a body is not judged by a stray header.
    let r = client()
        .get(gw.url("/v1/models"))
        .header("authorization", bearer(USER_KEY))
        .header("content-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Attacker review (2026-12-05): a client that resets its connection while its refusal is on
/// its way made the refusal a backend failure (audit `failed:backend_unavailable`, status
/// 502, `llm_gateway_rejections_total{code="backend_unavailable"}`) and an ERROR log line
/// with its whole path, for every such request, without a key.
#[tokio::test]
async fn a_client_that_leaves_before_its_refusal_leaves_a_refusal_and_no_error() {
    use tokio::io::AsyncWriteExt;
    let m = mock().await;
    let logs = tempfile::tempdir().unwrap();
    let audit = logs.path().join("audit.jsonl");
    let (gw, _dir) = gateway(
        &m,
        &format!("  - use: audit\n    file: {}\n", audit.display()),
    )
    .await;
    let path = format!("/api/{}", "a".repeat(6000));
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
            .await
            .unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&[b'{'; 1000]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        // A reset, not a close: the refusal's write fails.
        s.set_zero_linger().unwrap();
        drop(s);
    }
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect();
        if lines.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        assert_eq!(l["status"], 401, "{l}");
        assert_eq!(l["decision"], "auth:invalid_api_key", "{l}");
    }
    assert_eq!(
        gw.metric("llm_gateway_rejections_total{code=\"backend_unavailable\",filter=\"gateway\"}")
            .await,
        None
    );
    assert!(!gw.log().contains("ERROR"), "{}", gw.log());
}

// Attacker review 2026-12-05: what a field-by-field cap missed. One message of many content
// parts (Ollama makes each a turn), alternatives a token (llama.cpp writes that many for every
// token), Ollama image generation (no tokens to cap). Refused before any backend sees them.
#[tokio::test(flavor = "multi_thread")]
async fn parts_logprobs_and_image_steps_are_bounded_before_the_backend() {
    let m = mock().await;
    let (gw, _d) = gateway(
        &m,
        "  - use: policy\n    max_messages: 5\n    max_output_tokens: 100\n",
    )
    .await;
    let c = client();
    let parts: Vec<Value> = (0..200)
        .map(|_| json!({"type": "text", "text": "a"}))
        .collect();
    let cases = [
        (
            "/v1/chat/completions",
            json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": parts}]}),
            "too_many_messages",
        ),
        (
            "/v1/completions",
            json!({"model": "llama3.1:8b", "prompt": "hi", "logprobs": 1000000}),
            "too_many_logprobs",
        ),
        (
            "/v1/completions",
            json!({"model": "llama3.1:8b", "prompt": "hi", "n_probs": 1000000}),
            "too_many_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 1000000}),
            "too_many_logprobs",
        ),
        (
            "/api/generate",
            json!({"model": "llama3.1:8b", "prompt": "a cat", "stream": false, "width": 16384, "height": 16384, "steps": 2147483647}),
            "image_too_large",
        ),
    ];
    for (path, body, code) in cases {
        let r = as_user(&c, &gw, path, &body).await;
        assert_eq!(r.status(), 400, "{path} {body}");
        assert_eq!(error_of(r).await.0, code, "{path}");
    }
    assert!(
        m.requests().iter().all(|r| r.path != "/v1/chat/completions"
            && r.path != "/v1/completions"
            && r.path != "/api/generate"),
        "a refused request reached the backend"
    );
    // Within the bounds, the same shapes pass.
    let r = as_user(
        &c,
        &gw,
        "/v1/completions",
        &json!({"model": "llama3.1:8b", "prompt": "hi", "logprobs": 5}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(last_body(&m, "/v1/completions")["logprobs"], 5);
}

// Billing review 2026-12-05: a whole answer past the usage parser's 1 MiB (an embeddings
// batch: the counts follow the vectors) lost its usage; tokens per minute kept the
// estimate, and 400,000 tokens of work passed a 100,000 limit. The counts are read as the
// answer streams past now, however large it is.
#[tokio::test(flavor = "multi_thread")]
async fn usage_after_a_large_answer_is_still_counted() {
    let m = mock().await;
    let (gw, _d) = gateway(
        &m,
        "  - use: ratelimit\n    key: api_key\n    tokens_per_minute: 100000\nlimits:\n  max_body: 2MiB\n",
    )
    .await;
    let c = client();
    let inputs: Vec<&str> = vec!["a"; 200_000];
    let embed = || {
        c.post(gw.url("/api/embed"))
            .header("authorization", bearer(USER_KEY))
            .json(&json!({"model": "nomic-embed-text", "input": inputs}))
            .send()
    };
    let r = embed().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert!(
        body.len() > 1 << 20,
        "the answer passes the parser's buffer"
    );
    let reported: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(reported["prompt_eval_count"], 200_000);
    // The 200,000 reported tokens were counted: the minute is spent.
    let r = embed().await.unwrap();
    assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
}
