//! The compute thread: a replica of both networks following the coordinator's messages in
//! order. Each message names its step, attempt and phase; anything out of turn is an error.
//!
//! The worker holds one or more data shards. Every shard's batch is computed on its own, with
//! noise and dropout seeded by the step and the shard, so a shard's contribution is the same
//! whichever worker computes it.

use std::collections::BTreeMap;

use forger_common::faults::crash_point;
use forger_common::layout;
use forger_common::spec::JobSpec;
use forger_common::wire::CHUNK_VALUES;
use forger_proto::pb::{self, coordinator_message::Kind as In, worker_message::Kind as Out};
use tch::Device;
use tracing::info;

use crate::data_link::Outbound;
use crate::error::{Result, WorkerError};
use crate::gradient_encoder::GradientEncoder;
use crate::replica::{Contribution, Net, Replica, StepBatch, noise};
use crate::shard::{DROPOUT_PHASE_D, DROPOUT_PHASE_G, ShardStore, dropout_seed, noise_seed};

/// What the worker learnt at Join.
#[derive(Debug, Clone)]
pub struct Job {
    pub spec: JobSpec,
    pub device: Device,
}

/// One downloaded shard's images, in the order they arrived.
#[derive(Debug, Clone)]
pub struct Shard {
    pub shard: u32,
    pub image_size: u32,
    /// Dataset index of each image.
    pub indices: Vec<u32>,
    /// Interleaved RGB bytes, image after image.
    pub pixels: Vec<u8>,
}

/// What the session side hands the compute thread.
#[derive(Debug)]
pub enum Command {
    /// A message from the coordinator, in the order it arrived.
    Message(pb::CoordinatorMessage),
    /// The answer to an Assign: hold exactly `shards`, of which `fetched` are new downloads.
    Shards { shards: Vec<u32>, fetched: Vec<Shard> },
}

/// One shard's part of the step in progress: its batch and noise serve every phase, as in the
/// article's loop.
struct ShardStep {
    shard: u32,
    batch: StepBatch,
}

/// The attempt in progress.
struct Current {
    step: u64,
    attempt: u32,
    shards: Vec<ShardStep>,
    /// Set after the plan; the G phase waits for the new D when D trains first.
    generator_pending: bool,
}

/// A parameter download in progress: its chunks go straight into the replica.
struct Download {
    net: Net,
    received: usize,
}

struct Worker {
    job: Job,
    replica: Replica,
    shards: BTreeMap<u32, ShardStore>,
    outbound: Outbound,
    current: Option<Current>,
    download: Option<Download>,
    encoder: GradientEncoder,
    d_len: usize,
    g_len: usize,
}

/// Runs until Shutdown, or until the session side of the channel closes.
pub fn run(job: Job, commands: std::sync::mpsc::Receiver<Command>, outbound: Outbound) -> Result<()> {
    let size = job.spec.data.image_size as usize;
    let replica = Replica::new(&job.spec.model, size, job.device)?;
    let d_len = layout::discriminator_layout(&job.spec.model, size).numel();
    let g_len = layout::generator_layout(&job.spec.model).numel();
    let encoder = GradientEncoder::new(job.spec.cluster.gradient_compression);
    let mut worker = Worker {
        job,
        replica,
        shards: BTreeMap::new(),
        outbound,
        current: None,
        download: None,
        encoder,
        d_len,
        g_len,
    };
    while let Ok(command) = commands.recv() {
        match command {
            Command::Shards { shards, fetched } => worker.hold(shards, fetched)?,
            Command::Message(message) => match message.kind {
                Some(In::Shutdown(s)) => {
                    info!(reason = %s.reason, "the coordinator ended the session");
                    return Ok(());
                }
                Some(kind) => worker.handle(kind)?,
                None => return Err(WorkerError::Protocol("the coordinator sent an empty message".into())),
            },
        }
    }
    Ok(())
}

impl Worker {
    fn send(&self, kind: Out) -> Result<()> {
        self.outbound
            .blocking_send(kind)
            .map_err(|_| WorkerError::SessionClosed)
    }

    fn handle(&mut self, kind: In) -> Result<()> {
        match kind {
            In::Params(chunk) => self.params(chunk),
            In::Evaluate(evaluate) => self.evaluate(evaluate),
            In::Plan(plan) => self.plan(plan),
            In::Sample(request) => self.sample(request),
            // The session side fetches the data and sends `Command::Shards` instead.
            In::Assign(_) | In::Shutdown(_) => Ok(()),
        }
    }

