//! How one client connection is served: a deadline for the whole request head (Pingora has
//! only a per-read timeout, so a client sending one header byte every few seconds would hold
//! its connection forever), the keep-alive idle time, and how many requests one connection
//! may carry.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use gateway_filter::http::StatusCode;
use gateway_filter::ErrorShape;
use pingora_core::apps::{HttpPersistentSettings, ServerApp};
use pingora_core::listeners::tls::Acceptor;
use pingora_core::modules::http::HttpModules;
use pingora_core::protocols::{SocketDigest, Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use pingora_proxy::{HttpProxy, Session};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::accept::Listening;
use super::client_stream::ClientStream;
use super::connection_caps::ConnectionSlot;
use super::{Gateway, H2Phases};

/// HTTP/2 connections waiting for their first request (HTTP/2 streams run in tasks of their
/// own, out of reach of a task-local), keyed by the connection's socket digest: one `Arc`
/// that the connection and every one of its streams share.
static H2_WAITING: LazyLock<Mutex<HashMap<usize, Arc<AtomicBool>>>> =
    LazyLock::new(Default::default);

fn h2_waiting() -> std::sync::MutexGuard<'static, HashMap<usize, Arc<AtomicBool>>> {
    H2_WAITING.lock().unwrap_or_else(|p| p.into_inner())
}

/// The key of a connection in [`H2_WAITING`].
pub fn h2_key(digest: &Arc<SocketDigest>) -> usize {
    Arc::as_ptr(digest) as usize
}

/// An HTTP/2 connection's entry in [`H2_WAITING`], removed however the connection ends.
struct H2Waiting(usize);

impl Drop for H2Waiting {
    fn drop(&mut self) {
        h2_waiting().remove(&self.0);
    }
}

/// Called from `early_request_filter` of an HTTP/2 stream: its connection's first request
/// arrived in time.
pub fn h2_request_began(session: &pingora_proxy::Session) {
    let key = session
        .digest()
        .and_then(|d| d.socket_digest.as_ref())
        .map(h2_key);
    if let Some(first) = key.and_then(|k| h2_waiting().remove(&k)) {
        first.store(true, Ordering::Release);
    }
}

/// Requests one HTTP/2 connection may have open at once.
const H2_MAX_STREAMS: u32 = 16;

pub struct ConnectionLimits {
    /// Requests being served: shutdown waits for it to reach zero.
    pub in_flight: super::InFlight,
    /// Connections accepted whose first request has not begun: shutdown waits for these too
    /// (their clients are sending), at most the drain time.
    pub opening: super::InFlight,
    pub head_timeout: Duration,
    /// How long a write may wait for a client that takes no bytes.
    pub send_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub keepalive_requests: u32,
}

/// The gateway's server application: HTTP/1 connections served by the gateway's own loop
/// (`h1.rs` drives each request through the phases), HTTP/2 ones by Pingora's HTTP proxy;
/// both with per-connection limits.
pub struct GatewayApp {
    gateway: Arc<Gateway>,
    proxy: Arc<HttpProxy<H2Phases>>,
    /// None: a response is written as the gateway built it (no compression).
    no_modules: HttpModules,
    limits: ConnectionLimits,
}

impl GatewayApp {
    pub fn new(
        gateway: Arc<Gateway>,
        mut proxy: HttpProxy<H2Phases>,
        limits: ConnectionLimits,
    ) -> Self {
        // An HTTP/2 connection with no stream open is closed after the keep-alive time.
        let mut options = pingora_core::apps::HttpServerOptions::default();
        options.h2_idle_timeout = Some(limits.keepalive_timeout);
        proxy.server_options = Some(options);
        // Each stream may hold a body of up to `max_body` and a backend slot: an HTTP/2
        // connection counts as this many HTTP/1 ones, not Pingora's default of 100.
        let mut h2 = pingora_core::protocols::http::v2::server::default_h2_options();
        h2.max_concurrent_streams(H2_MAX_STREAMS);
        proxy.h2_options = Some(h2);
        GatewayApp {
            gateway,
            proxy: Arc::new(proxy),
            no_modules: HttpModules::new(),
            limits,
        }
    }

