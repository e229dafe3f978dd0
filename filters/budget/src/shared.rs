//! Budgets shared by several replicas (Redis). Per budget and period, two keys with the
//! principal as hash tag:
//! - `spend`: a hash of spend per replica (field: the replica's ledger id, value: its total in
//!   nano-USD for the period). Each replica writes only its own field, and only upwards, from
//!   what its ledger and book know, so a server that lost its data is repaired by every
//!   settlement, by a reservation that finds the field missing, and by the reset hook.
//! - `resv`: live reservations, a sorted set scored by expiry, each member `ID|AMOUNT`. A
//!   replica that dies leaves its reservations to expire after the lease time.
//!
//! A reservation checks `sum(spend) + sum(live reservations) + amount <= limit` and takes its
//! place in one atomic script, so concurrent requests on all replicas cannot overspend.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use gateway_filter::chunk::{keep_taking, Chunk, ChunkSpec, Chunks, Draw};
use gateway_filter::state::{at, Arg, Keep, Renewal, Script, StateError};
use gateway_filter::SharedState;

use crate::book::Budget;
use crate::period::Calendar;
use crate::prices::Nano;

/// Reading an account, for the scripts that check or report it: `totals(spend)` answers
/// every replica's spend together and `~held`; `expired(resv, now)` the amounts of the
/// reservations that ended by `now` (of a replica that died), each member `ID|AMOUNT`.
macro_rules! account_lua {
    () => {
        r#"
local function totals(key)
  local spent = 0
  local held = 0
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    if all[i] == '~held' then held = tonumber(all[i + 1])
    else spent = spent + tonumber(all[i + 1]) end
  end
  return spent, held
end
local function expired(key, now)
  local n = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', now)) do
    n = n + (tonumber(string.match(m, '|(%d+)$')) or 0)
  end
  return n
end
"#
    };
}

/// KEYS: spend, resv. ARGV: replica, its period total, amount, limit, member, ttl ms,
/// keep ms (the keys' lifetime; 0: none). Answers `{taken, spent, reserved}`.
///
/// The spend hash also holds `~held`, the sum of live reservations, kept up to date by every
/// script that adds or removes one, so a check costs the same however many requests are in
/// flight; only reservations that expired (of a replica that died) are read one by one.
static RESERVE: Script = Script {
    name: "budget_reserve",
    source: concat!(
        account_lua!(),
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keep = tonumber(ARGV[7])
-- Run again for the same request (a call retried on a new connection): already held.
if redis.call('ZSCORE', KEYS[2], ARGV[5]) then
  local spent, held = totals(KEYS[1])
  return {1, spent, held}
end
-- Only a missing total is put back here: an existing one may lag this replica's book by
-- settlements still on their way, whose reservations are still held (counting it raised as
-- well would count those requests twice). The keys' lifetime ends at a fixed moment (the
-- period's end and a day), so it is set when a key or field is made, not on every call.
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 and keep > 0 then
  redis.call('PEXPIRE', KEYS[1], keep)
end
local spent, held = totals(KEYS[1])
-- The reservation that ends first tells whether any has expired (of a replica that died)
-- and whether any is left at all.
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local fresh = #first == 0
if not fresh and tonumber(first[2]) <= now then
  held = held - expired(KEYS[2], now)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  fresh = redis.call('ZCARD', KEYS[2]) == 0
  if held < 0 then held = 0 end
  redis.call('HSET', KEYS[1], '~held', string.format('%.0f', held))
end
-- No reservation left: nothing is held (whatever a lost set or an old replica left).
if fresh and held > 0 then
  held = 0
  redis.call('HSET', KEYS[1], '~held', '0')
end
local amount = tonumber(ARGV[3])
if spent + held + amount > tonumber(ARGV[4]) then
  return {0, spent, held}
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[5])
if fresh and keep > 0 then redis.call('PEXPIRE', KEYS[2], keep) end
held = held + amount
redis.call('HSET', KEYS[1], '~held', string.format('%.0f', held))
return {1, spent, held}
"#
    ),
};

