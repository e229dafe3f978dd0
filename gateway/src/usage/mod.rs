//! Token usage read from a response body as it streams past, chunk by chunk.
//!
//! Chunks may split anywhere, so the parser keeps only the current line (NDJSON, SSE) or the
//! whole document (plain JSON), capped. Only lines that mention a usage key are parsed:
//! - Ollama: the final object's `prompt_eval_count` and `eval_count` (NDJSON stream, or one
//!   JSON object when `stream: false`);
//! - OpenAI: `usage.prompt_tokens` / `usage.completion_tokens`, in the JSON body or in the
//!   last SSE `data:` event that carries it (`stream_options.include_usage`).

mod skim;

use std::sync::LazyLock;

use gateway_filter::{FinishReasons, Usage};
use memchr::memmem::Finder;
use serde::Deserialize;

/// Bytes of event text counted as a token when a stream's events carry more text than a token
/// each: above the four characters a token English text averages, so a stream of one token an
/// event (long words, escapes, a random model's tokens) is still counted an event a token.
const BYTES_PER_PACKED_TOKEN: u64 = 6;

/// Largest line or document kept for parsing; beyond it usage is reported unknown.
const MAX_BUFFERED: usize = 1 << 20;

static USAGE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
static EVAL_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"eval_count\""));
static REASON_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"_reason\""));

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `application/x-ndjson`: one JSON object per line (Ollama streaming).
    Ndjson,
    /// `text/event-stream`: `data: {json}` lines (OpenAI streaming).
    Sse,
    /// Anything else: the body is one JSON document.
    Json,
}

impl Framing {
    pub fn from_content_type(ct: Option<&[u8]>) -> Framing {
        let ct = ct.unwrap_or_default();
        let starts = |p: &[u8]| ct.len() >= p.len() && ct[..p.len()].eq_ignore_ascii_case(p);
        if starts(b"text/event-stream") {
            Framing::Sse
        } else if starts(b"application/x-ndjson") {
            Framing::Ndjson
        } else {
            Framing::Json
        }
    }
}

#[derive(Debug)]
pub struct UsageParser {
    framing: Framing,
    buf: Vec<u8>,
    /// The current line or document outgrew `MAX_BUFFERED` and is being skipped.
    overflow: bool,
    /// A whole (non-streamed) answer that outgrew `MAX_BUFFERED`: its top-level usage
    /// fields, read as it passes.
    skim: Option<Box<skim::Skim>>,
    usage: Option<Usage>,
    /// Stream events that carried text (a token, usually): the count when no usage comes.
    text_events: u64,
    /// Bytes of the text those events carried (as written, escapes included): a backend that
    /// packs several tokens into one event (speculative decoding, SGLang's
    /// `--stream-interval`) is counted at [`BYTES_PER_PACKED_TOKEN`] where that is more.
    event_text: u64,
    /// Text of a whole (non-streamed) answer without usage, in quarter tokens.
    text_chars: u64,
    finish_reasons: FinishReasons,
    /// The stream's last event went by: OpenAI's `data: [DONE]`, Ollama's `"done": true`.
    ended: bool,
    /// The request asked for several completions: a reported figure may cover one of them
    /// (see [`Self::several_completions`]); with the quarter tokens of prompt text the answer
    /// echoes (`echo`).
    several: Option<u64>,
}

#[derive(Deserialize)]
struct Doc {
    usage: Option<OpenAiUsage>,
    prompt_eval_count: Option<u64>,
    eval_count: Option<u64>,
    done: Option<bool>,
    #[serde(default)]
    message: Nested,
    #[serde(default)]
    response: Nested,
}

#[derive(Deserialize, Default)]
struct OpenAiUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    /// The Responses API's and Anthropic's names (custom routes, llama.cpp's `/v1/messages`);
    /// fields of their own, so a document that carries both names is still read.
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl OpenAiUsage {
    fn prompt(&self) -> Option<u64> {
        self.prompt_tokens.or(self.input_tokens)
    }

    fn completion(&self) -> Option<u64> {
        self.completion_tokens.or(self.output_tokens)
    }
}

/// The usage of an object one level down: Anthropic's `message_start` event
/// (`message.usage`), the Responses API's `response.completed` (`response.usage`). Any other
/// value there (Ollama's `response` text, its chat `message`) is skipped and reads as none.
#[derive(Default)]
struct Nested(Option<OpenAiUsage>);

impl AnyShape for Nested {
    fn from_map<'de, A: serde::de::MapAccess<'de>>(mut a: A) -> Result<Self, A::Error> {
        let mut usage = None;
        while let Some(key) = a.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "usage" {
                usage = a.next_value::<Figures>()?.0;
            } else {
                a.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(Nested(usage))
    }
}

/// A usage object one level down, read leniently: a figure that is not a whole number, or a
/// usage that is not an object, reads as none instead of failing the document (which would
/// lose the counts beside it).
#[derive(Default)]
struct Figures(Option<OpenAiUsage>);

/// A whole number, or none for any other value.
#[derive(Default)]
struct Figure(Option<u64>);

impl AnyShape for Figure {
    fn from_u64(n: u64) -> Self {
        Figure(Some(n))
    }
}

impl AnyShape for Figures {
    fn from_map<'de, A: serde::de::MapAccess<'de>>(mut a: A) -> Result<Self, A::Error> {
        let mut u = OpenAiUsage::default();
        while let Some(key) = a.next_key::<std::borrow::Cow<'de, str>>()? {
            let slot = match key.as_ref() {
                "prompt_tokens" => &mut u.prompt_tokens,
                "completion_tokens" => &mut u.completion_tokens,
                "input_tokens" => &mut u.input_tokens,
                "output_tokens" => &mut u.output_tokens,
                _ => {
                    a.next_value::<serde::de::IgnoredAny>()?;
                    continue;
                }
            };
            *slot = a.next_value::<Figure>()?.0;
        }
        Ok(Figures(Some(u)))
    }
}

/// A value read from whatever JSON a field holds: [`AnyShape::from_str`] for a string,
/// [`AnyShape::from_map`] for an object, the default for anything else (skipped unread), so
/// an odd value in one field never fails the document's parse.
trait AnyShape: Default {
    fn from_str(_: &str) -> Self {
        Self::default()
    }

    fn from_u64(_: u64) -> Self {
        Self::default()
    }

    fn from_map<'de, A: serde::de::MapAccess<'de>>(mut a: A) -> Result<Self, A::Error> {
        while a
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(Self::default())
    }
}

/// Each reads through [`any_shape`].
macro_rules! deserialize_any_shape {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                any_shape(d)
            }
        }
    )*};
}
deserialize_any_shape!(Nested, Figure, Figures, Text);

