//! The backends and what the gateway knows of them: health (passive and active), load
//! (requests and reserved tokens in flight, tokens served in the last minute, time to first
//! byte), and their models (discovered or pinned).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pingora_core::upstreams::peer::HttpPeer;

use crate::config::{BackendKind, BackendSpec, Limits, RoutingSpec};

pub use gateway_filter::model_name::canonical_model;

static CLOCK: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// Milliseconds on a process-wide monotonic clock.
fn clock_ms() -> u64 {
    CLOCK.elapsed().as_millis() as u64
}

/// Tokens served in a sliding minute: two fixed 30 s buckets, the older one weighted by how
/// much of it is still inside the minute.
#[derive(Default)]
struct TokenWindow {
    start_ms: u64,
    current: u64,
    previous: u64,
}

const HALF_MS: u64 = 30_000;

impl TokenWindow {
    fn roll(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.start_ms);
        if elapsed >= 2 * HALF_MS {
            self.previous = 0;
            self.current = 0;
            self.start_ms = now_ms;
        } else if elapsed >= HALF_MS {
            self.previous = self.current;
            self.current = 0;
            self.start_ms += HALF_MS;
        }
    }

    fn add(&mut self, now_ms: u64, n: u64) {
        self.roll(now_ms);
        self.current = self.current.saturating_add(n);
    }

    fn total(&mut self, now_ms: u64) -> u64 {
        self.roll(now_ms);
        let into = now_ms.saturating_sub(self.start_ms) as f64 / HALF_MS as f64;
        self.current
            .saturating_add((self.previous as f64 * (1.0 - into)) as u64)
    }
}

pub struct Backend {
    /// Its place in the pool (`BackendPool::get`).
    pub index: usize,
    pub name: Arc<str>,
    pub kind: BackendKind,
    pub authority: String,
    pub weight: u32,
    pub max_in_flight: Option<u32>,
    pub first_byte_timeout: Option<Duration>,
    /// Template peer with the configured timeouts; cloned per attempt.
    pub peer: HttpPeer,
    pinned: Option<HashSet<String>>,

    // Health.
    failures: AtomicU32,
    /// The callers whose server errors (ones no other backend served instead) count in the
    /// current streak (see [`BackendPool::mark_failed_for`]).
    streak_callers: std::sync::Mutex<Vec<u64>>,
    down_until_ms: AtomicU64,
    /// When it last began an answer that serves work (its first bytes), and when it last
    /// completed one (pool ms; 0: never).
    served_ms: AtomicU64,
    completed_ms: AtomicU64,
    /// When a deadline it missed last counted in full ([`BackendPool::mark_slow`]; 0: never).
    counted_ms: AtomicU64,
    /// Its cooldown came from failures requests may have caused themselves
    /// ([`BackendPool::fail_maybe_caused`]).
    out_maybe_caused: AtomicBool,
    cooldown_ms: AtomicU64,
    probe_ok: AtomicBool,

    // Load.
    in_flight: AtomicU32,
    /// Shared state said every replica together is at `max_in_flight`: treated as full until
    /// then (ms on [`clock_ms`]), then asked again.
    shared_full_until_ms: AtomicU64,
    reserved: AtomicU64,
    window: Mutex<TokenWindow>,
    /// Moving average of time to first byte, in microseconds (0 = no sample yet).
    ttfb_us: AtomicU64,
    /// Shared state: tokens served here not yet added to the replicas' window, and that
    /// window's figures (served in the last minute, reserved in flight) as of the last sync
    /// (`u64::MAX`: none, use this replica's own).
    unsynced: AtomicU64,
    shared_served: AtomicU64,
    shared_reserved: AtomicU64,

    // Models: discovered (`None` until the first successful poll) and loaded right now.
    models: RwLock<Option<HashSet<String>>>,
    loaded: RwLock<HashSet<String>>,
    /// `/api/ps` was read at least once.
    residency_known: AtomicBool,
    /// Raw `/api/tags` entries or `/v1/models` ids, for the merged catalogue.
    pub(super) catalogue: RwLock<Vec<serde_json::Value>>,
}

