//! Load generator for streaming benchmarks (`tests/bench/streams.sh`): opens N streamed
//! generations at once, reads them to the end and reports the time to the first byte and the
//! gaps between successive reads of each stream (each read carries one or more events), plus
//! the CPU time a given process used meanwhile. One thread, so that it fits on one core
//! beside the upstream.

use std::io::{Read, Write as _};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    /// host:port of the proxy (or the upstream itself).
    #[arg(long)]
    target: String,
    /// Concurrent streams.
    #[arg(long, default_value_t = 2000)]
    streams: usize,
    /// Path of the streamed request.
    #[arg(long, default_value = "/v1/chat/completions")]
    path: String,
    /// Request body (streamed).
    #[arg(
        long,
        default_value = r#"{"model":"llama3.2:1b","stream":true,"messages":[{"role":"user","content":"Count slowly."}]}"#
    )]
    body: String,
    /// Authorization header value, if any.
    #[arg(long)]
    auth: Option<String>,
    /// A process whose CPU time (user + system) over the run is reported.
    #[arg(long)]
    pid: Option<u32>,
    /// Streams are opened over this long, not all in the same instant.
    #[arg(long, default_value_t = 1000)]
    ramp_ms: u64,
}

struct Stream {
    first_byte: Duration,
    gaps: Vec<Duration>,
    ok: bool,
}

async fn one(args: &Args, delay: Duration) -> Stream {
    tokio::time::sleep(delay).await;
    let failed = Stream {
        first_byte: Duration::ZERO,
        gaps: Vec::new(),
        ok: false,
    };
    let Ok(mut s) = TcpStream::connect(&args.target).await else {
        return failed;
    };
    let _ = s.set_nodelay(true);
    let auth = args
        .auth
        .as_deref()
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{}",
        args.path,
        args.body.len(),
        args.body
    );
    let start = Instant::now();
    if s.write_all(req.as_bytes()).await.is_err() {
        return failed;
    }
    let mut buf = vec![0u8; 16 << 10];
    let mut first = None;
    let mut last = start;
    let mut gaps = Vec::with_capacity(128);
    let mut head = Vec::new();
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let now = Instant::now();
                if first.is_none() {
                    first = Some(now - start);
                    head.extend_from_slice(&buf[..n.min(16)]);
                } else {
                    gaps.push(now - last);
                }
                last = now;
            }
        }
    }
    Stream {
        first_byte: first.unwrap_or_default(),
        gaps,
        ok: head.starts_with(b"HTTP/1.1 200"),
    }
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let mut text = String::new();
    std::fs::File::open(format!("/proc/{pid}/stat"))
        .ok()?
        .read_to_string(&mut text)
        .ok()?;
    // Fields after the command name (which may contain spaces): utime is the 14th field.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stream-load: {e}");
            std::process::exit(1);
        }
    };
    let ticks_before = args.pid.and_then(cpu_ticks);
    let started = Instant::now();
    let results = rt.block_on(async {
        let args = &args;
        let step = Duration::from_millis(args.ramp_ms) / args.streams.max(1) as u32;
        let all = (0..args.streams).map(|i| one(args, step * i as u32));
        futures_util::future::join_all(all).await
    });
    let wall = started.elapsed();
    let ticks = match (ticks_before, args.pid.and_then(cpu_ticks)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let ok = results.iter().filter(|r| r.ok).count();
    let mut firsts: Vec<Duration> = results
        .iter()
        .filter(|r| r.ok)
        .map(|r| r.first_byte)
        .collect();
    firsts.sort();
    let mut gaps: Vec<Duration> = results
        .iter()
        .filter(|r| r.ok)
        .flat_map(|r| r.gaps.iter().copied())
        .collect();
    gaps.sort();
    // /proc/PID/stat counts in USER_HZ, 100 per second on Linux.
    let cpu = ticks
        .map(|t| format!("{:.2}", t as f64 / 100.0))
        .unwrap_or_else(|| "n/a".into());
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "streams={} ok={ok} wall_s={:.2} first_byte_p50_ms={:.2} first_byte_p99_ms={:.2} reads={} gap_p50_ms={:.2} gap_p99_ms={:.2} gap_max_ms={:.2} proxy_cpu_s={cpu}",
        args.streams,
        wall.as_secs_f64(),
        pct(&firsts, 0.5),
        pct(&firsts, 0.99),
        gaps.len(),
        pct(&gaps, 0.5),
        pct(&gaps, 0.99),
        gaps.last().map_or(0.0, |g| g.as_secs_f64() * 1000.0),
    );
}
