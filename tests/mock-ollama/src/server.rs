use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::formats::{self, Generation};
use crate::state::{FailMode, Recorder, SeenRequest};

type Body = BoxBody<Bytes, io::Error>;

/// How the mock behaves unless a request's `x-mock-*` headers say otherwise.
#[derive(Debug, Clone)]
pub struct MockConfig {
    pub addr: SocketAddr,
    pub models: Vec<String>,
    /// Tokens generated per request (one streamed chunk each).
    pub chunks: u64,
    pub chunk_delay: Duration,
    /// Inference answers start only after this (a model loading, a queue): accept, then
    /// answer late.
    pub first_byte_delay: Duration,
    pub fail: FailMode,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            models: vec![
                "llama3.1:8b".into(),
                "qwen2.5:7b".into(),
                "nomic-embed-text:latest".into(),
            ],
            chunks: 5,
            chunk_delay: Duration::ZERO,
            first_byte_delay: Duration::ZERO,
            fail: FailMode::None,
        }
    }
}

struct Shared {
    cfg: MockConfig,
    fail: watch::Sender<FailMode>,
    rec: Recorder,
}

/// A running mock. Dropping it stops accepting connections.
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

impl MockServer {
    /// Binds and starts serving on the current tokio runtime.
    pub async fn start(cfg: MockConfig) -> io::Result<MockServer> {
        let listener = TcpListener::bind(cfg.addr).await?;
        let addr = listener.local_addr()?;
        let (fail, _) = watch::channel(cfg.fail);
        let shared = Arc::new(Shared {
            cfg,
            fail,
            rec: Recorder::default(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let initial = (shared.cfg.fail != FailMode::Refuse).then_some(listener);
        tokio::spawn(accept_loop(initial, addr, shared.clone(), stop_rx));
        Ok(MockServer { addr, shared, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_fail(&self, mode: FailMode) {
        self.shared.fail.send_replace(mode);
    }

    /// Requests seen on `path` (control routes under `/_mock/` are not counted).
    pub fn hits(&self, path: &str) -> u64 {
        self.shared.rec.hits(path)
    }

    pub fn total(&self) -> u64 {
        self.shared
            .rec
            .total
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn requests(&self) -> Vec<SeenRequest> {
        self.shared.rec.recent()
    }

    pub fn reset(&self) {
        self.shared.rec.reset()
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

async fn accept_loop(
    mut listener: Option<TcpListener>,
    addr: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut fail = shared.fail.subscribe();
    loop {
        let Some(l) = listener.as_ref() else {
            // Refusing: the socket is closed, so connects get ECONNREFUSED.
            tokio::select! {
                _ = fail.changed() => {}
                _ = stop.changed() => return,
            }
            if *fail.borrow() != FailMode::Refuse {
                listener = rebind(addr).await;
            }
            continue;
        };
        tokio::select! {
            accepted = l.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(serve_connection(stream, shared.clone()));
                }
            }
            _ = fail.changed() => {
                if *fail.borrow() == FailMode::Refuse {
                    listener = None;
                }
            }
            _ = stop.changed() => return,
        }
    }
}

async fn rebind(addr: SocketAddr) -> Option<TcpListener> {
    for _ in 0..50 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return Some(l);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Serves one connection. When the mode becomes `Refuse` (a server going away), the
/// connection finishes what it is answering and closes, as a stopped server's would.
async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let mut fail = shared.fail.subscribe();
    let service = service_fn(move |req| handle(req, shared.clone()));
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            changed = fail.changed() => {
                if changed.is_err() || *fail.borrow() == FailMode::Refuse {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.as_mut().await;
                    return;
                }
            }
        }
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let body = Full::new(Bytes::from(v.to_string()))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

fn text_response(status: StatusCode, text: &'static str) -> Response<Body> {
    let body = Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    resp
}

/// A streamed body: the first item at once, then one per `delay`; with `cut`, the stream
/// fails after that many items so the connection drops mid-response.
/// `end_delay`: the wait between the last event and the body's end (the chunked terminator),
/// as a server that flushes its last event before it finishes the response.
fn streamed(
    content_type: &'static str,
    items: Vec<Bytes>,
    (delay, end_delay): (Duration, Duration),
    cut: Option<usize>,
) -> Response<Body> {
    let stream =
        futures_util::stream::unfold((items.into_iter(), 0usize), move |(mut it, i)| async move {
            if i == usize::MAX {
                return None;
            }
            if cut == Some(i) {
                return Some((
                    Err(io::Error::other("mock: closing mid-stream")),
                    (it, usize::MAX),
                ));
            }
            let Some(item) = it.next() else {
                if !end_delay.is_zero() {
                    tokio::time::sleep(end_delay).await;
                }
                return None;
            };
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Some((Ok(Frame::data(item)), (it, i + 1)))
        });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    if content_type == "text/event-stream" {
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-cache"),
        );
    }
    resp
}

fn body_is_inference(path: &str) -> bool {
    matches!(
        path,
        "/api/chat"
            | "/api/generate"
            | "/api/embed"
            | "/api/embeddings"
            | "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/embeddings"
    )
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

fn ndjson_line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

fn sse_event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Body>, io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| io::Error::other(e.to_string()))?
        .to_bytes();
    let path = parts.uri.path().to_string();
    if let Some(control) = path.strip_prefix("/_mock/") {
        return Ok(control_route(&parts.method, control, &body, &shared));
    }
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = json
        .get("model")
        .and_then(Value::as_str)
        .map(str::to_string);
    shared.rec.record(SeenRequest {
        method: parts.method.to_string(),
        path: path.clone(),
        query: parts.uri.query().map(str::to_string),
        body_len: body.len(),
        model: model.clone(),
        json: (body.len() <= 64 << 10 && !json.is_null()).then(|| json.clone()),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    });

    let fail = match parts
        .headers
        .get("x-mock-fail")
        .and_then(|v| v.to_str().ok())
    {
        Some(s) => FailMode::parse(s).unwrap_or_default(),
        None => *shared.fail.borrow(),
    };
    // An error answered after the server held the request (llama.cpp's 500 for tool-call
    // arguments it generated and cannot parse).
    if let Some(ms) = header_u64(&parts.headers, "x-mock-fail-after-ms") {
        if !matches!(fail, FailMode::None) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
    match fail {
        FailMode::Refuse => return Err(io::Error::other("mock: refusing")),
        FailMode::Error500 => {
            return Ok(json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": "mock: injected failure"}),
            ))
        }
        FailMode::Error429 => {
            return Ok(json_response(
                StatusCode::TOO_MANY_REQUESTS,
                &json!({"error": "mock: server busy"}),
            ))
        }
        FailMode::Hang => std::future::pending::<()>().await,
        FailMode::Error500Inference if body_is_inference(&path) => {
            return Ok(json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": "mock: injected failure"}),
            ))
        }
        FailMode::None | FailMode::CloseMidStream | FailMode::Error500Inference => {}
    }

    let m = &parts.method;
    let cfg = &shared.cfg;
    let resp = match (m.as_str(), path.as_str()) {
        ("GET", "/api/version") => json_response(StatusCode::OK, &json!({"version": "0.12.0"})),
        ("GET", "/api/tags") => json_response(StatusCode::OK, &formats::ollama_tags(&cfg.models)),
        ("GET", "/api/ps") => json_response(StatusCode::OK, &formats::ollama_ps(&cfg.models)),
        ("GET", "/v1/models") => {
            json_response(StatusCode::OK, &formats::openai_models(&cfg.models))
        }
        ("POST", "/api/pull" | "/api/push" | "/api/copy" | "/api/create")
        | ("DELETE", "/api/delete") => json_response(StatusCode::OK, &json!({"status": "success"})),
        ("POST", "/api/show") => {
            let name = json
                .get("model")
                .or_else(|| json.get("name"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            if cfg.models.iter().any(|m| m == name) {
                json_response(StatusCode::OK, &formats::ollama_show(name))
            } else {
                json_response(
                    StatusCode::NOT_FOUND,
                    &json!({"error": format!("model '{name}' not found")}),
                )
            }
        }
        ("GET", p) if p.starts_with("/v1/models/") => {
            let id = &p["/v1/models/".len()..];
            match cfg.models.iter().find(|m| m.as_str() == id) {
                Some(m) => json_response(
                    StatusCode::OK,
                    &json!({"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "library"}),
                ),
                None => json_response(
                    StatusCode::NOT_FOUND,
                    &json!({"error": {"message": format!("model '{id}' not found"), "type": "api_error", "param": null, "code": null}}),
                ),
            }
        }
        (
            "POST",
            p @ ("/api/chat"
            | "/api/generate"
            | "/api/embed"
            | "/api/embeddings"
            | "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/embeddings"),
        ) => {
            let wait = header_u64(&parts.headers, "x-mock-first-byte-ms")
                .map(Duration::from_millis)
                .unwrap_or(cfg.first_byte_delay);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            inference(
                p,
                &json,
                &parts.headers,
                cfg,
                fail == FailMode::CloseMidStream,
            )
        }
        _ => text_response(StatusCode::NOT_FOUND, "404 page not found"),
    };
    Ok(resp)
}

fn inference(
    path: &str,
    body: &Value,
    headers: &HeaderMap,
    cfg: &MockConfig,
    close_mid: bool,
) -> Response<Body> {
    let openai = path.starts_with("/v1/");
    let Some(model) = body.get("model").and_then(Value::as_str) else {
        return if openai {
            json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": {"message": "model is required", "type": "invalid_request_error", "param": null, "code": null}}),
            )
        } else {
            json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": "model is required"}),
            )
        };
    };
    // Like Ollama, a name without a tag means `:latest`.
    let tagged = |m: &str| {
        if m.contains(':') {
            m.to_string()
        } else {
            format!("{m}:latest")
        }
    };
    if !cfg.models.iter().any(|m| tagged(m) == tagged(model)) {
        let msg = format!("model \"{model}\" not found, try pulling it first");
        return if openai {
            json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": {"message": msg, "type": "api_error", "param": null, "code": null}}),
            )
        } else {
            json_response(StatusCode::NOT_FOUND, &json!({"error": msg}))
        };
    }
    let cap = body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"))
        .or_else(|| body.get("options").and_then(|o| o.get("num_predict")))
        .and_then(Value::as_u64);
    let mut tokens = header_u64(headers, "x-mock-chunks").unwrap_or(cfg.chunks);
    if let Some(cap) = cap {
        tokens = tokens.min(cap);
    }
    let delay = header_u64(headers, "x-mock-delay-ms")
        .map(Duration::from_millis)
        .unwrap_or(cfg.chunk_delay);
    let end_delay = Duration::from_millis(header_u64(headers, "x-mock-end-delay-ms").unwrap_or(0));
    let g = Generation {
        model: model.to_string(),
        prompt_tokens: formats::count_prompt_tokens(body),
        tokens,
    };
    let inputs = match body.get("input") {
        Some(Value::Array(a)) => a.len(),
        _ => 1,
    };
    let cut = close_mid.then_some(((tokens / 2) as usize).max(1));
    let stream_flag = body.get("stream").and_then(Value::as_bool);
    match path {
        "/api/chat" | "/api/generate" => {
            let chat = path == "/api/chat";
            if stream_flag.unwrap_or(true) {
                let mut items: Vec<Bytes> = (0..tokens)
                    .map(|i| ndjson_line(&formats::ollama_chunk(&g, i, chat)))
                    .collect();
                items.push(ndjson_line(&formats::ollama_final(&g, chat, false)));
                streamed("application/x-ndjson", items, (delay, end_delay), cut)
            } else {
                json_response(StatusCode::OK, &formats::ollama_final(&g, chat, true))
            }
        }
        "/api/embed" => json_response(StatusCode::OK, &formats::ollama_embed(&g, inputs)),
        "/api/embeddings" => {
            json_response(StatusCode::OK, &json!({"embedding": [0.1, 0.2, 0.3, 0.4]}))
        }
        "/v1/embeddings" => json_response(StatusCode::OK, &formats::openai_embeddings(&g, inputs)),
        _ => {
            let chat = path == "/v1/chat/completions";
            if stream_flag.unwrap_or(false) {
                // `x-mock-usage: ignore` plays llama-cpp-python, which never sends usage in
                // streams whatever `stream_options` says.
                let ignores = headers
                    .get("x-mock-usage")
                    .is_some_and(|v| v.as_bytes() == b"ignore");
                let include_usage = !ignores
                    && body
                        .pointer("/stream_options/include_usage")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                let mut items: Vec<Bytes> = (0..tokens)
                    .map(|i| sse_event(&formats::openai_chunk(&g, i, chat)))
                    .collect();
                items.push(sse_event(&formats::openai_finish_chunk(&g, chat)));
                if include_usage {
                    items.push(sse_event(&formats::openai_usage_chunk(&g, chat)));
                }
                items.push(Bytes::from_static(b"data: [DONE]\n\n"));
                streamed("text/event-stream", items, (delay, end_delay), cut)
            } else {
                json_response(StatusCode::OK, &formats::openai_full(&g, chat))
            }
        }
    }
}

fn control_route(method: &Method, route: &str, body: &[u8], shared: &Shared) -> Response<Body> {
    match (method.as_str(), route) {
        ("GET", "stats") => json_response(StatusCode::OK, &shared.rec.stats_json()),
        ("POST", "reset") => {
            shared.rec.reset();
            json_response(StatusCode::OK, &json!({"ok": true}))
        }
        ("POST", "fail") => {
            let mode = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
                v.get("mode")
                    .and_then(Value::as_str)
                    .and_then(FailMode::parse)
            });
            match mode {
                Some(mode) => {
                    shared.fail.send_replace(mode);
                    json_response(StatusCode::OK, &json!({"ok": true}))
                }
                None => json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "body must be {\"mode\": \"none|error500|error429|error500-inference|hang|close-mid-stream|refuse\"}"}),
                ),
            }
        }
        _ => text_response(StatusCode::NOT_FOUND, "404 page not found"),
    }
}
