use http::{HeaderName, HeaderValue, StatusCode};

/// A filter's "no": rendered to the client as OpenAI's error JSON with `status`.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub status: StatusCode,
    /// Machine-readable code, e.g. `invalid_api_key`, `rate_limit_exceeded`.
    pub code: &'static str,
    /// Human-readable; must not contain secrets.
    pub message: String,
    /// Extra response headers such as `Retry-After` or `WWW-Authenticate`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Rejection {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Rejection {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The JSON body sent to the client.
    pub fn body(&self) -> String {
        error_json(self.status, self.code, &self.message)
    }
}

/// OpenAI's error type for a status, so SDKs raise the matching exception class.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

/// Renders `{"error":{"message":…,"type":…,"code":…}}`, OpenAI's error shape.
pub fn error_json(status: StatusCode, code: &str, message: &str) -> String {
    serde_json::json!({
        "error": { "message": message, "type": error_type(status), "code": code }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openai_error_shape() {
        let r = Rejection::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "slow \"down\"",
        );
        let v: serde_json::Value = serde_json::from_str(&r.body()).unwrap();
        assert_eq!(v["error"]["message"], "slow \"down\"");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    }
}
