//! Shared state on Redis or Valkey (`state: { backend: redis }`): what replicas share so a
//! limit, a budget or a backend's capacity holds across all of them together.
//!
//! One multiplexed connection (redis-rs `ConnectionManager`: concurrent calls are pipelined on
//! it, it reconnects with backoff). Every call has a deadline (`state.timeout`) and goes
//! through a circuit breaker: after `breaker_failures` failures in a row the circuit opens,
//! calls fail at once (the filters fall back to local state, or answer 503 with
//! `on_error: reject`), and a probe on the state's own thread closes it again when the server
//! answers. The change is logged once and shown as `llm_gateway_state_degraded` and in
//! `/health`. The same thread renews the holds of running requests and notices when the server
//! lost its data, so the filters can put back what only they know (spend from the ledger).

mod batch;
mod breaker;
mod reply;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use gateway_filter::state::{Arg, Keep, Renewal, Script, SharedState, StateError, PUT_BACK};
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntGauge};
use redis::aio::ConnectionManager;

use crate::config::{OnError, StateSpec};
use batch::Batches;
use breaker::Breaker;
use reply::{Ints, Reply};

/// Why shared state could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("bad url or TLS settings: {0}")]
    Client(#[source] redis::RedisError),
    #[error("cannot read the CA file {path}: {source}")]
    Ca {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot start the state thread: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot register metrics: {0}")]
    Metrics(#[source] prometheus::Error),
}

/// Marks this process's view of the data: absent means the server lost it (or this process
/// just started). Answers whether it was there.
static ALIVE: Script = Script {
    name: "alive",
    source: r#"
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return {existed}
"#,
};

/// Calls of a paced run (`run_paced`) on their way at once.
const PACED_AT_ONCE: usize = 32;

/// At most this often, the filters put back what they know after a lost settlement or
/// release (after an outage or lost data: at once).
const LOST_PUT_BACK_EVERY: Duration = Duration::from_secs(5);

/// A script as sent: its hash, its text, its duration histogram.
type Compiled = (Arc<redis::Script>, Arc<str>, Histogram);

pub struct RedisState {
    inner: Arc<Inner>,
    /// The state's own thread: probes, renewals, detached calls. Dropped at exit.
    _runtime: Arc<tokio::runtime::Runtime>,
}

struct Inner {
    /// Names this state's connections in each thread's table (never reused).
    id: u64,
    /// The state thread's connection (probes, renewals, detached calls).
    conn: ConnectionManager,
    /// For the connections of request threads (see [`Inner::conn`]).
    client: redis::Client,
    config: redis::aio::ConnectionManagerConfig,
    /// Each script (packed or as written: [`reply`]) with its hash, its text for
    /// `SCRIPT LOAD`, and its child of `llm_gateway_state_call_duration_seconds`.
    scripts: RwLock<HashMap<(usize, bool), Compiled>>,
    prefix: String,
    member_base: String,
    next: AtomicU64,
    timeout: Duration,
    connect_timeout: Duration,
    lease_ms: u64,
    chunk: Option<gateway_filter::chunk::ChunkSpec>,
    retry: Duration,
    on_error: OnError,
    breaker: Breaker,
    /// The holds of running requests, renewed by [`Inner::renew`].
    keeps: Mutex<HashMap<u64, Arc<Renewal>>>,
    /// Settlements waiting to be sent together (`run_batched`), and for how long.
    batches: Batches,
    settle_window: Duration,
    /// Batches taken and on their way (the exit flush waits for them).
    sending: AtomicUsize,
    /// A detached call (a settlement, a release) failed: at the next probe that answers, the
    /// filters put back what they know (spend from the ledger), as after an outage.
    lost: AtomicBool,
    resets: Mutex<Vec<Arc<dyn Fn() + Send + Sync>>>,
    handle: tokio::runtime::Handle,
    degraded: IntGauge,
    errors: IntCounter,
    durations: HistogramVec,
    /// Whether the server runs scripts packed ([`reply`]): not known until it first answers.
    packs: AtomicU8,
    /// Held by the paced run on its way (`run_paced`).
    pacing: tokio::sync::Mutex<()>,
    /// A paced run waits for its turn.
    pace_waiting: AtomicBool,
}

impl std::fmt::Debug for RedisState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisState")
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

fn metric<T: prometheus::core::Collector + Clone + 'static>(
    m: prometheus::Result<T>,
) -> Result<T, SetupError> {
    let m = m.map_err(SetupError::Metrics)?;
    match prometheus::default_registry().register(Box::new(m.clone())) {
        Ok(()) | Err(prometheus::Error::AlreadyReg) => Ok(m),
        Err(e) => Err(SetupError::Metrics(e)),
    }
}

impl RedisState {
    /// Sets up the client and the state's thread, and asks the server once (within
    /// `connect_timeout`, twice that when it answers: it is also asked whether its Lua can
    /// pack answers): a server that is down at start leaves the gateway running on local
    /// state until it answers.
    pub fn start(spec: &StateSpec) -> Result<RedisState, SetupError> {
        let client = client(spec)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("llm-gateway-state")
            .enable_all()
            .build()
            .map_err(SetupError::Runtime)?;
        // Our own deadline bounds every call (redis-rs would add 500 ms of its own).
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(spec.connect_timeout))
            .set_number_of_retries(1)
            .set_max_delay(spec.breaker_retry);
        // The connection's driver task lives on the state's runtime, not a proxy thread's.
        let conn = {
            let _enter = runtime.enter();
            ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                .map_err(SetupError::Client)?
        };
        let degraded = metric(IntGauge::new(
            "llm_gateway_state_degraded",
            "1 while shared state (Redis) is unreachable and this replica runs on local state or refuses (state.on_error)",
        ))?;
        let errors = metric(IntCounter::new(
            "llm_gateway_state_errors_total",
            "Shared-state calls that failed or passed their deadline",
        ))?;
        // From sending a call to its answer being back with the request: Redis, the network
        // and this side's wake-ups.
        let durations = metric(HistogramVec::new(
            HistogramOpts::new(
                "llm_gateway_state_call_duration_seconds",
                "Shared-state (Redis) script calls, from sending to the answer, by script",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            &["script"],
        ))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        static IDS: AtomicU64 = AtomicU64::new(1);
        let inner = Arc::new(Inner {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            conn,
            client,
            config,
            scripts: RwLock::new(HashMap::new()),
            prefix: spec.prefix.clone(),
            member_base: format!("{host}:{}:{:08x}", std::process::id(), fastrand::u32(..)),
            next: AtomicU64::new(1),
            timeout: spec.timeout,
            connect_timeout: spec.connect_timeout,
            lease_ms: spec.lease_ttl.as_millis() as u64,
            chunk: spec.chunk,
            retry: spec.breaker_retry,
            on_error: spec.on_error,
            breaker: Breaker::new(spec.breaker_failures),
            keeps: Mutex::new(HashMap::new()),
            batches: Batches::default(),
            settle_window: spec.settle_window,
            sending: AtomicUsize::new(0),
            lost: AtomicBool::new(false),
            resets: Mutex::new(Vec::new()),
            handle: runtime.handle().clone(),
            degraded,
            errors,
            durations,
            packs: AtomicU8::new(UNKNOWN),
            pacing: tokio::sync::Mutex::new(()),
            pace_waiting: AtomicBool::new(false),
        });
        let up = runtime.block_on(inner.probe());
        match &up {
            Ok(()) => log::info!("state: shared through {}", redacted(&spec.url)),
            Err(e) => {
                inner.breaker.open();
                inner.degraded.set(1);
                log::warn!(
                    "state: {} does not answer ({e}); {} until it does",
                    redacted(&spec.url),
                    inner.fallback()
                );
            }
        }
        runtime.spawn(Inner::watch(inner.clone()));
        runtime.spawn(Inner::renew(inner.clone()));
        Ok(RedisState {
            inner,
            _runtime: Arc::new(runtime),
        })
    }
}

/// The server's client: its address, password, TLS roots and socket settings.
fn client(spec: &StateSpec) -> Result<redis::Client, SetupError> {
    let mut info = redis::IntoConnectionInfo::into_connection_info(spec.url.as_str())
        .map_err(SetupError::Client)?;
    if let Some(pw) = &spec.password {
        let settings = info.redis_settings().clone().set_password(pw.clone());
        info = info.set_redis_settings(settings);
    }
    // Calls go out the moment they are made (redis-rs leaves Nagle on): with it, a call
    // made while another request's call is on its way waits for that one's answer, a
    // round trip more in the tail.
    info = info.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    match &spec.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| SetupError::Ca {
                path: path.display().to_string(),
                source,
            })?;
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
        }
        None => redis::Client::open(info),
    }
    .map_err(SetupError::Client)
}

