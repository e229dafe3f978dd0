use super::*;
use gateway_filter::http::Method;
use serde_json::json;

const ALICE: &str = "sk-gw-alice-key";

struct Fixture {
    dir: tempfile::TempDir,
    filter: Arc<dyn Filter>,
}

fn keys_yaml(extra: &str) -> String {
    format!(
        "keys:\n  - id: alice\n    name: Alice\n    key_sha256: {}\n    models: ['llama3.1:*']\n  - id: off\n    key_sha256: {}\n    enabled: false\n  - id: old\n    key_sha256: {}\n    expires: 2001-01-01\n{extra}",
        keygen::hash_key(ALICE),
        keygen::hash_key("sk-off"),
        keygen::hash_key("sk-old"),
    )
}

fn fixture(options: serde_json::Value) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.yaml"), keys_yaml("")).unwrap();
    let hash = keygen::hash_password("secret", 4).unwrap();
    std::fs::write(
        dir.path().join("htpasswd"),
        format!("bob:{hash}\nalice:{hash}\n"),
    )
    .unwrap();
    let cx = BuildContext {
        config_dir: dir.path().to_path_buf(),
    };
    let filter = build(&options, &cx).unwrap();
    Fixture { dir, filter }
}

fn req(headers: &[(&'static str, &str)], ip: &str) -> RequestCtx {
    let mut ctx = RequestCtx::new("id".into(), Method::POST, "/api/chat".into());
    for (k, v) in headers {
        ctx.headers.insert(*k, v.parse().unwrap());
    }
    ctx.set_client(ip.parse().unwrap(), 64);
    ctx
}

fn basic(user: &str, pw: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

#[tokio::test]
async fn valid_keys_pass_and_are_not_forwarded() {
    let f = fixture(json!({"keys_file": "keys.yaml"}));
    for h in [
        ("authorization", format!("Bearer {ALICE}")),
        ("x-api-key", ALICE.to_string()),
    ] {
        let mut ctx = req(&[(h.0, &h.1), ("x-other", "kept")], "10.0.0.1");
        f.filter.on_request(&mut ctx).await.unwrap();
        let p = ctx.principal.as_ref().unwrap();
        assert_eq!(
            (p.id.as_str(), p.name.as_str(), p.method),
            ("alice", "Alice", "api_key")
        );
        assert_eq!(p.models, ["llama3.1:*"]);
        assert!(
            ctx.headers.get("authorization").is_none() && ctx.headers.get("x-api-key").is_none()
        );
        assert_eq!(ctx.headers["x-other"], "kept");
    }
}

#[tokio::test]
async fn bad_keys_get_401_with_reason_kept_internal() {
    let f = fixture(json!({"keys_file": "keys.yaml"}));
    for (key, reason) in [
        ("sk-nope", "unknown_key"),
        ("sk-off", "disabled"),
        ("sk-old", "expired"),
    ] {
        let auth = format!("Bearer {key}");
        let mut ctx = req(&[("authorization", &auth)], "10.0.0.2");
        let r = f.filter.on_request(&mut ctx).await.unwrap_err();
        assert_eq!(r.status, 401);
        assert_eq!(r.code, "invalid_api_key");
        assert_eq!(
            r.message, "invalid credentials",
            "the reason must not reach the client"
        );
        assert_eq!(ctx.reject_reason, Some(reason));
        assert_eq!(r.headers[0].1, "Bearer realm=\"llm-gateway\"");
        assert!(ctx.principal.is_none());
    }
    let mut ctx = req(&[], "10.0.0.2");
    let r = f.filter.on_request(&mut ctx).await.unwrap_err();
    assert_eq!(
        (r.status.as_u16(), ctx.reject_reason),
        (401, Some("missing"))
    );
    // The query string is never a credential source: only headers are read at all.
}

#[tokio::test]
async fn repeated_failures_lock_the_ip_out_even_with_a_good_key() {
    let f = fixture(
        json!({"keys_file": "keys.yaml", "brute_force": {"max_failures": 3, "window": "1m"}}),
    );
    for _ in 0..3 {
        let mut ctx = req(&[("authorization", "Bearer wrong")], "10.9.9.9");
        assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 401);
    }
    let good = format!("Bearer {ALICE}");
    let mut ctx = req(&[("authorization", &good)], "10.9.9.9");
    let r = f.filter.on_request(&mut ctx).await.unwrap_err();
    assert_eq!(r.status, 429);
    assert_eq!(r.code, "too_many_auth_failures");
    assert!(r
        .headers
        .iter()
        .any(|(k, v)| k == "retry-after" && v == "60"));
    // Another address is unaffected; requests without credentials are not counted.
    let mut ctx = req(&[("authorization", &good)], "10.9.9.10");
    f.filter.on_request(&mut ctx).await.unwrap();
    for _ in 0..5 {
        let mut ctx = req(&[], "10.9.9.11");
        assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 401);
    }
    let mut ctx = req(&[("authorization", &good)], "10.9.9.11");
    f.filter.on_request(&mut ctx).await.unwrap();
}

#[tokio::test]
async fn basic_auth_with_bcrypt_and_cache() {
    let f = fixture(json!({"keys_file": "keys.yaml", "htpasswd": "htpasswd"}));
    let mut ctx = req(&[("authorization", &basic("bob", "secret"))], "10.0.0.3");
    f.filter.on_request(&mut ctx).await.unwrap();
    let p = ctx.principal.clone().unwrap();
    assert_eq!((p.id.as_str(), p.method), ("bob", "basic"));
    // A user that is also in the keys file gets that principal's settings.
    let mut ctx = req(&[("authorization", &basic("alice", "secret"))], "10.0.0.3");
    f.filter.on_request(&mut ctx).await.unwrap();
    assert_eq!(ctx.principal.unwrap().models, ["llama3.1:*"]);
    // Wrong password, unknown user.
    for (u, pw, reason) in [
        ("bob", "nope", "wrong_password"),
        ("eve", "secret", "unknown_user"),
    ] {
        let mut ctx = req(&[("authorization", &basic(u, pw))], "10.0.0.3");
        let r = f.filter.on_request(&mut ctx).await.unwrap_err();
        assert_eq!((r.status.as_u16(), ctx.reject_reason), (401, Some(reason)));
        assert_eq!(r.headers.len(), 2, "both challenges are offered");
    }
}

#[tokio::test]
async fn verified_credentials_skip_bcrypt() {
    let f = fixture(json!({"htpasswd": "htpasswd"}));
    let auth = basic("bob", "secret");
    let mut ctx = req(&[("authorization", &auth)], "10.0.0.4");
    f.filter.on_request(&mut ctx).await.unwrap();
    // Replace the file with a hash bob's password does not match, without reloading: the
    // cached verification still answers, which proves bcrypt did not run again.
    let other = keygen::hash_password("different", 4).unwrap();
    std::fs::write(f.dir.path().join("htpasswd"), format!("bob:{other}\n")).unwrap();
    let mut ctx = req(&[("authorization", &auth)], "10.0.0.4");
    f.filter.on_request(&mut ctx).await.unwrap();
    // After a reload the cache is cleared and the new file decides.
    f.filter.reload().unwrap();
    let mut ctx = req(&[("authorization", &auth)], "10.0.0.4");
    assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 401);
}