fn any_shape<'de, D: serde::Deserializer<'de>, T: AnyShape>(d: D) -> Result<T, D::Error> {
    use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
    struct Shape<T>(std::marker::PhantomData<T>);
    impl<'de, T: AnyShape> Visitor<'de> for Shape<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_str<E>(self, s: &str) -> Result<T, E> {
            Ok(T::from_str(s))
        }
        fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<T, A::Error> {
            T::from_map(a)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<T, A::Error> {
            while a.next_element::<IgnoredAny>()?.is_some() {}
            Ok(T::default())
        }
        fn visit_bool<E>(self, _: bool) -> Result<T, E> {
            Ok(T::default())
        }
        fn visit_i64<E>(self, _: i64) -> Result<T, E> {
            Ok(T::default())
        }
        fn visit_u64<E>(self, n: u64) -> Result<T, E> {
            Ok(T::from_u64(n))
        }
        fn visit_f64<E>(self, _: f64) -> Result<T, E> {
            Ok(T::default())
        }
        fn visit_unit<E>(self) -> Result<T, E> {
            Ok(T::default())
        }
    }
    d.deserialize_any(Shape(std::marker::PhantomData))
}

impl UsageParser {
    pub fn new(framing: Framing) -> Self {
        UsageParser {
            framing,
            buf: Vec::new(),
            overflow: false,
            skim: None,
            usage: None,
            text_events: 0,
            event_text: 0,
            text_chars: 0,
            finish_reasons: FinishReasons::default(),
            ended: false,
            several: None,
        }
    }

    /// For a request that asked for several completions (`n`, `n_cmpl`, `best_of`, a list of
    /// prompts): a reported usage may cover one of them (llama.cpp answers the first task's
    /// usage for all; vLLM's `continuous_usage_stats` puts one choice's figure on each event
    /// until the last), so the text counted passing is the usage when it is clearly larger
    /// (by half again: the count is an estimate). `echoed`: quarter tokens of prompt text the
    /// answer repeats (`echo`), not counted as generated.
    pub fn several_completions(&mut self, echoed: u64) {
        self.several = Some(echoed);
    }

    /// Whether the stream's last event (OpenAI's `data: [DONE]`, Ollama's line with
    /// `"done": true` and its counts) was fed: the answer is complete, its usage final, even
    /// though the body's own end (a chunked terminator) may still be on its way.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Feeds the next chunk of the response body.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        if self.framing == Framing::Json {
            if let Some(s) = &mut self.skim {
                s.feed(chunk);
            } else if self.buf.len() + chunk.len() > MAX_BUFFERED {
                // Too large to keep: read on for the top-level counts only.
                let mut s = Box::new(skim::Skim::new());
                s.feed(&std::mem::take(&mut self.buf));
                s.feed(chunk);
                self.skim = Some(s);
            } else {
                self.keep(chunk);
            }
            return;
        }
        while let Some(nl) = memchr::memchr(b'\n', chunk) {
            let (head, tail) = (&chunk[..nl], &chunk[nl + 1..]);
            if self.overflow {
                self.overflow = false;
            } else if self.buf.is_empty() {
                self.line(head);
            } else {
                let mut line = std::mem::take(&mut self.buf);
                line.extend_from_slice(head);
                self.line(&line);
                line.clear();
                self.buf = line;
            }
            chunk = tail;
        }
        self.keep(chunk);
    }

    /// Ends the body (or what came of it); returns the usage the server reported, else
    /// what was counted passing: one token per text event of a stream, or the text of a whole
    /// answer at four characters a token (`counted`, prompt tokens left for the caller to
    /// estimate). `None` when nothing with text came.
    pub fn finish(&mut self) -> Option<Usage> {
        if let Some(mut s) = self.skim.take() {
            self.doc(&s.finish());
            // Several completions: a reported figure may cover one of them, and the text that
            // would show it (counted in a kept answer) went by unkept: unknown, so the whole
            // reservation is charged, as before the skim (review: a 1.2 MB answer of two
            // choices was charged one).
            if self.several.is_some() {
                self.usage = None;
            }
        }
        if !self.overflow && !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            match self.framing {
                Framing::Json => {
                    self.doc(&rest);
                    if self.usage.is_none() || self.several.is_some() {
                        self.text_chars = answer_text_chars(&rest);
                    }
                }
                _ => self.line(&rest),
            }
        }
        let events = self
            .text_events
            .max(self.event_text.div_ceil(BYTES_PER_PACKED_TOKEN));
        let counted = events + self.text_chars.div_ceil(4);
        let generated = self
            .several
            .map(|echoed| events + self.text_chars.saturating_sub(echoed).div_ceil(4));
        match (self.usage, generated) {
            // Clearly more text passed than the figure covers: what passed is the usage (its
            // prompt is the caller's to make whole, as for a counted figure).
            (Some(mut u), Some(generated))
                if generated.saturating_mul(2) > u.completion_tokens.saturating_mul(3) =>
            {
                u.completion_tokens = generated;
                u.counted = true;
                Some(u)
            }
            (Some(u), _) => Some(u),
            (None, _) => (counted > 0).then_some(Usage {
                prompt_tokens: 0,
                completion_tokens: counted,
                counted: true,
            }),
        }
    }

    fn keep(&mut self, part: &[u8]) {
        if self.overflow || part.is_empty() {
            return;
        }
        if self.buf.len() + part.len() > MAX_BUFFERED {
            self.overflow = true;
            self.buf = Vec::new();
        } else {
            self.buf.extend_from_slice(part);
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let doc = match self.framing {
            Framing::Sse => match line.strip_prefix(b"data:") {
                Some(data) => data.strip_prefix(b" ").unwrap_or(data),
                None => return,
            },
            _ => line,
        };
        if doc == b"[DONE]" {
            self.ended |= self.framing == Framing::Sse;
            return;
        }
        if let Some(len) = text_len(doc) {
            self.text_events += 1;
            self.event_text += len as u64;
        }
        self.doc(doc);
    }

    /// Why generation stopped, from what was parsed so far (complete after [`Self::finish`]).
    pub fn finish_reasons(&self) -> FinishReasons {
        self.finish_reasons
    }

    fn doc(&mut self, doc: &[u8]) {
        let reasons = has_reason_value(doc);
        let usage = USAGE_KEY.find(doc).is_some() || EVAL_KEY.find(doc).is_some();
        if reasons && usage {
            // A whole answer carries both: one parse for the two (each alone if that fails,
            // so an odd `choices` cannot cost the usage).
            if let Ok(d) = serde_json::from_slice::<UsageAndReasons>(doc) {
                self.add_reasons(&ReasonDoc {
                    choices: d.choices,
                    done_reason: d.done_reason,
                    done: d.done,
                });
                self.add_usage(Doc {
                    usage: d.usage,
                    prompt_eval_count: d.prompt_eval_count,
                    eval_count: d.eval_count,
                    done: d.done,
                    message: d.message,
                    response: d.response,
                });
                return;
            }
        }
        if reasons {
            if let Ok(d) = serde_json::from_slice::<ReasonDoc>(doc) {
                self.add_reasons(&d);
            }
        }
        if usage {
            if let Ok(d) = serde_json::from_slice::<Doc>(doc) {
                self.add_usage(d);
            }
        }
    }

    fn add_reasons(&mut self, d: &ReasonDoc<'_>) {
        self.ended |= d.done == Some(true) && self.framing == Framing::Ndjson;
        for r in d.choices.iter().filter_map(|c| c.finish_reason.as_deref()) {
            self.finish_reasons.add(r.as_bytes());
        }
        if let Some(r) = d.done_reason.as_deref() {
            self.finish_reasons.add(r.as_bytes());
        }
    }

    fn add_usage(&mut self, d: Doc) {
        self.ended |= d.done == Some(true) && self.framing == Framing::Ndjson;
        // A usage object that names neither figure (`{}`, other names) says nothing: what was
        // counted passing stands. One that names one figure keeps the other from an earlier
        // event (Anthropic's stream: input tokens first, output tokens at the end).
        let named = d
            .usage
            .or(d.message.0)
            .or(d.response.0)
            .filter(|u| u.prompt().is_some() || u.completion().is_some());
        if let Some(u) = named {
            let before = self.usage.unwrap_or_default();
            self.usage = Some(Usage {
                prompt_tokens: u.prompt().unwrap_or(before.prompt_tokens),
                completion_tokens: u.completion().unwrap_or(before.completion_tokens),
                ..Default::default()
            });
        } else if d.prompt_eval_count.is_some() || d.eval_count.is_some() {
            self.usage = Some(Usage {
                prompt_tokens: d.prompt_eval_count.unwrap_or(0),
                completion_tokens: d.eval_count.unwrap_or(0),
                ..Default::default()
            });
        }
    }
}

