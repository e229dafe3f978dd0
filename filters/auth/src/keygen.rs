//! Making keys and password hashes for the CLI (`keys new`, `keys hash`, `hash-password`).

use crate::keys::sha256;

pub const KEY_PREFIX: &str = "sk-gw-";

/// A fresh API key: `sk-gw-` + 256 bits from the OS's CSPRNG, hex.
pub fn new_key() -> Result<String, crate::AuthError> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| crate::AuthError::Random(e.to_string()))?;
    Ok(format!("{KEY_PREFIX}{}", hex::encode(raw)))
}

/// Hex SHA-256 of a key, as the keys file stores it.
pub fn hash_key(key: &str) -> String {
    hex::encode(sha256(key.as_bytes()))
}

/// The YAML entry to paste into the keys file.
pub fn key_entry(id: &str, name: Option<&str>, key: &str) -> String {
    let mut s = format!("  - id: {}\n", yaml_str(id));
    if let Some(n) = name {
        s += &format!("    name: {}\n", yaml_str(n));
    }
    s += &format!("    key_sha256: {}\n", hash_key(key));
    s
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

/// A bcrypt hash in the `$2y$` form `htpasswd -B` writes.
pub fn hash_password(password: &str, cost: u32) -> Result<String, crate::AuthError> {
    let parts = bcrypt::hash_with_result(password, cost)?;
    Ok(parts.format_for_version(bcrypt::Version::TwoY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fresh_and_hash_like_the_store() {
        let a = new_key().unwrap();
        let b = new_key().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("sk-gw-") && a.len() == 6 + 64);
        let entry = key_entry("alice", Some("Alice A."), &a);
        let store = crate::keys::KeyStore::parse(&format!("keys:\n{entry}")).unwrap();
        assert_eq!(
            store
                .by_key_digest(&sha256(a.as_bytes()))
                .unwrap()
                .principal
                .name,
            "Alice A."
        );
    }

    #[test]
    fn password_hash_is_htpasswd_bcrypt() {
        let h = hash_password("pw", 4).unwrap();
        assert!(h.starts_with("$2y$04$"));
        assert!(bcrypt::verify("pw", &h).unwrap());
        crate::htpasswd::Htpasswd::parse(&format!("u:{h}\n")).unwrap();
    }
}
