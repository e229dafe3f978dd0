//! Deadlines one request missed on backends, judged once the request shows whether it was
//! slow by itself.
//!
//! A missed deadline (the first byte, a read, a write) may be the backend's fault (hung) or
//! the request's own (a long prompt, a model not loaded, another context size). Counted
//! where it happens, one client's slow request retried on every backend took them all out
//! (attacker review, 2026-12-05). So a request's misses wait for its end: another backend
//! that answers the same request in time shows the missed ones at fault, and they count in
//! full; a request that missed on several backends was slow by itself, and each counts once
//! for its caller; a single miss is judged by [`BackendPool::mark_slow`].

use std::time::Duration;

use super::BackendPool;

struct Miss {
    idx: usize,
    caller: u64,
    waited: Duration,
    /// Another backend could have taken the request when it missed here.
    alternative: bool,
}

/// The misses of one request not yet judged; what is left is judged when it is dropped.
#[derive(Default)]
pub struct MissedDeadlines {
    pool: Option<BackendPool>,
    misses: Vec<Miss>,
}

impl MissedDeadlines {
    /// Backend `idx` missed a deadline on the request of `caller` that had waited `waited` on it.
    pub fn push(
        &mut self,
        pool: &BackendPool,
        idx: usize,
        caller: u64,
        waited: Duration,
        alternative: bool,
    ) {
        self.pool.get_or_insert_with(|| pool.clone());
        self.misses.push(Miss {
            idx,
            caller,
            waited,
            alternative,
        });
    }

    /// Another backend answered the same request successfully within its deadline: the
    /// request was not slow by itself, so each backend that missed failed on its own.
    pub fn confirm(&mut self) {
        if let Some(pool) = &self.pool {
            for m in self.misses.drain(..) {
                pool.mark_missed(m.idx);
            }
        }
    }

    /// The request ended without such an answer.
    pub fn settle(&mut self) {
        let Some(pool) = &self.pool else { return };
        match self.misses.as_slice() {
            [] => {}
            [m] => pool.mark_slow(m.idx, m.caller, m.waited, m.alternative),
            several => {
                for m in several {
                    pool.mark_failed_for(m.idx, m.caller);
                }
            }
        }
        self.misses.clear();
    }
}

impl Drop for MissedDeadlines {
    fn drop(&mut self) {
        self.settle();
    }
}
