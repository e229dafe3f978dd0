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
        ..Default::default()
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
async fn a_disabled_or_expired_name_has_its_password_checked_first() {
    // Refused before bcrypt, a disabled name was answered in a millisecond, an unknown one
    // after the decoy's hashing: the speed told which names exist.
    let f = fixture(json!({"keys_file": "keys.yaml", "htpasswd": "htpasswd"}));
    let hash = keygen::hash_password("secret", 4).unwrap();
    std::fs::write(
        f.dir.path().join("htpasswd"),
        format!("off:{hash}\nold:{hash}\nbob:{hash}\n"),
    )
    .unwrap();
    f.filter.reload().unwrap();
    for (u, pw, reason) in [
        ("off", "nope", "wrong_password"),
        ("old", "nope", "wrong_password"),
        ("off", "secret", "disabled"),
        ("old", "secret", "expired"),
    ] {
        let mut ctx = req(&[("authorization", &basic(u, pw))], "10.0.0.5");
        let r = f.filter.on_request(&mut ctx).await.unwrap_err();
        assert_eq!(
            (r.status.as_u16(), ctx.reject_reason),
            (401, Some(reason)),
            "{u}:{pw}"
        );
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
        ..Default::default()
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

/// Review: certificate names were one untyped list and the first that named a principal won:
/// a certificate whose common name (which a client writes into its own request) is another
/// principal's DNS name signed in as it, and one that named two principals signed in as
/// whichever came first.
#[tokio::test]
async fn certificate_names_keep_their_kind_and_may_name_one_principal() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys.yaml"),
        keys_yaml("  - id: svc\n    mtls_subject: svc-a.internal\n  - id: ops\n    mtls_subject: 'dns:ops.internal'\n    scopes: [admin]\n"),
    )
    .unwrap();
    let cx = BuildContext {
        config_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let f = build(&json!({"keys_file": "keys.yaml", "mtls": "accept"}), &cx).unwrap();
    let sign_in = |names: &[&str]| {
        let mut ctx = req(&[], "10.0.0.6");
        ctx.client_cert_subjects = names.iter().map(|n| n.to_string()).collect();
        let f = f.clone();
        async move {
            let r = f.on_request(&mut ctx).await;
            (r.map(|_| ctx.principal.as_ref().unwrap().id.clone())
                .map_err(|_| ctx.reject_reason.unwrap()),)
        }
    };
    // A typed subject: only a DNS name; a common name that reads `dns:…` is not one.
    assert_eq!(sign_in(&["dns:ops.internal"]).await.0, Ok("ops".into()));
    assert_eq!(sign_in(&["cn:ops.internal"]).await.0, Err("missing"));
    assert_eq!(sign_in(&["cn:dns:ops.internal"]).await.0, Err("missing"));
    // An untyped one: any kind of name.
    assert_eq!(sign_in(&["cn:svc-a.internal"]).await.0, Ok("svc".into()));
    assert_eq!(sign_in(&["uri:svc-a.internal"]).await.0, Ok("svc".into()));
    // Names of two principals: neither.
    assert_eq!(
        sign_in(&["cn:svc-a.internal", "dns:ops.internal"]).await.0,
        Err("ambiguous_client_certificate")
    );
    assert_eq!(
        sign_in(&["dns:ops.internal", "cn:svc-a.internal"]).await.0,
        Err("ambiguous_client_certificate")
    );
    // Two names of one principal are one principal.
    assert_eq!(
        sign_in(&["cn:svc-a.internal", "dns:svc-a.internal"])
            .await
            .0,
        Ok("svc".into())
    );
    // A kind written as OpenSSL prints it (`DNS:`) is a kind, and a typed DNS name is
    // compared as the TLS layer presents it (lower-cased); a common name reading `DNS:…` is
    // still a common name.
    std::fs::write(
        dir.path().join("keys.yaml"),
        keys_yaml("  - id: ops\n    mtls_subject: 'DNS:Ops.Internal'\n"),
    )
    .unwrap();
    f.reload().unwrap();
    assert_eq!(sign_in(&["dns:ops.internal"]).await.0, Ok("ops".into()));
    assert_eq!(sign_in(&["cn:DNS:Ops.Internal"]).await.0, Err("missing"));
    // A subject that names nothing is a config error.
    for empty in ["''", "'dns:'", "' '"] {
        std::fs::write(
            dir.path().join("keys.yaml"),
            keys_yaml(&format!("  - id: ops\n    mtls_subject: {empty}\n")),
        )
        .unwrap();
        let e = f.reload().unwrap_err().to_string();
        assert!(
            e.contains("mtls_subject") && e.contains("names no certificate"),
            "{e}"
        );
    }
}

/// Review: `mtls: require` took any certificate the CA issued beside a stolen key; a key whose
/// entry names its certificate (`mtls_subject`) now signs in only with that one.
#[tokio::test]
async fn a_required_certificate_must_be_the_key_s_own() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys.yaml"),
        format!(
            "keys:\n  - id: carol\n    key_sha256: {}\n    mtls_subject: 'dns:carol-laptop'\n  - id: dave\n    key_sha256: {}\n",
            keygen::hash_key("sk-carol"),
            keygen::hash_key("sk-dave")
        ),
    )
    .unwrap();
    let cx = BuildContext {
        config_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let f = build(&json!({"keys_file": "keys.yaml", "mtls": "require"}), &cx).unwrap();
    assert_eq!(
        signed_in(&f, "10.0.0.7", "sk-carol", &["dns:bob-laptop"]).await,
        Err("client_certificate_mismatch")
    );
    assert_eq!(
        signed_in(&f, "10.0.0.7", "sk-carol", &["cn:carol-laptop"]).await,
        Err("client_certificate_mismatch")
    );
    assert_eq!(
        signed_in(&f, "10.0.0.7", "sk-carol", &["dns:carol-laptop"]).await,
        Ok(())
    );
    // A key whose entry names no certificate takes any the CA issued, as before.
    assert_eq!(
        signed_in(&f, "10.0.0.7", "sk-dave", &["dns:bob-laptop"]).await,
        Ok(())
    );
    // Attacker review: a right key with a wrong certificate is counted like a wrong key, so
    // it locks the address out like one (it never did: a stolen key could be confirmed).
    let f = build(
        &json!({"keys_file": "keys.yaml", "mtls": "require", "brute_force": {"max_failures": 3}}),
        &cx,
    )
    .unwrap();
    for _ in 0..3 {
        assert_eq!(
            signed_in(&f, "10.0.0.8", "sk-carol", &["dns:bob-laptop"]).await,
            Err("client_certificate_mismatch")
        );
    }
    assert_eq!(
        signed_in(&f, "10.0.0.8", "sk-carol", &["dns:carol-laptop"]).await,
        Err("locked_out")
    );
}

