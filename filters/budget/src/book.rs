//! The in-memory book of accounts: spent and reserved per (principal, period). Check and
//! reserve happen under one lock, held for a few map operations and never across an await,
//! so concurrent requests cannot overspend.

use std::collections::HashMap;
use std::sync::Mutex;

use gateway_filter::GLOBAL_ACCOUNT;

use crate::ledger::History;
use crate::period::{day_string, with_day_string, Calendar, Period};
use crate::prices::Nano;

#[derive(Debug, Default, Clone, Copy)]
pub struct Account {
    pub spent: Nano,
    pub reserved: Nano,
}

/// One budget a request is held to.
#[derive(Debug, Clone)]
pub struct Budget {
    pub principal: String,
    pub period: Period,
    pub period_key: String,
    pub limit: Nano,
}

/// Accounts by principal, then period key: looked up by `&str`, so a request's check
/// allocates nothing once its accounts are open.
type Accounts = HashMap<String, HashMap<String, Account>>;

/// `f` of the account of `b`, opened with `opening()` (spend of past runs) if it is new.
fn with_account<R>(
    acc: &mut Accounts,
    b: &Budget,
    opening: impl FnOnce() -> Nano,
    f: impl FnOnce(&mut Account) -> R,
) -> R {
    let open = |opening: Nano| Account {
        spent: opening,
        reserved: 0,
    };
    if let Some(periods) = acc.get_mut(b.principal.as_str()) {
        if let Some(a) = periods.get_mut(b.period_key.as_str()) {
            return f(a);
        }
        return f(periods
            .entry(b.period_key.clone())
            .or_insert_with(|| open(opening())));
    }
    f(acc
        .entry(b.principal.clone())
        .or_default()
        .entry(b.period_key.clone())
        .or_insert_with(|| open(opening())))
}

pub struct Book {
    accounts: Mutex<Accounts>,
    /// Spend in the ledger that no account holds yet: the ledger as loaded, plus what other
    /// processes wrote to it since ([`Book::add_foreign`]). Locked after `accounts`, when both.
    history: Mutex<History>,
}

/// Which budget refused.
#[derive(Debug)]
pub struct Refusal {
    pub budget: Budget,
}

impl Book {
    pub fn new(history: History) -> Book {
        Book {
            accounts: Mutex::new(HashMap::new()),
            history: Mutex::new(history),
        }
    }

    /// Spend of past runs that falls in the budget's current period. The ledger charges each
    /// request to its principal: the global budget's is everyone's.
    fn opening(&self, b: &Budget, now: i64) -> Nano {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let span = b
            .period
            .span(now)
            .map(|(f, t)| (day_string(f), day_string(t)));
        let in_period = |d: &String| span.as_ref().is_none_or(|(f, t)| d >= f && d < t);
        let sum = |days: &Vec<(String, Nano)>| -> Nano {
            days.iter()
                .filter(|(d, _)| in_period(d))
                .fold(0, |total: Nano, (_, n)| total.saturating_add(*n))
        };
        if b.principal == GLOBAL_ACCOUNT {
            history.values().map(sum).fold(0, Nano::saturating_add)
        } else {
            history.get(&b.principal).map_or(0, sum)
        }
    }

    /// Reserves `amount` in every budget, or in none if one of them cannot take it.
    pub fn reserve(
        &self,
        budgets: &[Budget],
        amount: Nano,
        now: i64,
    ) -> Result<Vec<(Nano, Nano)>, Refusal> {
        let mut acc = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        for b in budgets {
            let fits = with_account(
                &mut acc,
                b,
                || self.opening(b, now),
                |a| a.spent.saturating_add(a.reserved).saturating_add(amount) <= b.limit,
            );
            if !fits {
                return Err(Refusal { budget: b.clone() });
            }
        }
        let mut after = Vec::with_capacity(budgets.len());
        for b in budgets {
            with_account(
                &mut acc,
                b,
                || 0,
                |a| {
                    a.reserved = a.reserved.saturating_add(amount);
                    after.push((a.spent.saturating_add(a.reserved), b.limit));
                },
            );
        }
        Ok(after)
    }

