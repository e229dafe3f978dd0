//! Authentication through the real binary: keys, basic auth, lockout, reload, networks.

use std::time::Duration;

use crate::support::*;

async fn shipped_auth_gateway(m: &mock_ollama::MockServer) -> Gateway {
    Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n    htpasswd: {}\n",
        backends(&[("local", &m.url())]),
        conf("keys.yaml"),
        conf("htpasswd")
    ))
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn shipped_keys_and_htpasswd_work_as_documented() {
    let m = mock().await;
    let gw = shipped_auth_gateway(&m).await;
    let c = client();

    // No credentials: 401 with both challenges, and the backend never sees the request.
    let r = c
        .post(gw.url("/api/chat"))
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let challenges: Vec<_> = r
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        challenges,
        [
            "Bearer realm=\"llm-gateway\"",
            "Basic realm=\"llm-gateway\""
        ]
    );
    assert_eq!(error_of(r).await.0, "invalid_api_key");
    let r = c.get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(m.total(), 0);

    // The demo key, as Bearer and as x-api-key; the demo user with basic auth.
    let r = c
        .post(gw.url("/api/chat"))
        .bearer_auth(DEMO_KEY)
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(field(&gw.access_line(&id).await, "principal"), "demo");
    let r = c
        .get(gw.url("/v1/models"))
        .header("x-api-key", DEMO_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(gw.url("/api/chat"))
        .basic_auth("demo", Some("demo"))
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(m.total(), 3);
    for seen in m.requests() {
        assert!(
            !seen
                .headers
                .iter()
                .any(|(k, _)| k == "authorization" || k == "x-api-key"),
            "credentials must not reach the backend: {:?}",
            seen.headers
        );
    }

    // Wrong key and wrong password: 401, reason only in the log.
    let r = c
        .post(gw.url("/api/chat"))
        .bearer_auth("sk-gw-wrong")
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let (_, msg) = error_of(r).await;
    assert_eq!(msg, "invalid credentials");
    let line = gw.access_line(&id).await;
    assert_eq!(field(&line, "decision"), "auth:invalid_api_key");
    assert_eq!(field(&line, "reason"), "unknown_key");
    let r = c
        .post(gw.url("/api/chat"))
        .basic_auth("demo", Some("nope"))
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // /health needs nothing.
    assert_eq!(c.get(gw.url("/health")).send().await.unwrap().status(), 200);
    assert_eq!(m.total(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_with_key_and_with_user() {
    let m = mock().await;
    let gw = shipped_auth_gateway(&m).await;
    let run = |args: Vec<String>| {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "content-type: application/json",
            ])
            .args(args)
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let url = gw.url("/api/generate");
    let body = r#"{"model":"llama3.1:8b","prompt":"hi","stream":false}"#.to_string();
    assert_eq!(run(vec![url.clone(), "-d".into(), body.clone()]), "401");
    assert_eq!(
        run(vec![
            url.clone(),
            "-H".into(),
            format!("Authorization: Bearer {DEMO_KEY}"),
            "-d".into(),
            body.clone()
        ]),
        "200"
    );
    assert_eq!(
        run(vec![
            url.clone(),
            "-u".into(),
            "demo:demo".into(),
            "-d".into(),
            body.clone()
        ]),
        "200"
    );
    assert_eq!(
        run(vec![format!("{url}?api_key={DEMO_KEY}"), "-d".into(), body]),
        "401",
        "never from the query string"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn chain_runs_in_order_and_first_rejection_answers() {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let entry = |id: &str, key: &str| {
        format!(
            "  - id: {id}\n    key_sha256: {}\n",
            filter_auth::keygen::hash_key(key)
        )
    };
    std::fs::write(
        dir.path().join("first.yaml"),
        format!("keys:\n{}", entry("first-a", "key-a")),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("second.yaml"),
        format!("keys:\n{}", entry("second-a", "key-a")),
    )
    .unwrap();
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {d}/first.yaml\n  - use: auth\n    keys_file: {d}/second.yaml\n",
        backends(&[("local", &m.url())]),
        d = dir.path().display()
    ))
    .await;
    let c = client();
    // The first filter accepts the key and, as it must, removes it from the headers; the
    // second filter runs after it, sees that mutated context, and finds no credential.
    let r = c
        .post(gw.url("/api/chat"))
        .bearer_auth("key-a")
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let line = gw.access_line(&id).await;
    assert_eq!(
        field(&line, "principal"),
        "first-a",
        "set by the first filter"
    );
    assert_eq!(
        field(&line, "reason"),
        "missing",
        "seen by the second filter"
    );
    assert_eq!(field(&line, "decision"), "auth:invalid_api_key");
    // A request the first filter refuses never reaches the second one.
    let r = c
        .post(gw.url("/api/chat"))
        .bearer_auth("key-z")
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let line = gw.access_line(&id).await;
    assert_eq!(
        (field(&line, "principal"), field(&line, "reason")),
        ("-", "unknown_key")
    );
    assert_eq!(m.total(), 0, "no rejected request reaches the backend");
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_failures_lock_an_address_out() {
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n    brute_force: {{ max_failures: 3, window: 30s }}\n",
        backends(&[("local", &m.url())]),
        conf("keys.yaml")
    ))
    .await;
    let c = client();
    for _ in 0..3 {
        let r = c
            .post(gw.url("/api/chat"))
            .bearer_auth("guess")
            .json(&chat())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let r = c
        .post(gw.url("/api/chat"))
        .bearer_auth(DEMO_KEY)
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "30");
    assert_eq!(error_of(r).await.0, "too_many_auth_failures");
    assert_eq!(m.total(), 0);
}

/// Guesses sent in parallel meet the lockout as guesses sent one after another do: a password
/// check under way counts as a failure until it ends, so a burst of bcrypt checks cannot all
/// start before the first failure is counted.
#[tokio::test(flavor = "multi_thread")]
async fn parallel_password_guesses_meet_the_lockout() {
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n    htpasswd: {}\n    brute_force: {{ max_failures: 3, window: 30s }}\n",
        backends(&[("local", &m.url())]),
        conf("keys.yaml"),
        conf("htpasswd")
    ))
    .await;
    let c = client();
    // A burst of right passwords from one address on a cold cache: each check waits its turn
    // behind the others under way, none is refused.
    let burst = (0..12).map(|_| {
        c.post(gw.url("/api/chat"))
            .basic_auth("demo", Some("demo"))
            .json(&chat())
            .send()
    });
    for r in futures_util::future::join_all(burst).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    let guesses = (0..12).map(|i| {
        c.post(gw.url("/api/chat"))
            .basic_auth("demo", Some(format!("guess-{i}")))
            .json(&chat())
            .send()
    });
    let answers = futures_util::future::join_all(guesses).await;
    let mut statuses: Vec<u16> = answers
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    statuses.sort_unstable();
    let checked = statuses.iter().filter(|s| **s == 401).count();
    assert!(
        checked <= 3,
        "{checked} passwords checked in one burst: {statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        12 - checked,
        "{statuses:?}"
    );
    let r = c
        .post(gw.url("/api/chat"))
        .basic_auth("demo", Some("demo"))
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "locked: even the right password waits");
    assert_eq!(
        m.total(),
        12,
        "only the right passwords' requests were forwarded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_keys_and_survives_a_broken_file() {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    let write = |id: &str, key: &str| {
        std::fs::write(
            &keys,
            format!(
                "keys:\n  - id: {id}\n    key_sha256: {}\n",
                filter_auth::keygen::hash_key(key)
            ),
        )
        .unwrap()
    };
    write("old", "key-old");
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n",
        backends(&[("local", &m.url())]),
        keys.display()
    ))
    .await;
    let c = client();
    let status = |key: &'static str| {
        let c = c.clone();
        let url = gw.url("/api/chat");
        async move {
            c.post(url)
                .bearer_auth(key)
                .json(&chat())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status("key-old").await, 200);
    // Both series exist before any reload: an alert on `increase` sees the first failure.
    assert_eq!(
        gw.metric("llm_gateway_reloads_total{result=\"failed\"}")
            .await,
        Some(0.0)
    );
    // A kept-alive connection must survive the reload too.
    write("new", "key-new");
    gw.signal("HUP");
    let mut ok = false;
    for _ in 0..50 {
        if status("key-new").await == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the new key works after SIGHUP:\n{}", gw.log());
    assert_eq!(status("key-old").await, 401);

    std::fs::write(&keys, "keys: [ { id: broken, key_sha256: zz } ]\n").unwrap();
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        gw.log()
            .contains("reload failed, keeping the previous state"),
        "{}",
        gw.log()
    );
    assert_eq!(
        status("key-new").await,
        200,
        "a broken file keeps the old keys"
    );
    // Visible to whoever scrapes the gateway, not only in its log.
    assert_eq!(
        gw.metric("llm_gateway_reloads_total{result=\"failed\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        gw.metric("llm_gateway_reloads_total{result=\"ok\"}").await,
        Some(1.0)
    );
    // An edit of the config itself is not applied by SIGHUP, and the log says so.
    let mut config = std::fs::read_to_string(gw.config_path()).unwrap();
    config.push_str("# edited\n");
    std::fs::write(gw.config_path(), config).unwrap();
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        gw.log().contains("changed since this process started"),
        "{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn listener_networks_are_enforced_before_anything_else() {
    let m = mock().await;
    let c = client();
    for rule in [
        "allow_cidrs: [10.0.0.0/8]",
        "deny_cidrs: ['127.0.0.0/8', '::1']",
    ] {
        let port = free_port();
        let gw = Gateway::start_raw(&format!(
            "listen:\n  - addr: 127.0.0.1:{port}\n    {rule}\n{}filters:\n  - use: auth\n    keys_file: {}\n",
            backends(&[("local", &m.url())]),
            conf("keys.yaml")
        ), port)
        .await;
        for path in ["/health", "/api/chat"] {
            let r = c
                .post(gw.url(path))
                .bearer_auth(DEMO_KEY)
                .json(&chat())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 403, "{rule} {path}");
            assert_eq!(error_of(r).await.0, "forbidden");
        }
    }
    assert_eq!(m.total(), 0);
}