/// A request from `ip` with `key` and a client certificate naming `names`: its reason when
/// refused.
async fn signed_in(
    f: &Arc<dyn Filter>,
    ip: &str,
    key: &str,
    names: &[&str],
) -> Result<(), &'static str> {
    let auth = format!("Bearer {key}");
    let mut ctx = req(&[("authorization", &auth)], ip);
    ctx.client_cert_subjects = names.iter().map(|n| n.to_string()).collect();
    f.on_request(&mut ctx)
        .await
        .map_err(|_| ctx.reject_reason.unwrap())
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
                } else if head.contains("bearer sso-wait") {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "200 OK\r\nx-auth-user: waited"
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
        // Fail closed, as an outage (clients retry it; a 401 reads as a bad key).
        assert_eq!(
            (r.status.as_u16(), r.code),
            (503, "auth_unavailable"),
            "{token}"
        );
        assert!(r
            .headers
            .iter()
            .any(|(k, v)| k == "retry-after" && v == "5"));
        assert_eq!(ctx.reject_reason, Some("forward_unavailable"), "{token}");
        assert!(started.elapsed() < Duration::from_secs(2), "{token}");
    }
    let (name, report) = f.filter.admin_report().await.unwrap();
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
    for ip in ["10.0.0.9", "10.0.0.10"] {
        let mut ctx = req(&[("authorization", "Bearer sso-carol")], ip);
        let r = f.filter.on_request(&mut ctx).await.unwrap_err();
        assert_eq!(ctx.reject_reason, Some("forward_busy"));
        // Retried by clients, as a busy password check is (a 401 reads as a bad key).
        assert_eq!((r.status.as_u16(), r.code), (503, "auth_busy"));
        assert!(r
            .headers
            .iter()
            .any(|(k, v)| k == "retry-after" && v == "1"));
    }
    assert_eq!(slow.await.unwrap(), Some("forward_unavailable"));
    // Not asked is not the validator failing: counted apart.
    let (_, report) = f.filter.admin_report().await.unwrap();
    assert_eq!(
        (
            report["forward"]["failures"].as_u64(),
            report["forward"]["busy"].as_u64()
        ),
        (Some(1), Some(2))
    );
    // Nothing listening at all.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = fixture(json!({"forward": {"url": format!("http://127.0.0.1:{port}/")}}));
    let mut ctx = req(&[("x-api-key", "sso-carol")], "10.0.0.9");
    assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 503);
    assert_eq!(ctx.reject_reason, Some("forward_unavailable"));
}

