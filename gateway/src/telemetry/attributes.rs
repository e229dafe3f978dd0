//! What a request's span says: the OpenTelemetry GenAI semantic conventions
//! (`gen_ai.*`), the HTTP ones a server span carries, and the gateway's own
//! (`llm_gateway.*`). Never a key; prompt text only with `capture_prompts`.

use gateway_filter::redact::clip;
use gateway_filter::{Decision, RequestCtx, Route, WireFormat};
use opentelemetry::trace::Status;
use opentelemetry::{Array, KeyValue, StringValue, Value};

/// Most bytes of prompt text in a span (`gen_ai.prompt`, with `capture_prompts`).
const MAX_PROMPT: usize = 16 << 10;

/// `gen_ai.operation.name` of an inference route.
pub fn operation(route: Route) -> Option<&'static str> {
    match route {
        Route::OllamaChat | Route::OpenAiChat => Some("chat"),
        Route::OllamaGenerate | Route::OpenAiCompletions => Some("text_completion"),
        Route::OllamaEmbed | Route::OllamaEmbeddings | Route::OpenAiEmbeddings => {
            Some("embeddings")
        }
        _ => None,
    }
}

/// The route as a low-cardinality name (HTTP's `http.route`): no model names or digests.
fn http_route(req: &RequestCtx) -> &str {
    match req.route {
        Route::OpenAiModel => "/v1/models/{model}",
        Route::OllamaBlob => "/api/blobs/{digest}",
        Route::Other => "",
        _ => &req.path,
    }
}

/// The request's method as the HTTP conventions name it: a method HTTP does not define
/// (anyone can send 64 KiB of one) is `_OTHER`.
fn method(req: &RequestCtx) -> &str {
    use gateway_filter::http::Method;
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
        Method::TRACE,
        Method::CONNECT,
    ];
    if KNOWN.contains(&req.method) {
        req.method.as_str()
    } else {
        "_OTHER"
    }
}

