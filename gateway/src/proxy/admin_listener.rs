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

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
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

/// Most admin connections open at once: scrapers and operators, a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// Most from one client address.
pub const MAX_PER_CLIENT: u32 = 8;
/// The longest a head (and, between requests, the wait for one) may take.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// `app` behind the admin listener's guards.
pub struct GuardedAdmin<A> {
    app: Arc<A>,
    open: AtomicUsize,
    by_client: Mutex<HashMap<IpAddr, u32>>,
    head_timeout: Duration,
}

impl<A> GuardedAdmin<A> {
    pub fn new(app: A, head_timeout: Duration) -> Self {
        GuardedAdmin {
            app: Arc::new(app),
            open: AtomicUsize::new(0),
            by_client: Mutex::new(HashMap::new()),
            head_timeout: head_timeout.min(HEAD_TIMEOUT),
        }
    }

    /// A place for a connection from `client`, if there is one.
    fn admit(&self, client: Option<IpAddr>) -> Option<Slot<'_, A>> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        if let Some(ip) = client {
            let mut by = self
                .by_client
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let n = by.entry(ip).or_insert(0);
            if *n >= MAX_PER_CLIENT {
                drop(by);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return None;
            }
            *n += 1;
        }
        Some(Slot {
            admin: self,
            client,
        })
    }
}

/// A connection's place, given back when it ends.
struct Slot<'a, A> {
    admin: &'a GuardedAdmin<A>,
    client: Option<IpAddr>,
}

impl<A> Drop for Slot<'_, A> {
    fn drop(&mut self) {
        self.admin.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.client {
            let mut by = self
                .admin
                .by_client
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = by.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    by.remove(&ip);
                }
            }
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
        let _slot = self.admit(client)?;
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
    fn places_per_client_and_in_all() {
        let admin = GuardedAdmin::new((), Duration::from_secs(60));
        assert_eq!(admin.head_timeout, HEAD_TIMEOUT);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mine: Vec<_> = (0..MAX_PER_CLIENT)
            .map(|_| admin.admit(Some(a)).unwrap())
            .collect();
        assert!(admin.admit(Some(a)).is_none(), "one address, eight places");
        let others: Vec<_> = (0..MAX_CONNECTIONS - MAX_PER_CLIENT as usize)
            .map(|i| {
                admin
                    .admit(Some(IpAddr::from([
                        10,
                        0,
                        (i / 250) as u8,
                        (i % 250) as u8,
                    ])))
                    .unwrap()
            })
            .collect();
        assert!(
            admin.admit(Some("192.0.2.9".parse().unwrap())).is_none(),
            "64 in all"
        );
        drop(mine);
        assert_eq!(admin.by_client.lock().unwrap().get(&a), None);
        assert!(admin.admit(Some(a)).is_some());
        drop(others);
        assert_eq!(admin.open.load(Ordering::Acquire), 0);
    }

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
