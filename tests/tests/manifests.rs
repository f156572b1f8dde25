//! The deployment files under `deploy/` against the built binaries' `--help`: the Kubernetes
//! manifests, the docker-compose files (alone and with the GPU override) and the Slurm script
//! must use only flags and variables the binaries read, and agree with each other on ports,
//! names, volumes and the number of workers. The negative tests break one thing in a copy of
//! the real files and expect the checker to name it.

use std::sync::OnceLock;

use forger_tests::manifest_check::cli::Cli;
use forger_tests::manifest_check::compose::{self, Gpus, Project};
use forger_tests::manifest_check::{
    Binary, Container, Problem, check_env_names, check_flags, check_switch_values, credentials, k8s, report, script,
};
use forger_tests::{binary, repo_root};

const SLURM_SCRIPT: &str = "deploy/slurm/forger.sbatch";
const COMPOSE: &str = "deploy/docker-compose.yml";
const COMPOSE_GPU: &str = "deploy/compose.gpu.yml";

/// The coordinator's and the worker's command lines, read once from the release binaries.
fn clis() -> &'static (Cli, Cli) {
    static CLIS: OnceLock<(Cli, Cli)> = OnceLock::new();
    CLIS.get_or_init(|| {
        let load = |b: Binary| Cli::load(b, &binary(b.name())).expect("read the binary's --help");
        (load(Binary::Coordinator), load(Binary::Worker))
    })
}

fn k8s_files() -> Vec<(String, String)> {
    let root = repo_root();
    let files = k8s::read_dir(&root.join("deploy/k8s"), &root).expect("read deploy/k8s");
    assert!(
        files.len() >= 4,
        "expected the manifests in deploy/k8s, found {files:?}"
    );
    files
}

/// `files` with each `(from, to)` applied once to the file ending in `file`; every `from`
/// must be there, so a test cannot pass by changing nothing.
fn edited(mut files: Vec<(String, String)>, file: &str, edits: &[(&str, &str)]) -> Vec<(String, String)> {
    let (_, text) = files
        .iter_mut()
        .find(|(name, _)| name.ends_with(file))
        .unwrap_or_else(|| panic!("no file {file}"));
    for (from, to) in edits {
        assert!(text.contains(from), "{file} no longer contains `{from}`");
        *text = text.replacen(from, to, 1);
    }
    files
}

fn k8s_files_with(file: &str, edits: &[(&str, &str)]) -> Vec<(String, String)> {
    edited(k8s_files(), file, edits)
}

fn k8s_problems(files: &[(String, String)]) -> Vec<Problem> {
    let (coordinator, worker) = clis();
    let (objects, mut problems) = k8s::parse_all(files);
    problems.extend(k8s::check(&objects, coordinator, worker));
    problems.extend(k8s::check_kustomization(&objects, files));
    problems
}

/// The one problem at `field` of `object` in `file`, whose message contains `words`.
fn expect_problem<'p>(problems: &'p [Problem], file: &str, object: &str, field: &str, words: &str) -> &'p Problem {
    problems
        .iter()
        .find(|p| p.at.file == file && p.at.object == object && p.at.field == field && p.message.contains(words))
        .unwrap_or_else(|| {
            panic!(
                "expected a problem at {file}: {object}: {field} saying `{words}`, found:\n{}",
                report(problems)
            )
        })
}

/// The compose project's files as `docker compose -f` takes them: the base file, then the GPU
/// override when `gpu`.
fn compose_files(gpu: bool) -> Vec<(String, String)> {
    let names: &[&str] = if gpu { &[COMPOSE, COMPOSE_GPU] } else { &[COMPOSE] };
    names
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(repo_root().join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"));
            (name.to_string(), text)
        })
        .collect()
}

fn compose_files_with(gpu: bool, file: &str, edits: &[(&str, &str)]) -> Vec<(String, String)> {
    edited(compose_files(gpu), file, edits)
}

/// Every problem of the project; with `gpu`, also every worker must reserve a GPU.
fn compose_problems(files: &[(String, String)], gpu: bool) -> Vec<Problem> {
    let (coordinator, worker) = clis();
    let project = match Project::load(files) {
        Ok(project) => project,
        Err(problem) => return vec![problem],
    };
    let mut problems = compose::check(&project, &repo_root(), coordinator, worker);
    if gpu {
        problems.extend(compose::check_gpu_workers(&project));
    }
    problems
}

