//! The `usage` strategy's figures shared by replicas: every second each replica adds the
//! tokens its backends served since the last sync to a per-backend window in Redis,
//! publishes the output tokens its requests in flight still hold there, and reads back all
//! replicas' totals, so each replica routes on what every backend is really doing.

use std::sync::Arc;
use std::time::Duration;

use gateway_filter::state::{at, Arg, Script};
use gateway_filter::SharedState;

use super::pool::BackendPool;

/// KEYS: served (hash of 30 s buckets), reserved (sorted set, one `REPLICA|TOKENS` member per
/// replica, scored by expiry). ARGV: tokens served since the last sync, replica, tokens it
/// holds now, member lifetime ms. Answers `{served in the sliding minute, reserved by all}`.
static SYNC: Script = Script {
    name: "usage_sync",
    source: r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local bucket = math.floor(now / 30000)
local delta = tonumber(ARGV[1])
if delta > 0 then
  redis.call('HINCRBY', KEYS[1], tostring(bucket), delta)
  redis.call('HDEL', KEYS[1], tostring(bucket - 2))
  redis.call('PEXPIRE', KEYS[1], 120000)
end
local cur = tonumber(redis.call('HGET', KEYS[1], tostring(bucket)) or '0')
local prev = tonumber(redis.call('HGET', KEYS[1], tostring(bucket - 1)) or '0')
local into = (now - bucket * 30000) / 30000
local served = cur + math.floor(prev * (1 - into))
local ttl = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local mine = ARGV[2] .. '|'
local reserved = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if string.sub(m, 1, #mine) == mine then
    redis.call('ZREM', KEYS[2], m)
  else
    reserved = reserved + (tonumber(string.match(m, '|(%d+)$')) or 0)
  end
end
redis.call('ZADD', KEYS[2], now + ttl, mine .. ARGV[3])
redis.call('PEXPIRE', KEYS[2], ttl * 2)
return {served, reserved + tonumber(ARGV[3])}
"#,
};

const EVERY: Duration = Duration::from_secs(1);

/// The sync, for the router's background thread; `None` without shared state.
pub fn syncer(pool: BackendPool) -> Option<impl std::future::Future<Output = ()> + Send> {
    let state = pool.state().cloned()?;
    Some(run(pool, state))
}

async fn run(pool: BackendPool, state: Arc<dyn SharedState>) {
    let replica = state.member();
    let keys: Vec<[String; 2]> = pool
        .iter()
        .map(|b| {
            [
                state.key(&["usage:served"], &[&b.name]),
                state.key(&["usage:reserved"], &[&b.name]),
            ]
        })
        .collect();
    let ttl = (EVERY * 3).as_millis() as i64;
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (i, [served, reserved]) in keys.iter().enumerate() {
            let b = pool.get(i);
            let delta = b.take_unsynced();
            let r = state
                .run(
                    &SYNC,
                    &[served, reserved],
                    &[
                        Arg::Int(i64::try_from(delta).unwrap_or(i64::MAX)),
                        Arg::Str(&replica),
                        Arg::Int(i64::try_from(b.reserved_tokens()).unwrap_or(i64::MAX)),
                        Arg::Int(ttl),
                    ],
                )
                .await;
            match r {
                Ok(v) => {
                    b.set_shared_usage(Some((at(&v, 0).max(0) as u64, at(&v, 1).max(0) as u64)))
                }
                Err(_) => {
                    // Counted again next time; until then this replica's own figures.
                    b.return_unsynced(delta);
                    b.set_shared_usage(None);
                }
            }
        }
    }
}
