//! Reading the held request body (every route that has one) and parsing it once where the
//! route names models.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use gateway_filter::http::{header, StatusCode, Version};
use gateway_filter::{Rejection, RequestCtx, Route};
use pingora_proxy::Session;
use serde_json::Value;

use super::strict_json::StrictError;

pub enum BodyError {
    TooLarge,
    Timeout,
    Read(String),
}

/// The client waits for leave to send its body (`Expect: 100-continue`). Not an HTTP/1.0
/// client's: it cannot read an interim answer, and RFC 9110 §10.1.1 has it ignored.
pub fn expects_continue(session: &Session) -> bool {
    let req = session.req_header();
    req.version >= Version::HTTP_11
        && req
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Reads the whole request body, refusing more than `max` bytes (announced or actual, so
/// chunked bodies without Content-Length are capped too) or a body slower than `timeout`.
pub async fn read(
    session: &mut Session,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, BodyError> {
    let announced = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge);
    }
    if expects_continue(session) {
        // Written before the body is read, any answer closes the connection after it
        // (Pingora's rule for a request whose body may be left unread): not this interim one,
        // or every client that asks leave (curl, for bodies over 1 KiB) loses keep-alive.
        let downstream = &mut *session.downstream_session;
        downstream.set_close_on_response_before_downstream_finish(false);
        let sent = downstream.write_continue_response().await;
        downstream.set_close_on_response_before_downstream_finish(true);
        sent.map_err(|e| BodyError::Read(format!("client connection failed: {e}")))?;
    }
    let deadline = tokio::time::Instant::now() + timeout;
    // Grown as bytes arrive, not sized by what the client announces: a slow client would
    // otherwise hold `max_body` from its first byte on.
    let mut buf = BytesMut::with_capacity(announced.map_or(16 << 10, |n| n.min(64 << 10) as usize));
    loop {
        let next = tokio::time::timeout_at(deadline, session.read_request_body()).await;
        match next {
            Err(_) => return Err(BodyError::Timeout),
            Ok(Err(e)) => {
                return Err(BodyError::Read(format!(
                    "could not read the request body: {}",
                    e.etype().as_str()
                )))
            }
            Ok(Ok(None)) => return Ok(buf.freeze()),
            Ok(Ok(Some(chunk))) => {
                if buf.len() + chunk.len() > max {
                    return Err(BodyError::TooLarge);
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
}

/// Reads and drops what the client already sent of a body nobody will read, at most `max`
/// bytes (a read of less counting as 4 KiB) and `wait`, without asking for more (no
/// `100 Continue`). Closing a socket with unread
/// bytes makes the kernel answer with a reset, which can reach the client before the answer
/// it was given; a small body that is already here is read so the answer arrives whole.
pub async fn discard(session: &mut Session, max: usize, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    let mut read = 0;
    while read <= max {
        match tokio::time::timeout_at(deadline, session.read_request_body()).await {
            // Each read counts as at least 4 KiB: chunk heads and extensions carry no payload,
            // and must not make the bound a matter of time alone.
            Ok(Ok(Some(chunk))) => read += chunk.len().max(4 << 10),
            _ => return,
        }
    }
}

fn bad(code: &'static str, message: impl Into<String>) -> Rejection {
    Rejection::new(StatusCode::BAD_REQUEST, code, message)
}

use gateway_filter::go_names::{fold as go_fold, go_eq};

/// Go's `encoding/json` (Ollama, including its `/v1` routes) matches field names without
/// regard to case, the last spelling winning, and folds `K` (U+212A) to `k` and `ſ` (U+017F)
/// to `s`: `{"model":"a","Model":"b"}` is `a` to the gateway and `b` to Ollama. Every field
/// of the objects Ollama binds to structs (the body, `options`, `stream_options`, each
/// message) is lowercase ASCII, so any other spelling is refused rather than guessed at.
fn exact_field_names(obj: &serde_json::Map<String, Value>) -> Result<(), Rejection> {
    let folds = |k: &str| k.chars().any(|c| go_fold(c) != c);
    let nested = ["options", "stream_options"]
        .into_iter()
        .filter_map(|k| obj.get(k).and_then(Value::as_object))
        .chain(
            obj.get("messages")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_object),
        );
    match std::iter::once(obj)
        .chain(nested)
        .flat_map(|o| o.keys())
        .find(|k| folds(k))
    {
        Some(k) => Err(bad(
            "invalid_field_name",
            format!(
                "field {:?} is not written in lowercase; model servers read field names without regard to case, so only the exact names are accepted",
                gateway_filter::echo(k)
            ),
        )),
        None => Ok(()),
    }
}

/// Parses a held body as a JSON object whose field names are exact and appear once each.
fn json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, Rejection> {
    let json = super::strict_json::parse(body).map_err(|e| match e {
        StrictError::Syntax(e) => bad(
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        ),
        StrictError::Duplicate(e) => bad(
            "duplicate_field",
            format!(
                "{e}; model servers read repeated fields differently, so each may appear only once"
            ),
        ),
    })?;
    let Value::Object(obj) = json else {
        return Err(bad(
            "invalid_request_body",
            "request body must be a JSON object",
        ));
    };
    exact_field_names(&obj)?;
    Ok(obj)
}

/// Parses the body as JSON once and puts model, output cap and stream flag into the context.
pub fn parse_inference(ctx: &mut RequestCtx, body: Bytes) -> Result<(), Rejection> {
    let obj = json_object(&body)?;
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) | None => return Err(bad("model_required", "`model` is required")),
        Some(_) => return Err(bad("invalid_model", "`model` must be a string")),
    };
    let ask = gateway_filter::output::read(ctx.route, &obj)
        .map_err(|e| bad("invalid_max_tokens", e.to_string()))?;
    let max_tokens = ask.total();
    ctx.completions = ask.choices;
    // Ollama streams chat and generate unless told not to; OpenAI only when asked.
    let stream_default = matches!(ctx.route, Route::OllamaChat | Route::OllamaGenerate);
    // A string or number here would be read as true by lax backends (pydantic) while the
    // gateway took the answer for a whole document.
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => stream_default,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("invalid_stream", "`stream` must be true or false")),
    };
    // llama.cpp's `lora` and SGLang's `lora_path` apply adapters whatever `model` says: the
    // name the allow-list judged is not what runs (also where the operator lets requests
    // set server settings).
    if ctx.route.wire_format() == gateway_filter::WireFormat::OpenAi {
        ctx.opaque_weights |= INFERENCE_ADAPTER_FIELDS
            .iter()
            .any(|f| obj.get(*f).is_some_and(|v| !v.is_null()));
    }
    ctx.model = Some(model);
    ctx.max_tokens = max_tokens;
    ctx.stream = stream;
    ctx.json = Some(Value::Object(obj));
    ctx.body = Some(body);
    Ok(())
}

