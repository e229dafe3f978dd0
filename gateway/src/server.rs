//! Wiring the Pingora server: listeners (plain or TLS), worker threads, SIGHUP reloads, and
//! shutdown that drains in-flight requests and then exits without waiting out the whole
//! drain time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora_core::listeners::tls::TlsSettings;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{ExecutionPhase, Server};

use crate::admin::{AdminApp, AdminToken};
use crate::chain::FilterChain;
use crate::config::{ConfigError, Settings};
use crate::metrics::Metrics;
use crate::proxy::{Gateway, InFlight};
use crate::registry::Registry;
use crate::router::{BackendPool, ModelRouter, Router};
use crate::telemetry::Telemetry;

/// What must be written out before the process exits: the filters' queues (audit lines,
/// ledger) and the spans waiting for export. Runs once, whichever exit path asks first.
#[derive(Clone)]
struct Flush {
    chain: Arc<FilterChain>,
    telemetry: Option<Arc<Telemetry>>,
}

impl Flush {
    fn run(&self) {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            self.chain.shutdown();
            if let Some(t) = &self.telemetry {
                if let Err(e) = t.shutdown() {
                    log::warn!("telemetry: spans still queued at exit were not exported: {e}");
                }
            }
        });
    }
}

/// What `run` needs, all of it checked before Pingora starts.
pub struct Prepared {
    pub gateway: Gateway,
    tls: Vec<Option<TlsSettings>>,
    /// The running gateway whose listening sockets this one takes over (`--upgrade`).
    upgrade_from: Option<i32>,
}

/// Seconds Pingora's grace period runs past `drain_timeout`: the final flush (audit lines,
/// ledger charges, shared-state settlements within their connect deadline) happens in them.
const FLUSH_GRACE_SECS: u64 = 5;

/// Builds everything that can fail before the server starts, so errors reach the operator as
/// messages, not panics inside Pingora.
pub fn prepare(
    settings: Settings,
    registry: &Registry,
    upgrade: bool,
) -> Result<Prepared, ConfigError> {
    let state = settings
        .state
        .as_ref()
        .map(|spec| {
            crate::state::RedisState::start(spec)
                .map(|s| Arc::new(s) as Arc<dyn gateway_filter::SharedState>)
        })
        .transpose()
        .map_err(|e| ConfigError::invalid(&settings.file, "state", e.to_string()))?;
    let chain = FilterChain::build(&settings, registry, state.clone())?;
    if !settings.default_policy && !chain.names().contains(&"policy") {
        log::warn!("policy: none — no policy filter: every backend route, model pulls and deletes included, is reachable by anyone the chain lets through");
    }
    let mut tls = Vec::with_capacity(settings.listen.len());
    for (i, l) in settings.listen.iter().enumerate() {
        // Pingora panics on a busy port; check first to say which entry and why. (An
        // upgrade takes the ports over from the running gateway: they are busy by design.)
        let bound = if upgrade {
            Ok(())
        } else {
            std::net::TcpListener::bind(l.addr).map(drop)
        };
        bound.map_err(|e| {
            ConfigError::invalid(
                &settings.file,
                format!("listen[{i}].addr"),
                format!("cannot listen on {}: {e}", l.addr),
            )
        })?;
        tls.push(
            l.tls
                .as_ref()
                .map(crate::tls::settings)
                .transpose()
                .map_err(|e| {
                    ConfigError::invalid(&settings.file, format!("listen[{i}].tls"), e.to_string())
                })?,
        );
        if l.insecure {
            log::warn!(
                "listen[{i}] {} is reachable from the network without TLS or without authentication (allow_insecure: true); make sure something else protects it",
                l.addr
            );
        }
    }
    if let Some(addr) = settings.admin.filter(|_| !upgrade) {
        std::net::TcpListener::bind(addr).map_err(|e| {
            ConfigError::invalid(
                &settings.file,
                "admin.addr",
                format!("cannot listen on {addr}: {e}; pick another port or set `admin: {{ enabled: false }}`"),
            )
        })?;
        if !addr.ip().is_loopback() {
            log::warn!(
                "admin listener {addr} is not on loopback: /metrics and /admin/* answer only with the admin token"
            );
        }
    }
    let metrics =
        Metrics::new(prometheus::default_registry(), chain.labels.clone()).map_err(|e| {
            ConfigError::invalid(
                &settings.file,
                "metrics",
                format!("cannot register metrics: {e}"),
            )
        })?;
    metrics.init_backends(settings.backends.iter().map(|b| &*b.name));
    let pool =
        BackendPool::new(&settings.backends, &settings.limits, &settings.routing).with_state(state);
    let router: Arc<dyn Router> = Arc::new(ModelRouter::new(pool, settings.routing.clone()));
    let telemetry = settings
        .telemetry
        .as_ref()
        .map(|spec| Telemetry::start(spec, prometheus::default_registry()).map(Arc::new))
        .transpose()
        .map_err(|e| ConfigError::invalid(&settings.file, "telemetry.otlp", e.to_string()))?;
    // Last, so that nothing that can still fail comes after the old gateway is told to go.
    let upgrade_from = if upgrade {
        let sock = settings.upgrade_sock.as_deref();
        let err = |e: crate::upgrade::UpgradeError| {
            ConfigError::invalid(&settings.file, "server.upgrade_sock", e.to_string())
        };
        Some(
            sock.ok_or(crate::upgrade::UpgradeError::NoSocket)
                .and_then(crate::upgrade::running)
                .map_err(err)?,
        )
    } else {
        None
    };
    let mut gateway = Gateway::new(
        Arc::new(settings),
        Arc::new(chain),
        router,
        Arc::new(metrics),
    );
    gateway.telemetry = telemetry;
    Ok(Prepared {
        gateway,
        tls,
        upgrade_from,
    })
}

