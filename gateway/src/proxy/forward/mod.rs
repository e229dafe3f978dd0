//! Forwarding every request to a backend, with our own retry loop.
//!
//! `upstream_pool.rs` keeps idle backend connections; [`exchange`] writes the request (header +
//! held body, with framing and headers the gateway chose) and reads the answer's header;
//! [`stream`] relays the response to the client chunk by chunk as it arrives, and feeds each
//! chunk to the usage parser. This loop acts on how each attempt ended; the router decides
//! whether and where to go next (`Router::may_retry`, `Router::pick`) and records the
//! outcome for the backend (`Router::settle`). Before any byte
//! reached the client, a request that provably did not reach the backend (connect failure,
//! failed write) or that the backend answered with 5xx/429 moves on to another backend (up to
//! `routing.retries`), replaying the same body; a timeout or a dropped connection after the
//! request was written is answered, never sent again; once a byte was sent, nothing is retried.

mod exchange;
mod stream;

use bytes::Bytes;
use gateway_filter::http::StatusCode;
use gateway_filter::{echo, Decision, Rejection, RequestCtx};
use pingora_core::Result;
use pingora_error::{Error, ErrorType};
use pingora_proxy::Session;

use super::{respond, Gateway, GwCtx};
use crate::router::{Backend, Health, Outcome, Pick};

/// How an attempt on one backend ended.
enum Attempt {
    /// The client got its full response.
    Done,
    /// Nothing was sent to the client and the backend failed: try another. `answered`: the
    /// error status it answered with (it counts against the backend only if another backend
    /// serves the same request); `None`: it failed to answer. `reached`: it had (a part of)
    /// the request: its failure may be the request's doing (a deadline missed, a head or body
    /// it would not take), judged with the request's other misses ([`missed`]); before that
    /// (no connection) the failure is the backend's own.
    Retry {
        err: Box<Error>,
        answered: Option<u16>,
        reached: bool,
    },
    /// Nothing was sent to the client; answer with an error.
    Fail(Box<Error>),
    /// The backend got the request and failed to answer (timeout, connection dropped): it may
    /// have started generating, so the request is not sent again; answered with an error.
    Unanswered(Box<Error>),
    /// Bytes already reached the client (or it left): the exchange is over, abort it.
    Abort(Box<Error>),
}

/// How long a backend whose shared slots are all taken counts as full before it is asked again.
const SHARED_FULL_MS: u64 = 20;

/// Whether a backend's error answer says the backend is unwell: a server error, but not
/// `503` (Ollama's full queue: busy, like `429`), and not one that came after the backend
/// held a request with tools or several completions a while (llama.cpp's 500 for tool-call
/// arguments it generated, a later task's error: the request's). Other late errors (a model
/// that failed to load, a runner that died) are the backend's.
fn counts_against_backend(status: u16, ctx: &GwCtx) -> bool {
    if status < 500 || status == 503 {
        return false;
    }
    !(ctx.req.answered_late() && may_fail_by_itself(ctx))
}

/// Whether the request itself may be what a backend fails after generating: it has tools
/// (llama.cpp's 500 for tool-call arguments it cannot parse) or asks for several completions
/// (a later task's error). A body the gateway has no parser for (a custom route) may ask for
/// either.
fn may_fail_by_itself(ctx: &GwCtx) -> bool {
    ctx.body_facts.tools || ctx.req.completions > 1 || ctx.req.unknown_format
}

/// Who a request is for the health rule ([`crate::router::BackendPool::mark_failed_for`]):
/// its principal; every anonymous caller is one (addresses are cheap to change).
fn caller_key(req: &RequestCtx) -> u64 {
    req.principal
        .as_ref()
        .map_or(0, |p| gateway_filter::state::stable_hash(p.id.as_bytes()))
}

