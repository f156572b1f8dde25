//! The compute thread: the worker's replicas of both networks following the coordinator's
//! messages in order. Each message names its step, attempt and phase; anything out of turn is
//! an error.
//!
//! The worker holds one or more data shards. Every shard's batch is computed on its own, with
//! noise and dropout seeded by the step and the shard, so a shard's contribution is the same
//! whichever worker (or replica) computes it. With several replicas the shards are shared out
//! among them and computed in parallel, every parameter download is loaded into each, and
//! each phase's gradients are summed here, in shard order, into one upload for the group.

use std::collections::BTreeMap;

use forger_common::average::weighted_average;
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
use crate::replica::{Contribution, LossSums, Net, noise};
use crate::replica_set::{Job as ReplicaJob, ReplicaSet};
use crate::shard::{DROPOUT_PHASE_D, DROPOUT_PHASE_G, ShardStore, dropout_seed, noise_seed};

/// What the worker learnt at Join, and where it computes.
#[derive(Debug, Clone)]
pub struct Job {
    pub spec: JobSpec,
    /// One replica per device.
    pub devices: Vec<Device>,
    /// libtorch intra-op threads, shared out among the replicas.
    pub threads: usize,
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

/// The attempt in progress. Each shard's batch and noise serve every phase, as in the
/// article's loop; the replica that evaluated a shard keeps them and computes its gradients.
struct Current {
    step: u64,
    attempt: u32,
    /// Each shard of the step, in shard order, with the replica computing it.
    shards: Vec<(u32, usize)>,
    /// From the plan: the shards each network's update leaves out.
    sit_out_d: Vec<u32>,
    sit_out_g: Vec<u32>,
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
    replicas: ReplicaSet,
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
    let replicas = ReplicaSet::start(&job.spec.model, size, &job.devices, job.threads)?;
    info!(
        devices = %crate::device::describe_all(&job.devices),
        threads = job.threads,
        "replicas ready"
    );
    let d_len = layout::discriminator_layout(&job.spec.model, size).numel();
    let g_len = layout::generator_layout(&job.spec.model).numel();
    let encoder = GradientEncoder::new(job.spec.cluster.gradient_compression);
    let mut worker = Worker {
        job,
        replicas,
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
        let (offset, values) = (download.received, chunk.values.clone());
        self.replicas
            .each(|_| -> ReplicaJob<()> {
                let values = values.clone();
                Box::new(move |slot| slot.replica.set_params_chunk(net, offset, &values))
            })
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
        let running = chunk.bn_running_stats;
        self.replicas.each(|_| -> ReplicaJob<()> {
            let running = running.clone();
            Box::new(move |slot| slot.replica.set_batch_norm_running(&running))
        })?;
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
        let dim = spec.model.noise_dim as usize;
        // The previous step's batches (and, without dropout, their graphs) are done with.
        self.replicas.each(|_| -> ReplicaJob<()> {
            Box::new(|slot| {
                slot.batches.clear();
                Ok(())
            })
        })?;
        let replicas = self.replicas.len();
        let mut placed = Vec::with_capacity(evaluate.batches.len());
        let mut jobs: Vec<(usize, ReplicaJob<LossSums>)> = Vec::with_capacity(evaluate.batches.len());
        for (position, batch) in evaluate.batches.iter().enumerate() {
            let store = self.shards.get(&batch.shard).ok_or_else(|| {
                WorkerError::Protocol(format!(
                    "step {step} asks for shard {}, which this worker does not hold",
                    batch.shard
                ))
            })?;
            let positions = store.positions(&batch.indices, step)?;
            // A handle on the same bytes: each replica reads the images it needs itself.
            let images = store.images.shallow_clone();
            let (shard, seed) = (batch.shard, noise_seed(spec.train.seed, step, batch.shard));
            let replica = position % replicas;
            placed.push((shard, replica));
            jobs.push((
                replica,
                Box::new(move |slot| {
                    let images = slot.replica.batch(&images, &positions)?;
                    let noise = noise(seed, positions.len(), dim, slot.replica.device())?;
                    let (sums, step_batch) = slot.replica.evaluate_step(images, noise)?;
                    slot.batches.insert(shard, step_batch);
                    Ok(sums)
                }),
            ));
        }
        let sums = self.replicas.run(jobs)?;
        let losses = placed
            .iter()
            .zip(sums)
            .map(|(&(shard, _), sums)| pb::ShardLosses {
                shard,
                samples: sums.samples as u32,
                sum_d_real: sums.sum_d_real,
                sum_d_fake: sums.sum_d_fake,
                sum_g: sums.sum_g,
            })
            .collect();
        let params_crc32 = if evaluate.check_params {
            Some(self.params_crc32()?)
        } else {
            None
        };
        placed.sort_unstable();
        self.current = Some(Current {
            step,
            attempt: evaluate.attempt,
            shards: placed,
            sit_out_d: Vec::new(),
            sit_out_g: Vec::new(),
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

    /// The CRC32 of the parameters every replica holds; replicas that disagree are this
    /// worker's fault, reported rather than hidden behind one of them.
    fn params_crc32(&self) -> Result<u32> {
        let crcs = self
            .replicas
            .each(|_| -> ReplicaJob<u32> { Box::new(|slot| slot.replica.params_crc32()) })?;
        if crcs.windows(2).any(|pair| pair[0] != pair[1]) {
            return Err(WorkerError::Replica(format!(
                "the replicas of this process hold different parameters (crc32 {crcs:?})"
            )));
        }
        Ok(crcs[0])
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
        current.sit_out_d = plan.sit_out_d;
        current.sit_out_g = plan.sit_out_g;
        if plan.train_d {
            let contributions = self.gradients(Net::Discriminator)?;
            let current = self.current.as_ref().expect("checked above");
            self.upload(current.step, current.attempt, Net::Discriminator, contributions)
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
        let contributions = self.gradients(Net::Generator)?;
        self.upload(step, attempt, Net::Generator, contributions)
    }

    /// Each shard's gradient of `net` for the step in progress, in shard order, every replica
    /// computing the shards it evaluated. With one replica that is every shard, as uploaded
    /// one by one; with several, the shards the plan leaves out are not computed at all.
    fn gradients(&mut self, net: Net) -> Result<Vec<(u32, Contribution)>> {
        let current = self.current.as_ref().expect("a step is in progress");
        let (step, job_seed) = (current.step, self.job.spec.train.seed);
        let (phase, sit_out) = match net {
            Net::Discriminator => (DROPOUT_PHASE_D, &current.sit_out_d),
            Net::Generator => (DROPOUT_PHASE_G, &current.sit_out_g),
        };
        let grouped = self.replicas.len() > 1;
        let shards: Vec<(u32, usize)> = current
            .shards
            .iter()
            .copied()
            .filter(|(shard, _)| !(grouped && sit_out.contains(shard)))
            .collect();
        let jobs = shards
            .iter()
            .map(|&(shard, replica)| -> (usize, ReplicaJob<Contribution>) {
                let seed = dropout_seed(job_seed, step, shard, phase);
                let job: ReplicaJob<Contribution> = Box::new(move |slot| {
                    let batch = slot.batches.get_mut(&shard).ok_or_else(|| {
                        WorkerError::Protocol(format!("step {step}: shard {shard} was not evaluated"))
                    })?;
                    match net {
                        Net::Discriminator => slot.replica.discriminator_phase(batch, seed),
                        Net::Generator => slot.replica.generator_phase(batch, seed),
                    }
                });
                (replica, job)
            })
            .collect();
        let contributions = self.replicas.run(jobs)?;
        Ok(shards.iter().map(|&(shard, _)| shard).zip(contributions).collect())
    }

    /// Sends the phase's gradients: with one replica each shard's, as they are; with several
    /// one group, their local sum.
    fn upload(&mut self, step: u64, attempt: u32, net: Net, contributions: Vec<(u32, Contribution)>) -> Result<()> {
        if self.replicas.len() > 1 && contributions.len() > 1 {
            return self.upload_group(step, attempt, net, contributions);
        }
        let phase = phase_of(net);
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

    /// Sends one gradient for all of `contributions` (every shard this worker holds that the
    /// update averages): their sample-weighted mean, summed in shard order, so the coordinator
    /// weighs it by the group's samples. Each shard's samples and batch-norm statistics travel
    /// with the first chunk, and so does a shard whose gradient is not finite: the coordinator
    /// must learn which one to leave out, which the sum cannot tell.
    fn upload_group(
        &mut self,
        step: u64,
        attempt: u32,
        net: Net,
        contributions: Vec<(u32, Contribution)>,
    ) -> Result<()> {
        let phase = phase_of(net);
        let len = contributions[0].1.gradient.len();
        let weighted: Vec<(&[f32], u32)> = contributions
            .iter()
            .map(|(_, c)| (c.gradient.as_slice(), c.samples as u32))
            .collect();
        let mut sum = vec![0f32; len];
        weighted_average(&weighted, &mut sum);
        let total: u32 = weighted.iter().map(|&(_, n)| n).sum();
        let shards: Vec<u32> = contributions.iter().map(|&(shard, _)| shard).collect();
        let mut group: Vec<pb::GroupShard> = contributions
            .into_iter()
            .map(|(shard, c)| pb::GroupShard {
                shard,
                samples: c.samples as u32,
                non_finite: !c.gradient.iter().all(|v| v.is_finite()),
                bn_batch_stats: c.bn_stats,
            })
            .collect();
        let bytes = self.encoder.encode_group(step, &shards, net, sum);
        let value_bytes = self.encoder.value_bytes();
        let chunks = len.div_ceil(CHUNK_VALUES).max(1);
        for c in 0..chunks {
            if phase == pb::Phase::Discriminator && c == chunks / 2 {
                crash_point("worker-d-upload", step);
            }
            let (start, end) = (c * CHUNK_VALUES, ((c + 1) * CHUNK_VALUES).min(len));
            let last = c + 1 == chunks;
            self.send(Out::Gradient(pb::GradientChunk {
                step,
                attempt,
                phase: phase as i32,
                shard: shards[0],
                offset: start as u64,
                values: bytes.slice(start * value_bytes..end * value_bytes),
                last,
                samples: if last { total } else { 0 },
                bn_batch_stats: Vec::new(),
                group: std::mem::take(&mut group),
            }))?;
        }
        Ok(())
    }

    fn sample(&mut self, request: pb::SampleRequest) -> Result<()> {
        let (count, seed) = (request.count as usize, request.seed);
        let dim = self.job.spec.model.noise_dim as usize;
        let job: ReplicaJob<Vec<u8>> = Box::new(move |slot| {
            let noise = noise(seed, count, dim, slot.replica.device())?;
            slot.replica.sample(&noise)
        });
        let pixels = self.replicas.run(vec![(0, job)])?.remove(0);
        self.send(Out::Samples(pb::Samples {
            step: request.step,
            count: request.count,
            image_size: self.job.spec.data.image_size,
            pixels: pixels.into(),
        }))
    }
}

fn phase_of(net: Net) -> pb::Phase {
    match net {
        Net::Discriminator => pb::Phase::Discriminator,
        Net::Generator => pb::Phase::Generator,
    }
}