/// A forward-auth validator on a real port: `Bearer sso-carol` is user carol (no model list),
/// `sso-erin` user erin with the models `llama3.1:8b`, `sso-dave` user dave with an empty
/// model list, `Bearer sso-anon` user `anonymous` (a name the gateway keeps for its own
/// account), anything else 401. Returns its URL and the number of questions it answered.
async fn validator() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/auth", listener.local_addr().unwrap());
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = calls.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let head = String::from_utf8_lossy(&buf).to_lowercase();
                let answer = if head.contains("authorization: bearer sso-carol") {
                    "200 OK\r\nx-auth-user: carol"
                } else if head.contains("authorization: bearer sso-erin") {
                    "200 OK\r\nx-auth-user: erin\r\nx-auth-models: llama3.1:8b"
                } else if head.contains("authorization: bearer sso-dave") {
                    "200 OK\r\nx-auth-user: dave\r\nx-auth-models: ,"
                } else if head.contains("authorization: bearer sso-anon") {
                    "200 OK\r\nx-auth-user: anonymous"
                } else {
                    "401 Unauthorized"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {answer}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            });
        }
    });
    (url, calls)
}

/// A gateway with the shipped keys file and forward auth to `url`, with `options` added.
async fn forward_gateway(m: &mock_ollama::MockServer, url: &str, options: &str) -> Gateway {
    Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n    forward: {{ url: '{url}', {options} }}\n",
        backends(&[("local", &m.url())]),
        conf("keys.yaml")
    ))
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn forward_auth_through_the_binary() {
    use std::sync::atomic::Ordering;
    let m = mock().await;
    let (url, calls) = validator().await;
    let gw = forward_gateway(&m, &url, "cache: 30s").await;
    // Approved by the validator: served, the token never reaches the backend, the access
    // line names the validator's principal; the second request is answered from the cache.
    for _ in 0..2 {
        let resp = client()
            .post(gw.url("/api/chat"))
            .bearer_auth("sso-carol")
            .json(&chat())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(field(&gw.access_line(&id).await, "principal"), "carol");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "cached");
    let seen = m.requests().into_iter().last().unwrap();
    assert!(!seen.headers.iter().any(|(k, _)| k == "authorization"));
    // Refused by the validator: the usual 401 in the route's shape.
    let resp = client()
        .get(gw.url("/v1/models"))
        .bearer_auth("sso-mallory")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(error_of(resp).await.0, "invalid_api_key");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // A shipped key is settled locally: the validator is not asked.
    let resp = client()
        .get(gw.url("/api/tags"))
        .bearer_auth(DEMO_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // The admin listener reports validator failures (none so far).
    let report: serde_json::Value = client()
        .get(gw.admin_url("/admin/auth"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["forward"]["failures"], 0, "{report}");
    // A validator naming `anonymous`: that principal would share the account of requests
    // without one (budgets, limits), so it is refused, in the route's shape, and reaches no
    // backend.
    let before = m.total();
    for (path, body) in [
        ("/api/chat", chat()),
        (
            "/v1/chat/completions",
            serde_json::json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ] {
        let resp = client()
            .post(gw.url(path))
            .bearer_auth("sso-anon")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{path}");
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(error_of(resp).await.0, "principal_reserved", "{path}");
        assert_eq!(
            field(&gw.access_line(&id).await, "reason"),
            "principal_reserved"
        );
    }
    assert_eq!(m.total(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_bearer_tokens_through_the_binary() {
    use base64::Engine;
    use std::io::{Read, Write};
    // The provider's key set, served from a plain thread.
    let pair = rcgen::KeyPair::generate().unwrap();
    let raw = pair.public_key_raw().to_vec();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "main",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]})
    .to_string();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let jwks_url = format!("http://{}/certs", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.read(&mut [0u8; 4096]);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{jwks}",
                jwks.len()
            );
        }
    });
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n    jwt: {{ jwks_url: '{jwks_url}', issuer: 'https://idp.example', audience: [llm-gateway] }}\n",
        backends(&[("local", &m.url())]),
        conf("keys.yaml")
    ))
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = |aud: &str| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("main".into());
        let claims = serde_json::json!({"sub": "dave@example.com", "iss": "https://idp.example",
            "aud": aud, "exp": now + 300});
        let key = jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&h, &claims, &key).unwrap()
    };
    // The openai client's way: a bearer token on /v1.
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(token("llm-gateway"))
        .json(&serde_json::json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(
        field(&gw.access_line(&id).await, "principal"),
        "dave@example.com"
    );
    let seen = m.requests().into_iter().last().unwrap();
    assert!(!seen.headers.iter().any(|(k, _)| k == "authorization"));
    // A token for another audience: 401 in OpenAI's shape, reason in the access line.
    let resp = client()
        .get(gw.url("/v1/models"))
        .bearer_auth(token("another-service"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(error_of(resp).await.0, "invalid_api_key");
    assert_eq!(field(&gw.access_line(&id).await, "reason"), "jwt_audience");
    // A valid token whose subject is `*`, the global budget's account: refused.
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some("main".into());
    let claims = serde_json::json!({"sub": "*", "iss": "https://idp.example",
        "aud": "llm-gateway", "exp": now + 300});
    let key = jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let star = jsonwebtoken::encode(&h, &claims, &key).unwrap();
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(star)
        .json(&serde_json::json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(error_of(resp).await.0, "principal_reserved");
}

#[tokio::test(flavor = "multi_thread")]
async fn jwks_over_https_with_a_private_ca() {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let pki = crate::support::certs::make(dir.path());
    let acceptor = crate::support::certs::server_acceptor(&pki);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = fetches.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else {
                    return;
                };
                let _ = s.read(&mut [0u8; 4096]).await;
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let body = r#"{"keys":[]}"#;
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
                            .as_bytes(),
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    let config = |ca: &str| {
        format!(
            "filters:\n  - use: auth\n    jwt: {{ jwks_url: 'https://localhost:{port}/certs', issuer: i, audience: [a]{ca} }}\n"
        )
    };
    // Trusted through ca_file: fetched at start.
    let _gw = Gateway::start(&config(&format!(", ca_file: '{}'", pki.ca.display()))).await;
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Without it the private CA is not trusted: the handshake fails, nothing is fetched.
    let gw = Gateway::start(&config("")).await;
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(gw.log().contains("not fetched at start"), "{}", gw.log());
}

/// With `models_header` set, the validator's model list restricts its principal; an answer
/// without a list (or an empty one) is refused, never taken as "any model" (attacker review,
/// 2026-12-04: it was, while a JWT without its models claim was refused).
#[tokio::test(flavor = "multi_thread")]
async fn forward_auth_without_its_model_list_is_refused() {
    let m = mock().await;
    let (url, _calls) = validator().await;
    let gw = forward_gateway(&m, &url, "cache: 0s, models_header: x-auth-models").await;
    let ask = |token: &'static str, model: &'static str| {
        client()
            .post(gw.url("/api/chat"))
            .bearer_auth(token)
            .json(&serde_json::json!({"model": model, "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    assert_eq!(ask("sso-erin", "llama3.1:8b").await.unwrap().status(), 200);
    let r = ask("sso-erin", "qwen2.5:7b").await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_of(r).await.0, "model_not_allowed");
    for token in ["sso-carol", "sso-dave"] {
        let r = ask(token, "qwen2.5:7b").await.unwrap();
        assert_eq!(r.status(), 401, "{token}");
        assert_eq!(error_of(r).await.0, "invalid_api_key", "{token}");
    }
    assert_eq!(
        m.total(),
        1,
        "only erin's allowed request reached the backend"
    );
}
