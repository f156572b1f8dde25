//! The step loop. The trainer owns the master parameters and optimizer state; workers only
//! ever hold copies it sent them.
//!
//! A step, with every message naming the step, the attempt and the phase:
//! 1. EVALUATE: every shard gets its batch (sent to the worker holding it); workers report
//!    each shard's loss sums on the current parameters.
//! 2. The mean losses decide the plan (`decide_balance`), sent to every worker.
//! 3. DISCRIMINATOR (if planned): workers upload one D gradient per shard (a worker with
//!    several replicas one for all its shards, summed locally); the trainer averages them in
//!    shard order, applies RMSProp and the batch-norm running averages, and broadcasts D.
//! 4. GENERATOR (if planned): the same for G, whose gradients went through the updated D.
//!
//! Between steps the cluster may change ([`membership`]). A worker lost inside a step is
//! evicted, the step is undone and run again with a higher attempt number by the workers that
//! remain; since every shard's batch, noise and dropout depend only on the step and the shard,
//! the retried step computes exactly what the first attempt would have. The state is always
//! that of the last completed step, so a checkpoint never holds half a step.

use bytes::Bytes;
use forger_common::balance::{StepPlan, decide_balance};
use forger_common::checkpoint::{self, NetState, TrainingState};
use forger_common::chunk_update::{ChunkState, LastPart, finish_chunk};
use forger_common::compression::GradientCompression;
use forger_common::grid;
use forger_common::layout::{self, BATCH_NORM_DECAY};
use forger_common::quality::job::ImageRequest;
use forger_common::rmsprop::{RmsProp, update_moving_average};
use forger_common::sampler::BatchSampler;
use forger_common::seeds::{self, Stream};
use forger_common::spec::JobSpec;
use forger_common::wire;
use forger_proto::pb::{self, coordinator_message::Kind as Out, worker_message::Kind as In};
use tokio::time::{Duration, Instant};
use tracing::{debug, info, warn};

use crate::error::{CoordinatorError, Result};
use crate::monitor::{Monitor, WorkerTimes};
use crate::peers::Peers;
use crate::quality::QualityProbe;
use crate::reduce::{self, Finish, StreamingMean, Taken, chunk_count, chunk_range};
use crate::run_dir::{EventLog, MetricsLog, QualityRecord, RunDir, StepRecord};
use crate::status::WorkerRow;

mod membership;

/// How a run ended.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Steps completed, counting those before a resume.
    pub step: u64,
    /// True when a shutdown signal stopped the run before its last step.
    pub interrupted: bool,
    /// Workers evicted (lost, late, or out of step) during this process's run.
    pub evictions: u64,
    /// Workers admitted after training began.
    pub joins: u64,
    /// Step attempts undone and run again.
    pub retries: u64,
}

/// A run of this many fully non-finite steps means the model diverged.
const DIVERGED_AFTER: u32 = 10;

/// The shortest stall deadline per shard, so that fast phases (milliseconds) do not make a
/// scheduling hiccup look like a stuck worker.
const STALL_FLOOR: Duration = Duration::from_secs(10);

/// One network's optimizer, the streamed mean of the uploads towards it, and the buffer its
/// next parameters are written to (allocated once and reused every step).
///
/// Until a step is finished it can be undone, so its update must not destroy the state it
/// started from. The new parameters go into `spare` while the master copy stays as it was;
/// once every chunk is done the two swap, and `spare` holds the old parameters: the undo copy,
/// made without copying. The new mean square is written over the mean in the reduce buffer,
/// chunk by chunk as RMSProp consumes it, and swapped with the master's when the step is
/// finished; so undoing needs no copy of it at all.
#[derive(Debug)]
struct NetSlot {
    optimizer: RmsProp,
    mean: StreamingMean,
    spare: Vec<f32>,
    /// Set once this step's update swapped `spare` and the master parameters.
    updated: bool,
}

impl NetSlot {
    fn new(optimizer: RmsProp, len: usize, bn_len: usize, compression: GradientCompression) -> Self {
        NetSlot {
            optimizer,
            mean: StreamingMean::new(len, bn_len, compression),
            spare: vec![0.0; len],
            updated: false,
        }
    }

    /// Undoes this step's update of `master`, if it got that far.
    fn undo(&mut self, master: &mut NetState) {
        if self.updated {
            std::mem::swap(&mut master.params, &mut self.spare);
            self.updated = false;
        }
    }

    /// Completes this step's update of `master`: the mean square RMSProp left in the reduce
    /// buffer becomes the master's, and the old one the next step's reduce buffer.
    fn finish(&mut self, master: &mut NetState) {
        if self.updated {
            self.mean.swap_sum(&mut master.mean_square);
            self.updated = false;
        }
    }
}

/// Finishes each chunk of the streamed mean with RMSProp (`chunk_update`): the new parameters
/// go into the slot's spare buffer and, as a buffer of their own, to `updated` for the
/// broadcast; the new mean square is left in the reduce buffer.
struct ApplyRmsProp<'a> {
    optimizer: &'a RmsProp,
    master: &'a NetState,
    new_params: &'a mut [f32],
    updated: &'a mut Vec<(usize, Bytes)>,
}

impl Finish for ApplyRmsProp<'_> {
    fn finish(&mut self, chunk: usize, sum: &mut [f32], part: LastPart<'_>, compression: GradientCompression) -> bool {
        let range = chunk_range(chunk, self.master.params.len());
        let state = ChunkState {
            params: &self.master.params[range.clone()],
            mean_square: &self.master.mean_square[range.clone()],
            sum_then_mean_square: sum,
            new_params: &mut self.new_params[range],
        };
        match finish_chunk(self.optimizer, compression, part, state) {
            Some(values) => {
                self.updated.push((chunk, wire::f32_bytes_owned(values)));
                true
            }
            None => false,
        }
    }
}