/// The span's name, attributes and status.
pub fn of(req: &RequestCtx, capture_prompts: bool) -> (String, Vec<KeyValue>, Status) {
    let mut a = Vec::with_capacity(24);
    let op = operation(req.route);
    let route = http_route(req);
    // Whatever a client named, accepted or not, is cut: a span (its name, its model) is kept
    // in the export queue, which counts spans, not bytes.
    let model = req.model.as_deref().map(clip);
    let name = match (op, model) {
        // GenAI: `{operation} {model}`.
        (Some(op), Some(model)) => format!("{op} {model}"),
        (Some(op), None) => op.to_string(),
        // HTTP: `{method} {route}`.
        (None, _) if route.is_empty() => method(req).to_string(),
        (None, _) => format!("{} {route}", method(req)),
    };
    if let Some(op) = op {
        a.push(KeyValue::new("gen_ai.operation.name", op));
        a.push(KeyValue::new(
            "gen_ai.provider.name",
            match req.route.wire_format() {
                WireFormat::Ollama => "ollama",
                WireFormat::OpenAi => "openai",
            },
        ));
    }
    // Only inference is a generation (observability tools count every span with a model
    // as one): a model list or `/api/show` names its model under the gateway's own key.
    if let Some(model) = model {
        let key = if op.is_some() {
            "gen_ai.request.model"
        } else {
            "llm_gateway.model"
        };
        a.push(KeyValue::new(key, model.to_string()));
    }
    if let Some(u) = req.usage {
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        a.push(KeyValue::new(
            "gen_ai.usage.input_tokens",
            count(u.prompt_tokens),
        ));
        a.push(KeyValue::new(
            "gen_ai.usage.output_tokens",
            count(u.completion_tokens),
        ));
        if u.counted {
            // Counted passing by the gateway, not reported by the model server.
            a.push(KeyValue::new("llm_gateway.usage.counted", true));
        }
    }
    if !req.finish_reasons.is_empty() {
        let reasons: Vec<StringValue> = req.finish_reasons.iter().map(StringValue::from).collect();
        a.push(KeyValue::new(
            "gen_ai.response.finish_reasons",
            Value::Array(Array::String(reasons)),
        ));
    }
    if capture_prompts && op.is_some() {
        if let Some(body) = &req.json {
            let texts = gateway_filter::prompt::prompt_texts(body);
            if let Ok(mut json) = serde_json::to_string(&texts) {
                // A span is not a place for whole documents: collectors refuse large batches.
                if json.len() > MAX_PROMPT {
                    json.truncate(json.floor_char_boundary(MAX_PROMPT));
                    a.push(KeyValue::new("llm_gateway.prompt_truncated", true));
                }
                a.push(KeyValue::new("gen_ai.prompt", json));
            }
        }
    }
    a.push(KeyValue::new(
        "http.request.method",
        method(req).to_string(),
    ));
    if !route.is_empty() {
        a.push(KeyValue::new("http.route", route.to_string()));
    }
    a.push(KeyValue::new("url.path", clip(&req.path).to_string()));
    if req.status != 0 {
        a.push(KeyValue::new(
            "http.response.status_code",
            i64::from(req.status),
        ));
    }
    if let Some(ip) = req.client_ip {
        a.push(KeyValue::new("client.address", ip.to_string()));
    }
    a.push(KeyValue::new(
        "llm_gateway.request_id",
        req.request_id.clone(),
    ));
    a.push(KeyValue::new(
        "llm_gateway.decision",
        req.decision.to_string(),
    ));
    if let Some(reason) = req.reject_reason {
        a.push(KeyValue::new("llm_gateway.reason", reason));
    }
    if let Some(p) = &req.principal {
        a.push(KeyValue::new(
            "llm_gateway.principal",
            clip(&p.id).to_string(),
        ));
        a.push(KeyValue::new("llm_gateway.auth_method", p.method));
    }
    if let Some(b) = &req.backend {
        a.push(KeyValue::new("llm_gateway.backend", b.clone()));
    }
    a.push(KeyValue::new("llm_gateway.retries", i64::from(req.retries)));
    if let Some(cost) = req.cost_usd {
        a.push(KeyValue::new("llm_gateway.cost_usd", cost));
    }
    if op.is_some() {
        a.push(KeyValue::new("llm_gateway.stream", req.stream));
    }
    if let Some(ttfb) = req.ttfb {
        a.push(KeyValue::new(
            "llm_gateway.ttfb_ms",
            ttfb.as_secs_f64() * 1000.0,
        ));
    }
    // A server span is an error only when the server failed (HTTP semantic conventions):
    // a refused client (4xx) is not one.
    // A client that left (a cancelled stream) is not the server's failure.
    let status = match &req.decision {
        Decision::Failed {
            code: "client_disconnected",
        } => Status::Unset,
        Decision::Failed { code } if req.status >= 500 || req.status == 0 => Status::error(*code),
        _ if req.status >= 500 => Status::error(format!("status {}", req.status)),
        _ => Status::Unset,
    };
    (name, a, status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_filter::http::Method;
    use gateway_filter::Usage;

    fn get<'a>(a: &'a [KeyValue], key: &str) -> Option<&'a Value> {
        a.iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    #[test]
    fn a_chat_request_carries_the_genai_attributes() {
        let mut req = RequestCtx::new("r1".into(), Method::POST, "/v1/chat/completions".into());
        req.model = Some("llama3".into());
        req.usage = Some(Usage {
            prompt_tokens: 7,
            completion_tokens: 3,
            counted: false,
        });
        req.finish_reasons.add(b"stop");
        req.status = 200;
        req.json = Some(serde_json::json!({"messages": [{"role": "user", "content": "secret"}]}));
        let (name, a, status) = of(&req, false);
        assert_eq!(name, "chat llama3");
        assert_eq!(get(&a, "gen_ai.operation.name"), Some(&Value::from("chat")));
        assert_eq!(
            get(&a, "gen_ai.provider.name"),
            Some(&Value::from("openai"))
        );
        assert_eq!(get(&a, "gen_ai.usage.input_tokens"), Some(&Value::I64(7)));
        assert_eq!(get(&a, "gen_ai.usage.output_tokens"), Some(&Value::I64(3)));
        assert_eq!(
            get(&a, "gen_ai.response.finish_reasons"),
            Some(&Value::Array(Array::String(vec!["stop".into()])))
        );
        assert_eq!(get(&a, "gen_ai.prompt"), None, "no prompt without capture");
        assert_eq!(status, Status::Unset);
        let (_, a, _) = of(&req, true);
        assert_eq!(
            get(&a, "gen_ai.prompt"),
            Some(&Value::from("[\"secret\"]".to_string()))
        );
    }

    #[test]
    fn what_a_client_names_is_cut() {
        let long = "é".repeat(400_000);
        let mut req = RequestCtx::new("r".into(), Method::POST, format!("/api/chat/{long}"));
        req.route = Route::OllamaChat;
        req.model = Some(long.clone());
        req.principal = Some(std::sync::Arc::new(gateway_filter::Principal {
            id: long.clone(),
            method: "jwt",
            ..Default::default()
        }));
        let (name, a, _) = of(&req, false);
        assert!(name.len() <= 5 + 512, "{}", name.len());
        let len = |key| match get(&a, key) {
            Some(Value::String(s)) => s.as_str().len(),
            v => panic!("{key}: {v:?}"),
        };
        for key in ["gen_ai.request.model", "url.path", "llm_gateway.principal"] {
            assert!((511..=512).contains(&len(key)), "{key}: {}", len(key));
        }
        let odd = Method::from_bytes("X".repeat(60_000).as_bytes()).unwrap();
        let req = RequestCtx::new("r".into(), odd, "/api/tags".into());
        let (name, a, _) = of(&req, false);
        assert_eq!(name, "_OTHER");
        assert_eq!(get(&a, "http.request.method"), Some(&Value::from("_OTHER")));
    }

    #[test]
    fn names_never_carry_model_names_or_digests_from_paths() {
        let req = RequestCtx::new("r".into(), Method::GET, "/v1/models/secret-model".into());
        assert_eq!(of(&req, false).0, "GET /v1/models/{model}");
        let mut req = RequestCtx::new("r".into(), Method::GET, "/some/thing".into());
        req.decision = Decision::Failed { code: "no_backend" };
        req.status = 502;
        let (name, _, status) = of(&req, false);
        assert_eq!(name, "GET");
        assert_eq!(status, Status::error("no_backend"));
    }
}
