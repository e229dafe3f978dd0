//! A request's parsed JSON is let go once its body is on its way to a backend: a tree of
//! small values takes up to ~40 times its text (a 1 MiB `[0,0,…]` some 40 MB), and an answer
//! can stream for minutes. What the answer's handling reads from the tree is taken first
//! ([`BodyFacts`]); the request's end (audit, telemetry) reads the body again, once, from the
//! bytes that were sent.

use bytes::Bytes;
use gateway_filter::{RequestCtx, Route};
use serde_json::Value;

/// Bodies smaller than this keep their tree (at most ~40 times this): reading every small
/// body twice would cost each request more CPU than the memory it saves.
const KEEP_UNDER: usize = 16 * 1024;

/// What the answer's handling reads from the request's JSON.
#[derive(Debug, Default, Clone, Copy)]
pub struct BodyFacts {
    /// The request offers tools: a late server error may be the request's own fault.
    pub tools: bool,
    /// Quarter tokens of prompt text the answer repeats ([`echoed`]).
    pub echoed: u64,
    /// The tree was let go: [`restore`] reads it again for the request's end.
    released: bool,
}

/// Takes what the answer's handling reads from the request's JSON and, for a large body, lets
/// the tree go: `sent` (the body as it goes to the backend, rewrites included) becomes the
/// body the request holds.
pub fn take(req: &mut RequestCtx, sent: &Bytes) -> BodyFacts {
    let Some(json) = req.json.as_ref() else {
        return BodyFacts::default();
    };
    let given = |k: &str| json.get(k).is_some_and(|v| !v.is_null());
    // Tools offered: a list with something in it (clients send `"tools": []` by default).
    let tools = json
        .get("tools")
        .and_then(|v| v.as_array())
        .is_some_and(|a| !a.is_empty());
    req.checked_output = tools || given("tool_choice") || given("response_format");
    let mut facts = BodyFacts {
        tools,
        echoed: if req.completions > 1 { echoed(req) } else { 0 },
        ..BodyFacts::default()
    };
    if sent.len() >= KEEP_UNDER {
        // Worked out now and kept by the request (`RequestCtx::prompt_tokens`).
        req.prompt_tokens();
        facts.released = true;
        req.json = None;
        req.body = Some(sent.clone());
        req.body_rewritten = false;
    }
    facts
}

/// The request's end reads its JSON (the audit's prompt hash, telemetry's prompt): a tree let
/// go is read again from the body sent, which was read as JSON before.
pub fn restore(req: &mut RequestCtx, facts: &BodyFacts) {
    if facts.released && req.json.is_none() {
        req.json = req
            .body
            .as_deref()
            .and_then(|b| super::strict_json::parse(b).ok());
    }
}

/// Quarter tokens of prompt text an answer repeats (`"echo": true` on `/v1/completions`:
/// each prompt once per completion of it, `n`), 0 otherwise. Chat answers never repeat the
/// prompt (llama.cpp ignores `echo` there and still runs every completion).
fn echoed(req: &mut RequestCtx) -> u64 {
    let Some(body) = req
        .json
        .as_ref()
        .filter(|_| req.route == Route::OpenAiCompletions)
    else {
        return 0;
    };
    if body.get("echo").and_then(Value::as_bool) != Some(true) {
        return 0;
    }
    // Completions per prompt, as the output bound reads them (`n`, `best_of`, …).
    let prompts = body
        .as_object()
        .map_or(1, gateway_filter::output::prompts)
        .max(1);
    let n = (req.completions / prompts).max(1);
    (req.prompt_tokens() * 4).saturating_mul(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_filter::http::Method;
    use serde_json::json;

    fn request(body: Value) -> (RequestCtx, Bytes) {
        let mut req = RequestCtx::new(String::new(), Method::POST, "/v1/chat/completions".into());
        let bytes = Bytes::from(serde_json::to_vec(&body).unwrap());
        req.body = Some(bytes.clone());
        req.json = Some(body);
        (req, bytes)
    }

    #[test]
    fn a_large_body_is_held_as_bytes_and_read_again_at_the_end() {
        let text = "word ".repeat(8_000);
        let body = json!({"model": "m", "messages": [{"role": "user", "content": text}],
            "tools": [{"type": "function", "function": {"name": "f"}}]});
        let (mut req, sent) = request(body.clone());
        let facts = take(&mut req, &sent);
        assert!(req.json.is_none(), "the tree is let go");
        assert!(facts.tools);
        // The text (10,000 tokens) and the tool, as estimated from the tree.
        let estimate = gateway_filter::prompt::prompt_tokens(&body);
        assert!(estimate >= 10_000);
        assert_eq!(req.prompt_tokens(), estimate, "kept when the tree went");
        restore(&mut req, &facts);
        assert_eq!(req.json, Some(body), "read again as it was sent");
    }

    #[test]
    fn a_small_body_keeps_its_tree() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let (mut req, sent) = request(body.clone());
        let facts = take(&mut req, &sent);
        assert_eq!(req.json, Some(body));
        assert!(!facts.tools);
        assert_eq!(req.prompt_tokens(), 1);
    }

    /// A body the gateway rewrote (an output cap, stream usage) is held as sent: the audit
    /// reads what the backend got.
    #[test]
    fn a_rewritten_body_is_held_as_sent() {
        let body =
            json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(20_000)}]});
        let (mut req, _) = request(json!({"model": "m"}));
        req.body_rewritten = true;
        let sent = Bytes::from(serde_json::to_vec(&body).unwrap());
        let facts = take(&mut req, &sent);
        assert!(!req.body_rewritten);
        assert_eq!(req.body.as_ref(), Some(&sent));
        restore(&mut req, &facts);
        assert_eq!(req.json, Some(body));
    }
}
