//! Forwarding a held inference body to a backend, with our own retry loop.
//!
//! Pingora's connector pools upstream connections; we write the request (header + held
//! body), stream the response to the client chunk by chunk as it arrives, and feed each chunk
//! to the usage parser. Before any byte reached the client a connect failure moves on to the
//! next backend, replaying the same body; after that, nothing is retried.

use bytes::Bytes;
use gateway_filter::http::{header, Method};
use gateway_filter::{error_json, Decision};
use pingora_core::protocols::http::v1::client::HttpSession;
use pingora_core::Result;
use pingora_error::{Error, ErrorType};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use super::headers::{add_upstream_headers, copy_request_headers, copy_response_headers};
use super::{respond, Gateway, GwCtx};
use crate::model_list;
use crate::router::Backend;
use crate::usage::{Framing, UsageParser};

/// How an attempt on one backend ended.
enum Attempt {
    /// The client got its full response.
    Done,
    /// Nothing was sent to the client and the backend did not take the request: try another.
    Retry(Box<Error>),
    /// Nothing was sent to the client; answer with an error.
    Fail(Box<Error>),
    /// Bytes already reached the client (or it left): the exchange is over, abort it.
    Abort(Box<Error>),
}

pub async fn forward(gw: &Gateway, session: &mut Session, ctx: &mut GwCtx) -> Result<()> {
    let body = held_body(ctx)?;
    let pool = gw.router.pool();
    let mut last_err = None;
    while let Some(idx) = gw.router.pick(&ctx.req, &ctx.tried) {
        if !ctx.tried.is_empty() {
            ctx.req.retries += 1;
        }
        ctx.tried.push(idx);
        let backend = pool.get(idx);
        ctx.req.backend = Some(backend.name.clone());
        gw.begin_attempt(ctx, idx);
        match attempt(gw, session, ctx, backend, &body).await {
            Attempt::Done => {
                pool.mark_ok(idx);
                return Ok(());
            }
            Attempt::Retry(e) => {
                log::warn!(
                    "request {}: backend {} failed before answering: {e}",
                    ctx.req.request_id,
                    backend.name
                );
                pool.mark_failed(idx);
                gw.count_retry(idx);
                last_err = Some(e);
            }
            Attempt::Fail(e) => return answer_failure(session, ctx, &e).await,
            Attempt::Abort(e) => return Err(e),
        }
    }
    match last_err {
        Some(e) => answer_failure(session, ctx, &e).await,
        None => {
            let e = Error::explain(ErrorType::ConnectNoRoute, "no backend configured");
            answer_failure(session, ctx, &e).await
        }
    }
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
    ctx.req.decision = Decision::Failed { code };
    respond::json(
        session,
        &mut ctx.req,
        status,
        error_json(status, code, &message),
        &[],
    )
    .await
}

fn upstream_request(ctx: &GwCtx, backend: &Backend, body_len: usize) -> Result<Box<RequestHeader>> {
    let req = &ctx.req;
    let path = req.target();
    let mut h = RequestHeader::build(
        req.method.clone(),
        path.as_bytes(),
        Some(req.headers.len() + 4),
    )?;
    copy_request_headers(&req.headers, &mut h, false)?;
    add_upstream_headers(&mut h, &backend.authority, &req.request_id)?;
    if body_len > 0 || !(req.method == Method::GET || req.method == Method::HEAD) {
        h.insert_header(header::CONTENT_LENGTH, body_len)?;
    }
    Ok(Box::new(h))
}

async fn send(up: &mut HttpSession, req: Box<RequestHeader>, body: &Bytes) -> Result<()> {
    up.write_request_header(req).await?;
    if !body.is_empty() {
        up.write_body(body).await?;
    }
    up.finish_body().await?;
    Ok(())
}

