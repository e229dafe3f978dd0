//! Forward auth: credentials the local files do not know are checked by asking a validator
//! service, as nginx's `auth_request` and Traefik's ForwardAuth do.
//!
//! 2xx lets the request through as the principal the validator names; 401/403 deny; anything
//! else, a timeout or a refused connection denies too (fail closed). Allowed answers are cached
//! by a hash of the forwarded credential headers, so the validator sees one request per
//! credential per `cache` period.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use gateway_filter::http::{HeaderMap, HeaderName};
use gateway_filter::units::HumanDuration;
use gateway_filter::{OptionsError, RequestCtx};
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
    /// Most of those one client network (as the lockout counts it: `limits.ipv6_prefix`) may
    /// hold at once, so one client guessing credentials cannot take them all; default a
    /// quarter of `max_in_flight`.
    max_in_flight_per_address: Option<usize>,
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
    /// Unreachable, timed out, a redirect or a 5xx: the validator's trouble.
    Unavailable,
    /// `max_in_flight` questions are out, or the client's address holds its share of them:
    /// not asked (and not the validator's trouble).
    Busy,
}

/// A question on its way, shared by the requests that carry the same credentials.
type Question = Arc<tokio::sync::OnceCell<Result<Arc<Identity>, Denied>>>;

type Cached = (Arc<[u8; 32]>, Arc<Identity>);

pub struct Forwarder {
    client: reqwest::Client,
    url: reqwest::Url,
    /// `url` as logs and reports show it ([`crate::outbound::shown`]).
    shown: String,
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
    /// Questions in flight per client address, and how many one address may hold.
    asking: std::sync::Mutex<HashMap<IpAddr, usize>>,
    per_address: usize,
    /// Questions not asked because too many were out (`Denied::Busy`).
    busy: AtomicU64,
    /// Questions on their way by the credentials' digest (only while answers are cached: a
    /// validator asked every time may answer each request differently).
    questions: std::sync::Mutex<HashMap<[u8; 32], Question>>,
}

/// A request waiting for a question's answer. The question leaves the table once answered,
/// or when the last request waiting for it goes away unanswered (a flood of clients that
/// leave must not leave questions behind).
struct Waiting<'a> {
    map: &'a std::sync::Mutex<HashMap<[u8; 32], Question>>,
    question: Question,
    digest: [u8; 32],
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Clones are made under this lock: the count is the table's, this one's and those of
        // the requests still waiting.
        if m.get(&self.digest)
            .is_some_and(|q| Arc::ptr_eq(q, &self.question))
            && (self.question.initialized() || Arc::strong_count(&self.question) <= 2)
        {
            m.remove(&self.digest);
        }
    }
}

/// A question counted against its client's address until dropped.
struct Asking<'a> {
    map: &'a std::sync::Mutex<HashMap<IpAddr, usize>>,
    key: Option<IpAddr>,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&key);
            }
        }
    }
}

fn header_name(key: &str, h: &str) -> Result<HeaderName, OptionsError> {
    HeaderName::from_bytes(h.trim().as_bytes())
        .map_err(|_| OptionsError::new(key, format!("{h:?} is not a header name")))
}

