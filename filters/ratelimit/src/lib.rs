//! The `ratelimit` filter: request rate with burst (GCRA, the semantics of nginx
//! `limit_req`), concurrent requests per key, and tokens per minute.
//!
//! One filter instance has one key (`ip`, `api_key`, `api_key+model`, `header:NAME`); put
//! two instances in the chain for a per-IP guard before auth and a per-key limit after it.

mod chunks;
mod rate;
mod shared;
mod store;

use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use gateway_filter::http::{header, HeaderName, HeaderValue, StatusCode};
use gateway_filter::model_name::model_key;
use gateway_filter::state::{acquire_lease, ask, at, int, stable_hash, SharedLease};
use gateway_filter::{
    output, parse_options, BuildContext, Filter, OptionsError, Rejection, RequestCtx, SharedState,
};
use serde::Deserialize;

// The response headers' names, checked once at compile time rather than per request.
const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

pub use rate::{gcra, Gcra, Rate};
pub use store::{LimitStore, LocalStore, TokenCheck};

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ns() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
}

const MINUTE_NS: u64 = 60_000_000_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// `ip`, `api_key`, `api_key+model` or `header:NAME`.
    key: String,
    /// Requests per period: `10/s`, `600/m`, `1000/h`.
    rate: Option<String>,
    #[serde(default)]
    burst: u64,
    #[serde(default)]
    mode: Mode,
    max_in_flight: Option<u32>,
    tokens_per_minute: Option<u64>,
    /// Output tokens per completion a request held to `tokens_per_minute` is given when
    /// nothing bounds it (see `RateLimitFilter::check`).
    #[serde(default = "output::default_reserve")]
    output_reserve: u64,
    /// Most keys tracked per kind of limit (memory bound).
    #[serde(default = "default_max_keys")]
    max_keys: usize,
}

fn default_max_keys() -> usize {
    100_000
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Serve the burst at once, refuse beyond it (nginx `nodelay`).
    #[default]
    Nodelay,
    /// Queue requests within the burst so they go out at the rate, refuse beyond it (nginx's
    /// default without `nodelay`).
    Delay,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyKind {
    Ip,
    Principal,
    PrincipalModel,
    Header(HeaderName),
}

/// A `key:` option the limiter cannot key by.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{0:?} is not a header name")]
    BadHeader(String),
    #[error("unknown key {0:?}; use ip, api_key, api_key+model or header:NAME")]
    Unknown(String),
}

impl KeyKind {
    fn parse(s: &str) -> Result<KeyKind, KeyError> {
        Ok(match s {
            "ip" => KeyKind::Ip,
            "api_key" => KeyKind::Principal,
            "api_key+model" => KeyKind::PrincipalModel,
            _ => match s.strip_prefix("header:") {
                Some(h) => KeyKind::Header(
                    HeaderName::from_bytes(h.trim().as_bytes())
                        .map_err(|_| KeyError::BadHeader(h.to_string()))?,
                ),
                None => return Err(KeyError::Unknown(s.to_string())),
            },
        })
    }
}

