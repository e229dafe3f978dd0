//! OpenTelemetry: one span per request, with the GenAI semantic conventions, exported over
//! OTLP in batches.
//!
//! The proxy's threads do two cheap things: at the start of a request they pick the span's
//! ids (honouring the client's `traceparent`) so the backend can be sent a `traceparent`
//! naming this span, and at the end they build the finished span and hand it to the batch
//! processor's bounded queue (a full queue drops the span; it never waits). The batch
//! processor's thread and the export runtime ([`export`]) do the rest.

mod attributes;
mod export;
pub mod traceparent;

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use gateway_filter::http::{HeaderMap, HeaderValue};
use gateway_filter::RequestCtx;
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, TraceFlags, TraceId, TraceState};
use opentelemetry::InstrumentationScope;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanEvents, SpanExporter, SpanLinks,
    SpanProcessor,
};

use crate::config::TelemetrySpec;
pub use export::ExportError;

/// The ids of one request's span, picked when the request starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Trace {
    pub trace_id: u128,
    pub span_id: u64,
    /// The client's span, when it sent a valid `traceparent`; 0 otherwise.
    pub parent: u64,
    pub sampled: bool,
}

impl Trace {
    /// Whether telemetry picked ids for this request.
    pub fn is_set(&self) -> bool {
        self.span_id != 0
    }

    /// The `traceparent` sent to the backend: this span is the backend's parent.
    pub fn header(&self) -> HeaderValue {
        traceparent::header(self.trace_id, self.span_id, self.sampled)
    }
}

pub struct Telemetry {
    processor: BatchSpanProcessor,
    stats: std::sync::Arc<export::Stats>,
    /// Spans waiting for export at most (`telemetry.otlp.queue`).
    queue: usize,
    /// How long the final export at exit may take.
    timeout: Duration,
    trust_traceparent: bool,
    scope: InstrumentationScope,
    /// Traces whose id falls below this bound are sampled (OpenTelemetry's
    /// `TraceIdRatioBased` rule, so every service sampling by ratio agrees).
    sample_bound: u64,
    capture_prompts: bool,
    /// The export runtime; dropped with the process.
    _runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Whether spans carry the prompt (`capture_prompts`): the request's JSON is read then.
    pub fn captures_prompts(&self) -> bool {
        self.capture_prompts
    }

    pub fn start(
        spec: &TelemetrySpec,
        registry: &prometheus::Registry,
    ) -> Result<Telemetry, ExportError> {
        let (inner, runtime) = export::build(spec)?;
        let stats = std::sync::Arc::new(export::Stats::new(spec, registry)?);
        let mut exporter = export::Counted {
            inner,
            stats: stats.clone(),
        };
        exporter.set_resource(
            &opentelemetry_sdk::Resource::builder_empty()
                .with_service_name(spec.service_name.clone())
                .build(),
        );
        let batch_size = spec.queue.min(512);
        // The bound is kept in `finish`, counted; the SDK's queue has room for one batch more
        // than that, so it never drops a span unseen.
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(spec.queue + batch_size)
            .with_max_export_batch_size(batch_size)
            .with_scheduled_delay(Duration::from_secs(1))
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        log::info!(
            "telemetry: exporting spans to {} ({:?}, sampling {})",
            spec.endpoint,
            spec.protocol,
            spec.sample
        );
        Ok(Telemetry {
            processor,
            stats,
            queue: spec.queue,
            timeout: spec.timeout,
            trust_traceparent: spec.trust_traceparent,
            scope: InstrumentationScope::builder("llm-gateway")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            sample_bound: (spec.sample.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64,
            capture_prompts: spec.capture_prompts,
            _runtime: runtime,
        })
    }

    /// The ids of a new request's span: in the client's trace when it sent a valid
    /// `traceparent` (whose sampled flag then decides), else in a new trace sampled by ratio.
    pub fn begin(&self, headers: &HeaderMap) -> Trace {
        let span_id = fastrand::u64(1..);
        let parent = if self.trust_traceparent {
            traceparent::from_headers(headers)
        } else {
            None
        };
        match parent {
            Some(p) => Trace {
                trace_id: p.trace_id,
                span_id,
                parent: p.span_id,
                sampled: p.sampled,
            },
            None => {
                let trace_id = fastrand::u128(1..);
                Trace {
                    trace_id,
                    span_id,
                    parent: 0,
                    sampled: ((trace_id as u64) >> 1) < self.sample_bound,
                }
            }
        }
    }

    /// Hands the finished request's span to the export queue (a full queue drops it,
    /// counted).
    pub fn finish(&self, trace: &Trace, req: &RequestCtx) {
        if !trace.is_set() || !trace.sampled {
            return;
        }
        if self.stats.pending.fetch_add(1, Ordering::AcqRel) >= self.queue {
            self.stats.pending.fetch_sub(1, Ordering::AcqRel);
            self.stats.dropped.inc();
            return;
        }
        // The request's own duration: end-of-request work (audit, ledger) is not part of it.
        let now = SystemTime::now();
        let start = now.checked_sub(req.started.elapsed()).unwrap_or(now);
        let end = req.duration.map_or(now, |d| start + d);
        let (name, attributes, status) = attributes::of(req, self.capture_prompts);
        self.processor.on_end(SpanData {
            span_context: SpanContext::new(
                TraceId::from(trace.trace_id),
                SpanId::from(trace.span_id),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: SpanId::from(trace.parent),
            parent_span_is_remote: trace.parent != 0,
            span_kind: SpanKind::Server,
            name: Cow::Owned(name),
            start_time: start,
            end_time: end,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        });
    }

    /// Exports what is queued and stops (at exit), waiting at most for the export timeout.
    pub fn shutdown(&self) -> OTelSdkResult {
        self.processor.shutdown_with_timeout(self.timeout)
    }
}