impl Backend {
    fn new(index: usize, spec: &BackendSpec, limits: &Limits) -> Backend {
        let mut peer = HttpPeer::new(spec.addr, false, String::new());
        peer.options.connection_timeout = Some(limits.connect_timeout);
        peer.options.total_connection_timeout = Some(limits.connect_timeout);
        peer.options.read_timeout = Some(limits.read_timeout);
        peer.options.write_timeout = Some(limits.send_timeout);
        // Below the 5 s keep-alive of uvicorn (vLLM, llama-cpp-python) and cpp-httplib
        // (llama.cpp): the gateway drops an idle connection before the server does, so a
        // request is never written into a connection the server is closing (it would not be
        // sent again: the backend may already have it).
        peer.options.idle_timeout = Some(Duration::from_secs(4));
        Backend {
            index,
            name: spec.name.clone(),
            kind: spec.kind,
            authority: spec.authority.clone(),
            weight: spec.weight.max(1),
            max_in_flight: spec.max_in_flight,
            first_byte_timeout: spec.first_byte_timeout,
            peer,
            pinned: spec
                .models
                .as_ref()
                .map(|m| m.iter().map(|s| canonical_model(s).into_owned()).collect()),
            failures: AtomicU32::new(0),
            streak_callers: Default::default(),
            down_until_ms: AtomicU64::new(0),
            served_ms: AtomicU64::new(0),
            completed_ms: AtomicU64::new(0),
            counted_ms: AtomicU64::new(0),
            out_maybe_caused: AtomicBool::new(false),
            cooldown_ms: AtomicU64::new(0),
            probe_ok: AtomicBool::new(true),
            in_flight: AtomicU32::new(0),
            shared_full_until_ms: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            window: Mutex::new(TokenWindow::default()),
            ttfb_us: AtomicU64::new(0),
            unsynced: AtomicU64::new(0),
            shared_served: AtomicU64::new(u64::MAX),
            shared_reserved: AtomicU64::new(0),
            models: RwLock::new(None),
            loaded: RwLock::new(HashSet::new()),
            residency_known: AtomicBool::new(false),
            catalogue: RwLock::new(Vec::new()),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Failures counted in its current streak.
    #[cfg(test)]
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    /// When its cooldown ends (pool ms; 0: not cooling down).
    #[cfg(test)]
    pub fn down_until(&self) -> u64 {
        self.down_until_ms.load(Ordering::Relaxed)
    }

    /// Output tokens this replica's requests in flight may still produce here.
    pub fn reserved_tokens(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }

    pub(super) fn take_unsynced(&self) -> u64 {
        self.unsynced.swap(0, Ordering::Relaxed)
    }

    pub(super) fn return_unsynced(&self, n: u64) {
        self.unsynced.fetch_add(n, Ordering::Relaxed);
    }

    /// All replicas' (served, reserved), or `None` when the sync failed.
    pub(super) fn set_shared_usage(&self, figures: Option<(u64, u64)>) {
        let (served, reserved) = figures.unwrap_or((u64::MAX, 0));
        self.shared_reserved.store(reserved, Ordering::Relaxed);
        self.shared_served.store(served, Ordering::Relaxed);
    }

    pub fn is_full(&self) -> bool {
        self.max_in_flight.is_some_and(|m| self.in_flight() >= m)
            || self.shared_full_until_ms.load(Ordering::Relaxed) > clock_ms()
    }

    /// The replicas together hold every slot: count it full for `for_ms`.
    pub fn mark_shared_full(&self, for_ms: u64) {
        self.shared_full_until_ms
            .store(clock_ms() + for_ms, Ordering::Relaxed);
    }

    /// `Some(true)` serves the model, `Some(false)` does not, `None` unknown (no list yet).
    /// `model` must already be in [`canonical_model`] form.
    pub fn serves(&self, model: &str) -> Option<bool> {
        if let Some(p) = &self.pinned {
            return Some(p.contains(model));
        }
        self.models.read().ok()?.as_ref().map(|s| s.contains(model))
    }

    /// Whether the model (in [`canonical_model`] form) is loaded in memory right now.
    pub fn has_loaded(&self, model: &str) -> bool {
        self.loaded.read().is_ok_and(|l| l.contains(model))
    }

    /// Whether the model is known *not* to be loaded (the backend's `/api/ps` was read and
    /// does not list it): its first answer waits for a cold load.
    pub fn is_cold(&self, model: &str) -> bool {
        self.residency_known.load(Ordering::Acquire) && !self.has_loaded(model)
    }

    pub fn ttfb_us(&self) -> u64 {
        self.ttfb_us.load(Ordering::Relaxed)
    }

    pub fn set_models(&self, models: HashSet<String>, catalogue: Vec<serde_json::Value>) {
        if let Ok(mut m) = self.models.write() {
            *m = Some(models);
        }
        if let Ok(mut c) = self.catalogue.write() {
            *c = catalogue;
        }
    }

    pub fn set_loaded(&self, loaded: HashSet<String>) {
        if let Ok(mut l) = self.loaded.write() {
            *l = loaded;
        }
        self.residency_known.store(true, Ordering::Release);
    }
}

/// How a miss is judged alone ([`BackendPool::mark_slow`]).
#[derive(Debug, Clone, Copy)]
pub struct Judged {
    pub caller: u64,
    /// How long the backend had had the request.
    pub waited: Duration,
    /// When it missed, on the pool's clock ([`BackendPool::now_ms`]).
    pub at_ms: u64,
    /// A break (a write broken off, a stream broken or left silent once begun), not a wait
    /// for the answer's start.
    pub broke: bool,
}

/// A request's hold on a backend: counted in its in-flight load until dropped.
pub struct Lease {
    pool: Arc<PoolInner>,
    idx: usize,
    reserved: u64,
    /// Its slot among all replicas' (shared state, backends with `max_in_flight`).
    pub shared: Option<gateway_filter::state::SharedLease>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let b = &self.pool.backends[self.idx];
        b.in_flight.fetch_sub(1, Ordering::Relaxed);
        b.reserved.fetch_sub(self.reserved, Ordering::Relaxed);
        self.pool.freed.notify_waiters();
    }
}

pub(super) struct PoolInner {
    pub backends: Vec<Backend>,
    epoch: Instant,
    fail_threshold: u32,
    cooldown: Duration,
    cooldown_max: Duration,
    /// Woken whenever a lease ends (least-busy waiters).
    pub freed: tokio::sync::Notify,
    /// Shared with the other replicas: backend slots.
    pub state: Option<Arc<dyn gateway_filter::SharedState>>,
    /// Held while a failure the request may have caused is counted
    /// ([`BackendPool::fail_maybe_caused`]): two backends cannot both go out on such
    /// failures at one moment.
    maybe_caused: Mutex<()>,
}

/// The configured backends with their state. Cheap to clone.
#[derive(Clone)]
pub struct BackendPool(pub(super) Arc<PoolInner>);

impl BackendPool {
    pub fn new(specs: &[BackendSpec], limits: &Limits, routing: &RoutingSpec) -> BackendPool {
        BackendPool(Arc::new(PoolInner {
            backends: specs
                .iter()
                .enumerate()
                .map(|(i, s)| Backend::new(i, s, limits))
                .collect(),
            epoch: Instant::now(),
            fail_threshold: routing.fail_threshold.max(1),
            cooldown: routing.cooldown,
            cooldown_max: routing.cooldown_max,
            freed: tokio::sync::Notify::new(),
            state: None,
            maybe_caused: Mutex::new(()),
        }))
    }

