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
/// `gate` allows. `None` when the body is not such a list.
pub fn filter(route: Route, body: &[u8], gate: &dyn ModelGate) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let (list_key, name_keys): (&str, &[&str]) = match route {
        Route::OllamaModels | Route::OllamaRunning => ("models", &["name", "model"]),
        Route::OpenAiModels => ("data", &["id"]),
        _ => return None,
    };
    let list = v.get_mut(list_key)?.as_array_mut()?;
    list.retain(|entry| {
        name_keys
            .iter()
            .find_map(|k| entry.get(*k).and_then(Value::as_str))
            .is_some_and(|name| gate.allows(name))
    });
    serde_json::to_vec(&v).ok()
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
}
