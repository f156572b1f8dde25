//! A compose project read as Compose reads it: each file alone first, then the files merged
//! in order, and for every value the file that set it.
//!
//! Alone, a file has its `*aliases` resolved (yaml-rust2 does that) and its `<<` merge keys
//! (yaml-rust2 does not: they arrive as a key named `<<`), then its `${VAR}` references
//! expanded. Those take their defaults and never this machine's environment, so the checks
//! read what a fresh checkout runs. Later files then override earlier ones: mappings are
//! merged key by key (a service's `environment` in either of its forms) and anything else,
//! lists included, is replaced. Compose itself appends to a few lists (`ports`, and `volumes`
//! by target path); the overrides under `deploy/` set neither, and one that did would hide
//! the base file's entries from these checks.

use std::path::{Component, Path, PathBuf};

use yaml_rust2::yaml::Hash;
use yaml_rust2::{Yaml, YamlLoader};

use crate::manifest_check::{Location, Problem};

/// How a service is named as the object of a problem.
const SERVICE_PREFIX: &str = "services.";

/// A service's object name in problems: `services.worker-1`, as the file spells its path.
pub fn object(service: &str) -> String {
    format!("{SERVICE_PREFIX}{service}")
}

/// The files of a compose project, each as Compose reads it alone, and their merge.
#[derive(Debug, Clone)]
pub struct Project {
    /// (file relative to the repository root, its YAML), in the order Compose reads them.
    layers: Vec<(String, Yaml)>,
    merged: Yaml,
}

impl Project {
    /// Reads `files` as `docker compose -f FIRST -f SECOND ...` would: each as (path
    /// relative to the repository root, text), the first being the project's main file.
    pub fn load(files: &[(String, String)]) -> Result<Project, Problem> {
        let mut layers = Vec::new();
        for (file, text) in files {
            layers.push((file.clone(), read_layer(file, text)?));
        }
        let merged = layers
            .iter()
            .map(|(_, yaml)| yaml.clone())
            .reduce(merge)
            .ok_or_else(|| Problem::new(Location::new("(no file)", "(project)", ""), "no compose file"))?;
        Ok(Project { layers, merged })
    }

    /// The main file: where problems about the project as a whole are reported.
    pub fn main_file(&self) -> &str {
        &self.layers[0].0
    }

    /// The folder relative host paths are resolved against: the main file's, as Compose does.
    pub fn dir(&self) -> &Path {
        Path::new(self.main_file()).parent().unwrap_or(Path::new(""))
    }

    /// The file a relative host path names (`./faces-small.toml` in `deploy/`), relative to
    /// the repository root: Compose resolves it against the project folder.
    pub fn host_path(&self, source: &str) -> PathBuf {
        let mut out = PathBuf::new();
        for part in self.dir().join(source).components() {
            match part {
                Component::CurDir => {}
                Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                    out.pop();
                }
                other => out.push(other),
            }
        }
        out
    }

    /// The files merged into one.
    pub fn merged(&self) -> &Yaml {
        &self.merged
    }

    /// The merged services, in the order the files first name them.
    pub fn services(&self) -> Vec<(&str, &Yaml)> {
        self.merged["services"]
            .as_hash()
            .into_iter()
            .flatten()
            .filter_map(|(name, service)| Some((name.as_str()?, service)))
            .collect()
    }

    /// The file whose value of `field` (a problem's field: `environment[FORGER_X]`,
    /// `deploy.resources`) the merged service has: the last file that sets it. A field no
    /// file sets belongs to the last file that defines the service, where adding it counts.
    pub fn origin(&self, service: &str, field: &str) -> &str {
        let path = field_path(field);
        let defining: Vec<&(String, Yaml)> = self
            .layers
            .iter()
            .filter(|layer| !layer.1["services"][service].is_badvalue())
            .collect();
        defining
            .iter()
            .rev()
            .find(|layer| sets(&layer.1["services"][service], &path))
            .or(defining.last())
            .map_or(self.main_file(), |layer| &layer.0)
    }

    /// `problem`, moved to the file that set the value it names when it names a service's.
    pub fn attribute(&self, mut problem: Problem) -> Problem {
        if let Some(service) = problem.at.object.strip_prefix(SERVICE_PREFIX) {
            problem.at.file = self.origin(service, &problem.at.field).to_string();
        }
        problem
    }
}