/// Whether a good answer to `req` shows the backend works: an inference route's, or a POST to
/// a route a custom rule opens (`/v1/responses`, SGLang's `/generate`), not a model list or a
/// version, which a backend whose runner fails every request answers too.
fn serves_work(req: &RequestCtx) -> bool {
    req.route.is_inference()
        || (req.route == gateway_filter::Route::Other
            && req.method == gateway_filter::http::Method::POST)
}

/// A failure the request may have caused on backend `idx` (a deadline missed, a write the
/// backend broke off, a stream that paused or broke, a backend that fell over on it), after
/// the time the backend had it (since it was sent to it; a request not sent whole, since
/// this attempt began): judged when the request ends, with its other misses
/// ([`crate::router::MissedDeadlines`]).
/// `broke`: a break (a write broken off, a connection dropped, a stream broken or left
/// silent once begun), not a deadline for the answer's start.
fn missed(gw: &Gateway, ctx: &mut GwCtx, idx: usize, broke: bool) {
    let waited = match ctx.req.sent {
        Some(sent) => ctx.req.started.elapsed().saturating_sub(sent),
        None => ctx
            .attempt_started
            .map_or(std::time::Duration::ZERO, |t| t.elapsed()),
    };
    let caller = caller_key(&ctx.req);
    ctx.missed
        .push(gw.router.pool(), idx, caller, waited, broke);
}

/// Whether a failure before any answer is a deadline for it (the first byte, the answer's
/// header, the request's write), not a break.
fn is_deadline(err: &Error) -> bool {
    match err.etype() {
        ErrorType::Custom(c) => *c == respond::FIRST_BYTE_TIMEOUT,
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => true,
        _ => false,
    }
}

/// Output tokens a request may still produce, for the usage-based strategy.
/// A client's figure (without an output cap it may be near u64::MAX); the pool bounds it.
fn reserved_tokens(ctx: &GwCtx) -> u64 {
    ctx.req.max_tokens.unwrap_or(1024)
}

