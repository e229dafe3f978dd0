//! Request shape: field types, prompt size, message count, the output-token cap, headers.

use gateway_filter::http::StatusCode;
use gateway_filter::output::{self, Limit};
use gateway_filter::{Rejection, RequestCtx, Route};
use serde_json::{json, Value};

fn bad(code: &'static str, message: impl Into<String>) -> Rejection {
    Rejection::new(StatusCode::BAD_REQUEST, code, message)
}

fn is_text_parts(v: &Value) -> bool {
    // OpenAI content parts: [{"type": "text", "text": "…"}, {"type": "image_url", …}]
    v.as_array().is_some_and(|parts| {
        parts
            .iter()
            .all(|p| p.get("type").is_some_and(Value::is_string))
    })
}

/// Checks the types of the fields each route reads.
pub fn check_types(route: Route, body: &Value) -> Result<(), Rejection> {
    match route {
        Route::OllamaChat | Route::OpenAiChat => {
            let Some(messages) = body.get("messages") else {
                return if route == Route::OpenAiChat {
                    Err(bad("invalid_messages", "`messages` is required"))
                } else {
                    Ok(())
                };
            };
            let list = messages
                .as_array()
                .ok_or_else(|| bad("invalid_messages", "`messages` must be an array of objects"))?;
            for (i, m) in list.iter().enumerate() {
                let obj = m.as_object().ok_or_else(|| {
                    bad(
                        "invalid_messages",
                        format!("messages[{i}] must be an object"),
                    )
                })?;
                if !obj.get("role").is_some_and(Value::is_string) {
                    return Err(bad(
                        "invalid_messages",
                        format!("messages[{i}].role must be a string"),
                    ));
                }
                match obj.get("content") {
                    None | Some(Value::Null) | Some(Value::String(_)) => {}
                    Some(v) if route == Route::OpenAiChat && is_text_parts(v) => {}
                    Some(_) => {
                        return Err(bad(
                            "invalid_messages",
                            format!("messages[{i}].content must be a string"),
                        ))
                    }
                }
            }
        }
        Route::OllamaGenerate | Route::OllamaEmbeddings => match body.get("prompt") {
            None | Some(Value::String(_)) => {}
            Some(_) => return Err(bad("invalid_prompt", "`prompt` must be a string")),
        },
        Route::OpenAiCompletions => match body.get("prompt") {
            Some(Value::String(_)) => {}
            Some(Value::Array(a))
                if a.iter()
                    .all(|p| p.is_string() || p.is_number() || p.is_array()) => {}
            _ => {
                return Err(bad(
                    "invalid_prompt",
                    "`prompt` must be a string or an array of strings",
                ))
            }
        },
        Route::OllamaEmbed | Route::OpenAiEmbeddings => match body.get("input") {
            Some(Value::String(_)) => {}
            Some(Value::Array(a))
                if a.iter()
                    .all(|p| p.is_string() || p.is_number() || p.is_array()) => {}
            _ => {
                return Err(bad(
                    "invalid_input",
                    "`input` must be a string or an array of strings",
                ))
            }
        },
        _ => {}
    }
    Ok(())
}

pub use gateway_filter::prompt::prompt_chars;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OverCap {
    #[default]
    Clamp,
    Reject,
}

/// Applies the output-token cap: requests above it are clamped (or refused), requests without
/// one get it, so no generation is unbounded. The ask is the largest of every field the route's
/// backends read, and the cap is written to all of them (see `gateway_filter::output`). Records
/// the request's total output bound (cap × completions) in the context.
pub fn apply_output_cap(ctx: &mut RequestCtx, cap: u64, mode: OverCap) -> Result<(), Rejection> {
    output::apply_limit(ctx, |ask| match ask.per_choice {
        Limit::Bounded(n) if n <= cap => Ok(n),
        Limit::Bounded(_) | Limit::Unbounded if mode == OverCap::Reject => Err(bad(
            "max_tokens_too_large",
            format!("at most {cap} output tokens may be requested"),
        )),
        _ => Ok(cap),
    })
    .map(drop)
}

