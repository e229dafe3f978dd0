//! W3C Trace Context `traceparent` (<https://www.w3.org/TR/trace-context/>): read from the
//! client, written to the backend.

use gateway_filter::http::{HeaderMap, HeaderValue};

/// Length of a version-00 `traceparent`: `00-` 32 hex `-` 16 hex `-` 2 hex.
const LEN: usize = 55;

/// A parsed `traceparent`: the trace, the caller's span, whether the caller samples it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

/// The request's `traceparent`, if it carries exactly one valid one (the specification says
/// to ignore the header otherwise and start a new trace).
pub fn from_headers(headers: &HeaderMap) -> Option<TraceParent> {
    let mut all = headers.get_all("traceparent").iter();
    let value = all.next()?;
    if all.next().is_some() {
        return None;
    }
    parse(value.as_bytes())
}

pub fn parse(v: &[u8]) -> Option<TraceParent> {
    if v.len() < LEN || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex(&v[0..2])? as u8;
    // Version ff is invalid; 00 has exactly this length; a later version may append fields
    // after a `-`, and its first four fields are read as version 00's.
    if version == 0xff || (version == 0 && v.len() != LEN) || (v.len() > LEN && v[LEN] != b'-') {
        return None;
    }
    let trace_id = hex(&v[3..35])?;
    let span_id = hex(&v[36..52])? as u64;
    let flags = hex(&v[53..55])? as u8;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some(TraceParent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

/// Lowercase hex only, as the specification requires.
fn hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |acc, d| {
        let n = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | u128::from(n))
    })
}

/// `00-{trace}-{span}-{flags}` for the request sent to the backend.
pub fn header(trace_id: u128, span_id: u64, sampled: bool) -> HeaderValue {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; LEN];
    out[..3].copy_from_slice(b"00-");
    for i in 0..32 {
        out[3 + i] = DIGITS[(trace_id >> (124 - 4 * i) & 0xf) as usize];
    }
    out[35] = b'-';
    for i in 0..16 {
        out[36 + i] = DIGITS[(span_id >> (60 - 4 * i) & 0xf) as usize];
    }
    out[52] = b'-';
    out[53] = b'0';
    out[54] = if sampled { b'1' } else { b'0' };
    // Only hex digits and dashes: always a valid header value.
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_the_specifications_example() {
        let t = parse(GOOD.as_bytes()).unwrap();
        assert_eq!(t.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(t.span_id, 0x00f067aa0ba902b7);
        assert!(t.sampled);
        assert_eq!(
            header(t.trace_id, t.span_id, true).as_bytes(),
            GOOD.as_bytes()
        );
        assert!(
            !parse(&GOOD.replace("-01", "-00").into_bytes())
                .unwrap()
                .sampled
        );
    }

    #[test]
    fn refuses_what_the_specification_refuses() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad}");
        }
        // A later version's extra fields are skipped.
        assert!(parse(format!("{}-what", GOOD.replacen("00", "cc", 1)).as_bytes()).is_some());
    }

    #[test]
    fn two_traceparent_headers_are_none() {
        let mut h = HeaderMap::new();
        h.append("traceparent", HeaderValue::from_static(GOOD));
        assert!(from_headers(&h).is_some());
        h.append("traceparent", HeaderValue::from_static(GOOD));
        assert_eq!(from_headers(&h), None);
    }
}
