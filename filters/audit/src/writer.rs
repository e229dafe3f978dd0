//! The audit writer: a dedicated thread that owns the sink, fed by a bounded channel, so
//! proxy threads never touch the disk.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::SystemTime;

use gateway_filter::batch::drain_in_batches;
use tokio::sync::mpsc::Receiver;

pub enum Msg {
    /// One JSON line, with its newline.
    Line(Vec<u8>),
    /// Reopen the file (SIGHUP, after logrotate moved it); answered with how it went (a
    /// file that cannot be opened keeps the lines going to the one open).
    Reopen(std::sync::mpsc::SyncSender<Result<(), String>>),
    /// Answer once everything queued before is written and flushed.
    /// Answered whether every line so far reached the file.
    Flush(std::sync::mpsc::SyncSender<bool>),
}

#[derive(Debug, Clone)]
pub enum SinkSpec {
    File {
        path: PathBuf,
        /// Rotate when the file would grow past this many bytes.
        max_size: Option<u64>,
        /// Rotate when the UTC date changes.
        daily: bool,
        /// Rotated files kept: `FILE.1` (newest) … `FILE.keep`.
        keep: usize,
    },
    Stdout,
}

enum Sink {
    File(FileSink),
    Stdout(io::Stdout),
}

struct FileSink {
    path: PathBuf,
    out: BufWriter<File>,
    size: u64,
    day: String,
    max_size: Option<u64>,
    daily: bool,
    keep: usize,
    /// A rotation failed: not tried again before this (each line would try, and fail).
    rotate_after: Option<std::time::Instant>,
}

/// How long after a failed rotation the next is tried.
const ROTATE_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

fn today() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()[..10].to_string()
}

/// The log, for appending; never through a symbolic link (one planted at its path would send
/// the lines to whatever file it names, in that file's mode).
fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

impl FileSink {
    fn open(
        path: PathBuf,
        max_size: Option<u64>,
        daily: bool,
        keep: usize,
    ) -> io::Result<FileSink> {
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        Ok(FileSink {
            path,
            out: BufWriter::with_capacity(64 << 10, file),
            size,
            day: today(),
            max_size,
            daily,
            keep,
            rotate_after: None,
        })
    }

    /// Rotates, or, when that fails (a folder this user may not write), keeps the lines going
    /// into the file that is open and says so once: a rotation that failed dropped every
    /// line after it.
    fn rotate_or_go_on(&mut self) {
        if self
            .rotate_after
            .is_some_and(|t| std::time::Instant::now() < t)
        {
            return;
        }
        match self.rotate() {
            Ok(()) => {
                if self.rotate_after.take().is_some() {
                    log::info!("audit: rotation works again");
                }
            }
            Err(e) => {
                if self.rotate_after.is_none() {
                    log::error!(
                        "audit: cannot rotate {} ({e}); lines go on into the open file, rotation is tried again every {}s",
                        self.path.display(),
                        ROTATE_RETRY.as_secs()
                    );
                }
                self.rotate_after = Some(std::time::Instant::now() + ROTATE_RETRY);
            }
        }
    }

    fn rotated(&self, n: usize) -> PathBuf {
        gateway_filter::with_suffix(&self.path, &format!(".{n}"))
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.out.flush()?;
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    std::fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            std::fs::rename(&self.path, self.rotated(1))?;
        }
        self.reopen()
    }

    fn reopen(&mut self) -> io::Result<()> {
        self.out.flush()?;
        let file = open_append(&self.path)?;
        self.size = file.metadata()?.len();
        self.out = BufWriter::with_capacity(64 << 10, file);
        Ok(())
    }

    /// `line` ends with its newline, so it enters the buffer whole or not at all (`BufWriter`
    /// makes room first and fails before copying): a failed write (a full disk) never leaves
    /// a line without its end for the next one to join. (A line larger than the buffer goes to
    /// the file in one write, which the file system may still cut short.)
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64;
        if self.size > 0 && self.max_size.is_some_and(|m| self.size + len > m) {
            self.rotate_or_go_on();
        }
        self.out.write_all(line)?;
        self.size += len;
        Ok(())
    }

    /// Daily rotation is checked once per batch of lines.
    fn maybe_rotate_daily(&mut self) -> io::Result<()> {
        if self.daily {
            let d = today();
            if d != self.day {
                self.day = d;
                if self.size > 0 {
                    self.rotate_or_go_on();
                }
            }
        }
        Ok(())
    }
}

