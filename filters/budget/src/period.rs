//! Budget periods in UTC: calendar day, ISO week (from Monday), calendar month, or all time.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

pub use gateway_filter::limits::Period;

/// (year, month, day) of a day number since 1970-01-01 (Howard Hinnant's civil_from_days).
pub fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Day number of a civil date (inverse of [`civil`]).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub fn day_string(days: i64) -> String {
    with_day_string(days, str::to_string)
}

/// `f` of the day's `YYYY-MM-DD`, without a string of its own: nearly every call names
/// today, formatted once a day, not per request.
pub fn with_day_string<R>(days: i64, f: impl FnOnce(&str) -> R) -> R {
    thread_local! {
        static LAST: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
    }
    LAST.with_borrow_mut(|(last, s)| {
        if *last != days {
            let (y, m, d) = civil(days);
            *s = format!("{y:04}-{m:02}-{d:02}");
            *last = days;
        }
        f(s)
    })
}

/// The day number of `YYYY-MM-DD`; `None` for anything else.
pub fn parse_day(s: &str) -> Option<i64> {
    let mut parts = s.splitn(3, '-');
    let y = parts.next()?.parse::<i64>().ok()?;
    let m = parts.next()?.parse::<u32>().ok()?;
    let d = parts.next()?.parse::<u32>().ok()?;
    ((1..=12).contains(&m) && (1..=31).contains(&d) && s.len() == 10)
        .then(|| days_from_civil(y, m, d))
        .filter(|&n| day_string(n) == s)
}

/// The ledger's day key of a moment.
pub fn day_of(secs: i64) -> String {
    day_string(secs.div_euclid(86_400))
}

/// The ledger day keys `[first day, first day of the next month)` of a calendar month.
pub fn month_days(year: i64, month: u32) -> (String, String) {
    let start = days_from_civil(year, month, 1);
    let (_, end) = Period::Month.span(start * 86_400).unwrap_or((start, start));
    (day_string(start), day_string(end))
}

/// Where a period begins and ends on the UTC calendar.
pub trait Calendar {
    fn span(self, secs: i64) -> Option<(i64, i64)>;
    fn key(self, secs: i64) -> String;
    fn resets_at(self, secs: i64) -> Option<i64>;
}

impl Calendar for Period {
    /// First and last-plus-one day numbers of the period containing `secs` (`None` = all time).
    fn span(self, secs: i64) -> Option<(i64, i64)> {
        let day = secs.div_euclid(86_400);
        match self {
            Period::Day => Some((day, day + 1)),
            Period::Week => {
                // 1970-01-01 was a Thursday: Monday-based weeks start 3 days before.
                let start = day - (day + 3).rem_euclid(7);
                Some((start, start + 7))
            }
            Period::Month => {
                let (y, m, _) = civil(day);
                let start = days_from_civil(y, m, 1);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                Some((start, days_from_civil(ny, nm, 1)))
            }
            Period::Total => None,
        }
    }

    /// Names the period containing `secs`, e.g. `1mo:2026-11-01`.
    fn key(self, secs: i64) -> String {
        // Asked for on every request, named anew once a period.
        thread_local! {
            static LAST: RefCell<[(i64, String); 3]> =
                const { RefCell::new([(i64::MIN, String::new()), (i64::MIN, String::new()), (i64::MIN, String::new())]) };
        }
        let slot = match self {
            Period::Day => 0,
            Period::Week => 1,
            Period::Month => 2,
            Period::Total => return "total".into(),
        };
        let Some((start, _)) = self.span(secs) else {
            return "total".into();
        };
        LAST.with_borrow_mut(|last| {
            let (day, key) = &mut last[slot];
            if *day != start {
                *key = format!("{}:{}", self.name(), day_string(start));
                *day = start;
            }
            key.clone()
        })
    }

    /// When the period containing `secs` ends (UNIX seconds); `None` for all time.
    fn resets_at(self, secs: i64) -> Option<i64> {
        self.span(secs).map(|(_, end)| end * 86_400)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2026, 11, 23), civil_inverse(2026, 11, 23));
        assert_eq!(day_of(1_795_392_000), "2026-11-23");
        assert_eq!(parse_day("2026-11-23"), Some(1_795_392_000 / 86_400));
        for bad in ["2026-02-30", "2026-13-01", "26-11-23", "2026-11-23x", "x"] {
            assert_eq!(parse_day(bad), None, "{bad}");
        }
        for d in [-1000, 0, 59, 60, 10_000, 20_000, 30_000] {
            let (y, m, dd) = civil(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    fn civil_inverse(y: i64, m: u32, d: u32) -> i64 {
        (0..40_000).find(|&n| civil(n) == (y, m, d)).unwrap()
    }

    #[test]
    fn periods() {
        let t = 1_795_435_200; // 2026-11-23T12:00:00Z, a Monday
        assert_eq!(Period::Day.key(t), "1d:2026-11-23");
        assert_eq!(Period::Week.key(t), "7d:2026-11-23");
        assert_eq!(
            Period::Week.key(t - 86_400),
            "7d:2026-11-16",
            "Sunday belongs to the week before"
        );
        assert_eq!(Period::Month.key(t), "1mo:2026-11-01");
        // Names are remembered per period, and asked again for another one.
        assert_eq!(Period::Day.key(t + 86_400), "1d:2026-11-24");
        assert_eq!(Period::Day.key(t), "1d:2026-11-23");
        assert_eq!(Period::Total.key(t), "total");
        assert_eq!(day_string(t / 86_400 + 1), "2026-11-24");
        assert_eq!(day_string(t / 86_400), "2026-11-23");
        assert_eq!(
            Period::Month.resets_at(t),
            Some(days_from_civil(2026, 12, 1) * 86_400)
        );
        assert_eq!(
            Period::Month.key(days_from_civil(2026, 12, 31) * 86_400),
            "1mo:2026-12-01"
        );
        assert_eq!(
            Period::Month.resets_at(days_from_civil(2026, 12, 31) * 86_400),
            Some(days_from_civil(2027, 1, 1) * 86_400)
        );
        assert_eq!(Period::Total.key(t), "total");
        assert_eq!(
            month_days(2026, 12),
            ("2026-12-01".to_string(), "2027-01-01".to_string())
        );
        assert_eq!(
            month_days(2028, 2),
            ("2028-02-01".to_string(), "2028-03-01".to_string())
        );
        assert!(Period::parse("1y").is_err());
    }
}