/// Fields of an OpenAI-format inference body that pick adapters by id or path.
const INFERENCE_ADAPTER_FIELDS: [&str; 2] = ["lora", "lora_path"];

/// Fields of Ollama's show and management bodies that name a model.
const MODEL_FIELDS: [&str; 5] = ["model", "name", "source", "destination", "from"];

/// Fields of Ollama's create body whose model cannot be judged by name (`path`: the older
/// API's Modelfile on the server's own disk).
const OPAQUE_FIELDS: [&str; 5] = ["files", "adapters", "draft_files", "remote_host", "path"];

/// Fields of a body on a route the gateway has no parser for that load, pick or unload
/// adapters by name or path (vLLM, SGLang, llama.cpp, LoRAX, TGI), lower-case.
const ADAPTER_FIELDS: [&str; 11] = [
    "lora_name",
    "lora_path",
    "lora_int_id",
    "lora_request",
    "lora",
    "adapters",
    "adapter",
    "adapter_id",
    "adapter_ids",
    "adapter_source",
    "merged_adapters",
];

/// Whether an object, or one nested in it (objects and arrays, to the depth serde reads),
/// has an [`ADAPTER_FIELDS`] key, its case folded as Go's JSON decoder folds it.
fn names_adapters(obj: &serde_json::Map<String, Value>, depth: usize) -> bool {
    obj.iter()
        .any(|(k, v)| ADAPTER_FIELDS.iter().any(|f| go_eq(k, f)) || nested_adapters(v, depth + 1))
}

fn nested_adapters(v: &Value, depth: usize) -> bool {
    match v {
        _ if depth > 128 => false,
        Value::Object(o) => names_adapters(o, depth),
        Value::Array(items) => items.iter().any(|i| nested_adapters(i, depth + 1)),
        _ => false,
    }
}

