//! Endpoint rules: which method may call which canonical path, and with which scope.

use gateway_filter::glob::wildcard;
use gateway_filter::http::Method;

/// A path pattern: `/api/chat` (exact), `/api/blobs/*` (`*` = one segment, or part of one:
/// `sha256:*`), `/v1/**` (any number of further segments).
#[derive(Debug, Clone)]
pub struct PathPattern {
    segments: Vec<String>,
    /// Ends with `/**`.
    rest: bool,
}

impl PathPattern {
    pub fn parse(p: &str) -> Result<PathPattern, String> {
        if !p.starts_with('/') {
            return Err(format!("{p:?} must start with /"));
        }
        let mut segments: Vec<String> = p
            .split('/')
            .skip(1)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let rest = segments.last().is_some_and(|s| s == "**");
        if rest {
            segments.pop();
        }
        if segments.iter().any(|s| s.contains("**")) {
            return Err(format!("{p:?}: ** may only end a pattern"));
        }
        Ok(PathPattern { segments, rest })
    }

    pub fn matches(&self, path: &str) -> bool {
        let mut parts = path.split('/').skip(1).filter(|s| !s.is_empty());
        for seg in &self.segments {
            match parts.next() {
                Some(part) if wildcard(seg, part) => {}
                _ => return false,
            }
        }
        self.rest || parts.next().is_none()
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub pattern: PathPattern,
    pub methods: Vec<Method>,
    /// Only principals with this scope get the rule.
    pub scope: Option<String>,
}

pub enum Verdict {
    Allow,
    /// The path is allowed for the caller, but not with this method.
    WrongMethod(Vec<Method>),
    Deny,
}

pub const PRESETS: [&str; 3] = ["openai-inference", "ollama-inference", "ollama-admin"];

fn rule(path: &str, methods: &[Method], scope: Option<&str>) -> Rule {
    Rule {
        pattern: PathPattern::parse(path)
            .unwrap_or_else(|_| unreachable!("preset paths are valid")),
        methods: methods.to_vec(),
        scope: scope.map(str::to_string),
    }
}

/// The rules of a preset, or `None` for an unknown name.
pub fn preset(name: &str, scope: Option<&str>) -> Option<Vec<Rule>> {
    let post = [Method::POST];
    let get = [Method::GET];
    Some(match name {
        "openai-inference" => vec![
            rule("/v1/chat/completions", &post, scope),
            rule("/v1/completions", &post, scope),
            rule("/v1/embeddings", &post, scope),
            rule("/v1/models", &get, scope),
        ],
        "ollama-inference" => vec![
            rule("/api/chat", &post, scope),
            rule("/api/generate", &post, scope),
            rule("/api/embed", &post, scope),
            rule("/api/embeddings", &post, scope),
            rule("/api/tags", &get, scope),
            rule("/api/show", &post, scope),
            rule("/api/version", &get, scope),
            rule("/api/ps", &get, scope),
        ],
        "ollama-admin" => vec![
            rule("/api/pull", &post, scope),
            rule("/api/push", &post, scope),
            rule("/api/delete", &[Method::DELETE], scope),
            rule("/api/copy", &post, scope),
            rule("/api/create", &post, scope),
            rule("/api/blobs/*", &[Method::HEAD, Method::POST], scope),
        ],
        _ => return None,
    })
}

#[derive(Debug, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
}

impl RuleSet {
    pub fn decide(&self, method: &Method, path: &str, scopes: &[String]) -> Verdict {
        let mut allowed_methods: Vec<Method> = Vec::new();
        for r in &self.rules {
            if r.scope.as_ref().is_some_and(|s| !scopes.contains(s)) || !r.pattern.matches(path) {
                continue;
            }
            if r.methods.contains(method) {
                return Verdict::Allow;
            }
            for m in &r.methods {
                if !allowed_methods.contains(m) {
                    allowed_methods.push(m.clone());
                }
            }
        }
        if allowed_methods.is_empty() {
            Verdict::Deny
        } else {
            Verdict::WrongMethod(allowed_methods)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = PathPattern::parse("/api/blobs/*").unwrap();
        assert!(p.matches("/api/blobs/sha256:abc"));
        assert!(!p.matches("/api/blobs"));
        assert!(!p.matches("/api/blobs/a/b"));
        let p = PathPattern::parse("/v1/**").unwrap();
        assert!(p.matches("/v1") && p.matches("/v1/models/x"));
        let p = PathPattern::parse("/api/blobs/sha256:*").unwrap();
        assert!(p.matches("/api/blobs/sha256:00") && !p.matches("/api/blobs/md5:00"));
        assert!(PathPattern::parse("api").is_err());
        assert!(PathPattern::parse("/a/**/b").is_err());
    }

    #[test]
    fn decisions() {
        let mut rs = RuleSet::default();
        rs.rules.extend(preset("ollama-inference", None).unwrap());
        rs.rules
            .extend(preset("ollama-admin", Some("admin")).unwrap());
        assert!(matches!(
            rs.decide(&Method::POST, "/api/chat", &[]),
            Verdict::Allow
        ));
        assert!(
            matches!(rs.decide(&Method::GET, "/api/chat", &[]), Verdict::WrongMethod(m) if m == [Method::POST])
        );
        assert!(matches!(
            rs.decide(&Method::POST, "/api/pull", &[]),
            Verdict::Deny
        ));
        assert!(
            matches!(rs.decide(&Method::GET, "/api/pull", &[]), Verdict::Deny),
            "no 405 hint to outsiders"
        );
        assert!(matches!(
            rs.decide(&Method::POST, "/api/pull", &["admin".into()]),
            Verdict::Allow
        ));
        assert!(matches!(
            rs.decide(&Method::POST, "/API/PULL", &["admin".into()]),
            Verdict::Deny
        ));
    }
}
