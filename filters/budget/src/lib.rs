//! The `budget` filter: spend caps per principal and for the whole gateway, from real token
//! usage and a price table, with reservations that concurrent requests cannot race, and a
//! durable SQLite ledger that survives restarts.

mod book;
mod ledger;
mod period;
mod prices;
mod shared;

use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use gateway_filter::defer::Verdict;
use gateway_filter::http::{header, HeaderName, HeaderValue, StatusCode};
use gateway_filter::units::HumanDuration;
use gateway_filter::{
    output, parse_options, BuildContext, Filter, OptionsError, Rejection, RequestCtx, SharedState,
    Usage,
};
use prometheus::{CounterVec, GaugeVec, IntCounter, Opts};
use serde::Deserialize;

use book::{Book, Budget};
pub use ledger::{report, ReportRow};
use period::day_string;
pub use period::{civil, day_of, month_days, now_secs, Calendar, Period};
use prices::{usd_to_nano, Nano, Price, PriceTable};

/// The reserved principal id of the whole-gateway budget (no principal may carry it).
pub const GLOBAL: &str = gateway_filter::GLOBAL_ACCOUNT;

struct Metrics {
    spend: CounterVec,
    remaining: GaugeVec,
    rejections: IntCounter,
    soft: IntCounter,
    /// Ledger commits that failed (a full disk): their charges wait in memory, lost if the
    /// process ends first.
    ledger_failures: IntCounter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = prometheus::default_registry();
    let spend = CounterVec::new(
        Opts::new(
            "llm_gateway_spend_usd_total",
            "USD charged, by principal and model",
        ),
        &["principal", "model"],
    )
    .unwrap_or_else(|_| unreachable!("valid metric"));
    let remaining = GaugeVec::new(
        Opts::new(
            "llm_gateway_budget_remaining_usd",
            "USD left in the current period",
        ),
        &["principal"],
    )
    .unwrap_or_else(|_| unreachable!("valid metric"));
    let rejections = IntCounter::new(
        "llm_gateway_budget_rejections_total",
        "Requests refused by a budget",
    )
    .unwrap_or_else(|_| unreachable!("valid metric"));
    let soft = IntCounter::new(
        "llm_gateway_budget_soft_limit_total",
        "Requests past a budget's soft threshold",
    )
    .unwrap_or_else(|_| unreachable!("valid metric"));
    let ledger_failures = IntCounter::new(
        "llm_gateway_ledger_commit_failures_total",
        "Spend ledger commits that failed (their charges wait in memory and are tried again)",
    )
    .unwrap_or_else(|_| unreachable!("valid metric"));
    let _ = r.register(Box::new(ledger_failures.clone()));
    let _ = r.register(Box::new(spend.clone()));
    let _ = r.register(Box::new(remaining.clone()));
    let _ = r.register(Box::new(rejections.clone()));
    let _ = r.register(Box::new(soft.clone()));
    Metrics {
        spend,
        remaining,
        rejections,
        soft,
        ledger_failures,
    }
});

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// SQLite file; created if missing.
    ledger: PathBuf,
    #[serde(default)]
    prices: Vec<Price>,
    #[serde(default)]
    unpriced: Unpriced,
    /// For principals without `max_usd` in the keys file.
    default: Option<BudgetSpec>,
    /// The whole gateway's budget (LiteLLM's `max_budget` / `budget_duration`).
    global: Option<BudgetSpec>,
    /// Fraction of a budget (e.g. 0.8) past which responses carry `X-Budget-Warning`.
    soft_limit: Option<f64>,
    /// Prompt tokens are estimated as body bytes / this, for the reservation.
    #[serde(default = "default_chars_per_token")]
    chars_per_token: f64,
    /// Output tokens reserved when the request sets no cap (the policy's cap is better).
    #[serde(default = "output::default_reserve")]
    output_reserve: u64,
    /// Seconds of generation reserved for per-second prices.
    #[serde(default = "default_reserve_seconds")]
    reserve_seconds: f64,
    #[serde(default = "default_commit")]
    commit_interval: HumanDuration,
}

