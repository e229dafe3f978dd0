//! The `auth` filter: who is asking?
//!
//! - API keys from `Authorization: Bearer` or `x-api-key`, looked up by SHA-256 in the keys
//!   file (the plain key is never stored) and compared in constant time;
//! - HTTP basic auth against an htpasswd file of bcrypt hashes; bcrypt runs on the blocking
//!   pool and verified credentials are cached, so it never runs on every request;
//! - TLS client certificates mapped to principals by `mtls_subject`;
//! - per-IP lockout after repeated failures.
//!
//! On success the principal goes into the context and the credentials are removed from the
//! headers forwarded upstream.

mod credentials;
mod error;
mod forward;
mod htpasswd;
mod jwt;
pub mod keygen;
mod keys;
mod lockout;
mod lockout_shared;
mod outbound;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use gateway_filter::http::{header, HeaderName, HeaderValue, StatusCode};
use gateway_filter::units::HumanDuration;
use gateway_filter::{
    parse_options, BuildContext, Filter, OptionsError, Principal, Rejection, ReloadError,
    RequestCtx,
};
use serde::Deserialize;

use credentials::Credential;
pub use error::{AuthError, Invalid};
use htpasswd::{Htpasswd, VerifiedCache};
pub use keys::KeyStore;
use lockout::Lockout;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthOptions {
    /// YAML file of principals and their key hashes.
    keys_file: Option<PathBuf>,
    /// Apache htpasswd file with bcrypt hashes.
    htpasswd: Option<PathBuf>,
    #[serde(default = "default_realm")]
    realm: String,
    #[serde(default)]
    brute_force: BruteForceOptions,
    #[serde(default)]
    basic_cache: CacheOptions,
    /// How TLS client certificates count: `off`, `accept` (a mapped certificate is enough),
    /// `require` (a verified certificate is needed in addition to a key or password).
    #[serde(default)]
    mtls: MtlsMode,
    /// A header naming the user, set by a proxy in front that authenticated them (e.g.
    /// `Tailscale-User-Login`): believed only on connections from `listen[].trusted_proxies`,
    /// removed from every other request.
    trusted_identity_header: Option<String>,
    /// A validator service asked about credentials the local files do not know.
    forward: Option<forward::ForwardOptions>,
    /// JWT bearer tokens (OIDC access tokens) checked against a JWKS.
    jwt: Option<jwt::JwtOptions>,
}

