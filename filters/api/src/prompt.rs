//! Which parts of an inference body are prompt text (what audit hashes, policy measures).

use serde_json::Value;

/// Characters of prompt text the model receives. Whatever a chat template may render counts,
/// not only the fields a client is expected to fill: of each message, its text content (and
/// content parts' text, under `text` or `content`) and every other field but media and the
/// usual `role` name, the others (tool calls and their arguments, `thinking`, names, ids,
/// anything unknown) as their JSON, keys included; `prompt` and `input`, and SGLang's
/// `input_ids` (each token id of a token-id prompt as four characters, as a token is counted
/// elsewhere); `system`, a
/// `template` and `suffix` of the request's own, vLLM's `chat_template`; vLLM's
/// `chat_template_kwargs` and `documents` and the tool definitions as their JSON; and
/// `context` (token ids of an earlier answer, four characters each). Images and audio are
/// not counted.
pub fn prompt_chars(body: &Value) -> usize {
    measure::<Chars>(body)
}

/// The prompt's tokens as the gateway estimates them where nothing better is known (a
/// token reservation; the usage of an answer whose backend never reported it): the text
/// [`prompt_chars`] measures at four ASCII characters a token, two characters of two UTF-8
/// bytes (Cyrillic, Greek, accented letters) a token, and a token for every longer one (CJK,
/// emoji), and
/// [`MEDIA_TOKENS`] for each image, audio or video the prompt carries. A text of many-byte
/// characters counted at four characters a token was under-estimated fourfold, and media were
/// free.
pub fn prompt_tokens(body: &Value) -> u64 {
    (measure::<Quarters>(body) as u64).div_ceil(4)
}

/// A text measured in quarter tokens, as [`prompt_tokens`] measures.
pub fn text_quarters(s: &str) -> usize {
    Quarters::text(s)
}

/// Tokens estimated for one image, audio clip or video in a prompt: a vision model's image
/// costs from a few hundred (Gemma 3: 256, LLaVA 1.5: 576) to a few thousand.
pub const MEDIA_TOKENS: usize = 768;

/// How text is measured: its characters, or quarter tokens.
trait Measure {
    /// One string.
    fn text(s: &str) -> usize;
    /// One byte of JSON written out (UTF-8).
    fn json_byte(b: u8) -> usize;
    /// One media item.
    const MEDIA: usize;
    /// Bytes of a `prompt_embeds` tensor.
    fn embed(bytes: usize) -> usize;
}

/// Characters.
struct Chars;

impl Measure for Chars {
    fn text(s: &str) -> usize {
        s.chars().count()
    }
    fn json_byte(b: u8) -> usize {
        // Every byte but a continuation byte starts a character.
        usize::from(b & 0xC0 != 0x80)
    }
    const MEDIA: usize = 0;
    fn embed(_: usize) -> usize {
        0
    }
}

/// Quarter tokens by a character's UTF-8 length: ASCII one (four characters a token), two
/// bytes (Cyrillic, Greek, Arabic, accented Latin) two (two a token), three or four bytes
/// (CJK, emoji) four (a token each), about what common tokenizers give.
struct Quarters;

impl Measure for Quarters {
    fn text(s: &str) -> usize {
        s.bytes().map(Self::json_byte).sum()
    }
    fn json_byte(b: u8) -> usize {
        match b {
            0..=0x7F => 1,
            0x80..=0xBF => 0,
            0xC0..=0xDF => 2,
            _ => 4,
        }
    }
    const MEDIA: usize = 4 * MEDIA_TOKENS;
    fn embed(bytes: usize) -> usize {
        bytes.div_ceil(EMBED_BYTES_PER_TOKEN) * 4
    }
}

fn measure<M: Measure>(body: &Value) -> usize {
    let Value::Object(fields) = body else {
        return 0;
    };
    // One pass over the body's fields: a lookup per name would hash each of eleven names.
    fields
        .iter()
        .map(|(k, v)| match k.as_str() {
            "context" => v.as_array().map_or(0, |ids| ids.len() * 4),
            "messages" => v.as_array().map_or(0, |m| m.iter().map(message::<M>).sum()),
            // SGLang's `input_ids`: token ids that replace the rendered prompt.
            "prompt" | "input" | "input_ids" | "system" | "template" | "suffix"
            | "chat_template" => input::<M>(v),
            "tools" | "chat_template_kwargs" | "documents" if !v.is_null() => json::<M>(v),
            // Ollama's `/api/generate` carries its images beside the prompt.
            "images" => media::<M>(v),
            "prompt_embeds" => embeds::<M>(v),
            _ => 0,
        })
        .sum()
}

