//! `docs/prometheus/alerts.yaml`: valid rules (promtool check rules), and each alert fires on
//! the series it is written for and stays quiet otherwise (promtool test rules).

use std::process::Command;

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/prometheus"))
        .output()
        .expect("promtool is installed (apt-get install prometheus; .ci/run does it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn alert_rules_are_valid_and_fire_as_written() {
    let out = promtool(&["check", "rules", "alerts.yaml"]);
    assert!(out.contains("SUCCESS: 15 rules found"), "{out}");
    promtool(&["test", "rules", "alerts.test.yaml"]);
}

/// Every series an alert reads is one the gateway exports: a renamed metric would otherwise
/// leave an alert that can never fire.
#[test]
fn alerts_read_only_series_the_gateway_exports() {
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/prometheus/alerts.yaml"
    ))
    .unwrap();
    fn read_rs(dir: &std::path::Path, into: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                read_rs(&path, into);
            } else if path.extension().is_some_and(|e| e == "rs") {
                *into += &std::fs::read_to_string(path).unwrap();
            }
        }
    }
    let mut sources = String::new();
    read_rs(
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")),
        &mut sources,
    );
    read_rs(
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../filters")),
        &mut sources,
    );
    let mut named = 0;
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("llm_gateway_") {
            named += 1;
            // A histogram's series carry a suffix its name in the code does not.
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .filter(|b| b.ends_with("_seconds"))
                .unwrap_or(word);
            assert!(
                sources.contains(&format!("\"{base}\"")),
                "{word} is not exported"
            );
        }
    }
    assert!(named >= 10, "{named}");
}
