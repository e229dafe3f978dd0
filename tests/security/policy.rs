//! The policy filter through the real binary: endpoint rules, scopes, models, shape, caps,
//! and canonical paths (with a property test of bypass attempts).

use crate::support::*;
use proptest::prelude::*;
use serde_json::json;

const ADMIN_KEY: &str = "sk-gw-admin";
const USER_KEY: &str = "sk-gw-user";
const LLAMA_KEY: &str = "sk-gw-llama-only";

/// A gateway whose keys file has an admin, a plain user and a llama-only user.
async fn gateway(m: &mock_ollama::MockServer, policy: &str) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let h = filter_auth::keygen::hash_key;
    std::fs::write(
        dir.path().join("keys.yaml"),
        format!(
            "keys:\n  - {{ id: admin, key_sha256: {}, scopes: [admin] }}\n  - {{ id: user, key_sha256: {} }}\n  - {{ id: llama, key_sha256: {}, models: ['llama3.1:*'] }}\n",
            h(ADMIN_KEY),
            h(USER_KEY),
            h(LLAMA_KEY)
        ),
    )
    .unwrap();
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n    brute_force: {{ max_failures: 0 }}\n{policy}",
        backends(&[("local", &m.url())]),
        dir.path().join("keys.yaml").display()
    ))
    .await;
    (gw, dir)
}

