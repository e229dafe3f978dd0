//! A plain-TCP client connection as Pingora's session sees it (`IO`), owned by the gateway.
//!
//! Pingora's own stream type allocates its write buffer at accept and keeps it for the life of
//! the connection, and it cannot be taken apart again. This one holds the socket and a write
//! buffer that exists only while a request is being answered; between requests the connection
//! loop takes it back (`into_any`) and waits for the next request on the bare socket, so an
//! idle kept-alive connection costs its socket, its digest and a small task.

use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::InFlight;

/// Writes up to this size are gathered and sent together (a response head and a small body go
/// out in one system call); a larger one goes out with what is gathered in one vectored write.
const WRITE_BUFFER: usize = 4 << 10;

/// A kept-alive connection that stays idle this long gives its write buffer back (under load
/// the next request comes sooner, and the buffer is kept).
const RELEASE_AFTER: Duration = Duration::from_millis(50);

/// Room for the start of a request head (Pingora's parser continues in the same buffer).
const HEAD_BUFFER: usize = 4 << 10;

pub struct ClientStream {
    tcp: TcpStream,
    /// Gathered writes; no capacity while a plain connection is idle (a TLS one keeps it).
    out: Vec<u8>,
    digest: Option<Arc<SocketDigest>>,
    /// How long a write may wait for the client to take bytes (`client_send_timeout`).
    send_timeout: Duration,
    /// Runs while the client takes nothing; made only then.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl std::fmt::Debug for ClientStream {
    // Pingora logs streams on some errors: never the bytes of an answer.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClientStream(fd {}, {} bytes gathered)",
            self.tcp.as_raw_fd(),
            self.out.len()
        )
    }
}

impl ClientStream {
    pub fn new(tcp: TcpStream, digest: SocketDigest, send_timeout: Duration) -> Self {
        ClientStream {
            tcp,
            out: Vec::new(),
            digest: Some(Arc::new(digest)),
            send_timeout,
            stalled: None,
        }
    }

    /// The socket, for a look at it without reading (see `forward::exchange`).
    pub fn socket(&self) -> &TcpStream {
        &self.tcp
    }

    /// Waits until the client sends the start of its next request, at most `idle`, and
    /// returns what it read. `None`: the client left, stayed silent, or shutdown began while
    /// it was idle (see `connection::next_request`, the same for other streams).
    pub async fn next_request(
        &mut self,
        idle: Duration,
        mut drain: Option<(&mut ShutdownWatch, &InFlight)>,
    ) -> Option<BytesMut> {
        let deadline = tokio::time::Instant::now() + idle;
        let mut released = false;
        loop {
            let ready = {
                let readable = self.tcp.readable();
                tokio::pin!(readable);
                // Under load the next request is usually there already: no timer for that.
                let now = tokio::select! {
                    biased;
                    r = &mut readable => Some(r),
                    _ = std::future::ready(()) => None,
                };
                match now {
                    Some(r) => r,
                    None => {
                        let until = if released {
                            deadline
                        } else {
                            deadline.min(tokio::time::Instant::now() + RELEASE_AFTER)
                        };
                        match wait(readable, until, drain.as_mut()).await {
                            Wait::Ready(r) => r,
                            Wait::Gone => return None,
                            Wait::TimedOut if until < deadline => {
                                // Idle for a while: the buffer is not needed until it ends.
                                // (Pingora flushes every answer before the connection is
                                // handed back, so nothing gathered is dropped here.)
                                if self.out.is_empty() {
                                    self.out = Vec::new();
                                }
                                released = true;
                                continue;
                            }
                            Wait::TimedOut => return None,
                        }
                    }
                }
            };
            ready.ok()?;
            let mut head = BytesMut::with_capacity(HEAD_BUFFER);
            match self.tcp.try_read_buf(&mut head) {
                Ok(0) => return None,
                Ok(_) => return Some(head),
                // Readiness was stale: wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return None,
            }
        }
    }

    /// Writes to the socket. A client that takes nothing for `send_timeout` fails the write:
    /// otherwise a flush (which Pingora does without a deadline) would wait for it forever,
    /// holding the connection's cap slot and keeping shutdown waiting.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        parts: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.tcp).poll_write_vectored(cx, parts) {
            Poll::Pending => {
                let limit = self.send_timeout;
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client took no bytes within client_send_timeout",
                )))
            }
            Poll::Ready(Ok(0)) if parts.iter().any(|p| !p.is_empty()) => {
                Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
            }
            done => {
                self.stalled = None;
                done
            }
        }
    }

    /// Writes out everything gathered, as much as the socket takes now.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            let sent = self.poll_send(cx, &[IoSlice::new(&out)]);
            self.out = out;
            let n = ready!(sent)?;
            self.out.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

enum Wait {
    Ready(io::Result<()>),
    TimedOut,
    /// Shutdown began and no request came within the linger time.
    Gone,
}

