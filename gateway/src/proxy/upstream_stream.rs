//! A backend connection that can send a request's head and body in one write.
//!
//! Pingora's client session flushes right after the request head, so a held body always
//! went out in a second `sendto`: two system calls, and two wake-ups of the backend, per
//! request. Wrapped in this stream (once per connection: it stays wrapped in the gateway's pool),
//! the head and a body of up to [`GATHER`] are gathered while [`send_gathered`] writes them
//! and leave with the final flush.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::protocols::http::v1::client::HttpSession;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::SslDigest;
use pingora_core::protocols::tls::TlsRef;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType, Result};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes gathered into one write (a larger request goes out as Pingora writes it).
const GATHER: usize = 64 << 10;

pub struct UpstreamStream {
    inner: Stream,
    /// The socket, when the connection is plain TCP (see [`still_open`]).
    fd: Option<std::os::fd::RawFd>,
    /// Set while a request is written: flushes wait for the last one.
    gathering: AtomicBool,
    out: Vec<u8>,
}

impl std::fmt::Debug for UpstreamStream {
    // Never the gathered bytes (a prompt).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "UpstreamStream({:?}, {} bytes gathered)",
            self.inner,
            self.out.len()
        )
    }
}

impl UpstreamStream {
    fn of(up: &HttpSession) -> Option<&UpstreamStream> {
        up.stream().as_any().downcast_ref::<UpstreamStream>()
    }

