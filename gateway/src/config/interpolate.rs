//! `${VAR}` interpolation inside string values of the parsed YAML tree.
//!
//! Working on parsed strings (not on the raw text) means a secret containing `:` or `#`
//! can never change the structure of the document. `$${` writes a literal `${`.

use serde_norway::Value;

/// Replaces `${VAR}` in every string of `value`; `lookup` returns the variable's value.
/// On a missing or malformed reference returns `(yaml_path, message)`.
pub fn interpolate(
    value: &mut Value,
    path: &mut String,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    match value {
        Value::String(s) if s.contains('$') => {
            *s = expand(s, lookup).map_err(|m| (path.clone(), m))?;
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                interpolate(item, path, lookup)?;
                path.truncate(len);
            }
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k.as_str().unwrap_or("?"));
                interpolate(v, path, lookup)?;
                path.truncate(len);
            }
        }
        Value::Tagged(t) => interpolate(&mut t.value, path, lookup)?,
        _ => {}
    }
    Ok(())
}

fn expand(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {s:?}"))?;
            let name = &tail[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid variable name {name:?} in {s:?}"));
            }
            let val = lookup(name).ok_or_else(|| {
                format!("environment variable {name} is not set; export it or remove ${{{name}}} from the file")
            })?;
            out.push_str(&val);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "KEY").then(|| "s3cr#t: x".to_string())
    }

    #[test]
    fn expands_and_escapes() {
        assert_eq!(expand("a${KEY}b", &env).unwrap(), "as3cr#t: xb");
        assert_eq!(expand("$${KEY} $5", &env).unwrap(), "${KEY} $5");
        assert!(expand("${NOPE}", &env)
            .unwrap_err()
            .contains("NOPE is not set"));
        assert!(expand("${KEY", &env).is_err());
    }

    #[test]
    fn reports_the_yaml_path() {
        let mut v: Value = serde_norway::from_str("a:\n  b:\n    - x\n    - ${NOPE}\n").unwrap();
        let err = interpolate(&mut v, &mut String::new(), &env).unwrap_err();
        assert_eq!(err.0, "a.b[1]");
    }
}