    /// Shares the backends' `max_in_flight` slots with the other replicas.
    pub fn with_state(
        mut self,
        state: Option<Arc<dyn gateway_filter::SharedState>>,
    ) -> BackendPool {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.state = state;
        }
        self
    }

    pub fn state(&self) -> Option<&Arc<dyn gateway_filter::SharedState>> {
        self.0.state.as_ref()
    }

    pub fn len(&self) -> usize {
        self.0.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.backends.is_empty()
    }

    pub fn get(&self, idx: usize) -> &Backend {
        &self.0.backends[idx]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Backend> {
        self.0.backends.iter()
    }

    /// Milliseconds since the pool was made: when a miss happened, for [`Self::mark_slow`].
    pub fn now_ms(&self) -> u64 {
        self.0.epoch.elapsed().as_millis() as u64
    }

    /// Up: not cooling down after failures and answering its health probe.
    pub fn is_up(&self, idx: usize) -> bool {
        let b = &self.0.backends[idx];
        b.probe_ok.load(Ordering::Relaxed)
            && b.down_until_ms.load(Ordering::Relaxed) <= self.now_ms()
    }

    /// A request failed on the backend (connect error, timeout, 5xx). After `fail_threshold`
    /// consecutive failures it cools down; each further failure while it cools down doubles
    /// the cooldown, to a cap (once the cooldown is over, a new streak starts).
    /// A backend standing by ([`Self::is_standby`]) is sent requests while it cools down on
    /// purpose: their failures change nothing (its probe decides whether it is down).
    pub fn mark_failed(&self, idx: usize) {
        let _streak = self.streak(idx);
        if !self.is_standby(idx) {
            self.fail(idx);
        }
    }

    /// The backend's current streak, its callers locked: every change of the streak
    /// (counting, a new streak, a success) happens under it. A cooldown that has ended starts
    /// a new streak, of failures and callers (its length doubles the next cooldown all the
    /// same): counted on from the old one, a single failure after each cooldown kept a backend
    /// out, one slow request per cooldown from one client.
    fn streak(&self, idx: usize) -> std::sync::MutexGuard<'_, Vec<u64>> {
        let b = &self.0.backends[idx];
        let mut callers = b.streak_callers.lock().unwrap_or_else(|p| p.into_inner());
        let until = b.down_until_ms.load(Ordering::Relaxed);
        if until != 0 && until <= self.now_ms() {
            b.down_until_ms.store(0, Ordering::Relaxed);
            b.failures.store(0, Ordering::Relaxed);
            b.out_maybe_caused.store(false, Ordering::Relaxed);
            callers.clear();
        }
        callers
    }

