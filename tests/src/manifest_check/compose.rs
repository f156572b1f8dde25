//! docker-compose files as the checks see them: a project of a file and its overrides
//! ([`project`]), its forger services as containers, the ports they publish, the GPUs they
//! reserve, and how many workers they start.
//!
//! A service runs forger when its image is named `forger-coordinator` or `forger-worker`
//! (any registry or tag); other services are left alone. The images' entrypoint is the
//! binary, so `command:` holds only its arguments. On the project's network a service is
//! reached by its name on the ports its container listens on, with nothing forwarding in
//! between: the workers' URL must name the coordinator's service and its listen port.

pub mod project;

use std::collections::BTreeMap;
use std::path::Path;

use yaml_rust2::Yaml;

use crate::manifest_check::cli::Cli;
use crate::manifest_check::k8s::{image_binary, list, scalar};
use crate::manifest_check::{
    Binary, Container, Deployed, Endpoint, Location, Mount, Port, Problem, TargetPort, check_container,
    check_endpoints, check_listen, check_spec, script,
};
pub use project::Project;
use project::object;

/// What a mount shows when it names no source: a fresh volume of its own.
const ANONYMOUS: &str = "(anonymous)";

/// A forger service of the merged project.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub container: Container,
    /// How many containers Compose starts: `deploy.replicas`, or the older `scale`, else 1.
    pub processes: u32,
    pub published: Vec<Published>,
    pub gpus: Gpus,
}

/// One `ports:` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub at: Location,
    /// The host address it is bound to; `None` binds every interface.
    pub host_ip: Option<String>,
    /// The container's port.
    pub target: u16,
}

/// The GPUs `deploy.resources.reservations.devices` reserves. (Compose's `gpus:` and
/// `runtime: nvidia` are not read: the files under `deploy/` do not use them.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gpus {
    None,
    Count(u32),
    /// `count: all`, or no count: every GPU of the host.
    All,
}

/// The forger services of a project, and what in them cannot be read.
pub fn services(project: &Project) -> (Vec<Service>, Vec<Problem>) {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for (name, yaml) in project.services() {
        let Some(image) = yaml["image"].as_str() else {
            continue;
        };
        let Some(binary) = image_binary(image) else {
            continue;
        };
        let at = Location::new(project.main_file(), &object(name), "");
        let mut container = Container::new(at.clone(), binary);
        container.image = Some(image.to_string());
        container.env_field = "environment".into();
        container.env = environment(&yaml["environment"]);
        problems.extend(read_args(&mut container, yaml));
        let (published, unread) = published_ports(&at, &yaml["ports"]);
        problems.extend(unread);
        container.ports = published
            .iter()
            .map(|p| Port {
                name: None,
                number: p.target,
            })
            .collect();
        let (mounts, unread) = mounts(&at, &yaml["volumes"]);
        problems.extend(unread);
        container.mounts = mounts;
        let gpus = gpu_reservation(&yaml["deploy"]["resources"]["reservations"]["devices"]);
        container.gpus = match gpus {
            Gpus::Count(n) => Some(n),
            Gpus::None | Gpus::All => None,
        };
        let processes = process_count(&at, yaml).unwrap_or_else(|problem| {
            problems.push(problem);
            0
        });
        found.push(Service {
            name: name.to_string(),
            container,
            processes,
            published,
            gpus,
        });
    }
    (found, problems)
}

/// The `environment` mapping (a list was made one when the file was read); a variable
/// with no value takes the host's, which the file does not say.
fn environment(value: &Yaml) -> BTreeMap<String, Option<String>> {
    value
        .as_hash()
        .into_iter()
        .flatten()
        .filter_map(|(name, value)| Some((name.as_str()?.to_string(), scalar(value))))
        .collect()
}

/// The arguments from `command:`, after those of an `entrypoint:`, which replaces the
/// image's and so must still start the binary the image holds.
fn read_args(container: &mut Container, service: &Yaml) -> Option<Problem> {
    let entrypoint = words(&service["entrypoint"]);
    let command = words(&service["command"]);
    let mut problem = None;
    if let Some(executable) = entrypoint.first() {
        if Binary::named(executable) != Some(container.binary) {
            problem = Some(Problem::new(
                container.at.child("entrypoint[0]"),
                format!(
                    "`{executable}` does not run {}, which image {} holds",
                    container.binary.name(),
                    container.image.as_deref().unwrap_or_default()
                ),
            ));
        }
        container.args.extend(entrypoint[1..].iter().cloned());
        container.args_field = "entrypoint".into();
    }
    if !command.is_empty() {
        container.args.extend(command);
        container.args_field = "command".into();
    }
    problem
}