pub async fn forward(gw: &Gateway, session: &mut Session, ctx: &mut GwCtx) -> Result<()> {
    ctx.strip_usage_event = crate::usage::request_stream_usage(&mut ctx.req);
    let Some(body) = held_body(ctx, gw.settings.limits.max_body)? else {
        let limit = gw.settings.limits.max_body;
        return answer(
            gw,
            session,
            ctx,
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            &format!("request body is larger than the limit of {limit} bytes once its numbers are written out in full"),
        )
        .await;
    };
    ctx.body_facts = super::held_json::take(&mut ctx.req, &body);
    let pool = gw.router.pool().clone();
    let mut last_err: Option<Box<Error>> = None;
    let mut queued_since = None;
    // The request's place in the queue, held from its first wait until it leaves the queue
    // (a backend taken, or an answer): given back at each wake-up, a newcomer could take it in
    // between and this request be refused before its deadline.
    let mut queue_place = None;
    // Backends that answered this request with a server error that may count against them
    // (see `counts_against_backend`), and how many server errors it got.
    let mut answered_5xx: Vec<usize> = Vec::new();
    let mut had_5xx = false;
    loop {
        let idx = match gw.router.pick(&ctx.req, &ctx.tried) {
            Pick::Backend(i) => i,
            Pick::Full => {
                // Every backend that could serve it is at max_in_flight: wait for a slot.
                let queued = *queued_since.get_or_insert_with(tokio::time::Instant::now);
                let deadline = queued + gw.settings.routing.queue_timeout;
                if queue_place.is_none() {
                    queue_place = gw.queue_slot();
                }
                if tokio::time::Instant::now() >= deadline || queue_place.is_none() {
                    return answer(
                        gw,
                        session,
                        ctx,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "backends_busy",
                        "all backends are busy; try again shortly",
                    )
                    .await;
                };
                // A slot freed between the pick and this wait is not missed: the pick is
                // made again once the wait is registered.
                // Slots freed on other replicas wake nobody here: look again shortly.
                let wake = match pool.state() {
                    Some(_) => deadline.min(
                        tokio::time::Instant::now()
                            + std::time::Duration::from_millis(SHARED_FULL_MS),
                    ),
                    None => deadline,
                };
                let socket = ctx.client_socket;
                let freed = pool.wait_freed(wake, || {
                    matches!(gw.router.pick(&ctx.req, &ctx.tried), Pick::Full)
                });
                // A client that leaves while queued gives its place back. Timed from the
                // queueing: wake-ups (every freed slot, shared state's polls) come sooner than
                // the watch's wait, and must not start it over.
                tokio::select! {
                    () = freed => continue,
                    e = exchange::client_left(session, socket, queued) => return Err(e),
                }
            }
            Pick::UnknownModel => {
                let model = ctx.req.model.clone().unwrap_or_default();
                return answer(
                    gw,
                    session,
                    ctx,
                    StatusCode::NOT_FOUND,
                    "model_not_found",
                    &format!("model {:?} is not served here", echo(&model)),
                )
                .await;
            }
            Pick::NoneAvailable => {
                return match last_err {
                    Some(e) => answer_failure(gw, session, ctx, &e).await,
                    None if pool.is_empty() => {
                        answer(
                            gw,
                            session,
                            ctx,
                            StatusCode::BAD_GATEWAY,
                            "no_backend",
                            "no backend is configured",
                        )
                        .await
                    }
                    None => {
                        answer(
                            gw,
                            session,
                            ctx,
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no_backend_available",
                            "no backend is available right now",
                        )
                        .await
                    }
                };
            }
        };
        // Another request may have taken the backend's last slot since the pick: pick again.
        let Some(mut lease) = pool.try_lease(idx, reserved_tokens(ctx)) else {
            continue;
        };
        if let (Some(max), Some(state)) = (pool.get(idx).max_in_flight, pool.state()) {
            let key = state.key(&["slots"], &[&pool.get(idx).name]);
            match gateway_filter::state::acquire_lease(state, key, max).await {
                Ok(Some(shared)) => lease.shared = Some(shared),
                Ok(None) => {
                    // The replicas together fill it: full here too for a moment.
                    pool.get(idx).mark_shared_full(SHARED_FULL_MS);
                    continue;
                }
                Err(_) if state.fail_closed() => {
                    ctx.req.decision = Decision::Failed {
                        code: "state_unavailable",
                    };
                    ctx.req.status = StatusCode::SERVICE_UNAVAILABLE.as_u16();
                    super::logging::end_response(gw, ctx);
                    return respond::rejection(
                        session,
                        &mut ctx.req,
                        &gateway_filter::state::unavailable(),
                    )
                    .await;
                }
                // `on_error: local`: this replica's own count holds it.
                Err(_) => {}
            }
        }
        // Out of the queue: its place goes to the next waiter, and a later wait (after a
        // failed attempt) starts its own deadline.
        queue_place = None;
        queued_since = None;
        if !ctx.tried.is_empty() {
            ctx.req.retries += 1;
        }
        ctx.tried.push(idx);
        let backend = pool.get(idx);
        ctx.req.backend = Some(backend.name.clone());
        // What the attempts did decides what the request costs (see the budget filter): an
        // earlier backend that may have run it still counts.
        ctx.req.reached_backend = ctx.may_have_run;
        ctx.begin_attempt();
        ctx.lease = Some(lease);
        let may_retry = gw.router.may_retry(&ctx.req, &ctx.tried);
        let retry_5xx = !had_5xx;
        match attempt(gw, session, ctx, backend, &body, may_retry, retry_5xx).await {
            Attempt::Done => {
                // The request was served: the backends that answered it with a server error
                // failed on their own. Served nowhere, it may be the request's fault: the
                // backend's error counts only if its last one went to another caller (a
                // client must not take backends out with requests every backend refuses).
                let status = ctx.req.status;
                if (200..300).contains(&status) {
                    answered_5xx.iter().for_each(|&i| pool.mark_server_error(i));
                } else if counts_against_backend(status, ctx) {
                    pool.mark_failed_for(idx, caller_key(&ctx.req));
                }
                gw.router.settle(
                    idx,
                    Outcome::Answered {
                        status: ctx.req.status,
                        tokens: ctx.req.usage.map_or(0, |u| u.total()),
                        ttfb: ctx.req.ttfb,
                        inference: serves_work(&ctx.req),
                    },
                );
                return Ok(());
            }
            Attempt::Retry {
                err,
                answered,
                reached,
            } => {
                if let Some(status) = answered.filter(|s| *s >= 500) {
                    had_5xx = true;
                    if counts_against_backend(status, ctx) {
                        answered_5xx.push(idx);
                    }
                }
                log::warn!(
                    "request {}: backend {} failed before answering: {err}",
                    ctx.req.request_id,
                    backend.name
                );
                match answered {
                    Some(_) => gw.router.settle(
                        idx,
                        Outcome::Failed {
                            health: Health::Kept,
                        },
                    ),
                    None if reached => missed(gw, ctx, idx, !is_deadline(&err)),
                    None => gw.router.settle(
                        idx,
                        Outcome::Failed {
                            health: Health::Failed,
                        },
                    ),
                }
                gw.count_retry(idx);
                ctx.lease = None;
                if !may_retry || ctx.keepalive_sent {
                    return answer_failure(gw, session, ctx, &err).await;
                }
                last_err = Some(err);
            }
            Attempt::Fail(e) => return answer_failure(gw, session, ctx, &e).await,
            Attempt::Unanswered(e) => {
                let broke = !is_deadline(&e);
                log::warn!(
                    "request {}: backend {} did not answer: {e}",
                    ctx.req.request_id,
                    backend.name
                );
                missed(gw, ctx, idx, broke);
                return answer_failure(gw, session, ctx, &e).await;
            }
            Attempt::Abort(e) => {
                // A client leaving is not the backend's fault; a backend breaking its stream is.
                if e.esource() == &pingora_error::ErrorSource::Upstream {
                    // A stream that paused past `read_timeout` may be the model at work (a
                    // tool call's arguments held back): the caller's.
                    missed(gw, ctx, idx, true);
                }
                return Err(e);
            }
        }
    }
}

