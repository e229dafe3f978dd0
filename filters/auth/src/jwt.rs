//! JWT bearer tokens (OIDC access tokens) checked against the provider's JWKS.
//!
//! The key set is fetched when the filter is built and refreshed in the background; a token
//! with an unknown `kid` triggers a refresh at most once a minute, so a known key never costs
//! a network call on the request path. Only asymmetric algorithms are accepted (no `none`, no
//! HMAC: a shared secret would let anyone holding it mint tokens).

use crate::outbound::shown;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use gateway_filter::units::HumanDuration;
use gateway_filter::OptionsError;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtOptions {
    /// The provider's key set, e.g. `http://idp:8080/realms/x/protocol/openid-connect/certs`.
    jwks_url: Option<String>,
    /// Instead of `jwks_url`: `true` reads the key set's address from the issuer's OpenID
    /// discovery document (`{issuer}/.well-known/openid-configuration`), or a URL names
    /// that document.
    issuer_discovery: Option<Discovery>,
    /// Required `iss`.
    issuer: String,
    /// Required `aud` (one of them).
    audience: Vec<String>,
    #[serde(default = "default_algorithms")]
    algorithms: Vec<String>,
    #[serde(default = "default_principal_claim")]
    principal_claim: String,
    /// A claim with scopes: a list, or a space-separated string as OAuth's `scope`.
    scopes_claim: Option<String>,
    /// A claim with the models the principal may use: a list or a comma-separated string.
    models_claim: Option<String>,
    #[serde(default = "default_leeway")]
    leeway: HumanDuration,
    #[serde(default = "default_timeout")]
    timeout: HumanDuration,
    /// How often the key set is fetched again in the background.
    #[serde(default = "default_refresh")]
    refresh: HumanDuration,
    /// A token with an unknown `kid` (the provider rotated its keys) refetches the set at
    /// most this often, so made-up `kid`s cannot hammer the provider.
    #[serde(default = "default_unknown_kid_refresh")]
    unknown_kid_refresh: HumanDuration,
    /// PEM CA certificates trusted for an `https://` key set besides the public roots.
    ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Discovery {
    On(bool),
    At(String),
}

/// Where the key set's address comes from.
#[derive(Debug)]
enum KeySource {
    Jwks(String),
    /// An OpenID discovery document, whose `issuer` must be the configured one.
    Discovery {
        document: String,
        issuer: String,
        /// Fetched over https: its key set must be too.
        https: bool,
    },
}

/// The part of an OpenID provider's discovery document the gateway reads.
#[derive(Deserialize)]
struct DiscoveryDocument {
    issuer: String,
    jwks_uri: String,
}

fn web_url(key: &str, url: &str) -> Result<reqwest::Url, OptionsError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| OptionsError::new(key, format!("{:?}: {e}", shown(url))))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(OptionsError::new(
            key,
            format!("{:?}: must be an http:// or https:// URL", shown(url)),
        ));
    }
    Ok(parsed)
}

/// Most clock skew accepted on `exp`/`nbf`.
const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// Most bytes of a key set read.
const MAX_JWKS_BYTES: usize = 1 << 20;

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into(), "EdDSA".into()]
}
fn default_principal_claim() -> String {
    "sub".into()
}
fn default_leeway() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_refresh() -> HumanDuration {
    HumanDuration(Duration::from_secs(600))
}
fn default_unknown_kid_refresh() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

/// The reason when the provider's keys could not be had: not the client's failure.
pub const KEYS_UNAVAILABLE: &str = "jwt_keys_unavailable";

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub id: String,
    pub scopes: Vec<String>,
    pub models: Vec<String>,
}

pub struct JwtVerifier {
    source: KeySource,
    /// The key set's address as last discovered (discovery only), for reports.
    discovered: std::sync::Mutex<Option<String>>,
    client: reqwest::Client,
    /// One per accepted algorithm: the crate wants every listed algorithm to match the key's
    /// family, so a mixed list is split up front rather than per request.
    validations: Vec<(Algorithm, Validation)>,
    principal_claim: String,
    scopes_claim: Option<String>,
    models_claim: Option<String>,
    refresh: Duration,
    unknown_kid_refresh: Duration,
    keys: ArcSwap<HashMap<String, DecodingKey>>,
    /// Milliseconds since the epoch of the last fetch attempt.
    fetched_at: AtomicU64,
    refreshing: AtomicBool,
    /// Fetches are numbered when they start; a slow old one never replaces a newer set.
    started: AtomicU64,
    stored: std::sync::Mutex<u64>,
}

