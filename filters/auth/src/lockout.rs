//! Brute-force lockout: failed authentications counted per client network in fixed windows,
//! exactly, for at most `slots` networks at once (a flood of addresses cannot grow memory).
//! Past that, a newly failing address is counted with its wider network (IPv4 /16, IPv6 /48),
//! for at most `slots` such networks more: an attacker who fills the table from one /48 (an
//! IPv6 /48 holds 65,536 /64s) still meets the limit there, and only addresses of its own
//! networks that are not counted by themselves share its lock. Past both, an address goes
//! uncounted (its requests the address limits still bound).
//!
//! A check that takes time (a password hash, a validator's answer) is counted while it runs
//! ([`Lockout::attempt`]): an address's failures and checks under way together stay within
//! `max_failures`, further checks waiting their turn, so guesses sent in parallel meet the
//! limit as guesses sent one after another do. Checks under way never lock an address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use gateway_filter::{Rejection, SharedState};

use crate::lockout_shared::SharedLockout;

pub struct Lockout {
    /// Where the windows begin.
    epoch: Instant,
    /// Failures and checks under way of every such address in its window.
    exact: Mutex<ExactCounts>,
    /// The latest window (plus one) in which an address reached `max_failures`: before any
    /// has in the current window, nobody is locked and the check takes no lock.
    hot: AtomicU64,
    slots: usize,
    max_failures: u32,
    pub window: Duration,
    /// Counts shared by every replica; this replica's own stay the fallback (and count too).
    shared: Option<SharedLockout>,
}

/// One address in one window.
#[derive(Clone, Copy)]
struct Count {
    window: u64,
    failures: u32,
    under_way: u32,
}

/// Counts per address, per wider network for addresses counted when the first map was full,
/// and the window the maps were last purged in.
#[derive(Default)]
struct ExactCounts {
    counts: HashMap<IpAddr, Count>,
    networks: HashMap<IpAddr, Count>,
    purged: Option<u64>,
}

/// Where an address's count is kept.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Slot {
    Own(IpAddr),
    /// With its wider network ([`network`]): the address's own count had no room.
    Network(IpAddr),
}

impl ExactCounts {
    /// The map a slot's count is kept in, and its key there.
    fn map(&mut self, slot: Slot) -> (&mut HashMap<IpAddr, Count>, IpAddr) {
        match slot {
            Slot::Own(ip) => (&mut self.counts, ip),
            Slot::Network(net) => (&mut self.networks, net),
        }
    }
}

/// The network an address is counted with when the table has no room for it by itself:
/// IPv4 /16, IPv6 /48 (a site's allocation).
fn network(ip: &IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => std::net::Ipv4Addr::from(u32::from(*v4) & 0xffff_0000).into(),
        IpAddr::V6(v6) => std::net::Ipv6Addr::from(u128::from(*v6) & !((1u128 << 80) - 1)).into(),
    }
}

/// What [`Lockout::attempt`] found.
pub enum Turn<'a> {
    /// The check may run; it is counted until the guard drops.
    Go(Attempt<'a>),
    /// Failures and checks under way fill the limit: ask again when one ends.
    Wait,
    Locked,
}

/// A check under way for an address (see [`Lockout::attempt`]).
pub struct Attempt<'a> {
    lockout: &'a Lockout,
    slot: Slot,
    window: u64,
    /// Not counted when the counts were full.
    counted: bool,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        let mut exact = self.lockout.counts();
        let (map, key) = exact.map(self.slot);
        let gone = match map.get_mut(&key) {
            Some(c) if c.window == self.window => {
                c.under_way = c.under_way.saturating_sub(1);
                c.under_way == 0 && c.failures == 0
            }
            _ => false,
        };
        // An address that only ever succeeded takes no slot.
        if gone {
            map.remove(&key);
        }
    }
}

impl Lockout {
    pub fn new(
        max_failures: u32,
        window: Duration,
        slots: usize,
        shared: Option<Arc<dyn SharedState>>,
    ) -> Self {
        Lockout {
            epoch: Instant::now(),
            exact: Default::default(),
            hot: AtomicU64::new(0),
            slots: slots.max(64),
            max_failures,
            window,
            shared: shared.map(|st| SharedLockout::new(st, max_failures, window)),
        }
    }

    /// Whether `ip` is locked out: by the shared count when there is one, else this
    /// replica's own.
    pub async fn locked(&self, ip: &IpAddr) -> Result<bool, Rejection> {
        // This replica's own count too: failures it saw while Redis was away, and those of
        // parallel guesses counted while the server answered this one (read again after the
        // answer: read only before, a burst of guesses all passed with nothing counted yet).
        if self.is_locked(ip) {
            return Ok(true);
        }
        match &self.shared {
            Some(s) => Ok(s.locked(ip).await?.unwrap_or(false) || self.is_locked(ip)),
            None => Ok(false),
        }
    }