    /// Writes out what is gathered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

/// The session over a gathering stream: a new connection is wrapped, a pooled one already is.
pub fn gathering(up: HttpSession, peer: &HttpPeer) -> HttpSession {
    if UpstreamStream::of(&up).is_some() {
        return up;
    }
    let inner = up.into_inner();
    let fd = inner
        .as_any()
        .downcast_ref::<pingora_core::protocols::l4::stream::Stream>()
        .map(std::os::fd::AsRawFd::as_raw_fd);
    HttpSession::new_with_options(
        Box::new(UpstreamStream {
            inner,
            fd,
            gathering: AtomicBool::new(false),
            out: Vec::new(),
        }),
        peer,
    )
}

/// Whether a pooled connection is still open. A backend closes idle connections (its
/// keep-alive timeout, a restart), and nothing watches an idle connection. Writing a request into such a
/// connection fails only when its answer is read, and then it cannot be told from a backend
/// that took the request and died, so it could not be sent again. Asked of the socket without
/// waiting and without taking a byte: the end of the stream, an error, or bytes nobody asked
/// for (a stray answer such as a 408) all mean it is done. TLS connections are not asked:
/// their bytes are the TLS layer's to read.
pub fn still_open(stream: &Stream) -> bool {
    let pooled = stream.as_any().downcast_ref::<UpstreamStream>();
    let Some(fd) = pooled.and_then(|s| s.fd) else {
        return true;
    };
    let mut byte = 0u8;
    // SAFETY: a non-blocking peek of at most one byte into a local, on a socket the session
    // owns and keeps open for the duration of the call.
    let n = unsafe {
        libc::recv(
            fd,
            std::ptr::from_mut(&mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0
        && matches!(
            io::Error::last_os_error().kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        )
}

/// Sends a request's head and held body; on a gathering stream in one write when they fit.
pub async fn send_gathered(
    up: &mut HttpSession,
    req: Box<pingora_http::RequestHeader>,
    body: &Bytes,
) -> Result<()> {
    let gather = body.len() < GATHER;
    if gather {
        if let Some(s) = UpstreamStream::of(up) {
            s.gathering.store(true, Ordering::Release);
        }
    }
    let written = async {
        up.write_request_header(req).await?;
        if !body.is_empty() {
            up.write_body(body).await?;
        }
        Ok::<_, Box<pingora_core::Error>>(())
    }
    .await;
    if let Some(s) = UpstreamStream::of(up) {
        s.gathering.store(false, Ordering::Release);
    }
    written?;
    // The flush that sends what was gathered. Pingora bounds the head and body writes by the
    // write timeout but not this flush, which now does the sending: bounded here.
    match up.write_timeout {
        Some(limit) => tokio::time::timeout(limit, up.finish_body())
            .await
            .map_err(|_| {
                Error::explain(
                    ErrorType::WriteTimedout,
                    "while sending the request (timeout)",
                )
            })??,
        None => up.finish_body().await?,
    };
    Ok(())
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.gathering.load(Ordering::Acquire) && this.out.len() + buf.len() <= GATHER {
            this.out.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.gathering.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_drain(cx))?;
        if self.out.capacity() > GATHER / 4 {
            // A large request was gathered: keep pooled connections small.
            self.out = Vec::new();
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for UpstreamStream {
    async fn shutdown(&mut self) {
        // Pingora's own shutdown of the inner stream; what is gathered goes first.
        if std::future::poll_fn(|cx| self.poll_drain(cx)).await.is_ok() {
            self.inner.shutdown().await;
        }
    }
}

impl UniqueID for UpstreamStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for UpstreamStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

#[async_trait]
impl Peek for UpstreamStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl GetTimingDigest for UpstreamStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for UpstreamStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for UpstreamStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A pooled connection is open while its backend keeps it; closed, or holding bytes nobody
    /// asked for, it is not; asking takes nothing from it.
    #[tokio::test]
    async fn a_closed_or_spoken_connection_is_not_open() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let peer = HttpPeer::new(addr, false, String::new());
        let connect = || async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (server, _) = l.accept().await.unwrap();
            let stream: Stream = Box::new(pingora_core::protocols::l4::stream::Stream::from(tcp));
            (gathering(HttpSession::new(stream), &peer), server)
        };
        let settle = || tokio::time::sleep(Duration::from_millis(50));
        let (idle, _keep) = connect().await;
        settle().await;
        assert!(still_open(idle.stream()), "an idle connection");
        assert!(still_open(idle.stream()), "asking again takes nothing");
        let (closed, server) = connect().await;
        drop(server);
        settle().await;
        assert!(!still_open(closed.stream()), "closed by the backend");
        let (spoken, mut server) = connect().await;
        server
            .write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            .await
            .unwrap();
        settle().await;
        assert!(!still_open(spoken.stream()), "a stray answer");
        assert!(
            !still_open(spoken.stream()),
            "still there: it was only peeked at"
        );
    }

    /// The head waits for the body; both leave with the final flush, whole.
    #[tokio::test]
    async fn head_and_body_leave_together() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = l.accept().await.unwrap();
        let stream: Stream = Box::new(pingora_core::protocols::l4::stream::Stream::from(tcp));
        let peer = HttpPeer::new(addr, false, String::new());
        let mut up = gathering(HttpSession::new(stream), &peer);
        assert!(UpstreamStream::of(&up).is_some());
        // Gathering: the head alone sends nothing.
        UpstreamStream::of(&up)
            .unwrap()
            .gathering
            .store(true, Ordering::Release);
        let mut req = pingora_http::RequestHeader::build("POST", b"/v1/chat", None).unwrap();
        req.insert_header("content-length", "11").unwrap();
        up.write_request_header(Box::new(req.clone()))
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        assert!(
            tokio::time::timeout(Duration::from_millis(100), server.read(&mut buf))
                .await
                .is_err(),
            "the head went out before the body"
        );
        // Through send_gathered on a fresh connection: everything arrives.
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = l.accept().await.unwrap();
        let stream: Stream = Box::new(pingora_core::protocols::l4::stream::Stream::from(tcp));
        let mut up = gathering(HttpSession::new(stream), &peer);
        send_gathered(&mut up, Box::new(req), &Bytes::from_static(b"hello world"))
            .await
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"hello world") {
            let n = server.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("POST /v1/chat HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("\r\n\r\nhello world"), "{text}");
        // Not gathering any more: a later flush is a real one.
        assert!(!UpstreamStream::of(&up)
            .unwrap()
            .gathering
            .load(Ordering::Acquire));
    }
}