/// Parses the body of a route that names models without generating (`/api/show`, Ollama's
/// management routes): every name goes to `named_models` for the allow-list, and `/api/show`'s
/// model (`model`, else `name`, as Ollama reads it) also routes the request.
pub fn parse_named_models(ctx: &mut RequestCtx, body: Bytes) -> Result<(), Rejection> {
    let obj = json_object(&body)?;
    for field in MODEL_FIELDS {
        match obj.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::String(m)) => ctx.named_models.push(m.clone()),
            Some(_) => return Err(bad("invalid_model", format!("`{field}` must be a string"))),
        }
    }
    // The older create API carried a Modelfile whose FROM line names the base model.
    let mut adapter = false;
    if let Some(modelfile) = obj.get("modelfile").and_then(Value::as_str) {
        let named = super::modelfile::read(modelfile);
        ctx.named_models.extend(named.bases);
        adapter = named.adapter;
    }
    // Weights by digest or path (`files`, `adapters`, `draft_files`, a Modelfile's `ADAPTER`
    // or `DRAFT`, a Modelfile on the server's disk: `path`) name no model the allow-list
    // could judge, nor does a model relayed to another server (`remote_host`: the prompt
    // leaves the box, as for a cloud model).
    ctx.opaque_weights = adapter
        || OPAQUE_FIELDS
            .iter()
            .any(|f| obj.get(*f).is_some_and(|v| !v.is_null()));
    if ctx.route == Route::OllamaShow {
        ctx.model = ["model", "name"]
            .iter()
            .find_map(|f| {
                obj.get(*f)
                    .and_then(Value::as_str)
                    .filter(|m| !m.is_empty())
            })
            .map(str::to_string);
    }
    ctx.json = Some(Value::Object(obj));
    ctx.body = Some(body);
    Ok(())
}

