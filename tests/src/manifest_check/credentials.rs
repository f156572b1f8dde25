//! TLS and the job token as a deployment sets them up.
//!
//! Each way of getting this wrong shows only once the processes run: a binary given neither
//! `--credentials` nor `--insecure` exits 2 at once; a worker and a coordinator that disagree
//! on TLS never finish a handshake; a worker that checks the coordinator's certificate for a
//! name it does not carry fails every one; and a credentials file that is not there, or that
//! the process may not read, stops it at start. These checks read all of that from the files.

use forger_coordinator::credentials::DEFAULT_HOSTS;
use forger_proto::tls::files;

use crate::manifest_check::{Binary, Container, Location, Problem, Setting, join};

/// How a container secures its connections, as its flags and environment say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// TLS and the job token from the folder `dir`; `mutual` when a coordinator asks workers
    /// for their certificate too (`--mtls`).
    Credentials { dir: Setting, mutual: bool },
    /// `--insecure`: plain TCP, no token.
    Insecure { at: Location },
    /// A coordinator with `--local-workers` and neither: it makes a folder in its run directory.
    LocalWorkers,
    /// Neither: the binary refuses to start.
    Missing,
}

/// Where a flag that takes no value is turned on: the flag itself (`--mtls`, `--mtls=true`)
/// or its variable set to `true`. The flag wins, as clap has it.
pub fn switch(container: &Container, flag: &str, env: &str) -> Option<Location> {
    let inline = format!("{flag}=");
    for word in container.args.iter().take_while(|w| *w != "--") {
        if word == flag {
            return Some(container.args_at());
        }
        if let Some(value) = word.strip_prefix(&inline) {
            return (value == "true").then(|| container.args_at());
        }
    }
    match container.env.get(env) {
        Some(Some(value)) if value == "true" => Some(container.env_at(env)),
        _ => None,
    }
}

/// The container's security. `--insecure` is read first: with `--credentials` as well the
/// binary refuses both, which [`check_security`] reports.
pub fn security(container: &Container) -> Security {
    if let Some(at) = switch(container, "--insecure", "FORGER_INSECURE") {
        return Security::Insecure { at };
    }
    if let Some(dir) = container.setting("--credentials", "FORGER_CREDENTIALS") {
        let mutual = container.binary == Binary::Coordinator && switch(container, "--mtls", "FORGER_MTLS").is_some();
        return Security::Credentials { dir, mutual };
    }
    if container.binary == Binary::Coordinator && container.setting("--local-workers", "FORGER_LOCAL_WORKERS").is_some()
    {
        return Security::LocalWorkers;
    }
    Security::Missing
}

/// The files of its credentials folder a process opens: the coordinator its certificate, key
/// and token, and with mutual TLS the CA it checks workers against; a worker the CA and the
/// token, and with mutual TLS its own certificate and key.
pub fn files_read(binary: Binary, mutual: bool) -> Vec<&'static str> {
    let mut read = match binary {
        Binary::Coordinator => vec![files::COORDINATOR_CERT, files::COORDINATOR_KEY, files::TOKEN],
        Binary::Worker => vec![files::CA_CERT, files::TOKEN],
    };
    if mutual {
        match binary {
            Binary::Coordinator => read.push(files::CA_CERT),
            Binary::Worker => read.extend([files::WORKER_CERT, files::WORKER_KEY]),
        }
    }
    read
}

/// A coordinator or worker must be told how to secure its connections, in one way only.
/// A subcommand (`forger-coordinator credentials`) takes none of these.
pub fn check_security(container: &Container) -> Vec<Problem> {
    if container.subcommand().is_some() {
        return Vec::new();
    }
    let name = container.binary.name();
    let credentials = container.setting("--credentials", "FORGER_CREDENTIALS");
    let mut problems = Vec::new();
    match security(container) {
        Security::Missing => problems.push(Problem::new(
            container.env_at("FORGER_CREDENTIALS"),
            format!(
                "not set, nor FORGER_INSECURE: {name} refuses to start (exit 2) without the cluster's credentials \
                 folder or --insecure"
            ),
        )),
        Security::Insecure { at } => {
            for (what, set) in [
                ("--credentials", credentials.map(|s| s.at)),
                ("--mtls", switch(container, "--mtls", "FORGER_MTLS")),
                (
                    "--tls-server-name",
                    container
                        .setting("--tls-server-name", "FORGER_TLS_SERVER_NAME")
                        .map(|s| s.at),
                ),
            ] {
                if let Some(set) = set {
                    problems.push(Problem::new(
                        set,
                        format!("{what} with --insecure ({}): {name} refuses the two together", at.field),
                    ));
                }
            }
        }
        Security::Credentials { .. } | Security::LocalWorkers => {}
    }
    problems
}

