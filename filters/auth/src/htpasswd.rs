//! Apache htpasswd files with bcrypt lines (`htpasswd -B`), and the cache of verified
//! credentials that keeps bcrypt off the hot path.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gateway_filter::Principal;
use pingora_memory_cache::MemoryCache;
use subtle::ConstantTimeEq;

use crate::error::{AuthError, Invalid};

/// Whether `hash` is a whole bcrypt hash: a cut or padded one (a stray `:extra`, a line
/// broken by an editor) or one of an impossible cost matches no password.
fn well_formed_bcrypt(hash: &str) -> bool {
    let b = hash.as_bytes();
    b.len() == 60
        && b[6] == b'$'
        && hash
            .get(4..6)
            .and_then(|c| c.parse::<u32>().ok())
            .is_some_and(|c| (4..=31).contains(&c))
        && b[7..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'/'))
}

/// user → bcrypt hash.
#[derive(Debug, Default)]
pub struct Htpasswd {
    users: HashMap<String, String>,
    /// A bcrypt hash of the file's highest cost that no password matches: an unknown user is
    /// checked against it, so it takes as long as a known user with a wrong password (no
    /// user-name oracle).
    decoy: Option<String>,
}

impl Htpasswd {
    pub fn load(path: &Path) -> Result<Htpasswd, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            what: "htpasswd file",
            path: path.to_path_buf(),
            source,
        })?;
        Htpasswd::parse(&text).map_err(|problem| AuthError::Invalid {
            path: path.to_path_buf(),
            problem,
        })
    }

    pub fn parse(text: &str) -> Result<Htpasswd, Invalid> {
        let mut users = HashMap::new();
        // A byte-order mark (an editor's UTF-8 signature) is not part of the first user's name.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, rest) = line
                .split_once(':')
                .ok_or_else(|| Invalid::new(format!("line {}", n + 1), "expected user:hash"))?;
            // `user:hash:comment` (nginx and Apache read only up to the second colon).
            let hash = rest.split(':').next().unwrap_or(rest);
            if !(hash.starts_with("$2y$") || hash.starts_with("$2a$") || hash.starts_with("$2b$")) {
                let kind = if hash.starts_with("$apr1$") {
                    "MD5 (apr1)"
                } else if hash.starts_with("{SHA}") {
                    "SHA-1"
                } else {
                    "crypt or plain text"
                };
                return Err(Invalid::new(
                    format!("line {}", n + 1),
                    format!("user {user:?} has a {kind} hash; only bcrypt is accepted: recreate it with `htpasswd -B` or `llm-gateway hash-password`"),
                ));
            }
            if !well_formed_bcrypt(hash) {
                return Err(Invalid::new(
                    format!("line {}", n + 1),
                    format!("user {user:?} has a damaged bcrypt hash (60 characters: $2y$, a cost from 04 to 31, $, then 53 of ./A-Za-z0-9); no password would ever match it: recreate it with `htpasswd -B` or `llm-gateway hash-password`"),
                ));
            }
            if gateway_filter::reserved_principal_id(user) {
                return Err(Invalid::new(
                    format!("line {}", n + 1),
                    format!("user {}", crate::keys::reserved(user)),
                ));
            }
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(Invalid::new(
                    format!("line {}", n + 1),
                    format!("user {user:?} appears twice"),
                ));
            }
        }
        let costs: Vec<u32> = users
            .values()
            .filter_map(|h| h.get(4..6).and_then(|c| c.parse::<u32>().ok()))
            .collect();
        let cost = costs.iter().copied().max();
        if let (Some(low), Some(high)) = (costs.iter().copied().min(), cost) {
            if low < high {
                let cheaper = costs.iter().filter(|c| **c < high).count();
                log::warn!(
                    "htpasswd: {cheaper} of {} users have bcrypt hashes of a lower cost than {high} (down to {low}): a wrong password for them is answered sooner than for a name that does not exist, which tells an attacker their names; recreate those hashes with cost {high} (`htpasswd -B -C {high}`, or `llm-gateway hash-password`)",
                    costs.len()
                );
            }
        }
        let decoy = cost.and_then(|c| {
            let mut secret = [0u8; 24];
            secret.iter_mut().for_each(|b| *b = fastrand::u8(..));
            bcrypt::hash(secret, c).ok()
        });
        Ok(Htpasswd { users, decoy })
    }

    #[cfg(test)]
    pub fn hash_of(&self, user: &str) -> Option<&str> {
        self.users.get(user).map(String::as_str)
    }

    pub fn has_user(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// The hash to check a password against: the user's, or the decoy for an unknown user
    /// (same cost, never matches). `None` only when the file has no users.
    pub fn hash_or_decoy(&self, user: &str) -> Option<(&str, bool)> {
        match self.users.get(user) {
            Some(h) => Some((h.as_str(), true)),
            None => self.decoy.as_deref().map(|d| (d, false)),
        }
    }

    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }
}

