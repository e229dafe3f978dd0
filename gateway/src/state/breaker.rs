//! The circuit breaker in front of shared state: requests stop waiting on a server that
//! failed several times in a row; only the state's own probe closes it again.
//!
//! The probe asks whether the server answers, not whether every script works: a server that
//! answers the probe but fails a request's script (a key of the wrong type, a script error,
//! memory full for that write) would have the circuit closed and opened again every retry
//! interval, three failed calls and two log lines each time. So a circuit that opens again
//! soon after it closed waits twice as long before the probe may close it, up to a minute;
//! one that stays closed for a while starts again from the configured interval.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A circuit that opens again within this time of closing counts as flapping.
const FLAP: Duration = Duration::from_secs(30);
/// The longest wait before a flapping circuit is closed again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

pub struct Breaker {
    failures: AtomicU32,
    open: AtomicBool,
    threshold: u32,
    /// When the probe last closed the circuit, and when it last opened (touched only when it
    /// opens or closes).
    closed_at: Mutex<Option<Instant>>,
    opened_at: Mutex<Option<Instant>>,
    /// Doublings of the wait before the next close, for a circuit that keeps reopening.
    flaps: AtomicU32,
}

impl Breaker {
    pub fn new(threshold: u32) -> Breaker {
        Breaker {
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            threshold: threshold.max(1),
            closed_at: Mutex::new(None),
            opened_at: Mutex::new(None),
            flaps: AtomicU32::new(0),
        }
    }

    /// How long an open circuit waits before the probe may close it: `retry`, doubled for
    /// every time in a row it opened again within [`FLAP`] of closing, at most [`MAX_BACKOFF`].
    pub fn wait(&self, retry: Duration) -> Duration {
        let flaps = self.flaps.load(Ordering::Relaxed).min(16);
        retry.saturating_mul(1 << flaps).min(MAX_BACKOFF.max(retry))
    }

    /// Whether an open circuit has waited long enough ([`Breaker::wait`]) to be closed by a
    /// successful probe.
    pub fn may_close(&self, retry: Duration) -> bool {
        let opened = *self.opened_at.lock().unwrap_or_else(|p| p.into_inner());
        opened.is_none_or(|t| t.elapsed() >= self.wait(retry))
    }

    /// Whether the circuit has opened again soon after closing at least once in a row.
    pub fn flapping(&self) -> bool {
        self.flaps.load(Ordering::Relaxed) > 0
    }

    fn opened(&self) {
        *self.opened_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let closed = *self.closed_at.lock().unwrap_or_else(|p| p.into_inner());
        if closed.is_some_and(|t| t.elapsed() < FLAP) {
            self.flaps.fetch_add(1, Ordering::Relaxed);
        } else {
            self.flaps.store(0, Ordering::Relaxed);
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    pub fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure; true when this one opened the circuit (log it once).
    pub fn failure(&self) -> bool {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let opened = n >= self.threshold && !self.open.swap(true, Ordering::AcqRel);
        if opened {
            self.opened();
        }
        opened
    }

    pub fn open(&self) {
        if !self.open.swap(true, Ordering::AcqRel) {
            self.opened();
        }
    }

    pub fn close(&self) {
        self.failures.store(0, Ordering::Relaxed);
        *self.closed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.open.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_in_a_row_and_reports_it_once() {
        let b = Breaker::new(3);
        assert!(!b.failure() && !b.failure());
        b.success();
        assert!(!b.failure() && !b.failure(), "a success resets the streak");
        assert!(b.failure(), "the third in a row opens it");
        assert!(b.is_open());
        assert!(!b.failure(), "already open: not reported again");
        b.close();
        assert!(!b.is_open());
        assert!(!b.failure());
    }

    #[test]
    fn a_circuit_that_keeps_reopening_waits_longer_each_time() {
        let retry = Duration::from_millis(500);
        let b = Breaker::new(1);
        assert!(b.failure());
        assert_eq!(
            b.wait(retry),
            retry,
            "the first time: the configured interval"
        );
        assert!(!b.may_close(retry), "not before the interval");
        *b.opened_at.lock().unwrap() = Instant::now().checked_sub(retry);
        assert!(b.may_close(retry));
        // Closed by the probe, failing again at once (a script the server refuses).
        for expected in [1000, 2000, 4000, 8000] {
            b.close();
            assert!(b.failure());
            assert!(b.flapping());
            assert_eq!(b.wait(retry), Duration::from_millis(expected));
        }
        for _ in 0..10 {
            b.close();
            b.failure();
        }
        assert_eq!(b.wait(retry), MAX_BACKOFF, "at most a minute");
        // A circuit that stayed closed past the flap window starts afresh.
        b.close();
        *b.closed_at.lock().unwrap() = Instant::now().checked_sub(FLAP + Duration::from_secs(1));
        assert!(b.failure());
        assert!(!b.flapping());
        assert_eq!(b.wait(retry), retry);
    }
}
