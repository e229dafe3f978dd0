//! The gateway's own accept loop, in place of Pingora's listening service.
//!
//! Pingora spawns one task per accepted connection whose future is sized for a TLS handshake
//! under a timeout (8.6 KiB per connection, measured with heaptrack), and wraps every socket in
//! a stream with a write buffer for its whole life. Here a connection is checked against its
//! listener's caps before anything is allocated for it, TLS connections do their handshake in
//! a future of their own, and an idle plain connection holds its socket and a small task.
//! Listening sockets are shared with Pingora's table of descriptors, so an `--upgrade` process
//! takes them over, and hands them on, exactly as before.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::listeners::tls::Acceptor;
use pingora_core::server::{ListenFds, ShutdownWatch};
use pingora_core::services::Service;
use tokio::net::{TcpListener, TcpSocket};

use super::connection_caps::ListenerCaps;
use super::GatewayApp;

/// Pending connections the kernel may queue on a listening socket (Pingora's, and the kernel
/// caps it at `net.core.somaxconn`).
const BACKLOG: u32 = 65535;

/// One of `listen`, ready to accept.
pub struct Listening {
    pub addr: SocketAddr,
    pub tls: Option<Acceptor>,
    pub caps: Arc<ListenerCaps>,
}

/// The proxy's listeners and the application that serves their connections.
pub struct GatewayService {
    app: Arc<GatewayApp>,
    listeners: Vec<Listening>,
    /// The keys of the listening sockets in Pingora's descriptor table.
    keys: Vec<String>,
}

impl GatewayService {
    pub fn new(app: GatewayApp, listeners: Vec<Listening>) -> Self {
        GatewayService {
            app: Arc::new(app),
            keys: listeners.iter().map(|l| l.addr.to_string()).collect(),
            listeners,
        }
    }
}

#[async_trait]
impl Service for GatewayService {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let mut loops = Vec::with_capacity(self.listeners.len());
        for l in std::mem::take(&mut self.listeners) {
            let socket = match listen(l.addr, fds.as_ref()).await {
                Ok(s) => s,
                Err(e) => {
                    // Checked before start (`prepare`): only a race with another process.
                    log::error!("cannot listen on {}: {e}", l.addr);
                    std::process::exit(1);
                }
            };
            loops.push(tokio::spawn(accept_loop(
                self.app.clone(),
                socket,
                Arc::new(l),
                shutdown.clone(),
            )));
        }
        for l in loops {
            let _ = l.await;
        }
        self.app.cleanup().await;
    }

    fn name(&self) -> &str {
        "llm-gateway"
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(self.keys.clone())
    }
}

/// The listening socket for `addr`: the one handed over by the previous process when there is
/// one, else a new one, entered in the table so that it is handed on at the next upgrade.
async fn listen(addr: SocketAddr, fds: Option<&ListenFds>) -> std::io::Result<TcpListener> {
    let key = addr.to_string();
    let inherited = fds.and_then(|t| t.lock().get(&key).copied());
    if let Some(fd) = inherited {
        // SAFETY: the descriptor table holds listening sockets received from the previous
        // process; this listener is the only one that takes the descriptor for `key`.
        let socket = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        socket.set_nonblocking(true)?;
        return TcpListener::from_std(socket);
    }
    let socket = bind(addr).await?;
    if let Some(t) = fds {
        t.lock().add(key, socket.as_raw_fd());
    }
    Ok(socket)
}

/// Binds as Pingora does: address reuse, and a port still held by a closing process (an
/// upgrade that moved a listener to another address of the same port: the old process keeps
/// accepting for 5 s after the hand-over) is tried again, once a second for 30 s.
async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let mut tries = 0;
    loop {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(addr) {
            Ok(()) => return socket.listen(BACKLOG),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 30 => {
                tries += 1;
                log::warn!("{addr} is in use; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn accept_loop(
    app: Arc<GatewayApp>,
    socket: TcpListener,
    listener: Arc<Listening>,
    mut shutdown: ShutdownWatch,
) {
    // accept() failing: logged when it starts and when it ends, not per try.
    let mut starved = false;
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
                continue;
            }
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // A connection the client gave up on before it was taken: nothing to do.
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO)
                ) {
                    continue;
                }
                // Out of descriptors or memory (or anything else that persists): accept()
                // fails at once until it passes, so wait a little instead of spinning.
                if !std::mem::replace(&mut starved, true) {
                    log::error!(
                        "accept on {}: {e}; new connections wait until it passes",
                        listener.addr
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if std::mem::take(&mut starved) {
            log::info!("accept on {}: accepting again", listener.addr);
        }
        // Over a cap: closed at once (dropped), before anything is read or allocated for it.
        let Some(slot) = listener.caps.admit(Some(peer.ip())) else {
            continue;
        };
        let app = app.clone();
        let listener = listener.clone();
        let shutdown = shutdown.clone();
        // On this service's runtime, like Pingora's own (work-stealing across its threads).
        tokio::spawn(async move {
            app.serve_tcp(tcp, peer, &listener, slot, &shutdown).await;
        });
    }
}
