//! Where limiter state lives. The filter only sees [`LimitStore`], so a shared store (Redis,
//! for several replicas) can replace [`LocalStore`] later.
//!
//! `LocalStore` keeps three sharded maps keyed by a 64-bit hash of the limiter key. Each shard
//! is a mutex held for a few map operations and never across an await; there is no global
//! lock. Memory is bounded: a shard at capacity first drops entries that carry no state any
//! more (a TAT in the past, an ended or empty token window), then, under a flood of live
//! keys, the entry nearest a fresh one (the earliest TAT, the fewest tokens) — which can only
//! make the limiter more lenient for that key, never stricter.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::rate::{gcra, Gcra};

pub trait LimitStore: Send + Sync {
    /// One GCRA step for `key` (see [`gcra`]).
    fn check_rate(&self, key: u64, now_ns: u64, t: u64, burst: u64) -> Gcra;
    /// Gives back at `now_ns` one request counted by `check_rate` with interval `t`, which set
    /// the TAT to `counted_tat` (its verdict was never applied: an earlier check refused the
    /// request). Nothing once that TAT has passed: the count weighs on nothing any more.
    fn undo_rate(&self, key: u64, t: u64, counted_tat: u64, now_ns: u64);
    /// Remembers at `now_ns` that shared state refuses `key`'s rate until `until_ns`.
    fn refuse_until(&self, key: u64, now_ns: u64, until_ns: u64);
    /// How much longer `key` is known refused at `now_ns` (see [`LimitStore::refuse_until`]).
    fn refused_for(&self, key: u64, now_ns: u64) -> Option<u64>;
    /// Takes an in-flight slot when fewer than `max` are taken.
    fn acquire(&self, key: u64, max: u32) -> bool;
    fn release(&self, key: u64);
    /// Takes `n` tokens in `key`'s current window if they fit under `limit`, in one step (so
    /// concurrent requests cannot all fit into the same room).
    fn reserve_tokens(
        &self,
        key: u64,
        now_ns: u64,
        window_ns: u64,
        n: u64,
        limit: u64,
    ) -> TokenCheck;
    /// Replaces a reservation by what was really used: in the window it was taken from
    /// (`start_ns`), or added to the current one when that window has ended.
    fn settle_tokens(
        &self,
        key: u64,
        now_ns: u64,
        window_ns: u64,
        start_ns: u64,
        reserved: u64,
        used: u64,
    );
}

/// The outcome of a token reservation: the window's tokens after it (or as they are, when
/// refused), when the window started and how long it still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCheck {
    pub taken: bool,
    pub used: u64,
    pub start_ns: u64,
    pub left_ns: u64,
}

const SHARDS: usize = 64;

struct Sharded<V> {
    shards: Vec<Mutex<HashMap<u64, V>>>,
    per_shard: usize,
}

impl<V> Sharded<V> {
    fn new(capacity: usize) -> Self {
        Sharded {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: (capacity / SHARDS).max(16),
        }
    }

    /// Runs `f` on `key`'s shard; `stale` says which entries may be dropped when it is full,
    /// and when none is, the one of least `weight` goes (the state nearest a fresh one: a
    /// flood of new keys drops its own small entries before a key's spent window, which an
    /// arbitrary choice handed back whole: one key naming 2,000 made-up models reset its
    /// tokens per minute).
    fn with<R>(
        &self,
        key: u64,
        stale: impl Fn(&V) -> bool,
        weight: impl Fn(&V) -> u64,
        f: impl FnOnce(&mut HashMap<u64, V>) -> R,
    ) -> R {
        let mut map = self.shard(key);
        if !Self::room(&mut map, self.per_shard, key, stale) {
            if let Some(victim) = map.iter().min_by_key(|(_, v)| weight(v)).map(|(&k, _)| k) {
                map.remove(&victim);
            }
        }
        f(&mut map)
    }

