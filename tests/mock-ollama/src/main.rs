use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use mock_ollama::{FailMode, MockConfig, MockServer};

/// Fake Ollama / OpenAI-compatible model server for tests, demos and benchmarks.
#[derive(Parser, Debug)]
#[command(name = "mock-ollama", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:11434")]
    listen: SocketAddr,
    /// Comma-separated model names it serves.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "llama3.1:8b,qwen2.5:7b,nomic-embed-text:latest"
    )]
    models: Vec<String>,
    /// Tokens (streamed chunks) generated per request.
    #[arg(long, default_value_t = 5)]
    chunks: u64,
    /// Delay between streamed chunks, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Failure to inject: none, error500, error429, hang, close-mid-stream, refuse.
    #[arg(long, default_value = "none", value_parser = parse_fail)]
    fail: FailMode,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn parse_fail(s: &str) -> Result<FailMode, String> {
    FailMode::parse(s).ok_or_else(|| {
        format!(
            "unknown mode {s:?}: use none, error500, error429, hang, close-mid-stream or refuse"
        )
    })
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async {
        let server = MockServer::start(MockConfig {
            addr: args.listen,
            models: args.models,
            chunks: args.chunks,
            chunk_delay: Duration::from_millis(args.chunk_delay_ms),
            first_byte_delay: Duration::ZERO,
            fail: args.fail,
        })
        .await?;
        println!("mock-ollama listening on {}", server.addr());
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}
