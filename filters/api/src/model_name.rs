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

/// `name` as Ollama resolves it, without its tag rule: surrounding whitespace and any scheme
/// (`https://`) trimmed, the default registry and namespace dropped (`registry.ollama.ai/library/llama3.1` and
/// `library/llama3.1` are `llama3.1`; `registry.ollama.ai/user/m` is `user/m`), ASCII case
/// folded (Ollama finds a model's manifest whatever the case it is asked in). Borrowed when
/// it is already so.
pub fn folded(name: &str) -> Cow<'_, str> {
    let strip = |s: &'_ str, prefix: &str| -> Option<usize> {
        (s.len() > prefix.len()
            && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes()))
        .then_some(prefix.len())
    };
    let mut bare = name.trim();
    // Ollama drops a scheme (`https://registry.ollama.ai/library/m` is `m`).
    if let Some((_, rest)) = bare.split_once("://") {
        bare = rest;
    }
    // The registry only before a namespace and a name (`registry.ollama.ai/m` names the
    // namespace `registry.ollama.ai`).
    if let Some(n) = strip(bare, "registry.ollama.ai/") {
        if bare[n..].contains('/') {
            bare = &bare[n..];
        }
    }
    if let Some(n) = strip(bare, "library/") {
        if !bare[n..].contains('/') {
            bare = &bare[n..];
        }
    }
    if bare.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(bare.to_ascii_lowercase())
    } else if bare.len() == name.len() {
        Cow::Borrowed(name)
    } else {
        Cow::Borrowed(bare)
    }
}

/// The name a model is counted and priced by: [`folded`], with `:latest` when it has no
/// tag. Respelling a model (`LLAMA3.1:8b`, `library/llama3.1:8b`) names the same model to
/// Ollama, so it must not find another price (or none: unpriced) or a fresh rate bucket.
pub fn model_key(name: &str) -> Cow<'_, str> {
    tagged(folded(name))
}

/// A [`folded`] name with `:latest` when its last part has no tag (a registry's port is not
/// one): [`model_key`] from a name already folded.
pub fn tagged(folded: Cow<'_, str>) -> Cow<'_, str> {
    let has_tag = folded
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':'));
    match folded {
        b if has_tag => b,
        b => Cow::Owned(format!("{b}:latest")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_a_model_however_it_is_spelt() {
        for spelt in [
            "llama3.1:8b",
            "LLAMA3.1:8B",
            " llama3.1:8b\n",
            "library/llama3.1:8b",
            "registry.ollama.ai/library/llama3.1:8b",
            "Registry.Ollama.AI/Library/Llama3.1:8b",
            "https://registry.ollama.ai/library/llama3.1:8b",
            "x://llama3.1:8b",
        ] {
            assert_eq!(model_key(spelt), "llama3.1:8b", "{spelt:?}");
        }
        assert_eq!(model_key("Qwen2.5"), "qwen2.5:latest");
        assert_eq!(model_key("registry.ollama.ai/user/m"), "user/m:latest");
        // Not the default namespace or registry: other models.
        assert_eq!(
            model_key("registry.ollama.ai/m:1"),
            "registry.ollama.ai/m:1"
        );
        assert_eq!(model_key("library/x/m:1"), "library/x/m:1");
        assert_eq!(model_key("hf.co/Org/Repo:Q4_K_M"), "hf.co/org/repo:q4_k_m");
        // A registry's port is not a tag.
        assert_eq!(model_key("reg:5000/ns/m"), "reg:5000/ns/m:latest");
        assert!(matches!(
            model_key("qwen2.5:7b"),
            Cow::Borrowed("qwen2.5:7b")
        ));
        assert_eq!(folded("Qwen/*"), "qwen/*");
    }

    #[test]
    fn tags() {
        assert_eq!(canonical_model("llama3.1"), "llama3.1:latest");
        assert!(matches!(
            canonical_model("qwen2.5:7b"),
            Cow::Borrowed("qwen2.5:7b")
        ));
    }
}