impl From<pb::GradientChunk> for reduce::Chunk {
    fn from(chunk: pb::GradientChunk) -> Self {
        reduce::Chunk {
            shard: chunk.shard,
            offset: chunk.offset as usize,
            bytes: chunk.values,
            last: chunk.last,
            samples: chunk.samples,
            bn_stats: chunk.bn_batch_stats,
            group: chunk
                .group
                .into_iter()
                .map(|g| reduce::GroupShard {
                    shard: g.shard,
                    samples: g.samples,
                    bn_stats: g.bn_batch_stats,
                    non_finite: g.non_finite,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Net {
    Discriminator,
    Generator,
}

impl Net {
    fn phase(self) -> pb::Phase {
        match self {
            Net::Discriminator => pb::Phase::Discriminator,
            Net::Generator => pb::Phase::Generator,
        }
    }

    fn from_phase(phase: pb::Phase) -> Option<Net> {
        match phase {
            pb::Phase::Discriminator => Some(Net::Discriminator),
            pb::Phase::Generator => Some(Net::Generator),
            _ => None,
        }
    }

    fn phase_name(self) -> &'static str {
        match self {
            Net::Discriminator => "discriminator",
            Net::Generator => "generator",
        }
    }

    fn network(self) -> pb::Network {
        match self {
            Net::Discriminator => pb::Network::Discriminator,
            Net::Generator => pb::Network::Generator,
        }
    }
}

/// What the trainer writes and shows besides checkpoints.
#[derive(Debug)]
pub struct RunLogs {
    pub metrics: MetricsLog,
    pub events: EventLog,
    pub monitor: Monitor,
    /// The held-out images' reference for the score at checkpoints; `None`: no score.
    pub quality: Option<QualityProbe>,
}

/// Drives the run from the current state to the spec's last step.
#[derive(Debug)]
pub struct Trainer {
    spec: JobSpec,
    run: RunDir,
    metrics: MetricsLog,
    history: EventLog,
    monitor: Monitor,
    quality: Option<QualityProbe>,
    /// Each worker's time in the step in flight.
    worker_times: WorkerTimes,
    state: TrainingState,
    /// One sampler per shard, in shard order.
    samplers: Vec<BatchSampler>,
    peers: Peers,
    d: NetSlot,
    g: NetSlot,
    last_checkpoint: u64,
    /// The attempt at step `state.step + 1`; starts at 1 and grows with every retry.
    attempt: u32,
    /// Whether training has begun (the first membership settles differently).
    started: bool,
    /// Steps in a row on which no shard gave finite losses.
    skipped_in_a_row: u32,
    /// The longest a phase has taken in this run, per shard of the busiest worker.
    slowest_per_shard: Option<Duration>,
    /// Shards whose gradient for a network was not finite in an earlier attempt at this step:
    /// they sit that network's update out.
    excluded: Vec<(Net, u32)>,
    /// This attempt's (network, shard) pairs left out of the updates. Their workers compute
    /// and upload them anyway (a worker does not know), so their chunks may arrive during a
    /// later phase; they are ignored, not taken for a protocol violation.
    sitting_out: Vec<(Net, u32)>,
    summary: RunSummary,
}

/// What the losses of one attempt came to.
struct Evaluation {
    loss_d_real: f64,
    loss_d_fake: f64,
    loss_g: f64,
    /// Shards whose losses were finite, in shard order, with their samples: only they
    /// contribute to the updates.
    included: Vec<(u32, u32)>,
    images: u64,
}

impl Trainer {
    pub fn new(
        spec: JobSpec,
        run: RunDir,
        logs: RunLogs,
        state: TrainingState,
        samplers: Vec<BatchSampler>,
        peers: Peers,
    ) -> Self {
        let RunLogs {
            metrics,
            events: history,
            monitor,
            quality,
        } = logs;
        let t = &spec.train;
        let bn_len = layout::batch_norm_stats_len(&spec.model);
        let compression = spec.cluster.gradient_compression;
        let (d_len, g_len) = (state.discriminator.params.len(), state.generator.params.len());
        let d = NetSlot::new(RmsProp::for_spec(t, t.lr_d), d_len, bn_len, compression);
        let g = NetSlot::new(RmsProp::for_spec(t, t.lr_g), g_len, bn_len, compression);
        let last_checkpoint = state.step;
        Trainer {
            spec,
            run,
            metrics,
            history,
            monitor,
            quality,
            worker_times: WorkerTimes::default(),
            summary: RunSummary {
                step: state.step,
                ..RunSummary::default()
            },
            state,
            samplers,
            peers,
            d,
            g,
            last_checkpoint,
            attempt: 1,
            started: false,
            skipped_in_a_row: 0,
            slowest_per_shard: None,
            excluded: Vec::new(),
            sitting_out: Vec::new(),
        }
    }

    fn shards(&self) -> u32 {
        self.samplers.len() as u32
    }

    /// Waits for the first workers (the spec's `min_workers` within `join_timeout_secs`, and
    /// the rest for `start_grace_secs` more) and hands them their shards and the parameters.
    pub async fn gather(&mut self) -> Result<()> {
        self.settle().await
    }

    /// Tells every connected worker to leave; for a run `stopped` to be resumed, to wait for
    /// this coordinator to come back.
    pub async fn dismiss(&mut self, reason: &str, stopped: bool) {
        self.peers.dismiss_all(reason, stopped).await;
    }

    /// Runs every remaining step, then checkpoints and dismisses the workers.
    pub async fn run(mut self) -> Result<RunSummary> {
        let interrupted = match self.run_steps().await {
            Ok(finished) => Ok(!finished),
            // A stop while settling the cluster, pausing or drawing samples.
            Err(CoordinatorError::Interrupted { .. }) => self.stopped().map(|_| true),
            Err(e) => Err(e),
        };
        let result = interrupted;
        let result = result.map(|interrupted| RunSummary {
            step: self.state.step,
            interrupted,
            ..self.summary.clone()
        });
        match &result {
            Ok(summary) => {
                // A stopped run is checkpointed to be resumed, often by a supervisor that
                // restarts the coordinator at once (compose, Kubernetes): its workers wait
                // for it rather than leave, so nobody has to restart them on every node.
                let (reason, event, stopped) = if summary.interrupted {
                    (
                        "the run was stopped; it may be resumed at this address",
                        "stopped",
                        true,
                    )
                } else {
                    ("the run is complete", "finished", false)
                };
                let workers = self.peers.all().len();
                self.monitor.finished(event);
                self.history
                    .record(summary.step, event, serde_json::json!({ "workers_dismissed": workers }));
                self.peers.dismiss_all(reason, stopped).await;
            }
            Err(e) => {
                // Keep what was computed: the state is that of the last completed step, and no
                // non-finite value is ever applied to it.
                if self.state.step > self.last_checkpoint {
                    match self.save_checkpoint() {
                        Ok(()) => warn!(step = self.state.step, "saved a checkpoint of the last completed step"),
                        Err(save) => warn!(error = %save, "could not save the emergency checkpoint"),
                    }
                }
                self.monitor.finished(&format!("failed: {e}"));
                self.history
                    .record(self.state.step, "failed", serde_json::json!({ "error": e.to_string() }));
                self.peers.dismiss_all(&format!("the run failed: {e}"), false).await;
            }
        }
        result
    }

    /// Returns whether the run reached its last step (false: stopped by a signal).
    async fn run_steps(&mut self) -> Result<bool> {
        let steps = self.spec.train.steps;
        self.monitor.training_started(self.state.step);
        self.catch_up().await?;
        while self.state.step < steps {
            if self.peers.stopping() {
                info!(step = self.state.step, "stopping on request");
                break;
            }
            self.settle().await?;
            let step = self.state.step + 1;
            let started = Instant::now();
            let record = loop {
                match self.train_step(step, started).await {
                    Ok(record) => break record,
                    Err(CoordinatorError::Interrupted { .. }) => {
                        // The step was abandoned and undone; the last completed one is saved.
                        return self.stopped();
                    }
                    Err(CoordinatorError::Worker {
                        worker,
                        host,
                        step,
                        phase,
                        message,
                    }) => {
                        warn!(worker, %host, step, phase, %message, attempt = self.attempt, "evicting the worker; the step is undone and retried without it");
                        self.evict(worker, &host, phase, &message);
                        self.prepare_retry().await?;
                    }
                    Err(CoordinatorError::NonFiniteGradient {
                        worker,
                        shard,
                        step,
                        phase,
                    }) => {
                        warn!(
                            worker,
                            shard,
                            step,
                            phase,
                            "non-finite gradient: the step is undone and run again without this shard's contribution"
                        );
                        self.history.record(
                            step,
                            "dropped",
                            serde_json::json!({ "worker": worker, "shard": shard, "phase": phase }),
                        );
                        let net = [Net::Discriminator, Net::Generator]
                            .into_iter()
                            .find(|n| n.phase_name() == phase)
                            .expect("a non-finite gradient names a network's phase");
                        self.excluded.push((net, shard));
                        self.prepare_retry().await?;
                    }
                    Err(e) => return Err(e),
                }
            };
            self.attempt = 1;
            self.excluded.clear();
            // The console's progress says this every few seconds; each step is for debugging.
            debug!(
                step,
                loss_d = record.loss_d,
                loss_g = record.loss_g,
                train_d = record.train_d,
                train_g = record.train_g,
                workers = record.workers,
                seconds = record.seconds,
                "step complete"
            );
            self.metrics.append(&record)?;
            let times = self.worker_times.end_step();
            self.monitor.step_completed(&record);
            self.monitor.workers(self.worker_rows(&times));
            if step.is_multiple_of(self.spec.checkpoint.every) || step == steps {
                self.checkpoint_with_samples(step).await?;
            }
        }
        if self.state.step > self.last_checkpoint {
            return self.stopped();
        }
        Ok(self.state.step >= steps)
    }

    /// Before the next attempt at an undone step: every worker gets the parameters again
    /// (survivors may hold those of the undone update, or part of them) and the cluster settles.
    async fn prepare_retry(&mut self) -> Result<()> {
        self.attempt += 1;
        self.summary.retries += 1;
        for peer in self.peers.all_mut() {
            peer.has_params = false;
        }
        self.settle().await
    }

    /// After a stop: a worker may be what held things up, so no samples are asked for.
    fn stopped(&mut self) -> Result<bool> {
        if self.state.step > self.last_checkpoint {
            self.save_checkpoint()?;
            self.monitor.checkpointed();
        }
        Ok(false)
    }

    /// Removes a worker at fault and records why.
    fn evict(&mut self, worker: u64, host: &str, phase: &str, message: &str) {
        if self.peers.evict(worker, message, true) {
            self.summary.evictions += 1;
            let step = self.state.step + 1;
            self.history.record(
                step,
                "evicted",
                serde_json::json!({ "worker": worker, "host": host, "phase": phase, "reason": message }),
            );
        }
    }

    /// One attempt at a step; on error the state is rolled back to before it.
    async fn train_step(&mut self, step: u64, started: Instant) -> Result<StepRecord> {
        let samplers_before: Vec<_> = self.samplers.iter().map(BatchSampler::state).collect();
        let bn_before = self.state.batch_norm.clone();
        self.d.updated = false;
        self.g.updated = false;
        // An undone attempt's times say nothing about the step.
        self.worker_times.end_step();
        let result = self.try_step(step, started).await;
        if result.is_err() {
            for (sampler, state) in self.samplers.iter_mut().zip(samplers_before) {
                sampler.rewind(state);
            }
            self.state.batch_norm = bn_before;
            self.d.undo(&mut self.state.discriminator);
            self.g.undo(&mut self.state.generator);
        }
        result
    }

    /// The most shards any training replica computes one after another: a worker's shards
    /// are shared out among its replicas.
    fn most_shards(&self) -> u32 {
        self.peers
            .training()
            .map(|p| p.shards.len().div_ceil(p.info.replicas.max(1) as usize))
            .max()
            .unwrap_or(1)
            .max(1) as u32
    }

    /// How many replicas a worker runs (1 for one that is gone).
    fn replicas_of(&self, worker: u64) -> u32 {
        self.peers.get(worker).map_or(1, |p| p.info.replicas)
    }

    /// The deadline of a phase starting now: `step_timeout_secs` per shard a replica computes,
    /// or sooner once the run has shown how long a phase takes: `stall_factor` times the
    /// slowest phase so far (per shard, at least `STALL_FLOOR`). A live worker whose
    /// computation is stuck still sends heartbeats; this is what catches it.
    fn phase_deadline(&self) -> Instant {
        let most = self.most_shards();
        let fixed = Duration::from_secs(self.spec.cluster.step_timeout_secs) * most;
        let factor = self.spec.cluster.stall_factor;
        let warm = self.peers.training().all(|p| p.steps_done > 0);
        let stalled = match self.slowest_per_shard {
            Some(slowest) if factor > 0.0 && warm => slowest.mul_f64(factor).max(STALL_FLOOR) * most,
            _ => fixed,
        };
        Instant::now() + fixed.min(stalled)
    }

    /// Remembers how long a phase took, per shard of the busiest worker, once every worker has
    /// a step behind it.
    fn observe_phase(&mut self, started: Instant) {
        // A worker's first step (kernels loading, memory growing) says nothing of the others.
        if !self.peers.training().all(|p| p.steps_done > 0) {
            return;
        }
        let per_shard = started.elapsed() / self.most_shards();
        self.slowest_per_shard = Some(self.slowest_per_shard.map_or(per_shard, |s| s.max(per_shard)));
    }

    /// The workers in training and the shard each holds, in rank order.
    fn training(&self) -> Vec<(u64, Vec<u32>)> {
        self.peers.training().map(|p| (p.info.id, p.shards.clone())).collect()
    }

    /// Whether a message answers an earlier step or an abandoned attempt of this one.
    fn is_stale(&self, msg_step: u64, msg_attempt: u32) -> bool {
        let next = self.state.step + 1;
        msg_step < next || (msg_step == next && msg_attempt < self.attempt)
    }

    /// Whether a message is a late answer to something no longer awaited: an earlier step, an
    /// abandoned attempt, a sample request given up on, or a superseded Assign (the code that
    /// awaits samples or a Ready matches those first).
    fn is_leftover(&self, kind: &In) -> bool {
        match kind {
            In::Losses(l) => self.is_stale(l.step, l.attempt),
            In::Gradient(g) => self.is_stale(g.step, g.attempt),
            In::Samples(_) | In::Ready(_) => true,
            In::Hello(_) | In::Failure(_) | In::Heartbeat(_) | In::Leave(_) => false,
        }
    }

    async fn try_step(&mut self, step: u64, started: Instant) -> Result<StepRecord> {
        let batch = self.spec.train.batch_size as usize;
        let every = self.spec.train.check_params_every;
        let check_params = every > 0 && step.is_multiple_of(every);
        let attempt = self.attempt;
        let batches: Vec<Vec<u32>> = self.samplers.iter_mut().map(|s| s.next_batch(batch)).collect();
        let training = self.training();
        let deadline = self.phase_deadline();
        for (worker, shards) in &training {
            let batches = shards
                .iter()
                .map(|&shard| pb::ShardBatch {
                    shard,
                    indices: batches[shard as usize].clone(),
                })
                .collect();
            let message = pb::CoordinatorMessage::of(Out::Evaluate(pb::Evaluate {
                step,
                attempt,
                batches,
                check_params,
            }));
            self.peers.send(*worker, message, deadline, step, "evaluate").await?;
        }
        let evaluation = self.gather_losses(step, check_params, &training).await?;
        let shards = self.shards();
        let dropped_at_evaluation = shards - evaluation.included.len() as u32;
        let workers = training.len();
        let all_ids: Vec<u64> = training.iter().map(|(w, _)| *w).collect();
        if evaluation.included.is_empty() {
            // Nothing trustworthy to learn from: train nothing, and say so to every worker.
            self.skipped_in_a_row += 1;
            warn!(
                step,
                in_a_row = self.skipped_in_a_row,
                "no shard gave finite losses: the step trains nothing"
            );
            if self.skipped_in_a_row >= DIVERGED_AFTER {
                return Err(CoordinatorError::Diverged {
                    step,
                    steps: self.skipped_in_a_row,
                });
            }
            let plan = pb::CoordinatorMessage::of(Out::Plan(pb::Plan {
                step,
                attempt,
                train_d: false,
                train_g: false,
                ..pb::Plan::default()
            }));
            self.peers.send_all(&all_ids, &[plan], deadline, step, "plan").await?;
            self.finish_step(step);
            return Ok(StepRecord {
                step,
                loss_d: f64::NAN,
                loss_g: f64::NAN,
                loss_d_real: f64::NAN,
                loss_d_fake: f64::NAN,
                train_d: false,
                train_g: false,
                workers,
                images: 0,
                seconds: started.elapsed().as_secs_f64(),
                attempts: attempt,
                dropped: dropped_at_evaluation,
                skipped: true,
                contributions: 0,
            });
        }
        self.skipped_in_a_row = 0;
        let loss_d = 0.5 * (evaluation.loss_d_real + evaluation.loss_d_fake);
        let plan = decide_balance(loss_d, evaluation.loss_g, self.spec.train.balance);
        let StepPlan { train_d, train_g } = plan;
        let mut dropped = dropped_at_evaluation;
        // Each planned network with the shards its update averages.
        let updates: Vec<(Net, Vec<(u32, u32)>)> = [(Net::Discriminator, train_d), (Net::Generator, train_g)]
            .into_iter()
            .filter(|&(_, planned)| planned)
            .map(|(net, _)| {
                let averaged = evaluation
                    .included
                    .iter()
                    .copied()
                    .filter(|&(shard, _)| !self.excluded.contains(&(net, shard)))
                    .collect();
                (net, averaged)
            })
            .collect();
        self.sitting_out = updates
            .iter()
            .flat_map(|(net, averaged)| {
                (0..shards)
                    .filter(|s| !averaged.iter().any(|&(a, _)| a == *s))
                    .map(move |s| (*net, s))
            })
            .collect();
        // Workers that sum their shards need to know which to leave out.
        let sit_out = |net: Net| -> Vec<u32> {
            self.sitting_out
                .iter()
                .filter(|(n, _)| *n == net)
                .map(|&(_, s)| s)
                .collect()
        };
        let message = pb::CoordinatorMessage::of(Out::Plan(pb::Plan {
            step,
            attempt,
            train_d,
            train_g,
            sit_out_d: sit_out(Net::Discriminator),
            sit_out_g: sit_out(Net::Generator),
        }));
        self.peers
            .send_all(&all_ids, &[message], deadline, step, "plan")
            .await?;
        let mut contributions = 0;
        for (net, averaged) in updates {
            dropped += (evaluation.included.len() - averaged.len()) as u32;
            contributions += self.update(net, step, &training, &averaged).await?;
        }
        self.finish_step(step);
        Ok(StepRecord {
            step,
            loss_d,
            loss_g: evaluation.loss_g,
            loss_d_real: evaluation.loss_d_real,
            loss_d_fake: evaluation.loss_d_fake,
            train_d,
            train_g,
            workers,
            images: evaluation.images,
            seconds: started.elapsed().as_secs_f64(),
            attempts: attempt,
            dropped,
            skipped: false,
            contributions,
        })
    }

    /// The step can no longer be undone: its updates are completed and it becomes the state.
    fn finish_step(&mut self, step: u64) {
        self.d.finish(&mut self.state.discriminator);
        self.g.finish(&mut self.state.generator);
        for peer in self.peers.all_mut().iter_mut().filter(|p| p.trains()) {
            peer.steps_done += 1;
        }
        self.state.step = step;
        for (slot, sampler) in self.state.samplers.iter_mut().zip(&self.samplers) {
            *slot = sampler.state();
        }
    }

    async fn gather_losses(
        &mut self,
        step: u64,
        check_params: bool,
        training: &[(u64, Vec<u32>)],
    ) -> Result<Evaluation> {
        let deadline = self.phase_deadline();
        let started = Instant::now();
        let mut got: Vec<Option<pb::Losses>> = vec![None; training.len()];
        while got.iter().any(Option::is_none) {
            let waiting: Vec<u64> = (0..got.len())
                .filter(|&i| got[i].is_none())
                .map(|i| training[i].0)
                .collect();
            let (worker, kind) = self.peers.next(deadline, step, "evaluate", &waiting).await?;
            if self.is_leftover(&kind) {
                continue;
            }
            let Some(index) = training.iter().position(|(w, _)| *w == worker) else {
                return Err(self.unexpected(worker, step, "evaluate", &kind));
            };
            match kind {
                In::Losses(l) if l.step == step && l.attempt == self.attempt && got[index].is_none() => {
                    let mut reported: Vec<u32> = l.shards.iter().map(|s| s.shard).collect();
                    reported.sort_unstable();
                    if reported != training[index].1 || l.shards.iter().any(|s| s.samples == 0) {
                        return Err(self.peers.fault(
                            worker,
                            step,
                            "evaluate",
                            format!(
                                "reported losses for shards {reported:?}, expected {:?}, each over at least one sample",
                                training[index].1
                            ),
                        ));
                    }
                    got[index] = Some(l);
                    self.worker_times.answered(worker, started.elapsed());
                }
                other => return Err(self.unexpected(worker, step, "evaluate", &other)),
            }
        }
        self.observe_phase(started);
        self.worker_times.end_phase();
        let losses: Vec<pb::Losses> = got.into_iter().map(Option::unwrap).collect();
        if check_params {
            let expected = self.params_crc32();
            for (l, (worker, _)) in losses.iter().zip(training) {
                if l.params_crc32 != Some(expected) {
                    return Err(self.peers.fault(
                        *worker,
                        step,
                        "evaluate",
                        format!(
                            "its parameters differ from the coordinator's (crc32 {:?}, expected {expected}): the replica has drifted",
                            l.params_crc32
                        ),
                    ));
                }
            }
        }
        let mut by_shard: Vec<(u32, u64, &pb::ShardLosses)> = losses
            .iter()
            .zip(training)
            .flat_map(|(l, (worker, _))| l.shards.iter().map(move |s| (s.shard, *worker, s)))
            .collect();
        by_shard.sort_by_key(|(shard, _, _)| *shard);
        let mut evaluation = Evaluation {
            loss_d_real: 0.0,
            loss_d_fake: 0.0,
            loss_g: 0.0,
            included: Vec::new(),
            images: 0,
        };
        let mut samples = 0.0;
        for (shard, worker, s) in by_shard {
            if !(s.sum_d_real.is_finite() && s.sum_d_fake.is_finite() && s.sum_g.is_finite()) {
                warn!(
                    step,
                    worker, shard, "non-finite losses: the shard is left out of this step"
                );
                self.history.record(
                    step,
                    "dropped",
                    serde_json::json!({ "worker": worker, "shard": shard, "phase": "evaluate" }),
                );
                continue;
            }
            evaluation.included.push((shard, s.samples));
            evaluation.loss_d_real += s.sum_d_real;
            evaluation.loss_d_fake += s.sum_d_fake;
            evaluation.loss_g += s.sum_g;
            samples += f64::from(s.samples);
            evaluation.images += u64::from(s.samples);
        }
        if samples > 0.0 {
            evaluation.loss_d_real /= samples;
            evaluation.loss_d_fake /= samples;
            evaluation.loss_g /= samples;
        }
        Ok(evaluation)
    }

    fn params_crc32(&self) -> u32 {
        wire::crc32_of(&[
            &self.state.discriminator.params,
            &self.state.generator.params,
            &self.state.batch_norm,
        ])
    }

    fn unexpected(&self, worker: u64, step: u64, phase: &'static str, kind: &In) -> CoordinatorError {
        let what = match kind {
            In::Hello(_) => "a second Hello".to_string(),
            In::Losses(l) => format!("losses for step {} attempt {}", l.step, l.attempt),
            In::Gradient(g) => format!(
                "a gradient chunk for step {} attempt {} phase {:?} shard {}",
                g.step,
                g.attempt,
                g.phase(),
                g.shard
            ),
            In::Samples(s) => format!("samples for step {}", s.step),
            In::Ready(r) => format!("a Ready for shards {:?}", r.shards),
            In::Failure(_) | In::Heartbeat(_) | In::Leave(_) => "a control message".to_string(),
        };
        self.peers.fault(
            worker,
            step,
            phase,
            format!("sent {what}, which this phase does not expect"),
        )
    }

    /// Gathers one network's gradient for every averaged shard and streams the update: each
    /// chunk whose every shard has arrived is averaged (in shard order), gets RMSProp and is
    /// broadcast while later chunks are still arriving. The final chunk also updates and
    /// carries the batch-norm running averages. A worker with one replica uploads each of its
    /// averaged shards, one with several a single group for all of them. Returns how many
    /// uploads the update took in.
    async fn update(
        &mut self,
        net: Net,
        step: u64,
        training: &[(u64, Vec<u32>)],
        averaged: &[(u32, u32)],
    ) -> Result<u32> {
        let phase = net.phase_name();
        let deadline = self.phase_deadline();
        let started = Instant::now();
        let ids: Vec<u64> = training.iter().map(|(w, _)| *w).collect();
        let holder = |shard: u32| {
            training
                .iter()
                .find(|(_, shards)| shards.contains(&shard))
                .map(|(w, _)| *w)
        };
        if averaged.is_empty() {
            warn!(step, phase, "no finite gradient: the network is not updated this step");
            return self.broadcast_params(net, step, &ids, deadline).await.map(|()| 0);
        }
        let mut parts: Vec<Vec<(u32, u32)>> = Vec::new();
        for (worker, shards) in training {
            let own: Vec<(u32, u32)> = averaged.iter().copied().filter(|(s, _)| shards.contains(s)).collect();
            if own.is_empty() {
                continue;
            }
            if self.replicas_of(*worker) > 1 {
                parts.push(own);
            } else {
                parts.extend(own.into_iter().map(|s| vec![s]));
            }
        }
        // A group takes its turn at its first shard.
        parts.sort_by_key(|part| part[0].0);
        self.slot(net).mean.begin_parts(&parts);
        let chunks = self.slot(net).mean.chunks();
        let mut sent = 0;
        let mut updated: Vec<(usize, Bytes)> = Vec::new();
        loop {
            for (chunk, values) in updated.drain(..) {
                let message = self.params_chunk_message(net, step, chunk, values);
                self.peers.send_all(&ids, &[message], deadline, step, phase).await?;
                sent += 1;
            }
            if sent == chunks {
                break;
            }
            let mut waiting: Vec<u64> = self.slot(net).mean.unfinished().filter_map(holder).collect();
            waiting.dedup();
            let (worker, kind) = self.peers.next(deadline, step, phase, &waiting).await?;
            if self.is_leftover(&kind) {
                continue;
            }
            let In::Gradient(chunk) = kind else {
                return Err(self.unexpected(worker, step, phase, &kind));
            };
            let sitting_out =
                Net::from_phase(chunk.phase()).is_some_and(|n| self.sitting_out.contains(&(n, chunk.shard)));
            // A shard left out of that update, which a worker of one replica uploads anyway (one
            // summing its shards was told to leave it out).
            if chunk.step == step && holder(chunk.shard) == Some(worker) && sitting_out && self.replicas_of(worker) == 1
            {
                continue;
            }
            if chunk.step != step || chunk.phase() != net.phase() || holder(chunk.shard) != Some(worker) {
                return Err(self.unexpected(worker, step, phase, &In::Gradient(chunk)));
            }
            let shard = chunk.shard;
            self.worker_times.answered(worker, started.elapsed());
            let (slot, master) = match net {
                Net::Discriminator => (&mut self.d, &self.state.discriminator),
                Net::Generator => (&mut self.g, &self.state.generator),
            };
            let mut apply = ApplyRmsProp {
                optimizer: &slot.optimizer,
                master,
                new_params: &mut slot.spare,
                updated: &mut updated,
            };
            let taken = slot.mean.take(chunk.into(), &mut apply);
            match taken {
                Ok(Taken::Ok) => {}
                Ok(Taken::NonFinite { shard }) => {
                    let worker = holder(shard).unwrap_or(worker);
                    return Err(CoordinatorError::NonFiniteGradient {
                        worker,
                        shard,
                        step,
                        phase,
                    });
                }
                Err(e) => {
                    let message = format!("shard {shard}: {e}");
                    return Err(self.peers.fault(worker, step, phase, message));
                }
            }
            if self.slot(net).mean.is_complete() {
                self.observe_phase(started);
                self.worker_times.end_phase();
            }
        }
        Ok(self.slot(net).mean.parts() as u32)
    }

    fn slot(&mut self, net: Net) -> &mut NetSlot {
        match net {
            Net::Discriminator => &mut self.d,
            Net::Generator => &mut self.g,
        }
    }

    /// The message broadcasting chunk `chunk` of a network's new parameters, `values`. After
    /// the final chunk the new parameters become the master copy and the batch-norm running
    /// averages are updated.
    fn params_chunk_message(&mut self, net: Net, step: u64, chunk: usize, values: Bytes) -> pb::CoordinatorMessage {
        let (slot, master) = match net {
            Net::Discriminator => (&mut self.d, &mut self.state.discriminator),
            Net::Generator => (&mut self.g, &mut self.state.generator),
        };
        let range = slot.mean.range(chunk);
        let last = chunk + 1 == slot.mean.chunks();
        if last {
            std::mem::swap(&mut master.params, &mut slot.spare);
            slot.updated = true;
            // Every phase ran the generator in training mode, as each TF1 update op did, so
            // each updates the running statistics with the cluster's batch statistics.
            update_moving_average(&mut self.state.batch_norm, &slot.mean.bn_mean(), BATCH_NORM_DECAY);
        }
        params_chunk(
            step,
            net.network(),
            range.start,
            values,
            last.then(|| self.state.batch_norm.clone()),
        )
    }

    /// Sends one network's master parameters (and the batch-norm running statistics).
    async fn broadcast_params(&self, net: Net, step: u64, workers: &[u64], deadline: Instant) -> Result<()> {
        let values = match net {
            Net::Discriminator => &self.state.discriminator.params,
            Net::Generator => &self.state.generator.params,
        };
        let messages = params_messages(step, net.network(), values, &self.state.batch_norm);
        self.peers
            .send_all(workers, &messages, deadline, step, net.phase_name())
            .await
    }

    /// The checkpoint first (it is what must not be lost), then the sample grid, the score
    /// and the plot.
    async fn checkpoint_with_samples(&mut self, step: u64) -> Result<()> {
        self.monitor.phase("checkpointing");
        self.save_checkpoint()?;
        self.save_samples(step).await?;
        self.save_score(step).await?;
        self.monitor.checkpointed();
        self.monitor.phase("training");
        Ok(())
    }

    /// A run resumed from a checkpoint that never got its sample grid or score (written on a
    /// stop, when no worker is asked for anything, or just before a crash) gets them now, from
    /// the parameters it resumed with, so every checkpoint of the run has both.
    async fn catch_up(&mut self) -> Result<()> {
        let step = self.state.step;
        let grid_missing = !self.run.sample_grid(step).exists();
        let score_missing = self.quality.is_some() && !self.monitor.has_score(step);
        if step == 0 || !(grid_missing || score_missing) {
            return Ok(());
        }
        info!(
            step,
            grid_missing, score_missing, "completing the checkpoint resumed from"
        );
        if grid_missing {
            self.save_samples(step).await?;
        }
        if score_missing {
            self.save_score(step).await?;
        }
        self.monitor.checkpointed();
        Ok(())
    }

    /// Scores the generator on the held-out images, with images drawn by a training worker;
    /// with no worker able to draw them the score is skipped (the checkpoint is already safe).
    async fn save_score(&mut self, step: u64) -> Result<()> {
        let Some(probe) = self.quality.take() else {
            return Ok(());
        };
        let record = self.score_with(&probe, step).await;
        self.quality = Some(probe);
        let Some(record) = record? else {
            warn!(step, "no worker could draw the images to score; the score is skipped");
            return Ok(());
        };
        info!(
            step,
            swd = record.swd,
            seconds = record.seconds,
            "quality score (sliced Wasserstein distance, lower is better)"
        );
        self.metrics.append_quality(&record)?;
        self.monitor.scored(&record);
        Ok(())
    }

    /// The score of the generator as it is, or `None` when no worker could draw the images.
    async fn score_with(&mut self, probe: &QualityProbe, step: u64) -> Result<Option<QualityRecord>> {
        let started = Instant::now();
        let Some(pixels) = self.draw_images(step, probe.requests()).await? else {
            return Ok(None);
        };
        let score = tokio::task::block_in_place(|| probe.score(&pixels))?;
        Ok(Some(QualityRecord {
            step,
            swd: score.mean,
            swd_levels: score.levels,
            held_out: probe.held_out(),
            generated: probe.generated(),
            seconds: started.elapsed().as_secs_f64(),
        }))
    }

    /// The images of `requests`, drawn by one training worker and concatenated in order. A
    /// worker that fails at it is evicted and the next one asked; `None` when none is left.
    async fn draw_images(&mut self, step: u64, requests: &[ImageRequest]) -> Result<Option<Vec<u8>>> {
        let candidates: Vec<u64> = self.peers.training().map(|p| p.info.id).collect();
        'workers: for worker in candidates {
            let mut pixels = Vec::new();
            for request in requests {
                match self.request_images(worker, step, request.count, request.seed).await {
                    Ok(part) => pixels.extend_from_slice(&part),
                    Err(CoordinatorError::Worker {
                        worker,
                        host,
                        phase,
                        message,
                        ..
                    }) => {
                        warn!(worker, %host, step, phase, %message, "evicting the worker");
                        self.evict(worker, &host, phase, &message);
                        continue 'workers;
                    }
                    Err(e) => return Err(e),
                }
            }
            return Ok(Some(pixels));
        }
        Ok(None)
    }

    /// The status page's rows: one per connected worker.
    fn worker_rows(&self, times: &std::collections::HashMap<u64, Duration>) -> Vec<WorkerRow> {
        self.peers
            .all()
            .iter()
            .map(|peer| WorkerRow {
                id: peer.info.id,
                slot: peer.info.rank,
                address: peer.info.host.clone(),
                device: peer.info.device.clone(),
                replicas: peer.info.replicas,
                shards: peer.shards.clone(),
                step_seconds: times.get(&peer.info.id).map(Duration::as_secs_f64),
                last_seen_secs_ago: peer.last_seen().elapsed().as_secs_f64(),
            })
            .collect()
    }

    fn save_checkpoint(&mut self) -> Result<()> {
        let step = self.state.step;
        let path = self.run.checkpoint(step);
        tokio::task::block_in_place(|| checkpoint::save(&path, &self.spec, &self.state))?;
        self.metrics.sync()?;
        self.last_checkpoint = step;
        let existing: Vec<u64> = checkpoint::list(&self.run.checkpoints())?
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        for old in checkpoint::checkpoints_to_delete(&existing, step, self.spec.checkpoint.keep) {
            let old_path = self.run.checkpoint(old);
            if let Err(e) = std::fs::remove_file(&old_path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(path = %old_path.display(), error = %e, "could not delete an old checkpoint");
            }
        }
        info!(step, path = %path.display(), "checkpoint written");
        Ok(())
    }

    /// Asks a training worker for the fixed-noise sample batch and writes it as a grid; with
    /// no worker able to draw it the grid is skipped (the checkpoint is already safe).
    async fn save_samples(&mut self, step: u64) -> Result<()> {
        let request = ImageRequest {
            count: self.spec.checkpoint.samples,
            seed: seeds::derive(self.spec.train.seed, Stream::SampleNoise, &[]),
        };
        let Some(pixels) = self.draw_images(step, &[request]).await? else {
            warn!(step, "no worker could draw the sample grid; it is skipped");
            return Ok(());
        };
        let path = self.run.sample_grid(step);
        let image = grid::tile(&pixels, request.count as usize, self.spec.data.image_size);
        let png = tokio::task::block_in_place(|| -> Result<Vec<u8>> {
            let png = grid::encode_png(&path, &image)?;
            forger_common::atomic::write_atomic(&path, &png)?;
            Ok(png)
        })?;
        self.monitor.sample_grid(step, &png, image.width(), image.height());
        Ok(())
    }

    /// `count` images from a worker's generator with the noise of `seed`.
    async fn request_images(&mut self, worker: u64, step: u64, count: u32, seed: u64) -> Result<Bytes> {
        let request = pb::CoordinatorMessage::of(Out::Sample(pb::SampleRequest { step, count, seed }));
        let deadline = self.phase_deadline();
        self.peers.send(worker, request, deadline, step, "sample").await?;
        let size = self.spec.data.image_size;
        loop {
            let (from, kind) = self.peers.next(deadline, step, "sample", &[worker]).await?;
            match kind {
                In::Samples(s) if from == worker && s.step == step => {
                    let expected = (count * size * size * 3) as usize;
                    if s.count != count || s.image_size != size || s.pixels.len() != expected {
                        return Err(self
                            .peers
                            .fault(worker, step, "sample", "sent a sample batch of the wrong size"));
                    }
                    return Ok(s.pixels);
                }
                other if self.is_leftover(&other) => {}
                other => return Err(self.unexpected(from, step, "sample", &other)),
            }
        }
    }
}

/// A network's parameters as chunked messages; the final one carries the batch-norm running
/// statistics.
pub fn params_messages(
    step: u64,
    network: pb::Network,
    values: &[f32],
    batch_norm: &[f32],
) -> Vec<pb::CoordinatorMessage> {
    let bytes = wire::f32_bytes(values);
    let chunks = chunk_count(values.len());
    (0..chunks)
        .map(|c| {
            let range = chunk_range(c, values.len());
            let last = c + 1 == chunks;
            params_chunk(
                step,
                network,
                range.start,
                bytes.slice(range.start * 4..range.end * 4),
                last.then(|| batch_norm.to_vec()),
            )
        })
        .collect()
}

/// One chunk of a network's parameters starting at element `offset`; `bn_running` marks the
/// final chunk.
fn params_chunk(
    step: u64,
    network: pb::Network,
    offset: usize,
    values: Bytes,
    bn_running: Option<Vec<f32>>,
) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage::of(Out::Params(pb::ParamsChunk {
        step,
        network: network as i32,
        offset: offset as u64,
        values,
        last: bn_running.is_some(),
        bn_running_stats: bn_running.unwrap_or_default(),
        // Stamped as it is sent.
        session_messages_before: 0,
    }))
}