    /// Like [`Sharded::with`], for entries that must not go while live (in-flight counts: an
    /// evicted count starts again at 0, and its key gets its whole cap again): when `key`'s
    /// shard is full of live entries and `key` is not among them, `full` is the answer.
    fn with_live<R>(
        &self,
        key: u64,
        stale: impl Fn(&V) -> bool,
        full: R,
        f: impl FnOnce(&mut HashMap<u64, V>) -> R,
    ) -> R {
        let mut map = self.shard(key);
        if !Self::room(&mut map, self.per_shard, key, stale) {
            return full;
        }
        f(&mut map)
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, HashMap<u64, V>> {
        let shard = &self.shards[(key as usize) % SHARDS];
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `key` has (or, with stale entries dropped, now has) its place in `map`.
    fn room(
        map: &mut HashMap<u64, V>,
        per_shard: usize,
        key: u64,
        stale: impl Fn(&V) -> bool,
    ) -> bool {
        if map.len() < per_shard || map.contains_key(&key) {
            return true;
        }
        map.retain(|_, v| !stale(v));
        map.len() < per_shard
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |m| m.len()))
            .sum()
    }
}

pub struct LocalStore {
    tat: Sharded<u64>,
    /// Until when shared state refuses a key (its refusals seen by this replica).
    refused: Sharded<u64>,
    in_flight: Sharded<u32>,
    /// (window start, tokens used)
    tokens: Sharded<(u64, u64)>,
}

impl LocalStore {
    /// `capacity`: most keys tracked per kind of limit.
    pub fn new(capacity: usize) -> Self {
        LocalStore {
            tat: Sharded::new(capacity),
            refused: Sharded::new(capacity),
            in_flight: Sharded::new(capacity),
            tokens: Sharded::new(capacity),
        }
    }

    /// Keys currently tracked (all kinds), for tests and metrics.
    pub fn tracked(&self) -> usize {
        self.tat.len() + self.refused.len() + self.in_flight.len() + self.tokens.len()
    }
}

impl LimitStore for LocalStore {
    fn check_rate(&self, key: u64, now_ns: u64, t: u64, burst: u64) -> Gcra {
        self.tat.with(
            key,
            |&tat| tat <= now_ns,
            |&tat| tat,
            |m| {
                let tat = m.get(&key).copied().unwrap_or(0);
                let (new_tat, g) = gcra(tat, now_ns, t, burst);
                // A refusal keeps the TAT, unless a faster rate brought it nearer.
                if matches!(g, Gcra::Allow { .. }) || new_tat != tat {
                    m.insert(key, new_tat);
                }
                g
            },
        )
    }