/// Waits for `readable` until `until`; once shutdown begins, only the linger time more.
async fn wait<F: std::future::Future<Output = io::Result<()>> + Unpin>(
    mut readable: F,
    until: tokio::time::Instant,
    drain: Option<&mut (&mut ShutdownWatch, &InFlight)>,
) -> Wait {
    let Some((watch, opening)) = drain else {
        return match tokio::time::timeout_at(until, readable).await {
            Ok(r) => Wait::Ready(r),
            Err(_) => Wait::TimedOut,
        };
    };
    tokio::select! {
        biased;
        r = tokio::time::timeout_at(until, &mut readable) => match r {
            Ok(r) => Wait::Ready(r),
            Err(_) => Wait::TimedOut,
        },
        // Draining: a request already on its way is still taken (and counted, so the process
        // does not exit under it).
        _ = async { watch.wait_for(|down| *down).await.map(drop) } => {
            let _lingering = opening.enter();
            match tokio::time::timeout(super::drain::LINGER, readable).await {
                Ok(r) => Wait::Ready(r),
                Err(_) => Wait::Gone,
            }
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.out.len() + buf.len() <= WRITE_BUFFER {
            if this.out.capacity() == 0 {
                this.out.reserve_exact(WRITE_BUFFER);
            }
            this.out.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        // What is gathered and this write, together.
        while !this.out.is_empty() {
            let out = std::mem::take(&mut this.out);
            let sent = this.poll_send(cx, &[IoSlice::new(&out), IoSlice::new(buf)]);
            this.out = out;
            let n = ready!(sent)?;
            if n >= this.out.len() {
                let taken = n - this.out.len();
                this.out.clear();
                if taken > 0 {
                    return Poll::Ready(Ok(taken));
                }
            } else {
                this.out.drain(..n);
            }
        }
        this.poll_send(cx, &[IoSlice::new(buf)])
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        // Whatever is still gathered goes out if the socket takes it now (a session that ends
        // without a flush); closing must not wait for a client.
        if !self.out.is_empty() {
            let _ = self.tcp.try_write(&self.out);
        }
    }
}

#[async_trait]
impl Shutdown for ClientStream {
    async fn shutdown(&mut self) {
        if let Err(e) = AsyncWriteExt::shutdown(self).await {
            log::debug!("closing a client connection: {e}");
        }
    }
}

impl UniqueID for ClientStream {
    fn id(&self) -> UniqueIDType {
        self.tcp.as_raw_fd()
    }
}

impl Ssl for ClientStream {}

#[async_trait]
impl Peek for ClientStream {}

impl GetTimingDigest for ClientStream {
    // Pingora builds a vector per request from this; nothing of the gateway reads it.
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        Vec::new()
    }
}

impl GetProxyDigest for ClientStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for ClientStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.digest.clone()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.digest = Some(Arc::new(digest));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn pair(send_timeout: Duration) -> (ClientStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        let digest = SocketDigest::from_raw_fd(tcp.as_raw_fd());
        (ClientStream::new(tcp, digest, send_timeout), peer)
    }

    /// Writes of every size, gathered or not, arrive complete and in order.
    #[tokio::test]
    async fn writes_arrive_whole_and_in_order() {
        let (mut s, mut peer) = pair(Duration::from_secs(5)).await;
        let mut sent = Vec::new();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        });
        for i in 0..400usize {
            // Small ones (gathered), ones that cross the buffer, large ones.
            let len = [1, 100, 3000, 5000, 70_000][i % 5] + i;
            let chunk: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
            s.write_all(&chunk).await.unwrap();
            sent.extend_from_slice(&chunk);
            if i % 7 == 0 {
                s.flush().await.unwrap();
            }
        }
        AsyncWriteExt::shutdown(&mut s).await.unwrap();
        let got = reader.await.unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "bytes differ");
    }

    /// A client that takes nothing: the write (or the flush) fails after `send_timeout`
    /// instead of waiting for ever.
    #[tokio::test]
    async fn a_client_that_reads_nothing_fails_the_write() {
        let (mut s, peer) = pair(Duration::from_millis(300)).await;
        let chunk = vec![b'x'; 64 << 10];
        let start = std::time::Instant::now();
        let err = loop {
            if let Err(e) = s.write_all(&chunk).await {
                break e;
            }
            if let Err(e) = s.flush().await {
                break e;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "never timed out");
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(peer);
    }

    /// Idle, a plain connection gives its write buffer back; the next request is read.
    #[tokio::test]
    async fn idle_connection_releases_its_buffer_and_reads_the_next_request() {
        let (mut s, mut peer) = pair(Duration::from_secs(5)).await;
        s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        s.flush().await.unwrap();
        assert!(s.out.capacity() > 0);
        let write = tokio::spawn(async move {
            tokio::time::sleep(RELEASE_AFTER * 3).await;
            peer.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            peer
        });
        let head = s.next_request(Duration::from_secs(5), None).await.unwrap();
        assert_eq!(&head[..], b"GET / HTTP/1.1\r\n");
        assert_eq!(s.out.capacity(), 0, "the write buffer was given back");
        // Silent past the idle time: None.
        let _peer = write.await.unwrap();
        let start = std::time::Instant::now();
        assert!(s
            .next_request(Duration::from_millis(200), None)
            .await
            .is_none());
        assert!(start.elapsed() >= Duration::from_millis(200));
    }
}