/// Ends reservations and raises replicas' totals. KEYS: spend, resv. ARGV, per settlement
/// (several arrive in one call, see `SharedState::run_batched`): replica, its period total,
/// member ('' for none), keep ms.
static SETTLE: Script = Script {
    name: "budget_settle",
    source: r#"
local held = nil
local top = {}
local keep = 0
for i = 1, #ARGV, 4 do
  local m = ARGV[i + 2]
  if m ~= '' and redis.call('ZREM', KEYS[2], m) == 1 then
    held = (held or tonumber(redis.call('HGET', KEYS[1], '~held') or '0'))
      - (tonumber(string.match(m, '|(%d+)$')) or 0)
  end
  -- Each replica's highest total of the batch (kept as sent: totals pass 2^53 nano-dollars).
  local r = ARGV[i]
  if top[r] == nil or tonumber(ARGV[i + 1]) > tonumber(ARGV[top[r] + 1]) then top[r] = i end
  keep = math.max(keep, tonumber(ARGV[i + 3]))
end
if held then
  if held < 0 then held = 0 end
  redis.call('HSET', KEYS[1], '~held', string.format('%.0f', held))
end
for r, i in pairs(top) do
  if tonumber(redis.call('HGET', KEYS[1], r) or '0') < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], r, ARGV[i + 1])
  end
end
if keep > 0 then redis.call('PEXPIRE', KEYS[1], keep) end
return {1}
"#,
};

/// Lengthens a reservation, or puts it back (counted in `~held` again) when the server no
/// longer has it: a request still running still spends (a [`Renewal::renew`]). KEYS: spend,
/// resv. ARGV: member, keep ms, ttl ms. Answers `{1}`, or `{2}` when put back.
static RENEW: Script = Script {
    name: "budget_renew",
    source: r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keep = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZADD', KEYS[2], 'XX', now + ttl, ARGV[1])
  local p = redis.call('PTTL', KEYS[2])
  if p >= 0 and p < ttl * 2 then redis.call('PEXPIRE', KEYS[2], ttl * 2) end
  return {1}
end
-- An empty set holds nothing, whatever `~held` says (as the reservation reads it).
local held = 0
if redis.call('ZCARD', KEYS[2]) > 0 then
  held = tonumber(redis.call('HGET', KEYS[1], '~held') or '0')
end
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
held = held + (tonumber(string.match(ARGV[1], '|(%d+)$')) or 0)
redis.call('HSET', KEYS[1], '~held', string.format('%.0f', held))
-- Keys made again here live as long as a reservation makes them live.
if keep > 0 then
  for _, k in ipairs(KEYS) do
    if redis.call('PTTL', k) == -1 then redis.call('PEXPIRE', k, keep) end
  end
end
return {2}
"#,
};

/// KEYS: spend, resv. Answers `{spent, reserved}` of all replicas together.
static TOTALS: Script = Script {
    name: "budget_totals",
    source: concat!(
        account_lua!(),
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local spent, held = totals(KEYS[1])
held = held - expired(KEYS[2], now)
if held < 0 then held = 0 end
return {spent, held}
"#
    ),
};

/// Spend keys outlive their period by a day (late settlements), 40 days when unknown.
pub const KEEP_UNKNOWN_MS: i64 = 40 * 86_400_000;

pub fn keep_ms(b: &Budget, now: i64) -> i64 {
    b.period
        .resets_at(now)
        .map_or(0, |reset| (reset - now + 86_400).max(1) * 1000)
}

fn keys(st: &dyn SharedState, principal: &str, period_key: &str) -> [String; 2] {
    [
        st.key(&["spend:", period_key], &["budget:", principal]),
        st.key(&["resv:", period_key], &["budget:", principal]),
    ]
}

