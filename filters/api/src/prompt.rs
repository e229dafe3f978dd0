//! Which parts of an inference body are prompt text (what audit hashes, policy measures).

use serde_json::Value;

/// Characters of prompt text the model receives. Whatever a chat template may render counts,
/// not only the fields a client is expected to fill: every string of every message (content,
/// content parts whether their text is under `text` or `content`, tool calls and their
/// arguments, `thinking`, names, ids) except media and the usual `role`/`type` names;
/// `prompt` and `input` (each token id of a token-id prompt as four characters, as a token
/// is counted elsewhere); `system`, a `template` and `suffix` of the request's own, vLLM's
/// `chat_template`, `chat_template_kwargs` and `documents`; tool definitions (as their
/// JSON); and `context` (token ids of an earlier answer, four characters each). Images and
/// audio are not counted.
pub fn prompt_chars(body: &Value) -> usize {
    let text = |k: &str| body.get(k).map_or(0, text_chars);
    let tools = body
        .get("tools")
        .filter(|t| !t.is_null())
        .map_or(0, json_chars);
    let context = body
        .get("context")
        .and_then(Value::as_array)
        .map_or(0, |ids| ids.len() * 4);
    [
        "messages",
        "prompt",
        "input",
        "system",
        "template",
        "suffix",
        "chat_template",
        "chat_template_kwargs",
        "documents",
    ]
    .into_iter()
    .map(text)
    .sum::<usize>()
        + tools
        + context
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

/// Characters of every string under `v` (a number: a token id, four characters), media left
/// out.
fn text_chars(v: &Value) -> usize {
    match v {
        Value::String(s) => s.chars().count(),
        Value::Number(_) => 4,
        Value::Array(items) => items.iter().map(text_chars).sum(),
        Value::Object(o) => o
            .iter()
            .filter(|(k, v)| match k.as_str() {
                k if MEDIA.contains(&k) => false,
                "role" | "type" => v.as_str().is_none_or(|s| s.len() > NAME_LEN),
                _ => true,
            })
            .map(|(_, v)| text_chars(v))
            .sum(),
        Value::Bool(_) | Value::Null => 0,
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
    /// text beside `content: null`, tool calls, reasoning, a long free-form role, vLLM's
    /// template fields. Media and the usual role and type names do not.
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
        assert_eq!(
            n(
                json!({"messages": [{"role": "assistant", "content": "", "thinking": "ab",
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"q": "xyz", "n": 7}}}]}]})
            ),
            2 + 2 + 1 + 3 + 4
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
        assert_eq!(
            n(
                json!({"prompt": "x", "chat_template": "{{ 'y' * 3 }}", "chat_template_kwargs": {"k": "vw"},
                "documents": [{"title": "t", "text": "uv"}]})
            ),
            1 + 13 + 2 + 3
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
