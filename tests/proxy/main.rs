//! Proxy behaviour through the real binary: forwarding and streaming, routing, rate limits,
//! budgets, audit and metrics, TLS.

#[path = "../support/mod.rs"]
mod support;

mod budget;
mod forwarding;
mod observability;
mod ratelimit;
mod routing;
mod telemetry;
mod tls;
