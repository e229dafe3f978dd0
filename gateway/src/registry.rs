//! Maps a filter's YAML name to its constructor. The chain runner knows no filter types.

use std::collections::BTreeMap;
use std::sync::Arc;

use gateway_filter::{BuildContext, Filter, OptionsError};

/// Builds a filter from its options (the entry minus `use`).
pub type FilterFactory =
    fn(&serde_json::Value, &BuildContext) -> Result<Arc<dyn Filter>, OptionsError>;

#[derive(Default)]
pub struct Registry {
    factories: BTreeMap<&'static str, FilterFactory>,
}

impl Registry {
    /// The filters compiled into this binary.
    pub fn builtin() -> Registry {
        let mut r = Registry::default();
        r.register("auth", filter_auth::build);
        r.register("policy", filter_policy::build);
        r.register("ratelimit", filter_ratelimit::build);
        r.register("audit", filter_audit::build);
        r.register("budget", filter_budget::build);
        r
    }

    pub fn register(&mut self, name: &'static str, factory: FilterFactory) {
        self.factories.insert(name, factory);
    }

    pub fn get(&self, name: &str) -> Option<FilterFactory> {
        self.factories.get(name).copied()
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.factories.keys().copied().collect()
    }
}