#[tokio::test]
async fn reload_swaps_keys_and_keeps_the_old_set_on_error() {
    let f = fixture(json!({"keys_file": "keys.yaml"}));
    let new_key = "sk-gw-new";
    std::fs::write(
        f.dir.path().join("keys.yaml"),
        format!(
            "keys:\n  - id: carol\n    key_sha256: {}\n",
            keygen::hash_key(new_key)
        ),
    )
    .unwrap();
    f.filter.reload().unwrap();
    let auth = format!("Bearer {new_key}");
    let mut ctx = req(&[("authorization", &auth)], "10.0.0.5");
    f.filter.on_request(&mut ctx).await.unwrap();
    let old = format!("Bearer {ALICE}");
    let mut ctx = req(&[("authorization", &old)], "10.0.0.5");
    assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 401);

    std::fs::write(
        f.dir.path().join("keys.yaml"),
        "keys: [ { id: x, bogus: 1 } ]\n",
    )
    .unwrap();
    let err = f.filter.reload().unwrap_err();
    assert!(err.to_string().contains("unknown field `bogus`"), "{err}");
    let mut ctx = req(&[("authorization", &auth)], "10.0.0.5");
    f.filter.on_request(&mut ctx).await.unwrap();
}

#[tokio::test]
async fn mtls_subject_maps_to_a_principal() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys.yaml"),
        keys_yaml("  - id: svc\n    mtls_subject: svc-a.internal\n"),
    )
    .unwrap();
    let cx = BuildContext {
        config_dir: dir.path().to_path_buf(),
    };
    let accept = build(&json!({"keys_file": "keys.yaml", "mtls": "accept"}), &cx).unwrap();
    let mut ctx = req(&[], "10.0.0.6");
    ctx.client_cert_subjects = vec!["svc-a.internal".into()];
    accept.on_request(&mut ctx).await.unwrap();
    assert_eq!(
        ctx.principal.as_ref().map(|p| (p.id.as_str(), p.method)),
        Some(("svc", "mtls"))
    );

    let require = build(&json!({"keys_file": "keys.yaml", "mtls": "require"}), &cx).unwrap();
    let good = format!("Bearer {ALICE}");
    let mut ctx = req(&[("authorization", &good)], "10.0.0.6");
    let r = require.on_request(&mut ctx).await.unwrap_err();
    assert_eq!(
        (r.status.as_u16(), ctx.reject_reason),
        (401, Some("no_client_certificate"))
    );
    let mut ctx = req(&[("authorization", &good)], "10.0.0.6");
    ctx.client_cert_subjects = vec!["anything".into()];
    require.on_request(&mut ctx).await.unwrap();
}

