use super::*;
use gateway_filter::Principal;
use serde_json::json;

fn filter(options: serde_json::Value) -> Arc<dyn Filter> {
    build(&options, &BuildContext::default()).unwrap()
}

fn req(method: Method, path: &str, body: Option<serde_json::Value>) -> RequestCtx {
    let mut c = RequestCtx::new(String::new(), method, path.into());
    c.headers
        .insert("content-type", "application/json".parse().unwrap());
    if let Some(b) = body {
        c.model = b.get("model").and_then(|m| m.as_str()).map(str::to_string);
        c.max_tokens = b.get("max_tokens").and_then(|m| m.as_u64());
        c.json = Some(b);
    }
    c
}

fn principal(scopes: &[&str], models: &[&str]) -> Option<Arc<Principal>> {
    Some(Arc::new(Principal {
        id: "p".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        models: models.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }))
}

#[tokio::test]
async fn default_rules_allow_inference_and_keep_admin_for_admins() {
    let f = filter(json!({}));
    let mut c = req(
        Method::POST,
        "/api/chat",
        Some(json!({"model": "m", "messages": []})),
    );
    f.on_request(&mut c).await.unwrap();
    let mut c = req(Method::GET, "/v1/models", None);
    f.on_request(&mut c).await.unwrap();
    let mut c = req(Method::POST, "/api/pull", None);
    let r = f.on_request(&mut c).await.unwrap_err();
    assert_eq!((r.status.as_u16(), r.code), (403, "endpoint_not_allowed"));
    assert_eq!(
        r.message,
        "POST /api/pull is not allowed through this gateway"
    );
    let mut c = req(Method::POST, "/api/pull", None);
    c.principal = principal(&["admin"], &[]);
    f.on_request(&mut c).await.unwrap();
    let mut c = req(Method::DELETE, "/api/delete", None);
    c.principal = principal(&["ops"], &[]);
    assert_eq!(f.on_request(&mut c).await.unwrap_err().status, 403);
}

#[tokio::test]
async fn wrong_method_gets_405_with_allow() {
    let f = filter(
        json!({"allow": ["ollama-inference", {"path": "/custom/*", "methods": ["get", "PUT"]}]}),
    );
    let mut c = req(Method::GET, "/api/chat", None);
    let r = f.on_request(&mut c).await.unwrap_err();
    assert_eq!(r.status, 405);
    assert_eq!(
        r.headers[0],
        (header::ALLOW, HeaderValue::from_static("POST"))
    );
    let mut c = req(Method::DELETE, "/custom/x", None);
    let r = f.on_request(&mut c).await.unwrap_err();
    assert_eq!(r.headers[0].1, "GET, PUT");
    let mut c = req(Method::PUT, "/custom/x", None);
    f.on_request(&mut c).await.unwrap();
    let mut c = req(Method::POST, "/v1/chat/completions", None);
    assert_eq!(
        f.on_request(&mut c).await.unwrap_err().status,
        403,
        "openai preset not listed"
    );
}

#[tokio::test]
async fn models_global_and_per_principal() {
    let f = filter(json!({"models": ["llama3.1:*", "qwen2.5:7b"]}));
    let chat = |model: &str| {
        req(
            Method::POST,
            "/v1/chat/completions",
            Some(json!({"model": model, "messages": []})),
        )
    };
    f.on_request(&mut chat("llama3.1:8b")).await.unwrap();
    let mut c = chat("mistral:7b");
    let r = f.on_request(&mut c).await.unwrap_err();
    assert_eq!((r.status.as_u16(), r.code), (403, "model_not_allowed"));
    assert!(r.message.contains("\"mistral:7b\""));
    let mut c = chat("qwen2.5:7b");
    c.principal = principal(&[], &["llama*"]);
    assert_eq!(
        f.on_request(&mut c).await.unwrap_err().code,
        "model_not_allowed"
    );
    // Model lists get a gate only when something restricts them.
    let mut c = req(Method::GET, "/api/tags", None);
    f.on_request(&mut c).await.unwrap();
    let gate = c.model_gate.clone().unwrap();
    assert!(gate.allows("llama3.1:8b") && !gate.allows("nomic-embed-text:latest"));
    let open = filter(json!({}));
    let mut c = req(Method::GET, "/api/tags", None);
    open.on_request(&mut c).await.unwrap();
    assert!(c.model_gate.is_none());
}

