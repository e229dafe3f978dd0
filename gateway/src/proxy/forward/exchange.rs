//! One exchange with a backend up to its response header: the request the gateway builds (its
//! own framing and headers), sent with the held body in one write, then the wait for the
//! answer's header within the first-byte deadline, with SSE keep-alives to the client meanwhile.

use std::os::fd::RawFd;

use bytes::Bytes;
use gateway_filter::http::{header, Method, StatusCode};
use gateway_filter::WireFormat;
use pingora_core::protocols::http::v1::client::HttpSession;
use pingora_core::Result;
use pingora_error::{Error, ErrorType};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use super::super::client_stream::ClientStream;
use super::super::headers::{add_upstream_headers, copy_request_headers};
use super::super::{respond, Gateway, GwCtx};
use super::Attempt;
use crate::router::Backend;

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
pub(super) async fn exchange_header(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut GwCtx,
    backend: &Backend,
    body: &Bytes,
) -> Result<HttpSession, Attempt> {
    // Failed writes on pooled connections.
    let mut rewrites = 0;
    loop {
        let (up, reused) = match gw.upstreams.connect(backend.index, &backend.peer).await {
            Ok(s) => s,
            Err(e) => {
                return Err(Attempt::Retry {
                    err: e,
                    answered: None,
                    reached: false,
                })
            }
        };
        let mut up = super::super::upstream_stream::gathering(up, &backend.peer);
        let limits = &gw.settings.limits;
        up.read_timeout = Some(limits.read_timeout);
        up.write_timeout = Some(limits.send_timeout);
        let req = upstream_request(ctx, backend, body.len()).map_err(Attempt::Fail)?;
        if let Err(e) = super::super::upstream_stream::send_gathered(&mut up, req, body).await {
            if reused && !is_timeout(&e) && rewrites == 0 {
                // A pooled connection the server had closed while idle: once more on
                // another.
                rewrites += 1;
                continue;
            }
            // It had the head, or a part of the request: a backend that will not take a
            // request (too many headers, a body it stops reading) breaks off the write.
            return Err(Attempt::Retry {
                err: e,
                answered: None,
                reached: true,
            });
        }
        // The backend has the whole request now: whatever happens next, it may have run it.
        ctx.req.sent = Some(ctx.req.started.elapsed());
        let answered = match wait_for_header(gw, session, ctx, backend, &mut up).await {
            Waited::Header(answered) => answered,
            Waited::FirstByteTimeout(deadline) => {
                // It held the request: it may have run it, whatever the next backend does.
                ctx.req.reached_backend = true;
                ctx.req.abandoned += 1;
                ctx.req.abandoned_secs += deadline.as_secs_f64();
                ctx.may_have_run = true;
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
                    answered: None,
                    reached: true,
                });
            }
            Waited::ClientGone(e) => {
                // The client left while the backend worked; the backend has the request all
                // the same.
                ctx.req.reached_backend = true;
                return Err(Attempt::Abort(e));
            }
        };
        return match answered {
            Ok(()) => Ok(up),
            // The backend has the request and did not answer: it counts against its health,
            // and the client gets the error.
            Err(e) => Err(Attempt::Unanswered(e)),
        };
    }
}

/// How waiting for the backend's response header ended.
enum Waited {
    Header(Result<()>),
    FirstByteTimeout(std::time::Duration),
    /// The client left: writing a keep-alive failed, or [`client_left`] saw it go.
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
    let Some(every) = keepalive else {
        // A client that left is watched while the backend works: otherwise the request's task
        // goes on waiting for a generation nobody reads, holding its backend slot (and an
        // HTTP/2 stream's task outlives its connection's caps). Dropping the backend's
        // connection stops it (Ollama and vLLM cancel a generation whose client left).
        let gone = client_left(session, ctx.client_socket, tokio::time::Instant::now());
        tokio::pin!(gone);
        return tokio::select! {
            answered = &mut read => Waited::Header(answered),
            _ = &mut expired => Waited::FirstByteTimeout(deadline.unwrap_or_default()),
            e = &mut gone => Waited::ClientGone(e),
        };
    };
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    // The keep-alives borrow the session, so the client is watched through the socket's TCP
    // state alone (no peek): a close or half-close shows before a keep-alive write fails.
    let fd = ctx.client_socket;
    let mut watch = tokio::time::interval_at(
        tokio::time::Instant::now() + WATCH_AFTER,
        WATCH_BEHIND_BYTES,
    );
    loop {
        tokio::select! {
            answered = &mut read => return Waited::Header(answered),
            _ = &mut expired => return Waited::FirstByteTimeout(deadline.unwrap_or_default()),
            _ = ticks.tick() => {
                if let Err(e) = keep_alive(session, ctx).await {
                    return Waited::ClientGone(e);
                }
            }
            _ = watch.tick(), if fd.is_some() => {
                if fd.is_some_and(peer_closed) {
                    return Waited::ClientGone(closed());
                }
            }
        }
    }
}