    /// Releases a reservation and books the real charge; returns what is left per budget.
    pub fn settle(&self, budgets: &[Budget], reserved: Nano, charged: Nano) -> Vec<Nano> {
        let mut acc = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        budgets
            .iter()
            .map(|b| {
                with_account(
                    &mut acc,
                    b,
                    || 0,
                    |a| {
                        a.reserved = a.reserved.saturating_sub(reserved);
                        a.spent = a.spent.saturating_add(charged);
                        b.limit.saturating_sub(a.spent)
                    },
                )
            })
            .collect()
    }

    /// This replica's spend in the budget's period (after `reserve` opened the account).
    pub fn spent(&self, b: &Budget) -> Nano {
        let acc = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        acc.get(b.principal.as_str())
            .and_then(|periods| periods.get(b.period_key.as_str()))
            .map_or(0, |a| a.spent)
    }

    /// Principals the ledger of past runs knows, for `/admin/spend` before they return.
    pub fn ledger_principals(&self) -> Vec<String> {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.keys().cloned().collect()
    }

    /// Spend another process wrote to the same ledger on `day` (a day number), e.g. the old
    /// process of an upgrade finishing its requests: counted in every open account of
    /// `principal` whose period holds that day, and in those opened later.
    pub fn add_foreign(&self, principal: &str, day: i64, nano: Nano) {
        let mut acc = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        // An account's key names its period: the day is in the accounts of the keys its
        // periods have on that day. The global budget counts everyone's spend.
        let secs = day * 86_400;
        for who in [principal, GLOBAL_ACCOUNT] {
            for period in [Period::Day, Period::Week, Period::Month, Period::Total] {
                if let Some(a) = acc
                    .get_mut(who)
                    .and_then(|periods| periods.get_mut(period.key(secs).as_str()))
                {
                    a.spent = a.spent.saturating_add(nano);
                }
            }
        }
        self.remember_locked(principal, day, nano);
    }

    /// Adds a charge of this process's to the history, so an account opened later for a
    /// period that holds its day (a new period, a key whose period changed on reload) starts
    /// with it, as it would after a restart.
    pub fn remember(&self, principal: &str, day: i64, nano: Nano) {
        self.remember_locked(principal, day, nano);
    }

    /// Takes the history's lock only: callers may hold `accounts` (always taken first).
    fn remember_locked(&self, principal: &str, day: i64, nano: Nano) {
        if nano == 0 {
            return;
        }
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if !history.contains_key(principal) {
            history.insert(principal.to_string(), Vec::new());
        }
        let Some(days) = history.get_mut(principal) else {
            return;
        };
        // Newest last: today's entry, when there is one, is found at once.
        with_day_string(day, |day| {
            match days.iter_mut().rev().find(|(d, _)| d == day) {
                Some((_, n)) => *n = n.saturating_add(nano),
                None => days.push((day.to_string(), nano)),
            }
        })
    }

    /// What the ledger of past runs holds for `principal` in `period` as of `now`.
    pub fn ledger_spend(&self, principal: &str, period: Period, now: i64) -> Nano {
        self.opening(
            &Budget {
                principal: principal.to_string(),
                period,
                period_key: String::new(),
                limit: 0,
            },
            now,
        )
    }

