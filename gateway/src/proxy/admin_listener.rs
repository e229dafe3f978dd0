//! The admin listener's connections, guarded as the proxy's are: Pingora's own HTTP server
//! would take heads of up to 1 MiB, re-parse them at every read, wait 60 s per read however
//! long the whole head takes, keep any number of connections, and log every unreadable head
//! as an error. An admin listener on a network address (Prometheus scraping from another
//! host) is reachable by anyone who can reach that address, token or not.
//!
//! Here a connection is closed at once over [`MAX_CONNECTIONS`]; its head (64 KiB at most)
//! must arrive within `limits.client_header_timeout` of the accept or, on a kept-alive
//! connection, of the previous answer; an unreadable one gets a JSON error. Then Pingora's
//! server answers it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora_core::apps::{HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;

use super::connection::{refuse, whole_head, Head};

/// Most admin connections open at once: scrapers and operators, a handful.
pub const MAX_CONNECTIONS: usize = 64;

/// `app` behind the admin listener's guards.
pub struct GuardedAdmin<A> {
    app: Arc<A>,
    open: AtomicUsize,
    /// How long a head (and, between requests, the wait for one) may take.
    head_timeout: Duration,
}

impl<A> GuardedAdmin<A> {
    pub fn new(app: A, head_timeout: Duration) -> Self {
        GuardedAdmin {
            app: Arc::new(app),
            open: AtomicUsize::new(0),
            head_timeout,
        }
    }
}

/// A connection's place, given back when it ends.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for GuardedAdmin<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let _slot = Slot(&self.open);
        loop {
            let mut head = BytesMut::new();
            let deadline = tokio::time::Instant::now() + self.head_timeout;
            match whole_head(&mut stream, &mut head, deadline).await {
                Head::Complete => {}
                Head::Gone => return None,
                Head::Refused(status, code, message) => {
                    refuse(&mut stream, &head, status, code, &message).await;
                    return None;
                }
            }
            let mut session = ServerSession::new_http1(stream);
            session.set_pipelined_prefix(head);
            let reused = self.app.process_new_http(session, shutdown).await?;
            if *shutdown.borrow() {
                return None;
            }
            stream = reused.consume().0;
        }
    }
}
