//! How many output tokens a request may produce, read from every field a backend of the
//! route's wire format honours, and written back to all of them.
//!
//! Backends disagree on which field they read: OpenAI and vLLM honour `max_completion_tokens`
//! (over `max_tokens`), llama-cpp-python only `max_tokens`, llama.cpp's server `n_predict`
//! first, Ollama only `options.num_predict`. A cap that reads one field and writes one field
//! is bypassed by putting a small number in the field it reads and a large one in the field
//! the backend reads. So the ask is the largest of all of them (a negative value means
//! "unbounded" to Ollama and llama.cpp), and a cap is written to every field at once.
//!
//! Values are read as the laxest backend reads them: `1e6` and `"1000000"` are a million
//! (pydantic accepts both), fractions and other types are refused.

use serde_json::{Map, Value};

use crate::{Route, WireFormat};

/// Top-level fields of OpenAI-format bodies that bound the output.
pub const OPENAI_FIELDS: [&str; 3] = ["max_tokens", "max_completion_tokens", "n_predict"];
/// The fields the cap is always written to on OpenAI routes (the others only when present).
const OPENAI_WRITTEN: [&str; 2] = ["max_tokens", "max_completion_tokens"];
/// Fields that ask for several completions in one request (`n_cmpl`: llama.cpp's server,
/// which reads it before `n`).
const CHOICE_FIELDS: [&str; 3] = ["n", "best_of", "n_cmpl"];

/// One field's value as a token count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Absent,
    Bounded(u64),
    /// Zero or negative: Ollama's 0 (no limit), -1 (until stop) and -2 (fill the context),
    /// llama.cpp's -1, llama-cpp-python's 0 (up to the context size).
    Unbounded,
}

impl Limit {
    /// The larger of two asks; unbounded beats everything, anything beats absent.
    fn max(self, other: Limit) -> Limit {
        match (self, other) {
            (Limit::Unbounded, _) | (_, Limit::Unbounded) => Limit::Unbounded,
            (Limit::Bounded(a), Limit::Bounded(b)) => Limit::Bounded(a.max(b)),
            (Limit::Bounded(a), Limit::Absent) | (Limit::Absent, Limit::Bounded(a)) => {
                Limit::Bounded(a)
            }
            (Limit::Absent, Limit::Absent) => Limit::Absent,
        }
    }
}

/// A token field whose value no backend reads as a whole number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` must be a whole number")]
pub struct BadCount {
    pub field: &'static str,
}

/// Reads a count the way the laxest backend does.
pub fn count(field: &'static str, v: Option<&Value>) -> Result<Limit, BadCount> {
    let bad = || BadCount { field };
    let number = match v {
        None | Some(Value::Null) => return Ok(Limit::Absent),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64().filter(|u| *u > 0) {
                return Ok(Limit::Bounded(u));
            }
            if n.as_i64().is_some() {
                return Ok(Limit::Unbounded);
            }
            n.as_f64().ok_or_else(bad)?
        }
        Some(Value::String(s)) => {
            let s = s.trim();
            if let Ok(u) = s.parse::<u64>() {
                return Ok(if u == 0 {
                    Limit::Unbounded
                } else {
                    Limit::Bounded(u)
                });
            }
            if s.parse::<i64>().is_ok() {
                return Ok(Limit::Unbounded);
            }
            s.parse::<f64>().map_err(|_| bad())?
        }
        Some(_) => return Err(bad()),
    };
    if !number.is_finite() || number.fract() != 0.0 {
        return Err(bad());
    }
    if number <= 0.0 {
        Ok(Limit::Unbounded)
    } else {
        // Saturates: 1e300 is simply more than any cap.
        Ok(Limit::Bounded(number as u64))
    }
}

/// What a request asks for: tokens per completion and how many completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputAsk {
    pub per_choice: Limit,
    /// `n` / `best_of` (the larger), at least 1.
    pub choices: u64,
}

impl OutputAsk {
    /// The most output tokens the request can produce, if bounded.
    pub fn total(&self) -> Option<u64> {
        match self.per_choice {
            Limit::Bounded(n) => Some(n.saturating_mul(self.choices)),
            _ => None,
        }
    }
}

