//! Request-rate allowance a replica took from shared state ahead of its requests.
//!
//! A busy address or key under a fast rate (an address limit of thousands of requests a
//! second) would otherwise cost Redis one script per request, before authentication. When
//! the shared bucket has plenty of room, the script grants a batch of requests at once; the
//! replica serves the next ones of that batch itself, for at most [`SPARE_FOR`]. Near the
//! limit (less than [`ROOM_FACTOR`] batches of room) every request asks, so small bursts
//! stay exact across replicas (`rate: 10/m, burst: 5`: 6 quick requests in all). What a
//! batch took and no request used is never given back: batches are only taken when their
//! whole span of the rate (`batch × interval`, for all the batches a replica has asked for
//! and not yet received) fits in [`SPARE_FOR`], so it is free again by then anyway. The only error is strictness: while a replica holds unused slots, another
//! replica near the limit may refuse up to `batch` requests per replica that would have
//! passed, for at most [`SPARE_FOR`]. No request passes that the shared bucket did not count.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a replica serves slots of a batch.
pub const SPARE_FOR: Duration = Duration::from_millis(50);
/// Batches are taken only while this many batches of requests could still pass.
pub const ROOM_FACTOR: u64 = 4;

/// The slots left of one key's batches.
struct Spare {
    left: u32,
    until: Instant,
    /// The last batch's answer: requests that could still pass, µs until the bucket is full.
    remaining: i64,
    reset_us: i64,
    /// Batches asked for and not answered yet.
    fetching: u32,
}

/// What a request does about the rate.
#[derive(Debug, PartialEq, Eq)]
pub enum Take {
    /// Served from a batch: `{remaining, reset µs}` as the batch's answer said.
    Slot(i64, i64),
    /// Ask shared state for a batch, and [`Spares::put`] what it grants (also nothing).
    Fetch,
    /// Ask shared state for this request alone (the batches on their way already span
    /// [`SPARE_FOR`] of the rate).
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

    /// `span_ns`: how much of the rate one batch spans (batch × interval). Several requests
    /// may fetch at once (under load a fetch takes a round trip, and each request waiting for
    /// another's batch would wait as long), as long as all batches on their way together span
    /// at most [`SPARE_FOR`].
    pub fn take(&self, key: &str, now: Instant, span_ns: u64) -> Take {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if !m.contains_key(key) && m.len() >= self.cap {
            m.retain(|_, s| s.until > now || s.fetching > 0);
            if m.len() >= self.cap {
                return Take::Single;
            }
        }
        let s = m.entry(key.to_string()).or_insert(Spare {
            left: 0,
            until: now,
            remaining: 0,
            reset_us: 0,
            fetching: 0,
        });
        if s.until <= now {
            s.left = 0;
        }
        if s.left > 0 {
            s.left -= 1;
            return Take::Slot(s.remaining, s.reset_us);
        }
        let spans = u64::from(s.fetching + 1).saturating_mul(span_ns);
        if spans <= SPARE_FOR.as_nanos() as u64 {
            s.fetching += 1;
            return Take::Fetch;
        }
        Take::Single
    }

    /// What a fetch got: `taken` slots in all (the fetching request used one), or nothing
    /// (refused, failed, a single slot, the request went away).
    pub fn put(&self, key: &str, taken: i64, remaining: i64, reset_us: i64, now: Instant) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = m.get_mut(key) {
            s.fetching = s.fetching.saturating_sub(1);
            let spare = u32::try_from(taken.saturating_sub(1)).unwrap_or(0);
            if spare > 0 {
                if s.until <= now {
                    s.left = 0;
                }
                s.left = s.left.saturating_add(spare);
                s.until = now + SPARE_FOR;
                s.remaining = remaining;
                s.reset_us = reset_us;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPAN: u64 = 16_000; // 16 slots of 1 µs

    #[test]
    fn a_batch_serves_its_slots_then_the_next_is_fetched() {
        let s = Spares::new(10);
        let t = Instant::now();
        assert_eq!(s.take("k", t, SPAN), Take::Fetch);
        // Others fetch too while the first batch is on its way (its span is small).
        assert_eq!(s.take("k", t, SPAN), Take::Fetch);
        s.put("k", 3, 90, 40, t);
        s.put("k", 1, 2, 40, t);
        assert_eq!(s.take("k", t, SPAN), Take::Slot(90, 40));
        assert_eq!(s.take("k", t, SPAN), Take::Slot(90, 40));
        assert_eq!(s.take("k", t, SPAN), Take::Fetch);
    }

    #[test]
    fn batches_on_their_way_span_at_most_the_serving_time() {
        let s = Spares::new(10);
        let t = Instant::now();
        let span = SPARE_FOR.as_nanos() as u64 / 2;
        assert_eq!(s.take("k", t, span), Take::Fetch);
        assert_eq!(s.take("k", t, span), Take::Fetch);
        assert_eq!(s.take("k", t, span), Take::Single);
        // An answer (or a request gone without one) makes room for the next fetch.
        s.put("k", 0, 0, 0, t);
        assert_eq!(s.take("k", t, span), Take::Fetch);
    }

    #[test]
    fn slots_expire() {
        let s = Spares::new(10);
        let t = Instant::now();
        assert_eq!(s.take("k", t, SPAN), Take::Fetch);
        s.put("k", 16, 90, 40, t);
        assert_eq!(s.take("k", t + SPARE_FOR, SPAN), Take::Fetch);
    }

    #[test]
    fn keys_are_bounded() {
        let s = Spares::new(2);
        let t = Instant::now();
        assert_eq!(s.take("a", t, SPAN), Take::Fetch);
        assert_eq!(s.take("b", t, SPAN), Take::Fetch);
        assert_eq!(s.take("c", t, SPAN), Take::Single);
        s.put("a", 0, 0, 0, t);
        s.put("b", 4, 0, 0, t);
        // Once the others have nothing on its way or left, their places are reused.
        assert_eq!(s.take("c", t + SPARE_FOR * 2, SPAN), Take::Fetch);
    }
}