/// Review: an anonymous client sending made-up credentials at once took all `max_in_flight`
/// questions, so nobody else's new credential could be checked until they were answered. One
/// address now holds at most its share (`max_in_flight_per_address`, a quarter by default),
/// and requests carrying the same credentials share one question (a client's burst costs one).
#[tokio::test]
async fn one_address_holds_its_share_of_questions_and_the_same_credential_is_asked_once() {
    let (url, seen) = validator().await;
    let f = Arc::new(fixture(json!({"forward": {
        "url": url, "timeout": "5s", "max_in_flight": 8, "max_in_flight_per_address": 2,
    }})));
    let ask = |token: String, ip: &'static str| {
        let f = f.clone();
        tokio::spawn(async move {
            let mut ctx = req(&[("authorization", &format!("Bearer {token}"))], ip);
            let r = f.filter.on_request(&mut ctx).await;
            (r.is_ok(), ctx.reject_reason)
        })
    };
    // Two guesses held by the validator (3 s each) from one address: its share; and two
    // from two hosts of one IPv6 /64 (the lockout's network, `limits.ipv6_prefix`): one share.
    let held: Vec<_> = [
        ("sso-slow-0", "10.0.0.1"),
        ("sso-slow-1", "10.0.0.1"),
        ("sso-slow-2", "2001:db8:0:1::1"),
        ("sso-slow-3", "2001:db8:0:1::2"),
    ]
    .into_iter()
    .map(|(t, ip)| ask(t.into(), ip))
    .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A third from either is not asked...
    assert_eq!(
        ask("sso-slow-4".into(), "10.0.0.1").await.unwrap(),
        (false, Some("forward_busy"))
    );
    assert_eq!(
        ask("sso-slow-5".into(), "2001:db8:0:1::3").await.unwrap(),
        (false, Some("forward_busy"))
    );
    // ...while another address's new credential is checked at once.
    assert_eq!(
        ask("sso-alice".into(), "10.0.0.2").await.unwrap(),
        (true, None)
    );
    // Ten requests at once with one new credential, from one address: one question.
    let before = seen.lock().unwrap().len();
    let burst: Vec<_> = (0..10)
        .map(|_| ask("sso-wait".into(), "10.0.0.3"))
        .collect();
    for b in burst {
        assert_eq!(b.await.unwrap(), (true, None));
    }
    assert_eq!(seen.lock().unwrap().len() - before, 1);
    for h in held {
        assert_eq!(h.await.unwrap(), (true, None));
    }
    let (_, report) = f.filter.admin_report().await.unwrap();
    assert_eq!(report["forward"]["busy"], 2);
    assert_eq!(report["forward"]["failures"], 0);
}

#[test]
fn forward_options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let cx = BuildContext {
        config_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    for (opts, key) in [
        (
            json!({"forward": {"url": "ftp://auth.example/"}}),
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
        (
            json!({"forward": {"url": "http://a/", "max_in_flight": 0}}),
            "forward.max_in_flight",
        ),
        (
            json!({"forward": {"url": "http://a/", "max_in_flight": 8, "max_in_flight_per_address": 9}}),
            "forward.max_in_flight_per_address",
        ),
        (
            json!({"forward": {"url": "http://a/", "max_in_flight_per_address": 0}}),
            "forward.max_in_flight_per_address",
        ),
    ] {
        let err = build(&opts, &cx).err().expect("refused").to_string();
        assert!(err.contains(key), "{opts}: {err}");
    }
}

/// A JWKS endpoint on a plain thread (the filter's first fetch blocks its caller); serves
/// whatever `set` holds and counts fetches.
fn jwks_server(
    set: Arc<std::sync::Mutex<String>>,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/certs", listener.local_addr().unwrap());
    let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = fetches.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = set.lock().unwrap().clone();
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, fetches)
}

struct SigningKey {
    kid: &'static str,
    pair: rcgen::KeyPair,
}

