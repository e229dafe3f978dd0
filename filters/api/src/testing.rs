//! A [`SharedState`] for the filter crates' tests (feature `testing`): answers given in turn,
//! calls counted, detached calls recorded by script name.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::state::{Arg, Keep, Renewal, Script, SharedState, StateError};

#[derive(Default)]
pub struct FakeState {
    /// What `run` answers, in turn; `[0]` once they are used up.
    pub answers: Mutex<VecDeque<Result<Vec<i64>, StateError>>>,
    /// What `run_text` answers, after `text_delay`.
    pub text: Mutex<Vec<String>>,
    pub text_delay: Duration,
    /// Calls of `run` and of `run_text`.
    pub runs: AtomicUsize,
    pub text_reads: AtomicUsize,
    /// Scripts sent detached (or undone), by name.
    pub detached: Mutex<Vec<&'static str>>,
    /// What `subscribe` answers as its generation (0: not subscribed).
    pub generation: u64,
    /// What `chunk` answers.
    pub chunk: Option<crate::chunk::ChunkSpec>,
    /// The scripts `run` was asked to run, by name.
    pub ran: Mutex<Vec<&'static str>>,
}

#[async_trait]
impl SharedState for FakeState {
    async fn run(
        &self,
        script: &'static Script,
        _: &[&str],
        _: &[Arg<'_>],
    ) -> Result<Vec<i64>, StateError> {
        self.runs.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut r) = self.ran.lock() {
            r.push(script.name);
        }
        let next = self.answers.lock().map(|mut a| a.pop_front());
        next.ok().flatten().unwrap_or(Ok(vec![0]))
    }

    async fn run_text(
        &self,
        _: &'static Script,
        _: &[&str],
        _: &[Arg<'_>],
    ) -> Result<Vec<String>, StateError> {
        self.text_reads.fetch_add(1, Ordering::AcqRel);
        tokio::time::sleep(self.text_delay).await;
        Ok(self.text.lock().map(|t| t.clone()).unwrap_or_default())
    }

    fn run_detached(&self, script: &'static Script, _: Vec<String>, _: Vec<String>) {
        if let Ok(mut d) = self.detached.lock() {
            d.push(script.name);
        }
    }

    fn undo(&self, script: &'static Script, keys: Vec<String>, args: Vec<String>) {
        self.run_detached(script, keys, args);
    }

    fn key(&self, kind: &[&str], tag: &[&str]) -> String {
        format!("{}{{{}}}", kind.concat(), tag.concat())
    }

    fn member(&self) -> String {
        "m".into()
    }

    fn lease_ms(&self) -> u64 {
        1000
    }

    fn chunk(&self) -> Option<crate::chunk::ChunkSpec> {
        self.chunk
    }

    fn keep(&self, _: Renewal) -> Keep {
        Keep::new(|| {})
    }

    fn fail_closed(&self) -> bool {
        false
    }

    fn degraded(&self) -> bool {
        false
    }

    fn subscribe(&self, _: &str, _: Box<dyn Fn(&str) + Send + Sync>) -> Arc<AtomicU64> {
        Arc::new(AtomicU64::new(self.generation))
    }

    fn channel(&self, channel: &str) -> String {
        channel.into()
    }

    fn on_reset(&self, _: Box<dyn Fn() + Send + Sync>) {}
}
