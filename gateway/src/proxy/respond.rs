//! Answers the gateway writes itself: health, rejections, and upstream failures, all JSON.

use bytes::Bytes;
use gateway_filter::http::{header, HeaderName, HeaderValue, StatusCode};
use gateway_filter::{error_json, Decision, ErrorShape, Rejection, RequestCtx};
use pingora_core::Result;
use pingora_error::{Error, ErrorSource, ErrorType};
use pingora_http::ResponseHeader;
use pingora_proxy::{FailToProxy, Session};

use super::GwCtx;
use crate::router::Router;

/// How long each write of an answer the gateway writes itself (a refusal, `/health`, an
/// error: a few hundred bytes) may take.
const OWN_ANSWER_WRITE: std::time::Duration = std::time::Duration::from_secs(2);

/// Writes a complete JSON response with `x-request-id` and the headers filters asked for.
pub async fn json(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: StatusCode,
    body: String,
    extra: &[(HeaderName, HeaderValue)],
) -> Result<()> {
    let mut h =
        ResponseHeader::build_no_case(status, Some(4 + extra.len() + ctx.response_headers.len()))?;
    h.insert_header(header::CONTENT_TYPE, "application/json")?;
    h.insert_header(header::CONTENT_LENGTH, body.len())?;
    h.insert_header("x-request-id", ctx.request_id.as_str())?;
    for (k, v) in extra.iter().chain(ctx.response_headers.iter()) {
        h.append_header(k.clone(), v.clone())?;
    }
    ctx.status = status.as_u16();
    ctx.bytes_out = body.len() as u64;
    super::drain::close_if_draining(session);
    // A write that fails is the client's doing (it left, or stopped reading): marked so, a
    // refusal it never read stays the refusal, not a backend failure, and logs no error.
    // Within a short deadline: an HTTP/2 client that gives its streams no window held each
    // refusal (and its stream's state, ~33 KiB) for `client_send_timeout`, 16 a connection,
    // without credentials.
    session.set_write_timeout(Some(OWN_ANSWER_WRITE));
    session
        .write_response_header(Box::new(h), false)
        .await
        .map_err(|e| e.into_down())?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
        .map_err(|e| e.into_down())
}

pub async fn rejection(session: &mut Session, ctx: &mut RequestCtx, r: &Rejection) -> Result<()> {
    let body = r.body(ErrorShape::for_path(&ctx.path));
    json(session, ctx, r.status, body, &r.headers).await
}

/// Error kind for an attempt abandoned at the first-byte deadline.
pub const FIRST_BYTE_TIMEOUT: &str = "first_byte_timeout";

/// The error a failed exchange with a backend turns into. Names the backend, nothing else.
pub fn upstream_failure(e: &Error, backend: Option<&str>) -> (StatusCode, &'static str, String) {
    let name = backend.unwrap_or("(none)");
    match e.etype() {
        ErrorType::Custom(c) if *c == FIRST_BYTE_TIMEOUT => (
            StatusCode::GATEWAY_TIMEOUT,
            FIRST_BYTE_TIMEOUT,
            format!("backend {name} sent nothing within the first-byte deadline"),
        ),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => (
            StatusCode::GATEWAY_TIMEOUT,
            "backend_timeout",
            format!("backend {name} did not answer in time"),
        ),
        ErrorType::HTTPStatus(code) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_GATEWAY);
            (
                status,
                "gateway_error",
                status.canonical_reason().unwrap_or("error").to_string(),
            )
        }
        _ => (
            StatusCode::BAD_GATEWAY,
            "backend_unavailable",
            format!("backend {name} is unavailable"),
        ),
    }
}

/// The client left (Ctrl-C, a closed tab) or stopped reading past `client_send_timeout`:
/// normal, not an error worth a log line (anyone can cause one per request). It is still
/// recorded in the audit line and metrics.
pub fn client_gone(e: &Error) -> bool {
    e.esource() == &ErrorSource::Downstream
        && matches!(
            e.etype(),
            ErrorType::WriteError
                | ErrorType::ReadError
                | ErrorType::ConnectionClosed
                | ErrorType::WriteTimedout
                // An HTTP/2 stream the client reset, or whose connection it closed.
                | ErrorType::H2Error
        )
}

/// The last word on a failed request: answer with JSON if nothing was written yet.
pub async fn fail_to_proxy(session: &mut Session, e: &Error, ctx: &mut GwCtx) -> FailToProxy {
    let client_gone = client_gone(e);
    if client_gone || session.response_written().is_some() {
        return FailToProxy {
            error_code: if client_gone { 0 } else { ctx.req.status },
            can_reuse_downstream: false,
        };
    }
    let (status, code, message) = if e.esource() == &ErrorSource::Downstream {
        (
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the request could not be read".to_string(),
        )
    } else {
        upstream_failure(e, ctx.req.backend.as_deref())
    };
    ctx.req.decision = Decision::Failed { code };
    // Pingora will not reuse this connection: say so, or a client may send its next
    // request on it just as it closes.
    session.set_keepalive(None);
    let body = error_json(ErrorShape::for_path(&ctx.req.path), status, code, &message);
    if let Err(err) = json(session, &mut ctx.req, status, body, &[]).await {
        log::debug!(
            "request {}: could not send the error response: {err}",
            ctx.req.request_id
        );
    }
    FailToProxy {
        error_code: status.as_u16(),
        can_reuse_downstream: false,
    }
}

/// `GET /health`: the gateway is up; each backend's passive state. No addresses, no secrets.
pub fn health_json(router: &dyn Router) -> String {
    let pool = router.pool();
    let backends: Vec<serde_json::Value> = pool
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut entry = serde_json::json!({
                "name": &*b.name,
                "kind": b.kind.as_str(),
                "state": if pool.is_up(i) { "up" } else { "down" },
            });
            // Out on failures requests may have caused: it still takes what no backend up
            // can (`BackendPool::is_standby`).
            if pool.is_standby(i) {
                entry["standby"] = true.into();
            }
            entry
        })
        .collect();
    let any_up = (0..pool.len()).any(|i| pool.is_up(i));
    // Shared state out of reach is degraded, not down: the replica still answers (on local
    // limits, or 503 where the operator chose to fail closed), so a load balancer keeps it.
    let state = match pool.state() {
        None => "local",
        Some(s) if s.degraded() => "degraded",
        Some(_) => "shared",
    };
    serde_json::json!({
        "status": if any_up || pool.is_empty() { "ok" } else { "degraded" },
        "state": state,
        "backends": backends,
    })
    .to_string()
}
