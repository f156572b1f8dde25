//! The step loop. The trainer owns the master parameters and optimizer state; workers only
//! ever hold copies it sent them.
//!
//! A step, with every message naming the step and phase:
//! 1. EVALUATE: each rank gets its batch; all report loss sums on the current parameters.
//! 2. The cluster-mean losses decide the plan (`decide_balance`), sent to every rank.
//! 3. DISCRIMINATOR (if planned): ranks upload D gradients; the trainer averages them in rank
//!    order, applies RMSProp and the batch-norm running averages, and broadcasts D.
//! 4. GENERATOR (if planned): the same for G, whose gradients went through the updated D.
//!
//! A failure inside a step undoes that step's updates, so the state is always that of the
//! last completed step: the emergency checkpoint written then never holds half a step.

use std::time::Instant;

use bytes::Bytes;
use forger_common::balance::{StepPlan, decide_balance};
use forger_common::checkpoint::{self, NetState, TrainingState};
use forger_common::grid;
use forger_common::layout::{self, BATCH_NORM_DECAY};
use forger_common::rmsprop::{RmsProp, update_moving_average};
use forger_common::sampler::BatchSampler;
use forger_common::seeds::{self, Stream};
use forger_common::spec::JobSpec;
use forger_common::wire::{self, CHUNK_VALUES};
use forger_proto::pb::{self, coordinator_message::Kind as Out, worker_message::Kind as In};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::error::{CoordinatorError, Result};
use crate::peers::Peers;
use crate::reduce::{Upload, weighted_average};
use crate::run_dir::{MetricsLog, RunDir, StepRecord};

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Steps completed, counting those before a resume.
    pub step: u64,
    /// True when a shutdown signal stopped the run before its last step.
    pub interrupted: bool,
}

/// One network's optimizer, the uploads towards it, and a copy of its state from before this
/// step's update (buffers allocated once and reused every step).
#[derive(Debug)]
struct NetSlot {
    optimizer: RmsProp,
    uploads: Vec<Upload>,
    average: Vec<f32>,
    undo: NetState,
    /// Set once `undo` holds the state from before this step's update.
    updated: bool,
}

