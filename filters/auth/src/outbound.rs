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