#[tokio::test]
async fn shape_limits() {
    let f = filter(
        json!({"max_messages": 2, "max_prompt_chars": 10, "max_output_tokens": 100, "max_headers": 5}),
    );
    let mut c = req(
        Method::POST,
        "/api/chat",
        Some(
            json!({"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "user", "content": "c"}]}),
        ),
    );
    assert_eq!(
        f.on_request(&mut c).await.unwrap_err().code,
        "too_many_messages"
    );
    let mut c = req(
        Method::POST,
        "/api/generate",
        Some(json!({"model": "m", "prompt": "12345678901"})),
    );
    assert_eq!(
        f.on_request(&mut c).await.unwrap_err().code,
        "prompt_too_long"
    );
    // One OpenAI message of three text parts is three messages to Ollama's OpenAI layer.
    let parts = json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}, {"type": "text", "text": "c"}]);
    let mut c = req(
        Method::POST,
        "/v1/chat/completions",
        Some(json!({"model": "m", "messages": [{"role": "user", "content": parts}]})),
    );
    let r = f.on_request(&mut c).await.unwrap_err();
    assert_eq!(r.code, "too_many_messages");
    assert!(r.message.contains("3 messages"), "{}", r.message);
    let two = json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]);
    let mut c = req(
        Method::POST,
        "/v1/chat/completions",
        Some(json!({"model": "m", "messages": [{"role": "user", "content": two}]})),
    );
    f.on_request(&mut c).await.unwrap();
    // Alternatives a token: at most 20, in every field, spelling and number form.
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [], "logprobs": true, "top_logprobs": 21}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "a", "logprobs": 1000000}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "a", "n_probs": 1e6}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "a", "prompt_logprobs": "50"}),
        ),
        (
            "/api/generate",
            json!({"model": "m", "prompt": "a", "logprobs": true, "Top_Logprobs": 100}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [], "top_logprobs_num": 21}),
        ),
    ] {
        let mut c = req(Method::POST, path, Some(body.clone()));
        let r = f.on_request(&mut c).await.unwrap_err();
        assert_eq!(
            (r.status.as_u16(), r.code),
            (400, "too_many_logprobs"),
            "{body}"
        );
    }
    // A number below -1 wraps to a large one in llama.cpp's 32-bit read (review).
    for body in [
        json!({"model": "m", "messages": [], "n_probs": -4294817296i64}),
        json!({"model": "m", "messages": [], "logprobs": true, "top_logprobs": -4294967196i64}),
    ] {
        let mut c = req(Method::POST, "/v1/chat/completions", Some(body.clone()));
        let r = f.on_request(&mut c).await.unwrap_err();
        assert_eq!(r.code, "too_many_logprobs", "{body}");
    }
    // A custom rule's route that reads the same fields is held to the same (llama.cpp's
    // `/completion`, a message list on `/v1/messages`).
    let custom = filter(
        json!({"allow": [{"path": "/completion", "methods": ["POST"]}, {"path": "/v1/messages", "methods": ["POST"]}], "max_messages": 2}),
    );
    for (path, body, code) in [
        (
            "/completion",
            json!({"prompt": "hi", "n_probs": 100000}),
            "too_many_logprobs",
        ),
        (
            "/v1/messages",
            json!({"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "user", "content": "c"}]}),
            "too_many_messages",
        ),
    ] {
        let mut c = req(Method::POST, path, Some(body.clone()));
        c.unknown_format = true;
        let r = custom.on_request(&mut c).await.unwrap_err();
        assert_eq!(r.code, code, "{path} {body}");
    }
    let mut c = req(
        Method::POST,
        "/completion",
        Some(json!({"prompt": "hi", "n_probs": 5})),
    );
    c.unknown_format = true;
    custom.on_request(&mut c).await.unwrap();
    // Review: the Responses API carries its turns in `input` (a custom rule's
    // `/v1/responses`); an embedding's `input` of strings is not turns.
    let responses = filter(
        json!({"allow": [{"path": "/v1/responses", "methods": ["POST"]}, "openai-inference"], "max_messages": 2}),
    );
    let mut c = req(
        Method::POST,
        "/v1/responses",
        Some(
            json!({"model": "m", "input": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "user", "content": "c"}]}),
        ),
    );
    c.unknown_format = true;
    assert_eq!(
        responses.on_request(&mut c).await.unwrap_err().code,
        "too_many_messages"
    );
    let mut c = req(
        Method::POST,
        "/v1/embeddings",
        Some(json!({"model": "m", "input": ["a", "b", "c", "d"]})),
    );
    responses.on_request(&mut c).await.unwrap();
    // Ollama image generation: steps and sides bounded (the output cap counts no tokens there).
    for body in [
        json!({"model": "m", "prompt": "a cat", "steps": 2147483647}),
        json!({"model": "m", "prompt": "a cat", "Width": 16384}),
        json!({"model": "m", "prompt": "a cat", "height": 4097.0}),
    ] {
        let mut c = req(Method::POST, "/api/generate", Some(body.clone()));
        let r = f.on_request(&mut c).await.unwrap_err();
        assert_eq!(
            (r.status.as_u16(), r.code),
            (400, "image_too_large"),
            "{body}"
        );
    }
    let mut c = req(
        Method::POST,
        "/api/generate",
        Some(json!({"model": "m", "prompt": "a", "width": 1024, "height": 768, "steps": 30})),
    );
    f.on_request(&mut c).await.unwrap();
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [], "logprobs": true, "top_logprobs": 20}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "a", "logprobs": 5, "n_probs": 0}),
        ),
        (
            "/api/chat",
            json!({"model": "m", "messages": [], "logprobs": false}),
        ),
    ] {
        let mut c = req(Method::POST, path, Some(body.clone()));
        f.on_request(&mut c)
            .await
            .unwrap_or_else(|r| panic!("{body}: {}", r.message));
    }
    // Review: what a server reads as a number is refused as one (pydantic reads "1_000" as
    // 1000; what this does not read as a number is refused, not passed), and SGLang's list
    // (one per prompt) by its largest.
    for body in [
        json!({"model": "m", "messages": [], "logprobs": true, "top_logprobs": "1_000"}),
        json!({"model": "m", "messages": [], "logprobs": true, "top_logprobs": "nan"}),
        json!({"model": "m", "messages": [], "logprobs": true, "top_logprobs": "2e4x"}),
        json!({"model": "m", "messages": [], "top_logprobs_num": [1, 100000]}),
        json!({"model": "m", "messages": [], "top_logprobs_num": {"n": 1}}),
    ] {
        let mut c = req(Method::POST, "/v1/chat/completions", Some(body.clone()));
        let r = f.on_request(&mut c).await.unwrap_err();
        assert_eq!(r.code, "too_many_logprobs", "{body}");
    }
    for body in [
        json!({"model": "m", "messages": [], "logprobs": true, "top_logprobs": " 2_0 "}),
        json!({"model": "m", "messages": [], "top_logprobs_num": [1, 20], "logprobs": null}),
    ] {
        let mut c = req(Method::POST, "/v1/chat/completions", Some(body.clone()));
        f.on_request(&mut c)
            .await
            .unwrap_or_else(|r| panic!("{body}: {}", r.message));
    }
    // The bounds are the operator's to set: tighter, or wider.
    let tight = filter(json!({"max_logprobs": 5, "max_image_side": 1024, "max_image_steps": 20}));
    let wide = filter(json!({"max_logprobs": 100, "max_image_side": 8192, "max_image_steps": 200}));
    for (body, code) in [
        (
            json!({"model": "m", "prompt": "a", "n_probs": 6}),
            "too_many_logprobs",
        ),
        (
            json!({"model": "m", "prompt": "a", "width": 1025}),
            "image_too_large",
        ),
        (
            json!({"model": "m", "prompt": "a", "Steps": "21"}),
            "image_too_large",
        ),
    ] {
        let mut c = req(Method::POST, "/api/generate", Some(body.clone()));
        let r = tight.on_request(&mut c).await.unwrap_err();
        assert_eq!(r.code, code, "{body}");
        let mut c = req(Method::POST, "/api/generate", Some(body.clone()));
        wide.on_request(&mut c)
            .await
            .unwrap_or_else(|r| panic!("{body}: {}", r.message));
    }
    let mut c = req(
        Method::POST,
        "/v1/chat/completions",
        Some(json!({"model": "m", "messages": [], "logprobs": true, "top_logprobs": 101})),
    );
    assert_eq!(
        wide.on_request(&mut c).await.unwrap_err().message,
        "`top_logprobs` asks for more than 100 alternatives a token (or a negative number below -1); from -1 to 100 are accepted"
    );
    for key in ["max_image_side", "max_image_steps"] {
        let e = build(&json!({ key: 0 }), &BuildContext::default())
            .err()
            .unwrap();
        assert!(e.to_string().contains(key), "{e}");
    }
    let mut c = req(
        Method::POST,
        "/v1/chat/completions",
        Some(json!({"model": "m", "messages": [], "max_tokens": 500})),
    );
    f.on_request(&mut c).await.unwrap();
    assert_eq!(
        (
            c.max_tokens,
            c.json.as_ref().unwrap()["max_tokens"].as_u64()
        ),
        (Some(100), Some(100))
    );
    let mut c = req(Method::POST, "/api/chat", Some(json!({"model": "m"})));
    c.headers
        .insert("content-type", "text/plain".parse().unwrap());
    let r = f.on_request(&mut c).await.unwrap_err();
    assert_eq!((r.status.as_u16(), r.code), (415, "unsupported_media_type"));
    let mut c = req(Method::POST, "/api/chat", Some(json!({"model": "m"})));
    c.headers.insert(
        "content-type",
        "Application/JSON; charset=utf-8".parse().unwrap(),
    );
    f.on_request(&mut c).await.unwrap();
    let mut c = req(Method::GET, "/v1/models", None);
    for i in 0..6 {
        c.headers.insert(
            gateway_filter::http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
            "v".parse().unwrap(),
        );
    }
    assert_eq!(f.on_request(&mut c).await.unwrap_err().status, 431);
}