pub fn run(prepared: Prepared) -> ! {
    let Prepared {
        gateway,
        tls,
        upgrade_from,
    } = prepared;
    let settings = gateway.settings.clone();
    let conf = ServerConf {
        threads: settings.threads,
        // Pingora sleeps the whole grace period; the drain watcher below exits earlier as
        // soon as no request is in flight, and at `drain_timeout` at the latest, after the
        // final flush: Pingora's own end must come later, or it ends the process (its timer
        // starts first) before the flush, losing queued audit lines and ledger charges.
        grace_period_seconds: Some(
            settings.drain_timeout.as_secs_f64().ceil() as u64 + FLUSH_GRACE_SECS,
        ),
        graceful_shutdown_timeout_seconds: Some(1),
        // Without a safe folder, a path nothing listens on: SIGQUIT then hands nothing over.
        upgrade_sock: settings
            .upgrade_sock
            .as_ref()
            .map_or_else(String::new, |p| p.display().to_string()),
        ..ServerConf::default()
    };
    let opt = pingora_core::server::configuration::Opt {
        upgrade: upgrade_from.is_some(),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    // Bootstrap (taking inherited sockets) runs as a service the listeners wait for, so
    // Pingora knows which addresses this config still listens on and closes the sockets of
    // listeners the new config dropped, instead of leaving them accepting unanswered.
    let bootstrap = server.bootstrap_as_a_service();
    let in_flight = gateway.in_flight.clone();
    let opening = InFlight::default();
    let flush = Flush {
        chain: gateway.chain.clone(),
        telemetry: gateway.telemetry.clone(),
    };
    let chain = gateway.chain.clone();
    let metrics = gateway.metrics.clone();
    let gateway_pool = gateway.router.pool().clone();
    let admin = settings.admin.map(|addr| {
        let app = AdminApp {
            metrics: gateway.metrics.clone(),
            router: gateway.router.clone(),
            in_flight: gateway.in_flight.clone(),
            chain: gateway.chain.clone(),
            token: settings.admin_token.as_deref().map(AdminToken::new),
            metrics_need_token: !addr.ip().is_loopback(),
            hosts: crate::host_check::HostRule::local(),
        };
        let mut svc = pingora_core::services::listening::Service::new(
            "llm-gateway admin".to_string(),
            crate::proxy::GuardedAdmin::new(
                app,
                crate::proxy::ListenerCaps::new(
                    addr,
                    Some(crate::proxy::ADMIN_MAX_CONNECTIONS),
                    Some(crate::proxy::ADMIN_MAX_PER_CLIENT),
                    settings.limits.ipv6_prefix,
                    &gateway.metrics,
                ),
                settings.limits.client_header_timeout,
            ),
        );
        svc.add_tcp(&addr.to_string());
        // A scrape now and then: one thread, not one per core.
        svc.threads = Some(1);
        svc
    });
    let caps = crate::proxy::ConnectionCaps::new(
        &settings.listen,
        settings.limits.ipv6_prefix,
        &gateway.metrics,
    );
    let limits = crate::proxy::ConnectionLimits {
        head_timeout: settings.limits.client_header_timeout,
        send_timeout: settings.limits.client_send_timeout,
        keepalive_timeout: settings.limits.keepalive_timeout,
        keepalive_requests: settings.limits.keepalive_requests,
        in_flight: gateway.in_flight.clone(),
        opening: opening.clone(),
    };
    let listeners = settings
        .listen
        .iter()
        .zip(tls)
        .zip(caps.into_listeners())
        .map(|((l, tls), caps)| crate::proxy::Listening {
            addr: l.addr,
            tls: tls.map(TlsSettings::build),
            caps,
        })
        .collect();
    let gateway = Arc::new(gateway);
    spawn_upstream_sweep(gateway.clone());
    let proxy = pingora_proxy::http_proxy(
        &server.configuration,
        crate::proxy::H2Phases(gateway.clone()),
    );
    let app = crate::proxy::GatewayApp::new(gateway, proxy, limits);
    let service = crate::proxy::GatewayService::new(app, listeners);
    server.add_service(service).add_dependency(&bootstrap);
    if let Some(admin) = admin {
        server.add_service(admin).add_dependency(&bootstrap);
    }
    if let Some(sock) = &settings.upgrade_sock {
        if let Some(pid) = upgrade_from {
            log::info!(
                "upgrade: taking the sockets over from pid {pid} through {}",
                sock.display()
            );
            if let Err(e) = crate::upgrade::take_over_from(pid) {
                log::error!("{e}");
                std::process::exit(1);
            }
        }
        crate::upgrade::write_pid(sock);
    }
    crate::router::spawn_background(gateway_pool, &settings.routing);
    spawn_ctrl_c(flush.clone());
    spawn_reloader(chain, metrics, settings.file.clone());
    spawn_drain_watcher(
        server.watch_execution_phase(),
        [in_flight, opening],
        settings.drain_timeout,
        flush,
        upgrade_from.is_some(),
    );
    if settings.upgrade_sock.is_some() {
        crate::upgrade::spawn_on_usr2(settings.file.clone());
    } else {
        log::warn!("upgrades are off: no folder is safe for the upgrade socket (the config's folder is writable by other users, or owned by another); set server.upgrade_sock to a path in a folder only this user can write, such as /run/llm-gateway/upgrade.sock");
        crate::upgrade::refuse_usr2();
    }
    let listen: Vec<String> = settings
        .listen
        .iter()
        .map(|l| {
            format!(
                "{}{}",
                if l.tls.is_some() {
                    "https://"
                } else {
                    "http://"
                },
                l.addr
            )
        })
        .collect();
    log::info!(
        "llm-gateway listening on {} ({} backends, {} filters, {} worker threads)",
        listen.join(", "),
        settings.backends.len(),
        settings.filters.len(),
        settings.threads
    );
    server.run_forever()
}

/// Ctrl-C (SIGINT) is Pingora's quick shutdown: runtimes stop at once, requests in flight
/// and lines not yet queued are lost. The gateway instead treats a first Ctrl-C like SIGTERM
/// (drain, flush the audit queue and the ledger, exit), and a second one as "flush what is
/// queued and exit now". SIGINT is blocked in every thread, so only [`spawn_ctrl_c`]'s
/// thread ever sees it: call this first thing, before any thread is started.
pub fn block_ctrl_c() {
    // SAFETY: plain libc calls on a local, zero-initialised signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            log::warn!("cannot block SIGINT: Ctrl-C will stop the gateway without draining");
        }
    }
}

