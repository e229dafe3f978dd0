//! What a URL shows in logs and reports: never its user information (a password, a token
//! written as the user name) nor its query (`?pass=` of a Unix-socket Redis URL, a token).

/// `url` with everything between `://` and the last `@` masked, and its query masked whole;
/// as it is without either. Works on text that is not a valid URL too (a bad port), where a
/// parser would give up.
pub fn without_secrets(url: &str) -> String {
    let (url, query) = match url.find('?') {
        Some(q) => (&url[..q], "?***"),
        None => (url, ""),
    };
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}{query}", &url[..s + 3], &url[at..]),
        _ => format!("{url}{query}"),
    }
}

/// Longest client-chosen text (a path, a model name, a user agent, a token's subject) an
/// audit line, a trace or a log line carries: anyone can send long ones with every refused
/// request (an HTTP/2 client resends a 4 KiB header in a few bytes), and what the gateway
/// records must not be the amplifier.
pub const MAX_SHOWN: usize = 512;

/// `s` cut to [`MAX_SHOWN`] bytes, at a character boundary.
pub fn clip(s: &str) -> &str {
    &s[..s.floor_char_boundary(MAX_SHOWN)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_information_and_query_are_masked() {
        assert_eq!(
            without_secrets("redis://:s3cret@10.0.0.5:6379/0"),
            "redis://***@10.0.0.5:6379/0"
        );
        assert_eq!(
            without_secrets("unix:///run/redis.sock?db=1&pass=s3cret"),
            "unix:///run/redis.sock?***"
        );
        assert_eq!(
            without_secrets("https://u:p@h:99999/x?token=t@x"),
            "https://***@h:99999/x?***"
        );
        assert_eq!(without_secrets("https://h:99999/x"), "https://h:99999/x");
    }
}