#[test]
fn option_errors() {
    let e = build(
        &json!({"allow": ["ollama-everything"]}),
        &BuildContext::default(),
    )
    .err()
    .unwrap();
    assert_eq!(e.path, "allow[0]");
    assert!(
        e.message
            .contains("presets: openai-inference, ollama-inference, ollama-admin"),
        "{e}"
    );
    let e = build(
        &json!({"allow": [{"path": "/x"}]}),
        &BuildContext::default(),
    )
    .err()
    .unwrap();
    assert_eq!(e.path, "allow[0].methods");
    let e = build(
        &json!({"allow": [{"path": "x", "methods": ["GET"]}]}),
        &BuildContext::default(),
    )
    .err()
    .unwrap();
    assert_eq!(e.path, "allow[0].path");
    // What an operator gets wrong is named with its fix.
    let err = |o: serde_json::Value| build(&o, &BuildContext::default()).err().unwrap();
    let e = err(json!({"allow": [{"path": "/api/show", "method": ["POST"]}]}));
    assert_eq!(e.path, "allow[0]");
    assert!(e.message.contains("unknown field `method`"), "{e}");
    assert!(e.message.contains("methods: [GET, POST]"), "{e}");
    let e = err(json!({"allow": [{"path": "/api/tags", "methods": ["GTE"]}]}));
    assert_eq!(e.path, "allow[0].methods");
    assert!(e.message.contains("\"GTE\" is not an HTTP method"), "{e}");
    let e = err(json!({"allow": []}));
    assert_eq!(e.path, "allow");
    assert!(e.message.contains("allows nothing"), "{e}");
    let e = err(json!({"allow": [3]}));
    assert_eq!(e.path, "allow[0]");
    for key in [
        "max_prompt_chars",
        "max_messages",
        "max_headers",
        "max_header_bytes",
    ] {
        let e = err(json!({ key: 0 }));
        assert_eq!(e.path, key);
        assert!(e.message.contains("at least 1"), "{e}");
    }
    // Methods in any case still pass.
    assert!(build(
        &json!({"allow": [{"path": "/api/tags", "methods": ["get", "Post"]}]}),
        &BuildContext::default()
    )
    .is_ok());
    let e = build(
        &json!({"max_prompt_chars": "lots"}),
        &BuildContext::default(),
    )
    .err()
    .unwrap();
    assert_eq!(e.path, "max_prompt_chars");
    let e = build(
        &json!({"over_output_cap": "truncate"}),
        &BuildContext::default(),
    )
    .err()
    .unwrap();
    assert_eq!(e.path, "over_output_cap");
}

