//! The admin listener's connections, guarded as the proxy's are: Pingora's own HTTP server
//! would take heads of up to 1 MiB, re-parse them at every read, wait 60 s per read however
//! long the whole head takes, keep any number of connections, and log every unreadable head
//! as an error. An admin listener on a network address (Prometheus scraping from another
//! host) is reachable by anyone who can reach that address, token or not.
//!
//! Here a connection is closed at once over [`MAX_CONNECTIONS`], or over
//! [`MAX_PER_CLIENT`] from one address (so one host cannot take every place from the
//! scrapers and probes); its head (64 KiB at most) must arrive within
//! `limits.client_header_timeout`, at most [`HEAD_TIMEOUT`], of the accept or, on a
//! kept-alive connection, of the previous answer; an unreadable head, or one announcing a
//! body (no admin route takes one), gets a JSON error. Then Pingora's server answers it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use gateway_filter::http::StatusCode;
use pingora_core::apps::{HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::l4::socket::SocketAddr;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;

use super::connection::{refuse, whole_head, Head};
use super::connection_caps::ListenerCaps;

/// Most admin connections open at once: scrapers and operators, a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// Most from one client address.
pub const MAX_PER_CLIENT: u32 = 8;
/// The longest a head (and, between requests, the wait for one) may take.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// `app` behind the admin listener's guards.
pub struct GuardedAdmin<A> {
    app: Arc<A>,
    /// The proxy's own caps, with the admin listener's figures.
    caps: Arc<ListenerCaps>,
    head_timeout: Duration,
}

impl<A> GuardedAdmin<A> {
    pub fn new(app: A, caps: Arc<ListenerCaps>, head_timeout: Duration) -> Self {
        GuardedAdmin {
            app: Arc::new(app),
            caps,
            head_timeout: head_timeout.min(HEAD_TIMEOUT),
        }
    }
}

/// Whether a complete head announces a body (a length other than 0, or chunked framing).
fn announces_body(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    if req.parse(head).is_err() {
        // More header lines than admin requests carry: judged as carrying anything.
        return true;
    }
    req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-length") && h.value.trim_ascii() != b"0")
    })
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for GuardedAdmin<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let client = match stream.get_socket_digest()?.peer_addr() {
            Some(SocketAddr::Inet(a)) => Some(a.ip()),
            _ => None,
        };
        let _slot = self.caps.admit(client)?;
        loop {
            let mut head = BytesMut::new();
            let deadline = tokio::time::Instant::now() + self.head_timeout;
            match whole_head(&mut stream, &mut head, deadline).await {
                Head::Complete if announces_body(&head) => {
                    refuse(
                        &mut stream,
                        &head,
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_not_allowed",
                        "admin requests carry no body",
                    )
                    .await;
                    return None;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_announcing_a_body_is_seen() {
        for (head, body) in [
            (&b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"[..], false),
            (b"GET /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", false),
            (
                b"POST /health HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n",
                true,
            ),
            (
                b"POST /health HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
                true,
            ),
        ] {
            assert_eq!(
                announces_body(head),
                body,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }
}
