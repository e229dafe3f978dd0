//! Model allow-lists: exact names and `*` globs; a name without a tag means `:latest`, as
//! Ollama reads it.

use std::sync::Arc;

use gateway_filter::{ModelGate, Principal};

use gateway_filter::glob::wildcard;
use gateway_filter::model_name::canonical_model;

/// Whether `model` is in `list`; an empty list allows every model.
pub fn list_allows(list: &[String], model: &str) -> bool {
    if list.is_empty() {
        return true;
    }
    let model = canonical_model(model);
    list.iter().any(|p| {
        if p.contains('*') {
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
