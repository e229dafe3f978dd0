//! Deadlines one request missed on backends (and writes or streams they broke), judged once
//! the request shows whether it was slow by itself.
//!
//! A missed deadline (the first byte, a read, a write) may be the backend's fault (hung) or
//! the request's own (a long prompt, a model not loaded, another context size). Counted
//! where it happens, one client's slow request retried on every backend took them all out
//! (attacker review, 2026-12-05). So a request's misses wait for its end. A request that
//! missed on several backends, or that another backend then answered only as slowly, was
//! slow by itself: each miss counts once for its caller. A miss is judged alone
//! ([`BackendPool::mark_slow`]) when it was the request's only one, or when another backend
//! then began its answer sooner than the miss had waited (a longer deadline of that
//! backend's own, a cold model's, clears nothing) or took the whole request where this one
//! broke off the write. Whatever the judgement, such failures take out one backend at a
//! time, and one out on them still takes what no other can (`BackendPool::is_standby`).

use std::time::Duration;

use super::pool::Judged;
use super::BackendPool;

/// A miss on backend `idx`, as it will be judged.
struct Miss {
    idx: usize,
    judged: Judged,
}

/// The misses of one request not yet judged; what is left is judged when it is dropped.
#[derive(Default)]
pub struct MissedDeadlines {
    pool: Option<BackendPool>,
    misses: Vec<Miss>,
    /// Another backend answered the request, but not sooner: it is slow everywhere.
    slow_everywhere: bool,
}

impl MissedDeadlines {
    /// Backend `idx` missed a deadline (`broke`: broke off) on the request of `caller` that
    /// had waited `waited` on it.
    pub fn push(
        &mut self,
        pool: &BackendPool,
        idx: usize,
        caller: u64,
        waited: Duration,
        broke: bool,
    ) {
        self.misses.push(Miss {
            idx,
            judged: Judged {
                caller,
                waited,
                at_ms: pool.now_ms(),
                broke,
            },
        });
        self.pool.get_or_insert_with(|| pool.clone());
    }

    /// Another backend's answer to the same request began to come (its first body bytes, or
    /// its whole body), `took` after it had the request: the misses that waited longer than
    /// that, and writes broken off, are judged alone (the request was not slow by itself
    /// there); the others show the request slow everywhere.
    pub fn answered(&mut self, took: Duration) {
        let Some(pool) = &self.pool else { return };
        let mut slow = false;
        self.misses.retain(|m| {
            if !m.judged.broke && took >= m.judged.waited {
                slow = true;
                return true;
            }
            pool.mark_slow(m.idx, m.judged);
            false
        });
        self.slow_everywhere |= slow;
    }

    /// The request ended: what was not judged alone already.
    pub fn settle(&mut self) {
        let Some(pool) = &self.pool else { return };
        match self.misses.as_slice() {
            [] => {}
            [m] if !self.slow_everywhere => pool.mark_slow(m.idx, m.judged),
            several => {
                for m in several {
                    pool.mark_failed_for(m.idx, m.judged.caller);
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
