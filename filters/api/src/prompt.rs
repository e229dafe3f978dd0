//! Which parts of an inference body are prompt text (what audit hashes, policy measures).

use serde_json::Value;

/// Characters of prompt text the model receives: [`prompt_texts`], plus what Ollama puts
/// into the prompt besides them: `system`, a `template` and `suffix` of the request's own,
/// tool definitions (as their JSON), and `context` (token ids of an earlier answer, four
/// characters each, as a token is counted elsewhere). Images are not counted.
pub fn prompt_chars(body: &Value) -> usize {
    let chars = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .map_or(0, |s| s.chars().count())
    };
    let tools = body
        .get("tools")
        .filter(|t| !t.is_null())
        .map_or(0, json_chars);
    let context = body
        .get("context")
        .and_then(Value::as_array)
        .map_or(0, |ids| ids.len() * 4);
    prompt_texts(body)
        .iter()
        .map(|t| t.chars().count())
        .sum::<usize>()
        + chars("system")
        + chars("template")
        + chars("suffix")
        + tools
        + context
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

/// The prompt texts the model receives, in order: every string `content` of `messages` (and
/// the `text` of OpenAI content parts), then `prompt`, then `input` (a string or each string
/// of an array). Other fields (images, tool definitions, options) are not prompt text.
pub fn prompt_texts(body: &Value) -> Vec<&str> {
    fn collect<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::String(s) => out.push(s),
            Value::Array(items) => items.iter().for_each(|i| collect(i, out)),
            Value::Object(o) => {
                if let Some(t) = o.get("content").or_else(|| o.get("text")) {
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
}