/// SIGHUP's default ends the process: one that came while the gateway started (a reload
/// sent by `systemctl reload` or logrotate's `postrotate` during an upgrade's start) killed
/// it before its handler was there. Ignored until [`spawn_reloader`] sets the handler.
pub fn ignore_sighup_until_handled() {
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

fn spawn_ctrl_c(flush: Flush) {
    std::thread::spawn(move || {
        let mut presses = 0;
        loop {
            let mut sig = 0;
            // SAFETY: waits for the blocked SIGINT on a local, zero-initialised set.
            let ok = unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGINT);
                libc::sigwait(&set, &mut sig) == 0
            };
            if !ok || sig != libc::SIGINT {
                continue;
            }
            presses += 1;
            if presses == 1 {
                log::info!("Ctrl-C: draining like SIGTERM (press again to exit at once)");
                // SAFETY: sends SIGTERM to this very process.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGTERM);
                }
            } else {
                log::warn!("Ctrl-C again: writing what is queued and exiting now");
                flush.run();
                std::process::exit(130);
            }
        }
    });
}

/// Closes backend connections idle past their backend's idle time, once a second, also when
/// no request comes by to notice them.
fn spawn_upstream_sweep(gateway: Arc<Gateway>) {
    let spawned = std::thread::Builder::new()
        .name("upstream-sweep".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let pool = gateway.router.pool();
            gateway
                .upstreams
                .sweep(pool.iter().map(|b| (b.index, &b.peer)));
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the idle backend connection sweep ({e}): idle connections are closed only when a request comes by");
    }
}

