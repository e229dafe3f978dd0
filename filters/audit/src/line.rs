//! One audit line, built from the finished request's context.

use std::fmt::Display;
use std::net::IpAddr;
use std::time::SystemTime;

use gateway_filter::prompt::prompt_texts;
use gateway_filter::redact::clip;
use gateway_filter::{Decision, RequestCtx};
use hmac::{Hmac, Mac};
use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};

/// The audit's `prompt_hash_key`, ready to hash with.
pub type PromptKey = Hmac<Sha256>;

/// SHA-256 over each prompt text's UTF-8 bytes followed by one 0x1E (record separator) byte,
/// so ["ab", "c"] and ["a", "bc"] differ and identical prompts hash the same.
pub fn prompt_sha256(texts: &[&str]) -> String {
    PromptHash::of(texts, None).as_str().to_string()
}

/// [`prompt_sha256`] (or its HMAC with the audit's key) in lowercase hex, on the stack: an
/// audit line is written without allocating for each of its fields.
pub struct PromptHash([u8; 64]);

impl PromptHash {
    fn of(texts: &[&str], key: Option<&PromptKey>) -> PromptHash {
        let digest = match key {
            None => {
                let mut h = Sha256::new();
                for t in texts {
                    h.update(t.as_bytes());
                    h.update([0x1e]);
                }
                h.finalize()
            }
            Some(key) => {
                let mut h = key.clone();
                for t in texts {
                    h.update(t.as_bytes());
                    h.update(&[0x1e]);
                }
                h.finalize().into_bytes()
            }
        };
        let mut hex = [0u8; 64];
        // 32 bytes always fit 64 hex digits.
        let _ = hex::encode_to_slice(digest, &mut hex);
        PromptHash(hex)
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl Serialize for PromptHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Written through its `Display` (timestamp, decision, address), with no string in between.
fn display<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn display_opt<T: Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

#[derive(Serialize)]
pub struct AuditLine<'a> {
    #[serde(serialize_with = "display")]
    pub ts: humantime::Rfc3339Timestamp,
    pub request_id: &'a str,
    pub principal: Option<&'a str>,
    /// How the principal authenticated (`api_key`, `basic`, `jwt`, `forward`, `proxy`,
    /// `mtls`): a JWT subject and an API key of the same id are told apart.
    pub auth_method: Option<&'static str>,
    /// Only for a login with that key: other methods may name a keys-file entry too.
    pub key_sha256_prefix: Option<&'a str>,
    #[serde(serialize_with = "display_opt")]
    pub client_ip: Option<IpAddr>,
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'static str,
    pub model: Option<&'a str>,
    pub prompt_sha256: Option<PromptHash>,
    /// With the audit's `prompt_hash_key`, instead of `prompt_sha256` (which is then null): a
    /// plain hash of a short prompt lets anyone who reads the log confirm a guess of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_hmac_sha256: Option<PromptHash>,
    pub prompt_chars: Option<usize>,
    pub stream: bool,
    pub status: u16,
    #[serde(serialize_with = "display")]
    pub decision: &'a Decision,
    pub reason: Option<&'static str>,
    pub backend: Option<&'a str>,
    pub retries: u32,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// `reported` by the model server, or `counted` by the gateway (text events that
    /// passed, the prompt estimated) when the server reported none; absent without usage.
    pub tokens: Option<&'static str>,
    pub cost_usd: Option<f64>,
    pub ttfb_ms: Option<f64>,
    pub duration_ms: Option<f64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub user_agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Vec<&'a str>>,
}

fn ms(d: Option<std::time::Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3)
}

