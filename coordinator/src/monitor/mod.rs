//! Everything that shows a run to people, fed by the trainer: the console's progress, the
//! status page's board, the training plot and TensorBoard's event file.
//!
//! None of it may stop the training it describes: a plot or event file that cannot be written
//! is a warning, and the status page is only read.

pub mod console;
mod history;
mod worker_times;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use forger_common::spec::JobSpec;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::error::{CoordinatorError, Result};
use crate::plot::{self, LossPoint, ScorePoint};
use crate::run_dir::{QualityRecord, RunDir, StepRecord};
use crate::status::{JobInfo, StatusBoard, StepPoint, WorkerRow};
use crate::tensorboard::EventWriter;
pub use console::{Console, ProgressMode};
use console::{Progress, ProgressView};
pub use history::read_history;
pub use worker_times::WorkerTimes;

/// How the run is shown, beside the run directory's own files.
#[derive(Debug, Default)]
pub struct Monitoring {
    pub console: Console,
    /// Serve the status page on this socket.
    pub status: Option<tokio::net::TcpListener>,
    /// Also write TensorBoard event files to RUN_DIR/tensorboard.
    pub tensorboard: bool,
}

/// The status page's server, running beside the trainer until [`StatusServer::stop`].
#[derive(Debug)]
pub struct StatusServer {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl StatusServer {
    /// Asks the server to close its connections, and ends it after `within` if they linger.
    pub async fn stop(self, within: Duration) {
        let _ = self.stop.send(());
        let abort = self.task.abort_handle();
        if tokio::time::timeout(within, self.task).await.is_err() {
            abort.abort();
        }
    }
}

/// Everything that shows the run of `spec` in `run`, which starts (or resumed) at
/// `resumed_from`: the status board and its page, TensorBoard's event file, and the plot's
/// history so far from the run's metrics log. `scored`: whether the run scores checkpoints.
pub fn start(
    monitoring: Monitoring,
    run: &RunDir,
    spec: &JobSpec,
    resumed_from: u64,
    scored: bool,
) -> Result<(Monitor, Option<StatusServer>)> {
    let history = read_history(&run.metrics())
        .map_err(|e| CoordinatorError::io(format!("failed to read {}", run.metrics().display()), e))?;
    let board = StatusBoard::new(JobInfo {
        run_dir: run.root().display().to_string(),
        steps_total: spec.train.steps,
        batch_size: spec.train.batch_size,
        shards: spec.cluster.workers,
        started_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
        resumed_from,
    });
    board.set_phase("waiting for workers");
    let server = monitoring.status.map(|listener| {
        if let Ok(address) = listener.local_addr() {
            info!(url = %format!("http://{address}/"), "status page");
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let stopped = async {
            let _ = stopped.await;
        };
        StatusServer {
            stop,
            task: tokio::spawn(crate::status::serve_status(listener, board.clone(), stopped)),
        }
    });
    let tensorboard = if monitoring.tensorboard {
        EventWriter::create(&run.tensorboard())
            .inspect_err(|e| warn!(error = %e, "could not start a TensorBoard event file; the run goes on without one"))
            .ok()
    } else {
        None
    };
    let monitor = Monitor::new(
        monitoring.console,
        board,
        tensorboard,
        run,
        spec.train.steps,
        scored,
        history,
    );
    Ok((monitor, server))
}

/// The trainer's handle on every display of the run.
#[derive(Debug)]
pub struct Monitor {
    console: Console,
    progress: Option<Progress>,
    board: StatusBoard,
    tensorboard: Option<EventWriter>,
    losses: Vec<LossPoint>,
    scores: Vec<ScorePoint>,
    steps_total: u64,
    plot_path: PathBuf,
    title: String,
    /// Whether the run scores at checkpoints (it holds images out).
    scored: bool,
    /// When the previous step completed: rates and ETA count the time between steps, so
    /// checkpoints, scores and pauses are in them.
    last_step_at: Option<Instant>,
}

impl Monitor {
    /// `losses` and `scores`: what the run's metrics log holds already (a resumed run's plot
    /// goes on from where it was).
    pub fn new(
        console: Console,
        board: StatusBoard,
        tensorboard: Option<EventWriter>,
        run: &RunDir,
        steps_total: u64,
        scored: bool,
        (losses, scores): (Vec<LossPoint>, Vec<ScorePoint>),
    ) -> Monitor {
        board.restore_losses(losses.iter().map(|p| (p.step, p.loss_d, p.loss_g)));
        for score in &scores {
            board.quality(score.step, score.swd);
        }
        Monitor {
            console,
            progress: None,
            board,
            tensorboard,
            losses,
            scores,
            steps_total,
            plot_path: run.plot(),
            title: run.root().display().to_string(),
            scored,
            last_step_at: None,
        }
    }

    /// Whether a score for `step` is in the run's history.
    pub fn has_score(&self, step: u64) -> bool {
        self.scores.iter().any(|s| s.step == step)
    }

    pub fn phase(&self, phase: &str) {
        self.board.set_phase(phase);
    }

    pub fn workers(&self, rows: Vec<WorkerRow>) {
        self.board.set_workers(rows);
    }

    /// Training begins (or goes on after a resume) at `step`.
    pub fn training_started(&mut self, step: u64) {
        self.progress = Some(self.console.start(step, self.steps_total));
        self.board.set_phase("training");
    }

    pub fn step_completed(&mut self, record: &StepRecord) {
        let now = Instant::now();
        let since_last = self.last_step_at.map_or(record.seconds, |at| (now - at).as_secs_f64());
        self.last_step_at = Some(now);
        self.board.step_completed(StepPoint {
            step: record.step,
            loss_d: record.loss_d,
            loss_g: record.loss_g,
            loss_d_real: record.loss_d_real,
            loss_d_fake: record.loss_d_fake,
            train_d: record.train_d,
            train_g: record.train_g,
            workers: record.workers,
            images: record.images,
            seconds: since_last,
        });
        self.losses.push(LossPoint {
            step: record.step,
            loss_d: record.loss_d,
            loss_g: record.loss_g,
            train_d: record.train_d,
            train_g: record.train_g,
        });
        if let Some(progress) = &mut self.progress {
            let (steps_per_sec, images_per_sec, eta_secs) = self.board.rates();
            progress.update(&ProgressView {
                step: record.step,
                steps_total: self.steps_total,
                steps_per_sec,
                images_per_sec,
                eta_secs,
                loss_d: record.loss_d,
                loss_g: record.loss_g,
                train_d: record.train_d,
                train_g: record.train_g,
                workers: record.workers,
            });
        }
        if let Some(writer) = &mut self.tensorboard {
            let scalars = [
                ("loss/d", record.loss_d),
                ("loss/g", record.loss_g),
                ("loss/d_real", record.loss_d_real),
                ("loss/d_fake", record.loss_d_fake),
                ("train/d", f64::from(u8::from(record.train_d))),
                ("train/g", f64::from(u8::from(record.train_g))),
                ("cluster/workers", record.workers as f64),
                ("cluster/step_seconds", record.seconds),
            ];
            for (tag, value) in scalars {
                if let Err(e) = writer.scalar(tag, record.step, value) {
                    warn!(error = %e, "could not write the TensorBoard event file; it is no longer written");
                    self.tensorboard = None;
                    break;
                }
            }
        }
    }

    /// A checkpoint's sample grid, as PNG bytes.
    pub fn sample_grid(&mut self, step: u64, png: &[u8], width: u32, height: u32) {
        self.board.sample_grid(step, png.to_vec());
        if let Some(writer) = &mut self.tensorboard
            && let Err(e) = writer.image_png("samples", step, png, width, height)
        {
            warn!(error = %e, "could not write the sample grid to the TensorBoard event file");
        }
    }

    pub fn scored(&mut self, record: &QualityRecord) {
        self.board.quality(record.step, record.swd);
        self.scores.push(ScorePoint {
            step: record.step,
            swd: record.swd,
        });
        if let Some(writer) = &mut self.tensorboard {
            let levels = record.swd_levels.iter().enumerate();
            let tagged = std::iter::once(("quality/swd".to_string(), record.swd))
                .chain(levels.map(|(level, &v)| (format!("quality/swd_level_{level}"), v)));
            for (tag, value) in tagged {
                if let Err(e) = writer.scalar(&tag, record.step, value) {
                    warn!(error = %e, "could not write the score to the TensorBoard event file");
                    break;
                }
            }
        }
    }

    /// At a checkpoint: the training plot is redrawn and the event file made durable.
    pub fn checkpointed(&mut self) {
        let note = if self.scored {
            plot::SCORES_TO_COME
        } else {
            plot::NOT_SCORED
        };
        let drawn = tokio::task::block_in_place(|| {
            plot::save_training_plot(&self.plot_path, &self.losses, &self.scores, &self.title, note)
        });
        if let Err(e) = drawn {
            warn!(path = %self.plot_path.display(), error = %e, "could not draw the training plot");
        }
        if let Some(writer) = &mut self.tensorboard
            && let Err(e) = writer.flush()
        {
            warn!(error = %e, "could not flush the TensorBoard event file");
        }
    }

    /// The run is over: the bar comes off the screen and the page says how it ended.
    pub fn finished(&mut self, phase: &str) {
        if let Some(progress) = self.progress.take() {
            progress.finish();
        }
        self.board.set_phase(phase);
    }
}