impl Sink {
    fn open(spec: &SinkSpec) -> io::Result<Sink> {
        Ok(match spec {
            SinkSpec::File {
                path,
                max_size,
                daily,
                keep,
            } => Sink::File(FileSink::open(path.clone(), *max_size, *daily, *keep)?),
            SinkSpec::Stdout => Sink::Stdout(io::stdout()),
        })
    }

    fn handle(&mut self, msg: Msg) -> io::Result<()> {
        match (self, msg) {
            (Sink::File(f), Msg::Line(l)) => f.write_line(&l),
            (Sink::Stdout(s), Msg::Line(l)) => s.lock().write_all(&l),
            (Sink::File(f), Msg::Reopen(ack)) => {
                let reopened = f.reopen();
                let _ = ack.send(reopened.as_ref().map_err(|e| e.to_string()).copied());
                reopened
            }
            (Sink::Stdout(_), Msg::Reopen(ack)) => {
                let _ = ack.send(Ok(()));
                Ok(())
            }
            (sink, Msg::Flush(ack)) => {
                // Acknowledged even when it failed (whoever waits, shutdown, must not hang),
                // and told whether the lines reached the file.
                let flushed = sink.flush();
                let _ = ack.send(flushed.is_ok());
                flushed
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::File(f) => f.out.flush(),
            Sink::Stdout(s) => s.flush(),
        }
    }
}

/// Opens the sink now (so a bad path is a startup error) and starts the writer thread.
///
/// The thread drains the queue in batches on a short timer rather than waiting on it
/// (`gateway_filter::batch`): a receiver that waits is woken for every line, which cost a
/// quarter of a core at full load. Lines are written with one buffered write per batch and
/// flushed once; a line waits at most `BATCH_WAIT_MAX` to be written. Flush and reopen
/// requests wait as long, and are handled in order with the lines.
pub fn spawn(spec: &SinkSpec, rx: Receiver<Msg>) -> io::Result<JoinHandle<()>> {
    let mut sink = Sink::open(spec)?;
    let mut writing = gateway_filter::failing::FailureLog::new(match spec {
        SinkSpec::File { path, .. } => format!("audit: writing {}", path.display()),
        SinkSpec::Stdout => "audit: writing to stdout".to_string(),
    });
    std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || {
            drain_in_batches(rx, |batch| {
                if batch.is_empty() {
                    return;
                }
                if let Sink::File(f) = &mut sink {
                    if let Err(e) = f.maybe_rotate_daily() {
                        log::error!("audit: daily rotation failed: {e}");
                    }
                }
                // Every message is handled (a flush is acknowledged even after a failed
                // write); the first error is reported.
                let mut result: io::Result<()> = Ok(());
                for msg in batch.drain(..) {
                    let line = matches!(msg, Msg::Line(_));
                    let handled = sink.handle(msg);
                    if line && handled.is_err() {
                        crate::DROPPED.inc();
                    }
                    if result.is_ok() {
                        result = handled;
                    }
                }
                // A full disk fails every batch: said when it starts, every 10 s while it
                // lasts (lines lost are counted in llm_gateway_audit_lines_dropped_total), and
                // when it ends.
                match result.and_then(|_| sink.flush()) {
                    Err(e) => writing.failed(e),
                    Ok(()) => writing.worked(),
                }
            });
            let _ = sink.flush();
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_filter::batch::BATCH_WAIT_MAX;
    use std::time::Duration;

    fn send(tx: &tokio::sync::mpsc::Sender<Msg>, n: usize, tag: &str) {
        for i in 0..n {
            tx.blocking_send(Msg::Line(
                format!(
                    "{{\"n\":{i},\"tag\":\"{tag}\",\"pad\":\"{}\"}}\n",
                    "x".repeat(40)
                )
                .into_bytes(),
            ))
            .unwrap();
        }
    }

    fn flush(tx: &tokio::sync::mpsc::Sender<Msg>) {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        tx.blocking_send(Msg::Flush(ack)).unwrap();
        done.recv().unwrap();
    }

    fn lines(p: &Path) -> usize {
        std::fs::read_to_string(p)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// A disk that is full (`/dev/full` answers every write with ENOSPC): the writer goes on,
    /// and the lines it cannot take into its buffer are counted as dropped (what the alert on
    /// dropped lines watches), not lost silently; those already in the buffer when the disk
    /// filled are not counted.
    #[test]
    fn lines_a_full_disk_refuses_are_counted_as_dropped() {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let spec = SinkSpec::File {
            path: PathBuf::from("/dev/full"),
            max_size: None,
            daily: false,
            keep: 1,
        };
        let before = crate::DROPPED.get();
        let h = spawn(&spec, rx).unwrap();
        // 2,000 lines of ~80 bytes: more than the writer's 64 KiB buffer holds.
        send(&tx, 2_000, "full");
        flush(&tx);
        let dropped = crate::DROPPED.get() - before;
        assert!(
            (1_000..=2_000).contains(&dropped),
            "{dropped} lines counted as dropped"
        );
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn a_link_planted_at_the_log_s_path_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "").unwrap();
        let path = dir.path().join("audit.jsonl");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let (_tx, rx) = tokio::sync::mpsc::channel(16);
        let spec = SinkSpec::File {
            path,
            max_size: None,
            daily: false,
            keep: 2,
        };
        assert!(spawn(&spec, rx).is_err(), "opened through the link");
    }

    #[test]
    fn lines_go_on_when_a_rotation_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        // Where the rotated file would go there is a folder with something in it: renaming
        // onto it fails (also for root, whom permissions do not stop).
        std::fs::create_dir(dir.path().join("audit.jsonl.1")).unwrap();
        std::fs::write(dir.path().join("audit.jsonl.1").join("x"), "").unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let spec = SinkSpec::File {
            path: path.clone(),
            max_size: Some(1000),
            daily: false,
            keep: 1,
        };
        let h = spawn(&spec, rx).unwrap();
        send(&tx, 50, "a");
        flush(&tx);
        assert_eq!(lines(&path), 50, "every line is kept in the open file");
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn writes_rotates_by_size_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let spec = SinkSpec::File {
            path: path.clone(),
            max_size: Some(1000),
            daily: false,
            keep: 2,
        };
        let h = spawn(&spec, rx).unwrap();
        send(&tx, 50, "a");
        flush(&tx);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let total = lines(&path)
            + lines(&dir.path().join("audit.jsonl.1"))
            + lines(&dir.path().join("audit.jsonl.2"));
        assert!(std::fs::metadata(&path).unwrap().len() <= 1000);
        assert!(
            !dir.path().join("audit.jsonl.3").exists(),
            "only `keep` rotated files"
        );
        assert!(
            (30..50).contains(&total),
            "older lines rotated out: {total}"
        );
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn lines_are_written_in_batches_without_a_wake_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (tx, rx) = tokio::sync::mpsc::channel(10_000);
        let spec = SinkSpec::File {
            path: path.clone(),
            max_size: None,
            daily: false,
            keep: 1,
        };
        let h = spawn(&spec, rx).unwrap();
        // Queued without waiting (as the proxy's try_send does): all on disk within the
        // writer's longest sleep, with no flush asked for.
        for i in 0..5_000 {
            tx.try_send(Msg::Line(format!("{{\"n\":{i}}}\n").into_bytes()))
                .unwrap();
        }
        let start = std::time::Instant::now();
        let mut lines = 0;
        while start.elapsed() < Duration::from_secs(2) {
            lines = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .count();
            if lines == 5_000 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(lines, 5_000);
        assert!(
            start.elapsed() < BATCH_WAIT_MAX * 3,
            "{:?}",
            start.elapsed()
        );
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn reopen_after_logrotate_moves_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let h = spawn(
            &SinkSpec::File {
                path: path.clone(),
                max_size: None,
                daily: true,
                keep: 3,
            },
            rx,
        )
        .unwrap();
        send(&tx, 3, "before");
        flush(&tx);
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        tx.blocking_send(Msg::Reopen(ack)).unwrap();
        assert_eq!(done.recv().unwrap(), Ok(()));
        send(&tx, 2, "after");
        drop(tx);
        h.join().unwrap();
        assert_eq!(lines(&dir.path().join("moved")), 3);
        assert_eq!(lines(&path), 2);
    }
}