/// Who a request counts against (see [`RateLimitFilter::subject`]).
#[derive(Hash)]
enum Subject<'a> {
    Ip(IpAddr),
    Key(&'a str),
    KeyModel(&'a str, Option<std::borrow::Cow<'a, str>>),
    Header(&'a [u8]),
}

pub struct RateLimitFilter {
    key: KeyKind,
    rate: Option<Rate>,
    burst: u64,
    mode: Mode,
    max_in_flight: Option<u32>,
    tpm: Option<u64>,
    /// Output tokens per completion given to a request under `tpm` that names no limit.
    output_reserve: u64,
    store: Arc<dyn LimitStore>,
    hasher: std::hash::RandomState,
    /// Shared with the other replicas (`state: { backend: redis }`); the local store is the
    /// fallback.
    state: Option<Arc<dyn SharedState>>,
    /// Names this limiter's keys in shared state: the same options on every replica give the
    /// same id, and two limiters of one chain differ.
    id: String,
    /// On shared state and first in the chain: its shared decisions are final, so the rate's
    /// refusals are remembered until their retry time (see [`RateLimitFilter::known_refused`]).
    remember_refusals: bool,
    /// The rate and tokens taken ahead on shared state, far from the limit.
    chunks: chunks::LimiterChunks,
}

/// What a request holds from a limiter until its answer ends (`on_response_end`): an
/// in-flight slot (also released when the request's context is dropped, however it ends) or a
/// token reservation (if it is never settled, it simply stays counted until its window ends).
#[derive(Debug)]
enum Held {
    Slot(u64),
    Tokens {
        key: u64,
        start_ns: u64,
        reserved: u64,
    },
    /// Released when dropped.
    SharedSlot {
        _lease: SharedLease,
    },
    SharedTokens {
        key: String,
        start_ms: i64,
        reserved: u64,
        /// The key's chunks taken ahead: what the request did not use goes back to the
        /// chunk of its window, without a call (the chunk gives it back when it ends).
        chunks: Option<chunks::TokenChunks>,
    },
}

/// Everything a request holds, from every limiter of the chain (each knows its own store).
struct HoldList(std::sync::Mutex<Vec<(Arc<dyn LimitStore>, Held)>>);

impl Drop for HoldList {
    fn drop(&mut self) {
        let holds = self.0.get_mut().map(std::mem::take).unwrap_or_default();
        for (store, held) in holds {
            if let Held::Slot(key) = held {
                store.release(key);
            }
        }
    }
}

/// The context's handle on the list (extensions must be `Clone`).
#[derive(Clone)]
struct Holds(Arc<HoldList>);

impl Holds {
    /// Takes out what this request holds from `store` (the rest stays for other limiters).
    fn take(&self, store: &Arc<dyn LimitStore>) -> Vec<Held> {
        let mut list = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        let mut mine = Vec::new();
        let mut i = 0;
        while i < list.len() {
            if Arc::ptr_eq(&list[i].0, store) {
                mine.push(list.swap_remove(i).1);
            } else {
                i += 1;
            }
        }
        mine
    }
}

/// Registry constructor: `- use: ratelimit` plus [`Options`].
pub fn build(
    options: &serde_json::Value,
    cx: &BuildContext,
) -> Result<Arc<dyn Filter>, OptionsError> {
    let o: Options = parse_options(options)?;
    let key = KeyKind::parse(&o.key).map_err(|m| OptionsError::new("key", m.to_string()))?;
    let rate = o
        .rate
        .as_deref()
        .map(Rate::parse)
        .transpose()
        .map_err(|m| OptionsError::new("rate", m))?;
    if rate.is_none() && o.max_in_flight.is_none() && o.tokens_per_minute.is_none() {
        return Err(OptionsError::new(
            "",
            "set at least one of rate, max_in_flight or tokens_per_minute",
        ));
    }
    if o.max_in_flight == Some(0) || o.tokens_per_minute == Some(0) {
        return Err(OptionsError::new(
            "",
            "max_in_flight and tokens_per_minute must be at least 1",
        ));
    }
    if o.output_reserve == 0 {
        return Err(OptionsError::new(
            "output_reserve",
            "must be at least 1 (output tokens given to a request that names no limit)",
        ));
    }
    Ok(Arc::new(RateLimitFilter {
        key,
        rate,
        burst: o.burst,
        mode: o.mode,
        max_in_flight: o.max_in_flight,
        tpm: o.tokens_per_minute,
        output_reserve: o.output_reserve,
        store: Arc::new(LocalStore::new(o.max_keys.max(SHARD_MIN))),
        hasher: std::hash::RandomState::new(),
        state: cx.state.clone(),
        id: format!("{:016x}", stable_hash(options.to_string().as_bytes())),
        remember_refusals: cx.state.is_some() && cx.first_in_chain,
        chunks: Default::default(),
    }))
}

const SHARD_MIN: usize = 1024;

fn seconds_up(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000).max(1)
}

fn too_many(message: String, retry_ns: u64) -> Rejection {
    Rejection::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_exceeded",
        message,
    )
    .with_header(header::RETRY_AFTER, HeaderValue::from(seconds_up(retry_ns)))
}

