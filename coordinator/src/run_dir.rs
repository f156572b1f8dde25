//! The run directory: checkpoints, sample grids, the metrics log and the resolved spec.
//!
//! ```text
//! RUN_DIR/spec.toml
//! RUN_DIR/metrics.jsonl       a line per step, and one per quality score
//! RUN_DIR/events.jsonl
//! RUN_DIR/training.png        losses and scores so far, redrawn at every checkpoint
//! RUN_DIR/checkpoints/step-NNNNNNNN.safetensors
//! RUN_DIR/samples/step-NNNNNNNN.png
//! RUN_DIR/tensorboard/        with --tensorboard
//! ```

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};

/// Paths inside one run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Creates the folders if they are missing.
    pub fn create(root: &Path) -> Result<RunDir> {
        let dir = RunDir {
            root: root.to_path_buf(),
        };
        for folder in [dir.checkpoints(), dir.samples()] {
            std::fs::create_dir_all(&folder)
                .map_err(|e| CoordinatorError::io(format!("failed to create {}", folder.display()), e))?;
        }
        Ok(dir)
    }

    /// A guard that removes `root` again when dropped while still armed, if the refused start
    /// left nothing in it but the empty folders and the lock that `create` and `lock` made:
    /// a job refused before it began leaves no trace. Call it before `create`.
    pub fn remove_if_refused(root: &Path) -> RefusedStartCleanup {
        RefusedStartCleanup {
            root: (!root.exists()).then(|| root.to_path_buf()),
        }
    }

    /// Takes the run directory for this process: a second coordinator on the same folder
    /// would interleave metrics and overwrite checkpoints. Held until the guard drops; the OS
    /// releases it if the process dies.
    pub fn lock(&self) -> Result<RunDirLock> {
        let path = self.root.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| CoordinatorError::io(format!("failed to open {}", path.display()), e))?;
        match file.try_lock() {
            Ok(()) => Ok(RunDirLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(CoordinatorError::RunDir {
                path: self.root.clone(),
                message: "another coordinator is using it".into(),
            }),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(CoordinatorError::io(format!("failed to lock {}", path.display()), e))
            }
        }
    }

    /// Deletes the temporary files that writes interrupted by a crash left in the checkpoint
    /// and sample folders (ours are `.NAME.tmp`; safetensors' own are `.tmpXXXXXX`), each
    /// the size of a checkpoint. Only called while holding the lock, so no write is running.
    /// Returns what was removed.
    pub fn remove_leftover_temporaries(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for folder in [self.checkpoints(), self.samples()] {
            let entries = std::fs::read_dir(&folder)
                .map_err(|e| CoordinatorError::io(format!("failed to list {}", folder.display()), e))?;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let temporary = name.starts_with('.') && (name.ends_with(".tmp") || name.starts_with(".tmp"));
                if temporary && entry.file_type().is_ok_and(|t| t.is_file()) {
                    let path = entry.path();
                    std::fs::remove_file(&path)
                        .map_err(|e| CoordinatorError::io(format!("failed to remove {}", path.display()), e))?;
                    removed.push(path);
                }
            }
        }
        removed.sort();
        Ok(removed)
    }

    /// Fails now, rather than at the first checkpoint, if the outputs cannot be written.
    pub fn check_writable(&self) -> Result<()> {
        for folder in [self.checkpoints(), self.samples()] {
            let probe = folder.join(".write-test");
            std::fs::write(&probe, b"")
                .and_then(|()| std::fs::remove_file(&probe))
                .map_err(|e| CoordinatorError::io(format!("cannot write into {}", folder.display()), e))?;
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    pub fn samples(&self) -> PathBuf {
        self.root.join("samples")
    }

    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    pub fn events(&self) -> PathBuf {
        self.root.join("events.jsonl")
    }

    pub fn spec(&self) -> PathBuf {
        self.root.join("spec.toml")
    }

    /// The losses and scores so far, redrawn at every checkpoint.
    pub fn plot(&self) -> PathBuf {
        self.root.join("training.png")
    }

    pub fn tensorboard(&self) -> PathBuf {
        self.root.join("tensorboard")
    }

    pub fn sample_grid(&self, step: u64) -> PathBuf {
        self.samples().join(format!("step-{step:08}.png"))
    }

    pub fn checkpoint(&self, step: u64) -> PathBuf {
        self.checkpoints().join(forger_common::checkpoint::file_name(step))
    }
}

/// Holds a run directory's lock.
#[derive(Debug)]
pub struct RunDirLock {
    _file: File,
}

/// One line of `metrics.jsonl`: the cluster-wide losses measured at the start of the step,
/// before either update, and what the step then trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss_d: f64,
    pub loss_g: f64,
    pub loss_d_real: f64,
    pub loss_d_fake: f64,
    pub train_d: bool,
    pub train_g: bool,
    pub workers: usize,
    /// Real images the cluster looked at in this step.
    pub images: u64,
    /// Wall-clock time of the step, its retries included.
    pub seconds: f64,
    /// Attempts the step took: more than 1 when a worker was lost mid-step and the step was
    /// undone and run again.
    pub attempts: u32,
    /// Shard contributions left out because their losses or gradients were not finite.
    pub dropped: u32,
    /// No shard gave finite losses, so nothing was trained.
    pub skipped: bool,
    /// Gradient uploads the step's updates summed, over its trained networks: one per shard
    /// from a worker with one replica, one per worker from a worker with several (their local
    /// sum). Older lines lack it.
    #[serde(default)]
    pub contributions: u32,
}