/// The URL without its password, for logs.
fn redacted(url: &str) -> String {
    gateway_filter::redact::without_secrets(url)
}

/// Runs a script by its hash; a server that does not know it (restarted, flushed, failed
/// over) is given its text, then asked again.
async fn evalsha<T: Reply>(
    cmd: &redis::Cmd,
    text: &str,
    conn: &mut ConnectionManager,
) -> redis::RedisResult<T> {
    match cmd.query_async::<T>(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(text)
                .query_async::<()>(conn)
                .await?;
            cmd.query_async::<T>(conn).await
        }
        r => r,
    }
}

thread_local! {
    /// Each runtime thread's own connection per state, and how its connecting went.
    static CONNS: std::cell::RefCell<Vec<(u64, ConnectionManager, Arc<AtomicU8>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;

const CONNECTING: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;

impl Inner {
    /// The connection for a request's call from this thread. A request thread gets one of its
    /// own, made on its runtime, so the connection's driver runs on the proxy's runtime rather
    /// than the state thread's (with `threads: 1`, no other thread is woken per call). Until it
    /// has connected (in the background), the state thread's connection serves, so no request
    /// waits for a handshake; one that failed to connect is made again at the next call.
    fn conn(&self) -> ConnectionManager {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.conn.clone();
        }
        CONNS.with(|c| {
            let mut c = c.borrow_mut();
            if let Some(i) = c.iter().position(|(id, _, _)| *id == self.id) {
                match c[i].2.load(Ordering::Acquire) {
                    READY => return c[i].1.clone(),
                    CONNECTING => return self.conn.clone(),
                    _ => {
                        c.swap_remove(i);
                    }
                }
            }
            if let Ok(conn) =
                ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
            {
                let state = Arc::new(AtomicU8::new(CONNECTING));
                c.push((self.id, conn.clone(), state.clone()));
                let (mut warm, timeout) = (conn, self.connect_timeout);
                tokio::spawn(async move {
                    let ping = redis::cmd("PING");
                    let answered = ping.query_async::<String>(&mut warm);
                    let ok = matches!(tokio::time::timeout(timeout, answered).await, Ok(Ok(_)));
                    state.store(if ok { READY } else { FAILED }, Ordering::Release);
                });
            }
            self.conn.clone()
        })
    }

    /// Runs `task` on the caller's runtime when there is one (a request's thread); from a
    /// plain thread (a drop at exit), on the state's.
    fn spawn_here(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn(task)),
            Err(_) => drop(self.handle.spawn(task)),
        }
    }

    fn fallback(&self) -> &'static str {
        match self.on_error {
            OnError::Local => "each replica enforces its limits on its own",
            OnError::Reject => "requests that need it are refused with 503",
        }
    }

    fn script(&self, s: &'static Script, packed: bool) -> Compiled {
        let id = (s as *const Script as usize, packed);
        if let Some(found) = self.scripts.read().ok().and_then(|m| m.get(&id).cloned()) {
            return found;
        }
        let text: Arc<str> = if packed {
            reply::packed(s.source).into()
        } else {
            s.source.into()
        };
        let compiled = (
            Arc::new(redis::Script::new(&text)),
            text,
            self.durations.with_label_values(&[s.name]),
        );
        if let Ok(mut m) = self.scripts.write() {
            m.insert(id, compiled.clone());
        }
        compiled
    }

    /// One script call within `deadline`; `own`: on the state thread's connection (probes,
    /// renewals), else on this thread's.
    async fn call<T: Reply>(
        &self,
        script: &'static Script,
        keys: &[&str],
        args: &[Arg<'_>],
        deadline: Duration,
        own: bool,
    ) -> Result<T, StateError> {
        // The command is written straight from the arguments (`ScriptInvocation` would copy
        // each into a vector of its own first): several calls are made per request.
        // A script with a shebang line (`#!lua flags=...`) must stay first in its text.
        let packed = T::PACKED
            && self.packs.load(Ordering::Relaxed) == YES
            && !script.source.starts_with("#!");
        let (compiled, text, duration) = self.script(script, packed);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(compiled.get_hash()).arg(keys.len());
        for k in keys {
            cmd.arg(*k);
        }
        for a in args {
            match a {
                Arg::Int(i) => cmd.arg(*i),
                Arg::Str(s) => cmd.arg(*s),
            };
        }
        let mut conn = if own { self.conn.clone() } else { self.conn() };
        let run = async {
            match evalsha::<T>(&cmd, &text, &mut conn).await {
                // A connection the server closed (it restarted, failed over) is found broken
                // by the first call made on it (each proxy thread has one): once more, on the
                // connection made again, rather than fail a request or lose a release.
                Err(e) if e.is_connection_dropped() => evalsha::<T>(&cmd, &text, &mut conn).await,
                r => r,
            }
        };
        let started = std::time::Instant::now();
        match tokio::time::timeout(deadline, run).await {
            // Answers only: a refused connection fails fast and would make an outage look
            // quick; failures and timeouts count in `llm_gateway_state_errors_total`.
            Ok(Ok(v)) => {
                duration.observe(started.elapsed().as_secs_f64());
                Ok(v)
            }
            Ok(Err(e)) => Err(StateError::Failed(e.to_string())),
            Err(_) => Err(StateError::Timeout(deadline)),
        }
    }

    /// A request's call: fails at once while the circuit is open.
    async fn guarded<T: Reply>(
        &self,
        script: &'static Script,
        keys: &[&str],
        args: &[Arg<'_>],
    ) -> Result<T, StateError> {
        if self.breaker.is_open() {
            return Err(StateError::Unavailable);
        }
        let r = self.call(script, keys, args, self.timeout, false).await;
        match &r {
            Ok(_) => self.breaker.success(),
            Err(e) => {
                self.errors.inc();
                if self.breaker.failure() {
                    self.degraded.set(1);
                    log::warn!(
                        "state: degraded ({e}, script {}); {} until it answers again",
                        script.name,
                        self.fallback()
                    );
                }
            }
        }
        r
    }

    /// Runs the filters' reset hooks (they only queue detached calls).
    fn put_back(&self) {
        let hooks: Vec<_> = self.resets.lock().map(|h| h.clone()).unwrap_or_default();
        hooks.iter().for_each(|h| h());
    }

    async fn probe(&self) -> Result<(), StateError> {
        if self.packs.load(Ordering::Relaxed) == UNKNOWN {
            let mut conn = self.conn.clone();
            let ask = redis::cmd("EVAL").arg(reply::CAN_PACK).arg(0).to_owned();
            let can = ask.query_async::<i64>(&mut conn);
            match tokio::time::timeout(self.connect_timeout, can).await {
                Ok(Ok(1)) => self.packs.store(YES, Ordering::Relaxed),
                Err(_) => return Err(StateError::Timeout(self.connect_timeout)),
                // No `EVAL` for this user (ACL) or through this proxy is an answer; anything
                // else (not connected, loading, busy) is a probe that failed: asked again.
                Ok(Err(e))
                    if !matches!(
                        e.kind(),
                        redis::ErrorKind::Server(
                            redis::ServerErrorKind::NoPerm | redis::ServerErrorKind::ResponseError
                        )
                    ) =>
                {
                    return Err(StateError::Failed(e.to_string()))
                }
                // No `struct`, or no `EVAL`: the scripts run as written (their answers are
                // slower to read, nothing else changes).
                answer => {
                    let why = match answer {
                        Ok(Err(e)) => e.to_string(),
                        _ => "its Lua has no struct library".into(),
                    };
                    log::info!("state: scripts answer unpacked, slower to read ({why})");
                    self.packs.store(NO, Ordering::Relaxed);
                }
            }
        }
        let key = format!("{}alive:{{{}}}", self.prefix, self.member_base);
        let Ints(v) = self
            .call(
                &ALIVE,
                &[&key],
                &[Arg::Int(3_600_000)],
                self.connect_timeout,
                true,
            )
            .await?;
        if gateway_filter::state::at(&v, 0) == 0 {
            // New to this process: first start, or the server lost its data.
            log::info!("state: the server holds nothing of this replica; putting back what it knows (spend from its ledger)");
            self.put_back();
        }
        Ok(())
    }

    /// The state thread's loop: probe (closing an open circuit), notice lost data.
    async fn watch(self: Arc<Self>) {
        // When a lost settlement or release last made the filters put back what they know:
        // a slow server that fails some of those calls too must not have them sent again
        // every probe.
        let mut last_put_back: Option<std::time::Instant> = None;
        loop {
            let open = self.breaker.is_open();
            tokio::time::sleep(if open {
                self.breaker.wait(self.retry)
            } else {
                self.retry.min(Duration::from_secs(1))
            })
            .await;
            match self.probe().await {
                // A circuit that keeps reopening stays open for its whole wait (see Breaker).
                Ok(()) if self.breaker.is_open() && self.breaker.may_close(self.retry) => {
                    self.breaker.close();
                    self.degraded.set(0);
                    if self.breaker.flapping() {
                        log::info!(
                            "state: shared state answers again, but requests' calls failed soon after the last time; trying shared limits again (next wait {:?} if they fail again)",
                            (self.breaker.wait(self.retry) * 2).min(breaker::MAX_BACKOFF)
                        );
                    } else {
                        log::info!("state: shared state answers again; limits are shared again");
                    }
                    // Charges made on local state meanwhile, and settlements that did not
                    // reach the server, go back now.
                    self.lost.store(false, Ordering::Release);
                    self.put_back();
                }
                Ok(()) => {
                    let due = last_put_back.is_none_or(|t| t.elapsed() >= LOST_PUT_BACK_EVERY);
                    if due && self.lost.swap(false, Ordering::AcqRel) {
                        log::info!("state: a settlement or release did not reach the server; putting back what this replica knows (spend from its ledger)");
                        last_put_back = Some(std::time::Instant::now());
                        self.put_back();
                    }
                }
                Err(e) => {
                    if !self.breaker.is_open() {
                        self.errors.inc();
                        if self.breaker.failure() {
                            self.degraded.set(1);
                            log::warn!(
                                "state: degraded ({e}); {} until it answers again",
                                self.fallback()
                            );
                        }
                    }
                }
            }
        }
    }

    /// Keeps a subscription to `channel`: resubscribes after a broken connection, and drops a
    /// subscription while the circuit is open (a hung server sends nothing and says nothing).
    async fn listen(
        self: Arc<Self>,
        channel: String,
        on_message: Box<dyn Fn(&str) + Send + Sync>,
        generation: Arc<AtomicU64>,
    ) {
        use futures_util::StreamExt;
        let mut next = 1u64;
        loop {
            if !self.breaker.is_open() {
                let subscribed = tokio::time::timeout(self.connect_timeout, async {
                    let mut ps = self.client.get_async_pubsub().await?;
                    ps.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(ps)
                })
                .await;
                if let Ok(Ok(ps)) = subscribed {
                    generation.store(next, Ordering::Release);
                    next += 1;
                    let mut messages = ps.into_on_message();
                    let mut check = tokio::time::interval(self.retry);
                    loop {
                        tokio::select! {
                            m = messages.next() => match m {
                                Some(m) => {
                                    if let Ok(text) = m.get_payload::<String>() {
                                        on_message(&text);
                                    }
                                }
                                None => break,
                            },
                            _ = check.tick() => if self.breaker.is_open() { break },
                        }
                    }
                    generation.store(0, Ordering::Release);
                }
            }
            tokio::time::sleep(self.retry).await;
        }
    }

    /// A call nobody waits for; `later`: after the connect deadline, on the state's connection.
    async fn detached(
        self: Arc<Self>,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<String>,
        later: bool,
    ) {
        if later {
            tokio::time::sleep(self.connect_timeout).await;
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let args: Vec<Arg<'_>> = args.iter().map(|a| Arg::Str(a)).collect();
        let deadline = self.connect_timeout;
        if let Err(e) = self
            .call::<Ints>(script, &keys, &args, deadline, later)
            .await
        {
            self.errors.inc();
            self.lost.store(true, Ordering::Release);
            log::debug!("state: {} not applied: {e}", script.name);
        }
    }

    /// Sends the waiting batches, after the batch window when `wait`; one call per script and
    /// keys, all at once (they share the pipelined connection).
    async fn send_batches(self: Arc<Self>, wait: bool) {
        if wait {
            tokio::time::sleep(self.settle_window).await;
        }
        let batch = self.batches.take();
        if batch.is_empty() {
            return;
        }
        self.sending.fetch_add(1, Ordering::AcqRel);
        let calls = batch.into_iter().map(|(script, keys, args)| {
            let me = self.clone();
            me.detached(script, keys, args, false)
        });
        futures_util::future::join_all(calls).await;
        self.sending.fetch_sub(1, Ordering::AcqRel);
    }

    /// Renews the holds of running requests every third of the lease time, on its own
    /// schedule (a slow probe must not let them lapse).
    async fn renew(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis((self.lease_ms / 3).max(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.breaker.is_open() {
                self.renew_all().await;
            }
        }
    }

    async fn renew_all(self: &Arc<Self>) {
        let holds: Vec<(u64, Arc<Renewal>)> = self
            .keeps
            .lock()
            .map(|k| k.iter().map(|(id, r)| (*id, r.clone())).collect())
            .unwrap_or_default();
        let ttl = self.lease_ms.to_string();
        let deadline = Duration::from_millis(self.lease_ms / 3).min(self.connect_timeout);
        let calls = holds.iter().map(|(_, r)| {
            let keys: Vec<&str> = r.keys.iter().map(String::as_str).collect();
            let mut args: Vec<Arg<'_>> = r.args.iter().map(|a| Arg::Str(a)).collect();
            args.push(Arg::Str(&ttl));
            async move {
                self.call::<Ints>(r.renew, &keys, &args, deadline, true)
                    .await
            }
        });
        let answers = futures_util::future::join_all(calls).await;
        let (mut failed, mut put_back) = (0, 0);
        for ((id, r), answer) in holds.iter().zip(answers) {
            let ended = || self.keeps.lock().map_or(true, |k| !k.contains_key(id));
            let put = match answer {
                Err(_) => {
                    failed += 1;
                    // It may have been put back after all.
                    true
                }
                Ok(Ints(v)) if gateway_filter::state::at(&v, 0) == PUT_BACK => {
                    // A hold whose request ended meanwhile was released, not lost: its
                    // release overtook the renewal (routine for chunks taken ahead, which
                    // end far more often than requests). Not said to be lost data.
                    if !ended() {
                        put_back += 1;
                    }
                    true
                }
                Ok(_) => false,
            };
            // Its request ended while the renewal was on its way: its release may have run
            // before the hold was put back, so take it away again.
            if put && ended() {
                self.spawn_here(Inner::detached(
                    self.clone(),
                    r.forget,
                    r.keys.clone(),
                    r.forget_args.clone(),
                    false,
                ));
            }
        }
        if put_back > 0 {
            log::warn!(
                "state: the server had lost {put_back} of {} holds of running requests (lost data, or an outage longer than lease_ttl); put back",
                holds.len()
            );
        }
        if failed > 0 {
            self.errors.inc_by(failed as u64);
            log::warn!(
                "state: {failed} of {} holds could not be renewed",
                holds.len()
            );
        }
    }
}

#[async_trait]
impl SharedState for RedisState {
    async fn run(
        &self,
        script: &'static Script,
        keys: &[&str],
        args: &[Arg<'_>],
    ) -> Result<Vec<i64>, StateError> {
        self.inner
            .guarded::<Ints>(script, keys, args)
            .await
            .map(|Ints(v)| v)
    }

    async fn run_text(
        &self,
        script: &'static Script,
        keys: &[&str],
        args: &[Arg<'_>],
    ) -> Result<Vec<String>, StateError> {
        self.inner.guarded(script, keys, args).await
    }

    fn subscribe(
        &self,
        channel: &str,
        on_message: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Arc<AtomicU64> {
        let generation = Arc::new(AtomicU64::new(0));
        let channel = self.channel(channel);
        self.inner.handle.spawn(Inner::listen(
            self.inner.clone(),
            channel,
            on_message,
            generation.clone(),
        ));
        generation
    }

    fn channel(&self, channel: &str) -> String {
        format!("{}{channel}", self.inner.prefix)
    }

    fn run_detached(&self, script: &'static Script, keys: Vec<String>, args: Vec<String>) {
        // Releases and settlements are not skipped while the circuit is open (nobody waits
        // for them, and a dropped one leaves a hold behind): they get the connect deadline
        // and do not count against the circuit.
        self.inner.spawn_here(Inner::detached(
            self.inner.clone(),
            script,
            keys,
            args,
            false,
        ));
    }

    fn run_paced(&self, script: &'static Script, calls: Vec<(Vec<String>, Vec<String>)>) {
        // One waiting at most: a put-back asked for while another waits for its turn adds
        // nothing (what it would raise, the waiting one or the accounts' own next settlements
        // raise: totals only go up), and copies must not pile up behind a slow server.
        if self.inner.pace_waiting.swap(true, Ordering::AcqRel) {
            log::debug!("state: a put-back already waits for its turn; this one is dropped");
            return;
        }
        let inner = self.inner.clone();
        drop(self.inner.handle.spawn(async move {
            use futures_util::StreamExt;
            // One put-back after another, never two at once.
            let _turn = inner.pacing.lock().await;
            inner.pace_waiting.store(false, Ordering::Release);
            let failed = futures_util::stream::iter(calls)
                .map(|(keys, args)| {
                    let inner = inner.clone();
                    async move {
                        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                        let args: Vec<Arg<'_>> = args.iter().map(|a| Arg::Str(a)).collect();
                        let deadline = inner.connect_timeout;
                        inner
                            .call::<Ints>(script, &keys, &args, deadline, true)
                            .await
                            .is_err()
                    }
                })
                .buffer_unordered(PACED_AT_ONCE)
                .filter(|failed| std::future::ready(*failed))
                .count()
                .await;
            if failed > 0 {
                inner.errors.inc_by(failed as u64);
                log::warn!("state: {failed} calls of {} did not reach the server (each account is raised again by its next settlement)", script.name);
            }
        }));
    }

    fn run_batched(&self, script: &'static Script, keys: Vec<String>, args: Vec<String>) {
        // The first call of a batch sends it, from a task on the caller's runtime like
        // `run_detached`; the others only add their arguments.
        if self.inner.settle_window.is_zero() {
            self.run_detached(script, keys, args);
        } else if self.inner.batches.push(script, keys, args) {
            self.inner
                .spawn_here(Inner::send_batches(self.inner.clone(), true));
        }
    }

    fn flush(&self) {
        // From a plain thread: the caller may be on a runtime, where blocking is not allowed.
        // Batches another task took just before are waited for too (within the connect
        // deadline): the process exits right after.
        let (inner, handle) = (self.inner.clone(), self.inner.handle.clone());
        let sent = std::thread::spawn(move || {
            handle.block_on(async move {
                inner.clone().send_batches(false).await;
                let until = tokio::time::Instant::now() + inner.connect_timeout;
                while inner.sending.load(Ordering::Acquire) > 0
                    && tokio::time::Instant::now() < until
                {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .join();
        if sent.is_err() {
            log::warn!("state: settlements still waiting at exit were not sent");
        }
    }

    fn undo(&self, script: &'static Script, keys: Vec<String>, args: Vec<String>) {
        // After the connect deadline, the late call has run or will never run: whichever
        // connection carries this one, it cannot overtake it.
        let task = Inner::detached(self.inner.clone(), script, keys, args, true);
        drop(self.inner.handle.spawn(task));
    }

    fn key(&self, kind: &[&str], tag: &[&str]) -> String {
        let len = |p: &[&str]| p.iter().map(|s| s.len()).sum::<usize>();
        let mut k = String::with_capacity(self.inner.prefix.len() + len(kind) + len(tag) + 3);
        k.push_str(&self.inner.prefix);
        kind.iter().for_each(|s| k.push_str(s));
        k.push_str(":{");
        tag.iter().for_each(|s| k.push_str(s));
        k.push('}');
        k
    }

    fn member(&self) -> String {
        format!(
            "{}:{}",
            self.inner.member_base,
            self.inner.next.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn lease_ms(&self) -> u64 {
        self.inner.lease_ms
    }

    fn chunk(&self) -> Option<gateway_filter::chunk::ChunkSpec> {
        self.inner.chunk
    }

    fn keep(&self, renewal: Renewal) -> Keep {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut k) = self.inner.keeps.lock() {
            k.insert(id, Arc::new(renewal));
        }
        let inner = Arc::downgrade(&self.inner);
        Keep::new(move || {
            if let Some(inner) = inner.upgrade() {
                if let Ok(mut k) = inner.keeps.lock() {
                    k.remove(&id);
                }
            }
        })
    }

    fn fail_closed(&self) -> bool {
        self.inner.on_error == OnError::Reject
    }

    fn degraded(&self) -> bool {
        self.inner.breaker.is_open()
    }

    fn on_reset(&self, f: Box<dyn Fn() + Send + Sync>) {
        let f: Arc<dyn Fn() + Send + Sync> = Arc::from(f);
        if let Ok(mut r) = self.inner.resets.lock() {
            r.push(f.clone());
        }
        // The server may have lost data while this replica was down: put it back now.
        if !self.inner.breaker.is_open() {
            self.inner.handle.spawn(async move { f() });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redacted("redis://:s3cret@10.0.0.5:6379/0"),
            "redis://***@10.0.0.5:6379/0"
        );
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(
            redacted("unix:///run/redis/redis.sock?db=2&pass=s3cret"),
            "unix:///run/redis/redis.sock?***"
        );
    }

    #[test]
    fn calls_are_not_held_back_by_nagle() {
        let spec = StateSpec {
            url: "redis://127.0.0.1:1/0".into(),
            password: None,
            prefix: String::new(),
            timeout: Duration::from_millis(20),
            connect_timeout: Duration::from_secs(1),
            on_error: OnError::Local,
            lease_ttl: Duration::from_secs(30),
            breaker_failures: 3,
            breaker_retry: Duration::from_secs(1),
            ca_file: None,
            settle_window: Duration::from_millis(5),
            chunk: None,
        };
        assert!(client(&spec)
            .unwrap()
            .get_connection_info()
            .tcp_settings()
            .nodelay());
    }
}
