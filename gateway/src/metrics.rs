//! Prometheus metrics (`llm_gateway_*`) in the process-wide default registry, which the audit
//! filter also uses, recorded once per request at the end of `logging`.

use std::collections::HashSet;
use std::sync::RwLock;

use gateway_filter::{Decision, Principal, RequestCtx};
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
    pub backend_in_flight: IntGaugeVec,
    pub retries: IntCounterVec,
    /// Attempts abandoned because no response byte came within the first-byte deadline.
    pub first_byte_timeouts: IntCounterVec,
    pub in_flight: IntGauge,
    /// Client connections open now, by listener.
    pub connections: IntGaugeVec,
    /// Client connections closed at once because a cap was reached, by listener and cap.
    pub connections_refused: IntCounterVec,
    /// Whether requests are labelled by principal (`metrics.principal_label`).
    principal_label: bool,
    models: LabelSlots,
    /// Principals named by an identity provider, a validator or a proxy (see
    /// [`Metrics::principal_label`]).
    principals: LabelSlots,
}

/// Label values taken so far, at most `max`: a value seen is used as it is, a new one takes a
/// slot while there is room, and beyond that the caller's catch-all stands in.
struct LabelSlots {
    max: usize,
    seen: RwLock<HashSet<String>>,
}

impl LabelSlots {
    fn new(max: usize) -> LabelSlots {
        LabelSlots {
            max,
            seen: RwLock::new(HashSet::new()),
        }
    }

    /// `value` when it was seen, or is new, `admit`ted and finds room; else `None`.
    fn take<'a>(&self, value: &'a str, admit: bool) -> Option<&'a str> {
        match self.seen.read() {
            Ok(s) if s.contains(value) => return Some(value),
            // Full: no write lock for every request of an unseen value.
            Ok(s) if !admit || s.len() >= self.max => return None,
            _ => {}
        }
        match self.seen.write() {
            Ok(s) if s.contains(value) => Some(value),
            Ok(mut s) if s.len() < self.max => {
                s.insert(value.to_string());
                Some(value)
            }
            _ => None,
        }
    }
}

/// What bounds the label values of the request and token counters (`metrics:` in the config).
#[derive(Debug, Clone, Copy)]
pub struct LabelLimits {
    /// Label with the principal's id (else `any`).
    pub principal_label: bool,
    /// Distinct model names; later ones count as `other`.
    pub max_models: usize,
    /// Distinct principals not from the keys file or htpasswd; later ones count as `other`.
    pub max_principals: usize,
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
    pub fn new(r: &Registry, labels: LabelLimits) -> prometheus::Result<Metrics> {
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
            auth_failures: counter(
                r,
                "llm_gateway_auth_failures_total",
                "Failed authentications by reason",
                &["reason"],
            )?,
            ratelimited: counter(
                r,
                "llm_gateway_ratelimited_total",
                "Requests refused by a rate limit, by limit",
                &["limit"],
            )?,
            backend_up: gauge(
                r,
                "llm_gateway_backend_up",
                "1 when the backend is considered up",
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
            models: LabelSlots::new(labels.max_models),
            principals: LabelSlots::new(labels.max_principals),
            principal_label: labels.principal_label,
        })
    }

    /// Per-backend series start at 0, so dashboards and alerts see them before anything happens.
    pub fn init_backends<'a>(&self, names: impl Iterator<Item = &'a str>) {
        for n in names {
            self.retries.with_label_values(&[n]);
            self.first_byte_timeouts.with_label_values(&[n]);
            self.backend_in_flight.with_label_values(&[n]);
            self.backend_up.with_label_values(&[n]).set(1);
            self.upstream_duration.with_label_values(&[n]);
        }
    }

    /// The model label: a name already seen, or a new one a backend served (`admit`) while
    /// fewer than `max_models` names were seen; else `other`. Names only refused (a model list,
    /// a limit) or unknown to every backend take no slot: any key could otherwise use up the
    /// slots with made-up names, and every real model not yet seen would count as `other`.
    fn model_label<'a>(&self, model: Option<&'a str>, admit: bool) -> &'a str {
        let Some(m) = model else { return "none" };
        self.models.take(m, admit).unwrap_or("other")
    }

    /// The principal label: `any` when principals are not labelled, `anonymous` without
    /// one. Ids the keys file or htpasswd lists are as many as the operator wrote, and are
    /// used as they are, however the principal authenticated; ids an identity provider, a
    /// validator or a proxy names are as many as the outside source has users, so each takes
    /// a slot, while fewer than `max_principals` were seen, and counts as `other` after.
    fn principal_label<'a>(&self, p: Option<&'a Principal>) -> &'a str {
        if !self.principal_label {
            return "any";
        }
        let Some(p) = p else {
            return gateway_filter::ANONYMOUS;
        };
        if p.listed {
            return &p.id;
        }
        self.principals.take(&p.id, true).unwrap_or("other")
    }

    pub fn observe(&self, ctx: &RequestCtx) {
        let route = ctx.route.as_str();
        let served = ctx.reached_backend && (200..400).contains(&ctx.status);
        let model = self.model_label(ctx.model.as_deref(), served);
        let principal = self.principal_label(ctx.principal.as_deref());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Metrics with two label slots for models and two for outside principals.
    fn two_slots() -> Metrics {
        Metrics::new(
            &Registry::new(),
            LabelLimits {
                principal_label: true,
                max_models: 2,
                max_principals: 2,
            },
        )
        .unwrap()
    }

    /// Model label slots go to names a backend served; made-up names that are refused or
    /// unknown never use them up (attacker review, 2026-12-04).
    #[test]
    fn only_served_models_take_a_label_slot() {
        let m = two_slots();
        for i in 0..100 {
            let junk = format!("junk-{i}");
            assert_eq!(m.model_label(Some(&junk), false), "other");
        }
        assert_eq!(m.model_label(Some("llama3.1:8b"), true), "llama3.1:8b");
        assert_eq!(
            m.model_label(Some("llama3.1:8b"), false),
            "llama3.1:8b",
            "seen once served, named also when refused"
        );
        assert_eq!(m.model_label(Some("qwen2.5:7b"), true), "qwen2.5:7b");
        assert_eq!(m.model_label(Some("mistral:7b"), true), "other", "full");
        assert_eq!(m.model_label(None, true), "none");
    }

    /// Principals named from outside (a JWT's subject, a validator's answer, a proxy's
    /// header) take label slots, bounded; those the keys file or htpasswd lists are always
    /// named.
    #[test]
    fn principals_from_outside_take_bounded_label_slots() {
        let m = two_slots();
        let p = |id: &str, method: &'static str, listed: bool| Principal {
            id: id.to_string(),
            method,
            listed,
            ..Principal::default()
        };
        let subjects: Vec<Principal> = (0..5)
            .map(|i| p(&format!("user-{i}"), "jwt", false))
            .collect();
        let labels: Vec<&str> = subjects
            .iter()
            .map(|s| m.principal_label(Some(s)))
            .collect();
        assert_eq!(labels, ["user-0", "user-1", "other", "other", "other"]);
        assert_eq!(
            m.principal_label(Some(&subjects[0])),
            "user-0",
            "kept once seen"
        );
        // Listed in the keys file: named, however it authenticated.
        for (i, method) in ["api_key", "jwt", "forward", "proxy", "mtls"]
            .into_iter()
            .enumerate()
        {
            let key = p(&format!("key-{i}"), method, true);
            assert_eq!(m.principal_label(Some(&key)), key.id);
        }
        assert_eq!(m.principal_label(None), gateway_filter::ANONYMOUS);
    }
}
