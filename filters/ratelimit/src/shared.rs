//! The limiter's scripts for shared state (several replicas on one Redis): the same
//! arithmetic as [`crate::gcra`] and [`crate::LocalStore`], run atomically on the server with
//! the server's clock, so replicas with skewed clocks still agree.

use gateway_filter::state::Script;

/// GCRA in microseconds. KEYS: the TAT. ARGV: interval µs, burst.
/// Answers `{1, delay µs, remaining, reset µs}` or `{0, retry µs}`.
pub static GCRA: Script = Script {
    name: "gcra",
    source: r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat - now > tau then
  return {0, tat - now - tau}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1)
local cap = now + tau + interval
return {1, tat - now, math.floor((cap - math.min(new_tat, cap)) / interval), new_tat - now}
"#,
};

/// Reserves tokens in the key's window. KEYS: the window. ARGV: window ms, tokens, limit.
/// Answers `{taken, used, window start ms, ms left}`.
pub static TOKENS_RESERVE: Script = Script {
    name: "tokens_reserve",
    source: r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local w = tonumber(ARGV[1])
local start = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
local used = tonumber(redis.call('HGET', KEYS[1], 'u') or '0')
if start == 0 or now >= start + w then start = now; used = 0 end
local taken = 0
if used + tonumber(ARGV[2]) <= tonumber(ARGV[3]) then
  used = used + tonumber(ARGV[2]); taken = 1
end
redis.call('HSET', KEYS[1], 's', string.format('%.0f', start), 'u', string.format('%.0f', used))
redis.call('PEXPIRE', KEYS[1], w * 2)
return {taken, used, start, start + w - now}
"#,
};

/// Replaces a reservation by the real usage: in the window it was taken from, or added to the
/// current one. ARGV: window ms, reservation's window start ms, reserved, used.
pub static TOKENS_SETTLE: Script = Script {
    name: "tokens_settle",
    source: r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local w = tonumber(ARGV[1])
local start = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
local used = tonumber(redis.call('HGET', KEYS[1], 'u') or '0')
if start == 0 or now >= start + w then start = now; used = 0 end
if start == tonumber(ARGV[2]) then
  used = math.max(0, used - tonumber(ARGV[3])) + tonumber(ARGV[4])
else
  used = used + tonumber(ARGV[4])
end
redis.call('HSET', KEYS[1], 's', string.format('%.0f', start), 'u', string.format('%.0f', used))
redis.call('PEXPIRE', KEYS[1], w * 2)
return {used}
"#,
};
