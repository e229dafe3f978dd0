//! How one client connection is served, around Pingora's HTTP session loop: a deadline for
//! the whole request head (Pingora has only a per-read timeout, so a client sending one
//! header byte every few seconds would hold its connection forever), the keep-alive idle
//! time, and how many requests one connection may carry.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::{HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;

use super::Gateway;

/// What the connection loop and the request it is serving tell each other.
struct RequestTurn {
    /// Set once the request head is parsed (`early_request_filter`): the head deadline no
    /// longer applies.
    head_read: AtomicBool,
    /// The last request this connection may carry (`keepalive_requests`, shutdown).
    last: bool,
}

tokio::task_local! {
    static TURN: Arc<RequestTurn>;
}

/// HTTP/2 connections waiting for their first request, by client address (HTTP/2 streams
/// run in tasks of their own, out of reach of a task-local).
static H2_WAITING: LazyLock<Mutex<HashMap<SocketAddr, Arc<AtomicBool>>>> =
    LazyLock::new(Default::default);

fn h2_waiting() -> std::sync::MutexGuard<'static, HashMap<SocketAddr, Arc<AtomicBool>>> {
    H2_WAITING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Called from `early_request_filter`: the head arrived in time. Returns whether this is the
/// connection's last request (its answer must then say `Connection: close`).
pub fn head_read(http2_client: Option<SocketAddr>) -> bool {
    if let Some(peer) = http2_client {
        if let Some(first) = h2_waiting().remove(&peer) {
            first.store(true, Ordering::Release);
        }
        return false;
    }
    TURN.try_with(|t| {
        t.head_read.store(true, Ordering::Release);
        t.last
    })
    .unwrap_or(false)
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
    pub fn new(mut proxy: HttpProxy<Gateway>, limits: ConnectionLimits) -> Self {
        // An HTTP/2 connection with no stream open is closed after the keep-alive time.
        let mut options = pingora_core::apps::HttpServerOptions::default();
        options.h2_idle_timeout = Some(limits.keepalive_timeout);
        proxy.server_options = Some(options);
        GatewayApp {
            proxy: Arc::new(proxy),
            limits,
        }
    }

    /// Serves an HTTP/2 connection with Pingora's own loop, closing it when its first request
    /// has not arrived within the head timeout (a client that finishes TLS and then sends
    /// no preface, or no request, would otherwise hold it forever).
    async fn serve_h2(&self, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        let first = Arc::new(AtomicBool::new(false));
        if let Some(p) = peer {
            h2_waiting().insert(p, first.clone());
        }
        let serve = ServerApp::process_new(&self.proxy, stream, shutdown);
        tokio::pin!(serve);
        let out = tokio::select! {
            out = &mut serve => Some(out),
            _ = tokio::time::sleep(self.limits.head_timeout) => None,
        };
        if let Some(p) = peer {
            h2_waiting().remove(&p);
        }
        match out {
            Some(out) => out,
            None if first.load(Ordering::Acquire) => serve.await,
            None => None,
        }
    }

    /// Serves one HTTP/1 request, or gives up on it when its head is not complete within
    /// `deadline` (the connection is then dropped: closed without an answer, as nginx does).
    async fn serve_one(
        &self,
        session: ServerSession,
        shutdown: &ShutdownWatch,
        deadline: Duration,
        last: bool,
    ) -> Option<Stream> {
        let turn = Arc::new(RequestTurn {
            head_read: AtomicBool::new(false),
            last,
        });
        let serve = TURN.scope(
            turn.clone(),
            HttpServerApp::process_new_http(&self.proxy, session, shutdown),
        );
        tokio::pin!(serve);
        let reused = tokio::select! {
            out = &mut serve => out,
            _ = tokio::time::sleep(deadline) => {
                if !turn.head_read.load(Ordering::Acquire) {
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
            return self.serve_h2(stream, shutdown).await;
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
            stream = self.serve_one(session, shutdown, deadline, last).await?;
            if last {
                return None;
            }
        }
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.proxy).await;
    }
}
