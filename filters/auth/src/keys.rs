//! The keys file: principals with the SHA-256 of their API key (never the key itself).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gateway_filter::{Overrides, Principal};

use crate::error::{AuthError, Invalid};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: Vec<KeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: String,
    name: Option<String>,
    /// Hex SHA-256 of the API key. Absent for principals that log in with htpasswd or a
    /// client certificate only.
    key_sha256: Option<String>,
    #[serde(default = "yes")]
    enabled: bool,
    /// RFC 3339 time or a date (`2027-01-31` = that day's start, UTC).
    expires: Option<String>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
    /// Certificate subject (CN or a DNS/email SAN) that authenticates as this principal.
    mtls_subject: Option<String>,
    // Per-principal overrides read by other filters.
    rate: Option<gateway_filter::limits::Rate>,
    burst: Option<u32>,
    tokens_per_minute: Option<u64>,
    max_usd: Option<f64>,
    period: Option<gateway_filter::limits::Period>,
}

fn yes() -> bool {
    true
}

/// A principal as the keys file defines it, with what the auth check needs.
#[derive(Debug)]
pub struct KeyRecord {
    pub principal: Arc<Principal>,
    pub digest: Option<[u8; 32]>,
    pub enabled: bool,
    pub expires: Option<SystemTime>,
    pub mtls_subject: Option<String>,
}

impl KeyRecord {
    /// `Err(reason)` when the principal may not log in now.
    pub fn usable(&self, now: SystemTime) -> Result<(), &'static str> {
        if !self.enabled {
            return Err("disabled");
        }
        if self.expires.is_some_and(|t| t <= now) {
            return Err("expired");
        }
        Ok(())
    }
}

/// Principals by key digest and by id. Built once per (re)load, read lock-free.
#[derive(Debug, Default)]
pub struct KeyStore {
    by_digest: HashMap<[u8; 32], Arc<KeyRecord>>,
    by_id: HashMap<String, Arc<KeyRecord>>,
    /// By `mtls_subject` as written: typed (`dns:…`, [`SUBJECT_KINDS`]) or any kind.
    by_subject: HashMap<String, Arc<KeyRecord>>,
    /// Untyped subjects lower-cased: matched by a DNS name or email address (presented
    /// lower-cased) whatever case they were written in.
    by_subject_caseless: HashMap<String, Arc<KeyRecord>>,
}

/// The kinds of name a client certificate carries, as the TLS layer writes them before each
/// name: its subject's common name, and its DNS, email and URI subject alternative names.
pub const SUBJECT_KINDS: [&str; 4] = ["cn:", "dns:", "email:", "uri:"];

/// A name as presented (`dns:svc.internal`) or configured: its kind (with the colon) if it
/// has one, and the name.
fn kind_of(name: &str) -> (Option<&'static str>, &str) {
    SUBJECT_KINDS
        .iter()
        .find_map(|k| name.strip_prefix(k).map(|rest| (Some(*k), rest)))
        .unwrap_or((None, name))
}

/// An `mtls_subject` as written, its kind lower-cased (`DNS:x`, as OpenSSL prints names, is
/// `dns:x`: written otherwise it would be an untyped name that a common name `DNS:x`, which
/// the requester writes, matches), and a typed DNS name or email address lower-cased as the
/// TLS layer presents them. A name must not be empty.
fn normalized_subject(written: &str) -> Result<String, String> {
    let kind = kind_of(&written.to_ascii_lowercase()).0;
    let name = kind.map_or(written, |k| &written[k.len()..]);
    if name.trim().is_empty() {
        return Err(format!(
            "{written:?} names no certificate; write a common name or subject alternative name, optionally typed (dns:svc.internal)"
        ));
    }
    Ok(match kind {
        Some(k @ ("dns:" | "email:")) => format!("{k}{}", name.to_ascii_lowercase()),
        Some(k) => format!("{k}{name}"),
        None => written.to_string(),
    })
}

/// Whether a certificate's name (as presented, with its kind) is the `mtls_subject`
/// `configured`: a typed one (`dns:svc.internal`) only by a name of that kind, an untyped one
/// by a name of any kind. A common name written to look like a kind (`CN=dns:svc`) is a
/// common name: it never matches `dns:svc`.
pub fn subject_matches(configured: &str, presented: &str) -> bool {
    match (kind_of(configured), kind_of(presented)) {
        ((Some(_), _), _) => configured == presented,
        // DNS names and email addresses are presented lower-cased.
        ((None, want), (Some("dns:" | "email:"), name)) => want.eq_ignore_ascii_case(name),
        ((None, want), (_, name)) => want == name,
    }
}

