//! OpenTelemetry export through the real binary: spans received by an OTLP/HTTP receiver
//! (and a gRPC one) written here, decoded from protobuf and checked attribute by attribute;
//! `traceparent` honoured from the client and sent on to the backend; a collector that is
//! down costs requests nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode, Span};
use prost::Message;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// One export as received: its headers and its spans.
type Export = (HashMap<String, String>, ExportTraceServiceRequest);

/// What a collector received: every export, with the headers it came with, and what was
/// wrong with any request (checked by the test, not in the collector's task).
#[derive(Clone, Default)]
struct Received {
    exports: Arc<Mutex<Vec<Export>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Received {
    fn spans(&self) -> Vec<Span> {
        self.exports
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, r)| r.resource_spans.iter())
            .flat_map(|rs| rs.scope_spans.iter())
            .flat_map(|ss| ss.spans.iter().cloned())
            .collect()
    }

    /// Waits until a span of the trace `trace_id` (32 hex) arrives.
    async fn span_of(&self, trace_id: &str) -> Span {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(s) = self
                .spans()
                .into_iter()
                .find(|s| hex(&s.trace_id) == trace_id)
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "no span of trace {trace_id}; got {:?}; collector errors: {:?}",
            self.spans(),
            self.errors.lock().unwrap()
        );
    }

    fn assert_no_errors(&self) {
        let errors = self.errors.lock().unwrap();
        assert!(errors.is_empty(), "{errors:?}");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value)
}

fn text(span: &Span, key: &str) -> String {
    match attr(span, key) {
        Some(AnyValue::StringValue(s)) => s,
        other => panic!("{key}: {other:?} in {span:?}"),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(AnyValue::IntValue(i)) => i,
        other => panic!("{key}: {other:?} in {span:?}"),
    }
}

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf) on a real port; over TLS with
/// `tls`. Returns its base URL (`https://localhost:PORT` with TLS).
async fn http_collector(tls: Option<tokio_rustls::TlsAcceptor>) -> (String, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = match tls {
        Some(_) => format!("https://localhost:{port}"),
        None => format!("http://127.0.0.1:{port}"),
    };
    let got = Received::default();
    let store = got.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let store = store.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => match acceptor.accept(s).await {
                        Ok(s) => serve_otlp_http(s, store).await,
                        Err(e) => store.errors.lock().unwrap().push(format!("TLS: {e}")),
                    },
                    None => serve_otlp_http(s, store).await,
                }
            });
        }
    });
    (url, got)
}

