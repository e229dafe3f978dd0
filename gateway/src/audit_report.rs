//! `llm-gateway audit`: questions about the audit log answered without jq or awk.
//! Reads plain, rotated and gzip'd files; tables for people, `--json` for scripts.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TopBy {
    Keys,
    Ips,
    Models,
}

/// Which lines count.
pub struct Selection {
    pub since: Option<SystemTime>,
    pub key: Option<String>,
}

impl Selection {
    pub fn new(since: Option<&str>, key: Option<String>) -> Result<Selection, String> {
        let since = match since {
            None => None,
            Some(s) => {
                let d = humantime::parse_duration(s)
                    .map_err(|e| format!("--since {s:?}: {e}; write it like 1h, 30m or 7d"))?;
                Some(SystemTime::now() - d)
            }
        };
        Ok(Selection { since, key })
    }

    fn keeps(&self, line: &Value) -> bool {
        if let Some(k) = &self.key {
            if line.get("principal").and_then(Value::as_str) != Some(k.as_str()) {
                return false;
            }
        }
        if let Some(since) = self.since {
            let ts = line
                .get("ts")
                .and_then(Value::as_str)
                .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok());
            if ts.is_none_or(|t| t < since) {
                return false;
            }
        }
        true
    }
}

fn open(path: &Path) -> Result<Box<dyn BufRead>, String> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else {
        Box::new(f)
    };
    Ok(Box::new(BufReader::new(reader)))
}

/// Every selected line of every file, in file order.
pub fn read_lines(files: &[PathBuf], sel: &Selection) -> Result<(Vec<Value>, usize), String> {
    let mut out = Vec::new();
    let mut bad = 0;
    for path in files {
        for line in open(path)?.lines() {
            let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(&line) {
                Ok(v) if sel.keeps(&v) => out.push(v),
                Ok(_) => {}
                Err(_) => bad += 1,
            }
        }
    }
    Ok((out, bad))
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("-")
}

#[derive(Default)]
struct Group {
    requests: u64,
    errors: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
}

