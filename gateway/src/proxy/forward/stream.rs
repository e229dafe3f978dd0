//! Relaying the backend's answer to the client: the response header the gateway builds, then
//! the body chunk by chunk as it arrives, each chunk fed to the usage parser (and, for a
//! stream whose usage event the gateway asked for, taken out of it); or, for a model list
//! the caller may only partly see, the filtered list.

use bytes::Bytes;
use gateway_filter::http::{header, StatusCode};
use gateway_filter::Decision;
use pingora_core::protocols::http::v1::client::HttpSession;
use pingora_error::{Error, ErrorType};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use super::super::headers::copy_response_headers;
use super::super::logging::end_response;
use super::super::{Gateway, GwCtx};
use super::Attempt;
use crate::model_list;
use crate::router::Backend;
use crate::usage::{Framing, UsageEventStripper, UsageParser};

/// Sends the client the answer whose header `up` has read, and gives the connection back to
/// the pool once the body was read to its end.
pub(super) async fn relay(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut GwCtx,
    backend: &Backend,
    mut up: HttpSession,
) -> Attempt {
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
    if end_now {
        answer_started(gw, ctx, backend, status);
        end_response(gw, ctx);
    }
    if ctx.keepalive_sent {
        // The stream's headers went out with the first keep-alive: its events follow them.
        if end_now {
            if let Err(e) = session.write_response_body(None, true).await {
                return Attempt::Abort(e.into_down());
            }
        }
    } else {
        super::super::drain::close_if_draining(session);
        if let Err(e) = session.write_response_header(Box::new(resp), end_now).await {
            return Attempt::Abort(e.into_down());
        }
        ctx.req.ttfb = Some(ctx.req.started.elapsed());
    }
    if end_now {
        gw.upstreams.release(backend.index, &backend.peer, up).await;
        return Attempt::Done;
    }

    let mut parser = UsageParser::new(framing);
    if ctx.req.completions > 1 {
        parser.several_completions(ctx.body_facts.echoed);
    }
    let mut stripper = strip.then(UsageEventStripper::default);
    // An HTTP/2 stream the client resets while the backend is silent is let go at once: h2
    // frees the stream's place in the connection's 16 as the reset comes, so a stream task
    // that waited for the next chunk would hold its backend slot beyond the connection caps.
    // (An HTTP/1 connection stays counted until its task ends; its client is found at the
    // next write.)
    let h2 = session.is_http2();
    let mut first = true;
    let last = loop {
        let read = if h2 {
            tokio::select! {
                biased;
                r = up.read_body_ref() => r,
                e = super::exchange::client_left(session, None, tokio::time::Instant::now()) => {
                    failed(ctx, &mut parser, "client_disconnected");
                    return Attempt::Abort(e);
                }
            }
        } else {
            up.read_body_ref().await
        };
        if std::mem::take(&mut first) && matches!(read, Ok(Some(_)) | Ok(None)) {
            answer_started(gw, ctx, backend, status);
        }
        let chunk = match read {
            Ok(Some(chunk)) => {
                parser.feed(chunk);
                match stripper.as_mut() {
                    Some(s) => Bytes::from(s.filter(chunk)),
                    None => Bytes::copy_from_slice(chunk),
                }
            }
            Ok(None) => break Bytes::new(),
            // After the stream's last event (`[DONE]`, `"done": true`) the answer is whole and
            // settled: a backend that then fails to end its body (a dropped connection, its
            // read deadline) broke nothing the client reads. The client's body is ended and
            // the backend's connection dropped, not pooled, nor counted as a failure.
            Err(e) if ctx.response_ended => {
                log::debug!(
                    "request {}: backend {} did not end its body after the stream's end: {e}",
                    ctx.req.request_id,
                    backend.name
                );
                drop(up);
                let rest = stripper.as_mut().map(|s| s.finish()).unwrap_or_default();
                if !rest.is_empty() {
                    ctx.req.bytes_out += rest.len() as u64;
                    if let Err(e) = session.write_response_body(Some(rest.into()), false).await {
                        return Attempt::Abort(e.into_down());
                    }
                }
                return match session.write_response_body(None, true).await {
                    Ok(()) => Attempt::Done,
                    Err(e) => Attempt::Abort(e.into_down()),
                };
            }
            Err(e) => {
                // The backend broke mid-response: the client must see a truncated stream,
                // never a clean end, so the connection is aborted rather than finished.
                failed(ctx, &mut parser, "backend_broke_stream");
                return Attempt::Abort(e.into_up());
            }
        };
        // With a length (or the chunked end read with the last data), the backend's body is
        // done as its last chunk arrives: the client has the answer once that chunk is out.
        if up.is_body_done() {
            break chunk;
        }
        // A stream's last event (`[DONE]`, `"done": true`) completes the answer for the
        // client (clients stop reading there) before the body's own end comes.
        if parser.ended() && !ctx.response_ended {
            settle_usage(&mut parser, &mut ctx.req);
            end_response(gw, ctx);
        }
        if let Err(e) = write_chunk(session, ctx, chunk).await {
            // What the backend generated meanwhile counts too (see `salvage`).
            if !ctx.response_ended {
                salvage(&mut up, &mut parser).await;
            }
            failed(ctx, &mut parser, "client_disconnected");
            return Attempt::Abort(e);
        }
    };
    if !ctx.response_ended {
        settle_usage(&mut parser, &mut ctx.req);
    }
    let rest = stripper
        .as_mut()
        .map(|s| s.finish())
        .filter(|r| !r.is_empty());
    end_response(gw, ctx);
    for part in [last, rest.map(Bytes::from).unwrap_or_default()] {
        if !part.is_empty() {
            ctx.req.bytes_out += part.len() as u64;
            if let Err(e) = session.write_response_body(Some(part), false).await {
                return Attempt::Abort(e.into_down());
            }
        }
    }
    if let Err(e) = session.write_response_body(None, true).await {
        return Attempt::Abort(e.into_down());
    }
    gw.upstreams.release(backend.index, &backend.peer, up).await;
    Attempt::Done
}