impl RateLimitFilter {
    /// Who a request counts against, for the local and the shared store alike. Without a
    /// principal (no auth before this filter) the principal-based keys fall back to the
    /// client IP, so nobody escapes the limit.
    fn subject<'a>(&self, ctx: &'a RequestCtx) -> Subject<'a> {
        let ip = Subject::Ip(ctx.client_net.unwrap_or(IpAddr::from([0, 0, 0, 0])));
        match (&self.key, &ctx.principal) {
            (KeyKind::Ip, _) => ip,
            (KeyKind::Principal, Some(p)) => Subject::Key(&p.id),
            // `llama3`, `llama3:latest`, `LLAMA3`, `library/llama3` are one model to Ollama:
            // one bucket, whichever name the client writes.
            (KeyKind::PrincipalModel, Some(p)) => {
                Subject::KeyModel(&p.id, ctx.model.as_deref().map(model_key))
            }
            // Exactly one value: a client that adds its own copy next to a proxy's cannot pick
            // its bucket.
            (KeyKind::Header(name), _) => {
                let mut all = ctx.headers.get_all(name).iter();
                match (all.next(), all.next()) {
                    (Some(v), None) => Subject::Header(v.as_bytes()),
                    _ => ip,
                }
            }
            (_, None) => ip,
        }
    }

    /// The local store's key of a request.
    fn key_of(&self, ctx: &RequestCtx) -> u64 {
        self.hasher.hash_one(self.subject(ctx))
    }

    /// The limiter key in shared state, for `what` (rate, tokens, slots): the same on every
    /// replica. The hash tag is the address or principal, so one Cluster slot holds them.
    fn shared_key(&self, state: &dyn SharedState, ctx: &RequestCtx, what: &str) -> String {
        let (ip, header);
        let (tag, model) = match self.subject(ctx) {
            Subject::Ip(a) => {
                ip = ip_text(a);
                (["ip:", ip.as_str()], None)
            }
            Subject::Key(id) => (["key:", id], None),
            Subject::KeyModel(id, model) => (["key:", id], model),
            Subject::Header(v) => {
                header = Hex16::of(stable_hash(v));
                (["h:", header.as_str()], None)
            }
        };
        let kind = ["rl:", self.id.as_str(), ":", what];
        match model {
            None => state.key(&kind, &tag),
            // The client chose the model name: hashed, so it cannot make a key of any length.
            Some(m) => {
                let m = Hex16::of(stable_hash(m.as_bytes()));
                state.key(&[&kind[..], &[":m", m.as_str()]].concat(), &tag)
            }
        }
    }

    fn uses_principal(&self) -> bool {
        matches!(self.key, KeyKind::Principal | KeyKind::PrincipalModel)
    }

    /// Rate, burst and tokens per minute for this request: the principal's overrides from the
    /// keys file win over the filter's options for principal-keyed limiters.
    fn limits(&self, ctx: &RequestCtx) -> (Option<Rate>, u64, Option<u64>) {
        let mut out = (self.rate, self.burst, self.tpm);
        if let (true, Some(p)) = (self.uses_principal(), &ctx.principal) {
            if let Some(r) = p.overrides.rate {
                out.0 = Some(r);
            }
            if let Some(b) = p.overrides.burst {
                out.1 = u64::from(b);
            }
            if let Some(t) = p.overrides.tokens_per_minute {
                out.2 = Some(t);
            }
        }
        out
    }

    /// The shared call for the request rate and the token reservation (one script when the
    /// limiter has both); `None` when the limiter counts neither.
    fn shared_ask(
        &self,
        arc: &Arc<dyn SharedState>,
        ctx: &RequestCtx,
        check: &Check,
    ) -> Option<Ask> {
        let st = arc.as_ref();
        let t_us = check.rate.map(|r| (r.interval_ns() / 1000).max(1));
        let window = int(MINUTE_NS / 1_000_000);
        let (script, keys, args) = match (t_us, check.tpm.zip(check.reserve)) {
            (Some(t_us), Some((limit, n))) => (
                &shared::RATE_AND_TOKENS,
                vec![
                    self.shared_key(st, ctx, "rate"),
                    self.shared_key(st, ctx, "tokens"),
                ],
                vec![int(t_us), int(check.burst), window, int(n), int(limit)],
            ),
            (Some(t_us), None) => (
                &shared::GCRA,
                vec![self.shared_key(st, ctx, "rate")],
                vec![int(t_us), int(check.burst)],
            ),
            (None, Some((limit, n))) => (
                &shared::TOKENS_RESERVE,
                vec![self.shared_key(st, ctx, "tokens")],
                vec![window, int(n), int(limit)],
            ),
            (None, None) => return None,
        };
        // Far from the limit, served from what this replica took ahead: no call. Not in
        // `mode: delay`, which spaces requests by the time each answer says to wait.
        let chunks = (check.mode == Mode::Nodelay).then_some(&self.chunks);
        let served = chunks.and_then(|c| {
            c.serve(
                arc,
                t_us.map(|interval_us| chunks::RateKey {
                    key: &keys[0],
                    interval_us,
                    burst: check.burst,
                }),
                check
                    .tpm
                    .zip(check.reserve)
                    .map(|(limit, n)| chunks::TokensKey {
                        key: &keys[keys.len() - 1],
                        limit,
                        n,
                    }),
            )
        });
        Some(Ask {
            script,
            keys,
            args,
            served,
        })
    }

    /// The chain's first filter decides on shared state for good (no earlier check is ever
    /// waiting, so none of its counts is given back): a refusal of its rate stands until the
    /// retry time the server gave. So this replica refuses the key (the address) by itself
    /// until then, without a call: a flood from a refused address costs no round trip, and no
    /// request of it reaches the filters after this one, which run while its answer travels.
    /// Limiters further down do not remember: their counts include other requests' that an
    /// earlier refusal gives back, so a refusal may end sooner than the server said.
    fn known_refused(&self, ctx: &mut RequestCtx, check: &Check) -> Option<Rejection> {
        let rate = check.rate?;
        let retry_ns = self.store.refused_for(check.key, now_ns())?;
        let mut out = Direct {
            ctx,
            store: &self.store,
        };
        out.header(LIMIT, check.burst + 1);
        Some(check.deny(&mut out, rate, retry_ns))
    }

    fn too_many_in_flight(out: &mut impl Sink, max: u32) -> Rejection {
        out.reason("concurrency");
        too_many(
            format!("concurrency limit exceeded ({max} requests in flight)"),
            1_000_000_000,
        )
    }

    /// The request's check, owned so that it can go on after `on_request` returned.
    fn check(&self, ctx: &mut RequestCtx) -> Result<Check, Rejection> {
        let (rate, burst, tpm) = self.limits(ctx);
        // The request's output bound (the policy's cap × completions) and its prompt
        // (estimated: `prompt_tokens`) are held until the real usage is known.
        // A body on a route the gateway cannot read (a custom rule's `/v1/responses`): its
        // output cannot be bounded before nor its usage read after, so a caller held to
        // tokens per minute is refused rather than served without a count (as the budget
        // refuses a caller with a spend budget).
        if tpm.is_some() && ctx.unknown_format {
            ctx.reject_reason = Some("tokens_unenforceable");
            return Err(Rejection::new(
                StatusCode::FORBIDDEN,
                "tokens_unenforceable",
                "this route's token usage cannot be read, and the caller has a tokens-per-minute limit",
            ));
        }
        let reserve = match tpm {
            Some(limit) => {
                let prompt = ctx.prompt_tokens();
                // A request that names no output limit could generate without bound before
                // its usage is known: concurrent ones would all fit in the room their prompts
                // leave. It is given `output_reserve` per completion (no more than the
                // minute's limit leaves beside its prompt), written into its body as a cap.
                let room = limit.saturating_sub(prompt);
                let per_choice = self.output_reserve;
                output::reserve_limit(ctx, |choices| per_choice.min(room / choices))?;
                Some(ctx.max_tokens.unwrap_or(0).saturating_add(prompt))
            }
            None => None,
        };
        if let (Some(limit), Some(reserve)) = (tpm, reserve) {
            if reserve > limit {
                // Waiting never helps: said so, with no time to come back.
                ctx.reject_reason = Some("tokens_per_minute");
                return Err(Rejection::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_exceeded",
                    format!(
                        "request too large: it may use up to {reserve} tokens, more than the limit of {limit} tokens per minute, so it can never pass; ask for fewer output tokens (max_tokens) or send a shorter prompt"
                    ),
                ));
            }
        }
        Ok(Check {
            key: self.key_of(ctx),
            rate,
            burst,
            tpm,
            reserve,
            mode: self.mode,
            max_in_flight: self.max_in_flight,
            store: self.store.clone(),
            speculative: ctx.has_pending(),
            token_chunks: self
                .state
                .as_ref()
                .and_then(|st| st.chunk())
                .map(|_| self.chunks.tokens()),
            remember_refusal: self.remember_refusals,
        })
    }
}