/// The fields that say why generation stopped: OpenAI's `choices[].finish_reason`, Ollama's
/// `done_reason`. Read only where the scan found a reason key with a string value (most
/// stream events carry none, or `null`), so a key of that name inside model output (tool
/// call arguments) does not count.
#[derive(Deserialize)]
struct ReasonDoc<'a> {
    #[serde(default, borrow)]
    choices: Vec<ReasonChoice<'a>>,
    #[serde(borrow)]
    done_reason: Option<std::borrow::Cow<'a, str>>,
    done: Option<bool>,
}

#[derive(Deserialize)]
struct ReasonChoice<'a> {
    #[serde(borrow)]
    finish_reason: Option<std::borrow::Cow<'a, str>>,
}

/// Usage and finish reasons of one document, read in one parse (the fields of [`Doc`] and
/// [`ReasonDoc`]; not `flatten`ed, which would buffer every other field).
#[derive(Deserialize)]
struct UsageAndReasons<'a> {
    usage: Option<OpenAiUsage>,
    prompt_eval_count: Option<u64>,
    eval_count: Option<u64>,
    #[serde(default)]
    message: Nested,
    #[serde(default)]
    response: Nested,
    #[serde(default, borrow)]
    choices: Vec<ReasonChoice<'a>>,
    #[serde(borrow)]
    done_reason: Option<std::borrow::Cow<'a, str>>,
    done: Option<bool>,
}

/// Whether `doc` has a `"finish_reason"` or `"done_reason"` key with a string value.
fn has_reason_value(doc: &[u8]) -> bool {
    let mut at = 0;
    while let Some(i) = REASON_KEY.find(&doc[at..]) {
        let key_start = at + i;
        let key_end = key_start + b"_reason\"".len();
        at = key_end;
        let before = &doc[..key_start];
        if !(before.ends_with(b"\"finish") || before.ends_with(b"\"done")) {
            continue;
        }
        let rest = doc[key_end..].trim_ascii_start();
        if let Some(rest) = rest.strip_prefix(b":") {
            if rest.trim_ascii_start().starts_with(b"\"") {
                return true;
            }
        }
    }
    false
}

/// Removes the usage-only SSE event (`"choices": []` with a `usage` object) from an OpenAI
/// stream, for clients that did not ask for it: the gateway asks the backend for usage
/// (`stream_options.include_usage`) so it can count tokens, and the client gets the stream
/// it asked for. Complete events pass at once; only an unfinished event is held back.
#[derive(Debug, Default)]
pub struct UsageEventStripper {
    pending: Vec<u8>,
    /// The last event ended with a CR that ended its chunk, and whether it was removed: a LF
    /// that starts the next chunk completes its CRLF and goes (or not) with it.
    ended_at_cr: Option<bool>,
}

/// Most of an unfinished event held back: a backend that never ends its events (or ends
/// lines with something else) gets its bytes passed on as they are, not buffered forever.
pub const MAX_PENDING_EVENT: usize = 64 << 10;

/// Where the first event in `buf` ends (after its blank line). Each line may end with any of
/// SSE's three line endings (CRLF, LF, CR), mixed within an event (`data: x\n\r\n`). A CR
/// that ends the buffer may be the first half of a CRLF: after a line with text the event
/// waits for the next byte; a blank line ends the event there (a LF that starts the next
/// chunk completes that CRLF and goes, or not, with its event: `UsageEventStripper`).
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    while let Some(at) = memchr::memchr2(b'\r', b'\n', &buf[line_start..]) {
        let at = line_start + at;
        let blank = at == line_start;
        let next = match (buf[at], buf.get(at + 1)) {
            (b'\r', Some(b'\n')) => at + 2,
            (b'\r', None) if !blank => return None,
            _ => at + 1,
        };
        if blank {
            return Some(next);
        }
        line_start = next;
    }
    None
}

fn is_usage_only(event: &[u8]) -> bool {
    if USAGE_KEY.find(event).is_none() {
        return false;
    }
    #[derive(Deserialize)]
    struct Ev {
        choices: Option<Vec<serde_json::Value>>,
        usage: Option<serde_json::Value>,
    }
    event.split(|&b| b == b'\n').any(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return false;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        serde_json::from_slice::<Ev>(data).is_ok_and(|e| {
            e.choices.is_some_and(|c| c.is_empty()) && e.usage.is_some_and(|u| u.is_object())
        })
    })
}

impl UsageEventStripper {
    /// The bytes of `chunk` to pass on now (possibly none).
    pub fn filter(&mut self, chunk: &[u8]) -> Vec<u8> {
        if chunk.is_empty() {
            // Nothing new: the state (a CR waiting for its LF) stays.
            return Vec::new();
        }
        let mut out = Vec::with_capacity(self.pending.len() + chunk.len());
        let mut chunk = chunk;
        if let (Some(removed), Some(b'\n')) = (self.ended_at_cr.take(), chunk.first()) {
            if !removed {
                out.push(b'\n');
            }
            chunk = &chunk[1..];
        }
        self.pending.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(end) = event_end(&self.pending[start..]) {
            let event = &self.pending[start..start + end];
            let removed = is_usage_only(event);
            if !removed {
                out.extend_from_slice(event);
            }
            start += end;
            if start == self.pending.len() && event.ends_with(b"\r") {
                self.ended_at_cr = Some(removed);
            }
        }
        self.pending.drain(..start);
        if self.pending.len() > MAX_PENDING_EVENT {
            // Not a usage event (those are small): pass it on rather than hold it.
            out.append(&mut self.pending);
        }
        out
    }