    /// Serves an HTTP/2 connection with Pingora's own loop, closing it when its first request
    /// has not arrived within the head timeout (a client that finishes TLS and then sends
    /// no preface, or no request, would otherwise hold it forever). `first_by`: when the first
    /// request must have arrived. (Pingora hands nothing back from an HTTP/2 connection: it
    /// ends here.)
    async fn serve_h2(
        &self,
        stream: Stream,
        shutdown: &ShutdownWatch,
        first_by: tokio::time::Instant,
    ) {
        let Some(key) = stream.get_socket_digest().as_ref().map(h2_key) else {
            // Nothing to key the deadline by (not a socket): Pingora's own idle limit only.
            ServerApp::process_new(&self.proxy, stream, shutdown).await;
            return;
        };
        let first = Arc::new(AtomicBool::new(false));
        h2_waiting().insert(key, first.clone());
        let waiting = H2Waiting(key);
        let serve = ServerApp::process_new(&self.proxy, stream, shutdown);
        tokio::pin!(serve);
        let ended = tokio::select! {
            _ = &mut serve => true,
            _ = tokio::time::sleep_until(first_by) => false,
        };
        drop(waiting);
        if !ended && first.load(Ordering::Acquire) {
            serve.await;
        }
    }
}

/// Largest request head read (Pingora's parser would take up to 1 MiB; the policy's default
/// for all headers together is 32 KiB).
const MAX_HEAD: usize = 64 << 10;
/// Most header lines in a request head (Pingora's limit).
const MAX_HEADERS: usize = 256;

/// How reading a request head ended.
pub(super) enum Head {
    Complete,
    /// The client left, or the head did not arrive in time.
    Gone,
    /// Not a request head Pingora's parser would take: answered by the gateway, in JSON.
    Refused(StatusCode, &'static str, String),
}

/// Where a head stands, judged by the parser Pingora uses (`httparse`), in a plain function
/// so its header table never lives in a future.
fn judge_head(buf: &[u8]) -> Option<Head> {
    #[cfg(test)]
    tests::PARSED.with(|p| p.set(p.get() + buf.len()));
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        // Pingora drops a Content-Length sent beside `Transfer-Encoding` before any gateway
        // code sees the head: judged here, where both are still there (see framing.rs).
        Ok(httparse::Status::Complete(_))
            if ["content-length", "transfer-encoding"].iter().all(|name| {
                req.headers
                    .iter()
                    .any(|h| h.name.eq_ignore_ascii_case(name))
            }) =>
        {
            Some(Head::Refused(
                StatusCode::BAD_REQUEST,
                "invalid_framing",
                super::framing::BOTH_LENGTHS.to_string(),
            ))
        }
        Ok(httparse::Status::Complete(_)) => Some(Head::Complete),
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => Some(Head::Refused(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request_header_fields_too_large",
            format!("at most {MAX_HEADERS} header lines are accepted"),
        )),
        Err(e) => Some(Head::Refused(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("the request head cannot be read ({e})"),
        )),
    }
}

/// Reads until `buf` holds a whole request head, by `deadline`. Pingora answers heads its
/// parser cannot read with an empty `400` before any gateway code runs; reading the head here
/// first lets the gateway answer those in JSON like every other error, and bounds the time the
/// whole head may take.
pub(super) async fn whole_head(
    stream: &mut (dyn ClientIo + '_),
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
) -> Head {
    // Parsed when the head's blank line may have come, and otherwise once per 2 KiB (bytes
    // that are not HTTP are still refused early): a head trickled a byte at a time is not
    // parsed from its start at every byte.
    let mut scanned: usize = 0;
    let mut parsed: Option<usize> = None;
    // Empty lines before the request line, which the parser skips (RFC 9112 §2.2), are
    // dropped as they come: kept, every `\n` trickled after them would look like the head's
    // blank line and have the whole buffer parsed again. They count toward the head's size.
    let mut blank_lines: usize = 0;
    loop {
        let blank = buf
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        if blank > 0 {
            buf.advance(blank);
            blank_lines += blank;
            // Only a buffer that held nothing else starts with them: the rest is new.
            (scanned, parsed) = (0, None);
        }
        let from = scanned.saturating_sub(3);
        scanned = buf.len();
        let due = parsed.is_none_or(|at| buf.len() >= at + (2 << 10));
        let ended = !due
            && (memchr::memmem::find(&buf[from..], b"\n\r\n").is_some()
                || memchr::memmem::find(&buf[from..], b"\n\n").is_some());
        if ended || due || buf.len() >= MAX_HEAD {
            parsed = Some(buf.len());
            if let Some(judged) = judge_head(buf) {
                return judged;
            }
        }
        if blank_lines + buf.len() >= MAX_HEAD {
            return Head::Refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_header_fields_too_large",
                format!("the request head is larger than {MAX_HEAD} bytes"),
            );
        }
        buf.reserve(4 << 10);
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Head::Gone,
        }
    }
}

