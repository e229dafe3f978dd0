//! Reading credentials from request headers. Never from the query string.

use base64::Engine;
use gateway_filter::http::{header, HeaderMap};

#[derive(Debug, PartialEq, Eq)]
pub enum Credential {
    ApiKey(String),
    Basic { user: String, password: String },
}

/// `Authorization: Bearer KEY`, `Authorization: Basic …` or `x-api-key: KEY`.
/// `Err` when a header is present but malformed.
pub fn from_headers(headers: &HeaderMap) -> Result<Option<Credential>, &'static str> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| "malformed")?.trim();
        let (scheme, rest) = v.split_once(' ').ok_or("malformed")?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
            return token(rest).map(|t| Some(Credential::ApiKey(t)));
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|_| "malformed")?;
            let text = String::from_utf8(raw).map_err(|_| "malformed")?;
            let (user, password) = text.split_once(':').ok_or("malformed")?;
            return Ok(Some(Credential::Basic {
                user: user.to_string(),
                password: password.to_string(),
            }));
        }
        return Err("unsupported_scheme");
    }
    if let Some(v) = headers.get("x-api-key") {
        let v = v.to_str().map_err(|_| "malformed")?.trim();
        if v.is_empty() {
            return Err("malformed");
        }
        return token(v).map(|t| Some(Credential::ApiKey(t)));
    }
    Ok(None)
}

/// A key or token as one word: a space or comma inside (`Bearer k1, Bearer k2`, two values
/// joined by a proxy) is two credentials, which a validator asked later could read
/// differently from the keys file.
fn token(v: &str) -> Result<String, &'static str> {
    if v.bytes().any(|b| b == b',' || b.is_ascii_whitespace()) {
        return Err("malformed");
    }
    Ok(v.to_string())
}

/// Whether the request carries more than one credential that differ (two `Authorization`
/// values, or an `x-api-key` that is not the bearer token): only the first is checked
/// locally, so such a request must not be handed to anyone else to decide.
pub fn ambiguous(headers: &HeaderMap) -> bool {
    let bearer = |v: &str| {
        let v = v.trim();
        match v.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => {
                rest.trim().to_string()
            }
            _ => v.to_string(),
        }
    };
    let mut seen = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .chain(headers.get_all("x-api-key").iter())
        .map(|v| bearer(&String::from_utf8_lossy(v.as_bytes())));
    let Some(first) = seen.next() else {
        return false;
    };
    seen.any(|other| other != first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &'static str, v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(name, v.parse().unwrap());
        m
    }

    #[test]
    fn joined_credentials_are_malformed() {
        for v in [
            "Bearer k1, Bearer k2",
            "Bearer k1,k2",
            "Bearer k1 k2",
            "Bearer k1\tk2",
        ] {
            assert_eq!(
                from_headers(&h("authorization", v)),
                Err("malformed"),
                "{v}"
            );
        }
        assert_eq!(from_headers(&h("x-api-key", "k1, k2")), Err("malformed"));
        assert_eq!(
            from_headers(&h("authorization", "Bearer  sk-gw_abc.def~+/=")),
            Ok(Some(Credential::ApiKey("sk-gw_abc.def~+/=".into())))
        );
    }

    #[test]
    fn reads_each_form() {
        assert_eq!(
            from_headers(&h("authorization", "Bearer sk-1")),
            Ok(Some(Credential::ApiKey("sk-1".into())))
        );
        assert_eq!(
            from_headers(&h("authorization", "bearer  sk-1 ")),
            Ok(Some(Credential::ApiKey("sk-1".into())))
        );
        assert_eq!(
            from_headers(&h("x-api-key", "sk-2")),
            Ok(Some(Credential::ApiKey("sk-2".into())))
        );
        assert_eq!(
            from_headers(&h("authorization", "Basic YWxpY2U6cDpx")),
            Ok(Some(Credential::Basic {
                user: "alice".into(),
                password: "p:q".into()
            }))
        );
        assert_eq!(from_headers(&HeaderMap::new()), Ok(None));
        assert_eq!(
            from_headers(&h("authorization", "Digest x")),
            Err("unsupported_scheme")
        );
        assert_eq!(
            from_headers(&h("authorization", "Basic !!!")),
            Err("malformed")
        );
    }
}
