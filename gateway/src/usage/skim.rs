//! The top-level fields of a JSON document too large to keep, read as it streams past.
//!
//! A whole answer past the parser's buffer (an embeddings batch: Ollama's `/api/embed` and
//! OpenAI's `/v1/embeddings` put the counts after the vectors, past 1 MiB at about a hundred
//! inputs) lost its usage, and the request was charged its estimate instead. The skimmer
//! walks the document's structure byte by byte, keeps nothing of it but the few top-level
//! fields that carry usage, each up to [`MAX_FIELD`], and hands them back as a small document
//! for the usual reading. Only the top level counts: a key of that name inside a value
//! (arguments of a tool call the model wrote) is not a field of the answer.

/// Top-level fields whose values are kept: the usage of every wire format and what says the
/// answer ended.
const WANTED: [&[u8]; 7] = [
    b"usage",
    b"prompt_eval_count",
    b"eval_count",
    b"done",
    b"done_reason",
    b"message",
    b"response",
];

/// Largest value kept of a wanted field (Ollama's `response` is the answer's text: a long
/// one is skipped; usage objects are a few hundred bytes).
const MAX_FIELD: usize = 64 << 10;

/// Where the walk is inside the top-level object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Key,
    Colon,
    Value,
    Comma,
}

#[derive(Debug)]
pub(super) struct Skim {
    /// Open objects and arrays (1: inside the top-level object).
    depth: u32,
    in_string: bool,
    escaped: bool,
    expect: Expect,
    /// Reading a top-level key (its bytes go to `key`).
    in_key: bool,
    key: Vec<u8>,
    /// A top-level value is under way: nested (an object or array), a string, or a bare
    /// scalar (number, literal).
    value: Option<ValueKind>,
    /// The bytes of a wanted value, while it is wanted and fits.
    capture: Option<Vec<u8>>,
    /// The last value of each wanted field, in [`WANTED`]'s order (one place each: a backend
    /// repeating a key cannot make it hold more).
    fields: [Option<Vec<u8>>; WANTED.len()],
    /// Not a JSON object, or over: nothing more is read.
    done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueKind {
    Nested,
    String,
    Scalar,
}

impl Skim {
    pub(super) fn new() -> Skim {
        Skim {
            depth: 0,
            in_string: false,
            escaped: false,
            expect: Expect::Key,
            in_key: false,
            key: Vec::new(),
            value: None,
            capture: None,
            fields: Default::default(),
            done: false,
        }
    }

