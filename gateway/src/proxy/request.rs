//! `early_request_filter` and `request_filter`.
//!
//! Cheap before expensive: the listener's address rules, the canonical path and every filter
//! that does not need the body (address limits, authentication) run first; the body is read
//! only when the first filter that needs it is reached, so a stranger costs no body. On
//! shared state, the address limit's answer travels while the body of a request whose key
//! was already found is read (one round trip per request), and stops the read if it refuses.

use gateway_filter::defer::Travelling;
use gateway_filter::http::StatusCode;
use gateway_filter::path::canonicalize;
use gateway_filter::{Decision, Rejection, RequestCtx, Route};
use pingora_core::Result;
use pingora_proxy::Session;

use futures_util::future::Either;

use super::body::{self, BodyError};
use super::{forward, logging, respond, Gateway, GwCtx};
use crate::config::{by_local_addr, ListenerSpec};
use crate::tls::CertSubjects;

/// Request id, client address, start time; nothing here can fail. `last`: the connection's
/// last request (its answer says `Connection: close`).
pub fn early(gw: &Gateway, session: &mut Session, ctx: &mut GwCtx, last: bool) {
    let limits = &gw.settings.limits;
    // A client that stops reading frees its backend slot when this fires.
    session.set_write_timeout(Some(limits.client_send_timeout));
    // A body left unread that Pingora drains before reusing the connection: within the
    // body's own deadline, not as long as a client keeps trickling it.
    session
        .downstream_session
        .set_total_drain_timeout(Some(limits.client_body_timeout));
    // Pingora makes a kept-alive connection wait for its next request without a limit
    // (unless the client said `close`): bound the idle time.
    if last {
        session.set_keepalive(None);
    } else if session.get_keepalive().is_some() {
        session.set_keepalive(Some(limits.keepalive_timeout.as_secs().max(1)));
    }
    // An HTTP/1 request is counted by the connection loop from its first byte; HTTP/2 ones
    // (through Pingora's `HttpProxy`) here.
    if session.is_http2() {
        ctx.in_flight = Some(gw.in_flight.enter());
    }
    let req = &mut ctx.req;
    req.started = std::time::Instant::now();
    req.request_id = new_request_id();
    if let Some(a) = session.client_addr().and_then(|a| a.as_inet()) {
        req.set_client(a.ip(), gw.settings.limits.ipv6_prefix);
    }
    let header = session.req_header();
    if let Some(t) = &gw.telemetry {
        ctx.trace = t.begin(&header.headers);
    }
    let req = &mut ctx.req;
    req.method = header.method.clone();
    req.path = header.uri.path().to_string();
    req.query = header.uri.query().map(str::to_string);
    req.route = Route::classify(&req.method, &req.path);
    if let Some(cert) = session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .and_then(|t| t.extension.get::<CertSubjects>())
    {
        // An expired certificate names nobody, on a connection that outlived it or a
        // session resumed after it (attacker review: resumption kept one working for good).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if let Some(subjects) = cert.valid_at(now) {
            req.client_cert_subjects = subjects.to_vec();
        }
    }
}

/// A fresh request id: 128 random bits in 32 hex digits (written out directly: `format!`'s
/// machinery cost more than the rest of this phase).
pub fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = fastrand::u128(..);
    let mut out = [0u8; 32];
    for (i, digit) in out.iter_mut().enumerate() {
        *digit = HEX[((bits >> ((31 - i) * 4)) & 0xf) as usize];
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A request the gateway answers with an error before any backend sees it.
struct Refusal {
    rejection: Rejection,
    /// `None` when the chain already recorded its decision.
    decision: Option<Decision>,
}

impl Refusal {
    fn failed(rejection: Rejection) -> Self {
        let code = rejection.code;
        Refusal {
            rejection,
            decision: Some(Decision::Failed { code }),
        }
    }

    /// A filter's refusal: the chain recorded it.
    fn by_chain(rejection: Rejection) -> Self {
        Refusal {
            rejection,
            decision: None,
        }
    }
}

/// What the gateway does with a request that passed every check.
enum Next {
    /// The gateway answers 200 with this JSON itself (health, the merged model list).
    Answer(String),
    /// forward/ sends it, with its held body, to a backend.
    Forward,
}

/// The values of every `model` parameter of a query (its name compared without case, both
/// percent-decoded, `+` a space, as form decoding reads them); `None` when one does not
/// decode, or a `%` is not followed by two hex digits (older decoders read `%u006d` as `m`).
fn query_models(query: Option<&str>) -> Option<Vec<String>> {
    let Some(query) = query else {
        return Some(Vec::new());
    };
    let b = query.as_bytes();
    let hex = |i: usize| b.get(i).is_some_and(u8::is_ascii_hexdigit);
    if (0..b.len()).any(|i| b[i] == b'%' && !(hex(i + 1) && hex(i + 2))) {
        return None;
    }
    let mut out = Vec::new();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| match s.contains('+') {
            true => gateway_filter::path::percent_decode(&s.replace('+', " ")),
            false => gateway_filter::path::percent_decode(s),
        };
        if decode(k)?.eq_ignore_ascii_case("model") {
            out.push(decode(v)?);
        }
    }
    Some(out)
}