impl SigningKey {
    fn new(kid: &'static str) -> Self {
        SigningKey {
            kid,
            pair: rcgen::KeyPair::generate().unwrap(),
        }
    }

    fn jwk(&self) -> serde_json::Value {
        use base64::Engine;
        let raw = self.pair.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "alg": "ES256", "use": "sig",
               "x": b64(&raw[1..33]), "y": b64(&raw[33..65])})
    }

    fn sign(&self, kid: &str, claims: serde_json::Value) -> String {
        let key =
            jsonwebtoken::EncodingKey::from_ec_pem(self.pair.serialize_pem().as_bytes()).unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }
}

fn claims(sub: &str, exp_in: i64) -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    json!({"sub": sub, "iss": "https://idp.example", "aud": "llm-gateway",
           "exp": now + exp_in, "iat": now, "scope": "admin read", "models": ["qwen2:*"]})
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_tokens_are_checked_against_the_jwks() {
    use base64::Engine;
    let k1 = SigningKey::new("k1");
    let set = Arc::new(std::sync::Mutex::new(
        json!({"keys": [k1.jwk()]}).to_string(),
    ));
    let (url, fetches) = jwks_server(set.clone());
    let f = fixture(json!({
        "keys_file": "keys.yaml",
        "jwt": {"jwks_url": url, "issuer": "https://idp.example", "audience": ["llm-gateway"],
                "scopes_claim": "scope", "models_claim": "models", "unknown_kid_refresh": "300ms"}
    }));
    let fetched = || fetches.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(fetched(), 1, "fetched at start");
    let check = |token: String| {
        let f = &f;
        async move {
            let mut ctx = req(&[("authorization", &format!("Bearer {token}"))], "10.0.0.5");
            let r = f.filter.on_request(&mut ctx).await;
            (r.map(|_| ()), ctx)
        }
    };
    // A valid token: its subject, scopes and models; the token never reaches a backend.
    let (r, ctx) = check(k1.sign("k1", claims("dave", 300))).await;
    r.unwrap();
    let p = ctx.principal.clone().unwrap();
    assert_eq!((p.id.as_str(), p.method), ("dave", "jwt"));
    assert_eq!(p.scopes, ["admin", "read"]);
    assert_eq!(p.models, ["qwen2:*"]);
    assert!(!ctx.headers.contains_key("authorization"));
    // A subject in the keys file gets its settings.
    let (r, ctx) = check(k1.sign("k1", claims("alice", 300))).await;
    r.unwrap();
    assert_eq!(ctx.principal.unwrap().models, ["llama3.1:*"]);
    // API keys still work next to JWTs.
    let mut ctx = req(&[("x-api-key", ALICE)], "10.0.0.5");
    f.filter.on_request(&mut ctx).await.unwrap();
    // Every way a token can be wrong is a 401 with its reason.
    let mut wrong_aud = claims("dave", 300);
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = claims("dave", 300);
    wrong_iss["iss"] = json!("https://evil.example");
    let mut no_exp = claims("dave", 300);
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut not_yet = claims("dave", 300);
    not_yet["nbf"] = json!(not_yet["iat"].as_i64().unwrap() + 120);
    let forger = SigningKey::new("k1");
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let payload = b64(claims("dave", 300));
    let unsigned = format!("{}.{payload}.", b64(json!({"alg": "none", "kid": "k1"})));
    let hmac = {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(
            &h,
            &claims("dave", 300),
            &jsonwebtoken::EncodingKey::from_secret(b"guess"),
        )
        .unwrap()
    };
    let good = k1.sign("k1", claims("dave", 300));
    let tampered = {
        let parts: Vec<&str> = good.split('.').collect();
        format!("{}.{}.{}", parts[0], b64(claims("alice", 300)), parts[2])
    };
    for (token, reason) in [
        (k1.sign("k1", claims("dave", -120)), "jwt_expired"),
        (k1.sign("k1", wrong_aud), "jwt_audience"),
        (k1.sign("k1", wrong_iss), "jwt_issuer"),
        (k1.sign("k1", no_exp), "jwt_missing_claim"),
        (k1.sign("k1", not_yet), "jwt_not_yet_valid"),
        (forger.sign("k1", claims("dave", 300)), "jwt_signature"),
        (tampered, "jwt_signature"),
        (hmac, "jwt_algorithm"),
        (unsigned, "jwt_malformed"),
    ] {
        let (r, ctx) = check(token).await;
        assert_eq!(r.unwrap_err().status, 401, "{reason}");
        assert_eq!(ctx.reject_reason, Some(reason));
        assert!(ctx.principal.is_none());
    }
    // Leeway: expired 10 s ago is still inside the default 30 s.
    check(k1.sign("k1", claims("dave", -10))).await.0.unwrap();
    // None of that fetched the key set again: a known kid never costs a network call.
    assert_eq!(fetched(), 1);
    // Rotation: a new key appears at the JWKS; a token with its kid triggers one refetch.
    let k2 = SigningKey::new("k2");
    *set.lock().unwrap() = json!({"keys": [k1.jwk(), k2.jwk()]}).to_string();
    tokio::time::sleep(Duration::from_millis(350)).await;
    check(k2.sign("k2", claims("erin", 300))).await.0.unwrap();
    assert_eq!(fetched(), 2);
    // Made-up kids refetch at most once per `unknown_kid_refresh`.
    for _ in 0..5 {
        let token = k2.sign("k9", claims("erin", 300));
        let mut ctx = req(&[("authorization", &format!("Bearer {token}"))], "10.0.0.6");
        let r = f.filter.on_request(&mut ctx).await;
        assert!(r.is_err());
        assert_eq!(ctx.reject_reason, Some("jwt_unknown_kid"));
    }
    assert_eq!(fetched(), 2);
}

