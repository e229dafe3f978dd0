//! Three mock backends for the routing tests.

use std::time::Duration;

use mock_ollama::{MockConfig, MockServer};
use serde_json::{json, Value};

use super::{backends, client, mock_with, Gateway};

pub const MODEL: &str = "llama3.1:8b";
/// Every model the mock serves.
pub const ALL: &[&str] = &["llama3.1:8b", "qwen2.5:7b", "nomic-embed-text:latest"];

pub async fn mocks(models: [&[&str]; 3]) -> Vec<MockServer> {
    let mut out = Vec::new();
    for m in models {
        out.push(
            mock_with(MockConfig {
                models: m.iter().map(|s| s.to_string()).collect(),
                ..MockConfig::default()
            })
            .await,
        );
    }
    out
}

pub fn three(m: &[MockServer]) -> String {
    backends(&[("a", &m[0].url()), ("b", &m[1].url()), ("c", &m[2].url())])
}

pub fn gen(model: &str) -> Value {
    json!({"model": model, "prompt": "x", "stream": false})
}

pub fn hits(m: &[MockServer], path: &str) -> Vec<u64> {
    m.iter().map(|s| s.hits(path)).collect()
}

/// Waits for the first discovery round (model lists known on every backend).
pub async fn discovered(gw: &Gateway, want: usize) {
    for _ in 0..100 {
        let r = client().get(gw.url("/v1/models")).send().await.unwrap();
        if let Ok(v) = r.json::<Value>().await {
            if v["data"].as_array().is_some_and(|d| d.len() == want) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("discovery did not finish");
}