    pub fn is_locked(&self, ip: &IpAddr) -> bool {
        let now = self.window_now();
        if self.hot.load(Ordering::Acquire) != now + 1 {
            return false;
        }
        let exact = self.counts();
        // An address counted by itself is judged by its own count; one that is not, by its
        // network's (where it was counted while the table was full).
        let count = match exact.counts.get(ip) {
            Some(c) => Some(c),
            None => exact.networks.get(&network(ip)),
        };
        matches!(count, Some(c) if c.window == now && c.failures >= self.max_failures)
    }

    /// Asks to start a check that takes time for `ip`.
    pub fn attempt(&self, ip: &IpAddr) -> Turn<'_> {
        let mut exact = self.counts();
        let now = self.window_now();
        let Some((slot, c)) = self.entry(&mut exact, ip, now) else {
            return Turn::Go(Attempt {
                lockout: self,
                slot: Slot::Own(*ip),
                window: now,
                counted: false,
            });
        };
        if c.failures >= self.max_failures {
            return Turn::Locked;
        }
        if c.failures.saturating_add(c.under_way) >= self.max_failures {
            return Turn::Wait;
        }
        c.under_way += 1;
        Turn::Go(Attempt {
            lockout: self,
            slot,
            window: now,
            counted: true,
        })
    }

    pub fn record_failure(&self, ip: &IpAddr) {
        {
            let mut exact = self.counts();
            let now = self.window_now();
            if let Some((_, c)) = self.entry(&mut exact, ip, now) {
                c.failures = c.failures.saturating_add(1);
                if c.failures >= self.max_failures {
                    self.hot.fetch_max(now + 1, Ordering::AcqRel);
                }
            }
        }
        if let Some(s) = &self.shared {
            s.record_failure(ip);
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, ExactCounts> {
        self.exact.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The window now. Read under the counts' lock by writers, so a later writer never
    /// holds an earlier window.
    fn window_now(&self) -> u64 {
        (self.epoch.elapsed().as_nanos() / self.window.as_nanos().max(1)) as u64
    }

    /// `ip`'s count in window `now` (a count of an earlier window starts again at zero): its
    /// own, or its network's when the table has no room for it; `None` when both are full.
    fn entry<'m>(
        &self,
        exact: &'m mut ExactCounts,
        ip: &IpAddr,
        now: u64,
    ) -> Option<(Slot, &'m mut Count)> {
        let net = network(ip);
        // The address's own count has no room: forget the windows that ended first (once a
        // window: a flood must not scan the maps per failure), so counts of a flood that is
        // over never push later addresses into their networks' counts.
        let full = !exact.counts.contains_key(ip) && exact.counts.len() >= self.slots;
        if full && exact.purged != Some(now) {
            exact.purged = Some(now);
            exact.counts.retain(|_, c| c.window >= now);
            exact.networks.retain(|_, c| c.window >= now);
        }
        let own = exact.counts.contains_key(ip) || exact.counts.len() < self.slots;
        let slot = if own {
            Slot::Own(*ip)
        } else if exact.networks.contains_key(&net) || exact.networks.len() < self.slots {
            Slot::Network(net)
        } else {
            return None;
        };
        let (map, key) = exact.map(slot);
        let c = map.entry(key).or_insert(Count {
            window: now,
            failures: 0,
            under_way: 0,
        });
        if c.window < now {
            *c = Count {
                window: now,
                failures: 0,
                under_way: 0,
            };
        }
        Some((slot, c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_n_failures_per_ip() {
        let l = Lockout::new(3, Duration::from_secs(60), 1024, None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "::1".parse().unwrap();
        for _ in 0..3 {
            assert!(!l.is_locked(&a));
            l.record_failure(&a);
        }
        assert!(l.is_locked(&a));
        assert!(!l.is_locked(&b));
    }

    /// A flood of failing addresses (an IPv6 /48 is 65,536 networks) fills the count's slots:
    /// no innocent address reads as locked, and the addresses still tracked are locked.
    #[test]
    fn a_flood_of_failing_addresses_locks_out_no_innocent_one() {
        let l = Lockout::new(3, Duration::from_secs(60), 64, None);
        let attacker = |i: u32| {
            IpAddr::from(std::net::Ipv6Addr::from(
                (0x2001_0db8_u128 << 96) | (u128::from(i) << 64),
            ))
        };
        for i in 0..5_000 {
            for _ in 0..3 {
                l.record_failure(&attacker(i));
            }
        }
        let innocent: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(!l.is_locked(&innocent));
        assert!(l.is_locked(&attacker(0)), "tracked exactly: locked");
        assert!(l.counts().counts.len() <= 64, "bounded");
    }

    /// Checks that take time count while they run: failures and checks under way together
    /// stay within the limit (further checks wait their turn), so guesses sent in parallel meet
    /// it as guesses sent one after another do. Checks under way never lock the address.
    #[test]
    fn checks_under_way_count_against_the_limit() {
        let l = Lockout::new(3, Duration::from_secs(60), 1024, None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        fn go<'a>(l: &'a Lockout, a: &IpAddr) -> Option<Attempt<'a>> {
            match l.attempt(a) {
                Turn::Go(t) => Some(t),
                Turn::Wait => None,
                Turn::Locked => panic!("locked"),
            }
        }
        let running: Vec<_> = (0..3).map(|_| go(&l, &a).unwrap()).collect();
        assert!(go(&l, &a).is_none(), "a fourth check waits for the others");
        assert!(!l.is_locked(&a), "checks under way lock nobody out");
        drop(running);
        assert!(l.counts().counts.is_empty(), "succeeded: nothing kept");
        // Two fail (each counted as it ends): one more may run, not two.
        for _ in 0..2 {
            let t = go(&l, &a).unwrap();
            l.record_failure(&a);
            drop(t);
        }
        let last = go(&l, &a).unwrap();
        assert!(go(&l, &a).is_none());
        l.record_failure(&a);
        drop(last);
        assert!(l.is_locked(&a));
        assert!(matches!(l.attempt(&a), Turn::Locked));
    }

    /// With the counts full, an address is counted with its network, and its check gives back
    /// only what it took there.
    #[test]
    fn an_uncounted_check_takes_nothing_from_a_failure() {
        let l = Lockout::new(2, Duration::from_secs(60), 64, None);
        let ip = |i: u8| IpAddr::from([10, 0, 1, i]);
        for i in 0..64 {
            l.record_failure(&ip(i));
        }
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let Turn::Go(t) = l.attempt(&a) else {
            panic!("uncounted: may go")
        };
        // A slot frees; the address fails once, counted; the uncounted check ends.
        l.counts().counts.remove(&ip(0));
        l.record_failure(&a);
        drop(t);
        l.record_failure(&a);
        assert!(l.is_locked(&a));
    }

    /// Review: 64 /64s of one IPv6 /48 filled the table (65,536 by default: exactly a /48),
    /// and every newly failing address went uncounted: guesses without limit from anywhere.
    /// They are counted with their network now; addresses of other networks are not touched.
    #[test]
    fn a_full_table_counts_new_addresses_with_their_network() {
        let l = Lockout::new(3, Duration::from_secs(60), 64, None);
        let in_48 = |i: u128| {
            IpAddr::from(std::net::Ipv6Addr::from(
                (0x2001_0db8_0001_u128 << 80) | (i << 64),
            ))
        };
        for i in 0..64 {
            l.record_failure(&in_48(i));
        }
        let next = in_48(1000);
        for _ in 0..3 {
            assert!(!l.is_locked(&next));
            l.record_failure(&next);
        }
        assert!(l.is_locked(&next), "counted with its /48");
        assert!(
            l.is_locked(&in_48(2000)),
            "its /48's other uncounted addresses share it"
        );
        assert!(
            !l.is_locked(&in_48(0)),
            "an address counted by itself keeps its own count"
        );
        let elsewhere: IpAddr = "2001:db8:2::".parse().unwrap();
        let v4: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(!l.is_locked(&elsewhere) && !l.is_locked(&v4));
        // Another network's failures are its own.
        for _ in 0..3 {
            l.record_failure(&v4);
        }
        assert!(l.is_locked(&v4));
        assert!(!l.is_locked(&"198.52.0.1".parse().unwrap()));
        assert!(l.is_locked(&"198.51.0.1".parse().unwrap()), "same /16");
    }

    /// Review: the counts of a flood that was over stayed until the networks' map filled too,
    /// so from then on every newly failing address was counted with its whole network.
    #[test]
    fn a_flood_that_is_over_leaves_no_network_counting_behind() {
        let l = Lockout::new(3, Duration::from_millis(100), 64, None);
        for i in 0..64u8 {
            l.record_failure(&IpAddr::from([10, 9, 0, i]));
        }
        std::thread::sleep(Duration::from_millis(250));
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        for _ in 0..3 {
            l.record_failure(&a);
        }
        assert!(l.is_locked(&a));
        assert!(
            !l.is_locked(&"198.51.0.1".parse().unwrap()),
            "counted by itself"
        );
        assert!(l.counts().networks.is_empty());
    }

    #[test]
    fn window_end_unlocks() {
        let l = Lockout::new(1, Duration::from_millis(100), 1024, None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        l.record_failure(&a);
        assert!(l.is_locked(&a));
        std::thread::sleep(Duration::from_millis(250));
        assert!(!l.is_locked(&a));
    }
}
