//! Lockout shared by replicas (Redis) without a round trip per request: failures are counted
//! on the server; the failure that locks an address adds it to a set of locked addresses and
//! announces it on a channel every replica listens to. A replica trusts what it heard only
//! while its subscription is unbroken and it has read the set since subscribing; otherwise it
//! asks the server for each request, as before.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_filter::state::{ask, at, Arg, Script};
use gateway_filter::{Rejection, SharedState};

/// Most addresses held as locked; beyond it the server is asked per request. Also the most
/// the set of locks is read at once: Redis runs one script at a time, and a read of 65,536
/// took it 74 ms, past every other call's deadline, on every replica (attacker review: one
/// client with enough networks to lock made the replicas fall back to local limits).
const MAX_HEARD: usize = 4_096;
/// The set of locks is read again this often even while the subscription holds (a
/// connection that died without a word delivers nothing and says nothing).
const RESYNC: Duration = Duration::from_secs(10);

/// KEYS: the address's failure count. Answers `{failures}`.
static COUNT: Script = Script {
    name: "lockout_count",
    source: "return {tonumber(redis.call('GET', KEYS[1]) or '0')}",
};

/// Counts a failure in a fixed window; the one that reaches the limit records and announces
/// the lock. KEYS: the count, the set of locked addresses. ARGV: window ms, limit, address,
/// channel. Answers `{failures}`.
static FAIL: Script = Script {
    name: "lockout_fail",
    source: r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n == tonumber(ARGV[2]) then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then ttl = tonumber(ARGV[1]) end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[3])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[1]) * 2)
  redis.call('PUBLISH', ARGV[4], ARGV[3] .. '|' .. ttl)
end
return {n}
"#,
};

/// [`LOCKED`]'s answer when the set holds more locks than a replica keeps.
const OVERFLOW: &str = "+";

/// A read of the set of locks that failed is tried again after this (meanwhile each request
/// asks about its own address): a set too large to read in time must not be read again by
/// every request.
const READ_AGAIN: Duration = Duration::from_secs(1);

/// KEYS: the set of locked addresses. ARGV: the most to answer (one more than fits in
/// `heard`). Answers `address, ms left, ...` for live locks, or [`OVERFLOW`] alone when
/// there are more than that (counted, not read: a long read holds up every other call).
static LOCKED: Script = Script {
    name: "lockout_locked",
    source: r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return {'+'} end
end
local out = {}
local all = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf', 'WITHSCORES', 'LIMIT', 0, ARGV[1])
for i = 1, #all, 2 do
  table.insert(out, all[i])
  table.insert(out, string.format('%.0f', tonumber(all[i + 1]) - now))
end
return out
"#,
};

/// Addresses announced as locked, until when.
struct Heard(Mutex<HashMap<IpAddr, Instant>>);

impl Heard {
    /// Adds a lock; false when there is no room (the caller stops trusting the map).
    fn add(&self, ip: IpAddr, ms: u64) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if m.len() >= MAX_HEARD && !m.contains_key(&ip) {
            m.retain(|_, until| *until > now);
            if m.len() >= MAX_HEARD {
                return false;
            }
        }
        m.insert(ip, now + Duration::from_millis(ms));
        true
    }

    fn has(&self, ip: &IpAddr) -> bool {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(ip).is_some_and(|until| *until > Instant::now())
    }
}

/// Marks a read of the set of locks as ended when dropped (also when its call failed).
struct Reading<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

pub struct SharedLockout {
    state: Arc<dyn SharedState>,
    max_failures: u32,
    window: Duration,
    /// Names this lockout's counters, set and channel: filters with other limits or windows
    /// neither share counts nor act on each other's locks. Also the keys' hash tag, so the
    /// failure script may touch counter and set in one Cluster slot.
    tag: String,
    heard: Arc<Heard>,
    /// The subscription's generation (0: not subscribed).
    live: Arc<AtomicU64>,
    /// The generation whose set of locks `heard` holds (0: none), and when it was read.
    synced: AtomicU64,
    synced_at: std::sync::Mutex<Option<Instant>>,
    /// Bumped by the listener when it could not record a lock (full, or not understood): the
    /// set must be read again.
    missed: Arc<AtomicU64>,
    /// When `heard` last overflowed: the server is asked per request until a read of the set
    /// fits again, tried once per [`RESYNC`] (the locks that filled it expire with their
    /// window).
    /// (Milliseconds since `born`, plus one; 0: none. Read by every request: no lock.)
    overflowed_at: AtomicU64,
    /// After a failed read of the set: not read again before this (ms since `born`).
    read_again_at: AtomicU64,
    born: Instant,
    /// A read of the set is on its way: other requests ask about their own address meanwhile
    /// instead of reading the whole set again.
    reading: std::sync::atomic::AtomicBool,
}