/// A reservation held in shared state for one budget: the request's own, or its part of a
/// chunk taken ahead (`member` empty: the chunk's reservation holds it).
pub struct Hold {
    /// Which of the request's budgets it is.
    index: usize,
    keys: [String; 2],
    member: String,
    keep_ms: i64,
    keep: Option<Keep>,
    /// The chunk it was served from: its reservation lasts while a request served from it
    /// runs.
    _chunk: Option<Arc<ChunkHold>>,
}

/// A chunk of a budget taken ahead (see `gateway_filter::chunk`): a reservation of its own,
/// renewed while a request served from it runs, ended when the last of them has settled and
/// the chunk's life is over. Meanwhile what those requests spend is counted twice (in the
/// replica's total and in the chunk), which errs on the safe side, far from the limit.
pub struct ChunkHold {
    st: Arc<dyn SharedState>,
    replica: String,
    keys: [String; 2],
    member: String,
    keep_ms: i64,
    keep: Keep,
}

impl Drop for ChunkHold {
    fn drop(&mut self) {
        self.keep.stop();
        // After the settlements of the requests served from it (same script and keys: in
        // the order they were made), so their spend is counted before the chunk ends.
        self.st.run_batched(
            &SETTLE,
            self.keys.to_vec(),
            vec![
                std::mem::take(&mut self.replica),
                "0".into(),
                std::mem::take(&mut self.member),
                self.keep_ms.to_string(),
            ],
        );
    }
}

/// The budgets' chunks, by spend key.
pub type BudgetChunks = Arc<Chunks<Arc<ChunkHold>>>;

/// Names chunks, so a request given back finds its own.
static CHUNK_TAG: AtomicI64 = AtomicI64::new(1);

impl Hold {
    pub fn index(&self) -> usize {
        self.index
    }
}

/// What the shared check answered.
pub enum Reserved {
    /// Taken in every budget; with `(used after it, limit)` per budget across all replicas.
    Taken(Vec<Hold>, Vec<(Nano, Nano)>),
    /// Budget `i` cannot take it (the others were given back).
    Refused(usize),
}

/// Serves `amount` from every budget's chunk, or from none (`None`: ask the server).
#[allow(clippy::too_many_arguments)]
fn serve(
    st: &Arc<dyn SharedState>,
    chunks: &BudgetChunks,
    replica: &str,
    budgets: &[Budget],
    keys: &[[String; 2]],
    mine: &[Nano],
    amount: Nano,
    now: i64,
) -> Option<Reserved> {
    let spec = st.chunk()?;
    if st.degraded() || amount <= 0 {
        return None;
    }
    let t = Instant::now();
    // From every budget's chunk or from none. A budget that cannot serve sees the request as
    // one that found no chunk (to take one once the key is busy); one that could is left
    // alone, so it is not taken again for requests it does not serve.
    let can: Vec<bool> = budgets
        .iter()
        .zip(keys)
        .map(|(b, k)| chunks.can_serve(&k[0], amount as u64, b.limit as u64, spec, t))
        .collect();
    if can.contains(&false) {
        for (i, (b, k)) in budgets
            .iter()
            .zip(keys)
            .enumerate()
            .filter(|(i, _)| !can[*i])
        {
            let (draw, chores) = chunks.draw(&k[0], amount as u64, b.limit as u64, spec, t);
            drop(chores.ended);
            if chores.take {
                take(st, chunks, replica, b, mine[i], amount, now, k, spec);
            }
            if let Draw::Took { tag, .. } = draw {
                // Filled meanwhile: not this request's.
                chunks.undraw(&k[0], tag, amount as u64);
            }
        }
        return None;
    }
    let mut holds = Vec::with_capacity(budgets.len());
    let mut after = Vec::with_capacity(budgets.len());
    let mut drawn = Vec::new();
    for (i, (b, keys)) in budgets.iter().zip(keys).enumerate() {
        let (draw, chores) = chunks.draw(&keys[0], amount as u64, b.limit as u64, spec, t);
        // Chunks whose life is over end as the last request served from them settles.
        drop(chores.ended);
        if chores.take {
            take(st, chunks, replica, b, mine[i], amount, now, keys, spec);
        }
        match draw {
            Draw::Took {
                left,
                tag,
                base,
                extra,
            } => {
                drawn.push(tag);
                after.push((base.saturating_sub(left as i64), b.limit));
                holds.push(Hold {
                    index: i,
                    keys: keys.clone(),
                    member: String::new(),
                    keep_ms: keep_ms(b, now),
                    keep: None,
                    _chunk: Some(extra),
                });
            }
            Draw::Ask => {
                for (h, tag) in holds.iter().zip(drawn) {
                    chunks.undraw(&h.keys[0], tag, amount as u64);
                }
                return None;
            }
        }
    }
    Some(Reserved::Taken(holds, after))
}

