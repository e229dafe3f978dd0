//! The admin listener: `/metrics` (Prometheus text format) and `/health`. It is a separate
//! Pingora service bound to `admin.addr`, never to a public listener. `/admin/*` needs the
//! admin token when one is set; `/metrics` too when the listener is not on loopback.

use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use prometheus::{Encoder, TextEncoder};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::chain::FilterChain;
use crate::metrics::Metrics;
use crate::proxy::InFlight;
use crate::router::Router;

pub struct AdminApp {
    pub metrics: Arc<Metrics>,
    pub router: Arc<dyn Router>,
    pub in_flight: InFlight,
    pub chain: Arc<FilterChain>,
    pub token: Option<AdminToken>,
    /// `/metrics` needs the token too: the listener is reachable from the network, and the
    /// series name principals, models and backends.
    pub metrics_need_token: bool,
    /// Over a loopback connection, a browser's request naming another host than this
    /// machine's is refused ([`crate::host_check`]).
    pub hosts: crate::host_check::HostRule,
}

/// The admin token, kept as its SHA-256: presented tokens are compared digest to digest in
/// constant time, so neither their bytes nor their length show in the answer's timing.
pub struct AdminToken([u8; 32]);

impl AdminToken {
    /// Surrounding whitespace is not part of a token (a presented one is trimmed too).
    pub fn new(token: &str) -> AdminToken {
        AdminToken(Sha256::digest(token.trim().as_bytes()).into())
    }

    /// Whether the request carries `Authorization: Bearer <token>` (the scheme in any case).
    fn admits(&self, session: &ServerSession) -> bool {
        let presented = session
            .req_header()
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        presented.is_some_and(|t| {
            let digest: [u8; 32] = Sha256::digest(t.as_bytes()).into();
            bool::from(digest.ct_eq(&self.0))
        })
    }
}

/// An error in OpenAI's shape, as every admin answer that is not a document.
fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Vec<u8>> {
    let body =
        gateway_filter::error_json(gateway_filter::ErrorShape::OpenAi, status, code, message);
    respond(status, "application/json", body.into_bytes())
}

fn unauthorized() -> Response<Vec<u8>> {
    let mut r = json_error(
        StatusCode::UNAUTHORIZED,
        "invalid_admin_token",
        "this endpoint needs the admin token",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"llm-gateway admin\""),
    );
    r
}

impl AdminApp {
    fn metrics_text(&self) -> Vec<u8> {
        let pool = self.router.pool();
        for (i, b) in pool.iter().enumerate() {
            self.metrics
                .backend_up
                .with_label_values(&[&b.name])
                .set(i64::from(pool.is_up(i)));
            self.metrics
                .backend_standby
                .with_label_values(&[&b.name])
                .set(i64::from(pool.is_standby(i)));
            self.metrics
                .backend_in_flight
                .with_label_values(&[&b.name])
                .set(i64::from(b.in_flight()));
        }
        self.metrics.in_flight.set(self.in_flight.get() as i64);
        let mut out = Vec::with_capacity(16 << 10);
        if let Err(e) =
            TextEncoder::new().encode(&prometheus::default_registry().gather(), &mut out)
        {
            log::error!("metrics: encoding failed: {e}");
        }
        out
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    let len = r.body().len();
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    r
}

impl AdminApp {
    /// `/admin/NAME`: a filter's report (e.g. `spend`), behind the admin token when one is set.
    async fn admin_report(&self, session: &ServerSession, name: &str) -> Response<Vec<u8>> {
        if self.token.as_ref().is_some_and(|t| !t.admits(session)) {
            return unauthorized();
        }
        match self.chain.admin_report(name).await {
            Some(v) => respond(
                StatusCode::OK,
                "application/json",
                v.to_string().into_bytes(),
            ),
            None => json_error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no filter reports {name:?}"),
            ),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let via_loopback = || crate::host_check::loopback(session.server_addr());
        if path != "/health" {
            if let Some(host) = self
                .hosts
                .refused(session.req_header(), false, via_loopback)
            {
                return json_error(
                    StatusCode::FORBIDDEN,
                    "host_not_allowed",
                    &crate::host_check::refusal_message(host),
                );
            }
        }
        if let Some(name) = path.strip_prefix("/admin/") {
            return self.admin_report(session, name).await;
        }
        match path.as_str() {
            "/metrics"
                if self.metrics_need_token
                    && !self.token.as_ref().is_some_and(|t| t.admits(session)) =>
            {
                unauthorized()
            }
            "/metrics" => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics_text(),
            ),
            "/health" => respond(
                StatusCode::OK,
                "application/json",
                crate::proxy::health_json(self.router.as_ref()).into_bytes(),
            ),
            _ => json_error(
                StatusCode::NOT_FOUND,
                "not_found",
                "the admin listener serves /metrics and /health",
            ),
        }
    }
}