/// One shared call: the script, its keys and arguments.
struct Ask {
    script: &'static gateway_filter::state::Script,
    keys: Vec<String>,
    args: Vec<gateway_filter::state::Arg<'static>>,
    /// The answers, when chunks taken ahead served the request.
    served: Option<chunks::Served>,
}

/// The shared answers for the rate and the tokens, with the key each was counted in: `None`
/// for either means "use the local store" (it failed and `on_error: local`).
type Answers = (Option<(String, Vec<i64>)>, Option<(String, Vec<i64>)>);

impl Ask {
    async fn send(self, st: &Arc<dyn SharedState>) -> Result<Answers, Rejection> {
        if let Some((rate, tokens)) = self.served {
            let mut keys = self.keys.into_iter();
            let rate = rate.map(|r| (keys.next().unwrap_or_default(), r));
            return Ok((rate, tokens.map(|t| (keys.next().unwrap_or_default(), t))));
        }
        let keys: Vec<&str> = self.keys.iter().map(String::as_str).collect();
        let Some(r) = ask(Some(st), self.script, &keys, &self.args).await? else {
            return Ok((None, None));
        };
        if std::ptr::eq(self.script, &shared::RATE_AND_TOKENS) && at(&r, 0) == 1 && r.len() < 9 {
            // Not this gateway's script's answer: no shared decision rather than half of one.
            return if st.fail_closed() {
                Err(gateway_filter::state::unavailable())
            } else {
                Ok((None, None))
            };
        }
        let mut keys = self.keys.into_iter();
        let first = keys.next().unwrap_or_default();
        Ok(if std::ptr::eq(self.script, &shared::TOKENS_RESERVE) {
            (None, Some((first, r)))
        } else if std::ptr::eq(self.script, &shared::RATE_AND_TOKENS) && at(&r, 0) == 1 {
            // The rate's answer as GCRA alone gives it (the new TAT fifth), the tokens' apart.
            let tokens = r[4..8].to_vec();
            let rate = vec![r[0], r[1], r[2], r[3], r[8]];
            (
                Some((first, rate)),
                Some((keys.next().unwrap_or_default(), tokens)),
            )
        } else {
            (Some((first, r)), None)
        })
    }
}

