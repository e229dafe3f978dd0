//! Human units in the config file: durations like `10s`, `500ms`, `1h 30m`; sizes like `1MiB`.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The longest duration a setting may have: a year and a day.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 86_400);

/// A duration written as `10s`, `250ms`, `2m`, `1h 30m`, at most [`MAX_DURATION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 10s, 500ms, 2m or 1h")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<HumanDuration, E> {
                let d = humantime::parse_duration(s.trim()).map_err(|e| {
                    E::custom(format!(
                        "invalid duration {s:?} ({e}); write it like 10s, 500ms, 2m or 1h"
                    ))
                })?;
                // Deadlines are added to the clock: a duration past any use would overflow it.
                if d > MAX_DURATION {
                    return Err(E::custom(format!(
                        "duration {s:?} is longer than the most a setting may be (366d)"
                    )));
                }
                Ok(HumanDuration(d))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<HumanDuration, E> {
                Err(E::custom(
                    "a bare number is ambiguous here; give a unit, e.g. 10s or 500ms",
                ))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                self.visit_u64(v.unsigned_abs())
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod duration_tests {
    use super::*;

    /// Deadlines are the clock plus a setting: a setting past a year (which would overflow
    /// the clock at the first request) is a config error, not a panic later.
    #[test]
    fn durations_longer_than_a_year_and_a_day_are_refused() {
        let parse = |s: &str| serde_json::from_value::<HumanDuration>(serde_json::json!(s));
        assert_eq!(parse("366d").unwrap().0, MAX_DURATION);
        for s in ["367d", "18446744073709551615s"] {
            let e = parse(s).unwrap_err().to_string();
            assert!(e.contains("longer than the most"), "{s}: {e}");
        }
    }
}

/// A byte size written as `1MiB`, `512KiB`, `2MB` or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanSize(pub u64);

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HumanSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 1MiB, 512KiB or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<HumanSize, E> {
                s.trim()
                    .parse::<bytesize::ByteSize>()
                    .map(|b| HumanSize(b.as_u64()))
                    .map_err(|e| {
                        E::custom(format!(
                            "invalid size {s:?} ({e}); write it like 1MiB or 512KiB"
                        ))
                    })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanSize, E> {
                Ok(HumanSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanSize, E> {
                u64::try_from(v)
                    .map(HumanSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        let d: HumanDuration = serde_json::from_str("\"10s\"").unwrap();
        assert_eq!(d.0, Duration::from_secs(10));
        let d: HumanDuration = serde_json::from_str("\"250ms\"").unwrap();
        assert_eq!(d.0, Duration::from_millis(250));
        assert!(serde_json::from_str::<HumanDuration>("10").is_err());
        let s: HumanSize = serde_json::from_str("\"1MiB\"").unwrap();
        assert_eq!(s.0, 1 << 20);
        let s: HumanSize = serde_json::from_str("\"512KiB\"").unwrap();
        assert_eq!(s.0, 512 << 10);
        let s: HumanSize = serde_json::from_str("4096").unwrap();
        assert_eq!(s.0, 4096);
        assert!(serde_json::from_str::<HumanSize>("\"lots\"").is_err());
    }
}