    /// Whatever is left when the stream ends (an unterminated last event).
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }
}

/// For an OpenAI stream whose client did not ask for usage, asks the backend for it
/// (`stream_options.include_usage: true`). Returns whether it did: then the usage event must
/// be removed from what the client gets ([`UsageEventStripper`]).
pub fn request_stream_usage(ctx: &mut gateway_filter::RequestCtx) -> bool {
    use gateway_filter::Route;
    if !ctx.stream || !matches!(ctx.route, Route::OpenAiChat | Route::OpenAiCompletions) {
        return false;
    }
    let Some(obj) = ctx.json.as_mut().and_then(serde_json::Value::as_object_mut) else {
        return false;
    };
    let asked = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(serde_json::Value::as_bool);
    if asked == Some(true) {
        return false;
    }
    // `null` or any other non-object is "no options" to the backend: replace it, so usage is
    // asked for whatever the client wrote there.
    let opts = obj
        .entry("stream_options")
        .or_insert_with(|| serde_json::json!({}));
    if !opts.is_object() {
        *opts = serde_json::json!({});
    }
    if let Some(opts) = opts.as_object_mut() {
        opts.insert("include_usage".into(), serde_json::Value::Bool(true));
    }
    ctx.body_rewritten = true;
    true
}

/// Keys whose non-empty string value is generated text, in the stream events of Ollama
/// (`message.content`, `response`, `message.thinking`), its OpenAI layer (`delta.reasoning`)
/// and OpenAI-compatible servers (`delta.content`, `text`, `delta.reasoning_content`, tool
/// call `arguments`).
const TEXT_KEYS: [&[u8]; 7] = [
    b"\"content\"",
    b"\"response\"",
    b"\"text\"",
    b"\"thinking\"",
    b"\"reasoning\"",
    b"\"reasoning_content\"",
    b"\"arguments\"",
];

/// The text a stream event carries, in bytes as written: every [`TEXT_KEYS`] followed by a
/// non-empty string; `None` without one. A scan, not a parse: it runs on every event.
fn text_len(doc: &[u8]) -> Option<usize> {
    let mut found = None;
    for key in TEXT_KEYS {
        for at in memchr::memmem::find_iter(doc, key) {
            let value = doc[at + key.len()..]
                .trim_ascii_start()
                .strip_prefix(b":")
                .map(<[u8]>::trim_ascii_start)
                .unwrap_or_default();
            if let Some(text) = value.strip_prefix(b"\"") {
                let len = string_len(text);
                if len > 0 {
                    *found.get_or_insert(0) += len;
                }
            }
        }
    }
    found
}

/// Bytes of a JSON string's body up to its closing quote (escapes as written).
fn string_len(text: &[u8]) -> usize {
    let mut from = 0;
    while let Some(q) = memchr::memchr(b'"', &text[from..]) {
        let end = from + q;
        let escapes = text[..end]
            .iter()
            .rev()
            .take_while(|b| **b == b'\\')
            .count();
        if escapes % 2 == 0 {
            return end;
        }
        from = end + 1;
    }
    text.len()
}

/// Generated text in a whole answer, in quarter tokens (measured as prompts are): of each
/// message (OpenAI's `choices[].message`, Ollama's `message`) its content, its reasoning
/// (`reasoning_content`, `reasoning`, `thinking`) and its tool calls' arguments, as a stream's
/// events are counted ([`TEXT_KEYS`]); OpenAI's `choices[].text`, Ollama's `response` and
/// `thinking`.
fn answer_text_chars(doc: &[u8]) -> u64 {
    // Read into the few fields counted, every other value skipped unread: a tree of the whole
    // answer (a megabyte of log-probabilities is many small objects) would cost tens of MB.
    let Ok(a) = serde_json::from_slice::<Answer>(doc) else {
        return 0;
    };
    let message = |m: &AnswerMessage| {
        let calls: u64 = m
            .tool_calls
            .iter()
            .flatten()
            .filter_map(|c| c.function.as_ref())
            .map(|f| f.arguments.0)
            .sum();
        m.content.0 + m.reasoning_content.0 + m.reasoning.0 + m.thinking.0 + calls
    };
    let choices: u64 = a
        .choices
        .iter()
        .flatten()
        .map(|c| c.message.as_ref().map_or(0, message) + c.text.0)
        .sum();
    choices + a.message.as_ref().map_or(0, message) + a.response.0 + a.thinking.0
}

/// The fields of a whole answer [`answer_text_chars`] counts.
#[derive(Deserialize)]
struct Answer {
    choices: Option<Vec<AnswerChoice>>,
    message: Option<AnswerMessage>,
    #[serde(default)]
    response: Text,
    #[serde(default)]
    thinking: Text,
}

#[derive(Deserialize)]
struct AnswerChoice {
    message: Option<AnswerMessage>,
    #[serde(default)]
    text: Text,
}

#[derive(Deserialize)]
struct AnswerMessage {
    #[serde(default)]
    content: Text,
    #[serde(default)]
    reasoning_content: Text,
    #[serde(default)]
    reasoning: Text,
    #[serde(default)]
    thinking: Text,
    tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Deserialize)]
struct ToolCall {
    function: Option<ToolFunction>,
}

#[derive(Deserialize)]
struct ToolFunction {
    #[serde(default)]
    arguments: Text,
}

/// A value's text in quarter tokens if it is a string; any other value counts nothing and is
/// skipped without being kept.
#[derive(Default)]
struct Text(u64);

