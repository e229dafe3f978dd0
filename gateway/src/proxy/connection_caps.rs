//! Connection caps per listener (nginx `worker_connections`, `limit_conn`): a connection over
//! a cap is closed at once, before anything is read from it, counted in
//! `llm_gateway_connections_refused_total`, and logged once per change of state (not once per
//! connection: a flood must not flood the log too).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use gateway_filter::client_network;
use prometheus::{IntCounter, IntGauge};

use crate::config::ListenerSpec;
use crate::metrics::Metrics;

/// One listener's caps and counts.
pub struct ListenerCaps {
    addr: SocketAddr,
    name: String,
    max: Option<usize>,
    per_client: Option<u32>,
    ipv6_prefix: u8,
    open: AtomicUsize,
    /// Open connections per client network, and whether that client is being refused now.
    by_client: Mutex<HashMap<IpAddr, (u32, Refusing)>>,
    at_max: AtomicBool,
    gauge: IntGauge,
    refused_max: IntCounter,
    refused_per_client: IntCounter,
    /// Per-client cap lines are logged at most once per [`CLIENT_LOG_EVERY`]: a client that
    /// churns at its cap (close one, open two) wrote two lines a connection, thousands a
    /// second. The lines left out meanwhile are counted into the next.
    born: std::time::Instant,
    client_log_after_ms: std::sync::atomic::AtomicU64,
    client_log_skipped: std::sync::atomic::AtomicU64,
}

/// Whether a client is being refused at its cap, and whether that was logged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Refusing {
    #[default]
    No,
    Quiet,
    Said,
}

/// How often at most a listener logs about its per-client cap.
const CLIENT_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection's place on its listener, given back when the connection ends.
pub struct ConnectionSlot {
    caps: Arc<ListenerCaps>,
    client: Option<IpAddr>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.caps.open.fetch_sub(1, Ordering::AcqRel);
        self.caps.gauge.dec();
        if let Some(ip) = self.client {
            let mut m = self.caps.clients();
            if let Some((n, refusing)) = m.get_mut(&ip) {
                *n -= 1;
                // Said only when its start was (see `ListenerCaps::client_log`).
                if std::mem::take(refusing) == Refusing::Said {
                    log::info!(
                        "listener {}: client {ip} is below max_connections_per_client again",
                        self.caps.addr
                    );
                }
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        }
    }
}