fn default_realm() -> String {
    "llm-gateway".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct BruteForceOptions {
    /// Failures from one IP within `window` before it is locked out; 0 turns it off.
    max_failures: u32,
    window: HumanDuration,
    /// Most client networks counted at once (about 64 bytes each, while they have failures).
    slots: usize,
}

impl Default for BruteForceOptions {
    fn default() -> Self {
        BruteForceOptions {
            max_failures: 10,
            window: HumanDuration(Duration::from_secs(60)),
            slots: 65_536,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct CacheOptions {
    size: usize,
    ttl: HumanDuration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            size: 10_000,
            ttl: HumanDuration(Duration::from_secs(300)),
        }
    }
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    #[default]
    Off,
    Accept,
    Require,
}

/// Everything read from the files; swapped whole on reload.
struct Credentials {
    keys: Arc<KeyStore>,
    htpasswd: Option<Arc<Htpasswd>>,
    /// Principal of each htpasswd user: the keys-file entry with the same id, if any.
    basic_principals: HashMap<String, Arc<Principal>>,
    cache: VerifiedCache,
}

pub struct AuthFilter {
    keys_file: Option<PathBuf>,
    htpasswd_file: Option<PathBuf>,
    cache_opts: CacheOptions,
    mtls: MtlsMode,
    identity_header: Option<HeaderName>,
    forward: Option<forward::Forwarder>,
    jwt: Option<Arc<jwt::JwtVerifier>>,
    challenges: Vec<HeaderValue>,
    state: ArcSwap<Credentials>,
    lockout: Option<Lockout>,
    /// Password hashes checked at once ([`BCRYPT_WAIT`]): half the cores at most, so a flood
    /// of guesses from many networks cannot take every core from the proxy.
    bcrypt_slots: tokio::sync::Semaphore,
    /// Checks waiting for their turn behind their address's checks under way
    /// ([`MAX_WAITING`] at once).
    waiting: tokio::sync::Semaphore,
}

/// Most entries `basic_cache.size` may ask for (it is allocated as the cache fills; billions
/// exhausted memory at the first sign-in).
const MAX_CACHE: usize = 1_000_000;

/// Registry constructor: `- use: auth` plus [`AuthOptions`].
pub fn build(
    options: &serde_json::Value,
    cx: &BuildContext,
) -> Result<Arc<dyn Filter>, OptionsError> {
    let mut o: AuthOptions = parse_options(options)?;
    if o.keys_file.is_none()
        && o.htpasswd.is_none()
        && o.mtls == MtlsMode::Off
        && o.trusted_identity_header.is_none()
        && o.forward.is_none()
        && o.jwt.is_none()
    {
        return Err(OptionsError::new(
            "",
            "needs at least one of keys_file, htpasswd, jwt, forward, mtls: accept or trusted_identity_header; otherwise nobody could log in",
        ));
    }
    if o.brute_force.max_failures > 0 && o.brute_force.window.0.is_zero() {
        return Err(OptionsError::new(
            "brute_force.window",
            "must be greater than 0: failures are counted within it, so 0 would lock nobody out (to turn the lockout off, set max_failures: 0)",
        ));
    }
    if o.basic_cache.size > MAX_CACHE {
        return Err(OptionsError::new(
            "basic_cache.size",
            format!("at most {MAX_CACHE} verified credentials (10000, the default, is plenty for most teams)"),
        ));
    }
    let identity_header = o
        .trusted_identity_header
        .as_deref()
        .map(|h| {
            HeaderName::from_bytes(h.trim().as_bytes()).map_err(|_| {
                OptionsError::new(
                    "trusted_identity_header",
                    format!("{h:?} is not a header name"),
                )
            })
        })
        .transpose()?;
    let forward = o
        .forward
        .take()
        .map(|f| forward::Forwarder::new(f, cx))
        .transpose()?;
    let jwt = o
        .jwt
        .take()
        .map(|j| jwt::JwtVerifier::new(j, cx).map(Arc::new))
        .transpose()?;
    o.keys_file = o.keys_file.map(|p| cx.resolve(&p));
    o.htpasswd = o.htpasswd.map(|p| cx.resolve(&p));
    let credentials =
        load(o.keys_file.as_ref(), o.htpasswd.as_ref(), &o.basic_cache).map_err(|e| {
            let key = if e.path().is_some() && e.path() == o.htpasswd.as_deref() {
                "htpasswd"
            } else {
                "keys_file"
            };
            OptionsError::new(key, e.to_string())
        })?;
    let realm = o.realm.replace('"', "");
    let mut challenges = Vec::new();
    if o.keys_file.is_some() {
        challenges.push(challenge("Bearer", &realm)?);
    }
    if o.htpasswd.is_some() {
        challenges.push(challenge("Basic", &realm)?);
    }
    let lockout = (o.brute_force.max_failures > 0).then(|| {
        Lockout::new(
            o.brute_force.max_failures,
            o.brute_force.window.0,
            o.brute_force.slots,
            cx.state.clone(),
        )
    });
    Ok(Arc::new(AuthFilter {
        keys_file: o.keys_file,
        htpasswd_file: o.htpasswd,
        cache_opts: o.basic_cache,
        mtls: o.mtls,
        identity_header,
        forward,
        jwt,
        challenges,
        state: ArcSwap::from_pointee(credentials),
        lockout,
        bcrypt_slots: tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
        ),
        waiting: tokio::sync::Semaphore::new(MAX_WAITING),
    }))
}

fn challenge(scheme: &str, realm: &str) -> Result<HeaderValue, OptionsError> {
    HeaderValue::from_str(&format!("{scheme} realm=\"{realm}\""))
        .map_err(|_| OptionsError::new("realm", "must be printable ASCII"))
}

fn load(
    keys_file: Option<&PathBuf>,
    htpasswd_file: Option<&PathBuf>,
    cache: &CacheOptions,
) -> Result<Credentials, AuthError> {
    let keys = match keys_file {
        Some(p) => KeyStore::load(p)?,
        None => KeyStore::default(),
    };
    let htpasswd = htpasswd_file.map(|p| Htpasswd::load(p)).transpose()?;
    Ok(assemble(Arc::new(keys), htpasswd.map(Arc::new), cache))
}

/// Credentials from a keys store and an htpasswd file (each read anew, or kept from before
/// when its file is broken), with a new verified-credential cache.
fn assemble(
    keys: Arc<KeyStore>,
    htpasswd: Option<Arc<Htpasswd>>,
    cache: &CacheOptions,
) -> Credentials {
    let mut basic_principals = HashMap::new();
    if let Some(h) = &htpasswd {
        for user in h.users() {
            let base = keys
                .by_id(user)
                .map(|r| (*r.principal).clone())
                .unwrap_or_else(|| Principal {
                    id: user.to_string(),
                    name: user.to_string(),
                    listed: true,
                    ..Principal::default()
                });
            basic_principals.insert(
                user.to_string(),
                Arc::new(Principal {
                    method: "basic",
                    key_sha256_prefix: None,
                    ..base
                }),
            );
        }
    }
    Credentials {
        keys,
        htpasswd,
        basic_principals,
        cache: VerifiedCache::new(cache.size.max(1), cache.ttl.0),
    }
}

impl AuthFilter {
    fn unauthorized(&self, ctx: &mut RequestCtx, reason: &'static str, message: &str) -> Rejection {
        ctx.reject_reason = Some(reason);
        let mut r = Rejection::new(StatusCode::UNAUTHORIZED, "invalid_api_key", message);
        for c in &self.challenges {
            r = r.with_header(header::WWW_AUTHENTICATE, c.clone());
        }
        r
    }

    /// A check that takes time (a password hash, a validator's answer), counted against the
    /// client's address while it runs: an address's failures and checks under way together
    /// stay within the limit, further checks waiting for one to end (at most
    /// [`ATTEMPT_WAIT`]), so guesses sent in parallel meet the lockout as guesses sent one
    /// after another do.
    async fn attempt(
        &self,
        ctx: &mut RequestCtx,
    ) -> Result<Option<lockout::Attempt<'_>>, Rejection> {
        let (Some(l), Some(ip)) = (&self.lockout, ctx.client_net) else {
            return Ok(None);
        };
        let until = tokio::time::Instant::now() + ATTEMPT_WAIT;
        let mut waiting = None;
        loop {
            match l.attempt(&ip) {
                lockout::Turn::Go(a) => return Ok(Some(a)),
                lockout::Turn::Locked => return Err(locked_out(ctx, l)),
                lockout::Turn::Wait if tokio::time::Instant::now() >= until => {
                    return Err(locked_out(ctx, l))
                }
                lockout::Turn::Wait => {
                    // Waiting checks are bounded in number (reset HTTP/2 streams keep theirs):
                    // past the bound, a check that would wait is refused at once.
                    if waiting.is_none() {
                        let Ok(permit) = self.waiting.try_acquire() else {
                            return Err(locked_out(ctx, l));
                        };
                        waiting = Some(permit);
                    }
                    tokio::time::sleep(ATTEMPT_POLL).await;
                }
            }
        }
    }

    /// A failure, counted against the client's address. An address check still waiting (on
    /// shared state) answers first, so that a refused address gets the same answer for a
    /// guess as for a valid key; the guess was checked all the same, and is counted at once,
    /// before that wait: the guesses of the same address arriving meanwhile meet the count
    /// (counted after the wait, a burst of parallel guesses all passed the lock check with
    /// none counted yet).
    async fn failed(&self, ctx: &mut RequestCtx, reason: &'static str) -> Rejection {
        if let (Some(l), Some(ip)) = (&self.lockout, ctx.client_net) {
            l.record_failure(&ip);
        }
        let earlier = ctx.settle_pending().await;
        match earlier {
            Err(refused) => refused,
            Ok(()) => self.unauthorized(ctx, reason, "invalid credentials"),
        }
    }

    /// The request is let through as `principal`; its credentials never reach a backend:
    /// neither the one that was used nor the headers the forward validator would read (a
    /// session cookie, however the request authenticated).
    async fn accept(
        &self,
        ctx: &mut RequestCtx,
        principal: Arc<Principal>,
    ) -> Result<(), Rejection> {
        if self.wrong_certificate(ctx, &principal) {
            // Answered and counted as any failure: the client learns nothing of the
            // credential it sent (the reason goes to the logs only). Not counted, a right
            // key with a wrong certificate never locked out while wrong keys did: a stolen
            // key could be confirmed without its certificate (attacker review).
            return Err(self.failed(ctx, "client_certificate_mismatch").await);
        }
        ctx.headers.remove(header::AUTHORIZATION);
        ctx.headers.remove("x-api-key");
        if let Some(fwd) = &self.forward {
            fwd.strip(&mut ctx.headers);
        }
        ctx.principal = Some(principal);
        Ok(())
    }

    /// `mtls: require` with a principal bound to a certificate (`mtls_subject`): its key or
    /// password signs in only with that certificate, not with any the CA issued. Whether the
    /// request came without it.
    fn wrong_certificate(&self, ctx: &RequestCtx, principal: &Principal) -> bool {
        if self.mtls != MtlsMode::Require {
            return false;
        }
        let state = self.state.load();
        let bound = state
            .keys
            .by_id(&principal.id)
            .and_then(|r| r.mtls_subject.as_deref());
        bound.is_some_and(|subject| {
            !ctx.client_cert_subjects
                .iter()
                .any(|n| keys::subject_matches(subject, n))
        })
    }

    /// A JWT checked against the provider's keys; keys-file settings apply to its principal.
    async fn by_jwt(
        &self,
        ctx: &mut RequestCtx,
        state: &Credentials,
        now: SystemTime,
        token: &str,
    ) -> Result<Arc<Principal>, Rejection> {
        // Checking a signature may fetch the provider's keys: not for a refused address.
        ctx.settle_pending().await?;
        let Some(verifier) = &self.jwt else {
            return Err(self.failed(ctx, "unknown_key").await);
        };
        let claims = match verifier.verify(token).await {
            Ok(c) => c,
            // The provider's trouble is not the client's failure: no lockout count.
            Err(reason @ jwt::KEYS_UNAVAILABLE) => {
                return Err(try_later(
                    ctx,
                    false,
                    reason,
                    "the token could not be verified right now (the identity provider's keys are out of reach); try again later",
                ))
            }
            Err(reason) => return Err(self.failed(ctx, reason).await),
        };
        self.named(
            ctx,
            state,
            now,
            "jwt",
            claims.id,
            claims.scopes,
            claims.models,
        )
        .await
    }

    /// The principal an outside source named: the keys file's entry with that id, else one
    /// with the scopes and models the source gave.
    #[allow(clippy::too_many_arguments)]
    async fn named(
        &self,
        ctx: &mut RequestCtx,
        state: &Credentials,
        now: SystemTime,
        method: &'static str,
        id: String,
        scopes: Vec<String>,
        models: Vec<String>,
    ) -> Result<Arc<Principal>, Rejection> {
        // Such a principal would share the gateway's own accounts (the global budget's, or
        // that of requests without a principal): refused, however valid its credential.
        if gateway_filter::reserved_principal_id(&id) {
            log::warn!(
                "auth: {method} named the principal {:?}, a name the gateway keeps for its own accounts: refused",
                gateway_filter::echo(&id)
            );
            ctx.reject_reason = Some("principal_reserved");
            return Err(Rejection::new(
                StatusCode::FORBIDDEN,
                "principal_reserved",
                "this identity's name is reserved by the gateway; the operator must map it to another",
            ));
        }
        Ok(match state.keys.by_id(&id) {
            Some(rec) => {
                if let Err(reason) = rec.usable(now) {
                    return Err(self.failed(ctx, reason).await);
                }
                Arc::new(Principal {
                    method,
                    ..(*rec.principal).clone()
                })
            }
            None => Arc::new(Principal {
                name: id.clone(),
                id,
                method,
                scopes,
                models,
                ..Principal::default()
            }),
        })
    }

    /// Asks the forward-auth validator; keys-file settings apply to a principal it names.
    async fn forwarded(
        &self,
        ctx: &mut RequestCtx,
        state: &Credentials,
        now: SystemTime,
    ) -> Result<Arc<Principal>, Rejection> {
        // The validator is not asked for a refused address.
        ctx.settle_pending().await?;
        let Some(fwd) = &self.forward else {
            return Err(self.failed(ctx, "unknown_key").await);
        };
        // Only the first credential was checked locally; a second, different one must not
        // reach the validator (it could be a key the files know is disabled).
        if credentials::ambiguous(&ctx.headers) {
            return Err(self.failed(ctx, "ambiguous_credentials").await);
        }
        // A cached answer is no guess; the validator's answers are counted while they come.
        let bound = match self.mtls {
            MtlsMode::Require => ctx.client_cert_subjects.clone(),
            _ => Vec::new(),
        };
        let cached = fwd.cached_for(&ctx.headers, &bound);
        let _attempt = match cached {
            Some(_) => None,
            None => self.attempt(ctx).await?,
        };
        let answer = match cached {
            Some(hit) => Ok(hit),
            None => fwd.check(ctx, &bound).await,
        };
        let identity = match answer {
            Ok(identity) => identity,
            Err(forward::Denied::Refused) => return Err(self.failed(ctx, "forward_denied").await),
            // The validator's trouble is not the client's failure: no lockout count; nor is
            // a question not asked because too many were out (an address behind which many
            // people sit may hold its share).
            Err(forward::Denied::Unavailable) => {
                return Err(try_later(
                    ctx,
                    false,
                    "forward_unavailable",
                    "credentials could not be verified right now (the validator does not answer); try again later",
                ))
            }
            // Answered as a busy password check is: clients retry a 503 (a 401 reads as a bad
            // key to them).
            Err(forward::Denied::Busy) => {
                return Err(try_later(
                    ctx,
                    true,
                    "forward_busy",
                    "too many credentials are being checked right now; try again shortly",
                ))
            }
        };
        // An empty model list means "any model": an answer that should carry the list but does
        // not (a user without the attribute, `x-auth-models: ,`) must not get that, as a JWT
        // without its models claim does not. A principal of the keys file takes its entry's.
        if fwd.names_models()
            && identity.models.is_empty()
            && state.keys.by_id(&identity.id).is_none()
        {
            log::warn!(
                "auth: the validator let {:?} through without a model list: refused",
                gateway_filter::echo(&identity.id)
            );
            return Err(self.failed(ctx, "forward_no_models").await);
        }
        self.named(
            ctx,
            state,
            now,
            "forward",
            identity.id.clone(),
            identity.scopes.clone(),
            identity.models.clone(),
        )
        .await
    }

    async fn check_basic(
        &self,
        ctx: &mut RequestCtx,
        state: &Credentials,
        user: String,
        password: String,
    ) -> Result<Arc<Principal>, Rejection> {
        let Some(file) = &state.htpasswd else {
            return Err(self.failed(ctx, "basic_not_enabled").await);
        };
        // Under `mtls: require` the certificate is part of what was verified: a password
        // remembered from its owner's certificate is not a fast answer to another's (that
        // told a right password from a wrong one).
        // (The password's length keeps a password that ends in a subject's text from
        // reading as a shorter one with that certificate.)
        let mut verified = format!("{user}:{password}");
        if self.mtls == MtlsMode::Require {
            verified = format!("{user}:{}:{password}", password.len());
            for subject in &ctx.client_cert_subjects {
                verified.push('\n');
                verified.push_str(subject);
            }
        }
        let digest = keys::sha256(verified.as_bytes());
        if let Some(p) = state.cache.get(&digest) {
            return Ok(p);
        }
        // No password is hashed for a refused address.
        ctx.settle_pending().await?;
        let _attempt = self.attempt(ctx).await?;
        // An unknown user goes through bcrypt too (against a decoy of the same cost), so the
        // answer's timing does not tell which user names exist.
        let Some((hash, known)) = file.hash_or_decoy(&user) else {
            return Err(self.failed(ctx, "unknown_user").await);
        };
        let hash = hash.to_string();
        let Ok(Ok(_slot)) = tokio::time::timeout(BCRYPT_WAIT, self.bcrypt_slots.acquire()).await
        else {
            // Busy with other checks: not the client's failure, not counted.
            return Err(try_later(
                ctx,
                true,
                "auth_busy",
                "too many passwords are being checked right now; try again shortly",
            ));
        };
        // bcrypt costs tens of milliseconds by design: never on a proxy thread.
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if !known {
            return Err(self.failed(ctx, "unknown_user").await);
        }
        if !ok {
            return Err(self.failed(ctx, "wrong_password").await);
        }
        let Some(p) = state.basic_principals.get(&user).cloned() else {
            return Err(self.failed(ctx, "unknown_user").await);
        };
        // Not remembered with the wrong certificate: a cached password answers faster than
        // bcrypt, which told a right password from a wrong one.
        if self.wrong_certificate(ctx, &p) {
            return Err(self.failed(ctx, "client_certificate_mismatch").await);
        }
        state.cache.put(digest, p.clone());
        Ok(p)
    }
}