/// Takes a chunk of `budget` beside the request: `state.chunk` times `amount`, only while
/// 15 times that stays free for the other replicas.
#[allow(clippy::too_many_arguments)]
fn take(
    st: &Arc<dyn SharedState>,
    chunks: &BudgetChunks,
    replica: &str,
    budget: &Budget,
    mine: Nano,
    amount: Nano,
    now: i64,
    keys: &[String; 2],
    spec: ChunkSpec,
) {
    let want = amount.saturating_mul(i64::try_from(spec.requests).unwrap_or(i64::MAX));
    let spare = want.saturating_mul(ChunkSpec::SPARE as i64);
    let limit = budget.limit.saturating_sub(spare);
    if budget.limit <= 0 || limit < want || want >= i64::MAX / 2 {
        chunks.refused(&keys[0], spec.life, Instant::now());
        return;
    }
    let taking = Taking {
        st: st.clone(),
        chunks: chunks.clone(),
        replica: replica.to_string(),
        keys: keys.clone(),
        mine,
        want,
        limit,
        budget_limit: budget.limit,
        keep_ms: keep_ms(budget, now),
        spec,
    };
    // A busy key takes its next chunk (`mine` as it was at the first: the script reads it
    // only when this replica's total is missing).
    chunks.spawn_taking(&keys[0], spec, async move {
        let (chunks, key) = (&taking.chunks, &taking.keys[0]);
        keep_taking(chunks, key, spec, || taking.once(), drop).await;
    });
}

/// What a budget's takings need.
struct Taking {
    st: Arc<dyn SharedState>,
    chunks: BudgetChunks,
    replica: String,
    keys: [String; 2],
    mine: Nano,
    want: Nano,
    limit: Nano,
    /// The budget's own limit (`limit` is less what stays free for the others).
    budget_limit: Nano,
    keep_ms: i64,
    spec: ChunkSpec,
}

impl Taking {
    /// Takes a chunk: a reservation of `want` under `limit`. Answers whether it took one.
    async fn once(&self) -> bool {
        let Taking {
            st,
            chunks,
            replica,
            keys,
            mine,
            want,
            limit,
            budget_limit,
            keep_ms,
            spec,
        } = self;
        let member = format!("{}|{want}", st.member());
        let answer = st
            .run(
                &RESERVE,
                &[&keys[0], &keys[1]],
                &[
                    Arg::Str(replica),
                    Arg::Int(*mine),
                    Arg::Int(*want),
                    Arg::Int(*limit),
                    Arg::Str(&member),
                    Arg::Int(st.lease_ms() as i64),
                    Arg::Int(*keep_ms),
                ],
            )
            .await;
        let t = Instant::now();
        let chunk = match answer {
            Ok(v) if at(&v, 0) == 1 => {
                let keep = st.keep(Renewal {
                    renew: &RENEW,
                    forget: &SETTLE,
                    keys: keys.to_vec(),
                    args: vec![member.clone(), keep_ms.to_string()],
                    forget_args: vec![replica.clone(), "0".into(), member.clone(), "0".into()],
                });
                Some(Chunk {
                    left: *want as u64,
                    size: *want as u64,
                    limits: *budget_limit as u64,
                    until: t + spec.life,
                    tag: CHUNK_TAG.fetch_add(1, Ordering::Relaxed),
                    base: at(&v, 1).saturating_add(at(&v, 2)),
                    extra: Arc::new(ChunkHold {
                        st: st.clone(),
                        replica: replica.clone(),
                        keys: keys.clone(),
                        member,
                        keep_ms: *keep_ms,
                        keep,
                    }),
                })
            }
            Ok(_) => None,
            Err(e) => {
                // Sent, but no answer: the script may have run; take its place back.
                if e.may_have_run() {
                    st.undo(
                        &SETTLE,
                        keys.to_vec(),
                        vec![
                            replica.clone(),
                            mine.to_string(),
                            member,
                            keep_ms.to_string(),
                        ],
                    );
                }
                None
            }
        };
        let took = chunk.is_some();
        // A new chunk replaces the old one, which ends as its last request settles.
        drop(chunks.taken(&keys[0], chunk, spec.life, t, |_, new| Some(new)));
        took
    }
}

