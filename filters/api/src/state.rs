//! Shared state for several replicas (Redis or Valkey), as filters see it.
//!
//! The gateway implements [`SharedState`]; filters never see Redis. Every check-and-reserve is
//! one [`Script`] run atomically on the server, so replicas never read, decide and write in
//! three steps. Holds that must survive a slow request but not a dead replica (in-flight
//! slots, budget reservations) are members of a sorted set scored by their expiry, which the
//! gateway renews while the request runs ([`SharedState::keep`]). When a call fails (deadline,
//! open circuit, not connected) the filter falls back to its local state, or, when the
//! operator chose `on_error: reject`, answers [`unavailable`].

use std::time::Duration;

use async_trait::async_trait;
use http::{header, HeaderValue, StatusCode};

use crate::Rejection;

/// A Lua script run atomically on the server. Its keys are passed as `KEYS`, its arguments
/// as `ARGV`; it answers an array of integers.
#[derive(Debug)]
pub struct Script {
    /// For logs and metrics.
    pub name: &'static str,
    pub source: &'static str,
}

/// One `ARGV` entry.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Int(i64),
    Str(&'a str),
}

/// Why a shared call gave no answer. The request never waits longer than the deadline.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StateError {
    #[error("shared state unavailable (not connected, or its circuit is open)")]
    Unavailable,
    #[error("shared state did not answer within {0:?}")]
    Timeout(Duration),
    #[error("shared state failed: {0}")]
    Failed(String),
}

impl StateError {
    /// Whether the call may have reached the server and run: a timeout, or a connection that
    /// broke after the call was written. Its effect (a slot, a hold) is then taken back; only
    /// a call refused before it left ([`StateError::Unavailable`]) surely did nothing.
    pub fn may_have_run(&self) -> bool {
        !matches!(self, StateError::Unavailable)
    }
}

/// A renewed hold; stopping or dropping it ends the renewal (the hold then expires by itself
/// unless it was released).
pub struct Keep(std::sync::Mutex<Option<Box<dyn FnOnce() + Send + Sync>>>);

impl Keep {
    pub fn new(on_stop: impl FnOnce() + Send + Sync + 'static) -> Keep {
        Keep(std::sync::Mutex::new(Some(Box::new(on_stop))))
    }

    /// Ends the renewal now. Called before the hold's release is sent, so a renewal can no
    /// longer find the hold gone and put it back as if the server had lost it.
    pub fn stop(&self) {
        let f = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(f) = f {
            f();
        }
    }
}

impl Drop for Keep {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How a running request's hold is kept: `renew` runs every third of the lease time with
/// `keys`, then `args` and the lease time in ms as its last `ARGV`. It lengthens the hold,
/// or puts it back when the server no longer has it (lost data, or an outage longer than the
/// lease), answering `{2}` then: a request still running still counts. A hold put back just
/// as its request ended is taken away again by `forget` with `forget_args` (which must do
/// nothing when the hold is absent).
pub struct Renewal {
    pub renew: &'static Script,
    pub forget: &'static Script,
    pub keys: Vec<String>,
    pub args: Vec<String>,
    pub forget_args: Vec<String>,
}

/// The answer of a [`Renewal::renew`] script that put its hold back.
pub const PUT_BACK: i64 = 2;

impl std::fmt::Debug for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keep")
    }
}

