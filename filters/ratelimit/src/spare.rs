//! Request-rate allowance a replica took from shared state ahead of its requests.
//!
//! A busy address or key under a fast rate (an address limit of thousands of requests a
//! second) would otherwise cost Redis one script per request, before authentication. When
//! the shared bucket has plenty of room, the script grants a batch of requests at once; the
//! replica serves the next ones of that batch itself, for at most [`SPARE_FOR`]. Near the
//! limit (less than [`ROOM_FACTOR`] batches of room) every request asks, so small bursts
//! stay exact across replicas (`rate: 10/m, burst: 5`: 6 quick requests in all). What a
//! batch took and no request used is never given back: batches are only taken when their
//! whole span of the rate (`batch × interval`) fits in [`SPARE_FOR`], so it is free again
//! by then anyway. The only error is strictness: while a replica holds unused slots, another
//! replica near the limit may refuse up to `batch` requests per replica that would have
//! passed, for at most [`SPARE_FOR`]. No request passes that the shared bucket did not count.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a replica serves slots of a batch.
pub const SPARE_FOR: Duration = Duration::from_millis(50);
/// Batches are taken only while this many batches of requests could still pass.
pub const ROOM_FACTOR: u64 = 4;

/// The slots left of one key's batch.
struct Spare {
    left: u32,
    until: Instant,
    /// The batch's answer: requests that could still pass, µs until the bucket is full.
    remaining: i64,
    reset_us: i64,
    /// A request is asking for the next batch since then (one at a time per key).
    fetching: Option<Instant>,
}

/// What a request does about the rate.
#[derive(Debug, PartialEq, Eq)]
pub enum Take {
    /// Served from a batch: `{remaining, reset µs}` as the batch's answer said.
    Slot(i64, i64),
    /// Ask shared state for a batch, and [`Spares::put`] what it grants.
    Fetch,
    /// Ask shared state for this request alone (another request is fetching a batch).
    Single,
}

/// Batches per key, at most `cap` keys.
pub struct Spares {
    map: Mutex<HashMap<String, Spare>>,
    cap: usize,
}

impl Spares {
    pub fn new(cap: usize) -> Spares {
        Spares {
            map: Mutex::new(HashMap::new()),
            cap,
        }
    }

    pub fn take(&self, key: &str, now: Instant) -> Take {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = m.get_mut(key) {
            if s.left > 0 && s.until > now {
                s.left -= 1;
                return Take::Slot(s.remaining, s.reset_us);
            }
            if s.fetching
                .is_some_and(|t| now.saturating_duration_since(t) < SPARE_FOR)
            {
                return Take::Single;
            }
            s.left = 0;
            s.fetching = Some(now);
            return Take::Fetch;
        }
        if m.len() >= self.cap {
            m.retain(|_, s| {
                s.until > now
                    || s.fetching
                        .is_some_and(|t| now.saturating_duration_since(t) < SPARE_FOR)
            });
            if m.len() >= self.cap {
                return Take::Single;
            }
        }
        m.insert(
            key.to_string(),
            Spare {
                left: 0,
                until: now,
                remaining: 0,
                reset_us: 0,
                fetching: Some(now),
            },
        );
        Take::Fetch
    }

    /// What a fetch got: `taken` slots in all (the fetching request used one), or nothing
    /// (refused, failed, a single slot).
    pub fn put(&self, key: &str, taken: i64, remaining: i64, reset_us: i64, now: Instant) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = m.get_mut(key) {
            s.fetching = None;
            s.left = u32::try_from(taken.saturating_sub(1)).unwrap_or(0);
            s.until = now + SPARE_FOR;
            s.remaining = remaining;
            s.reset_us = reset_us;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_serves_its_slots_then_the_next_is_fetched_once() {
        let s = Spares::new(10);
        let t = Instant::now();
        assert_eq!(s.take("k", t), Take::Fetch);
        // Others ask alone while the batch is on its way.
        assert_eq!(s.take("k", t), Take::Single);
        s.put("k", 3, 90, 40, t);
        assert_eq!(s.take("k", t), Take::Slot(90, 40));
        assert_eq!(s.take("k", t), Take::Slot(90, 40));
        assert_eq!(s.take("k", t), Take::Fetch);
        assert_eq!(s.take("k", t), Take::Single);
        // A fetch that got one slot (near the limit) leaves none.
        s.put("k", 1, 2, 40, t);
        assert_eq!(s.take("k", t), Take::Fetch);
    }

    #[test]
    fn slots_expire_and_a_stuck_fetch_is_retried() {
        let s = Spares::new(10);
        let t = Instant::now();
        assert_eq!(s.take("k", t), Take::Fetch);
        s.put("k", 16, 90, 40, t);
        assert_eq!(s.take("k", t + SPARE_FOR), Take::Fetch);
        // The fetching request went away without an answer.
        assert_eq!(s.take("k", t + SPARE_FOR * 3), Take::Fetch);
    }

    #[test]
    fn keys_are_bounded() {
        let s = Spares::new(2);
        let t = Instant::now();
        assert_eq!(s.take("a", t), Take::Fetch);
        assert_eq!(s.take("b", t), Take::Fetch);
        assert_eq!(s.take("c", t), Take::Single);
        // Once the others' batches are over, their places are reused.
        assert_eq!(s.take("c", t + SPARE_FOR * 2), Take::Fetch);
    }
}
