//! The filter chain: built from the `filters:` list through the registry, run in order.

use std::sync::Arc;

use gateway_filter::labels::MetricLabels;
use gateway_filter::{BuildContext, Decision, Filter, Rejection, RequestCtx};

use crate::config::{ConfigError, FilterSpec, Settings};
use crate::registry::Registry;

pub struct FilterChain {
    filters: Vec<Arc<dyn Filter>>,
    /// Index of the first filter that needs the request body: the ones before it run before
    /// the body is read. Fixed once the chain is built.
    body_needed_at: usize,
    /// A filter's `on_complete` reads the request's JSON ([`Filter::reads_body_at_end`]).
    pub reads_body_at_end: bool,
    shut_down: std::sync::atomic::AtomicBool,
    /// The built-in policy was added because the config has none.
    pub default_policy: bool,
    /// Shared state, whose batched settlements are sent at shutdown after the filters'.
    state: Option<Arc<dyn gateway_filter::SharedState>>,
    /// Model and principal label values of every metric, the filters' and the gateway's.
    pub labels: Arc<MetricLabels>,
}

/// Where the built-in policy goes: right after the last `auth` (it reads the principal's
/// scopes and models), else first.
const DEFAULT_POLICY_PATH: &str = "(built-in default policy)";

impl FilterChain {
    pub fn new(filters: Vec<Arc<dyn Filter>>) -> Self {
        let body_needed_at = filters
            .iter()
            .position(|f| f.needs_body())
            .unwrap_or(filters.len());
        FilterChain {
            reads_body_at_end: filters.iter().any(|f| f.reads_body_at_end()),
            filters,
            body_needed_at,
            shut_down: Default::default(),
            default_policy: false,
            state: None,
            labels: Default::default(),
        }
    }

    /// Builds every `filters:` entry; an unknown name or bad option is a startup error that
    /// names the file, the YAML path and what is allowed.
    pub fn build(
        settings: &Settings,
        registry: &Registry,
        state: Option<Arc<dyn gateway_filter::SharedState>>,
    ) -> Result<FilterChain, ConfigError> {
        Self::build_with(settings, registry, state, false)
    }

    /// For `llm-gateway check`: every filter built and checked as for a run, with nothing
    /// created or written (audit log, ledger) and no thread started
    /// ([`BuildContext::check_only`]).
    pub fn check(settings: &Settings, registry: &Registry) -> Result<FilterChain, ConfigError> {
        Self::build_with(settings, registry, None, true)
    }

    fn build_with(
        settings: &Settings,
        registry: &Registry,
        state: Option<Arc<dyn gateway_filter::SharedState>>,
        check_only: bool,
    ) -> Result<FilterChain, ConfigError> {
        let labels = Arc::new(MetricLabels::new(settings.metric_labels));
        let cx = BuildContext {
            config_dir: settings
                .file
                .parent()
                .map(|p| p.to_path_buf())
                .unwrap_or_default(),
            state: state.clone(),
            first_in_chain: false,
            labels: labels.clone(),
            check_only,
        };
        let mut specs = settings.filters.clone();
        let add_policy = settings.default_policy
            && !specs.iter().any(|s| s.name == "policy")
            && registry.get("policy").is_some();
        if add_policy {
            let at = specs
                .iter()
                .rposition(|s| s.name == "auth")
                .map_or(0, |i| i + 1);
            specs.insert(
                at,
                FilterSpec {
                    name: "policy".into(),
                    yaml_path: DEFAULT_POLICY_PATH.into(),
                    options: serde_json::json!({}),
                },
            );
        }
        let mut filters: Vec<Arc<dyn Filter>> = Vec::with_capacity(specs.len());
        let mut deferred = false;
        for spec in &specs {
            let cx = BuildContext {
                first_in_chain: !deferred,
                ..cx.clone()
            };
            let filter = build_one(spec, registry, &cx, settings)?;
            deferred |= filter.defers();
            filters.push(filter);
        }
        // A filter that reads the body before authentication would make every stranger's
        // body (up to `limits.max_body`) read and parsed; and a policy before auth judges
        // without the caller's own model list.
        if let Some(auth) = filters.iter().rposition(|f| f.name() == "auth") {
            if let Some(i) = filters[..auth].iter().position(|f| f.needs_body()) {
                return Err(ConfigError::invalid(
                    &settings.file,
                    specs[i].yaml_path.clone(),
                    format!(
                        "the {} filter reads the request body (models, token counts), so it must come after `- use: auth`: move it below auth (an address rate limit without tokens_per_minute may stay in front)",
                        specs[i].name
                    ),
                ));
            }
        }
        // A budget bounds a request that names no output limit with its `output_reserve`; an
        // output cap after it would see that bound instead of the request's own ask (and
        // refuse it under `over_output_cap: reject`).
        if let Some(budget) = specs.iter().position(|s| s.name == "budget") {
            if let Some(i) = specs[budget..].iter().position(|s| {
                s.name == "policy"
                    && s.options
                        .get("max_output_tokens")
                        .is_some_and(|v| !v.is_null())
            }) {
                let i = budget + i;
                return Err(ConfigError::invalid(
                    &settings.file,
                    specs[i].yaml_path.clone(),
                    "a policy with max_output_tokens must come before `- use: budget`, so the budget reserves what the cap allows: move it above the budget".to_string(),
                ));
            }
        }
        Ok(FilterChain {
            default_policy: add_policy,
            state,
            labels,
            ..FilterChain::new(filters)
        })
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.filters.iter().map(|f| f.name()).collect()
    }

