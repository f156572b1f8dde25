//! Kubernetes manifests as the checks see them: objects read from YAML, the forger
//! containers in their pod templates, the Services in front of the coordinator, the
//! ConfigMap the spec comes from, and how many workers are deployed.
//!
//! A container runs forger when its image is named `forger-coordinator` or `forger-worker`
//! (any registry or tag); other containers are left alone.

use std::collections::BTreeSet;
use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

use crate::manifest_check::cli::Cli;
use crate::manifest_check::credentials::{self, Security};
use crate::manifest_check::{
    Binary, Container, Deployed, Endpoint, GPU_TAG_SUFFIX, Location, Mount, Port, Problem, TargetPort, check_container,
    check_endpoints, check_listen, check_spec, join,
};
use forger_proto::tls::files;

/// The user and group the images run as (deploy/docker/*.Dockerfile), unless the pod says
/// otherwise (`runAsUser`, `runAsGroup`).
pub const IMAGE_USER: i64 = 10001;
pub const IMAGE_GROUP: i64 = 10001;

/// One object of a manifest file.
#[derive(Debug, Clone)]
pub struct Object {
    pub file: String,
    pub kind: String,
    pub name: String,
    pub yaml: Yaml,
}

impl Object {
    /// `Kind/name`, as kubectl names it.
    pub fn id(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }

    pub fn at(&self, field: &str) -> Location {
        Location::new(&self.file, &self.id(), field)
    }

    /// The pod template's spec and its field path, for the kinds that run pods.
    fn pod_spec(&self) -> Option<(&Yaml, &'static str)> {
        match self.kind.as_str() {
            "StatefulSet" | "Deployment" | "DaemonSet" | "ReplicaSet" | "Job" => {
                Some((&self.yaml["spec"]["template"]["spec"], "spec.template.spec"))
            }
            "CronJob" => Some((
                &self.yaml["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                "spec.jobTemplate.spec.template.spec",
            )),
            "Pod" => Some((&self.yaml["spec"], "spec")),
            _ => None,
        }
    }

    fn pod_labels(&self) -> &Yaml {
        match self.kind.as_str() {
            "CronJob" => &self.yaml["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"],
            "Pod" => &self.yaml["metadata"]["labels"],
            _ => &self.yaml["spec"]["template"]["metadata"]["labels"],
        }
    }
}

/// Parses one file's documents; `file` names it in problems.
pub fn parse(file: &str, text: &str) -> Result<Vec<Object>, Problem> {
    let docs = YamlLoader::load_from_str(text)
        .map_err(|e| Problem::new(Location::new(file, "(file)", "(syntax)"), format!("not YAML: {e}")))?;
    let mut objects = Vec::new();
    for (i, yaml) in docs.into_iter().enumerate() {
        if yaml.is_null() {
            continue; // an empty document, as after a trailing `---`
        }
        let at = Location::new(file, &format!("document {}", i + 1), "");
        let text = |field: &str, value: &Yaml| {
            value
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| Problem::new(at.child(field), "missing, or not a string"))
        };
        let kind = text("kind", &yaml["kind"])?;
        // A Kustomization has no metadata.name.
        let name = match &yaml["metadata"]["name"] {
            Yaml::BadValue if kind == "Kustomization" => "kustomization".to_string(),
            value => text("metadata.name", value)?,
        };
        objects.push(Object {
            file: file.to_string(),
            kind,
            name,
            yaml,
        });
    }
    Ok(objects)
}

/// Every `.yaml`/`.yml` file in `dir`, as (path relative to `root`, text), sorted by name.
pub fn read_dir(dir: &Path, root: &Path) -> std::io::Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let name = path.strip_prefix(root).unwrap_or(&path).display().to_string();
            files.push((name, std::fs::read_to_string(&path)?));
        }
    }
    files.sort();
    Ok(files)
}

/// Parses every file, collecting the objects and each file that fails.
pub fn parse_all(files: &[(String, String)]) -> (Vec<Object>, Vec<Problem>) {
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for (file, text) in files {
        match parse(file, text) {
            Ok(found) => objects.extend(found),
            Err(problem) => problems.push(problem),
        }
    }
    (objects, problems)
}