/// Puts the canonical path (see `gateway_filter::path`) into the context and classifies the
/// route on it: everything after this, filters and the upstream request, sees only that form.
fn canonical_target(session: &Session, req: &mut RequestCtx) -> std::result::Result<(), Rejection> {
    let header = session.req_header();
    if !session.is_http2() && (header.uri.scheme().is_some() || header.uri.authority().is_some()) {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "invalid_path",
            "absolute-form request targets are not accepted",
        ));
    }
    let target = canonicalize(header.raw_path())
        .map_err(|e| Rejection::new(StatusCode::BAD_REQUEST, "invalid_path", e.to_string()))?;
    req.path = target.path;
    req.query = target.query;
    req.route = Route::classify(&req.method, &req.path);
    if req.route == Route::Other {
        req.query_models = query_models(req.query.as_deref()).ok_or_else(|| {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "the query string is not valid percent-encoded UTF-8",
            )
        })?;
    }
    if req.route == Route::OpenAiModel {
        // The model is named in the path; the allow-list and the router judge it like a body's.
        req.model = gateway_filter::path::percent_decode(&req.path["/v1/models/".len()..]);
        if req.model.is_none() {
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "invalid_model",
                "the model name in the path is not valid UTF-8",
            ));
        }
    }
    Ok(())
}

/// The listener a connection came in on, matched by local address.
fn listener<'a>(gw: &'a Gateway, session: &Session) -> Option<&'a ListenerSpec> {
    let local = session.server_addr()?.as_inet()?;
    by_local_addr(&gw.settings.listen, *local, |l| l.addr)
}

/// Whether the client may use the listener it came in on. Fails closed: a connection whose
/// listener or address cannot be told is refused.
fn admitted(listener: Option<&ListenerSpec>, session: &Session, ctx: &GwCtx) -> bool {
    let Some(l) = listener else {
        log::warn!(
            "request {}: no configured listener matches local address {:?}; refused",
            ctx.req.request_id,
            session.server_addr()
        );
        return false;
    };
    if l.allow.is_empty() && l.deny.is_empty() {
        return true;
    }
    match ctx.req.client_ip {
        Some(ip) if l.admits(&ip) => true,
        ip => {
            // Debug, not info: a denied network can send these without end (each is audited).
            log::debug!(
                "request {}: client {ip:?} is not allowed on listener {}",
                ctx.req.request_id,
                l.addr
            );
            false
        }
    }
}

/// Answers every request: health, refusals, model lists, and forwarded requests. Always
/// `Ok(true)`: Pingora's own proxy path is never used, so every request gets the same body
/// limits, timeouts, framing and header hygiene, and one retry policy.
pub async fn filter(gw: &Gateway, session: &mut Session, ctx: &mut GwCtx) -> Result<bool> {
    match admit(gw, session, ctx).await {
        Ok(Next::Answer(body)) => {
            ctx.answered = true;
            ctx.req.status = StatusCode::OK.as_u16();
            logging::end_response(gw, ctx);
            respond::json(session, &mut ctx.req, StatusCode::OK, body, &[]).await?;
            Ok(true)
        }
        Ok(Next::Forward) => {
            ctx.answered = true;
            forward::forward(gw, session, ctx).await?;
            Ok(true)
        }
        Err(refusal) => {
            if let Some(d) = refusal.decision {
                ctx.req.decision = d;
            }
            if !ctx.body_read {
                unread_body(session).await;
            } else if refused_after_body(ctx)
                && !session.is_http2()
                && super::framing::has_body(session)
            {
                // As a guessed key's refusal does (it leaves the body unread), so whether a
                // key is valid does not show to a refused address.
                session.set_keepalive(None);
            }
            ctx.req.status = refusal.rejection.status.as_u16();
            logging::end_response(gw, ctx);
            respond::rejection(session, &mut ctx.req, &refusal.rejection).await?;
            ctx.answered = true;
            Ok(true)
        }
    }
}

/// The checks made before the body refused the request after its body was read while their
/// answers travelled.
fn refused_after_body(ctx: &GwCtx) -> bool {
    ctx.req
        .extensions
        .get::<gateway_filter::defer::RefusedAfterBody>()
        .is_some()
}

