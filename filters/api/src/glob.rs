//! `*` wildcards, as used for model names and path segments in filter options.

/// Whether `text` matches `pattern`, where `*` matches any run of characters but `/`: a
/// model pattern `llama*` must not match `llama.evil.com/x/y` (another registry), so each
/// `/`-separated part is matched on its own and the number of parts must agree.
pub fn wildcard(pattern: &str, text: &str) -> bool {
    let mut texts = text.split('/');
    pattern
        .split('/')
        .all(|p| texts.next().is_some_and(|t| wildcard_part(p, t)))
        && texts.next().is_none()
}

/// `*` over one part (no `/` in either).
fn wildcard_part(pattern: &str, text: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let Some(mut remaining) = text.strip_prefix(first) else {
        return false;
    };
    let mut pieces: Vec<&str> = rest.split('*').collect();
    let last = pieces.pop().unwrap_or_default();
    for piece in pieces {
        match remaining.find(piece) {
            Some(i) => remaining = &remaining[i + piece.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard("llama3.1:*", "llama3.1:8b"));
        assert!(!wildcard("llama3.1:*", "llama3.2:8b"));
        assert!(wildcard("*:8b", "qwen:8b"));
        assert!(wildcard("a*b*c", "aXXbYYc"));
        assert!(!wildcard("a*b*c", "aXXbYY"));
        assert!(wildcard("*", ""));
        assert!(!wildcard("ab*ba", "aba"));
        assert!(wildcard("exact", "exact") && !wildcard("exact", "exactly"));
        assert!(
            !wildcard("llama*", "llama.evil.com/x/y:z"),
            "* stays in its part"
        );
        assert!(!wildcard("*", "a/b"));
        assert!(wildcard(
            "hf.co/bartowski/*",
            "hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M"
        ));
        assert!(!wildcard("hf.co/*", "hf.co/bartowski/x"));
    }
}