    /// Counts a failure (under [`Self::streak`]); answers whether the backend is now cooling
    /// down.
    fn fail(&self, idx: usize) -> bool {
        let inner = &self.0;
        let b = &inner.backends[idx];
        let n = b.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let down = n >= inner.fail_threshold;
        if down {
            let prev = b.cooldown_ms.load(Ordering::Relaxed);
            let next = if prev == 0 {
                inner.cooldown.as_millis() as u64
            } else {
                (prev * 2).min(inner.cooldown_max.as_millis() as u64)
            };
            b.cooldown_ms.store(next, Ordering::Relaxed);
            b.down_until_ms
                .store(self.now_ms() + next, Ordering::Relaxed);
            log::warn!(
                "backend {} failed {n} times in a row: cooling down for {next} ms",
                b.name
            );
        }
        down
    }

    /// Counts a failure a request may have caused itself (a missed deadline, a server
    /// error, a write the backend broke off), under [`Self::streak`]. The failure that would
    /// take the backend out is not counted while another backend is out on such failures:
    /// whoever sends them, such requests take out one backend at a time (a hung backend among
    /// several still goes out; one client, or several together, with requests slow or failing
    /// by themselves cannot empty the pool). A backend out on them stands by
    /// ([`Self::is_standby`]): requests that no backend up can take still go to it, so no
    /// model or wire format is left without one. Answers whether it counted.
    fn fail_maybe_caused(&self, idx: usize) -> bool {
        let inner = &self.0;
        let _one_at_a_time = inner.maybe_caused.lock().unwrap_or_else(|p| p.into_inner());
        let b = &inner.backends[idx];
        if b.failures.load(Ordering::Relaxed) + 1 >= inner.fail_threshold {
            let now = self.now_ms();
            let other_out = inner.backends.iter().enumerate().any(|(i, o)| {
                i != idx
                    && o.out_maybe_caused.load(Ordering::Relaxed)
                    && o.down_until_ms.load(Ordering::Relaxed) > now
            });
            if other_out {
                return false;
            }
        }
        if self.fail(idx) {
            b.out_maybe_caused.store(true, Ordering::Relaxed);
        }
        true
    }

