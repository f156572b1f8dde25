//! Holds deployment files to the binaries they start.
//!
//! A manifest can be wrong in ways nothing else notices: clap ignores an environment variable
//! it does not know (`FORGER_THREAD` for `FORGER_THREADS` leaves libtorch on every core and
//! says nothing), a Service can forward a port the coordinator does not listen on, and a spec
//! can ask for more replicas than are deployed, so the run waits for ones that never come.
//! These checks read what the files say and compare it with each binary's `--help` and with
//! each other.
//!
//! Every deployment format is reduced to the same [`Container`]: a binary, its environment,
//! its arguments and its volume mounts. [`k8s`] reads Kubernetes manifests into containers,
//! [`compose`] reads docker-compose files (an override merged in as Compose merges it),
//! [`script`] finds the invocations in a shell script, and [`cli`] reads what a binary
//! accepts; the checks here, in `endpoints` (ports and addresses) and in [`credentials`] (TLS
//! and the job token) work on containers alone, so every reader shares them. Each problem
//! names the file, the object and the field to fix.

pub mod cli;
pub mod compose;
pub mod credentials;
mod endpoints;
pub mod k8s;
pub mod script;

use std::collections::BTreeMap;
use std::fmt;

use forger_common::spec::JobSpec;

use crate::manifest_check::cli::Cli;
pub use crate::manifest_check::endpoints::{Endpoint, TargetPort, check_endpoints, check_listen};

/// Where in a deployment file a value lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file, relative to the repository root.
    pub file: String,
    /// The object in the file, for example `Job/forger-workers` or a compose service.
    pub object: String,
    /// The dotted path to the field inside the object.
    pub field: String,
}

impl Location {
    pub fn new(file: &str, object: &str, field: &str) -> Location {
        Location {
            file: file.to_string(),
            object: object.to_string(),
            field: field.to_string(),
        }
    }

    /// A field below this one.
    pub fn child(&self, field: &str) -> Location {
        let field = if self.field.is_empty() {
            field.to_string()
        } else if field.starts_with('[') {
            format!("{}{field}", self.field)
        } else {
            format!("{}.{field}", self.field)
        };
        Location { field, ..self.clone() }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file, self.object, self.field)
    }
}

/// One disagreement, at the value that has to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub at: Location,
    pub message: String,
}

impl Problem {
    pub fn new(at: Location, message: impl Into<String>) -> Problem {
        Problem {
            at,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// All problems, one a line, for an assertion message.
pub fn report(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("  {p}\n")).collect()
}

/// The two programs a deployment starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Binary {
    Coordinator,
    Worker,
}

impl Binary {
    pub const ALL: [Binary; 2] = [Binary::Coordinator, Binary::Worker];

    /// The executable's file name.
    pub fn name(self) -> &'static str {
        match self {
            Binary::Coordinator => "forger-coordinator",
            Binary::Worker => "forger-worker",
        }
    }

    /// The binary whose executable is `word`'s last path segment, if any: `forger-worker`,
    /// `/opt/forger/bin/forger-worker` and `"$BIN_DIR/forger-worker"` all name the worker.
    pub fn named(word: &str) -> Option<Binary> {
        let base = word.rsplit('/').next().unwrap_or(word);
        Binary::ALL.into_iter().find(|b| b.name() == base)
    }
}

/// A volume mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where the container sees it.
    pub path: String,
    pub read_only: bool,
    /// The volume's name in its file (a pod volume, a claim template, a compose volume).
    pub volume: String,
    /// Kubernetes' `subPath`: the mount shows this entry of the volume rather than all of it.
    pub sub_path: Option<String>,
    pub at: Location,
}

/// A port a container declares, with its name if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub name: Option<String>,
    pub number: u16,
}

/// One process a deployment file starts: which binary, with what environment and arguments,
/// seeing which volumes.
#[derive(Debug, Clone)]
pub struct Container {
    /// The container itself; its fields are named below this.
    pub at: Location,
    pub binary: Binary,
    /// The image it runs, where the file names one.
    pub image: Option<String>,
    /// Each variable's value; `None` when it is filled in elsewhere (Kubernetes' `valueFrom`,
    /// a compose variable given no value, which the host's environment fills).
    pub env: BTreeMap<String, Option<String>>,
    /// The field the environment came from, below `at` (`env`, or compose's `environment`).
    pub env_field: String,
    /// The arguments after the executable.
    pub args: Vec<String>,
    /// The field the arguments came from, below `at` (`args`, or `command` when it holds them).
    pub args_field: String,
    pub ports: Vec<Port>,
    pub mounts: Vec<Mount>,
    /// The GPUs the container is given, when the file says (a Kubernetes `nvidia.com/gpu`
    /// limit): what `--devices all` will find.
    pub gpus: Option<u32>,
}

