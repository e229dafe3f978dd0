//! The price table: USD per 1M prompt and completion tokens and/or per second of generation.

use gateway_filter::glob::wildcard;
use gateway_filter::model_name::{folded, model_key, tagged};
use gateway_filter::Usage;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Model name or `*` glob.
    pub model: String,
    /// Only on this backend (by name); any backend when absent.
    pub backend: Option<String>,
    #[serde(default)]
    pub prompt_per_1m: f64,
    #[serde(default)]
    pub completion_per_1m: f64,
    /// USD per second of generation (first to last response byte): GPU time.
    #[serde(default)]
    pub per_second: f64,
}

/// Nano-dollars: integer arithmetic so that sums are exact to the cent and beyond.
pub type Nano = i64;

pub fn usd_to_nano(usd: f64) -> Nano {
    (usd * 1e9).round() as Nano
}

impl Price {
    pub fn cost(&self, usage: Usage, generation_secs: f64) -> Nano {
        let usd = usage.prompt_tokens as f64 * self.prompt_per_1m / 1e6
            + usage.completion_tokens as f64 * self.completion_per_1m / 1e6
            + generation_secs * self.per_second;
        usd_to_nano(usd)
    }
}

/// Whether a price entry's `pattern` (folded: [`PriceTable::new`]) applies to `model` as
/// the router serves it: a bare `*` is every model (also `hf.co/org/repo:tag`, whose `/` a
/// glob's `*` does not cross), a name without a tag is its `:latest` on either side
/// (`qwen2.5` = `qwen2.5:latest`), and a model is named as Ollama resolves it, whatever its
/// case or default namespace, so no model the gateway serves slips past its price as
/// unpriced or a cheaper entry's. `folded`, `key`: `model`'s [`folded`] and [`model_key`]
/// forms, worked out once per lookup.
fn applies(pattern: &str, folded: &str, key: &str) -> bool {
    pattern == "*"
        // An exact name (kept as its key) or a glob, on the tagged name.
        || wildcard(pattern, key)
        // A glob ending in a name's last letters (`*-Instruct`) and a name without a tag
        // (vLLM's and SGLang's ids have none).
        || wildcard(pattern, folded)
}

#[derive(Debug, Clone, Default)]
pub struct PriceTable(Vec<Price>);

/// A price that is negative or not a number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("prices[{index}]: prices must be zero or positive numbers")]
pub struct NegativePrice {
    pub index: usize,
}

impl PriceTable {
    /// The entries, their model patterns folded as requests' names are ([`folded`]), an
    /// exact name as its key ([`model_key`]): worked out once, not per request.
    pub fn new(mut prices: Vec<Price>) -> PriceTable {
        for p in &mut prices {
            p.model = if p.model.contains('*') {
                folded(&p.model).into_owned()
            } else {
                model_key(&p.model).into_owned()
            };
        }
        PriceTable(prices)
    }

    pub fn validate(&self) -> Result<(), NegativePrice> {
        for (i, p) in self.0.iter().enumerate() {
            if [p.prompt_per_1m, p.completion_per_1m, p.per_second]
                .iter()
                .any(|v| !v.is_finite() || *v < 0.0)
            {
                return Err(NegativePrice { index: i });
            }
        }
        Ok(())
    }

    /// The first entry for `model` on `backend` (entries without a backend match any).
    pub fn find(&self, model: &str, backend: Option<&str>) -> Option<&Price> {
        let folded = folded(model);
        let key = tagged(folded.clone());
        self.0.iter().find(|p| {
            applies(&p.model, &folded, &key)
                && p.backend.as_deref().is_none_or(|b| Some(b) == backend)
        })
    }

    /// Whether any entry could apply to `model`.
    pub fn has(&self, model: &str) -> bool {
        let folded = folded(model);
        let key = tagged(folded.clone());
        self.0.iter().any(|p| applies(&p.model, &folded, &key))
    }

