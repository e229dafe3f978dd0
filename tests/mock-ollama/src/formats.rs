//! Response bodies in the exact shapes Ollama and OpenAI-compatible servers send.

use serde_json::{json, Value};

pub const CREATED_AT: &str = "2026-01-01T00:00:00.000000Z";
pub const CREATED: u64 = 1_767_225_600;

/// What the mock "generates" for one request.
pub struct Generation {
    pub model: String,
    pub prompt_tokens: u64,
    pub tokens: u64,
}

impl Generation {
    pub fn token(i: u64) -> String {
        format!("tok{i} ")
    }

    pub fn text(&self) -> String {
        (0..self.tokens).map(Generation::token).collect()
    }
}

/// Counts prompt "tokens" as whitespace-separated words of every prompt text in the body,
/// at least 1, so tests can predict usage exactly.
pub fn count_prompt_tokens(body: &Value) -> u64 {
    fn words(v: &Value) -> u64 {
        match v {
            Value::String(s) => s.split_whitespace().count() as u64,
            Value::Array(items) => items.iter().map(words).sum(),
            Value::Object(m) => m.get("content").map(words).unwrap_or(0),
            _ => 0,
        }
    }
    let n: u64 = ["messages", "prompt", "input"]
        .iter()
        .filter_map(|k| body.get(*k))
        .map(words)
        .sum();
    n.max(1)
}

pub fn ollama_chunk(g: &Generation, i: u64, chat: bool) -> Value {
    let tok = Generation::token(i);
    let mut v = json!({"model": g.model, "created_at": CREATED_AT, "done": false});
    if chat {
        v["message"] = json!({"role": "assistant", "content": tok});
    } else {
        v["response"] = json!(tok);
    }
    v
}

pub fn ollama_final(g: &Generation, chat: bool, full_text: bool) -> Value {
    let text = if full_text { g.text() } else { String::new() };
    let mut v = json!({
        "model": g.model,
        "created_at": CREATED_AT,
        "done": true,
        "done_reason": "stop",
        "total_duration": 5_000_000u64,
        "load_duration": 1_000_000u64,
        "prompt_eval_count": g.prompt_tokens,
        "prompt_eval_duration": 1_000_000u64,
        "eval_count": g.tokens,
        "eval_duration": 3_000_000u64,
    });
    if chat {
        v["message"] = json!({"role": "assistant", "content": text});
    } else {
        v["response"] = json!(text);
        v["context"] = json!([1, 2, 3]);
    }
    v
}

pub fn ollama_embed(g: &Generation, inputs: usize) -> Value {
    let vecs: Vec<Vec<f32>> = (0..inputs.max(1))
        .map(|_| vec![0.1, 0.2, 0.3, 0.4])
        .collect();
    json!({
        "model": g.model,
        "embeddings": vecs,
        "total_duration": 2_000_000u64,
        "load_duration": 500_000u64,
        "prompt_eval_count": g.prompt_tokens,
    })
}

pub fn openai_chunk(g: &Generation, i: u64, chat: bool) -> Value {
    let tok = Generation::token(i);
    if chat {
        let delta = if i == 0 {
            json!({"role": "assistant", "content": tok})
        } else {
            json!({"content": tok})
        };
        json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": CREATED,
            "model": g.model, "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "finish_reason": null}],
        })
    } else {
        json!({
            "id": "cmpl-mock", "object": "text_completion", "created": CREATED,
            "model": g.model, "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "text": tok, "finish_reason": null}],
        })
    }
}

pub fn openai_finish_chunk(g: &Generation, chat: bool) -> Value {
    if chat {
        json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": CREATED,
            "model": g.model, "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        })
    } else {
        json!({
            "id": "cmpl-mock", "object": "text_completion", "created": CREATED,
            "model": g.model, "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "text": "", "finish_reason": "stop"}],
        })
    }
}

pub fn openai_usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.tokens,
        "total_tokens": g.prompt_tokens + g.tokens,
    })
}

pub fn openai_usage_chunk(g: &Generation, chat: bool) -> Value {
    json!({
        "id": if chat { "chatcmpl-mock" } else { "cmpl-mock" },
        "object": if chat { "chat.completion.chunk" } else { "text_completion" },
        "created": CREATED, "model": g.model, "system_fingerprint": "fp_mock",
        "choices": [],
        "usage": openai_usage(g),
    })
}

pub fn openai_full(g: &Generation, chat: bool) -> Value {
    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": g.text()}, "finish_reason": "stop"})
    } else {
        json!({"index": 0, "text": g.text(), "finish_reason": "stop"})
    };
    json!({
        "id": if chat { "chatcmpl-mock" } else { "cmpl-mock" },
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": CREATED, "model": g.model, "system_fingerprint": "fp_mock",
        "choices": [choice],
        "usage": openai_usage(g),
    })
}

pub fn openai_embeddings(g: &Generation, inputs: usize) -> Value {
    let data: Vec<Value> = (0..inputs.max(1))
        .map(|i| json!({"object": "embedding", "embedding": [0.1, 0.2, 0.3, 0.4], "index": i}))
        .collect();
    json!({
        "object": "list", "data": data, "model": g.model,
        "usage": {"prompt_tokens": g.prompt_tokens, "total_tokens": g.prompt_tokens},
    })
}

pub fn ollama_tags(models: &[String]) -> Value {
    let list: Vec<Value> = models
        .iter()
        .map(|m| {
            json!({
                "name": m, "model": m, "modified_at": CREATED_AT, "size": 4_661_224_676u64,
                "digest": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
                "details": {"parent_model": "", "format": "gguf", "family": "llama",
                            "families": ["llama"], "parameter_size": "8.0B", "quantization_level": "Q4_0"},
            })
        })
        .collect();
    json!({"models": list})
}

pub fn ollama_ps(models: &[String]) -> Value {
    let list: Vec<Value> = models
        .iter()
        .take(1)
        .map(|m| {
            json!({
                "name": m, "model": m, "size": 5_137_025_024u64,
                "digest": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
                "details": {"parent_model": "", "format": "gguf", "family": "llama",
                            "families": ["llama"], "parameter_size": "8.0B", "quantization_level": "Q4_0"},
                "expires_at": "2099-01-01T00:00:00Z", "size_vram": 5_137_025_024u64,
            })
        })
        .collect();
    json!({"models": list})
}

/// `POST /api/show` as Ollama answers it (the `ollama` client's `show()` reads
/// `model_info`, `details`, `capabilities` and `modified_at`).
pub fn ollama_show(model: &str) -> Value {
    json!({
        "license": "mock license",
        "modelfile": format!("# Modelfile generated by \"ollama show\"\nFROM {model}\n"),
        "parameters": "stop \"<|eot_id|>\"",
        "template": "{{ .Prompt }}",
        "details": {"parent_model": "", "format": "gguf", "family": "llama",
                    "families": ["llama"], "parameter_size": "8.0B", "quantization_level": "Q4_0"},
        "model_info": {"general.architecture": "llama", "general.parameter_count": 8_030_261_248u64,
                       "llama.context_length": 131_072, "llama.embedding_length": 4096},
        "capabilities": ["completion", "tools"],
        "modified_at": "2024-07-23T10:00:00.000000000Z",
    })
}

pub fn openai_models(models: &[String]) -> Value {
    let data: Vec<Value> = models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": CREATED, "owned_by": "library"}))
        .collect();
    json!({"object": "list", "data": data})
}