/// An address as text, as `Display` writes it: IPv4 digit by digit (an address limit on
/// shared state names a key per request, and the formatting machinery costs more than the
/// rest of the name), IPv6 through `Display`.
fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                if o >= 100 {
                    s.push(char::from(b'0' + o / 100));
                }
                if o >= 10 {
                    s.push(char::from(b'0' + o / 10 % 10));
                }
                s.push(char::from(b'0' + o % 10));
            }
            s
        }
        IpAddr::V6(_) => ip.to_string(),
    }
}

/// Header values below this are made once and shared (a clone counts a reference).
const SHARED_NUMBERS: u64 = 1024;

/// `v` as a header value. A limiter answers three or six numbers per request, most of them
/// small (limit, remaining, seconds to reset): those come from a table made once, the rest
/// are formatted (two allocations each).
fn number(v: u64) -> HeaderValue {
    static SMALL: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    match SMALL
        .get_or_init(|| (0..SHARED_NUMBERS).map(HeaderValue::from).collect())
        .get(v as usize)
    {
        Some(h) if v < SHARED_NUMBERS => h.clone(),
        _ => HeaderValue::from(v),
    }
}

/// A hash as 16 lowercase hex digits (`{:016x}`), on the stack.
struct Hex16([u8; 16]);

impl Hex16 {
    fn of(n: u64) -> Hex16 {
        let mut b = [b'0'; 16];
        // 8 bytes in, 16 digits out: cannot fail.
        let written = hex::encode_to_slice(n.to_be_bytes(), &mut b);
        debug_assert!(written.is_ok());
        Hex16(b)
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Where a check's decision goes: straight into the request (local state), or into an
/// [`Outcome`] applied once the earlier filters' deferred checks are known.
trait Sink {
    fn header(&mut self, name: HeaderName, v: u64);
    fn hold(&mut self, held: Held);
    fn reason(&mut self, reason: &'static str);
    /// The request was counted against a rate (given back if the decision is never applied).
    fn counted(&mut self, _rate: Counted) {}
}

/// A request counted against a rate by a check whose decision is not applied yet.
enum Counted {
    Local {
        key: u64,
        interval_ns: u64,
        tat_ns: u64,
    },
    Shared {
        key: String,
        interval_us: u64,
        tat_us: i64,
        /// The same arrival counted in the local store too (see `decide_rate`): its key,
        /// interval and TAT.
        local: Option<(u64, u64, u64)>,
    },
}

/// The request itself, for a check decided at once.
struct Direct<'a> {
    ctx: &'a mut RequestCtx,
    store: &'a Arc<dyn LimitStore>,
}

impl Sink for Direct<'_> {
    fn header(&mut self, name: HeaderName, v: u64) {
        self.ctx.response_headers.push((name, number(v)));
    }
    fn hold(&mut self, held: Held) {
        hold(self.ctx, self.store, held);
    }
    fn reason(&mut self, reason: &'static str) {
        self.ctx.reject_reason = Some(reason);
    }
}

/// Keeps `held` in the request's hold list until it ends.
fn hold(ctx: &mut RequestCtx, store: &Arc<dyn LimitStore>, held: Held) {
    let entry = (store.clone(), held);
    match ctx.extensions.get::<Holds>() {
        Some(holds) => holds
            .0
             .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(entry),
        None => {
            ctx.extensions
                .insert(Holds(Arc::new(HoldList(std::sync::Mutex::new(vec![
                    entry,
                ])))));
        }
    }
}

/// A deferred check's decision, not yet applied. Dropped unapplied (an earlier filter
/// refused, the client went away), it gives back what it holds.
struct Outcome {
    headers: Vec<(HeaderName, u64)>,
    reason: Option<&'static str>,
    holds: Vec<Held>,
    counted: Option<Counted>,
    store: Arc<dyn LimitStore>,
    state: Arc<dyn SharedState>,
}

impl Sink for Outcome {
    fn header(&mut self, name: HeaderName, v: u64) {
        self.headers.push((name, v));
    }
    fn hold(&mut self, held: Held) {
        self.holds.push(held);
    }
    fn reason(&mut self, reason: &'static str) {
        self.reason = Some(reason);
    }
    fn counted(&mut self, rate: Counted) {
        self.counted = Some(rate);
    }
}

impl Outcome {
    fn apply(
        mut self,
        ctx: &mut RequestCtx,
        result: Result<(), Rejection>,
    ) -> Result<(), Rejection> {
        for (name, v) in self.headers.drain(..) {
            ctx.response_headers.push((name, number(v)));
        }
        if let Some(r) = self.reason {
            ctx.reject_reason = Some(r);
        }
        for held in std::mem::take(&mut self.holds) {
            hold(ctx, &self.store, held);
        }
        self.counted = None;
        result
    }
}

impl Drop for Outcome {
    /// Never applied: an earlier check refused the request (or its client left) while this
    /// one's answer travelled. What it holds is given back, and so is its count against the
    /// rate if it was made while an earlier check's answer travelled, so a request refused
    /// for its address counts against no key's rate, tokens or slots. (A check that decided
    /// for good keeps its count when the client leaves: requests sent and dropped at once
    /// must still meet the address limit.)
    fn drop(&mut self) {
        for held in std::mem::take(&mut self.holds) {
            settle(&self.store, Some(&self.state), &held, Some(0), 0);
        }
        match self.counted.take() {
            Some(Counted::Local {
                key,
                interval_ns,
                tat_ns,
            }) => self.store.undo_rate(key, interval_ns, tat_ns, now_ns()),
            Some(Counted::Shared {
                key,
                interval_us,
                tat_us,
                local,
            }) => {
                if let Some((key, interval_ns, tat_ns)) = local {
                    self.store.undo_rate(key, interval_ns, tat_ns, now_ns());
                }
                self.state.run_detached(
                    &shared::GCRA_UNDO,
                    vec![key],
                    vec![interval_us.to_string(), tat_us.to_string()],
                )
            }
            None => {}
        }
    }
}

/// Replaces a token reservation by the tokens used (`None`: unknown, the whole reservation
/// stays counted); gives a local slot back. Shared slots give themselves back when dropped.
/// `late`: backends left after a late error, each of which may have generated to the bound:
/// the reservation again for each, on top of what was used (`None`: unknown, the reservation).
fn settle(
    store: &Arc<dyn LimitStore>,
    state: Option<&Arc<dyn SharedState>>,
    held: &Held,
    used: Option<u64>,
    late: u32,
) {
    let used_of = |reserved: u64| {
        used.unwrap_or(reserved)
            .saturating_add(reserved.saturating_mul(u64::from(late)))
    };
    match *held {
        Held::Tokens {
            key,
            start_ns,
            reserved,
        } => {
            let used = used_of(reserved);
            store.settle_tokens(key, now_ns(), MINUTE_NS, start_ns, reserved, used);
        }
        Held::SharedTokens {
            ref key,
            start_ms,
            reserved,
            ref chunks,
        } => {
            let used = used_of(reserved);
            if let Some(c) = chunks.as_ref().filter(|_| used <= reserved) {
                if c.put_back(key, start_ms, reserved - used) {
                    return;
                }
            }
            if let Some(st) = state {
                st.run_batched(
                    &shared::TOKENS_SETTLE,
                    vec![key.clone()],
                    vec![
                        (MINUTE_NS / 1_000_000).to_string(),
                        start_ms.to_string(),
                        reserved.to_string(),
                        used.min(i64::MAX as u64).to_string(),
                    ],
                );
            }
        }
        Held::Slot(key) => store.release(key),
        Held::SharedSlot { .. } => {}
    }
}

/// One request's limits, owned (see [`RateLimitFilter::check`]).
struct Check {
    key: u64,
    rate: Option<Rate>,
    burst: u64,
    tpm: Option<u64>,
    reserve: Option<u64>,
    mode: Mode,
    max_in_flight: Option<u32>,
    store: Arc<dyn LimitStore>,
    /// Made while an earlier check's answer travels (shared state): if that one refuses, the
    /// request is given back to the rate.
    speculative: bool,
    /// Shared state's refusal of the rate is remembered until its retry time (see
    /// [`RateLimitFilter::known_refused`]).
    remember_refusal: bool,
    /// The limiter's chunks of tokens, when it takes some.
    token_chunks: Option<chunks::TokenChunks>,
}

impl Check {
    /// The refusal of a request over the rate, which passes in `retry_ns`.
    fn deny(&self, out: &mut impl Sink, rate: Rate, retry_ns: u64) -> Rejection {
        out.header(REMAINING, 0);
        out.header(RESET, seconds_up(retry_ns));
        out.reason("request_rate");
        too_many(
            format!(
                "request rate limit exceeded ({}/{}s, burst {})",
                rate.count,
                rate.per.as_secs(),
                self.burst
            ),
            retry_ns,
        )
    }