/// The client closed its connection (or its sending side).
fn closed() -> Box<Error> {
    Error::explain(
        ErrorType::ConnectionClosed,
        "the client closed its connection",
    )
    .into_down()
}

/// How long a plain HTTP/1 request waits (from `since`: its queueing, or its sending to the
/// backend) before its client's socket is watched.
const WATCH_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// How often a client whose socket holds unread bytes (or is TLS) is asked whether it closed.
const WATCH_BEHIND_BYTES: std::time::Duration = std::time::Duration::from_millis(250);

/// Whether the client has closed the connection (its end of the stream received, or a
/// reset), whatever unread bytes come before that: the socket's TCP state (`TCP_INFO`). Only
/// the state, its first byte, is read: kernels before 6.2 answer with a shorter `tcp_info`
/// than the libc crate's (Pingora's own reader refuses any size but its own, and would never
/// see a close there).
fn peer_closed(socket: RawFd) -> bool {
    // SAFETY: `tcp_info` is plain old data (all-zero is valid); getsockopt writes at most
    // `len` bytes into it and says how many, on a socket the session keeps open for the call.
    let (rc, len, state) = unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            socket,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        );
        (rc, len, info.tcpi_state)
    };
    // linux/tcp_states.h: TCP_CLOSE_WAIT = 8 (the client's FIN came), TCP_CLOSE = 7 (reset).
    rc == 0 && len >= 1 && matches!(state, 7 | 8)
}

/// Resolves when the client is known to have left while its request waits for the backend:
/// an HTTP/2 stream reset or its connection closed, at once. Over HTTP/1, from
/// [`WATCH_AFTER`] after `since`: on a plain connection the socket is peeked at, so that no
/// byte of a next request is taken, and its end or an error is the client leaving; over TLS
/// (the socket's bytes are the TLS layer's), or with bytes in front of the end, the socket's
/// TCP state is asked every [`WATCH_BEHIND_BYTES`]. A half-closed connection counts as gone,
/// as in nginx (`proxy_ignore_client_abort off`) and Go's servers (Ollama).
pub(super) async fn client_left(
    session: &mut Session,
    fd: Option<RawFd>,
    since: tokio::time::Instant,
) -> Box<Error> {
    if session.is_http2() {
        // A reset or close is the client leaving, like a closed HTTP/1 connection: recorded as
        // `client_disconnected`, with no answer attempted and no error logged.
        return match session.downstream_session.read_body_or_idle(true).await {
            Err(e) => Error::because(
                ErrorType::ConnectionClosed,
                "the client reset its stream",
                e,
            ),
            Ok(_) => Error::explain(ErrorType::ConnectionClosed, "the client's stream ended"),
        }
        .into_down();
    }
    let socket = session
        .downstream_session
        .stream()
        .and_then(|s| s.as_any().downcast_ref::<ClientStream>())
        .map(ClientStream::socket);
    if socket.is_none() && fd.is_none() {
        return std::future::pending().await;
    }
    // The peek is a system call (tokio still holds the socket as readable from the request's
    // read): a request answered within this wait never makes it; a generation hardly notices.
    tokio::time::sleep_until(since + WATCH_AFTER).await;
    if let Some(socket) = socket {
        let mut byte = [0u8; 1];
        match socket.peek(&mut byte).await {
            Ok(0) => return closed(),
            Err(e) => {
                return Error::because(ErrorType::ReadError, "the client's connection failed", e)
                    .into_down()
            }
            // Bytes after the request (a pipelined next one, or a byte sent to keep the watch
            // off): the end of the stream is behind them, where a peek cannot see it.
            Ok(_) => {}
        }
    }
    let Some(fd) = fd else {
        return std::future::pending().await;
    };
    loop {
        if peer_closed(fd) {
            return closed();
        }
        tokio::time::sleep(WATCH_BEHIND_BYTES).await;
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
        super::super::drain::close_if_draining(session);
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

/// Informational answers (`100 Continue`, `103 Early Hints`) taken before the real one: a
/// backend sending them without end would otherwise hold the request past every deadline
/// but the first byte's.
const MAX_INFORMATIONAL: usize = 8;

/// Reads the response header, skipping informational (1xx) ones; a `101` (a protocol switch
/// nobody asked for) is an error, as is an informational answer past the eighth.
async fn read_header(up: &mut HttpSession) -> Result<()> {
    for _ in 0..=MAX_INFORMATIONAL {
        up.read_response().await?;
        match up.resp_header().map(|h| h.status.as_u16()) {
            Some(101) => {
                return Err(Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "the backend switched protocols, which the request did not ask for",
                ))
            }
            Some(100..=199) => continue,
            _ => return Ok(()),
        }
    }
    Err(Error::explain(
        ErrorType::InvalidHTTPHeader,
        "the backend sent informational answers without end",
    ))
}

fn is_timeout(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
    )
}
