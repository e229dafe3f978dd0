//! Logging a failure that repeats (a full disk under the audit log or the ledger) as a state,
//! not once per attempt: its first line says what fails and why, then at most one line every
//! [`REPEAT_EVERY`] with how many more failed, and one line when it works again. A line per
//! write batch (hundreds a second) filled the log, often on the very disk that was full.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// How often a failure that goes on is said again.
pub const REPEAT_EVERY: Duration = Duration::from_secs(10);

/// One thing that can fail again and again, named in its lines (`audit: writing
/// /var/log/llm-gateway/audit.jsonl`). Owned by the one thread that does it.
#[derive(Debug)]
pub struct FailureLog {
    what: String,
    /// Since when it fails, failures since the last line, when that line was written.
    failing: Option<(Instant, u64, Instant)>,
}

impl FailureLog {
    pub fn new(what: impl Into<String>) -> FailureLog {
        FailureLog {
            what: what.into(),
            failing: None,
        }
    }

    /// One more failure, with why.
    pub fn failed(&mut self, why: impl Display) {
        let now = Instant::now();
        match &mut self.failing {
            None => {
                log::error!("{} failed: {why}", self.what);
                self.failing = Some((now, 0, now));
            }
            Some((since, more, said)) => {
                *more += 1;
                if now.duration_since(*said) >= REPEAT_EVERY {
                    log::error!(
                        "{} still failing ({} more failures in {}s, failing for {}s): {why}",
                        self.what,
                        more,
                        now.duration_since(*said).as_secs(),
                        now.duration_since(*since).as_secs()
                    );
                    *more = 0;
                    *said = now;
                }
            }
        }
    }

    /// It worked: said once after failures.
    pub fn worked(&mut self) {
        if let Some((since, _, _)) = self.failing.take() {
            log::warn!(
                "{} works again after failing for {}s",
                self.what,
                since.elapsed().as_secs()
            );
        }
    }

    /// Whether it is failing now.
    pub fn is_failing(&self) -> bool {
        self.failing.is_some()
    }
}

/// At exit (the thread ends): failures not yet said are said.
impl Drop for FailureLog {
    fn drop(&mut self) {
        if let Some((since, more, _)) = self.failing {
            if more > 0 {
                log::error!(
                    "{} was still failing at exit ({more} more failures, failing for {}s)",
                    self.what,
                    since.elapsed().as_secs()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_failure_is_a_state() {
        let mut f = FailureLog::new("audit: writing x");
        assert!(!f.is_failing());
        for _ in 0..500 {
            f.failed("No space left on device");
        }
        assert!(f.is_failing());
        let Some((_, more, _)) = f.failing else {
            panic!("failing")
        };
        assert_eq!(more, 499, "counted, not written");
        f.worked();
        assert!(!f.is_failing());
    }
}