/// Refuses more completions per request (`n`, `best_of`) than `max`.
pub fn check_choices(ctx: &RequestCtx, max: u64) -> Result<(), Rejection> {
    let Some(body) = ctx.json.as_ref().and_then(Value::as_object) else {
        return Ok(());
    };
    let ask =
        output::read(ctx.route, body).map_err(|e| bad("invalid_max_tokens", e.to_string()))?;
    if ask.choices > max {
        return Err(bad(
            "too_many_choices",
            format!("at most {max} completions (`n`, `best_of`, `n_cmpl`) may be requested"),
        ));
    }
    Ok(())
}

/// Most alternatives a token a request may ask to be shown by default (OpenAI's and vLLM's
/// limit, the range Ollama documents).
pub const MAX_LOGPROBS: u32 = 20;

/// The policy's bounds on what one generation may ask for beyond tokens.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Alternatives a token (`max_logprobs`).
    pub logprobs: f64,
    /// An image's side in pixels (`max_image_side`) and diffusion steps (`max_image_steps`).
    pub image_side: f64,
    pub image_steps: f64,
}

/// The fields that ask for alternatives a token: OpenAI's `top_logprobs` (and `logprobs` as a
/// number on `/v1/completions`), llama.cpp's `n_probs`, vLLM's `prompt_logprobs`, SGLang's
/// `top_logprobs_num`.
const LOGPROB_FIELDS: [&str; 5] = [
    "top_logprobs",
    "logprobs",
    "n_probs",
    "prompt_logprobs",
    "top_logprobs_num",
];

/// The first top-level field named in `limits` (in any case: Ollama's Go decoder folds it)
/// whose value is past its limit, with that limit ([`past`]).
fn past_limit<'a>(body: &'a Value, limits: &[(&str, f64)]) -> Option<(&'a str, f64)> {
    body.as_object()?.iter().find_map(|(key, v)| {
        let (_, max) = limits.iter().find(|(f, _)| key.eq_ignore_ascii_case(f))?;
        past(v, *max).then_some((gateway_filter::redact::clip(key), *max))
    })
}

/// Whether a value asks for more than `max`: a number past it or below -1 (llama.cpp reads
/// these as 32-bit integers without a range check, so -4294817296 became 150,000, a whole
/// vocabulary a token; -1 is vLLM's "all", which it bounds itself); a string read as a
/// number the way pydantic reads one (`" 25 "`, `"1_000"`), or that does not read as one
/// (fail closed: a server may read what this does not); a list by its elements (SGLang's
/// `top_logprobs_num` per prompt); an object. `true`, `false` and `null` ask for nothing
/// (`logprobs: true` is chat's flag).
fn past(v: &Value, max: f64) -> bool {
    let within = |n: f64| (-1.0..=max).contains(&n);
    match v {
        Value::Null | Value::Bool(_) => false,
        Value::Number(n) => !n.as_f64().is_some_and(within),
        Value::String(s) => !s.trim().replace('_', "").parse::<f64>().is_ok_and(within),
        Value::Array(items) => items.iter().any(|v| past(v, max)),
        Value::Object(_) => true,
    }
}

/// Refuses a request asking for more than `max` alternatives a token (`max_logprobs`):
/// llama.cpp bounds none of these, and writes that many (up to its whole vocabulary, about
/// 150,000 entries) into the answer for every token generated, gigabytes for a short answer.
pub fn check_logprobs(body: &Value, max: f64) -> Result<(), Rejection> {
    match past_limit(body, &LOGPROB_FIELDS.map(|f| (f, max))) {
        Some((key, max)) => Err(bad(
            "too_many_logprobs",
            format!(
                "`{key}` asks for more than {max} alternatives a token (or a negative number below -1); from -1 to {max} are accepted"
            ),
        )),
        None => Ok(()),
    }
}

/// Refuses an Ollama image generation (`/api/generate` with an image model: `width`,
/// `height`, `steps`, passed to the runner as given) past the policy's [`Limits`]: the output
/// cap counts tokens, which an image model does not make, so `steps: 2147483647` kept a GPU
/// busy without bound.
pub fn check_image_size(route: Route, body: &Value, limits: &Limits) -> Result<(), Rejection> {
    if route != Route::OllamaGenerate {
        return Ok(());
    }
    let fields = [
        ("width", limits.image_side),
        ("height", limits.image_side),
        ("steps", limits.image_steps),
    ];
    match past_limit(body, &fields) {
        Some((key, max)) => Err(bad(
            "image_too_large",
            format!("`{key}` may be at most {max} (image sides in pixels, diffusion steps)"),
        )),
        None => Ok(()),
    }
}