/// Fields of a message or content part that carry media, not text.
const MEDIA: [&str; 6] = [
    "images",
    "image_url",
    "input_audio",
    "audio_url",
    "video_url",
    "file",
];

/// A `role` or `type` no longer than this is a name (`user`, `image_url`), not text: longer
/// ones count (a template may render the role as written).
const NAME_LEN: usize = 32;

/// vLLM's `prompt_embeds`: base64 tensors of one row per prompt position, as tokens at
/// [`EMBED_BYTES_PER_TOKEN`] (never fewer than the positions of a model whose rows are that
/// small: larger models' rows are larger, so this errs high).
fn embeds<M: Measure>(v: &Value) -> usize {
    // Base64: three bytes in four characters.
    let tokens = |s: &str| M::embed(s.len() * 3 / 4);
    match v {
        Value::String(s) => tokens(s),
        Value::Array(items) => items.iter().filter_map(Value::as_str).map(tokens).sum(),
        _ => 0,
    }
}

/// One prompt position of `prompt_embeds`: a row of 2,048 16-bit numbers (a 1B model's).
const EMBED_BYTES_PER_TOKEN: usize = 4096;

/// Media under a field: each item of a list (Ollama's `images`), else the one.
fn media<M: Measure>(v: &Value) -> usize {
    match v {
        Value::Null => 0,
        Value::Array(items) => items.len() * M::MEDIA,
        _ => M::MEDIA,
    }
}

/// A message's or content part's field `k` holding `v`: media, a usual name (nothing), or
/// text as written.
fn field_of<M: Measure>(k: &str, v: &Value) -> usize {
    if MEDIA.contains(&k) {
        media::<M>(v)
    } else if matches!(k, "role" | "type") && v.as_str().is_some_and(|s| s.len() <= NAME_LEN) {
        0
    } else {
        field::<M>(v)
    }
}

/// One message: its text content and its parts' text as written, every other field (media
/// and usual names aside) as its JSON.
fn message<M: Measure>(m: &Value) -> usize {
    let Value::Object(o) = m else {
        return json::<M>(m);
    };
    o.iter()
        .map(|(k, v)| match (k.as_str(), v) {
            ("content", Value::Array(parts)) => parts.iter().map(part::<M>).sum(),
            (k, v) => field_of::<M>(k, v),
        })
        .sum()
}

/// A field of a message or part: a string as written, anything else as its JSON.
fn field<M: Measure>(v: &Value) -> usize {
    match v {
        Value::String(s) => M::text(s),
        Value::Null => 0,
        v => json::<M>(v),
    }
}

/// One content part: its text as written, every other field (media and usual names aside)
/// as its JSON.
fn part<M: Measure>(p: &Value) -> usize {
    match p {
        Value::String(s) => M::text(s),
        Value::Object(o) => o.iter().map(|(k, v)| field_of::<M>(k, v)).sum(),
        v => json::<M>(v),
    }
}

/// A prompt or input: strings as written, a token id as four characters, anything else as
/// its JSON.
fn input<M: Measure>(v: &Value) -> usize {
    match v {
        Value::String(s) => M::text(s),
        Value::Number(_) => 4,
        Value::Array(items) => items.iter().map(input::<M>).sum(),
        Value::Null => 0,
        v => json::<M>(v),
    }
}

/// `v` written as JSON, measured as it is written (no string is built).
fn json<M: Measure>(v: &Value) -> usize {
    struct Counter<M>(usize, std::marker::PhantomData<M>);
    impl<M: Measure> std::io::Write for Counter<M> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.iter().map(|&c| M::json_byte(c)).sum::<usize>();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Counter::<M>(0, std::marker::PhantomData);
    // Writing into a counter cannot fail.
    let _ = serde_json::to_writer(&mut n, v);
    n.0
}

