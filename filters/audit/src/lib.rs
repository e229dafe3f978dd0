//! The `audit` filter: one JSON line per request, rejected ones included, written in
//! `on_complete` by a dedicated thread. Never a key; prompts only with `capture.prompts`.

mod line;
mod writer;

use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use gateway_filter::units::HumanSize;
use gateway_filter::{parse_options, BuildContext, Filter, OptionsError, ReloadError, RequestCtx};
use prometheus::IntCounter;
use serde::Deserialize;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

pub use gateway_filter::prompt::prompt_texts;
pub use line::{prompt_sha256, AuditLine, PromptKey};
use writer::{Msg, SinkSpec};

fn counter(name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|_| unreachable!("valid metric name"));
    // Registered once per process; a second registration can only fail as a duplicate.
    let _ = prometheus::default_registry().register(Box::new(c.clone()));
    c
}

static STALLS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "llm_gateway_audit_queue_stalls_total",
        "Audit lines that had to wait for room in the writer queue",
    )
});
/// Also counted by the writer for lines a failed write lost (a full disk).
pub(crate) static DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "llm_gateway_audit_lines_dropped_total",
        "Audit lines lost: the queue was full (on_full: drop), or writing them failed (a full disk)",
    )
});
static LINES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "llm_gateway_audit_lines_total",
        "Audit lines queued for writing",
    )
});

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// Append-only file, created 0600.
    file: Option<PathBuf>,
    /// Write to standard output instead (e.g. under systemd/journald or in a container).
    #[serde(default)]
    stdout: bool,
    #[serde(default)]
    rotate: RotateOptions,
    #[serde(default)]
    capture: CaptureOptions,
    /// Lines that may wait for the writer.
    #[serde(default = "default_queue")]
    queue: usize,
    #[serde(default)]
    on_full: OnFull,
    /// A secret: prompts are hashed with HMAC-SHA256 under it (`prompt_hmac_sha256`) instead
    /// of a plain SHA-256, so a reader of the log cannot confirm a guessed prompt.
    prompt_hash_key: Option<String>,
}

/// Shortest `prompt_hash_key`: a guessable key would undo what it is for.
const MIN_PROMPT_KEY: usize = 16;