#[test]
fn option_errors_name_the_key() {
    let cx = BuildContext::default();
    let e = build(&json!({}), &cx).err().unwrap();
    assert!(e.message.contains("keys_file"), "{e}");
    let e = build(&json!({"keys_file": "/nonexistent/keys.yaml"}), &cx)
        .err()
        .unwrap();
    assert_eq!(e.path, "keys_file");
    assert!(
        e.message.contains("/nonexistent/keys.yaml: cannot read"),
        "{e}"
    );
    let e = build(
        &json!({"keys_file": "k", "brute_force": {"max_fail": 1}}),
        &cx,
    )
    .err()
    .unwrap();
    assert!(e.path.starts_with("brute_force"), "{e}");
}

#[tokio::test]
async fn unknown_users_wait_for_bcrypt_like_known_ones() {
    // The decoy has the file's cost, so an unknown user costs what a wrong password costs.
    let file = Htpasswd::parse(&format!(
        "bob:{}\n",
        keygen::hash_password("secret", 8).unwrap()
    ))
    .unwrap();
    let (decoy, known) = file.hash_or_decoy("eve").unwrap();
    assert!(!known && decoy.starts_with("$2b$08$"), "{decoy}");
    assert!(!bcrypt::verify("secret", decoy).unwrap());

    let f = fixture(json!({"htpasswd": "htpasswd"}));
    std::fs::write(
        f.dir.path().join("htpasswd"),
        format!("bob:{}\n", keygen::hash_password("secret", 8).unwrap()),
    )
    .unwrap();
    f.filter.reload().unwrap();
    let time = |u: &'static str| {
        let filter = f.filter.clone();
        async move {
            let mut best = Duration::MAX;
            for _ in 0..3 {
                let mut ctx = req(&[("authorization", &basic(u, "wrong"))], "10.0.0.4");
                let t = std::time::Instant::now();
                assert_eq!(filter.on_request(&mut ctx).await.unwrap_err().status, 401);
                best = best.min(t.elapsed());
            }
            best
        }
    };
    let (known, unknown) = (time("bob").await, time("eve").await);
    assert!(
        unknown * 2 >= known,
        "unknown user answered in {unknown:?}, known user with a wrong password in {known:?}"
    );
}

