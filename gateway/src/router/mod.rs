//! Choosing a backend for each attempt of a request. The proxy only sees the [`Router`]
//! trait. `ModelRouter` keeps to healthy backends that serve the request's model, prefers
//! those that have it loaded, and ranks them by the configured strategy.

mod discovery;
mod missed;
mod pool;
mod shared_usage;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use gateway_filter::glob::wildcard;
use gateway_filter::{RequestCtx, Route, WireFormat};

pub use missed::MissedDeadlines;
pub use pool::{canonical_model, Backend, BackendPool, Judged, Lease};

/// The most tokens one request's reservation or one answer's usage counts for in routing
/// figures: more than any context, small enough that sums of them cannot wrap.
pub const MAX_TOKENS_COUNTED: u64 = 1 << 32;

use crate::config::{BackendKind, RoutingSpec, Strategy};

/// The outcome of choosing a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    Backend(usize),
    /// No backend serves the model (all lists are known).
    UnknownModel,
    /// Backends serve it but none is up, or all are untried-and-full.
    NoneAvailable,
    /// All candidates are at `max_in_flight` (least-busy): wait for a slot.
    Full,
}

/// How an attempt on a backend ended, for its health and its figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It answered; `tokens`: what the request used. Only work served (a 2xx on an inference
    /// route or a POST to a custom one: `inference`) shows the backend works: a model list, a
    /// version or a client's error answers also from a backend whose runner fails every
    /// request, and reset its failures for anyone who polls it.
    Answered {
        status: u16,
        tokens: u64,
        ttfb: Option<Duration>,
        inference: bool,
    },
    /// It failed: the connection, the exchange or its stream broke.
    Failed { health: Health },
}

/// Whom a failed attempt counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Nobody: not the backend's doing (a 429).
    Kept,
    /// The backend alone: it refused or dropped a connection before it had the request.
    Failed,
}
// A deadline missed, which the request may have caused itself, is judged with the request's
// other misses once it ends: [`MissedDeadlines`].

pub trait Router: Send + Sync {
    /// A backend for the next attempt, never one in `tried`.
    fn pick(&self, ctx: &RequestCtx, tried: &[usize]) -> Pick;
    fn pool(&self) -> &BackendPool;
    fn strategy_for(&self, model: Option<&str>) -> Strategy;
    /// Whether another backend than those in `tried` could take the request now.
    fn has_alternative(&self, ctx: &RequestCtx, tried: &[usize]) -> bool;
    /// Whether a request that failed on the last of `tried` before anything reached the
    /// client may try another backend: within `routing.retries`, and one is there to take it.
    fn may_retry(&self, ctx: &RequestCtx, tried: &[usize]) -> bool;

    /// Records how an attempt on backend `idx` ended: its health and the figures the
    /// strategies rank by.
    fn settle(&self, idx: usize, outcome: Outcome) {
        let pool = self.pool();
        match outcome {
            Outcome::Answered {
                status,
                tokens,
                ttfb,
                inference,
            } => {
                // A server error answered counts against the backend only once another
                // backend has served the same request (see `forward`): otherwise requests
                // that fail everywhere would let any client take backends out.
                if inference && (200..300).contains(&status) {
                    pool.mark_ok(idx);
                }
                pool.record(idx, tokens, ttfb);
            }
            Outcome::Failed {
                health: Health::Failed,
            } => pool.mark_failed(idx),
            Outcome::Failed {
                health: Health::Kept,
            } => {}
        }
    }
}

/// Ollama's routes go to Ollama backends only (see [`ModelRouter::candidates`]).
fn ollama_only(ctx: &RequestCtx) -> bool {
    ctx.route != Route::Other && ctx.route.wire_format() == WireFormat::Ollama
}

pub struct ModelRouter {
    pool: BackendPool,
    spec: RoutingSpec,
    next: AtomicUsize,
}

impl ModelRouter {
    pub fn new(pool: BackendPool, spec: RoutingSpec) -> Self {
        ModelRouter {
            pool,
            spec,
            next: AtomicUsize::new(0),
        }
    }

