//! llm-gateway: a security gateway in front of self-hosted model servers.

pub mod admin;
pub mod audit_report;
pub mod chain;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod fd_limit;
pub mod host_check;
pub mod init;
pub mod log_limit;
pub mod metrics;
pub mod model_list;
pub mod proxy;
pub mod registry;
pub mod router;
pub mod server;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod upgrade;
pub mod usage;
