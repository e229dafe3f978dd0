//! The official `openai` and `ollama` Python clients against the real binary.
//! Needs `pip install -r tests/clients/requirements.txt` (done by .ci/run).

mod support;

use std::process::Command;

use support::*;

/// Runs a client script; `reached` is how many of its requests must reach the backend
/// (the refused ones must not).
async fn run_client(script: &str, reached: u64) {
    let m = mock().await;
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}/../conf/keys.yaml\n",
        backends(&[("local", &m.url())]),
        env!("CARGO_MANIFEST_DIR")
    ))
    .await;
    let path = format!("{}/../tests/clients/{script}", env!("CARGO_MANIFEST_DIR"));
    let url = gw.url("");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([path.as_str(), url.as_str(), DEMO_KEY, "llama3.1:8b"])
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "Python client missing: pip install -r tests/clients/requirements.txt\n{stderr}"
    );
    assert!(
        out.status.success(),
        "{script} failed:\n{stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("client: ok"));
    assert_eq!(
        m.total(),
        reached,
        "{:?}",
        m.requests().iter().map(|r| &r.path).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_python_client() {
    run_client("openai_client.py", 5).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ollama_python_client() {
    run_client("ollama_client.py", 7).await;
}

/// LiteLLM's `ollama/…` and `ollama_chat/…` providers send no JSON content type; its
/// `openai/…` provider uses the OpenAI routes. 2 × (one answer + one stream) + 1.
#[tokio::test(flavor = "multi_thread")]
async fn litellm_sdk() {
    run_client("litellm_client.py", 5).await;
}