/// The script's three invocations: the credentials, the coordinator, the workers.
fn slurm_invocations(text: &str) -> Vec<Container> {
    let found = script::invocations(SLURM_SCRIPT, text);
    let runs: Vec<(Binary, Option<&str>)> = found.iter().map(|c| (c.binary, c.subcommand())).collect();
    assert_eq!(
        runs,
        [
            (Binary::Coordinator, Some("credentials")),
            (Binary::Coordinator, None),
            (Binary::Worker, None)
        ],
        "{found:#?}"
    );
    found
}

fn script_problems(found: &[Container]) -> Vec<Problem> {
    let (coordinator, worker) = clis();
    let mut problems = Vec::new();
    for container in found {
        let cli = match container.binary {
            Binary::Coordinator => coordinator,
            Binary::Worker => worker,
        };
        problems.extend(check_env_names(container, cli));
        problems.extend(check_switch_values(container, cli));
        problems.extend(check_flags(container, cli));
        problems.extend(credentials::check_security(container));
    }
    problems.extend(credentials::check_script(found));
    problems
}

#[test]
fn the_kubernetes_manifests_agree_with_the_binaries() {
    let problems = k8s_problems(&k8s_files());
    assert!(
        problems.is_empty(),
        "deploy/k8s disagrees with the binaries:\n{}",
        report(&problems)
    );
}

#[test]
fn the_kubernetes_reader_finds_one_coordinator_and_gpu_workers_driving_every_device() {
    let (objects, problems) = k8s::parse_all(&k8s_files());
    assert!(problems.is_empty(), "{}", report(&problems));
    let containers: Vec<(&k8s::Object, Container)> = objects
        .iter()
        .flat_map(|o| k8s::containers(o).0.into_iter().map(move |c| (o, c)))
        .collect();
    let of = |b: Binary| containers.iter().filter(move |(_, c)| c.binary == b);
    assert_eq!(of(Binary::Coordinator).count(), 1);
    let (job, worker) = of(Binary::Worker).next().expect("a worker container");
    assert_eq!(job.id(), "Job/forger-workers");
    assert_eq!(job.yaml["spec"]["completionMode"].as_str(), Some("Indexed"));
    assert_eq!(worker.env["FORGER_DEVICES"].as_deref(), Some("all"));
    let gpus = &job.yaml["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"];
    assert!(
        gpus.as_i64().is_some_and(|n| n >= 1),
        "the workers ask for GPUs: {gpus:?}"
    );
}

#[test]
fn the_slurm_script_uses_only_flags_the_binaries_have() {
    let text = std::fs::read_to_string(repo_root().join(SLURM_SCRIPT)).expect("read the Slurm script");
    let found = slurm_invocations(&text);
    assert!(
        found[2].args.windows(2).any(|w| w == ["--devices", "all"]),
        "each node's worker drives every GPU: {:?}",
        found[2].args
    );
    assert!(
        matches!(
            credentials::security(&found[1]),
            credentials::Security::Credentials { mutual: true, .. }
        ),
        "the coordinator runs mutual TLS: {:?}",
        found[1].args
    );
    let problems = script_problems(&found);
    assert!(
        problems.is_empty(),
        "{SLURM_SCRIPT} disagrees with the binaries:\n{}",
        report(&problems)
    );
}

#[test]
fn a_misspelt_env_name_is_reported_with_its_file_object_and_field() {
    let files = k8s_files_with(
        "coordinator-statefulset.yaml",
        &[("name: FORGER_RESUME", "name: FORGER_RESUMES")],
    );
    let problems = k8s_problems(&files);
    expect_problem(
        &problems,
        "deploy/k8s/coordinator-statefulset.yaml",
        "StatefulSet/forger-coordinator",
        "spec.template.spec.containers[coordinator].env[FORGER_RESUMES]",
        "FORGER_RESUMES is not an environment variable of forger-coordinator",
    );
}

#[test]
fn a_service_port_other_than_the_one_workers_dial_is_reported() {
    let files = k8s_files_with("coordinator-service.yaml", &[("port: 50051", "port: 50052")]);
    let problems = k8s_problems(&files);
    expect_problem(
        &problems,
        "deploy/k8s/workers-job.yaml",
        "Job/forger-workers",
        "spec.template.spec.containers[worker].env[FORGER_COORDINATOR]",
        "dials port 50051, but Service/forger-coordinator serves port 50052",
    );
}