fn default_chars_per_token() -> f64 {
    4.0
}
fn default_reserve_seconds() -> f64 {
    60.0
}
fn default_commit() -> HumanDuration {
    HumanDuration(Duration::from_millis(250))
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct BudgetSpec {
    max_usd: f64,
    #[serde(default = "default_period")]
    period: String,
}

fn default_period() -> String {
    "1mo".into()
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Unpriced {
    /// A model with no price costs nothing.
    #[default]
    Free,
    /// A model with no price is refused.
    Reject,
}

pub struct BudgetFilter {
    prices: PriceTable,
    unpriced: Unpriced,
    default: Option<(Nano, Period)>,
    global: Option<(Nano, Period)>,
    soft_limit: Option<f64>,
    chars_per_token: f64,
    output_reserve: u64,
    reserve_seconds: f64,
    book: Arc<Book>,
    ledger: ledger::Ledger,
    /// Spend shared with the other replicas, under this replica's ledger id.
    shared: Option<(Arc<dyn SharedState>, Arc<str>)>,
    /// Budgets taken ahead on shared state, far from their limits.
    chunks: shared::BudgetChunks,
    /// Bounded label values of the spend metrics (principals from outside, model names).
    labels: Arc<gateway_filter::labels::MetricLabels>,
}

/// A request's hold on its budgets, kept in its context. Settled exactly once: by
/// `on_response_end` as the answer ends (its charge goes to the ledger in `on_complete`), or,
/// if the request's context is dropped without it (shutdown cutting a request short), by
/// `Drop`, which charges the whole reservation (the backend may have run it) to the book and
/// the ledger. `Drop` also queues a booked charge that `on_complete` did not send.
struct Reservation {
    book: Arc<Book>,
    budgets: Vec<Budget>,
    amount: Nano,
    /// The day it was made (a day number): its charge goes to the ledger under that day, as
    /// the book and shared state hold it in that day's periods.
    day: i64,
    ledger: tokio::sync::mpsc::Sender<ledger::Msg>,
    principal: String,
    model: String,
    settled: std::sync::atomic::AtomicBool,
    /// Booked at the answer's end, not yet sent to the ledger.
    unsent: std::sync::Mutex<Option<Nano>>,
    /// Its places in shared state, one per budget, and the replica's ledger id.
    shared: Option<SharedHolds>,
}

/// A reservation's places in shared state: the state, this replica's ledger id, one hold per
/// budget.
type SharedHolds = (Arc<dyn SharedState>, Arc<str>, Vec<shared::Hold>);

impl Reservation {
    /// Books `charged` and releases the reservation; `None` if it was already settled.
    fn settle(&self, charged: Nano) -> Option<Vec<Nano>> {
        if self.settled.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return None;
        }
        let left = self.book.settle(&self.budgets, self.amount, charged);
        if let Some((st, replica, holds)) = &self.shared {
            for h in holds {
                shared::settle(st, replica, h, self.book.spent(&self.budgets[h.index()]));
            }
        }
        Some(left)
    }

    /// `charged` is booked and still to be written to the ledger.
    fn owe(&self, charged: Nano) {
        *self.unsent.lock().unwrap_or_else(|p| p.into_inner()) = Some(charged);
    }

    /// What is still to be written to the ledger, taken.
    fn owed(&self) -> Option<Nano> {
        self.unsent.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let unsent = self.owed();
        if let Some(nano) = unsent {
            let msg = ledger::Msg::Charge {
                day: day_string(self.day),
                principal: self.principal.clone(),
                model: self.model.clone(),
                nano,
            };
            if self.ledger.try_send(msg).is_err() {
                log::error!("budget: a request's charge could not be queued for the ledger");
            }
        } else if self.settle(self.amount).is_some() {
            self.book.remember(&self.principal, self.day, self.amount);
            let msg = ledger::Msg::Charge {
                day: day_string(self.day),
                principal: std::mem::take(&mut self.principal),
                model: std::mem::take(&mut self.model),
                nano: self.amount,
            };
            if self.ledger.try_send(msg).is_err() {
                log::error!(
                    "budget: a request ended without settling and its charge could not be queued"
                );
            }
        }
    }
}

/// The context's handle on the reservation (extensions must be `Clone`).
#[derive(Clone)]
struct Held(Arc<Reservation>);

fn spec(s: &BudgetSpec, key: &str) -> Result<(Nano, Period), OptionsError> {
    if !s.max_usd.is_finite() || s.max_usd < 0.0 {
        return Err(OptionsError::new(
            format!("{key}.max_usd"),
            "must be a number of USD, 0 or more",
        ));
    }
    let p = Period::parse(&s.period).map_err(|m| OptionsError::new(format!("{key}.period"), m))?;
    Ok((usd_to_nano(s.max_usd), p))
}

/// Registry constructor: `- use: budget` plus [`Options`].
pub fn build(
    options: &serde_json::Value,
    cx: &BuildContext,
) -> Result<Arc<dyn Filter>, OptionsError> {
    let o: Options = parse_options(options)?;
    let prices = PriceTable::new(o.prices);
    prices
        .validate()
        .map_err(|m| OptionsError::new("prices", m.to_string()))?;
    if o.soft_limit.is_some_and(|f| !(0.0..=1.0).contains(&f)) {
        return Err(OptionsError::new(
            "soft_limit",
            "a fraction between 0 and 1, e.g. 0.8",
        ));
    }
    if !(o.reserve_seconds.is_finite() && o.reserve_seconds >= 0.0) {
        return Err(OptionsError::new(
            "reserve_seconds",
            "must be 0 or more seconds (a negative reservation would add room to a budget)",
        ));
    }
    if o.chars_per_token <= 0.0 {
        return Err(OptionsError::new(
            "chars_per_token",
            "must be greater than 0",
        ));
    }
    let default = o.default.as_ref().map(|s| spec(s, "default")).transpose()?;
    let global = o.global.as_ref().map(|s| spec(s, "global")).transpose()?;
    if default.is_none() && global.is_none() {
        // Spend is counted against budgets: without one, nothing is charged or recorded.
        log::warn!(
            "budget: no `default` or `global` budget: only principals with a `max_usd` of their own (keys file) are charged and recorded in the ledger; add `global: {{ max_usd: ..., period: 1mo }}` to record everyone's spend"
        );
    }
    let path = cx.resolve(&o.ledger);
    let (history, replica) = if cx.check_only {
        // `check`: read, never created (as root it would be left root's).
        ledger::check(&path).map(|()| (ledger::History::default(), String::new()))
    } else {
        ledger::load(&path)
    }
    .map_err(|m| OptionsError::new("ledger", format!("cannot open the ledger: {m}")))?;
    let shared = cx
        .state
        .as_ref()
        .map(|st| (st.clone(), Arc::<str>::from(replica)));
    let (tx, rx) = tokio::sync::mpsc::channel(10_000);
    let seen = ledger::recent(&history, now_secs());
    let book = Arc::new(Book::new(history));
    let foreign = Arc::downgrade(&book);
    if !cx.check_only {
        ledger::spawn(
            path,
            o.commit_interval.0,
            rx,
            seen,
            Box::new(move |principal, day, nano| {
                if let Some(book) = foreign.upgrade() {
                    book.add_foreign(principal, day, nano);
                }
            }),
        )
        .map_err(|m| OptionsError::new("ledger", m.to_string()))?;
    }
    LazyLock::force(&METRICS);
    if let Some((st, replica)) = &shared {
        let (weak, book, replica) = (Arc::downgrade(st), book.clone(), replica.clone());
        let periods = (default.map(|d| d.1), global.map(|g| g.1));
        st.on_reset(Box::new(move || {
            if let Some(st) = weak.upgrade() {
                repair_all(&st, &replica, &book, periods);
            }
        }));
    }
    Ok(Arc::new(BudgetFilter {
        prices,
        unpriced: o.unpriced,
        default,
        global,
        soft_limit: o.soft_limit,
        chars_per_token: o.chars_per_token,
        output_reserve: o.output_reserve,
        reserve_seconds: o.reserve_seconds,
        book,
        ledger: ledger::Ledger { tx },
        shared,
        chunks: Default::default(),
        labels: cx.labels.clone(),
    }))
}

/// Puts this replica's spend back into shared state: every account this process knows, and
/// the current period of every principal its ledger knows (as `/admin/spend` lists them).
fn repair_all(
    st: &Arc<dyn SharedState>,
    replica: &str,
    book: &Book,
    (_default, global): (Option<Period>, Option<Period>),
) {
    let snapshot = book.snapshot();
    let mut calls = Vec::with_capacity(snapshot.len());
    let mut known = std::collections::HashSet::with_capacity(snapshot.len());
    for ((principal, period_key), a) in &snapshot {
        calls.push(shared::repair(
            st.as_ref(),
            replica,
            principal,
            period_key,
            a.spent,
        ));
        known.insert((principal.as_str(), period_key.as_str()));
    }
    let now = now_secs();
    let mut principals = book.ledger_principals();
    // The global budget's spend is everyone's: in the ledger under no name of its own.
    if global.is_some() {
        principals.push(GLOBAL.to_string());
    }
    for principal in &principals {
        let principal = principal.as_str();
        // A key's own period (keys file) is known only when it is used: every period's
        // current share is put back, so whichever it is finds its spend.
        for period in [Period::Day, Period::Week, Period::Month, Period::Total] {
            let key = period.key(now);
            if known.contains(&(principal, key.as_str())) {
                continue;
            }
            let spent = book.ledger_spend(principal, period, now);
            if spent > 0 {
                calls.push(shared::repair(st.as_ref(), replica, principal, &key, spent));
            }
        }
    }
    shared::put_back(st, calls);
}

fn principal_id(ctx: &RequestCtx) -> &str {
    ctx.principal
        .as_deref()
        .map_or(gateway_filter::ANONYMOUS, |p| p.id.as_str())
}

/// Seconds the backend spent on the request: from when it had the whole request (reading
/// the prompt is GPU time too, and a whole answer's first byte comes only when the
/// generation is over) to the end of its answer, once for each completion it ran side by
/// side (`n: 64` held 64 of the batch's places for those seconds, and was charged one).
fn generation_secs(ctx: &RequestCtx) -> f64 {
    match (ctx.sent.or(ctx.ttfb), ctx.duration) {
        (Some(t), Some(d)) => d.saturating_sub(t).as_secs_f64() * ctx.completions.max(1) as f64,
        _ => 0.0,
    }
}

/// What a request asks of its budgets, before anything is reserved.
struct Ask {
    book: Arc<Book>,
    budgets: Vec<Budget>,
    amount: Nano,
    now: i64,
    ledger: tokio::sync::mpsc::Sender<ledger::Msg>,
    principal: String,
    model: String,
}

impl Ask {
    /// Reserves the amount in this replica's book: the reservation and `(spent with it,
    /// limit)` per budget, or the budget that cannot take it.
    fn reserve(self) -> Result<(Reservation, Vec<(Nano, Nano)>), Budget> {
        let after = self
            .book
            .reserve(&self.budgets, self.amount, self.now)
            .map_err(|r| r.budget)?;
        let res = Reservation {
            book: self.book,
            budgets: self.budgets,
            amount: self.amount,
            day: self.now.div_euclid(86_400),
            ledger: self.ledger,
            principal: self.principal,
            model: self.model,
            settled: Default::default(),
            unsent: Default::default(),
            shared: None,
        };
        Ok((res, after))
    }
}

/// A reservation made but not yet the request's (its shared answer is awaited with the
/// other filters'). Dropped unapplied (an earlier filter refused, the client went away, or
/// shared state refused it), it gives back what it reserved, in the book and in shared state.
struct Unused(Option<Reservation>);

impl Unused {
    fn budgets(&self) -> &[Budget] {
        self.0.as_ref().map_or(&[], |r| &r.budgets)
    }

    fn set_shared(&mut self, holds: SharedHolds) {
        if let Some(r) = self.0.as_mut() {
            r.shared = Some(holds);
        }
    }

    fn admit(&mut self, ctx: &mut RequestCtx, soft_limit: Option<f64>, after: &[(Nano, Nano)]) {
        if let Some(res) = self.0.take() {
            admit(ctx, soft_limit, res, after);
        }
    }
}

impl Drop for Unused {
    fn drop(&mut self) {
        if let Some(res) = self.0.take() {
            res.settle(0);
        }
    }
}

/// The request holds `res` until it ends; past the soft limit, the response says so.
/// `after`: `(spent with it, limit)` per budget.
fn admit(ctx: &mut RequestCtx, soft_limit: Option<f64>, res: Reservation, after: &[(Nano, Nano)]) {
    if let Some(soft) = soft_limit {
        if let Some((b, (used, limit))) = res
            .budgets
            .iter()
            .zip(after)
            .find(|(_, (u, l))| *l > 0 && *u as f64 >= soft * *l as f64)
        {
            METRICS.soft.inc();
            let pct = (*used as f64 / *limit as f64 * 100.0).min(100.0);
            if let Ok(v) = HeaderValue::from_str(&format!(
                "{pct:.0}% of the {} budget of {} used",
                b.period.name(),
                if b.principal == GLOBAL {
                    "gateway"
                } else {
                    "this key"
                }
            )) {
                ctx.response_headers
                    .push((HeaderName::from_static("x-budget-warning"), v));
            }
        }
    }
    ctx.extensions.insert(Held(Arc::new(res)));
}

/// The most one request is charged: far above any real request (a million dollars), far
/// below where sums of them could overflow the ledger's integers.
const MAX_CHARGE: Nano = 1_000_000 * 1_000_000_000;

/// The answer when the request's reservation alone is more than a key's budget `b`: waiting
/// never helps, so no `Retry-After`.
fn too_large(ctx: &mut RequestCtx, b: &Budget, amount: Nano) -> Rejection {
    METRICS.rejections.inc();
    ctx.reject_reason = Some("request_over_budget");
    Rejection::new(
        StatusCode::TOO_MANY_REQUESTS,
        "budget_exceeded",
        format!(
            "request too large: it may cost up to ${:.2}, more than this key's whole budget of ${:.2} per {}, so it can never pass; ask for fewer output tokens (max_tokens) or completions (n), or send a shorter prompt",
            amount as f64 / 1e9,
            b.limit as f64 / 1e9,
            b.period.name()
        ),
    )
}

/// The answer when budget `b` cannot take the request.
fn refuse(ctx: &mut RequestCtx, b: &Budget, now: i64) -> Rejection {
    METRICS.rejections.inc();
    ctx.reject_reason = Some(if b.principal == GLOBAL {
        "global_budget"
    } else {
        "principal_budget"
    });
    let reset = b.period.resets_at(now);
    let when = reset.map_or("never (total budget)".to_string(), |t| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t as u64))
            .to_string()
    });
    let whose = if b.principal == GLOBAL {
        "the gateway's"
    } else {
        "this key's"
    };
    // The gateway's own budget is the operator's business: its size is not told to callers.
    let size = if b.principal == GLOBAL {
        String::new()
    } else {
        format!(" of ${:.2}", b.limit as f64 / 1e9)
    };
    let mut r = Rejection::new(
        StatusCode::TOO_MANY_REQUESTS,
        "budget_exceeded",
        format!(
            "{whose} budget{size} per {} is used up; it resets at {when}",
            b.period.name()
        ),
    );
    if let Some(t) = reset {
        r = r.with_header(
            header::RETRY_AFTER,
            HeaderValue::from((t - now).max(1) as u64),
        );
    }
    r
}

