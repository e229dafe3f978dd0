//! Forwarding every request to a backend, with our own retry loop.
//!
//! Pingora's connector pools upstream connections; we write the request (header + held
//! body, with framing and headers the gateway chose), stream the response to the client
//! chunk by chunk as it arrives, and feed each chunk to the usage parser. Before any byte
//! reached the client, a request that provably did not reach the backend (connect failure,
//! failed write) or that the backend answered with 5xx/429 moves on to another backend (up to
//! `routing.retries`), replaying the same body; a timeout or a dropped connection after the
//! request was written is answered, never sent again; once a byte was sent, nothing is retried.

use bytes::Bytes;
use gateway_filter::http::{header, Method, StatusCode};
use gateway_filter::{echo, Decision, Rejection, WireFormat};
use pingora_core::protocols::http::v1::client::HttpSession;
use pingora_core::Result;
use pingora_error::{Error, ErrorType};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use super::headers::{add_upstream_headers, copy_request_headers, copy_response_headers};
use super::{respond, Gateway, GwCtx};
use crate::model_list;
use crate::router::{Backend, Pick};
use crate::usage::{Framing, UsageEventStripper, UsageParser};

/// How an attempt on one backend ended.
enum Attempt {
    /// The client got its full response.
    Done,
    /// Nothing was sent to the client and the backend failed (`health`: counts against it):
    /// try another.
    Retry { err: Box<Error>, health: bool },
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

/// Output tokens a request may still produce, for the usage-based strategy.
fn reserved_tokens(ctx: &GwCtx) -> u64 {
    ctx.req.max_tokens.unwrap_or(1024)
}

pub async fn forward(gw: &Gateway, session: &mut Session, ctx: &mut GwCtx) -> Result<()> {
    ctx.strip_usage_event = crate::usage::request_stream_usage(&mut ctx.req);
    let body = held_body(ctx)?;
    let pool = gw.router.pool().clone();
    let retries = gw.settings.routing.retries as usize;
    let mut last_err: Option<Box<Error>> = None;
    let mut queued_until = None;
    loop {
        let idx = match gw.router.pick(&ctx.req, &ctx.tried) {
            Pick::Backend(i) => i,
            Pick::Full => {
                // Every backend that could serve it is at max_in_flight: wait for a slot.
                let deadline = *queued_until.get_or_insert_with(|| {
                    tokio::time::Instant::now() + gw.settings.routing.queue_timeout
                });
                let slot = (tokio::time::Instant::now() < deadline)
                    .then(|| gw.queue_slot())
                    .flatten();
                let Some(_slot) = slot else {
                    return answer(
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
                pool.wait_freed(wake, || {
                    matches!(gw.router.pick(&ctx.req, &ctx.tried), Pick::Full)
                })
                .await;
                continue;
            }
            Pick::UnknownModel => {
                let model = ctx.req.model.clone().unwrap_or_default();
                return answer(
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
                    Some(e) => answer_failure(session, ctx, &e).await,
                    None if pool.is_empty() => {
                        answer(
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
            let key = state.key("slots", &pool.get(idx).name);
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
        if !ctx.tried.is_empty() {
            ctx.req.retries += 1;
        }
        ctx.tried.push(idx);
        let backend = pool.get(idx);
        ctx.req.backend = Some(backend.name.clone());
        // What the last attempt did decides what the request costs (see the budget filter).
        ctx.req.reached_backend = false;
        ctx.begin_attempt();
        ctx.lease = Some(lease);
        let may_retry =
            ctx.tried.len() <= retries && gw.router.has_alternative(&ctx.req, &ctx.tried);
        match attempt(gw, session, ctx, backend, &body, may_retry).await {
            Attempt::Done => {
                let status = ctx.req.status;
                if status < 500 {
                    pool.mark_ok(idx);
                } else {
                    pool.mark_failed(idx);
                }
                pool.record(idx, ctx.req.usage.map_or(0, |u| u.total()), ctx.req.ttfb);
                return Ok(());
            }
            Attempt::Retry { err, health } => {
                log::warn!(
                    "request {}: backend {} failed before answering: {err}",
                    ctx.req.request_id,
                    backend.name
                );
                if health {
                    pool.mark_failed(idx);
                }
                gw.count_retry(idx);
                ctx.lease = None;
                if !may_retry || ctx.keepalive_sent {
                    return answer_failure(session, ctx, &err).await;
                }
                last_err = Some(err);
            }
            Attempt::Fail(e) => return answer_failure(session, ctx, &e).await,
            Attempt::Unanswered(e) => {
                log::warn!(
                    "request {}: backend {} did not answer: {e}",
                    ctx.req.request_id,
                    backend.name
                );
                pool.mark_failed(idx);
                return answer_failure(session, ctx, &e).await;
            }
            Attempt::Abort(e) => {
                // A client leaving is not the backend's fault; a backend breaking its stream is.
                if e.esource() == &pingora_error::ErrorSource::Upstream {
                    pool.mark_failed(idx);
                }
                return Err(e);
            }
        }
    }
}

async fn answer(
    session: &mut Session,
    ctx: &mut GwCtx,
    status: StatusCode,
    code: &'static str,
    message: &str,
) -> Result<()> {
    ctx.req.decision = Decision::Failed { code };
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
            .await?;
        return session.write_response_body(None, true).await;
    }
    respond::rejection(session, &mut ctx.req, &rejection).await
}

fn held_body(ctx: &GwCtx) -> Result<Bytes> {
    if ctx.req.body_rewritten {
        let json = ctx.req.json.as_ref().ok_or_else(|| {
            Error::explain(ErrorType::InternalError, "rewritten body without JSON")
        })?;
        let v = serde_json::to_vec(json)
            .map_err(|e| Error::because(ErrorType::InternalError, "re-serialising body", e))?;
        return Ok(Bytes::from(v));
    }
    Ok(ctx.req.body.clone().unwrap_or_default())
}

async fn answer_failure(session: &mut Session, ctx: &mut GwCtx, e: &Error) -> Result<()> {
    let (status, code, message) = respond::upstream_failure(e, ctx.req.backend.as_deref());
    answer(session, ctx, status, code, &message).await
}

fn upstream_request(ctx: &GwCtx, backend: &Backend, body_len: usize) -> Result<Box<RequestHeader>> {
    let req = &ctx.req;
    let path = req.target();
    let h = RequestHeader::build_no_case(
        req.method.clone(),
        path.as_bytes(),
        Some(req.headers.len() + 4),
    )?;
    // Straight into the header map (see `copy_request_headers`).
    let mut parts = http::request::Parts::from(h);
    copy_request_headers(&req.headers, &mut parts.headers);
    let mut h = RequestHeader::from(parts);
    add_upstream_headers(&mut h, &backend.authority, &req.request_id)?;
    if ctx.trace.is_set() {
        // This span is the backend's parent (the client's own goes no further). A trace the
        // gateway started carries no `tracestate` of another's (W3C: discard it).
        h.insert_header("traceparent", ctx.trace.header())?;
        if ctx.trace.parent == 0 {
            h.remove_header("tracestate");
        }
    }
    if body_len > 0 || !(req.method == Method::GET || req.method == Method::HEAD) {
        h.insert_header(header::CONTENT_LENGTH, body_len)?;
    }
    Ok(Box::new(h))
}

/// Sends the request and reads the response header. A request is sent again (on a fresh
/// connection, or to another backend) only when it provably did not reach the backend: the
/// connection failed, or writing it failed. Once the request was written, the backend may
/// be generating: a timeout or a dropped connection is answered, not retried, so no prompt
/// is run twice.
async fn exchange_header(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut GwCtx,
    backend: &Backend,
    body: &Bytes,
) -> Result<HttpSession, Attempt> {
    for _ in 0..2 {
        let (up, reused) = match gw.connector.get_http_session(&backend.peer).await {
            Ok(s) => s,
            Err(e) => {
                return Err(Attempt::Retry {
                    err: e,
                    health: true,
                })
            }
        };
        let mut up = super::upstream_stream::gathering(up, &backend.peer);
        let limits = &gw.settings.limits;
        up.read_timeout = Some(limits.read_timeout);
        up.write_timeout = Some(limits.send_timeout);
        let req = upstream_request(ctx, backend, body.len()).map_err(Attempt::Fail)?;
        if let Err(e) = super::upstream_stream::send_gathered(&mut up, req, body).await {
            if reused && !is_timeout(&e) {
                // A pooled connection the server had closed while idle: once more on a
                // fresh one.
                continue;
            }
            return Err(Attempt::Retry {
                err: e,
                health: true,
            });
        }
        // The backend has the whole request now: whatever happens next, it may have run it.
        let answered = match wait_for_header(gw, session, ctx, backend, &mut up).await {
            Waited::Header(answered) => answered,
            Waited::FirstByteTimeout(deadline) => {
                // It held the request: if no other backend answers, it may have run it.
                ctx.req.reached_backend = true;
                // The operator's choice: a backend sitting on a request this long is given
                // up, and another tries (nothing but keep-alives reached the client).
                gw.metrics
                    .first_byte_timeouts
                    .with_label_values(&[&backend.name])
                    .inc();
                return Err(Attempt::Retry {
                    err: Error::explain(
                        ErrorType::Custom(respond::FIRST_BYTE_TIMEOUT),
                        format!("no response byte within {deadline:?}"),
                    ),
                    health: true,
                });
            }
            Waited::ClientGone(e) => return Err(Attempt::Abort(e)),
        };
        return match answered {
            Ok(()) => Ok(up),
            // The backend has the request and did not answer: it counts against its health,
            // and the client gets the error.
            Err(e) => Err(Attempt::Unanswered(e)),
        };
    }
    Err(Attempt::Retry {
        err: Error::explain(
            ErrorType::ConnectionClosed,
            "pooled connections kept closing",
        ),
        health: true,
    })
}

/// How waiting for the backend's response header ended.
enum Waited {
    Header(Result<()>),
    FirstByteTimeout(std::time::Duration),
    /// Writing a keep-alive to the client failed.
    ClientGone(Box<Error>),
}

/// Waits for the response header, within the first-byte deadline if there is one. For an
/// OpenAI stream with `routing.sse_keepalive`, the client meanwhile gets a 200 with the
/// stream's headers and an SSE comment every interval, so proxies in front do not cut an idle
/// stream during a cold load; from the first of them on, nothing can be retried.
async fn wait_for_header(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut GwCtx,
    backend: &Backend,
    up: &mut HttpSession,
) -> Waited {
    let deadline = first_byte_deadline(gw, ctx, backend);
    let keepalive = gw
        .settings
        .routing
        .sse_keepalive
        .filter(|_| ctx.req.stream && ctx.req.route.wire_format() == WireFormat::OpenAi);
    let read = read_header(up);
    tokio::pin!(read);
    let expired = async {
        match deadline {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    let mut ticks =
        keepalive.map(|every| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
    loop {
        tokio::select! {
            answered = &mut read => return Waited::Header(answered),
            _ = &mut expired => return Waited::FirstByteTimeout(deadline.unwrap_or_default()),
            _ = async {
                match ticks.as_mut() {
                    Some(t) => { t.tick().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {
                if let Err(e) = keep_alive(session, ctx).await {
                    return Waited::ClientGone(e);
                }
            }
        }
    }
}

/// One SSE keep-alive comment; the stream's headers first, the first time.
async fn keep_alive(session: &mut Session, ctx: &mut GwCtx) -> Result<()> {
    if !ctx.keepalive_sent {
        let mut h = ResponseHeader::build_no_case(
            StatusCode::OK,
            Some(4 + ctx.req.response_headers.len()),
        )?;
        h.insert_header(header::CONTENT_TYPE, "text/event-stream")?;
        h.insert_header(header::CACHE_CONTROL, "no-cache")?;
        h.insert_header("x-request-id", ctx.req.request_id.as_str())?;
        for (k, v) in &ctx.req.response_headers {
            h.append_header(k.clone(), v.clone())?;
        }
        super::drain::close_if_draining(session);
        session
            .write_response_header(Box::new(h), false)
            .await
            .map_err(|e| e.into_down())?;
        ctx.keepalive_sent = true;
        ctx.req.status = 200;
        ctx.req.ttfb = Some(ctx.req.started.elapsed());
    }
    ctx.req.bytes_out += KEEPALIVE.len() as u64;
    session
        .write_response_body(Some(Bytes::from_static(KEEPALIVE)), false)
        .await
        .map_err(|e| e.into_down())
}

/// An SSE comment: clients ignore it, proxies see bytes.
const KEEPALIVE: &[u8] = b": keep-alive\n\n";

/// How long the backend may take to send its first byte (`routing.first_byte_timeout`, or
/// the backend's own), or `None` when there is no such deadline. A model the backend has not
/// loaded (per its `/api/ps`) gets `routing.cold_start_timeout` instead, when that is longer.
fn first_byte_deadline(
    gw: &Gateway,
    ctx: &GwCtx,
    backend: &Backend,
) -> Option<std::time::Duration> {
    // A whole (non-streamed) answer starts only when the generation ends: its first byte
    // says nothing about a stuck backend, and `limits.read_timeout` bounds it.
    if !ctx.req.stream {
        return None;
    }
    let routing = &gw.settings.routing;
    let deadline = backend.first_byte_timeout.or(routing.first_byte_timeout)?;
    let cold = ctx
        .req
        .model
        .as_deref()
        .is_some_and(|m| backend.is_cold(&crate::router::canonical_model(m)));
    Some(if cold {
        deadline.max(routing.cold_start_timeout)
    } else {
        deadline
    })
}

/// Reads the response header, skipping informational (1xx) ones.
async fn read_header(up: &mut HttpSession) -> Result<()> {
    loop {
        up.read_response().await?;
        if !up
            .resp_header()
            .is_some_and(|h| h.status.is_informational())
        {
            return Ok(());
        }
    }
}

fn is_timeout(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
    )
}

async fn attempt(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut GwCtx,
    backend: &Backend,
    body: &Bytes,
    may_retry: bool,
) -> Attempt {
    let mut up = match exchange_header(gw, session, ctx, backend, body).await {
        Ok(up) => {
            ctx.req.reached_backend = true;
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
        if ctx.keepalive_sent && !s.is_success() {
            // The client has its 200 already: the backend's error goes into the stream.
            return Attempt::Fail(Error::explain(
                ErrorType::HTTPStatus(s.as_u16()),
                format!("backend answered {s}"),
            ));
        }
        if may_retry
            && !ctx.keepalive_sent
            && (s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS)
        {
            return Attempt::Retry {
                err: Error::explain(
                    ErrorType::HTTPStatus(s.as_u16()),
                    format!("backend answered {s}"),
                ),
                health: s.is_server_error(),
            };
        }
    }
    let Some(upstream_header) = up.resp_header() else {
        return Attempt::Fail(Error::explain(
            ErrorType::InvalidHTTPHeader,
            "no response header",
        ));
    };
    let framing = Framing::from_content_type(
        upstream_header
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.as_bytes()),
    );
    let status = upstream_header.status;
    // Without Pingora's case-preserving name map: see `copy_response_headers`.
    let resp = match ResponseHeader::build_no_case(
        status,
        Some(upstream_header.headers.len() + 1 + ctx.req.response_headers.len()),
    ) {
        Ok(r) => r,
        Err(e) => return Attempt::Fail(e),
    };
    let mut parts = http::response::Parts::from(resp);
    copy_response_headers(upstream_header, &mut parts.headers);
    for (k, v) in &ctx.req.response_headers {
        parts.headers.append(k.clone(), v.clone());
    }
    let mut resp = ResponseHeader::from(parts);
    let built = resp
        .insert_header("x-request-id", ctx.req.request_id.as_str())
        .map(|_| ());
    if let Err(e) = built {
        return Attempt::Fail(e);
    }
    ctx.req.status = status.as_u16();
    if let (Some(gate), true) = (ctx.req.model_gate.clone(), status.is_success()) {
        return filtered_list(gw, session, ctx, backend, up, resp, gate.as_ref()).await;
    }
    let strip = ctx.strip_usage_event && framing == Framing::Sse;
    if strip {
        // Bytes are taken out of the body: its length is no longer the backend's.
        resp.remove_header(&header::CONTENT_LENGTH);
    }
    let end_now = up.is_body_done();
    if ctx.keepalive_sent {
        // The stream's headers went out with the first keep-alive: its events follow them.
        if end_now {
            if let Err(e) = session.write_response_body(None, true).await {
                return Attempt::Abort(e.into_down());
            }
        }
    } else {
        super::drain::close_if_draining(session);
        if let Err(e) = session.write_response_header(Box::new(resp), end_now).await {
            return Attempt::Abort(e.into_down());
        }
        ctx.req.ttfb = Some(ctx.req.started.elapsed());
    }
    if end_now {
        gw.connector
            .release_http_session(up, &backend.peer, backend.peer.options.idle_timeout)
            .await;
        return Attempt::Done;
    }

    let mut parser = UsageParser::new(framing);
    let mut stripper = strip.then(UsageEventStripper::default);
    loop {
        let chunk = match up.read_body_ref().await {
            Ok(Some(chunk)) => {
                parser.feed(chunk);
                match stripper.as_mut() {
                    Some(s) => Bytes::from(s.filter(chunk)),
                    None => Bytes::copy_from_slice(chunk),
                }
            }
            Ok(None) => break,
            Err(e) => {
                // The backend broke mid-response: the client must see a truncated stream,
                // never a clean end, so the connection is aborted rather than finished.
                ctx.req.decision = Decision::Failed {
                    code: "backend_broke_stream",
                };
                settle_usage(&mut parser, &mut ctx.req);
                return Attempt::Abort(e.into_up());
            }
        };
        ctx.req.bytes_out += chunk.len() as u64;
        if let Err(e) = session.write_response_body(Some(chunk), false).await {
            ctx.req.decision = Decision::Failed {
                code: "client_disconnected",
            };
            settle_usage(&mut parser, &mut ctx.req);
            return Attempt::Abort(e.into_down());
        }
    }
    settle_usage(&mut parser, &mut ctx.req);
    if let Some(rest) = stripper
        .as_mut()
        .map(|s| s.finish())
        .filter(|r| !r.is_empty())
    {
        ctx.req.bytes_out += rest.len() as u64;
        if let Err(e) = session
            .write_response_body(Some(Bytes::from(rest)), false)
            .await
        {
            return Attempt::Abort(e.into_down());
        }
    }
    if let Err(e) = session.write_response_body(None, true).await {
        return Attempt::Abort(e.into_down());
    }
    gw.connector
        .release_http_session(up, &backend.peer, backend.peer.options.idle_timeout)
        .await;
    Attempt::Done
}

/// The usage of an exchange as it ended, however it ended: what the backend reported, or
/// what the gateway counted passing, with the prompt estimated from the held body (four
/// characters a token). Budget, tokens per minute and audit all see this one figure.
fn settle_usage(parser: &mut UsageParser, req: &mut gateway_filter::RequestCtx) {
    req.usage = parser.finish().map(|mut u| {
        if u.counted {
            u.prompt_tokens = req.json.as_ref().map_or(0, |b| {
                (gateway_filter::prompt::prompt_chars(b) as u64).div_ceil(4)
            });
        }
        u
    });
    req.finish_reasons = parser.finish_reasons();
}

/// Largest model list the gateway will read to filter it.
const MAX_MODEL_LIST: usize = 8 << 20;

/// Reads a whole model list, keeps only the models the caller may use, and answers with it.
async fn filtered_list(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut GwCtx,
    backend: &Backend,
    mut up: HttpSession,
    mut resp: ResponseHeader,
    gate: &dyn gateway_filter::ModelGate,
) -> Attempt {
    let mut body = Vec::new();
    loop {
        match up.read_body_ref().await {
            Ok(Some(chunk)) if body.len() + chunk.len() <= MAX_MODEL_LIST => {
                body.extend_from_slice(chunk)
            }
            Ok(Some(_)) => {
                return Attempt::Fail(Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "model list too large",
                ))
            }
            Ok(None) => break,
            Err(e) => return Attempt::Fail(e),
        }
    }
    gw.connector
        .release_http_session(up, &backend.peer, backend.peer.options.idle_timeout)
        .await;
    let Some(filtered) = model_list::filter(ctx.req.route, &body, gate) else {
        return Attempt::Fail(Error::explain(
            ErrorType::InvalidHTTPHeader,
            "unreadable model list",
        ));
    };
    resp.remove_header(&header::TRANSFER_ENCODING);
    if let Err(e) = resp.insert_header(header::CONTENT_LENGTH, filtered.len()) {
        return Attempt::Fail(e);
    }
    ctx.req.bytes_out = filtered.len() as u64;
    super::drain::close_if_draining(session);
    if let Err(e) = session.write_response_header(Box::new(resp), false).await {
        return Attempt::Abort(e.into_down());
    }
    ctx.req.ttfb = Some(ctx.req.started.elapsed());
    match session
        .write_response_body(Some(Bytes::from(filtered)), true)
        .await
    {
        Ok(()) => Attempt::Done,
        Err(e) => Attempt::Abort(e.into_down()),
    }
}
