//! One HTTP/1 request through the gateway's phases.
//!
//! Pingora's `HttpProxy` would drive it through its own request future, which holds the state
//! of its cache, upstream and subrequest paths (about 32 KiB, built and copied for every
//! request) although the gateway answers every request in its own phases. Driving the phases
//! here costs only their own state. The order and the error handling are `HttpProxy`'s, with
//! JSON answers where it would send an empty one.

use gateway_filter::http::{Method, StatusCode};
use gateway_filter::redact::clip;
use gateway_filter::ErrorShape;
use pingora_core::apps::{HttpPersistentSettings, ReusedHttpStream};
use pingora_error::{Error, ErrorType};
use pingora_proxy::Session;

use super::{logging, request, respond, Gateway, GwCtx};

/// Serves the request whose whole head `session` holds, and hands the connection back when it
/// may carry another one. `last`: the connection's last request. `shape`: the error shape of
/// the route the head names, for an answer before the head is parsed. `socket`: the
/// connection's socket.
pub async fn serve(
    gw: &Gateway,
    mut session: Session,
    last: bool,
    shape: ErrorShape,
    socket: std::os::fd::RawFd,
) -> Option<ReusedHttpStream> {
    match session.downstream_session.read_request().await {
        Ok(true) => {}
        Ok(false) => return None,
        Err(e) => {
            // The head passed `httparse` already: what is left is Pingora's own checks (two
            // different Content-Lengths, a Transfer-Encoding not ending in chunked or on
            // HTTP/1.0, an ambiguous Host, a target the `http` crate does not take).
            if e.etype() == &ErrorType::InvalidHTTPHeader {
                refuse(
                    &mut session,
                    shape,
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "the request head cannot be read (its framing, Host or target is not valid)",
                    &e,
                )
                .await;
            } else {
                log::debug!("request head could not be read: {e}");
            }
            session.downstream_session.shutdown().await;
            return None;
        }
    }
    if session.req_header().method == Method::CONNECT {
        refuse(
            &mut session,
            shape,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "CONNECT is not supported",
            &"CONNECT",
        )
        .await;
        session.downstream_session.shutdown().await;
        return None;
    }
    let mut ctx = GwCtx {
        client_socket: Some(socket),
        ..GwCtx::default()
    };
    request::early(gw, &mut session, &mut ctx, last);
    let error = match request::filter(gw, &mut session, &mut ctx).await {
        Ok(true) => None,
        // `filter` answers every request; were one left, it must not hang.
        Ok(false) => Some(Error::explain(
            ErrorType::HTTPStatus(500),
            "the request was left unanswered",
        )),
        Err(e) => Some(e),
    };
    if let Some(e) = &error {
        let code = respond::fail_to_proxy(&mut session, e, &mut ctx)
            .await
            .error_code;
        if !respond::client_gone(e) {
            log::error!(
                "request {}: {e}, status: {code}, {} {}",
                ctx.req.request_id,
                clip(ctx.req.method.as_str()),
                clip(&ctx.req.path)
            );
        }
    }
    logging::complete(gw, &mut session, error.as_deref(), &mut ctx).await;
    if let Some(e) = error {
        // The connection is not reused after an error (`fail_to_proxy` says so).
        session.downstream_session.on_proxy_failure(e);
        return None;
    }
    // A connection that stays open (a body nobody needed, e.g. `GET /health` with one) is
    // drained by Pingora's reuse instead.
    let closing = session.downstream_session.get_keepalive().is_none();
    if !session.is_http2() && !session.is_body_done() && closing {
        linger(&mut session).await;
        return None;
    }
    let settings = HttpPersistentSettings::for_session(&session.downstream_session);
    let reusable = session.downstream_session.finish().await.ok().flatten()?;
    Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
}

/// Most of a refused request's body read and dropped after its answer, and for how long.
const LINGER_BYTES: usize = 4 << 20;
const LINGER_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Ends a connection whose answer went out before its body was read (a refusal), as nginx's
/// lingering close does: our side is shut (the client reads the answer, then the end), and
/// what the client still sends is read and dropped for a while. Closed with unread bytes, the
/// socket would answer them with a reset, which can make the client's system drop the answer
/// it has not read yet (seen as a connection error instead of the 413 under load).
async fn linger(session: &mut Session) {
    session.downstream_session.shutdown().await;
    super::body::discard(session, LINGER_BYTES, LINGER_FOR).await;
}

/// Answers a request the phases never see (so no audit line), and ends the connection.
/// Logged with its request id and `why`: such heads are what smuggling probes look like.
async fn refuse(
    session: &mut Session,
    shape: ErrorShape,
    status: StatusCode,
    code: &str,
    message: &str,
    why: &(dyn std::fmt::Display + Sync),
) {
    let mut ctx = GwCtx::default();
    ctx.req.request_id = request::new_request_id();
    // Debug, not info: anyone can send these without end.
    log::debug!(
        "request {}: head from {:?} refused with {}: {why}",
        ctx.req.request_id,
        session.client_addr(),
        status.as_u16()
    );
    session.set_keepalive(None);
    let body = gateway_filter::error_json(shape, status, code, message);
    if let Err(e) = respond::json(session, &mut ctx.req, status, body, &[]).await {
        log::debug!("could not send the error response: {e}");
    }
}
