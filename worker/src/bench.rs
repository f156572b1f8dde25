//! `forger-worker bench`: the cluster's training loop in one process, with no coordinator and
//! no network. The same replica, batches, seeds, shard-order averages, RMSProp and balancing as
//! a cluster run of the same spec, so at the same thread count it ends with the same bits (a
//! test checks this). It measures what the cluster costs over a plain loop.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use forger_common::average::weighted_average;
use forger_common::balance::decide_balance;
use forger_common::checkpoint;
use forger_common::dataset;
use forger_common::init::fresh_state;
use forger_common::layout::BATCH_NORM_DECAY;
use forger_common::rmsprop::{RmsProp, update_moving_average};
use forger_common::sampler::{BatchSampler, SamplerState, assign_shards};
use forger_common::seeds::{self, Stream};
use forger_common::spec::JobSpec;
use tch::{Device, Tensor};

use crate::compute::{DROPOUT_PHASE_D, DROPOUT_PHASE_G};
use crate::error::{Result, WorkerError};
use crate::replica::{Contribution, Net, Replica, noise};

/// What a benchmark run measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub steps: u64,
    /// Real images looked at (every shard's batch of every step).
    pub images: u64,
    /// Wall-clock seconds of each step.
    pub step_seconds: Vec<f64>,
}

/// One shard's images as a tensor, and where each dataset index sits in it.
struct ShardStore {
    images: Tensor,
    positions: HashMap<u32, i64>,
}

/// Trains `steps` steps of `spec` on `device`; with `out`, writes the final state as a
/// checkpoint.
pub fn run(spec: &JobSpec, steps: u64, device: Device, out: Option<&Path>) -> Result<BenchReport> {
    let size = spec.data.image_size;
    let prepared = dataset::load(&spec.data.path, size, spec.data.limit)?;
    let shard_count = spec.cluster.workers as usize;
    let batch = spec.train.batch_size as usize;
    let seed = spec.train.seed;
    let shards = assign_shards(prepared.len(), shard_count, seed);
    if shards.iter().any(|s| s.len() < batch) {
        return Err(WorkerError::Spec(format!(
            "{} images in {shard_count} shards leave a shard smaller than a batch of {batch}",
            prepared.len()
        )));
    }
    let side = i64::from(size);
    let mut stores = Vec::with_capacity(shard_count);
    for shard in &shards {
        let mut pixels = Vec::with_capacity(shard.len() * prepared.image_bytes());
        for &i in shard {
            pixels.extend_from_slice(prepared.image(i as usize));
        }
        let images = Tensor::f_from_slice(&pixels)?.f_view([shard.len() as i64, side, side, 3])?;
        let positions = shard.iter().enumerate().map(|(p, &i)| (i, p as i64)).collect();
        stores.push(ShardStore { images, positions });
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
    let mut report = BenchReport {
        steps,
        images: 0,
        step_seconds: Vec::with_capacity(steps as usize),
    };
    for step in 1..=steps {
        let started = Instant::now();
        // Evaluate every shard on the current parameters, summing in shard order.
        let mut parts = Vec::with_capacity(shard_count);
        let (mut real, mut fake, mut gen_loss, mut samples) = (0.0, 0.0, 0.0, 0.0);
        for (shard, store) in stores.iter().enumerate() {
            let positions: Vec<i64> = samplers[shard]
                .next_batch(batch)
                .iter()
                .map(|i| store.positions[i])
                .collect();
            let images = replica.batch(&store.images, &positions)?;
            let noise_seed = seeds::derive(seed, Stream::Noise, &[step, shard as u64]);
            let noise = noise(noise_seed, positions.len(), spec.model.noise_dim as usize, device)?;
            let sums = replica.evaluate(&images, &noise)?;
            if !(sums.sum_d_real.is_finite() && sums.sum_d_fake.is_finite() && sums.sum_g.is_finite()) {
                return Err(WorkerError::Protocol(format!(
                    "step {step}: shard {shard} gave non-finite losses"
                )));
            }
            real += sums.sum_d_real;
            fake += sums.sum_d_fake;
            gen_loss += sums.sum_g;
            samples += sums.samples as f64;
            parts.push((shard as u64, images, noise));
        }
        let loss_d = 0.5 * (real / samples + fake / samples);
        let plan = decide_balance(loss_d, gen_loss / samples, t.balance);
        if plan.train_d {
            let mut contributions = Vec::with_capacity(parts.len());
            for (shard, images, noise) in &parts {
                let dropout = seeds::derive(seed, Stream::Dropout, &[step, *shard, DROPOUT_PHASE_D]);
                contributions.push(replica.discriminator_gradient(images, noise, dropout)?);
            }
            let master = &mut state.discriminator;
            apply(
                &contributions,
                &d_optimizer,
                master,
                &mut average_d,
                &mut state.batch_norm,
            );
            replica.set_params(Net::Discriminator, &state.discriminator.params)?;
            replica.set_batch_norm_running(&state.batch_norm)?;
        }
        if plan.train_g {
            let mut contributions = Vec::with_capacity(parts.len());
            for (shard, _, noise) in &parts {
                let dropout = seeds::derive(seed, Stream::Dropout, &[step, *shard, DROPOUT_PHASE_G]);
                contributions.push(replica.generator_gradient(noise, dropout)?);
            }
            let master = &mut state.generator;
            apply(
                &contributions,
                &g_optimizer,
                master,
                &mut average_g,
                &mut state.batch_norm,
            );
            replica.set_params(Net::Generator, &state.generator.params)?;
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

/// The coordinator's update: the shard-order mean, RMSProp, and the batch-norm running averages.
fn apply(
    contributions: &[Contribution],
    optimizer: &RmsProp,
    master: &mut checkpoint::NetState,
    average: &mut [f32],
    batch_norm: &mut [f32],
) {
    let gradients: Vec<(&[f32], u32)> = contributions
        .iter()
        .map(|c| (c.gradient.as_slice(), c.samples as u32))
        .collect();
    weighted_average(&gradients, average);
    optimizer.apply(&mut master.params, &mut master.mean_square, average);
    let stats: Vec<(&[f32], u32)> = contributions
        .iter()
        .map(|c| (c.bn_stats.as_slice(), c.samples as u32))
        .collect();
    let mut mean_stats = vec![0.0; batch_norm.len()];
    weighted_average(&stats, &mut mean_stats);
    update_moving_average(batch_norm, &mean_stats, BATCH_NORM_DECAY);
}