/// The gateway's own answer after the request was let through (no backend, or none that
/// answered): what the request holds goes back first, as before every answer's end.
async fn answer(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut GwCtx,
    status: StatusCode,
    code: &'static str,
    message: &str,
) -> Result<()> {
    ctx.req.decision = Decision::Failed { code };
    if !ctx.keepalive_sent {
        ctx.req.status = status.as_u16();
    }
    super::logging::end_response(gw, ctx);
    let rejection = Rejection::new(status, code, message);
    if ctx.keepalive_sent {
        // Headers are out (keep-alives): the error is the stream's last event, which the
        // OpenAI SDKs raise as an error. The client's status stays the 200 it got.
        let event = format!(
            "data: {}\n\n",
            rejection.body(gateway_filter::ErrorShape::OpenAi)
        );
        ctx.req.bytes_out += event.len() as u64;
        session
            .write_response_body(Some(Bytes::from(event)), false)
            .await
            .map_err(|e| e.into_down())?;
        return session
            .write_response_body(None, true)
            .await
            .map_err(|e| e.into_down());
    }
    respond::rejection(session, &mut ctx.req, &rejection).await
}

/// What a rewritten body may grow by past `limits.max_body`: the fields the gateway writes
/// (token limits, `stream_options`).
const REWRITE_ROOM: usize = 4096;

