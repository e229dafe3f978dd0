//! Draining a filter's queue on a writer thread of its own, in batches on a short timer.
//!
//! A receiver that waits on its queue is woken for every message: a futex call on the proxy
//! thread that sent it, and a context switch on a core the proxy shares, per request. Drained
//! on a timer instead, nothing crosses threads per request.

use std::time::Duration;

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::Receiver;

/// The wait between batches right after messages came; it doubles while none come, up to
/// [`BATCH_WAIT_MAX`], the longest a message waits to be handled.
pub const BATCH_WAIT_MIN: Duration = Duration::from_millis(5);
pub const BATCH_WAIT_MAX: Duration = Duration::from_millis(100);

/// Hands `on_batch` what was queued since its last call (possibly nothing: it is also the
/// writer's clock) until every sender is gone; the last batch comes after that. Blocks: run it
/// on the writer's own thread.
pub fn drain_in_batches<T>(mut rx: Receiver<T>, mut on_batch: impl FnMut(&mut Vec<T>)) {
    let mut batch = Vec::new();
    let mut wait = BATCH_WAIT_MIN;
    loop {
        let closed = loop {
            match rx.try_recv() {
                Ok(msg) => batch.push(msg),
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        wait = if batch.is_empty() {
            (wait * 2).min(BATCH_WAIT_MAX)
        } else {
            BATCH_WAIT_MIN
        };
        on_batch(&mut batch);
        batch.clear();
        if closed {
            return;
        }
        std::thread::sleep(wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message is handed over, in order, the last ones after the senders are gone.
    #[test]
    fn every_message_in_order_then_done() {
        let (tx, rx) = tokio::sync::mpsc::channel(100);
        let writer = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut calls = 0;
            drain_in_batches(rx, |b| {
                calls += 1;
                seen.append(b);
            });
            (seen, calls)
        });
        for i in 0..50 {
            tx.blocking_send(i).unwrap();
        }
        std::thread::sleep(Duration::from_millis(30));
        for i in 50..60 {
            tx.blocking_send(i).unwrap();
        }
        drop(tx);
        let (seen, calls) = writer.join().unwrap();
        assert_eq!(seen, (0..60).collect::<Vec<_>>());
        assert!(calls < 30, "batched, not one call per message: {calls}");
    }
}