/// A pod volume: what a mount's name refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Volume {
    /// A ConfigMap's entries as files; `items` maps a key to a file name (empty: all keys,
    /// each under its own name).
    ConfigMap { name: String, items: Vec<(String, String)> },
    /// A claim that must exist already (the dataset).
    Claim { name: String },
    /// A StatefulSet's volumeClaimTemplates entry: a claim per pod, made by Kubernetes.
    ClaimTemplate,
    /// A Secret's entries as files: all of them, or only `items`; each file's mode is its
    /// item's, else `default_mode`, else Kubernetes' 0644.
    Secret {
        name: String,
        items: Vec<SecretItem>,
        default_mode: Option<u32>,
    },
    /// Anything else (emptyDir, hostPath, ...).
    Other,
}

/// One entry of a Secret volume's `items`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretItem {
    pub key: String,
    pub path: String,
    pub mode: Option<u32>,
}

/// A file mode as the manifest writes it. yaml-rust2 reads YAML 1.2, where `0440` is the
/// decimal 440, while kubectl reads YAML 1.1, where it is octal: the manifests write modes in
/// decimal (288 for 0440), which both read alike.
fn file_mode(value: &Yaml) -> Option<u32> {
    value
        .as_i64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n <= 0o777)
}

/// The volumes a pod can mount, by name.
pub fn volumes(object: &Object) -> Vec<(String, Volume)> {
    let Some((pod, _)) = object.pod_spec() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for volume in list(&pod["volumes"]) {
        let Some(name) = volume["name"].as_str() else {
            continue;
        };
        let config_map = &volume["configMap"];
        let kind = if config_map.is_hash() {
            Volume::ConfigMap {
                name: config_map["name"].as_str().unwrap_or_default().to_string(),
                items: list(&config_map["items"])
                    .iter()
                    .filter_map(|i| Some((i["key"].as_str()?.to_string(), i["path"].as_str()?.to_string())))
                    .collect(),
            }
        } else if volume["secret"].is_hash() {
            let secret = &volume["secret"];
            Volume::Secret {
                name: secret["secretName"].as_str().unwrap_or_default().to_string(),
                items: list(&secret["items"])
                    .iter()
                    .filter_map(|i| {
                        Some(SecretItem {
                            key: i["key"].as_str()?.to_string(),
                            path: i["path"].as_str()?.to_string(),
                            mode: file_mode(&i["mode"]),
                        })
                    })
                    .collect(),
                default_mode: file_mode(&secret["defaultMode"]),
            }
        } else if let Some(claim) = volume["persistentVolumeClaim"]["claimName"].as_str() {
            Volume::Claim {
                name: claim.to_string(),
            }
        } else {
            Volume::Other
        };
        found.push((name.to_string(), kind));
    }
    if object.kind == "StatefulSet" {
        for template in list(&object.yaml["spec"]["volumeClaimTemplates"]) {
            if let Some(name) = template["metadata"]["name"].as_str() {
                found.push((name.to_string(), Volume::ClaimTemplate));
            }
        }
    }
    found
}

/// Where a container entry of a pod template is: by its name, else its index.
fn entry_at(object: &Object, pod_field: &str, list_name: &str, index: usize, entry: &Yaml) -> Location {
    let label = entry["name"].as_str().map_or_else(|| index.to_string(), str::to_string);
    object.at(&format!("{pod_field}.{list_name}[{label}]"))
}

/// The YAML a container was read from.
fn container_entry<'o>(object: &'o Object, container: &Container) -> Option<&'o Yaml> {
    let (pod, pod_field) = object.pod_spec()?;
    ["initContainers", "containers"].into_iter().find_map(|list_name| {
        list(&pod[list_name])
            .iter()
            .enumerate()
            .find(|(i, entry)| entry_at(object, pod_field, list_name, *i, entry) == container.at)
            .map(|(_, entry)| entry)
    })
}

