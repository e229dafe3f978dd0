//! The base models a legacy Modelfile (`/api/create`'s `modelfile` field) names, read the
//! way Ollama's parser (`parser.ParseFile`) reads them, so the allow-list judges the name
//! Ollama will use rather than the one a line-by-line reading finds.
//!
//! What that parser does that a line reader would not:
//! - A command starts at the first character of a line that is not a space, a tab or a line
//!   end (`\r` as well as `\n`), whatever it is: a character it does not print (a byte-order
//!   mark, a zero-width space, a control character) starts the command and is dropped.
//! - An argument ends at a line end only when it is whole: an open quote (`"` or `"""`) goes on
//!   over the following lines, line ends included, until a line ends with the closing quote.
//!   So `FROM """` on one line and the name on the next is a FROM of that name (with the line
//!   ends inside it), and a line in such an argument is not a command.
//! - Characters it does not print are dropped from what it keeps, except the line ends and
//!   spaces inside an argument that goes on.
//!
//! Every FROM argument is named as that parser keeps it, and also trimmed, without anything
//! but printable ASCII, and with every character kept, where those differ: Go's idea of a
//! printable character is only approximated here, and a name too many is refused, not let
//! through. A Modelfile that parser refuses (an unknown command, an unclosed quote) creates
//! nothing; the FROM arguments read before the fault are still named.

#[derive(Clone, Copy, PartialEq)]
enum State {
    /// Between commands.
    Nil,
    /// Reading the command's name.
    Name,
    /// Reading its argument.
    Value,
    /// `PARAMETER`'s name.
    Parameter,
    /// `MESSAGE`'s role.
    Message,
    /// A `#` line.
    Comment,
}

const COMMANDS: [&str; 11] = [
    "from",
    "license",
    "template",
    "system",
    "adapter",
    "draft",
    "renderer",
    "parser",
    "parameter",
    "message",
    "requires",
];