#[test]
fn a_listen_port_that_the_service_and_container_do_not_forward_is_reported() {
    let files = k8s_files_with(
        "coordinator-statefulset.yaml",
        &[("value: \"0.0.0.0:50051\"", "value: \"0.0.0.0:50061\"")],
    );
    let problems = k8s_problems(&files);
    expect_problem(
        &problems,
        "deploy/k8s/coordinator-service.yaml",
        "Service/forger-coordinator",
        "spec.ports[grpc].targetPort",
        "forwards to port 50051, but the coordinator listens on 50061",
    );
    expect_problem(
        &problems,
        "deploy/k8s/coordinator-statefulset.yaml",
        "StatefulSet/forger-coordinator",
        "spec.template.spec.containers[coordinator].ports",
        "listens on port 50061",
    );
}

#[test]
fn a_spec_asking_for_other_than_the_deployed_replicas_is_reported() {
    let files = k8s_files_with(
        "workers-job.yaml",
        &[
            ("completions: 2", "completions: 3"),
            ("parallelism: 2", "parallelism: 3"),
        ],
    );
    let problems = k8s_problems(&files);
    expect_problem(
        &problems,
        "deploy/k8s/spec-configmap.yaml",
        "ConfigMap/forger-spec",
        "data.spec.toml",
        "cluster.workers = 8 but 12 replica(s) are deployed (Job/forger-workers: 3 process(es) x 4 replica(s))",
    );
    // Fewer GPUs per pod is fewer replicas, just as fewer pods is.
    let files = k8s_files_with("workers-job.yaml", &[("nvidia.com/gpu: 4", "nvidia.com/gpu: 2")]);
    let problems = k8s_problems(&files);
    expect_problem(
        &problems,
        "deploy/k8s/spec-configmap.yaml",
        "ConfigMap/forger-spec",
        "data.spec.toml",
        "cluster.workers = 8 but 4 replica(s)",
    );
}

#[test]
fn a_gpu_worker_on_the_plain_worker_image_is_reported() {
    let files = k8s_files_with(
        "workers-job.yaml",
        &[("image: forger-worker:0.1.0-cuda", "image: forger-worker:0.1.0")],
    );
    expect_problem(
        &k8s_problems(&files),
        "deploy/k8s/workers-job.yaml",
        "Job/forger-workers",
        "spec.template.spec.containers[worker].image",
        "forger-worker:0.1.0 is given GPUs but is not the worker's GPU variant",
    );
    let files = k8s_files_with("kustomization.yaml", &[("newTag: \"0.1.0-cuda\"", "newTag: \"0.1.0\"")]);
    expect_problem(
        &k8s_problems(&files),
        "deploy/k8s/kustomization.yaml",
        "Kustomization/kustomization",
        "images[1].newTag",
        "0.1.0 is not the worker's GPU variant",
    );
}

#[test]
fn a_run_directory_on_a_read_only_mount_is_reported() {
    let files = k8s_files_with(
        "coordinator-statefulset.yaml",
        &[(
            "mountPath: /var/lib/forger\n",
            "mountPath: /var/lib/forger\n              readOnly: true\n",
        )],
    );
    let problems = k8s_problems(&files);
    expect_problem(
        &problems,
        "deploy/k8s/coordinator-statefulset.yaml",
        "StatefulSet/forger-coordinator",
        "spec.template.spec.containers[coordinator].volumeMounts[run]",
        "mounted read-only",
    );
}

#[test]
fn a_misspelt_flag_in_the_slurm_script_is_reported() {
    let text = std::fs::read_to_string(repo_root().join(SLURM_SCRIPT)).expect("read the Slurm script");
    assert!(text.contains("--patience-secs"));
    let found = slurm_invocations(&text.replacen("--patience-secs", "--patience", 1));
    let problems = script_problems(&found);
    let hit = problems
        .iter()
        .find(|p| p.message.starts_with("--patience is not a flag of forger-worker"))
        .unwrap_or_else(|| panic!("expected --patience to be reported, found:\n{}", report(&problems)));
    assert_eq!(hit.at.file, SLURM_SCRIPT);
    assert!(hit.at.object.starts_with("forger-worker at line "), "{hit}");
    assert_eq!(hit.at.field, "args");
}