impl ListenerCaps {
    /// The caps of the listener on `addr` (also the admin listener's), counted under its
    /// address in `llm_gateway_connections` and `llm_gateway_connections_refused_total`.
    pub fn new(
        addr: SocketAddr,
        max: Option<usize>,
        per_client: Option<u32>,
        ipv6_prefix: u8,
        metrics: &Metrics,
    ) -> Arc<Self> {
        let name = addr.to_string();
        Arc::new(ListenerCaps {
            addr,
            max,
            per_client,
            ipv6_prefix,
            open: AtomicUsize::new(0),
            by_client: Mutex::new(HashMap::new()),
            at_max: AtomicBool::new(false),
            gauge: metrics.connections.with_label_values(&[&name]),
            refused_max: metrics
                .connections_refused
                .with_label_values(&[&name, "max_connections"]),
            refused_per_client: metrics
                .connections_refused
                .with_label_values(&[&name, "max_connections_per_client"]),
            name,
            born: std::time::Instant::now(),
            client_log_after_ms: std::sync::atomic::AtomicU64::new(0),
            client_log_skipped: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Calls `log` (with a note of the lines left out before it) unless this listener logged
    /// about its per-client cap less than [`CLIENT_LOG_EVERY`] ago.
    fn client_log(&self, log: impl FnOnce(&str)) {
        let now = self.born.elapsed().as_millis() as u64;
        let after = self.client_log_after_ms.load(Ordering::Acquire);
        let next = now + CLIENT_LOG_EVERY.as_millis() as u64;
        if now < after
            || self
                .client_log_after_ms
                .compare_exchange(after, next, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            self.client_log_skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.client_log_skipped.swap(0, Ordering::Relaxed) {
            0 => log(""),
            n => log(&format!(
                " ({n} such lines left out in the last {}s)",
                CLIENT_LOG_EVERY.as_secs()
            )),
        }
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Refusing)>> {
        self.by_client.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs when the listener's cap starts refusing connections, and when it has room again:
    /// below nine tenths of it, so connections churning at the cap do not log each time.
    fn note_max(&self, refusing: bool) {
        if refusing {
            if !self.at_max.swap(true, Ordering::AcqRel) {
                log::warn!(
                    "listener {}: max_connections reached; new connections are closed at once",
                    self.addr
                );
            }
        } else if self.at_max.load(Ordering::Acquire)
            && self
                .max
                .is_some_and(|m| self.open.load(Ordering::Acquire) * 10 < m * 9)
            && self.at_max.swap(false, Ordering::AcqRel)
        {
            log::info!(
                "listener {}: below max_connections again; accepting connections",
                self.addr
            );
        }
    }

    /// Takes a place for a new connection from `peer`, or `None` when a cap is reached.
    pub fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Option<ConnectionSlot> {
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        if self.max.is_some_and(|m| open > m) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refused_max.inc();
            self.note_max(true);
            return None;
        }
        self.note_max(false);
        let client = match (self.per_client, peer) {
            (Some(cap), Some(ip)) => {
                let net = client_network(ip, self.ipv6_prefix);
                let mut m = self.clients();
                let (n, refusing) = m.entry(net).or_insert((0, Refusing::No));
                if *n >= cap {
                    // Logged once per client until one of its connections closes, and at
                    // most once a while per listener.
                    if *refusing == Refusing::No {
                        *refusing = Refusing::Quiet;
                        self.client_log(|skipped| {
                            *refusing = Refusing::Said;
                            log::warn!(
                                "listener {}: client {net} reached max_connections_per_client; its new connections are closed at once{skipped}",
                                self.addr
                            )
                        });
                    }
                    drop(m);
                    self.open.fetch_sub(1, Ordering::AcqRel);
                    self.refused_per_client.inc();
                    return None;
                }
                *n += 1;
                drop(m);
                Some(net)
            }
            _ => None,
        };
        self.gauge.inc();
        Some(ConnectionSlot {
            caps: self.clone(),
            client,
        })
    }
}

/// The caps of every listener, in the order of `listen`.
pub struct ConnectionCaps {
    listeners: Vec<Arc<ListenerCaps>>,
}

impl ConnectionCaps {
    pub fn new(listen: &[ListenerSpec], ipv6_prefix: u8, metrics: &Metrics) -> Self {
        // A listener without a cap of its own still stops short of the open-file limit.
        let default_max = crate::fd_limit::default_max_connections(listen.len());
        if listen.iter().any(|l| l.max_connections.is_none()) {
            if let Some(n) = default_max {
                log::info!("listeners without max_connections take at most {n} connections each (nine tenths of the open-file limit, shared)");
            }
        }
        let listeners = listen
            .iter()
            .map(|l| {
                ListenerCaps::new(
                    l.addr,
                    l.max_connections.or(default_max),
                    l.max_connections_per_client,
                    ipv6_prefix,
                    metrics,
                )
            })
            .collect();
        ConnectionCaps { listeners }
    }

    /// The caps of each listener, in the order of `listen`.
    pub fn into_listeners(self) -> Vec<Arc<ListenerCaps>> {
        self.listeners
    }

    #[cfg(test)]
    fn open(&self, i: usize) -> usize {
        self.listeners[i].open.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for ListenerCaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ListenerCaps({})", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(max: Option<usize>, per_client: Option<u32>) -> ListenerSpec {
        ListenerSpec {
            addr: "127.0.0.1:8080".parse().unwrap(),
            tls: None,
            allow: Vec::new(),
            deny: Vec::new(),
            insecure: false,
            max_connections: max,
            max_connections_per_client: per_client,
            trusted_proxies: Vec::new(),
            hosts: Default::default(),
            forwarded_header: Default::default(),
        }
    }

    #[test]
    fn caps_hold_and_free() {
        let metrics = Metrics::new(&prometheus::Registry::new(), Default::default()).unwrap();
        let caps = ConnectionCaps::new(&[spec(Some(3), Some(2))], 64, &metrics);
        let l = caps.listeners[0].clone();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let a2: IpAddr = "2001:db8::2".parse().unwrap(); // same /64
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = l.admit(Some(a)).unwrap();
        let s2 = l.admit(Some(a2)).unwrap();
        assert!(l.admit(Some(a)).is_none(), "two from one /64");
        let s3 = l.admit(Some(b)).unwrap();
        assert!(
            l.admit(Some("10.0.0.3".parse().unwrap())).is_none(),
            "three in all"
        );
        assert_eq!(caps.open(0), 3);
        drop((s1, s2, s3));
        assert_eq!(caps.open(0), 0);
        assert!(
            caps.listeners[0].clients().is_empty(),
            "nothing left behind"
        );
    }
}