#[test]
fn jwt_options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let cx = BuildContext {
        config_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let base = json!({"jwks_url": "http://127.0.0.1:9/certs", "issuer": "i", "audience": ["a"]});
    let with = |k: &str, v: serde_json::Value| {
        let mut o = base.clone();
        o[k] = v;
        json!({ "jwt": o })
    };
    for (opts, want) in [
        (
            with("algorithms", json!(["HS256"])),
            "HMAC tokens are not accepted",
        ),
        (with("algorithms", json!(["none"])), "not a JWS algorithm"),
        (with("algorithms", json!([])), "at least one algorithm"),
        (with("audience", json!([])), "at least one audience"),
        (
            with("jwks_url", json!("ftp://idp/certs")),
            "http:// or https://",
        ),
        (with("leeway", json!("1h")), "at most 300s"),
    ] {
        let err = build(&opts, &cx).err().expect("refused").to_string();
        assert!(err.contains("jwt.") && err.contains(want), "{opts}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_edge_cases_fail_closed_without_locking_out_users() {
    let k1 = SigningKey::new("k1");
    let set = Arc::new(std::sync::Mutex::new(
        json!({"keys": [k1.jwk()]}).to_string(),
    ));
    let (url, _) = jwks_server(set);
    let f = fixture(json!({
        "keys_file": "keys.yaml",
        "jwt": {"jwks_url": url, "issuer": "https://idp.example", "audience": ["llm-gateway"],
                "models_claim": "models"}
    }));
    // `models_claim` configured but absent or empty: refused, never "any model".
    for models in [json!(null), json!([]), json!(""), json!(7)] {
        let mut c = claims("dave", 300);
        c["models"] = models.clone();
        let token = k1.sign("k1", c);
        let mut ctx = req(&[("authorization", &format!("Bearer {token}"))], "10.0.1.1");
        assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 401);
        assert_eq!(ctx.reject_reason, Some("jwt_no_models"), "{models}");
    }
    // An imported API key that happens to look like a JWT is still found in the keys file.
    let odd = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.c2ln";
    std::fs::write(
        f.dir.path().join("keys.yaml"),
        keys_yaml(&format!(
            "  - id: legacy\n    key_sha256: {}\n",
            keygen::hash_key(odd)
        )),
    )
    .unwrap();
    f.filter.reload().unwrap();
    let mut ctx = req(&[("authorization", &format!("Bearer {odd}"))], "10.0.1.1");
    f.filter.on_request(&mut ctx).await.unwrap();
    assert_eq!(ctx.principal.unwrap().id, "legacy");
    // The provider down from the start: tokens refused, but not counted against the client.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = fixture(json!({
        "jwt": {"jwks_url": format!("http://127.0.0.1:{port}/certs"), "issuer": "https://idp.example",
                "audience": ["llm-gateway"], "timeout": "200ms"}
    }));
    let token = k1.sign("k1", claims("dave", 300));
    for _ in 0..15 {
        let mut ctx = req(&[("authorization", &format!("Bearer {token}"))], "10.0.1.2");
        assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 503);
        assert_eq!(ctx.reject_reason, Some("jwt_keys_unavailable"));
    }
}