/// The workers must secure their connections as the coordinator does: TLS on one side only
/// fails every handshake (the coordinator refuses it, or the worker finds no TLS to talk to).
pub fn check_agreement(coordinator: &Container, workers: &[Container]) -> Vec<Problem> {
    let served = security(coordinator);
    let mut problems = Vec::new();
    for worker in workers {
        match (&served, security(worker)) {
            (Security::Insecure { at }, Security::Credentials { dir, .. }) => problems.push(Problem::new(
                dir.at,
                format!(
                    "the worker speaks TLS, but the coordinator runs --insecure ({}: {}): no handshake will succeed",
                    at.object, at.field
                ),
            )),
            (Security::Credentials { dir, .. }, Security::Insecure { at }) => problems.push(Problem::new(
                at,
                format!(
                    "the worker runs --insecure, but the coordinator speaks TLS with {} ({}: {}): it refuses the worker",
                    dir.value, dir.at.object, dir.at.field
                ),
            )),
            _ => {}
        }
    }
    problems
}

/// The values of every `flag VALUE` and `flag=VALUE` in the arguments, in order.
fn values(container: &Container, flag: &str) -> Vec<String> {
    let inline = format!("{flag}=");
    let mut found = Vec::new();
    let mut words = container.args.iter();
    while let Some(word) = words.next() {
        if word == flag {
            found.extend(words.next().cloned());
        } else if let Some(value) = word.strip_prefix(&inline) {
            found.push(value.to_string());
        }
    }
    found
}

/// The host of a coordinator URL: `http://HOST:PORT/...`, `[...]` around an IPv6 address.
fn url_host(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(bracketed) = authority.strip_prefix('[') {
        return bracketed.split(']').next();
    }
    Some(authority.rsplit_once(':').map_or(authority, |(host, _)| host))
}

/// The name a worker checks the coordinator's certificate for: `--tls-server-name`, or the
/// host it dials.
pub fn server_name(worker: &Container) -> Option<Setting> {
    if let Some(name) = worker.setting("--tls-server-name", "FORGER_TLS_SERVER_NAME") {
        return Some(name);
    }
    let url = worker.setting("--coordinator", "FORGER_COORDINATOR")?;
    let host = url_host(&url.value)?.to_string();
    Some(Setting {
        value: host,
        at: url.at,
    })
}

