//! JSON bodies read as a tree, refusing a name that appears twice in one object.
//!
//! serde_json keeps the last of two equal names, and so do Python's parsers (vLLM) and
//! nlohmann's (llama.cpp's server), but Go's `encoding/json` (Ollama) decodes a repeated object into the same map or
//! struct, merging the two: `"options":{"num_ctx":131072},"options":{"num_predict":64}` is
//! `{num_predict: 64}` to the gateway and both fields to Ollama. A body whose meaning depends
//! on the parser cannot be checked, so it is refused.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::map::Entry;
use serde_json::{Map, Number, Value};

/// What `parse` refuses.
#[derive(Debug)]
pub enum StrictError {
    /// Not JSON (or trailing bytes after it).
    Syntax(serde_json::Error),
    /// A name appears twice in one object (the error says which).
    Duplicate(serde_json::Error),
}

/// Parses `bytes` as one JSON document, as `serde_json::from_slice::<Value>` does, but refuses
/// an object with the same name twice, at any depth.
pub fn parse(bytes: &[u8]) -> Result<Value, StrictError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let classify = |e: serde_json::Error| match e.classify() {
        // A tree takes every value: a data error can only be this visitor's own.
        serde_json::error::Category::Data => StrictError::Duplicate(e),
        _ => StrictError::Syntax(e),
    };
    let v = Strict.deserialize(&mut de).map_err(classify)?;
    de.end().map_err(classify)?;
    Ok(v)
}

struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(v) = seq.next_element_seed(Strict)? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            match map.entry(key) {
                Entry::Occupied(seen) => {
                    return Err(de::Error::custom(format_args!(
                        "the field {:?} appears twice in one object",
                        gateway_filter::echo(seen.key())
                    )));
                }
                Entry::Vacant(slot) => {
                    slot.insert(access.next_value_seed(Strict)?);
                }
            }
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_tree_as_serde_json_or_a_refusal_of_repeated_names() {
        let ok = r#"{"model":"m","n":-1,"big":18446744073709551615,"f":1.5e3,"t":true,"z":null,"s":"\u006d\n","a":[{"x":1},{"x":2}],"o":{"x":{"x":[]}}}"#;
        assert_eq!(
            parse(ok.as_bytes()).unwrap(),
            serde_json::from_str::<Value>(ok).unwrap()
        );
        for dup in [
            r#"{"model":"a","model":"b"}"#,
            r#"{"options":{"num_ctx":131072},"options":{"num_predict":64}}"#,
            r#"{"messages":[{"role":"user","content":"x","content":"y"}]}"#,
            r#"{"a":{"b":{"c":1,"c":1}}}"#,
            // Escaped spellings of one name are one name.
            r#"{"model":"a","\u006dodel":"b"}"#,
        ] {
            match parse(dup.as_bytes()) {
                Err(StrictError::Duplicate(e)) => {
                    assert!(e.to_string().contains("appears twice"), "{dup}: {e}")
                }
                other => panic!("{dup}: {other:?}"),
            }
        }
        // Names that differ only in case are different names here (Go's folding is refused
        // separately, by the exact-name check).
        assert!(parse(br#"{"model":"a","Model":"b"}"#).is_ok());
        for bad in [&b"{\"a\":1} x"[..], b"{\"a\":}", b"", b"[1,]"] {
            assert!(matches!(parse(bad), Err(StrictError::Syntax(_))), "{bad:?}");
        }
    }
}