/// One file as Compose reads it before merging it with any other.
fn read_layer(file: &str, text: &str) -> Result<Yaml, Problem> {
    let at = Location::new(file, "(file)", "");
    let docs =
        YamlLoader::load_from_str(text).map_err(|e| Problem::new(at.child("(syntax)"), format!("not YAML: {e}")))?;
    let [doc] = docs.as_slice() else {
        return Err(Problem::new(
            at,
            format!("{} YAML documents: a compose file holds one", docs.len()),
        ));
    };
    let mut doc = expand_variables(resolve_merge_keys(doc.clone()));
    if let Yaml::Hash(top) = &mut doc
        && let Some(Yaml::Hash(services)) = top.get_mut(&key("services"))
    {
        for (_, service) in services.iter_mut() {
            environment_as_map(service);
        }
    }
    Ok(doc)
}

fn key(name: &str) -> Yaml {
    Yaml::String(name.to_string())
}

/// Replaces each `<<: *anchor` (or `<<: [*a, *b]`) with the keys of the mappings it names
/// that the mapping does not set itself; among several, the first listed wins. This is the
/// YAML merge key, and it is shallow: a mapping that sets `environment` replaces the
/// anchor's whole `environment`.
pub fn resolve_merge_keys(yaml: Yaml) -> Yaml {
    match yaml {
        Yaml::Hash(entries) => {
            let mut own = Hash::new();
            let mut inherited = Vec::new();
            for (name, value) in entries {
                let value = resolve_merge_keys(value);
                if name.as_str() == Some("<<") {
                    inherited.push(value);
                } else {
                    own.insert(name, value);
                }
            }
            for source in inherited {
                let sources = match source {
                    Yaml::Array(items) => items,
                    other => vec![other],
                };
                for source in sources {
                    match source {
                        Yaml::Hash(fields) => {
                            for (name, value) in fields {
                                own.entry(name).or_insert(value);
                            }
                        }
                        // Not a mapping: kept as a plain key, so it is seen rather than lost.
                        other => {
                            own.insert(key("<<"), other);
                        }
                    }
                }
            }
            Yaml::Hash(own)
        }
        Yaml::Array(items) => Yaml::Array(items.into_iter().map(resolve_merge_keys).collect()),
        other => other,
    }
}

/// Every string value with its variable references expanded (keys are left alone, as
/// Compose leaves them).
fn expand_variables(yaml: Yaml) -> Yaml {
    match yaml {
        Yaml::String(text) => Yaml::String(interpolate(&text)),
        Yaml::Array(items) => Yaml::Array(items.into_iter().map(expand_variables).collect()),
        Yaml::Hash(entries) => Yaml::Hash(entries.into_iter().map(|(k, v)| (k, expand_variables(v))).collect()),
        other => other,
    }
}

/// `text` as Compose expands it with every variable unset: `${NAME:-default}` and
/// `${NAME-default}` become the default (itself expanded), any other reference nothing;
/// `$$` is a literal `$`.
pub fn interpolate(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        rest = &rest[dollar + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some((body, after)) = rest.strip_prefix('{').and_then(braced) {
            out.push_str(&unset_value(body));
            rest = after;
        } else {
            let name = name_len(rest);
            if name == 0 {
                out.push('$'); // a `$` that starts no reference is kept
            }
            rest = &rest[name..];
        }
    }
    out.push_str(rest);
    out
}

fn name_len(text: &str) -> usize {
    text.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len())
}

