//! Brute-force lockout: failed authentications counted per client IP in fixed windows, in a
//! count-min sketch of fixed size (`pingora-limits`), so a flood of addresses cannot grow
//! memory. The sketch can only over-count; its width keeps that rare (see docs/security.md).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use gateway_filter::{Rejection, SharedState};
use pingora_limits::rate::Rate;

use crate::lockout_shared::SharedLockout;

/// The sketch (4 rows of `slots` counters, twice: this window and the last, 4 MiB at the
/// default size) is made at the first failure: an idle gateway does not carry it.
pub struct Lockout {
    failures: std::sync::OnceLock<Rate>,
    slots: usize,
    max_failures: isize,
    pub window: Duration,
    /// Counts shared by every replica; the sketch stays the fallback (and counts too).
    shared: Option<SharedLockout>,
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
        self.failures
            .get()
            .is_some_and(|f| f.observe(ip, 0) >= self.max_failures)
    }

    pub fn record_failure(&self, ip: &IpAddr) {
        self.failures
            .get_or_init(|| Rate::new_with_estimator_config(self.window, 4, self.slots))
            .observe(ip, 1);
        if let Some(s) = &self.shared {
            s.record_failure(ip);
        }
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
