//! How one client connection is served, around Pingora's HTTP session loop: a deadline for
//! the whole request head (Pingora has only a per-read timeout, so a client sending one
//! header byte every few seconds would hold its connection forever), the keep-alive idle
//! time, and how many requests one connection may carry.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::{HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;

use super::Gateway;

tokio::task_local! {
    /// Set once the request head is parsed (`early_request_filter`), for this connection's
    /// head deadline.
    static HEAD_READ: Arc<AtomicBool>;
}

/// Called from `early_request_filter`: the head arrived in time.
pub fn head_read() {
    let _ = HEAD_READ.try_with(|h| h.store(true, Ordering::Release));
}

pub struct ConnectionLimits {
    pub head_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub keepalive_requests: u32,
}

/// The gateway's server application: Pingora's HTTP proxy, with per-connection limits.
pub struct GatewayApp {
    proxy: Arc<HttpProxy<Gateway>>,
    limits: ConnectionLimits,
}

impl GatewayApp {
    pub fn new(proxy: HttpProxy<Gateway>, limits: ConnectionLimits) -> Self {
        GatewayApp {
            proxy: Arc::new(proxy),
            limits,
        }
    }

    /// Serves one HTTP/1 request, or gives up on it when its head is not complete within
    /// `deadline` (the connection is then dropped: closed without an answer, as nginx does).
    async fn serve_one(
        &self,
        session: ServerSession,
        shutdown: &ShutdownWatch,
        deadline: Duration,
    ) -> Option<Stream> {
        let head = Arc::new(AtomicBool::new(false));
        let serve = HEAD_READ.scope(
            head.clone(),
            HttpServerApp::process_new_http(&self.proxy, session, shutdown),
        );
        tokio::pin!(serve);
        let reused = tokio::select! {
            out = &mut serve => out,
            _ = tokio::time::sleep(deadline) => {
                if !head.load(Ordering::Acquire) {
                    return None;
                }
                serve.await
            }
        };
        reused.map(|r| r.consume().0)
    }
}

#[async_trait]
impl ServerApp for GatewayApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // HTTP/2 multiplexes streams over the connection: Pingora's own handling.
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        let l = &self.limits;
        let mut stream = stream;
        let mut served = 0u32;
        loop {
            let mut session = ServerSession::new_http1(stream);
            served += 1;
            let last = *shutdown.borrow() || served >= l.keepalive_requests;
            // Per read; the whole head is bounded below.
            session.set_keepalive((!last).then_some(l.keepalive_timeout.as_secs().max(1)));
            // The first request's head must arrive within the head timeout of the accept; a
            // later one may first wait out the keep-alive idle time.
            let deadline = if served == 1 {
                l.head_timeout
            } else {
                l.keepalive_timeout + l.head_timeout
            };
            stream = self.serve_one(session, shutdown, deadline).await?;
            if last {
                return None;
            }
        }
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.proxy).await;
    }
}