/// The backend's answer began to come (its first body bytes; a server sends its header
/// before the first token): with a `2xx`, it is not hung, and earlier backends' misses of
/// this request are judged against how long it took ([`crate::router::MissedDeadlines`]).
fn answer_started(gw: &Gateway, ctx: &mut GwCtx, backend: &Backend, status: StatusCode) {
    if !status.is_success() {
        return;
    }
    if super::serves_work(&ctx.req) {
        gw.router.pool().mark_serving(backend.index);
    }
    if let Some(sent) = ctx.req.sent {
        ctx.missed
            .answered(ctx.req.started.elapsed().saturating_sub(sent));
    }
}

/// Sends one chunk of a body that goes on; the error is the client's (it left, or stopped
/// reading past `client_send_timeout`).
async fn write_chunk(
    session: &mut Session,
    ctx: &mut GwCtx,
    chunk: Bytes,
) -> Result<(), Box<Error>> {
    ctx.req.bytes_out += chunk.len() as u64;
    session
        .write_response_body(Some(chunk), false)
        .await
        .map_err(|e| e.into_down())
}

/// Most of a backend's body read after its client left, and for how long.
const SALVAGE_BYTES: usize = 8 << 20;
const SALVAGE_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// The client left mid-stream, or stopped reading until its write timed out: while its write
/// was blocked the gateway read nothing more, and the backend (vLLM, llama.cpp, SGLang) went
/// on generating into the buffers between them. What is already there, a finished answer's
/// usage event among it, is read (within [`SALVAGE_BYTES`] and [`SALVAGE_TIME`]) before the
/// backend's connection is dropped, so the request is charged what was generated, not only
/// what the client took (a client that read nothing of a 4,000-token answer was charged 998).
async fn salvage(up: &mut HttpSession, parser: &mut UsageParser) {
    let until = tokio::time::Instant::now() + SALVAGE_TIME;
    let mut read = 0;
    while read < SALVAGE_BYTES && !parser.ended() {
        match tokio::time::timeout_at(until, up.read_body_ref()).await {
            Ok(Ok(Some(chunk))) => {
                read += chunk.len();
                parser.feed(chunk);
            }
            _ => break,
        }
    }
}

