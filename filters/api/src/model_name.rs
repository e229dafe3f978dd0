//! Model names as Ollama reads them.

use std::borrow::Cow;

/// `llama3.1` means `llama3.1:latest`; a name with a tag is already canonical (no copy).
pub fn canonical_model(name: &str) -> Cow<'_, str> {
    if name.contains(':') {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(format!("{name}:latest"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        assert_eq!(canonical_model("llama3.1"), "llama3.1:latest");
        assert!(matches!(
            canonical_model("qwen2.5:7b"),
            Cow::Borrowed("qwen2.5:7b")
        ));
    }
}