/// A command as a list, or as a string that Compose splits as a shell would.
fn words(value: &Yaml) -> Vec<String> {
    match value {
        Yaml::String(line) => script::words(line),
        value => list(value).iter().filter_map(scalar).collect(),
    }
}

fn published_ports(at: &Location, value: &Yaml) -> (Vec<Published>, Vec<Problem>) {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for (i, entry) in list(value).iter().enumerate() {
        let at = at.child(&format!("ports[{i}]"));
        let parsed = match entry {
            Yaml::Hash(_) => entry["target"]
                .as_i64()
                .and_then(|n| u16::try_from(n).ok())
                .map(|target| (entry["host_ip"].as_str().map(str::to_string), target)),
            entry => scalar(entry).as_deref().and_then(parse_port),
        };
        match parsed {
            Some((host_ip, target)) => found.push(Published {
                at,
                host_ip: host_ip.filter(|ip| !ip.is_empty()),
                target,
            }),
            None => problems.push(Problem::new(at, format!("{entry:?} is not one port to publish"))),
        }
    }
    (found, problems)
}

/// `[HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTOCOL]` -> (host address, container port). An
/// IPv6 address may be in brackets; split from the right it needs none.
pub fn parse_port(text: &str) -> Option<(Option<String>, u16)> {
    let text = text.split('/').next().unwrap_or(text);
    let mut parts = text.rsplitn(3, ':');
    let target = parts.next()?.parse().ok()?;
    let _host_port = parts.next();
    let host_ip = parts
        .next()
        .map(|ip| ip.trim_start_matches('[').trim_end_matches(']').to_string());
    Some((host_ip, target))
}

fn mounts(at: &Location, value: &Yaml) -> (Vec<Mount>, Vec<Problem>) {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for (i, entry) in list(value).iter().enumerate() {
        let at = at.child(&format!("volumes[{i}]"));
        let parsed = match entry {
            Yaml::Hash(_) => entry["target"].as_str().map(|target| {
                let source = entry["source"].as_str().unwrap_or(ANONYMOUS);
                (
                    source.to_string(),
                    target.to_string(),
                    entry["read_only"].as_bool() == Some(true),
                )
            }),
            entry => entry.as_str().and_then(parse_volume),
        };
        match parsed {
            Some((volume, path, read_only)) => found.push(Mount {
                path,
                read_only,
                volume,
                sub_path: None,
                at,
            }),
            None => problems.push(Problem::new(at, format!("{entry:?} is not a volume to mount"))),
        }
    }
    (found, problems)
}

/// `SOURCE:TARGET[:MODE]`, or a bare `TARGET` (an anonymous volume) -> (source, target,
/// read-only); MODE is a comma list such as `ro` or `ro,z`.
pub fn parse_volume(text: &str) -> Option<(String, String, bool)> {
    let parts: Vec<&str> = text.split(':').collect();
    match parts.as_slice() {
        [target] => Some((ANONYMOUS.to_string(), target.to_string(), false)),
        [source, target] => Some((source.to_string(), target.to_string(), false)),
        [source, target, mode] => Some((
            source.to_string(),
            target.to_string(),
            mode.split(',').any(|m| m == "ro"),
        )),
        _ => None,
    }
}

/// A host path rather than a volume's name, as Compose tells them apart.
fn is_host_path(source: &str) -> bool {
    source.starts_with(['.', '/', '~'])
}

/// A device that names neither `device_ids` nor a `count` reserves every GPU, as in Compose.
fn gpu_reservation(devices: &Yaml) -> Gpus {
    let mut count = 0;
    for device in list(devices) {
        if !list(&device["capabilities"]).iter().any(|c| c.as_str() == Some("gpu")) {
            continue;
        }
        match (device["device_ids"].as_vec(), &device["count"]) {
            (Some(ids), _) => count += u32::try_from(ids.len()).unwrap_or(u32::MAX),
            (None, Yaml::Integer(n)) => count += u32::try_from(*n).unwrap_or(0),
            (None, _) => return Gpus::All,
        }
    }
    if count == 0 { Gpus::None } else { Gpus::Count(count) }
}

fn process_count(at: &Location, service: &Yaml) -> Result<u32, Problem> {
    let (field, value) = match &service["deploy"]["replicas"] {
        Yaml::BadValue => ("scale", &service["scale"]),
        replicas => ("deploy.replicas", replicas),
    };
    match value {
        Yaml::BadValue => Ok(1),
        value => value
            .as_i64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Problem::new(at.child(field), "not a count")),
    }
}

