//! Forward auth: credentials the local files do not know are checked by asking a validator
//! service, as nginx's `auth_request` and Traefik's ForwardAuth do.
//!
//! 2xx lets the request through as the principal the validator names; 401/403 deny; anything
//! else, a timeout or a refused connection denies too (fail closed). Allowed answers are cached
//! by a hash of the forwarded credential headers, so the validator sees one request per
//! credential per `cache` period.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use gateway_filter::http::{HeaderMap, HeaderName, Method};
use gateway_filter::units::HumanDuration;
use gateway_filter::OptionsError;
use pingora_memory_cache::MemoryCache;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardOptions {
    /// The validator, `http://host:port/path`.
    url: String,
    #[serde(default = "default_method")]
    method: String,
    /// Request headers passed to the validator; they are also what the cache is keyed on.
    #[serde(default = "default_headers")]
    headers: Vec<String>,
    /// Response header naming the principal; a 2xx without it is treated as a failure.
    #[serde(default = "default_principal_header")]
    principal_header: String,
    /// Response header with comma-separated scopes (e.g. `admin`).
    scopes_header: Option<String>,
    /// Response header with comma-separated models the principal may use.
    models_header: Option<String>,
    #[serde(default = "default_timeout")]
    timeout: HumanDuration,
    /// How long an allowed answer is reused; `0s` asks every time.
    #[serde(default = "default_cache")]
    cache: HumanDuration,
    /// Most cached answers kept.
    #[serde(default = "default_cache_size")]
    cache_size: usize,
    /// Most questions to the validator at once; more are denied as unavailable, so a flood
    /// of unknown credentials cannot pile up connections to it.
    #[serde(default = "default_max_in_flight")]
    max_in_flight: usize,
    /// PEM CA certificates trusted for an `https://` validator besides the public roots.
    ca_file: Option<std::path::PathBuf>,
}

fn default_method() -> String {
    "GET".into()
}
fn default_headers() -> Vec<String> {
    vec!["authorization".into(), "x-api-key".into()]
}
fn default_principal_header() -> String {
    "x-auth-user".into()
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_cache() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_cache_size() -> usize {
    10_000
}
fn default_max_in_flight() -> usize {
    64
}

/// What the validator said about one credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: String,
    pub scopes: Vec<String>,
    pub models: Vec<String>,
}

/// Why a request was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// A 4xx, or a 2xx that names no principal: the credential is not good (counted
    /// towards the lockout, whatever status the validator uses for it).
    Refused,
    /// Unreachable, timed out, busy, a redirect or a 5xx: the validator's trouble.
    Unavailable,
}

type Cached = (Arc<[u8; 32]>, Arc<Identity>);

pub struct Forwarder {
    client: reqwest::Client,
    url: reqwest::Url,
    method: reqwest::Method,
    headers: Vec<HeaderName>,
    principal_header: HeaderName,
    scopes_header: Option<HeaderName>,
    models_header: Option<HeaderName>,
    ttl: Duration,
    size: usize,
    cache: OnceLock<MemoryCache<[u8; 32], Cached>>,
    /// Whether the last call failed, so a failing validator is logged once, not per request.
    failing: AtomicBool,
    failures: AtomicU64,
    slots: tokio::sync::Semaphore,
}

fn header_name(key: &str, h: &str) -> Result<HeaderName, OptionsError> {
    HeaderName::from_bytes(h.trim().as_bytes())
        .map_err(|_| OptionsError::new(key, format!("{h:?} is not a header name")))
}

