//! The process's logger: env_logger's, with the lines Pingora writes per connection kept to a
//! few per window.
//!
//! Pingora logs some failures of a single connection at ERROR (`H2 handshake error` for every
//! HTTP/2 client that sends anything but the connection preface, handshake failures of
//! downstream TLS): anyone who can reach the port writes a line per connection, a log that
//! grows as fast as connections can be opened. Those targets get [`PER_WINDOW`] lines a
//! [`WINDOW`]; the rest are counted, and the count is written when the next window begins.
//! The gateway's own lines are not touched (they are limited where they are written).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::{Level, Log, Metadata, Record};

/// Lines one Pingora target may write a window.
const PER_WINDOW: u32 = 20;
const WINDOW: Duration = Duration::from_secs(10);

struct Window {
    start: Instant,
    lines: u32,
}

pub struct Limited {
    inner: env_logger::Logger,
    windows: Mutex<HashMap<String, Window>>,
}

/// What to do with a Pingora line.
#[derive(Debug, PartialEq)]
enum Admit {
    /// Write it; before it, that `n` lines were left out in the window that ended.
    Yes {
        left_out: u32,
    },
    /// Write it, then say that the rest of this window's are left out.
    Last,
    No,
}

impl Limited {
    /// Installs the logger: `RUST_LOG` as env_logger reads it, `info` by default.
    pub fn install() {
        let inner =
            env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
                .build();
        let max = inner.filter();
        let logger = Limited {
            inner,
            windows: Mutex::new(HashMap::new()),
        };
        if log::set_boxed_logger(Box::new(logger)).is_ok() {
            log::set_max_level(max);
        }
    }

    fn admit(&self, target: &str, now: Instant) -> Admit {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let w = match windows.get_mut(target) {
            Some(w) => w,
            None => windows.entry(target.to_string()).or_insert(Window {
                start: now,
                lines: 0,
            }),
        };
        if now.duration_since(w.start) >= WINDOW {
            let left_out = w.lines.saturating_sub(PER_WINDOW);
            *w = Window {
                start: now,
                lines: 1,
            };
            return Admit::Yes { left_out };
        }
        w.lines = w.lines.saturating_add(1);
        match w.lines {
            n if n < PER_WINDOW => Admit::Yes { left_out: 0 },
            n if n == PER_WINDOW => Admit::Last,
            _ => Admit::No,
        }
    }

    /// A line of the limiter's own, at the level of the line it is about (a filter that
    /// lets those through lets it through).
    fn note(&self, level: Level, target: &str, text: std::fmt::Arguments<'_>) {
        self.inner.log(
            &Record::builder()
                .level(level)
                .target(target)
                .args(text)
                .build(),
        );
    }
}

impl Log for Limited {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.inner.matches(record) {
            return;
        }
        let target = record.target();
        if !(target.starts_with("pingora") && record.level() <= Level::Warn) {
            return self.inner.log(record);
        }
        match self.admit(target, Instant::now()) {
            Admit::Yes { left_out } => {
                if left_out > 0 {
                    self.note(record.level(), target, format_args!("{left_out} more lines like the ones above were left out in {}s (a flood of failing connections?)", WINDOW.as_secs()));
                }
                self.inner.log(record);
            }
            Admit::Last => {
                self.inner.log(record);
                self.note(record.level(), target, format_args!("{PER_WINDOW} lines in {}s: the next ones are counted, not written, until the window ends", WINDOW.as_secs()));
            }
            Admit::No => {}
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_gets_a_few_lines_a_window_and_the_rest_are_counted() {
        let l = Limited {
            inner: env_logger::Builder::new().build(),
            windows: Mutex::new(HashMap::new()),
        };
        let t0 = Instant::now();
        let seen: Vec<Admit> = (0..PER_WINDOW + 5)
            .map(|_| l.admit("pingora_core::apps", t0))
            .collect();
        assert!(seen[..PER_WINDOW as usize - 1]
            .iter()
            .all(|a| *a == Admit::Yes { left_out: 0 }));
        assert_eq!(seen[PER_WINDOW as usize - 1], Admit::Last);
        assert!(seen[PER_WINDOW as usize..].iter().all(|a| *a == Admit::No));
        // Another target has its own window.
        assert_eq!(
            l.admit("pingora_core::services", t0),
            Admit::Yes { left_out: 0 }
        );
        // The next window starts with the count of what was left out.
        assert_eq!(
            l.admit("pingora_core::apps", t0 + WINDOW),
            Admit::Yes { left_out: 5 }
        );
        assert_eq!(
            l.admit("pingora_core::apps", t0 + WINDOW),
            Admit::Yes { left_out: 0 }
        );
    }
}
