//! Wiring the Pingora server: listeners, worker threads, and shutdown that drains in-flight
//! requests and then exits without waiting out the whole drain time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{ExecutionPhase, Server};

use crate::chain::FilterChain;
use crate::config::{ConfigError, Settings};
use crate::proxy::{Gateway, InFlight};
use crate::registry::Registry;
use crate::router::{BackendPool, RoundRobin, Router};

/// Builds everything that can fail before the server starts, so errors reach the operator as
/// messages, not panics inside Pingora.
pub fn prepare(settings: Settings, registry: &Registry) -> Result<Gateway, ConfigError> {
    let chain = FilterChain::build(&settings, registry)?;
    for (i, addr) in settings.listen.iter().enumerate() {
        // Pingora panics on a busy port; check first to say which entry and why.
        std::net::TcpListener::bind(addr).map_err(|e| {
            ConfigError::invalid(
                &settings.file,
                format!("listen[{i}].addr"),
                format!("cannot listen on {addr}: {e}"),
            )
        })?;
    }
    let router: Arc<dyn Router> = Arc::new(RoundRobin::new(BackendPool::new(
        &settings.backends,
        &settings.limits,
    )));
    Ok(Gateway::new(Arc::new(settings), Arc::new(chain), router))
}

pub fn run(gateway: Gateway) -> ! {
    let settings = gateway.settings.clone();
    let conf = ServerConf {
        threads: settings.threads,
        // Pingora sleeps the whole grace period; the drain watcher below exits earlier as
        // soon as no request is in flight.
        grace_period_seconds: Some(settings.drain_timeout.as_secs_f64().ceil() as u64),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let in_flight = gateway.in_flight.clone();
    let mut service =
        pingora_proxy::http_proxy_service_with_name(&server.configuration, gateway, "llm-gateway");
    for addr in &settings.listen {
        service.add_tcp(&addr.to_string());
    }
    server.add_service(service);
    spawn_drain_watcher(
        server.watch_execution_phase(),
        in_flight,
        settings.drain_timeout,
    );
    log::info!(
        "llm-gateway listening on {} ({} backends, {} worker threads)",
        settings
            .listen
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        settings.backends.len(),
        settings.threads
    );
    server.run_forever()
}

fn spawn_drain_watcher(
    mut phases: tokio::sync::broadcast::Receiver<ExecutionPhase>,
    in_flight: InFlight,
    drain: Duration,
) {
    std::thread::spawn(move || loop {
        match phases.blocking_recv() {
            Ok(ExecutionPhase::ShutdownGracePeriod) => {
                let start = Instant::now();
                log::info!(
                    "shutting down: draining {} in-flight requests (at most {drain:?})",
                    in_flight.get()
                );
                while in_flight.get() > 0 && start.elapsed() < drain {
                    std::thread::sleep(Duration::from_millis(20));
                }
                log::info!(
                    "shutdown: {} requests still in flight; exiting",
                    in_flight.get()
                );
                std::process::exit(0);
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    });
}