async fn serve_otlp_http<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    store: Received,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default().to_string();
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < end + 4 + len {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[end + 4..end + 4 + len].to_vec();
        buf.drain(..end + 4 + len);
        if request_line != "POST /v1/traces HTTP/1.1"
            || headers.get("content-type").map(String::as_str) != Some("application/x-protobuf")
        {
            store
                .errors
                .lock()
                .unwrap()
                .push(format!("{request_line} {headers:?}"));
        }
        match ExportTraceServiceRequest::decode(body.as_slice()) {
            Ok(req) => store.exports.lock().unwrap().push((headers, req)),
            Err(e) => store.errors.lock().unwrap().push(format!("protobuf: {e}")),
        }
        let answer = ExportTraceServiceResponse::default().encode_to_vec();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
            answer.len()
        );
        if s.write_all(head.as_bytes()).await.is_err() || s.write_all(&answer).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_reach_an_otlp_http_collector_with_genai_attributes() {
    let m = mock().await;
    let (collector, got) = http_collector(None).await;
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n  - use: policy\ntelemetry:\n  service_name: gw-under-test\n  otlp:\n    endpoint: {collector}\n    headers: {{ authorization: 'Basic cGs6c2s=' }}\n",
        backends(&[("local", &m.url())]),
        conf("keys.yaml")
    ))
    .await;
    let c = client();

    // A client in a sampled trace: the gateway's span joins it, and the backend is told
    // that the gateway's span is its parent.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(DEMO_KEY)
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .json(&json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "a secret prompt"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let seen = m.requests().into_iter().last().unwrap();
    let sent = seen
        .headers
        .iter()
        .find(|(k, _)| k == "traceparent")
        .map(|(_, v)| v.clone())
        .expect("the backend gets a traceparent");
    let span = got.span_of(trace).await;
    assert_eq!(sent, format!("00-{trace}-{}-01", hex(&span.span_id)));
    assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(span.name, "chat llama3.1:8b");
    assert_eq!(text(&span, "gen_ai.operation.name"), "chat");
    assert_eq!(text(&span, "gen_ai.provider.name"), "openai");
    assert_eq!(text(&span, "gen_ai.request.model"), "llama3.1:8b");
    assert!(int(&span, "gen_ai.usage.input_tokens") > 0);
    assert!(int(&span, "gen_ai.usage.output_tokens") > 0);
    match attr(&span, "gen_ai.response.finish_reasons") {
        Some(AnyValue::ArrayValue(a)) => {
            let reasons: Vec<_> = a.values.into_iter().filter_map(|v| v.value).collect();
            assert_eq!(reasons, [AnyValue::StringValue("stop".into())]);
        }
        other => panic!("finish reasons: {other:?}"),
    }
    assert_eq!(text(&span, "llm_gateway.principal"), "demo");
    assert_eq!(text(&span, "llm_gateway.decision"), "allowed");
    assert_eq!(text(&span, "llm_gateway.backend"), "local");
    assert_eq!(text(&span, "llm_gateway.request_id"), request_id);
    assert_eq!(int(&span, "llm_gateway.retries"), 0);
    assert_eq!(int(&span, "http.response.status_code"), 200);
    assert!(span.end_time_unix_nano > span.start_time_unix_nano);
    // Neither the prompt nor the key is in the span, in any attribute.
    let all = format!("{span:?}");
    assert!(
        !all.contains("a secret prompt") && !all.contains(DEMO_KEY),
        "{all}"
    );
    assert_eq!(attr(&span, "gen_ai.prompt"), None);

    // A stream on Ollama's API: usage and done_reason read from the NDJSON stream.
    let trace2 = "0af7651916cd43dd8448eb211c80319c";
    let resp = c
        .post(gw.url("/api/chat"))
        .bearer_auth(DEMO_KEY)
        .header("traceparent", format!("00-{trace2}-b7ad6b7169203331-01"))
        .json(&json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    let span = got.span_of(trace2).await;
    assert_eq!(text(&span, "gen_ai.provider.name"), "ollama");
    assert!(int(&span, "gen_ai.usage.output_tokens") > 0);
    assert_eq!(
        attr(&span, "llm_gateway.stream"),
        Some(AnyValue::BoolValue(true))
    );

    // A refused request is a span too: who was refused and why, no principal, not an error
    // of the server.
    let trace3 = "11111111111111111111111111111111";
    let resp = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("sk-wrong")
        .header("traceparent", format!("00-{trace3}-2222222222222222-01"))
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let span = got.span_of(trace3).await;
    assert_eq!(int(&span, "http.response.status_code"), 401);
    assert!(text(&span, "llm_gateway.decision").starts_with("auth:"));
    assert_eq!(attr(&span, "llm_gateway.principal"), None);
    assert_ne!(
        span.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );

    // A client that does not sample: no span, and the backend is told so.
    let trace4 = "33333333333333333333333333333333";
    let resp = c
        .post(gw.url("/api/chat"))
        .bearer_auth(DEMO_KEY)
        .header("traceparent", format!("00-{trace4}-4444444444444444-00"))
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sent = m.requests().into_iter().last().unwrap().headers;
    let sent = &sent.iter().find(|(k, _)| k == "traceparent").unwrap().1;
    assert!(
        sent.starts_with(&format!("00-{trace4}-")) && sent.ends_with("-00"),
        "{sent}"
    );
    // A request without traceparent starts a trace of its own (sampled: `sample` is 1).
    let resp = c
        .get(gw.url("/api/tags"))
        .bearer_auth(DEMO_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sent = m.requests().into_iter().last().unwrap().headers;
    let own = sent
        .iter()
        .find(|(k, _)| k == "traceparent")
        .unwrap()
        .1
        .clone();
    let span = got.span_of(&own[3..35]).await;
    assert_eq!(span.name, "GET /api/tags");
    assert!(span.parent_span_id.is_empty(), "a root span");
    assert!(
        !got.spans().iter().any(|s| hex(&s.trace_id) == trace4),
        "an unsampled trace was exported"
    );

    // Every export carried the configured header and named the service.
    got.assert_no_errors();
    let exports = got.exports.lock().unwrap();
    for (headers, req) in exports.iter() {
        assert_eq!(headers["authorization"], "Basic cGs6c2s=");
        let resource = req.resource_spans[0].resource.as_ref().unwrap();
        let service = resource
            .attributes
            .iter()
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.clone())
            .and_then(|v| v.value);
        assert_eq!(service, Some(AnyValue::StringValue("gw-under-test".into())));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prompts_are_exported_only_when_the_audit_captures_them() {
    let m = mock().await;
    let (collector, got) = http_collector(None).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&format!(
        "{}filters:\n  - use: auth\n    keys_file: {}\n  - use: audit\n    file: {}/audit.jsonl\n    capture: {{ prompts: true }}\ntelemetry:\n  otlp: {{ endpoint: '{collector}/v1/traces' }}\n",
        backends(&[("local", &m.url())]),
        conf("keys.yaml"),
        dir.path().display()
    ))
    .await;
    let trace = "55555555555555555555555555555555";
    let resp = client()
        .post(gw.url("/api/generate"))
        .bearer_auth(DEMO_KEY)
        .header("traceparent", format!("00-{trace}-6666666666666666-01"))
        .json(&json!({"model": "llama3.1:8b", "prompt": "captured on purpose", "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let span = got.span_of(trace).await;
    assert_eq!(text(&span, "gen_ai.operation.name"), "text_completion");
    assert_eq!(text(&span, "gen_ai.prompt"), "[\"captured on purpose\"]");
}

/// A gRPC collector (OTLP's `TraceService`) built with tonic.
#[derive(Clone, Default)]
struct GrpcCollector(Received);

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect();
        self.0
            .exports
            .lock()
            .unwrap()
            .push((headers, request.into_inner()));
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Spans reach a gRPC collector, in plain text and over TLS with a private CA (`ca_file`);
/// without the CA the TLS collector is not trusted and gets nothing.
#[tokio::test(flavor = "multi_thread")]
async fn spans_reach_a_grpc_collector() {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = crate::support::certs::make(dir.path());
    let identity = tonic::transport::Identity::from_pem(
        std::fs::read(&pki.server_cert).unwrap(),
        std::fs::read(&pki.server_key).unwrap(),
    );
    for tls in [false, true] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let collector = GrpcCollector::default();
        let got = collector.0.clone();
        let mut server = tonic::transport::Server::builder();
        if tls {
            server = server
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity.clone()))
                .unwrap();
        }
        tokio::spawn(
            server
                .add_service(TraceServiceServer::new(collector))
                .serve_with_incoming(tokio_stream_of(listener)),
        );
        let endpoint = if tls {
            format!("https://localhost:{port}")
        } else {
            format!("http://127.0.0.1:{port}")
        };
        let ca = if tls {
            format!(", ca_file: '{}'", pki.ca.display())
        } else {
            String::new()
        };
        let gw = Gateway::start(&format!(
            "{}telemetry:\n  otlp: {{ endpoint: '{endpoint}', protocol: grpc, headers: {{ x-team: gpu-lab }}{ca} }}\n",
            backends(&[("local", &m.url())]),
        ))
        .await;
        let trace = if tls {
            "77777777777777777777777777777778"
        } else {
            "77777777777777777777777777777777"
        };
        let resp = client()
            .post(gw.url("/api/embed"))
            .header("traceparent", format!("00-{trace}-8888888888888888-01"))
            .json(&json!({"model": "llama3.1:8b", "input": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let span = got.span_of(trace).await;
        assert_eq!(text(&span, "gen_ai.operation.name"), "embeddings");
        // Counted once the collector's answer is in.
        let mut exported = None;
        for _ in 0..50 {
            exported = gw
                .metric("llm_gateway_telemetry_spans_total{outcome=\"exported\"}")
                .await;
            if exported == Some(1.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(exported, Some(1.0));
        let exports = got.exports.lock().unwrap();
        assert_eq!(exports[0].0["x-team"], "gpu-lab");
    }
}

/// OTLP/HTTP over TLS: a collector behind a private CA is trusted through `ca_file` only;
/// without it nothing is exported, the failure is logged once and counted.
#[tokio::test(flavor = "multi_thread")]
async fn spans_reach_an_https_collector_trusted_through_ca_file() {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = crate::support::certs::make(dir.path());
    let (collector, got) = http_collector(Some(crate::support::certs::server_acceptor(&pki))).await;
    for trusted in [true, false] {
        let ca = if trusted {
            format!(", ca_file: '{}'", pki.ca.display())
        } else {
            String::new()
        };
        let gw = Gateway::start(&format!(
            "{}telemetry:\n  otlp: {{ endpoint: '{collector}'{ca} }}\n",
            backends(&[("local", &m.url())]),
        ))
        .await;
        let trace = if trusted {
            "99999999999999999999999999999990"
        } else {
            "99999999999999999999999999999991"
        };
        for _ in 0..2 {
            let resp = client()
                .post(gw.url("/api/chat"))
                .header("traceparent", format!("00-{trace}-1212121212121212-01"))
                .json(&chat())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
        if trusted {
            got.span_of(trace).await;
            continue;
        }
        // Not trusted: the export fails, is counted, and said once in the log.
        let mut failed = None;
        for _ in 0..100 {
            failed = gw
                .metric("llm_gateway_telemetry_spans_total{outcome=\"failed\"}")
                .await;
            if failed.is_some_and(|f| f >= 1.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(failed.is_some_and(|f| f >= 1.0), "{failed:?}\n{}", gw.log());
        assert_eq!(
            gw.log().matches("telemetry: export to").count(),
            1,
            "{}",
            gw.log()
        );
        assert!(!got.spans().iter().any(|s| hex(&s.trace_id) == trace));
    }
}

/// The accepted connections of `listener` as the stream tonic serves.
fn tokio_stream_of(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| s);
        Some((next, l))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_is_down_costs_requests_nothing() {
    let m = mock().await;
    // A port nothing listens on, and one that accepts and never answers.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    for (endpoint, silent) in [(closed, false), (silent_url, true)] {
        let gw = Gateway::start(&format!(
            "{}telemetry:\n  otlp: {{ endpoint: '{endpoint}', timeout: 30s, queue: 16 }}\n",
            backends(&[("local", &m.url())]),
        ))
        .await;
        let c = client();
        let mut slowest = Duration::ZERO;
        // More spans than the queue holds, for longer than one export interval.
        for _ in 0..60 {
            let t = Instant::now();
            let resp = c
                .post(gw.url("/api/chat"))
                .json(&chat())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            resp.bytes().await.unwrap();
            slowest = slowest.max(t.elapsed());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            slowest < Duration::from_millis(500),
            "{endpoint}: a request took {slowest:?}"
        );
        let health = gw.health().await;
        assert_eq!(health["status"], "ok", "{health}");
        let outcome = |o: &'static str| {
            let gw = &gw;
            async move {
                gw.metric(&format!(
                    "llm_gateway_telemetry_spans_total{{outcome=\"{o}\"}}"
                ))
                .await
                .unwrap_or(0.0)
            }
        };
        if silent {
            // It was asked (the exporter works), never answered: the queue filled up and
            // the rest was dropped, counted.
            assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1);
            assert!(
                outcome("dropped").await >= 30.0,
                "{}",
                outcome("dropped").await
            );
        } else {
            assert!(outcome("failed").await >= 1.0, "{}", gw.log());
            assert!(gw.log().contains("telemetry: export to"), "{}", gw.log());
        }
        assert_eq!(outcome("exported").await, 0.0);
    }
}

/// What the backend is told: a client's invalid `traceparent` is replaced by a new trace
/// (and its `tracestate` dropped); with `trust_traceparent: false` even a valid one is; with
/// `sample: 0` nothing is exported, but the backend still learns the trace (unsampled).
#[tokio::test(flavor = "multi_thread")]
async fn the_backend_gets_the_gateways_trace_context() {
    let m = mock().await;
    let (collector, got) = http_collector(None).await;
    let sent = |m: &mock_ollama::MockServer, name: &str| {
        m.requests()
            .into_iter()
            .last()
            .unwrap()
            .headers
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    };
    let gw = Gateway::start(&format!(
        "{}telemetry:\n  otlp: {{ endpoint: '{collector}' }}\n",
        backends(&[("local", &m.url())]),
    ))
    .await;
    let c = client();
    let ask = |traceparent: &'static str| {
        c.post(gw.url("/api/chat"))
            .header("traceparent", traceparent)
            .header("tracestate", "vendor=abc")
            .json(&chat())
            .send()
    };
    // Uppercase hex is invalid: a new trace, sampled by ratio (1.0), no foreign tracestate.
    assert_eq!(
        ask("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01")
            .await
            .unwrap()
            .status(),
        200
    );
    let tp = sent(&m, "traceparent").unwrap();
    assert!(
        !tp.contains("4bf92f3577b34da6a3ce929d0e0e4736") && tp.ends_with("-01"),
        "{tp}"
    );
    assert_eq!(sent(&m, "tracestate"), None);
    let span = got.span_of(&tp[3..35]).await;
    assert!(span.parent_span_id.is_empty());
    // A valid one is joined and its tracestate passes.
    ask("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .await
        .unwrap();
    let tp = sent(&m, "traceparent").unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert_eq!(sent(&m, "tracestate").as_deref(), Some("vendor=abc"));
    drop(gw);

    let gw = Gateway::start(&format!(
        "{}telemetry:\n  otlp: {{ endpoint: '{collector}', sample: 0, trust_traceparent: false }}\n",
        backends(&[("local", &m.url())]),
    ))
    .await;
    for _ in 0..5 {
        let resp = client()
            .post(gw.url("/api/chat"))
            .header(
                "traceparent",
                "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .json(&chat())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let tp = sent(&m, "traceparent").unwrap();
        assert!(
            !tp.contains("5bf92f3577b34da6a3ce929d0e0e4736") && tp.ends_with("-00"),
            "{tp}"
        );
    }
    // Longer than the export interval: nothing was sampled, nothing is exported.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!got
        .spans()
        .iter()
        .any(|s| hex(&s.trace_id) == "5bf92f3577b34da6a3ce929d0e0e4736"));
    assert_eq!(
        gw.metric("llm_gateway_telemetry_spans_total{outcome=\"exported\"}")
            .await,
        Some(0.0)
    );
    got.assert_no_errors();
}
