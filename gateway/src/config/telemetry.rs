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
    /// PEM CA certificates trusted for an `https://` collector besides the public roots.
    pub ca_file: Option<String>,
    /// Whether a client's `traceparent` is followed (its trace and sampling decision); off,
    /// every request starts a trace of its own, sampled by `sample`.
    pub trust_traceparent: Option<bool>,
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
    pub ca_file: Option<std::path::PathBuf>,
    pub trust_traceparent: bool,
    /// Prompt texts go into spans only when the audit filter captures them too
    /// (`audit.capture.prompts`): one switch for where prompts may be written.
    pub capture_prompts: bool,
}

/// Most spans waiting for export (each holds a span's attributes; the SDK allocates the whole
/// queue up front).
const MAX_QUEUE: usize = 65_536;

pub fn build(
    t: TelemetrySection,
    filters: &[FilterSpec],
    config_dir: &std::path::Path,
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
    let endpoint = match endpoint(&o.endpoint, o.protocol) {
        Ok(e) => e,
        Err(m) => return bad("endpoint", m),
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
    if !(1..=MAX_QUEUE).contains(&queue) {
        return bad("queue", format!("from 1 to {MAX_QUEUE}, such as 2048"));
    }
    let ca_file = o.ca_file.map(|p| config_dir.join(p));
    if let Some(p) = &ca_file {
        if let Err(e) = std::fs::metadata(p) {
            return bad("ca_file", format!("cannot read {}: {e}", p.display()));
        }
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
        ca_file,
        trust_traceparent: o.trust_traceparent.unwrap_or(true),
        capture_prompts,
    }))
}

/// The collector's URL as the exporter takes it: for OTLP/HTTP the `/v1/traces` path added
/// (unless given); for gRPC the bare origin. No credentials in it (they would show in logs
/// and `check`: use `headers`), no query.
fn endpoint(raw: &str, protocol: OtlpProtocol) -> Result<String, String> {
    let example = match protocol {
        OtlpProtocol::HttpProtobuf => "http://127.0.0.1:4318",
        OtlpProtocol::Grpc => "http://127.0.0.1:4317",
    };
    let not_url = || format!("`{raw}` is not an http:// or https:// URL such as {example}");
    let uri: http::Uri = raw.trim().parse().map_err(|_| not_url())?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(not_url());
    };
    if scheme != "http" && scheme != "https" {
        return Err(not_url());
    }
    if authority.as_str().contains('@') {
        return Err("must not carry credentials (they would be logged): put them in `headers`, e.g. `authorization: \"Basic ${OTLP_AUTH}\"`".into());
    }
    if uri.query().is_some() {
        return Err(format!(
            "`{raw}` has a query string; give the collector's base URL"
        ));
    }
    let path = uri.path().trim_end_matches('/');
    match protocol {
        OtlpProtocol::HttpProtobuf if path.ends_with("/v1/traces") => {
            Ok(format!("{scheme}://{authority}{path}"))
        }
        OtlpProtocol::HttpProtobuf => Ok(format!("{scheme}://{authority}{path}/v1/traces")),
        OtlpProtocol::Grpc if path.is_empty() => Ok(format!("{scheme}://{authority}")),
        OtlpProtocol::Grpc => Err(format!(
            "`{raw}`: a gRPC collector is named by its address only, such as {example}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalised_or_refused() {
        let http = |raw| endpoint(raw, OtlpProtocol::HttpProtobuf);
        assert_eq!(http("http://c:4318").unwrap(), "http://c:4318/v1/traces");
        assert_eq!(
            http("https://cloud.langfuse.com/api/public/otel/").unwrap(),
            "https://cloud.langfuse.com/api/public/otel/v1/traces"
        );
        assert_eq!(
            http("http://c:4318/v1/traces").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert!(http("https://user:pw@c/otel")
            .unwrap_err()
            .contains("credentials"));
        assert!(http("https://c/otel?x=1").unwrap_err().contains("query"));
        assert!(http("c:4318").is_err());
        assert!(http("ftp://c/").is_err());
        let grpc = |raw| endpoint(raw, OtlpProtocol::Grpc);
        assert_eq!(grpc("http://c:4317/").unwrap(), "http://c:4317");
        assert!(grpc("http://c:4317/v1/traces").is_err());
    }
}
