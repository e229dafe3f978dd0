use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Extensions, HeaderMap, HeaderName, HeaderValue, Method};

use crate::{FinishReasons, Route, Usage};

/// The account of requests made without a principal (budgets, metrics).
pub const ANONYMOUS: &str = "anonymous";
/// The account of the budget over the whole gateway.
pub const GLOBAL_ACCOUNT: &str = "*";

/// Whether no principal may carry `id`, whatever its source (keys file, htpasswd, a JWT
/// claim, forward auth, a trusted proxy's header): the names of the gateway's own accounts
/// ([`ANONYMOUS`], [`GLOBAL_ACCOUNT`]), which a principal of that name would share, and the
/// empty name.
pub fn reserved_principal_id(id: &str) -> bool {
    id.is_empty() || id == ANONYMOUS || id == GLOBAL_ACCOUNT
}

/// Who made the request, as established by an authentication filter. Shared (`Arc`) so
/// that putting it into a request's context costs no copy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Principal {
    pub id: String,
    pub name: String,
    /// How it authenticated: `api_key`, `basic`, `mtls`, `jwt`, `forward`, `proxy`.
    pub method: &'static str,
    /// The operator's own files name it (an entry of the keys file, a user of htpasswd),
    /// however it authenticated: such principals are as many as the files list, while ids
    /// named by an identity provider, a validator or a proxy are as many as it has users.
    pub listed: bool,
    /// First 12 hex chars of the key's SHA-256, for audit lines; never the key.
    pub key_sha256_prefix: Option<String>,
    /// Models this principal may use (exact names or `family:*` globs); empty = any.
    pub models: Vec<String>,
    /// Extra rights such as `admin`.
    pub scopes: Vec<String>,
    pub overrides: Overrides,
}

impl Principal {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// Per-principal settings from the keys file that other filters read.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Request rate such as `10/m` (ratelimit).
    pub rate: Option<crate::limits::Rate>,
    pub burst: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    /// Spend cap in USD (budget).
    pub max_usd: Option<f64>,
    /// Budget period such as `1mo`.
    pub period: Option<crate::limits::Period>,
}

/// Decides which models a request may see; set by a filter (policy) so the gateway can filter
/// model lists (`GET /v1/models`, `GET /api/tags`, `GET /api/ps`) it passes back.
pub trait ModelGate: Send + Sync + std::fmt::Debug {
    fn allows(&self, model: &str) -> bool;
}

/// How the gateway answered, for audit lines and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Decision {
    #[default]
    Allowed,
    /// A filter said no: its name and the rejection code.
    Rejected {
        filter: &'static str,
        code: &'static str,
    },
    /// The gateway itself answered with an error (bad body, no backend, timeout…).
    Failed { code: &'static str },
}

/// `allowed`, `FILTER:CODE` or `failed:CODE`, as audit lines and logs write it.
impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Allowed => f.write_str("allowed"),
            Decision::Rejected { filter, code } => write!(f, "{filter}:{code}"),
            Decision::Failed { code } => write!(f, "failed:{code}"),
        }
    }
}

/// The network a client is counted by (limits, lockout, connection caps): its IPv4 address,
/// or its IPv6 address cut to `ipv6_prefix` bits (one host usually holds a whole /64).
pub fn client_network(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u32::from(ipv6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
        v4 => v4,
    }
}

