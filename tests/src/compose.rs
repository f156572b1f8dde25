//! `deploy/docker-compose.yml` driven the way a user drives it: real images, real containers
//! on a private network, `docker kill` and `compose restart`. One project per test, torn down
//! (containers, network, volumes) when dropped, with every container's log kept in the test's
//! folder first.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::repo_root;

/// Whether a Docker engine answers here. Without one the compose tests skip (and say so).
pub fn engine_runs() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The Compose command: the `docker compose` plugin, or the older `docker-compose`.
fn compose_program() -> Vec<String> {
    let works = |program: &[&str]| {
        Command::new(program[0])
            .args(&program[1..])
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for program in [&["docker", "compose"][..], &["docker-compose"][..]] {
        if works(program) {
            return program.iter().map(|s| s.to_string()).collect();
        }
    }
    panic!("a Docker engine runs but neither `docker compose` nor `docker-compose` is installed");
}

/// Runs a command, panicking with its output if it fails.
fn run(command: &mut Command, what: &str) -> Output {
    let output = command.output().unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Builds the images from the release build the tests use (kept when nothing changed).
pub fn build_images() {
    let release = crate::binary("forger-worker")
        .parent()
        .expect("the release folder")
        .to_path_buf();
    let target = release.parent().expect("the target folder");
    run(
        Command::new("bash")
            .arg(repo_root().join("deploy/build-images.sh"))
            .env("CARGO_TARGET_DIR", target),
        "deploy/build-images.sh",
    );
}

/// A running Compose project of `deploy/docker-compose.yml`.
#[derive(Debug)]
pub struct ComposeProject {
    program: Vec<String>,
    project: String,
    /// FORGER_* settings of the compose file.
    settings: Vec<(String, String)>,
    logs: PathBuf,
}

impl ComposeProject {
    /// `up -d` with the compose file's settings (FORGER_SPEC_FILE, FORGER_RUN_DIR, ...);
    /// container logs go to `logs` when the project is dropped.
    pub fn up(name: &str, settings: &[(&str, String)], logs: &Path) -> ComposeProject {
        let project = ComposeProject {
            program: compose_program(),
            project: format!("{name}-{}", std::process::id()),
            settings: settings.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            logs: logs.to_path_buf(),
        };
        project.compose(&["up", "-d"]);
        project
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.program[0]);
        command
            .args(&self.program[1..])
            .arg("--file")
            .arg(repo_root().join("deploy/docker-compose.yml"))
            .args(["--project-name", &self.project])
            .args(args)
            .envs(self.settings.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Runs a compose subcommand, which must succeed.
    pub fn compose(&self, args: &[&str]) -> Output {
        run(&mut self.command(args), &format!("compose {}", args.join(" ")))
    }

    /// The container id of `service`.
    pub fn container(&self, service: &str) -> String {
        let output = self.compose(&["ps", "-q", service]);
        let id = String::from_utf8_lossy(&output.stdout).trim().to_string();
        assert!(!id.is_empty(), "compose has no container for {service}");
        id
    }

    /// `docker inspect` of a service's container: whether it runs, its exit code, its restarts.
    pub fn state(&self, service: &str) -> ContainerState {
        let output = run(
            Command::new("docker").args([
                "inspect",
                "--format",
                "{{.State.Running}} {{.State.ExitCode}} {{.RestartCount}}",
                &self.container(service),
            ]),
            "docker inspect",
        );
        let text = String::from_utf8_lossy(&output.stdout);
        let fields: Vec<&str> = text.split_whitespace().collect();
        ContainerState {
            running: fields[0] == "true",
            exit_code: fields[1].parse().expect("an exit code"),
            restarts: fields[2].parse().expect("a restart count"),
        }
    }

    /// `docker kill` (SIGKILL) of a service's container.
    pub fn kill(&self, service: &str) {
        run(
            Command::new("docker").args(["kill", &self.container(service)]),
            "docker kill",
        );
    }

    /// Waits for a service's container to stop, within `limit`; returns its state.
    pub fn wait_stopped(&self, service: &str, limit: Duration) -> ContainerState {
        let deadline = Instant::now() + limit;
        loop {
            let state = self.state(service);
            if !state.running {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "{service} still runs after {limit:?}:\n{}",
                self.log_tail(service)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The last lines a service's containers logged.
    pub fn log_tail(&self, service: &str) -> String {
        let output = self.command(&["logs", "--no-color", "--tail", "40", service]).output();
        output.map_or_else(|e| e.to_string(), |o| String::from_utf8_lossy(&o.stdout).into_owned())
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        if let Ok(output) = self.command(&["logs", "--no-color"]).output() {
            let _ = std::fs::write(self.logs.join(format!("{}.log", self.project)), output.stdout);
        }
        let _ = self
            .command(&["down", "--volumes", "--remove-orphans", "--timeout", "5"])
            .output();
    }
}

/// What `docker inspect` says about a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerState {
    pub running: bool,
    pub exit_code: i32,
    pub restarts: u32,
}