/// A quality line of `metrics.jsonl`: the score of the generator at a checkpoint. It has
/// `swd` and no losses, which is how readers tell it from a step's line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityRecord {
    pub step: u64,
    /// The sliced Wasserstein distance, the mean over the pyramid's levels (lower is better).
    pub swd: f64,
    /// Each level's distance, finest first.
    pub swd_levels: Vec<f64>,
    pub held_out: usize,
    pub generated: u32,
    /// The time it took: the images drawn by a worker and scored here.
    pub seconds: f64,
}

/// The cluster's history, one JSON object per line: joins, evictions, pauses, resumes. It is
/// only ever appended to, across resumes, so it also tells what a crash cost.
#[derive(Debug)]
pub struct EventLog {
    file: File,
    path: PathBuf,
}

impl EventLog {
    pub fn open(path: &Path) -> Result<EventLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| CoordinatorError::io(format!("failed to open {}", path.display()), e))?;
        Ok(EventLog {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends `{"time", "step", "event", ...fields}`. A failure to write is logged, not
    /// raised: the history must never stop the training it describes.
    pub fn record(&mut self, step: u64, event: &str, fields: serde_json::Value) {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut line = serde_json::json!({ "time": time, "step": step, "event": event });
        if let (Some(line), serde_json::Value::Object(fields)) = (line.as_object_mut(), fields) {
            line.extend(fields);
        }
        let mut text = line.to_string();
        text.push('\n');
        if let Err(e) = self.file.write_all(text.as_bytes()) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not write the event log");
        }
    }
}

/// Appends step records, one JSON object per line.
#[derive(Debug)]
pub struct MetricsLog {
    file: File,
    path: PathBuf,
}

