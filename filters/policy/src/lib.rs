//! The `policy` filter: what may be asked, by whom, and in which shape.
//!
//! - endpoint allow-lists on the canonical path (presets and explicit rules; scoped rules only
//!   for principals with that scope): 403 outside them, 405 with `Allow` for a wrong method;
//! - model allow-lists (global and per principal), also applied to model lists passed back;
//! - request shape: JSON content type, field types, prompt size, message count, header
//!   count and size, and an output-token cap that clamps (or refuses) what is asked.

mod models;
mod rules;
mod shape;

use std::sync::Arc;

use async_trait::async_trait;
use gateway_filter::http::{header, HeaderValue, Method, StatusCode};
use gateway_filter::units::HumanSize;
use gateway_filter::{parse_options, BuildContext, Filter, OptionsError, Rejection, RequestCtx};
use serde::Deserialize;

pub use models::list_allows;
use models::Gate;
use rules::{preset, PathPattern, Rule, RuleSet, Verdict, PRESETS};
use shape::{MediaUrls, OverCap, ServerSettings};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyOptions {
    /// Presets and rules; default: both inference presets, admin routes for scope `admin`.
    /// Each a preset's name or a rule's mapping ([`RuleObject`]), told apart by hand: an
    /// untagged enum's error named neither the bad key nor the fix.
    allow: Option<Vec<serde_json::Value>>,
    /// Models anyone may use (exact names or `*` globs); empty = all.
    #[serde(default)]
    models: Vec<String>,
    max_prompt_chars: Option<usize>,
    max_messages: Option<usize>,
    max_output_tokens: Option<u64>,
    #[serde(default)]
    over_output_cap: OverCap,
    /// Most completions one request may ask for (`n`, `best_of`).
    max_choices: Option<u64>,
    /// Most alternatives a token a request may ask to be shown ([`shape::check_logprobs`]).
    #[serde(default = "default_max_logprobs")]
    max_logprobs: u32,
    /// Largest image side and most diffusion steps of an Ollama image generation
    /// ([`shape::check_image_size`]).
    #[serde(default = "default_max_image_side")]
    max_image_side: u32,
    #[serde(default = "default_max_image_steps")]
    max_image_steps: u32,
    /// Largest Ollama context window (`options.num_ctx`); clamped or refused like the cap.
    max_context_tokens: Option<u64>,
    /// The one Ollama context window every request runs with (`options.num_ctx` written,
    /// whatever the client asked): clients asking for different ones would reload the model.
    context_tokens: Option<u64>,
    /// Whether requests may set Ollama's runner options, `keep_alive` and request templates.
    #[serde(default)]
    server_settings: ServerSettings,
    /// Whether media in messages may be given by URL for the model server to fetch.
    #[serde(default)]
    media_urls: MediaUrls,
    #[serde(default = "yes")]
    require_json_content_type: bool,
    #[serde(default = "default_max_headers")]
    max_headers: usize,
    #[serde(default = "default_max_header_bytes")]
    max_header_bytes: HumanSize,
}

fn yes() -> bool {
    true
}
fn default_max_logprobs() -> u32 {
    shape::MAX_LOGPROBS
}
fn default_max_image_side() -> u32 {
    4096
}
fn default_max_image_steps() -> u32 {
    100
}
fn default_max_headers() -> usize {
    100
}
fn default_max_header_bytes() -> HumanSize {
    HumanSize(32 << 10)
}

#[derive(Debug)]
enum RuleEntry {
    Preset(String),
    Rule(RuleObject),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleObject {
    preset: Option<String>,
    path: Option<String>,
    #[serde(default)]
    methods: Vec<String>,
    scope: Option<String>,
}

pub struct PolicyFilter {
    rules: RuleSet,
    models: Arc<Vec<String>>,
    max_prompt_chars: Option<usize>,
    max_messages: Option<usize>,
    max_output_tokens: Option<u64>,
    over_output_cap: OverCap,
    max_choices: Option<u64>,
    shape_limits: shape::Limits,
    max_context_tokens: Option<u64>,
    context_tokens: Option<u64>,
    server_settings: ServerSettings,
    media_urls: MediaUrls,
    require_json: bool,
    max_headers: usize,
    max_header_bytes: usize,
}

fn default_rules() -> Vec<RuleEntry> {
    vec![
        RuleEntry::Preset("openai-inference".into()),
        RuleEntry::Preset("ollama-inference".into()),
        RuleEntry::Rule(RuleObject {
            preset: Some("ollama-admin".into()),
            path: None,
            methods: Vec::new(),
            scope: Some("admin".into()),
        }),
    ]
}

/// The methods a rule may name: those a model server's routes answer (`Method` takes any
/// token, so `GTE` made a rule that never matched).
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

fn rule_entries(values: Vec<serde_json::Value>) -> Result<Vec<RuleEntry>, OptionsError> {
    if values.is_empty() {
        return Err(OptionsError::new(
            "allow",
            "an empty list allows nothing, so every request would be refused; leave `allow` out for the inference presets, or list what to allow",
        ));
    }
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            serde_json::Value::String(name) => Ok(RuleEntry::Preset(name)),
            v @ serde_json::Value::Object(_) => serde_json::from_value::<RuleObject>(v)
                .map(RuleEntry::Rule)
                .map_err(|e| {
                    OptionsError::new(
                        format!("allow[{i}]"),
                        format!("{e}; a rule is `preset: NAME` (with `scope:`) or `path: /PATH` with `methods: [GET, POST]`"),
                    )
                }),
            _ => Err(OptionsError::new(
                format!("allow[{i}]"),
                "each entry is a preset's name or a rule such as { path: /api/show, methods: [POST] }",
            )),
        })
        .collect()
}