/// The forger containers of an object's pod template, and what in them cannot be read.
pub fn containers(object: &Object) -> (Vec<Container>, Vec<Problem>) {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    let Some((pod, pod_field)) = object.pod_spec() else {
        return (found, problems);
    };
    for (list_name, entries) in [
        ("initContainers", &pod["initContainers"]),
        ("containers", &pod["containers"]),
    ] {
        for (i, entry) in list(entries).iter().enumerate() {
            let at = entry_at(object, pod_field, list_name, i, entry);
            let Some(image) = entry["image"].as_str() else {
                continue;
            };
            let Some(binary) = image_binary(image) else {
                continue;
            };
            let mut container = Container::new(at.clone(), binary);
            container.image = Some(image.to_string());
            let command = strings(&entry["command"]);
            if let Some(executable) = command.first() {
                if Binary::named(executable) != Some(binary) {
                    problems.push(Problem::new(
                        at.child("command[0]"),
                        format!(
                            "`{executable}` does not run {}, which image {image} holds",
                            binary.name()
                        ),
                    ));
                }
                container.args.extend(command[1..].iter().cloned());
                container.args_field = "command".into();
            }
            container.args.extend(strings(&entry["args"]));
            for var in list(&entry["env"]) {
                let Some(name) = var["name"].as_str() else {
                    continue;
                };
                let value = match &var["value"] {
                    Yaml::String(s) => Some(s.clone()),
                    Yaml::BadValue => None,
                    other => {
                        // The API server refuses the whole object over an unquoted number.
                        problems.push(Problem::new(
                            at.child(&format!("env[{name}].value")),
                            format!("{other:?} is not a string: quote it"),
                        ));
                        scalar(other)
                    }
                };
                container.env.insert(name.to_string(), value);
            }
            container.gpus = match &entry["resources"]["limits"]["nvidia.com/gpu"] {
                Yaml::Integer(n) => u32::try_from(*n).ok(),
                Yaml::String(n) => n.parse().ok(),
                _ => None,
            };
            for port in list(&entry["ports"]) {
                if let Some(number) = port["containerPort"].as_i64().and_then(|n| u16::try_from(n).ok()) {
                    container.ports.push(Port {
                        name: port["name"].as_str().map(str::to_string),
                        number,
                    });
                }
            }
            for mount in list(&entry["volumeMounts"]) {
                let (Some(path), Some(volume)) = (mount["mountPath"].as_str(), mount["name"].as_str()) else {
                    continue;
                };
                container.mounts.push(Mount {
                    path: path.to_string(),
                    read_only: mount["readOnly"].as_bool().unwrap_or(false),
                    volume: volume.to_string(),
                    sub_path: mount["subPath"].as_str().map(str::to_string),
                    at: at.child(&format!("volumeMounts[{volume}]")),
                });
            }
            found.push(container);
        }
    }
    (found, problems)
}

/// The binary an image runs, from its name without registry, tag or digest.
pub fn image_binary(image: &str) -> Option<Binary> {
    let name = image.split('@').next().unwrap_or(image);
    let last = name.rsplit('/').next().unwrap_or(name);
    Binary::named(last.split(':').next().unwrap_or(last))
}

/// How many pods an object runs: replicas, or a Job's parallelism (which must equal its
/// completions, or some workers would start only after others finish).
pub fn pod_count(object: &Object) -> Result<u32, Problem> {
    let spec = &object.yaml["spec"];
    let count = |field: &str, value: &Yaml| match value {
        Yaml::BadValue => Ok(1),
        value => value
            .as_i64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Problem::new(object.at(field), "not a count")),
    };
    match object.kind.as_str() {
        "StatefulSet" | "Deployment" | "ReplicaSet" => count("spec.replicas", &spec["replicas"]),
        "Pod" => Ok(1),
        "Job" => {
            let parallelism = count("spec.parallelism", &spec["parallelism"])?;
            let completions = count("spec.completions", &spec["completions"])?;
            if parallelism != completions {
                return Err(Problem::new(
                    object.at("spec.parallelism"),
                    format!(
                        "{parallelism} differs from spec.completions = {completions}: every worker must run at once"
                    ),
                ));
            }
            Ok(parallelism)
        }
        _ => Err(Problem::new(
            object.at("kind"),
            "cannot tell how many pods this kind runs",
        )),
    }
}

/// A Service's ports, as endpoints named by the Service, if it selects the given pod labels.
fn service_endpoints(service: &Object, pod_labels: &Yaml) -> Vec<Endpoint> {
    let selector = service.yaml["spec"]["selector"].as_hash();
    let selects = selector
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| pod_labels[k.as_str().unwrap_or_default()] == *v));
    if !selects {
        return Vec::new();
    }
    list(&service.yaml["spec"]["ports"])
        .iter()
        .enumerate()
        .filter_map(|(i, port)| {
            let number = port["port"].as_i64().and_then(|n| u16::try_from(n).ok())?;
            let label = port["name"].as_str().map_or_else(|| i.to_string(), str::to_string);
            let target = match &port["targetPort"] {
                Yaml::String(name) => TargetPort::Name(name.clone()),
                Yaml::Integer(n) => TargetPort::Number(u16::try_from(*n).ok()?),
                // Left out, targetPort is the port itself.
                _ => TargetPort::Number(number),
            };
            Some(Endpoint {
                at: service.at(&format!("spec.ports[{label}].targetPort")),
                host: service.name.clone(),
                port: number,
                target,
            })
        })
        .collect()
}