impl MetricsLog {
    /// Opens the log for appending. When resuming from `through_step`, lines of later steps
    /// (work the crash lost and the run will redo) are dropped first, so no step appears twice.
    pub fn open(path: &Path, through_step: Option<u64>) -> Result<MetricsLog> {
        let io = |action: &str, e| CoordinatorError::io(format!("failed to {action} {}", path.display()), e);
        if let Some(last) = through_step {
            let kept = match File::open(path) {
                Ok(file) => {
                    let mut kept = String::new();
                    for line in BufReader::new(file).lines() {
                        let line = line.map_err(|e| io("read", e))?;
                        // A torn last line (crash mid-write) does not parse and is dropped.
                        // Lines are read as plain JSON, since a non-finite loss is written
                        // as `null`, and such a line still records its step.
                        let step = serde_json::from_str::<serde_json::Value>(&line)
                            .ok()
                            .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64));
                        if step.is_some_and(|step| step <= last) {
                            kept.push_str(&line);
                            kept.push('\n');
                        }
                    }
                    kept
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(io("read", e)),
            };
            forger_common::atomic::write_atomic(path, kept.as_bytes())?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io("open", e))?;
        Ok(MetricsLog {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn append(&mut self, record: &StepRecord) -> Result<()> {
        self.append_line(serde_json::to_string(record).expect("step records serialise"))
    }

    /// A score line, after the checkpoint of its step.
    pub fn append_quality(&mut self, record: &QualityRecord) -> Result<()> {
        self.append_line(serde_json::to_string(record).expect("quality records serialise"))
    }

    fn append_line(&mut self, mut line: String) -> Result<()> {
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| CoordinatorError::io(format!("failed to write {}", self.path.display()), e))
    }

    /// Makes the lines so far durable; called with every checkpoint.
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| CoordinatorError::io(format!("failed to fsync {}", self.path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64) -> StepRecord {
        StepRecord {
            step,
            loss_d: 0.5,
            loss_g: 0.7,
            loss_d_real: 0.4,
            loss_d_fake: 0.6,
            train_d: true,
            train_g: false,
            workers: 2,
            images: 32,
            seconds: 0.1,
            attempts: 1,
            dropped: 0,
            skipped: false,
            contributions: 2,
        }
    }

    #[test]
    fn resuming_drops_lines_after_the_checkpoint_and_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, None).unwrap();
        for step in 1..=5 {
            log.append(&record(step)).unwrap();
        }
        drop(log);
        let mut text = std::fs::read_to_string(&path).unwrap();
        // A diverged step records its losses as null; it is still a step.
        text = text.replacen("\"loss_d\":0.5", "\"loss_d\":null", 1);
        text.push_str("{\"step\": 6, \"loss");
        std::fs::write(&path, text).unwrap();

        let mut log = MetricsLog::open(&path, Some(3)).unwrap();
        log.append(&record(4)).unwrap();
        let steps: Vec<u64> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
    }

    #[test]
    fn temporaries_left_by_interrupted_writes_are_removed_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let run = RunDir::create(root.path()).unwrap();
        let keep = [
            run.checkpoint(5),
            run.sample_grid(5),
            run.checkpoints().join(".lock-like"),
        ];
        let leftovers = [
            run.checkpoints().join(".tmpMCheym"),
            run.checkpoints().join(".step-00000010.safetensors.tmp"),
            run.samples().join(".step-00000010.png.tmp"),
        ];
        for path in keep.iter().chain(&leftovers) {
            std::fs::write(path, b"x").unwrap();
        }
        let mut expected = leftovers.to_vec();
        expected.sort();
        assert_eq!(run.remove_leftover_temporaries().unwrap(), expected);
        assert!(keep.iter().all(|p| p.exists()) && leftovers.iter().all(|p| !p.exists()));
    }
}

/// See [`RunDir::remove_if_refused`].
#[derive(Debug)]
pub struct RefusedStartCleanup {
    /// The folder to remove; `None` when it existed before, or once the run has begun.
    root: Option<PathBuf>,
}

impl RefusedStartCleanup {
    /// The run has begun writing: keep the folder.
    pub fn disarm(&mut self) {
        self.root = None;
    }
}

impl Drop for RefusedStartCleanup {
    fn drop(&mut self) {
        let Some(root) = &self.root else { return };
        // `remove_dir` removes only empty folders, so nothing anyone else put there is lost.
        let _ = std::fs::remove_dir(root.join("checkpoints"));
        let _ = std::fs::remove_dir(root.join("samples"));
        let _ = std::fs::remove_file(root.join(".lock"));
        let _ = std::fs::remove_dir(root);
    }
}
