//! The HTTP client the filter uses to ask others (a forward-auth validator, a JWKS).

use std::path::Path;
use std::time::Duration;

use gateway_filter::OptionsError;

/// A client with `timeout` on connecting and on the whole exchange, no redirects, no proxy
/// from the environment, and, with `ca_file`, that CA trusted besides the public roots.
/// `pooled: false` keeps no idle connections (for a client first used on a short-lived
/// runtime). `key` names the option in errors (`forward`, `jwt`).
pub fn client(
    key: &str,
    timeout: Duration,
    ca_file: Option<&Path>,
    pooled: bool,
) -> Result<reqwest::Client, OptionsError> {
    if timeout.is_zero() {
        return Err(OptionsError::new(
            format!("{key}.timeout"),
            "must be greater than 0: every call would fail at once (a few seconds, such as 5s)",
        ));
    }
    let mut b = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    if !pooled {
        b = b.pool_max_idle_per_host(0);
    }
    if let Some(path) = ca_file {
        let ca_key = format!("{key}.ca_file");
        let pem = std::fs::read(path)
            .map_err(|e| OptionsError::new(ca_key.as_str(), format!("{}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            OptionsError::new(
                ca_key.as_str(),
                format!("{}: not PEM certificates ({e})", path.display()),
            )
        })?;
        if certs.is_empty() {
            return Err(OptionsError::new(
                ca_key.as_str(),
                format!("{}: no certificate in the file", path.display()),
            ));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build().map_err(|e| OptionsError::new(key, e.to_string()))
}

/// A URL as logs and reports show it: a password and a query (where a token may travel) are
/// masked. What cannot be read as a URL is shown as it is.
pub fn shown(url: &str) -> String {
    let Ok(mut u) = reqwest::Url::parse(url) else {
        // Not a URL (a bad port, say): what may be user information, and a query, are
        // masked whole.
        return gateway_filter::redact::without_secrets(url);
    };
    if !u.username().is_empty() && u.password().is_none() {
        // A token may travel as the user name alone.
        let _ = u.set_username("***");
    }
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    if u.query().is_some() {
        u.set_query(Some("***"));
    }
    u.to_string()
}

/// A client error without the URL it names (the URL may carry a password): the caller names
/// the URL, [`shown`].
pub fn error_text(e: reqwest::Error) -> String {
    e.without_url().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_queries_are_masked() {
        assert_eq!(
            shown("https://gw:s3cret@validator.internal/check?token=abc"),
            "https://gw:***@validator.internal/check?***"
        );
        assert_eq!(
            shown("https://idp.example/.well-known/jwks.json"),
            "https://idp.example/.well-known/jwks.json"
        );
        assert_eq!(
            shown("https://t0ken@validator.internal/check"),
            "https://***@validator.internal/check"
        );
        assert_eq!(
            shown("https://gw:s3cret@validator.internal:99999/check?token=abc"),
            "https://***@validator.internal:99999/check?***"
        );
    }
}