impl Forwarder {
    pub fn new(o: ForwardOptions, cx: &gateway_filter::BuildContext) -> Result<Self, OptionsError> {
        let url = reqwest::Url::parse(&o.url).map_err(|e| {
            OptionsError::new(
                "forward.url",
                format!("{:?}: {e}", crate::outbound::shown(&o.url)),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(OptionsError::new(
                "forward.url",
                format!(
                    "{:?}: must be an http:// or https:// URL",
                    crate::outbound::shown(&o.url)
                ),
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
        if o.max_in_flight == 0 {
            return Err(OptionsError::new(
                "forward.max_in_flight",
                "must be at least 1 (questions to the validator at once)",
            ));
        }
        let per_address = o.max_in_flight_per_address.unwrap_or(o.max_in_flight / 4);
        if o.max_in_flight_per_address == Some(0) || per_address > o.max_in_flight {
            return Err(OptionsError::new(
                "forward.max_in_flight_per_address",
                format!(
                    "must be between 1 and max_in_flight ({}): the questions one client address may hold at once",
                    o.max_in_flight
                ),
            ));
        }
        let ca = o.ca_file.as_deref().map(|p| cx.resolve(p));
        let client = crate::outbound::client("forward", o.timeout.0, ca.as_deref(), true)?;
        Ok(Forwarder {
            client,
            shown: crate::outbound::shown(url.as_str()),
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
            slots: tokio::sync::Semaphore::new(o.max_in_flight),
            asking: std::sync::Mutex::new(HashMap::new()),
            per_address: per_address.max(1),
            busy: AtomicU64::new(0),
            questions: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The validator's URL as logs and reports show it (no password, no query).
    pub fn url(&self) -> &str {
        &self.shown
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

    /// Questions not asked since start because too many were out.
    pub fn busy(&self) -> u64 {
        self.busy.load(Ordering::Relaxed)
    }

    /// Hash of the forwarded credential headers; `None` when the request carries none of them.
    /// The credentials' digest, with `bound`: the client certificate's subjects where a
    /// principal must come with its own (`mtls: require`), so an approval remembered with
    /// its owner's certificate is no fast answer to another's (the speed told a right
    /// credential from a wrong one).
    fn digest(&self, req: &HeaderMap, bound: &[String]) -> Option<[u8; 32]> {
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
        for subject in bound {
            h.update([1]);
            h.update(subject.as_bytes());
        }
        any.then(|| h.finalize().into())
    }

    /// The cached answer for these credentials, if any (`bound`: see [`Self::digest`]).
    pub fn cached_for(&self, req: &HeaderMap, bound: &[String]) -> Option<Arc<Identity>> {
        self.cached(&self.digest(req, bound)?)
    }

    /// Asks the validator (or the cache) about the credentials in `req`. Requests with the
    /// same credentials that come while a question about them is out wait for its answer.
    pub async fn check(&self, ctx: &RequestCtx, bound: &[String]) -> Result<Arc<Identity>, Denied> {
        let digest = self.digest(&ctx.headers, bound).ok_or(Denied::Refused)?;
        if let Some(hit) = self.cached(&digest) {
            return Ok(hit);
        }
        if self.ttl.is_zero() {
            return self.ask(ctx, &digest).await;
        }
        let waiting = Waiting {
            map: &self.questions,
            question: self
                .questions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(digest)
                .or_default()
                .clone(),
            digest,
        };
        // The first request asks; the others wait for its answer (and one of them asks
        // instead if that request goes away first).
        let mut asked = false;
        let answer = waiting
            .question
            .get_or_init(|| {
                asked = true;
                self.ask(ctx, &digest)
            })
            .await
            .clone();
        match answer {
            // Not asked for the request that went first (its client held its share, or all
            // questions were out): this one asks for itself, within its own client's share.
            Err(Denied::Busy) if !asked => {
                drop(waiting);
                self.ask(ctx, &digest).await
            }
            answer => answer,
        }
    }

    /// One question to the validator, within the client network's share and the slots.
    async fn ask(&self, ctx: &RequestCtx, digest: &[u8; 32]) -> Result<Arc<Identity>, Denied> {
        // The network as the lockout counts it (`limits.ipv6_prefix`; IPv4-mapped addresses
        // are IPv4 already).
        let _asking = self.count_asking(ctx.client_net)?;
        let Ok(_slot) = self.slots.try_acquire() else {
            self.busy.fetch_add(1, Ordering::Relaxed);
            return Err(Denied::Busy);
        };
        let uri = match &ctx.query {
            Some(q) => format!("{}?{q}", ctx.path),
            None => ctx.path.clone(),
        };
        let mut call = self
            .client
            .request(self.method.clone(), self.url.clone())
            .header("x-forwarded-method", ctx.method.as_str())
            .header("x-forwarded-uri", uri);
        if let Some(ip) = ctx.client_ip {
            call = call.header("x-forwarded-for", ip.to_string());
        }
        for name in &self.headers {
            for v in ctx.headers.get_all(name) {
                call = call.header(name.as_str(), v.as_bytes());
            }
        }
        let answer = match call.send().await {
            Ok(r) => self.judge(r.status().as_u16(), r.headers()),
            Err(e) => Err((Denied::Unavailable, crate::outbound::error_text(e))),
        };
        match answer {
            Ok(identity) => {
                self.healthy();
                let identity = Arc::new(identity);
                if !self.ttl.is_zero() {
                    self.cache.get_or_init(|| MemoryCache::new(self.size)).put(
                        digest,
                        (Arc::new(*digest), identity.clone()),
                        Some(self.ttl),
                    );
                }
                Ok(identity)
            }
            Err((Denied::Unavailable, why)) => Err(self.unavailable(why)),
            Err((denied, _)) => {
                self.healthy();
                Err(denied)
            }
        }
    }

    /// Counts a question against its client's network, or answers `Busy` when it holds its
    /// share already.
    fn count_asking(&self, key: Option<IpAddr>) -> Result<Asking<'_>, Denied> {
        if let Some(k) = key {
            let mut m = self.asking.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(k).or_insert(0);
            if *n >= self.per_address {
                self.busy.fetch_add(1, Ordering::Relaxed);
                return Err(Denied::Busy);
            }
            *n += 1;
        }
        Ok(Asking {
            map: &self.asking,
            key,
        })
    }

    fn unavailable(&self, why: String) -> Denied {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if !self.failing.swap(true, Ordering::Relaxed) {
            log::error!(
                "auth: forward validator {} failing ({why}); requests needing it are denied",
                self.shown
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
            log::warn!("auth: forward validator {} answering again", self.shown);
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

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_filter::http::Method;

    /// The share is keyed by `RequestCtx::client_net` as the request sets it.
    fn from(ip: &str) -> RequestCtx {
        let mut ctx = RequestCtx::new(String::new(), Method::GET, "/".into());
        ctx.set_client(ip.parse().unwrap(), 64);
        ctx
    }

    #[test]
    fn a_mapped_ipv4_counts_as_itself() {
        let k = |s: &str| from(s).client_net;
        assert_eq!(k("::ffff:10.0.0.1"), k("10.0.0.1"));
        assert_ne!(k("10.0.0.1"), k("10.0.0.2"));
        assert_ne!(k("2001:db8:1:2::"), k("2001:db8:1:3::"));
    }

    /// A flood of clients that leave before the answer must not leave questions behind.
    #[tokio::test]
    async fn a_question_nobody_waits_for_leaves_the_table() {
        // A validator that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let hold = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                open.push(s);
            }
        });
        let o: ForwardOptions = serde_json::from_value(serde_json::json!({"url": url})).unwrap();
        let f = Arc::new(Forwarder::new(o, &gateway_filter::BuildContext::default()).unwrap());
        let mut tasks = Vec::new();
        for i in 0..3 {
            let f = f.clone();
            tasks.push(tokio::spawn(async move {
                let mut ctx = from("10.0.0.1");
                ctx.headers.insert(
                    "authorization",
                    format!("Bearer guess-{}", i % 2).parse().unwrap(),
                );
                f.check(&ctx, &[]).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(f.questions.lock().unwrap().len(), 2);
        assert_eq!(
            f.asking
                .lock()
                .unwrap()
                .get(&"10.0.0.1".parse::<IpAddr>().unwrap()),
            Some(&2)
        );
        // The first of the two waiting for guess-0 leaves: the other still waits on it.
        tasks[0].abort();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(f.questions.lock().unwrap().len(), 2);
        for t in &tasks {
            t.abort();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(f.questions.lock().unwrap().is_empty());
        assert!(f.asking.lock().unwrap().is_empty());
        hold.abort();
    }
}
