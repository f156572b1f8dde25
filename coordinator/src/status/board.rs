//! The board: the status the trainer posts as the run goes, read by the status server.
//!
//! A std mutex around plain data: every update is O(1) amortised and holds the lock for
//! microseconds, so the trainer may call it from async code, and a snapshot copies at most a
//! few thousand numbers. A panic while the lock was held (none of the updates can panic)
//! would leave the data as it was, so a poisoned lock is used as it is.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::history::LossHistory;
use super::nullable::finite;
use super::rates::RateWindow;
use super::snapshot::{LatestStep, QualityPoint, StatusSnapshot};

/// The most quality scores kept; past it, every other older score is dropped.
const MAX_QUALITY_POINTS: usize = 1000;

/// What the job is, set once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    pub run_dir: String,
    pub steps_total: u64,
    pub batch_size: u32,
    pub shards: u32,
    #[serde(with = "super::nullable")]
    pub started_at_unix: f64,
    /// The step the run resumed from (0 for a fresh run).
    pub resumed_from: u64,
}

/// One completed step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPoint {
    /// The step just completed (so `step` steps are done).
    pub step: u64,
    pub loss_d: f64,
    pub loss_g: f64,
    pub loss_d_real: f64,
    pub loss_d_fake: f64,
    pub train_d: bool,
    pub train_g: bool,
    /// Workers that computed the step.
    pub workers: usize,
    /// Images the step processed.
    pub images: u64,
    /// The step's wall time. The rates and ETA count only this time: pass the time since the
    /// previous step ended to have checkpoints and waits counted too.
    pub seconds: f64,
}

/// One connected worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRow {
    pub id: u64,
    pub slot: u32,
    pub address: String,
    pub device: String,
    pub replicas: u32,
    pub shards: Vec<u32>,
    /// Its recent step time, if it has one.
    pub step_seconds: Option<f64>,
    #[serde(with = "super::nullable")]
    pub last_seen_secs_ago: f64,
}

