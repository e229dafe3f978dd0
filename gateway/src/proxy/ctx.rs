use gateway_filter::http::Method;
use gateway_filter::RequestCtx;

use super::InFlightGuard;

/// Pingora's per-request context: the filters' [`RequestCtx`] plus what only the proxy needs.
pub struct GwCtx {
    pub req: RequestCtx,
    /// Backends tried so far for this request (index into the pool).
    pub tried: Vec<usize>,
    pub(super) in_flight: Option<InFlightGuard>,
    /// The response was written by the gateway itself (health, rejection, forward/).
    pub(super) answered: bool,
    /// The gateway asked the backend for stream usage the client did not ask for: the usage
    /// event is removed from the client's stream.
    pub(super) strip_usage_event: bool,
    /// The request body was read (or reading it was tried): a refusal before that closes
    /// the connection instead of reading the body.
    pub(super) body_read: bool,
    /// SSE keep-alives went out while the backend was silent: the client has a 200 and its
    /// headers, so nothing can be retried or answered with another status any more.
    pub(super) keepalive_sent: bool,
    /// When the first attempt on a backend began.
    pub(super) upstream_started: Option<std::time::Instant>,
    /// When the current attempt began.
    pub(super) attempt_started: Option<std::time::Instant>,
    /// An earlier attempt's backend had the whole request and was given up on unanswered
    /// (first-byte timeout): it may have run it, whatever the later attempts do.
    pub(super) may_have_run: bool,
    /// This request's hold on its current backend (in-flight count, reserved tokens).
    pub(super) lease: Option<crate::router::Lease>,
    /// This request's span ids (unset without telemetry).
    pub(super) trace: crate::telemetry::Trace,
    /// `logging::end_response` ran: what the request held is given back.
    pub(super) response_ended: bool,
    /// The HTTP/1 client connection's socket (plain or TLS), owned by the session for the
    /// request's whole life: asked for its TCP state, never read or written through this.
    pub(super) client_socket: Option<std::os::fd::RawFd>,
    /// What the answer's handling reads from the request's JSON, taken as the body left for
    /// the backend (the tree of a large body is let go then: [`super::held_json`]).
    pub(super) body_facts: super::held_json::BodyFacts,
    /// Deadlines this request missed on backends, judged when it ends.
    pub(super) missed: crate::router::MissedDeadlines,
}

impl GwCtx {
    /// An attempt on a backend begins: the upstream time starts at the first one.
    pub(super) fn begin_attempt(&mut self) {
        // This attempt's, once it is sent (a deadline missed before is timed from its start).
        self.req.sent = None;
        self.attempt_started = Some(std::time::Instant::now());
        self.upstream_started
            .get_or_insert_with(std::time::Instant::now);
    }
}

impl Default for GwCtx {
    fn default() -> Self {
        GwCtx {
            req: RequestCtx::new(String::new(), Method::GET, String::new()),
            tried: Vec::new(),
            in_flight: None,
            answered: false,
            may_have_run: false,
            strip_usage_event: false,
            body_read: false,
            keepalive_sent: false,
            upstream_started: None,
            attempt_started: None,
            lease: None,
            trace: Default::default(),
            response_ended: false,
            client_socket: None,
            body_facts: Default::default(),
            missed: Default::default(),
        }
    }
}