/// Messages as the model server may see them: Ollama's OpenAI layer makes each part of a
/// message's `content` list a message of its own (a turn, with its template around it), so
/// one message of 200 parts is 200.
pub fn message_count(body: &Value) -> usize {
    let turns = |m: &Value| match m.get("content") {
        Some(Value::Array(parts)) => parts.len().max(1),
        _ => 1,
    };
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, |messages| messages.iter().map(turns).sum());
    // The Responses API carries its turns in `input` (objects; an embedding's `input` is
    // strings or token lists, which are not turns).
    let input = body
        .get("input")
        .and_then(Value::as_array)
        .map_or(0, |items| {
            items.iter().filter(|i| i.is_object()).map(turns).sum()
        });
    messages + input
}

/// Whether requests may set what decides how the model server loads, keeps, formats or
/// schedules models ([`check_server_settings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ServerSettings {
    #[default]
    Refuse,
    Allow,
}

/// Whether media in messages may be given by URL ([`check_media_urls`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MediaUrls {
    /// Only `data:` URLs (the media inside the request).
    #[default]
    DataOnly,
    Allow,
}

/// Refuses media given by a URL other than `data:` in an OpenAI-format request's messages
/// (`image_url`, `video_url`, `audio_url`, any content part's `*_url`, as a string or an
/// object's `url`): vLLM, SGLang and llama.cpp's server fetch it, so a client could make the
/// model server request addresses on its own network (cloud metadata, admin pages) and tell
/// from the answer what is there. Ollama takes only the media itself.
pub fn check_media_urls(route: Route, body: &Value) -> Result<(), Rejection> {
    if route.wire_format() != gateway_filter::WireFormat::OpenAi {
        return Ok(());
    }
    match body
        .get("messages")
        .and_then(gateway_filter::media::referenced)
    {
        None => Ok(()),
        Some(field) => Err(media_url_refused(&field)),
    }
}

/// [`check_media_urls`] for a body on a route without a parser, from what the gateway found
/// reading it: a field giving media by reference, or JSON it could not read (Python's reader,
/// vLLM's and SGLang's, takes a byte-order mark or `NaN`: nothing in it was checked).
pub fn check_unknown_media(ctx: &RequestCtx) -> Result<(), Rejection> {
    if let Some(field) = &ctx.media_reference {
        return Err(media_url_refused(field));
    }
    if ctx.unreadable_json {
        return Err(unreadable("media given by URL"));
    }
    Ok(())
}

/// A body that looks like JSON but that serde could not read, which Python's reader (vLLM's,
/// SGLang's) may read: nothing in it was checked for `what`.
fn unreadable(what: &str) -> Rejection {
    bad(
        "invalid_request_body",
        format!("the body looks like JSON but cannot be read (a byte-order mark, NaN, a name written twice, nesting deeper than 128), so it cannot be checked for {what}"),
    )
}

pub fn media_url_refused(field: &str) -> Rejection {
    Rejection::new(
        StatusCode::FORBIDDEN,
        "media_url_not_allowed",
        format!(
            "`{}` must carry the media itself (a data: URL): this gateway does not let requests make the model server fetch URLs or read files",
            gateway_filter::echo(field)
        ),
    )
}

/// Ollama's runner options (`api.Runner`: how a model is loaded, and the older ones Ollama has
/// read over time). The scheduler reloads a model whenever a request's differ from the loaded
/// model's, so a client alternating two values reloads a model of many gigabytes for everyone
/// using it, at the cost of an empty request. `num_ctx` is one of them and is bounded by
/// `max_context_tokens`.
const RUNNER_OPTIONS: [&str; 15] = [
    "num_batch",
    "num_gpu",
    "main_gpu",
    "use_mmap",
    "num_thread",
    "numa",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mlock",
    "num_gqa",
    "rope_frequency_base",
    "rope_frequency_scale",
    "embedding_only",
];

