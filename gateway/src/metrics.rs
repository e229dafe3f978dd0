//! Prometheus metrics (`llm_gateway_*`) in the process-wide default registry, which the audit
//! filter also uses, recorded once per request at the end of `logging`.

use std::sync::Arc;

use gateway_filter::labels::MetricLabels;
use gateway_filter::{Decision, RequestCtx};
use prometheus::{
    exponential_buckets, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

pub struct Metrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    ttfb: HistogramVec,
    pub upstream_duration: HistogramVec,
    tokens: IntCounterVec,
    rejections: IntCounterVec,
    auth_failures: IntCounterVec,
    ratelimited: IntCounterVec,
    pub backend_up: IntGaugeVec,
    pub backend_standby: IntGaugeVec,
    pub backend_in_flight: IntGaugeVec,
    pub retries: IntCounterVec,
    /// Attempts abandoned because no response byte came within the first-byte deadline.
    pub first_byte_timeouts: IntCounterVec,
    /// SIGHUP reloads by result (`ok`, `failed`: a file kept its previous contents).
    pub reloads: IntCounterVec,
    pub in_flight: IntGauge,
    /// Client connections open now, by listener.
    pub connections: IntGaugeVec,
    /// Client connections closed at once because a cap was reached, by listener and cap.
    pub connections_refused: IntCounterVec,
    /// Model and principal label values, shared with the filters' metrics.
    labels: Arc<MetricLabels>,
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// [`counter`] with a series for each of `at_zero` (values of its one label) from the start:
/// an alert on `increase`/`rate` misses the first events of a series born at them.
fn counter_at_zero(
    r: &Registry,
    name: &str,
    help: &str,
    label: &str,
    at_zero: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = counter(r, name, help, &[label])?;
    for value in at_zero {
        c.with_label_values(&[value]);
    }
    Ok(c)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<HistogramVec> {
    // 1 ms … ~65 s: from cached answers to long generations.
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(exponential_buckets(0.001, 2.0, 17)?),
        labels,
    )?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    pub fn new(r: &Registry, labels: Arc<MetricLabels>) -> prometheus::Result<Metrics> {
        let in_flight = IntGauge::new("llm_gateway_in_flight_requests", "Requests being served")?;
        r.register(Box::new(in_flight.clone()))?;
        let build = gauge(
            r,
            "llm_gateway_build_info",
            "Build information",
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Ok(Metrics {
            requests: counter(
                r,
                "llm_gateway_requests_total",
                "Requests by route, model, status and principal",
                &["route", "model", "status", "principal"],
            )?,
            duration: histogram(
                r,
                "llm_gateway_request_duration_seconds",
                "Time from request to the end of the response",
                &["route", "model"],
            )?,
            ttfb: histogram(
                r,
                "llm_gateway_time_to_first_byte_seconds",
                "Time from request to the first response byte",
                &["route"],
            )?,
            upstream_duration: histogram(
                r,
                "llm_gateway_upstream_duration_seconds",
                "Time spent with a backend",
                &["backend"],
            )?,
            tokens: counter(
                r,
                "llm_gateway_tokens_total",
                "Tokens reported by backends",
                &["model", "principal", "kind"],
            )?,
            rejections: counter(
                r,
                "llm_gateway_rejections_total",
                "Requests refused, by filter (or gateway) and code",
                &["filter", "code"],
            )?,
            // LlmGatewayLockouts reads the increase of `locked_out`.
            auth_failures: counter_at_zero(
                r,
                "llm_gateway_auth_failures_total",
                "Failed authentications by reason",
                "reason",
                &["locked_out"],
            )?,
            // Its limits are a fixed few (LlmGatewayClientHammering reads the rate).
            ratelimited: counter_at_zero(
                r,
                "llm_gateway_ratelimited_total",
                "Requests refused by a rate limit, by limit",
                "limit",
                &[
                    "request_rate",
                    "concurrency",
                    "tokens_per_minute",
                    "tokens_unenforceable",
                ],
            )?,
            backend_up: gauge(
                r,
                "llm_gateway_backend_up",
                "1 when the backend is considered up",
                &["backend"],
            )?,
            backend_standby: gauge(
                r,
                "llm_gateway_backend_standby",
                "1 when the backend is out on failures its requests may have caused and still takes what no backend up can",
                &["backend"],
            )?,
            backend_in_flight: gauge(
                r,
                "llm_gateway_backend_in_flight",
                "Requests being served by the backend",
                &["backend"],
            )?,
            retries: counter(
                r,
                "llm_gateway_retries_total",
                "Attempts moved away from a backend",
                &["backend"],
            )?,
            first_byte_timeouts: counter(
                r,
                "llm_gateway_first_byte_timeouts_total",
                "Attempts abandoned because no response byte came within the first-byte deadline",
                &["backend"],
            )?,
            // LlmGatewayReloadFailed reads the increase of `failed`.
            reloads: counter_at_zero(
                r,
                "llm_gateway_reloads_total",
                "SIGHUP reloads of the filters' files, by result (failed: a broken file kept its previous contents)",
                "result",
                &["ok", "failed"],
            )?,
            connections: gauge(
                r,
                "llm_gateway_connections_open",
                "Client connections open now",
                &["listener"],
            )?,
            connections_refused: counter(
                r,
                "llm_gateway_connections_refused_total",
                "Client connections closed at once because a cap was reached",
                &["listener", "cap"],
            )?,
            in_flight,
            labels,
        })
    }

    /// Per-backend series start at 0, so dashboards and alerts see them before anything happens.
    pub fn init_backends<'a>(&self, names: impl Iterator<Item = &'a str>) {
        for n in names {
            self.retries.with_label_values(&[n]);
            self.first_byte_timeouts.with_label_values(&[n]);
            self.backend_in_flight.with_label_values(&[n]);
            self.backend_up.with_label_values(&[n]).set(1);
            self.backend_standby.with_label_values(&[n]).set(0);
            self.upstream_duration.with_label_values(&[n]);
        }
    }

    pub fn observe(&self, ctx: &RequestCtx) {
        let route = ctx.route.as_str();
        let served = ctx.reached_backend && (200..400).contains(&ctx.status);
        let model = self.labels.model(ctx.model.as_deref(), served);
        let principal = self.labels.principal(ctx.principal.as_deref());
        let status = ctx.status.to_string();
        self.requests
            .with_label_values(&[route, model, &status, principal])
            .inc();
        if let Some(d) = ctx.duration {
            self.duration
                .with_label_values(&[route, model])
                .observe(d.as_secs_f64());
        }
        if let Some(t) = ctx.ttfb {
            self.ttfb
                .with_label_values(&[route])
                .observe(t.as_secs_f64());
        }
        if let Some(u) = ctx.usage {
            self.tokens
                .with_label_values(&[model, principal, "prompt"])
                .inc_by(u.prompt_tokens);
            self.tokens
                .with_label_values(&[model, principal, "completion"])
                .inc_by(u.completion_tokens);
        }
        match &ctx.decision {
            Decision::Allowed => {}
            Decision::Rejected { filter, code } => {
                self.rejections.with_label_values(&[filter, code]).inc();
                let reason = ctx.reject_reason.unwrap_or("unknown");
                match *filter {
                    "auth" => self.auth_failures.with_label_values(&[reason]).inc(),
                    "ratelimit" => self.ratelimited.with_label_values(&[reason]).inc(),
                    _ => {}
                }
            }
            Decision::Failed { code } => {
                self.rejections.with_label_values(&["gateway", code]).inc()
            }
        }
    }
}
