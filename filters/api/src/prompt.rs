//! Which parts of an inference body are prompt text (what audit hashes, policy measures).

use serde_json::Value;

/// Characters of prompt text the model receives. Whatever a chat template may render counts,
/// not only the fields a client is expected to fill: of each message, its text content (and
/// content parts' text, under `text` or `content`) and every other field but media and the
/// usual `role` name, the others (tool calls and their arguments, `thinking`, names, ids,
/// anything unknown) as their JSON, keys included; `prompt` and `input` (each token id of a
/// token-id prompt as four characters, as a token is counted elsewhere); `system`, a
/// `template` and `suffix` of the request's own, vLLM's `chat_template`; vLLM's
/// `chat_template_kwargs` and `documents` and the tool definitions as their JSON; and
/// `context` (token ids of an earlier answer, four characters each). Images and audio are
/// not counted.
pub fn prompt_chars(body: &Value) -> usize {
    let Value::Object(fields) = body else {
        return 0;
    };
    // One pass over the body's fields: a lookup per name would hash each of eleven names.
    fields
        .iter()
        .map(|(k, v)| match k.as_str() {
            "context" => v.as_array().map_or(0, |ids| ids.len() * 4),
            "messages" => v
                .as_array()
                .map_or(0, |m| m.iter().map(message_chars).sum()),
            "prompt" | "input" | "system" | "template" | "suffix" | "chat_template" => {
                input_chars(v)
            }
            "tools" | "chat_template_kwargs" | "documents" if !v.is_null() => json_chars(v),
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

/// Whether a message's or content part's field `k` holding `v` is media or a usual name.
fn uncounted(k: &str, v: &Value) -> bool {
    MEDIA.contains(&k)
        || (matches!(k, "role" | "type") && v.as_str().is_some_and(|s| s.len() <= NAME_LEN))
}

/// One message: its text content and its parts' text as written, every other field (media
/// and usual names aside) as its JSON.
fn message_chars(m: &Value) -> usize {
    let Value::Object(o) = m else {
        return json_chars(m);
    };
    o.iter()
        .filter(|(k, v)| !uncounted(k, v))
        .map(|(k, v)| match (k.as_str(), v) {
            ("content", Value::Array(parts)) => parts.iter().map(part_chars).sum(),
            (_, v) => field_chars(v),
        })
        .sum()
}

/// A field of a message or part: a string as written, anything else as its JSON.
fn field_chars(v: &Value) -> usize {
    match v {
        Value::String(s) => s.chars().count(),
        Value::Null => 0,
        v => json_chars(v),
    }
}

/// One content part: its text as written, every other field (media and usual names aside)
/// as its JSON.
fn part_chars(p: &Value) -> usize {
    match p {
        Value::String(s) => s.chars().count(),
        Value::Object(o) => o
            .iter()
            .filter(|(k, v)| !uncounted(k, v))
            .map(|(_, v)| field_chars(v))
            .sum(),
        v => json_chars(v),
    }
}

/// A prompt or input: strings as written, a token id as four characters, anything else as
/// its JSON.
fn input_chars(v: &Value) -> usize {
    match v {
        Value::String(s) => s.chars().count(),
        Value::Number(_) => 4,
        Value::Array(items) => items.iter().map(input_chars).sum(),
        Value::Null => 0,
        v => json_chars(v),
    }
}

/// Characters of `v` written as JSON, counted as it is written (no string is built).
fn json_chars(v: &Value) -> usize {
    struct Chars(usize);
    impl std::io::Write for Chars {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            // UTF-8: every byte but a continuation byte starts a character.
            self.0 += b.iter().filter(|&&c| c & 0xC0 != 0x80).count();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Chars(0);
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
}