/// Top-level fields with the same reach, by wire format: `/api/generate`'s `template` (a Go
/// template the server runs: nested `define`s multiply the prompt without bound); the
/// `chat_template` of vLLM and llama.cpp's server (a Jinja template the server runs), vLLM's
/// `mm_processor_kwargs` (e.g. a larger image resolution, more tokens per image) and
/// `priority` (under `--scheduling-policy priority`, ahead of everyone else's requests), and
/// llama.cpp's `lora` and SGLang's `lora_path` (apply any adapter the operator loaded, at any
/// scale, whatever model the request names: a model of the key's own choosing).
/// Ollama's `keep_alive` is removed instead ([`drop_keep_alive`]).
const OLLAMA_SETTINGS: [&str; 1] = ["template"];
const OPENAI_SETTINGS: [&str; 15] = [
    "chat_template",
    "mm_processor_kwargs",
    "priority",
    "lora",
    "lora_path",
    // vLLM: how media is decoded (`{"video": {"num_frames": 100000}}`), and where a
    // disaggregated prefill's KV cache comes from (another host and port).
    "media_io_kwargs",
    "kv_transfer_params",
    // vLLM: logits processors by qualified name (code the server loads, where a pattern
    // allows it).
    "logits_processors",
    // SGLang: a serialized logit processor (code the server runs, where it is enabled), the
    // disaggregation bootstrap server, and the data-parallel rank that must run it.
    "custom_logit_processor",
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
    "data_parallel_rank",
    // Its newer names for the rank (the old one is copied into them).
    "routed_dp_rank",
    "disagg_prefill_dp_rank",
];

/// Settings one level down, `(object, key)`: vLLM (before 0.11) and SGLang merge
/// `chat_template_kwargs` over their own arguments, so a `chat_template` in it replaces the
/// server's template as the top-level field does.
const OPENAI_NESTED_SETTINGS: [(&str, &str); 1] = [("chat_template_kwargs", "chat_template")];

/// Removes `keep_alive` from the request: `0` (or a short time) unloads the model once the
/// request ends, for everyone using it, and some clients send a value on every request
/// (Continue: 30 minutes), so the server's own setting (`OLLAMA_KEEP_ALIVE`) applies rather
/// than the request refused.
pub fn drop_keep_alive(ctx: &mut RequestCtx) {
    if let Some(body) = ctx.json.as_mut().and_then(Value::as_object_mut) {
        if body.shift_remove("keep_alive").is_some() {
            ctx.body_rewritten = true;
        }
    }
}

/// Refuses a request that sets how the server loads, keeps, formats or schedules models. `null` is
/// the server's default to every backend, so it passes.
pub fn check_server_settings(route: Route, body: &Value) -> Result<(), Rejection> {
    let set = |v: Option<&Value>| v.is_some_and(|v| !v.is_null());
    // One pass over what the client sent (usually a few sampling options).
    let option = body
        .get("options")
        .and_then(Value::as_object)
        .and_then(|o| {
            o.iter()
                .find(|(k, v)| RUNNER_OPTIONS.contains(&k.as_str()) && !v.is_null())
        })
        .map(|(k, _)| format!("options.{k}"));
    let fields: &[&str] = match route.wire_format() {
        gateway_filter::WireFormat::Ollama => &OLLAMA_SETTINGS,
        gateway_filter::WireFormat::OpenAi => &OPENAI_SETTINGS,
    };
    let field = fields
        .iter()
        .find(|k| set(body.get(**k)))
        .map(|k| k.to_string());
    let nested = match route.wire_format() {
        gateway_filter::WireFormat::Ollama => None,
        gateway_filter::WireFormat::OpenAi => OPENAI_NESTED_SETTINGS
            .iter()
            .find(|(o, k)| set(body.get(*o).and_then(|o| o.get(*k))))
            .map(|(o, k)| format!("{o}.{k}")),
    };
    match option.or(field).or(nested) {
        None => Ok(()),
        Some(name) => Err(setting_refused(&name)),
    }
}

fn setting_refused(name: &str) -> Rejection {
    Rejection::new(
        StatusCode::FORBIDDEN,
        "server_setting_not_allowed",
        format!(
            "`{name}` changes how the model server loads, keeps, formats or schedules models for everyone using it; this gateway does not let requests set it"
        ),
    )
}