#[tokio::test]
async fn requests_do_not_set_how_the_server_loads_keeps_or_formats_models() {
    let f = filter(json!({}));
    let refused = [
        (
            "/api/embed",
            json!({"model": "m", "input": [], "options": {"num_batch": 511}}),
        ),
        (
            "/api/chat",
            json!({"model": "m", "messages": [], "options": {"num_gpu": 0}}),
        ),
        (
            "/api/generate",
            json!({"model": "m", "options": {"use_mmap": false}}),
        ),
        (
            "/api/embeddings",
            json!({"model": "m", "prompt": "x", "options": {"num_thread": 1}}),
        ),
        (
            "/api/generate",
            json!({"model": "m", "prompt": "x", "template": "{{define \"a\"}}{{.Prompt}}{{.Prompt}}{{end}}{{template \"a\" .}}"}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [], "chat_template": "{% for x in range(9) %}{% endfor %}"}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [], "options": {"main_gpu": 1}}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [], "priority": -100}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [], "mm_processor_kwargs": {"max_pixels": 99999999}}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "x", "lora": [{"id": 0, "scale": 4.0}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [], "media_io_kwargs": {"video": {"num_frames": 100000}}}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "x", "kv_transfer_params": {"remote_host": "10.0.0.9", "remote_port": 7000}}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [], "custom_logit_processor": "gASV..."}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [], "logits_processors": [{"qualname": "pkg.Proc"}]}),
        ),
        // SGLang's newer names for the data-parallel rank.
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [], "routed_dp_rank": 1}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "x", "disagg_prefill_dp_rank": 0}),
        ),
        // vLLM before 0.11 and SGLang merge these over their own template arguments.
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [], "chat_template_kwargs": {"chat_template": "{% for a in range(99999) %}x{% endfor %}"}}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "m", "input": "x", "chat_template_kwargs": {"enable_thinking": false, "chat_template": "x"}}),
        ),
    ];
    for (path, body) in &refused {
        let mut c = req(Method::POST, path, Some(body.clone()));
        let r = f.on_request(&mut c).await.unwrap_err();
        assert_eq!(
            (r.status.as_u16(), r.code),
            (403, "server_setting_not_allowed"),
            "{path} {body}"
        );
    }
    // Sampling options, the context window (bounded by max_context_tokens) and nulls (the
    // server's defaults) pass.
    for (path, body) in [
        (
            "/api/chat",
            json!({"model": "m", "messages": [], "options": {"temperature": 0.1, "num_ctx": 4096, "seed": 1, "num_gpu": null}, "keep_alive": null}),
        ),
        (
            "/api/generate",
            json!({"model": "m", "prompt": "x", "template": null, "raw": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [], "chat_template_kwargs": {"enable_thinking": false}}),
        ),
    ] {
        let mut c = req(Method::POST, path, Some(body.clone()));
        f.on_request(&mut c).await.unwrap();
    }
    // `keep_alive` is removed (the server's own setting applies), not refused.
    for (path, body) in [
        (
            "/api/generate",
            json!({"model": "m", "prompt": "", "keep_alive": 0}),
        ),
        (
            "/api/chat",
            json!({"model": "m", "messages": [], "keep_alive": "-1m"}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "x", "keep_alive": 1800}),
        ),
    ] {
        let mut c = req(Method::POST, path, Some(body.clone()));
        f.on_request(&mut c).await.unwrap();
        let sent = c.json.as_ref().unwrap();
        assert!(sent.get("keep_alive").is_none(), "{path} {body}: {sent}");
        assert!(c.body_rewritten);
    }
    // An operator who lets requests choose says so.
    let f = filter(json!({"server_settings": "allow"}));
    for (path, body) in refused {
        let mut c = req(Method::POST, path, Some(body.clone()));
        f.on_request(&mut c).await.unwrap();
    }
    let mut c = req(
        Method::POST,
        "/api/chat",
        Some(json!({"model": "m", "messages": [], "keep_alive": 0})),
    );
    f.on_request(&mut c).await.unwrap();
    assert_eq!(c.json.as_ref().unwrap()["keep_alive"], 0);
    assert!(build(
        &json!({"server_settings": "sometimes"}),
        &BuildContext::default()
    )
    .is_err());
}