/// Reserves `amount` in every budget, or in none. `mine`: this replica's own total per budget.
/// Far from the limits, served from chunks taken ahead, without a call.
pub async fn reserve(
    st: &Arc<dyn SharedState>,
    chunks: &BudgetChunks,
    replica: &str,
    budgets: &[Budget],
    mine: &[Nano],
    amount: Nano,
    now: i64,
) -> Result<Reserved, StateError> {
    let all_keys: Vec<[String; 2]> = budgets
        .iter()
        .map(|b| keys(st.as_ref(), &b.principal, &b.period_key))
        .collect();
    if let Some(served) = serve(st, chunks, replica, budgets, &all_keys, mine, amount, now) {
        return Ok(served);
    }
    let lease = st.lease_ms() as i64;
    let calls = budgets
        .iter()
        .zip(mine)
        .zip(all_keys)
        .map(|((b, m), keys)| {
            let member = format!("{}|{amount}", st.member());
            let keep = keep_ms(b, now);
            async move {
                let r = st
                    .run(
                        &RESERVE,
                        &[&keys[0], &keys[1]],
                        &[
                            Arg::Str(replica),
                            Arg::Int(*m),
                            Arg::Int(amount),
                            Arg::Int(b.limit),
                            Arg::Str(&member),
                            Arg::Int(lease),
                            Arg::Int(keep),
                        ],
                    )
                    .await;
                (keys, member, keep, r)
            }
        });
    // One round trip for all budgets: the calls share the pipelined connection.
    let answers = futures_util::future::join_all(calls).await;
    let mut holds = Vec::with_capacity(answers.len());
    let mut after = Vec::with_capacity(answers.len());
    let mut refused = None;
    let mut failed = None;
    for (i, (keys, member, keep_ms, r)) in answers.into_iter().enumerate() {
        match r {
            Ok(v) if at(&v, 0) == 1 => {
                let keep = st.keep(Renewal {
                    renew: &RENEW,
                    forget: &SETTLE,
                    keys: keys.to_vec(),
                    args: vec![member.clone(), keep_ms.to_string()],
                    // Ends the reservation and raises no total.
                    forget_args: vec![replica.to_string(), "0".into(), member.clone(), "0".into()],
                });
                after.push((at(&v, 1) + at(&v, 2), budgets[i].limit));
                holds.push(Hold {
                    index: i,
                    keys,
                    member,
                    keep_ms,
                    keep: Some(keep),
                    _chunk: None,
                });
            }
            Ok(_) => refused = refused.or(Some(i)),
            Err(e) => {
                // Sent, but no answer: the script may have run; take its place back.
                if e.may_have_run() {
                    st.undo(
                        &SETTLE,
                        keys.to_vec(),
                        vec![
                            replica.to_string(),
                            mine[i].to_string(),
                            member,
                            keep_ms.to_string(),
                        ],
                    );
                }
                failed = Some(e);
            }
        }
    }
    if refused.is_some() || failed.is_some() {
        for h in &holds {
            settle(st, replica, h, mine[h.index]);
        }
    }
    // A budget that said no decides, whatever became of the others: falling back to local
    // state then would admit what the shared total refused.
    if let Some(i) = refused {
        return Ok(Reserved::Refused(i));
    }
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(Reserved::Taken(holds, after))
}

