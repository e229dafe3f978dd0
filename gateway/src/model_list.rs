//! Filtering model lists (`GET /api/tags`, `GET /api/ps`, `GET /v1/models`) to what the caller
//! may use.

use gateway_filter::{ModelGate, Route};
use pingora_core::protocols::http::v1::client::HttpSession;
use pingora_error::{Error, ErrorType};
use serde_json::Value;

/// Largest model list the gateway will read to filter it.
const MAX_LIST: usize = 8 << 20;

/// Reads a backend's whole model list, to filter it.
pub async fn read(up: &mut HttpSession) -> pingora_core::Result<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = up.read_body_ref().await? {
        if body.len() + chunk.len() > MAX_LIST {
            return Err(Error::explain(
                ErrorType::InvalidHTTPHeader,
                "model list too large",
            ));
        }
        body.extend_from_slice(chunk);
    }
    Ok(body)
}

/// Keeps the entries of an Ollama (`models[].name`) or OpenAI (`data[].id`) model list that
/// `gate` allows, and nothing else of the body: a backend may answer with more than the
/// route's list (llama.cpp answers both lists on every list route, `models[]` naming its
/// model file), and what the gateway does not filter must not reach the caller. `None` when
/// the body is not such a list.
pub fn filter(route: Route, body: &[u8], gate: &dyn ModelGate) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let (list_key, name_keys): (&str, &[&str]) = match route {
        Route::OllamaModels | Route::OllamaRunning => ("models", &["name", "model"]),
        Route::OpenAiModels => ("data", &["id"]),
        _ => return None,
    };
    let mut list = match v.get_mut(list_key)?.take() {
        Value::Array(list) => list,
        _ => return None,
    };
    list.retain(|entry| {
        name_keys
            .iter()
            .find_map(|k| entry.get(*k).and_then(Value::as_str))
            .is_some_and(|name| gate.allows(name))
    });
    let out = match route {
        Route::OpenAiModels => serde_json::json!({"object": "list", "data": list}),
        _ => serde_json::json!({ "models": list }),
    };
    serde_json::to_vec(&out).ok()
}

/// A model list in the route's format from the merged catalogue (`(name, backend entry)`),
/// each model once, filtered by `gate`.
pub fn render(route: Route, catalogue: &[(String, Value)], gate: Option<&dyn ModelGate>) -> String {
    let allowed = catalogue
        .iter()
        .filter(|(name, _)| gate.is_none_or(|g| g.allows(name)));
    match route {
        Route::OpenAiModels => {
            let data: Vec<Value> = allowed
                .map(|(name, entry)| match entry.get("object") {
                    Some(_) => entry.clone(),
                    None => serde_json::json!({"id": entry.get("name").and_then(Value::as_str).unwrap_or(name), "object": "model", "created": 0, "owned_by": "llm-gateway"}),
                })
                .collect();
            serde_json::json!({"object": "list", "data": data}).to_string()
        }
        _ => {
            let models: Vec<Value> = allowed
                .map(|(name, entry)| match entry.get("id") {
                    // An OpenAI-compatible backend's model, shown in Ollama's shape.
                    Some(id) => serde_json::json!({"name": id, "model": id, "modified_at": "1970-01-01T00:00:00Z", "size": 0, "digest": "", "details": {}}),
                    None if entry.get("digest").is_none() => serde_json::json!({"name": name, "model": name, "modified_at": "1970-01-01T00:00:00Z", "size": 0, "digest": "", "details": {}}),
                    None => entry.clone(),
                })
                .collect();
            serde_json::json!({"models": models}).to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Only(&'static str);
    impl ModelGate for Only {
        fn allows(&self, model: &str) -> bool {
            model == self.0
        }
    }

    #[test]
    fn filters_both_shapes() {
        let tags =
            br#"{"models":[{"name":"a:1","model":"a:1","size":1},{"name":"b:1","model":"b:1"}]}"#;
        let out: Value =
            serde_json::from_slice(&filter(Route::OllamaModels, tags, &Only("b:1")).unwrap())
                .unwrap();
        assert_eq!(out["models"].as_array().unwrap().len(), 1);
        assert_eq!(out["models"][0]["name"], "b:1");
        let models = br#"{"object":"list","data":[{"id":"a:1","object":"model"},{"id":"b:1","object":"model"}]}"#;
        let out: Value =
            serde_json::from_slice(&filter(Route::OpenAiModels, models, &Only("a:1")).unwrap())
                .unwrap();
        assert_eq!(out["data"][0]["id"], "a:1");
        assert_eq!(out["object"], "list");
        assert!(filter(Route::OpenAiModels, b"not json", &Only("a")).is_none());
    }

    /// Review: llama.cpp answers every list route with both lists (`models[]` names its model
    /// file); only the route's list was filtered, the other went through whole.
    #[test]
    fn nothing_but_the_filtered_list_goes_through() {
        let both = br#"{"models":[{"name":"/models/secret.gguf","model":"/models/secret.gguf"}],"object":"list","data":[{"id":"/models/secret.gguf","object":"model","aliases":["secret"]}],"extra":[{"id":"secret"}]}"#;
        for route in [
            Route::OpenAiModels,
            Route::OllamaModels,
            Route::OllamaRunning,
        ] {
            let out = filter(route, both, &Only("mine")).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(!text.contains("secret"), "{route:?}: {text}");
        }
        let out: Value = serde_json::from_slice(
            &filter(Route::OpenAiModels, both, &Only("/models/secret.gguf")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            out,
            serde_json::json!({"object": "list", "data": [{"id": "/models/secret.gguf", "object": "model", "aliases": ["secret"]}]})
        );
    }
}
