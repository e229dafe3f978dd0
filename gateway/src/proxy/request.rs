//! `early_request_filter` and `request_filter`.

use gateway_filter::http::StatusCode;
use gateway_filter::path::canonicalize;
use gateway_filter::{Decision, Rejection, RequestCtx, Route};
use pingora_core::Result;
use pingora_proxy::Session;

use super::body::{self, BodyError};
use super::{forward, respond, Gateway, GwCtx};
use crate::config::ListenerSpec;
use crate::tls::CertSubjects;

/// Request id, client address, start time; nothing here can fail.
pub fn early(gw: &Gateway, session: &mut Session, ctx: &mut GwCtx) {
    ctx.in_flight = Some(gw.in_flight.enter());
    let req = &mut ctx.req;
    req.started = std::time::Instant::now();
    req.request_id = format!("{:032x}", fastrand::u128(..));
    req.client_ip = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    let header = session.req_header();
    req.method = header.method.clone();
    req.path = header.uri.path().to_string();
    req.query = header.uri.query().map(str::to_string);
    req.route = Route::classify(&req.method, &req.path);
    if let Some(subjects) = session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .and_then(|t| t.extension.get::<CertSubjects>())
    {
        req.client_cert_subjects = subjects.0.clone();
    }
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
    Ok(())
}

/// The listener a connection came in on, matched by local address.
fn listener<'a>(gw: &'a Gateway, session: &Session) -> Option<&'a ListenerSpec> {
    let local = session.server_addr()?.as_inet()?;
    let listeners = &gw.settings.listen;
    listeners.iter().find(|l| l.addr == *local).or_else(|| {
        listeners
            .iter()
            .find(|l| l.addr.port() == local.port() && l.addr.ip().is_unspecified())
    })
}

/// Returns `Ok(true)` when the gateway answered (health, rejection, inference forwarded).
pub async fn filter(gw: &Gateway, session: &mut Session, ctx: &mut GwCtx) -> Result<bool> {
    if let (Some(l), Some(ip)) = (listener(gw, session), ctx.req.client_ip) {
        if !l.admits(&ip) {
            // Checked before any credential or body is looked at.
            log::info!(
                "request {}: client {ip} is not allowed on listener {}",
                ctx.req.request_id,
                l.addr
            );
            ctx.req.reject_reason = Some("network_not_allowed");
            let r = Rejection::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this address may not use the gateway",
            );
            ctx.req.decision = Decision::Rejected {
                filter: "listener",
                code: r.code,
            };
            session.set_keepalive(None);
            respond::rejection(session, &mut ctx.req, &r).await?;
            ctx.answered = true;
            return Ok(true);
        }
    }
    if let Err(rejection) = canonical_target(session, &mut ctx.req) {
        ctx.req.decision = Decision::Failed {
            code: rejection.code,
        };
        session.set_keepalive(None);
        respond::rejection(session, &mut ctx.req, &rejection).await?;
        ctx.answered = true;
        return Ok(true);
    }

    if ctx.req.route == Route::Health {
        let body = respond::health_json(gw.router.as_ref());
        respond::json(session, &mut ctx.req, StatusCode::OK, body, &[]).await?;
        ctx.answered = true;
        return Ok(true);
    }
    ctx.req.headers = session.req_header().headers.clone();

    if ctx.req.route.is_inference() {
        if let Err(rejection) = read_inference_body(gw, session, ctx).await {
            ctx.req.decision = Decision::Failed {
                code: rejection.code,
            };
            respond::rejection(session, &mut ctx.req, &rejection).await?;
            ctx.answered = true;
            return Ok(true);
        }
    }

    if let Err(rejection) = gw.chain.on_request(&mut ctx.req).await {
        respond::rejection(session, &mut ctx.req, &rejection).await?;
        ctx.answered = true;
        return Ok(true);
    }

    // Model lists are answered from the merged catalogue of all backends when discovery has
    // one; otherwise they are proxied (and filtered by forward.rs when a filter restricts them).
    if matches!(ctx.req.route, Route::OllamaModels | Route::OpenAiModels) {
        if let Some(catalogue) = gw.router.pool().catalogue() {
            let body =
                crate::model_list::render(ctx.req.route, &catalogue, ctx.req.model_gate.as_deref());
            respond::json(session, &mut ctx.req, StatusCode::OK, body, &[]).await?;
            ctx.answered = true;
            return Ok(true);
        }
    }
    // Model lists a filter restricted are forwarded by forward.rs too, which filters them.
    if ctx.req.route.is_inference() || ctx.req.model_gate.is_some() {
        ctx.answered = true;
        forward::forward(gw, session, ctx).await?;
        return Ok(true);
    }
    if gw.router.pool().is_empty() {
        let r = Rejection::new(
            StatusCode::BAD_GATEWAY,
            "no_backend",
            "no backend is configured",
        );
        ctx.req.decision = Decision::Failed { code: r.code };
        respond::rejection(session, &mut ctx.req, &r).await?;
        ctx.answered = true;
        return Ok(true);
    }
    Ok(false)
}

async fn read_inference_body(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut GwCtx,
) -> std::result::Result<(), Rejection> {
    let limits = &gw.settings.limits;
    let bytes = match body::read(session, limits.max_body, limits.client_body_timeout).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            // The rest of the body stays unread: this connection cannot be reused.
            session.set_keepalive(None);
            return Err(Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!(
                    "request body is larger than the limit of {} bytes",
                    limits.max_body
                ),
            ));
        }
        Err(BodyError::Timeout) => {
            session.set_keepalive(None);
            return Err(Rejection::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive in time",
            ));
        }
        Err(BodyError::Read(msg)) => {
            session.set_keepalive(None);
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_body",
                msg,
            ));
        }
    };
    ctx.req.bytes_in = bytes.len() as u64;
    body::parse_inference(&mut ctx.req, bytes)
}