/// Gives a reservation back and raises this replica's total to `mine` (sent a few milliseconds
/// later, in one call with the other settlements of the same budget).
pub fn settle(st: &Arc<dyn SharedState>, replica: &str, h: &Hold, mine: Nano) {
    if let Some(k) = &h.keep {
        k.stop();
    }
    st.run_batched(
        &SETTLE,
        h.keys.to_vec(),
        vec![
            replica.to_string(),
            mine.to_string(),
            h.member.clone(),
            h.keep_ms.to_string(),
        ],
    );
}

/// The call that puts this replica's total for one account back (after the server lost its
/// data), for [`put_back`].
pub fn repair(
    st: &dyn SharedState,
    replica: &str,
    principal: &str,
    period_key: &str,
    mine: Nano,
) -> (Vec<String>, Vec<String>) {
    let keep = if period_key == "total" {
        0
    } else {
        KEEP_UNKNOWN_MS
    };
    (
        keys(st, principal, period_key).to_vec(),
        vec![
            replica.to_string(),
            mine.to_string(),
            String::new(),
            keep.to_string(),
        ],
    )
}

/// Sends [`repair`] calls, paced (`SharedState::run_paced`).
pub fn put_back(st: &Arc<dyn SharedState>, calls: Vec<(Vec<String>, Vec<String>)>) {
    if !calls.is_empty() {
        st.run_paced(&SETTLE, calls);
    }
}

/// All replicas' spend and live reservations for one account.
pub async fn totals(
    st: &Arc<dyn SharedState>,
    principal: &str,
    period_key: &str,
) -> Result<(Nano, Nano), StateError> {
    let k = keys(st.as_ref(), principal, period_key);
    let v = st.run(&TOTALS, &[&k[0], &k[1]], &[]).await?;
    Ok((at(&v, 0), at(&v, 1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::period::Period;
    use gateway_filter::testing::FakeState;

    fn budget(principal: &str) -> Budget {
        Budget {
            principal: principal.into(),
            period: Period::Total,
            period_key: "total".into(),
            limit: 1_000,
        }
    }

    #[tokio::test]
    async fn a_budget_that_refuses_decides_even_when_another_fails() {
        let timeout = StateError::Timeout(std::time::Duration::from_millis(20));
        for answers in [
            vec![Ok(vec![0, 1_000, 0]), Err(timeout.clone())],
            vec![Err(timeout.clone()), Ok(vec![0, 1_000, 0])],
            vec![
                Err(StateError::Failed("broken pipe".into())),
                Ok(vec![0, 1_000, 0]),
            ],
        ] {
            let refused_at = answers.iter().position(|a| a.is_ok()).unwrap();
            let fake = Arc::new(FakeState {
                answers: std::sync::Mutex::new(answers.into()),
                ..Default::default()
            });
            let st: Arc<dyn SharedState> = fake.clone();
            let both = [budget("team"), budget("*global*")];
            let chunks = BudgetChunks::default();
            let r = reserve(&st, &chunks, "r1", &both, &[0, 0], 10, 0).await;
            // Not an error: an error falls back to this replica's own book, which would let
            // through what the shared total refused.
            assert!(matches!(r, Ok(Reserved::Refused(i)) if i == refused_at));
            // The call that got no answer may have taken its place: given back.
            assert_eq!(*fake.detached.lock().unwrap(), ["budget_settle"]);
        }
    }
}