#[async_trait]
impl Filter for AuthFilter {
    fn name(&self) -> &'static str {
        "auth"
    }

    /// Runs while an earlier address limit's answer travels (shared state), when that limit
    /// remembers its refusals (so a refused address meets it, not this, with its next
    /// requests): a key of the keys file or a client certificate is settled at once, and
    /// every step that must not be taken for a refused address (hashing a password, asking a
    /// validator or a token provider) awaits that answer first.
    fn runs_alongside(&self) -> bool {
        true
    }

    async fn admin_report(&self) -> Option<(&'static str, serde_json::Value)> {
        let f = self.forward.as_ref()?;
        Some((
            "auth",
            serde_json::json!({"forward": {"url": f.url(), "failures": f.failures(), "busy": f.busy()}}),
        ))
    }

    fn identity_sources(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(p) = &self.keys_file {
            out.push(format!("API keys ({})", p.display()));
        }
        if let Some(p) = &self.htpasswd_file {
            out.push(format!("htpasswd basic auth ({})", p.display()));
        }
        match self.mtls {
            MtlsMode::Off => {}
            MtlsMode::Accept => out.push("client certificates mapped by mtls_subject".into()),
            MtlsMode::Require => {
                out.push("client certificate required in addition to a key or password".into())
            }
        }
        if let Some(j) = &self.jwt {
            out.push(format!("JWT bearer tokens (keys from {})", j.url()));
        }
        if let Some(f) = &self.forward {
            out.push(format!("forward auth validator {}", f.url()));
        }
        if let Some(h) = &self.identity_header {
            out.push(format!("header {h} from listen[].trusted_proxies"));
        }
        out
    }

    async fn on_request(&self, ctx: &mut RequestCtx) -> Result<(), Rejection> {
        // A check whose refusals are not remembered answers first: otherwise every request
        // of an address it refuses would be checked here.
        if ctx.pending_costly() {
            ctx.settle_pending().await?;
        }
        if let (Some(l), Some(ip)) = (&self.lockout, ctx.client_net) {
            if l.locked(&ip).await? {
                return Err(locked_out(ctx, l));
            }
        }
        if self.mtls == MtlsMode::Require && ctx.client_cert_subjects.is_empty() {
            return Err(self.unauthorized(
                ctx,
                "no_client_certificate",
                "a client certificate is required",
            ));
        }
        let state = self.state.load();
        let now = SystemTime::now();
        // An identity header counts only from a trusted proxy; from anyone else it is dropped,
        // so a client cannot set it on its way to a backend either.
        // Two values (a proxy that appends instead of replacing) are not believed either.
        let proxy_user = self.identity_header.as_ref().and_then(|name| {
            let single = ctx.headers.get_all(name).iter().count() == 1;
            let value = ctx.headers.remove(name).filter(|_| single)?;
            let user = value.to_str().ok()?.trim().to_string();
            (ctx.via_trusted_proxy && !user.is_empty()).then_some(user)
        });
        let principal = match (credentials::from_headers(&ctx.headers), proxy_user) {
            (Ok(None), Some(user)) => {
                self.named(ctx, &state, now, "proxy", user, Vec::new(), Vec::new())
                    .await?
            }
            (Err(reason), _) => return Err(self.failed(ctx, reason).await),
            (Ok(None), None) => {
                let by_cert = match self.mtls {
                    MtlsMode::Accept => state.keys.by_certificate(&ctx.client_cert_subjects),
                    _ => Ok(None),
                };
                let Ok(by_cert) = by_cert else {
                    return Err(self.unauthorized(
                        ctx,
                        "ambiguous_client_certificate",
                        "the client certificate's names belong to more than one principal",
                    ));
                };
                match by_cert {
                    Some(rec) => {
                        if let Err(reason) = rec.usable(now) {
                            return Err(self.failed(ctx, reason).await);
                        }
                        Arc::new(Principal {
                            method: "mtls",
                            ..(*rec.principal).clone()
                        })
                    }
                    None => return Err(self.unauthorized(ctx, "missing", "no API key provided")),
                }
            }
            (Ok(Some(Credential::ApiKey(key))), _) => {
                let digest = keys::sha256(key.as_bytes());
                let Some(rec) = state.keys.by_key_digest(&digest) else {
                    // The keys file first: an imported key may look like a JWT.
                    if self.jwt.is_some() && jwt::looks_like_jwt(&key) {
                        let p = self.by_jwt(ctx, &state, now, &key).await?;
                        return self.accept(ctx, p).await;
                    }
                    drop(key);
                    if self.forward.is_some() {
                        let p = self.forwarded(ctx, &state, now).await?;
                        return self.accept(ctx, p).await;
                    }
                    return Err(self.failed(ctx, "unknown_key").await);
                };
                if let Err(reason) = rec.usable(now) {
                    return Err(self.failed(ctx, reason).await);
                }
                rec.principal.clone()
            }
            (Ok(Some(Credential::Basic { user, password })), _) => {
                let local = state.htpasswd.as_ref().is_some_and(|h| h.has_user(&user));
                if self.forward.is_some() && !local {
                    let p = self.forwarded(ctx, &state, now).await?;
                    return self.accept(ctx, p).await;
                }
                // The password first: a disabled or expired name answered before bcrypt would
                // tell, by its speed, that the name exists.
                let usable = state.keys.by_id(&user).map(|rec| rec.usable(now));
                let principal = self.check_basic(ctx, &state, user, password).await?;
                if let Some(Err(reason)) = usable {
                    return Err(self.failed(ctx, reason).await);
                }
                principal
            }
        };
        self.accept(ctx, principal).await
    }

    /// Each file on its own: a broken htpasswd file must not keep a key the keys file
    /// revoked working (nor the other way round). A broken file keeps its previous contents.
    fn reload(&self) -> Result<(), ReloadError> {
        let old = self.state.load();
        let mut broken = None;
        let keys = match self.keys_file.as_ref().map(|p| KeyStore::load(p)) {
            None => Arc::new(KeyStore::default()),
            Some(Ok(k)) => Arc::new(k),
            Some(Err(e)) => {
                broken = Some(e);
                old.keys.clone()
            }
        };
        let htpasswd = match self.htpasswd_file.as_ref().map(|p| Htpasswd::load(p)) {
            None => None,
            Some(Ok(h)) => Some(Arc::new(h)),
            Some(Err(e)) => {
                if let Some(first) = broken.take() {
                    // Both broken: nothing changes.
                    return Err(ReloadError::new(AuthError::Both(
                        Box::new(first),
                        Box::new(e),
                    )));
                }
                broken = Some(e);
                old.htpasswd.clone()
            }
        };
        let fresh = assemble(keys, htpasswd, &self.cache_opts);
        // Said only when both files were read: with one broken, its error (logged by the
        // caller) says what was kept.
        if broken.is_none() {
            log::info!(
                "auth: reloaded: {} principals and {} htpasswd users",
                fresh.keys.len(),
                fresh.htpasswd.as_ref().map_or(0, |h| h.len())
            );
        }
        self.state.store(Arc::new(fresh));
        match broken {
            Some(e) => Err(ReloadError::new(e)),
            None => Ok(()),
        }
    }
}

