//! The one canonical form of a request path.
//!
//! Rules are matched on it and exactly it is sent upstream, so the gateway and the model
//! server can never disagree about which route was asked for. Anything that cannot be made
//! canonical without guessing is refused (`PathError`, answered 400):
//!
//! | input | canonical form |
//! |---|---|
//! | origin-form target `/a/b?q` | path `/a/b`, query `q` kept byte for byte |
//! | absolute-form `http://h/a`, asterisk `*`, anything not starting with `/` | refused |
//! | `#` anywhere (fragments never travel in HTTP) | refused (the HTTP parser already drops a fragment from the request target: `/api/chat#x` arrives as `/api/chat`) |
//! | `%XX` of an unreserved character (`A-Z a-z 0-9 - . _ ~`) | decoded: `/api/%63hat` → `/api/chat` |
//! | other `%XX` | kept, hex upper-cased: `%3a` → `%3A` |
//! | `%2F`, `%5C` (slash, backslash inside a segment) | refused |
//! | `%00`–`%1F`, `%7F`, malformed `%` | refused |
//! | raw control bytes, space, `\`, `;` (matrix parameters) | refused |
//! | repeated slashes `//` | one slash |
//! | `.` segments | removed |
//! | `..` segments | remove the previous segment; above the root: refused |
//! | trailing slash | removed (except for `/` itself) |
//! | letter case | kept: routes are case-sensitive, as in Ollama and OpenAI servers |

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathError(pub &'static str);

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// A request target split into canonical path and untouched query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub path: String,
    pub query: Option<String>,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes every `%XX` of a canonical path piece (e.g. a model name in `/v1/models/{id}`);
/// `None` when the result is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Canonicalises a raw request target (`/path?query`).
pub fn canonicalize(raw: &[u8]) -> Result<Target, PathError> {
    if raw.first() != Some(&b'/') {
        return Err(PathError("the request target must be a path starting with / (absolute-form and * are not accepted)"));
    }
    if raw.contains(&b'#') {
        return Err(PathError(
            "the request target must not contain a fragment (#)",
        ));
    }
    let (path, query) = match raw.iter().position(|&b| b == b'?') {
        Some(i) => (&raw[..i], Some(&raw[i + 1..])),
        None => (raw, None),
    };
    let query = match query {
        None => None,
        Some(q) if q.iter().any(|b| b.is_ascii_control() || *b == b' ') => {
            return Err(PathError("the query string contains control characters"))
        }
        Some(q) => Some(
            String::from_utf8(q.to_vec())
                .map_err(|_| PathError("the query string is not valid UTF-8"))?,
        ),
    };

    // Decode segment by segment, resolving dot segments as we go.
    let mut segments: Vec<Vec<u8>> = Vec::new();
    for seg in path.split(|&b| b == b'/') {
        let mut out = Vec::with_capacity(seg.len());
        let mut i = 0;
        while i < seg.len() {
            let b = seg[i];
            match b {
                b'%' => {
                    let (Some(h), Some(l)) = (
                        seg.get(i + 1).and_then(|&c| hex(c)),
                        seg.get(i + 2).and_then(|&c| hex(c)),
                    ) else {
                        return Err(PathError("malformed percent-encoding in the path"));
                    };
                    let v = h * 16 + l;
                    match v {
                        b'/' | b'\\' => {
                            return Err(PathError(
                                "encoded slash or backslash (%2F, %5C) in the path",
                            ))
                        }
                        0..=0x1f | 0x7f => {
                            return Err(PathError("encoded control character in the path"))
                        }
                        _ if is_unreserved(v) => out.push(v),
                        _ => out.extend_from_slice(format!("%{v:02X}").as_bytes()),
                    }
                    i += 3;
                    continue;
                }
                b'\\' => return Err(PathError("backslash in the path")),
                b';' => return Err(PathError("parameters (;) in the path are not accepted")),
                _ if b.is_ascii_control() || b == b' ' || b >= 0x80 => {
                    return Err(PathError(
                        "control, space or non-ASCII byte in the path (percent-encode it)",
                    ))
                }
                _ => out.push(b),
            }
            i += 1;
        }
        match out.as_slice() {
            b"" | b"." => {}
            b".." => {
                if segments.pop().is_none() {
                    return Err(PathError("the path climbs above the root (..)"));
                }
            }
            _ => segments.push(out),
        }
    }
    let mut canonical = String::with_capacity(path.len());
    for s in &segments {
        canonical.push('/');
        // Only ASCII bytes were kept above.
        canonical.push_str(
            std::str::from_utf8(s).map_err(|_| PathError("the path is not valid UTF-8"))?,
        );
    }
    if canonical.is_empty() {
        canonical.push('/');
    }
    Ok(Target {
        path: canonical,
        query,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        canonicalize(raw.as_bytes())
            .unwrap_or_else(|e| panic!("{raw}: {e}"))
            .path
    }

    fn refused(raw: &str) {
        assert!(
            canonicalize(raw.as_bytes()).is_err(),
            "{raw} must be refused"
        );
    }

    #[test]
    fn canonical_forms() {
        assert_eq!(ok("/api/chat"), "/api/chat");
        assert_eq!(ok("/api//chat/"), "/api/chat");
        assert_eq!(ok("//api/./chat"), "/api/chat");
        assert_eq!(ok("/api/x/../chat"), "/api/chat");
        assert_eq!(ok("/api/%63hat"), "/api/chat");
        assert_eq!(ok("/api/%2e/chat"), "/api/chat");
        assert_eq!(ok("/api/x/%2E%2E/pull"), "/api/pull");
        assert_eq!(ok("/api/blobs/sha256%3aab"), "/api/blobs/sha256%3Aab");
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("/API/Chat"), "/API/Chat");
        let t = canonicalize(b"/v1/models?x=1&y=%2F").unwrap();
        assert_eq!(
            (t.path.as_str(), t.query.as_deref()),
            ("/v1/models", Some("x=1&y=%2F"))
        );
    }

    #[test]
    fn refusals() {
        for raw in [
            "http://evil/api/pull",
            "*",
            "api/chat",
            "/api/chat#x",
            "/api%2Fpull",
            "/api%2fpull",
            "/api%5Cpull",
            "/api\\pull",
            "/api/pull;x=1",
            "/api/pu%00ll",
            "/api/p%0all",
            "/api/%zz",
            "/api/%4",
            "/../api/pull",
            "/api/../../x",
            "/api/ch at",
            "/api/ch\u{7f}at",
            "/api/é",
        ] {
            refused(raw);
        }
    }
}
