//! The end of every request: give back what it holds as its answer ends (`end_response`),
//! settle what is known, then `chain.on_complete`.

use gateway_filter::redact::clip;
use gateway_filter::Decision;
use pingora_error::{Error, ErrorSource};
use pingora_proxy::Session;

use super::{Gateway, GwCtx};

/// The answer is complete and its last bytes are about to be written: the backend's slot
/// and the filters' holds (in-flight slots, token and spend reservations) are given back now,
/// not after the client has the answer, so a client that sends its next request the moment
/// it has this one (on another connection) never meets them. Once per request; `complete`
/// calls it for requests that ended otherwise.
pub fn end_response(gw: &Gateway, ctx: &mut GwCtx) {
    if ctx.response_ended {
        return;
    }
    ctx.response_ended = true;
    ctx.lease = None;
    let req = &mut ctx.req;
    req.duration = Some(req.started.elapsed());
    gw.chain.on_response_end(req);
}

pub async fn complete(gw: &Gateway, session: &mut Session, e: Option<&Error>, ctx: &mut GwCtx) {
    let req = &mut ctx.req;
    if req.status == 0 {
        req.status = session.response_written().map_or(0, |h| h.status.as_u16());
    }
    if !ctx.answered {
        req.bytes_in = session.body_bytes_read() as u64;
    }
    // After the answer's end (its last event out) an error does not undo it: the answer stands
    // as it was settled.
    if let (Some(e), Decision::Allowed, false) = (e, &req.decision, ctx.response_ended) {
        req.decision = Decision::Failed {
            code: if e.esource() == &ErrorSource::Downstream {
                "client_disconnected"
            } else {
                "backend_error"
            },
        };
    }
    end_response(gw, ctx);
    let traced = gw.telemetry.as_ref().is_some_and(|t| t.captures_prompts());
    if gw.chain.reads_body_at_end || traced {
        super::held_json::restore(&mut ctx.req, &ctx.body_facts);
    }
    let req = &mut ctx.req;
    req.duration = Some(req.started.elapsed());
    gw.chain.on_complete(req).await;
    if let Some(t) = &gw.telemetry {
        t.finish(&ctx.trace, req);
    }
    gw.metrics.observe(req);
    if let (Some(backend), Some(start)) = (&req.backend, ctx.upstream_started) {
        gw.metrics
            .upstream_duration
            .with_label_values(&[backend])
            .observe(start.elapsed().as_secs_f64());
    }
    if log::log_enabled!(log::Level::Debug) {
        let (prompt, completion) = req.usage.map_or((-1, -1), |u| {
            (u.prompt_tokens as i64, u.completion_tokens as i64)
        });
        log::debug!(
            // What a client chose (path, model, a token's subject) is quoted and escaped, so a
            // space or newline in it cannot forge a field or a line, and cut.
            "access id={} client={} method={} path={:?} route={} model={:?} backend={} status={} decision={} reason={} principal={:?} retries={} ms={} prompt_tokens={prompt} completion_tokens={completion}",
            req.request_id,
            req.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            clip(req.method.as_str()),
            clip(&req.path),
            req.route.as_str(),
            req.model.as_deref().map_or("-", clip),
            req.backend.as_deref().unwrap_or("-"),
            req.status,
            req.decision,
            req.reject_reason.unwrap_or("-"),
            req.principal.as_ref().map_or("-", |p| clip(&p.id)),
            req.retries,
            req.duration.unwrap_or_default().as_millis(),
        );
    }
    ctx.in_flight = None;
}
