//! Request shape: field types, prompt size, message count, the output-token cap, headers.

use gateway_filter::http::StatusCode;
use gateway_filter::{Rejection, RequestCtx, Route, WireFormat};
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

/// Characters of prompt text the model receives: message contents (and their text parts),
/// `prompt`, `input`, `system`.
pub fn prompt_chars(body: &Value) -> usize {
    let system = body
        .get("system")
        .and_then(Value::as_str)
        .map_or(0, |s| s.chars().count());
    gateway_filter::prompt::prompt_texts(body)
        .iter()
        .map(|t| t.chars().count())
        .sum::<usize>()
        + system
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OverCap {
    #[default]
    Clamp,
    Reject,
}

/// Applies the output-token cap: requests above it are clamped (or refused), requests without
/// one get it, so no generation is unbounded. Records the effective cap in the context.
pub fn apply_output_cap(ctx: &mut RequestCtx, cap: u64, mode: OverCap) -> Result<(), Rejection> {
    if matches!(
        ctx.route,
        Route::OllamaEmbed | Route::OllamaEmbeddings | Route::OpenAiEmbeddings
    ) {
        return Ok(());
    }
    let Some(body) = ctx.json.as_mut().and_then(Value::as_object_mut) else {
        return Ok(());
    };
    let asked = ctx.max_tokens;
    if asked.is_some_and(|n| n > cap) && mode == OverCap::Reject {
        return Err(bad(
            "max_tokens_too_large",
            format!("at most {cap} output tokens may be requested"),
        ));
    }
    if asked.is_some_and(|n| n <= cap) {
        return Ok(());
    }
    match ctx.route.wire_format() {
        WireFormat::OpenAi => {
            let mut set = false;
            for key in ["max_tokens", "max_completion_tokens"] {
                if body.contains_key(key) {
                    body.insert(key.to_string(), json!(cap));
                    set = true;
                }
            }
            if !set {
                body.insert("max_tokens".to_string(), json!(cap));
            }
        }
        WireFormat::Ollama => {
            let options = body.entry("options").or_insert_with(|| json!({}));
            match options.as_object_mut() {
                Some(o) => {
                    o.insert("num_predict".to_string(), json!(cap));
                }
                None => return Err(bad("invalid_options", "`options` must be an object")),
            }
        }
    }
    ctx.max_tokens = Some(cap);
    ctx.body_rewritten = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_filter::http::Method;

    fn ctx(path: &str, body: Value) -> RequestCtx {
        let mut c = RequestCtx::new(String::new(), Method::POST, path.into());
        c.max_tokens = body
            .get("max_tokens")
            .or_else(|| body.pointer("/options/num_predict"))
            .and_then(Value::as_u64);
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

        let mut c = ctx("/v1/chat/completions", json!({"max_tokens": 10}));
        apply_output_cap(&mut c, 1000, OverCap::Clamp).unwrap();
        assert!(!c.body_rewritten, "within the cap nothing changes");

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