/// The same settings in a body on a route the gateway has no parser for (a custom rule's
/// SGLang `/generate`, `/v1/responses`): those of either wire format, names compared as Go's
/// decoder compares them (Ollama's; Python servers' compare exactly, where this only refuses
/// a field they would ignore). A body that looks like JSON but could not be read (`NaN`, a
/// byte-order mark: Python's reader takes them) is refused: nothing in it was checked.
pub fn check_custom_server_settings(ctx: &RequestCtx) -> Result<(), Rejection> {
    if ctx.unreadable_json {
        return Err(unreadable("server settings"));
    }
    let Some(obj) = ctx.json.as_ref().and_then(Value::as_object) else {
        return Ok(());
    };
    let is = |k: &str, name: &str| gateway_filter::go_names::go_eq(k, name);
    for (k, v) in obj.iter().filter(|(_, v)| !v.is_null()) {
        // Adapters by name or path are judged as adapters (refused to model-restricted
        // callers): on these routes they are what an adapter-loading route
        // (`/v1/load_lora_adapter`) an operator opens to admins is for.
        if let Some(f) = OLLAMA_SETTINGS
            .iter()
            .chain(OPENAI_SETTINGS.iter())
            .filter(|f| !matches!(**f, "lora" | "lora_path"))
            .find(|f| is(k, f))
        {
            return Err(setting_refused(f));
        }
        let inner = |names: &[&str]| {
            v.as_object()?
                .iter()
                .find(|(ik, iv)| !iv.is_null() && names.iter().any(|n| is(ik, n)))
                .map(|(ik, _)| format!("{}.{}", gateway_filter::echo(k), gateway_filter::echo(ik)))
        };
        if is(k, "options") {
            if let Some(name) = inner(&RUNNER_OPTIONS) {
                return Err(setting_refused(&name));
            }
        }
        for (o, n) in OPENAI_NESTED_SETTINGS {
            if is(k, o) {
                if let Some(name) = inner(&[n]) {
                    return Err(setting_refused(&name));
                }
            }
        }
    }
    Ok(())
}

/// Runs every Ollama request with context window `n` (`options.num_ctx`, whatever was asked,
/// a bad value still refused): Ollama reloads a model whenever a request asks for another
/// context than it was loaded with, so one window for all keeps it loaded.
pub fn pin_context(ctx: &mut RequestCtx, n: u64) -> Result<(), Rejection> {
    if ctx.route.wire_format() != gateway_filter::WireFormat::Ollama {
        return Ok(());
    }
    let Some(body) = ctx.json.as_mut().and_then(Value::as_object_mut) else {
        return Ok(());
    };
    let options = body
        .entry("options")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| bad("invalid_options", "`options` must be an object"))?;
    output::count("options.num_ctx", options.get("num_ctx"))
        .map_err(|e| bad("invalid_options", e.to_string()))?;
    if options.get("num_ctx").and_then(Value::as_u64) != Some(n) {
        options.insert("num_ctx".to_string(), json!(n));
        ctx.body_rewritten = true;
    }
    Ok(())
}