/// Prompts in a completions request: each is completed on its own (`n` times). A list of
/// strings or of token lists is several prompts; a flat list of token ids is one. vLLM
/// (`--enable-prompt-embeds`) also completes each of `prompt_embeds` (one tensor, or a list
/// of them) besides the prompts: they count too (an empty `prompt` beside them counts as one,
/// a bound above what is generated).
pub fn prompts(body: &Map<String, Value>) -> u64 {
    let text = match body.get("prompt") {
        Some(Value::Array(items)) if items.iter().any(|p| !p.is_number()) => {
            (items.len() as u64).max(1)
        }
        _ => 1,
    };
    let embeds = match body.get("prompt_embeds") {
        None | Some(Value::Null) => 0,
        Some(Value::Array(items)) => items.len() as u64,
        Some(_) => 1,
    };
    text.saturating_add(embeds)
}

fn options(body: &Map<String, Value>) -> Option<&Value> {
    body.get("options")
        .and_then(Value::as_object)
        .and_then(|o| o.get("num_predict"))
}

/// Whether the route produces output tokens at all (embeddings do not).
pub fn generates(route: Route) -> bool {
    matches!(
        route,
        Route::OllamaChat | Route::OllamaGenerate | Route::OpenAiChat | Route::OpenAiCompletions
    )
}

/// Reads the ask from every field the route's backends honour.
pub fn read(route: Route, body: &Map<String, Value>) -> Result<OutputAsk, BadCount> {
    let mut per_choice = Limit::Absent;
    let mut choices = 1u64;
    if !generates(route) {
        return Ok(OutputAsk {
            per_choice,
            choices,
        });
    }
    per_choice = per_choice.max(count("options.num_predict", options(body))?);
    if route.wire_format() == WireFormat::OpenAi {
        for field in OPENAI_FIELDS {
            per_choice = per_choice.max(count(field, body.get(field))?);
        }
        for field in CHOICE_FIELDS {
            match count(field, body.get(field))? {
                Limit::Absent => {}
                Limit::Bounded(n) => choices = choices.max(n),
                Limit::Unbounded if body.get(field).and_then(Value::as_u64) == Some(0) => {}
                Limit::Unbounded => return Err(BadCount { field }),
            }
        }
        if route == Route::OpenAiCompletions {
            choices = choices.saturating_mul(prompts(body));
        }
    }
    Ok(OutputAsk {
        per_choice,
        choices,
    })
}

/// Whether every backend of the route reads the client's limit as a plain whole number no
/// larger than its ask (the largest of the fields): on OpenAI routes `max_tokens`, which all
/// of them read (llama.cpp's server and llama-cpp-python no other; vLLM and SGLang prefer
/// `max_completion_tokens`, llama.cpp `n_predict`), is such a number, and so is every other
/// limit field present; on Ollama routes `options.num_predict` is.
fn written_plainly(route: Route, body: &Map<String, Value>) -> bool {
    let plain = |v: Option<&Value>| v.and_then(Value::as_u64).is_some_and(|n| n > 0);
    let num_predict = options(body);
    if route.wire_format() != WireFormat::OpenAi {
        return plain(num_predict);
    }
    let absent_or_plain = |v: Option<&Value>| v.is_none() || plain(v);
    plain(body.get("max_tokens"))
        && OPENAI_FIELDS.iter().all(|f| absent_or_plain(body.get(*f)))
        && absent_or_plain(num_predict)
}

/// `options` is present but not an object, so the cap cannot be written into it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`options` must be an object")]
pub struct BadOptions;

/// Writes `limit` into every field the route's backends read: on OpenAI routes
/// `max_tokens` and `max_completion_tokens` always, `n_predict` and `options.num_predict`
/// where present; on Ollama routes `options.num_predict`. Returns whether the body changed.
pub fn write(route: Route, body: &mut Map<String, Value>, limit: u64) -> Result<bool, BadOptions> {
    let mut changed = false;
    let mut set = |obj: &mut Map<String, Value>, key: &str| {
        if obj.get(key).and_then(Value::as_u64) != Some(limit) {
            obj.insert(key.to_string(), Value::from(limit));
            changed = true;
        }
    };
    let openai = route.wire_format() == WireFormat::OpenAi;
    if openai {
        for key in OPENAI_WRITTEN {
            set(body, key);
        }
        if body.contains_key("n_predict") {
            set(body, "n_predict");
        }
    }
    match body.get_mut("options") {
        Some(Value::Object(o)) => {
            if !openai || o.contains_key("num_predict") {
                set(o, "num_predict");
            }
        }
        Some(Value::Null) | None if !openai => {
            let mut o = Map::new();
            set(&mut o, "num_predict");
            body.insert("options".to_string(), Value::Object(o));
        }
        Some(Value::Null) | None => {}
        Some(_) => return Err(BadOptions),
    }
    Ok(changed)
}