#[tokio::test]
async fn one_context_window_for_every_ollama_request() {
    let f = filter(json!({"context_tokens": 8192}));
    for body in [
        json!({"model": "m", "messages": []}),
        json!({"model": "m", "messages": [], "options": {"num_ctx": 2048}}),
        json!({"model": "m", "messages": [], "options": {"num_ctx": "131072", "temperature": 0.1}}),
    ] {
        let mut c = req(Method::POST, "/api/chat", Some(body.clone()));
        f.on_request(&mut c).await.unwrap();
        let sent = c.json.as_ref().unwrap();
        assert_eq!(sent["options"]["num_ctx"], 8192, "{body}");
        assert!(c.body_rewritten);
    }
    let mut c = req(
        Method::POST,
        "/api/embed",
        Some(json!({"model": "m", "input": "x", "options": {"num_ctx": 8192}})),
    );
    f.on_request(&mut c).await.unwrap();
    assert!(!c.body_rewritten, "already that window: untouched");
    let mut c = req(
        Method::POST,
        "/api/chat",
        Some(json!({"model": "m", "messages": [], "options": {"num_ctx": 1.5}})),
    );
    let r = f.on_request(&mut c).await.unwrap_err();
    assert_eq!(r.code, "invalid_options");
    // OpenAI-format bodies carry no context window.
    let mut c = req(
        Method::POST,
        "/v1/chat/completions",
        Some(json!({"model": "m", "messages": []})),
    );
    f.on_request(&mut c).await.unwrap();
    assert!(c.json.as_ref().unwrap().get("options").is_none());
    let e = build(
        &json!({"context_tokens": 8192, "max_context_tokens": 4096}),
        &BuildContext::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("context_tokens"), "{e}");
}