/// The body to send: as the client sent it, or written again from its JSON after a filter
/// changed it. `None`: written again, it passes `limits.max_body` by more than the fields the
/// gateway adds. A number is written in full (`1e15` becomes `1000000000000000.0`): a body of
/// such numbers grew almost fourfold past the limit on its way to the backend.
fn held_body(ctx: &GwCtx, max_body: usize) -> Result<Option<Bytes>> {
    if ctx.req.body_rewritten {
        let json = ctx.req.json.as_ref().ok_or_else(|| {
            Error::explain(ErrorType::InternalError, "rewritten body without JSON")
        })?;
        let mut out = Bounded {
            buf: Vec::with_capacity(ctx.req.body.as_ref().map_or(0, |b| b.len()) + 256),
            max: max_body.saturating_add(REWRITE_ROOM),
        };
        return match serde_json::to_writer(&mut out, json) {
            Ok(()) => Ok(Some(Bytes::from(out.buf))),
            Err(e) if e.is_io() => Ok(None),
            Err(e) => Err(Error::because(
                ErrorType::InternalError,
                "re-serialising body",
                e,
            )),
        };
    }
    Ok(Some(ctx.req.body.clone().unwrap_or_default()))
}

/// A buffer that refuses to grow past `max` (serialising stops there, nothing more is held).
struct Bounded {
    buf: Vec<u8>,
    max: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.max {
            return Err(std::io::ErrorKind::FileTooLarge.into());
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn answer_failure(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut GwCtx,
    e: &Error,
) -> Result<()> {
    let (status, code, message) = respond::upstream_failure(e, ctx.req.backend.as_deref());
    answer(gw, session, ctx, status, code, &message).await
}

async fn attempt(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut GwCtx,
    backend: &Backend,
    body: &Bytes,
    may_retry: bool,
    retry_5xx: bool,
) -> Attempt {
    let up = match exchange::exchange_header(gw, session, ctx, backend, body).await {
        Ok(up) => {
            ctx.req.reached_backend = true;
            ctx.req.answered_at = Some(ctx.req.started.elapsed());
            up
        }
        Err(a @ Attempt::Unanswered(_)) => {
            ctx.req.reached_backend = true;
            return a;
        }
        Err(a) => return a,
    };
    // A failing (5xx) or busy (429) backend: another may answer, and nothing was sent yet.
    // The upstream connection is dropped, not pooled: its body was not read.
    if let Some(s) = up.resp_header().map(|h| h.status) {
        // An error the backend held the request for may come after it generated (see
        // `RequestCtx::late_error`): it may have run it, whatever comes next.
        let late = ctx.req.late_error(s.as_u16());
        if late {
            ctx.may_have_run = true;
        }
        if ctx.keepalive_sent && !s.is_success() {
            // The client has its 200 already: the backend's error goes into the stream. It
            // answered at once, with an error: it generated nothing (an earlier one may have).
            ctx.req.reached_backend = ctx.may_have_run;
            return Attempt::Fail(Error::explain(
                ErrorType::HTTPStatus(s.as_u16()),
                format!("backend answered {s}"),
            ));
        }
        // A second server error for the same request is passed on: the request is likely
        // what fails, and a third backend would only be given it to fail too.
        if may_retry
            && !ctx.keepalive_sent
            && ((s.is_server_error() && retry_5xx) || s == StatusCode::TOO_MANY_REQUESTS)
        {
            if late {
                // Left after it may have generated: counted like a backend given up on at its
                // first-byte deadline (its time), and charged its reservation whatever the
                // next one answers (a request that fails after generating, as llama.cpp's
                // tool calls do, would otherwise get one generation free per retry).
                ctx.req.abandoned += 1;
                ctx.req.late_errors += 1;
                ctx.req.abandoned_secs += ctx.req.held().unwrap_or_default().as_secs_f64();
            }
            // It answered at once, with an error: it generated nothing (an earlier one, or
            // this one after holding it, may have).
            ctx.req.reached_backend = ctx.may_have_run;
            return Attempt::Retry {
                err: Error::explain(
                    ErrorType::HTTPStatus(s.as_u16()),
                    format!("backend answered {s}"),
                ),
                answered: Some(s.as_u16()),
                reached: true,
            };
        }
    }
    stream::relay(gw, session, ctx, backend, up).await
}
