//! Scripts' integer answers, packed into one string.
//!
//! redis-rs reads every element of a reply through its parser-combinator codec, about a
//! thousand instructions each (a request of the benchmark's chain read 30.5k instructions
//! of answers). So a script that answers integers runs wrapped: the same body, its table
//! packed by Lua's `struct` library into one string (`#`, then 8-byte big-endian integers),
//! read here in one step. Only a table of at most 64 numbers (or numeric strings) is
//! packed, each truncated to an integer as Redis does for a number in a reply; anything
//! else (an error, a hole, a boolean, another string, a server whose Lua lacks `struct`)
//! is answered as written and read as before. Numbers beyond ±2^63, which no script
//! answers, would differ from Redis's own (undefined) conversion. On Redis 7.0 the wrapper
//! costs about 0.4 µs on the key's rate-and-tokens script, whose answer is the longest
//! (nine integers now, eight then; 15.3 → 15.7 µs).

use redis::{FromRedisValue, ParsingError, Value};

/// What a script's answer is read as, and whether its script is run packed.
pub(super) trait Reply: FromRedisValue {
    const PACKED: bool;
}

/// A script's integers.
#[derive(Debug, PartialEq)]
pub(super) struct Ints(pub Vec<i64>);

impl Reply for Ints {
    const PACKED: bool = true;
}

/// Scripts answering strings (addresses) run as written.
impl Reply for Vec<String> {
    const PACKED: bool = false;
}

impl FromRedisValue for Ints {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        match v {
            Value::BulkString(b) if b.first() == Some(&b'#') && b.len() % 8 == 1 => Ok(Ints(
                b[1..]
                    .chunks_exact(8)
                    .map(|c| {
                        let mut n = [0u8; 8];
                        n.copy_from_slice(c);
                        i64::from_be_bytes(n)
                    })
                    .collect(),
            )),
            // Answered as written: read as before.
            other => Vec::<i64>::from_redis_value(other).map(Ints),
        }
    }
}

/// `source` run as a function whose table of numbers is answered packed.
pub(super) fn packed(source: &str) -> String {
    format!(
        "local r = (function()\n{source}\nend)()\n\
         if type(r) ~= 'table' or r.err or r.ok or #r > 64 then return r end\n\
         local ok, p = pcall(function() return struct.pack(string.rep('>i8', #r), unpack(r)) end)\n\
         if ok then return '#' .. p end\n\
         return r\n"
    )
}

/// Whether the server's Lua has what [`packed`] uses (Redis and Valkey do). Under `pcall`:
/// reading a missing global is an error in Redis's Lua, not nil.
pub(super) const CAN_PACK: &str =
    "return pcall(function() return struct.pack('>i8', 1) and unpack({1}) end) and 1 or 0";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_integers_are_read_in_order_with_their_signs() {
        let mut b = vec![b'#'];
        for n in [1i64, -20_000_000_000, 0, i64::MAX] {
            b.extend_from_slice(&n.to_be_bytes());
        }
        assert_eq!(
            Ints::from_redis_value(Value::BulkString(b)).unwrap(),
            Ints(vec![1, -20_000_000_000, 0, i64::MAX])
        );
        assert_eq!(
            Ints::from_redis_value(Value::BulkString(b"#".to_vec())).unwrap(),
            Ints(vec![])
        );
    }

    #[test]
    fn whatever_is_not_packed_reads_as_before() {
        let a = Value::Array(vec![Value::Int(3), Value::Int(-4)]);
        assert_eq!(Ints::from_redis_value(a).unwrap(), Ints(vec![3, -4]));
        // Whatever is not packed reads as `Vec<i64>` read it.
        for v in [
            Value::Nil,
            Value::Int(5),
            Value::BulkString(b"12".to_vec()),
            Value::BulkString(vec![b'#'; 8]),
            Value::SimpleString("x".into()),
        ] {
            assert_eq!(
                Ints::from_redis_value(v.clone()).map_err(|e| e.to_string()),
                Vec::<i64>::from_redis_value(v)
                    .map(Ints)
                    .map_err(|e| e.to_string())
            );
        }
    }

    /// A real server (`REDIS_SERVER`, else `redis-server`) on a free port; killed on drop.
    struct Server(std::process::Child, u16);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn server() -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let bin = std::env::var_os("REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
        let child = std::process::Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (tests/bootstrap.sh installs it)");
        Server(child, port)
    }

    #[tokio::test]
    async fn packing_never_changes_what_a_script_answers() {
        let s = server();
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", s.1)).unwrap();
        let mut con = None;
        for _ in 0..100 {
            if let Ok(c) = client.get_multiplexed_async_connection().await {
                con = Some(c);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let mut con = con.expect("the server did not start");
        let can: i64 = redis::cmd("EVAL")
            .arg(CAN_PACK)
            .arg(0)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(can, 1);
        // Reading a missing global is an error in Redis's Lua: the check still answers.
        let cannot: i64 = redis::cmd("EVAL")
            .arg(CAN_PACK.replace("struct.pack", "nostruct.pack"))
            .arg(0)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(cannot, 0);
        for source in [
            "return {1, -2, 3}",
            "return {}",
            "return {-5, 1.7, -1.7, 1733000000000000, 9007199254740993}",
            "return {1, nil, 3}",
            "return {1, 'x', 3}",
            "return {true, 2}",
            "return {false, 2}",
            "return {'12', 3}",
            "return 42",
            "return 'text'",
            "return redis.error_reply('no')",
            "return redis.status_reply('fine')",
        ] {
            let eval = |text: String| {
                let mut con = con.clone();
                async move {
                    redis::cmd("EVAL")
                        .arg(text)
                        .arg(0)
                        .query_async::<Value>(&mut con)
                        .await
                }
            };
            let (plain, wrapped) = (eval(source.into()).await, eval(packed(source)).await);
            // A server without `struct` (or one failed over to) answers as written.
            let unpackable = eval(packed(source).replace("struct.pack", "nostruct.pack")).await;
            let read = |v: redis::RedisResult<Value>| {
                v.map_err(|e| e.to_string())
                    .and_then(|v| Ints::from_redis_value(v).map_err(|e| e.to_string()))
            };
            let plain = read(plain);
            for other in [read(wrapped), read(unpackable)] {
                match (&plain, other) {
                    (Ok(a), Ok(b)) => assert_eq!(a, &b, "{source}"),
                    (Err(_), Err(_)) => {}
                    (a, b) => panic!("{source}: as written {a:?}, wrapped {b:?}"),
                }
            }
        }
        // A plain table of numbers really is packed.
        let v = redis::cmd("EVAL")
            .arg(packed("return {7, -8}"))
            .arg(0)
            .query_async::<Value>(&mut con)
            .await
            .unwrap();
        assert!(matches!(&v, Value::BulkString(b) if b.len() == 17), "{v:?}");
    }
}