impl Forwarder {
    pub fn new(o: ForwardOptions, cx: &gateway_filter::BuildContext) -> Result<Self, OptionsError> {
        let url = reqwest::Url::parse(&o.url)
            .map_err(|e| OptionsError::new("forward.url", format!("{:?}: {e}", o.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(OptionsError::new(
                "forward.url",
                format!("{:?}: must be an http:// or https:// URL", o.url),
            ));
        }
        let method = reqwest::Method::from_bytes(o.method.trim().as_bytes()).map_err(|_| {
            OptionsError::new(
                "forward.method",
                format!("{:?} is not an HTTP method", o.method),
            )
        })?;
        let headers = o
            .headers
            .iter()
            .map(|h| header_name("forward.headers", h))
            .collect::<Result<Vec<_>, _>>()?;
        if headers.is_empty() {
            return Err(OptionsError::new(
                "forward.headers",
                "must name at least one header carrying the credential (e.g. authorization)",
            ));
        }
        let ca = o.ca_file.as_deref().map(|p| cx.resolve(p));
        let client = crate::outbound::client("forward", o.timeout.0, ca.as_deref(), true)?;
        Ok(Forwarder {
            client,
            url,
            method,
            headers,
            principal_header: header_name("forward.principal_header", &o.principal_header)?,
            scopes_header: o
                .scopes_header
                .as_deref()
                .map(|h| header_name("forward.scopes_header", h))
                .transpose()?,
            models_header: o
                .models_header
                .as_deref()
                .map(|h| header_name("forward.models_header", h))
                .transpose()?,
            ttl: o.cache.0,
            size: o.cache_size.max(1),
            cache: OnceLock::new(),
            failing: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            slots: tokio::sync::Semaphore::new(o.max_in_flight.max(1)),
        })
    }

    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// Removes the forwarded credential headers, so none of them reaches a backend.
    pub fn strip(&self, req: &mut HeaderMap) {
        for name in &self.headers {
            req.remove(name);
        }
    }

    /// Validator failures (unreachable, timeout, unexpected status) since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Hash of the forwarded credential headers; `None` when the request carries none of them.
    fn digest(&self, req: &HeaderMap) -> Option<[u8; 32]> {
        let mut h = Sha256::new();
        let mut any = false;
        for name in &self.headers {
            for v in req.get_all(name) {
                any = true;
                h.update(name.as_str().as_bytes());
                h.update([0]);
                h.update(v.as_bytes());
                h.update([0]);
            }
        }
        any.then(|| h.finalize().into())
    }

    /// The cached answer for these credentials, if any.
    pub fn cached_for(&self, req: &HeaderMap) -> Option<Arc<Identity>> {
        self.cached(&self.digest(req)?)
    }

    /// Asks the validator (or the cache) about the credentials in `req`.
    pub async fn check(
        &self,
        req: &HeaderMap,
        method: &Method,
        path: &str,
        query: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<Arc<Identity>, Denied> {
        let digest = self.digest(req).ok_or(Denied::Refused)?;
        if let Some(hit) = self.cached(&digest) {
            return Ok(hit);
        }
        let uri = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let Ok(_slot) = self.slots.try_acquire() else {
            return Err(self.unavailable("too many questions in flight".into()));
        };
        let mut call = self
            .client
            .request(self.method.clone(), self.url.clone())
            .header("x-forwarded-method", method.as_str())
            .header("x-forwarded-uri", uri);
        if let Some(ip) = client {
            call = call.header("x-forwarded-for", ip.to_string());
        }
        for name in &self.headers {
            for v in req.get_all(name) {
                call = call.header(name.as_str(), v.as_bytes());
            }
        }
        let answer = match call.send().await {
            Ok(r) => self.judge(r.status().as_u16(), r.headers()),
            Err(e) => Err((Denied::Unavailable, e.to_string())),
        };
        match answer {
            Ok(identity) => {
                self.healthy();
                let identity = Arc::new(identity);
                if !self.ttl.is_zero() {
                    self.cache.get_or_init(|| MemoryCache::new(self.size)).put(
                        &digest,
                        (Arc::new(digest), identity.clone()),
                        Some(self.ttl),
                    );
                }
                Ok(identity)
            }
            Err((Denied::Refused, _)) => {
                self.healthy();
                Err(Denied::Refused)
            }
            Err((Denied::Unavailable, why)) => Err(self.unavailable(why)),
        }
    }

    fn unavailable(&self, why: String) -> Denied {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if !self.failing.swap(true, Ordering::Relaxed) {
            log::error!(
                "auth: forward validator {} failing ({why}); requests needing it are denied",
                self.url
            );
        }
        Denied::Unavailable
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<Arc<Identity>> {
        let (hit, _) = self.cache.get()?.get(digest);
        let (stored, identity) = hit?;
        // Keys are hashed to 64 bits inside the cache; compare the whole digest.
        bool::from(stored.ct_eq(digest)).then_some(identity)
    }

    fn healthy(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            log::warn!("auth: forward validator {} answering again", self.url);
        }
    }

    /// Whether the validator's answers carry the principal's models (`models_header`).
    pub fn names_models(&self) -> bool {
        self.models_header.is_some()
    }

    fn judge(
        &self,
        status: u16,
        h: &reqwest::header::HeaderMap,
    ) -> Result<Identity, (Denied, String)> {
        match status {
            200..=299 => {}
            400..=499 => return Err((Denied::Refused, String::new())),
            other => return Err((Denied::Unavailable, format!("status {other}"))),
        }
        let text = |name: &HeaderName| {
            h.get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let list = |name: &Option<HeaderName>| -> Vec<String> {
            name.as_ref()
                .and_then(text)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default()
        };
        let Some(id) = text(&self.principal_header) else {
            return Err((Denied::Refused, String::new()));
        };
        Ok(Identity {
            id: id.to_string(),
            scopes: list(&self.scopes_header),
            models: list(&self.models_header),
        })
    }
}