/// The prompt texts the model receives, in order (what audit hashes and captures): every
/// string `content` of `messages` (and the `text` of OpenAI content parts), then `prompt`,
/// then `input` (a string or each string of an array). Other fields (images, tool
/// definitions, options) are not prompt text; [`prompt_chars`] measures more widely.
pub fn prompt_texts(body: &Value) -> Vec<&str> {
    fn collect<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::String(s) => out.push(s),
            Value::Array(items) => items.iter().for_each(|i| collect(i, out)),
            Value::Object(o) => {
                // A part's text may be under either name (`content: null` beside `text`).
                if let Some(t) = o
                    .get("content")
                    .filter(|c| !c.is_null())
                    .or_else(|| o.get("text"))
                {
                    collect(t, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for key in ["messages", "prompt", "input"] {
        if let Some(v) = body.get(key) {
            collect(v, &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prompt_chars_count_what_ollama_puts_into_the_prompt() {
        let body = json!({"model": "m", "prompt": "hi", "system": "abc", "template": "{{ .Prompt }}",
            "suffix": "xy", "context": [1, 2, 3], "tools": [{"type": "function"}], "images": ["aGk="]});
        let tools = json!([{"type": "function"}]).to_string().len();
        assert_eq!(prompt_chars(&body), 2 + 3 + 13 + 2 + 12 + tools);
        assert_eq!(
            prompt_chars(&json!({"messages": [{"role": "user", "content": "héllo"}]})),
            5
        );
    }

    /// Text the gateway is not shown as `content` still counts: token-id prompts, a part's
    /// text beside `content: null`, tool calls (as their JSON, keys and all), reasoning, a
    /// long free-form role, vLLM's template fields. Media and the usual role and type names
    /// do not.
    #[test]
    fn prompt_chars_count_every_text_a_template_can_render() {
        let n = |body: Value| prompt_chars(&body);
        assert_eq!(n(json!({"prompt": [[1, 2, 3], [4]]})), 16);
        assert_eq!(n(json!({"input": [1, 2]})), 8);
        assert_eq!(
            n(
                json!({"messages": [{"role": "user", "content": [{"type": "text", "content": null, "text": "abcde"}]}]})
            ),
            5
        );
        let calls = json!([{"id": "c1", "type": "function", "function": {"name": "f",
            "arguments": {"file": "xyz", "q": 7}}}]);
        assert_eq!(
            n(
                json!({"messages": [{"role": "assistant", "content": "", "thinking": "ab", "tool_calls": calls}]})
            ),
            2 + calls.to_string().len()
        );
        // A long key of the arguments counts too (it is rendered as written).
        let key = "k".repeat(1000);
        assert!(
            n(
                json!({"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": {key: 0}}}]}]})
            ) > 1000
        );
        let role = "r".repeat(40);
        assert_eq!(n(json!({"messages": [{"role": role, "content": "x"}]})), 41);
        assert_eq!(
            n(
                json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}], "images": ["aGk="]}]})
            ),
            2
        );
        let kwargs = json!({"k": "vw"});
        let docs = json!([{"title": "t", "text": "uv"}]);
        assert_eq!(
            n(
                json!({"prompt": "x", "chat_template": "{{ 'y' * 3 }}", "chat_template_kwargs": kwargs, "documents": docs})
            ),
            1 + 13 + kwargs.to_string().len() + docs.to_string().len()
        );
        // What audit hashes follows `text` beside `content: null` too.
        assert_eq!(
            prompt_texts(
                &json!({"messages": [{"role": "user", "content": [{"type": "text", "content": null, "text": "abc"}]}]})
            ),
            ["abc"]
        );
    }

    #[test]
    fn prompt_tokens_count_many_byte_characters_and_media() {
        let t = |body: Value| prompt_tokens(&body);
        let user = |content: Value| json!({"messages": [{"role": "user", "content": content}]});
        // Four ASCII characters a token, as before.
        assert_eq!(t(user(json!("hello world"))), 3);
        // A character that is not ASCII is a token of its own: CJK was a quarter of that.
        assert_eq!(t(user(json!("你好世界"))), 4);
        assert_eq!(t(user(json!("😀😀"))), 2);
        assert_eq!(t(user(json!("héllo"))), 2);
        // Two-byte letters: two a token.
        assert_eq!(t(user(json!("Привет"))), 3);
        // Media: each image, audio clip or video, wherever it is carried.
        let m = MEDIA_TOKENS as u64;
        assert_eq!(
            t(json!({"messages": [{"role": "user", "content": "hi", "images": ["aGk=", "aGk="]}]})),
            1 + 2 * m
        );
        assert_eq!(t(json!({"prompt": "hi", "images": ["aGk="]})), 1 + m);
        assert_eq!(
            t(user(json!([
                {"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}},
                {"type": "input_audio", "input_audio": {"data": "aGk=", "format": "wav"}}
            ]))),
            1 + 2 * m
        );
        // vLLM's prompt embeddings: a 3-row tensor of 2,048 half floats is 3 tokens.
        let tensor = "A".repeat(3 * 4096 * 4 / 3);
        assert_eq!(t(json!({"prompt_embeds": tensor})), 3);
        assert_eq!(t(json!({"prompt_embeds": [tensor.clone(), tensor]})), 6);
        // Token ids stay one token each; the character count is unchanged by any of it.
        assert_eq!(t(json!({"prompt": [1, 2, 3]})), 3);
        assert_eq!(
            t(json!({"messages": [], "input_ids": [1, 2, 3, 4, 5]})),
            5,
            "SGLang's token ids count as a token-id prompt does"
        );
        assert_eq!(
            prompt_chars(&json!({"prompt": "你好", "images": ["aGk="]})),
            2
        );
    }
}