/// The exchange broke before its end: the usage seen so far, and why. After the stream's last
/// event the answer stands as it was settled.
fn failed(ctx: &mut GwCtx, parser: &mut UsageParser, code: &'static str) {
    if !ctx.response_ended {
        ctx.req.decision = Decision::Failed { code };
        settle_usage(parser, &mut ctx.req);
        // A stream offering tools that ended early (the client left, the backend broke or
        // fell silent past its read deadline) before the backend reported its usage: the
        // backend may have been writing a tool call it sends only once whole (Ollama parses
        // calls before it streams them), text no event carried, so what passed bounds
        // nothing. The reservation is charged (an HTTP/2 client that reset such a stream was
        // charged 1 token of the 975 generated; billing review).
        if matches!(code, "client_disconnected" | "backend_broke_stream")
            && ctx.body_facts.tools
            && ctx.req.usage.is_none_or(|u| u.counted)
        {
            ctx.req.usage = None;
        }
    }
}

/// The usage of an exchange as it ended, however it ended: what the backend reported, or
/// what the gateway counted passing, with the prompt estimated from the held body
/// (`prompt_tokens`: its text and media). Budget, tokens per minute and audit all see this
/// one figure.
fn settle_usage(parser: &mut UsageParser, req: &mut gateway_filter::RequestCtx) {
    let several = req.completions > 1;
    req.usage = parser.finish().map(|mut u| {
        // A request for several completions may have reported one prompt of several (llama.cpp
        // answers a list of prompts with the first task's usage): at least the estimate.
        if u.counted || several {
            // A reported prompt (one completion's, next to counted text) stands when larger.
            let estimate = req.prompt_tokens();
            u.prompt_tokens = u.prompt_tokens.max(estimate);
        }
        u
    });
    req.finish_reasons = parser.finish_reasons();
}

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
    let body = match model_list::read(&mut up).await {
        Ok(body) => body,
        Err(e) => return Attempt::Fail(e),
    };
    gw.upstreams.release(backend.index, &backend.peer, up).await;
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
    end_response(gw, ctx);
    super::super::drain::close_if_draining(session);
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

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_filter::http::Method;
    use serde_json::json;

    fn settled(path: &str, body: serde_json::Value, answer: &str) -> (u64, u64, bool) {
        let mut req = gateway_filter::RequestCtx::new(String::new(), Method::POST, path.into());
        req.completions = gateway_filter::output::read(req.route, body.as_object().unwrap())
            .unwrap()
            .choices;
        req.json = Some(body);
        let mut parser = UsageParser::new(Framing::Json);
        let sent = bytes::Bytes::from(serde_json::to_vec(req.json.as_ref().unwrap()).unwrap());
        let facts = crate::proxy::held_json::take(&mut req, &sent);
        if req.completions > 1 {
            parser.several_completions(facts.echoed);
        }
        parser.feed(answer.as_bytes());
        settle_usage(&mut parser, &mut req);
        let u = req.usage.unwrap();
        (u.prompt_tokens, u.completion_tokens, u.counted)
    }

    /// Review: llama.cpp answers a list of prompts with the first task's usage, prompt
    /// included; the prompt is at least the estimate of all of them, whatever the count said.
    #[test]
    fn several_completions_pay_at_least_the_estimated_prompt() {
        let long = "word ".repeat(400);
        let body =
            json!({"model": "m", "prompt": [long.clone(), long.clone(), long], "max_tokens": 10});
        // Each prompt 2,000 characters (500 tokens); the answer's text within the figure.
        let answer = r#"{"choices":[{"text":"ok"},{"text":"ok"},{"text":"ok"}],"usage":{"prompt_tokens":500,"completion_tokens":3}}"#;
        assert_eq!(settled("/v1/completions", body, answer), (1500, 3, false));
    }

    /// Review: `echo` is subtracted only where the answer repeats the prompt
    /// (`/v1/completions`); on chat, llama.cpp ignores it and runs every completion.
    #[test]
    fn echo_on_chat_hides_nothing() {
        let text = "t".repeat(400);
        let answer = format!(
            r#"{{"choices":[{{"message":{{"content":"{text}"}}}},{{"message":{{"content":"{text}"}}}}],"usage":{{"prompt_tokens":5,"completion_tokens":100}}}}"#
        );
        let body = json!({"model": "m", "echo": true, "n": 2, "messages": [{"role": "user", "content": "x".repeat(1600)}]});
        let (_, completion, counted) = settled("/v1/chat/completions", body, &answer);
        assert_eq!((completion, counted), (200, true));
    }
}