/// Caps Ollama's context window (`options.num_ctx`): a huge one costs GPU memory for every
/// request, whatever it generates. Clamped, or refused in `reject` mode.
pub fn apply_context_cap(ctx: &mut RequestCtx, cap: u64, mode: OverCap) -> Result<(), Rejection> {
    let Some(options) = ctx
        .json
        .as_mut()
        .and_then(|b| b.get_mut("options"))
        .and_then(Value::as_object_mut)
    else {
        return Ok(());
    };
    match output::count("options.num_ctx", options.get("num_ctx"))
        .map_err(|e| bad("invalid_options", e.to_string()))?
    {
        Limit::Bounded(n) if n <= cap => {
            if !options.get("num_ctx").is_some_and(Value::is_u64) {
                options.insert("num_ctx".to_string(), json!(n));
                ctx.body_rewritten = true;
            }
            Ok(())
        }
        Limit::Absent => Ok(()),
        _ if mode == OverCap::Reject => Err(bad(
            "context_too_large",
            format!("`options.num_ctx` may be at most {cap}"),
        )),
        _ => {
            options.insert("num_ctx".to_string(), json!(cap));
            ctx.body_rewritten = true;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_filter::http::Method;

    fn ctx(path: &str, body: Value) -> RequestCtx {
        let mut c = RequestCtx::new(String::new(), Method::POST, path.into());
        c.max_tokens = output::read(c.route, body.as_object().unwrap())
            .unwrap()
            .total();
        c.json = Some(body);
        c
    }

    #[test]
    fn types() {
        assert!(check_types(
            Route::OpenAiChat,
            &json!({"messages": [{"role": "user", "content": "x"}]})
        )
        .is_ok());
        assert!(check_types(
            Route::OpenAiChat,
            &json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]})
        )
        .is_ok());
        assert_eq!(
            check_types(Route::OpenAiChat, &json!({})).unwrap_err().code,
            "invalid_messages"
        );
        assert!(
            check_types(Route::OllamaChat, &json!({})).is_ok(),
            "Ollama loads a model with no messages"
        );
        let e = check_types(
            Route::OllamaChat,
            &json!({"messages": [{"role": "user", "content": 5}]}),
        )
        .unwrap_err();
        assert_eq!(e.message, "messages[0].content must be a string");
        assert_eq!(
            check_types(Route::OllamaChat, &json!({"messages": "hi"}))
                .unwrap_err()
                .code,
            "invalid_messages"
        );
        assert_eq!(
            check_types(Route::OllamaGenerate, &json!({"prompt": ["a"]}))
                .unwrap_err()
                .code,
            "invalid_prompt"
        );
        assert!(check_types(Route::OpenAiCompletions, &json!({"prompt": ["a", "b"]})).is_ok());
        assert_eq!(
            check_types(Route::OpenAiEmbeddings, &json!({"input": {"a": 1}}))
                .unwrap_err()
                .code,
            "invalid_input"
        );
    }

    #[test]
    fn context_window_is_capped() {
        let mut c = ctx("/api/chat", json!({"options": {"num_ctx": 131072}}));
        apply_context_cap(&mut c, 8192, OverCap::Clamp).unwrap();
        assert_eq!(c.json.as_ref().unwrap()["options"]["num_ctx"], 8192);
        assert!(c.body_rewritten);
        let mut c = ctx("/api/chat", json!({"options": {"num_ctx": "131072"}}));
        assert_eq!(
            apply_context_cap(&mut c, 8192, OverCap::Reject)
                .unwrap_err()
                .code,
            "context_too_large"
        );
        let mut c = ctx("/api/chat", json!({"options": {"num_ctx": 4096}}));
        apply_context_cap(&mut c, 8192, OverCap::Reject).unwrap();
        assert!(!c.body_rewritten, "within the cap nothing changes");
    }

    #[test]
    fn counts_prompt_characters() {
        let b = json!({"messages": [{"role": "user", "content": "héllo"}, {"role": "user", "content": [{"type": "text", "text": "abc"}]}], "system": "xy"});
        assert_eq!(prompt_chars(&b), 10);
        assert_eq!(prompt_chars(&json!({"input": ["ab", "cd"]})), 4);
    }

    #[test]
    fn clamps_injects_or_rejects() {
        let mut c = ctx("/v1/chat/completions", json!({"max_tokens": 5000}));
        apply_output_cap(&mut c, 1000, OverCap::Clamp).unwrap();
        assert_eq!(c.json.as_ref().unwrap()["max_tokens"], 1000);
        assert_eq!((c.max_tokens, c.body_rewritten), (Some(1000), true));

        let mut c = ctx(
            "/v1/chat/completions",
            json!({"max_tokens": 10, "max_completion_tokens": 10}),
        );
        apply_output_cap(&mut c, 1000, OverCap::Clamp).unwrap();
        assert!(!c.body_rewritten, "within the cap nothing changes");
        assert_eq!(c.max_tokens, Some(10));

        let mut c = ctx("/v1/chat/completions", json!({"max_tokens": 10}));
        apply_output_cap(&mut c, 1000, OverCap::Clamp).unwrap();
        assert_eq!(
            c.json.as_ref().unwrap()["max_completion_tokens"],
            10,
            "every field a backend reads carries the limit"
        );

        let mut c = ctx("/api/chat", json!({"model": "m"}));
        apply_output_cap(&mut c, 256, OverCap::Reject).unwrap();
        assert_eq!(
            c.json.as_ref().unwrap()["options"]["num_predict"],
            256,
            "a missing cap is added"
        );

        let mut c = ctx("/api/generate", json!({"options": {"num_predict": -1}}));
        apply_output_cap(&mut c, 256, OverCap::Clamp).unwrap();
        assert_eq!(
            c.json.as_ref().unwrap()["options"]["num_predict"],
            256,
            "-1 (unbounded) is capped"
        );

        let mut c = ctx("/api/chat", json!({"options": {"num_predict": 9999}}));
        assert_eq!(
            apply_output_cap(&mut c, 256, OverCap::Reject)
                .unwrap_err()
                .code,
            "max_tokens_too_large"
        );

        let mut c = ctx("/v1/embeddings", json!({"input": "x"}));
        apply_output_cap(&mut c, 256, OverCap::Clamp).unwrap();
        assert!(!c.body_rewritten);
    }
}