/// An OpenID provider on a plain thread: its discovery document (naming `claimed_issuer`,
/// or itself) and its key set. Returns its base URL (the issuer).
fn oidc_provider(set: String, claimed_issuer: Option<String>) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let issuer = claimed_issuer.unwrap_or_else(|| base.clone());
    let document =
        json!({"issuer": issuer, "jwks_uri": format!("{base}/protocol/certs")}).to_string();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            let (status, body) = if head.starts_with("GET /.well-known/openid-configuration ") {
                ("200 OK", document.clone())
            } else if head.starts_with("GET /protocol/certs ") {
                ("200 OK", set.clone())
            } else {
                ("404 Not Found", String::new())
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    base
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_keys_found_by_issuer_discovery() {
    let k1 = SigningKey::new("k1");
    let set = json!({"keys": [k1.jwk()]}).to_string();
    let issuer = oidc_provider(set.clone(), None);
    let mut c = claims("erin", 300);
    c["iss"] = json!(issuer);
    let token = k1.sign("k1", c.clone());
    let f = fixture(json!({
        "jwt": {"issuer_discovery": true, "issuer": issuer, "audience": ["llm-gateway"]}
    }));
    let mut ctx = req(&[("authorization", &format!("Bearer {token}"))], "10.0.0.5");
    f.filter.on_request(&mut ctx).await.unwrap();
    assert_eq!(ctx.principal.unwrap().id, "erin");
    // `check` says where the keys came from.
    let sources = f.filter.identity_sources().join("; ");
    assert!(
        sources.contains(&format!(
            "{issuer}/protocol/certs, discovered at {issuer}/.well-known/openid-configuration"
        )),
        "{sources}"
    );

    // A discovery document that names another issuer is not believed: whoever serves it
    // could otherwise hand out keys for tokens of any issuer.
    let liar = oidc_provider(set, Some("https://idp.example".into()));
    let f = fixture(json!({
        "jwt": {"issuer_discovery": format!("{liar}/.well-known/openid-configuration"),
                "issuer": "http://other.example", "audience": ["llm-gateway"]}
    }));
    let mut c = claims("erin", 300);
    c["iss"] = json!("http://other.example");
    let mut ctx = req(
        &[("authorization", &format!("Bearer {}", k1.sign("k1", c)))],
        "10.0.0.5",
    );
    assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 503);
    assert_eq!(ctx.reject_reason, Some("jwt_keys_unavailable"));
}

#[test]
fn jwt_needs_exactly_one_key_source() {
    let dir = tempfile::tempdir().unwrap();
    let cx = BuildContext {
        config_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    for (jwt, want) in [
        (
            json!({"issuer": "https://i", "audience": ["a"]}),
            "needs jwks_url",
        ),
        (
            json!({"jwks_url": "https://i/certs", "issuer_discovery": true, "issuer": "https://i", "audience": ["a"]}),
            "either jwks_url or issuer_discovery",
        ),
        (
            json!({"issuer_discovery": true, "issuer": "my-issuer", "audience": ["a"]}),
            "jwt.issuer",
        ),
        (
            json!({"issuer_discovery": "http://idp/.well-known/openid-configuration", "issuer": "https://idp", "audience": ["a"]}),
            "must be fetched over https://",
        ),
    ] {
        let err = build(&json!({ "jwt": jwt }), &cx)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(want), "{jwt}: {err}");
    }
}

/// The headers the forward validator reads (here a session cookie) never reach a backend,
/// however the request authenticated: also when a local API key settled it.
#[tokio::test]
async fn the_validator_s_headers_are_removed_whoever_settles_the_request() {
    let f = fixture(json!({
        "keys_file": "keys.yaml",
        "forward": {"url": "http://127.0.0.1:9/verify", "headers": ["authorization", "x-api-key", "cookie"]}
    }));
    let mut ctx = req(
        &[("x-api-key", ALICE), ("cookie", "_sso=secret-session")],
        "10.0.0.7",
    );
    f.filter.on_request(&mut ctx).await.unwrap();
    assert_eq!(ctx.principal.as_ref().unwrap().id, "alice");
    assert!(!ctx.headers.contains_key("cookie"));
    assert!(!ctx.headers.contains_key("x-api-key"));
}

