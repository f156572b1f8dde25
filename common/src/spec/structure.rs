//! The spec's structural problems, all of them: unknown sections and keys, values of the wrong
//! type, a missing `data.path`. Deserializing the whole file stops at the first one, so each
//! key is tried on its own, in a spec that is otherwise minimal, and every failure is kept
//! with the key's dotted name.

use toml::{Table, Value};

use super::{JobSpec, SpecProblem};

/// The tables a spec may have.
const SECTIONS: [&str; 6] = ["data", "model", "train", "cluster", "checkpoint", "quality"];

/// The problems of a spec that does not deserialize, or none when `text` is not TOML at all
/// (the parser's own message, with its line and column, says more then) or when no key is
/// wrong on its own.
pub fn problems(text: &str) -> Vec<SpecProblem> {
    let Ok(table) = text.parse::<Table>() else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    let problem = |field: String, message: String| SpecProblem { field, message };
    for (key, value) in &table {
        if key == "version" {
            if let Some(message) = try_alone(None, key, value) {
                problems.push(problem(key.clone(), message));
            }
            continue;
        }
        if !SECTIONS.contains(&key.as_str()) {
            problems.push(problem(
                key.clone(),
                format!(
                    "unknown section or key; expected version or one of [{}]",
                    SECTIONS.join("], ["),
                ),
            ));
            continue;
        }
        let Some(section) = value.as_table() else {
            problems.push(problem(
                key.clone(),
                format!("must be a table ([{key}]), found {}", value.type_str()),
            ));
            continue;
        };
        for (field, value) in section {
            if let Some(message) = try_alone(Some(key), field, value) {
                problems.push(problem(format!("{key}.{field}"), message));
            }
        }
    }
    let has_path = table
        .get("data")
        .and_then(Value::as_table)
        .is_some_and(|data| data.contains_key("path"));
    if !has_path {
        problems.push(problem(
            "data.path".into(),
            "missing: the folder of training images".into(),
        ));
    }
    if !table.contains_key("version") {
        problems.push(problem("version".into(), "missing: write `version = 1` first".into()));
    }
    problems
}

/// Deserializes a minimal spec holding `key = value` (in `[section]`, or at the top), and
/// returns the error's message if that alone fails.
fn try_alone(section: Option<&str>, key: &str, value: &Value) -> Option<String> {
    let mut probe = Table::new();
    probe.insert("version".into(), Value::Integer(1));
    let mut data = Table::new();
    data.insert("path".into(), Value::String("probe".into()));
    probe.insert("data".into(), Value::Table(data));
    match section {
        None => {
            probe.insert(key.into(), value.clone());
        }
        Some(section) => {
            let table = probe
                .entry(section.to_string())
                .or_insert_with(|| Value::Table(Table::new()))
                .as_table_mut()
                .expect("a table was inserted");
            table.insert(key.into(), value.clone());
        }
    }
    Value::Table(probe)
        .try_into::<JobSpec>()
        .err()
        .map(|e| e.message().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> Vec<String> {
        problems(text)
            .into_iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect()
    }

    #[test]
    fn every_wrong_key_is_named_with_what_it_should_be() {
        let found = fields(
            "version = 1\n[data]\npath = 5\ncolour = 1\n[train]\nsteps = \"many\"\nbatch_size = -1\n\
             [model]\nd_filters = [0, -3]\n[trian]\nsteps = 3\n",
        );
        let has = |field: &str, says: &str| found.iter().any(|p| p.starts_with(field) && p.contains(says));
        assert!(has("data.path:", "expected path string"), "{found:#?}");
        assert!(has("data.colour:", "unknown field `colour`"), "{found:#?}");
        assert!(has("train.steps:", "expected u64"), "{found:#?}");
        assert!(has("train.batch_size:", "expected u32"), "{found:#?}");
        assert!(has("model.d_filters:", "expected u32"), "{found:#?}");
        assert!(has("trian:", "unknown section"), "{found:#?}");
        assert_eq!(found.len(), 6, "{found:#?}");
    }

    #[test]
    fn missing_essentials_and_non_tables_are_named() {
        let found = fields("train = 3\n");
        assert!(
            found.iter().any(|p| p.starts_with("train: must be a table")),
            "{found:#?}"
        );
        assert!(found.iter().any(|p| p.starts_with("data.path: missing")), "{found:#?}");
        assert!(found.iter().any(|p| p.starts_with("version: missing")), "{found:#?}");
    }

    #[test]
    fn text_that_is_not_toml_leaves_it_to_the_parser() {
        assert!(problems("[data\npath = 1").is_empty());
    }
}
