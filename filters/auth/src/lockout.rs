//! Brute-force lockout: failed authentications counted per client network in fixed windows,
//! exactly, for at most `slots` networks at once (a flood of addresses cannot grow memory;
//! past that, newly failing networks go uncounted: lenient to an attacker with more networks
//! than that, whose requests the address limits still bound, never unjust to an innocent one).
//!
//! A check that takes time (a password hash, a validator's answer) counts as a failure while
//! it runs ([`Lockout::attempt`]), so guesses sent in parallel meet the limit as guesses sent
//! one after another do; a check that succeeds gives its count back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use gateway_filter::{Rejection, SharedState};

use crate::lockout_shared::SharedLockout;

pub struct Lockout {
    /// Where the windows begin.
    epoch: Instant,
    /// Failures (and checks under way) of every failing address in its window.
    exact: Mutex<ExactCounts>,
    /// The window (plus one) in which an address last reached `max_failures`: before any
    /// has in the current window, nobody is locked and the check takes no lock.
    hot: AtomicU64,
    slots: usize,
    max_failures: u32,
    pub window: Duration,
    /// Counts shared by every replica; this replica's own stay the fallback (and count too).
    shared: Option<SharedLockout>,
}

/// Failures per address (window number, count), and the window the map was last purged in.
#[derive(Default)]
struct ExactCounts {
    counts: HashMap<IpAddr, (u64, u32)>,
    purged: Option<u64>,
}

/// A check under way for an address, counted as a failure until it ends: dropped, it gives
/// its count back (a failure is counted on its own, by [`Lockout::record_failure`]).
pub struct Attempt<'a> {
    lockout: &'a Lockout,
    ip: IpAddr,
    window: u64,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let mut exact = self.lockout.counts();
        let emptied = match exact.counts.get_mut(&self.ip) {
            Some((w, n)) if *w == self.window => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            _ => false,
        };
        // An address that only ever succeeded takes no slot.
        if emptied {
            exact.counts.remove(&self.ip);
        }
    }
}

impl Lockout {
    pub fn new(
        max_failures: u32,
        window: Duration,
        slots: usize,
        shared: Option<Arc<dyn SharedState>>,
    ) -> Self {
        Lockout {
            epoch: Instant::now(),
            exact: Default::default(),
            hot: AtomicU64::new(0),
            slots: slots.max(64),
            max_failures,
            window,
            shared: shared.map(|st| SharedLockout::new(st, max_failures, window)),
        }
    }

    /// Whether `ip` is locked out: by the shared count when there is one, else this
    /// replica's own.
    pub async fn locked(&self, ip: &IpAddr) -> Result<bool, Rejection> {
        // This replica's own count too: failures it saw while Redis was away.
        let own = self.is_locked(ip);
        match &self.shared {
            Some(s) => Ok(own || s.locked(ip).await?.unwrap_or(false)),
            None => Ok(own),
        }
    }

    pub fn is_locked(&self, ip: &IpAddr) -> bool {
        let now = self.window_now();
        if self.hot.load(Ordering::Acquire) != now + 1 {
            return false;
        }
        matches!(self.counts().counts.get(ip), Some(&(w, n)) if w == now && n >= self.max_failures)
    }

    /// Starts a check that takes time for `ip`: `None` when the address is locked, counting
    /// the checks under way.
    pub fn attempt(&self, ip: &IpAddr) -> Option<Attempt<'_>> {
        let window = self.window_now();
        if !self.count(ip, window, true) {
            return None;
        }
        Some(Attempt {
            lockout: self,
            ip: *ip,
            window,
        })
    }

    pub fn record_failure(&self, ip: &IpAddr) {
        self.count(ip, self.window_now(), false);
        if let Some(s) = &self.shared {
            s.record_failure(ip);
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, ExactCounts> {
        self.exact.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn window_now(&self) -> u64 {
        (self.epoch.elapsed().as_nanos() / self.window.as_nanos().max(1)) as u64
    }

    /// Adds one to `ip`'s count in window `now`; with `unless_locked`, only below the limit.
    /// Answers false when the address was locked (and nothing was counted).
    fn count(&self, ip: &IpAddr, now: u64, unless_locked: bool) -> bool {
        let mut exact = self.counts();
        let ExactCounts { counts, purged } = &mut *exact;
        if !counts.contains_key(ip) && counts.len() >= self.slots {
            // Full: forget the windows that ended, once a window (a flood must not scan the
            // whole map per failure); still full, this address goes uncounted.
            if *purged == Some(now) {
                return true;
            }
            *purged = Some(now);
            counts.retain(|_, &mut (w, _)| w == now);
            if counts.len() >= self.slots {
                return true;
            }
        }
        let entry = counts.entry(*ip).or_insert((now, 0));
        if entry.0 != now {
            *entry = (now, 0);
        }
        if unless_locked && entry.1 >= self.max_failures {
            return false;
        }
        entry.1 = entry.1.saturating_add(1);
        if entry.1 >= self.max_failures {
            self.hot.store(now + 1, Ordering::Release);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_n_failures_per_ip() {
        let l = Lockout::new(3, Duration::from_secs(60), 1024, None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "::1".parse().unwrap();
        for _ in 0..3 {
            assert!(!l.is_locked(&a));
            l.record_failure(&a);
        }
        assert!(l.is_locked(&a));
        assert!(!l.is_locked(&b));
    }

    /// A flood of failing addresses (an IPv6 /48 is 65,536 networks) fills the count's slots:
    /// no innocent address reads as locked, and the addresses still tracked are locked.
    #[test]
    fn a_flood_of_failing_addresses_locks_out_no_innocent_one() {
        let l = Lockout::new(3, Duration::from_secs(60), 64, None);
        let attacker = |i: u32| {
            IpAddr::from(std::net::Ipv6Addr::from(
                (0x2001_0db8_u128 << 96) | (u128::from(i) << 64),
            ))
        };
        for i in 0..5_000 {
            for _ in 0..3 {
                l.record_failure(&attacker(i));
            }
        }
        let innocent: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(!l.is_locked(&innocent));
        assert!(l.is_locked(&attacker(0)), "tracked exactly: locked");
        assert!(l.exact.lock().unwrap().counts.len() <= 64, "bounded");
    }

    /// Checks that take time count while they run: guesses sent in parallel meet the limit as
    /// guesses sent one after another do, and a check that succeeds gives its count back.
    #[test]
    fn checks_under_way_count_against_the_limit() {
        let l = Lockout::new(3, Duration::from_secs(60), 1024, None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let running: Vec<_> = (0..3).map(|_| l.attempt(&a).unwrap()).collect();
        assert!(
            l.attempt(&a).is_none(),
            "a fourth guess waits for the others"
        );
        assert!(l.is_locked(&a));
        drop(running);
        assert!(!l.is_locked(&a), "succeeded: nothing counted");
        assert!(l.counts().counts.is_empty(), "and nothing kept");
        // Two fail (each counted as it ends), so one more may run, not two.
        for _ in 0..2 {
            let t = l.attempt(&a).unwrap();
            l.record_failure(&a);
            drop(t);
        }
        let last = l.attempt(&a).unwrap();
        assert!(l.attempt(&a).is_none());
        l.record_failure(&a);
        drop(last);
        assert!(l.is_locked(&a));
    }

    #[test]
    fn window_end_unlocks() {
        let l = Lockout::new(1, Duration::from_millis(100), 1024, None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        l.record_failure(&a);
        assert!(l.is_locked(&a));
        std::thread::sleep(Duration::from_millis(250));
        assert!(!l.is_locked(&a));
    }
}
