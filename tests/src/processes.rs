//! Real `forger-worker` and `forger-coordinator` processes for fault tests: started with the
//! flags a user would pass, logging to files in the test's folder, killed when dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::binary;

/// The README's one-machine command: a coordinator on a loopback port chosen by the OS with
/// `workers` local workers of one thread each, `data` overriding the spec's folder if given.
pub fn local_cluster_command(spec: &Path, run: &Path, data: Option<&Path>, workers: usize) -> Command {
    let mut command = Command::new(binary("forger-coordinator"));
    command.arg("--spec").arg(spec).arg("--out").arg(run);
    if let Some(data) = data {
        command.arg("--data").arg(data);
    }
    command
        .args([
            "--listen",
            "127.0.0.1:0",
            "--local-worker-threads",
            "1",
            "--local-workers",
        ])
        .arg(workers.to_string());
    command
}

/// `--credentials DIR` (and `--mtls` for a coordinator that asks for certificates), or
/// `--insecure`.
pub fn security_args(command: &mut Command, credentials: Option<&Path>, mutual: bool) {
    match credentials {
        Some(dir) => {
            command.arg("--credentials").arg(dir);
            if mutual {
                command.arg("--mtls");
            }
        }
        None => {
            command.arg("--insecure");
        }
    }
}

/// A child process that is killed if the test ends without waiting for it.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Process {
    fn spawn(name: &str, mut command: Command, log_dir: &Path) -> Process {
        let log = log_dir.join(format!("{name}.log"));
        let file = File::create(&log).expect("create a process log");
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone the log handle"))
            .stderr(file);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {name}: {e}"));
        Process {
            name: name.to_string(),
            log,
            child,
        }
    }

    /// A worker for `url` with one libtorch thread; `fail_points` sets `FAILPOINTS`.
    pub fn worker(name: &str, url: &str, log_dir: &Path, fail_points: Option<&str>) -> Process {
        Process::worker_on(name, url, log_dir, fail_points, &["--threads", "1", "--device", "cpu"])
    }

    /// A worker for `url` computing as `devices` says (`--device`, `--devices`, `--threads`).
    pub fn worker_on(name: &str, url: &str, log_dir: &Path, fail_points: Option<&str>, devices: &[&str]) -> Process {
        Process::worker_with(name, url, log_dir, fail_points, devices, None)
    }

    /// [`Process::worker_on`] with the `credentials` folder, or `--insecure` without one.
    pub fn worker_with(
        name: &str,
        url: &str,
        log_dir: &Path,
        fail_points: Option<&str>,
        devices: &[&str],
        credentials: Option<&Path>,
    ) -> Process {
        let mut command = Command::new(binary("forger-worker"));
        command
            .args(["--coordinator", url, "--patience-secs", "60"])
            .args(devices)
            .env("RUST_LOG", "info");
        security_args(&mut command, credentials, false);
        if let Some(points) = fail_points {
            command.env("FAILPOINTS", points);
        }
        Process::spawn(name, command, log_dir)
    }

    /// A coordinator process for `spec` on `listen`, writing into `run_dir`.
    pub fn coordinator(
        name: &str,
        spec: &Path,
        run_dir: &Path,
        listen: &str,
        resume: bool,
        log_dir: &Path,
        fail_points: Option<&str>,
    ) -> Process {
        Process::coordinator_with(name, spec, run_dir, listen, resume, log_dir, fail_points, None, false)
    }

    /// [`Process::coordinator`] with the `credentials` folder (`mutual`: `--mtls`), or
    /// `--insecure` without one.
    #[allow(clippy::too_many_arguments)]
    pub fn coordinator_with(
        name: &str,
        spec: &Path,
        run_dir: &Path,
        listen: &str,
        resume: bool,
        log_dir: &Path,
        fail_points: Option<&str>,
        credentials: Option<&Path>,
        mutual: bool,
    ) -> Process {
        let mut command = Command::new(binary("forger-coordinator"));
        command
            .arg("--spec")
            .arg(spec)
            .arg("--out")
            .arg(run_dir)
            .args(["--listen", listen])
            .env("RUST_LOG", "info");
        security_args(&mut command, credentials, mutual);
        if resume {
            command.arg("--resume");
        }
        if let Some(points) = fail_points {
            command.env("FAILPOINTS", points);
        }
        Process::spawn(name, command, log_dir)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM, as `docker stop` or a scheduler would.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {}", self.pid());
    }

    /// Waits for the process to exit by itself, within `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the child") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {limit:?}; its log:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// A loopback address with a port that was free a moment ago (for a coordinator process that
/// must be restarted on the same address).
pub fn free_local_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    listener.local_addr().expect("local address").to_string()
}

/// The highest step in the run's metrics log so far (0 before the first).
pub fn latest_step(run_dir: &Path) -> u64 {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Waits until the run has completed `step`, within `limit`.
pub async fn wait_for_step(run_dir: &Path, step: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while latest_step(run_dir) < step {
        assert!(
            Instant::now() < deadline,
            "the run did not reach step {step} within {limit:?} (at {})",
            latest_step(run_dir)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
