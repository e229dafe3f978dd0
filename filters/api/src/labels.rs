//! Bounded metric label values for model names and principals, shared by the gateway's
//! request metrics and the filters' own (a budget's spend): a client must not be able to add
//! a Prometheus series per made-up model name or identity.

use std::collections::HashSet;
use std::sync::RwLock;

use crate::Principal;

/// What bounds the label values (`metrics:` in the config).
#[derive(Debug, Clone, Copy)]
pub struct LabelLimits {
    /// Label with the principal's id (else `any`).
    pub principal_label: bool,
    /// Distinct model names; later ones count as `other`.
    pub max_models: usize,
    /// Distinct principals not from the keys file or htpasswd; later ones count as `other`.
    pub max_principals: usize,
}

impl Default for LabelLimits {
    fn default() -> Self {
        LabelLimits {
            principal_label: true,
            max_models: 100,
            max_principals: 1000,
        }
    }
}

/// Label values taken so far, at most `max`: a value seen is used as it is, a new one takes a
/// slot while there is room, and beyond that the caller's catch-all stands in.
#[derive(Debug)]
struct LabelSlots {
    max: usize,
    seen: RwLock<HashSet<String>>,
}

impl LabelSlots {
    fn new(max: usize) -> LabelSlots {
        LabelSlots {
            max,
            seen: RwLock::new(HashSet::new()),
        }
    }

    /// `value` when it was seen, or is new, `admit`ted and finds room; else `None`.
    fn take<'a>(&self, value: &'a str, admit: bool) -> Option<&'a str> {
        match self.seen.read() {
            Ok(s) if s.contains(value) => return Some(value),
            // Full: no write lock for every request of an unseen value.
            Ok(s) if !admit || s.len() >= self.max => return None,
            _ => {}
        }
        match self.seen.write() {
            Ok(s) if s.contains(value) => Some(value),
            Ok(mut s) if s.len() < self.max => {
                s.insert(value.to_string());
                Some(value)
            }
            _ => None,
        }
    }
}

/// The label values of one process: every metric labelled by model or principal takes its
/// values from here, so they agree and stay bounded together.
#[derive(Debug)]
pub struct MetricLabels {
    principal_label: bool,
    models: LabelSlots,
    /// Principals named by an identity provider, a validator or a proxy.
    principals: LabelSlots,
}

impl Default for MetricLabels {
    fn default() -> Self {
        MetricLabels::new(LabelLimits::default())
    }
}

impl MetricLabels {
    pub fn new(limits: LabelLimits) -> MetricLabels {
        MetricLabels {
            principal_label: limits.principal_label,
            models: LabelSlots::new(limits.max_models),
            principals: LabelSlots::new(limits.max_principals),
        }
    }

    /// The model label: a name already seen, or a new one a backend served (`admit`) while
    /// fewer than `max_models` names were seen; else `other`. Names only refused (a model list,
    /// a limit) or unknown to every backend take no slot: any key could otherwise use up the
    /// slots with made-up names, and every real model not yet seen would count as `other`.
    pub fn model<'a>(&self, model: Option<&'a str>, admit: bool) -> &'a str {
        let Some(m) = model else { return "none" };
        self.models.take(m, admit).unwrap_or("other")
    }

    /// The principal label: `any` when principals are not labelled, `anonymous` without
    /// one. Ids the keys file or htpasswd lists are as many as the operator wrote, and are
    /// used as they are, however the principal authenticated; ids an identity provider, a
    /// validator or a proxy names are as many as the outside source has users, so each takes
    /// a slot, while fewer than `max_principals` were seen, and counts as `other` after.
    pub fn principal<'a>(&self, p: Option<&'a Principal>) -> &'a str {
        if !self.principal_label {
            return "any";
        }
        let Some(p) = p else {
            return crate::ANONYMOUS;
        };
        if p.listed {
            return &p.id;
        }
        self.principals.take(&p.id, true).unwrap_or("other")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_slots() -> MetricLabels {
        MetricLabels::new(LabelLimits {
            principal_label: true,
            max_models: 2,
            max_principals: 2,
        })
    }

    /// Model label slots go to names a backend served; made-up names that are refused or
    /// unknown never use them up (attacker review, 2026-12-04).
    #[test]
    fn only_served_models_take_a_label_slot() {
        let m = two_slots();
        for i in 0..100 {
            let junk = format!("junk-{i}");
            assert_eq!(m.model(Some(&junk), false), "other");
        }
        assert_eq!(m.model(Some("llama3.1:8b"), true), "llama3.1:8b");
        assert_eq!(
            m.model(Some("llama3.1:8b"), false),
            "llama3.1:8b",
            "seen once served, named also when refused"
        );
        assert_eq!(m.model(Some("qwen2.5:7b"), true), "qwen2.5:7b");
        assert_eq!(m.model(Some("mistral:7b"), true), "other", "full");
        assert_eq!(m.model(None, true), "none");
    }

    /// Principals named from outside (a JWT's subject, a validator's answer, a proxy's
    /// header) take label slots, bounded; those the keys file or htpasswd lists are always
    /// named.
    #[test]
    fn principals_from_outside_take_bounded_label_slots() {
        let m = two_slots();
        let p = |id: &str, method: &'static str, listed: bool| Principal {
            id: id.to_string(),
            method,
            listed,
            ..Principal::default()
        };
        let subjects: Vec<Principal> = (0..5)
            .map(|i| p(&format!("user-{i}"), "jwt", false))
            .collect();
        let labels: Vec<&str> = subjects.iter().map(|s| m.principal(Some(s))).collect();
        assert_eq!(labels, ["user-0", "user-1", "other", "other", "other"]);
        assert_eq!(m.principal(Some(&subjects[0])), "user-0", "kept once seen");
        // Listed in the keys file: named, however it authenticated.
        for (i, method) in ["api_key", "jwt", "forward", "proxy", "mtls"]
            .into_iter()
            .enumerate()
        {
            let key = p(&format!("key-{i}"), method, true);
            assert_eq!(m.principal(Some(&key)), key.id);
        }
        assert_eq!(m.principal(None), crate::ANONYMOUS);
    }
}