    /// Before the backend is known: the most expensive entry that could apply.
    pub fn worst_case(&self, model: &str, usage: Usage, secs: f64) -> Option<Nano> {
        let folded = folded(model);
        let key = tagged(folded.clone());
        self.0
            .iter()
            .filter(|p| applies(&p.model, &folded, &key))
            .map(|p| p.cost(usage, secs))
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs() {
        let t = PriceTable::new(vec![
            Price {
                model: "llama3.1:*".into(),
                backend: Some("cloud".into()),
                prompt_per_1m: 0.5,
                completion_per_1m: 1.5,
                per_second: 0.0,
            },
            Price {
                model: "llama3.1:*".into(),
                backend: None,
                prompt_per_1m: 0.0,
                completion_per_1m: 0.0,
                per_second: 0.001,
            },
        ]);
        let u = Usage {
            prompt_tokens: 1_000,
            completion_tokens: 2_000,
            ..Default::default()
        };
        assert_eq!(
            t.find("llama3.1:8b", Some("cloud")).unwrap().cost(u, 0.0),
            usd_to_nano(0.0035)
        );
        assert_eq!(
            t.find("llama3.1:8b", Some("gpu-a")).unwrap().cost(u, 2.5),
            usd_to_nano(0.0025)
        );
        assert!(t.find("qwen", None).is_none());
        // However Ollama would be asked for it, the same model has the same price.
        for spelt in [
            "LLAMA3.1:8b",
            "library/llama3.1:8b",
            "registry.ollama.ai/library/Llama3.1:8B",
        ] {
            assert_eq!(
                t.find(spelt, Some("cloud")).unwrap().cost(u, 0.0),
                usd_to_nano(0.0035),
                "{spelt}"
            );
        }
        // Patterns are read the same way.
        let q = PriceTable::new(vec![Price {
            model: "Library/Qwen2.5".into(),
            backend: None,
            prompt_per_1m: 1.0,
            completion_per_1m: 1.0,
            per_second: 0.0,
        }]);
        assert!(q.has("qwen2.5:latest") && q.has("QWEN2.5") && !q.has("qwen2.5:7b"));
        assert_eq!(
            t.worst_case("llama3.1:8b", u, 1.0),
            Some(usd_to_nano(0.0035))
        );
    }

    /// Whether an entry for `pattern`, as the table keeps it, applies to `model`.
    fn applies_to(pattern: &str, model: &str) -> bool {
        PriceTable::new(vec![Price {
            model: pattern.into(),
            backend: None,
            prompt_per_1m: 0.0,
            completion_per_1m: 0.0,
            per_second: 0.0,
        }])
        .has(model)
    }

    /// Prices apply to models as the router serves them: no served model is free by a
    /// spelling.
    #[test]
    fn prices_match_models_as_they_are_served() {
        for (pattern, model) in [
            ("*", "hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M"),
            ("*", "user/model:tag"),
            ("qwen2.5", "qwen2.5:latest"),
            ("qwen2.5:latest", "qwen2.5"),
            ("llama3.1:*", "llama3.1"),
            ("*:70b*", "llama3.1:70b-instruct"),
            ("Llama3.1:*", "library/LLAMA3.1:8b"),
            // Ids without a tag (vLLM, SGLang), by their last letters.
            ("*-Instruct", "Llama-3-70B-Instruct"),
            (
                "meta-llama/*-70B-Instruct",
                "meta-llama/Llama-3-70B-Instruct",
            ),
            // A registry's port is not a tag.
            ("reg:5000/ns/m", "reg:5000/ns/m"),
        ] {
            assert!(applies_to(pattern, model), "{pattern} applies to {model}");
        }
        for (pattern, model) in [
            ("qwen2.5", "qwen2.5:7b"),
            ("llama3.1:*", "llama3.2:1b"),
            ("*:70b*", "llama3.1:8b"),
        ] {
            assert!(
                !applies_to(pattern, model),
                "{pattern} does not apply to {model}"
            );
        }
    }
}
