use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use llm_gateway::chain::FilterChain;
use llm_gateway::cli::{summary, Cli, Command};
use llm_gateway::config;
use llm_gateway::registry::Registry;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { config }) => check(&config),
        Some(Command::Run { config }) => run(&config),
        None => match cli.config {
            Some(config) => run(&config),
            None => {
                eprintln!("error: no config file given; run `llm-gateway --config conf/gateway.yaml` (see --help)");
                ExitCode::from(2)
            }
        },
    }
}

fn check(path: &Path) -> ExitCode {
    let registry = Registry::builtin();
    let result = config::load(path).and_then(|s| FilterChain::build(&s, &registry).map(|c| (s, c)));
    match result {
        Ok((settings, chain)) => {
            print!("{}", summary(&settings, &chain.names()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(path: &Path) -> ExitCode {
    let registry = Registry::builtin();
    let gateway = match config::load(path).and_then(|s| llm_gateway::server::prepare(s, &registry))
    {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    llm_gateway::server::run(gateway)
}