fn default_queue() -> usize {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateOptions {
    max_size: Option<HumanSize>,
    #[serde(default)]
    daily: bool,
    #[serde(default = "default_keep")]
    keep: usize,
}

impl Default for RotateOptions {
    fn default() -> Self {
        RotateOptions {
            max_size: None,
            daily: false,
            keep: default_keep(),
        }
    }
}

fn default_keep() -> usize {
    7
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CaptureOptions {
    /// Write the prompt texts into each line. Off by default: prompts are often personal data.
    #[serde(default)]
    prompts: bool,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum OnFull {
    /// Wait for room (no line is lost); the wait is counted in a metric.
    #[default]
    Wait,
    /// Drop the line and count it.
    Drop,
}

/// Bytes reserved for a line: a usual one is 450–650 bytes.
const LINE_CAPACITY: usize = 768;

pub struct AuditFilter {
    tx: Sender<Msg>,
    capture_prompts: bool,
    prompt_key: Option<PromptKey>,
    on_full: OnFull,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Smallest `rotate.max_size`.
const MIN_ROTATE_SIZE: u64 = 1 << 20;

/// Most lines `queue` may hold (each waiting line is a few hundred bytes; the channel refuses
/// more than about 2^61 permits, and far fewer would already exhaust memory).
const MAX_QUEUE: usize = 10_000_000;

/// Registry constructor: `- use: audit` plus [`Options`].
pub fn build(
    options: &serde_json::Value,
    cx: &BuildContext,
) -> Result<Arc<dyn Filter>, OptionsError> {
    let o: Options = parse_options(options)?;
    let spec = match (o.file, o.stdout) {
        (Some(path), false) => SinkSpec::File {
            path: cx.resolve(&path),
            max_size: o.rotate.max_size.map(|s| s.0),
            daily: o.rotate.daily,
            keep: o.rotate.keep,
        },
        (None, true) => SinkSpec::Stdout,
        _ => {
            return Err(OptionsError::new(
                "",
                "set exactly one sink: `file: PATH` or `stdout: true`",
            ))
        }
    };
    if o.queue == 0 || o.queue > MAX_QUEUE {
        return Err(OptionsError::new(
            "queue",
            format!("from 1 to {MAX_QUEUE} lines (10000, the default, holds a few seconds of a busy gateway)"),
        ));
    }
    if (o.rotate.max_size.is_some() || o.rotate.daily) && o.rotate.keep == 0 {
        return Err(OptionsError::new(
            "rotate.keep",
            "must be at least 1: with 0 every rotation deletes the audit log it rotates away (7, the default, keeps a week of daily files)",
        ));
    }
    if o.rotate.max_size.is_some_and(|s| s.0 < MIN_ROTATE_SIZE) {
        return Err(OptionsError::new(
            "rotate.max_size",
            "at least 1MiB (the log rotates when a line would pass it: with `keep` files of a few lines each, the audit trail is gone within seconds), such as 100MiB",
        ));
    }
    if o.capture.prompts {
        log::warn!("audit: capture.prompts is on: prompt texts are written to the audit log");
    }
    // Used exactly as written: the documented `openssl dgst -hmac "$KEY"` lookup must match.
    let prompt_key = match o.prompt_hash_key.as_deref() {
        None => None,
        Some(k) if k.len() < MIN_PROMPT_KEY => {
            return Err(OptionsError::new(
                "prompt_hash_key",
                format!("at least {MIN_PROMPT_KEY} characters of a secret (`openssl rand -hex 32` makes one; write it as ${{AUDIT_PROMPT_KEY}} and set that in the environment)"),
            ))
        }
        Some(k) => Some(
            <PromptKey as hmac::Mac>::new_from_slice(k.as_bytes())
                .map_err(|e| OptionsError::new("prompt_hash_key", e.to_string()))?,
        ),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(o.queue);
    if cx.check_only {
        // `check`: the log is neither created nor opened (as root it would be left root's).
        if let SinkSpec::File { path, .. } = &spec {
            // The writer never opens the log through a link (`O_NOFOLLOW`).
            let linked = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            if linked {
                return Err(OptionsError::new(
                    "file",
                    format!("{} is a symbolic link; the audit log is never written through one: name the file itself", path.display()),
                ));
            }
            BuildContext::check_writable(path).map_err(|e| {
                OptionsError::new("file", format!("cannot open the audit sink: {e}"))
            })?;
            // Rotating renames files in its folder: that needs the folder, not only the file.
            if o.rotate.max_size.is_some() || o.rotate.daily {
                let rotated = gateway_filter::with_suffix(path, ".rotating-check");
                BuildContext::check_writable(&rotated).map_err(|e| {
                    OptionsError::new(
                        "rotate",
                        format!("the audit log cannot be rotated in its folder: {e}"),
                    )
                })?;
            }
        }
        drop(rx);
        return Ok(Arc::new(AuditFilter {
            tx,
            capture_prompts: o.capture.prompts,
            prompt_key,
            on_full: o.on_full,
            writer: Mutex::new(None),
        }));
    }
    let writer = writer::spawn(&spec, rx).map_err(|e| {
        let key = if matches!(spec, SinkSpec::File { .. }) {
            "file"
        } else {
            "stdout"
        };
        OptionsError::new(key, format!("cannot open the audit sink: {e}"))
    })?;
    LazyLock::force(&STALLS);
    LazyLock::force(&DROPPED);
    LazyLock::force(&LINES);
    Ok(Arc::new(AuditFilter {
        tx,
        capture_prompts: o.capture.prompts,
        prompt_key,
        on_full: o.on_full,
        writer: Mutex::new(Some(writer)),
    }))
}

impl AuditFilter {
    /// Sends from a plain thread, so it works whether or not the caller is on a runtime.
    fn send_blocking(&self, msg: Msg) -> bool {
        let tx = self.tx.clone();
        std::thread::spawn(move || tx.blocking_send(msg).is_ok())
            .join()
            .unwrap_or(false)
    }
}

#[async_trait]
impl Filter for AuditFilter {
    fn name(&self) -> &'static str {
        "audit"
    }

    /// The prompt's hash and length (and the prompt, with `capture_prompts`).
    fn reads_body_at_end(&self) -> bool {
        true
    }

    async fn on_complete(&self, ctx: &mut RequestCtx) {
        // Sized for a usual line, so it is written without growing.
        let mut line = Vec::with_capacity(LINE_CAPACITY);
        AuditLine::new(ctx, self.capture_prompts, self.prompt_key.as_ref()).write_json(&mut line);
        // With its newline: the writer takes a line whole or not at all (a full disk).
        line.push(b'\n');
        LINES.inc();
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) => match self.on_full {
                OnFull::Wait => {
                    STALLS.inc();
                    let _ = self.tx.send(msg).await;
                }
                OnFull::Drop => DROPPED.inc(),
            },
            Err(TrySendError::Closed(_)) => log::error!(
                "audit: the writer has stopped; line of {} lost",
                ctx.request_id
            ),
        }
    }

    /// SIGHUP: reopen the file (logrotate moved it). A file that cannot be opened anew is a
    /// failed reload (the lines keep going to the one open, which logrotate may compress or
    /// delete next): it was reported as done.
    fn reload(&self) -> Result<(), ReloadError> {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        if !self.send_blocking(Msg::Reopen(ack)) {
            return Err(ReloadError::new(WriterStopped));
        }
        match done.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ReloadError::new(ReopenFailed(e))),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(ReloadError::new(ReopenFailed("the writer did not get to it within 10 s (a slow or full disk?); it reopens the log when it does".into())))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(ReloadError::new(WriterStopped))
            }
        }
    }

    /// Waits until every queued line is on disk.
    fn shutdown(&self) {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        if !self.send_blocking(Msg::Flush(ack)) {
            log::error!("audit: could not flush the queue before exit");
            return;
        }
        match done.recv_timeout(Duration::from_secs(30)) {
            Ok(true) => log::info!("audit: all lines written"),
            Ok(false) => log::error!(
                "audit: the last lines could not be written before exit (a full disk?): they are lost"
            ),
            Err(_) => log::error!("audit: could not flush the queue before exit"),
        }
        let _ = self.writer.lock().map(|mut w| w.take());
    }
}

/// The writer thread is gone (it failed, or the gateway is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the audit writer has stopped")]
pub struct WriterStopped;

#[derive(Debug, thiserror::Error)]
#[error("cannot open the audit log anew ({0}); lines still go to the file that was open")]
pub struct ReopenFailed(String);

#[cfg(test)]
mod tests;