/// SIGHUP re-reads the filters' files (keys, htpasswd). Without this handler SIGHUP would
/// terminate the process.
fn spawn_reloader(chain: Arc<FilterChain>, metrics: Arc<Metrics>, config: std::path::PathBuf) {
    // The config file as this process read it: SIGHUP re-reads only the filters' files, so an
    // edit of the config itself is said to be left unapplied rather than taken as reloaded.
    let started_with = std::fs::read(&config).ok();
    on_signal(
        (signal_hook::consts::SIGHUP, "SIGHUP"),
        "reloads are disabled",
        move || {
            if std::fs::read(&config).ok() != started_with {
                log::warn!(
                    "SIGHUP: {} changed since this process started; SIGHUP re-reads the keys and htpasswd files only, so the change is not applied: send SIGUSR2 (or run with --upgrade) to start the new config without dropping connections",
                    config.display()
                );
            }
            let errors = chain.reload();
            let result = if errors.is_empty() { "ok" } else { "failed" };
            metrics.reloads.with_label_values(&[result]).inc();
            if errors.is_empty() {
                log::info!("SIGHUP: reloaded");
            }
            for e in errors {
                log::error!(
                    "SIGHUP: reload failed, keeping the previous state of what it names: {e}"
                );
            }
        },
    );
}

/// Runs `handle` on a thread of its own each time the signal (number, name) arrives; when
/// the handler cannot be installed, says so (`off`: what the operator loses) and carries on.
pub(crate) fn on_signal(
    (signal, name): (i32, &str),
    off: &str,
    mut handle: impl FnMut() + Send + 'static,
) {
    let mut signals = match signal_hook::iterator::Signals::new([signal]) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot install the {name} handler, {off}: {e}");
            return;
        }
    };
    std::thread::spawn(move || {
        for _ in signals.forever() {
            handle();
        }
    });
}

fn spawn_drain_watcher(
    mut phases: tokio::sync::broadcast::Receiver<ExecutionPhase>,
    [in_flight, opening]: [InFlight; 2],
    drain: Duration,
    flush: Flush,
    upgraded: bool,
) {
    std::thread::spawn(move || loop {
        match phases.blocking_recv() {
            // The listening sockets are in hand (bound, or taken over).
            Ok(ExecutionPhase::BootstrapComplete) => crate::upgrade::notify_systemd(&if upgraded {
                format!("MAINPID={}\nREADY=1", std::process::id())
            } else {
                "READY=1".to_string()
            }),
            // Shutdown or a hand-over begins: connections end after their current request.
            // (Only a shutdown is news for systemd: in a hand-over the new process is about
            // to name itself the main one.)
            Ok(ExecutionPhase::GracefulTerminate) => {
                crate::upgrade::notify_systemd("STOPPING=1");
                crate::proxy::drain::begin();
            }
            Ok(
                ExecutionPhase::GracefulUpgradeTransferringFds
                | ExecutionPhase::GracefulUpgradeCloseTimeout,
            ) => crate::proxy::drain::begin(),
            Ok(ExecutionPhase::ShutdownGracePeriod) => {
                crate::proxy::drain::begin();
                let start = Instant::now();
                log::info!(
                    "shutting down: draining {} in-flight requests (at most {drain:?})",
                    in_flight.get()
                );
                // Nothing in flight and no connection about to send its first request, for
                // longer than a kept-alive connection lingers: nothing more can come.
                let mut quiet_since = Instant::now();
                while start.elapsed() < drain {
                    if in_flight.get() > 0 || opening.get() > 0 {
                        quiet_since = Instant::now();
                    } else if quiet_since.elapsed() > 2 * crate::proxy::drain::LINGER {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                log::info!(
                    "shutdown: {} requests still in flight; exiting",
                    in_flight.get()
                );
                flush.run();
                std::process::exit(0);
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    });
}
