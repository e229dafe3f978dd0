//! The OTLP exporter and the thread it runs on. The batch processor's own thread collects
//! finished spans and calls the exporter; the exporter's network work (reqwest for
//! OTLP/HTTP, tonic for gRPC) runs on a one-thread Tokio runtime of its own, never on the
//! proxy's threads. Every export is counted, and a failing collector is logged once per
//! change of state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
use opentelemetry_otlp::{
    Protocol, SpanExporter, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::SpanData;
use prometheus::IntCounter;

use crate::config::{OtlpProtocol, TelemetrySpec};

/// Largest collector answer read (they are a few bytes: a partial-success message at most).
const MAX_ANSWER: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot start the telemetry export thread: {0}")]
    Runtime(std::io::Error),
    #[error("cannot build the OTLP HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("{0}")]
    Exporter(opentelemetry_otlp::ExporterBuildError),
    #[error("headers: `{0}` cannot be sent as gRPC metadata")]
    Metadata(String),
    #[error("ca_file: {0}")]
    Ca(String),
    #[error("cannot register the telemetry metrics: {0}")]
    Metrics(prometheus::Error),
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
    let ca = spec
        .ca_file
        .as_ref()
        .map(|p| std::fs::read(p).map_err(|e| ExportError::Ca(format!("{}: {e}", p.display()))))
        .transpose()?;
    let exporter = match spec.protocol {
        OtlpProtocol::HttpProtobuf => {
            // No redirects: a collector (or whoever answers for it on `http://`) must not be
            // able to send the configured credentials elsewhere.
            let mut client = reqwest::Client::builder()
                .timeout(spec.timeout)
                .connect_timeout(spec.timeout)
                .redirect(reqwest::redirect::Policy::none());
            if let Some(pem) = &ca {
                let certs = reqwest::Certificate::from_pem_bundle(pem)
                    .map_err(|e| ExportError::Ca(format!("not PEM certificates ({e})")))?;
                if certs.is_empty() {
                    return Err(ExportError::Ca("no certificate in the file".into()));
                }
                for c in certs {
                    client = client.add_root_certificate(c);
                }
            }
            let client = client.build().map_err(ExportError::Client)?;
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
            let mut b = SpanExporter::builder()
                .with_tonic()
                .with_endpoint(&spec.endpoint)
                .with_timeout(spec.timeout)
                .with_metadata(
                    opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(map),
                );
            if spec.endpoint.starts_with("https://") {
                // tonic trusts no root unless told: the Mozilla roots, and the CA file.
                let mut tls = ClientTlsConfig::new().with_enabled_roots();
                if let Some(pem) = &ca {
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                b = b.with_tls_config(tls);
            }
            b.build()
        }
    }
    .map_err(ExportError::Exporter)?;
    Ok((exporter, rt))
}

/// Span counts: what waits for export (the queue's bound is enforced here, so the SDK's own
/// queue never drops silently), and what was exported, failed or dropped.
#[derive(Debug)]
pub struct Stats {
    pub pending: AtomicUsize,
    failing: AtomicBool,
    endpoint: String,
    pub exported: IntCounter,
    pub failed: IntCounter,
    pub dropped: IntCounter,
}

impl Stats {
    pub fn new(spec: &TelemetrySpec, r: &prometheus::Registry) -> Result<Stats, ExportError> {
        let spans = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "llm_gateway_telemetry_spans_total",
                "Spans by outcome: exported, failed (the collector refused or could not be reached), dropped (the export queue was full)",
            ),
            &["outcome"],
        )
        .map_err(ExportError::Metrics)?;
        r.register(Box::new(spans.clone()))
            .map_err(ExportError::Metrics)?;
        Ok(Stats {
            pending: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            endpoint: spec.endpoint.clone(),
            exported: spans.with_label_values(&["exported"]),
            failed: spans.with_label_values(&["failed"]),
            dropped: spans.with_label_values(&["dropped"]),
        })
    }
}

/// The exporter, counting what each batch came to.
#[derive(Debug)]
pub struct Counted {
    pub inner: SpanExporter,
    pub stats: Arc<Stats>,
}

impl opentelemetry_sdk::trace::SpanExporter for Counted {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let n = batch.len();
        let export = self.inner.export(batch);
        let stats = &self.stats;
        async move {
            let result = export.await;
            stats.pending.fetch_sub(n, Ordering::AcqRel);
            match &result {
                Ok(()) => {
                    stats.exported.inc_by(n as u64);
                    if stats.failing.swap(false, Ordering::AcqRel) {
                        log::info!("telemetry: exports to {} work again", stats.endpoint);
                    }
                }
                Err(e) => {
                    stats.failed.inc_by(n as u64);
                    if !stats.failing.swap(true, Ordering::AcqRel) {
                        log::warn!(
                            "telemetry: export to {} failed ({e}); spans are lost until it works (llm_gateway_telemetry_spans_total{{outcome=\"failed\"}})",
                            stats.endpoint
                        );
                    }
                }
            }
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
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
                    return Err(format!("collector answer larger than {MAX_ANSWER} bytes").into());
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, HttpError>(out.body(Bytes::from(body))?)
        });
        task.await?
    }
}
