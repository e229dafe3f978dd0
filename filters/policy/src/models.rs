//! Model allow-lists: exact names and `*` globs; a name without a tag means `:latest`, as
//! Ollama reads it.

use std::sync::Arc;

use gateway_filter::{ModelGate, Principal};

use gateway_filter::glob::wildcard;
use gateway_filter::model_name::canonical_model;

/// Whether Ollama would run `name` on ollama.com: a name ending in `:cloud` or `-cloud`, in
/// any case, whitespace trimmed, is a cloud model, run with the server owner's account, the
/// prompt leaving the box. Ollama reads the source from the part after the last `:`,
/// trimmed on its own (`modelref.parseSourceSuffix`): `gpt-oss:120b: cloud` is
/// `gpt-oss:120b` on the cloud, and `gpt-oss:120b -cloud` too.
fn is_cloud(name: &str) -> bool {
    let ends = |s: &str| {
        let s = s.as_bytes();
        s.len() >= 6 && {
            let tail = &s[s.len() - 6..];
            tail.eq_ignore_ascii_case(b":cloud") || tail.eq_ignore_ascii_case(b"-cloud")
        }
    };
    let name = name.trim();
    ends(name)
        || name.rsplit_once(':').is_some_and(|(_, source)| {
            let source = source.trim();
            source.eq_ignore_ascii_case("cloud") || (!source.contains('/') && ends(source))
        })
}

/// Whether `model` is in `list`; an empty list allows every model. A cloud model is allowed
/// only by an entry that names the cloud itself (`gpt-oss:120b-cloud`, `*-cloud`): `gpt-oss:*`
/// or `*` mean the models of the box.
pub fn list_allows(list: &[String], model: &str) -> bool {
    if list.is_empty() {
        return true;
    }
    let cloud = is_cloud(model);
    let model = canonical_model(model);
    list.iter().any(|p| {
        if cloud && !is_cloud(p) {
            false
        } else if p.contains('*') {
            wildcard(p, &model)
        } else {
            canonical_model(p) == model
        }
    })
}

/// The global list combined with the caller's own.
#[derive(Debug)]
pub struct Gate {
    pub global: Arc<Vec<String>>,
    pub principal: Option<Arc<Principal>>,
}

impl ModelGate for Gate {
    fn allows(&self, model: &str) -> bool {
        list_allows(&self.global, model)
            && self
                .principal
                .as_ref()
                .is_none_or(|p| list_allows(&p.models, model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists() {
        let l = vec!["llama3.1:*".to_string(), "qwen2.5".to_string()];
        assert!(list_allows(&l, "llama3.1:8b"));
        assert!(list_allows(&l, "llama3.1"), "llama3.1 is llama3.1:latest");
        assert!(list_allows(&l, "qwen2.5:latest"));
        assert!(list_allows(&l, "qwen2.5"));
        assert!(!list_allows(&l, "qwen2.5:7b"));
        assert!(!list_allows(&l, "mistral"));
        assert!(list_allows(&[], "anything"));
    }

    /// Ollama sends `NAME:cloud` and `NAME-cloud` models to ollama.com (the owner's account,
    /// the prompt off the box): a glob meant for the box's models does not reach them.
    #[test]
    fn cloud_models_need_an_entry_of_their_own() {
        let l = vec!["gpt-oss:*".to_string(), "*".to_string()];
        for name in [
            "gpt-oss:120b-cloud",
            "gpt-oss:120b:cloud",
            "gpt-oss:120b:CLOUD",
            "gpt-oss:120b-Cloud ",
            " deepseek-v3.1:671b-cloud",
            // Attacker review: Ollama trims the part after the last `:` on its own.
            "gpt-oss:120b: cloud",
            "gpt-oss:120b:\tCloud",
            "gpt-oss:120b:\u{a0}cloud",
            "gpt-oss:120b:cloud\u{3000}",
            "gpt-oss:120b -cloud",
            "gpt-oss:120b-cloud \n",
        ] {
            assert!(!list_allows(&l, name), "{name}");
        }
        assert!(list_allows(&l, "gpt-oss:20b"));
        let l = vec!["gpt-oss:120b-cloud".to_string(), "*:cloud".to_string()];
        assert!(list_allows(&l, "gpt-oss:120b-cloud"));
        assert!(list_allows(&l, "qwen3-coder:480b:cloud"));
        assert!(!list_allows(&l, "gpt-oss:120b"));
        assert!(
            list_allows(&[], "gpt-oss:120b-cloud"),
            "no list: every model"
        );
    }

    #[test]
    fn gate_needs_both_lists() {
        let p = Arc::new(Principal {
            models: vec!["llama*".into()],
            ..Default::default()
        });
        let g = Gate {
            global: Arc::new(vec!["llama3.1:8b".into(), "qwen2.5:7b".into()]),
            principal: Some(p),
        };
        assert!(g.allows("llama3.1:8b"));
        assert!(!g.allows("qwen2.5:7b"), "not in the principal's list");
        assert!(!g.allows("llama3.2:1b"), "not in the global list");
    }
}
