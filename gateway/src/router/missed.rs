//! Deadlines one request missed on backends, judged once the request shows whether it was
//! slow by itself.
//!
//! A missed deadline (the first byte, a read, a write) may be the backend's fault (hung) or
//! the request's own (a long prompt, a model not loaded, another context size). Counted
//! where it happens, one client's slow request retried on every backend took them all out
//! (attacker review, 2026-12-05). So a request's misses wait for its end. A request that
//! missed on several backends, or that another backend then answered only slowly too, was
//! slow by itself: each miss counts once for its caller. A miss is judged alone
//! ([`BackendPool::mark_slow`]) when it was the request's only one, or when another backend
//! then started its answer sooner than the miss's wait (a longer deadline of that backend's
//! own, a cold model's, clears nothing). Whatever the judgement, such failures take out one
//! backend at a time, never the last one for a model (`BackendPool::fail_maybe_caused`).

use std::time::Duration;

use super::pool::Serving;
use super::BackendPool;

struct Miss {
    idx: usize,
    caller: u64,
    waited: Duration,
    /// When it missed, on the pool's clock.
    at_ms: u64,
    /// The request's own answer's start there, if it began before the miss.
    own: Option<Serving>,
}

/// The misses of one request not yet judged; what is left is judged when it is dropped.
#[derive(Default)]
pub struct MissedDeadlines {
    pool: Option<BackendPool>,
    misses: Vec<Miss>,
    /// Another backend answered the request, but not quickly: it is slow everywhere.
    slow_everywhere: bool,
}

impl MissedDeadlines {
    /// Backend `idx` missed a deadline (or broke off) on the request of `caller` that had
    /// waited `waited` on it; `own`: the request's answer had begun there.
    pub fn push(
        &mut self,
        pool: &BackendPool,
        idx: usize,
        caller: u64,
        waited: Duration,
        own: Option<Serving>,
    ) {
        self.misses.push(Miss {
            idx,
            caller,
            waited,
            at_ms: pool.now_ms(),
            own,
        });
        self.pool.get_or_insert_with(|| pool.clone());
    }

    /// Another backend's answer to the same request started to come (its first body bytes, or
    /// its whole body), `took` after it had the request: the misses that waited longer than
    /// that are judged alone (the request was not slow by itself there); the others show the
    /// request slow everywhere.
    pub fn answered(&mut self, took: Duration) {
        let Some(pool) = &self.pool else { return };
        let mut slow = false;
        self.misses.retain(|m| {
            if took >= m.waited {
                slow = true;
                return true;
            }
            pool.mark_slow(m.idx, m.caller, m.waited, m.at_ms, m.own);
            false
        });
        self.slow_everywhere |= slow;
    }

    /// The request ended: what was not judged alone already.
    pub fn settle(&mut self) {
        let Some(pool) = &self.pool else { return };
        match self.misses.as_slice() {
            [] => {}
            [m] if !self.slow_everywhere => {
                pool.mark_slow(m.idx, m.caller, m.waited, m.at_ms, m.own)
            }
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