/// The spec file the coordinator reads, traced through its mount to a ConfigMap entry.
pub fn spec_text(objects: &[Object], owner: &Object, coordinator: &Container) -> Result<(String, Location), Problem> {
    let Some(setting) = coordinator.setting("--spec", "FORGER_SPEC") else {
        return Err(Problem::new(coordinator.at.child("env[FORGER_SPEC]"), "not set"));
    };
    let Some(mount) = coordinator.mount_for(&setting.value) else {
        return Err(Problem::new(
            setting.at,
            format!("{} is on no mounted volume", setting.value),
        ));
    };
    let file = match &mount.sub_path {
        Some(sub) => sub.clone(),
        None => setting.value[mount.path.trim_end_matches('/').len()..]
            .trim_start_matches('/')
            .to_string(),
    };
    let volume = volumes(owner).into_iter().find(|(name, _)| *name == mount.volume);
    let Some((_, Volume::ConfigMap { name, items })) = volume else {
        return Err(Problem::new(
            mount.at.clone(),
            format!(
                "{} comes from no ConfigMap, so the spec cannot be checked",
                setting.value
            ),
        ));
    };
    let key = if items.is_empty() {
        Some(file.clone())
    } else {
        items.iter().find(|(_, path)| *path == file).map(|(key, _)| key.clone())
    };
    let Some(key) = key else {
        return Err(Problem::new(
            mount.at.clone(),
            format!("no item of ConfigMap {name} is mounted as {file} ({})", setting.value),
        ));
    };
    let Some(config_map) = objects.iter().find(|o| o.kind == "ConfigMap" && o.name == name) else {
        return Err(Problem::new(
            mount.at.clone(),
            format!("ConfigMap {name} is not in these manifests"),
        ));
    };
    let at = config_map.at(&format!("data.{key}"));
    match config_map.yaml["data"][key.as_str()].as_str() {
        Some(text) => Ok((text.to_string(), at)),
        None => Err(Problem::new(at, "missing")),
    }
}

/// Every mount names a volume of its pod, and the run directory lives on a claim so it
/// outlives the pod.
fn check_volumes(owner: &Object, container: &Container) -> Vec<Problem> {
    let volumes = volumes(owner);
    let mut problems = Vec::new();
    for mount in &container.mounts {
        if !volumes.iter().any(|(name, _)| *name == mount.volume) {
            problems.push(Problem::new(
                mount.at.clone(),
                format!("no volume or volumeClaimTemplate is named {}", mount.volume),
            ));
        }
    }
    if let Some(out) = container.setting("--out", "FORGER_OUT")
        && let Some(mount) = container.mount_for(&out.value)
    {
        let volume = volumes.iter().find(|(name, _)| *name == mount.volume).map(|(_, v)| v);
        if !matches!(volume, Some(Volume::Claim { .. } | Volume::ClaimTemplate)) {
            problems.push(Problem::new(
                mount.at.clone(),
                format!(
                    "the run directory {} is on no PersistentVolumeClaim: checkpoints would be lost with the pod",
                    out.value
                ),
            ));
        }
    }
    problems
}

/// Whether a container of `owner` may read a Secret's file of `mode`. The kubelet writes a
/// Secret's files as root's; with the pod's `fsGroup` it gives them to that group and adds
/// read for it (`mode | 0440`), and the process is in that group (pkg/volume/volume_linux.go).
fn secret_file_readable(owner: &Object, entry: &Yaml, mode: u32) -> bool {
    let Some((pod, _)) = owner.pod_spec() else {
        return true;
    };
    let pod_context = &pod["securityContext"];
    let context = &entry["securityContext"];
    let either = |field: &str| context[field].as_i64().or_else(|| pod_context[field].as_i64());
    let user = either("runAsUser").unwrap_or(IMAGE_USER);
    let fs_group = pod_context["fsGroup"].as_i64();
    let (file_group, mode) = match fs_group {
        Some(group) => (group, mode | 0o440),
        None => (0, mode),
    };
    let mut groups = vec![either("runAsGroup").unwrap_or(IMAGE_GROUP)];
    groups.extend(fs_group);
    groups.extend(list(&pod_context["supplementalGroups"]).iter().filter_map(Yaml::as_i64));
    user == 0 || mode & 0o004 != 0 || (mode & 0o040 != 0 && groups.contains(&file_group))
}