#[async_trait]
pub trait SharedState: Send + Sync {
    /// Runs `script` on the server within the deadline.
    async fn run(
        &self,
        script: &'static Script,
        keys: &[&str],
        args: &[Arg<'_>],
    ) -> Result<Vec<i64>, StateError>;

    /// Runs `script` without waiting for it (a release from `Drop`, a settlement): on the
    /// caller's runtime (or the state's, from a plain thread), with the connect deadline,
    /// also while the circuit is open. A failure is counted, not retried: the holds it would
    /// have released expire by themselves.
    fn run_detached(&self, script: &'static Script, keys: Vec<String>, args: Vec<String>);

    /// Like [`SharedState::run_detached`], for a script written to take several calls at
    /// once (settlements): the calls of `script` on the same `keys` made within a few
    /// milliseconds of each other reach the server as one call, their `ARGV`s one after the
    /// other, in the order they were made (the script walks `ARGV` in steps of its arity).
    /// Under load this is one script run for many requests' settlements; what they give back
    /// stays held those few milliseconds longer, which only errs on the safe side.
    fn run_batched(&self, script: &'static Script, keys: Vec<String>, args: Vec<String>) {
        self.run_detached(script, keys, args);
    }

    /// Runs many calls of `script` nobody waits for (putting a replica's spend back: one per
    /// account it knows, hundreds of thousands for a long ledger). By default each goes as a
    /// `run_detached` call; a server's implementation sends them a few at a time, one put-back
    /// after another (sent all at once, they filled the Redis state's thread and connection:
    /// holds of running requests went unrenewed and lapsed). A failed one is counted, not
    /// retried (the account's next settlement raises it again).
    fn run_paced(&self, script: &'static Script, calls: Vec<(Vec<String>, Vec<String>)>) {
        for (keys, args) in calls {
            self.run_detached(script, keys, args);
        }
    }

    /// Sends the calls [`SharedState::run_batched`] still holds, and waits for them (within
    /// the connect deadline): at exit, after the last request.
    fn flush(&self) {}

    /// Gives back what a call that passed its deadline may still take on the server (the
    /// script is run once that call cannot be on its way any more), like `run_detached`.
    fn undo(&self, script: &'static Script, keys: Vec<String>, args: Vec<String>);

    /// A key name: the operator's prefix, `kind`, and `tag` as the hash tag, so all the keys
    /// of one principal (or address, or backend) sit in one Redis Cluster slot. Each is
    /// given in pieces, copied into one string (several keys are made per request: the
    /// formatting machinery cost more than the rest of building them).
    fn key(&self, kind: &[&str], tag: &[&str]) -> String;

    /// An id unique to this process, for the members of shared holds.
    fn member(&self) -> String;

    /// Milliseconds a hold lives without renewal (`state.lease_ttl`).
    fn lease_ms(&self) -> u64;

    /// How a limiter takes quota ahead of a key's requests far from its limit
    /// (`state.chunk`, [`crate::chunk`]); `None`: every request asks the server.
    fn chunk(&self) -> Option<crate::chunk::ChunkSpec> {
        None
    }

    /// Renews a hold (see [`Renewal`]) every third of the lease time until the returned
    /// guard is stopped or dropped.
    fn keep(&self, renewal: Renewal) -> Keep;

    /// `on_error: reject`: a failed call answers 503 instead of falling back to local state.
    fn fail_closed(&self) -> bool;

    /// Whether calls fail over right now (circuit open, server unreachable).
    fn degraded(&self) -> bool;

    /// Runs `script` like [`SharedState::run`], for scripts that answer strings.
    async fn run_text(
        &self,
        script: &'static Script,
        keys: &[&str],
        args: &[Arg<'_>],
    ) -> Result<Vec<String>, StateError>;

    /// Calls `on_message` with each message published on `channel` (under the prefix).
    /// Answers the subscription's generation: 0 while not subscribed (messages are being
    /// missed: ask the server instead), another number for each unbroken subscription (a
    /// change means messages may have been missed in between).
    fn subscribe(
        &self,
        channel: &str,
        on_message: Box<dyn Fn(&str) + Send + Sync>,
    ) -> std::sync::Arc<std::sync::atomic::AtomicU64>;

    /// The channel name `subscribe` listens to for `channel`, for scripts that publish.
    fn channel(&self, channel: &str) -> String;

    /// Registers work to run whenever the server is found to have lost its data (flushed,
    /// restarted without persistence, failed over to an empty replica), e.g. putting this
    /// replica's spend back from its ledger.
    fn on_reset(&self, f: Box<dyn Fn() + Send + Sync>);
}

/// The answer when shared state is out of reach and the operator chose to fail closed.
pub fn unavailable() -> Rejection {
    Rejection::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "state_unavailable",
        "the gateway's shared state is unavailable; try again shortly",
    )
    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
}

/// Reads integer `i` of a script's answer (0 when missing).
pub fn at(reply: &[i64], i: usize) -> i64 {
    reply.get(i).copied().unwrap_or(0)
}

/// Takes a slot in the sorted set `KEYS[1]` when fewer than `ARGV[1]` live ones are there
/// (expired ones, of replicas that died, are dropped first). ARGV: max, member, ttl ms.
/// Answers `{taken, slots in use}`.
pub static LEASE_ACQUIRE: Script = Script {
    name: "lease_acquire",
    source: r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
-- Run again for the same request (a call retried on a new connection): already taken.
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  return {1, redis.call('ZCARD', KEYS[1])}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[1]) then
  return {0, n}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return {1, n + 1}
"#,
};

/// Lengthens a slot, or puts it back if the server no longer has it (a [`Renewal::renew`]).
/// ARGV: member, ttl ms. Answers `{1}`, or `{2}` when put back.
pub static LEASE_RENEW: Script = Script {
    name: "lease_renew",
    source: r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local added = redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
-- Only ever lengthens the set's own lifetime.
local p = redis.call('PTTL', KEYS[1])
if p < ttl * 2 then redis.call('PEXPIRE', KEYS[1], ttl * 2) end
if added == 1 then return {2} end
return {1}
"#,
};

/// Gives a slot back. ARGV: member.
pub static LEASE_RELEASE: Script = Script {
    name: "lease_release",
    source: r#"
return {redis.call('ZREM', KEYS[1], ARGV[1])}
"#,
};

/// A slot taken in a shared set: renewed while held, given back when dropped (however the
/// request ends); if this replica dies, it expires after the lease time.
pub struct SharedLease {
    state: std::sync::Arc<dyn SharedState>,
    key: String,
    member: String,
    keep: Keep,
}

impl std::fmt::Debug for SharedLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLease")
            .field("key", &self.key)
            .finish()
    }
}