fn auth(key: &str) -> String {
    format!("Bearer {key}")
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_checks_admin_routes_denied_inference_allowed() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "").await; // no policy filter: the built-in default applies
    let c = client();
    let r = c
        .post(gw.url("/api/pull"))
        .header("authorization", auth(USER_KEY))
        .json(&json!({"model": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (code, msg) = error_of(r).await;
    assert_eq!(
        (code.as_str(), msg.as_str()),
        (
            "endpoint_not_allowed",
            "POST /api/pull is not allowed through this gateway"
        )
    );
    let r = c
        .get(gw.url("/v1/models"))
        .header("authorization", auth(USER_KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for (method, path) in [
        ("POST", "/api/push"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/copy"),
        ("POST", "/api/create"),
        ("POST", "/api/blobs/sha256:00"),
    ] {
        let r = c
            .request(method.parse().unwrap(), gw.url(path))
            .header("authorization", auth(USER_KEY))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{method} {path}");
    }
    assert_eq!(
        m.hits("/api/pull")
            + m.hits("/api/push")
            + m.hits("/api/delete")
            + m.hits("/api/copy")
            + m.hits("/api/create"),
        0
    );

    // The admin scope opens the admin preset, for admins only.
    let r = c
        .post(gw.url("/api/pull"))
        .header("authorization", auth(ADMIN_KEY))
        .json(&json!({"model": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .delete(gw.url("/api/delete"))
        .header("authorization", auth(ADMIN_KEY))
        .json(&json!({"model": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!((m.hits("/api/pull"), m.hits("/api/delete")), (1, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_method_unknown_route_and_content_type() {
    let m = mock().await;
    let (gw, _d) = gateway(
        &m,
        "  - use: policy\n    allow: [ollama-inference, openai-inference]\n",
    )
    .await;
    let c = client();
    let r = c
        .get(gw.url("/api/chat"))
        .header("authorization", auth(USER_KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let r = c
        .get(gw.url("/secret"))
        .header("authorization", auth(USER_KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .post(gw.url("/api/chat"))
        .header("authorization", auth(USER_KEY))
        .header("content-type", "text/plain")
        .body(r#"{"model":"llama3.1:8b"}"#)
        .send()
        .await
        .unwrap();
    // An API key in a header cannot be sent cross-site without a preflight: no 415 for it
    // (basic auth, which a browser replays by itself, still gets one: tests/security.rs).
    assert_eq!(r.status(), 200);
    let r = c
        .post(gw.url("/api/chat"))
        .header("authorization", auth(USER_KEY))
        .json(&json!({"model": "llama3.1:8b", "messages": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_of(r).await.0, "invalid_messages");
    assert_eq!(
        m.total(),
        1,
        "only the header-authenticated text/plain request"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn models_are_limited_per_key_and_lists_are_filtered() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "").await;
    let c = client();
    let chat = |model: &str| json!({"model": model, "stream": false, "messages": [{"role": "user", "content": "hi"}]});
    let r = c
        .post(gw.url("/api/chat"))
        .header("authorization", auth(LLAMA_KEY))
        .json(&chat("qwen2.5:7b"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (code, msg) = error_of(r).await;
    assert_eq!(code, "model_not_allowed");
    assert!(msg.contains("\"qwen2.5:7b\""), "{msg}");
    assert_eq!(m.total(), 0);
    let r = c
        .post(gw.url("/api/chat"))
        .header("authorization", auth(LLAMA_KEY))
        .json(&chat("llama3.1:8b"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let tags: serde_json::Value = c
        .get(gw.url("/api/tags"))
        .header("authorization", auth(LLAMA_KEY))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["llama3.1:8b"]);
    let models: serde_json::Value = c
        .get(gw.url("/v1/models"))
        .header("authorization", auth(LLAMA_KEY))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["llama3.1:8b"]);
    assert_eq!(models["object"], "list");
    // An unrestricted key sees the whole list.
    let models: serde_json::Value = c
        .get(gw.url("/v1/models"))
        .header("authorization", auth(USER_KEY))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn global_model_list_and_output_cap_reach_the_backend() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "  - use: policy\n    models: ['llama3.1:8b']\n    max_output_tokens: 3\n    max_messages: 4\n").await;
    let c = client();
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", auth(USER_KEY))
        .json(&json!({"model": "qwen2.5:7b", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // The mock generates min(5, cap) tokens: the clamped cap is what it received.
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", auth(USER_KEY))
        .json(&json!({"model": "llama3.1:8b", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3);
    // No cap asked: the gateway adds one (Ollama's num_predict).
    let r = c
        .post(gw.url("/api/generate"))
        .header("authorization", auth(USER_KEY))
        .json(&json!({"model": "llama3.1:8b", "prompt": "hi", "stream": false}))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["eval_count"], 3);
    let seen = m.requests();
    assert!(seen.iter().all(|r| r.body_len > 0));
    let msgs: Vec<serde_json::Value> = (0..5)
        .map(|_| json!({"role": "user", "content": "x"}))
        .collect();
    let r = c
        .post(gw.url("/api/chat"))
        .header("authorization", auth(USER_KEY))
        .json(&json!({"model": "llama3.1:8b", "messages": msgs}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_of(r).await.0, "too_many_messages");
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_none_is_explicit_and_reported() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "policy: none\n").await;
    let r = client()
        .post(gw.url("/api/pull"))
        .header("authorization", auth(USER_KEY))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "with policy: none admin routes are open");
    assert!(
        gw.log().contains("policy: none"),
        "a warning at start:\n{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn canonical_paths_reach_the_backend_and_tricks_do_not() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "").await;
    let u = auth(USER_KEY);
    let h = [
        ("authorization", u.as_str()),
        ("content-type", "application/json"),
    ];
    let body = r#"{"model":"llama3.1:8b","stream":false,"messages":[]}"#;
    for variant in [
        "/api//chat",
        "/api/chat/",
        "/api/./chat",
        "/api/x/../chat",
        "/api/%63hat",
        "/%61pi/chat",
        "//api/chat",
    ] {
        let (status, _) = raw_request(gw.port, "POST", variant, &h, body).await;
        assert_eq!(status, 200, "{variant}");
    }
    assert!(
        m.requests().iter().all(|r| r.path == "/api/chat"),
        "only the canonical form goes upstream"
    );
    for (variant, want) in [
        ("/api/pull", 403),
        ("/api//pull", 403),
        ("/api/%70ull", 403),
        ("/api/x/../pull", 403),
        ("/api/chat/../pull", 403),
        ("/API/PULL", 403),
        ("/api%2Fpull", 400),
        ("/api/pull;x", 400),
        ("/api\\pull", 400),
        ("/../api/pull", 400),
        ("/api/pu%00ll", 400),
        ("http://127.0.0.1/api/pull", 400),
    ] {
        let (status, _) = raw_request(gw.port, "POST", variant, &h, "{}").await;
        assert_eq!(status, want, "{variant}");
    }
    assert_eq!(m.hits("/api/pull"), 0);
}

/// One way of writing a path segment that a naive matcher would not recognise.
fn disguise(segment: &'static str) -> impl Strategy<Value = String> {
    let chars: Vec<char> = segment.chars().collect();
    (proptest::collection::vec(0u8..4, chars.len()), 0u8..6).prop_map(move |(codes, prefix)| {
        let mut s = String::new();
        match prefix {
            1 => s.push_str("./"),
            2 => s.push_str("zz/../"),
            3 => s.push_str("%2e/"),
            4 => s.push_str("zz/%2E%2E/"),
            _ => {}
        }
        for (c, code) in chars.iter().zip(codes) {
            match code {
                1 => s.push_str(&format!("%{:02x}", *c as u32)),
                2 => s.push_str(&format!("%{:02X}", *c as u32)),
                _ => s.push(*c),
            }
        }
        s
    })
}

fn slashes() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("/"), Just("//"), Just("///"), Just("/./")]
}

fn tricky_path(first: &'static str, second: &'static str) -> impl Strategy<Value = String> {
    (
        slashes(),
        disguise(first),
        slashes(),
        disguise(second),
        prop_oneof![Just(""), Just("/"), Just("//"), Just("/.")],
    )
        .prop_map(|(s1, a, s2, b, tail)| format!("{s1}{a}{s2}{b}{tail}"))
}

#[test]
fn property_no_disguised_admin_route_reaches_the_backend() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (m, gw, _d) = rt.block_on(async {
        let m = mock().await;
        let (gw, d) = gateway(&m, "").await;
        (m, gw, d)
    });
    let key = auth(USER_KEY);
    let admin = prop_oneof![
        tricky_path("api", "pull"),
        tricky_path("api", "push"),
        tricky_path("api", "delete"),
        tricky_path("api", "copy"),
        tricky_path("api", "create"),
    ];
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 200,
        ..ProptestConfig::default()
    });
    runner
        .run(
            &(
                admin,
                prop_oneof![Just("POST"), Just("DELETE"), Just("GET")],
            ),
            |(path, method)| {
                let (status, _) = rt.block_on(raw_request(
                    gw.port,
                    method,
                    &path,
                    &[
                        ("authorization", &key),
                        ("content-type", "application/json"),
                    ],
                    "{}",
                ));
                prop_assert!(
                    matches!(status, 400 | 403 | 405),
                    "{method} {path} got {status}"
                );
                Ok(())
            },
        )
        .unwrap();
    let admin_hits: u64 = [
        "/api/pull",
        "/api/push",
        "/api/delete",
        "/api/copy",
        "/api/create",
    ]
    .iter()
    .map(|p| m.hits(p))
    .sum();
    assert_eq!(admin_hits, 0);
    assert_eq!(
        m.total(),
        0,
        "nothing at all reached the backend: {:?}",
        m.requests().iter().map(|r| &r.path).collect::<Vec<_>>()
    );

    // Meaning-preserving variants of inference routes still work and arrive canonical.
    let body = r#"{"model":"llama3.1:8b","stream":false,"prompt":"hi","messages":[]}"#;
    let inference = prop_oneof![tricky_path("api", "chat"), tricky_path("api", "generate")];
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 100,
        ..ProptestConfig::default()
    });
    runner
        .run(&inference, |path| {
            let (status, text) = rt.block_on(raw_request(
                gw.port,
                "POST",
                &path,
                &[
                    ("authorization", &key),
                    ("content-type", "application/json"),
                ],
                body,
            ));
            prop_assert_eq!(status, 200, "{} → {}", path, text);
            Ok(())
        })
        .unwrap();
    assert!(m
        .requests()
        .iter()
        .all(|r| r.path == "/api/chat" || r.path == "/api/generate"));
    drop(gw);
}

#[tokio::test(flavor = "multi_thread")]
async fn shape_limits_stop_requests_before_the_backend() {
    let m = mock().await;
    let (gw, _d) = gateway(&m, "  - use: policy\n    max_prompt_chars: 20\n    max_headers: 20\n    max_header_bytes: 2KiB\n").await;
    let c = client();
    let key = auth(USER_KEY);
    let r = c
        .post(gw.url("/api/generate"))
        .header("authorization", &key)
        .json(&json!({"model": "llama3.1:8b", "prompt": "x".repeat(21), "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_of(r).await.0, "prompt_too_long");
    // Prompt text the gateway is not shown as `content` counts too (attacker review): token
    // ids (four characters each), a part's text beside `content: null`, tool call arguments.
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": "llama3.1:8b", "prompt": [[1, 2, 3, 4, 5, 6]]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": [{"type": "text", "content": null, "text": "x".repeat(21)}]}]}),
        ),
        (
            "/api/chat",
            json!({"model": "llama3.1:8b", "stream": false, "messages": [{"role": "assistant", "content": "",
                "tool_calls": [{"function": {"name": "f", "arguments": {"q": "x".repeat(20)}}}]}]}),
        ),
    ] {
        let r = c
            .post(gw.url(path))
            .header("authorization", &key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path} {body}");
        assert_eq!(error_of(r).await.0, "prompt_too_long", "{path} {body}");
    }
    let mut req = c.get(gw.url("/v1/models")).header("authorization", &key);
    for i in 0..25 {
        req = req.header(format!("x-extra-{i}"), "v");
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(error_of(r).await.0, "request_header_fields_too_large");
    let r = c
        .get(gw.url("/v1/models"))
        .header("authorization", &key)
        .header("x-big", "b".repeat(3000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(m.total(), 0, "none of them reached the backend");
    let r = c
        .post(gw.url("/api/generate"))
        .header("authorization", &key)
        .json(&json!({"model": "llama3.1:8b", "prompt": "x".repeat(20), "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "at the limit passes");
}