#[test]
fn both_kinds_of_pod_read_their_credentials_from_the_secret() {
    let (objects, _) = k8s::parse_all(&k8s_files());
    let containers: Vec<Container> = objects.iter().flat_map(|o| k8s::containers(o).0).collect();
    assert_eq!(containers.len(), 2);
    for container in &containers {
        let credentials::Security::Credentials { dir, mutual } = credentials::security(container) else {
            panic!("{} runs without credentials", container.at);
        };
        assert_eq!(mutual, container.binary == Binary::Coordinator, "{}", container.at);
        let mount = container.mount_for(&dir.value).expect("the credentials are mounted");
        assert!(mount.read_only, "{}", mount.at);
        let owner = objects.iter().find(|o| o.id() == container.at.object).unwrap();
        let volume = k8s::volumes(owner).into_iter().find(|(name, _)| *name == mount.volume);
        assert!(
            matches!(volume, Some((_, k8s::Volume::Secret { ref name, .. })) if name == "forger-credentials"),
            "{volume:?}"
        );
    }
}

#[test]
fn credentials_the_workers_cannot_read_or_lack_are_reported() {
    // Without fsGroup the Secret's files stay root's, mode 0440.
    let files = k8s_files_with("workers-job.yaml", &[("fsGroup: 10001", "runAsNonRoot: true")]);
    expect_problem(
        &k8s_problems(&files),
        "deploy/k8s/workers-job.yaml",
        "Job/forger-workers",
        "spec.template.spec.volumes[credentials].secret.defaultMode",
        "the process (user 10001) cannot read ca.pem (0440), token (0440), worker.pem (0440), worker.key (0440)",
    );
    // Under mutual TLS a worker needs its key as well as its certificate.
    let files = k8s_files_with(
        "workers-job.yaml",
        &[(
            "              - key: worker.key\n                path: worker.key\n",
            "",
        )],
    );
    expect_problem(
        &k8s_problems(&files),
        "deploy/k8s/workers-job.yaml",
        "Job/forger-workers",
        "spec.template.spec.volumes[credentials].secret.items",
        "forger-worker reads worker.key in /var/lib/forger/credentials, which these items leave out",
    );
    // The CA's key has no business on a node.
    let files = k8s_files_with(
        "coordinator-statefulset.yaml",
        &[(
            "              - key: token\n",
            "              - key: ca.key\n                path: ca.key\n              - key: token\n",
        )],
    );
    expect_problem(
        &k8s_problems(&files),
        "deploy/k8s/coordinator-statefulset.yaml",
        "StatefulSet/forger-coordinator",
        "spec.template.spec.volumes[credentials].secret.items",
        "mounts ca.key",
    );
}

#[test]
fn a_worker_secured_otherwise_than_the_coordinator_is_reported() {
    let files = k8s_files_with(
        "workers-job.yaml",
        &[(
            "- name: FORGER_CREDENTIALS\n              value: /var/lib/forger/credentials\n",
            "- name: FORGER_INSECURE\n              value: \"1\"\n",
        )],
    );
    let problems = k8s_problems(&files);
    // `1` is no boolean to clap, so the worker would not even start ...
    expect_problem(
        &problems,
        "deploy/k8s/workers-job.yaml",
        "Job/forger-workers",
        "spec.template.spec.containers[worker].env[FORGER_INSECURE]",
        "`1`: forger-worker reads FORGER_INSECURE as true or false only",
    );
    // ... and then, with neither credentials nor --insecure, it refuses to start at all.
    expect_problem(
        &problems,
        "deploy/k8s/workers-job.yaml",
        "Job/forger-workers",
        "spec.template.spec.containers[worker].env[FORGER_CREDENTIALS]",
        "forger-worker refuses to start (exit 2)",
    );
    let files = k8s_files_with(
        "workers-job.yaml",
        &[(
            "- name: FORGER_CREDENTIALS\n              value: /var/lib/forger/credentials\n",
            "- name: FORGER_INSECURE\n              value: \"true\"\n",
        )],
    );
    expect_problem(
        &k8s_problems(&files),
        "deploy/k8s/workers-job.yaml",
        "Job/forger-workers",
        "spec.template.spec.containers[worker].env[FORGER_INSECURE]",
        "the worker runs --insecure, but the coordinator speaks TLS with /var/lib/forger/credentials",
    );
}