/// Most of an unread body read (and dropped) before a refusal is answered: an HTTP/2 stream's
/// flow-control window; on HTTP/1, what a small request has usually sent already.
const DRAIN: usize = 64 << 10;

/// A refusal is answered without reading the body a stranger announced. What the client has
/// already sent is read and dropped, briefly and bounded (see `body::discard`), so the answer
/// is not lost to a reset. On HTTP/1 the connection is then closed (the rest of the body would
/// be taken for the next request); on HTTP/2 the stream is reset after the answer.
async fn unread_body(session: &mut Session) {
    if session.is_http2() {
        if !session.is_body_done() {
            body::discard(session, DRAIN, std::time::Duration::from_secs(1)).await;
        }
        return;
    }
    if super::framing::has_body(session) {
        body::discard(session, DRAIN, std::time::Duration::from_millis(100)).await;
        session.set_keepalive(None);
    }
}

async fn admit(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut GwCtx,
) -> std::result::Result<Next, Refusal> {
    let listener = listener(gw, session);
    if !admitted(listener, session, ctx) {
        ctx.req.reject_reason = Some("network_not_allowed");
        session.set_keepalive(None);
        return Err(Refusal {
            decision: Some(Decision::Rejected {
                filter: "listener",
                code: "forbidden",
            }),
            rejection: Rejection::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this address may not use the gateway",
            ),
        });
    }
    // Behind a trusted proxy the client is the one its headers name (for limits, lockout and
    // audit); from any other peer those headers mean nothing (and are never forwarded).
    if let (Some(l), Some(peer)) = (listener, ctx.req.client_ip) {
        ctx.req.via_trusted_proxy = l.is_trusted_proxy(&peer);
        if let Some(client) = l.forwarded_client(peer, &session.req_header().headers) {
            ctx.req.set_client(client, gw.settings.limits.ipv6_prefix);
        }
    }
    if let Err(rejection) = super::framing::check(session.req_header()) {
        // The framing cannot be trusted: nothing more is read from this connection.
        session.set_keepalive(None);
        ctx.body_read = true;
        return Err(Refusal::failed(rejection));
    }
    if super::framing::has_body(session) {
        if let Err(rejection) = super::framing::check_encoding(&session.req_header().headers) {
            return Err(Refusal::failed(rejection));
        }
    }
    if let Err(rejection) = canonical_target(session, &mut ctx.req) {
        session.set_keepalive(None);
        return Err(Refusal::failed(rejection));
    }
    if ctx.req.route == Route::Health {
        // Nobody reads a body sent with it: the connection ends after the answer (a bounded
        // linger) rather than draining a body a stranger may trickle for ever.
        if super::framing::has_body(session) {
            session.set_keepalive(None);
        }
        return Ok(Next::Answer(respond::health_json(gw.router.as_ref())));
    }
    // A proxy the operator trusts passes the browser's name on: its own checks stand.
    let via_loopback = || crate::host_check::loopback(session.server_addr());
    let trusted = ctx.req.via_trusted_proxy;
    let refused =
        listener.and_then(|l| l.hosts.refused(session.req_header(), trusted, via_loopback));
    if let Some(host) = refused {
        ctx.req.reject_reason = Some("host_not_allowed");
        return Err(Refusal {
            decision: Some(Decision::Rejected {
                filter: "listener",
                code: "host_not_allowed",
            }),
            rejection: Rejection::new(
                StatusCode::FORBIDDEN,
                "host_not_allowed",
                crate::host_check::refusal_message(host),
            ),
        });
    }
    if !super::framing::body_allowed(&ctx.req.method) && super::framing::declares_body(session) {
        session.set_keepalive(None);
        return Err(Refusal::failed(super::framing::body_not_allowed(
            &ctx.req.method,
        )));
    }
    ctx.req.headers = session.req_header().headers.clone();

    gw.chain
        .on_request_before_body(&mut ctx.req)
        .await
        .map_err(Refusal::by_chain)?;
    if ctx.req.route.holds_body() || super::framing::has_body(session) {
        read_body_alongside(gw, session, ctx).await?;
    }
    gw.chain
        .on_request_after_body(&mut ctx.req)
        .await
        .map_err(Refusal::by_chain)?;

    // Model lists are answered from the merged catalogue of all backends when discovery has
    // one; otherwise they are proxied (and filtered by forward/ when a filter restricts them).
    if matches!(ctx.req.route, Route::OllamaModels | Route::OpenAiModels) {
        if let Some(catalogue) = gw.router.pool().catalogue() {
            return Ok(Next::Answer(crate::model_list::render(
                ctx.req.route,
                &catalogue,
                ctx.req.model_gate.as_deref(),
            )));
        }
    }
    Ok(Next::Forward)
}

