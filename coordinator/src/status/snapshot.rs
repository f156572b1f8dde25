//! What `/status.json` returns: a copy of the board at one moment, Serialize and Deserialize
//! so the `status` subcommand reads back exactly what the page shows. Values that may not be
//! finite (losses, rates) are options: null in the JSON.

use serde::{Deserialize, Serialize};

use super::board::{JobInfo, WorkerRow};

/// The board at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusSnapshot {
    pub job: JobInfo,
    /// "waiting for workers", "training", "paused", "checkpointing", "finished", "failed: ...".
    pub phase: String,
    /// When the snapshot was taken (Unix seconds), for the elapsed time.
    pub now_unix: f64,
    /// Steps completed: the latest completed step, or the job's resumed_from before one.
    pub step: u64,
    pub steps_total: u64,
    /// `step / steps_total`, 0 to 1.
    pub progress: f64,
    /// Over the recent window (the last 50 steps, or their last 60 s of step time).
    pub steps_per_sec: Option<f64>,
    pub images_per_sec: Option<f64>,
    /// The remaining steps at the current rate; 0 once every step is done.
    pub eta_secs: Option<f64>,
    /// The latest completed step.
    pub latest: Option<LatestStep>,
    pub workers_connected: usize,
    /// As the trainer last set them, with `last_seen_secs_ago` brought up to the snapshot.
    pub workers: Vec<WorkerRow>,
    /// The step of the latest sample grid (`/samples/latest.png`), if any.
    pub sample_step: Option<u64>,
    /// The quality scores so far, oldest first.
    pub quality: Vec<QualityPoint>,
    pub history: LossCurves,
}

/// The latest completed step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatestStep {
    pub step: u64,
    pub loss_d: Option<f64>,
    pub loss_g: Option<f64>,
    pub loss_d_real: Option<f64>,
    pub loss_d_fake: Option<f64>,
    /// Which networks the step updated (the loss balancing may skip one).
    pub train_d: bool,
    pub train_g: bool,
    pub workers: usize,
    pub images: u64,
    pub seconds: Option<f64>,
}

/// One quality score: the sliced Wasserstein distance to the data (lower is better).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityPoint {
    pub step: u64,
    pub swd: Option<f64>,
}

/// The loss curves as columns (shorter JSON than one object per point), downsampled: each
/// point is the mean over `stride` consecutive steps ending at its step (the newest point may
/// cover fewer), so `step` is increasing and ends at the latest step. A null loss: no finite
/// value in that point's steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossCurves {
    pub stride: u64,
    pub step: Vec<u64>,
    pub loss_d: Vec<Option<f32>>,
    pub loss_g: Vec<Option<f32>>,
}