#[tokio::test]
async fn lockout_counts_an_ipv6_prefix_as_one_client() {
    let f = fixture(
        json!({"keys_file": "keys.yaml", "brute_force": {"max_failures": 3, "window": "1m"}}),
    );
    // Three failures from three addresses of one /64.
    for ip in ["2001:db8:7::1", "2001:db8:7::2", "2001:db8:7:0:ffff::3"] {
        let mut ctx = req(&[("authorization", "Bearer wrong")], ip);
        assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 401);
    }
    let good = format!("Bearer {ALICE}");
    let mut ctx = req(&[("authorization", &good)], "2001:db8:7::99");
    assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 429);
    let mut ctx = req(&[("authorization", &good)], "2001:db8:8::1");
    f.filter.on_request(&mut ctx).await.unwrap();
}

#[tokio::test]
async fn an_identity_header_counts_only_from_a_trusted_proxy() {
    let f = fixture(
        json!({"keys_file": "keys.yaml", "trusted_identity_header": "Tailscale-User-Login"}),
    );
    // From a trusted proxy: the named user, with the keys file's settings when it is there.
    let mut ctx = req(&[("tailscale-user-login", "alice")], "100.64.0.1");
    ctx.via_trusted_proxy = true;
    f.filter.on_request(&mut ctx).await.unwrap();
    let p = ctx.principal.clone().unwrap();
    assert_eq!((p.id.as_str(), p.method), ("alice", "proxy"));
    assert_eq!(p.models, ["llama3.1:*"]);
    assert!(
        !ctx.headers.contains_key("tailscale-user-login"),
        "not forwarded"
    );
    let mut ctx = req(
        &[("tailscale-user-login", "carol@example.com")],
        "100.64.0.1",
    );
    ctx.via_trusted_proxy = true;
    f.filter.on_request(&mut ctx).await.unwrap();
    assert_eq!(ctx.principal.unwrap().id, "carol@example.com");
    // Two values (a proxy that appended to a client's header): not believed.
    let mut ctx = req(&[], "100.64.0.1");
    ctx.via_trusted_proxy = true;
    ctx.headers
        .append("tailscale-user-login", "alice".parse().unwrap());
    ctx.headers
        .append("tailscale-user-login", "carol@example.com".parse().unwrap());
    assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 401);
    assert!(!ctx.headers.contains_key("tailscale-user-login"));
    // From anyone else: ignored (and removed), so no credentials at all.
    let mut ctx = req(&[("tailscale-user-login", "alice")], "198.51.100.9");
    assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 401);
    assert!(!ctx.headers.contains_key("tailscale-user-login"));
    // A disabled principal stays disabled behind the proxy too.
    let mut ctx = req(&[("tailscale-user-login", "off")], "100.64.0.1");
    ctx.via_trusted_proxy = true;
    assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 401);
}