impl<'a> AuditLine<'a> {
    pub fn new(
        ctx: &'a RequestCtx,
        capture_prompts: bool,
        key: Option<&PromptKey>,
    ) -> AuditLine<'a> {
        let started = SystemTime::now() - ctx.started.elapsed();
        let texts = ctx.json.as_ref().map(prompt_texts);
        AuditLine {
            ts: humantime::format_rfc3339_millis(started),
            request_id: &ctx.request_id,
            principal: ctx.principal.as_deref().map(|p| p.id.as_str()),
            auth_method: ctx.principal.as_deref().map(|p| p.method),
            key_sha256_prefix: ctx
                .principal
                .as_deref()
                .filter(|p| p.method == "api_key")
                .and_then(|p| p.key_sha256_prefix.as_deref()),
            client_ip: ctx.client_ip.map(|ip| ip.to_canonical()),
            method: clip(ctx.method.as_str()),
            path: clip(&ctx.path),
            route: ctx.route.as_str(),
            model: ctx.model.as_deref().map(clip),
            prompt_sha256: texts
                .as_deref()
                .filter(|_| key.is_none())
                .map(|t| PromptHash::of(t, None)),
            prompt_hmac_sha256: texts
                .as_deref()
                .zip(key)
                .map(|(t, k)| PromptHash::of(t, Some(k))),
            prompt_chars: texts
                .as_ref()
                .map(|t| t.iter().map(|s| s.chars().count()).sum()),
            stream: ctx.stream,
            status: ctx.status,
            decision: &ctx.decision,
            reason: ctx.reject_reason,
            backend: ctx.backend.as_deref(),
            retries: ctx.retries,
            prompt_tokens: ctx.usage.map(|u| u.prompt_tokens),
            completion_tokens: ctx.usage.map(|u| u.completion_tokens),
            tokens: ctx
                .usage
                .map(|u| if u.counted { "counted" } else { "reported" }),
            cost_usd: ctx.cost_usd,
            ttfb_ms: ms(ctx.ttfb),
            duration_ms: ms(ctx.duration),
            bytes_in: ctx.bytes_in,
            bytes_out: ctx.bytes_out,
            user_agent: ctx.header_str("user-agent").map(clip),
            prompt: if capture_prompts { texts } else { None },
        }
    }
}

/// `Display` output on the stack (timestamp, address, decision): a line is written without
/// a `String` per field.
struct StackStr {
    buf: [u8; 96],
    len: usize,
}

impl StackStr {
    fn of(v: &impl Display) -> Option<StackStr> {
        use std::fmt::Write;
        let mut s = StackStr {
            buf: [0; 96],
            len: 0,
        };
        write!(s, "{v}").ok()?;
        Some(s)
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl std::fmt::Write for StackStr {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// A JSON string, escaped as `serde_json` escapes it (writing to a `Vec` cannot fail).
fn string(out: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *out, s);
}

fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn display_string(out: &mut Vec<u8>, v: &impl Display) {
    match StackStr::of(v) {
        Some(s) => string(out, s.as_str()),
        None => string(out, &v.to_string()),
    }
}

fn int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn opt_int(out: &mut Vec<u8>, n: Option<impl itoa::Integer>) {
    match n {
        Some(n) => int(out, n),
        None => out.extend_from_slice(b"null"),
    }
}

/// Written by `serde_json` itself (shortest round-trip digits, `null` when not finite).
fn opt_float(out: &mut Vec<u8>, f: Option<f64>) {
    let _ = serde_json::to_writer(&mut *out, &f);
}

impl AuditLine<'_> {
    /// The line as compact JSON, byte for byte what `serde_json` writes for the derived
    /// `Serialize` (tested), without its per-field machinery: the keys are literals and only
    /// the values that can hold anything (ids, paths, names, the user agent) go through its
    /// string escaping. About half the cost of the derived form per request.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"ts\":");
        display_string(out, &self.ts);
        out.extend_from_slice(b",\"request_id\":");
        string(out, self.request_id);
        out.extend_from_slice(b",\"principal\":");
        opt_string(out, self.principal);
        out.extend_from_slice(b",\"auth_method\":");
        opt_string(out, self.auth_method);
        out.extend_from_slice(b",\"key_sha256_prefix\":");
        opt_string(out, self.key_sha256_prefix);
        out.extend_from_slice(b",\"client_ip\":");
        match &self.client_ip {
            Some(ip) => display_string(out, ip),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"method\":");
        string(out, self.method);
        out.extend_from_slice(b",\"path\":");
        string(out, self.path);
        out.extend_from_slice(b",\"route\":");
        string(out, self.route);
        out.extend_from_slice(b",\"model\":");
        opt_string(out, self.model);
        out.extend_from_slice(b",\"prompt_sha256\":");
        opt_string(out, self.prompt_sha256.as_ref().map(PromptHash::as_str));
        if let Some(h) = &self.prompt_hmac_sha256 {
            out.extend_from_slice(b",\"prompt_hmac_sha256\":");
            string(out, h.as_str());
        }
        out.extend_from_slice(b",\"prompt_chars\":");
        opt_int(out, self.prompt_chars);
        out.extend_from_slice(if self.stream {
            b",\"stream\":true,\"status\":"
        } else {
            b",\"stream\":false,\"status\":"
        });
        int(out, self.status);
        out.extend_from_slice(b",\"decision\":");
        display_string(out, self.decision);
        out.extend_from_slice(b",\"reason\":");
        opt_string(out, self.reason);
        out.extend_from_slice(b",\"backend\":");
        opt_string(out, self.backend);
        out.extend_from_slice(b",\"retries\":");
        int(out, self.retries);
        out.extend_from_slice(b",\"prompt_tokens\":");
        opt_int(out, self.prompt_tokens);
        out.extend_from_slice(b",\"completion_tokens\":");
        opt_int(out, self.completion_tokens);
        out.extend_from_slice(b",\"tokens\":");
        opt_string(out, self.tokens);
        out.extend_from_slice(b",\"cost_usd\":");
        opt_float(out, self.cost_usd);
        out.extend_from_slice(b",\"ttfb_ms\":");
        opt_float(out, self.ttfb_ms);
        out.extend_from_slice(b",\"duration_ms\":");
        opt_float(out, self.duration_ms);
        out.extend_from_slice(b",\"bytes_in\":");
        int(out, self.bytes_in);
        out.extend_from_slice(b",\"bytes_out\":");
        int(out, self.bytes_out);
        out.extend_from_slice(b",\"user_agent\":");
        opt_string(out, self.user_agent);
        if let Some(texts) = &self.prompt {
            out.extend_from_slice(b",\"prompt\":[");
            for (i, t) in texts.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                string(out, t);
            }
            out.push(b']');
        }
        out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_filter::redact::MAX_SHOWN as MAX_FIELD;
    use serde_json::json;