    /// Out on failures requests may have caused ([`Self::fail_maybe_caused`]) and answering
    /// its probe: the router still sends it what no backend up can take.
    pub fn is_standby(&self, idx: usize) -> bool {
        let b = &self.0.backends[idx];
        b.probe_ok.load(Ordering::Relaxed)
            && b.out_maybe_caused.load(Ordering::Relaxed)
            && b.down_until_ms.load(Ordering::Relaxed) > self.now_ms()
    }

    /// Whether the backend cools down now (asked under [`Self::streak`]: nothing counts then,
    /// requests still running on it would each double the cooldown).
    fn cooling(&self, idx: usize) -> bool {
        self.0.backends[idx].down_until_ms.load(Ordering::Relaxed) > self.now_ms()
    }

    /// A server error answered to `caller` (a hash of its principal; anonymous callers are
    /// one), or deadlines a request missed on several backends (slow by itself): a failure
    /// only for the first such of each caller in the streak, so it takes `fail_threshold`
    /// callers to take the backend out. A backend that fails everyone is taken out; one
    /// client's requests that fail by design (llama.cpp's 500 for a malformed tool call)
    /// cannot build a streak, nor can two. A new streak (after a cooldown) starts a new round
    /// of callers. Bounded as in [`Self::fail_maybe_caused`].
    pub fn mark_failed_for(&self, idx: usize, caller: u64) {
        let mut callers = self.streak(idx);
        if !self.cooling(idx) {
            self.fail_once_for(idx, caller, &mut callers);
        }
    }

    fn fail_once_for(&self, idx: usize, caller: u64, callers: &mut Vec<u64>) {
        if callers.contains(&caller) {
            return;
        }
        if self.fail_maybe_caused(idx) && callers.len() < 64 {
            callers.push(caller);
        }
    }

    /// A server error the backend answered to a request another backend then served: the
    /// backend's own, whoever sent it (though a request can ask what only some backends can
    /// do: bounded as in [`Self::fail_maybe_caused`]).
    pub fn mark_server_error(&self, idx: usize) {
        let _streak = self.streak(idx);
        if !self.cooling(idx) {
            self.fail_maybe_caused(idx);
        }
    }