/// Review: a validator's URL with a password in it (`https://gw:secret@…`, how reqwest sends
/// Basic credentials) was shown whole in `/admin/auth`, `check` and the logs.
#[tokio::test]
async fn a_validator_s_password_is_never_shown() {
    let (url, _) = validator().await;
    let with_secret = url.replacen("http://", "http://gw:s3cret@", 1) + "?token=t0ken";
    let f = fixture(json!({"forward": {"url": with_secret, "timeout": "300ms"}}));
    let (_, report) = f.filter.admin_report().await.unwrap();
    let sources = f.filter.identity_sources().join("; ");
    for shown in [report.to_string(), sources] {
        assert!(
            !shown.contains("s3cret") && !shown.contains("t0ken"),
            "{shown}"
        );
        assert!(shown.contains("gw:***@"), "{shown}");
    }
}

/// Review: the keys file and the htpasswd file were reloaded together, so a typo in the
/// htpasswd file kept a key the keys file had just revoked working. Each file is read on its
/// own now; the broken one keeps its previous contents and the reload says so.
#[tokio::test]
async fn a_broken_htpasswd_file_does_not_keep_a_revoked_key() {
    let f = fixture(json!({"keys_file": "keys.yaml", "htpasswd": "htpasswd"}));
    let alice = format!("Bearer {ALICE}");
    let mut ctx = req(&[("authorization", &alice)], "10.0.0.5");
    f.filter.on_request(&mut ctx).await.unwrap();
    // Alice's key revoked, and a line of the htpasswd file broken in the same edit.
    std::fs::write(f.dir.path().join("keys.yaml"), "keys: []\n").unwrap();
    std::fs::write(f.dir.path().join("htpasswd"), "bob-without-a-hash\n").unwrap();
    let err = f.filter.reload().unwrap_err().to_string();
    assert!(err.contains("htpasswd"), "{err}");
    let mut ctx = req(&[("authorization", &alice)], "10.0.0.5");
    assert_eq!(f.filter.on_request(&mut ctx).await.unwrap_err().status, 401);
    // The htpasswd file kept its previous users.
    let bob = basic("bob", "secret");
    let mut ctx = req(&[("authorization", &bob)], "10.0.0.6");
    f.filter.on_request(&mut ctx).await.unwrap();
    // Both broken: nothing changes, and both are named.
    std::fs::write(
        f.dir.path().join("keys.yaml"),
        "keys: [ { id: x, bogus: 1 } ]\n",
    )
    .unwrap();
    let err = f.filter.reload().unwrap_err().to_string();
    assert!(err.contains("bogus") && err.contains("htpasswd"), "{err}");
    let mut ctx = req(&[("authorization", &bob)], "10.0.0.6");
    f.filter.on_request(&mut ctx).await.unwrap();
}

/// Review: DNS names are presented lower-cased; an untyped `mtls_subject` written with capitals
/// stopped matching the certificate's DNS name. It matches DNS names and email addresses in
/// any case (a common name still exactly), and two entries that differ only in case are a
/// config error.
#[tokio::test]
async fn untyped_subjects_match_dns_names_in_any_case() {
    let dir = tempfile::tempdir().unwrap();
    let write = |extra: &str| {
        std::fs::write(dir.path().join("keys.yaml"), keys_yaml(extra)).unwrap();
    };
    write("  - id: svc\n    mtls_subject: Svc-B.Internal\n");
    let cx = BuildContext {
        config_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let f = build(&json!({"keys_file": "keys.yaml", "mtls": "accept"}), &cx).unwrap();
    for (names, want) in [
        (vec!["dns:svc-b.internal"], Some("svc")),
        (vec!["cn:Svc-B.Internal"], Some("svc")),
        (vec!["cn:svc-b.internal"], None),
    ] {
        let mut ctx = req(&[], "10.0.0.9");
        ctx.client_cert_subjects = names.iter().map(|n| n.to_string()).collect();
        let got = f
            .on_request(&mut ctx)
            .await
            .ok()
            .map(|_| ctx.principal.unwrap().id.clone());
        assert_eq!(got.as_deref(), want, "{names:?}");
    }
    write("  - id: a\n    mtls_subject: svc.internal\n  - id: b\n    mtls_subject: SVC.internal\n");
    let e = f.reload().unwrap_err().to_string();
    assert!(
        e.contains("keys[4].mtls_subject") && e.contains("only in case"),
        "{e}"
    );
}
