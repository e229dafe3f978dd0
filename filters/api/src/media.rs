//! Media a request gives by reference for the model server to fetch (a URL, a path on the
//! server's disk) instead of carrying it: vLLM, SGLang and llama.cpp's server fetch such
//! references themselves, so a client could make them request addresses on their own network.

use serde_json::{Map, Value};

/// Keys of SGLang's native bodies (`/generate`) that take media as data, a URL or a path.
const DATA_KEYS: [&str; 3] = ["image_data", "video_data", "audio_data"];

/// Whether `url` carries the media itself (a `data:` URL).
pub fn is_inline(url: &str) -> bool {
    url.trim_start()
        .get(..5)
        .is_some_and(|s| s.eq_ignore_ascii_case("data:"))
}

/// Whether a `*_data` string refers to media elsewhere rather than being it. Base64 has no
/// `:` and no `.`, so a URL of any scheme but `data:`, or a file name, has one of them; a
/// path may have neither (`/proc/self/environ`) but starts with `/` (base64 starting so is a
/// JPEG's `/9j/`) or `~`. SGLang reads any `audio_data` string but a URL as a file path.
fn is_reference(key: &str, s: &str) -> bool {
    let t = s.trim_start();
    !is_inline(t)
        && (key == "audio_data"
            || t.contains(':')
            || t.contains('.')
            || (t.starts_with('/') && !t.starts_with("/9j/"))
            || t.starts_with('~'))
}

/// Whether a `*_data` value, or one nested in it (lists of lists, an object's `url`), is a
/// reference. Only an object's `url` is read: its other strings are not media (a tool
/// schema's `description`).
fn data_refers(key: &str, v: &Value, depth: usize) -> bool {
    match v {
        _ if depth > 128 => false,
        Value::String(s) => is_reference(key, s),
        Value::Array(items) => items.iter().any(|i| data_refers(key, i, depth + 1)),
        Value::Object(o) => o
            .get("url")
            .and_then(Value::as_str)
            .is_some_and(|u| !is_inline(u)),
        _ => false,
    }
}

/// Keys that name media by URL in any content part, whatever its `type` says (vLLM reads
/// them from a part without one).
const URL_KEYS: [&str; 3] = ["image_url", "audio_url", "video_url"];

/// The first field of `body`, at any depth, that gives media by reference: a content part's
/// `*_url` (an object with a `type`, the URL as a string or its `url`) that is not `data:`,
/// or an `image_data`/`video_data`/`audio_data` string (or list of them) that is a URL or a
/// path. `None` when all media is carried in the request.
pub fn referenced(body: &Value) -> Option<String> {
    find(body, 0)
}

/// [`referenced`] for a body already taken apart as an object.
pub fn referenced_in(body: &Map<String, Value>) -> Option<String> {
    find_in(body, 0)
}

fn find(v: &Value, depth: usize) -> Option<String> {
    match v {
        _ if depth > 128 => None,
        Value::Array(items) => items.iter().find_map(|i| find(i, depth + 1)),
        Value::Object(o) => find_in(o, depth),
        _ => None,
    }
}

fn find_in(o: &Map<String, Value>, depth: usize) -> Option<String> {
    let part = o.get("type").is_some_and(Value::is_string);
    for (k, v) in o {
        // An Anthropic-style `source: {"type": "url", "url": …}` (llama.cpp converts it to
        // an `image_url` part) names its address `url`.
        if (part && (k.ends_with("_url") || k == "url")) || URL_KEYS.contains(&k.as_str()) {
            let url = match v {
                Value::String(u) => Some(u.as_str()),
                Value::Object(inner) => inner.get("url").and_then(Value::as_str),
                _ => None,
            };
            if url.is_some_and(|u| !is_inline(u)) {
                return Some(k.clone());
            }
        }
        if DATA_KEYS.contains(&k.as_str()) && data_refers(k, v, depth + 1) {
            return Some(k.clone());
        }
        if let Some(found) = find(v, depth + 1) {
            return Some(found);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_are_told_from_carried_media() {
        let found = |v: Value| referenced(&v);
        // The Responses API, vLLM's score and pooling bodies: content parts anywhere.
        assert_eq!(
            found(
                json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://169.254.169.254/"}]}]})
            ),
            Some("image_url".into())
        );
        assert_eq!(
            found(
                json!({"text_2": [{"content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]})
            ),
            Some("image_url".into())
        );
        // SGLang's /generate.
        assert_eq!(
            found(json!({"text": "x", "image_data": "https://10.0.0.1/a.png"})),
            Some("image_data".into())
        );
        assert_eq!(
            found(json!({"text": "x", "image_data": ["aGk=", "/srv/images/a.png"]})),
            Some("image_data".into())
        );
        // Parts without a `type` (vLLM reads them), lists of lists, relative file names.
        assert_eq!(
            found(json!({"messages": [{"content": [{"image_url": "http://10.0.0.1/"}]}]})),
            Some("image_url".into())
        );
        assert_eq!(
            found(json!({"image_data": [["http://10.0.0.1/x.png"]]})),
            Some("image_data".into())
        );
        assert_eq!(
            found(json!({"image_data": "srv/img/a.png"})),
            Some("image_data".into())
        );
        assert_eq!(
            found(json!({"audio_data": "/proc/self/environ"})),
            Some("audio_data".into())
        );
        assert_eq!(
            found(json!({"image_data": "/srv/imgpng"})),
            Some("image_data".into())
        );
        assert_eq!(
            found(json!({"audio_data": "UklGRiQAAABXQVZF"})),
            Some("audio_data".into())
        );
        assert_eq!(
            found(
                json!({"messages": [{"content": [{"type": "image", "source": {"type": "url", "url": "http://169.254.169.254/"}}]}]})
            ),
            Some("url".into())
        );
        // A tool's schema for such a field is not media.
        assert_eq!(
            found(
                json!({"tools": [{"parameters": {"properties": {"image_data": {"type": "string", "description": "A base64 PNG."}}}}]})
            ),
            None
        );
        // Carried: data: URLs, base64 (a JPEG's starts with "/9j/"), and `*_url` outside a
        // content part (metadata).
        assert_eq!(
            found(
                json!({"input": [{"type": "input_image", "image_url": " DATA:image/png;base64,aGk="}]})
            ),
            None
        );
        assert_eq!(found(json!({"image_data": "/9j/4AAQSkZJRgABAQ"})), None);
        assert_eq!(
            found(json!({"metadata": {"source_url": "https://example.com"}})),
            None
        );
    }
}