    /// Every identity source of every filter, in chain order.
    pub fn identity_sources(&self) -> Vec<String> {
        self.filters
            .iter()
            .flat_map(|f| f.identity_sources())
            .collect()
    }

    /// Runs the filters that need no body (address limits, authentication), up to the first
    /// one that does. Their deferred checks may still be waiting when it returns: the caller
    /// reads the body while their answers travel ([`RequestCtx::answers`]), or leaves them to
    /// [`FilterChain::on_request_after_body`]. A filter that cannot run alongside them (a
    /// password check) awaited them before it ran, so a body is read only for a request
    /// whose credentials were settled without waiting (an API key, a client certificate).
    pub async fn on_request_before_body(&self, ctx: &mut RequestCtx) -> Result<(), Rejection> {
        self.on_request(ctx, 0..self.body_needed_at).await
    }

    /// Runs the rest of the chain, once the body (if the route has one) is read, and awaits
    /// every check still waiting: the request goes on only once all of them passed.
    pub async fn on_request_after_body(&self, ctx: &mut RequestCtx) -> Result<(), Rejection> {
        self.on_request(ctx, self.body_needed_at..self.filters.len())
            .await?;
        ctx.settle_pending().await
    }

    /// Runs `on_request` of the filters in `range`, in order; the first rejection stops the
    /// chain and is recorded in `ctx.decision`. Deferred checks are awaited together before
    /// a filter that cannot run alongside them and before a rejection is answered (an
    /// earlier filter's refusal wins).
    async fn on_request(
        &self,
        ctx: &mut RequestCtx,
        range: std::ops::Range<usize>,
    ) -> Result<(), Rejection> {
        for f in self.filters.get(range).unwrap_or_default() {
            if !f.runs_alongside() && ctx.has_pending() {
                ctx.settle_pending().await?;
            }
            let reason = ctx.reject_reason;
            if let Err(r) = f.on_request(ctx).await {
                if ctx.has_pending() {
                    // An earlier check still waiting is the answer if it refuses too; this
                    // filter's reason stands only if that check passes.
                    let theirs = std::mem::replace(&mut ctx.reject_reason, reason);
                    ctx.settle_pending().await?;
                    ctx.reject_reason = theirs;
                }
                // A filter that awaited the earlier checks itself returns their refusal,
                // already recorded under the filter that made it.
                if ctx.decision == Decision::Allowed {
                    ctx.decision = Decision::Rejected {
                        filter: f.name(),
                        code: r.code,
                    };
                }
                return Err(r);
            }
        }
        Ok(())
    }

    /// Re-reads every filter's files (SIGHUP). A filter whose files are broken keeps its
    /// old state; the errors are returned for the log.
    pub fn reload(&self) -> Vec<String> {
        self.filters
            .iter()
            .filter_map(|f| f.reload().err().map(|e| format!("{}: {e}", f.name())))
            .collect()
    }