impl BudgetFilter {
    /// A request that names no output limit (no cap before this filter either) could
    /// generate without bound before its usage is known: it is given `output_reserve` per
    /// completion, written into every field its backends read (as the policy's cap is), and
    /// reserved that many times over. Routes that generate nothing reserve no output.
    fn bound_output(&self, ctx: &mut RequestCtx) -> Result<u64, Rejection> {
        if !output::generates(ctx.route) {
            return Ok(0);
        }
        output::reserve_limit(ctx, |_| self.output_reserve)?;
        Ok(ctx.max_tokens.unwrap_or(self.output_reserve))
    }

    /// The prompt's tokens as reserved: the body's bytes at `chars_per_token`, or the text and
    /// media estimate tokens per minute use (768 tokens an image, a token per CJK character)
    /// where that is more: ten tiny images are a few hundred bytes and thousands of tokens.
    fn prompt_estimate(&self, ctx: &mut RequestCtx) -> u64 {
        let bytes = (ctx.bytes_in as f64 / self.chars_per_token).ceil() as u64;
        bytes.max(ctx.prompt_tokens())
    }

    /// The budgets this request is held to: its principal's (keys-file `max_usd` and
    /// `period`, else `default`) and the global one.
    fn budgets(&self, ctx: &RequestCtx, now: i64) -> Vec<Budget> {
        let mut out = Vec::with_capacity(2);
        let own = match ctx
            .principal
            .as_deref()
            .and_then(|p| p.overrides.max_usd.map(|m| (m, p.overrides.period)))
        {
            Some((max, period)) => Some((
                usd_to_nano(max),
                period.unwrap_or_else(|| self.default.map_or(Period::Month, |d| d.1)),
            )),
            None => self.default,
        };
        if let Some((limit, period)) = own {
            out.push(Budget {
                principal: principal_id(ctx).to_string(),
                period,
                period_key: period.key(now),
                limit,
            });
        }
        if let Some((limit, period)) = self.global {
            out.push(Budget {
                principal: GLOBAL.to_string(),
                period,
                period_key: period.key(now),
                limit,
            });
        }
        out
    }
}