impl SharedLockout {
    pub fn new(state: Arc<dyn SharedState>, max_failures: u32, window: Duration) -> Self {
        let heard = Arc::new(Heard(Mutex::new(HashMap::new())));
        let missed = Arc::new(AtomicU64::new(0));
        let (h, s) = (heard.clone(), missed.clone());
        let tag = format!("lockouts:{max_failures}:{}", window.as_millis());
        let live = state.subscribe(
            &tag,
            Box::new(move |msg| {
                let parsed = msg.rsplit_once('|').and_then(|(ip, ms)| {
                    Some((ip.parse::<IpAddr>().ok()?, ms.parse::<u64>().ok()?))
                });
                match parsed {
                    Some((ip, ms)) if h.add(ip, ms) => {}
                    // Full, or not understood: read the set again.
                    _ => {
                        s.fetch_add(1, Ordering::AcqRel);
                    }
                }
            }),
        );
        SharedLockout {
            state,
            max_failures,
            window,
            tag,
            heard,
            live,
            synced: AtomicU64::new(0),
            synced_at: std::sync::Mutex::new(None),
            missed,
            overflowed_at: AtomicU64::new(0),
            read_again_at: AtomicU64::new(0),
            born: Instant::now(),
            reading: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn count_key(&self, ip: &IpAddr) -> String {
        self.state
            .key(&["lockout:ip:", &ip.to_string()], &[&self.tag])
    }

    fn set_key(&self) -> String {
        self.state.key(&["lockout:locked"], &[&self.tag])
    }

    fn stale(&self, generation: u64) -> bool {
        self.synced.load(Ordering::Acquire) != generation
            || self
                .synced_at
                .lock()
                .map_or(true, |t| t.is_none_or(|t| t.elapsed() >= RESYNC))
    }

    fn overflowed_recently(&self) -> bool {
        match self.overflowed_at.load(Ordering::Acquire) {
            0 => false,
            at => self.now_ms() < at - 1 + RESYNC.as_millis() as u64,
        }
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// `Some(locked)` from what the replicas announced, when that can be trusted; `None`
    /// when the server must be asked.
    async fn as_heard(&self, ip: &IpAddr) -> Option<bool> {
        let generation = self.live.load(Ordering::Acquire);
        if generation == 0 || self.state.degraded() || self.overflowed_recently() {
            return None;
        }
        if self.stale(generation) {
            if self.now_ms() < self.read_again_at.load(Ordering::Acquire)
                || self.reading.swap(true, Ordering::AcqRel)
            {
                return None;
            }
            let _reading = Reading(&self.reading);
            let missed = self.missed.load(Ordering::Acquire);
            let most = Arg::Int(MAX_HEARD as i64 + 1);
            let Ok(all) = self
                .state
                .run_text(&LOCKED, &[&self.set_key()], &[most])
                .await
            else {
                let later = self.now_ms() + READ_AGAIN.as_millis() as u64;
                self.read_again_at.store(later, Ordering::Release);
                return None;
            };
            if all.len() == 1 && all[0] == OVERFLOW {
                self.overflowed_at
                    .store(self.now_ms() + 1, Ordering::Release);
                return None;
            }
            for pair in all.chunks(2) {
                if let [ip, ms] = pair {
                    let (Ok(ip), Ok(ms)) = (ip.parse::<IpAddr>(), ms.parse::<u64>()) else {
                        continue;
                    };
                    if !self.heard.add(ip, ms) {
                        self.overflowed_at
                            .store(self.now_ms() + 1, Ordering::Release);
                        return None;
                    }
                }
            }
            // Only if the subscription held and heard everything meanwhile: else a lock may
            // have been missed.
            if self.live.load(Ordering::Acquire) != generation
                || self.missed.load(Ordering::Acquire) != missed
            {
                return None;
            }
            self.synced.store(generation, Ordering::Release);
            self.overflowed_at.store(0, Ordering::Release);
            if let Ok(mut t) = self.synced_at.lock() {
                *t = Some(Instant::now());
            }
        } else if self.missed.load(Ordering::Acquire) != 0 {
            // A lock was missed since the last read: read again at the next request.
            self.synced.store(0, Ordering::Release);
            self.missed.store(0, Ordering::Release);
            return None;
        }
        Some(self.heard.has(ip))
    }

    /// Whether `ip` is locked out across the replicas; `Ok(None)`: unknown (no answer and
    /// `on_error: local`), use this replica's own count.
    pub async fn locked(&self, ip: &IpAddr) -> Result<Option<bool>, Rejection> {
        if let Some(locked) = self.as_heard(ip).await {
            return Ok(Some(locked));
        }
        let k = self.count_key(ip);
        Ok(ask(Some(&self.state), &COUNT, &[&k], &[])
            .await?
            .map(|r| at(&r, 0) >= i64::from(self.max_failures)))
    }

    pub fn record_failure(&self, ip: &IpAddr) {
        // While the server is out of reach the replica's own count holds (not queued: a flood
        // of failures must not become a flood of calls to a dead server).
        if self.state.degraded() {
            return;
        }
        self.state.run_detached(
            &FAIL,
            vec![self.count_key(ip), self.set_key()],
            vec![
                self.window.as_millis().to_string(),
                self.max_failures.to_string(),
                ip.to_string(),
                self.state.channel(&self.tag),
            ],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_filter::testing::FakeState;

    /// A server whose set of locks is `text` (read in 50 ms), counting the calls.
    fn lockout() -> (Arc<FakeState>, Arc<SharedLockout>) {
        let fake = Arc::new(FakeState {
            text_delay: Duration::from_millis(50),
            generation: 1,
            ..Default::default()
        });
        let lockout = SharedLockout::new(fake.clone(), 3, Duration::from_secs(60));
        (fake, Arc::new(lockout))
    }

    /// Attacker review: every request that came while the set was being read read it too.
    #[tokio::test(flavor = "multi_thread")]
    async fn one_request_reads_the_set_the_others_ask_about_their_address() {
        let (fake, lockout) = lockout();
        fake.text
            .lock()
            .unwrap()
            .extend(["192.0.2.1".into(), "1000".into()]);
        let asks: Vec<_> = (0..10)
            .map(|_| {
                let l = lockout.clone();
                tokio::spawn(async move { l.locked(&"192.0.2.1".parse().unwrap()).await })
            })
            .collect();
        for a in asks {
            a.await.unwrap().unwrap();
        }
        assert_eq!(fake.text_reads.load(Ordering::Acquire), 1);
        assert_eq!(fake.runs.load(Ordering::Acquire), 9);
        // Read: the next request costs no call, and knows the lock.
        assert_eq!(
            lockout.locked(&"192.0.2.1".parse().unwrap()).await.unwrap(),
            Some(true)
        );
        assert_eq!(fake.runs.load(Ordering::Acquire), 9);
    }

    /// Asks twice about `ip` (not locked); how many times the set was read and the server
    /// asked about the address, in all.
    async fn two_asks(fake: &FakeState, lockout: &SharedLockout, ip: IpAddr) -> (usize, usize) {
        assert_eq!(lockout.locked(&ip).await.unwrap(), Some(false));
        assert_eq!(lockout.locked(&ip).await.unwrap(), Some(false));
        (
            fake.text_reads.load(Ordering::Acquire),
            fake.runs.load(Ordering::Acquire),
        )
    }

    /// Attacker review: a set too large to hold once meant a call per request for as long as
    /// the subscription lived; it is read again once the wait has passed.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_set_too_large_to_hold_is_read_again_later() {
        let (fake, lockout) = lockout();
        let many: Vec<String> = (0..=MAX_HEARD as u32)
            .flat_map(|i| {
                [
                    std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string(),
                    "60000".into(),
                ]
            })
            .collect();
        *fake.text.lock().unwrap() = many;
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(two_asks(&fake, &lockout, ip).await, (1, 2));
        // The server counts rather than reads a set that large: the same.
        let (fake, lockout) = self::lockout();
        *fake.text.lock().unwrap() = vec![OVERFLOW.to_string()];
        assert_eq!(two_asks(&fake, &lockout, ip).await, (1, 2));
        // The locks that filled it expired; the wait has passed.
        lockout.heard.0.lock().unwrap().clear();
        fake.text.lock().unwrap().clear();
        lockout.overflowed_at.store(0, Ordering::Release);
        assert_eq!(two_asks(&fake, &lockout, ip).await, (2, 2));
    }
}