    /// The rate, from the shared answer when there is one, else from the local store at
    /// `now`. Answers how long to wait first (`mode: delay`).
    fn decide_rate(
        &self,
        out: &mut impl Sink,
        shared_rate: Option<(String, Vec<i64>)>,
        now: u64,
    ) -> Result<u64, Rejection> {
        let mut wait_ns = 0;
        if let Some(rate) = self.rate {
            let burst = self.burst;
            out.header(LIMIT, burst + 1);
            let interval_ns = rate.interval_ns();
            let decision = match shared_rate {
                Some((key, r)) if at(&r, 0) == 1 => {
                    // Counted here too, so a fallback to local state goes on from this
                    // replica's own arrivals instead of a fresh burst.
                    let local = self.store.check_rate(self.key, now, interval_ns, burst);
                    if self.speculative {
                        out.counted(Counted::Shared {
                            key,
                            interval_us: (interval_ns / 1000).max(1),
                            tat_us: at(&r, 4),
                            local: match local {
                                Gcra::Allow { reset_ns, .. } => {
                                    Some((self.key, interval_ns, now + reset_ns))
                                }
                                Gcra::Deny { .. } => None,
                            },
                        });
                    }
                    Gcra::Allow {
                        delay_ns: at(&r, 1).max(0) as u64 * 1000,
                        remaining: at(&r, 2).max(0) as u64,
                        reset_ns: at(&r, 3).max(0) as u64 * 1000,
                    }
                }
                Some((_, r)) => {
                    let retry_ns = at(&r, 1).max(0) as u64 * 1000;
                    if self.remember_refusal {
                        self.store.refuse_until(self.key, now, now + retry_ns);
                    }
                    Gcra::Deny { retry_ns }
                }
                None => {
                    // Not remembered: when shared state is back, its answer is the one.
                    let g = self.store.check_rate(self.key, now, interval_ns, burst);
                    if let (true, Gcra::Allow { reset_ns, .. }) = (self.speculative, g) {
                        out.counted(Counted::Local {
                            key: self.key,
                            interval_ns,
                            tat_ns: now + reset_ns,
                        });
                    }
                    g
                }
            };
            match decision {
                Gcra::Allow {
                    delay_ns,
                    remaining,
                    reset_ns,
                } => {
                    out.header(REMAINING, remaining);
                    out.header(RESET, seconds_up(reset_ns));
                    if self.mode == Mode::Delay {
                        wait_ns = delay_ns;
                    }
                }
                Gcra::Deny { retry_ns } => return Err(self.deny(out, rate, retry_ns)),
            }
        }

        Ok(wait_ns)
    }