#[test]
fn slurm_workers_checking_a_name_a_kept_certificate_may_lack_are_reported() {
    let text = std::fs::read_to_string(repo_root().join(SLURM_SCRIPT)).expect("read the Slurm script");
    assert!(text.contains(" --tls-server-name coordinator"));
    let found = slurm_invocations(&text.replacen(" --tls-server-name coordinator", "", 1));
    let problems = script_problems(&found);
    let hit = problems
        .iter()
        .find(|p| p.message.contains("with --keep"))
        .unwrap_or_else(|| {
            panic!(
                "expected the dialled host to be reported, found:\n{}",
                report(&problems)
            )
        });
    assert!(hit.at.object.starts_with("forger-worker at line "), "{hit}");
    assert!(
        hit.message
            .starts_with("the worker checks the coordinator's certificate for $head_node"),
        "{hit}"
    );
}

#[test]
fn the_compose_files_agree_with_the_binaries_alone_and_with_the_gpu_override() {
    for gpu in [false, true] {
        let files = compose_files(gpu);
        let problems = compose_problems(&files, gpu);
        let names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
        assert!(
            problems.is_empty(),
            "{} disagree with the binaries:\n{}",
            names.join(" + "),
            report(&problems)
        );
    }
}

#[test]
fn the_gpu_override_is_merged_into_the_base_file_as_compose_merges_it() {
    let project = Project::load(&compose_files(true)).expect("read the compose files");
    let (services, problems) = compose::services(&project);
    assert!(problems.is_empty(), "{}", report(&problems));
    let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["credentials", "coordinator", "worker-1", "worker-2", "worker-3"]
    );
    for worker in &services[2..] {
        let env = &worker.container.env;
        // From the override, through its `<<` merge key and its environment ...
        assert_eq!(worker.container.image.as_deref(), Some("forger-worker:0.1.0-cuda"));
        assert_eq!(env["FORGER_DEVICE"].as_deref(), Some("cuda"));
        assert_eq!(env["FORGER_THREADS"].as_deref(), Some("2"));
        assert_eq!(worker.gpus, Gpus::Count(1));
        // ... and from the base file, through its anchor, kept where the override says nothing.
        assert_eq!(env["FORGER_COORDINATOR"].as_deref(), Some("http://coordinator:50051"));
        assert_eq!(env["FORGER_PATIENCE_SECS"].as_deref(), Some("300"));
        assert_eq!(
            env["FORGER_CREDENTIALS"].as_deref(),
            Some("/var/lib/forger/credentials")
        );
    }
    let origin = |field: &str| project.origin("worker-2", field).to_string();
    assert_eq!(origin("image"), COMPOSE_GPU);
    assert_eq!(origin("environment[FORGER_DEVICE]"), COMPOSE_GPU);
    assert_eq!(origin("environment[FORGER_COORDINATOR]"), COMPOSE);
    assert_eq!(origin("networks"), COMPOSE);
}

#[test]
fn a_misspelt_env_name_in_a_compose_file_is_reported_in_that_file() {
    let files = compose_files_with(false, COMPOSE, &[("FORGER_RESUME: auto", "FORGER_RESUMES: auto")]);
    expect_problem(
        &compose_problems(&files, false),
        COMPOSE,
        "services.coordinator",
        "environment[FORGER_RESUMES]",
        "FORGER_RESUMES is not an environment variable of forger-coordinator",
    );
    // A name the override sets is reported in the override, not the base file.
    let files = compose_files_with(true, COMPOSE_GPU, &[("FORGER_THREADS: \"2\"", "FORGER_THREAD: \"2\"")]);
    expect_problem(
        &compose_problems(&files, true),
        COMPOSE_GPU,
        "services.worker-1",
        "environment[FORGER_THREAD]",
        "FORGER_THREAD is not an environment variable of forger-worker",
    );
}

#[test]
fn a_listen_port_other_than_the_published_one_is_reported() {
    let files = compose_files_with(
        false,
        COMPOSE,
        &[("FORGER_LISTEN: 0.0.0.0:50051", "FORGER_LISTEN: 0.0.0.0:50061")],
    );
    let problems = compose_problems(&files, false);
    expect_problem(
        &problems,
        COMPOSE,
        "services.coordinator",
        "ports",
        "the coordinator listens on port 50061 (environment[FORGER_LISTEN]) but the container declares 50051, 50052",
    );
    expect_problem(
        &problems,
        COMPOSE,
        "services.worker-3",
        "environment[FORGER_COORDINATOR]",
        "dials port 50051, but services.coordinator serves port 50061",
    );
}

