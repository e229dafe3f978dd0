//! `telemetry:`: OpenTelemetry trace export (OTLP), read and validated.

use std::time::Duration;

use gateway_filter::units::HumanDuration;
use serde::Deserialize;

use super::settings::{FilterSpec, Invalid};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySection {
    pub otlp: Option<OtlpSection>,
    /// `service.name` of the exported spans.
    pub service_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpSection {
    /// The collector's base URL (`http://HOST:4318` for OTLP/HTTP, `http://HOST:4317` for
    /// gRPC); for OTLP/HTTP `/v1/traces` is added unless the URL already ends with it.
    pub endpoint: String,
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// Sent with every export (e.g. `Authorization` for Langfuse or Honeycomb).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Fraction of traces exported (by trace id); a client's `traceparent` decides for its
    /// own traces.
    pub sample: Option<f64>,
    /// How long one export may take.
    pub timeout: Option<HumanDuration>,
    /// Spans waiting for export at most; beyond it new spans are dropped (and counted).
    pub queue: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum OtlpProtocol {
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "grpc")]
    Grpc,
}

/// Validated `telemetry.otlp`.
#[derive(Debug, Clone)]
pub struct TelemetrySpec {
    /// Where spans are sent: for OTLP/HTTP the full `/v1/traces` URL.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub headers: Vec<(String, String)>,
    pub sample: f64,
    pub timeout: Duration,
    pub queue: usize,
    pub service_name: String,
    /// Prompt texts go into spans only when the audit filter captures them too
    /// (`audit.capture.prompts`): one switch for where prompts may be written.
    pub capture_prompts: bool,
}

pub fn build(
    t: TelemetrySection,
    filters: &[FilterSpec],
) -> Result<Option<TelemetrySpec>, Invalid> {
    let Some(o) = t.otlp else {
        if t.service_name.is_some() {
            return Err((
                "telemetry.service_name".into(),
                "has no effect without `telemetry.otlp: { endpoint: ... }`".into(),
            ));
        }
        return Ok(None);
    };
    let bad = |key: &str, msg: String| Err((format!("telemetry.otlp.{key}"), msg));
    let endpoint = o.endpoint.trim().trim_end_matches('/').to_string();
    let scheme_ok = endpoint.starts_with("http://") || endpoint.starts_with("https://");
    if !scheme_ok
        || endpoint
            .parse::<http::Uri>()
            .map_or(true, |u| u.host().is_none())
    {
        return bad(
            "endpoint",
            format!(
                "`{}` is not an http:// or https:// URL such as http://127.0.0.1:4318",
                o.endpoint
            ),
        );
    }
    let endpoint = match o.protocol {
        OtlpProtocol::HttpProtobuf if !endpoint.ends_with("/v1/traces") => {
            format!("{endpoint}/v1/traces")
        }
        _ => endpoint,
    };
    let sample = o.sample.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample) {
        return bad(
            "sample",
            "a fraction from 0 (none) to 1.0 (every trace)".into(),
        );
    }
    let mut headers = Vec::with_capacity(o.headers.len());
    for (name, value) in o.headers {
        let lower = name.to_ascii_lowercase();
        if http::HeaderName::from_bytes(lower.as_bytes()).is_err()
            || http::HeaderValue::from_str(&value).is_err()
        {
            return bad(
                &format!("headers.{name}"),
                "not a valid HTTP header name and value".into(),
            );
        }
        headers.push((lower, value));
    }
    let timeout = o.timeout.map_or(Duration::from_secs(10), |d| d.0);
    if timeout.is_zero() {
        return bad("timeout", "must be more than 0, such as 10s".into());
    }
    let queue = o.queue.unwrap_or(2048);
    if queue == 0 {
        return bad("queue", "must be at least 1, such as 2048".into());
    }
    let service_name = t.service_name.unwrap_or_else(|| "llm-gateway".into());
    if service_name.trim().is_empty() {
        return Err(("telemetry.service_name".into(), "must not be empty".into()));
    }
    let capture_prompts = filters.iter().any(|f| {
        f.name == "audit"
            && f.options
                .pointer("/capture/prompts")
                .and_then(|v| v.as_bool())
                == Some(true)
    });
    Ok(Some(TelemetrySpec {
        endpoint,
        protocol: o.protocol,
        headers,
        sample,
        timeout,
        queue,
        service_name,
        capture_prompts,
    }))
}