    /// The token reservation, from the shared answer when there is one, else from the local
    /// store at `now`.
    fn decide_tokens(
        &self,
        out: &mut impl Sink,
        shared_tokens: Option<(String, Vec<i64>)>,
        now: u64,
    ) -> Result<(), Rejection> {
        if let (Some(limit), Some(reserve)) = (self.tpm, self.reserve) {
            let (check, held) = match shared_tokens {
                Some((k, r)) => (
                    TokenCheck {
                        taken: at(&r, 0) == 1,
                        used: at(&r, 1).max(0) as u64,
                        start_ns: 0,
                        left_ns: at(&r, 3).max(0) as u64 * 1_000_000,
                    },
                    Held::SharedTokens {
                        key: k,
                        start_ms: at(&r, 2),
                        reserved: reserve.min(i64::MAX as u64),
                        chunks: self.token_chunks.clone(),
                    },
                ),
                None => {
                    let c = self
                        .store
                        .reserve_tokens(self.key, now, MINUTE_NS, reserve, limit);
                    (
                        c,
                        Held::Tokens {
                            key: self.key,
                            start_ns: c.start_ns,
                            reserved: reserve,
                        },
                    )
                }
            };
            out.header(LIMIT_TOKENS, limit);
            out.header(REMAINING_TOKENS, limit.saturating_sub(check.used));
            out.header(RESET_TOKENS, seconds_up(check.left_ns));
            if !check.taken {
                out.reason("tokens_per_minute");
                return Err(too_many(
                    format!(
                        "token limit exceeded ({limit} tokens per minute; {} used, {reserve} requested)",
                        check.used
                    ),
                    check.left_ns,
                ));
            }
            out.hold(held);
        }
        Ok(())
    }

    /// An in-flight slot from the local store.
    fn local_slot(&self, out: &mut impl Sink) -> Result<(), Rejection> {
        if let Some(max) = self.max_in_flight {
            if !self.store.acquire(self.key, max) {
                return Err(RateLimitFilter::too_many_in_flight(out, max));
            }
            out.hold(Held::Slot(self.key));
        }
        Ok(())
    }

    /// The whole check: the rate, the wait (`mode: delay`), the tokens, the slot; on shared
    /// state's answers (`answers`, and a lease for `slot_key`) where there are some.
    async fn run(
        &self,
        out: &mut impl Sink,
        state: Option<&Arc<dyn SharedState>>,
        (shared_rate, shared_tokens): Answers,
        slot_key: Option<String>,
    ) -> Result<(), Rejection> {
        // Read after the shared call: a fallback after its deadline must not judge the
        // request 20 ms in the past (it would look early against the others' arrivals).
        let now = now_ns();
        let wait_ns = self.decide_rate(out, shared_rate, now)?;
        if wait_ns > 0 {
            tokio::time::sleep(Duration::from_nanos(wait_ns)).await;
        }
        self.decide_tokens(out, shared_tokens, now)?;
        if let (Some(max), Some(st), Some(k)) = (self.max_in_flight, state, slot_key) {
            match acquire_lease(st, k, max).await {
                Ok(Some(lease)) => {
                    // This replica's own slot too (a shared one means it is free): should
                    // shared state fail, the local limit starts from the requests running
                    // here, not from none. Refused locally, the lease is given back.
                    self.local_slot(out)?;
                    out.hold(Held::SharedSlot { _lease: lease });
                    return Ok(());
                }
                Ok(None) => return Err(RateLimitFilter::too_many_in_flight(out, max)),
                Err(_) if st.fail_closed() => return Err(gateway_filter::state::unavailable()),
                Err(_) => {}
            }
        }
        self.local_slot(out)
    }
}

#[async_trait]
impl Filter for RateLimitFilter {
    fn name(&self) -> &'static str {
        "ratelimit"
    }