/// A setting's value and where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub value: String,
    pub at: Location,
}

impl Container {
    /// A container with nothing set yet.
    pub fn new(at: Location, binary: Binary) -> Container {
        Container {
            at,
            binary,
            image: None,
            env: BTreeMap::new(),
            env_field: "env".into(),
            args: Vec::new(),
            args_field: "args".into(),
            ports: Vec::new(),
            mounts: Vec::new(),
            gpus: None,
        }
    }

    /// The subcommand the container runs (`credentials`), when its first argument is one
    /// rather than a flag.
    pub fn subcommand(&self) -> Option<&str> {
        self.args
            .first()
            .map(String::as_str)
            .filter(|first| !first.starts_with('-'))
    }

    fn env_at(&self, name: &str) -> Location {
        self.at.child(&format!("{}[{name}]", self.env_field))
    }

    fn args_at(&self) -> Location {
        self.at.child(&self.args_field)
    }

    /// The value of a setting that has a flag and an environment variable, as the binary
    /// sees it: clap takes the flag over the variable.
    pub fn setting(&self, flag: &str, env: &str) -> Option<Setting> {
        let inline = format!("{flag}=");
        let mut words = self.args.iter();
        while let Some(word) = words.next() {
            if word == flag
                && let Some(value) = words.next()
            {
                return Some(Setting {
                    value: value.clone(),
                    at: self.args_at(),
                });
            }
            if let Some(value) = word.strip_prefix(&inline) {
                return Some(Setting {
                    value: value.to_string(),
                    at: self.args_at(),
                });
            }
        }
        match self.env.get(env) {
            Some(Some(value)) => Some(Setting {
                value: value.clone(),
                at: self.env_at(env),
            }),
            _ => None,
        }
    }

    /// The mount that shows `path` to the container: the deepest one at or above it.
    pub fn mount_for(&self, path: &str) -> Option<&Mount> {
        let path = path.trim_end_matches('/');
        self.mounts
            .iter()
            .filter(|m| {
                let root = m.path.trim_end_matches('/');
                path == root || path.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
            })
            .max_by_key(|m| m.path.trim_end_matches('/').len())
    }
}

/// Every `FORGER_*` variable the container sets must be one its binary reads: clap silently
/// ignores the others, so a misspelt name changes nothing and says nothing.
pub fn check_env_names(container: &Container, cli: &Cli) -> Vec<Problem> {
    let Ok(surface) = cli.surface_for(&container.args) else {
        // check_flags reports the unknown subcommand.
        return Vec::new();
    };
    container
        .env
        .keys()
        .filter(|name| name.starts_with("FORGER_") && !surface.env.contains(*name))
        .map(|name| {
            Problem::new(
                container.env_at(name),
                format!(
                    "{name} is not an environment variable of {}, which would ignore it (it reads {})",
                    surface.command,
                    join(&surface.env)
                ),
            )
        })
        .collect()
}

/// A variable of a flag that takes no value (`FORGER_MTLS` for `--mtls`) must be `true` or
/// `false`: clap refuses `1`, `yes` or an empty value, and the binary does not start.
pub fn check_switch_values(container: &Container, cli: &Cli) -> Vec<Problem> {
    let Ok(surface) = cli.surface_for(&container.args) else {
        return Vec::new();
    };
    container
        .env
        .iter()
        .filter_map(|(name, value)| Some((name, value.as_deref()?)))
        .filter(|(name, value)| surface.switches.contains(*name) && !["true", "false"].contains(value))
        .map(|(name, value)| {
            Problem::new(
                container.env_at(name),
                format!(
                    "`{value}`: {} reads {name} as true or false only, and refuses to start on anything else",
                    surface.command
                ),
            )
        })
        .collect()
}

