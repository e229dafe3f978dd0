use super::*;
use gateway_filter::http::Method;
use gateway_filter::{Decision, Principal, Usage};
use serde_json::{json, Value};

fn ctx(i: usize) -> RequestCtx {
    let mut c = RequestCtx::new(
        format!("req-{i}"),
        Method::POST,
        "/v1/chat/completions".into(),
    );
    c.client_ip = Some("::ffff:10.0.0.9".parse().unwrap());
    c.model = Some("llama3.1:8b".into());
    c.json = Some(
        json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "secret plans"}]}),
    );
    c.headers.insert(
        "authorization",
        "Bearer sk-gw-never-logged".parse().unwrap(),
    );
    c.headers.insert("user-agent", "curl/8".parse().unwrap());
    c.principal = Some(Arc::new(Principal {
        id: "alice".into(),
        method: "api_key",
        key_sha256_prefix: Some("0123456789ab".into()),
        ..Default::default()
    }));
    c.status = 200;
    c.usage = Some(Usage {
        prompt_tokens: 3,
        completion_tokens: 7,
        ..Default::default()
    });
    c.duration = Some(Duration::from_millis(12));
    c
}

fn read(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// With `prompt_hash_key`, a reader of the log cannot confirm a guessed prompt: the plain
/// hash is gone and the keyed one (HMAC-SHA256, checked against Python's `hmac`) stands in
/// its own field.
#[tokio::test(flavor = "multi_thread")]
async fn a_prompt_hash_key_hides_the_plain_hash() {
    let dir = tempfile::tempdir().unwrap();
    let cx = BuildContext {
        config_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let f = build(
        &json!({"file": "audit.jsonl", "prompt_hash_key": "0123456789abcdef-test-key"}),
        &cx,
    )
    .unwrap();
    f.on_complete(&mut ctx(1)).await;
    f.shutdown();
    let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(!text.contains(&prompt_sha256(&["secret plans"])), "{text}");
    assert!(!text.contains("0123456789abcdef-test-key"), "{text}");
    let l = &read(&dir.path().join("audit.jsonl"))[0];
    assert_eq!(l["prompt_sha256"], Value::Null);
    // python3 -c "import hmac,hashlib; print(hmac.new(b'0123456789abcdef-test-key',
    //   b'secret plans\x1e', hashlib.sha256).hexdigest())"
    assert_eq!(
        l["prompt_hmac_sha256"],
        "1c1494674e528722dd92960f753722c6e0d3858c529826a1c8e0677b28f01cc3"
    );
    // A short key is refused, naming the setting.
    let e = build(
        &json!({"file": "audit.jsonl", "prompt_hash_key": "short"}),
        &cx,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("prompt_hash_key"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn lines_hold_every_field_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let cx = BuildContext {
        config_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let f = build(&json!({"file": "audit.jsonl"}), &cx).unwrap();
    let mut c = ctx(1);
    f.on_complete(&mut c).await;
    // The same id from a JWT: told apart, and no key prefix (the entry's key was not used).
    let mut jwt = ctx(2);
    jwt.principal = Some(Arc::new(Principal {
        method: "jwt",
        ..(**jwt.principal.as_ref().unwrap()).clone()
    }));
    f.on_complete(&mut jwt).await;
    c.decision = Decision::Rejected {
        filter: "auth",
        code: "invalid_api_key",
    };
    c.status = 401;
    c.reject_reason = Some("unknown_key");
    f.on_complete(&mut c).await;
    f.shutdown();
    let path = dir.path().join("audit.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains("sk-gw-never-logged") && !text.contains("secret plans"),
        "{text}"
    );
    let lines = read(&path);
    assert_eq!(lines.len(), 3);
    let l = &lines[0];
    assert_eq!(
        (&l["auth_method"], &l["key_sha256_prefix"]),
        (&json!("api_key"), &json!("0123456789ab"))
    );
    assert_eq!(
        (
            &lines[1]["principal"],
            &lines[1]["auth_method"],
            &lines[1]["key_sha256_prefix"]
        ),
        (&json!("alice"), &json!("jwt"), &Value::Null)
    );
    for key in [
        "ts",
        "request_id",
        "principal",
        "auth_method",
        "key_sha256_prefix",
        "client_ip",
        "method",
        "path",
        "route",
        "model",
        "prompt_sha256",
        "prompt_chars",
        "stream",
        "status",
        "decision",
        "backend",
        "retries",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
        "ttfb_ms",
        "duration_ms",
        "bytes_in",
        "bytes_out",
        "user_agent",
    ] {
        assert!(l.get(key).is_some(), "missing {key} in {l}");
    }
    assert_eq!(l["principal"], "alice");
    assert_eq!(l["client_ip"], "10.0.0.9");
    assert_eq!(l["route"], "openai_chat");
    assert_eq!(l["prompt_chars"], 12);
    assert_eq!(l["prompt_sha256"], prompt_sha256(&["secret plans"]));
    assert!(l.get("prompt_hmac_sha256").is_none(), "{l}");
    assert_eq!(
        (l["prompt_tokens"].as_u64(), l["completion_tokens"].as_u64()),
        (Some(3), Some(7))
    );
    assert_eq!(l["duration_ms"], 12.0);
    assert_eq!(l["decision"], "allowed");
    assert!(
        l["ts"].as_str().unwrap().ends_with('Z') && l["ts"].as_str().unwrap().len() == 24,
        "{}",
        l["ts"]
    );
    assert_eq!(lines[2]["decision"], "auth:invalid_api_key");
    assert_eq!(lines[2]["reason"], "unknown_key");
}

#[tokio::test(flavor = "multi_thread")]
async fn capture_prompts_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let cx = BuildContext {
        config_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let f = build(
        &json!({"file": "a.jsonl", "capture": {"prompts": true}}),
        &cx,
    )
    .unwrap();
    f.on_complete(&mut ctx(1)).await;
    f.shutdown();
    assert_eq!(
        read(&dir.path().join("a.jsonl"))[0]["prompt"],
        json!(["secret plans"])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_waits_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cx = BuildContext {
        config_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let f = build(&json!({"file": "q.jsonl", "queue": 1}), &cx).unwrap();
    let before = STALLS.get();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let f = f.clone();
            tokio::spawn(async move { f.on_complete(&mut ctx(i)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    f.shutdown();
    assert_eq!(read(&dir.path().join("q.jsonl")).len(), 200);
    assert!(STALLS.get() > before, "stalls are counted");
}

#[test]
fn option_errors() {
    let cx = BuildContext::default();
    assert!(build(&json!({}), &cx)
        .err()
        .unwrap()
        .message
        .contains("exactly one sink"));
    assert!(build(&json!({"file": "x", "stdout": true}), &cx).is_err());
    // A size a few lines pass would rotate the trail away within seconds.
    let e = build(
        &json!({"stdout": true, "rotate": {"max_size": "0", "keep": 2}}),
        &cx,
    )
    .err()
    .unwrap();
    assert_eq!(e.path, "rotate.max_size", "{}", e.message);
    assert_eq!(
        build(&json!({"file": "/nonexistent/dir/a.jsonl"}), &cx)
            .err()
            .unwrap()
            .path,
        "file"
    );
    assert_eq!(
        build(&json!({"stdout": true, "on_full": "block"}), &cx)
            .err()
            .unwrap()
            .path,
        "on_full"
    );
}

#[test]
fn a_reopen_that_fails_is_a_failed_reload() {
    let dir = tempfile::tempdir().unwrap();
    let cx = BuildContext {
        config_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let f = build(&json!({"file": "audit.jsonl"}), &cx).unwrap();
    // logrotate moved it; a new one opens.
    let path = dir.path().join("audit.jsonl");
    std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
    f.reload().unwrap();
    assert!(path.exists());
    // Something that is not a file is in its place: said, not reported as done.
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let e = f.reload().unwrap_err().to_string();
    assert!(e.contains("cannot open the audit log anew"), "{e}");
    f.shutdown();
}