pub fn top(lines: &[Value], by: TopBy, limit: usize) -> Vec<Value> {
    let field = match by {
        TopBy::Keys => "principal",
        TopBy::Ips => "client_ip",
        TopBy::Models => "model",
    };
    let mut groups: HashMap<&str, Group> = HashMap::new();
    for l in lines {
        let g = groups.entry(s(l, field)).or_default();
        g.requests += 1;
        g.errors += u64::from(u(l, "status") >= 400);
        g.prompt_tokens += u(l, "prompt_tokens");
        g.completion_tokens += u(l, "completion_tokens");
    }
    let mut rows: Vec<(&str, Group)> = groups.into_iter().collect();
    rows.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(b.0)));
    rows.into_iter()
        .take(limit)
        .map(|(name, g)| {
            json!({field: name, "requests": g.requests, "errors": g.errors,
                   "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens})
        })
        .collect()
}

pub fn failures(lines: &[Value], limit: usize) -> Vec<Value> {
    let mut groups: HashMap<(u64, &str), u64> = HashMap::new();
    for l in lines.iter().filter(|l| u(l, "status") >= 400) {
        *groups
            .entry((u(l, "status"), s(l, "decision")))
            .or_default() += 1;
    }
    let mut rows: Vec<_> = groups.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    rows.into_iter()
        .take(limit)
        .map(|((status, decision), n)| json!({"status": status, "decision": decision, "requests": n}))
        .collect()
}

pub fn summary(lines: &[Value]) -> Value {
    let count = |f: &dyn Fn(u64) -> bool| lines.iter().filter(|l| f(u(l, "status"))).count();
    json!({
        "requests": lines.len(),
        "ok": count(&|s| (200..400).contains(&s)),
        "client_errors": count(&|s| (400..500).contains(&s)),
        "server_errors": count(&|s| s >= 500),
        "prompt_tokens": lines.iter().map(|l| u(l, "prompt_tokens")).sum::<u64>(),
        "completion_tokens": lines.iter().map(|l| u(l, "completion_tokens")).sum::<u64>(),
        "principals": lines.iter().map(|l| s(l, "principal")).collect::<std::collections::HashSet<_>>().len(),
        // By time, not by file order: `audit audit.jsonl*` reads the live file first.
        "first": lines.iter().map(|l| s(l, "ts")).min(),
        "last": lines.iter().map(|l| s(l, "ts")).max(),
    })
}

/// A field as a terminal shows it. What clients wrote (a model name, a path, a user agent)
/// reaches the log as JSON, escaped; decoded, its control characters (an escape sequence that
/// clears the line or retitles the window, a newline that forges a row) and the bidirectional
/// overrides (text shown in another order than it is) are written as `\u{..}` instead.
fn shown(v: Option<&Value>) -> String {
    let text = match v {
        Some(Value::String(s)) => s,
        Some(Value::Null) | None => return "-".into(),
        Some(v) => return v.to_string(),
    };
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.contains(unsafe_char) {
        return text.clone();
    }
    text.chars()
        .map(|c| {
            if unsafe_char(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A table of rows with the given columns, as people read it.
pub fn table(rows: &[Value], columns: &[&str]) -> String {
    let cell = |r: &Value, c: &str| shown(r.get(c));
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| {
            rows.iter()
                .map(|r| cell(r, c).len())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let mut out = String::new();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    out += &line(columns.iter().map(|c| c.to_uppercase()).collect());
    out.push('\n');
    for r in rows {
        out += &line(columns.iter().map(|c| cell(r, c)).collect());
        out.push('\n');
    }
    out
}

pub const FOLLOW_COLUMNS: [&str; 8] = [
    "ts",
    "principal",
    "client_ip",
    "method",
    "path",
    "model",
    "status",
    "decision",
];

/// Prints selected lines appended to `path` from now on, across rotations, until killed.
/// Polls (of 200 ms) without a new line before a rotated-away file is let go.
const MOVED_QUIET_POLLS: u32 = 10;

pub fn follow(path: &Path, sel: &Selection, as_json: bool) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let mut file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut pos = file.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    let mut pending = String::new();
    let stdout = std::io::stdout();
    // Prints the complete lines read so far; false once stdout is gone (a closed pipe).
    let show = |pending: &mut String| -> bool {
        while let Some(i) = pending.find('\n') {
            let line: String = pending.drain(..=i).collect();
            let Ok(v) = serde_json::from_str::<Value>(line.trim()) else {
                continue;
            };
            if !sel.keeps(&v) {
                continue;
            }
            let text = if as_json {
                format!("{}\n", line.trim())
            } else {
                FOLLOW_COLUMNS
                    .iter()
                    .map(|c| shown(v.get(*c)))
                    .collect::<Vec<_>>()
                    .join("  ")
                    + "\n"
            };
            let mut out = stdout.lock();
            if out
                .write_all(text.as_bytes())
                .and_then(|_| out.flush())
                .is_err()
            {
                return false;
            }
        }
        true
    };
    // The file rotated away, still read until it has been quiet a while: with logrotate's
    // `create`, the new file is there before the gateway's SIGHUP has it write there.
    let mut moved: Option<(File, String, u32)> = None;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if let Some((old, old_pending, quiet)) = &mut moved {
            let mut chunk = String::new();
            let n = (&*old).read_to_string(&mut chunk).unwrap_or(0);
            *quiet = if n == 0 { *quiet + 1 } else { 0 };
            old_pending.push_str(&chunk);
            if !show(old_pending) {
                return Ok(());
            }
            if *quiet >= MOVED_QUIET_POLLS {
                moved = None;
            }
        }
        // What the open file got first, to its end: the lines written just before a rotation
        // are in the file that was moved away.
        let mut chunk = String::new();
        pos += (&file).read_to_string(&mut chunk).unwrap_or(0) as u64;
        pending.push_str(&chunk);
        if !show(&mut pending) {
            return Ok(());
        }
        // Rotated (another file at the path, whatever its size) or truncated: go on with the
        // file now at the path, from its start.
        let (rotated, truncated) = match (std::fs::metadata(path), file.metadata()) {
            (Ok(now), Ok(open)) => (
                (now.dev(), now.ino()) != (open.dev(), open.ino()),
                now.len() < pos,
            ),
            _ => (false, false),
        };
        if rotated || truncated {
            if let Ok(f) = File::open(path) {
                let old = std::mem::replace(&mut file, f);
                let old_pending = std::mem::take(&mut pending);
                if rotated {
                    moved = Some((old, old_pending, 0));
                }
                pos = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(
        principal: &str,
        ip: &str,
        model: &str,
        status: u64,
        decision: &str,
        p: u64,
        c: u64,
    ) -> Value {
        json!({"ts": "2026-11-23T10:00:00.000Z", "principal": principal, "client_ip": ip, "model": model,
               "status": status, "decision": decision, "prompt_tokens": p, "completion_tokens": c})
    }

    #[test]
    fn groups() {
        let lines = vec![
            line("alice", "10.0.0.1", "m1", 200, "allowed", 10, 5),
            line(
                "alice",
                "10.0.0.1",
                "m2",
                429,
                "ratelimit:rate_limit_exceeded",
                0,
                0,
            ),
            line("bob", "10.0.0.2", "m1", 200, "allowed", 1, 1),
            line("-", "10.0.0.3", "m1", 401, "auth:invalid_api_key", 0, 0),
        ];
        let t = top(&lines, TopBy::Keys, 10);
        assert_eq!(
            t[0],
            json!({"principal": "alice", "requests": 2, "errors": 1, "prompt_tokens": 10, "completion_tokens": 5})
        );
        assert_eq!(top(&lines, TopBy::Models, 1)[0]["model"], "m1");
        let f = failures(&lines, 10);
        assert_eq!(f.len(), 2);
        assert_eq!(summary(&lines)["client_errors"], 2);
        let text = table(&t, &["principal", "requests"]);
        assert!(
            text.starts_with("PRINCIPAL  REQUESTS\nalice      2\n"),
            "{text}"
        );
    }

    #[test]
    fn first_and_last_are_by_time_not_file_order() {
        // `audit audit.jsonl*`: the live file (newer lines) comes before `.1`.
        let lines = [
            json!({"ts": "2026-12-05T13:35:54Z", "status": 200}),
            json!({"ts": "2026-12-05T13:34:26Z", "status": 200}),
            json!({"ts": "2026-12-05T13:35:00Z", "status": 200}),
        ];
        let sum = summary(&lines);
        assert_eq!(sum["first"], "2026-12-05T13:34:26Z");
        assert_eq!(sum["last"], "2026-12-05T13:35:54Z");
    }

    #[test]
    fn a_client_written_field_cannot_move_the_terminal_or_forge_a_row() {
        let forged =
            "llama3\u{1b}[2K\r\u{1b}]0;owned\u{7}\n2026-12-05  alice  FORGED\u{9b}\u{202e}x";
        let rows = [json!({"model": forged, "requests": 1})];
        let text = table(&rows, &["model", "requests"]);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            !text.chars().any(|c| c != '\n' && c.is_control()),
            "{text:?}"
        );
        assert!(!text.contains('\u{202e}'), "{text:?}");
        assert!(
            text.contains("llama3\\u{1b}[2K\\u{d}\\u{1b}]0;owned\\u{7}\\u{a}2026-12-05  alice  FORGED\\u{9b}\\u{202e}x"),
            "{text}"
        );
        // Plain text and non-text fields are as they were.
        assert_eq!(shown(Some(&json!("qwen2.5:7b"))), "qwen2.5:7b");
        assert_eq!(shown(Some(&json!(3))), "3");
        assert_eq!(shown(None), "-");
    }
}