/// Every `--flag` in the arguments must be one its binary (or the subcommand they name)
/// accepts: clap refuses an unknown flag, but only once the container is running.
pub fn check_flags(container: &Container, cli: &Cli) -> Vec<Problem> {
    let surface = match cli.surface_for(&container.args) {
        Ok(surface) => surface,
        Err(message) => return vec![Problem::new(container.args_at(), message)],
    };
    let mut problems = Vec::new();
    for word in &container.args {
        if word == "--" {
            break;
        }
        let Some(flag) = word.strip_prefix("--") else {
            continue;
        };
        let name = flag.split('=').next().unwrap_or(flag);
        if !surface.flags.contains(name) {
            problems.push(Problem::new(
                container.args_at(),
                format!(
                    "--{name} is not a flag of {} (its flags: {})",
                    surface.command,
                    join(surface.flags.iter().map(|f| format!("--{f}")))
                ),
            ));
        }
    }
    problems
}

/// The spec, run directory, dataset and credentials folder a container is told to use must
/// each be on a mounted volume (a path inside the image is lost with the container, or holds
/// nothing), and the run directory's must be writable.
pub fn check_mounts(container: &Container) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (flag, env, writes) in [
        ("--spec", "FORGER_SPEC", false),
        ("--out", "FORGER_OUT", true),
        ("--data", "FORGER_DATA", false),
        ("--credentials", "FORGER_CREDENTIALS", false),
    ] {
        let Some(setting) = container.setting(flag, env) else {
            continue;
        };
        match container.mount_for(&setting.value) {
            None => problems.push(Problem::new(
                setting.at,
                format!(
                    "{} is on no mounted volume (mounts: {})",
                    setting.value,
                    join(container.mounts.iter().map(|m| m.path.clone()))
                ),
            )),
            Some(mount) if writes && mount.read_only => problems.push(Problem::new(
                mount.at.clone(),
                format!(
                    "{} holds the run directory {} ({}) but is mounted read-only",
                    mount.path, setting.value, setting.at.field
                ),
            )),
            Some(_) => {}
        }
    }
    problems
}

/// How many replicas one worker process runs: one per device of `--devices` /
/// `FORGER_DEVICES` (`all`: one per GPU the container is given), else one. `cluster.workers`
/// counts replicas, each of which takes a place (a shard) in the job.
pub fn worker_replicas(worker: &Container) -> Result<u32, Problem> {
    let Some(devices) = worker.setting("--devices", "FORGER_DEVICES") else {
        return Ok(1);
    };
    if devices.value.trim() == "all" {
        return match worker.gpus {
            Some(gpus) if gpus >= 1 => Ok(gpus),
            _ => Err(Problem::new(
                devices.at,
                "`all` devices, but the container is given no GPUs, so how many replicas it runs cannot be told",
            )),
        };
    }
    let count = devices.value.split(',').filter(|d| !d.trim().is_empty()).count();
    Ok(u32::try_from(count).unwrap_or(u32::MAX).max(1))
}

/// The replicas a deployment runs, and how they add up (for a message).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deployed {
    pub replicas: u32,
    /// One entry per worker object: `Job/forger-workers: 2 pods x 4 replicas`.
    pub parts: Vec<String>,
}

impl Deployed {
    /// Counts `processes` copies of `worker`.
    pub fn add(&mut self, object: &str, processes: u32, worker: &Container) -> Result<(), Problem> {
        let replicas = worker_replicas(worker)?;
        self.replicas += processes * replicas;
        self.parts
            .push(format!("{object}: {processes} process(es) x {replicas} replica(s)"));
        Ok(())
    }
}

/// The spec must parse as forger would read it, and ask for as many replicas as are deployed:
/// with more, the run waits for replicas that never come; with fewer, a worker arriving when
/// every place is taken is turned away.
pub fn check_spec(text: &str, at: &Location, deployed: &Deployed) -> Vec<Problem> {
    match JobSpec::parse(text, &at.to_string()) {
        Err(e) => vec![Problem::new(at.clone(), format!("not a valid forger job spec: {e}"))],
        Ok(spec) if spec.cluster.workers != deployed.replicas => vec![Problem::new(
            at.clone(),
            format!(
                "cluster.workers = {} but {} replica(s) are deployed ({})",
                spec.cluster.workers,
                deployed.replicas,
                join(&deployed.parts)
            ),
        )],
        Ok(_) => Vec::new(),
    }
}

