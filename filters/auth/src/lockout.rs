//! Brute-force lockout: failed authentications counted per client IP in fixed windows, in a
//! count-min sketch of fixed size (`pingora-limits`), so a flood of addresses cannot grow
//! memory. The sketch can only over-count, and a flood of failing addresses (an IPv6 /48 is
//! 65,536 networks) fills it until innocent addresses read as locked; so an address is locked
//! only when an exact count confirms it, kept for at most as many addresses as the sketch has
//! slots. Past that, newly failing addresses go uncounted: lenient for an attacker with more
//! networks than that (whose requests the address limits still bound), never unjust to an
//! innocent address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_filter::{Rejection, SharedState};
use pingora_limits::rate::Rate;

use crate::lockout_shared::SharedLockout;

/// The sketch (4 rows of `slots` counters, twice: this window and the last, 4 MiB at the
/// default size) is made at the first failure: an idle gateway does not carry it.
pub struct Lockout {
    /// The sketch, and when it was made (the exact count's windows begin with its own).
    failures: std::sync::OnceLock<(Rate, Instant)>,
    /// Exact failures of every failing address, at most `slots` of them.
    exact: std::sync::Mutex<ExactCounts>,
    slots: usize,
    max_failures: isize,
    pub window: Duration,
    /// Counts shared by every replica; the sketch stays the fallback (and counts too).
    shared: Option<SharedLockout>,
}

/// Failures per address (window number, count), and the window the map was last purged in.
#[derive(Default)]
struct ExactCounts {
    counts: HashMap<IpAddr, (u64, u32)>,
    purged: Option<u64>,
}

impl Lockout {
    pub fn new(
        max_failures: u32,
        window: Duration,
        slots: usize,
        shared: Option<Arc<dyn SharedState>>,
    ) -> Self {
        Lockout {
            failures: std::sync::OnceLock::new(),
            exact: Default::default(),
            slots: slots.max(64),
            max_failures: max_failures as isize,
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
        // The sketch first (no lock, nearly always below the threshold), then the exact count.
        self.failures
            .get()
            .is_some_and(|(f, _)| f.observe(ip, 0) >= self.max_failures)
            && self.exact_count(ip) >= self.max_failures
    }

    pub fn record_failure(&self, ip: &IpAddr) {
        self.failures
            .get_or_init(|| {
                (
                    Rate::new_with_estimator_config(self.window, 4, self.slots),
                    Instant::now(),
                )
            })
            .0
            .observe(ip, 1);
        self.count_exactly(ip);
        if let Some(s) = &self.shared {
            s.record_failure(ip);
        }
    }

    fn window_now(&self) -> u64 {
        self.failures.get().map_or(0, |(_, e)| {
            (e.elapsed().as_nanos() / self.window.as_nanos().max(1)) as u64
        })
    }

    fn exact_count(&self, ip: &IpAddr) -> isize {
        let now = self.window_now();
        let exact = self.exact.lock().unwrap_or_else(|p| p.into_inner());
        match exact.counts.get(ip) {
            Some(&(w, n)) if w == now => n as isize,
            _ => 0,
        }
    }

    fn count_exactly(&self, ip: &IpAddr) {
        let now = self.window_now();
        let mut exact = self.exact.lock().unwrap_or_else(|p| p.into_inner());
        let ExactCounts { counts, purged } = &mut *exact;
        if !counts.contains_key(ip) && counts.len() >= self.slots {
            // Full: forget the windows that ended, once a window (a flood must not scan the
            // whole map per failure); still full, this address goes uncounted.
            if *purged == Some(now) {
                return;
            }
            *purged = Some(now);
            counts.retain(|_, &mut (w, _)| w == now);
            if counts.len() >= self.slots {
                return;
            }
        }
        let entry = counts.entry(*ip).or_insert((now, 0));
        if entry.0 != now {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
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

    /// A flood of failing addresses fills the sketch until innocent addresses would read as
    /// locked (an IPv6 /48 is 65,536 networks); the exact count keeps them unlocked. The
    /// addresses the exact count still tracks are locked as before.
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
        assert!(
            l.failures.get().unwrap().0.observe(&innocent, 0) >= 3,
            "the sketch alone would lock it"
        );
        assert!(!l.is_locked(&innocent));
        assert!(l.is_locked(&attacker(0)), "tracked exactly: locked");
        assert!(l.exact.lock().unwrap().counts.len() <= 64, "bounded");
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
