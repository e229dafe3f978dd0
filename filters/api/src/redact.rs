//! What a URL shows in logs and reports: never its user information (a password, a token
//! written as the user name).

/// `url` with everything between `://` and the last `@` masked; as it is without either.
/// Works on text that is not a valid URL too (a bad port), where a parser would give up.
pub fn without_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_information_is_masked() {
        assert_eq!(
            without_userinfo("redis://:s3cret@10.0.0.5:6379/0"),
            "redis://***@10.0.0.5:6379/0"
        );
        assert_eq!(without_userinfo("https://h:99999/x"), "https://h:99999/x");
    }
}