impl NetSlot {
    fn new(optimizer: RmsProp, len: usize, workers: usize) -> Self {
        NetSlot {
            optimizer,
            uploads: (0..workers).map(|_| Upload::new(len)).collect(),
            average: vec![0.0; len],
            undo: NetState {
                params: vec![0.0; len],
                mean_square: vec![0.0; len],
            },
            updated: false,
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

/// Drives the run from the current state to the spec's last step.
#[derive(Debug)]
pub struct Trainer {
    spec: JobSpec,
    run: RunDir,
    metrics: MetricsLog,
    state: TrainingState,
    samplers: Vec<BatchSampler>,
    peers: Peers,
    d: NetSlot,
    g: NetSlot,
    bn_len: usize,
    last_checkpoint: u64,
    stop: watch::Receiver<bool>,
}

impl Trainer {
    pub fn new(
        spec: JobSpec,
        run: RunDir,
        metrics: MetricsLog,
        state: TrainingState,
        samplers: Vec<BatchSampler>,
        peers: Peers,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let t = &spec.train;
        let optimizer = |lr: f64| RmsProp {
            lr: lr as f32,
            decay: t.rmsprop_decay as f32,
            epsilon: t.rmsprop_epsilon as f32,
            l2: t.l2 as f32,
        };
        let workers = peers.len();
        let d = NetSlot::new(optimizer(t.lr_d), state.discriminator.params.len(), workers);
        let g = NetSlot::new(optimizer(t.lr_g), state.generator.params.len(), workers);
        let bn_len = layout::batch_norm_stats_len(&spec.model);
        let last_checkpoint = state.step;
        Trainer {
            spec,
            run,
            metrics,
            state,
            samplers,
            peers,
            d,
            g,
            bn_len,
            last_checkpoint,
            stop,
        }
    }

    /// Runs every remaining step, then checkpoints and dismisses the workers.
    pub async fn run(mut self) -> Result<RunSummary> {
        let result = match self.run_steps().await {
            // A stop that lands while waiting for a sample grid: the checkpoint is written.
            Err(CoordinatorError::Interrupted { .. }) if self.state.step == self.last_checkpoint => Ok(RunSummary {
                step: self.state.step,
                interrupted: true,
            }),
            other => other,
        };
        match &result {
            Ok(summary) => {
                let reason = if summary.interrupted {
                    "the run was stopped"
                } else {
                    "the run is complete"
                };
                self.peers.shutdown(reason).await;
            }
            Err(e) => {
                // Keep what was computed: the state is that of the last completed step. Not
                // after a divergence: those weights are already ruined, and saving them would
                // prune a good checkpoint.
                let diverged = matches!(e, CoordinatorError::Diverged { .. });
                if self.state.step > self.last_checkpoint && !diverged {
                    match self.save_checkpoint() {
                        Ok(()) => warn!(step = self.state.step, "saved a checkpoint of the last completed step"),
                        Err(save) => warn!(error = %save, "could not save the emergency checkpoint"),
                    }
                }
                self.peers.shutdown(&format!("the run failed: {e}")).await;
            }
        }
        result
    }

    async fn run_steps(&mut self) -> Result<RunSummary> {
        let start = self.state.step;
        self.broadcast_params(Net::Discriminator, start).await?;
        self.broadcast_params(Net::Generator, start).await?;
        let steps = self.spec.train.steps;
        info!(from = start, to = steps, workers = self.peers.len(), "training");
        let mut interrupted = false;
        while self.state.step < steps {
            if *self.stop.borrow() {
                interrupted = true;
                info!(step = self.state.step, "stopping on request");
                break;
            }
            let step = self.state.step + 1;
            let record = match self.train_step(step).await {
                Ok(record) => record,
                Err(CoordinatorError::Interrupted { .. }) => {
                    // The step was abandoned and undone; the last completed one is saved below.
                    interrupted = true;
                    break;
                }
                Err(e) => return Err(e),
            };
            info!(
                step,
                loss_d = record.loss_d,
                loss_g = record.loss_g,
                train_d = record.train_d,
                train_g = record.train_g,
                seconds = record.seconds,
                "step complete"
            );
            self.metrics.append(&record)?;
            if step.is_multiple_of(self.spec.checkpoint.every) || step == steps {
                self.checkpoint_with_samples(step).await?;
            }
        }
        if self.state.step > self.last_checkpoint {
            if interrupted {
                // A worker may be what held the step up; do not wait on it for samples.
                self.save_checkpoint()?;
            } else {
                self.checkpoint_with_samples(self.state.step).await?;
            }
        }
        Ok(RunSummary {
            step: self.state.step,
            interrupted,
        })
    }

    /// One step; on error the state is rolled back to before it.
    async fn train_step(&mut self, step: u64) -> Result<StepRecord> {
        let samplers_before: Vec<_> = self.samplers.iter().map(BatchSampler::state).collect();
        let bn_before = self.state.batch_norm.clone();
        self.d.updated = false;
        self.g.updated = false;
        let result = self.try_step(step).await;
        if result.is_err() {
            for (sampler, state) in self.samplers.iter_mut().zip(samplers_before) {
                sampler.rewind(state);
            }
            self.state.batch_norm = bn_before;
            for (slot, master) in [
                (&self.d, &mut self.state.discriminator),
                (&self.g, &mut self.state.generator),
            ] {
                if slot.updated {
                    master.params.copy_from_slice(&slot.undo.params);
                    master.mean_square.copy_from_slice(&slot.undo.mean_square);
                }
            }
        }
        result
    }

    async fn try_step(&mut self, step: u64) -> Result<StepRecord> {
        let started = Instant::now();
        let batch = self.spec.train.batch_size as usize;
        let every = self.spec.train.check_params_every;
        let check_params = every > 0 && step.is_multiple_of(every);
        for rank in 0..self.peers.len() {
            let indices = self.samplers[rank].next_batch(batch);
            let message = pb::CoordinatorMessage {
                kind: Some(Out::Evaluate(pb::Evaluate {
                    step,
                    batch: indices,
                    check_params,
                })),
            };
            self.peers.send(rank, message, step, "evaluate").await?;
        }
        let losses = self.gather_losses(step, check_params).await?;
        let samples: f64 = losses.iter().map(|l| f64::from(l.samples)).sum();
        let mean = |f: fn(&pb::Losses) -> f64| losses.iter().map(f).sum::<f64>() / samples;
        let loss_d_real = mean(|l| l.sum_d_real);
        let loss_d_fake = mean(|l| l.sum_d_fake);
        let loss_g = mean(|l| l.sum_g);
        let loss_d = 0.5 * (loss_d_real + loss_d_fake);
        if let Some(rank) = losses
            .iter()
            .position(|l| !(l.sum_d_real + l.sum_d_fake + l.sum_g).is_finite())
        {
            let info = self.peers.info(rank);
            return Err(CoordinatorError::Diverged {
                worker: info.id,
                host: info.host.clone(),
                step,
                loss_d,
                loss_g,
            });
        }
        let plan = decide_balance(loss_d, loss_g, self.spec.train.balance);
        let StepPlan { train_d, train_g } = plan;
        let message = pb::CoordinatorMessage {
            kind: Some(Out::Plan(pb::Plan { step, train_d, train_g })),
        };
        self.peers.broadcast(&[message], step, "plan").await?;
        if train_d {
            self.update(Net::Discriminator, step).await?;
        }
        if train_g {
            self.update(Net::Generator, step).await?;
        }
        self.state.step = step;
        for (slot, sampler) in self.state.samplers.iter_mut().zip(&self.samplers) {
            *slot = sampler.state();
        }
        Ok(StepRecord {
            step,
            loss_d,
            loss_g,
            loss_d_real,
            loss_d_fake,
            train_d,
            train_g,
            workers: self.peers.len(),
            images: samples as u64,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    async fn gather_losses(&mut self, step: u64, check_params: bool) -> Result<Vec<pb::Losses>> {
        let deadline = self.peers.phase_deadline();
        let mut got: Vec<Option<pb::Losses>> = vec![None; self.peers.len()];
        while got.iter().any(Option::is_none) {
            let waiting: Vec<usize> = (0..got.len()).filter(|&r| got[r].is_none()).collect();
            let (rank, kind) = self.peers.next(deadline, step, "evaluate", &waiting).await?;
            match kind {
                In::Losses(l) if l.step == step && got[rank].is_none() => {
                    if l.samples == 0 {
                        return Err(self
                            .peers
                            .fault(rank, step, "evaluate", "reported losses over zero samples"));
                    }
                    got[rank] = Some(l);
                }
                other => return Err(self.unexpected(rank, step, "evaluate", &other)),
            }
        }
        let losses: Vec<pb::Losses> = got.into_iter().map(Option::unwrap).collect();
        if check_params {
            let expected = self.params_crc32();
            for (rank, l) in losses.iter().enumerate() {
                if l.params_crc32 != Some(expected) {
                    return Err(self.peers.fault(
                        rank,
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
        Ok(losses)
    }

    fn params_crc32(&self) -> u32 {
        wire::crc32_of(&[
            &self.state.discriminator.params,
            &self.state.generator.params,
            &self.state.batch_norm,
        ])
    }

    fn unexpected(&self, rank: usize, step: u64, phase: &'static str, kind: &In) -> CoordinatorError {
        let what = match kind {
            In::Hello(_) => "a second Hello".to_string(),
            In::Losses(l) => format!("losses for step {}", l.step),
            In::Gradient(g) => format!("a gradient chunk for step {} phase {:?}", g.step, g.phase()),
            In::Samples(s) => format!("samples for step {}", s.step),
            In::Failure(_) => "a failure".to_string(),
        };
        self.peers.fault(
            rank,
            step,
            phase,
            format!("sent {what}, which this phase does not expect"),
        )
    }

    /// Gathers one network's gradients, averages them, applies the update and broadcasts.
    async fn update(&mut self, net: Net, step: u64) -> Result<()> {
        let phase = net.phase_name();
        let deadline = self.peers.phase_deadline();
        let workers = self.peers.len();
        let slot = match net {
            Net::Discriminator => &mut self.d,
            Net::Generator => &mut self.g,
        };
        slot.uploads.iter_mut().for_each(Upload::reset);
        loop {
            let slot = self.slot(net);
            let waiting: Vec<usize> = (0..workers).filter(|&r| !slot.uploads[r].complete).collect();
            if waiting.is_empty() {
                break;
            }
            let (rank, kind) = self.peers.next(deadline, step, phase, &waiting).await?;
            let In::Gradient(chunk) = kind else {
                return Err(self.unexpected(rank, step, phase, &kind));
            };
            if chunk.step != step || chunk.phase() != net.phase() {
                return Err(self.unexpected(rank, step, phase, &In::Gradient(chunk)));
            }
            let bn_len = self.bn_len;
            let upload = &mut self.slot(net).uploads[rank];
            if let Err(e) = upload.accept(chunk.offset as usize, &chunk.values, chunk.last) {
                return Err(self.peers.fault(rank, step, phase, e.to_string()));
            }
            if chunk.last {
                if chunk.samples == 0 || chunk.bn_batch_stats.len() != bn_len {
                    let message = format!(
                        "final chunk has {} samples and {} batch-norm values (expected {bn_len})",
                        chunk.samples,
                        chunk.bn_batch_stats.len()
                    );
                    return Err(self.peers.fault(rank, step, phase, message));
                }
                upload.samples = chunk.samples;
                upload.bn_stats = chunk.bn_batch_stats;
            }
        }
        self.apply_update(net);
        self.broadcast_params(net, step).await
    }

    fn slot(&mut self, net: Net) -> &mut NetSlot {
        match net {
            Net::Discriminator => &mut self.d,
            Net::Generator => &mut self.g,
        }
    }

    /// Averages the uploads in rank order and updates the master copy, keeping an undo copy.
    fn apply_update(&mut self, net: Net) {
        let (slot, master) = match net {
            Net::Discriminator => (&mut self.d, &mut self.state.discriminator),
            Net::Generator => (&mut self.g, &mut self.state.generator),
        };
        let batch_norm = &mut self.state.batch_norm;
        tokio::task::block_in_place(|| {
            slot.undo.params.copy_from_slice(&master.params);
            slot.undo.mean_square.copy_from_slice(&master.mean_square);
            slot.updated = true;
            let contributions: Vec<(&[f32], u32)> = slot.uploads.iter().map(|u| (u.values(), u.samples)).collect();
            weighted_average(&contributions, &mut slot.average);
            slot.optimizer
                .apply(&mut master.params, &mut master.mean_square, &slot.average);
            // Every phase ran the generator in training mode, as each TF1 update op did, so
            // each updates the running statistics with the cluster's batch statistics.
            let stats: Vec<(&[f32], u32)> = slot
                .uploads
                .iter()
                .map(|u| (u.bn_stats.as_slice(), u.samples))
                .collect();
            let mut mean_stats = vec![0.0; batch_norm.len()];
            weighted_average(&stats, &mut mean_stats);
            update_moving_average(batch_norm, &mean_stats, BATCH_NORM_DECAY);
        });
    }

    /// Sends one network's master parameters (and the batch-norm running statistics) to all.
    async fn broadcast_params(&self, net: Net, step: u64) -> Result<()> {
        let values = match net {
            Net::Discriminator => &self.state.discriminator.params,
            Net::Generator => &self.state.generator.params,
        };
        let messages = params_messages(step, net.network(), values, &self.state.batch_norm);
        self.peers.broadcast(&messages, step, net.phase_name()).await
    }

    async fn checkpoint_with_samples(&mut self, step: u64) -> Result<()> {
        self.save_checkpoint()?;
        self.save_samples(step).await
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

    /// Asks rank 0 for the fixed-noise sample batch and writes it as a grid.
    async fn save_samples(&mut self, step: u64) -> Result<()> {
        let count = self.spec.checkpoint.samples;
        let request = pb::CoordinatorMessage {
            kind: Some(Out::Sample(pb::SampleRequest {
                step,
                count,
                seed: seeds::derive(self.spec.train.seed, Stream::SampleNoise, &[]),
            })),
        };
        self.peers.send(0, request, step, "sample").await?;
        let deadline = self.peers.phase_deadline();
        let (rank, kind) = self.peers.next(deadline, step, "sample", &[0]).await?;
        let size = self.spec.data.image_size;
        match kind {
            In::Samples(s) if rank == 0 && s.step == step => {
                let expected = (count * size * size * 3) as usize;
                if s.count != count || s.image_size != size || s.pixels.len() != expected {
                    return Err(self
                        .peers
                        .fault(rank, step, "sample", "sent a sample batch of the wrong size"));
                }
                let path = self.run.sample_grid(step);
                let image = grid::tile(&s.pixels, count as usize, size);
                tokio::task::block_in_place(|| grid::save_png(&path, &image))?;
                Ok(())
            }
            other => Err(self.unexpected(rank, step, "sample", &other)),
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
    let mut bytes = Vec::new();
    wire::f32_to_le_bytes(values, &mut bytes);
    let bytes = Bytes::from(bytes);
    let chunks = values.len().div_ceil(CHUNK_VALUES).max(1);
    (0..chunks)
        .map(|c| {
            let start = c * CHUNK_VALUES;
            let end = ((c + 1) * CHUNK_VALUES).min(values.len());
            let last = c + 1 == chunks;
            pb::CoordinatorMessage {
                kind: Some(Out::Params(pb::ParamsChunk {
                    step,
                    network: network as i32,
                    offset: start as u64,
                    values: bytes.slice(start * 4..end * 4),
                    last,
                    bn_running_stats: if last { batch_norm.to_vec() } else { Vec::new() },
                })),
            }
        })
        .collect()
}