/// Every port is published on the loopback interface only: joining a run needs no
/// credential and its connections are not encrypted (docs/DEPLOY.md, Security), so a port
/// open to the network lets anyone who reaches the machine join the run.
fn check_published(service: &Service) -> Vec<Problem> {
    let loopback = |ip: &str| ip == "localhost" || ip == "::1" || ip.starts_with("127.");
    service
        .published
        .iter()
        .filter(|p| !p.host_ip.as_deref().is_some_and(loopback))
        .map(|p| {
            let on = p.host_ip.as_deref().unwrap_or("every interface");
            Problem::new(
                p.at.clone(),
                format!(
                    "port {} is published on {on}: bind it to 127.0.0.1 (127.0.0.1:HOST_PORT:{}), since joining a \
                     run needs no credential",
                    p.target, p.target
                ),
            )
        })
        .collect()
}

/// A named volume must be declared under the top-level `volumes:`: Compose refuses a
/// project that mounts an undeclared one.
fn check_volumes(project: &Project, container: &Container) -> Vec<Problem> {
    container
        .mounts
        .iter()
        .filter(|m| m.volume != ANONYMOUS && !is_host_path(&m.volume))
        .filter(|m| project.merged()["volumes"][m.volume.as_str()].is_badvalue())
        .map(|m| {
            Problem::new(
                m.at.clone(),
                format!(
                    "no top-level volume is named {}, so Compose refuses the project",
                    m.volume
                ),
            )
        })
        .collect()
}

/// A worker given GPUs must be told to compute on them, and one told to compute on a GPU
/// must be given one: `auto` falls back to the CPU without a word when libtorch sees no GPU
/// (a missing reservation, the plain image), and `cuda` with none refuses to start.
fn check_worker_device(service: &Service) -> Option<Problem> {
    let worker = &service.container;
    let setting = worker
        .setting("--devices", "FORGER_DEVICES")
        .or_else(|| worker.setting("--device", "FORGER_DEVICE"));
    let (value, at) = match &setting {
        Some(s) => (s.value.trim(), s.at.clone()),
        None => ("auto", worker.env_at("FORGER_DEVICE")),
    };
    let devices: Vec<&str> = value.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
    let cuda = |d: &&str| *d == "cuda" || d.starts_with("cuda:");
    let reserved = service.gpus != Gpus::None;
    if reserved && !(value == "all" || (!devices.is_empty() && devices.iter().all(cuda))) {
        return Some(Problem::new(
            at,
            format!(
                "`{value}`{}, but the container reserves GPUs: use cuda (or cuda:N), since auto would train on \
                 the CPU without a word if libtorch could not see them",
                if setting.is_none() { " (not set)" } else { "" }
            ),
        ));
    }
    if !reserved && devices.iter().any(cuda) {
        return Some(Problem::new(
            at,
            format!(
                "`{value}`, but the container reserves no GPU (deploy.resources.reservations.devices), so the \
                 worker refuses to start"
            ),
        ));
    }
    None
}

/// Every check of a project against the binaries: each service on its own, then the
/// coordinator and the workers together, then the spec the coordinator mounts (a host path
/// under `root`, the repository).
pub fn check(project: &Project, root: &Path, coordinator_cli: &Cli, worker_cli: &Cli) -> Vec<Problem> {
    let (services, mut problems) = services(project);
    let mut coordinators = Vec::new();
    let mut workers = Vec::new();
    let mut deployed = Deployed::default();
    for service in &services {
        let container = &service.container;
        let cli = match container.binary {
            Binary::Coordinator => coordinator_cli,
            Binary::Worker => worker_cli,
        };
        problems.extend(check_container(container, cli));
        problems.extend(check_published(service));
        problems.extend(check_volumes(project, container));
        // A one-off run of a subcommand (`forger-coordinator credentials`) is neither the
        // coordinator nor a worker; its flags were checked above.
        if container.subcommand().is_some() {
            continue;
        }
        match container.binary {
            Binary::Coordinator => {
                if service.processes != 1 {
                    problems.push(Problem::new(
                        container.at.child("deploy.replicas"),
                        format!("{} coordinators: a run directory has exactly one", service.processes),
                    ));
                }
                coordinators.push(service);
            }
            Binary::Worker => {
                problems.extend(check_worker_device(service));
                if let Err(problem) = deployed.add(&object(&service.name), service.processes, container) {
                    problems.push(problem);
                }
                workers.push(container.clone());
            }
        }
    }
    problems.extend(check_cluster(project, root, &coordinators, &workers, &deployed));
    problems.into_iter().map(|p| project.attribute(p)).collect()
}

