//! Pingora's own proxy path, used for routes without a held body (model lists, admin routes).

use bytes::Bytes;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::Result;
use pingora_error::{Error, ErrorType};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use super::headers::{add_upstream_headers, copy_request_headers};
use super::{Gateway, GwCtx};
use crate::router::Pick;

/// Error kind for "every backend is down": answered 503 by `fail_to_proxy`.
pub const NO_BACKEND: &str = "no_backend_available";

pub fn peer(gw: &Gateway, _session: &mut Session, ctx: &mut GwCtx) -> Result<Box<HttpPeer>> {
    let idx = match gw.router.pick(&ctx.req, &ctx.tried) {
        Pick::Backend(i) => i,
        _ if !ctx.tried.is_empty() => {
            return Err(Error::explain(
                ErrorType::ConnectNoRoute,
                "no backend left to try",
            ))
        }
        _ => {
            return Err(Error::explain(
                ErrorType::Custom(NO_BACKEND),
                "no backend is available",
            ))
        }
    };
    if !ctx.tried.is_empty() {
        ctx.req.retries += 1;
    }
    ctx.tried.push(idx);
    ctx.begin_attempt();
    ctx.lease = Some(gw.router.pool().lease(idx, 0));
    let backend = gw.router.pool().get(idx);
    ctx.req.backend = Some(backend.name.clone());
    Ok(Box::new(backend.peer.clone()))
}

/// The upstream request carries the headers as the chain left them.
pub fn request_headers(gw: &Gateway, upstream: &mut RequestHeader, ctx: &mut GwCtx) -> Result<()> {
    let Some(&idx) = ctx.tried.last() else {
        return Err(Error::explain(
            ErrorType::InternalError,
            "no backend chosen",
        ));
    };
    let backend = gw.router.pool().get(idx);
    // The canonical path the chain judged, never the raw one.
    let target = ctx.req.target();
    let mut h = RequestHeader::build(
        upstream.method.clone(),
        target.as_bytes(),
        Some(ctx.req.headers.len() + 3),
    )?;
    copy_request_headers(&ctx.req.headers, &mut h, true)?;
    add_upstream_headers(&mut h, &backend.authority, &ctx.req.request_id)?;
    *upstream = h;
    Ok(())
}

/// A backend refused or timed out: mark it and try another one if any is left.
pub fn fail_to_connect(gw: &Gateway, ctx: &mut GwCtx, mut e: Box<Error>) -> Box<Error> {
    let pool = gw.router.pool();
    if let Some(&idx) = ctx.tried.last() {
        pool.mark_failed(idx);
        log::warn!(
            "request {}: cannot connect to backend {}: {e}",
            ctx.req.request_id,
            pool.get(idx).name
        );
    }
    let retries = gw.settings.routing.retries as usize;
    if ctx.tried.len() <= retries && gw.router.has_alternative(&ctx.req, &ctx.tried) {
        e.set_retry(true);
        if let Some(&idx) = ctx.tried.last() {
            gw.count_retry(idx);
        }
    }
    e
}

pub fn response_headers(gw: &Gateway, resp: &mut ResponseHeader, ctx: &mut GwCtx) -> Result<()> {
    resp.insert_header("x-request-id", ctx.req.request_id.as_str())?;
    for (k, v) in &ctx.req.response_headers {
        resp.append_header(k.clone(), v.clone())?;
    }
    ctx.req.status = resp.status.as_u16();
    ctx.req.ttfb = Some(ctx.req.started.elapsed());
    if let Some(&idx) = ctx.tried.last() {
        gw.router.pool().mark_ok(idx);
    }
    Ok(())
}

pub fn response_body(body: &Option<Bytes>, ctx: &mut GwCtx) {
    if let Some(b) = body {
        ctx.req.bytes_out += b.len() as u64;
    }
}
