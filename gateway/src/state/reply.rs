//! Scripts' integer answers, packed into one string.
//!
//! redis-rs reads every element of a reply through its parser-combinator codec, about a
//! thousand instructions each: a script answering eight integers cost the gateway more to
//! read than Redis to run. So a script that answers integers runs wrapped: the same body,
//! its table packed by Redis's `struct` library into one string of 8-byte big-endian
//! integers, read here in one step. The conversion is Redis's own for a Lua number in a
//! reply (a C cast to a 64-bit integer, truncating), so answers are unchanged.

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
            Value::BulkString(b) if b.len() % 8 == 0 => Ok(Ints(
                b.chunks_exact(8)
                    .map(|c| {
                        let mut n = [0u8; 8];
                        n.copy_from_slice(c);
                        i64::from_be_bytes(n)
                    })
                    .collect(),
            )),
            // A script run as written (its answer is an array of integers).
            Value::Array(items) => items
                .into_iter()
                .map(i64::from_redis_value)
                .collect::<Result<_, _>>()
                .map(Ints),
            other => Err(format!("a script's packed integers, got {other:?}").into()),
        }
    }
}

/// `source` run as a function whose table of numbers is answered packed. An error reply
/// (`{err = ...}`) or a non-table answer passes through as it is.
pub(super) fn packed(source: &str) -> String {
    format!(
        "local r = (function()\n{source}\nend)()\n\
         if type(r) ~= 'table' or r.err or r.ok then return r end\n\
         return struct.pack(string.rep('>i8', #r), unpack(r))\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_integers_are_read_in_order_with_their_signs() {
        let mut b = Vec::new();
        for n in [1i64, -20_000_000_000, 0, i64::MAX] {
            b.extend_from_slice(&n.to_be_bytes());
        }
        assert_eq!(
            Ints::from_redis_value(Value::BulkString(b)).unwrap(),
            Ints(vec![1, -20_000_000_000, 0, i64::MAX])
        );
        assert_eq!(
            Ints::from_redis_value(Value::BulkString(Vec::new())).unwrap(),
            Ints(vec![])
        );
    }

    #[test]
    fn an_unpacked_array_still_reads_and_anything_else_is_an_error() {
        let a = Value::Array(vec![Value::Int(3), Value::Int(-4)]);
        assert_eq!(Ints::from_redis_value(a).unwrap(), Ints(vec![3, -4]));
        assert!(Ints::from_redis_value(Value::BulkString(vec![0; 7])).is_err());
        assert!(Ints::from_redis_value(Value::Nil).is_err());
    }
}