/// The output cap against random bodies: every combination of the token fields, in every
/// type a client can send, on both wire formats. Whatever goes upstream, no backend of the
/// route's format reads a limit above the cap, or none at all.
#[cfg(test)]
mod cap_properties {
    use super::*;
    use gateway_filter::http::Method;
    use proptest::prelude::*;

    const CAP: u64 = 100;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            (0u64..300).prop_map(Value::from),
            Just(json!(1_000_000u64)),
            (-3i64..0).prop_map(Value::from),
            Just(json!(1e6)),
            Just(json!(2.5)),
            Just(json!(-0.0)),
            (0u64..300).prop_map(|n| Value::from(n.to_string())),
            Just(json!("1e6")),
            Just(json!("lots")),
            Just(Value::Null),
            Just(json!(true)),
            Just(json!([5])),
        ]
    }

    /// A count as the laxest backend reads it: `None` when absent or unreadable (the backend
    /// then uses its own default, which may be unbounded), negative and 0 as unbounded.
    fn lax(v: Option<&Value>) -> Option<i64> {
        match v? {
            Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
            Value::String(s) => s.trim().parse::<f64>().ok().map(|f| f as i64),
            _ => None,
        }
    }

    fn bounded(v: Option<i64>) -> bool {
        v.is_some_and(|n| (1..=CAP as i64).contains(&n))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn no_backend_reads_more_than_the_cap(
            route in prop_oneof![
                Just("/v1/chat/completions"),
                Just("/v1/completions"),
                Just("/api/chat"),
                Just("/api/generate"),
            ],
            fields in proptest::collection::vec(
                (prop_oneof![
                    Just("max_tokens"),
                    Just("max_completion_tokens"),
                    Just("n_predict"),
                    Just("options.num_predict"),
                    Just("num_predict"),
                ], value()),
                0..5,
            ),
            reject in any::<bool>(),
        ) {
            let mut body = json!({"model": "m"});
            for (field, v) in &fields {
                match field.split_once('.') {
                    Some((outer, inner)) => {
                        body[outer][inner] = v.clone();
                    }
                    None => body[*field] = v.clone(),
                }
            }
            let mut c = RequestCtx::new(String::new(), Method::POST, route.to_string());
            let mode = if reject { OverCap::Reject } else { OverCap::Clamp };
            let asked = output::read(c.route, body.as_object().unwrap());
            c.max_tokens = asked.as_ref().ok().and_then(|a| a.total());
            c.json = Some(body);
            match apply_output_cap(&mut c, CAP, mode) {
                Err(r) => {
                    // Refused: only for unreadable values, or above the cap in reject mode.
                    prop_assert!(asked.is_err() || reject, "{r:?}");
                }
                Ok(()) => {
                    let sent = c.json.as_ref().unwrap();
                    if route.starts_with("/v1/") {
                        // vLLM, OpenAI: max_completion_tokens, else max_tokens.
                        prop_assert!(bounded(lax(sent.get("max_completion_tokens"))), "{sent}");
                        // llama-cpp-python: max_tokens only.
                        prop_assert!(bounded(lax(sent.get("max_tokens"))), "{sent}");
                        // llama.cpp: n_predict first.
                        if sent.get("n_predict").is_some() {
                            prop_assert!(bounded(lax(sent.get("n_predict"))), "{sent}");
                        }
                    } else {
                        // Ollama: options.num_predict only.
                        prop_assert!(bounded(lax(sent.pointer("/options/num_predict"))), "{sent}");
                    }
                    if let Some(n) = sent.pointer("/options/num_predict") {
                        prop_assert!(bounded(lax(Some(n))), "{sent}");
                    }
                    // What budgets and limits reserve is at least what any backend may make.
                    prop_assert!(c.max_tokens.is_some_and(|m| (1..=CAP).contains(&m)));
                }
            }
        }
    }
}