    /// A deadline the backend missed (or a break: a write it broke off, a stream it broke or
    /// left silent once its answer began) at `at_ms` ([`Self::now_ms`]) with a request of
    /// `caller` that had waited `waited` on it, which the request may have caused itself (a
    /// long prompt, a slow model), judged alone once the request ended
    /// ([`super::MissedDeadlines`]). It counts in full only when nothing explains it but the
    /// backend: for a miss before its answer, it began no answer to another request since
    /// this one began to wait (one that was answering others has a busy queue at worst); for
    /// a break, it completed none (a backend that breaks every stream after its first bytes
    /// begins answers all the time); and no miss since was counted in full (a burst of slow
    /// requests on a quiet backend is one failure, not one each). Otherwise once per caller
    /// in the streak. Either way bounded as in [`Self::fail_maybe_caused`]. Nothing while it
    /// cools down.
    pub fn mark_slow(&self, idx: usize, miss: Judged) {
        let b = &self.0.backends[idx];
        let mut callers = self.streak(idx);
        if self.cooling(idx) {
            return;
        }
        let started = miss.at_ms.saturating_sub(miss.waited.as_millis() as u64);
        let served = if miss.broke {
            b.completed_ms.load(Ordering::Relaxed)
        } else {
            b.served_ms.load(Ordering::Relaxed)
        };
        let explained =
            (served != 0 && served >= started) || b.counted_ms.load(Ordering::Relaxed) >= started;
        if explained {
            self.fail_once_for(idx, miss.caller, &mut callers);
        } else if self.fail_maybe_caused(idx) {
            // When the miss happened (judged later, a burst's misses still overlap it).
            b.counted_ms.fetch_max(miss.at_ms.max(1), Ordering::Relaxed);
            // Its caller counted: its misses explained by this one add nothing more.
            if callers.len() < 64 && !callers.contains(&miss.caller) {
                callers.push(miss.caller);
            }
        }
    }

    /// The backend began an answer that serves work (a generation's first bytes): it is not
    /// hung ([`Self::mark_slow`] reads this).
    pub fn mark_serving(&self, idx: usize) {
        self.0.backends[idx]
            .served_ms
            .store(self.now_ms().max(1), Ordering::Relaxed);
    }

    /// A request succeeded: the failure streak and the cooldown reset. (A passing health
    /// probe does not reset them: a backend that answers probes but fails requests stays out.)
    pub fn mark_ok(&self, idx: usize) {
        let b = &self.0.backends[idx];
        // Never 0 (which means "never"): the pool's clock starts at its creation.
        let now = self.now_ms().max(1);
        b.served_ms.store(now, Ordering::Relaxed);
        b.completed_ms.store(now, Ordering::Relaxed);
        if b.failures.load(Ordering::Relaxed) != 0 {
            let mut callers = b.streak_callers.lock().unwrap_or_else(|p| p.into_inner());
            callers.clear();
            b.failures.store(0, Ordering::Relaxed);
            b.cooldown_ms.store(0, Ordering::Relaxed);
            b.down_until_ms.store(0, Ordering::Relaxed);
            b.out_maybe_caused.store(false, Ordering::Relaxed);
        }
    }