    /// Keeps exactly `shards`, adding the new downloads, and tells the coordinator.
    fn hold(&mut self, shards: Vec<u32>, fetched: Vec<Shard>) -> Result<()> {
        self.shards.retain(|shard, _| shards.contains(shard));
        self.encoder.retain(&shards);
        let size = self.job.spec.data.image_size;
        for shard in fetched {
            let store = ShardStore::new(shard.shard, &shard.indices, &shard.pixels, size)?;
            self.shards.insert(shard.shard, store);
        }
        let held: Vec<u32> = self.shards.keys().copied().collect();
        if held != shards {
            return Err(WorkerError::Protocol(format!(
                "assigned shards {shards:?} but holds {held:?}"
            )));
        }
        info!(?shards, "holding shards");
        self.send(Out::Ready(pb::Ready { shards }))
    }

    fn params(&mut self, chunk: pb::ParamsChunk) -> Result<()> {
        let net = match chunk.network() {
            pb::Network::Discriminator => Net::Discriminator,
            pb::Network::Generator => Net::Generator,
            pb::Network::Unspecified => return Err(WorkerError::Protocol("parameters for no network".into())),
        };
        let len = match net {
            Net::Discriminator => self.d_len,
            Net::Generator => self.g_len,
        };
        if chunk.offset == 0 {
            // A new download; one in progress was from an attempt the coordinator undid.
            self.download = None;
        }
        let download = self.download.get_or_insert(Download { net, received: 0 });
        let count = chunk.values.len() / 4;
        if download.net != net || chunk.offset as usize != download.received || download.received + count > len {
            return Err(WorkerError::Protocol(format!(
                "parameter chunk for {net} at {} does not continue the download ({} of {len} received)",
                chunk.offset, download.received
            )));
        }
        self.replica
            .set_params_chunk(net, download.received, &chunk.values)
            .map_err(|e| WorkerError::Protocol(format!("parameter chunk for {net}: {e}")))?;
        download.received += count;
        if !chunk.last {
            return Ok(());
        }
        let download = self.download.take().expect("download in progress");
        if download.received != len {
            return Err(WorkerError::Protocol(format!(
                "{net} download ended at {} of {len} values",
                download.received
            )));
        }
        self.replica.set_batch_norm_running(&chunk.bn_running_stats)?;
        if net == Net::Discriminator
            && let Some(current) = &self.current
            && current.step == chunk.step
            && current.generator_pending
        {
            self.generator_phase()?;
        }
        Ok(())
    }

    fn evaluate(&mut self, evaluate: pb::Evaluate) -> Result<()> {
        let step = evaluate.step;
        let spec = &self.job.spec;
        let mut steps = Vec::with_capacity(evaluate.batches.len());
        let mut losses = Vec::with_capacity(evaluate.batches.len());
        for batch in &evaluate.batches {
            let store = self.shards.get(&batch.shard).ok_or_else(|| {
                WorkerError::Protocol(format!(
                    "step {step} asks for shard {}, which this worker does not hold",
                    batch.shard
                ))
            })?;
            let positions = store.positions(&batch.indices, step)?;
            let images = self.replica.batch(&store.images, &positions)?;
            let seed = noise_seed(spec.train.seed, step, batch.shard);
            let noise = noise(seed, positions.len(), spec.model.noise_dim as usize, self.job.device)?;
            let (sums, step_batch) = self.replica.evaluate_step(images, noise)?;
            losses.push(pb::ShardLosses {
                shard: batch.shard,
                samples: sums.samples as u32,
                sum_d_real: sums.sum_d_real,
                sum_d_fake: sums.sum_d_fake,
                sum_g: sums.sum_g,
            });
            steps.push(ShardStep {
                shard: batch.shard,
                batch: step_batch,
            });
        }
        let params_crc32 = if evaluate.check_params {
            Some(self.replica.params_crc32()?)
        } else {
            None
        };
        self.current = Some(Current {
            step,
            attempt: evaluate.attempt,
            shards: steps,
            generator_pending: false,
        });
        self.send(Out::Losses(pb::Losses {
            step,
            attempt: evaluate.attempt,
            shards: losses,
            params_crc32,
        }))?;
        crash_point("worker-after-losses", step);
        Ok(())
    }

