use serde::de::DeserializeOwned;

/// A filter's options could not be read; `path` is the YAML path inside the filter's entry.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct OptionsError {
    pub path: String,
    pub message: String,
}

impl OptionsError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        OptionsError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Deserializes a filter's options into its typed struct, keeping the path of a bad field.
/// Option structs should use `#[serde(deny_unknown_fields)]` so typos fail at start.
pub fn parse_options<T: DeserializeOwned>(options: &serde_json::Value) -> Result<T, OptionsError> {
    serde_path_to_error::deserialize(options).map_err(|e| {
        let path = e.path().to_string();
        OptionsError::new(
            if path == "." { String::new() } else { path },
            e.into_inner().to_string(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Opts {
        limits: Limits,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Limits {
        rate: u32,
    }

    #[test]
    fn error_names_the_field() {
        let err = parse_options::<Opts>(&serde_json::json!({"limits": {"rate": "x"}})).unwrap_err();
        assert_eq!(err.path, "limits.rate");
        let err = parse_options::<Opts>(&serde_json::json!({"limits": {"rat": 1}})).unwrap_err();
        assert!(err.message.contains("unknown field `rat`"), "{err}");
    }
}
