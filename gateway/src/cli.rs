//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::chain::FilterChain;
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
    /// Take the listening sockets over from the running gateway (zero-downtime upgrade):
    /// start this, then send SIGQUIT to the old process, which hands its sockets over
    /// through `server.upgrade_sock`, finishes its running requests and exits.
    #[arg(long)]
    pub upgrade: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway.
    Run {
        /// Config file (YAML).
        #[arg(long, short = 'c')]
        config: PathBuf,
        /// Take the listening sockets over from the running gateway (see the top-level
        /// `--upgrade`).
        #[arg(long)]
        upgrade: bool,
    },
    /// Write a safe starting point: gateway.yaml, keys.yaml with a new admin key (printed
    /// once), and a TLS certificate for a listener other machines reach. Files are 0600;
    /// nothing is overwritten without --force.
    Init(crate::init::InitOptions),
    /// Look for anything still open around the gateway: model servers that answer on
    /// non-loopback addresses of this machine, backends, file permissions, demo
    /// credentials, certificates. Read-only; exit 0 when clean, 1 with findings.
    Doctor {
        /// Config file (YAML); without it only this machine's sockets are checked.
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Validate a config file and print a summary; exit 1 with the error otherwise (like nginx -t).
    Check {
        /// Config file (YAML).
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    /// Answer questions from audit logs (plain, rotated or .gz files).
    ///
    /// Examples: `audit audit.jsonl* --top keys --since 24h`, `audit audit.jsonl --failures`,
    /// `audit audit.jsonl --key alice --json`, `audit audit.jsonl --follow`.
    Audit {
        /// Audit files, oldest first (e.g. audit.jsonl.2.gz audit.jsonl.1 audit.jsonl).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Requests, errors and tokens per key, client address or model.
        #[arg(long, value_enum)]
        top: Option<crate::audit_report::TopBy>,
        /// Failed requests (status >= 400) grouped by status and decision.
        #[arg(long)]
        failures: bool,
        /// Only lines newer than this (e.g. 1h, 30m, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Only this principal (key id).
        #[arg(long)]
        key: Option<String>,
        /// Print new lines as they are written (the last file), until interrupted.
        #[arg(long)]
        follow: bool,
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
        /// Most rows shown.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Spend per principal and model from budget ledgers (SQLite files).
    Spend {
        /// The budget filter's ledger file; repeat it to add up several replicas' ledgers.
        #[arg(long, required = true)]
        ledger: Vec<PathBuf>,
        /// `current` (this UTC month), `YYYY-MM`, or `all`.
        #[arg(long, default_value = "current")]
        period: String,
        /// Only this principal.
        #[arg(long)]
        principal: Option<String>,
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make API keys for the keys file.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Print a bcrypt htpasswd line; prompts twice on a terminal, else reads one line of stdin.
    HashPassword {
        /// Prefix the hash with `USER:` to make a complete htpasswd line.
        #[arg(long)]
        user: Option<String>,
        /// bcrypt cost (each +1 doubles the work).
        #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(4..=31))]
        cost: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Print a fresh random key (shown once) and the keys-file entry holding its hash.
    New {
        /// Principal id (unique in the keys file).
        #[arg(long)]
        id: String,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Read a key on stdin and print its SHA-256, as the keys file stores it.
    Hash,
}

/// The summary `check` prints.
pub fn summary(s: &Settings, chain: &FilterChain) -> String {
    let filters = chain.names();
    let mut out = format!("{}: OK\n", s.file.display());
    let listen: Vec<String> = s
        .listen
        .iter()
        .map(|l| {
            let mut d = l.addr.to_string();
            if let Some(t) = &l.tls {
                d += if t.client_ca.is_some() {
                    " (TLS, client certificates required)"
                } else {
                    " (TLS)"
                };
            }
            if !l.allow.is_empty() || !l.deny.is_empty() {
                d += &format!(
                    " ({} allowed / {} denied networks)",
                    l.allow.len(),
                    l.deny.len()
                );
            }
            if l.insecure {
                d += " (INSECURE: allow_insecure)";
            }
            d
        })
        .collect();
    out += &format!("  listen:   {}\n", listen.join(", "));
    match s.admin {
        Some(a) => out += &format!("  admin:    {a} (/metrics, /health)\n"),
        None => out += "  admin:    off\n",
    }
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
    let identities = chain.identity_sources();
    out += &format!(
        "  identity: {}\n",
        if identities.is_empty() {
            "none (every request is anonymous)".to_string()
        } else {
            identities.join("; ")
        }
    );
    let behind: Vec<String> = s
        .listen
        .iter()
        .filter(|l| !l.trusted_proxies.is_empty())
        .map(|l| {
            let nets: Vec<String> = l.trusted_proxies.iter().map(|n| n.to_string()).collect();
            format!("{} trusts {}", l.addr, nets.join(", "))
        })
        .collect();
    if !behind.is_empty() {
        out += &format!(
            "  proxies:  {} (X-Forwarded-For / Forwarded believed from these)\n",
            behind.join("; ")
        );
    }
    if let Some(t) = &s.telemetry {
        out += &format!(
            "  traces:   OTLP {} to {} (sample {}, prompts {})\n",
            match t.protocol {
                crate::config::OtlpProtocol::HttpProtobuf => "http/protobuf",
                crate::config::OtlpProtocol::Grpc => "grpc",
            },
            t.endpoint,
            t.sample,
            if t.capture_prompts {
                "included: audit.capture.prompts is on"
            } else {
                "never"
            }
        );
    }
    if chain.default_policy {
        out += "  policy:   built-in default (OpenAI and Ollama inference allowed, admin routes only for scope admin)\n";
    } else if !filters.contains(&"policy") {
        out += "  policy:   NONE (policy: none): every backend route is reachable\n";
    }
    let l = &s.limits;
    out += &format!(
        "  limits:   max_body {} bytes, connect {:?}, read {:?}, send {:?}\n",
        l.max_body, l.connect_timeout, l.read_timeout, l.send_timeout
    );
    out += &format!(
        "  server:   {} threads, drain {:?}\n",
        s.threads, s.drain_timeout
    );
    out += &match &s.upgrade_sock {
        Some(sock) => format!("  upgrades: through {}\n", sock.display()),
        None => "  upgrades: OFF: no folder is safe for the upgrade socket (the config's folder is writable by other users, or owned by another); set server.upgrade_sock to a path in a folder only this user can write, such as /run/llm-gateway/upgrade.sock\n".to_string(),
    };
    out
}