/// Splits `body}rest` at the brace that closes it, past any nested `${...}` in a default.
fn braced(text: &str) -> Option<(&str, &str)> {
    let mut depth = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return Some((&text[..i], &text[i + 1..])),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// What `${body}` expands to when its variable is unset.
fn unset_value(body: &str) -> String {
    let operator = &body[name_len(body)..];
    match operator.strip_prefix(":-").or_else(|| operator.strip_prefix('-')) {
        Some(default) => interpolate(default),
        // `${NAME}`; `${NAME:?message}`, which stops Compose; `${NAME:+value}`, given only
        // when the variable is set.
        None => String::new(),
    }
}

/// A service's `environment` list (`- NAME=value`, or `- NAME` for the host's value) as
/// the mapping form, so that entries merge across files whichever form each file uses.
fn environment_as_map(service: &mut Yaml) {
    let Yaml::Hash(fields) = service else {
        return;
    };
    let Some(Yaml::Array(entries)) = fields.get(&key("environment")) else {
        return;
    };
    let map: Hash = entries
        .iter()
        .filter_map(Yaml::as_str)
        .map(|entry| match entry.split_once('=') {
            Some((name, value)) => (key(name), key(value)),
            None => (key(entry), Yaml::Null),
        })
        .collect();
    fields.insert(key("environment"), Yaml::Hash(map));
}

/// `over` laid on `base`: mappings merged key by key, anything else replaced.
pub fn merge(base: Yaml, over: Yaml) -> Yaml {
    match (base, over) {
        (Yaml::Hash(mut base), Yaml::Hash(over)) => {
            for (name, value) in over {
                match base.get_mut(&name) {
                    Some(slot) => *slot = merge(std::mem::replace(slot, Yaml::Null), value),
                    None => {
                        base.insert(name, value);
                    }
                }
            }
            Yaml::Hash(base)
        }
        (_, over) => over,
    }
}

/// A problem's field as the keys it walks: `environment[FORGER_X]` is `environment`, then
/// `FORGER_X`; `volumes[2]` is `volumes`, then `2`.
fn field_path(field: &str) -> Vec<String> {
    let mut path = Vec::new();
    let mut rest = field;
    while !rest.is_empty() {
        if let Some(inner) = rest.strip_prefix('[') {
            let (name, after) = inner.split_once(']').unwrap_or((inner, ""));
            path.push(name.to_string());
            rest = after;
        } else {
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            if end > 0 {
                path.push(rest[..end].to_string());
            }
            rest = &rest[end..];
        }
        rest = rest.strip_prefix('.').unwrap_or(rest);
    }
    path
}

/// Whether one file's service sets the value at `path`. A list or a scalar met on the way
/// is the file's whole, since an override replaces it rather than merging into it.
fn sets(service: &Yaml, path: &[String]) -> bool {
    let mut node = service;
    for name in path {
        match node {
            Yaml::Hash(fields) => match fields.get(&key(name)) {
                Some(next) => node = next,
                None => return false,
            },
            Yaml::Null | Yaml::BadValue => return false,
            _ => return true,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_take_their_defaults() {
        assert_eq!(
            interpolate("forger-worker:${TAG:-0.1.0}-cuda"),
            "forger-worker:0.1.0-cuda"
        );
        assert_eq!(interpolate("${A-x}/${B}/$C/$$D/${E:-${F:-deep}}"), "x///$D/deep");
        assert_eq!(interpolate("${G:?needed}|a$|${unclosed"), "|a$|${unclosed");
    }

    #[test]
    fn merge_keys_are_shallow_and_lose_to_keys_written_beside_them() {
        let text = "\
x: &base {image: a, environment: {A: '1'}, networks: [n]}
services:
  s: {<<: *base, image: b, environment: {B: '2'}}
";
        let project = Project::load(&[("c.yml".into(), text.into())]).unwrap();
        let service = &project.merged()["services"]["s"];
        assert_eq!(service["image"].as_str(), Some("b"));
        assert_eq!(service["networks"][0].as_str(), Some("n"));
        assert!(service["environment"]["A"].is_badvalue(), "{service:?}");
        assert!(service["<<"].is_badvalue());
    }

    #[test]
    fn an_override_merges_mappings_replaces_lists_and_keeps_each_value_s_file() {
        let base = "\
services:
  w:
    image: w:1
    environment: [A=1, B]
    ports: ['1:1']
";
        let over = "services: {w: {environment: {C: '3'}, ports: ['2:2']}}\n";
        let project = Project::load(&[("base.yml".into(), base.into()), ("over.yml".into(), over.into())]).unwrap();
        let w = &project.merged()["services"]["w"];
        assert_eq!(w["environment"]["A"].as_str(), Some("1"));
        assert!(w["environment"]["B"].is_null());
        assert_eq!(w["environment"]["C"].as_str(), Some("3"));
        assert_eq!(w["ports"].as_vec().map(Vec::len), Some(1));
        assert_eq!(project.origin("w", "environment[A]"), "base.yml");
        assert_eq!(project.origin("w", "environment[C]"), "over.yml");
        assert_eq!(project.origin("w", "ports[0]"), "over.yml");
        assert_eq!(project.origin("w", "image"), "base.yml");
        // Set nowhere: the last file that defines the service.
        assert_eq!(project.origin("w", "deploy.resources"), "over.yml");
    }

    #[test]
    fn a_relative_source_resolves_against_the_project_folder() {
        let project = Project::load(&[("deploy/c.yml".into(), "services: {}\n".into())]).unwrap();
        assert_eq!(
            project.host_path("./faces-small.toml"),
            Path::new("deploy/faces-small.toml")
        );
        assert_eq!(project.host_path("../../shared/x"), Path::new("../shared/x"));
        assert_eq!(project.host_path("/srv/a"), Path::new("/srv/a"));
    }

    #[test]
    fn a_field_splits_into_the_keys_it_walks() {
        assert_eq!(field_path("environment[FORGER_X]"), ["environment", "FORGER_X"]);
        assert_eq!(
            field_path("deploy.resources.x[0].y"),
            ["deploy", "resources", "x", "0", "y"]
        );
        assert_eq!(field_path("volumes[/etc/a.toml]"), ["volumes", "/etc/a.toml"]);
        assert!(field_path("").is_empty());
    }
}