impl Drop for SharedLease {
    fn drop(&mut self) {
        self.keep.stop();
        self.state.run_detached(
            &LEASE_RELEASE,
            vec![std::mem::take(&mut self.key)],
            vec![std::mem::take(&mut self.member)],
        );
    }
}

/// Takes one of `max` slots of `key` across all replicas: `Ok(None)` when all are taken.
pub async fn acquire_lease(
    state: &std::sync::Arc<dyn SharedState>,
    key: String,
    max: u32,
) -> Result<Option<SharedLease>, StateError> {
    let member = state.member();
    let reply = state
        .run(
            &LEASE_ACQUIRE,
            &[&key],
            &[
                Arg::Int(i64::from(max)),
                Arg::Str(&member),
                Arg::Int(state.lease_ms() as i64),
            ],
        )
        .await
        .inspect_err(|e| {
            // Sent, but no answer: the script may have run; give the slot back if it did.
            if e.may_have_run() {
                state.undo(&LEASE_RELEASE, vec![key.clone()], vec![member.clone()]);
            }
        })?;
    if at(&reply, 0) != 1 {
        return Ok(None);
    }
    let keep = state.keep(Renewal {
        renew: &LEASE_RENEW,
        forget: &LEASE_RELEASE,
        keys: vec![key.clone()],
        args: vec![member.clone()],
        forget_args: vec![member.clone()],
    });
    Ok(Some(SharedLease {
        state: state.clone(),
        key,
        member,
        keep,
    }))
}

/// One shared check: `Ok(Some(reply))` from the server; `Ok(None)` when there is no shared
/// state or it failed and the operator chose local fallback (use local state then);
/// `Err(503)` when it failed and the operator chose to fail closed.
pub async fn ask(
    state: Option<&std::sync::Arc<dyn SharedState>>,
    script: &'static Script,
    keys: &[&str],
    args: &[Arg<'_>],
) -> Result<Option<Vec<i64>>, Rejection> {
    let Some(state) = state else {
        return Ok(None);
    };
    match state.run(script, keys, args).await {
        Ok(v) => Ok(Some(v)),
        Err(_) if state.fail_closed() => Err(unavailable()),
        Err(_) => Ok(None),
    }
}

/// A count for a script argument: counts beyond `i64::MAX` (a client asking for 2^64
/// tokens) stay at the maximum instead of wrapping negative.
pub fn int(n: u64) -> Arg<'static> {
    Arg::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

/// A stable 64-bit hash (FNV-1a) for key names every replica must compute alike (std's
/// hashers are seeded per process).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