/// The certificate names a key names no principal, or two (`Err`: which one it signs in as
/// would depend on the order of its names).
#[derive(Debug, PartialEq, Eq)]
pub struct Ambiguous;

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Why `id` cannot name a principal, and what to do.
pub(crate) fn reserved(id: &str) -> String {
    format!(
        "{id:?} is the name of one of the gateway's own accounts (`*`: the global budget, `anonymous`: requests without a principal), which this principal would share; choose another id"
    )
}

impl KeyStore {
    pub fn load(path: &Path) -> Result<KeyStore, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            what: "keys file",
            path: path.to_path_buf(),
            source,
        })?;
        KeyStore::parse(&text).map_err(|problem| AuthError::Invalid {
            path: path.to_path_buf(),
            problem,
        })
    }

    pub fn parse(text: &str) -> Result<KeyStore, Invalid> {
        let file: KeysFile = serde_norway::from_str(text).map_err(|e| {
            let (at, message) = match e.to_string().split_once(": ") {
                Some((at, m)) if at.starts_with("keys") => (at.to_string(), m.to_string()),
                _ => ("keys".to_string(), e.to_string()),
            };
            Invalid::new(at, message)
        })?;
        let mut store = KeyStore::default();
        for (i, e) in file.keys.into_iter().enumerate() {
            let at = format!("keys[{i}]");
            if e.id.is_empty() {
                return Err(Invalid::new(format!("{at}.id"), "must not be empty"));
            }
            if gateway_filter::reserved_principal_id(&e.id) {
                return Err(Invalid::new(format!("{at}.id"), reserved(&e.id)));
            }
            let digest = match &e.key_sha256 {
                None => None,
                Some(h) => {
                    Some(parse_digest(h).map_err(|m| Invalid::new(format!("{at}.key_sha256"), m))?)
                }
            };
            let expires = match &e.expires {
                None => None,
                Some(t) => {
                    Some(parse_time(t).map_err(|m| Invalid::new(format!("{at}.expires"), m))?)
                }
            };
            let principal = Principal {
                id: e.id.clone(),
                name: e.name.clone().unwrap_or_else(|| e.id.clone()),
                method: "api_key",
                listed: true,
                key_sha256_prefix: e
                    .key_sha256
                    .as_ref()
                    .map(|h| h.to_ascii_lowercase()[..12].to_string()),
                models: e.models,
                scopes: e.scopes,
                overrides: Overrides {
                    rate: e.rate,
                    burst: e.burst,
                    tokens_per_minute: e.tokens_per_minute,
                    max_usd: e.max_usd,
                    period: e.period,
                },
            };
            if e.tokens_per_minute == Some(0) {
                return Err(Invalid::new(
                    format!("{at}.tokens_per_minute"),
                    "must be at least 1 (leave it out for the filter's own limit)",
                ));
            }
            if e.max_usd.is_some_and(|m| !(m.is_finite() && m >= 0.0)) {
                return Err(Invalid::new(
                    format!("{at}.max_usd"),
                    "must be 0 or more dollars",
                ));
            }
            let mtls_subject = e
                .mtls_subject
                .as_deref()
                .map(normalized_subject)
                .transpose()
                .map_err(|message| Invalid::new(format!("{at}.mtls_subject"), message))?;
            let record = Arc::new(KeyRecord {
                principal: Arc::new(principal),
                digest,
                enabled: e.enabled,
                expires,
                mtls_subject,
            });
            if store.by_id.insert(e.id.clone(), record.clone()).is_some() {
                return Err(Invalid::new(
                    format!("{at}.id"),
                    format!("duplicate id {:?}; ids must be unique", e.id),
                ));
            }
            if let Some(subject) = &record.mtls_subject {
                // Two entries for one certificate subject: which one a certificate signs in
                // as would be chance.
                if store
                    .by_subject
                    .insert(subject.clone(), record.clone())
                    .is_some()
                {
                    return Err(Invalid::new(
                        format!("{at}.mtls_subject"),
                        format!("{subject:?} is another entry's mtls_subject too; a certificate subject may name one principal"),
                    ));
                }
                let clash = kind_of(subject).0.is_none()
                    && store
                        .by_subject_caseless
                        .insert(subject.to_ascii_lowercase(), record.clone())
                        .is_some();
                if clash {
                    return Err(Invalid::new(
                        format!("{at}.mtls_subject"),
                        format!("{subject:?} differs from another entry's mtls_subject only in case, and DNS names do not depend on case; a certificate subject may name one principal"),
                    ));
                }
            }
            if let Some(d) = digest {
                if store.by_digest.insert(d, record).is_some() {
                    return Err(Invalid::new(
                        format!("{at}.key_sha256"),
                        "the same key hash appears twice; every principal needs its own key",
                    ));
                }
            }
        }
        Ok(store)
    }

    /// The record whose key hashes to `digest`; the stored digest is compared in constant time.
    pub fn by_key_digest(&self, digest: &[u8; 32]) -> Option<&Arc<KeyRecord>> {
        let rec = self.by_digest.get(digest)?;
        let stored = rec.digest.as_ref()?;
        bool::from(stored.ct_eq(digest)).then_some(rec)
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<KeyRecord>> {
        self.by_id.get(id)
    }

    /// The principal a client certificate's names (as presented, with their kinds) map to.
    pub fn by_certificate(&self, names: &[String]) -> Result<Option<&Arc<KeyRecord>>, Ambiguous> {
        let mut found: Option<&Arc<KeyRecord>> = None;
        for name in names {
            let (kind, bare) = kind_of(name);
            let typed = kind.and_then(|_| self.by_subject.get(name.as_str()));
            let untyped = match kind {
                // Presented lower-cased: an untyped subject in any case.
                Some("dns:" | "email:") => self.by_subject_caseless.get(bare),
                _ => self.by_subject.get(bare),
            }
            .filter(|_| kind_of(bare).0.is_none());
            for rec in typed.into_iter().chain(untyped) {
                match found {
                    Some(f) if !Arc::ptr_eq(f, rec) => return Err(Ambiguous),
                    _ => found = Some(rec),
                }
            }
        }
        Ok(found)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

fn parse_digest(hex_str: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(hex_str.trim()).map_err(|_| {
        "must be 64 hex characters (the output of `llm-gateway keys hash`)".to_string()
    })?;
    bytes.try_into().map_err(|_| {
        "must be 64 hex characters (the output of `llm-gateway keys hash`)".to_string()
    })
}

fn parse_time(s: &str) -> Result<SystemTime, String> {
    let s = s.trim();
    let bad = |e: String| {
        format!(
            "{s:?} is not a date or RFC 3339 time ({e}); write 2027-01-31, 2027-01-31T12:00:00Z or 2027-01-31T14:00:00+02:00"
        )
    };
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else if s.as_bytes().get(10) == Some(&b't') {
        // RFC 3339 allows a lowercase separator; humantime reads `T` or a space.
        format!("{}T{}", &s[..10], &s[11..])
    } else {
        s.to_string()
    };
    let (local, east) = utc_offset(&full).map_err(bad)?;
    let t = humantime::parse_rfc3339_weak(local).map_err(|e| bad(e.to_string()))?;
    let shift = Duration::from_secs(east.unsigned_abs());
    // The time was written `east` seconds ahead of UTC.
    if east >= 0 {
        t.checked_sub(shift)
    } else {
        t.checked_add(shift)
    }
    .ok_or_else(|| bad("out of range".into()))
}

/// An RFC 3339 time's local part and its offset east of UTC in seconds: `Z`, `z` or `±HH:MM`
/// after the time of day.
fn utc_offset(t: &str) -> Result<(&str, i64), String> {
    if let Some(local) = t.strip_suffix(['Z', 'z']) {
        return Ok((local, 0));
    }
    let b = t.as_bytes();
    let n = b.len();
    if n > 19 && matches!(b[n - 6], b'+' | b'-') && b[n - 3] == b':' {
        let num = |r: std::ops::Range<usize>| {
            t.get(r)
                .filter(|d| d.bytes().all(|c| c.is_ascii_digit()))
                .and_then(|d| d.parse::<i64>().ok())
        };
        let (Some(h), Some(m)) = (num(n - 5..n - 3), num(n - 2..n)) else {
            return Err("the offset is not ±HH:MM".into());
        };
        if h > 23 || m > 59 {
            return Err("the offset is not ±HH:MM".into());
        }
        let east = (h * 3600 + m * 60) * if b[n - 6] == b'-' { -1 } else { 1 };
        return Ok((&t[..n - 6], east));
    }
    Ok((t, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "sk-gw-alice";

    fn hexd(k: &str) -> String {
        hex::encode(sha256(k.as_bytes()))
    }

    #[test]
    fn expiry_times_take_their_utc_offset() {
        let utc = parse_time("2027-01-31T12:00:00Z").unwrap();
        for same in [
            "2027-01-31T12:00:00z",
            "2027-01-31T14:00:00+02:00",
            "2027-01-31T06:30:00-05:30",
            "2027-01-31T12:00:00+00:00",
            "2027-01-31 12:00:00Z",
            "2027-01-31t14:00:00+02:00",
        ] {
            assert_eq!(parse_time(same).unwrap(), utc, "{same}");
        }
        assert_eq!(
            parse_time("2027-01-31").unwrap(),
            parse_time("2027-01-31T00:00:00Z").unwrap()
        );
        for bad in [
            "2027-01-31T12:00:00+2:00",
            "2027-01-31T12:00:00+24:00",
            "31.01.2027",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_and_looks_up() {
        let text = format!(
            "keys:\n  - id: alice\n    name: Alice\n    key_sha256: {}\n    models: ['llama3.1:*']\n    scopes: [admin]\n    rate: 10/m\n    max_usd: 5\n  - id: bob\n    key_sha256: {}\n    enabled: false\n  - id: carol\n    key_sha256: {}\n    expires: 2001-01-01\n",
            hexd(ALICE),
            hexd("b"),
            hexd("c")
        );
        let s = KeyStore::parse(&text).unwrap();
        let a = s.by_key_digest(&sha256(ALICE.as_bytes())).unwrap();
        assert_eq!(a.principal.name, "Alice");
        assert_eq!(
            a.principal.overrides.rate,
            Some(gateway_filter::limits::Rate::parse("10/m").unwrap())
        );
        assert_eq!(a.principal.overrides.max_usd, Some(5.0));
        assert!(a.principal.has_scope("admin"));
        assert_eq!(
            a.principal.key_sha256_prefix.as_deref(),
            Some(&hexd(ALICE)[..12])
        );
        let now = SystemTime::now();
        assert_eq!(a.usable(now), Ok(()));
        assert_eq!(s.by_id("bob").unwrap().usable(now), Err("disabled"));
        assert_eq!(s.by_id("carol").unwrap().usable(now), Err("expired"));
        assert!(s.by_key_digest(&sha256(b"nope")).is_none());
    }

    #[test]
    fn refuses_the_names_of_the_gateways_own_accounts() {
        let d = hexd("x");
        for id in ["anonymous", "'*'", "''"] {
            let e = KeyStore::parse(&format!(
                "keys:\n  - {{ id: ok, key_sha256: {d} }}\n  - {{ id: {id} }}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.starts_with("keys[1].id"), "{id}: {e}");
        }
        let e = KeyStore::parse("keys:\n  - { id: anonymous }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("choose another id"), "{e}");
    }

    #[test]
    fn rejects_mistakes() {
        let d = hexd("x");
        let dup_id = format!("keys:\n  - {{ id: a, key_sha256: {d} }}\n  - {{ id: a }}\n");
        assert!(KeyStore::parse(&dup_id)
            .unwrap_err()
            .to_string()
            .contains("duplicate id"));
        let dup_hash =
            format!("keys:\n  - {{ id: a, key_sha256: {d} }}\n  - {{ id: b, key_sha256: {d} }}\n");
        assert!(KeyStore::parse(&dup_hash)
            .unwrap_err()
            .to_string()
            .contains("appears twice"));
        let e = KeyStore::parse("keys:\n  - { id: a, max_usd: -5 }\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("keys[0].max_usd"), "{e}");
        let dup_subject = "keys:\n  - { id: a, mtls_subject: svc.internal }\n  - { id: admin, mtls_subject: svc.internal, scopes: [admin] }\n";
        let e = KeyStore::parse(dup_subject).unwrap_err().to_string();
        assert!(e.starts_with("keys[1].mtls_subject"), "{e}");
        let unknown = "keys:\n  - { id: a, key: plain }\n";
        assert!(KeyStore::parse(unknown)
            .unwrap_err()
            .to_string()
            .contains("unknown field `key`"));
        let bad_hex = "keys:\n  - { id: a, key_sha256: abc }\n";
        assert!(KeyStore::parse(bad_hex)
            .unwrap_err()
            .to_string()
            .contains("64 hex"));
        let bad_date = format!("keys:\n  - {{ id: a, key_sha256: {d}, expires: soon }}\n");
        assert!(KeyStore::parse(&bad_date)
            .unwrap_err()
            .to_string()
            .contains("keys[0].expires"));
        // Overrides are typed when the file is read: a typo fails `check`, not a request.
        for (field, value) in [("rate", "10/fortnight"), ("period", "1y")] {
            let bad = format!("keys:\n  - {{ id: a, key_sha256: {d}, {field}: {value} }}\n");
            let e = KeyStore::parse(&bad).unwrap_err().to_string();
            assert!(
                e.contains("keys[0]") && e.contains(value) && e.contains("unknown period"),
                "{e}"
            );
        }
    }
}