/// Everything known about one request, shared by the proxy and the filters.
#[derive(Debug)]
pub struct RequestCtx {
    pub request_id: String,
    pub started: Instant,
    pub client_ip: Option<IpAddr>,
    /// The client's network as address limits and lockout count it: the IPv4 address, or
    /// the IPv6 address cut to `limits.ipv6_prefix` bits (one host usually holds a /64).
    pub client_net: Option<IpAddr>,
    /// The connection comes from a `listen[].trusted_proxies` network: identity headers that
    /// proxy sets may be believed (auth's `trusted_identity_header`).
    pub via_trusted_proxy: bool,
    /// Subjects of a verified TLS client certificate (CN, then DNS/email SANs); empty
    /// without mTLS.
    pub client_cert_subjects: Vec<String>,
    pub method: Method,
    /// Path in canonical form; this exact string is what goes upstream.
    pub path: String,
    /// Query string without `?`, forwarded as is.
    pub query: Option<String>,
    pub route: Route,
    /// The client's request headers, lent to the chain: filters may read and change them
    /// (e.g. drop the gateway's own credentials) before they are forwarded.
    pub headers: HeaderMap,
    /// The held request body of inference routes (capped at `limits.max_body`).
    pub body: Option<Bytes>,
    /// The held body parsed once as JSON.
    pub json: Option<serde_json::Value>,
    /// Set when a filter changed `json` and the forwarded body must be re-serialised.
    pub body_rewritten: bool,
    /// The model the request is for (inference body, `/api/show`, `/v1/models/{id}`); the
    /// router picks a backend that serves it.
    pub model: Option<String>,
    /// Further models the request names without being served by them (`/api/copy`'s
    /// `source`/`destination`, `/api/pull`'s `model`…): the allow-list judges them too.
    pub named_models: Vec<String>,
    /// Models named in the query string of a custom rule's route (llama.cpp's router reads
    /// `model` there on its GET routes, and loads it): judged like the body's, but never what
    /// a body must name for a model-restricted caller.
    pub query_models: Vec<String>,
    /// The request brings model weights by digest or path (`/api/create`'s `files`,
    /// `adapters`, `draft_files`, a Modelfile's `ADAPTER`) or relays a model to another server
    /// (`remote_host`): what runs cannot be judged by name.
    pub opaque_weights: bool,
    /// A body on a route without a parser that gives media by reference (a URL or a path the
    /// model server would fetch): the field that does ([`crate::media::referenced`]).
    pub media_reference: Option<String>,
    /// A body on a route without a parser that looks like JSON but that serde cannot read
    /// (a byte-order mark, `NaN`, too deep): nothing in it could be checked.
    pub unreadable_json: bool,
    /// A body on a route whose wire format the gateway does not know (a custom rule's
    /// route): its output limit cannot be read or written, and only the models serde could
    /// read from it are in `named_models`.
    pub unknown_format: bool,
    /// The most output tokens the request can produce: the largest of every token field the
    /// route's backends read (see [`crate::output`]) times the completions asked for (`n`,
    /// `best_of`); `None` when unbounded. Budget, TPM and routing reserve this figure.
    pub max_tokens: Option<u64>,
    /// Set when a filter gave a request that named no output limit a bound of its own to
    /// reserve ([`crate::output::reserve_limit`]): what the client asked per completion, and
    /// the bound written. A cap applied after judges the ask, and never raises the bound.
    pub output_reserved: Option<(crate::output::Limit, u64)>,
    /// The completions the request asked for (`n`, `best_of`, `n_cmpl`, prompts), at least 1.
    pub completions: u64,
    pub stream: bool,
    pub principal: Option<Arc<Principal>>,
    /// Why a filter said no, for audit and metrics only (e.g. `unknown_key`, `expired`);
    /// never sent to the client.
    pub reject_reason: Option<&'static str>,
    /// When set, model lists in responses are filtered to what it allows.
    pub model_gate: Option<Arc<dyn ModelGate>>,
    /// Headers filters want on the response (e.g. `X-RateLimit-*`).
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
    /// Per-request state a filter keeps for itself (e.g. a concurrency slot released on drop).
    pub extensions: Extensions,
    /// Checks whose shared-state answer is still on its way (see [`crate::defer`]).
    pub pending: crate::defer::Pending,

