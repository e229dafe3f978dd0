use http::{HeaderName, HeaderValue, StatusCode};

/// A filter's "no": rendered to the client as JSON in the route's shape ([`ErrorShape`]) with
/// `status`.
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

    /// The JSON body sent to the client, in the shape of the route asked (see [`ErrorShape`]).
    pub fn body(&self, shape: ErrorShape) -> String {
        error_json(shape, self.status, self.code, &self.message)
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

/// Which error body a client of a path understands: Ollama's clients read `error` as a
/// string, OpenAI's SDKs read an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    /// `{"error":{"message":…,"type":…,"code":…}}`
    OpenAi,
    /// `{"error":"message","code":…}`
    Ollama,
}

impl ErrorShape {
    /// Ollama's routes (`/api/…`) get Ollama's shape, everything else OpenAI's.
    pub fn for_path(path: &str) -> ErrorShape {
        if path.starts_with("/api/") {
            ErrorShape::Ollama
        } else {
            ErrorShape::OpenAi
        }
    }
}

/// Longest piece of client input an error message repeats.
pub const ECHO_LIMIT: usize = 100;

/// Client input as an error message may quote it: at most [`ECHO_LIMIT`] characters, then `…`.
pub fn echo(input: &str) -> std::borrow::Cow<'_, str> {
    match input.char_indices().nth(ECHO_LIMIT) {
        None => std::borrow::Cow::Borrowed(input),
        Some((at, _)) => std::borrow::Cow::Owned(format!("{}…", &input[..at])),
    }
}

/// Renders an error body in `shape`.
pub fn error_json(shape: ErrorShape, status: StatusCode, code: &str, message: &str) -> String {
    match shape {
        ErrorShape::OpenAi => serde_json::json!({
            "error": { "message": message, "type": error_type(status), "code": code }
        }),
        ErrorShape::Ollama => serde_json::json!({ "error": message, "code": code }),
    }
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
        let v: serde_json::Value = serde_json::from_str(&r.body(ErrorShape::OpenAi)).unwrap();
        assert_eq!(v["error"]["message"], "slow \"down\"");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        let v: serde_json::Value = serde_json::from_str(&r.body(ErrorShape::Ollama)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": "slow \"down\"", "code": "rate_limit_exceeded"})
        );
    }

    #[test]
    fn echoes_are_cut() {
        assert_eq!(echo("short"), "short");
        let long = "é".repeat(1_000_000);
        let cut = echo(&long);
        assert_eq!(cut.chars().count(), ECHO_LIMIT + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(ErrorShape::for_path("/api/chat"), ErrorShape::Ollama);
        assert_eq!(ErrorShape::for_path("/v1/models"), ErrorShape::OpenAi);
    }
}