fn algorithm(name: &str) -> Result<Algorithm, OptionsError> {
    let alg: Algorithm = name.trim().parse().map_err(|_| {
        OptionsError::new("jwt.algorithms", format!("{name:?} is not a JWS algorithm"))
    })?;
    if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
        return Err(OptionsError::new(
            "jwt.algorithms",
            format!("{name}: HMAC tokens are not accepted (anyone with the secret could mint them); use RS*, PS*, ES* or EdDSA"),
        ));
    }
    Ok(alg)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether a bearer token looks like a JWS (three base64url parts), not an API key.
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let n = parts.clone().count();
    n == 3
        && parts.all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && token.starts_with("eyJ")
}

impl JwtVerifier {
    /// Builds the verifier and fetches the key set once (a failure is logged, not fatal:
    /// the provider may start after the gateway).
    pub fn new(o: JwtOptions, cx: &gateway_filter::BuildContext) -> Result<Self, OptionsError> {
        let source = match (&o.jwks_url, &o.issuer_discovery) {
            (Some(url), None | Some(Discovery::On(false))) => {
                web_url("jwt.jwks_url", url)?;
                KeySource::Jwks(url.clone())
            }
            (None, Some(Discovery::On(true))) => {
                let document = format!(
                    "{}/.well-known/openid-configuration",
                    o.issuer.trim_end_matches('/')
                );
                let https = web_url("jwt.issuer", &document)?.scheme() == "https";
                KeySource::Discovery {
                    document,
                    issuer: o.issuer.clone(),
                    https,
                }
            }
            (None, Some(Discovery::At(url))) => {
                let https = web_url("jwt.issuer_discovery", url)?.scheme() == "https";
                // Whoever can change a plain-http document in transit can name their own
                // key set, and mint tokens for an https issuer.
                let issuer_https =
                    reqwest::Url::parse(&o.issuer).is_ok_and(|u| u.scheme() == "https");
                if issuer_https && !https {
                    return Err(OptionsError::new(
                        "jwt.issuer_discovery",
                        format!("{:?}: the issuer is https://, so its discovery document must be fetched over https:// too", shown(url)),
                    ));
                }
                KeySource::Discovery {
                    document: url.clone(),
                    issuer: o.issuer.clone(),
                    https,
                }
            }
            (Some(_), Some(_)) => {
                return Err(OptionsError::new(
                    "jwt",
                    "give either jwks_url or issuer_discovery, not both",
                ))
            }
            (None, _) => {
                return Err(OptionsError::new(
                    "jwt",
                    "needs jwks_url (the provider's key set) or issuer_discovery: true",
                ))
            }
        };
        for (key, d) in [
            ("jwt.refresh", o.refresh.0),
            ("jwt.unknown_kid_refresh", o.unknown_kid_refresh.0),
        ] {
            if d.is_zero() {
                return Err(OptionsError::new(
                    key,
                    "must be greater than 0: with 0 every token could make the gateway fetch the key set again (the default is the usual)",
                ));
            }
        }
        if o.leeway.0 > MAX_LEEWAY {
            return Err(OptionsError::new(
                "jwt.leeway",
                format!(
                    "at most {}s; clocks that far apart need fixing, not a wider window",
                    MAX_LEEWAY.as_secs()
                ),
            ));
        }
        let algorithms = o
            .algorithms
            .iter()
            .map(|a| algorithm(a))
            .collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err(OptionsError::new(
                "jwt.algorithms",
                "must name at least one algorithm",
            ));
        }
        if o.audience.is_empty() {
            return Err(OptionsError::new(
                "jwt.audience",
                "must name at least one audience",
            ));
        }
        let validations = algorithms
            .into_iter()
            .map(|alg| {
                let mut v = Validation::new(alg);
                v.set_issuer(&[o.issuer.as_str()]);
                v.set_audience(&o.audience);
                v.set_required_spec_claims(&["exp", "iss", "aud"]);
                v.validate_nbf = true;
                v.leeway = o.leeway.0.as_secs();
                (alg, v)
            })
            .collect();
        let ca = o.ca_file.as_deref().map(|p| cx.resolve(p));
        // No pooled connections: the first fetch runs on a runtime that ends with it.
        let client = crate::outbound::client("jwt", o.timeout.0, ca.as_deref(), false)?;
        let v = JwtVerifier {
            source,
            discovered: std::sync::Mutex::new(None),
            client,
            validations,
            principal_claim: o.principal_claim,
            scopes_claim: o.scopes_claim,
            models_claim: o.models_claim,
            refresh: o.refresh.0,
            unknown_kid_refresh: o.unknown_kid_refresh.0,
            keys: ArcSwap::from_pointee(HashMap::new()),
            fetched_at: AtomicU64::new(0),
            refreshing: AtomicBool::new(false),
            started: AtomicU64::new(0),
            stored: std::sync::Mutex::new(0),
        };
        v.fetch_at_start();
        Ok(v)
    }

    /// Where the keys come from, for `check` and reports.
    pub fn url(&self) -> String {
        match &self.source {
            KeySource::Jwks(url) => shown(url),
            KeySource::Discovery { document, .. } => {
                let found = self.discovered.lock().ok().and_then(|d| d.clone());
                match found {
                    Some(jwks) => format!("{}, discovered at {}", shown(&jwks), shown(document)),
                    None => format!("the key set named at {}", shown(document)),
                }
            }
        }
    }

    /// The key set's address: configured, or read from the discovery document (again on
    /// every fetch, so a provider that moves its keys is followed).
    async fn jwks_url(&self) -> Result<String, String> {
        let (document, issuer, https) = match &self.source {
            KeySource::Jwks(url) => return Ok(url.clone()),
            KeySource::Discovery {
                document,
                issuer,
                https,
            } => (document, issuer, *https),
        };
        match self.discover(document, issuer, https).await {
            Ok(url) => {
                if let Ok(mut d) = self.discovered.lock() {
                    *d = Some(url.clone());
                }
                Ok(url)
            }
            // The provider's discovery document is unreachable: the key set found last time
            // still serves (it is checked on its own).
            Err(e) => match self.discovered.lock().ok().and_then(|d| d.clone()) {
                Some(known) => {
                    log::warn!(
                        "auth: {e}; using the key set found before ({})",
                        shown(&known)
                    );
                    Ok(known)
                }
                None => Err(e),
            },
        }
    }

    async fn discover(&self, document: &str, issuer: &str, https: bool) -> Result<String, String> {
        let body = self.get_capped(document).await?;
        let doc: DiscoveryDocument = serde_json::from_slice(&body)
            .map_err(|e| format!("discovery document {}: {e}", shown(document)))?;
        // OpenID Connect Discovery §4.3: the document must name the issuer it was asked for,
        // or whoever serves it could hand out another issuer's keys.
        if doc.issuer != issuer {
            return Err(format!(
                "discovery document {} is for issuer {:?}, not {issuer:?}",
                shown(document),
                doc.issuer
            ));
        }
        let jwks = reqwest::Url::parse(&doc.jwks_uri)
            .map_err(|e| format!("discovery document {}: jwks_uri: {e}", shown(document)))?;
        if !(jwks.scheme() == "https" || (jwks.scheme() == "http" && !https)) {
            return Err(format!(
                "discovery document {}: jwks_uri {} must be https://",
                shown(document),
                shown(&doc.jwks_uri)
            ));
        }
        Ok(doc.jwks_uri)
    }

    /// GETs `url`, reading at most [`MAX_JWKS_BYTES`].
    async fn get_capped(&self, url: &str) -> Result<Vec<u8>, String> {
        let mut resp = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| format!("{}: {}", shown(url), crate::outbound::error_text(e)))?;
        if !resp.status().is_success() {
            return Err(format!("{}: status {}", shown(url), resp.status()));
        }
        // A key set or discovery document is a few KB; a provider (or whatever answers at
        // the URL) sending more is not read into memory.
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(crate::outbound::error_text)? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!(
                    "{}: larger than {MAX_JWKS_BYTES} bytes",
                    shown(url)
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// The first fetch, on a thread of its own so that it works whether or not the caller is
    /// inside an async runtime.
    fn fetch_at_start(&self) {
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(self.fetch())
            })
            .join()
            .unwrap_or_else(|_| Err("fetch thread panicked".into()))
        });
        match result {
            Ok(n) => log::info!("auth: {n} JWT keys from {}", self.url()),
            Err(e) => log::warn!(
                "auth: JWKS {} not fetched at start ({e}); JWTs are refused until it is",
                self.url()
            ),
        }
    }

    /// Fetches the key set and swaps it in; returns the number of usable keys.
    async fn fetch(&self) -> Result<usize, String> {
        self.fetched_at.store(now_ms(), Ordering::Relaxed);
        let seq = self.started.fetch_add(1, Ordering::AcqRel) + 1;
        let url = self.jwks_url().await?;
        let body = self.get_capped(&url).await?;
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let keys: HashMap<String, DecodingKey> = set
            .keys
            .iter()
            // Encryption keys never verify signatures.
            .filter(|jwk| {
                !matches!(
                    jwk.common.public_key_use,
                    Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
                )
            })
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                DecodingKey::from_jwk(jwk).ok().map(|k| (kid, k))
            })
            .collect();
        let n = keys.len();
        // Held only for the comparison and the swap (no await), by fetches, never by requests.
        let mut stored = self.stored.lock().unwrap_or_else(|e| e.into_inner());
        if *stored < seq {
            *stored = seq;
            self.keys.store(Arc::new(keys));
        }
        Ok(n)
    }

    /// Time since the last fetch attempt.
    fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.fetched_at.load(Ordering::Relaxed)))
    }

    /// Refreshes in the background when the set is older than `refresh`.
    fn refresh_in_background(self: &Arc<Self>) {
        if self.age() < self.refresh || self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.fetch().await {
                log::warn!(
                    "auth: JWKS {} refresh failed ({e}); keeping the old keys",
                    me.url()
                );
            }
            me.refreshing.store(false, Ordering::Release);
        });
    }

    /// Checks `token`; `Err` carries the reason for the audit.
    pub async fn verify(self: &Arc<Self>, token: &str) -> Result<Claims, &'static str> {
        self.refresh_in_background();
        let header = jsonwebtoken::decode_header(token).map_err(|_| "jwt_malformed")?;
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == header.alg) else {
            return Err("jwt_algorithm");
        };
        let kid = header.kid.ok_or("jwt_no_kid")?;
        let mut keys = self.keys.load_full();
        if !keys.contains_key(&kid) {
            // Claim the refetch atomically: one per `unknown_kid_refresh` across all threads.
            let last = self.fetched_at.load(Ordering::Relaxed);
            let now = now_ms();
            let due = now.saturating_sub(last) >= self.unknown_kid_refresh.as_millis() as u64;
            if !due
                || self
                    .fetched_at
                    .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
            {
                return Err(if keys.is_empty() {
                    KEYS_UNAVAILABLE
                } else {
                    "jwt_unknown_kid"
                });
            }
            if let Err(e) = self.fetch().await {
                log::warn!("auth: JWKS {} refresh failed ({e})", self.url());
                return Err(KEYS_UNAVAILABLE);
            }
            keys = self.keys.load_full();
        }
        let key = keys.get(&kid).ok_or("jwt_unknown_kid")?;
        let data =
            jsonwebtoken::decode::<serde_json::Value>(token, key, validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::ExpiredSignature => "jwt_expired",
                    K::ImmatureSignature => "jwt_not_yet_valid",
                    K::InvalidAudience => "jwt_audience",
                    K::InvalidIssuer => "jwt_issuer",
                    K::InvalidSignature => "jwt_signature",
                    K::InvalidAlgorithm => "jwt_algorithm",
                    K::MissingRequiredClaim(_) => "jwt_missing_claim",
                    _ => "jwt_invalid",
                }
            })?;
        let claims = data.claims;
        let id = claims
            .get(&self.principal_claim)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .ok_or("jwt_no_principal")?
            .to_string();
        let list = |name: &Option<String>, seps: &[char]| -> Vec<String> {
            match name.as_ref().and_then(|n| claims.get(n)) {
                Some(serde_json::Value::Array(items)) => items
                    .iter()
                    .filter_map(|v| v.as_str())
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
                Some(serde_json::Value::String(s)) => s
                    .split(seps)
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
                _ => Vec::new(),
            }
        };
        let models = list(&self.models_claim, &[',', ' ']);
        // An empty model list means "any model": a token that should carry the list but
        // does not must not get that.
        if self.models_claim.is_some() && models.is_empty() {
            return Err("jwt_no_models");
        }
        Ok(Claims {
            id,
            scopes: list(&self.scopes_claim, &[' ', ',']),
            models,
        })
    }
}