    fn undo_rate(&self, key: u64, t: u64, counted_tat: u64, now_ns: u64) {
        if counted_tat <= now_ns {
            return;
        }
        // Only a key still tracked: never the insert path, which may evict another key.
        let shard = &self.tat.shards[(key as usize) % SHARDS];
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tat) = map.get_mut(&key) {
            // A TAT in the past counts as now: taking `t` off one never goes below that.
            *tat = tat.saturating_sub(t);
        }
    }

    fn refuse_until(&self, key: u64, now_ns: u64, until_ns: u64) {
        self.refused.with(
            key,
            |&until| until <= now_ns,
            |&until| until,
            |m| {
                let e = m.entry(key).or_insert(0);
                *e = (*e).max(until_ns);
            },
        );
    }

    fn refused_for(&self, key: u64, now_ns: u64) -> Option<u64> {
        let shard = &self.refused.shards[(key as usize) % SHARDS];
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        let until = *map.get(&key)?;
        if until > now_ns {
            return Some(until - now_ns);
        }
        map.remove(&key);
        None
    }

    fn acquire(&self, key: u64, max: u32) -> bool {
        // Live slots are never evicted: with every place of its shard taken by keys with
        // requests running, a new key is refused (as over its cap) until one ends.
        self.in_flight.with_live(
            key,
            |&n| n == 0,
            false,
            |m| {
                let n = m.entry(key).or_insert(0);
                if *n >= max {
                    return false;
                }
                *n += 1;
                true
            },
        )
    }

    fn release(&self, key: u64) {
        self.in_flight.with_live(
            key,
            |&n| n == 0,
            (),
            |m| {
                if let Some(n) = m.get_mut(&key) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        m.remove(&key);
                    }
                }
            },
        )
    }

    fn reserve_tokens(
        &self,
        key: u64,
        now_ns: u64,
        window_ns: u64,
        n: u64,
        limit: u64,
    ) -> TokenCheck {
        self.tokens.with(
            key,
            // An ended window, or one nothing is held in (given back: a request no backend
            // got), carries no state.
            |&(start, used)| used == 0 || now_ns >= start + window_ns,
            |&(_, used)| used,
            |m| {
                let e = m.entry(key).or_insert((now_ns, 0));
                if now_ns >= e.0 + window_ns {
                    *e = (now_ns, 0);
                }
                let taken = e.1.saturating_add(n) <= limit;
                if taken {
                    e.1 += n;
                }
                TokenCheck {
                    taken,
                    used: e.1,
                    start_ns: e.0,
                    left_ns: e.0 + window_ns - now_ns,
                }
            },
        )
    }

    fn settle_tokens(
        &self,
        key: u64,
        now_ns: u64,
        window_ns: u64,
        start_ns: u64,
        reserved: u64,
        used: u64,
    ) {
        self.tokens.with(
            key,
            // An ended window, or one nothing is held in (given back: a request no backend
            // got), carries no state.
            |&(start, used)| used == 0 || now_ns >= start + window_ns,
            |&(_, used)| used,
            |m| {
                let e = m.entry(key).or_insert((now_ns, 0));
                if now_ns >= e.0 + window_ns {
                    *e = (now_ns, 0);
                }
                if e.0 == start_ns {
                    e.1 = e.1.saturating_sub(reserved).saturating_add(used);
                } else {
                    e.1 = e.1.saturating_add(used);
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_million_addresses_do_not_grow_memory() {
        let s = LocalStore::new(10_000);
        let t = 1_000_000; // 1000/s
        for i in 0..1_000_000u64 {
            let key = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            assert!(matches!(
                s.check_rate(key, i * 10, t, 5),
                Gcra::Allow { .. }
            ));
            s.reserve_tokens(key, i * 10, 60_000_000_000, 1, 10);
        }
        let tracked = s.tracked();
        assert!(tracked <= 2 * 10_000 + 2 * SHARDS * 16, "{tracked} entries");
    }

    #[test]
    fn a_running_request_s_slot_is_never_forgotten_to_make_room() {
        // 16 places a shard at the least: fill one shard with keys that hold a slot each.
        let s = LocalStore::new(16 * SHARDS);
        let keys: Vec<u64> = (0..17).map(|i| i * SHARDS as u64).collect();
        for &k in &keys[..16] {
            assert!(s.acquire(k, 1));
        }
        // A 17th key finds no room: refused, not given the place of a running request.
        assert!(!s.acquire(keys[16], 1));
        // Every running key still holds its slot (an evicted one would get it again).
        for &k in &keys[..16] {
            assert!(!s.acquire(k, 1), "key {k} was forgotten");
        }
        // A release of an absent key evicts nobody; a real one makes room.
        s.release(keys[16]);
        assert!(!s.acquire(keys[0], 1));
        s.release(keys[0]);
        assert!(s.acquire(keys[16], 1));
    }

    // Billing review: one key naming made-up models (a bucket each, `api_key+model`) evicted
    // its real model's spent window, and got its tokens per minute again.
    #[test]
    fn a_flood_of_new_keys_drops_its_own_entries_before_a_spent_window() {
        let s = LocalStore::new(16 * SHARDS); // 16 places a shard
        let (w, limit) = (60_000_000_000, 1000);
        let real = 5 * SHARDS as u64;
        assert!(s.reserve_tokens(real, 0, w, 918, limit).taken);
        for i in 1..2000u64 {
            // Same shard; each reserves, and is given back (the router found no such model).
            let key = real + i * SHARDS as u64;
            let c = s.reserve_tokens(key, i, w, 50, limit);
            s.settle_tokens(key, i, w, c.start_ns, 50, 0);
        }
        // Still live, and nearly spent.
        let c = s.reserve_tokens(real, 3000, w, 100, limit);
        assert!(!c.taken, "{c:?}");
        assert_eq!(c.used, 918);
        // Live entries that hold tokens: the smallest goes first, not the spent window.
        for i in 1..200u64 {
            let key = real + (5000 + i) * SHARDS as u64;
            assert!(s.reserve_tokens(key, 4000, w, 10, limit).taken);
        }
        assert_eq!(s.reserve_tokens(real, 5000, w, 100, limit).used, 918);
    }

    #[test]
    fn a_request_given_back_leaves_the_rate_as_if_it_never_came() {
        let s = LocalStore::new(100);
        let t = 1_000_000_000; // 1/s, burst 1: two quick requests pass
        let now = 10 * t;
        let counted = |g: Gcra| match g {
            Gcra::Allow { reset_ns, .. } => now + reset_ns,
            Gcra::Deny { .. } => panic!("refused"),
        };
        counted(s.check_rate(1, now, t, 1));
        let second = counted(s.check_rate(1, now, t, 1));
        assert!(matches!(s.check_rate(1, now, t, 1), Gcra::Deny { .. }));
        s.undo_rate(1, t, second, now + 1);
        let again = counted(s.check_rate(1, now, t, 1));
        assert!(matches!(s.check_rate(1, now, t, 1), Gcra::Deny { .. }));
        // Given back once its TAT has passed: the bucket has started afresh, and the counts
        // made since stay.
        let later = now + 100 * t;
        counted(s.check_rate(1, later, t, 1));
        s.undo_rate(1, t, again, later + 1);
        counted(s.check_rate(1, later, t, 1));
        assert!(matches!(s.check_rate(1, later, t, 1), Gcra::Deny { .. }));
        s.undo_rate(2, t, later + t, later);
        assert_eq!(s.tracked(), 1, "an unknown key is not added");
    }

    #[test]
    fn giving_back_a_key_no_longer_tracked_evicts_nothing() {
        let s = LocalStore::new(0); // 16 keys a shard
        let t = 1_000_000_000;
        let shard_keys: Vec<u64> = (0..16).map(|i| i * SHARDS as u64).collect();
        for &k in &shard_keys {
            assert!(matches!(s.check_rate(k, t, t, 0), Gcra::Allow { .. }));
        }
        s.undo_rate(16 * SHARDS as u64, t, 3 * t, t);
        for &k in &shard_keys {
            assert!(
                matches!(s.check_rate(k, t, t, 0), Gcra::Deny { .. }),
                "key {k} was evicted"
            );
        }
    }

    #[test]
    fn a_refusal_is_known_until_its_retry_time() {
        let s = LocalStore::new(100);
        assert_eq!(s.refused_for(1, 0), None);
        s.refuse_until(1, 1_000, 5_000);
        s.refuse_until(1, 2_000, 3_000);
        assert_eq!(
            s.refused_for(1, 2_000),
            Some(3_000),
            "the later time stands"
        );
        assert_eq!(s.refused_for(2, 2_000), None, "another key");
        assert_eq!(s.refused_for(1, 5_000), None);
        assert_eq!(s.tracked(), 0, "an ended refusal is forgotten");
    }

    #[test]
    fn in_flight_slots() {
        let s = LocalStore::new(100);
        assert!(s.acquire(1, 2) && s.acquire(1, 2));
        assert!(!s.acquire(1, 2));
        assert!(s.acquire(2, 2), "another key is independent");
        s.release(1);
        assert!(s.acquire(1, 2));
        s.release(1);
        s.release(1);
        s.release(2);
        assert_eq!(s.tracked(), 0, "released keys leave nothing behind");
    }

    #[test]
    fn token_windows_reserve_then_settle() {
        let s = LocalStore::new(100);
        let w = 60_000;
        let a = s.reserve_tokens(7, 1_000, w, 40, 100);
        assert_eq!((a.taken, a.used, a.left_ns), (true, 40, w));
        let b = s.reserve_tokens(7, 2_000, w, 50, 100);
        assert_eq!((b.taken, b.used), (true, 90));
        // A third cannot fit while the first two are held, however close together they come.
        let c = s.reserve_tokens(7, 2_500, w, 20, 100);
        assert_eq!((c.taken, c.used), (false, 90));
        // The first used only 5 of its 40: room for the third.
        s.settle_tokens(7, 3_000, w, a.start_ns, 40, 5);
        assert!(s.reserve_tokens(7, 3_500, w, 20, 100).taken);
        // A settlement after its window ended counts in the current one.
        assert_eq!(
            s.reserve_tokens(7, 61_000, w, 0, 100).used,
            0,
            "the window moved on"
        );
        s.settle_tokens(7, 61_500, w, a.start_ns, 50, 7);
        assert_eq!(s.reserve_tokens(7, 62_000, w, 0, 100).used, 7);
    }
}