    // Filled while and after proxying; read in `on_complete`.
    pub backend: Option<Arc<str>>,
    /// A backend got the whole request (it may have worked on it), as opposed to attempts
    /// that failed to connect or to write it, and to a backend that answered with an error
    /// status another backend was then tried for (it generated nothing).
    pub reached_backend: bool,
    /// Backends given up on after they held the whole request past `first_byte_timeout`
    /// (another was tried): each may have read the prompt, whatever the last one reports.
    pub abandoned: u32,
    /// The seconds those backends held it (each its first-byte deadline).
    pub abandoned_secs: f64,
    /// Of those, the backends left after a late error ([`Self::late_error`]): each may have
    /// generated up to the request's bound, so each is charged its reservation.
    pub late_errors: u32,
    /// The backend checks what it generates against a shape the request gives (`tools`,
    /// `tool_choice`, `response_format`): its error can come after it generated (vLLM's 400
    /// for tool-call JSON cut off at `max_tokens`, llama.cpp's 500 for arguments that do not
    /// parse). Set when the body leaves.
    pub checked_output: bool,
    /// [`Self::prompt_tokens`], once worked out.
    prompt_estimate: Option<u64>,
    pub retries: u32,
    pub status: u16,
    pub decision: Decision,
    pub usage: Option<Usage>,
    /// Why generation stopped, where the response said.
    pub finish_reasons: FinishReasons,
    /// Cost of the request in USD, when a filter (budget) knows it.
    pub cost_usd: Option<f64>,
    pub ttfb: Option<Duration>,
    /// When the backend had the whole request, since `started` (the last attempt's).
    pub sent: Option<Duration>,
    /// When the backend's answer (its header) came, since `started` (the last attempt's).
    pub answered_at: Option<Duration>,
    pub duration: Option<Duration>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl RequestCtx {
    /// A backend had the request and nothing says what it used: no usage, and neither a
    /// backend's own error answer (it generated nothing) nor an answer before any backend.
    /// Budgets charge such a request its reservation; tokens per minute keep its hold.
    pub fn used_unknown(&self) -> bool {
        self.reached_backend
            && self.usage.is_none()
            && (self.status < 400
                || matches!(self.decision, Decision::Failed { .. })
                || self.late_error(self.status)
                // Given up on one backend, then an error from the next: what the first ran
                // is not known (an error at once, 4xx, leaves the per-backend estimates).
                || (self.abandoned > 0 && self.status >= 500))
    }

    /// Whether an error answer with `status` may come after the backend generated
    /// ([`Self::answered_late`]): a server error, or any error to several completions (a
    /// later task's, after the others ran) or to a request whose output the backend checks
    /// ([`Self::checked_output`]). Otherwise a single completion's 4xx that came late is the
    /// server checking it when a slot was free (a prompt too long for the context): nothing
    /// ran.
    pub fn late_error(&self, status: u16) -> bool {
        status >= 400
            && self.answered_late()
            && (status >= 500 || self.completions > 1 || self.checked_output)
    }

    /// How long the backend held the request before it answered (the last attempt's).
    pub fn held(&self) -> Option<Duration> {
        self.answered_at
            .zip(self.sent)
            .map(|(answered, sent)| answered.saturating_sub(sent))
    }

    /// The backend held the request a while before it answered: an error answer then may
    /// come after it generated. llama.cpp answers 500 when the tool-call arguments it
    /// generated do not parse, and runs each of several completions as a task of its own,
    /// checking a prompt against its slot's context only when the task reaches a slot, so a
    /// later task's error can come after the others generated all they could. Errors found
    /// by reading the request (a bad parameter) come at once.
    pub fn answered_late(&self) -> bool {
        const LATE: Duration = Duration::from_secs(1);
        self.held().is_some_and(|held| held >= LATE)
    }

    /// The prompt's estimate ([`crate::prompt::prompt_tokens`]: its text, media at 768 tokens
    /// each), worked out once from the body and kept (the body's tree may be let go later).
    pub fn prompt_tokens(&mut self) -> u64 {
        if let Some(n) = self.prompt_estimate {
            return n;
        }
        let n = self.json.as_ref().map_or(0, crate::prompt::prompt_tokens);
        if self.json.is_some() {
            self.prompt_estimate = Some(n);
        }
        n
    }

    pub fn new(request_id: String, method: Method, path: String) -> Self {
        let route = Route::classify(&method, &path);
        RequestCtx {
            request_id,
            started: Instant::now(),
            client_ip: None,
            client_net: None,
            via_trusted_proxy: false,
            client_cert_subjects: Vec::new(),
            method,
            path,
            query: None,
            route,
            headers: HeaderMap::new(),
            body: None,
            json: None,
            body_rewritten: false,
            model: None,
            named_models: Vec::new(),
            query_models: Vec::new(),
            opaque_weights: false,
            media_reference: None,
            unreadable_json: false,
            unknown_format: false,
            max_tokens: None,
            output_reserved: None,
            completions: 1,
            stream: false,
            principal: None,
            reject_reason: None,
            model_gate: None,
            response_headers: Vec::new(),
            extensions: Extensions::new(),
            pending: Default::default(),
            backend: None,
            reached_backend: false,
            abandoned: 0,
            abandoned_secs: 0.0,
            late_errors: 0,
            checked_output: false,
            prompt_estimate: None,
            retries: 0,
            status: 0,
            decision: Decision::Allowed,
            usage: None,
            finish_reasons: FinishReasons::default(),
            cost_usd: None,
            ttfb: None,
            sent: None,
            answered_at: None,
            duration: None,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// Sets the client address and the network it is counted by.
    pub fn set_client(&mut self, ip: IpAddr, ipv6_prefix: u8) {
        let ip = ip.to_canonical();
        self.client_ip = Some(ip);
        self.client_net = Some(client_network(ip, ipv6_prefix));
    }

    /// The request target sent upstream: canonical path plus, on a custom rule's route, the
    /// query as received. The built-in routes' APIs (Ollama's, OpenAI's) read nothing from
    /// the query, while llama.cpp's server reads `autoload` there (loading a model against
    /// the operator's `--no-models-autoload`, pushing out another): it is not forwarded.
    pub fn target(&self) -> String {
        match &self.query {
            Some(q) if self.route == Route::Other => format!("{}?{q}", self.path),
            _ => self.path.clone(),
        }
    }

    /// A request header as UTF-8 text, if present and valid.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review: llama.cpp answers a request of several completions with a later task's error
    /// after the others generated, and a tool call whose generated arguments do not parse
    /// with 500 after generating them; such an answer cost nothing. One the backend held for
    /// a second or more now counts as usage unknown (charged its reservation).
    #[test]
    fn a_late_error_is_usage_unknown() {
        let checked = |completions: u64, held_ms: u64, status: u16, checked: bool| {
            let mut c = RequestCtx::new(String::new(), Method::POST, "/v1/completions".into());
            c.reached_backend = true;
            c.completions = completions;
            c.checked_output = checked;
            c.status = status;
            c.sent = Some(Duration::from_millis(5));
            c.answered_at = Some(Duration::from_millis(5 + held_ms));
            c.used_unknown()
        };
        let answer = |completions, held_ms, status| checked(completions, held_ms, status, false);
        assert!(answer(5, 30_000, 400));
        assert!(answer(2, 1_000, 500));
        assert!(answer(1, 30_000, 500));
        // At once: the request was refused as read. A single completion's late 4xx: the
        // server checked it when a slot was free, nothing ran.
        assert!(!answer(5, 50, 400));
        assert!(!answer(1, 999, 500));
        assert!(!answer(1, 30_000, 400));
        // A whole answer without usage stays unknown, as before.
        assert!(answer(1, 50, 200));
        // Billing review: vLLM answers 400 after generating tool-call JSON that `max_tokens`
        // cut off; a request whose output the backend checks may fail late with a 4xx too.
        assert!(checked(1, 2_000, 400, true));
        assert!(!checked(1, 50, 400, true), "at once: refused as read");
    }

    #[test]
    fn ipv6_clients_are_counted_by_prefix() {
        let mut c = RequestCtx::new(String::new(), Method::GET, "/".into());
        c.set_client("2001:db8:1:2:aaaa:bbbb:cccc:dddd".parse().unwrap(), 64);
        assert_eq!(c.client_net, Some("2001:db8:1:2::".parse().unwrap()));
        assert_eq!(
            c.client_ip,
            Some("2001:db8:1:2:aaaa:bbbb:cccc:dddd".parse().unwrap())
        );
        c.set_client("2001:db8:1:2:aaaa:bbbb:cccc:dddd".parse().unwrap(), 48);
        assert_eq!(c.client_net, Some("2001:db8:1::".parse().unwrap()));
        c.set_client("2001:db8::1".parse().unwrap(), 128);
        assert_eq!(c.client_net, Some("2001:db8::1".parse().unwrap()));
        // IPv4 clients on a dual-stack listener are plain IPv4 addresses.
        c.set_client("::ffff:10.1.2.3".parse().unwrap(), 64);
        assert_eq!(c.client_net, Some("10.1.2.3".parse().unwrap()));
        assert_eq!(c.client_ip, Some("10.1.2.3".parse().unwrap()));
    }
}