/// Sends the request and reads the response header, once more on a fresh connection when a
/// pooled one turns out to be stale (the server closed it while idle).
async fn exchange_header(
    gw: &Gateway,
    ctx: &GwCtx,
    backend: &Backend,
    body: &Bytes,
) -> Result<HttpSession, Attempt> {
    for _ in 0..2 {
        let (mut up, reused) = match gw.connector.get_http_session(&backend.peer).await {
            Ok(s) => s,
            Err(e) => return Err(Attempt::Retry(e)),
        };
        let limits = &gw.settings.limits;
        up.read_timeout = Some(limits.read_timeout);
        up.write_timeout = Some(limits.send_timeout);
        let req = upstream_request(ctx, backend, body.len()).map_err(Attempt::Fail)?;
        let result: Result<()> = async {
            send(&mut up, req, body).await?;
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
        .await;
        match result {
            Ok(()) => return Ok(up),
            Err(e) if reused && !is_timeout(&e) => continue,
            Err(e) if is_timeout(&e) => return Err(Attempt::Fail(e)),
            Err(e) if up.resp_header().is_none() && matches!(e.etype(), ErrorType::WriteError) => {
                return Err(Attempt::Retry(e))
            }
            Err(e) => return Err(Attempt::Fail(e)),
        }
    }
    Err(Attempt::Fail(Error::explain(
        ErrorType::ConnectionClosed,
        "pooled connections kept closing",
    )))
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
) -> Attempt {
    let mut up = match exchange_header(gw, ctx, backend, body).await {
        Ok(up) => up,
        Err(a) => return a,
    };
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
    let mut resp = match ResponseHeader::build(
        status,
        Some(upstream_header.headers.len() + 1 + ctx.req.response_headers.len()),
    ) {
        Ok(r) => r,
        Err(e) => return Attempt::Fail(e),
    };
    let built = copy_response_headers(upstream_header, &mut resp)
        .and_then(|_| {
            resp.insert_header("x-request-id", ctx.req.request_id.as_str())
                .map(|_| ())
        })
        .and_then(|_| {
            ctx.req
                .response_headers
                .iter()
                .try_for_each(|(k, v)| resp.append_header(k.clone(), v.clone()).map(|_| ()))
        });
    if let Err(e) = built {
        return Attempt::Fail(e);
    }
    ctx.req.status = status.as_u16();
    if let (Some(gate), true) = (ctx.req.model_gate.clone(), status.is_success()) {
        return filtered_list(gw, session, ctx, backend, up, resp, gate.as_ref()).await;
    }
    let end_now = up.is_body_done();
    if let Err(e) = session.write_response_header(Box::new(resp), end_now).await {
        return Attempt::Abort(e);
    }
    ctx.req.ttfb = Some(ctx.req.started.elapsed());
    if end_now {
        gw.connector
            .release_http_session(up, &backend.peer, backend.peer.options.idle_timeout)
            .await;
        return Attempt::Done;
    }

    let mut parser = UsageParser::new(framing);
    loop {
        let chunk = match up.read_body_ref().await {
            Ok(Some(chunk)) => {
                parser.feed(chunk);
                Bytes::copy_from_slice(chunk)
            }
            Ok(None) => break,
            Err(e) => {
                // The backend broke mid-response: the client must see a truncated stream,
                // never a clean end, so the connection is aborted rather than finished.
                ctx.req.decision = Decision::Failed {
                    code: "backend_broke_stream",
                };
                return Attempt::Abort(e);
            }
        };
        ctx.req.bytes_out += chunk.len() as u64;
        if let Err(e) = session.write_response_body(Some(chunk), false).await {
            ctx.req.decision = Decision::Failed {
                code: "client_disconnected",
            };
            return Attempt::Abort(e);
        }
    }
    ctx.req.usage = parser.finish();
    if let Err(e) = session.write_response_body(None, true).await {
        return Attempt::Abort(e);
    }
    gw.connector
        .release_http_session(up, &backend.peer, backend.peer.options.idle_timeout)
        .await;
    Attempt::Done
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
    if let Err(e) = session.write_response_header(Box::new(resp), false).await {
        return Attempt::Abort(e);
    }
    ctx.req.ttfb = Some(ctx.req.started.elapsed());
    match session
        .write_response_body(Some(Bytes::from(filtered)), true)
        .await
    {
        Ok(()) => Attempt::Done,
        Err(e) => Attempt::Abort(e),
    }
}