/// The coordinator, its address as the workers dial it, and the spec it reads.
fn check_cluster(
    project: &Project,
    root: &Path,
    coordinators: &[&Service],
    workers: &[Container],
    deployed: &Deployed,
) -> Vec<Problem> {
    let everything = Location::new(project.main_file(), "services", "");
    let [coordinator] = coordinators else {
        return vec![Problem::new(
            everything,
            format!(
                "expected one coordinator service (image forger-coordinator), found {}",
                coordinators.len()
            ),
        )];
    };
    let mut problems = Vec::new();
    if workers.is_empty() {
        problems.push(Problem::new(everything, "no worker service (image forger-worker)"));
    }
    let (port, found) = check_listen(&coordinator.container);
    problems.extend(found);
    if let Some(port) = port {
        let endpoint = Endpoint {
            at: coordinator.container.at.clone(),
            host: coordinator.name.clone(),
            port,
            target: TargetPort::Number(port),
        };
        problems.extend(check_endpoints(&coordinator.container, port, &[endpoint], workers));
    }
    match spec_text(project, root, &coordinator.container) {
        Ok((text, at)) => problems.extend(check_spec(&text, &at, deployed)),
        Err(problem) => problems.push(problem),
    }
    problems
}

/// The host file mounted where the coordinator reads its spec, and its text: the
/// default of the mount's source, relative to the project folder.
fn spec_text(project: &Project, root: &Path, coordinator: &Container) -> Result<(String, Location), Problem> {
    let Some(setting) = coordinator.setting("--spec", "FORGER_SPEC") else {
        return Err(Problem::new(coordinator.env_at("FORGER_SPEC"), "not set"));
    };
    let Some(mount) = coordinator.mount_for(&setting.value) else {
        return Err(Problem::new(
            setting.at,
            format!("{} is on no mounted volume", setting.value),
        ));
    };
    if !is_host_path(&mount.volume) {
        return Err(Problem::new(
            mount.at.clone(),
            format!(
                "{} comes from the volume {}, not a file beside the project, so the spec cannot be checked",
                setting.value, mount.volume
            ),
        ));
    }
    let inside = setting.value[mount.path.trim_end_matches('/').len()..].trim_start_matches('/');
    let mut file = project.host_path(&mount.volume);
    if !inside.is_empty() {
        file.push(inside); // the mount is a folder holding the spec
    }
    let name = file.display().to_string();
    let text = std::fs::read_to_string(root.join(&file))
        .map_err(|e| Problem::new(mount.at.clone(), format!("cannot read the spec {name}: {e}")))?;
    Ok((text, Location::new(&name, "job spec", "cluster.workers")))
}

/// Every worker reserves a GPU: for a project meant to train on GPUs (the base file with
/// `compose.gpu.yml`). With [`check`], which holds a worker given GPUs to the `-cuda` image
/// and a cuda device, this holds every worker to a GPU of its own.
pub fn check_gpu_workers(project: &Project) -> Vec<Problem> {
    // `check` reports what cannot be read.
    let (services, _) = services(project);
    services
        .iter()
        .filter(|s| s.container.binary == Binary::Worker && s.gpus == Gpus::None)
        .map(|s| {
            project.attribute(Problem::new(
                s.container.at.child("deploy.resources.reservations.devices"),
                "reserves no GPU (a device with capabilities: [gpu]), but every worker of this project is meant to \
                 compute on one",
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_port_is_read_with_its_host_address() {
        assert_eq!(
            parse_port("127.0.0.1:50051:50051"),
            Some((Some("127.0.0.1".into()), 50051))
        );
        assert_eq!(parse_port("8080:80/udp"), Some((None, 80)));
        assert_eq!(parse_port("50051"), Some((None, 50051)));
        assert_eq!(parse_port("[::1]:1:2"), Some((Some("::1".into()), 2)));
        assert_eq!(parse_port("1-2:3-4"), None);
    }

    #[test]
    fn a_volume_is_read_with_its_source_and_mode() {
        let volume = |s: &str, t: &str, ro| Some((s.to_string(), t.to_string(), ro));
        assert_eq!(
            parse_volume("./a.toml:/etc/a.toml:ro"),
            volume("./a.toml", "/etc/a.toml", true)
        );
        assert_eq!(parse_volume("run:/var/run:rw,z"), volume("run", "/var/run", false));
        assert_eq!(parse_volume("/cache"), volume(ANONYMOUS, "/cache", false));
    }

    #[test]
    fn gpus_are_counted_from_the_devices_a_service_reserves() {
        let devices = |text: &str| gpu_reservation(&yaml_rust2::YamlLoader::load_from_str(text).unwrap()[0]);
        assert_eq!(
            devices("[{driver: nvidia, device_ids: ['0', '1'], capabilities: [gpu]}]"),
            Gpus::Count(2)
        );
        assert_eq!(
            devices("[{driver: nvidia, count: 1, capabilities: [gpu]}]"),
            Gpus::Count(1)
        );
        assert_eq!(
            devices("[{driver: nvidia, count: all, capabilities: [gpu]}]"),
            Gpus::All
        );
        assert_eq!(devices("[{driver: x, count: 1, capabilities: [tpu]}]"), Gpus::None);
    }
}
