//! Several replicas on one real `redis-server`: limits, slots and budgets hold across all of
//! them together, and a dead, flushed or slow Redis never hangs a request or loses spend.

#[path = "../support/mod.rs"]
mod support;

mod chunks;
mod failures;
mod limits;
pub mod round_trip;
mod spend;

use support::redis::Redis;
use support::{backends, Gateway};

/// The key every replica knows.
pub const KEY: &str = "sk-gw-replica-test-key";

/// `chat()` to `/api/chat` of `gw` with `KEY`.
pub async fn key_chat(c: &reqwest::Client, gw: &Gateway) -> reqwest::Response {
    c.post(gw.url("/api/chat"))
        .bearer_auth(KEY)
        .json(&support::chat())
        .send()
        .await
        .unwrap()
}

/// A keys file with `KEY` (principal `team`) in `dir`.
pub fn keys_file(dir: &std::path::Path) -> String {
    let path = dir.join("keys.yaml");
    std::fs::write(
        &path,
        format!(
            "keys:\n  - id: team\n    key_sha256: {}\n",
            filter_auth::keygen::hash_key(KEY)
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// Three gateways with the same `body` (backends and filters) on `redis`.
pub async fn three(redis: &Redis, body: &str) -> Vec<Gateway> {
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(Gateway::start(&format!("{}{body}", redis.state())).await);
    }
    out
}

/// A fresh Redis, a mock backend and three replicas of the chain `auth` (keys file with
/// `KEY`) followed by `rest` (more YAML for the auth entry, or more filter entries).
pub struct Replicas {
    pub redis: Redis,
    pub mock: mock_ollama::MockServer,
    pub gws: Vec<Gateway>,
    /// The keys file's folder.
    pub dir: tempfile::TempDir,
}

pub async fn replicas(rest: &str) -> Replicas {
    let redis = Redis::start();
    let mock = support::mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gws = three(&redis, &keyed_chain(&mock, dir.path(), rest)).await;
    Replicas {
        redis,
        mock,
        gws,
        dir,
    }
}

/// One mock backend and the chain `auth` (keys file in `dir` with `KEY`) followed by `rest`.
pub fn keyed_chain(m: &mock_ollama::MockServer, dir: &std::path::Path, rest: &str) -> String {
    format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n{rest}",
        one_backend(&m.url()),
        keys_file(dir)
    )
}

/// Backends YAML for one mock.
pub fn one_backend(url: &str) -> String {
    backends(&[("gpu", url)])
}
