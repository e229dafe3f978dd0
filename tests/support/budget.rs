//! The budget tests' gateway: one principal (`buyer`) with a budget, a price table, audit.

use std::process::Command;

use serde_json::Value;

use super::{backends, BIN};

/// The buyer's API key.
pub const KEY: &str = "sk-gw-buyer";

/// Keys file with one principal and its budget; prices: `prompt` and `completion` USD per 1M.
pub fn config(
    dir: &std::path::Path,
    m: &mock_ollama::MockServer,
    max_usd: f64,
    prompt: f64,
    completion: f64,
    extra: &str,
) -> String {
    std::fs::write(
        dir.join("keys.yaml"),
        format!(
            "keys:\n  - id: buyer\n    key_sha256: {}\n    max_usd: {max_usd}\n    period: 1d\n",
            filter_auth::keygen::hash_key(KEY)
        ),
    )
    .unwrap();
    format!(
        "{}filters:\n  - use: auth\n    keys_file: {d}/keys.yaml\n  - use: policy\n    max_output_tokens: 5\n  - use: budget\n    ledger: {d}/spend.db\n    prices:\n      - {{ model: 'llama3.1:*', prompt_per_1m: {prompt}, completion_per_1m: {completion} }}\n{extra}  - use: audit\n    file: {d}/audit.jsonl\n",
        backends(&[("local", &m.url())]),
        d = dir.display()
    )
}

/// A non-streamed generation by the buyer, answered after a short delay: (status, body).
pub async fn generate(url: String) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .bearer_auth(KEY)
        .header("x-mock-delay-ms", "30")
        .json(&serde_json::json!({"model": "llama3.1:8b", "prompt": "x", "stream": false}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

pub fn spend_json(dir: &std::path::Path) -> Vec<Value> {
    let out = Command::new(BIN)
        .args([
            "spend",
            "--ledger",
            dir.join("spend.db").to_str().unwrap(),
            "--period",
            "all",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn cents(usd: f64) -> i64 {
    (usd * 100.0).round() as i64
}
