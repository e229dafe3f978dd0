//! Background polling, on its own thread: each backend's models (Ollama `/api/tags` and
//! `/api/ps`, OpenAI-compatible `/v1/models`) every `discovery.interval`, and a cheap health
//! probe (Ollama `/api/version`, else `/v1/models`; never an inference call) every
//! `health.interval`; both only while the backend has no request of ours running.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use pingora_core::connectors::http::v1::Connector;
use pingora_http::RequestHeader;
use serde_json::Value;

use super::pool::{canonical_model, BackendPool};
use crate::config::{BackendKind, RoutingSpec};

/// GET `path` on backend `idx`; the status and the body (capped) on success.
async fn get(
    connector: &Connector,
    pool: &BackendPool,
    idx: usize,
    path: &str,
    timeout: Duration,
) -> Option<(u16, Vec<u8>)> {
    let b = pool.get(idx);
    let fetch = async {
        let (mut s, _) = connector.get_http_session(&b.peer).await.ok()?;
        let mut req = RequestHeader::build("GET", path.as_bytes(), Some(3)).ok()?;
        req.insert_header("host", b.authority.as_str()).ok()?;
        req.insert_header("accept-encoding", "identity").ok()?;
        req.insert_header("connection", "close").ok()?;
        s.write_request_header(Box::new(req)).await.ok()?;
        s.finish_body().await.ok()?;
        s.read_response().await.ok()?;
        let status = s.resp_header()?.status.as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = s.read_body_ref().await.ok()? {
            if body.len() + chunk.len() > (16 << 20) {
                return None;
            }
            body.extend_from_slice(chunk);
        }
        Some((status, body))
    };
    tokio::time::timeout(timeout, fetch).await.ok().flatten()
}

fn json_ok(r: Option<(u16, Vec<u8>)>) -> Option<Value> {
    match r {
        Some((200, body)) => serde_json::from_slice(&body).ok(),
        _ => None,
    }
}

async fn discover(connector: &Connector, pool: &BackendPool, idx: usize, timeout: Duration) {
    let b = pool.get(idx);
    match b.kind {
        BackendKind::Ollama => {
            if let Some(tags) = json_ok(get(connector, pool, idx, "/api/tags", timeout).await) {
                let entries: Vec<Value> = tags
                    .get("models")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let names: HashSet<String> = entries
                    .iter()
                    .filter_map(|e| {
                        e.get("name")
                            .or_else(|| e.get("model"))
                            .and_then(Value::as_str)
                    })
                    .map(|n| canonical_model(n).into_owned())
                    .collect();
                b.set_models(names, entries);
            }
            if let Some(ps) = json_ok(get(connector, pool, idx, "/api/ps", timeout).await) {
                let loaded = ps
                    .get("models")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|e| {
                                e.get("name")
                                    .or_else(|| e.get("model"))
                                    .and_then(Value::as_str)
                            })
                            .map(|n| canonical_model(n).into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                b.set_loaded(loaded);
            }
        }
        BackendKind::Openai => {
            if let Some(models) = json_ok(get(connector, pool, idx, "/v1/models", timeout).await) {
                let entries: Vec<Value> = models
                    .get("data")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let names = entries
                    .iter()
                    .filter_map(|e| e.get("id").and_then(Value::as_str))
                    .map(|n| canonical_model(n).into_owned())
                    .collect();
                b.set_models(names, entries);
            }
        }
    }
}

async fn probe(connector: &Connector, pool: &BackendPool, idx: usize, timeout: Duration) {
    let path = match pool.get(idx).kind {
        BackendKind::Ollama => "/api/version",
        BackendKind::Openai => "/v1/models",
    };
    let ok = matches!(
        get(connector, pool, idx, path, timeout).await,
        Some((200..=299, _))
    );
    pool.set_probe(idx, ok);
}

/// Whether backend `idx` has no request of ours running. A busy backend is proven alive by
/// its live traffic (passive health judges it), and polling it may hurt what runs there:
/// llama-cpp-python's server (`interrupt_requests`, on by default) cuts a running stream short
/// whenever another request arrives, probes included.
fn idle(pool: &BackendPool, idx: usize) -> bool {
    pool.get(idx).in_flight() == 0
}

/// Discovery reads models and residency: an Ollama backend keeps being read while busy (its
/// `/api/ps` disturbs nothing, and a stale one would give a cold load the warm deadline);
/// an OpenAI-compatible one only while idle.
fn may_discover(pool: &BackendPool, idx: usize) -> bool {
    pool.get(idx).kind == BackendKind::Ollama || idle(pool, idx)
}

/// Discovery and health probes, for the router's background thread; `None` when both are off.
pub fn poller(pool: BackendPool, spec: &RoutingSpec) -> Option<impl Future<Output = ()> + Send> {
    if pool.is_empty() || (spec.discovery_interval.is_none() && spec.health_interval.is_none()) {
        return None;
    }
    let (discovery, health) = (spec.discovery_interval, spec.health_interval);
    let (discovery_timeout, timeout) = (spec.discovery_timeout, spec.probe_timeout);
    Some(async move {
        let connector = Connector::new(None);
        let forever = Duration::from_secs(3600 * 24 * 365);
        let mut d = tokio::time::interval(discovery.unwrap_or(forever));
        let mut h = tokio::time::interval(health.unwrap_or(forever));
        loop {
            tokio::select! {
                _ = d.tick(), if discovery.is_some() => {
                    for i in (0..pool.len()).filter(|&i| may_discover(&pool, i)) {
                        discover(&connector, &pool, i, discovery_timeout).await;
                    }
                }
                _ = h.tick(), if health.is_some() => {
                    for i in (0..pool.len()).filter(|&i| idle(&pool, i)) {
                        probe(&connector, &pool, i, timeout).await;
                    }
                }
            }
        }
    })
}