    pub(super) fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if self.done {
                return;
            }
            self.byte(b);
        }
    }

    /// The wanted fields found, as one small JSON object (the last of a repeated key).
    pub(super) fn finish(&mut self) -> Vec<u8> {
        let mut out = vec![b'{'];
        for (k, v) in WANTED.iter().zip(std::mem::take(&mut self.fields)) {
            let Some(v) = v else { continue };
            if out.len() > 1 {
                out.push(b',');
            }
            out.push(b'"');
            out.extend_from_slice(k);
            out.extend_from_slice(b"\":");
            out.extend_from_slice(&v);
        }
        out.push(b'}');
        out
    }

    fn keep(&mut self, b: u8) {
        if let Some(c) = &mut self.capture {
            if c.len() < MAX_FIELD {
                c.push(b);
            } else {
                self.capture = None;
            }
        }
    }

    fn start_value(&mut self, kind: ValueKind) {
        self.value = Some(kind);
        self.capture = WANTED
            .contains(&self.key.as_slice())
            .then(|| Vec::with_capacity(64));
    }

    fn end_value(&mut self) {
        self.value = None;
        self.expect = Expect::Comma;
        if let Some(v) = self.capture.take() {
            if let Some(i) = WANTED.iter().position(|w| *w == self.key.as_slice()) {
                self.fields[i] = Some(v);
            }
        }
    }

    /// One byte inside a string: whether it is the closing quote.
    fn closes_string(&mut self, b: u8) -> bool {
        if self.escaped {
            self.escaped = false;
            false
        } else if b == b'\\' {
            self.escaped = true;
            false
        } else {
            b == b'"'
        }
    }

    fn byte(&mut self, b: u8) {
        if self.in_string {
            if self.in_key {
                if self.closes_string(b) {
                    self.in_string = false;
                    self.in_key = false;
                    self.expect = Expect::Colon;
                } else if self.key.len() <= 32 {
                    // Keys of interest are short: a longer one is none of them.
                    self.key.push(b);
                }
                return;
            }
            self.keep(b);
            if self.closes_string(b) {
                self.in_string = false;
                if self.depth == 1 && self.value == Some(ValueKind::String) {
                    self.end_value();
                }
            }
            return;
        }
        if self.depth == 0 {
            match b {
                b'{' => {
                    self.depth = 1;
                    self.expect = Expect::Key;
                }
                b' ' | b'\t' | b'\r' | b'\n' => {}
                _ => self.done = true,
            }
            return;
        }
        if self.depth == 1 && self.value != Some(ValueKind::Nested) {
            match (b, self.expect) {
                (b' ' | b'\t' | b'\r' | b'\n', _) if self.value.is_none() => {}
                (b'"', Expect::Key) => {
                    self.in_string = true;
                    self.in_key = true;
                    self.key.clear();
                }
                (b':', Expect::Colon) => self.expect = Expect::Value,
                (b',', Expect::Comma) => self.expect = Expect::Key,
                (b'}', Expect::Key | Expect::Comma) => {
                    self.depth = 0;
                    self.done = true;
                }
                (b'"', Expect::Value) => {
                    self.start_value(ValueKind::String);
                    self.keep(b);
                    self.in_string = true;
                }
                (b'{' | b'[', Expect::Value) => {
                    self.start_value(ValueKind::Nested);
                    self.keep(b);
                    self.depth += 1;
                }
                (b',' | b'}', Expect::Value) if self.value == Some(ValueKind::Scalar) => {
                    self.end_value();
                    self.byte(b);
                }
                (_, Expect::Value) => {
                    if self.value.is_none() {
                        self.start_value(ValueKind::Scalar);
                    }
                    self.keep(b);
                }
                // Not JSON as expected: stop rather than guess.
                _ => self.done = true,
            }
            return;
        }
        // Inside a top-level value that is an object or array.
        self.keep(b);
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 1 {
                    self.end_value();
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skim(parts: &[&[u8]]) -> String {
        let mut s = Skim::new();
        for p in parts {
            s.feed(p);
        }
        String::from_utf8(s.finish()).unwrap()
    }

    #[test]
    fn keeps_only_the_wanted_top_level_fields_at_every_split() {
        let doc = br#" {"model":"m","embeddings":[[0.1,-2e-3],[1]],"x":{"usage":{"prompt_tokens":1}},"s":"a\"usage\":{} }","prompt_eval_count":37 ,"total_duration":5,"usage":{"prompt_tokens":444000,"total_tokens":444000},"done":true}"#;
        let want = r#"{"usage":{"prompt_tokens":444000,"total_tokens":444000},"prompt_eval_count":37 ,"done":true}"#;
        // The scalar keeps what followed it up to the comma: still valid JSON.
        for i in 0..doc.len() {
            assert_eq!(skim(&[&doc[..i], &doc[i..]]), want, "split at {i}");
        }
        let v: serde_json::Value = serde_json::from_str(want).unwrap();
        assert_eq!(v["usage"]["prompt_tokens"], 444000);
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value_and_long_values_are_dropped() {
        let long = format!(
            r#"{{"response":"{}","eval_count":1,"eval_count":2}}"#,
            "a".repeat(MAX_FIELD + 10)
        );
        assert_eq!(skim(&[long.as_bytes()]), r#"{"eval_count":2}"#);
    }

    #[test]
    fn a_repeated_key_holds_one_place() {
        let mut s = Skim::new();
        s.feed(b"{");
        for _ in 0..100_000 {
            s.feed(br#""done":1,"#);
        }
        s.feed(br#""done":true}"#);
        assert!(s.fields.iter().flatten().map(Vec::capacity).sum::<usize>() < 1024);
        assert_eq!(String::from_utf8(s.finish()).unwrap(), r#"{"done":true}"#);
    }

    #[test]
    fn what_is_not_an_object_yields_nothing() {
        assert_eq!(skim(&[b"[1,2,3]"]), "{}");
        assert_eq!(skim(&[b"garbage"]), "{}");
        assert_eq!(skim(&[br#"{"usage" 5}"#]), "{}");
    }
}
