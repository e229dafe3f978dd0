//! The request phases. It only orchestrates; each phase lives in its own file and each concern
//! (filters, routing, usage) in its own module. HTTP/1 requests are driven through the phases
//! by `h1.rs`; HTTP/2 streams by Pingora's `HttpProxy`, through the `ProxyHttp` implementation
//! below ([`H2Phases`]). Both call the same phase functions.
//!
//! ```text
//! client ──▶ early_request_filter : request id, client address (IPv6 by prefix), start time
//!            request_filter       : request.rs, in this order, cheap before expensive:
//!                                   listener address rules (fail closed), framing (one
//!                                   Content-Length or chunked, else 400), canonical path,
//!                                   /health; filters that need no body (address limits,
//!                                   auth); then the body, read + capped (every route), JSON
//!                                   parsed once where the route names models; the rest of
//!                                   the chain (policy, key limits, budget): first rejection
//!                                   answers in the route's error shape
//!                                   model lists from the merged catalogue; everything else:
//!                                   forward/ sends the held body with the gateway's own
//!                                   framing and headers (pooled connections, retries only
//!                                   where the backend provably did not get the request, or
//!                                   answered 5xx/429), streams the answer, parses usage
//!            fail_to_proxy        : every gateway-made error is JSON (heads Pingora's parser
//!                                   could not read are answered by connection.rs and h1.rs)
//!            (the answer's end)   : before its last bytes, chain.on_response_end gives back
//!                                   slots and reservations (logging::end_response)
//!            logging              : status, duration → chain.on_complete (all requests)
//! ```
//!
//! Why requests bypass Pingora's proxy path: Pingora 0.9 replays a pre-read body only up to
//! 64 KiB, while bodies are held (up to `limits.max_body`) to route by model, validate, hash
//! and replay them on a retry; and one path means one set of body limits, timeouts, framing,
//! header hygiene and retry rules for every route.

mod accept;
mod admin_listener;
mod body;
mod client_stream;
mod connection;
mod connection_caps;
mod ctx;
pub mod drain;
mod forward;
mod framing;
mod h1;
mod headers;
mod held_json;
mod logging;
mod modelfile;
mod request;
mod respond;
mod strict_json;
mod upstream_pool;
mod upstream_stream;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::Result;
use pingora_error::Error;
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

pub use accept::{GatewayService, Listening};
pub use admin_listener::{
    GuardedAdmin, MAX_CONNECTIONS as ADMIN_MAX_CONNECTIONS, MAX_PER_CLIENT as ADMIN_MAX_PER_CLIENT,
};
pub use connection::{ConnectionLimits, GatewayApp};
pub use connection_caps::{ConnectionCaps, ListenerCaps};
pub use ctx::GwCtx;
pub use respond::health_json;

use crate::chain::FilterChain;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::router::Router;

/// Counts requests between `early_request_filter` and the end of `logging`, so shutdown can
/// end as soon as nothing is in flight.
#[derive(Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    pub(crate) fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.0.clone())
    }
}

pub struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A place in the backend queue; see [`Gateway::queue_slot`].
struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct Gateway {
    pub settings: Arc<Settings>,
    pub chain: Arc<FilterChain>,
    pub router: Arc<dyn Router>,
    pub metrics: Arc<Metrics>,
    pub in_flight: InFlight,
    /// OTLP span export, when `telemetry.otlp` is set.
    pub telemetry: Option<Arc<crate::telemetry::Telemetry>>,
    /// Requests waiting for a backend slot (bounded by `routing.queue.size`).
    queued: AtomicUsize,
    /// Idle backend connections, by backend index.
    pub upstreams: upstream_pool::UpstreamPool,
}

impl Gateway {
    pub fn new(
        settings: Arc<Settings>,
        chain: Arc<FilterChain>,
        router: Arc<dyn Router>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let upstreams = upstream_pool::UpstreamPool::new(router.pool().len());
        Gateway {
            settings,
            chain,
            router,
            metrics,
            in_flight: InFlight::default(),
            telemetry: None,
            queued: AtomicUsize::new(0),
            upstreams,
        }
    }

    /// A place in the bounded queue of requests waiting for a free backend, given back when
    /// the guard drops (also when the waiting request is cancelled).
    fn queue_slot(&self) -> Option<QueueSlot<'_>> {
        let max = self.settings.routing.queue_size;
        if self.queued.fetch_add(1, Ordering::AcqRel) < max {
            Some(QueueSlot(&self.queued))
        } else {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }

    /// An attempt on backend `idx` failed and the request moves on to another one.
    fn count_retry(&self, idx: usize) {
        self.metrics
            .retries
            .with_label_values(&[&self.router.pool().get(idx).name])
            .inc();
    }
}

/// The gateway's phases for Pingora's `HttpProxy`, which serves HTTP/2 streams (HTTP/1
/// requests are driven by `h1.rs`, without `HttpProxy`).
pub struct H2Phases(pub Arc<Gateway>);

#[async_trait]
impl ProxyHttp for H2Phases {
    type CTX = GwCtx;

    fn new_ctx(&self) -> GwCtx {
        GwCtx::default()
    }

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut GwCtx) -> Result<()> {
        connection::h2_request_began(session);
        request::early(&self.0, session, ctx, false);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut GwCtx) -> Result<bool> {
        request::filter(&self.0, session, ctx).await
    }

    /// Never reached: `request_filter` answers every request itself (forward/ sends it to
    /// a backend), so Pingora's own proxy path, with its own framing, header and retry rules,
    /// is not used.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut GwCtx,
    ) -> Result<Box<HttpPeer>> {
        Err(Error::explain(
            pingora_error::ErrorType::InternalError,
            "every request is answered in request_filter",
        ))
    }

    /// A client that leaves mid-response is normal (Ctrl-C, a closed tab): not an error worth
    /// a log line. It is still recorded in the audit line and metrics.
    fn suppress_error_log(&self, _session: &Session, _ctx: &GwCtx, e: &Error) -> bool {
        respond::client_gone(e)
    }

    /// What Pingora's error lines say of the request: what the client chose, cut (a 4 KiB
    /// path in HPACK's table costs the client one byte a stream, the log line 4 KiB).
    fn request_summary(&self, _session: &Session, ctx: &GwCtx) -> String {
        use gateway_filter::redact::clip;
        format!("{} {}", clip(ctx.req.method.as_str()), clip(&ctx.req.path))
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut GwCtx,
    ) -> FailToProxy {
        respond::fail_to_proxy(session, e, ctx).await
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut GwCtx) {
        logging::complete(&self.0, session, e, ctx).await
    }
}
