//! The budget tests' gateway: one principal (`buyer`) with a budget, a price table, audit.

use std::process::Command;

use serde_json::Value;

use super::{backends, client, Gateway, BIN};

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

/// `/admin/spend` of `gw`.
pub async fn spend_report(gw: &Gateway) -> Value {
    client()
        .get(gw.admin_url("/admin/spend"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `/admin/spend` of `gw` once nothing is held (2 s at most): an answer reaches its client
/// just before its request settles.
pub async fn settled_report(gw: &Gateway) -> Value {
    let mut report = Value::Null;
    for _ in 0..100 {
        report = spend_report(gw).await;
        let held: f64 = report["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["reserved_usd"].as_f64().unwrap())
            .sum();
        if held == 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    report
}

/// `principal`'s account in a spend report, if it has one.
pub fn account_of<'a>(report: &'a Value, principal: &str) -> Option<&'a Value> {
    report["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["principal"] == principal)
}

/// What `principal`'s accounts in a spend report have spent, in USD.
pub fn spent_of(report: &Value, principal: &str) -> f64 {
    report["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["principal"] == principal)
        .map(|a| a["spent_usd"].as_f64().unwrap())
        .sum()
}
