use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

/// Failure to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailMode {
    #[default]
    None,
    /// Answer 500 with an Ollama-style `{"error": …}` body.
    Error500,
    /// Answer 429, as a busy server does.
    Error429,
    /// Answer 500 on inference routes only: health probes and model lists still work.
    Error500Inference,
    /// Accept the request and never answer.
    Hang,
    /// Send the response header and the first chunks, then drop the connection.
    CloseMidStream,
    /// Stop listening: connections are refused until the mode changes.
    Refuse,
}

impl FailMode {
    pub fn parse(s: &str) -> Option<FailMode> {
        Some(match s {
            "none" | "" => FailMode::None,
            "error500" => FailMode::Error500,
            "error429" => FailMode::Error429,
            "error500-inference" => FailMode::Error500Inference,
            "hang" => FailMode::Hang,
            "close-mid-stream" => FailMode::CloseMidStream,
            "refuse" => FailMode::Refuse,
            _ => return None,
        })
    }
}

/// One request as the mock saw it.
#[derive(Debug, Clone, Serialize)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    /// The query string as received, if any.
    pub query: Option<String>,
    pub body_len: usize,
    pub model: Option<String>,
    pub headers: Vec<(String, String)>,
    /// The body as received when it was JSON (up to 64 KiB), so tests can check what a
    /// backend was really asked for.
    #[serde(skip)]
    pub json: Option<serde_json::Value>,
}

const LOG_CAP: usize = 10_000;

#[derive(Default)]
pub(crate) struct Recorder {
    pub total: AtomicU64,
    log: Mutex<Log>,
}

#[derive(Default)]
struct Log {
    by_path: HashMap<String, u64>,
    recent: Vec<SeenRequest>,
}

impl Recorder {
    pub fn record(&self, seen: SeenRequest) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        *log.by_path.entry(seen.path.clone()).or_default() += 1;
        if log.recent.len() == LOG_CAP {
            log.recent.remove(0);
        }
        log.recent.push(seen);
    }

    pub fn hits(&self, path: &str) -> u64 {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.by_path.get(path).copied().unwrap_or(0)
    }

    pub fn recent(&self) -> Vec<SeenRequest> {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recent
            .clone()
    }

    pub fn stats_json(&self) -> serde_json::Value {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::json!({
            "total": self.total.load(Ordering::Relaxed),
            "paths": log.by_path,
            "recent": log.recent.iter().rev().take(50).collect::<Vec<_>>(),
        })
    }

    pub fn reset(&self) {
        self.total.store(0, Ordering::Relaxed);
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.by_path.clear();
        log.recent.clear();
    }
}
