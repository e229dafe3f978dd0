//! The OTLP exporter and the thread it runs on. The batch processor's own thread collects
//! finished spans and calls the exporter; the exporter's network work (reqwest for
//! OTLP/HTTP, tonic for gRPC) runs on a one-thread Tokio runtime of its own, never on the
//! proxy's threads.

use std::collections::HashMap;

use bytes::Bytes;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{
    Protocol, SpanExporter, WithExportConfig, WithHttpConfig, WithTonicConfig,
};

use crate::config::{OtlpProtocol, TelemetrySpec};

/// Largest collector answer read (they are a few bytes: a partial-success message at most).
const MAX_ANSWER: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot start the telemetry export thread: {0}")]
    Runtime(std::io::Error),
    #[error("cannot build the OTLP HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("telemetry.otlp: {0}")]
    Exporter(opentelemetry_otlp::ExporterBuildError),
    #[error("telemetry.otlp.headers: `{0}` cannot be sent as gRPC metadata")]
    Metadata(String),
}

/// The exporter for `spec`, and the runtime its network work runs on (kept for the life of
/// the process).
pub fn build(spec: &TelemetrySpec) -> Result<(SpanExporter, tokio::runtime::Runtime), ExportError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otel-export")
        .enable_all()
        .build()
        .map_err(ExportError::Runtime)?;
    let exporter = match spec.protocol {
        OtlpProtocol::HttpProtobuf => {
            let client = reqwest::Client::builder()
                .timeout(spec.timeout)
                .build()
                .map_err(ExportError::Client)?;
            let headers: HashMap<String, String> = spec.headers.iter().cloned().collect();
            SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(&spec.endpoint)
                .with_timeout(spec.timeout)
                .with_headers(headers)
                .with_http_client(OnRuntime {
                    client,
                    rt: rt.handle().clone(),
                })
                .build()
        }
        OtlpProtocol::Grpc => {
            let mut map = http::HeaderMap::new();
            for (k, v) in &spec.headers {
                let name = http::HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| ExportError::Metadata(k.clone()))?;
                let value =
                    http::HeaderValue::from_str(v).map_err(|_| ExportError::Metadata(k.clone()))?;
                map.append(name, value);
            }
            // tonic's channel spawns its connection onto the runtime it is built in.
            let _in_rt = rt.enter();
            SpanExporter::builder()
                .with_tonic()
                .with_endpoint(&spec.endpoint)
                .with_timeout(spec.timeout)
                .with_metadata(
                    opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(map),
                )
                .build()
        }
    }
    .map_err(ExportError::Exporter)?;
    Ok((exporter, rt))
}

/// reqwest run on the export runtime: the batch processor's thread waits on a plain join
/// handle, which needs no runtime of its own.
#[derive(Debug)]
struct OnRuntime {
    client: reqwest::Client,
    rt: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let task = self.rt.spawn(async move {
            let request = reqwest::Request::try_from(request)?;
            let mut answer = client.execute(request).await?;
            let mut out = Response::builder().status(answer.status());
            for (k, v) in answer.headers() {
                out = out.header(k, v);
            }
            let mut body = Vec::new();
            while let Some(chunk) = answer.chunk().await? {
                if body.len() + chunk.len() > MAX_ANSWER {
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, HttpError>(out.body(Bytes::from(body))?)
        });
        task.await?
    }
}