/// Answers a head Pingora could not read, in the error shape of the route it seems to ask for
/// (Ollama's for `/api/…`), and closes the connection.
pub(super) async fn refuse(
    stream: &mut (dyn ClientIo + '_),
    head: &[u8],
    status: StatusCode,
    code: &str,
    message: &str,
) {
    let body = gateway_filter::error_json(shape_of(head), status, code, message);
    let answer = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error"),
        body.len(),
        super::request::new_request_id(),
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.flush().await;
}

/// The error shape of the route a request head seems to ask for (Ollama's for `/api/…`).
fn shape_of(head: &[u8]) -> ErrorShape {
    let target = head.split(|b| *b == b' ').nth(1).unwrap_or_default();
    ErrorShape::for_path(std::str::from_utf8(target).unwrap_or_default())
}

/// Most of a request's first bytes read while waiting for it (a request head is usually
/// smaller): what an idle connection holds, besides its socket.
const FIRST_READ: usize = 1024;

/// Waits until the client sends the start of its next request, at most `idle`, and returns
/// what it read (Pingora's parser continues from these bytes: no extra read). An idle
/// connection then holds only its socket and this small buffer: the request's state (Pingora's
/// session and the request's future, some 11 KiB) is made when bytes arrive. `None`: the client
/// left, stayed silent, or shutdown began while it was idle (closing idle connections at once
/// sends their clients elsewhere, e.g. to the process that took the sockets over).
async fn next_request(
    stream: &mut Stream,
    idle: Duration,
    drain: Option<(&mut ShutdownWatch, &super::InFlight)>,
) -> Option<BytesMut> {
    let mut first = [0u8; FIRST_READ];
    let n = {
        let read = stream.read(&mut first);
        tokio::pin!(read);
        // Under load the next request is usually there already: no timer for that case.
        let now = tokio::select! {
            biased;
            ready = &mut read => Some(ready),
            _ = std::future::ready(()) => None,
        };
        match now {
            Some(ready) => ready.ok()?,
            None => match drain {
                Some((drain, opening)) => tokio::select! {
                    biased;
                    ready = tokio::time::timeout(idle, &mut read) => ready.ok()?.ok()?,
                    // Draining: a request already on its way is still taken (and counted,
                    // so the process does not exit under it).
                    _ = async { drain.wait_for(|down| *down).await.map(drop) } => {
                        let _lingering = opening.enter();
                        tokio::time::timeout(super::drain::LINGER, read).await.ok()?.ok()?
                    }
                },
                None => tokio::time::timeout(idle, read).await.ok()?.ok()?,
            },
        }
    };
    (n > 0).then(|| {
        let mut head = BytesMut::with_capacity(n.max(4 << 10));
        head.extend_from_slice(&first[..n]);
        head
    })
}

/// A client connection between requests: a plain one is held as the gateway's own stream
/// (idle, it costs its socket only); a TLS one as Pingora's stream.
enum Conn {
    Plain(Box<ClientStream>),
    Tls(Stream),
}

impl Conn {
    fn io(&mut self) -> &mut (dyn ClientIo + '_) {
        match self {
            Conn::Plain(c) => &mut **c,
            Conn::Tls(s) => s,
        }
    }
}

/// What reading a head and refusing one need of a stream.
pub(super) trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + ?Sized> ClientIo for T {}

impl GatewayApp {
    /// Serves a connection accepted on `listener` and admitted by its caps (`slot`, held for
    /// as long as the connection lives).
    pub async fn serve_tcp(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        listener: &Listening,
        slot: ConnectionSlot,
        shutdown: &ShutdownWatch,
    ) {
        // Responses and stream chunks go out as they are written (nginx `tcp_nodelay`): a
        // gathered response is one write already, and a chunk must not wait for an ACK.
        let _ = tcp.set_nodelay(true);
        let digest = SocketDigest::from_raw_fd(tcp.as_raw_fd());
        let _ = digest.peer_addr.set(Some(peer.into()));
        // Known without asking the kernel, unless the listener is on a wildcard address.
        if !listener.addr.ip().is_unspecified() {
            let _ = digest.local_addr.set(Some(listener.addr.into()));
        }
        let fd = tcp.as_raw_fd();
        let client = ClientStream::new(tcp, digest, self.limits.send_timeout);
        let accepted = tokio::time::Instant::now();
        match &listener.tls {
            None => {
                self.serve(Conn::Plain(Box::new(client)), fd, shutdown, accepted)
                    .await
            }
            // On the heap: the handshake's state would otherwise size every connection's task.
            Some(tls) => Box::pin(self.serve_tls(client, tls, peer, shutdown, accepted)).await,
        }
        drop(slot);
    }

    /// A TLS connection: the handshake and the first request's head must both arrive within
    /// the head timeout of the accept.
    async fn serve_tls(
        &self,
        client: ClientStream,
        tls: &Acceptor,
        peer: SocketAddr,
        shutdown: &ShutdownWatch,
        accepted: tokio::time::Instant,
    ) {
        let deadline = accepted + self.limits.head_timeout;
        let fd = client.socket().as_raw_fd();
        let stream: Stream =
            match tokio::time::timeout_at(deadline, tls.tls_handshake(client)).await {
                Ok(Ok(s)) => Box::new(s),
                Ok(Err(e)) => return log::debug!("TLS handshake with {peer} failed: {e}"),
                Err(_) => return log::debug!("TLS handshake with {peer} did not end in time"),
            };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            self.serve_h2(stream, shutdown, deadline).await;
        } else {
            self.serve(Conn::Tls(stream), fd, shutdown, accepted).await;
        }
    }

    /// The HTTP/1 request loop of one connection, accepted at `accepted`.
    /// `fd`: the connection's socket (under TLS too), for a look at its TCP state while a
    /// request waits (see `forward::exchange::client_left`).
    async fn serve(
        &self,
        mut conn: Conn,
        fd: RawFd,
        shutdown: &ShutdownWatch,
        accepted: tokio::time::Instant,
    ) {
        let l = &self.limits;
        let mut drain = super::drain::watch();
        let mut opening = Some(l.opening.enter());
        let mut carried: Option<HttpPersistentSettings> = None;
        let mut served = 0u32;
        loop {
            // The first request's head must arrive within the head timeout of the accept; a
            // later one may first wait out the keep-alive idle time.
            let idle = if served == 0 {
                l.head_timeout.saturating_sub(accepted.elapsed())
            } else {
                l.keepalive_timeout
            };
            // Draining: a connection takes a request already on its way (LINGER), then closes;
            // the request is served, with `Connection: close`.
            // A connection that has not sent its first request is waited for no longer either:
            // clients keep such connections open unused (hyper opens one while an idle one
            // is handed out instead), and they must not hold the process.
            let draining = *shutdown.borrow() || super::drain::draining();
            let idle = if draining {
                super::drain::LINGER.min(idle)
            } else {
                idle
            };
            // An idle connection is closed once draining begins (after LINGER).
            let drain_wait = (!draining).then_some((&mut drain, &l.opening));
            // A kept-alive connection lingering for a request on its way is counted.
            let lingering = (served > 0 && draining).then(|| l.opening.enter());
            let next = match &mut conn {
                Conn::Plain(c) => c.next_request(idle, drain_wait).await,
                Conn::Tls(s) => next_request(s, idle, drain_wait).await,
            };
            let Some(mut head) = next else { return };
            // Counted from its first byte, so shutdown's drain cannot see zero while a request
            // is still being read. One whose bytes came as shutdown began is still served
            // (and ends the connection): its client already sent it and cannot retry it.
            let _serving = l.in_flight.enter();
            // No longer opening or lingering: the request is counted instead.
            drop(opening.take());
            drop(lingering);
            let head_deadline = if served == 0 {
                accepted + l.head_timeout
            } else {
                tokio::time::Instant::now() + l.head_timeout
            };
            match whole_head(conn.io(), &mut head, head_deadline).await {
                Head::Complete => {}
                Head::Gone => return,
                Head::Refused(status, code, message) => {
                    refuse(conn.io(), &head, status, code, &message).await;
                    return;
                }
            }
            let plain = matches!(conn, Conn::Plain(_));
            let stream: Stream = match conn {
                Conn::Plain(c) => c,
                Conn::Tls(s) => s,
            };
            let shape = shape_of(&head);
            let mut session = Session::new_h1_with_modules(stream, &self.no_modules);
            let downstream = &mut *session.downstream_session;
            // Pingora's HTTP/1 pipelining stays off (its default): a session never carries a
            // prefix of its own into `apply_to_session`, so ours is the only one. Bytes a
            // client pipelines into the same read as a request end that connection after it.
            if let Some(settings) = carried.take() {
                settings.apply_to_session(downstream);
            }
            downstream.set_pipelined_prefix(head);
            served += 1;
            let last =
                *shutdown.borrow() || super::drain::draining() || served >= l.keepalive_requests;
            downstream.set_keepalive((!last).then_some(l.keepalive_timeout.as_secs().max(1)));
            // On the heap, boxed where it is made: a request's state (some 11 KiB) exists once
            // its bytes arrive, and is not part of every idle connection's task.
            let request = Box::pin(super::h1::serve(&self.gateway, session, last, shape, fd));
            let Some(reused) = request.await else {
                return;
            };
            if last {
                return;
            }
            let (next, settings) = reused.consume();
            conn = if plain {
                // Back to the gateway's own stream, to wait on the bare socket.
                match next.into_any().downcast::<ClientStream>() {
                    Ok(c) => Conn::Plain(c),
                    Err(_) => return,
                }
            } else {
                Conn::Tls(next)
            };
            carried = settings;
        }
    }

    /// When the gateway stops: Pingora's proxy lets go of what it holds.
    pub async fn cleanup(&self) {
        ServerApp::cleanup(&*self.proxy).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// Bytes handed to the head parser on this thread.
        pub static PARSED: Cell<usize> = const { Cell::new(0) };
    }

    /// Writes `bytes` through a pipe that carries one byte at a time, and reads a head from it.
    async fn head_of(bytes: Vec<u8>) -> (Head, BytesMut, usize) {
        let (mut client, mut server) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&bytes).await;
            client
        });
        PARSED.with(|p| p.set(0));
        let mut buf = BytesMut::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let head = whole_head(&mut server, &mut buf, deadline).await;
        drop(server);
        let _ = writer.await;
        (head, buf, PARSED.with(Cell::get))
    }

    /// Attacker review: empty lines before the request line, one byte at a time, each looked
    /// like the head's blank line and had the whole buffer parsed again (quadratic).
    #[tokio::test(flavor = "current_thread")]
    async fn empty_lines_before_a_head_are_not_parsed_again_and_again() {
        let request = b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut bytes = b"\r\n\n".repeat(2000);
        bytes.extend_from_slice(request);
        let (head, buf, parsed) = head_of(bytes).await;
        assert!(matches!(head, Head::Complete));
        assert_eq!(&buf[..], &request[..], "the empty lines are gone");
        assert!(
            parsed <= 4 * request.len(),
            "{parsed} bytes parsed for a head of {}",
            request.len()
        );

        // They count toward the head's size.
        let (head, _, _) = head_of(b"\n".repeat(MAX_HEAD + 10)).await;
        assert!(matches!(
            head,
            Head::Refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, _, _)
        ));
    }
}