/// The tag suffix of the worker image's GPU variant (`deploy/build-images.sh --cuda`).
pub const GPU_TAG_SUFFIX: &str = "-cuda";

/// A worker given GPUs must run the worker image's GPU variant: the plain image lacks the
/// libraries libtorch opens only on a GPU, so libtorch would see none and the worker refuse
/// its devices.
pub fn check_gpu_image(container: &Container) -> Vec<Problem> {
    let (Binary::Worker, Some(1..), Some(image)) = (container.binary, container.gpus, &container.image) else {
        return Vec::new();
    };
    let tag = image
        .split('@')
        .next()
        .unwrap_or(image)
        .rsplit('/')
        .next()
        .unwrap_or(image);
    if tag
        .split_once(':')
        .is_some_and(|(_, tag)| tag.ends_with(GPU_TAG_SUFFIX))
    {
        return Vec::new();
    }
    vec![Problem::new(
        container.at.child("image"),
        format!(
            "{image} is given GPUs but is not the worker's GPU variant (a tag ending in {GPU_TAG_SUFFIX}, from \
             deploy/build-images.sh --cuda)"
        ),
    )]
}

/// Every check that applies to a container on its own.
pub fn check_container(container: &Container, cli: &Cli) -> Vec<Problem> {
    let mut problems = check_env_names(container, cli);
    problems.extend(check_switch_values(container, cli));
    problems.extend(check_flags(container, cli));
    problems.extend(check_mounts(container));
    problems.extend(credentials::check_security(container));
    problems.extend(check_gpu_image(container));
    problems
}

fn join<T: AsRef<str>>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|s| s.as_ref().to_string()).collect();
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coordinator(env: &[(&str, &str)], args: &[&str]) -> Container {
        let mut c = Container::new(
            Location::new("f.yaml", "StatefulSet/c", "containers[c]"),
            Binary::Coordinator,
        );
        c.env = env.iter().map(|(k, v)| (k.to_string(), Some(v.to_string()))).collect();
        c.args = args.iter().map(|s| s.to_string()).collect();
        c
    }

    #[test]
    fn a_flag_wins_over_its_environment_variable() {
        let c = coordinator(&[("FORGER_LISTEN", "0.0.0.0:1")], &["--listen", "0.0.0.0:2"]);
        assert_eq!(c.setting("--listen", "FORGER_LISTEN").unwrap().value, "0.0.0.0:2");
        let c = coordinator(&[("FORGER_LISTEN", "0.0.0.0:1")], &["--listen=0.0.0.0:3"]);
        assert_eq!(c.setting("--listen", "FORGER_LISTEN").unwrap().value, "0.0.0.0:3");
        let c = coordinator(&[("FORGER_LISTEN", "0.0.0.0:1")], &[]);
        let setting = c.setting("--listen", "FORGER_LISTEN").unwrap();
        assert_eq!(setting.at.field, "containers[c].env[FORGER_LISTEN]");
    }

    #[test]
    fn a_worker_runs_a_replica_per_device() {
        let mut w = Container::new(Location::new("f", "Job/w", "containers[w]"), Binary::Worker);
        assert_eq!(worker_replicas(&w), Ok(1));
        w.args = vec!["--devices".into(), "cuda:0,cuda:1,cuda:2".into()];
        assert_eq!(worker_replicas(&w), Ok(3));
        w.args = vec!["--devices".into(), "all".into()];
        let err = worker_replicas(&w).unwrap_err();
        assert_eq!(err.at.field, "containers[w].args");
        w.gpus = Some(4);
        assert_eq!(worker_replicas(&w), Ok(4));
    }

    #[test]
    fn the_deepest_mount_holds_a_path() {
        let mut c = coordinator(&[], &[]);
        for path in ["/var", "/var/lib/forger", "/data"] {
            c.mounts.push(Mount {
                path: path.into(),
                read_only: false,
                volume: path.into(),
                sub_path: None,
                at: c.at.child("volumeMounts"),
            });
        }
        assert_eq!(c.mount_for("/var/lib/forger/run").unwrap().path, "/var/lib/forger");
        assert_eq!(c.mount_for("/data").unwrap().path, "/data");
        assert!(c.mount_for("/database").is_none());
    }
}
