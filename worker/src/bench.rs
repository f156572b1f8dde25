//! `forger-worker bench`: the cluster's training loop in one process, with no coordinator and
//! no network. The same replica, batches, seeds, shard-order averages, RMSProp and balancing as
//! a cluster run of the same spec, so at the same thread count it ends with the same bits (a
//! test checks this). It measures what the cluster costs over a plain loop.

use std::path::Path;
use std::time::Instant;

use forger_common::average::update_network;
use forger_common::balance::decide_balance;
use forger_common::checkpoint;
use forger_common::dataset;
use forger_common::init::fresh_state;
use forger_common::rmsprop::RmsProp;
use forger_common::sampler::{BatchSampler, SamplerState, assign_shards, split_for};
use forger_common::spec::JobSpec;
use tch::Device;

use crate::error::{Result, WorkerError};
use crate::gradient_encoder::GradientEncoder;
use crate::replica::{Contribution, Net, Replica, noise};
use crate::shard::{DROPOUT_PHASE_D, DROPOUT_PHASE_G, ShardStore, dropout_seed, noise_seed};

/// What a benchmark run measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub steps: u64,
    /// Real images looked at (every shard's batch of every step).
    pub images: u64,
    /// Wall-clock seconds of each step.
    pub step_seconds: Vec<f64>,
    /// Each step's discriminator and generator losses (batch means, before the updates).
    pub losses: Vec<(f64, f64)>,
}

/// Trains `steps` steps of `spec` on `device`; with `out`, writes the final state as a
/// checkpoint.
pub fn run(spec: &JobSpec, steps: u64, device: Device, out: Option<&Path>) -> Result<BenchReport> {
    let size = spec.data.image_size;
    let prepared = dataset::load(&spec.data.path, size, spec.data.limit)?;
    let shard_count = spec.cluster.workers as usize;
    let batch = spec.train.batch_size as usize;
    let seed = spec.train.seed;
    let shards = assign_shards(split_for(spec, prepared.len()).training, shard_count, seed);
    if shards.iter().any(|s| s.len() < batch) {
        return Err(WorkerError::Spec(format!(
            "{} images in {shard_count} shards leave a shard smaller than a batch of {batch}",
            prepared.len()
        )));
    }
    let mut stores = Vec::with_capacity(shard_count);
    for (index, shard) in shards.iter().enumerate() {
        stores.push(ShardStore::new(index as u32, shard, &prepared.gather(shard), size)?);
    }
    let mut samplers: Vec<BatchSampler> = shards
        .iter()
        .enumerate()
        .map(|(i, s)| BatchSampler::new(seed, i as u32, s.clone(), SamplerState::default()))
        .collect();

    let mut state = fresh_state(spec);
    let mut replica = Replica::new(&spec.model, size as usize, device)?;
    replica.set_params(Net::Discriminator, &state.discriminator.params)?;
    replica.set_params(Net::Generator, &state.generator.params)?;
    replica.set_batch_norm_running(&state.batch_norm)?;
    let t = &spec.train;
    let (d_optimizer, g_optimizer) = (RmsProp::for_spec(t, t.lr_d), RmsProp::for_spec(t, t.lr_g));
    let mut average_d = vec![0f32; state.discriminator.params.len()];
    let mut average_g = vec![0f32; state.generator.params.len()];
    let mut encoder = GradientEncoder::new(spec.cluster.gradient_compression);
    let mut report = BenchReport {
        steps,
        images: 0,
        step_seconds: Vec::with_capacity(steps as usize),
        losses: Vec::with_capacity(steps as usize),
    };
    for step in 1..=steps {
        let started = Instant::now();
        // Evaluate every shard on the current parameters, summing in shard order.
        let mut parts = Vec::with_capacity(shard_count);
        let (mut real, mut fake, mut gen_loss, mut samples) = (0.0, 0.0, 0.0, 0.0);
        for (store, sampler) in stores.iter().zip(&mut samplers) {
            let shard = store.shard;
            let positions = store.positions(&sampler.next_batch(batch), step)?;
            let images = replica.batch(&store.images, &positions)?;
            let noise = noise(
                noise_seed(seed, step, shard),
                positions.len(),
                spec.model.noise_dim as usize,
                device,
            )?;
            let (sums, step_batch) = replica.evaluate_step(images, noise)?;
            if !(sums.sum_d_real.is_finite() && sums.sum_d_fake.is_finite() && sums.sum_g.is_finite()) {
                return Err(WorkerError::Protocol(format!(
                    "step {step}: shard {shard} gave non-finite losses"
                )));
            }
            real += sums.sum_d_real;
            fake += sums.sum_d_fake;
            gen_loss += sums.sum_g;
            samples += sums.samples as f64;
            parts.push((shard, step_batch));
        }
        let loss_d = 0.5 * (real / samples + fake / samples);
        let loss_g = gen_loss / samples;
        report.losses.push((loss_d, loss_g));
        let plan = decide_balance(loss_d, loss_g, t.balance);
        let phases = [
            (
                Net::Discriminator,
                plan.train_d,
                DROPOUT_PHASE_D,
                &d_optimizer,
                &mut average_d,
            ),
            (
                Net::Generator,
                plan.train_g,
                DROPOUT_PHASE_G,
                &g_optimizer,
                &mut average_g,
            ),
        ];
        for (net, planned, phase, optimizer, average) in phases {
            if !planned {
                continue;
            }
            let mut contributions = Vec::with_capacity(parts.len());
            for (shard, step_batch) in &mut parts {
                let dropout = dropout_seed(seed, step, *shard, phase);
                let mut contribution = match net {
                    Net::Discriminator => replica.discriminator_phase(step_batch, dropout)?,
                    Net::Generator => replica.generator_phase(step_batch, dropout)?,
                };
                // What the coordinator would average (bf16-rounded when compressed).
                contribution.gradient = encoder.delivered(step, *shard, net, contribution.gradient);
                contributions.push(contribution);
            }
            let (gradients, stats) = split(&contributions);
            let master = match net {
                Net::Discriminator => &mut state.discriminator,
                Net::Generator => &mut state.generator,
            };
            update_network(&gradients, &stats, optimizer, master, average, &mut state.batch_norm);
            replica.set_params(net, &master.params)?;
            replica.set_batch_norm_running(&state.batch_norm)?;
        }
        state.step = step;
        report.images += samples as u64;
        report.step_seconds.push(started.elapsed().as_secs_f64());
    }
    if let Some(out) = out {
        state.dataset_len = prepared.len();
        state.samplers = samplers.iter().map(BatchSampler::state).collect();
        checkpoint::save(out, spec, &state)?;
    }
    Ok(report)
}

/// Each shard's gradient and batch-norm statistics with its sample count, in shard order.
type Weighted<'a> = Vec<(&'a [f32], u32)>;

fn split(contributions: &[Contribution]) -> (Weighted<'_>, Weighted<'_>) {
    let weighted = |f: fn(&Contribution) -> &[f32]| contributions.iter().map(|c| (f(c), c.samples as u32)).collect();
    (weighted(|c| &c.gradient), weighted(|c| &c.bn_stats))
}