    #[test]
    fn long_client_values_are_cut() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(400); // 800 bytes
        let cut = clip(&long);
        assert!(cut.len() <= MAX_FIELD && cut.len() >= MAX_FIELD - 1);
        assert!(long.starts_with(cut));
        let path = format!("/v1/{}", "x".repeat(10_000));
        let method = gateway_filter::http::Method::from_bytes(&[b'X'; 65_000]).unwrap();
        let mut c = RequestCtx::new("r".into(), method, path.clone());
        c.model = Some("m".repeat(100_000));
        c.headers
            .insert("user-agent", "u".repeat(4096).parse().unwrap());
        let line = AuditLine::new(&c, false, None);
        assert_eq!(line.path.len(), MAX_FIELD);
        assert_eq!(line.method.len(), MAX_FIELD);
        assert_eq!(line.model.map(str::len), Some(MAX_FIELD));
        assert_eq!(line.user_agent.map(str::len), Some(MAX_FIELD));
    }

    /// The line's fields, in order, and how each is written (the timestamp's shape only).
    #[test]
    fn a_line_is_written_as_documented() {
        use gateway_filter::http::Method;
        let mut c = RequestCtx::new("req-1".into(), Method::POST, "/v1/chat/completions".into());
        c.client_ip = Some("::ffff:10.0.0.7".parse().unwrap());
        c.model = Some("llama3:latest".into());
        c.json = Some(json!({"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}));
        c.status = 429;
        c.decision = gateway_filter::Decision::Rejected {
            filter: "ratelimit",
            code: "rate_limited",
        };
        c.reject_reason = Some("rate_limited");
        c.ttfb = Some(std::time::Duration::from_micros(1500));
        c.cost_usd = Some(0.25);
        let line = serde_json::to_string(&AuditLine::new(&c, false, None)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
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
                "reason",
                "backend",
                "retries",
                "prompt_tokens",
                "completion_tokens",
                "tokens",
                "cost_usd",
                "ttfb_ms",
                "duration_ms",
                "bytes_in",
                "bytes_out",
                "user_agent"
            ]
        );
        let ts = v["ts"].as_str().unwrap();
        assert!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[19] == b'.',
            "{ts}"
        );
        let rest = line.split_once(",\"request_id\"").unwrap().1;
        assert_eq!(
            rest,
            format!(
                ":\"req-1\",\"principal\":null,\"auth_method\":null,\"key_sha256_prefix\":null,\"client_ip\":\"10.0.0.7\",\"method\":\"POST\",\"path\":\"/v1/chat/completions\",\"route\":\"openai_chat\",\"model\":\"llama3:latest\",\"prompt_sha256\":\"{}\",\"prompt_chars\":2,\"stream\":false,\"status\":429,\"decision\":\"ratelimit:rate_limited\",\"reason\":\"rate_limited\",\"backend\":null,\"retries\":0,\"prompt_tokens\":null,\"completion_tokens\":null,\"tokens\":null,\"cost_usd\":0.25,\"ttfb_ms\":1.5,\"duration_ms\":null,\"bytes_in\":0,\"bytes_out\":0,\"user_agent\":null}}",
                hex::encode(Sha256::digest(b"hi\x1e"))
            )
        );
    }

    /// The hand-written line is exactly the derived one, for every kind of value a client
    /// or an operator controls: quotes, backslashes, control characters, line breaks,
    /// non-ASCII text, JSON in a string, numbers that are not finite, empty and absent
    /// fields, every decision, both address families, captured prompts.
    #[test]
    fn the_written_line_is_exactly_serde_jsons() {
        use gateway_filter::http::{HeaderValue, Method};
        use gateway_filter::{Decision, Principal, Usage};
        use std::sync::Arc;
        let nasty = [
            "",
            "plain",
            "quote \" and back\\slash",
            "line\nbreak\r\ttab \u{1} \u{1f} \u{7f}",
            "caf\u{e9} \u{1f600} \u{2028}\u{2029}",
            "{\"injected\":true}\n{\"fake\":\"line\"}",
            "</script><!--",
        ];
        let decisions = [
            Decision::Allowed,
            Decision::Rejected {
                filter: "policy",
                code: "model_not_allowed",
            },
            Decision::Failed {
                code: "upstream_error",
            },
        ];
        let mut checked = 0;
        for (i, text) in nasty.iter().enumerate() {
            for (j, decision) in decisions.iter().enumerate() {
                let mut c = RequestCtx::new((*text).into(), Method::POST, (*text).into());
                c.client_ip = [
                    Some("10.1.2.3".parse().unwrap()),
                    Some("2001:db8::7".parse().unwrap()),
                    None,
                ][(i + j) % 3];
                c.model = (i % 2 == 0).then(|| (*text).to_string());
                c.backend = (j != 1).then(|| std::sync::Arc::from(*text));
                c.json =
                    Some(json!({"messages": [{"role": "user", "content": text}], "prompt": text}));
                if let Ok(v) = HeaderValue::from_str(text) {
                    c.headers.insert("user-agent", v);
                }
                c.principal = (j > 0).then(|| {
                    Arc::new(Principal {
                        id: (*text).into(),
                        method: ["api_key", "jwt", ""][i % 3],
                        key_sha256_prefix: (i % 2 == 1).then(|| (*text).into()),
                        ..Default::default()
                    })
                });
                c.decision = decision.clone();
                c.reject_reason = (j == 1).then_some("model_not_allowed");
                c.status = [200, 403, 502][j];
                c.stream = i % 2 == 1;
                c.retries = i as u32;
                c.usage = (j != 1).then_some(Usage {
                    prompt_tokens: u64::MAX,
                    completion_tokens: i as u64,
                    counted: j == 2,
                });
                c.cost_usd = [
                    None,
                    Some(0.1 + 0.2),
                    Some(f64::NAN),
                    Some(f64::INFINITY),
                    Some(1e21),
                    Some(-0.0),
                    Some(123456.789e-12),
                ][i];
                c.ttfb = Some(std::time::Duration::from_nanos(1_234_567 * i as u64));
                c.duration = (i > 2).then(|| std::time::Duration::from_secs(86_400 * 365));
                c.bytes_in = u64::MAX - i as u64;
                c.bytes_out = i as u64;
                let keyed = <PromptKey as Mac>::new_from_slice(b"0123456789abcdef").unwrap();
                for (capture, key) in [
                    (false, None),
                    (true, None),
                    (false, Some(&keyed)),
                    (true, Some(&keyed)),
                ] {
                    let line = AuditLine::new(&c, capture, key);
                    let mut written = Vec::new();
                    line.write_json(&mut written);
                    let derived = serde_json::to_vec(&line).unwrap();
                    assert_eq!(
                        String::from_utf8_lossy(&written),
                        String::from_utf8_lossy(&derived),
                        "text {text:?}, decision {decision}, capture {capture}, key {}",
                        key.is_some()
                    );
                    // One line: a client's text never breaks it.
                    assert!(!written.contains(&b'\n'));
                    serde_json::from_slice::<serde_json::Value>(&written).unwrap();
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, nasty.len() * decisions.len() * 4);
    }

    #[test]
    fn prompt_hash_covers_the_texts_only() {
        let a = json!({"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]});
        let b = json!({"model": "other", "max_tokens": 5, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]});
        assert_eq!(prompt_texts(&a), ["be brief", "hi"]);
        assert_eq!(
            prompt_sha256(&prompt_texts(&a)),
            prompt_sha256(&prompt_texts(&b))
        );
        assert_ne!(prompt_sha256(&["ab", "c"]), prompt_sha256(&["a", "bc"]));
        assert_eq!(prompt_texts(&json!({"input": ["x", "y"]})), ["x", "y"]);
        assert_eq!(prompt_texts(&json!({"prompt": "p"})), ["p"]);
        // Known vector: SHA-256("hi" 0x1E).
        assert_eq!(
            prompt_sha256(&["hi"]),
            hex::encode(Sha256::digest(b"hi\x1e"))
        );
    }
}