impl AnyShape for Text {
    fn from_str(s: &str) -> Self {
        Text(gateway_filter::prompt::text_quarters(s) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLLAMA_STREAM: &str = concat!(
        "{\"model\":\"m\",\"created_at\":\"t\",\"message\":{\"role\":\"assistant\",\"content\":\"Hi \\\"eval_count\\\": 1\"},\"done\":false}\n",
        "{\"model\":\"m\",\"created_at\":\"t\",\"message\":{\"role\":\"assistant\",\"content\":\"!\"},\"done\":false}\n",
        "{\"model\":\"m\",\"created_at\":\"t\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"done_reason\":\"stop\",\"total_duration\":5,\"prompt_eval_count\":26,\"prompt_eval_duration\":1,\"eval_count\":298,\"eval_duration\":3}\n",
    );
    const OLLAMA_JSON: &str = "{\"model\":\"m\",\"created_at\":\"t\",\"message\":{\"role\":\"assistant\",\"content\":\"line1\\nline2\"},\"done\":true,\"prompt_eval_count\":11,\"eval_count\":7}";
    const OPENAI_SSE: &str = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\r\n\r\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":12,\"total_tokens\":21}}\n\n",
        "data: [DONE]\n\n",
    );
    const OPENAI_JSON: &str = "{\n  \"id\": \"c\",\n  \"object\": \"chat.completion\",\n  \"choices\": [{\"index\": 0, \"message\": {\"role\": \"assistant\", \"content\": \"x\"}}],\n  \"usage\": {\"prompt_tokens\": 5, \"completion_tokens\": 3, \"total_tokens\": 8}\n}\n";

    fn cases() -> [(Framing, &'static str, Usage); 4] {
        [
            (
                Framing::Ndjson,
                OLLAMA_STREAM,
                Usage {
                    prompt_tokens: 26,
                    completion_tokens: 298,
                    ..Default::default()
                },
            ),
            (
                Framing::Json,
                OLLAMA_JSON,
                Usage {
                    prompt_tokens: 11,
                    completion_tokens: 7,
                    ..Default::default()
                },
            ),
            (
                Framing::Sse,
                OPENAI_SSE,
                Usage {
                    prompt_tokens: 9,
                    completion_tokens: 12,
                    ..Default::default()
                },
            ),
            (
                Framing::Json,
                OPENAI_JSON,
                Usage {
                    prompt_tokens: 5,
                    completion_tokens: 3,
                    ..Default::default()
                },
            ),
        ]
    }

    /// Review: the Responses API's and Anthropic's usage (`input_tokens`/`output_tokens`) read
    /// as zero, and an empty usage object hid what was counted passing.
    #[test]
    fn usage_under_other_names_and_empty_usage() {
        let usage = |framing, body: &str| {
            let mut p = UsageParser::new(framing);
            p.feed(body.as_bytes());
            p.finish()
                .map(|u| (u.prompt_tokens, u.completion_tokens, u.counted))
        };
        assert_eq!(
            usage(
                Framing::Json,
                r#"{"output":[],"usage":{"input_tokens":9,"output_tokens":900,"total_tokens":909}}"#
            ),
            Some((9, 900, false))
        );
        // Anthropic's stream: input tokens at the start, output tokens at the end.
        let anthropic = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"content\":[],\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
        );
        assert_eq!(usage(Framing::Sse, anthropic), Some((25, 15, false)));
        // The Responses API's stream: the usage in the last event's `response`.
        let responses = concat!(
            "event: response.output_text.delta\n",
            "data: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n",
            "event: response.completed\n",
            "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"output\":[{\"content\":[{\"text\":\"Hi\"}]}],\"usage\":{\"input_tokens\":7,\"output_tokens\":300,\"total_tokens\":307}}}\n\n",
        );
        assert_eq!(usage(Framing::Sse, responses), Some((7, 300, false)));
        // Both names in one object (a server that writes both): still read.
        assert_eq!(
            usage(
                Framing::Json,
                r#"{"usage":{"prompt_tokens":5,"input_tokens":5,"completion_tokens":9,"output_tokens":9}}"#
            ),
            Some((5, 9, false))
        );
        // A usage one level down that cannot be read loses nothing beside it.
        assert_eq!(
            usage(
                Framing::Json,
                r#"{"message":{"usage":"n/a"},"response":{"usage":{"input_tokens":1.5}},"done":true,"prompt_eval_count":3,"eval_count":4}"#
            ),
            Some((3, 4, false))
        );
        // Ollama's `response` text and chat `message` are no usage holders: its counts stand.
        assert_eq!(
            usage(
                Framing::Json,
                r#"{"model":"m","response":"hi","message":{"role":"assistant","content":"x"},"done":true,"prompt_eval_count":3,"eval_count":4}"#
            ),
            Some((3, 4, false))
        );
        // Text passed, then a usage object that names no figure: the count stands.
        let empty = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\ndata: {\"choices\":[],\"usage\":{}}\n\ndata: [DONE]\n\n";
        assert_eq!(usage(Framing::Sse, empty), Some((0, 2, true)));
    }

    /// Review: a stream without usage was counted a token per text event, so a backend that
    /// packs several tokens into an event (speculative decoding, SGLang's `--stream-interval`)
    /// was charged a fraction of what it generated by a client that left before the usage.
    #[test]
    fn events_that_carry_several_tokens_are_counted_by_their_text() {
        let event = |text: &str| {
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n")
        };
        let count = |body: String| {
            let mut p = UsageParser::new(Framing::Sse);
            p.feed(body.as_bytes());
            p.finish().map(|u| (u.completion_tokens, u.counted))
        };
        // Ten events of 60 bytes: 100 tokens at six bytes a token, not 10.
        let packed: String = (0..10).map(|_| event(&"abcdef".repeat(10))).collect();
        assert_eq!(count(packed), Some((100, true)));
        // A token an event, as most servers stream, long ones too: still one each.
        let single: String = (0..10).map(|_| event(" there")).collect();
        assert_eq!(count(single), Some((10, true)));
        // An escaped quote inside the text does not end it: 60 bytes as written.
        let quoted = r#"\"quoted\" words, and then a good many more words after them"#;
        assert_eq!(quoted.len(), 60);
        assert_eq!(count(event(quoted)), Some((10, true)));
    }

    /// Review: a whole answer without usage was read into a tree to count its text; a megabyte
    /// of log-probabilities cost tens of MB for a request of a few hundred bytes. Only the
    /// counted fields are read now, with the same figures.
    #[test]
    fn a_whole_answer_s_text_is_counted_without_its_other_fields() {
        let logprobs: Vec<serde_json::Value> = (0..2000)
            .map(|i| serde_json::json!({"token": "x", "logprob": -0.5, "top_logprobs": [{"token": "y", "logprob": -1.0, "bytes": [i % 255]}]}))
            .collect();
        let answer = serde_json::json!({
            "choices": [
                {"message": {"content": "abcd".repeat(10), "reasoning_content": "efgh",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{\"a\":1}"}}, {"type": "function"}]},
                 "logprobs": {"content": logprobs}},
                {"text": "ijkl", "message": null},
                {"message": {"content": [{"type": "text", "text": "parts are not counted"}]}}
            ],
            "message": {"content": "mnop", "thinking": "qrst",
                "tool_calls": [{"function": {"name": "g", "arguments": {"b": 2}}}]},
            "response": "uvwx",
            "thinking": null
        });
        let doc = serde_json::to_vec(&answer).unwrap();
        // Quarter tokens: a character each (ASCII); `{"a":1}` is 7.
        assert_eq!(answer_text_chars(&doc), 40 + 4 + 7 + 4 + 4 + 4 + 4);
        assert_eq!(answer_text_chars(b"[1,2]"), 0);
        assert_eq!(answer_text_chars(br#"{"choices":"none"}"#), 0);
    }

    #[test]
    fn every_two_way_split() {
        for (framing, body, want) in cases() {
            let b = body.as_bytes();
            for cut in 0..=b.len() {
                let mut p = UsageParser::new(framing);
                p.feed(&b[..cut]);
                p.feed(&b[cut..]);
                assert_eq!(p.finish(), Some(want), "{framing:?} split at {cut}");
            }
        }
    }

    #[test]
    fn every_three_way_split_and_byte_by_byte() {
        for (framing, body, want) in cases() {
            let b = body.as_bytes();
            for i in (0..b.len()).step_by(7) {
                for j in i..=b.len() {
                    let mut p = UsageParser::new(framing);
                    p.feed(&b[..i]);
                    p.feed(&b[i..j]);
                    p.feed(&b[j..]);
                    assert_eq!(p.finish(), Some(want), "{framing:?} split at {i},{j}");
                }
            }
            let mut p = UsageParser::new(framing);
            for byte in b.chunks(1) {
                p.feed(byte);
            }
            assert_eq!(p.finish(), Some(want), "{framing:?} byte by byte");
        }
    }

    #[test]
    fn strips_only_the_usage_event_at_every_split() {
        let want: Vec<u8> = OPENAI_SSE
            .replace("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":12,\"total_tokens\":21}}\n\n", "")
            .into_bytes();
        assert_ne!(want.len(), OPENAI_SSE.len());
        let b = OPENAI_SSE.as_bytes();
        for cut in 0..=b.len() {
            let mut s = UsageEventStripper::default();
            let mut got = s.filter(&b[..cut]);
            got.extend(s.filter(&b[cut..]));
            got.extend(s.finish());
            assert_eq!(got, want, "split at {cut}");
        }
        // Events without usage pass through at once, whole.
        let mut s = UsageEventStripper::default();
        assert_eq!(
            s.filter(b"data: {\"choices\":[{}]}\n\nda"),
            b"data: {\"choices\":[{}]}\n\n"
        );
        assert_eq!(s.filter(b"ta: [DONE]\n\n"), b"data: [DONE]\n\n");
    }

    #[test]
    fn streams_without_usage_are_counted() {
        // llama-cpp-python ignores stream_options.include_usage: one token per text event.
        let sse = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\": \"lo\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
        let b = sse.as_bytes();
        for cut in 0..=b.len() {
            let mut p = UsageParser::new(Framing::Sse);
            p.feed(&b[..cut]);
            p.feed(&b[cut..]);
            let u = p.finish().unwrap();
            assert_eq!(
                (u.completion_tokens, u.counted),
                (2, true),
                "split at {cut}"
            );
        }
        // Ollama NDJSON cut short: the text lines that came.
        let mut p = UsageParser::new(Framing::Ndjson);
        p.feed(b"{\"message\":{\"role\":\"assistant\",\"content\":\"a\"},\"done\":false}\n{\"response\":\"b\",\"done\":false}\n");
        assert_eq!(
            p.finish().map(|u| (u.completion_tokens, u.counted)),
            Some((2, true))
        );
        // Reported usage wins over the count.
        let mut p = UsageParser::new(Framing::Ndjson);
        p.feed(b"{\"response\":\"b\",\"done\":false}\n{\"response\":\"\",\"done\":true,\"eval_count\":7}\n");
        assert_eq!(
            p.finish().map(|u| (u.completion_tokens, u.counted)),
            Some((7, false))
        );
        // A whole answer without usage: its text at four characters a token.
        let mut p = UsageParser::new(Framing::Json);
        p.feed(b"{\"choices\":[{\"message\":{\"content\":\"abcdefghi\"}}]}");
        assert_eq!(
            p.finish().map(|u| (u.completion_tokens, u.counted)),
            Some((3, true))
        );
        let mut p = UsageParser::new(Framing::Sse);
        p.feed(b"data: {\"choices\":[]}\n\n");
        assert_eq!(p.finish(), None, "nothing with text came");
    }

    #[test]
    fn stripper_holds_a_bounded_amount() {
        // Events ended with lone CRs are events too.
        let mut s = UsageEventStripper::default();
        let usage =
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\r\r";
        let mut input = b"data: {\"choices\":[{}]}\r\r".to_vec();
        input.extend_from_slice(usage);
        assert_eq!(s.filter(&input), b"data: {\"choices\":[{}]}\r\r");
        // Line endings mixed within an event end it too, at once, and a usage event so ended
        // is removed, whichever byte a chunk ends at.
        for (end, blank) in [("\n", "\r\n"), ("\r\n", "\n"), ("\r", "\r\n"), ("\n", "\r")] {
            let event = format!("data: {{\"choices\":[{{}}]}}{end}{blank}");
            let usage =
                format!("data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":1}}}}{end}{blank}");
            let mut s = UsageEventStripper::default();
            assert_eq!(
                s.filter(event.as_bytes()),
                event.as_bytes(),
                "{end:?} {blank:?}"
            );
            let whole = format!("{event}{usage}{event}");
            for cut in 0..=whole.len() {
                let mut s = UsageEventStripper::default();
                let mut got = s.filter(&whole.as_bytes()[..cut]);
                got.extend(s.filter(&whole.as_bytes()[cut..]));
                got.extend(s.finish());
                assert_eq!(
                    got,
                    format!("{event}{event}").as_bytes(),
                    "{end:?} {blank:?} split at {cut}"
                );
            }
        }
        // An empty chunk between a CR and its LF changes nothing.
        let mut s = UsageEventStripper::default();
        let usage = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\r";
        assert_eq!(s.filter(usage), b"");
        assert_eq!(s.filter(b""), b"");
        assert_eq!(s.filter(b"\ndata: x\n\n"), b"data: x\n\n");
        // A CR ending a line of text may be half of a CRLF: the event is not over yet.
        let mut s = UsageEventStripper::default();
        assert_eq!(s.filter(b"data: {\"choices\":[{}]}\r"), b"");
        assert_eq!(s.filter(b"\n\r\n"), b"data: {\"choices\":[{}]}\r\n\r\n");
        // A backend that never ends an event: bytes pass on once the bound is reached.
        let mut s = UsageEventStripper::default();
        let line = vec![b'x'; 1000];
        let mut passed = 0;
        for _ in 0..200 {
            passed += s.filter(&line).len();
            assert!(s.pending.len() <= MAX_PENDING_EVENT);
        }
        passed += s.finish().len();
        assert_eq!(passed, 200 * 1000, "nothing is lost");
    }

    #[test]
    fn stream_options_that_are_not_an_object_are_replaced() {
        use gateway_filter::http::Method;
        for opts in [
            serde_json::json!(null),
            serde_json::json!("x"),
            serde_json::json!([true]),
        ] {
            let mut c = gateway_filter::RequestCtx::new(
                String::new(),
                Method::POST,
                "/v1/chat/completions".into(),
            );
            c.stream = true;
            c.json =
                Some(serde_json::json!({"model": "m", "stream": true, "stream_options": opts}));
            assert!(request_stream_usage(&mut c));
            assert_eq!(
                c.json.as_ref().unwrap()["stream_options"],
                serde_json::json!({"include_usage": true})
            );
        }
        let mut p = UsageParser::new(Framing::Sse);
        p.feed(b"data: {\"choices\":[{\"delta\":{\"reasoning\":\"hm\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"function\":{\"arguments\":\"{\\\"a\"}}]}}]}\n\n");
        assert_eq!(
            p.finish().map(|u| u.completion_tokens),
            Some(2),
            "reasoning and tool calls count"
        );
    }

    /// A rewritten body keeps every object's key order: backends that constrain output to a
    /// JSON Schema (`response_format`, tool parameters) follow its property order.
    #[test]
    fn a_rewritten_body_keeps_the_schema_order() {
        use gateway_filter::http::Method;
        let mut c = gateway_filter::RequestCtx::new(
            String::new(),
            Method::POST,
            "/v1/chat/completions".into(),
        );
        c.stream = true;
        c.json = Some(
            serde_json::from_str(
                r#"{"stream":true,"model":"m","response_format":{"type":"json_schema","json_schema":{"schema":{"properties":{"reasoning":{"type":"string"},"answer":{"type":"string"}}}}}}"#,
            )
            .unwrap(),
        );
        assert!(request_stream_usage(&mut c));
        let out = serde_json::to_string(c.json.as_ref().unwrap()).unwrap();
        assert!(out.starts_with(r#"{"stream":true,"model":"m","#), "{out}");
        let (r, a) = (out.find("reasoning").unwrap(), out.find("answer").unwrap());
        assert!(r < a, "{out}");
    }

    #[test]
    fn asks_for_usage_only_when_the_client_did_not() {
        use gateway_filter::http::Method;
        let mut c = gateway_filter::RequestCtx::new(
            String::new(),
            Method::POST,
            "/v1/chat/completions".into(),
        );
        c.stream = true;
        c.json = Some(serde_json::json!({"model": "m", "stream": true}));
        assert!(request_stream_usage(&mut c));
        assert_eq!(
            c.json.as_ref().unwrap()["stream_options"]["include_usage"],
            true
        );
        assert!(c.body_rewritten);
        let mut c2 = gateway_filter::RequestCtx::new(
            String::new(),
            Method::POST,
            "/v1/chat/completions".into(),
        );
        c2.stream = true;
        c2.json = Some(
            serde_json::json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}}),
        );
        assert!(!request_stream_usage(&mut c2));
        let mut c3 =
            gateway_filter::RequestCtx::new(String::new(), Method::POST, "/api/chat".into());
        c3.stream = true;
        c3.json = Some(serde_json::json!({"model": "m"}));
        assert!(
            !request_stream_usage(&mut c3),
            "Ollama streams always end with counts"
        );
    }

    #[test]
    fn framing_from_content_type() {
        assert_eq!(
            Framing::from_content_type(Some(b"text/event-stream; charset=utf-8")),
            Framing::Sse
        );
        assert_eq!(
            Framing::from_content_type(Some(b"application/x-ndjson")),
            Framing::Ndjson
        );
        assert_eq!(
            Framing::from_content_type(Some(b"application/json")),
            Framing::Json
        );
        assert_eq!(Framing::from_content_type(None), Framing::Json);
    }

    #[test]
    fn no_usage_and_garbage() {
        let mut p = UsageParser::new(Framing::Sse);
        p.feed(b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n");
        assert_eq!(p.finish(), None);
        let mut p = UsageParser::new(Framing::Json);
        p.feed(b"{\"usage\": oops");
        assert_eq!(p.finish(), None);
        // Ollama omits prompt_eval_count when the prompt was cached.
        let mut p = UsageParser::new(Framing::Ndjson);
        p.feed(b"{\"done\":true,\"eval_count\":4}");
        assert_eq!(
            p.finish(),
            Some(Usage {
                prompt_tokens: 0,
                completion_tokens: 4,
                ..Default::default()
            })
        );
    }

    #[test]
    fn usage_and_reasons_from_one_document_and_an_odd_one() {
        let mut p = UsageParser::new(Framing::Json);
        p.feed(br#"{"choices":[{"index":0,"message":{"content":"hi"},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#);
        assert_eq!(
            p.finish().map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((3, 4))
        );
        assert_eq!(p.finish_reasons().iter().collect::<Vec<_>>(), ["length"]);
        // `choices` of a shape no client reads: the usage is still counted.
        let mut p = UsageParser::new(Framing::Json);
        p.feed(br#"{"choices":{"finish_reason":"stop"},"usage":{"prompt_tokens":5,"completion_tokens":6}}"#);
        assert_eq!(
            p.finish().map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((5, 6))
        );
    }

    #[test]
    fn oversized_line_is_skipped_not_kept() {
        let mut p = UsageParser::new(Framing::Ndjson);
        let big = vec![b'x'; MAX_BUFFERED + 10];
        p.feed(&big);
        assert!(p.buf.is_empty());
        p.feed(b"\n{\"done\":true,\"prompt_eval_count\":1,\"eval_count\":2}\n");
        assert_eq!(
            p.finish(),
            Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                ..Default::default()
            })
        );
    }

    // Billing review: an embeddings answer past the buffer lost its counts (they follow the
    // vectors) and was charged an estimate; a larger batch was charged less than a smaller.
    #[test]
    fn a_whole_answer_too_large_to_keep_still_gives_its_usage() {
        let vectors = vec!["[0.125,-0.5,1e-3]"; 120_000].join(",");
        for (body, want) in [
            (
                format!(
                    r#"{{"model":"nomic-embed-text","embeddings":[{vectors}],"total_duration":9,"prompt_eval_count":481000}}"#
                ),
                (481_000, 0),
            ),
            (
                format!(
                    r#"{{"object":"list","data":[{{"object":"embedding","embedding":[{vectors}],"index":0}}],"model":"m","usage":{{"prompt_tokens":481000,"total_tokens":481000}}}}"#
                ),
                (481_000, 0),
            ),
            (
                format!(
                    r#"{{"model":"m","message":{{"role":"assistant","content":"x","tool_calls":[{{"function":{{"arguments":{{"eval_count":1,"usage":{{"prompt_tokens":1}}}}}}}}]}},"v":[{vectors}],"done":true,"prompt_eval_count":7,"eval_count":9000}}"#
                ),
                (7, 9000),
            ),
        ] {
            assert!(body.len() > MAX_BUFFERED);
            let mut p = UsageParser::new(Framing::Json);
            for chunk in body.as_bytes().chunks(16 << 10) {
                p.feed(chunk);
            }
            assert!(p.buf.is_empty(), "nothing of the document is kept");
            let u = p.finish().expect("usage found");
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens, u.counted),
                (want.0, want.1, false)
            );
        }
    }

    #[test]
    fn a_large_answer_of_several_completions_is_not_read_as_one() {
        let text = "a".repeat(700_000);
        let body = format!(
            r#"{{"choices":[{{"text":"{text}","index":0}},{{"text":"{text}","index":1}}],"usage":{{"prompt_tokens":3,"completion_tokens":175000}}}}"#
        );
        let mut p = UsageParser::new(Framing::Json);
        p.several_completions(0);
        p.feed(body.as_bytes());
        assert_eq!(p.finish(), None, "unknown: the reservation is charged");
    }

    fn reasons(framing: Framing, body: &str) -> Vec<&'static str> {
        let mut p = UsageParser::new(framing);
        for part in body.as_bytes().chunks(7) {
            p.feed(part);
        }
        p.finish();
        p.finish_reasons().iter().collect()
    }

    #[test]
    fn finish_reasons_of_every_wire_format() {
        let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"say \\\"finish_reason\\\": \\\"tool_calls\\\"\"},\"finish_reason\":null}]}\n\ndata: {\"choices\":[{\"delta\":{},\"finish_reason\" : \"length\"}]}\n\ndata: [DONE]\n\n";
        assert_eq!(reasons(Framing::Sse, sse), ["length"]);
        let ndjson = "{\"response\":\"a\",\"done\":false}\n{\"response\":\"\",\"done\":true,\"done_reason\":\"stop\",\"eval_count\":3}\n";
        assert_eq!(reasons(Framing::Ndjson, ndjson), ["stop"]);
        let json = "{\"choices\":[{\"finish_reason\":\"stop\"},{\"finish_reason\":\"length\"},{\"finish_reason\":\"made_up\"}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}";
        assert_eq!(reasons(Framing::Json, json), ["stop", "length", "other"]);
        assert!(reasons(Framing::Json, "{\"choices\":[]}").is_empty());
        // A key of that name in model output (tool call arguments) is not the answer's.
        let tool = "{\"message\":{\"tool_calls\":[{\"function\":{\"arguments\":{\"finish_reason\":\"length\"}}}]},\"done\":true,\"done_reason\":\"stop\"}\n";
        assert_eq!(reasons(Framing::Ndjson, tool), ["stop"]);
    }

    /// The stream's last event tells the answer is complete before the body's own end: what
    /// the request holds is given back before the client can see that event.
    #[test]
    fn the_last_event_of_each_stream_format_ends_the_answer() {
        let mut p = UsageParser::new(Framing::Sse);
        p.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"data: [DONE]\"}}]}\n\n");
        p.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}\n\ndata: [DO");
        assert!(!p.ended(), "not in model text, not before the whole line");
        p.feed(b"NE]\n\n");
        assert!(p.ended());
        assert_eq!(p.finish().map(|u| u.completion_tokens), Some(3));
        let mut p = UsageParser::new(Framing::Ndjson);
        p.feed(b"{\"response\":\"\\\"done\\\": true\",\"done\":false}\n");
        p.feed(b"{\"response\":\"\",\"done\":true,\"done_reason\":\"stop\",\"eval_count\":4}");
        assert!(!p.ended(), "the line is not complete yet");
        p.feed(b"\n");
        assert!(p.ended());
        // `"done": false` and a whole (non-streamed) answer never end a stream early.
        let mut p = UsageParser::new(Framing::Ndjson);
        p.feed(b"{\"response\":\"a\",\"done\":false,\"done_reason\":\"x\",\"eval_count\":1}\n");
        assert!(!p.ended());
        let mut p = UsageParser::new(Framing::Json);
        p.feed(b"{\"response\":\"\",\"done\":true,\"eval_count\":4}\n");
        assert!(!p.ended());
    }

    /// Review: a request for several completions was charged the reported figure even where
    /// it covers one of them (llama.cpp's `n_cmpl` or prompt list: the first task's usage for
    /// all; vLLM's `continuous_usage_stats`: one choice's figure on each event).
    #[test]
    fn several_completions_are_charged_what_passed_when_the_figure_covers_less() {
        let whole = concat!(
            "{\"choices\":[{\"index\":0,\"text\":\"",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "\"},",
            "{\"index\":1,\"text\":\"",
            "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
            "\"}],",
            "\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":10}}"
        );
        let read = |several: bool, framing: Framing, body: &str| {
            let mut p = UsageParser::new(framing);
            if several {
                p.several_completions(0);
            }
            p.feed(body.as_bytes());
            p.finish()
                .map(|u| (u.prompt_tokens, u.completion_tokens, u.counted))
        };
        // One completion asked for: the figure stands.
        assert_eq!(read(false, Framing::Json, whole), Some((3, 10, false)));
        // Two: 80 characters of text passed, 20 tokens.
        assert_eq!(read(true, Framing::Json, whole), Some((3, 20, true)));
        // A figure that covers what passed stands as reported.
        let covered = whole.replace("\"completion_tokens\":10", "\"completion_tokens\":30");
        assert_eq!(read(true, Framing::Json, &covered), Some((3, 30, false)));
        // vLLM, `continuous_usage_stats`, the client gone before the last event: each event
        // carried one choice's count; six tokens passed.
        let mut sse = String::new();
        for i in 0..6 {
            sse.push_str(&format!(
                "data: {{\"choices\":[{{\"index\":{},\"delta\":{{\"content\":\"t\"}}}}],\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":{}}}}}\n\n",
                i % 2,
                i / 2 + 1
            ));
        }
        assert_eq!(read(false, Framing::Sse, &sse), Some((5, 3, false)));
        assert_eq!(read(true, Framing::Sse, &sse), Some((5, 6, true)));
        // Reasoning and tool calls' arguments are generated text too.
        let hidden = concat!(
            "{\"choices\":[{\"message\":{\"content\":\"\",\"reasoning_content\":\"", "rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr", "\"}},",
            "{\"message\":{\"content\":null,\"tool_calls\":[{\"function\":{\"name\":\"f\",\"arguments\":\"", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "\"}}]}}],",
            "\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":10}}"
        );
        assert_eq!(read(true, Framing::Json, hidden), Some((3, 20, true)));
        // An honest figure within what the estimate may miss stands (Cyrillic at two letters
        // a token: 36 letters over two completions, reported as 16 tokens).
        let russian = format!(
            "{{\"choices\":[{{\"text\":\"{0}\"}},{{\"text\":\"{0}\"}}],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":16}}}}",
            "привет".repeat(3).chars().take(20).collect::<String>()
        );
        assert_eq!(read(true, Framing::Json, &russian), Some((3, 16, false)));
        // `echo`: the prompt repeated in each text is not generated text.
        let mut p = UsageParser::new(Framing::Json);
        p.several_completions(80);
        p.feed(whole.as_bytes());
        assert_eq!(
            p.finish().map(|u| (u.completion_tokens, u.counted)),
            Some((10, false))
        );
    }
}
