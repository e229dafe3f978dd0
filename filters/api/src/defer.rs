//! Checks whose shared-state answer is still on its way.
//!
//! With several replicas on one Redis, the address limit, the key's rate limit and the
//! budget each wait for a server-side script. Run one after the other, a request waits for
//! a round trip each; started together, they share one. A filter starts its call in
//! `on_request`, hands the chain the future of its answer ([`RequestCtx::defer`]) and
//! returns at once; the chain runs the next filters that may run alongside
//! ([`crate::Filter::runs_alongside`]), reads the body while the answers travel, then awaits
//! every answer at once and applies their verdicts in chain order, so the first refusal in
//! the chain's order still wins.
//!
//! A filter that runs alongside but reaches a step that must not be taken for a request an
//! earlier check may refuse (counting a failed password, hashing one, asking a validator)
//! awaits the earlier answers first ([`RequestCtx::settle_pending`]).
//!
//! A verdict that is never applied (an earlier filter refused, or the client went away) is
//! dropped: whatever it holds (a token reservation, a budget's reservation, an in-flight
//! slot, a request counted against a rate) gives itself back when dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use futures_util::future::JoinAll;

use crate::{Decision, Rejection, RequestCtx};

/// What a deferred check concluded, applied to the request in chain order: response
/// headers, holds kept in the context, or the rejection.
pub type Verdict = Box<dyn FnOnce(&mut RequestCtx) -> Result<(), Rejection> + Send>;

/// A check waiting for its answer.
pub type Deferred = Pin<Box<dyn Future<Output = Verdict> + Send>>;

/// The request's checks still waiting, with the name of the filter each is for, and whether
/// one of them may refuse again and again at a cost (see [`RequestCtx::defer_costly`]).
/// Behind a mutex only so that the context stays `Sync`: it is reached through `&mut` (no
/// locking).
#[derive(Default)]
pub struct Pending {
    checks: Mutex<Vec<(&'static str, Deferred)>>,
    costly: bool,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.checks.lock().map_or(0, |v| v.len());
        write!(f, "Pending({n})")
    }
}

impl Pending {
    fn list(&mut self) -> &mut Vec<(&'static str, Deferred)> {
        self.checks.get_mut().unwrap_or_else(|p| p.into_inner())
    }
}

impl RequestCtx {
    /// Leaves the end of `filter`'s check to the chain: `check` is awaited together with the
    /// other filters' before the next filter that cannot run alongside, and before the
    /// request goes on.
    pub fn defer(&mut self, filter: &'static str, check: Deferred) {
        self.pending.list().push((filter, check));
    }

    /// Like [`RequestCtx::defer`], for a check whose refusal is not remembered: a client it
    /// refuses meets it on the server again with every request, so the filters that could
    /// run alongside it (authentication, the body read, the key's limits) wait for its answer
    /// instead ([`RequestCtx::pending_costly`]); otherwise each refused request would reach
    /// them.
    pub fn defer_costly(&mut self, filter: &'static str, check: Deferred) {
        self.pending.costly = true;
        self.defer(filter, check);
    }

    /// Whether a check waiting was deferred with [`RequestCtx::defer_costly`].
    pub fn pending_costly(&self) -> bool {
        self.pending.costly
    }

    /// Whether checks are waiting.
    pub fn has_pending(&mut self) -> bool {
        !self.pending.list().is_empty()
    }

    /// The waiting checks, in the order they were deferred.
    pub fn take_pending(&mut self) -> Vec<(&'static str, Deferred)> {
        self.pending.costly = false;
        std::mem::take(self.pending.list())
    }
}

/// The answers of the checks waiting, taken out of the request so that they can travel while
/// the request is used for something else (its body read). Dropped unawaited, every check
/// gives back what it holds.
pub struct Answers {
    names: Vec<&'static str>,
    checks: JoinAll<Deferred>,
}

impl Answers {
    /// Every answer, awaited together.
    pub async fn wait(self) -> Verdicts {
        Verdicts(self.names.into_iter().zip(self.checks.await).collect())
    }
}

/// The verdicts of the checks that were waiting, in chain order.
pub struct Verdicts(Vec<(&'static str, Verdict)>);

impl Verdicts {
    /// Applies the verdicts in order; the first refusal is recorded in `ctx.decision` and
    /// returned, and the verdicts after it are dropped (what they hold gives itself back).
    pub fn apply(self, ctx: &mut RequestCtx) -> Result<(), Rejection> {
        for (name, verdict) in self.0 {
            if let Err(r) = verdict(ctx) {
                // Answers put back while travelling ([`RequestCtx::defer_answers`]) recorded
                // the refusal under the filter that made it.
                if ctx.decision == Decision::Allowed {
                    ctx.decision = Decision::Rejected {
                        filter: name,
                        code: r.code,
                    };
                }
                return Err(r);
            }
        }
        Ok(())
    }
}

/// Answers still travelling, taken out with [`RequestCtx::answers`].
pub type Travelling = Pin<Box<dyn Future<Output = Verdicts> + Send>>;

/// Left in [`RequestCtx::extensions`] when answers put back while travelling
/// ([`RequestCtx::defer_answers`]) refused the request: the checks before the body refused
/// it after the body was read.
#[derive(Debug, Clone, Copy)]
pub struct RefusedAfterBody;

impl RequestCtx {
    /// The answers of the checks waiting, if any, to await apart from the request.
    pub fn answers(&mut self) -> Option<Answers> {
        if !self.has_pending() {
            return None;
        }
        let (names, checks): (Vec<_>, Vec<_>) = self.take_pending().into_iter().unzip();
        Some(Answers {
            names,
            checks: futures_util::future::join_all(checks),
        })
    }

    /// Puts answers taken out with [`RequestCtx::answers`] back while they still travel (the
    /// body was read before they came), ahead of the checks deferred since: they are awaited
    /// with the later filters' and applied first.
    pub fn defer_answers(&mut self, answers: Travelling) {
        let check: Deferred = Box::pin(async move {
            let verdicts = answers.await;
            Box::new(move |ctx: &mut RequestCtx| {
                let applied = verdicts.apply(ctx);
                if applied.is_err() {
                    ctx.extensions.insert(RefusedAfterBody);
                }
                applied
            }) as Verdict
        });
        self.pending.list().insert(0, ("chain", check));
    }

    /// Awaits the checks waiting, all at once (their shared calls share a round trip), and
    /// applies their verdicts in chain order: the first refusal is recorded and returned.
    pub async fn settle_pending(&mut self) -> Result<(), Rejection> {
        match self.answers() {
            Some(answers) => answers.wait().await.apply(self),
            None => Ok(()),
        }
    }
}