/// Attacker review (2026-12-05, second): vLLM, SGLang and llama.cpp's server fetch media given
/// by URL, so a client could make the model server request addresses on its own network.
#[tokio::test]
async fn media_is_carried_in_the_request_not_fetched_by_the_server() {
    let f = filter(json!({}));
    let chat = |part: serde_json::Value| json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this"}, part]}]});
    for (path, body) in [
        (
            "/v1/chat/completions",
            chat(
                json!({"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data/"}}),
            ),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"type": "image_url", "image_url": "https://10.0.0.5/admin"})),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"type": "video_url", "video_url": {"url": "file:///etc/passwd"}})),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"type": "audio_url", "audio_url": {"url": " HTTP://localhost:8000/x"}})),
        ),
        (
            "/v1/embeddings",
            json!({"model": "m", "input": "x", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://10.0.0.1/"}}]}]}),
        ),
    ] {
        let mut c = req(Method::POST, path, Some(body.clone()));
        let r = f.on_request(&mut c).await.unwrap_err();
        assert_eq!(
            (r.status.as_u16(), r.code),
            (403, "media_url_not_allowed"),
            "{body}"
        );
    }
    // The media itself passes; so does a URL where the operator allows it.
    let inline =
        chat(json!({"type": "image_url", "image_url": {"url": "DATA:image/png;base64,aGk="}}));
    let mut c = req(Method::POST, "/v1/chat/completions", Some(inline));
    f.on_request(&mut c).await.unwrap();
    let open = filter(json!({"media_urls": "allow"}));
    let remote =
        chat(json!({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}));
    let mut c = req(Method::POST, "/v1/chat/completions", Some(remote));
    open.on_request(&mut c).await.unwrap();
}
