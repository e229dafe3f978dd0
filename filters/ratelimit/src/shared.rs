//! The limiter's scripts for shared state (several replicas on one Redis): the same
//! arithmetic as [`crate::gcra`] and [`crate::LocalStore`], run atomically on the server with
//! the server's clock, so replicas with skewed clocks still agree.

use gateway_filter::state::Script;

/// GCRA in microseconds on the TAT in `key`, interval µs, burst, at server time `t`.
/// Answers `{1, delay µs, remaining, reset µs, the new TAT µs}` or `{0, retry µs}`.
macro_rules! gcra_lua {
    () => {
        r#"
local function gcra(key, interval, burst, t)
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local tau = interval * burst
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  -- Never further ahead than this rate can put it: a slower rate's (before a reload) would
  -- keep refusing for its own interval. Kept so, also by a refusal.
  if tat > now + tau + interval then
    tat = now + tau + interval
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1)
  end
  if tat - now > tau then
    return {0, tat - now - tau}
  end
  local new_tat = tat + interval
  redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1)
  local cap = now + tau + interval
  return {1, tat - now, math.floor((cap - math.min(new_tat, cap)) / interval), new_tat - now, new_tat}
end
"#
    };
}

/// Gives back one request a GCRA check counted (its verdict was never applied: an earlier
/// check refused the request). KEYS: the TAT. ARGV: interval µs, the TAT the count set.
/// Once that TAT has passed, the count weighs on nothing any more (and the bucket may have
/// started afresh since, with counts that must stay): nothing is given back.
pub static GCRA_UNDO: Script = Script {
    name: "gcra_undo",
    source: r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if tonumber(ARGV[2]) <= now then
  return {0}
end
local back = tonumber(redis.call('GET', KEYS[1]) or '0') - tonumber(ARGV[1])
if back <= now then
  redis.call('DEL', KEYS[1])
  return {0}
end
redis.call('SET', KEYS[1], string.format('%.0f', back), 'PX', math.floor((back - now) / 1000) + 1)
return {1}
"#,
};

/// Reserves `n` tokens under `limit` in the window `key` of `w` ms, at server time `t`.
/// Answers `{taken, used, window start ms, ms left}`.
macro_rules! tokens_lua {
    () => {
        r#"
local function tokens(key, w, n, limit, t)
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local h = redis.call('HMGET', key, 's', 'u')
  local start = tonumber(h[1] or '0')
  local used = tonumber(h[2] or '0')
  local changed = false
  if start == 0 or now >= start + w then start = now; used = 0; changed = true end
  local taken = 0
  if used + n <= limit then
    used = used + n; taken = 1; changed = true
  end
  if changed then
    redis.call('HSET', key, 's', string.format('%.0f', start), 'u', string.format('%.0f', used))
  end
  -- The key lives at least two windows from its window's start: set when the window starts
  -- (and by each settlement), not on every check.
  if start == now then redis.call('PEXPIRE', key, w * 2) end
  return {taken, used, start, start + w - now}
end
"#
    };
}

/// KEYS: the TAT. ARGV: interval µs, burst.
pub static GCRA: Script = Script {
    name: "gcra",
    source: concat!(
        gcra_lua!(),
        "return gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), redis.call('TIME'))"
    ),
};

/// KEYS: the window. ARGV: window ms, tokens, limit.
pub static TOKENS_RESERVE: Script = Script {
    name: "tokens_reserve",
    source: concat!(
        tokens_lua!(),
        "return tokens(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), redis.call('TIME'))"
    ),
};

/// Both in one round trip: the rate, then (if it passed) the tokens. KEYS: the TAT, the
/// window. ARGV: interval µs, burst, window ms, tokens, limit. Answers the rate's answer,
/// or, when the rate passed, its first four numbers, the tokens' answer and the new TAT.
pub static RATE_AND_TOKENS: Script = Script {
    name: "rate_and_tokens",
    source: concat!(
        gcra_lua!(),
        tokens_lua!(),
        r#"
local t = redis.call('TIME')
local r = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), t)
if r[1] == 0 then return r end
local k = tokens(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), t)
return {r[1], r[2], r[3], r[4], k[1], k[2], k[3], k[4], r[5]}
"#
    ),
};

/// Replaces reservations by the real usage: in the window each was taken from, or added to
/// the current one. ARGV, per settlement (several arrive in one call, see
/// `SharedState::run_batched`): window ms, reservation's window start ms, reserved, used.
pub static TOKENS_SETTLE: Script = Script {
    name: "tokens_settle",
    source: r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local w = tonumber(ARGV[1])
local start = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
local used = tonumber(redis.call('HGET', KEYS[1], 'u') or '0')
if start == 0 or now >= start + w then start = now; used = 0 end
for i = 1, #ARGV, 4 do
  if start == tonumber(ARGV[i + 1]) then
    used = math.max(0, used - tonumber(ARGV[i + 2])) + tonumber(ARGV[i + 3])
  else
    used = used + tonumber(ARGV[i + 3])
  end
end
redis.call('HSET', KEYS[1], 's', string.format('%.0f', start), 'u', string.format('%.0f', used))
redis.call('PEXPIRE', KEYS[1], w * 2)
return {used}
"#,
};

/// Takes a chunk of the rate ahead (see `gateway_filter::chunk`): `n` requests, or fewer so
/// that `spare` times the chunk stays free after it, and none when that leaves fewer than
/// `min`. KEYS: the TAT. ARGV: interval µs, burst, n, spare, min. Answers `{taken,
/// remaining, reset µs, the new TAT µs}`, or `{0, free}`.
pub static GCRA_TAKE: Script = Script {
    name: "gcra_take",
    source: r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
-- As many requests as GCRA would let through now, one after the other.
local free = math.floor((now + interval * tonumber(ARGV[2]) + interval - tat) / interval)
local n = math.min(tonumber(ARGV[3]), math.floor(free / (tonumber(ARGV[4]) + 1)))
if n < tonumber(ARGV[5]) then
  return {0, free}
end
local new_tat = tat + n * interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1)
return {n, free - n, new_tat - now, new_tat}
"#,
};
