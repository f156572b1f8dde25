//! `--local-workers N`: worker processes on this machine, pointed at this coordinator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::{Child, Command};
use tracing::info;

use crate::error::{CoordinatorError, Result};

/// How to start the local workers.
#[derive(Debug, Clone)]
pub struct LocalWorkers {
    pub count: usize,
    /// libtorch threads per worker.
    pub threads: usize,
    pub device: String,
    /// The `forger-worker` executable.
    pub binary: PathBuf,
    /// The credentials folder they connect with; `None`: `--insecure`, like the coordinator.
    pub credentials: Option<PathBuf>,
}

impl LocalWorkers {
    /// The worker binary installed beside the running coordinator.
    pub fn default_binary() -> Result<PathBuf> {
        let exe = std::env::current_exe()
            .map_err(|e| CoordinatorError::io("failed to find the coordinator's own path", e))?;
        Ok(exe.with_file_name("forger-worker"))
    }
}

/// The running worker processes; they are killed if this is dropped before they exit.
#[derive(Debug)]
pub struct LocalCluster {
    children: Vec<Child>,
}

impl LocalCluster {
    pub fn start(config: &LocalWorkers, coordinator: SocketAddr) -> Result<LocalCluster> {
        // A coordinator listening on every address is reached on loopback, a name its
        // certificate carries.
        let mut coordinator = coordinator;
        if coordinator.ip().is_unspecified() {
            coordinator.set_ip(match coordinator {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let url = format!("http://{coordinator}");
        let mut children = Vec::new();
        for i in 0..config.count {
            let mut command = Command::new(&config.binary);
            // A terminal's Ctrl-C goes to its whole process group. Local workers get a group of
            // their own, so Ctrl-C reaches only the coordinator, which then finishes the step,
            // checkpoints and dismisses the workers instead of watching them die mid-step.
            #[cfg(unix)]
            command.process_group(0);
            match &config.credentials {
                Some(dir) => command.arg("--credentials").arg(dir),
                None => command.arg("--insecure"),
            };
            let child = command
                .arg("--coordinator")
                .arg(&url)
                .arg("--threads")
                .arg(config.threads.to_string())
                .arg("--device")
                .arg(&config.device)
                // A local worker belongs to this coordinator and ends with it: when a stopped
                // run tells workers to wait for a resumed coordinator, it leaves instead.
                .arg("--leave-when-stopped")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| {
                    CoordinatorError::io(
                        format!("failed to start local worker {} from {}", i, config.binary.display()),
                        e,
                    )
                })?;
            info!(worker = i, pid = child.id(), "started local worker");
            children.push(child);
        }
        Ok(LocalCluster { children })
    }

    /// Resolves when every worker has exited and at least one failed, naming the first
    /// failure: then no local worker will ever join. Never resolves otherwise.
    pub async fn all_failed(&mut self) -> CoordinatorError {
        let mut first_failure = None;
        for (i, child) in self.children.iter_mut().enumerate() {
            match child.wait().await {
                Ok(status) if status.success() => {}
                Ok(status) => {
                    first_failure.get_or_insert_with(|| format!("local worker {i} exited with {status}"));
                }
                Err(e) => {
                    first_failure.get_or_insert_with(|| format!("failed to wait for local worker {i}: {e}"));
                }
            }
        }
        match first_failure {
            Some(message) => CoordinatorError::Refused(format!(
                "every local worker exited before training could start; {message}"
            )),
            None => futures::future::pending().await,
        }
    }

    /// Waits up to `timeout` for the workers to exit, then kills the rest; exit codes do not
    /// matter here (used after a stop request).
    pub async fn wait_or_kill(mut self, timeout: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        for (i, child) in self.children.iter_mut().enumerate() {
            if tokio::time::timeout_at(deadline, child.wait()).await.is_err() {
                tracing::warn!(
                    worker = i,
                    pid = child.id(),
                    "local worker did not exit after the stop; killing it"
                );
                let _ = child.kill().await;
            }
        }
    }

    /// Waits for every worker to exit after it was told to shut down. A worker that failed
    /// or had to be killed is reported, but the run's outcome is the coordinator's to judge:
    /// the cluster carries on without lost workers.
    pub async fn wait(mut self, timeout: std::time::Duration) {
        for (i, child) in self.children.iter_mut().enumerate() {
            match tokio::time::timeout(timeout, child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => tracing::warn!(worker = i, %status, "local worker exited with a failure"),
                Ok(Err(e)) => tracing::warn!(worker = i, error = %e, "failed to wait for local worker"),
                Err(_) => {
                    tracing::warn!(worker = i, "local worker did not exit; killing it");
                    let _ = child.kill().await;
                }
            }
        }
    }
}