    /// A limiter keyed by model, or counting tokens (its own or a principal's override),
    /// reads the body; an address or key rate limit does not.
    fn needs_body(&self) -> bool {
        self.tpm.is_some() || self.uses_principal()
    }

    /// Its check, deferred on shared state, gives back what it took (the request counted
    /// against the rate, the tokens, the slot) when an earlier check refuses the request, so
    /// it runs while that check's answer travels: one round trip for both. Not in
    /// `mode: delay`, which waits out its delay before the request goes on.
    fn runs_alongside(&self) -> bool {
        self.mode == Mode::Nodelay
    }

    fn defers(&self) -> bool {
        self.state.is_some() && self.mode == Mode::Nodelay
    }

    async fn on_request(&self, ctx: &mut RequestCtx) -> Result<(), Rejection> {
        // An earlier check whose refusals are not remembered answers first: otherwise every
        // request of a client it refuses would count here (and be given back).
        if ctx.pending_costly() {
            ctx.settle_pending().await?;
        }
        let check = self.check(ctx)?;
        if check.remember_refusal {
            if let Some(refused) = self.known_refused(ctx, &check) {
                return Err(refused);
            }
        }
        let shared = self.state.as_ref().map(|st| {
            let ask = self.shared_ask(st, ctx, &check);
            let slot_key = check
                .max_in_flight
                .map(|_| self.shared_key(st.as_ref(), ctx, "slots"));
            (st.clone(), ask, slot_key)
        });
        match shared {
            // Shared state: the call goes out with the next filters' (a budget's
            // reservation), one round trip for all; the chain applies the outcome in order.
            // Not in `mode: delay`: what runs alongside would be held through the wait.
            Some((st, ask, slot_key)) if check.mode == Mode::Nodelay => {
                // Only a rate whose refusals are remembered lets the next filters run while
                // its answer travels: a refused client meets it here after that, not on the
                // server (and not in them) with every request.
                let remembered = check.remember_refusal
                    && check.rate.is_some()
                    && check.max_in_flight.is_none()
                    && check.tpm.is_none();
                let verdict: gateway_filter::defer::Deferred = Box::pin(async move {
                    let mut out = Outcome {
                        headers: Vec::with_capacity(6),
                        reason: None,
                        holds: Vec::new(),
                        counted: None,
                        store: check.store.clone(),
                        state: st.clone(),
                    };
                    let result = match ask {
                        Some(a) => a.send(&st).await,
                        None => Ok((None, None)),
                    };
                    let result = match result {
                        Ok(answers) => check.run(&mut out, Some(&st), answers, slot_key).await,
                        Err(r) => Err(r),
                    };
                    Box::new(move |ctx: &mut RequestCtx| out.apply(ctx, result))
                        as gateway_filter::defer::Verdict
                });
                if remembered {
                    ctx.defer(self.name(), verdict);
                } else {
                    ctx.defer_costly(self.name(), verdict);
                }
                Ok(())
            }
            // Decided here: without shared state, or in `mode: delay`.
            shared => {
                let (state, answers, slot_key) = match shared {
                    Some((st, Some(ask), slot_key)) => {
                        (Some(st.clone()), ask.send(&st).await?, slot_key)
                    }
                    Some((st, None, slot_key)) => (Some(st), (None, None), slot_key),
                    None => (None, (None, None), None),
                };
                let mut out = Direct {
                    ctx,
                    store: &self.store,
                };
                check.run(&mut out, state.as_ref(), answers, slot_key).await
            }
        }
    }

    /// Gives back this limiter's in-flight slots and replaces its token reservations by the
    /// request's usage: what the backend reported or the gateway counted; nothing for a
    /// request no backend got; the whole reservation when one got it and nothing is known.
    fn on_response_end(&self, ctx: &mut RequestCtx) {
        let Some(holds) = ctx.extensions.get::<Holds>() else {
            return;
        };
        let used = match ctx.usage {
            Some(u) => Some(u.total()),
            None if ctx.used_unknown() => None,
            None => Some(0),
        };
        for held in holds.take(&self.store) {
            // A shared slot gives itself back as it is dropped here.
            settle(
                &self.store,
                self.state.as_ref(),
                &held,
                used,
                ctx.late_errors,
            );
        }
    }
}

#[cfg(test)]
mod tests;