    /// Healthy, untried backends that serve the request's model (unknown lists count as
    /// "maybe") in its wire format: Ollama's routes go to Ollama backends only. (llama.cpp's
    /// server answers `/api/chat` too, but reads its body as OpenAI's: `n_predict`,
    /// `n_cmpl`, `lora`, none of which the gateway checks on Ollama's routes.)
    fn candidates(&self, ctx: &RequestCtx, tried: &[usize]) -> Result<Vec<usize>, Pick> {
        let model = ctx.model.as_deref();
        let ollama_only = ollama_only(ctx);
        let n = self.pool.len();
        if n == 0 {
            return Err(Pick::NoneAvailable);
        }
        // One pass, one allocation: the backends that may serve the model and are up.
        let model = model.map(canonical_model);
        let mut serving = false;
        let mut standby = false;
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            if !self.may_serve(i, model.as_deref(), ollama_only) {
                continue;
            }
            serving = true;
            if !tried.contains(&i) {
                if self.pool.is_up(i) {
                    up.push(i);
                } else {
                    standby |= self.pool.is_standby(i);
                }
            }
        }
        if !serving {
            return Err(Pick::UnknownModel);
        }
        if up.is_empty() && standby {
            // None up: those out only on failures requests may have caused take it (a model
            // or a wire format is never left without a backend by them).
            // (Up again since the first pass, it is taken all the same.)
            up.extend((0..n).filter(|&i| {
                !tried.contains(&i)
                    && (self.pool.is_standby(i) || self.pool.is_up(i))
                    && self.may_serve(i, model.as_deref(), ollama_only)
            }));
        }
        if up.is_empty() {
            return Err(Pick::NoneAvailable);
        }
        // Model residency: keep to backends that have the model loaded, unless every one of
        // them is over the load threshold.
        if let Some(m) = model.as_deref() {
            let threshold = self.spec.residency_max_in_flight;
            let warm_with_room = up.iter().any(|&i| {
                let b = self.pool.get(i);
                b.has_loaded(m) && !b.is_full() && b.in_flight() < threshold
            });
            if warm_with_room {
                up.retain(|&i| self.pool.get(i).has_loaded(m));
            }
        }
        Ok(up)
    }

    /// Whether backend `i` may serve `model` (in [`canonical_model`] form; an unknown list
    /// counts as "maybe") on a route of the request's wire format.
    fn may_serve(&self, i: usize, model: Option<&str>, ollama_only: bool) -> bool {
        let b = self.pool.get(i);
        !(model.is_some_and(|m| b.serves(m) == Some(false))
            || (ollama_only && b.kind != BackendKind::Ollama))
    }

    fn weighted_pick(&self, c: &[usize], mut ticket: usize) -> usize {
        let total: usize = c.iter().map(|&i| self.pool.get(i).weight as usize).sum();
        ticket %= total.max(1);
        for &i in c {
            let w = self.pool.get(i).weight as usize;
            if ticket < w {
                return i;
            }
            ticket -= w;
        }
        c[0]
    }

    /// The minimum of `score / weight` (ties: the first).
    fn least_by(&self, c: &[usize], score: impl Fn(usize) -> f64) -> usize {
        let mut best = c[0];
        let mut best_score = f64::INFINITY;
        for &i in c {
            let s = score(i) / f64::from(self.pool.get(i).weight);
            if s < best_score {
                best = i;
                best_score = s;
            }
        }
        best
    }
}

impl Router for ModelRouter {
    fn pick(&self, ctx: &RequestCtx, tried: &[usize]) -> Pick {
        let model = ctx.model.as_deref();
        let mut c = match self.candidates(ctx, tried) {
            Ok(c) => c,
            Err(p) => return p,
        };
        // A backend at its max_in_flight takes nothing more (any strategy).
        c.retain(|&i| !self.pool.get(i).is_full());
        if c.is_empty() {
            return Pick::Full;
        }
        let pick = match self.strategy_for(model) {
            Strategy::RoundRobin => {
                self.weighted_pick(&c, self.next.fetch_add(1, Ordering::Relaxed))
            }
            Strategy::Random => self.weighted_pick(&c, fastrand::usize(..usize::MAX)),
            Strategy::LeastBusy => self.least_by(&c, |i| f64::from(self.pool.get(i).in_flight())),
            Strategy::Usage => self.least_by(&c, |i| self.pool.usage_score(i) as f64),
            Strategy::Latency => {
                // Untried backends (no sample) first, so every backend gets measured; then a
                // random one among those within the tolerance of the fastest.
                if let Some(&fresh) = c.iter().find(|&&i| self.pool.get(i).ttfb_us() == 0) {
                    fresh
                } else {
                    let best = c
                        .iter()
                        .map(|&i| self.pool.get(i).ttfb_us())
                        .min()
                        .unwrap_or(0) as f64;
                    let band: Vec<usize> = c
                        .iter()
                        .copied()
                        .filter(|&i| {
                            self.pool.get(i).ttfb_us() as f64
                                <= best * (1.0 + self.spec.latency_tolerance)
                        })
                        .collect();
                    band[fastrand::usize(..band.len())]
                }
            }
        };
        Pick::Backend(pick)
    }

    fn pool(&self) -> &BackendPool {
        &self.pool
    }

    fn has_alternative(&self, ctx: &RequestCtx, tried: &[usize]) -> bool {
        self.candidates(ctx, tried).is_ok()
    }

    fn may_retry(&self, ctx: &RequestCtx, tried: &[usize]) -> bool {
        tried.len() <= self.spec.retries as usize && self.has_alternative(ctx, tried)
    }

    fn strategy_for(&self, model: Option<&str>) -> Strategy {
        model
            .and_then(|m| {
                self.spec
                    .per_model
                    .iter()
                    .find(|(p, _)| wildcard(p, m))
                    .map(|(_, s)| *s)
            })
            .unwrap_or(self.spec.strategy)
    }
}

/// Starts the router's background work (model discovery, health probes, the usage figures
/// shared with other replicas) on one thread with its own runtime, for the life of the process.
pub fn spawn_background(pool: BackendPool, spec: &RoutingSpec) {
    let polls = discovery::poller(pool.clone(), spec);
    let sync = shared_usage::syncer(pool);
    if polls.is_none() && sync.is_none() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("backend-poller".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!("backend poller: cannot start: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                tokio::join!(
                    async move {
                        if let Some(p) = polls {
                            p.await
                        }
                    },
                    async move {
                        if let Some(s) = sync {
                            s.await
                        }
                    }
                );
            });
        });
    if let Err(e) = spawned {
        log::error!("backend poller: cannot start: {e}");
    }
}

#[cfg(test)]
mod tests;
