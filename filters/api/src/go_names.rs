//! How Go's `encoding/json` (Ollama, including its `/v1` routes) matches a JSON key to a
//! field name: without regard to case, with `K` (U+212A) read as `k` and `ſ` (U+017F) as `s`.

/// How Go's decoder folds a character when it matches field names.
pub fn fold(c: char) -> char {
    match c {
        '\u{212A}' => 'k',
        '\u{017F}' => 's',
        c => c.to_ascii_lowercase(),
    }
}

/// Whether Go's JSON decoder reads key `k` as field `name` (lower-case ASCII).
pub fn go_eq(k: &str, name: &str) -> bool {
    k.chars().map(fold).eq(name.chars())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_as_go_does() {
        assert!(go_eq("Keep_Alive", "keep_alive"));
        assert!(go_eq("\u{212A}eep_alive", "keep_alive"));
        assert!(go_eq("u\u{017F}e_mmap", "use_mmap"));
        assert!(!go_eq("keep-alive", "keep_alive"));
    }
}