fn is_space(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn is_newline(c: char) -> bool {
    c == '\r' || c == '\n'
}

/// Go's `strconv.IsPrint`, approximated: letters, marks, numbers, punctuation, symbols and the
/// ASCII space; not controls, other spaces, format characters or private use.
fn printable(c: char) -> bool {
    c == ' '
        || !(c.is_control()
            || c.is_whitespace()
            || matches!(c,
                '\u{00AD}' | '\u{0600}'..='\u{0605}' | '\u{061C}' | '\u{06DD}' | '\u{070F}'
                | '\u{0890}'..='\u{0891}' | '\u{08E2}' | '\u{180E}' | '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}'
                | '\u{FFF0}'..='\u{FFFB}' | '\u{E000}'..='\u{F8FF}' | '\u{110BD}' | '\u{110CD}'
                | '\u{13430}'..='\u{1343F}' | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}' | '\u{F0000}'..='\u{10FFFF}'))
}

/// Ollama's `unquote`: `"""…"""` or `"…"` without its quotes; `None` while a quote is open.
fn unquote(s: &str) -> Option<&str> {
    if s.starts_with("\"\"\"") {
        return (s.len() >= 6 && s.ends_with("\"\"\"")).then(|| &s[3..s.len() - 3]);
    }
    if s.starts_with('"') {
        return (s.len() >= 2 && s.ends_with('"')).then(|| &s[1..s.len() - 1]);
    }
    Some(s)
}

/// One FROM argument, as kept (`kept`) and with every character (`all`), in its forms.
fn name(kept: &str, all: &str, names: &mut Vec<String>) {
    let Some(exact) = unquote(kept.trim()) else {
        return;
    };
    let ascii: String = all
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .collect();
    let forms = [
        Some(exact),
        Some(exact.trim()),
        unquote(ascii.trim()),
        unquote(all.trim()),
    ];
    for form in forms.into_iter().flatten() {
        if !names.iter().any(|n| n == form) {
            names.push(form.to_string());
        }
    }
}

/// What a Modelfile names: its FROM commands' base models (see the module's comment), and
/// whether it has an `ADAPTER` or a `DRAFT` (weights by digest or path, which no name
/// judges).
#[derive(Debug, Default, PartialEq)]
pub struct Named {
    pub bases: Vec<String>,
    pub adapter: bool,
}

/// What `modelfile` names.
pub fn read(modelfile: &str) -> Named {
    // Ollama's reader drops a byte-order mark at the start.
    let text = modelfile.strip_prefix('\u{feff}').unwrap_or(modelfile);
    let mut names = Named::default();
    let mut state = State::Nil;
    // What the parser keeps of the current token, and the same with every character.
    let (mut kept, mut all) = (String::new(), String::new());
    let mut from = false;
    for c in text.chars() {
        // The next state and the character it goes on with (none: dropped).
        let (mut next, carried) = match state {
            State::Nil if c == '#' => (State::Comment, None),
            State::Nil if is_space(c) || is_newline(c) => (State::Nil, None),
            State::Nil => (State::Name, Some(c)),
            State::Name if c.is_ascii_alphabetic() => (State::Name, Some(c)),
            State::Name if is_space(c) => (State::Value, None),
            State::Value if is_space(c) || is_newline(c) => (State::Nil, Some(c)),
            State::Value => (State::Value, Some(c)),
            State::Parameter if c.is_ascii_alphanumeric() || c == '_' => {
                (State::Parameter, Some(c))
            }
            State::Message if c.is_ascii_alphabetic() => (State::Message, Some(c)),
            State::Parameter | State::Message if is_space(c) => (State::Value, None),
            State::Comment if is_newline(c) => (State::Nil, None),
            State::Comment => (State::Comment, None),
            // Ollama refuses the Modelfile here.
            State::Name | State::Parameter | State::Message => return names,
        };
        if next != state {
            match state {
                State::Name => {
                    let command = kept.to_ascii_lowercase();
                    if !COMMANDS.contains(&command.as_str()) {
                        return names;
                    }
                    from = command == "from";
                    names.adapter |= matches!(command.as_str(), "adapter" | "draft");
                    next = match command.as_str() {
                        "parameter" => State::Parameter,
                        "message" => State::Message,
                        _ => next,
                    };
                }
                State::Value => {
                    // A space, or a line end inside an open quote, belongs to the argument.
                    if unquote(kept.trim()).is_none() || is_space(c) {
                        kept.push(c);
                        all.push(c);
                        continue;
                    }
                    if from {
                        name(&kept, &all, &mut names.bases);
                    }
                }
                State::Nil | State::Parameter | State::Message | State::Comment => {}
            }
            kept.clear();
            all.clear();
            state = next;
        }
        if let Some(c) = carried {
            if printable(c) {
                kept.push(c);
            }
            all.push(c);
        }
    }
    if state == State::Value && from {
        name(&kept, &all, &mut names.bases);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::{read, Named};

    fn bases(modelfile: &str) -> Vec<String> {
        read(modelfile).bases
    }

    #[test]
    fn a_from_line_is_read_as_ollama_reads_it() {
        for modelfile in [
            "FROM qwen2.5:7b",
            "SYSTEM x\rFROM qwen2.5:7b",
            "\u{feff}FROM qwen2.5:7b",
            "SYSTEM x\r\n\tfrom\tqwen2.5:7b\r\n",
            "FROM \"qwen2.5:7b\"",
            "FROM \"\"\"qwen2.5:7b\"\"\"  ",
            "FROM qwen2.5:7b   \n",
            "# FROM llama3\nFROM qwen2.5:7b",
            "PARAMETER num_ctx 4096\nMESSAGE user \"hi\"\nFROM qwen2.5:7b",
            // A first character Ollama does not print still starts the command.
            "\u{200b}FROM qwen2.5:7b",
            "SYSTEM x\n\u{1}from qwen2.5:7b",
        ] {
            assert_eq!(bases(modelfile), ["qwen2.5:7b"], "{modelfile:?}");
        }
    }

    /// Attacker review: a quote left open on the FROM line goes on over the next lines, so
    /// the name Ollama reads is on a line of its own; the name is judged with and without
    /// the line ends it carries.
    #[test]
    fn a_name_inside_a_quote_over_several_lines_is_judged() {
        assert_eq!(
            bases("FROM \"\"\"\nqwen2.5:7b\n\"\"\""),
            ["\nqwen2.5:7b\n", "qwen2.5:7b"]
        );
        assert_eq!(
            bases("FROM \"gpt-oss:120b-cloud\r\n\"\nSYSTEM hi"),
            ["gpt-oss:120b-cloud\r\n", "gpt-oss:120b-cloud"]
        );
        // A line inside another command's open quote is not a command: Ollama creates
        // from the FROM after it.
        assert_eq!(
            bases("SYSTEM \"\"\"\nFROM llama3.1:8b\n\"\"\"\nFROM qwen2.5:7b"),
            ["qwen2.5:7b"]
        );
    }

    #[test]
    fn what_ollama_does_not_print_is_dropped_and_judged_kept() {
        assert_eq!(
            bases("FROM gpt-oss:120b-clo\u{200b}ud"),
            ["gpt-oss:120b-cloud", "gpt-oss:120b-clo\u{200b}ud"]
        );
        // Spaces go on inside the argument: the name is the rest of the line.
        assert_eq!(bases("FROM a b\n"), ["a b"]);
    }

    #[test]
    fn a_modelfile_ollama_refuses_names_what_came_before() {
        assert_eq!(bases("FROM a\nBOGUS b\nFROM c"), ["a"]);
        assert_eq!(bases("FROM\nqwen2.5:7b"), Vec::<String>::new());
        assert!(bases("FROM \"open").is_empty());
    }

    /// Attacker review: an adapter's weights (by digest or path) cannot be judged by name.
    #[test]
    fn an_adapter_is_noticed() {
        assert_eq!(
            read("FROM llama3.1:8b\nadapter @sha256:abc"),
            Named {
                bases: vec!["llama3.1:8b".into()],
                adapter: true
            }
        );
        assert!(!read("FROM llama3.1:8b\nSYSTEM \"\"\"\nADAPTER x\n\"\"\"").adapter);
        assert!(read("FROM llama3.1:8b\nDRAFT /models/other.gguf").adapter);
    }
}