/// A body on a route the gateway has no parser for (one a custom rule allows, such as
/// `/v1/responses`). The request is marked `unknown_format`: its output limit cannot be read
/// or written, and the policy refuses it under a cap. If the body is a JSON object serde can
/// read, every field a case-blind server reads as `model` is named for the allow-list; a body
/// it cannot read (too deep, `NaN`, a byte-order mark…) names nothing, which a model-restricted
/// caller is refused for: other parsers may read what serde could not.
pub fn parse_other(ctx: &mut RequestCtx, body: &[u8]) -> Result<(), Rejection> {
    if body.is_empty() {
        return Ok(());
    }
    ctx.unknown_format = true;
    // A name twice in one object is read one way here and another by Go's decoder (which
    // merges repeated objects): such a body counts as unreadable, as `NaN` does.
    let obj = match super::strict_json::parse(body) {
        Ok(Value::Object(obj)) => obj,
        // Read, but not an object (a list, a number): still checked for media.
        Ok(other) => {
            ctx.media_reference = gateway_filter::media::referenced(&other);
            return Ok(());
        }
        Err(_) => {
            // Python's JSON reader (vLLM's, SGLang's) takes a byte-order mark, `NaN`, deeper
            // nesting: what looks like JSON may be read there and not here.
            // UTF-16 and UTF-32 too (a byte-order mark, or a NUL among the first bytes).
            let text = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
            let wide = body.starts_with(b"\xfe\xff")
                || body.starts_with(b"\xff\xfe")
                || body.iter().take(4).any(|b| *b == 0);
            ctx.unreadable_json = wide
                || text
                    .iter()
                    .find(|b| !b.is_ascii_whitespace())
                    .is_some_and(|b| matches!(b, b'{' | b'['));
            return Ok(());
        }
    };
    // A body that loads, picks or unloads adapters (vLLM's `/v1/load_lora_adapter`, SGLang,
    // LoRAX's and TGI's `parameters.adapter_id`) is model management whatever `model` it also
    // names: that name proves nothing here.
    ctx.opaque_weights |= names_adapters(&obj, 0);
    ctx.media_reference = gateway_filter::media::referenced_in(&obj);
    for (k, v) in &obj {
        if !go_eq(k, "model") {
            continue;
        }
        match v {
            Value::String(m) => ctx.named_models.push(m.clone()),
            _ => {
                return Err(bad(
                    "invalid_model",
                    format!("`{}` must be a string", gateway_filter::echo(k)),
                ))
            }
        }
    }
    // Kept for the policy (server settings), the audit's prompt hash and the trace, as an
    // inference body is; forwarded as it came (`ctx.body`), never rewritten.
    ctx.json = Some(Value::Object(obj));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_filter::http::Method;

    fn parse(path: &str, body: &str) -> Result<RequestCtx, Rejection> {
        let mut ctx = RequestCtx::new(String::new(), Method::POST, path.into());
        parse_inference(&mut ctx, Bytes::from(body.to_string())).map(|_| ctx)
    }

    #[test]
    fn extracts_model_cap_and_stream() {
        let c = parse(
            "/api/chat",
            r#"{"model":"llama3.1:8b","options":{"num_predict":64}}"#,
        )
        .unwrap();
        assert_eq!(c.model.as_deref(), Some("llama3.1:8b"));
        assert_eq!(c.max_tokens, Some(64));
        assert!(c.stream);
        let c = parse("/v1/chat/completions", r#"{"model":"m","max_tokens":10}"#).unwrap();
        assert_eq!(c.max_tokens, Some(10));
        assert!(!c.stream);
        let c = parse(
            "/api/generate",
            r#"{"model":"m","stream":false,"options":{"num_predict":-1}}"#,
        )
        .unwrap();
        assert_eq!(c.max_tokens, None);
        assert!(!c.stream);
    }

    #[test]
    fn rejects_bad_bodies_with_position() {
        let e = parse("/api/chat", "{\"model\": \"m\",\n oops}").unwrap_err();
        assert_eq!(e.code, "invalid_json");
        assert!(e.message.contains("line 2"), "{}", e.message);
        assert_eq!(
            parse("/api/chat", "[1]").unwrap_err().code,
            "invalid_request_body"
        );
        assert_eq!(parse("/api/chat", "{}").unwrap_err().code, "model_required");
        assert_eq!(
            parse("/api/chat", r#"{"model":3}"#).unwrap_err().code,
            "invalid_model"
        );
        for folded in [
            r#"{"model":"a","Model":"b"}"#,
            r#"{"model":"a","options":{"Num_predict":5}}"#,
            r#"{"model":"a","messages":[{"role":"user","Content":"x"}]}"#,
            "{\"model\":\"a\",\"options\":{\"num_\\u212Atx\":1}}",
            "{\"model\":\"a\",\"\\u017Fystem\":\"x\"}",
        ] {
            assert_eq!(
                parse("/api/chat", folded).unwrap_err().code,
                "invalid_field_name",
                "{folded}"
            );
        }
        assert!(
            parse(
                "/api/chat",
                r#"{"model":"a","format":{"properties":{"Name":{}}}}"#
            )
            .is_ok(),
            "schemas deeper down keep their names"
        );
    }

    /// A legacy Modelfile's `FROM` line is found however Ollama's parser would find it: after
    /// a byte-order mark or another character it does not print, on a line that ends at
    /// `\r`, in any case.
    #[test]
    fn every_from_line_of_a_modelfile_is_judged() {
        for modelfile in [
            "SYSTEM x\rFROM qwen2.5:7b",
            "\u{feff}FROM qwen2.5:7b",
            "SYSTEM x\r\n\tfrom\tqwen2.5:7b\r\n",
            "FROM \"qwen2.5:7b\"",
            "FROM \"\"\"qwen2.5:7b\"\"\"  ",
            // Attacker review: a first character Ollama drops (it does not print) still
            // starts the command.
            "\u{200b}FROM qwen2.5:7b",
            "SYSTEM x\n\u{1}from qwen2.5:7b",
        ] {
            let mut ctx = RequestCtx::new(String::new(), Method::POST, "/api/create".into());
            let body = serde_json::json!({"model": "llama3.1:mine", "modelfile": modelfile});
            parse_named_models(&mut ctx, Bytes::from(body.to_string())).unwrap();
            assert_eq!(
                ctx.named_models,
                ["llama3.1:mine", "qwen2.5:7b"],
                "{modelfile:?}"
            );
        }
        // Inside the name, Ollama drops what it does not print: the name without them is
        // judged too (`gpt-oss:120b-cloud` is a cloud model).
        let mut ctx = RequestCtx::new(String::new(), Method::POST, "/api/create".into());
        let body =
            serde_json::json!({"model": "m:1", "modelfile": "FROM gpt-oss:120b-clo\u{200b}ud"});
        parse_named_models(&mut ctx, Bytes::from(body.to_string())).unwrap();
        assert_eq!(
            ctx.named_models,
            ["m:1", "gpt-oss:120b-cloud", "gpt-oss:120b-clo\u{200b}ud"]
        );
    }
}
