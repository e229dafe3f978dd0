//! Rates such as `10/s`, `600/m`, `1000/h`, and the GCRA arithmetic of nginx's `limit_req`.

pub use gateway_filter::limits::Rate;

/// Outcome of one GCRA check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gcra {
    /// Allowed; wait `delay_ns` first (0 in nodelay mode or when on schedule); `remaining`
    /// requests would still pass right now; the bucket is full again in `reset_ns`.
    Allow {
        delay_ns: u64,
        remaining: u64,
        reset_ns: u64,
    },
    /// Refused; a request would pass in `retry_ns`.
    Deny { retry_ns: u64 },
}

/// One GCRA step on the theoretical arrival time `tat` (ns), at `now` (ns), with emission
/// interval `t` and burst `burst`. Returns the new TAT and the outcome. A request passes when
/// it is at most `burst` intervals early: `burst + 1` quick requests pass, as with nginx.
/// A refusal returns the TAT to keep: the one given, unless it was further ahead than this
/// rate can put it (a slower rate's, before a reload), which the caller stores.
pub fn gcra(tat: u64, now: u64, t: u64, burst: u64) -> (u64, Gcra) {
    let tau = t.saturating_mul(burst);
    // Never further ahead than this rate can put it (a no-op while the rate stays): a TAT
    // from a slower rate (`1/h`, raised to `100/m` by a reload) would keep refusing for
    // the old rate's hour.
    let tat = tat.max(now).min(now.saturating_add(tau).saturating_add(t));
    if tat - now > tau {
        return (
            tat,
            Gcra::Deny {
                retry_ns: tat - now - tau,
            },
        );
    }
    let new_tat = tat + t;
    let delay_ns = tat - now;
    let slack = now + tau + t - new_tat.min(now + tau + t);
    (
        new_tat,
        Gcra::Allow {
            delay_ns,
            remaining: slack / t,
            reset_ns: new_tat - now,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_faster_rate_applies_at_once() {
        let hour = 3_600_000_000_000u64;
        let now = 10 * hour;
        // `1/h`, burst 0: one passes, the next is an hour away.
        let (tat, g) = gcra(0, now, hour, 0);
        assert!(matches!(g, Gcra::Allow { .. }));
        assert!(matches!(gcra(tat, now + 1, hour, 0).1, Gcra::Deny { .. }));
        // Reloaded as `100/m` (0.6 s): the next request waits 0.6 s, not the hour.
        let t = 600_000_000;
        let (kept, g) = gcra(tat, now + 1, t, 0);
        assert_eq!(g, Gcra::Deny { retry_ns: t });
        assert!(kept < tat, "the nearer TAT is kept");
        assert!(matches!(
            gcra(kept, now + 1 + t, t, 0).1,
            Gcra::Allow { .. }
        ));
        // With the rate unchanged, nothing moves: the sixth of `burst: 5` passes, the
        // seventh does not.
        let (t, mut tat) = (1_000_000_000u64, 0);
        let mut passed = 0;
        for _ in 0..7 {
            let (next, g) = gcra(tat, now, t, 5);
            if matches!(g, Gcra::Allow { .. }) {
                passed += 1;
            } else {
                assert_eq!(next, tat);
            }
            tat = next;
        }
        assert_eq!(passed, 6);
    }

    /// Offers `n` requests at a steady interval and counts the allowed ones.
    fn offered(rate: &Rate, burst: u64, every_ns: u64, n: u64) -> (u64, u64) {
        let t = rate.interval_ns();
        let mut tat = 0;
        let mut allowed = 0;
        let mut delayed_total = 0;
        for i in 0..n {
            let (new_tat, g) = gcra(tat, 1_000_000_000_000 + i * every_ns, t, burst);
            tat = new_tat;
            if let Gcra::Allow { delay_ns, .. } = g {
                allowed += 1;
                delayed_total += delay_ns;
            }
        }
        (allowed, delayed_total)
    }

    #[test]
    fn nginx_seed_case_one_plus_burst() {
        // 50 quick requests, 10/m, burst 5: exactly 6 pass.
        let (allowed, _) = offered(&Rate::parse("10/m").unwrap(), 5, 1_000_000, 50);
        assert_eq!(allowed, 6);
    }

    #[test]
    fn steady_rate_above_the_limit_matches_theory() {
        // 20/s limit, burst 5, offered 50/s for 10 s (500 requests, last at 9.98 s): theory
        // = burst + 1 + floor(elapsed / T) = 6 + floor(9.98 / 0.05) = 6 + 199 = 205.
        let rate = Rate::parse("20/s").unwrap();
        let (allowed, _) = offered(&rate, 5, 20_000_000, 500);
        assert!(allowed.abs_diff(205) <= 1, "{allowed}");
        // Delay mode lets the same requests through, each released at arrival + delay: after
        // the burst, releases are one interval T apart, so the backend sees the configured
        // rate, not the offered one.
        let t = rate.interval_ns();
        let mut tat = 0;
        let mut releases = Vec::new();
        for i in 0..500u64 {
            let now = 1_000_000_000_000 + i * 20_000_000;
            let (new_tat, g) = gcra(tat, now, t, 5);
            tat = new_tat;
            if let Gcra::Allow { delay_ns, .. } = g {
                releases.push(now + delay_ns);
            }
        }
        assert_eq!(releases.len() as u64, allowed);
        assert!(releases.windows(2).all(|w| w[1] >= w[0]), "in order");
        let spaced = releases.windows(2).skip(5).all(|w| w[1] - w[0] >= t);
        assert!(spaced, "released at most one per interval after the burst");
        let span = releases[releases.len() - 1] - releases[0];
        assert!(
            span >= (allowed - 6) * t,
            "{span} ns for {allowed} releases"
        );
        // Below the limit everything passes.
        let (allowed, delayed) = offered(&rate, 0, 60_000_000, 100);
        assert_eq!((allowed, delayed), (100, 0));
    }

    #[test]
    fn remaining_and_retry() {
        let t = 1_000;
        let (tat, g) = gcra(0, 10_000, t, 2);
        assert_eq!(
            g,
            Gcra::Allow {
                delay_ns: 0,
                remaining: 2,
                reset_ns: 1_000
            }
        );
        let (tat, g) = gcra(tat, 10_000, t, 2);
        assert_eq!(
            g,
            Gcra::Allow {
                delay_ns: 1_000,
                remaining: 1,
                reset_ns: 2_000
            }
        );
        let (tat, _) = gcra(tat, 10_000, t, 2);
        let (_, g) = gcra(tat, 10_000, t, 2);
        assert_eq!(g, Gcra::Deny { retry_ns: 1_000 });
    }
}