/// Bounds a request's output: `choose` picks the limit per completion from the ask (or
/// refuses it), the limit is written into every field the route's backends read, and the
/// request's total bound (limit × completions) is recorded in `ctx.max_tokens`. Routes that
/// generate nothing, and requests without a JSON object body, are left as they are (`None`);
/// otherwise the ask `choose` judged is answered. What the policy's output cap and the
/// reservations ([`reserve_limit`]) apply.
pub fn apply_limit(
    ctx: &mut crate::RequestCtx,
    choose: impl FnOnce(OutputAsk) -> Result<u64, crate::Rejection>,
) -> Result<Option<OutputAsk>, crate::Rejection> {
    if !generates(ctx.route) {
        return Ok(None);
    }
    let Some(body) = ctx.json.as_mut().and_then(Value::as_object_mut) else {
        return Ok(None);
    };
    let bad = |code: &'static str, message: String| {
        crate::Rejection::new(http::StatusCode::BAD_REQUEST, code, message)
    };
    let mut ask = read(ctx.route, body).map_err(|e| bad("invalid_max_tokens", e.to_string()))?;
    // A bound an earlier filter gave the request to reserve is not the client's ask, and
    // what it reserved is the most the request may now produce.
    let reserved = ctx.output_reserved.map(|(asked, bound)| {
        ask.per_choice = asked;
        bound
    });
    let per_choice = choose(ask)?.min(reserved.unwrap_or(u64::MAX));
    if write(ctx.route, body, per_choice).map_err(|e| bad("invalid_options", e.to_string()))? {
        ctx.body_rewritten = true;
    }
    ctx.max_tokens = Some(per_choice.saturating_mul(ask.choices));
    if let Some((asked, _)) = ctx.output_reserved {
        ctx.output_reserved = Some((asked, per_choice));
    }
    Ok(Some(ask))
}

/// Output tokens per completion a reservation gives a request that names no limit, unless
/// configured (`output_reserve` of `budget` and `ratelimit`): what one long answer takes.
pub fn default_reserve() -> u64 {
    4096
}