/// `403 model_unpriced` under `unpriced: reject`.
fn unpriced(ctx: &mut RequestCtx, model: &str) -> Rejection {
    let shown = gateway_filter::echo(model).to_string();
    ctx.reject_reason = Some("unpriced_model");
    Rejection::new(
        StatusCode::FORBIDDEN,
        "model_unpriced",
        format!("model {shown:?} has no price on this gateway"),
    )
}

impl BudgetFilter {
    /// The model a request is priced by: the one it names; on a custom route (no `model` of
    /// the gateway's own reading), the dearest of those its body names (`named_models`: Go's
    /// decoder takes the last of `model`, `Model`…, so pricing the first let a cheap name
    /// cover a dear one). A body that names none is priced by a `*` entry, if any.
    fn priced_as<'a>(&self, ctx: &'a RequestCtx) -> &'a str {
        if let Some(m) = ctx.model.as_deref() {
            return m;
        }
        let probe = Usage {
            prompt_tokens: 1_000_000,
            completion_tokens: 1_000_000,
            ..Default::default()
        };
        ctx.named_models
            .iter()
            .max_by_key(|m| self.prices.worst_case(m, probe, 1.0).unwrap_or(0))
            .map_or("", String::as_str)
    }

    /// Reserves `amount` in `budgets` for the request (at once, or with the next filters'
    /// calls on shared state), or refuses it.
    fn reserve(
        &self,
        ctx: &mut RequestCtx,
        budgets: Vec<Budget>,
        amount: Nano,
        now: i64,
        model: String,
    ) -> Result<(), Rejection> {
        // A request whose reservation alone is more than a budget can never pass (and a
        // figure near the integers' end, from `"n": 1e300`, must never reach the sums).
        // (A budget of $0 is one that is used up; the gateway's own is answered as used up
        // too: the size of what a request may cost would tell callers its size.)
        if let Some(b) = budgets.iter().find(|b| amount > b.limit && b.limit > 0) {
            return Err(if b.principal == GLOBAL {
                refuse(ctx, b, now)
            } else {
                too_large(ctx, b, amount)
            });
        }
        let ask = Ask {
            book: self.book.clone(),
            budgets,
            amount,
            now,
            ledger: self.ledger.tx.clone(),
            principal: principal_id(ctx).to_string(),
            model,
        };
        let Some((st, replica)) = &self.shared else {
            return match ask.reserve() {
                Ok((res, after)) => {
                    admit(ctx, self.soft_limit, res, &after);
                    Ok(())
                }
                Err(b) => Err(refuse(ctx, &b, now)),
            };
        };
        // Shared state: the reservation goes out with the other filters' calls (the key's
        // rate limit), one round trip for all; the chain applies the outcome in order. The
        // book's reservation is made then too, and a refusal is counted only when it is the
        // request's answer (an earlier filter's refusal comes first).
        let (st, replica, soft) = (st.clone(), replica.clone(), self.soft_limit);
        let chunks = self.chunks.clone();
        ctx.defer(
            self.name(),
            Box::pin(async move {
                let (res, after) = match ask.reserve() {
                    Ok(taken) => taken,
                    Err(b) => {
                        return Box::new(move |ctx: &mut RequestCtx| Err(refuse(ctx, &b, now)))
                            as Verdict
                    }
                };
                let mine: Vec<_> = res.budgets.iter().map(|b| res.book.spent(b)).collect();
                let mut unused = Unused(Some(res));
                let answer =
                    shared::reserve(&st, &chunks, &replica, unused.budgets(), &mine, amount, now)
                        .await;
                match answer {
                    Ok(shared::Reserved::Taken(holds, after)) => {
                        unused.set_shared((st, replica, holds));
                        Box::new(move |ctx| {
                            unused.admit(ctx, soft, &after);
                            Ok(())
                        })
                    }
                    Ok(shared::Reserved::Refused(i)) => {
                        let b = unused.budgets()[i].clone();
                        drop(unused);
                        Box::new(move |ctx| Err(refuse(ctx, &b, now)))
                    }
                    Err(_) if st.fail_closed() => {
                        drop(unused);
                        Box::new(|_| Err(gateway_filter::state::unavailable()))
                    }
                    // `on_error: local`: this replica's book alone holds it.
                    Err(_) => Box::new(move |ctx| {
                        unused.admit(ctx, soft, &after);
                        Ok(())
                    }),
                }
            }),
        );
        Ok(())
    }
}