    pub fn set_probe(&self, idx: usize, ok: bool) {
        let b = &self.0.backends[idx];
        if b.probe_ok.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                log::info!("backend {} answers its health probe again", b.name);
            } else {
                log::warn!("backend {} fails its health probe", b.name);
            }
        }
    }

    /// Counts a request at the backend, with the output tokens it may still produce.
    pub fn lease(&self, idx: usize, reserved: u64) -> Lease {
        let b = &self.0.backends[idx];
        let reserved = reserved.min(super::MAX_TOKENS_COUNTED);
        b.in_flight.fetch_add(1, Ordering::Relaxed);
        b.reserved.fetch_add(reserved, Ordering::Relaxed);
        Lease {
            pool: self.0.clone(),
            idx,
            reserved,
            shared: None,
        }
    }

    /// Like [`Self::lease`], but only if the backend is below its `max_in_flight`, checked and
    /// taken in one atomic step so concurrent requests cannot overfill it.
    pub fn try_lease(&self, idx: usize, reserved: u64) -> Option<Lease> {
        let b = &self.0.backends[idx];
        let reserved = reserved.min(super::MAX_TOKENS_COUNTED);
        let Some(max) = b.max_in_flight else {
            return Some(self.lease(idx, reserved));
        };
        let mut cur = b.in_flight.load(Ordering::Relaxed);
        loop {
            if cur >= max {
                return None;
            }
            match b.in_flight.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        b.reserved.fetch_add(reserved, Ordering::Relaxed);
        Some(Lease {
            pool: self.0.clone(),
            idx,
            reserved,
            shared: None,
        })
    }

    /// Tokens the backend served, and its time to first byte, after a response.
    pub fn record(&self, idx: usize, tokens: u64, ttfb: Option<Duration>) {
        let b = &self.0.backends[idx];
        // A backend's figure, bounded so that sums of them cannot wrap.
        let tokens = tokens.min(super::MAX_TOKENS_COUNTED);
        if let Ok(mut w) = b.window.lock() {
            w.add(self.now_ms(), tokens);
        }
        if self.0.state.is_some() {
            b.unsynced.fetch_add(tokens, Ordering::Relaxed);
        }
        if let Some(t) = ttfb {
            let sample = t.as_micros() as u64;
            let old = b.ttfb_us.load(Ordering::Relaxed);
            let new = if old == 0 {
                sample
            } else {
                (old * 4 + sample) / 5
            };
            b.ttfb_us.store(new.max(1), Ordering::Relaxed);
        }
    }

    /// Tokens in the last minute plus output tokens reserved by requests in flight.
    pub fn usage_score(&self, idx: usize) -> u64 {
        let b = &self.0.backends[idx];
        let served = b.window.lock().map_or(0, |mut w| w.total(self.now_ms()));
        let reserved = b.reserved.load(Ordering::Relaxed);
        // With shared state: every replica's figures as of the last sync, plus what this one
        // did since (its own figures if they are larger, e.g. just after a failed sync).
        let shared = b.shared_served.load(Ordering::Relaxed);
        if shared == u64::MAX {
            return served.saturating_add(reserved);
        }
        let all_served = shared.saturating_add(b.unsynced.load(Ordering::Relaxed));
        let all_reserved = b.shared_reserved.load(Ordering::Relaxed).max(reserved);
        all_served.max(served).saturating_add(all_reserved)
    }

    /// Waits until some lease ends (or the deadline passes).
    /// Waits until a lease ends or `deadline`, unless `still_full` (asked once the wait is
    /// registered, so a lease ending in between is not missed) says there is room already.
    pub async fn wait_freed(
        &self,
        deadline: tokio::time::Instant,
        still_full: impl FnOnce() -> bool,
    ) {
        let freed = self.0.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if still_full() {
            let _ = tokio::time::timeout_at(deadline, freed).await;
        }
    }

    /// The merged model list: every model once, with the first backend's entry for it.
    pub fn catalogue(&self) -> Option<Vec<(String, serde_json::Value)>> {
        let mut seen: HashSet<String> = HashSet::new();
        let mut out = Vec::new();
        let mut any = false;
        let mut add = |key: String, entry: serde_json::Value| {
            if seen.insert(key.clone()) {
                out.push((key, entry));
            }
        };
        for b in self.iter() {
            any |= b.pinned.is_some() || b.models.read().is_ok_and(|m| m.is_some());
            if let Some(p) = &b.pinned {
                for m in p {
                    add(m.clone(), serde_json::json!({"name": m, "model": m}));
                }
                continue;
            }
            for entry in b.catalogue.read().map(|c| c.clone()).unwrap_or_default() {
                let name = entry
                    .get("name")
                    .or_else(|| entry.get("id"))
                    .and_then(|n| n.as_str())
                    .map(|n| canonical_model(n).into_owned());
                if let Some(key) = name {
                    add(key, entry);
                }
            }
        }
        any.then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_window_slides() {
        let mut w = TokenWindow::default();
        w.add(0, 100);
        assert_eq!(w.total(10_000), 100);
        w.add(31_000, 50);
        // The first bucket is still fully counted a moment after it closed…
        assert!(w.total(31_000) >= 145);
        // …and fades out over the next 30 s.
        assert_eq!(w.total(59_999), 50);
        assert_eq!(w.total(200_000), 0);
    }
}