/// Reads the body while the answers of the checks made before it travel (an address limit on
/// shared state, for a request whose credentials were settled without waiting): one round
/// trip for the request instead of one before the body and one after. A refusal among them
/// stops the read where it is (the rest is not read, and the connection is not reused). A
/// client that waits for leave to send (`Expect: 100-continue`) gets it only once they passed.
async fn read_body_alongside(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut GwCtx,
) -> std::result::Result<(), Refusal> {
    // Checks whose refusals are not remembered answer before the body is read.
    if ctx.req.pending_costly() || body::expects_continue(session) {
        ctx.req.settle_pending().await.map_err(Refusal::by_chain)?;
        return read_held_body(gw, session, ctx).await;
    }
    let Some(answers) = ctx.req.answers() else {
        return read_held_body(gw, session, ctx).await;
    };
    let limits = &gw.settings.limits;
    let mut answers: Travelling = Box::pin(answers.wait());
    let (read, travelling) = {
        let read = std::pin::pin!(body::read(
            session,
            limits.max_body,
            limits.client_body_timeout
        ));
        match futures_util::future::select(answers.as_mut(), read).await {
            Either::Left((verdicts, read)) => {
                verdicts.apply(&mut ctx.req).map_err(Refusal::by_chain)?;
                (read.await, false)
            }
            Either::Right((read, _)) => (read, true),
        }
    };
    if travelling {
        if read.is_ok() {
            // The whole body came first: the answers travel on with the key's checks.
            ctx.req.defer_answers(answers);
        } else {
            // A refusal for the address is the answer before one for the body; after it the
            // refusal's answer ends the connection (`unread_body`).
            answers
                .await
                .apply(&mut ctx.req)
                .map_err(Refusal::by_chain)?;
        }
    }
    ctx.body_read = true;
    let taken = take_body(gw, session, ctx, read);
    if taken.is_err() {
        // The address's refusal is the answer before one for the body (which would tell a
        // refused address that its key was valid).
        ctx.req.settle_pending().await.map_err(Refusal::by_chain)?;
    }
    taken.map_err(Refusal::failed)
}

async fn read_held_body(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut GwCtx,
) -> std::result::Result<(), Refusal> {
    let limits = &gw.settings.limits;
    ctx.body_read = true;
    let read = body::read(session, limits.max_body, limits.client_body_timeout).await;
    take_body(gw, session, ctx, read).map_err(Refusal::failed)
}

/// The body read, parsed for the route, or the answer to a body that could not be read.
fn take_body(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut GwCtx,
    read: std::result::Result<bytes::Bytes, BodyError>,
) -> std::result::Result<(), Rejection> {
    let limits = &gw.settings.limits;
    let bytes = match read {
        Ok(b) => b,
        Err(e) => {
            // The rest of the body stays unread: this connection cannot be reused.
            session.set_keepalive(None);
            return Err(match e {
                BodyError::TooLarge => Rejection::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request_too_large",
                    format!(
                        "request body is larger than the limit of {} bytes",
                        limits.max_body
                    ),
                ),
                BodyError::Timeout => Rejection::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the request body did not arrive in time",
                ),
                BodyError::Read(msg) => {
                    Rejection::new(StatusCode::BAD_REQUEST, "invalid_request_body", msg)
                }
            });
        }
    };
    ctx.req.bytes_in = bytes.len() as u64;
    // An HTTP/2 stream may carry data its headers did not announce.
    if !bytes.is_empty() && !super::framing::body_allowed(&ctx.req.method) {
        session.set_keepalive(None);
        return Err(super::framing::body_not_allowed(&ctx.req.method));
    }
    if ctx.req.route.is_inference() {
        body::parse_inference(&mut ctx.req, bytes)
    } else if ctx.req.route.holds_body() {
        body::parse_named_models(&mut ctx.req, bytes)
    } else if ctx.req.route == Route::OllamaBlob {
        // A model layer, named by its digest: forwarded as it came.
        ctx.req.body = Some(bytes);
        Ok(())
    } else {
        // Another route's body (e.g. a blob upload) is forwarded as it came, within the limits;
        // a model it names is still judged.
        body::parse_other(&mut ctx.req, &bytes)?;
        ctx.req.body = Some(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::new_request_id;

    #[test]
    fn request_ids_are_32_lowercase_hex_digits_and_differ() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
            "{a}"
        );
        assert_ne!(a, b);
    }
}