/// A cache entry: the full digest it was stored under, and who it authenticates.
type Verified = (Arc<[u8; 32]>, Arc<Principal>);

/// Credentials bcrypt already accepted, keyed by SHA-256 of `user:password`. The full digest
/// is kept in the entry and compared, so a collision of the cache's 64-bit index can never
/// let another password in.
/// The cache itself is made at the first successful login: its tables (sized for `size`
/// entries up front) cost a few MiB that a gateway without basic auth users never needs.
pub struct VerifiedCache {
    cache: std::sync::OnceLock<MemoryCache<[u8; 32], Verified>>,
    size: usize,
    ttl: Duration,
}

impl VerifiedCache {
    pub fn new(size: usize, ttl: Duration) -> Self {
        VerifiedCache {
            cache: std::sync::OnceLock::new(),
            size,
            ttl,
        }
    }

    pub fn get(&self, digest: &[u8; 32]) -> Option<Arc<Principal>> {
        let (hit, _) = self.cache.get()?.get(digest);
        let (stored, principal) = hit?;
        bool::from(stored.ct_eq(digest)).then_some(principal)
    }

    pub fn put(&self, digest: [u8; 32], principal: Arc<Principal>) {
        self.cache.get_or_init(|| MemoryCache::new(self.size)).put(
            &digest,
            (Arc::new(digest), principal),
            Some(self.ttl),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_bcrypt_only() {
        let h = bcrypt::hash("pw", 4).unwrap();
        let f = Htpasswd::parse(&format!("# comment\nalice:{h}\n")).unwrap();
        assert!(bcrypt::verify("pw", f.hash_of("alice").unwrap()).unwrap());
        let e = Htpasswd::parse("bob:$apr1$abc$def\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("MD5 (apr1)") && e.contains("htpasswd -B"), "{e}");
        assert!(Htpasswd::parse("bob:{SHA}xyz\n")
            .unwrap_err()
            .to_string()
            .contains("SHA-1"));
        assert!(Htpasswd::parse("nocolon\n")
            .unwrap_err()
            .to_string()
            .contains("line 1"));
        // Damaged hashes match nothing: refused, naming the line (operator review).
        let cut = &h[..40];
        let costly = format!("$2y$99${}", &h[7..]);
        for bad in ["$2y$10$short".to_string(), cut.to_string(), costly] {
            let e = Htpasswd::parse(&format!("alice:{h}\nbob:{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("line 2") && e.contains("damaged bcrypt hash"),
                "{bad}: {e}"
            );
        }
        // A comment after a second colon, as nginx and Apache read it.
        let f = Htpasswd::parse(&format!("alice:{h}:Alice Example\n")).unwrap();
        assert!(bcrypt::verify("pw", f.hash_of("alice").unwrap()).unwrap());
        // An editor's byte-order mark is not part of the first name.
        let f = Htpasswd::parse(&format!("\u{feff}alice:{h}\n")).unwrap();
        assert!(f.hash_of("alice").is_some());
        // Users named like the gateway's own accounts would share them.
        for user in ["anonymous", "*", ""] {
            let e = Htpasswd::parse(&format!("alice:{h}\n{user}:{h}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("line 2") && e.contains("choose another"),
                "{e}"
            );
        }
    }

    #[test]
    fn cache_checks_the_full_digest() {
        let c = VerifiedCache::new(16, Duration::from_secs(60));
        let p = Arc::new(Principal {
            id: "a".into(),
            ..Default::default()
        });
        let d = [7u8; 32];
        c.put(d, p.clone());
        assert_eq!(c.get(&d).unwrap().id, "a");
        assert!(c.get(&[8u8; 32]).is_none());
    }
}
