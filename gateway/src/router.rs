//! Choosing a backend. The proxy only sees the [`Router`] trait, so smarter strategies
//! (model-aware, usage-based) replace [`RoundRobin`] without touching the proxy.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_filter::RequestCtx;
use pingora_core::upstreams::peer::HttpPeer;

use crate::config::{BackendKind, BackendSpec, Limits};

/// How long a backend that refused a connection is skipped.
const COOLDOWN: Duration = Duration::from_secs(5);

/// One model server and what the gateway has seen of it.
pub struct Backend {
    pub name: Arc<str>,
    pub kind: BackendKind,
    pub authority: String,
    /// Template peer with the configured timeouts; cloned per attempt.
    pub peer: HttpPeer,
    down_until_ms: AtomicU64,
    failures: AtomicU32,
}

impl Backend {
    pub fn new(spec: &BackendSpec, limits: &Limits) -> Backend {
        let mut peer = HttpPeer::new(spec.addr, false, String::new());
        peer.options.connection_timeout = Some(limits.connect_timeout);
        peer.options.total_connection_timeout = Some(limits.connect_timeout);
        peer.options.read_timeout = Some(limits.read_timeout);
        peer.options.write_timeout = Some(limits.send_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Backend {
            name: spec.name.clone(),
            kind: spec.kind,
            authority: spec.authority.clone(),
            peer,
            down_until_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
        }
    }
}

/// The configured backends with their passive health.
pub struct BackendPool {
    backends: Vec<Backend>,
    epoch: Instant,
}

impl BackendPool {
    pub fn new(specs: &[BackendSpec], limits: &Limits) -> BackendPool {
        BackendPool {
            backends: specs.iter().map(|s| Backend::new(s, limits)).collect(),
            epoch: Instant::now(),
        }
    }

    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    pub fn get(&self, idx: usize) -> &Backend {
        &self.backends[idx]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Backend> {
        self.backends.iter()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn is_up(&self, idx: usize) -> bool {
        self.backends[idx].down_until_ms.load(Ordering::Relaxed) <= self.now_ms()
    }

    /// A connection attempt failed: skip the backend for a while.
    pub fn mark_failed(&self, idx: usize) {
        let b = &self.backends[idx];
        b.failures.fetch_add(1, Ordering::Relaxed);
        b.down_until_ms.store(
            self.now_ms() + COOLDOWN.as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    pub fn mark_ok(&self, idx: usize) {
        let b = &self.backends[idx];
        if b.failures.load(Ordering::Relaxed) != 0 {
            b.failures.store(0, Ordering::Relaxed);
            b.down_until_ms.store(0, Ordering::Relaxed);
        }
    }
}

/// Picks the backend for one attempt of a request.
pub trait Router: Send + Sync {
    /// A backend index not in `tried`, or `None` when every backend has been tried.
    fn pick(&self, ctx: &RequestCtx, tried: &[usize]) -> Option<usize>;
    fn pool(&self) -> &BackendPool;
}

/// Plain round-robin over the backends that answer; when none is known to answer, the
/// next untried one is still attempted so a recovered backend is found again.
pub struct RoundRobin {
    pool: BackendPool,
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new(pool: BackendPool) -> Self {
        RoundRobin {
            pool,
            next: AtomicUsize::new(0),
        }
    }
}

impl Router for RoundRobin {
    fn pick(&self, _ctx: &RequestCtx, tried: &[usize]) -> Option<usize> {
        let n = self.pool.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let untried = (0..n)
            .map(|i| (start + i) % n)
            .filter(|i| !tried.contains(i));
        let mut fallback = None;
        for idx in untried {
            if self.pool.is_up(idx) {
                return Some(idx);
            }
            fallback.get_or_insert(idx);
        }
        fallback
    }

    fn pool(&self) -> &BackendPool {
        &self.pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_filter::http::Method;

    fn pool(n: usize) -> BackendPool {
        let specs: Vec<BackendSpec> = (0..n)
            .map(|i| BackendSpec {
                name: format!("b{i}").into(),
                kind: BackendKind::Ollama,
                addr: ([127, 0, 0, 1], 10_000 + i as u16).into(),
                authority: format!("127.0.0.1:{}", 10_000 + i),
            })
            .collect();
        let limits = Limits {
            max_body: 1,
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            send_timeout: Duration::from_secs(1),
            client_body_timeout: Duration::from_secs(1),
        };
        BackendPool::new(&specs, &limits)
    }

    #[test]
    fn rotates_and_skips_failed() {
        let rr = RoundRobin::new(pool(3));
        let ctx = RequestCtx::new(String::new(), Method::POST, "/api/chat".into());
        let picks: Vec<_> = (0..6).map(|_| rr.pick(&ctx, &[]).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        rr.pool().mark_failed(1);
        let picks: Vec<_> = (0..4).map(|_| rr.pick(&ctx, &[]).unwrap()).collect();
        assert!(!picks.contains(&1), "{picks:?}");
        assert_eq!(
            rr.pick(&ctx, &[0, 2]),
            Some(1),
            "a down backend is still tried last"
        );
        assert_eq!(rr.pick(&ctx, &[0, 1, 2]), None);
        rr.pool().mark_ok(1);
        assert!(rr.pool().is_up(1));
    }
}
