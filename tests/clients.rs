//! Real clients and a real model server against the real binary: the official `openai` and
//! `ollama` Python clients, the LiteLLM SDK, and llama-cpp-python's OpenAI-compatible server.
//! Needs `pip install -r tests/clients/requirements.txt -r tests/clients/requirements-llama.txt`
//! (done by .ci/run).

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

/// A real llama.cpp server (llama-cpp-python, CPU) with a tiny random-weight model the test
/// writes: it differs from the mock where it matters (it honours only `max_tokens`, and never
/// sends usage in streams).
struct LlamaServer {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl LlamaServer {
    async fn start() -> LlamaServer {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.gguf");
        let script = format!(
            "{}/../tests/clients/tiny_llama.py",
            env!("CARGO_MANIFEST_DIR")
        );
        let made = Command::new("python3")
            .args([script.as_str(), model.to_str().unwrap()])
            .output()
            .expect("python3 runs");
        assert!(
            made.status.success(),
            "writing the model failed (pip install -r tests/clients/requirements-llama.txt):\n{}",
            String::from_utf8_lossy(&made.stderr)
        );
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new("python3")
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(&model)
            .args([
                "--model_alias",
                "tiny",
                "--chat_format",
                "chatml",
                "--n_ctx",
                "512",
            ])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("llama_cpp.server starts");
        let server = LlamaServer {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..300 {
            if let Ok(r) = client().get(server.url("/v1/models")).send().await {
                if r.status() == 200 {
                    return server;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!(
            "llama_cpp.server did not start:\n{}",
            std::fs::read_to_string(server._dir.path().join("server.log")).unwrap_or_default()
        );
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Hardening findings 1 and 6 against a real server: the output cap holds on a server that
/// reads only `max_tokens`, and a stream without usage is charged what passed.
#[tokio::test(flavor = "multi_thread")]
async fn real_llama_cpp_server_gets_the_cap_and_streams_are_counted() {
    let llama = LlamaServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    // $1 per completion token, nothing for prompts: the cost is the completion count.
    let gw = Gateway::start(&format!(
        "backends:\n  - {{ name: llama, url: '{}', kind: openai }}\nfilters:\n  - use: auth\n    keys_file: {}/../conf/keys.yaml\n  - use: policy\n    max_output_tokens: 32\n  - use: budget\n    ledger: {d}/spend.db\n    default: {{ max_usd: 1000, period: 1d }}\n    prices:\n      - {{ model: 'tiny', prompt_per_1m: 0, completion_per_1m: 1000000 }}\n  - use: audit\n    file: {d}/audit.jsonl\n",
        llama.url(""),
        env!("CARGO_MANIFEST_DIR"),
        d = dir.path().display()
    ))
    .await;
    let c = client();
    let messages = serde_json::json!([{"role": "user", "content": "why is the sky blue"}]);
    // The server ignores max_completion_tokens: without the gateway it would fill its context.
    let v: serde_json::Value = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(DEMO_KEY)
        .json(&serde_json::json!({"model": "tiny", "messages": messages, "max_completion_tokens": 500}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 32, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");

    // A stream: the gateway asks for usage, this server never sends it; what passed counts.
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(DEMO_KEY)
        .json(&serde_json::json!({"model": "tiny", "messages": messages, "stream": true, "max_tokens": 12}))
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let text = r.text().await.unwrap();
    let events = text
        .lines()
        .filter(|l| l.starts_with("data: {") && l.contains("\"content\": \" w"))
        .count();
    assert_eq!(events, 12, "{text}");
    let line = (0..100)
        .find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            std::fs::read_to_string(dir.path().join("audit.jsonl"))
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .find(|l| l["request_id"] == id.as_str())
        })
        .expect("an audit line for the stream");
    assert_eq!(line["tokens"], "counted", "{line}");
    assert_eq!(line["completion_tokens"], 12, "{line}");
    assert_eq!(line["cost_usd"], 12.0, "{line}");
}