/// The credentials folder a container reads must reach it whole and readable: from a Secret
/// rather than a ConfigMap (which anyone allowed to read the namespace's configuration can
/// read), with every file its binary opens when the volume lists `items`, without the CA's
/// key (no running process needs it, and whoever has it can sign a certificate the cluster
/// trusts), and with modes the process's user may read. `mutual` is the coordinator's
/// `--mtls`, which decides what a worker needs too.
fn check_credentials_volume(owner: &Object, container: &Container, mutual: bool) -> Vec<Problem> {
    let (Security::Credentials { dir, .. }, Some((_, pod_field))) =
        (credentials::security(container), owner.pod_spec())
    else {
        return Vec::new();
    };
    if container.subcommand().is_some() {
        return Vec::new();
    }
    // check_mounts reports a folder on no volume, check_volumes a volume that is not there.
    let Some(mount) = container.mount_for(&dir.value) else {
        return Vec::new();
    };
    let Some((_, volume)) = volumes(owner).into_iter().find(|(name, _)| *name == mount.volume) else {
        return Vec::new();
    };
    let volume_at = |field: &str| owner.at(&format!("{pod_field}.volumes[{}].{field}", mount.volume));
    let (items, default_mode) = match volume {
        Volume::Secret {
            items, default_mode, ..
        } => (items, default_mode),
        Volume::ConfigMap { name, .. } => {
            return vec![Problem::new(
                volume_at("configMap"),
                format!(
                    "the credentials {} come from ConfigMap {name}: keys and the job token belong in a Secret",
                    dir.value
                ),
            )];
        }
        _ => return Vec::new(),
    };
    // Where the folder's files lie in the volume.
    let below = dir.value.trim_end_matches('/')[mount.path.trim_end_matches('/').len()..].trim_matches('/');
    let prefix = [mount.sub_path.as_deref().unwrap_or(""), below]
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| format!("{}/", p.trim_matches('/')))
        .collect::<String>();
    let mut wanted = credentials::files_read(container.binary, mutual);
    let item = |file: &str| items.iter().find(|i| i.path == format!("{prefix}{file}"));
    // A worker shows its certificate whenever the folder has one, and then needs its key.
    if container.binary == Binary::Worker && !items.is_empty() && item(files::WORKER_CERT).is_some() {
        for file in [files::WORKER_CERT, files::WORKER_KEY] {
            if !wanted.contains(&file) {
                wanted.push(file);
            }
        }
    }
    let mut problems = Vec::new();
    if !items.is_empty() {
        let missing: Vec<&str> = wanted.iter().copied().filter(|f| item(f).is_none()).collect();
        if !missing.is_empty() {
            problems.push(Problem::new(
                volume_at("secret.items"),
                format!(
                    "{} reads {} in {}, which these items leave out{}",
                    container.binary.name(),
                    missing.join(", "),
                    dir.value,
                    if mutual && container.binary == Binary::Worker {
                        " (the coordinator asks for the workers' certificate: FORGER_MTLS)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        if items.iter().any(|i| i.key == files::CA_KEY) {
            problems.push(Problem::new(
                volume_at("secret.items"),
                format!(
                    "mounts {}: no running process reads it, and whoever does can sign certificates this cluster \
                     trusts; leave it out",
                    files::CA_KEY
                ),
            ));
        }
    }
    let Some(entry) = container_entry(owner, container) else {
        return problems;
    };
    let unreadable: Vec<String> = wanted
        .iter()
        .filter_map(|file| {
            let mode = item(file).and_then(|i| i.mode).or(default_mode).unwrap_or(0o644);
            (!secret_file_readable(owner, entry, mode)).then(|| format!("{file} ({mode:04o})"))
        })
        .collect();
    if !unreadable.is_empty() {
        problems.push(Problem::new(
            volume_at("secret.defaultMode"),
            format!(
                "the process (user {}) cannot read {}: the Secret's files are root's; set the pod's \
                 securityContext.fsGroup to {IMAGE_GROUP}, which gives them to the image's group",
                IMAGE_USER,
                join(unreadable)
            ),
        ));
    }
    problems
}

/// Every check of a set of manifests against the binaries: each container on its own, then
/// the coordinator, its Service and the workers together, then the spec.
pub fn check(objects: &[Object], coordinator_cli: &Cli, worker_cli: &Cli) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut coordinators = Vec::new();
    let mut workers = Vec::new();
    let mut deployed = Deployed::default();
    for object in objects {
        let (found, unreadable) = containers(object);
        problems.extend(unreadable);
        if found.is_empty() {
            continue;
        }
        let pods = match pod_count(object) {
            Ok(pods) => pods,
            Err(problem) => {
                problems.push(problem);
                0
            }
        };
        for container in found {
            let cli = match container.binary {
                Binary::Coordinator => coordinator_cli,
                Binary::Worker => worker_cli,
            };
            problems.extend(check_container(&container, cli));
            problems.extend(check_volumes(object, &container));
            match container.binary {
                Binary::Coordinator => {
                    if pods != 1 {
                        problems.push(Problem::new(
                            object.at("spec.replicas"),
                            format!("{pods} coordinators: a run directory has exactly one"),
                        ));
                    }
                    coordinators.push((object, container));
                }
                Binary::Worker => {
                    if let Err(problem) = deployed.add(&object.id(), pods, &container) {
                        problems.push(problem);
                    }
                    workers.push((object, container));
                }
            }
        }
    }
    let [(owner, coordinator)] = coordinators.as_slice() else {
        let mut at = Location::new("(all files)", "(all objects)", "containers");
        if let Some((owner, _)) = coordinators.get(1) {
            at = owner.at("spec.template.spec.containers");
        }
        problems.push(Problem::new(
            at,
            format!("expected one coordinator container, found {}", coordinators.len()),
        ));
        return problems;
    };
    if workers.is_empty() {
        problems.push(Problem::new(
            Location::new("(all files)", "(all objects)", "containers"),
            "no worker container (image forger-worker)",
        ));
    }
    let mutual = matches!(
        credentials::security(coordinator),
        Security::Credentials { mutual: true, .. }
    );
    problems.extend(check_credentials_volume(owner, coordinator, mutual));
    for (object, worker) in &workers {
        problems.extend(check_credentials_volume(object, worker, mutual));
    }
    let workers: Vec<Container> = workers.into_iter().map(|(_, worker)| worker).collect();
    problems.extend(credentials::check_agreement(coordinator, &workers));
    let endpoints: Vec<Endpoint> = objects
        .iter()
        .filter(|o| o.kind == "Service")
        .flat_map(|s| service_endpoints(s, owner.pod_labels()))
        .collect();
    if endpoints.is_empty() {
        problems.push(Problem::new(
            owner.at("spec.template.metadata.labels"),
            "no Service selects the coordinator's pods, so workers cannot reach it",
        ));
    }
    let (port, found) = check_listen(coordinator);
    problems.extend(found);
    if let Some(port) = port {
        problems.extend(check_endpoints(coordinator, port, &endpoints, &workers));
    }
    match spec_text(objects, owner, coordinator) {
        Ok((text, at)) => problems.extend(check_spec(&text, &at, &deployed)),
        Err(problem) => problems.push(problem),
    }
    problems
}

/// The kustomization must list every other manifest in its folder, and only those: a file
/// left out is silently not applied.
pub fn check_kustomization(objects: &[Object], files: &[(String, String)]) -> Vec<Problem> {
    let Some(kustomization) = objects.iter().find(|o| o.kind == "Kustomization") else {
        return vec![Problem::new(
            Location::new("kustomization.yaml", "Kustomization", ""),
            "no kustomization in these files",
        )];
    };
    let base = Path::new(&kustomization.file).parent().unwrap_or(Path::new(""));
    let listed: BTreeSet<String> = strings(&kustomization.yaml["resources"])
        .iter()
        .map(|r| base.join(r).display().to_string())
        .collect();
    let present: BTreeSet<String> = files
        .iter()
        .map(|(file, _)| file.clone())
        .filter(|file| *file != kustomization.file)
        .collect();
    let mut problems = Vec::new();
    for missing in present.difference(&listed) {
        problems.push(Problem::new(
            kustomization.at("resources"),
            format!("{missing} is not listed, so `kubectl apply -k` leaves it out"),
        ));
    }
    for extra in listed.difference(&present) {
        problems.push(Problem::new(
            kustomization.at("resources"),
            format!("{extra} does not exist"),
        ));
    }
    // An `images:` entry retags what the manifests name, so it can undo the GPU variant.
    let gpu_workers = objects
        .iter()
        .flat_map(|o| containers(o).0)
        .any(|c| c.binary == Binary::Worker && c.gpus.is_some_and(|n| n >= 1));
    for (i, image) in list(&kustomization.yaml["images"]).iter().enumerate() {
        let (Some(name), Some(tag)) = (image["name"].as_str(), scalar(&image["newTag"])) else {
            continue;
        };
        if gpu_workers && image_binary(name) == Some(Binary::Worker) && !tag.ends_with(GPU_TAG_SUFFIX) {
            problems.push(Problem::new(
                kustomization.at(&format!("images[{i}].newTag")),
                format!(
                    "{tag} is not the worker's GPU variant (ending in {GPU_TAG_SUFFIX}), but the workers are given GPUs"
                ),
            ));
        }
    }
    problems
}

pub(super) fn list(value: &Yaml) -> &[Yaml] {
    value.as_vec().map_or(&[], Vec::as_slice)
}

fn strings(value: &Yaml) -> Vec<String> {
    list(value).iter().filter_map(scalar).collect()
}

pub(super) fn scalar(value: &Yaml) -> Option<String> {
    match value {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(n) => Some(n.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_names_its_binary_whatever_its_registry_and_tag() {
        assert_eq!(image_binary("forger-worker:0.1.0"), Some(Binary::Worker));
        assert_eq!(
            image_binary("registry.example.com:5000/ml/forger-coordinator:0.1.0"),
            Some(Binary::Coordinator)
        );
        assert_eq!(image_binary("forger-worker@sha256:abc"), Some(Binary::Worker));
        assert_eq!(image_binary("busybox:1.36"), None);
    }

    #[test]
    fn a_secret_s_files_are_readable_through_the_fs_group_their_mode_or_root() {
        let problems_of = |security: &str, mode: u32, mutual: bool| {
            let text = format!(
                "\
kind: Pod
metadata: {{name: w}}
spec:
  securityContext: {security}
  containers:
    - name: w
      image: forger-worker:1
      env:
        - {{name: FORGER_CREDENTIALS, value: /creds/cluster}}
      volumeMounts:
        - {{name: c, mountPath: /creds, readOnly: true}}
  volumes:
    - name: c
      secret:
        secretName: s
        defaultMode: {mode}
        items:
          - {{key: ca.pem, path: cluster/ca.pem}}
          - {{key: token, path: cluster/token, mode: 420}}
"
            );
            let objects = parse("p.yaml", &text).unwrap();
            let (found, _) = containers(&objects[0]);
            check_credentials_volume(&objects[0], &found[0], mutual)
        };
        let problems = |security: &str, mode: u32| problems_of(security, mode, false);
        // 0400, and the fsGroup adds 0440 for its group.
        assert_eq!(problems("{fsGroup: 10001}", 0o400), []);
        // Without it only the token, 0644 by its item's mode, is readable by user 10001.
        let found = problems("{}", 0o400);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].at.field, "spec.volumes[c].secret.defaultMode");
        assert!(
            found[0]
                .message
                .starts_with("the process (user 10001) cannot read ca.pem (0400): "),
            "{}",
            found[0]
        );
        assert_eq!(problems("{runAsUser: 0}", 0o400), []);
        assert_eq!(problems("{runAsGroup: 0}", 0o440), []);
        // Under mutual TLS the worker also opens its certificate and key, which the items lack.
        let found = problems_of("{fsGroup: 10001}", 0o400, true);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].at.field, "spec.volumes[c].secret.items");
        assert!(
            found[0].message.starts_with(
                "forger-worker reads worker.pem, worker.key in /creds/cluster, which these items leave out"
            ),
            "{}",
            found[0]
        );
    }

    #[test]
    fn an_unquoted_number_in_env_is_reported() {
        let text = "\
kind: Pod
metadata: {name: w}
spec:
  containers:
    - name: w
      image: forger-worker:1
      env:
        - {name: FORGER_THREADS, value: 8}
";
        let objects = parse("p.yaml", text).unwrap();
        let (found, problems) = containers(&objects[0]);
        assert_eq!(found[0].env["FORGER_THREADS"], Some("8".to_string()));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].at.field, "spec.containers[w].env[FORGER_THREADS].value");
    }
}
