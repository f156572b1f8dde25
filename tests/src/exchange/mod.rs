//! `forger-exchange`: the cost of the all-reduce alone, without libtorch. Fake worker
//! processes drive a real `forger-coordinator` process over loopback ([`allreduce`]), a plain
//! TCP copy of the same bytes gives the practical ceiling ([`tcp`]), and the coordinator's
//! update is timed in-process against the machine's memory bandwidth ([`reduce_cost`]).

pub mod allreduce;
pub mod peer;
pub mod reduce_cost;
pub mod tcp;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use forger_common::layout;
use forger_common::spec::ModelSpec;

/// Image side of every run here: the article's (and the spec's default).
pub const IMAGE_SIZE: usize = 40;

/// The lengths of one model's flat buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lens {
    pub d: usize,
    pub g: usize,
    pub bn: usize,
}

impl Lens {
    pub fn of(model: &ModelSpec) -> Lens {
        Lens {
            d: layout::discriminator_layout(model, IMAGE_SIZE).numel(),
            g: layout::generator_layout(model).numel(),
            bn: layout::batch_norm_stats_len(model),
        }
    }

    /// Bytes of both networks' gradients (or parameters) for one worker: what it sends up and
    /// receives back per step when both networks train.
    pub fn bytes_per_worker(&self) -> usize {
        (self.d + self.g) * 4
    }
}

/// The article's model with these feature maps for both networks.
pub fn model(filters: &[u32]) -> anyhow::Result<ModelSpec> {
    if filters.len() != 3 || filters.contains(&0) {
        bail!("--filters takes three positive feature-map counts, such as 256,128,64; got {filters:?}");
    }
    Ok(ModelSpec {
        d_filters: filters.to_vec(),
        g_filters: filters.to_vec(),
        ..ModelSpec::default()
    })
}

pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// Bytes per second as GB/s (10^9).
pub fn gb_per_s(bytes: f64, seconds: f64) -> f64 {
    bytes / seconds / 1e9
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut tail = all[start..].join("\n");
    if tail.is_empty() {
        tail = "(empty)".into();
    }
    format!("--- last {} lines of {} ---\n{tail}", all.len() - start, path.display())
}

/// This executable, re-run for the hidden child subcommands.
pub fn this_exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find this executable's path")
}

/// A child process writing stdout and stderr to a log file; killed when dropped.
#[derive(Debug)]
pub struct Spawned {
    pub name: String,
    pub log: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
}

impl Spawned {
    pub fn start(name: &str, mut command: Command, log: PathBuf) -> anyhow::Result<Spawned> {
        let file = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        command.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        let child = command
            .spawn()
            .with_context(|| format!("failed to start {name} ({:?})", command.get_program()))?;
        Ok(Spawned {
            name: name.to_string(),
            log,
            child,
            status: None,
        })
    }

    /// The exit status, if it has exited.
    pub fn poll(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("cannot poll {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Waits up to `limit` for it to exit by itself.
    pub fn wait(&mut self, limit: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.poll()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fails with the log's tail unless it exited successfully.
    pub fn check_success(&mut self) -> anyhow::Result<()> {
        match self.poll()? {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!("{} failed ({status})\n{}", self.name, self.tail()),
            None => bail!("{} is still running\n{}", self.name, self.tail()),
        }
    }

    pub fn kill(&mut self) {
        if let Ok(None) = self.poll() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    pub fn tail(&self) -> String {
        log_tail(&self.log, 40)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Fails if any of `children` exited unsuccessfully, with its log's tail.
pub fn check_none_failed(children: &mut [Spawned]) -> anyhow::Result<()> {
    for child in children.iter_mut() {
        if let Some(status) = child.poll()?
            && !status.success()
        {
            bail!("{} failed ({status})\n{}", child.name, child.tail());
        }
    }
    Ok(())
}
