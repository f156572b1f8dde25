//! The forger invocations in a shell script (the Slurm example), as containers whose
//! arguments the checks can read.
//!
//! This is not a shell parser: it reads the plain style the scripts under `deploy/` keep to.
//! Commands are split into words by whitespace outside quotes, continued lines are joined,
//! and a Bash array expanded in a command (`"${extra[@]}"`) contributes every word its
//! assignments (`extra=(...)`, `extra+=(...)`) hold, so flags added conditionally are
//! checked too. `FORGER_*` variables exported or set before the command count as its
//! environment.

use std::collections::BTreeMap;

use crate::manifest_check::{Binary, Container, Location};

/// Words that end a simple command.
const OPERATORS: [&str; 6] = ["&", "&&", "||", "|", ";", ")"];

/// Every command in `text` that runs forger-coordinator or forger-worker.
pub fn invocations(file: &str, text: &str) -> Vec<Container> {
    let lines = logical_lines(text);
    let mut arrays: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut exported = BTreeMap::new();
    for (_, words) in &lines {
        collect_arrays(words, &mut arrays);
        if words.first().map(String::as_str) == Some("export") {
            for word in &words[1..] {
                if let Some((name, value)) = forger_assignment(word) {
                    exported.insert(name, Some(value));
                }
            }
        }
    }
    let mut found = Vec::new();
    for (line, words) in &lines {
        for (i, word) in words.iter().enumerate() {
            let Some(binary) = Binary::named(word) else {
                continue;
            };
            let at = Location::new(file, &format!("{} at line {line}", binary.name()), "");
            let mut container = Container::new(at, binary);
            container.env = exported.clone();
            for before in words[..i].iter().rev() {
                if OPERATORS.contains(&before.as_str()) {
                    break;
                }
                if let Some((name, value)) = forger_assignment(before) {
                    container.env.insert(name, Some(value));
                }
            }
            for arg in words[i + 1..].iter().take_while(|w| !OPERATORS.contains(&w.as_str())) {
                match array_expansion(arg) {
                    Some(name) => container.args.extend(arrays.get(name).into_iter().flatten().cloned()),
                    None => container.args.push(arg.clone()),
                }
            }
            found.push(container);
        }
    }
    found
}

/// The script's commands as words, each with the line it starts on; comments dropped.
fn logical_lines(text: &str) -> Vec<(usize, Vec<String>)> {
    let mut lines = Vec::new();
    let mut pending = String::new();
    let mut start = 0;
    for (n, line) in text.lines().enumerate() {
        if pending.is_empty() {
            start = n + 1;
        }
        let line = line.trim_end();
        if let Some(continued) = line.strip_suffix('\\') {
            pending.push_str(continued);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let words = words(&pending);
        if !words.is_empty() {
            lines.push((start, words));
        }
        pending.clear();
    }
    lines
}

/// Splits a line into words outside quotes, removing the quotes; `#` starting a word
/// outside quotes begins a comment. A trailing `;` or `&` becomes its own word.
pub(super) fn words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '#') if !in_word => break,
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    let mut split = Vec::new();
    for word in words {
        match word.strip_suffix(';').or_else(|| word.strip_suffix('&')) {
            Some(rest) if !rest.is_empty() && !rest.ends_with(['&', ';']) => {
                split.push(rest.to_string());
                split.push(word[rest.len()..].to_string());
            }
            _ => split.push(word),
        }
    }
    split
}

/// Records `name=(words...)` and `name+=(words...)` assignments.
fn collect_arrays(words: &[String], arrays: &mut BTreeMap<String, Vec<String>>) {
    let mut i = 0;
    while i < words.len() {
        let Some((name, first)) = words[i].split_once("=(") else {
            i += 1;
            continue;
        };
        let name = name.trim_end_matches('+').to_string();
        let entry = arrays.entry(name).or_default();
        let mut word = first.to_string();
        loop {
            let last = word.ends_with(')');
            let value = word.trim_end_matches(')');
            if !value.is_empty() {
                entry.push(value.to_string());
            }
            i += 1;
            if last || i >= words.len() {
                break;
            }
            word = words[i].clone();
        }
    }
}

/// `${name[@]}` -> `name`.
fn array_expansion(word: &str) -> Option<&str> {
    word.strip_prefix("${")?.strip_suffix("[@]}")
}

/// `FORGER_X=value` -> (`FORGER_X`, `value`).
fn forger_assignment(word: &str) -> Option<(String, String)> {
    let (name, value) = word.split_once('=')?;
    (name.starts_with("FORGER_") && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .then(|| (name.to_string(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = r#"#!/usr/bin/env bash
# forger-worker --not-this one: a comment
export FORGER_THREADS=4
extra=()
if true; then
    extra+=(--resume)
fi
srun --nodes=1 --overlap \
    "$BIN/forger-coordinator" --spec "$SPEC" --out "$RUN" "${extra[@]}" &
echo "forger-worker is started next"
FORGER_PATIENCE_SECS=9 srun "$BIN/forger-worker" --coordinator "http://$HEAD:1" || status=$?
"#;

    #[test]
    fn finds_each_invocation_with_its_arguments_and_environment() {
        let found = invocations("x.sh", SCRIPT);
        assert_eq!(found.len(), 2, "{found:?}");
        let coordinator = &found[0];
        assert_eq!(coordinator.binary, Binary::Coordinator);
        assert_eq!(coordinator.at.object, "forger-coordinator at line 8");
        assert_eq!(coordinator.args, ["--spec", "$SPEC", "--out", "$RUN", "--resume"]);
        let worker = &found[1];
        assert_eq!(worker.args, ["--coordinator", "http://$HEAD:1"]);
        assert_eq!(worker.env.get("FORGER_PATIENCE_SECS"), Some(&Some("9".to_string())));
        assert_eq!(worker.env.get("FORGER_THREADS"), Some(&Some("4".to_string())));
    }

    #[test]
    fn quotes_and_comments_split_as_the_shell_does() {
        assert_eq!(words(r#"a "b c" 'd' e# f # g"#), ["a", "b c", "d", "e#", "f"]);
        assert_eq!(words("run x;"), ["run", "x", ";"]);
    }
}
