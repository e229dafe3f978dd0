//! Deadlines one request missed on backends, judged once the request shows whether it was
//! slow by itself.
//!
//! A missed deadline (the first byte, a read, a write) may be the backend's fault (hung) or
//! the request's own (a long prompt, a model not loaded, another context size). Counted
//! where it happens, one client's slow request retried on every backend took them all out
//! (attacker review, 2026-12-05). So a request's misses wait for its end: a request that
//! missed on several backends was slow by itself, and each counts once for its caller,
//! unless another backend then answered it quickly (in half the time a backend missed it
//! in: a deadline of its own that is longer, a cold model's, does not clear the request);
//! a miss judged alone goes to [`BackendPool::mark_slow`].

use std::time::Duration;

use super::BackendPool;

struct Miss {
    idx: usize,
    caller: u64,
    waited: Duration,
    /// When it missed, on the pool's clock.
    at_ms: u64,
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
        self.misses.push(Miss {
            idx,
            caller,
            waited,
            at_ms: pool.now_ms(),
            alternative,
        });
        self.pool.get_or_insert_with(|| pool.clone());
    }

    /// Another backend answered the same request successfully, `took` after it had it: the
    /// backends that missed it in twice that time or more are judged alone (the request was
    /// not slow by itself there).
    pub fn answered(&mut self, took: Duration) {
        let Some(pool) = &self.pool else { return };
        self.misses.retain(|m| {
            if took.saturating_mul(2) > m.waited {
                return true;
            }
            pool.mark_slow(m.idx, m.caller, m.waited, m.at_ms, true);
            false
        });
    }

    /// The request ended: what was not cleared by another backend's answer.
    pub fn settle(&mut self) {
        let Some(pool) = &self.pool else { return };
        match self.misses.as_slice() {
            [] => {}
            [m] => pool.mark_slow(m.idx, m.caller, m.waited, m.at_ms, m.alternative),
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