/// A script that makes its credentials (`forger-coordinator credentials --out DIR`) must give
/// the coordinator and workers that folder, and its workers must check the coordinator's
/// certificate for a name it carries: one of [`DEFAULT_HOSTS`] or a `--host`. With `--keep`,
/// a folder made by an earlier run is kept as it is, naming the hosts of that run, so a
/// `--host` from a variable (`"$head_node"`) may no longer be the host dialled.
pub fn check_script(found: &[Container]) -> Vec<Problem> {
    let made: Vec<&Container> = found
        .iter()
        .filter(|c| c.binary == Binary::Coordinator && c.subcommand() == Some("credentials"))
        .collect();
    let coordinators: Vec<&Container> = found
        .iter()
        .filter(|c| c.binary == Binary::Coordinator && c.subcommand().is_none())
        .collect();
    let workers: Vec<Container> = found
        .iter()
        .filter(|c| c.binary == Binary::Worker && c.subcommand().is_none())
        .cloned()
        .collect();
    let mut problems = Vec::new();
    for coordinator in &coordinators {
        problems.extend(check_agreement(coordinator, &workers));
    }
    let folders: Vec<(String, &Container)> = made
        .iter()
        .flat_map(|c| values(c, "--out").into_iter().map(move |out| (out, *c)))
        .collect();
    if folders.is_empty() {
        return problems;
    }
    let folder_names = join(folders.iter().map(|(out, _)| out.clone()));
    for container in coordinators.iter().copied().chain(&workers) {
        let Security::Credentials { dir, .. } = security(container) else {
            continue;
        };
        let Some((_, maker)) = folders.iter().find(|(out, _)| *out == dir.value) else {
            problems.push(Problem::new(
                dir.at,
                format!("{} is not the folder the script makes ({folder_names})", dir.value),
            ));
            continue;
        };
        if container.binary != Binary::Worker {
            continue;
        }
        let Some(name) = server_name(container) else {
            continue;
        };
        let kept = maker.args.iter().any(|a| a == "--keep");
        let hosts = values(maker, "--host");
        let carried = DEFAULT_HOSTS.iter().any(|h| *h == name.value)
            || hosts.iter().any(|h| *h == name.value && !(kept && h.contains('$')));
        if carried {
            continue;
        }
        let message = if hosts.contains(&name.value) {
            format!(
                "the worker checks the coordinator's certificate for {}, but with --keep ({}) a folder from an \
                 earlier run keeps the certificate naming that run's {}: check a name every certificate carries \
                 (--tls-server-name, one of {})",
                name.value,
                maker.at.object,
                name.value,
                DEFAULT_HOSTS.join(", ")
            )
        } else {
            format!(
                "the worker checks the coordinator's certificate for {}, which {} does not name (it names {})",
                name.value,
                maker.at.object,
                join(DEFAULT_HOSTS.iter().map(|h| h.to_string()).chain(hosts.iter().cloned()))
            )
        };
        problems.push(Problem::new(name.at, message));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(binary: Binary, line: usize, args: &[&str], env: &[(&str, &str)]) -> Container {
        let at = Location::new("x.sh", &format!("{} at line {line}", binary.name()), "");
        let mut c = Container::new(at, binary);
        c.args = args.iter().map(|s| s.to_string()).collect();
        c.env = env.iter().map(|(k, v)| (k.to_string(), Some(v.to_string()))).collect();
        c
    }

    #[test]
    fn flags_and_variables_say_how_a_container_is_secured() {
        let c = container(Binary::Coordinator, 1, &["--credentials", "/c", "--mtls"], &[]);
        assert!(matches!(security(&c), Security::Credentials { ref dir, mutual: true } if dir.value == "/c"));
        let c = container(
            Binary::Coordinator,
            1,
            &[],
            &[("FORGER_CREDENTIALS", "/c"), ("FORGER_MTLS", "false")],
        );
        assert!(matches!(security(&c), Security::Credentials { mutual: false, .. }));
        let c = container(Binary::Worker, 1, &[], &[("FORGER_INSECURE", "true")]);
        assert!(matches!(security(&c), Security::Insecure { .. }));
        let c = container(Binary::Coordinator, 1, &["--local-workers", "2"], &[]);
        assert_eq!(security(&c), Security::LocalWorkers);
        assert_eq!(
            files_read(Binary::Worker, true),
            ["ca.pem", "token", "worker.pem", "worker.key"]
        );
    }

    #[test]
    fn neither_or_both_ways_is_reported_and_a_subcommand_needs_none() {
        let c = container(Binary::Worker, 3, &["--coordinator", "http://h:1"], &[]);
        let problems = check_security(&c);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].message.contains("refuses to start (exit 2)"),
            "{}",
            problems[0]
        );
        let c = container(
            Binary::Coordinator,
            3,
            &["--insecure", "--credentials", "/c"],
            &[("FORGER_MTLS", "true")],
        );
        let problems = check_security(&c);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].message.starts_with("--credentials with --insecure"),
            "{}",
            problems[0]
        );
        assert_eq!(problems[1].at.field, "env[FORGER_MTLS]");
        let c = container(Binary::Coordinator, 3, &["credentials", "--out", "/c"], &[]);
        assert!(check_security(&c).is_empty());
    }

    #[test]
    fn tls_on_one_side_only_is_reported_at_the_worker() {
        let coordinator = container(Binary::Coordinator, 1, &["--insecure"], &[]);
        let worker = container(Binary::Worker, 2, &["--credentials", "/c"], &[]);
        let problems = check_agreement(&coordinator, &[worker]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].at.object, "forger-worker at line 2");
        assert!(problems[0].message.contains("runs --insecure"), "{}", problems[0]);
    }

    #[test]
    fn a_script_s_workers_must_check_a_name_its_certificate_carries() {
        let script = |keep: bool, worker: &[&str]| {
            let mut make = vec!["credentials", "--out", "$RUN/creds", "--host", "$head"];
            if keep {
                make.push("--keep");
            }
            vec![
                container(Binary::Coordinator, 1, &make, &[]),
                container(Binary::Coordinator, 2, &["--credentials", "$RUN/creds", "--mtls"], &[]),
                container(Binary::Worker, 3, worker, &[]),
            ]
        };
        let dials = ["--coordinator", "http://$head:1", "--credentials", "$RUN/creds"];
        // A fresh folder every time names the host dialled.
        assert_eq!(check_script(&script(false, &dials)), []);
        // A kept one names the host of the run that made it.
        let problems = check_script(&script(true, &dials));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("with --keep"), "{}", problems[0]);
        let mut checks_coordinator = dials.to_vec();
        checks_coordinator.extend(["--tls-server-name", "coordinator"]);
        assert_eq!(check_script(&script(true, &checks_coordinator)), []);
        // A name the certificate never carries, and another folder.
        let problems = check_script(&script(
            false,
            &["--coordinator", "http://[fd00::1]:1", "--credentials", "/elsewhere"],
        ));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].message,
            "/elsewhere is not the folder the script makes ($RUN/creds)"
        );
        let problems = check_script(&script(
            false,
            &["--coordinator", "http://[fd00::1]:1", "--credentials", "$RUN/creds"],
        ));
        assert!(problems[0].message.contains("for fd00::1, which"), "{problems:?}");
    }
}