    /// Current accounts, for `/admin/spend`.
    pub fn snapshot(&self) -> Vec<((String, String), Account)> {
        let acc = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = acc
            .iter()
            .flat_map(|(who, periods)| {
                periods
                    .iter()
                    .map(move |(period, a)| ((who.clone(), period.clone()), *a))
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: Nano) -> Budget {
        Budget {
            principal: "a".into(),
            period: Period::Month,
            period_key: "1mo:2026-11-01".into(),
            limit,
        }
    }

    #[test]
    fn reserve_is_all_or_nothing() {
        let book = Book::new(History::new());
        let b = vec![budget(100)];
        let g = vec![
            budget(100),
            Budget {
                principal: "*".into(),
                ..budget(150)
            },
        ];
        assert!(book.reserve(&g, 60, 0).is_ok());
        // Fits the global budget (60+60 > 150? no: 120 ≤ 150) but not a's own (120 > 100).
        let r = book.reserve(&g, 60, 0).unwrap_err();
        assert_eq!(r.budget.principal, "a");
        assert!(book.reserve(&b, 40, 0).is_ok());
        book.settle(&g, 60, 10);
        let left = book.settle(&b, 40, 40);
        assert_eq!(left, vec![50]);
    }

    #[test]
    fn foreign_spend_counts_in_the_periods_that_hold_its_day() {
        let book = Book::new(History::new());
        let now = 1_795_392_000; // 2026-11-23
        let day = now / 86_400;
        let month = budget(100);
        let today = Budget {
            period: Period::Day,
            period_key: Period::Day.key(now),
            ..budget(100)
        };
        book.reserve(&[month.clone(), today.clone()], 10, now)
            .unwrap();
        book.settle(&[month.clone(), today.clone()], 10, 10);
        // Another process charged 30 today and 5 yesterday (same month), and 7 to someone else.
        let global = Budget {
            principal: "*".into(),
            ..budget(1000)
        };
        book.reserve(std::slice::from_ref(&global), 0, now).unwrap();
        book.add_foreign("a", day, 30);
        book.add_foreign("a", day - 1, 5);
        book.add_foreign("b", day, 7);
        assert_eq!(book.spent(&month), 45);
        assert_eq!(book.spent(&today), 40);
        assert_eq!(
            book.spent(&global),
            42,
            "the global budget counts everyone's"
        );
        // Accounts opened later count it too (from the history), once.
        let b = Budget {
            principal: "b".into(),
            ..budget(100)
        };
        assert!(book.reserve(std::slice::from_ref(&b), 93, now).is_ok());
        assert!(book.reserve(&[b], 1, now).is_err(), "7 + 93 spent or held");
        let week = Budget {
            period: Period::Week,
            period_key: Period::Week.key(now),
            ..budget(100)
        };
        book.reserve(std::slice::from_ref(&week), 0, now).unwrap();
        assert_eq!(
            book.spent(&week),
            30,
            "2026-11-23 is a Monday: the day before belongs to last week"
        );
    }

    #[test]
    fn history_opens_the_current_period_only() {
        let mut h = History::new();
        h.insert(
            "a".into(),
            vec![("2026-10-31".into(), 70), ("2026-11-02".into(), 30)],
        );
        let book = Book::new(h);
        let now = 1_795_392_000; // 2026-11-23
        assert!(
            book.reserve(&[budget(100)], 71, now).is_err(),
            "30 already spent this month: 71 more is too much"
        );
        assert!(book.reserve(&[budget(100)], 70, now).is_ok());
        let total = Budget {
            period: Period::Total,
            period_key: "total".into(),
            ..budget(100)
        };
        assert!(book.reserve(&[total], 1, now).is_err(), "100 spent in all");
    }

    #[test]
    fn an_account_opened_later_starts_with_this_process_charges() {
        let book = Book::new(History::new());
        let now = 1_795_392_000; // 2026-11-23
        let day = now / 86_400;
        let month = budget(100);
        book.reserve(std::slice::from_ref(&month), 40, now).unwrap();
        book.settle(std::slice::from_ref(&month), 40, 30);
        book.remember("a", day, 30);
        // The key's period changes on reload: its day account opens with today's 30.
        let today = Budget {
            period: Period::Day,
            period_key: Period::Day.key(now),
            ..budget(100)
        };
        book.reserve(std::slice::from_ref(&today), 0, now).unwrap();
        assert_eq!(book.spent(&today), 30);
        assert_eq!(
            book.spent(&month),
            30,
            "the open account is not counted twice"
        );
    }

    #[test]
    fn the_global_budget_opens_with_everyones_spend() {
        let mut h = History::new();
        h.insert(
            "a".into(),
            vec![("2026-10-31".into(), 70), ("2026-11-02".into(), 30)],
        );
        h.insert("anonymous".into(), vec![("2026-11-20".into(), 25)]);
        let book = Book::new(h);
        let now = 1_795_392_000; // 2026-11-23
        let global = Budget {
            principal: "*".into(),
            ..budget(100)
        };
        book.reserve(std::slice::from_ref(&global), 0, now).unwrap();
        assert_eq!(book.spent(&global), 55, "November's spend of everyone");
    }
}