/// The shared status; clones share one board.
#[derive(Clone)]
pub struct StatusBoard {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for StatusBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The sample grid's bytes and the history would drown a log line.
        f.debug_struct("StatusBoard").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct State {
    job: JobInfo,
    phase: String,
    latest: Option<StepPoint>,
    rates: RateWindow,
    history: LossHistory,
    workers: Vec<WorkerRow>,
    /// When `workers` was set: their last-seen ages grow from there.
    workers_at: Instant,
    sample: Option<(u64, Bytes)>,
    quality: Vec<QualityPoint>,
}

impl StatusBoard {
    pub fn new(job: JobInfo) -> StatusBoard {
        StatusBoard {
            state: Arc::new(Mutex::new(State {
                job,
                phase: "starting".to_owned(),
                latest: None,
                rates: RateWindow::default(),
                history: LossHistory::new(),
                workers: Vec::new(),
                workers_at: Instant::now(),
                sample: None,
                quality: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// "waiting for workers", "training", "paused", "checkpointing", "finished", "failed: ...".
    pub fn set_phase(&self, phase: &str) {
        let mut state = self.lock();
        if state.phase != phase {
            phase.clone_into(&mut state.phase);
        }
    }

    pub fn step_completed(&self, point: StepPoint) {
        let mut state = self.lock();
        state.rates.push(point.images, point.seconds);
        state.history.push(point.step, point.loss_d, point.loss_g);
        state.latest = Some(point);
    }

    /// A resumed run's earlier losses, so the curves start at step 1 rather than at the resume;
    /// they take no part in the rates, which describe this start.
    pub fn restore_losses(&self, steps: impl IntoIterator<Item = (u64, f64, f64)>) {
        let mut state = self.lock();
        for (step, loss_d, loss_g) in steps {
            state.history.push(step, loss_d, loss_g);
        }
    }

    /// Replaces the worker table.
    pub fn set_workers(&self, rows: Vec<WorkerRow>) {
        let mut state = self.lock();
        state.workers = rows;
        state.workers_at = Instant::now();
    }

    /// The latest sample grid, as PNG bytes.
    pub fn sample_grid(&self, step: u64, png: Vec<u8>) {
        self.lock().sample = Some((step, Bytes::from(png)));
    }

    /// The latest sample grid and its step, if there is one (a cheap clone of the bytes).
    pub fn latest_sample(&self) -> Option<(u64, Bytes)> {
        self.lock().sample.clone()
    }

    /// A quality score: the sliced Wasserstein distance at `step` (lower is better).
    pub fn quality(&self, step: u64, swd: f64) {
        let mut state = self.lock();
        if state.quality.len() >= MAX_QUALITY_POINTS {
            // Thin the older scores evenly rather than forget the start of the run.
            let kept = state.quality.iter().step_by(2).cloned().collect();
            state.quality = kept;
        }
        state.quality.push(QualityPoint { step, swd: finite(swd) });
    }

    /// Steps/s, images/s and the ETA in seconds, as the snapshot has them, without copying
    /// the history: the console asks after every step.
    pub fn rates(&self) -> (Option<f64>, Option<f64>, Option<f64>) {
        let state = self.lock();
        let (step, steps_total) = state.progress();
        let rates = state.rates.rates();
        (
            rates.map(|r| r.steps_per_sec).and_then(finite),
            rates.map(|r| r.images_per_sec).and_then(finite),
            eta(steps_total.saturating_sub(step), rates.map(|r| r.steps_per_sec)),
        )
    }

    pub fn snapshot(&self) -> StatusSnapshot {
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let state = self.lock();
        let (step, steps_total) = state.progress();
        let rates = state.rates.rates();
        let eta_secs = eta(steps_total.saturating_sub(step), rates.map(|r| r.steps_per_sec));
        let aged = state.workers_at.elapsed().as_secs_f64();
        let workers: Vec<WorkerRow> = state
            .workers
            .iter()
            .map(|row| WorkerRow {
                last_seen_secs_ago: row.last_seen_secs_ago + aged,
                ..row.clone()
            })
            .collect();
        StatusSnapshot {
            job: state.job.clone(),
            phase: state.phase.clone(),
            now_unix,
            step,
            steps_total,
            progress: if steps_total == 0 {
                1.0
            } else {
                (step as f64 / steps_total as f64).min(1.0)
            },
            steps_per_sec: rates.map(|r| r.steps_per_sec).and_then(finite),
            images_per_sec: rates.map(|r| r.images_per_sec).and_then(finite),
            eta_secs,
            latest: state.latest.as_ref().map(|p| LatestStep {
                step: p.step,
                loss_d: finite(p.loss_d),
                loss_g: finite(p.loss_g),
                loss_d_real: finite(p.loss_d_real),
                loss_d_fake: finite(p.loss_d_fake),
                train_d: p.train_d,
                train_g: p.train_g,
                workers: p.workers,
                images: p.images,
                seconds: finite(p.seconds),
            }),
            workers_connected: workers.len(),
            workers,
            sample_step: state.sample.as_ref().map(|(step, _)| *step),
            quality: state.quality.clone(),
            history: state.history.curves(),
        }
    }
}

impl State {
    /// Steps done (the resumed-from step before the first) and the run's total.
    fn progress(&self) -> (u64, u64) {
        let step = self.latest.as_ref().map_or(self.job.resumed_from, |p| p.step);
        (step, self.job.steps_total)
    }
}

/// Seconds to do `remaining` steps at `steps_per_sec`; 0 once none remain.
fn eta(remaining: u64, steps_per_sec: Option<f64>) -> Option<f64> {
    if remaining == 0 {
        Some(0.0)
    } else {
        steps_per_sec.map(|rate| remaining as f64 / rate).and_then(finite)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobInfo {
        JobInfo {
            run_dir: "/runs/a".to_owned(),
            steps_total: 1000,
            batch_size: 64,
            shards: 4,
            started_at_unix: 1_700_000_000.0,
            resumed_from: 200,
        }
    }

    fn point(step: u64, seconds: f64) -> StepPoint {
        StepPoint {
            step,
            loss_d: 0.5,
            loss_g: 2.0,
            loss_d_real: 0.4,
            loss_d_fake: 0.6,
            train_d: true,
            train_g: step.is_multiple_of(2),
            workers: 4,
            images: 256,
            seconds,
        }
    }

    #[test]
    fn status_board_starts_at_the_resumed_step_with_no_rates() {
        let board = StatusBoard::new(job());
        let snap = board.snapshot();
        assert_eq!(snap.phase, "starting");
        assert_eq!((snap.step, snap.steps_total), (200, 1000));
        assert!((snap.progress - 0.2).abs() < 1e-12);
        assert_eq!(
            (snap.steps_per_sec, snap.images_per_sec, snap.eta_secs),
            (None, None, None)
        );
        assert_eq!(snap.latest, None);
        assert!(snap.history.step.is_empty());
        assert_eq!(snap.sample_step, None);
    }

    #[test]
    fn status_board_rates_and_eta_follow_the_steps() {
        let board = StatusBoard::new(job());
        board.set_phase("training");
        for step in 201..=300 {
            board.step_completed(point(step, 0.5));
        }
        let snap = board.snapshot();
        assert_eq!(snap.phase, "training");
        assert_eq!(snap.step, 300);
        assert_eq!(snap.steps_per_sec, Some(2.0));
        assert_eq!(snap.images_per_sec, Some(512.0));
        // 700 steps left at 2 steps/s.
        assert_eq!(snap.eta_secs, Some(350.0));
        let latest = snap.latest.expect("latest");
        assert_eq!((latest.step, latest.train_g, latest.loss_g), (300, true, Some(2.0)));
        assert_eq!(snap.history.step.len(), 100);
        assert_eq!(snap.history.step.last(), Some(&300));
        // The console's light view says the same.
        assert_eq!(board.rates(), (Some(2.0), Some(512.0), Some(350.0)));
        // Done: no time left, whatever the rate.
        board.step_completed(point(1000, 0.5));
        assert_eq!(board.snapshot().eta_secs, Some(0.0));
        assert_eq!(board.snapshot().progress, 1.0);
    }

    #[test]
    fn status_board_restores_a_resumed_runs_curves_without_counting_them_in_the_rates() {
        let board = StatusBoard::new(job());
        board.restore_losses((1..=100).map(|step| (step, 0.7, 0.9)));
        let snapshot = board.snapshot();
        assert_eq!(snapshot.history.step.first(), Some(&1));
        assert_eq!(snapshot.history.step.last(), Some(&100));
        assert_eq!(snapshot.steps_per_sec, None);
        assert!(snapshot.latest.is_none());
    }

    #[test]
    fn status_board_keeps_non_finite_losses_as_none() {
        let board = StatusBoard::new(job());
        board.step_completed(StepPoint {
            loss_d: f64::NAN,
            loss_g: f64::INFINITY,
            ..point(201, 0.5)
        });
        let latest = board.snapshot().latest.expect("latest");
        assert_eq!(
            (latest.loss_d, latest.loss_g, latest.loss_d_real),
            (None, None, Some(0.4))
        );
    }

    #[test]
    fn status_board_ages_the_worker_rows_and_keeps_the_latest_sample() {
        let board = StatusBoard::new(job());
        let row = WorkerRow {
            id: 7,
            slot: 1,
            address: "10.0.0.2:5000".to_owned(),
            device: "cuda:0".to_owned(),
            replicas: 2,
            shards: vec![0, 1],
            step_seconds: Some(0.4),
            last_seen_secs_ago: 1.5,
        };
        board.set_workers(vec![row.clone()]);
        let snap = board.snapshot();
        assert_eq!(snap.workers_connected, 1);
        assert!(snap.workers[0].last_seen_secs_ago >= 1.5);
        assert_eq!(snap.workers[0].shards, row.shards);
        board.sample_grid(100, vec![1, 2, 3]);
        board.sample_grid(200, vec![4, 5]);
        assert_eq!(board.snapshot().sample_step, Some(200));
        assert_eq!(
            board.latest_sample().map(|(s, b)| (s, b.to_vec())),
            Some((200, vec![4, 5]))
        );
    }

    #[test]
    fn status_board_thins_quality_scores_but_keeps_the_first_and_latest() {
        let board = StatusBoard::new(job());
        for step in 0..5000u64 {
            board.quality(step, 1.0 / (step + 1) as f64);
        }
        board.quality(5000, f64::NAN);
        let quality = board.snapshot().quality;
        assert!(quality.len() <= MAX_QUALITY_POINTS, "{}", quality.len());
        assert_eq!(quality[0].step, 0);
        assert!(quality.windows(2).all(|w| w[0].step < w[1].step));
        assert_eq!(quality.last(), Some(&QualityPoint { step: 5000, swd: None }));
    }
}