#[test]
fn a_status_page_on_the_workers_port_is_reported() {
    let files = compose_files_with(
        false,
        COMPOSE,
        &[("FORGER_STATUS_ADDR: 0.0.0.0:50052", "FORGER_STATUS_ADDR: 0.0.0.0:50051")],
    );
    let problems = compose_problems(&files, false);
    expect_problem(
        &problems,
        COMPOSE,
        "services.coordinator",
        "environment[FORGER_STATUS_ADDR]",
        "puts the status page on port 50051, where the coordinator listens for workers",
    );
}

#[test]
fn a_coordinator_url_naming_another_service_is_reported() {
    let files = compose_files_with(false, COMPOSE, &[("http://coordinator:50051", "http://worker-1:50051")]);
    expect_problem(
        &compose_problems(&files, false),
        COMPOSE,
        "services.worker-2",
        "environment[FORGER_COORDINATOR]",
        "dials host worker-1, but the coordinator is reached as coordinator (services.coordinator)",
    );
}

#[test]
fn a_port_published_on_every_interface_is_reported() {
    for (published, on) in [
        ("\"0.0.0.0:${FORGER_PORT:-50051}:50051\"", "published on 0.0.0.0"),
        ("\"${FORGER_PORT:-50051}:50051\"", "published on every interface"),
    ] {
        let files = compose_files_with(
            false,
            COMPOSE,
            &[("\"127.0.0.1:${FORGER_PORT:-50051}:50051\"", published)],
        );
        expect_problem(
            &compose_problems(&files, false),
            COMPOSE,
            "services.coordinator",
            "ports[0]",
            &format!("port 50051 is {on}: bind it to 127.0.0.1"),
        );
    }
}

#[test]
fn a_gpu_worker_without_a_reservation_is_reported_in_the_override() {
    let reservation = "    deploy:
      resources:
        reservations:
          devices: [{ driver: nvidia, device_ids: [\"1\"], capabilities: [gpu] }]
";
    let files = compose_files_with(true, COMPOSE_GPU, &[(reservation, "")]);
    let problems = compose_problems(&files, true);
    expect_problem(
        &problems,
        COMPOSE_GPU,
        "services.worker-2",
        "deploy.resources.reservations.devices",
        "reserves no GPU",
    );
    // Told `cuda` with no GPU, the worker would not even start.
    expect_problem(
        &problems,
        COMPOSE_GPU,
        "services.worker-2",
        "environment[FORGER_DEVICE]",
        "`cuda`, but the container reserves no GPU",
    );
}

#[test]
fn a_gpu_worker_on_the_plain_image_or_off_cuda_is_reported() {
    let files = compose_files_with(
        true,
        COMPOSE_GPU,
        &[
            (
                "image: forger-worker:${FORGER_TAG:-0.1.0}-cuda",
                "image: forger-worker:${FORGER_TAG:-0.1.0}",
            ),
            ("FORGER_DEVICE: cuda", "FORGER_DEVICE: auto"),
        ],
    );
    let problems = compose_problems(&files, true);
    expect_problem(
        &problems,
        COMPOSE_GPU,
        "services.worker-3",
        "image",
        "forger-worker:0.1.0 is given GPUs but is not the worker's GPU variant",
    );
    expect_problem(
        &problems,
        COMPOSE_GPU,
        "services.worker-1",
        "environment[FORGER_DEVICE]",
        "`auto`, but the container reserves GPUs",
    );
}

#[test]
fn a_compose_run_directory_mounted_read_only_is_reported() {
    let files = compose_files_with(
        false,
        COMPOSE,
        &[("forger-run}:/var/lib/forger/run", "forger-run}:/var/lib/forger/run:ro")],
    );
    expect_problem(
        &compose_problems(&files, false),
        COMPOSE,
        "services.coordinator",
        "volumes[3]",
        "/var/lib/forger/run holds the run directory /var/lib/forger/run (environment[FORGER_OUT]) but is mounted read-only",
    );
}

#[test]
fn compose_replicas_count_towards_the_spec_s_workers() {
    let files = compose_files_with(
        false,
        COMPOSE,
        &[(
            "worker-3: *worker",
            "worker-3:\n    <<: *worker\n    deploy: { replicas: 2 }",
        )],
    );
    expect_problem(
        &compose_problems(&files, false),
        "deploy/faces-small.toml",
        "job spec",
        "cluster.workers",
        "cluster.workers = 3 but 4 replica(s) are deployed (services.worker-1: 1 process(es) x 1 replica(s), \
         services.worker-2: 1 process(es) x 1 replica(s), services.worker-3: 2 process(es) x 1 replica(s))",
    );
}