/// Gives a request that names no output limit (none, or zero or negative: no limit) a bound
/// of its own, `per_choice(completions)` per completion, written as [`apply_limit`] writes a
/// cap, so what it can generate is what a reservation holds (a budget's, a token limit's).
/// The client's own ask is kept in the context: a cap applied later judges that, not this
/// bound, and never raises it. A bound an earlier filter gave is lowered to this one when it
/// is smaller (a later, smaller token limit); a bound the client asked for, or a cap's, is
/// left as it is.
pub fn reserve_limit(
    ctx: &mut crate::RequestCtx,
    per_choice: impl FnOnce(u64) -> u64,
) -> Result<(), crate::Rejection> {
    let fresh = ctx.output_reserved.is_none();
    if fresh && ctx.max_tokens.is_some() {
        // The client's own limit stands, written into every field the backends read if it
        // is not there already as a plain number: a limit only in a field some backend
        // ignores (`options.num_predict` or `n_predict` on /v1, `max_completion_tokens` for
        // llama.cpp), or written as a string or beside a null (llama.cpp reads those as
        // absent), would let it generate without end while the reservation holds the number.
        let plain = ctx
            .json
            .as_ref()
            .and_then(Value::as_object)
            .is_none_or(|b| written_plainly(ctx.route, b));
        if !plain {
            apply_limit(ctx, |ask| match ask.per_choice {
                Limit::Bounded(n) => Ok(n),
                Limit::Absent | Limit::Unbounded => Ok(per_choice(ask.choices).max(1)),
            })?;
        }
        return Ok(());
    }
    let mut bound = 0;
    let ask = apply_limit(ctx, |ask| {
        bound = per_choice(ask.choices).max(1);
        Ok(bound)
    })?;
    if let (true, Some(ask)) = (fresh, ask) {
        ctx.output_reserved = Some((ask.per_choice, bound));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn counts_as_lax_backends_do() {
        let c = |v: Value| count("max_tokens", Some(&v));
        assert_eq!(c(json!(5)), Ok(Limit::Bounded(5)));
        assert_eq!(c(json!(1e6)), Ok(Limit::Bounded(1_000_000)));
        assert_eq!(c(json!("1000000")), Ok(Limit::Bounded(1_000_000)));
        assert_eq!(c(json!(" 7 ")), Ok(Limit::Bounded(7)));
        assert_eq!(c(json!("1e3")), Ok(Limit::Bounded(1000)));
        assert_eq!(c(json!(-1)), Ok(Limit::Unbounded));
        assert_eq!(c(json!(0)), Ok(Limit::Unbounded), "0 is no limit to Ollama");
        assert_eq!(c(json!("0")), Ok(Limit::Unbounded));
        assert_eq!(c(json!(-0.0)), Ok(Limit::Unbounded));
        assert_eq!(c(json!(-2.0)), Ok(Limit::Unbounded));
        assert_eq!(c(json!("-1")), Ok(Limit::Unbounded));
        assert_eq!(c(json!(1e300)), Ok(Limit::Bounded(u64::MAX)));
        assert_eq!(c(json!(null)), Ok(Limit::Absent));
        assert!(c(json!(1.5)).is_err());
        assert!(c(json!("lots")).is_err());
        assert!(c(json!(true)).is_err());
        assert!(c(json!([1])).is_err());
        assert!(c(json!("NaN")).is_err());
        assert!(c(json!("inf")).is_err());
    }

    #[test]
    fn the_largest_field_counts() {
        let b = obj(json!({"max_tokens": 1, "max_completion_tokens": 1000000}));
        let a = read(Route::OpenAiChat, &b).unwrap();
        assert_eq!(a.per_choice, Limit::Bounded(1_000_000));
        let b = obj(json!({"max_tokens": 1, "options": {"num_predict": 1000000}}));
        let a = read(Route::OllamaChat, &b).unwrap();
        assert_eq!(
            a.per_choice,
            Limit::Bounded(1_000_000),
            "Ollama reads only options.num_predict"
        );
        let b = obj(json!({"max_tokens": 10, "n_predict": -1}));
        assert_eq!(
            read(Route::OpenAiCompletions, &b).unwrap().per_choice,
            Limit::Unbounded
        );
        let b = obj(json!({"max_tokens": 10, "n": 4, "best_of": "6"}));
        let a = read(Route::OpenAiCompletions, &b).unwrap();
        assert_eq!((a.choices, a.total()), (6, Some(60)));
        assert!(read(Route::OpenAiChat, &obj(json!({"n": -1}))).is_err());
        let b = obj(json!({"max_tokens": 10, "n": 2, "prompt": ["a", "b", "c"]}));
        assert_eq!(
            read(Route::OpenAiCompletions, &b).unwrap().total(),
            Some(60)
        );
        let b = obj(json!({"max_tokens": 10, "prompt": [1, 2, 3]}));
        assert_eq!(
            read(Route::OpenAiCompletions, &b).unwrap().total(),
            Some(10),
            "token ids are one prompt"
        );
        // Attacker review: vLLM completes each of `prompt_embeds` besides the prompts.
        let b =
            obj(json!({"max_tokens": 10, "n": 2, "prompt": "", "prompt_embeds": ["a", "b", "c"]}));
        assert_eq!(
            read(Route::OpenAiCompletions, &b).unwrap().total(),
            Some(80)
        );
        let b = obj(json!({"max_tokens": 10, "prompt_embeds": "a"}));
        assert_eq!(
            read(Route::OpenAiCompletions, &b).unwrap().total(),
            Some(20)
        );
        let embed = obj(json!({"max_tokens": "junk"}));
        assert!(read(Route::OpenAiEmbeddings, &embed).is_ok(), "no output");
    }

    #[test]
    fn writes_every_field() {
        let mut b = obj(json!({"max_completion_tokens": 500, "n_predict": 9}));
        assert_eq!(write(Route::OpenAiChat, &mut b, 32), Ok(true));
        assert_eq!(
            Value::Object(b),
            json!({"max_completion_tokens": 32, "n_predict": 32, "max_tokens": 32})
        );
        let mut b = obj(json!({"max_tokens": 32, "max_completion_tokens": 32}));
        assert_eq!(write(Route::OpenAiChat, &mut b, 32), Ok(false));
        let mut b = obj(json!({"max_tokens": "32", "max_completion_tokens": 32}));
        assert_eq!(write(Route::OpenAiChat, &mut b, 32), Ok(true));
        assert_eq!(b["max_tokens"], json!(32));
        let mut b = obj(json!({"model": "m"}));
        assert_eq!(write(Route::OllamaGenerate, &mut b, 8), Ok(true));
        assert_eq!(b["options"], json!({"num_predict": 8}));
        let mut b = obj(json!({"options": 3}));
        assert_eq!(write(Route::OllamaGenerate, &mut b, 8), Err(BadOptions));
    }

    fn chat(body: Value) -> crate::RequestCtx {
        let mut c = crate::RequestCtx::new(
            String::new(),
            http::Method::POST,
            "/v1/chat/completions".into(),
        );
        c.json = Some(body);
        c
    }

    #[test]
    fn a_reserved_bound_is_not_the_clients_ask_and_is_never_raised() {
        // No limit asked: the reservation's bound is written, and a cap after it judges the
        // absent ask (no refusal) without raising the bound.
        let mut c = chat(json!({"model": "m", "messages": []}));
        reserve_limit(&mut c, |_| 100).unwrap();
        let sent = read(c.route, c.json.as_ref().unwrap().as_object().unwrap()).unwrap();
        assert_eq!((sent.total(), c.max_tokens), (Some(100), Some(100)));
        assert!(c.body_rewritten);
        apply_limit(&mut c, |ask| {
            assert_eq!(ask.per_choice, Limit::Absent);
            Ok(8192)
        })
        .unwrap();
        assert_eq!(c.max_tokens, Some(100));
        // A smaller cap lowers it.
        apply_limit(&mut c, |_| Ok(50)).unwrap();
        assert_eq!(c.max_tokens, Some(50));
        // "No limit" asked in so many words: a cap that refuses it still sees it.
        let mut c = chat(json!({"model": "m", "messages": [], "max_tokens": -1}));
        reserve_limit(&mut c, |_| 100).unwrap();
        assert_eq!(c.max_tokens, Some(100));
        let refused = apply_limit(&mut c, |ask| {
            assert_eq!(ask.per_choice, Limit::Unbounded);
            Err(crate::Rejection::new(
                http::StatusCode::BAD_REQUEST,
                "max_tokens_too_large",
                "no",
            ))
        });
        assert_eq!(refused.unwrap_err().code, "max_tokens_too_large");
        // Completions share the bound; a bounded request is left as asked.
        let mut c = chat(json!({"model": "m", "messages": [], "n": 3}));
        reserve_limit(&mut c, |choices| 900 / choices).unwrap();
        assert_eq!(c.max_tokens, Some(900));
        for body in [
            json!({"model": "m", "messages": [], "max_tokens": 7}),
            json!({"model": "m", "messages": [], "max_tokens": 5, "max_completion_tokens": 7}),
        ] {
            let mut c = chat(body);
            c.max_tokens = Some(7);
            reserve_limit(&mut c, |_| 100).unwrap();
            assert_eq!((c.max_tokens, c.body_rewritten), (Some(7), false));
            assert_eq!(c.output_reserved, None);
        }
        // …unless it is written in a way some backend reads as no limit at all (llama.cpp
        // takes a string, or a null beside a number, as absent): then as a plain number.
        for body in [
            json!({"model": "m", "messages": [], "max_tokens": "7"}),
            json!({"model": "m", "messages": [], "max_tokens": 7.0}),
            json!({"model": "m", "messages": [], "max_tokens": null, "max_completion_tokens": 7}),
            json!({"model": "m", "messages": [], "max_tokens": 7, "options": {"num_predict": "7"}}),
            // …or only in fields some backend ignores: llama.cpp reads only max_tokens,
            // vLLM and SGLang no n_predict or options.
            json!({"model": "m", "messages": [], "max_completion_tokens": 7}),
            json!({"model": "m", "messages": [], "n_predict": 7}),
            json!({"model": "m", "messages": [], "options": {"num_predict": 7}}),
        ] {
            let mut c = chat(body.clone());
            c.max_tokens = Some(7);
            reserve_limit(&mut c, |_| 100).unwrap();
            let sent = c.json.as_ref().unwrap();
            assert_eq!((c.max_tokens, c.body_rewritten), (Some(7), true), "{body}");
            assert_eq!(sent["max_tokens"], json!(7), "{body}");
            assert_eq!(sent["max_completion_tokens"], json!(7), "{body}");
            assert_eq!(c.output_reserved, None);
        }
        // A later, smaller reservation lowers a bound an earlier filter gave (a token limit
        // of its own after a budget's or another limiter's), never the client's own.
        let mut c = chat(json!({"model": "m", "messages": [], "n": 2}));
        reserve_limit(&mut c, |_| 4096).unwrap();
        assert_eq!(c.max_tokens, Some(8192));
        reserve_limit(&mut c, |choices| 1000 / choices).unwrap();
        assert_eq!(c.max_tokens, Some(1000));
        assert_eq!(c.json.as_ref().unwrap()["max_tokens"], 500);
        assert_eq!(c.output_reserved, Some((Limit::Absent, 500)));
        reserve_limit(&mut c, |_| 4096).unwrap();
        assert_eq!(c.max_tokens, Some(1000), "never raised");
    }
}
