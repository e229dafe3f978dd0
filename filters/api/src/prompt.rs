//! Which parts of an inference body are prompt text (what audit hashes, policy measures).

use serde_json::Value;

/// Characters of prompt text the model receives: [`prompt_texts`] plus Ollama's `system`.
pub fn prompt_chars(body: &Value) -> usize {
    let system = body
        .get("system")
        .and_then(Value::as_str)
        .map_or(0, |s| s.chars().count());
    prompt_texts(body)
        .iter()
        .map(|t| t.chars().count())
        .sum::<usize>()
        + system
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