    fn plan(&mut self, plan: pb::Plan) -> Result<()> {
        let Some(current) = self
            .current
            .as_mut()
            .filter(|c| c.step == plan.step && c.attempt == plan.attempt)
        else {
            return Err(WorkerError::Protocol(format!(
                "a plan for step {} attempt {} arrived before its Evaluate",
                plan.step, plan.attempt
            )));
        };
        current.generator_pending = plan.train_g;
        if plan.train_d {
            let current = self.current.as_mut().expect("checked above");
            let (step, attempt) = (current.step, current.attempt);
            let mut contributions = Vec::with_capacity(current.shards.len());
            for part in &mut current.shards {
                let seed = dropout_seed(self.job.spec.train.seed, step, part.shard, DROPOUT_PHASE_D);
                let contribution = self.replica.discriminator_phase(&mut part.batch, seed)?;
                contributions.push((part.shard, contribution));
            }
            self.upload(step, attempt, Net::Discriminator, contributions)
            // The G phase follows once the updated D arrives (see `params`).
        } else if plan.train_g {
            self.generator_phase()
        } else {
            Ok(())
        }
    }

    fn generator_phase(&mut self) -> Result<()> {
        let current = self.current.as_mut().expect("a step is in progress");
        current.generator_pending = false;
        let (step, attempt) = (current.step, current.attempt);
        crash_point("worker-g-phase", step);
        let current = self.current.as_mut().expect("a step is in progress");
        let mut contributions = Vec::with_capacity(current.shards.len());
        for part in &mut current.shards {
            let seed = dropout_seed(self.job.spec.train.seed, step, part.shard, DROPOUT_PHASE_G);
            contributions.push((part.shard, self.replica.generator_phase(&mut part.batch, seed)?));
        }
        self.upload(step, attempt, Net::Generator, contributions)
    }

    /// Sends each shard's gradient in wire-sized chunks.
    fn upload(&mut self, step: u64, attempt: u32, net: Net, contributions: Vec<(u32, Contribution)>) -> Result<()> {
        let phase = match net {
            Net::Discriminator => pb::Phase::Discriminator,
            Net::Generator => pb::Phase::Generator,
        };
        let total_chunks: usize = contributions
            .iter()
            .map(|(_, c)| c.gradient.len().div_ceil(CHUNK_VALUES).max(1))
            .sum();
        let mut sent = 0;
        for (shard, contribution) in contributions {
            let Contribution {
                gradient,
                bn_stats,
                samples,
            } = contribution;
            let len = gradient.len();
            let chunks = len.div_ceil(CHUNK_VALUES).max(1);
            let bytes = self.encoder.encode(step, shard, net, gradient);
            let value_bytes = self.encoder.value_bytes();
            let mut bn_stats = Some(bn_stats);
            for c in 0..chunks {
                if phase == pb::Phase::Discriminator && sent == total_chunks / 2 {
                    // Halfway through the upload (before it, with a single chunk).
                    crash_point("worker-d-upload", step);
                }
                let start = c * CHUNK_VALUES;
                let end = ((c + 1) * CHUNK_VALUES).min(len);
                let last = c + 1 == chunks;
                self.send(Out::Gradient(pb::GradientChunk {
                    step,
                    attempt,
                    phase: phase as i32,
                    shard,
                    offset: start as u64,
                    values: bytes.slice(start * value_bytes..end * value_bytes),
                    last,
                    samples: if last { samples as u32 } else { 0 },
                    bn_batch_stats: if last {
                        bn_stats.take().unwrap_or_default()
                    } else {
                        Vec::new()
                    },
                    group: Vec::new(),
                }))?;
                sent += 1;
            }
        }
        Ok(())
    }

    fn sample(&mut self, request: pb::SampleRequest) -> Result<()> {
        let count = request.count as usize;
        let dim = self.job.spec.model.noise_dim as usize;
        let noise = noise(request.seed, count, dim, self.job.device)?;
        let pixels = self.replica.sample(&noise)?;
        self.send(Out::Samples(pb::Samples {
            step: request.step,
            count: request.count,
            image_size: self.job.spec.data.image_size,
            pixels: pixels.into(),
        }))
    }
}