/// A forward-auth validator: answers by the `Authorization` header and records what it saw.
async fn validator() -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/verify", listener.local_addr().unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf).to_lowercase();
                log.lock().unwrap().push(head.clone());
                let answer = if head.contains("bearer sso-carol") || head.contains("basic y2fyb2w6")
                {
                    "200 OK\r\nx-auth-user: carol\r\nx-auth-scopes: admin, ops\r\nx-auth-models: qwen2:*,llama3.1:8b"
                } else if head.contains("bearer sso-alice") {
                    "204 No Content\r\nx-auth-user: alice"
                } else if head.contains("bearer sso-nouser") {
                    "200 OK"
                } else if head.contains("bearer sso-bad-request") {
                    "400 Bad Request"
                } else if head.contains("bearer sso-boom") {
                    "500 Internal Server Error"
                } else if head.contains("bearer sso-slow") {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    "200 OK\r\nx-auth-user: slow"
                } else {
                    "401 Unauthorized"
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {answer}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn forward_auth_asks_the_validator_only_for_unknown_credentials() {
    let (url, seen) = validator().await;
    let f = fixture(json!({
        "keys_file": "keys.yaml", "htpasswd": "htpasswd",
        "forward": {"url": url, "scopes_header": "x-auth-scopes", "models_header": "x-auth-models", "timeout": "300ms"}
    }));
    let calls = || seen.lock().unwrap().len();
    // A validator-approved token: the principal it names, with its scopes and models.
    let mut ctx = req(&[("authorization", "Bearer sso-carol")], "10.0.0.7");
    ctx.query = Some("x=1".into());
    f.filter.on_request(&mut ctx).await.unwrap();
    let p = ctx.principal.clone().unwrap();
    assert_eq!((p.id.as_str(), p.method), ("carol", "forward"));
    assert_eq!(p.scopes, ["admin", "ops"]);
    assert_eq!(p.models, ["qwen2:*", "llama3.1:8b"]);
    assert!(!ctx.headers.contains_key("authorization"), "not forwarded");
    {
        let seen = seen.lock().unwrap();
        let head = &seen[0];
        assert!(head.starts_with("get /verify http/1.1"), "{head}");
        for want in [
            "authorization: bearer sso-carol",
            "x-forwarded-method: post",
            "x-forwarded-uri: /api/chat?x=1",
            "x-forwarded-for: 10.0.0.7",
        ] {
            assert!(head.contains(want), "{want} missing in {head}");
        }
    }
    // The same credential again: answered from the cache.
    let mut ctx = req(&[("authorization", "Bearer sso-carol")], "10.0.0.7");
    f.filter.on_request(&mut ctx).await.unwrap();
    assert_eq!(calls(), 1);
    // A principal also in the keys file gets the keys file's settings.
    let mut ctx = req(&[("authorization", "Bearer sso-alice")], "10.0.0.7");
    f.filter.on_request(&mut ctx).await.unwrap();
    let p = ctx.principal.clone().unwrap();
    assert_eq!((p.id.as_str(), p.method), ("alice", "forward"));
    assert_eq!(p.models, ["llama3.1:*"]);
    assert_eq!(calls(), 2);
    // Credentials the local files settle never reach the validator, right or wrong.
    let mut ctx = req(&[("x-api-key", ALICE)], "10.0.0.7");
    f.filter.on_request(&mut ctx).await.unwrap();
    let mut ctx = req(&[("authorization", &basic("bob", "secret"))], "10.0.0.7");
    f.filter.on_request(&mut ctx).await.unwrap();
    let mut ctx = req(&[("authorization", &basic("bob", "wrong"))], "10.0.0.7");
    assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 401);
    let mut ctx = req(&[], "10.0.0.7");
    assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 401);
    assert_eq!(ctx.reject_reason, Some("missing"));
    assert_eq!(calls(), 2);
    // Basic credentials of a user htpasswd does not know go to the validator.
    let mut ctx = req(&[("authorization", &basic("carol", "pw"))], "10.0.0.7");
    f.filter.on_request(&mut ctx).await.unwrap();
    assert_eq!(ctx.principal.unwrap().id, "carol");
    assert_eq!(calls(), 3);
    // Refused by the validator: our usual 401, not cached.
    for _ in 0..2 {
        let mut ctx = req(&[("authorization", "Bearer sso-nobody")], "10.0.0.8");
        let r = f.filter.on_request(&mut ctx).await.unwrap_err();
        assert_eq!(r.status, 401);
        assert_eq!(ctx.reject_reason, Some("forward_denied"));
        assert!(ctx.principal.is_none());
    }
    assert_eq!(calls(), 5);
    // A second, different credential next to the one checked locally is never handed over:
    // it could be a key the keys file knows is disabled.
    let mut ctx = req(
        &[
            ("authorization", "Bearer sso-carol"),
            ("x-api-key", "sk-off"),
        ],
        "10.0.0.8",
    );
    assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 401);
    assert_eq!(ctx.reject_reason, Some("ambiguous_credentials"));
    let mut ctx = req(
        &[
            ("authorization", "Bearer sso-carol"),
            ("x-api-key", "sso-carol"),
        ],
        "10.0.0.8",
    );
    f.filter.on_request(&mut ctx).await.unwrap();
    assert!(!ctx.headers.contains_key("x-api-key"));
    assert_eq!(calls(), 6);
}