fn build_rules(entries: Vec<RuleEntry>) -> Result<RuleSet, OptionsError> {
    let mut set = RuleSet::default();
    for (i, e) in entries.into_iter().enumerate() {
        let at = format!("allow[{i}]");
        let unknown = |name: &str| {
            OptionsError::new(
                at.clone(),
                format!("unknown preset {name:?}; presets: {}", PRESETS.join(", ")),
            )
        };
        match e {
            RuleEntry::Preset(name) => set
                .rules
                .extend(preset(&name, None).ok_or_else(|| unknown(&name))?),
            RuleEntry::Rule(r) => match (r.preset, r.path) {
                (Some(name), None) => {
                    if !r.methods.is_empty() {
                        return Err(OptionsError::new(
                            format!("{at}.methods"),
                            "a preset has its own methods; use `path:` for a custom rule",
                        ));
                    }
                    set.rules
                        .extend(preset(&name, r.scope.as_deref()).ok_or_else(|| unknown(&name))?);
                }
                (None, Some(path)) => {
                    let pattern = PathPattern::parse(&path)
                        .map_err(|m| OptionsError::new(format!("{at}.path"), m))?;
                    if r.methods.is_empty() {
                        return Err(OptionsError::new(
                            format!("{at}.methods"),
                            "list the methods this path allows, e.g. [GET, POST]",
                        ));
                    }
                    let methods = r
                        .methods
                        .iter()
                        .map(|m| {
                            let upper = m.trim().to_ascii_uppercase();
                            METHODS
                                .contains(&upper.as_str())
                                .then(|| Method::from_bytes(upper.as_bytes()).ok())
                                .flatten()
                                .ok_or_else(|| {
                                    OptionsError::new(
                                        format!("{at}.methods"),
                                        format!(
                                            "{m:?} is not an HTTP method a model server answers: {}",
                                            METHODS.join(", ")
                                        ),
                                    )
                                })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    set.rules.push(Rule {
                        pattern,
                        methods,
                        scope: r.scope,
                    });
                }
                _ => {
                    return Err(OptionsError::new(
                        at,
                        "give either `preset: NAME` or `path:` with `methods:`",
                    ))
                }
            },
        }
    }
    Ok(set)
}

/// Registry constructor: `- use: policy` plus [`PolicyOptions`].
pub fn build(
    options: &serde_json::Value,
    _cx: &BuildContext,
) -> Result<Arc<dyn Filter>, OptionsError> {
    let o: PolicyOptions = parse_options(options)?;
    let entries = match o.allow {
        Some(values) => rule_entries(values)?,
        None => default_rules(),
    };
    let rules = build_rules(entries)?;
    for (key, zero) in [
        ("max_prompt_chars", o.max_prompt_chars == Some(0)),
        ("max_messages", o.max_messages == Some(0)),
        ("max_image_side", o.max_image_side == 0),
        ("max_image_steps", o.max_image_steps == 0),
        ("max_headers", o.max_headers == 0),
        ("max_header_bytes", o.max_header_bytes.0 == 0),
    ] {
        if zero {
            return Err(OptionsError::new(
                key,
                "must be at least 1: 0 refuses every request it applies to (leave it out for the default)",
            ));
        }
    }
    for (key, value) in [
        ("max_output_tokens", o.max_output_tokens),
        ("max_choices", o.max_choices),
        ("max_context_tokens", o.max_context_tokens),
        ("context_tokens", o.context_tokens),
    ] {
        if value == Some(0) {
            return Err(OptionsError::new(key, "must be at least 1"));
        }
    }
    if o.context_tokens.is_some() && o.max_context_tokens.is_some() {
        return Err(OptionsError::new(
            "context_tokens",
            "every request runs with this context window; remove max_context_tokens (it would never apply)",
        ));
    }
    Ok(Arc::new(PolicyFilter {
        rules,
        models: Arc::new(o.models),
        max_prompt_chars: o.max_prompt_chars,
        max_messages: o.max_messages,
        max_output_tokens: o.max_output_tokens,
        over_output_cap: o.over_output_cap,
        max_choices: o.max_choices,
        shape_limits: shape::Limits {
            logprobs: f64::from(o.max_logprobs),
            image_side: f64::from(o.max_image_side),
            image_steps: f64::from(o.max_image_steps),
        },
        max_context_tokens: o.max_context_tokens,
        context_tokens: o.context_tokens,
        server_settings: o.server_settings,
        media_urls: o.media_urls,
        require_json: o.require_json_content_type,
        max_headers: o.max_headers,
        max_header_bytes: usize::try_from(o.max_header_bytes.0).unwrap_or(usize::MAX),
    }))
}

fn is_json(ctx: &RequestCtx) -> bool {
    ctx.header_str("content-type").is_some_and(|ct| {
        let mime = ct.split(';').next().unwrap_or_default().trim();
        mime.eq_ignore_ascii_case("application/json")
    })
}

impl PolicyFilter {
    fn check_headers(&self, ctx: &RequestCtx) -> Result<(), Rejection> {
        let bytes: usize = ctx
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        if ctx.headers.len() > self.max_headers || bytes > self.max_header_bytes {
            return Err(Rejection::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_header_fields_too_large",
                format!(
                    "at most {} headers and {} bytes of headers are accepted",
                    self.max_headers, self.max_header_bytes
                ),
            ));
        }
        Ok(())
    }

    fn check_endpoint(&self, ctx: &RequestCtx) -> Result<(), Rejection> {
        let scopes = ctx.principal.as_ref().map_or(&[][..], |p| &p.scopes[..]);
        match self.rules.decide(&ctx.method, &ctx.path, scopes) {
            Verdict::Allow => Ok(()),
            Verdict::WrongMethod(methods) => {
                let allow = methods
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>()
                    .join(", ");
                let value =
                    HeaderValue::from_str(&allow).unwrap_or(HeaderValue::from_static("GET"));
                Err(Rejection::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!(
                        "{} is not allowed on {}; use {allow}",
                        gateway_filter::echo(ctx.method.as_str()),
                        gateway_filter::echo(&ctx.path)
                    ),
                )
                .with_header(header::ALLOW, value))
            }
            Verdict::Deny => Err(Rejection::new(
                StatusCode::FORBIDDEN,
                "endpoint_not_allowed",
                format!(
                    "{} {} is not allowed through this gateway",
                    gateway_filter::echo(ctx.method.as_str()),
                    gateway_filter::echo(&ctx.path)
                ),
            )),
        }
    }

    /// Every model the request names must pass the allow-lists, whatever the route.
    fn check_models(&self, ctx: &RequestCtx, gate: &Gate) -> Result<(), Rejection> {
        use gateway_filter::ModelGate;
        match ctx
            .model
            .iter()
            .chain(ctx.named_models.iter())
            .chain(ctx.query_models.iter())
            .find(|m| !gate.allows(m))
        {
            Some(model) => Err(Rejection::new(
                StatusCode::FORBIDDEN,
                "model_not_allowed",
                format!(
                    "model {:?} is not allowed for this caller",
                    gateway_filter::echo(model)
                ),
            )),
            None => Ok(()),
        }
    }

    /// A body on a route the gateway has no parser for (a custom rule's): refused under an
    /// output cap (its limit cannot be written), and refused for a model-restricted caller
    /// unless it names a model the gateway could read (and judged above).
    fn check_unknown_format(&self, ctx: &RequestCtx, restricted: bool) -> Result<(), Rejection> {
        let target = || format!("{} {}", ctx.method, gateway_filter::echo(&ctx.path));
        if self.max_output_tokens.is_some() {
            return Err(Rejection::new(
                StatusCode::FORBIDDEN,
                "output_cap_unenforceable",
                format!(
                    "{} carries a body in a format the gateway cannot cap (max_output_tokens); use the OpenAI or Ollama inference routes",
                    target()
                ),
            ));
        }
        if restricted && ctx.named_models.is_empty() {
            return Err(Rejection::new(
                StatusCode::FORBIDDEN,
                "model_required",
                format!(
                    "{} must name its model in a JSON body the gateway can read: this caller may use only some models",
                    target()
                ),
            ));
        }
        Ok(())
    }

    /// The content-type rule stops cross-site form posts, which matter only for credentials a
    /// browser attaches by itself (basic auth, client certificates) or none at all; an API key
    /// in a header cannot be sent cross-site without a preflight. It holds for every route
    /// whose body is JSON: inference, Ollama's management routes (a form could otherwise make
    /// an administrator's browser pull, create, copy or push models). Not routes of custom
    /// rules, whose bodies may rightly be forms (an audio upload).
    fn check_content_type(&self, ctx: &RequestCtx) -> Result<(), Rejection> {
        let ambient = ctx.principal.as_ref().is_none_or(|p| p.method != "api_key");
        if !self.require_json || !ambient || is_json(ctx) {
            return Ok(());
        }
        Err(Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            if ctx.route.is_inference() {
                "inference requests must be sent with Content-Type: application/json"
            } else {
                "requests to this route must be sent with Content-Type: application/json"
            },
        ))
    }

    /// What a generating body may ask on any route that reads it, a custom rule's included
    /// (llama.cpp's `/completion` reads `n_probs`, Ollama's `/v1/messages` a message list):
    /// alternatives a token, and messages.
    fn check_generation_shape(&self, body: &serde_json::Value) -> Result<(), Rejection> {
        shape::check_logprobs(body, self.shape_limits.logprobs)?;
        if let Some(max) = self.max_messages {
            let n = shape::message_count(body);
            if n > max {
                return Err(Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "too_many_messages",
                    format!("{n} messages (each part of a message's content counts as one); at most {max} are accepted"),
                ));
            }
        }
        Ok(())
    }

    fn check_inference(&self, ctx: &mut RequestCtx) -> Result<(), Rejection> {
        if let Some(body) = &ctx.json {
            shape::check_types(ctx.route, body)?;
            if self.server_settings == ServerSettings::Refuse {
                shape::check_server_settings(ctx.route, body)?;
            }
            if self.media_urls == MediaUrls::DataOnly {
                shape::check_media_urls(ctx.route, body)?;
            }
            shape::check_image_size(ctx.route, body, &self.shape_limits)?;
            self.check_generation_shape(body)?;
            if let Some(max) = self.max_prompt_chars {
                let n = shape::prompt_chars(body);
                if n > max {
                    return Err(Rejection::new(
                        StatusCode::BAD_REQUEST,
                        "prompt_too_long",
                        format!("the prompt has {n} characters; at most {max} are accepted"),
                    ));
                }
            }
        }
        if self.server_settings == ServerSettings::Refuse {
            shape::drop_keep_alive(ctx);
        }
        if let Some(max) = self.max_choices {
            shape::check_choices(ctx, max)?;
        }
        if let Some(cap) = self.max_output_tokens {
            shape::apply_output_cap(ctx, cap, self.over_output_cap)?;
        }
        if let Some(n) = self.context_tokens {
            shape::pin_context(ctx, n)?;
        } else if let Some(cap) = self.max_context_tokens {
            shape::apply_context_cap(ctx, cap, self.over_output_cap)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Filter for PolicyFilter {
    fn name(&self) -> &'static str {
        "policy"
    }

    /// Shape checks, the model allow-list and the output cap read the held body.
    fn needs_body(&self) -> bool {
        true
    }

    /// Its checks read only the request and the principal, never a limiter's answer.
    fn runs_alongside(&self) -> bool {
        true
    }

    async fn on_request(&self, ctx: &mut RequestCtx) -> Result<(), Rejection> {
        self.check_headers(ctx)?;
        self.check_endpoint(ctx)?;
        let restricted =
            !self.models.is_empty() || ctx.principal.as_ref().is_some_and(|p| !p.models.is_empty());
        let gate = restricted.then(|| Gate {
            global: self.models.clone(),
            principal: ctx.principal.clone(),
        });
        if let Some(g) = &gate {
            self.check_models(ctx, g)?;
            if ctx.opaque_weights {
                return Err(Rejection::new(
                    StatusCode::FORBIDDEN,
                    "model_not_allowed",
                    "weights given by digest or path (`files`, `adapters`, `draft_files`, `path`, a Modelfile's `ADAPTER` or `DRAFT`, LoRA adapters by name or path) or a model relayed to another server (`remote_host`) cannot be checked against this caller's model list",
                ));
            }
        }
        if ctx.unknown_format {
            self.check_unknown_format(ctx, gate.is_some())?;
            if self.media_urls == MediaUrls::DataOnly {
                shape::check_unknown_media(ctx)?;
            }
            if self.server_settings == ServerSettings::Refuse {
                shape::check_custom_server_settings(ctx)?;
            }
            if let Some(body) = &ctx.json {
                self.check_generation_shape(body)?;
            }
        }
        if ctx.route.holds_body() {
            self.check_content_type(ctx)?;
        }
        if ctx.route.is_inference() {
            self.check_inference(ctx)?;
        }
        if ctx.route.lists_models() {
            if let Some(g) = gate {
                ctx.model_gate = Some(Arc::new(g));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
