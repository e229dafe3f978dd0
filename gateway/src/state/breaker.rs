//! The circuit breaker in front of shared state: requests stop waiting on a server that
//! failed several times in a row; only the state's own probe closes it again.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

pub struct Breaker {
    failures: AtomicU32,
    open: AtomicBool,
    threshold: u32,
}

impl Breaker {
    pub fn new(threshold: u32) -> Breaker {
        Breaker {
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            threshold: threshold.max(1),
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
        n >= self.threshold && !self.open.swap(true, Ordering::AcqRel)
    }

    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
    }

    pub fn close(&self) {
        self.failures.store(0, Ordering::Relaxed);
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
}