/// How long a password check may wait for a free hashing slot.
const BCRYPT_WAIT: Duration = Duration::from_secs(2);

/// How long a check may wait for its turn behind its address's checks under way.
const ATTEMPT_WAIT: Duration = Duration::from_secs(5);
const ATTEMPT_POLL: Duration = Duration::from_millis(25);
/// Most checks waiting for their turn at once, all addresses together.
const MAX_WAITING: usize = 256;

/// 429 for an address locked out: failures (and checks under way) reached the limit.
fn locked_out(ctx: &mut RequestCtx, l: &Lockout) -> Rejection {
    ctx.reject_reason = Some("locked_out");
    let retry = HeaderValue::from(l.window.as_secs().max(1));
    Rejection::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_auth_failures",
        "too many failed authentications from this address; try again later",
    )
    .with_header(header::RETRY_AFTER, retry)
}

/// A credential not judged now, not for the client's fault: `503` with `Retry-After`, not
/// counted against it. `auth_unavailable` (5 s): what judges it is out of reach (the forward
/// validator, the identity provider's keys); `auth_busy` (1 s): too many checks are under
/// way. Still fail closed, but a 401 would read as a bad key to clients (they do not retry
/// it, some sign the user out) and hide an outage from error-rate alerts.
fn try_later(
    ctx: &mut RequestCtx,
    busy: bool,
    reason: &'static str,
    message: &'static str,
) -> Rejection {
    let (code, retry) = if busy {
        ("auth_busy", "1")
    } else {
        ("auth_unavailable", "5")
    };
    ctx.reject_reason = Some(reason);
    Rejection::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        .with_header(header::RETRY_AFTER, HeaderValue::from_static(retry))
}

#[cfg(test)]
mod tests;
