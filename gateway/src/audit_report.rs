//! `llm-gateway audit`: questions about the audit log answered without jq or awk.
//! Reads plain, rotated and gzip'd files; tables for people, `--json` for scripts.

use std::collections::{HashMap, HashSet};
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

/// Every selected line of every file, in file order, handed to `each` one at a time (an
/// audit log of months is gigabytes: nothing is kept but what `each` keeps). Answers how
/// many lines were not JSON.
pub fn read_lines(
    files: &[PathBuf],
    sel: &Selection,
    mut each: impl FnMut(&Value),
) -> Result<usize, String> {
    let mut bad = 0;
    let mut line = String::new();
    for path in files {
        let mut reader = open(path)?;
        loop {
            line.clear();
            let n = reader
                .read_line(&mut line)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(&line) {
                Ok(v) if sel.keeps(&v) => each(&v),
                Ok(_) => {}
                Err(_) => bad += 1,
            }
        }
    }
    Ok(bad)
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("-")
}

/// A group's name as kept: a client-written field (a model name) is cut, so that one huge
/// name a line cannot make the report hold the log again.
fn kept(name: &str) -> String {
    gateway_filter::redact::clip(name).to_string()
}

#[derive(Default)]
struct Group {
    requests: u64,
    errors: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// What is asked of the log.
#[derive(Debug, Clone, Copy)]
pub enum Question {
    Summary,
    Top(TopBy),
    Failures,
}

/// The answer to a [`Question`], tallied line by line: memory grows with the distinct names
/// asked about (keys, addresses, models), not with the lines.
pub struct Tally {
    question: Question,
    requests: u64,
    ok: u64,
    client_errors: u64,
    server_errors: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    principals: HashSet<String>,
    first: Option<String>,
    last: Option<String>,
    groups: HashMap<String, Group>,
    failures: HashMap<(u64, String), u64>,
}

impl Tally {
    pub fn new(question: Question) -> Tally {
        Tally {
            question,
            requests: 0,
            ok: 0,
            client_errors: 0,
            server_errors: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            principals: HashSet::new(),
            first: None,
            last: None,
            groups: HashMap::new(),
            failures: HashMap::new(),
        }
    }

    pub fn add(&mut self, l: &Value) {
        let status = u(l, "status");
        match self.question {
            Question::Summary => {
                self.requests += 1;
                match status {
                    200..400 => self.ok += 1,
                    400..500 => self.client_errors += 1,
                    500.. => self.server_errors += 1,
                    _ => {}
                }
                self.prompt_tokens += u(l, "prompt_tokens");
                self.completion_tokens += u(l, "completion_tokens");
                let principal = s(l, "principal");
                if !self.principals.contains(principal) {
                    self.principals.insert(kept(principal));
                }
                // By time, not by file order: `audit audit.jsonl*` reads the live file first.
                let ts = s(l, "ts");
                if self.first.as_deref().is_none_or(|f| ts < f) {
                    self.first = Some(kept(ts));
                }
                if self.last.as_deref().is_none_or(|f| ts > f) {
                    self.last = Some(kept(ts));
                }
            }
            Question::Top(by) => {
                let name = s(l, field(by));
                let g = match self.groups.get_mut(name) {
                    Some(g) => g,
                    None => self.groups.entry(kept(name)).or_default(),
                };
                g.requests += 1;
                g.errors += u64::from(status >= 400);
                g.prompt_tokens += u(l, "prompt_tokens");
                g.completion_tokens += u(l, "completion_tokens");
            }
            Question::Failures if status >= 400 => {
                *self
                    .failures
                    .entry((status, kept(s(l, "decision"))))
                    .or_default() += 1;
            }
            Question::Failures => {}
        }
    }

    /// The rows of a `Top` or `Failures` question, most requests first.
    pub fn rows(self, limit: usize) -> Vec<Value> {
        match self.question {
            Question::Top(by) => {
                let mut rows: Vec<(String, Group)> = self.groups.into_iter().collect();
                rows.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(&b.0)));
                rows.into_iter()
                    .take(limit)
                    .map(|(name, g)| {
                        json!({field(by): name, "requests": g.requests, "errors": g.errors,
                               "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens})
                    })
                    .collect()
            }
            Question::Failures => {
                let mut rows: Vec<_> = self.failures.into_iter().collect();
                rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                rows.into_iter()
                    .take(limit)
                    .map(|((status, decision), n)| json!({"status": status, "decision": decision, "requests": n}))
                    .collect()
            }
            Question::Summary => Vec::new(),
        }
    }

    pub fn summary(&self) -> Value {
        json!({
            "requests": self.requests,
            "ok": self.ok,
            "client_errors": self.client_errors,
            "server_errors": self.server_errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "principals": self.principals.len(),
            "first": self.first,
            "last": self.last,
        })
    }
}

/// The audit field a `--top` question groups by.
pub fn field(by: TopBy) -> &'static str {
    match by {
        TopBy::Keys => "principal",
        TopBy::Ips => "client_ip",
        TopBy::Models => "model",
    }
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

    fn tally(lines: &[Value], q: Question) -> Tally {
        let mut t = Tally::new(q);
        lines.iter().for_each(|l| t.add(l));
        t
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
        let t = tally(&lines, Question::Top(TopBy::Keys)).rows(10);
        assert_eq!(
            t[0],
            json!({"principal": "alice", "requests": 2, "errors": 1, "prompt_tokens": 10, "completion_tokens": 5})
        );
        assert_eq!(
            tally(&lines, Question::Top(TopBy::Models)).rows(1)[0]["model"],
            "m1"
        );
        let f = tally(&lines, Question::Failures).rows(10);
        assert_eq!(f.len(), 2);
        let sum = tally(&lines, Question::Summary).summary();
        assert_eq!(sum["client_errors"], 2);
        assert_eq!(sum["requests"], 4);
        assert_eq!(sum["ok"], 2);
        assert_eq!(sum["principals"], 3);
        assert_eq!(sum["prompt_tokens"], 11);
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
        let sum = tally(&lines, Question::Summary).summary();
        assert_eq!(sum["first"], "2026-12-05T13:34:26Z");
        assert_eq!(sum["last"], "2026-12-05T13:35:54Z");
    }

    #[test]
    fn lines_are_read_one_at_a_time_across_files_and_bad_ones_counted() {
        let dir = std::env::temp_dir().join(format!("audit-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("audit.jsonl");
        let b = dir.join("audit.jsonl.1.gz");
        std::fs::write(
            &a,
            "{\"principal\":\"alice\",\"status\":200}\nnot json\n\n{\"principal\":\"bob\",\"status\":500}",
        )
        .unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"{\"principal\":\"alice\",\"status\":429}\n")
            .unwrap();
        std::fs::write(&b, gz.finish().unwrap()).unwrap();
        let sel = Selection::new(None, Some("alice".into())).unwrap();
        let mut seen = Vec::new();
        let bad = read_lines(&[a, b], &sel, |l| seen.push(u(l, "status"))).unwrap();
        assert_eq!((seen, bad), (vec![200, 429], 1));
        std::fs::remove_dir_all(&dir).unwrap();
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