#[async_trait]
impl Filter for BudgetFilter {
    fn name(&self) -> &'static str {
        "budget"
    }

    /// Reservations are sized by the request's output bound, read from the body.
    fn needs_body(&self) -> bool {
        true
    }

    /// It reads nothing earlier limiters decide, and its reservation gives itself back
    /// when one of them refuses.
    fn runs_alongside(&self) -> bool {
        true
    }

    /// On shared state, its reservation's answer travels while the next filters run.
    fn defers(&self) -> bool {
        self.shared.is_some()
    }

    async fn on_request(&self, ctx: &mut RequestCtx) -> Result<(), Rejection> {
        let now = now_secs();
        if !ctx.route.is_inference() {
            if !ctx.unknown_format {
                return Ok(());
            }
            // A body on a route the gateway cannot read (a custom rule's `/v1/responses`):
            // its cost cannot be bounded before it runs, so a caller with a budget of its own
            // is refused rather than served for free.
            let budgets = self.budgets(ctx, now);
            if budgets.iter().any(|b| b.principal != GLOBAL) {
                ctx.reject_reason = Some("budget_unenforceable");
                return Err(Rejection::new(
                    StatusCode::FORBIDDEN,
                    "budget_unenforceable",
                    "this route's cost cannot be read, and the caller has a spend budget",
                ));
            }
            if budgets.is_empty() {
                return Ok(());
            }
            // Every name the body gives must have a price (the backend runs one of them).
            let bare = ctx
                .named_models
                .iter()
                .find(|m| !self.prices.has(m))
                .cloned();
            if let (Some(m), Unpriced::Reject) = (bare, self.unpriced) {
                return Err(unpriced(ctx, &m));
            }
            let model = self.priced_as(ctx).to_string();
            // Only the global budget (closing such routes to everyone would be its price):
            // what the route reports using is charged after it ran, at the price of the model
            // its body names, and nothing passes once the budget is spent (the least
            // reservation: a nano-dollar). It was served free and never recorded (billing
            // review).
            return self.reserve(ctx, budgets, 1, now, model);
        }
        let budgets = self.budgets(ctx, now);
        let priced = self.prices.has(self.priced_as(ctx));
        if !priced && self.unpriced == Unpriced::Reject {
            let model = self.priced_as(ctx).to_string();
            return Err(unpriced(ctx, &model));
        }
        if budgets.is_empty() {
            return Ok(());
        }
        // Only a request for a model with a price is bounded (and its own limit written
        // plainly); the prompt is estimated only here, where a budget is kept.
        let completion_tokens = match ctx.max_tokens {
            _ if priced => self.bound_output(ctx)?,
            Some(n) => n,
            None => self.output_reserve,
        };
        let prompt_tokens = self.prompt_estimate(ctx);
        let model = self.priced_as(ctx);
        let estimate = Usage {
            prompt_tokens,
            completion_tokens,
            ..Default::default()
        };
        let amount = self
            .prices
            .worst_case(
                model,
                estimate,
                self.reserve_seconds * ctx.completions.max(1) as f64,
            )
            .unwrap_or(0);
        let model = model.to_string();
        self.reserve(ctx, budgets, amount, now, model)
    }

    fn on_response_end(&self, ctx: &mut RequestCtx) {
        let Some(Held(res)) = ctx.extensions.get::<Held>().cloned() else {
            return;
        };
        // Never sent to a backend, or refused by it (4xx, 5xx) without usage: nothing was
        // generated. Sent: the usage the backend reported, or what the gateway counted passing
        // (`Usage::counted`) when it reported none. Sent, and nothing came back (timeout,
        // connection dropped): it may have run, so the reservation is charged.
        let charged = match (ctx.reached_backend, &ctx.backend, ctx.usage) {
            (true, Some(backend), Some(u)) => {
                let model = self.priced_as(ctx);
                let secs = generation_secs(ctx);
                match self.prices.find(model, Some(backend)) {
                    Some(p) => p.cost(u, secs),
                    // Priced only for other backends, served by one without a price: under
                    // `unpriced: reject` nothing is free, so the dearest price that applies.
                    None if self.unpriced == Unpriced::Reject => {
                        self.prices.worst_case(model, u, secs).unwrap_or(0)
                    }
                    None => 0,
                }
            }
            // The gateway gave up on the backend (its own 5xx), or a 2xx/3xx without usage.
            _ if ctx.used_unknown() => res.amount,
            _ => 0,
        };
        // Backends given up on after holding the request read its prompt too (the last one
        // reports only its own usage): each is charged the prompt's estimate, and per-second
        // prices the time it held the request.
        let charged = match ctx.abandoned {
            0 => charged,
            n if !ctx.used_unknown() => {
                let prompt_tokens = self.prompt_estimate(ctx);
                let model = self.priced_as(ctx);
                let prompt = Usage {
                    prompt_tokens,
                    ..Default::default()
                };
                let each = self.prices.worst_case(model, prompt, 0.0).unwrap_or(0);
                let held = self
                    .prices
                    .worst_case(model, Usage::default(), ctx.abandoned_secs)
                    .unwrap_or(0);
                // Those left after a late error may have generated to the bound: each is
                // charged the reservation (which covers its prompt) instead.
                let late = ctx.late_errors.min(n);
                charged
                    .saturating_add(each.saturating_mul(i64::from(n - late)))
                    .saturating_add(res.amount.saturating_mul(i64::from(late)))
                    .saturating_add(held)
            }
            // Charged the whole reservation already: it covers what they may have read, but
            // not what a backend left after a late error may have generated besides.
            _ => charged.saturating_add(res.amount.saturating_mul(i64::from(ctx.late_errors))),
        };
        // Never a figure the sums (and the ledger's integers) cannot hold.
        let charged = charged.clamp(0, MAX_CHARGE);
        let Some(left) = res.settle(charged) else {
            return;
        };
        // Labelled as the gateway's own metrics are: principals named from outside (a JWT's
        // subject) and model names take bounded slots, so neither adds a series per name.
        let principal_label = self.labels.principal(ctx.principal.as_deref());
        for (b, l) in res.budgets.iter().zip(left) {
            let label = if b.principal == GLOBAL {
                GLOBAL
            } else if principal_label == b.principal {
                principal_label
            } else {
                // Not labelled by principal, or out of slots: one gauge for many accounts
                // would say nothing true.
                continue;
            };
            METRICS
                .remaining
                .with_label_values(&[label])
                .set(l as f64 / 1e9);
        }
        if !ctx.reached_backend {
            return;
        }
        let principal = principal_id(ctx);
        // Only what was charged makes a series: a name the backend refused (a 404 for a model
        // it does not have) costs nothing and must not add a series per made-up name.
        if charged > 0 {
            // A new name takes a slot only once a backend served it (as the gateway's own
            // series): names charged for an error or a timeout stay `other` until then.
            let served = (200..400).contains(&ctx.status);
            let model = self.labels.model(ctx.model.as_deref(), served);
            METRICS
                .spend
                .with_label_values(&[principal_label, model])
                .inc_by(charged as f64 / 1e9);
        }
        // Opened later (another period, a key whose period changed on reload), an account
        // starts from what the ledger holds: this charge included.
        self.book.remember(principal, res.day, charged);
        res.owe(charged);
        ctx.cost_usd = Some(charged as f64 / 1e9);
    }

    async fn on_complete(&self, ctx: &mut RequestCtx) {
        // The charge booked as the answer ended goes to the ledger (its queue may make us wait).
        let Some(Held(res)) = ctx.extensions.remove::<Held>() else {
            return;
        };
        let Some(nano) = res.owed() else {
            return;
        };
        let msg = ledger::Msg::Charge {
            day: day_string(res.day),
            principal: principal_id(ctx).to_string(),
            model: ctx.model.clone().unwrap_or_default(),
            nano,
        };
        if let Err(e) = self.ledger.tx.send(msg).await {
            log::error!("budget: the ledger writer has stopped; charge lost: {e}");
        }
    }

    async fn admin_report(&self) -> Option<(&'static str, serde_json::Value)> {
        let snapshot = self.book.snapshot();
        let mut accounts: Vec<serde_json::Value> = Vec::with_capacity(snapshot.len());
        for ((principal, period), a) in &snapshot {
            let mut row = serde_json::json!({"principal": principal, "period": period,
                "spent_usd": a.spent as f64 / 1e9, "reserved_usd": a.reserved as f64 / 1e9});
            // With shared state: every replica's spend and reservations together; this
            // replica's own share stays in spent_usd.
            if let Some((st, _)) = &self.shared {
                if let Ok((spent, held)) = shared::totals(st, principal, period).await {
                    row["shared_spent_usd"] = (spent as f64 / 1e9).into();
                    row["shared_reserved_usd"] = (held as f64 / 1e9).into();
                }
            }
            accounts.push(row);
        }
        // Principals with spend from earlier runs who have not asked since the restart: their
        // current period's spend from the ledger (a per-key period is known only once the key
        // is used; until then the default budget's period, or the whole history).
        let now = now_secs();
        let mut quiet: Vec<String> = self.book.ledger_principals();
        if self.global.is_some() {
            quiet.push(GLOBAL.to_string());
        }
        quiet.retain(|p| !snapshot.iter().any(|((q, _), _)| q == p));
        quiet.sort_unstable();
        for principal in quiet.iter().map(String::as_str) {
            let period = if principal == GLOBAL {
                self.global
            } else {
                self.default
            }
            .map_or(Period::Total, |(_, p)| p);
            let spent = self.book.ledger_spend(principal, period, now);
            accounts.push(
                serde_json::json!({"principal": principal, "period": period.key(now),
                "spent_usd": spent as f64 / 1e9, "reserved_usd": 0.0}),
            );
        }
        let state = match &self.shared {
            None => "local",
            Some((st, _)) if st.degraded() => "degraded",
            Some(_) => "shared",
        };
        Some((
            "spend",
            serde_json::json!({"state": state, "accounts": accounts}),
        ))
    }

    fn shutdown(&self) {
        // What the chunks taken ahead hold is given back with the last settlements.
        drop(self.chunks.end_all());
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        let tx = self.ledger.tx.clone();
        let sent = std::thread::spawn(move || tx.blocking_send(ledger::Msg::Flush(ack)).is_ok())
            .join()
            .unwrap_or(false);
        // A commit that failed (a full disk) is said to have failed: the charges it held are
        // lost with the process, and the operator must know.
        if sent && done.recv_timeout(Duration::from_secs(30)) == Ok(true) {
            log::info!("budget: ledger committed");
        } else {
            log::error!("budget: could not commit the ledger before exit; charges since the last commit are lost");
        }
    }
}

#[cfg(test)]
mod tests;
