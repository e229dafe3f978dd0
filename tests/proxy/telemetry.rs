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

/// What a collector received: every export, with the headers it came with.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Export>>>);

impl Received {
    fn spans(&self) -> Vec<Span> {
        self.0
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
        panic!("no span of trace {trace_id}; got {:?}", self.spans());
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

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf) on a real port.
async fn http_collector() -> (String, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let got = Received::default();
    let store = got.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
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
                    assert_eq!(request_line, "POST /v1/traces HTTP/1.1");
                    assert_eq!(headers["content-type"], "application/x-protobuf");
                    let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
                    store.0.lock().unwrap().push((headers, req));
                    let answer = ExportTraceServiceResponse::default().encode_to_vec();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
                        answer.len()
                    );
                    if s.write_all(head.as_bytes()).await.is_err()
                        || s.write_all(&answer).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, got)
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_reach_an_otlp_http_collector_with_genai_attributes() {
    let m = mock().await;
    let (collector, got) = http_collector().await;
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
    let exports = got.0.lock().unwrap();
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
    let (collector, got) = http_collector().await;
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
             .0
            .lock()
            .unwrap()
            .push((headers, request.into_inner()));
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_reach_a_grpc_collector() {
    let m = mock().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let collector = GrpcCollector::default();
    let got = collector.0.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming(tokio_stream_of(listener)),
    );
    let gw = Gateway::start(&format!(
        "{}telemetry:\n  otlp: {{ endpoint: 'http://{addr}', protocol: grpc, headers: {{ x-team: gpu-lab }} }}\n",
        backends(&[("local", &m.url())]),
    ))
    .await;
    let trace = "77777777777777777777777777777777";
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
    let exports = got.0.lock().unwrap();
    assert_eq!(exports[0].0["x-team"], "gpu-lab");
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
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    for endpoint in [closed, silent_url] {
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
    }
}