    /// The first report a filter offers under `name` (served at `/admin/NAME`).
    pub async fn admin_report(&self, name: &str) -> Option<serde_json::Value> {
        for f in &self.filters {
            if let Some((n, v)) = f.admin_report().await {
                if n == name {
                    return Some(v);
                }
            }
        }
        None
    }

    /// Lets every filter finish queued work (audit lines, ledger) before the process exits.
    /// Runs once: later calls (several exit paths may ask) do nothing.
    pub fn shutdown(&self) {
        if self
            .shut_down
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        for f in &self.filters {
            f.shutdown();
        }
        if let Some(st) = &self.state {
            st.flush();
        }
    }

    /// Runs `on_response_end` of every filter, in order (the caller makes it once a request).
    pub fn on_response_end(&self, ctx: &mut RequestCtx) {
        for f in &self.filters {
            f.on_response_end(ctx);
        }
    }

    /// Runs `on_complete` of every filter, in order, for every request.
    pub async fn on_complete(&self, ctx: &mut RequestCtx) {
        for f in &self.filters {
            f.on_complete(ctx).await;
        }
    }
}

fn build_one(
    spec: &FilterSpec,
    registry: &Registry,
    cx: &BuildContext,
    settings: &Settings,
) -> Result<Arc<dyn Filter>, ConfigError> {
    let file = &settings.file;
    let Some(factory) = registry.get(&spec.name) else {
        let known = registry.names();
        let allowed = if known.is_empty() {
            "this build has no filters registered".to_string()
        } else {
            format!("allowed: {}", known.join(", "))
        };
        return Err(ConfigError::invalid(
            file,
            format!("{}.use", spec.yaml_path),
            format!("unknown filter {:?}; {allowed}", spec.name),
        ));
    };
    factory(&spec.options, cx).map_err(|e| {
        let path = if e.path.is_empty() {
            spec.yaml_path.clone()
        } else {
            format!("{}.{}", spec.yaml_path, e.path)
        };
        ConfigError::invalid(file, path, format!("{} filter: {}", spec.name, e.message))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use gateway_filter::http::{Method, StatusCode};
    use std::sync::Mutex;

    /// Records calls into a shared log; rejects when `reject` is set.
    struct Probe {
        tag: &'static str,
        reject: bool,
        log: Arc<Mutex<Vec<String>>>,
    }

    #[async_trait]
    impl Filter for Probe {
        fn name(&self) -> &'static str {
            self.tag
        }
        async fn on_request(&self, ctx: &mut RequestCtx) -> Result<(), Rejection> {
            self.log.lock().unwrap().push(format!("req:{}", self.tag));
            ctx.headers.append("x-seen", self.tag.parse().unwrap());
            if self.reject {
                return Err(Rejection::new(StatusCode::FORBIDDEN, "probe_says_no", "no"));
            }
            Ok(())
        }
        async fn on_complete(&self, _ctx: &mut RequestCtx) {
            self.log.lock().unwrap().push(format!("done:{}", self.tag));
        }
        fn needs_body(&self) -> bool {
            self.tag.starts_with("body")
        }
    }

    fn chain(spec: &[(&'static str, bool)], log: &Arc<Mutex<Vec<String>>>) -> FilterChain {
        FilterChain::new(
            spec.iter()
                .map(|(tag, reject)| {
                    Arc::new(Probe {
                        tag,
                        reject: *reject,
                        log: log.clone(),
                    }) as Arc<dyn Filter>
                })
                .collect(),
        )
    }

    #[tokio::test]
    async fn runs_in_order_and_stops_at_first_rejection() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let c = chain(&[("a", false), ("b", true), ("c", false)], &log);
        let mut ctx = RequestCtx::new("id".into(), Method::POST, "/api/chat".into());
        let r = c.on_request_before_body(&mut ctx).await.unwrap_err();
        assert_eq!(r.code, "probe_says_no");
        assert_eq!(
            ctx.decision,
            Decision::Rejected {
                filter: "b",
                code: "probe_says_no"
            }
        );
        let seen: Vec<_> = ctx
            .headers
            .get_all("x-seen")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(seen, ["a", "b"]);
        c.on_complete(&mut ctx).await;
        assert_eq!(
            *log.lock().unwrap(),
            ["req:a", "req:b", "done:a", "done:b", "done:c"]
        );
    }

    #[tokio::test]
    async fn same_filter_twice_and_all_pass() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let c = chain(&[("a", false), ("a", false)], &log);
        let mut ctx = RequestCtx::new("id".into(), Method::GET, "/v1/models".into());
        c.on_request_before_body(&mut ctx).await.unwrap();
        c.on_request_after_body(&mut ctx).await.unwrap();
        assert_eq!(ctx.decision, Decision::Allowed);
        assert_eq!(log.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn filters_before_the_first_that_needs_the_body_run_first() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let c = chain(&[("a", false), ("body-b", false), ("c", false)], &log);
        let mut ctx = RequestCtx::new("id".into(), Method::POST, "/api/chat".into());
        c.on_request_before_body(&mut ctx).await.unwrap();
        assert_eq!(*log.lock().unwrap(), ["req:a"]);
        c.on_request_after_body(&mut ctx).await.unwrap();
        assert_eq!(*log.lock().unwrap(), ["req:a", "req:body-b", "req:c"]);
    }

    /// Defers its verdict (after waiting at `barrier`, which only opens when the other
    /// deferred checks are awaited at the same time); counts holds given back unapplied.
    struct Deferring {
        tag: &'static str,
        reject: bool,
        sync_reject: bool,
        barrier: Option<Arc<tokio::sync::Barrier>>,
        log: Arc<Mutex<Vec<String>>>,
        given_back: Arc<std::sync::atomic::AtomicUsize>,
    }

    struct GiveBack(Option<Arc<std::sync::atomic::AtomicUsize>>);

    impl GiveBack {
        fn applied(&mut self) {
            self.0 = None;
        }
    }

    impl Drop for GiveBack {
        fn drop(&mut self) {
            if let Some(n) = self.0.take() {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    #[async_trait]
    impl Filter for Deferring {
        fn name(&self) -> &'static str {
            self.tag
        }
        fn runs_alongside(&self) -> bool {
            true
        }
        async fn on_request(&self, ctx: &mut RequestCtx) -> Result<(), Rejection> {
            self.log.lock().unwrap().push(format!("req:{}", self.tag));
            if self.sync_reject {
                ctx.reject_reason = Some("reason_of_the_later_filter");
                return Err(Rejection::new(
                    StatusCode::FORBIDDEN,
                    "said_no_at_once",
                    "no",
                ));
            }
            let (tag, reject, log) = (self.tag, self.reject, self.log.clone());
            let barrier = self.barrier.clone();
            let mut guard = GiveBack(Some(self.given_back.clone()));
            ctx.defer(
                tag,
                Box::pin(async move {
                    if let Some(b) = barrier {
                        b.wait().await;
                    }
                    Box::new(move |ctx: &mut RequestCtx| {
                        guard.applied();
                        log.lock().unwrap().push(format!("verdict:{tag}"));
                        ctx.headers.append("x-seen", tag.parse().unwrap());
                        if reject {
                            return Err(Rejection::new(
                                StatusCode::TOO_MANY_REQUESTS,
                                "said_no_later",
                                "no",
                            ));
                        }
                        Ok(())
                    }) as gateway_filter::defer::Verdict
                }),
            );
            Ok(())
        }
    }

    struct Setup {
        log: Arc<Mutex<Vec<String>>>,
        given_back: Arc<std::sync::atomic::AtomicUsize>,
        barrier: Arc<tokio::sync::Barrier>,
    }

    impl Setup {
        fn new(parties: usize) -> Setup {
            Setup {
                log: Default::default(),
                given_back: Default::default(),
                barrier: Arc::new(tokio::sync::Barrier::new(parties)),
            }
        }
        /// `d:` deferred, `d!:` deferred and refusing, `s!:` refusing at once (runs
        /// alongside), else a plain probe (which cannot run alongside).
        fn chain(&self, spec: &[&'static str]) -> FilterChain {
            FilterChain::new(
                spec.iter()
                    .map(|s| {
                        let (kind, tag) = s.split_once(':').unwrap_or(("", s));
                        if kind.is_empty() {
                            return Arc::new(Probe {
                                tag,
                                reject: false,
                                log: self.log.clone(),
                            }) as Arc<dyn Filter>;
                        }
                        Arc::new(Deferring {
                            tag,
                            reject: kind == "d!",
                            sync_reject: kind == "s!",
                            barrier: Some(self.barrier.clone()),
                            log: self.log.clone(),
                            given_back: self.given_back.clone(),
                        })
                    })
                    .collect(),
            )
        }
        fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
    }

    fn assert_rejected(ctx: &RequestCtx, filter: &'static str, code: &'static str) {
        assert_eq!(ctx.decision, Decision::Rejected { filter, code });
    }

    fn seen(ctx: &RequestCtx) -> Vec<&str> {
        ctx.headers
            .get_all("x-seen")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    /// The whole chain, as a request without a body goes through it.
    async fn run(c: &FilterChain, ctx: &mut RequestCtx) -> Result<(), Rejection> {
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            c.on_request_before_body(ctx).await?;
            c.on_request_after_body(ctx).await
        })
        .await
        .expect("the deferred checks were awaited one after the other")
    }

    #[tokio::test]
    async fn deferred_checks_are_awaited_together_and_applied_in_order() {
        // The barrier opens only when both checks wait at once.
        let s = Setup::new(2);
        let c = s.chain(&["d:a", "d:b", "c"]);
        let mut ctx = RequestCtx::new("id".into(), Method::POST, "/api/chat".into());
        run(&c, &mut ctx).await.unwrap();
        assert_eq!(
            s.log(),
            ["req:a", "req:b", "verdict:a", "verdict:b", "req:c"]
        );
        assert_eq!(seen(&ctx), ["a", "b", "c"]);
        assert_eq!(ctx.decision, Decision::Allowed);
        assert_eq!(s.given_back.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn an_earlier_refusal_wins_and_what_later_checks_hold_is_given_back() {
        let s = Setup::new(3);
        let c = s.chain(&["d!:a", "d:b", "d:b2"]);
        let mut ctx = RequestCtx::new("id".into(), Method::POST, "/api/chat".into());
        let r = run(&c, &mut ctx).await.unwrap_err();
        assert_eq!(r.code, "said_no_later");
        assert_rejected(&ctx, "a", "said_no_later");
        assert_eq!(seen(&ctx), ["a"]);
        assert_eq!(s.given_back.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_filter_that_cannot_run_alongside_waits_and_never_runs_after_a_refusal() {
        // An address limit before authentication: auth must not run for a refused address.
        let s = Setup::new(1);
        let c = s.chain(&["d!:ip", "auth"]);
        let mut ctx = RequestCtx::new("id".into(), Method::POST, "/api/chat".into());
        let r = run(&c, &mut ctx).await.unwrap_err();
        assert_eq!(r.code, "said_no_later");
        assert_eq!(s.log(), ["req:ip", "verdict:ip"]);
    }

    #[tokio::test]
    async fn an_immediate_refusal_waits_for_the_earlier_deferred_checks() {
        // The earlier check refuses too: its refusal is the one answered.
        let s = Setup::new(1);
        let c = s.chain(&["d!:a", "s!:b"]);
        let mut ctx = RequestCtx::new("id".into(), Method::POST, "/api/chat".into());
        assert_eq!(run(&c, &mut ctx).await.unwrap_err().code, "said_no_later");
        assert_rejected(&ctx, "a", "said_no_later");
        assert_eq!(
            ctx.reject_reason, None,
            "the later filter's reason is not the answer's"
        );
        // The earlier check passes: its verdict is applied, then the refusal answered.
        let s = Setup::new(1);
        let c = s.chain(&["d:a", "s!:b"]);
        let mut ctx = RequestCtx::new("id".into(), Method::POST, "/api/chat".into());
        assert_eq!(run(&c, &mut ctx).await.unwrap_err().code, "said_no_at_once");
        assert_eq!(ctx.reject_reason, Some("reason_of_the_later_filter"));
        assert_rejected(&ctx, "b", "said_no_at_once");
        assert_eq!(seen(&ctx), ["a"]);
        assert_eq!(s.given_back.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn checks_left_waiting_by_a_client_that_went_away_give_back_their_holds() {
        // A barrier for two never opens for one check: the request is dropped mid-wait.
        let s = Setup::new(2);
        let c = s.chain(&["d:a"]);
        let mut ctx = RequestCtx::new("id".into(), Method::POST, "/api/chat".into());
        c.on_request_before_body(&mut ctx).await.unwrap();
        let waited = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            c.on_request_after_body(&mut ctx),
        )
        .await;
        assert!(waited.is_err(), "the check should still be waiting");
        assert_eq!(s.given_back.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(!ctx.has_pending());
    }

    #[tokio::test]
    async fn checks_before_the_body_travel_while_it_is_read() {
        // The barrier opens only when the address check's answer and the body read wait at
        // once: the chain must hand the answers back unawaited.
        let s = Setup::new(3);
        let c = s.chain(&["d:ip", "d:auth", "body-x"]);
        let mut ctx = RequestCtx::new("id".into(), Method::POST, "/api/chat".into());
        c.on_request_before_body(&mut ctx).await.unwrap();
        assert_eq!(s.log(), ["req:ip", "req:auth"], "nothing awaited yet");
        let answers = ctx.answers().expect("the checks are still waiting");
        let body_read = s.barrier.clone();
        let (verdicts, _) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            futures_util::future::join(answers.wait(), async move {
                body_read.wait().await;
            }),
        )
        .await
        .expect("the answers were not left to travel alongside the body");
        verdicts.apply(&mut ctx).unwrap();
        c.on_request_after_body(&mut ctx).await.unwrap();
        assert_eq!(seen(&ctx), ["ip", "auth", "body-x"]);
    }

    /// Runs alongside, but awaits the earlier checks itself before its costly step (as auth
    /// does before counting a failure), then refuses.
    struct Settling {
        log: Arc<Mutex<Vec<String>>>,
    }

    #[async_trait]
    impl Filter for Settling {
        fn name(&self) -> &'static str {
            "settling"
        }
        fn runs_alongside(&self) -> bool {
            true
        }
        async fn on_request(&self, ctx: &mut RequestCtx) -> Result<(), Rejection> {
            ctx.settle_pending().await?;
            self.log.lock().unwrap().push("costly step".into());
            Err(Rejection::new(StatusCode::UNAUTHORIZED, "own", "no"))
        }
    }

    #[tokio::test]
    async fn a_filter_that_awaits_earlier_checks_itself_answers_their_refusal() {
        for (earlier, code, filter) in [
            ("d!:ip", "said_no_later", "ip"),
            ("d:ip", "own", "settling"),
        ] {
            let s = Setup::new(1);
            let mut filters: Vec<Arc<dyn Filter>> = s.chain(&[earlier]).filters;
            filters.push(Arc::new(Settling { log: s.log.clone() }));
            let c = FilterChain::new(filters);
            let mut ctx = RequestCtx::new("id".into(), Method::POST, "/api/chat".into());
            assert_eq!(run(&c, &mut ctx).await.unwrap_err().code, code);
            assert_rejected(&ctx, filter, code);
            assert_eq!(
                s.log().contains(&"costly step".to_string()),
                code == "own",
                "the costly step runs only once the earlier check passed"
            );
        }
    }

    #[test]
    fn unknown_filter_names_path_and_allowed() {
        let settings = crate::config::parse(
            std::path::Path::new("conf/gw.yaml"),
            "filters:\n  - use: nope\n",
            &|_| None,
        )
        .unwrap();
        let mut reg = Registry::builtin();
        reg.register("tag", |_, _| {
            Err(gateway_filter::OptionsError::new("x", "bad"))
        });
        let e = FilterChain::build(&settings, &reg, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("conf/gw.yaml: filters[0].use: unknown filter \"nope\""),
            "{e}"
        );
        assert!(e.contains("tag"), "{e}");
    }

    #[test]
    fn option_error_gets_full_path() {
        let settings = crate::config::parse(
            std::path::Path::new("gw.yaml"),
            "filters:\n  - use: tag\n    x: 1\n",
            &|_| None,
        )
        .unwrap();
        let mut reg = Registry::builtin();
        reg.register("tag", |_, _| {
            Err(gateway_filter::OptionsError::new("x", "must be a string"))
        });
        let e = FilterChain::build(&settings, &reg, None)
            .err()
            .unwrap()
            .to_string();
        assert_eq!(e, "gw.yaml: filters[0].x: tag filter: must be a string");
    }
}
