//! Whether this process is on its way out (SIGTERM, Ctrl-C, or SIGQUIT handing its sockets to
//! an `--upgrade` process). Once it is, every connection ends after its current request, and
//! says so in that response (`Connection: close`), so clients open their next connection to
//! whoever listens now instead of sending it on a connection about to close.
//!
//! Pingora's own shutdown signal comes only after its 5 s of accepting alongside the new
//! process; this one is raised as soon as the shutdown or hand-over begins.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

use pingora_proxy::Session;
use tokio::sync::watch;

/// How long a kept-alive connection is still listened to once draining began: a client that
/// got its last response with `keep-alive` just before may be sending its next request right
/// now, and closing under it would fail that request.
pub const LINGER: std::time::Duration = std::time::Duration::from_millis(250);

/// Read on every request (a plain load, no shared lock on the hot path).
static DRAINING: AtomicBool = AtomicBool::new(false);
/// Woken once, for connections that wait idle.
static DRAIN: LazyLock<watch::Sender<bool>> = LazyLock::new(|| watch::channel(false).0);

/// The process begins to drain; idempotent.
pub fn begin() {
    if !DRAINING.swap(true, Ordering::AcqRel) {
        DRAIN.send_replace(true);
    }
}

pub fn draining() -> bool {
    DRAINING.load(Ordering::Acquire)
}

/// A receiver to wait for the drain with (no allocation: a reference count).
pub fn watch() -> watch::Receiver<bool> {
    DRAIN.subscribe()
}

/// Called right before a response head is written: while draining, the response says
/// `Connection: close` and the connection ends with it.
pub fn close_if_draining(session: &mut Session) {
    if draining() {
        session.set_keepalive(None);
    }
}
