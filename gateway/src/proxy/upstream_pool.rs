//! Idle backend connections, kept by the gateway per backend.
//!
//! Pingora's pool spawned a task for every connection it took back (one per request), which
//! waited on the socket and a timer until the connection was taken again, and it asked the
//! kernel for the socket's peer (`getpeername`) every time one was reused. Here an idle
//! connection is an entry in its backend's list: taken newest first (the most likely to be
//! warm and open), checked without waiting (`upstream_stream::still_open`), and dropped once
//! it has been idle for the backend's idle time, when a request comes by or at the next
//! sweep (once a second).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pingora_core::connectors::TransportConnector;
use pingora_core::protocols::http::v1::client::HttpSession;
use pingora_core::protocols::Stream;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::Result;

use super::upstream_stream;

/// Idle connections kept per backend, at most: past that the oldest is closed.
const MAX_IDLE: usize = 128;

struct Idle {
    stream: Stream,
    since: Instant,
}

/// One list of idle connections per backend, by the backend's index in the pool.
pub struct UpstreamPool {
    transport: TransportConnector,
    idle: Box<[Mutex<VecDeque<Idle>>]>,
}

impl UpstreamPool {
    pub fn new(backends: usize) -> Self {
        UpstreamPool {
            transport: TransportConnector::new(None),
            idle: (0..backends).map(|_| Mutex::default()).collect(),
        }
    }

    fn list(&self, idx: usize) -> Option<std::sync::MutexGuard<'_, VecDeque<Idle>>> {
        let list = self.idle.get(idx)?;
        Some(list.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A connection to backend `idx`: the newest idle one that is still open, else a new one.
    /// The flag says whether it was reused (a failed write may then be tried once more).
    pub async fn connect(&self, idx: usize, peer: &HttpPeer) -> Result<(HttpSession, bool)> {
        let idle_time = idle_time(peer);
        loop {
            let Some(stream) = self.list(idx).and_then(|mut l| {
                let newest = l.pop_back()?;
                // Everything older has waited longer: the whole list is stale.
                if newest.since.elapsed() >= idle_time {
                    l.clear();
                    return None;
                }
                Some(newest.stream)
            }) else {
                break;
            };
            // Closed by the backend while idle (it never saw a request on it): dropped unused.
            if upstream_stream::still_open(&stream) {
                return Ok((HttpSession::new_with_options(stream, peer), true));
            }
        }
        let stream = self.transport.new_stream(peer).await?;
        Ok((HttpSession::new_with_options(stream, peer), false))
    }

    /// Takes a connection back after a complete exchange; one that cannot carry another
    /// request (the backend said `close`, the body was not read to its end) is closed.
    pub async fn release(&self, idx: usize, peer: &HttpPeer, mut up: HttpSession) {
        up.respect_keepalive();
        let Some(stream) = up.reuse().await else {
            return;
        };
        self.put(idx, idle_time(peer), stream, Instant::now());
    }

    fn put(&self, idx: usize, idle_time: Duration, stream: Stream, now: Instant) {
        // Closed after the lock is let go.
        let mut closed = Vec::new();
        if let Some(mut l) = self.list(idx) {
            while l
                .front()
                .is_some_and(|o| l.len() >= MAX_IDLE || now - o.since >= idle_time)
            {
                closed.extend(l.pop_front());
            }
            l.push_back(Idle { stream, since: now });
        }
        drop(closed);
    }

    /// Closes the connections that have been idle for their backend's idle time (`backends`:
    /// each backend's index and peer).
    pub fn sweep<'a>(&self, backends: impl Iterator<Item = (usize, &'a HttpPeer)>) {
        let now = Instant::now();
        for (idx, peer) in backends {
            let idle_time = idle_time(peer);
            let mut closed = Vec::new();
            if let Some(mut l) = self.list(idx) {
                while l.front().is_some_and(|o| now - o.since >= idle_time) {
                    closed.extend(l.pop_front());
                }
            }
            drop(closed);
        }
    }
}

fn idle_time(peer: &HttpPeer) -> Duration {
    peer.options.idle_timeout.unwrap_or(Duration::from_secs(4))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections are reused newest first; one the backend closed is skipped; one idle past
    /// the idle time is not reused, and a sweep closes it; at most `MAX_IDLE` are kept.
    #[tokio::test]
    async fn newest_open_connection_first_stale_ones_closed() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut peer = HttpPeer::new(addr, false, String::new());
        let idle = Duration::from_millis(300);
        peer.options.idle_timeout = Some(idle);
        let pool = UpstreamPool::new(1);
        let mut servers = Vec::new();
        let open = || {
            let pool = &pool;
            let peer = &peer;
            async move {
                let (up, reused) = pool.connect(0, peer).await.unwrap();
                assert!(!reused, "the pool is empty");
                upstream_stream::gathering(up, peer).into_inner()
            }
        };
        let older = open().await;
        servers.push(l.accept().await.unwrap().0);
        let newer = open().await;
        servers.push(l.accept().await.unwrap().0);
        let closing = open().await;
        let closing_server = l.accept().await.unwrap().0;
        let (older_id, newer_id) = (older.id(), newer.id());
        let now = Instant::now();
        pool.put(0, idle, older, now);
        pool.put(0, idle, newer, now);
        pool.put(0, idle, closing, now);
        drop(closing_server);
        tokio::time::sleep(Duration::from_millis(50)).await;

        let (up, reused) = pool.connect(0, &peer).await.unwrap();
        assert!(reused);
        assert_eq!(
            up.stream().id(),
            newer_id,
            "the newest open one; the closed one skipped"
        );
        let (up2, _) = pool.connect(0, &peer).await.unwrap();
        assert_eq!(up2.stream().id(), older_id);
        drop((up, up2));

        // Idle past the idle time: not reused, and swept.
        let stale = open().await;
        servers.push(l.accept().await.unwrap().0);
        pool.put(0, idle, stale, Instant::now() - idle);
        let (up, reused) = pool.connect(0, &peer).await.unwrap();
        assert!(!reused, "a stale connection is not reused");
        drop(up);
        let kept = open().await;
        servers.push(l.accept().await.unwrap().0);
        pool.put(0, idle, kept, Instant::now() - idle);
        assert_eq!(pool.list(0).unwrap().len(), 1);
        pool.sweep(std::iter::once((0, &peer)));
        assert_eq!(pool.list(0).unwrap().len(), 0, "swept");

        // Bounded: the oldest goes first.
        let mut streams = Vec::new();
        for _ in 0..MAX_IDLE + 5 {
            streams.push(open().await);
            servers.push(l.accept().await.unwrap().0);
        }
        let now = Instant::now();
        for s in streams {
            pool.put(0, idle, s, now);
        }
        assert_eq!(pool.list(0).unwrap().len(), MAX_IDLE);
    }
}
