//! Checks whose shared-state answer is still on its way.
//!
//! With several replicas on one Redis, the key's rate limit and the budget each wait for
//! a server-side script. Run one after the other, a request waits for two round trips;
//! started together, they share one. A filter starts its call in `on_request`, hands the
//! chain the future of its answer ([`RequestCtx::defer`]) and returns at once; the chain
//! runs the next filters that may run alongside ([`crate::Filter::runs_alongside`]), then
//! awaits every answer at once and applies their verdicts in chain order, so the first
//! refusal in the chain's order still wins.
//!
//! A verdict that is never applied (an earlier filter refused, or the client went away) is
//! dropped: whatever it holds (a token reservation, a budget's reservation, an in-flight
//! slot) gives itself back when dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use crate::{Rejection, RequestCtx};

/// What a deferred check concluded, applied to the request in chain order: response
/// headers, holds kept in the context, or the rejection.
pub type Verdict = Box<dyn FnOnce(&mut RequestCtx) -> Result<(), Rejection> + Send>;

/// A check waiting for its answer.
pub type Deferred = Pin<Box<dyn Future<Output = Verdict> + Send>>;

/// The request's checks still waiting, with the name of the filter each is for. Behind a
/// mutex only so that the context stays `Sync`: it is reached through `&mut` (no locking).
#[derive(Default)]
pub struct Pending(Mutex<Vec<(&'static str, Deferred)>>);

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |v| v.len());
        write!(f, "Pending({n})")
    }
}

impl Pending {
    fn list(&mut self) -> &mut Vec<(&'static str, Deferred)> {
        self.0.get_mut().unwrap_or_else(|p| p.into_inner())
    }
}

impl RequestCtx {
    /// Leaves the end of `filter`'s check to the chain: `check` is awaited together with the
    /// other filters' before the next filter that cannot run alongside, and before the
    /// request goes on.
    pub fn defer(&mut self, filter: &'static str, check: Deferred) {
        self.pending.list().push((filter, check));
    }

    /// Whether checks are waiting.
    pub fn has_pending(&mut self) -> bool {
        !self.pending.list().is_empty()
    }

    /// The waiting checks, in the order they were deferred.
    pub fn take_pending(&mut self) -> Vec<(&'static str, Deferred)> {
        std::mem::take(self.pending.list())
    }
}
