//! Typed values that filter options and the keys file share: request rates (`10/m`) and
//! budget periods (`1mo`). Parsed once when the file is read, so a typo fails `check` and
//! nothing is parsed on the request path.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Requests per period, as written in the config (`10/s`, `600/m`, `1000/h`, `5/d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
}

impl Rate {
    pub fn parse(s: &str) -> Result<Rate, String> {
        let (n, unit) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a rate; write it like 10/s, 600/m or 1000/h"))?;
        let count: u64 = n
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: {n:?} is not a whole number of requests"))?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            other => return Err(format!("{s:?}: unknown period {other:?}; use s, m, h or d")),
        };
        if count == 0 {
            return Err(format!("{s:?}: the rate must allow at least 1 request"));
        }
        Ok(Rate { count, per })
    }

    /// The emission interval T: one request per T.
    pub fn interval_ns(&self) -> u64 {
        (self.per.as_nanos() / u128::from(self.count)).max(1) as u64
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Rate::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A budget period in UTC: calendar day, ISO week (from Monday), calendar month, all time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Week,
    Month,
    Total,
}

impl Period {
    pub fn parse(s: &str) -> Result<Period, String> {
        Ok(match s.trim() {
            "1d" | "day" => Period::Day,
            "7d" | "week" => Period::Week,
            "1mo" | "month" => Period::Month,
            "total" => Period::Total,
            other => {
                return Err(format!(
                    "unknown period {other:?}; use 1d, 7d, 1mo or total"
                ))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Period::Day => "1d",
            Period::Week => "7d",
            Period::Month => "1mo",
            Period::Total => "total",
        }
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Period::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        assert_eq!(Rate::parse("10/s").unwrap().interval_ns(), 100_000_000);
        assert_eq!(Rate::parse("600/m").unwrap().interval_ns(), 100_000_000);
        assert_eq!(Rate::parse(" 1000/h ").unwrap().count, 1000);
        for bad in ["10", "0/s", "x/s", "10/w", "-1/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Period::parse("1mo"), Ok(Period::Month));
        assert!(Period::parse("1y").is_err());
        let r: Result<Rate, _> = serde_json::from_value(serde_json::json!("10/fortnight"));
        assert!(r.unwrap_err().to_string().contains("unknown period"));
    }
}
