//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Settings;

/// Security gateway for self-hosted model servers (Ollama, OpenAI-compatible).
///
/// With no subcommand it runs the gateway, like `run`.
#[derive(Parser, Debug)]
#[command(name = "llm-gateway", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Config file (YAML).
    #[arg(long, short = 'c', global = false)]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway.
    Run {
        /// Config file (YAML).
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    /// Validate a config file and print a summary; exit 1 with the error otherwise (like nginx -t).
    Check {
        /// Config file (YAML).
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
}

/// The summary `check` prints.
pub fn summary(s: &Settings, filters: &[&str]) -> String {
    let mut out = format!("{}: OK\n", s.file.display());
    let listen: Vec<String> = s.listen.iter().map(|a| a.to_string()).collect();
    out += &format!("  listen:   {}\n", listen.join(", "));
    if s.backends.is_empty() {
        out += "  backends: none (inference requests will get 502)\n";
    }
    for b in &s.backends {
        out += &format!(
            "  backend:  {} ({}) at {}\n",
            b.name,
            b.kind.as_str(),
            b.addr
        );
    }
    out += &format!(
        "  filters:  {}\n",
        if filters.is_empty() {
            "none".to_string()
        } else {
            filters.join(" → ")
        }
    );
    let l = &s.limits;
    out += &format!(
        "  limits:   max_body {} bytes, connect {:?}, read {:?}, send {:?}\n",
        l.max_body, l.connect_timeout, l.read_timeout, l.send_timeout
    );
    out += &format!(
        "  server:   {} threads, drain {:?}\n",
        s.threads, s.drain_timeout
    );
    out
}