#[tokio::test]
async fn forward_auth_fails_closed() {
    let (url, _) = validator().await;
    let f = fixture(json!({"forward": {"url": url, "timeout": "300ms"}}));
    // Any 4xx or a 2xx naming nobody: a bad credential (counted towards the lockout).
    for token in ["sso-bad-request", "sso-nouser"] {
        let mut ctx = req(&[("authorization", &format!("Bearer {token}"))], "10.0.0.9");
        assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 401);
        assert_eq!(ctx.reject_reason, Some("forward_denied"), "{token}");
    }
    // A 5xx, a validator slower than the timeout: denied too.
    for token in ["sso-boom", "sso-slow"] {
        let started = std::time::Instant::now();
        let mut ctx = req(&[("authorization", &format!("Bearer {token}"))], "10.0.0.9");
        let r = f.filter.on_request(&mut ctx).await.unwrap_err();
        assert_eq!(r.status, 401, "{token}");
        assert_eq!(ctx.reject_reason, Some("forward_unavailable"), "{token}");
        assert!(started.elapsed() < Duration::from_secs(2), "{token}");
    }
    let (name, report) = f.filter.admin_report().unwrap();
    assert_eq!(name, "auth");
    assert_eq!(report["forward"]["failures"], 2);
    // Past `max_in_flight` questions at once, the rest are denied, not queued.
    let f = Arc::new(fixture(
        json!({"forward": {"url": url, "timeout": "2s", "max_in_flight": 1}}),
    ));
    let slow = {
        let f = f.clone();
        tokio::spawn(async move {
            let mut ctx = req(&[("authorization", "Bearer sso-slow")], "10.0.0.9");
            f.filter.on_request(&mut ctx).await.unwrap_err();
            ctx.reject_reason
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ctx = req(&[("authorization", "Bearer sso-carol")], "10.0.0.9");
    f.filter.on_request(&mut ctx).await.unwrap_err();
    assert_eq!(ctx.reject_reason, Some("forward_unavailable"));
    assert_eq!(slow.await.unwrap(), Some("forward_unavailable"));
    // Nothing listening at all.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = fixture(json!({"forward": {"url": format!("http://127.0.0.1:{port}/")}}));
    let mut ctx = req(&[("x-api-key", "sso-carol")], "10.0.0.9");
    assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 401);
    assert_eq!(ctx.reject_reason, Some("forward_unavailable"));
}

#[test]
fn forward_options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let cx = BuildContext {
        config_dir: dir.path().to_path_buf(),
    };
    for (opts, key) in [
        (
            json!({"forward": {"url": "https://auth.example/"}}),
            "forward.url",
        ),
        (json!({"forward": {"url": "not a url"}}), "forward.url"),
        (
            json!({"forward": {"url": "http://a/", "method": "G ET"}}),
            "forward.method",
        ),
        (
            json!({"forward": {"url": "http://a/", "headers": []}}),
            "forward.headers",
        ),
        (
            json!({"forward": {"url": "http://a/", "principal_header": "x y"}}),
            "forward.principal_header",
        ),
    ] {
        let err = build(&opts, &cx).err().expect("refused").to_string();
        assert!(err.contains(key), "{opts}: {err}");
    }
}
