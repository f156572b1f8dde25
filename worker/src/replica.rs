//! One worker's copy of both networks, and the per-step computations it does for the
//! coordinator.
//!
//! The coordinator owns the parameters: a replica loads them ([`Replica::set_params`]),
//! computes a batch's losses or gradients, and reads its tensors back for the replica check.
//! Every buffer crossing this boundary is flat `f32` in `forger_common::layout` order.

use std::fmt;

use forger_common::layout::{self, NetLayout};
use forger_common::spec::ModelSpec;
use forger_common::{grid, seeds, wire};
use tch::{Device, Kind, Tensor, nn};

use crate::error::{Result, WorkerError};
use crate::model::{self, Discriminator, Generator};

/// Added inside the cross-entropy's logs, as in the article's TF code.
const BCE_EPSILON: f64 = 1e-12;

/// Held while seeding libtorch's process-wide generator and drawing from it (dropout masks,
/// variable initialisation), so that replicas on several threads draw in turn. The backward
/// passes, most of the work, run in parallel.
fn random_draws() -> std::sync::MutexGuard<'static, ()> {
    static DRAWS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // The guarded data is nothing: a panic while holding it leaves nothing inconsistent.
    DRAWS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Which network a buffer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Net {
    Discriminator,
    Generator,
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Net::Discriminator => "discriminator",
            Net::Generator => "generator",
        })
    }
}

/// A batch's losses as sums over its samples, so the coordinator can pool workers' batches
/// of any size. The discriminator's loss is `0.5 * (sum_d_real + sum_d_fake) / samples`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossSums {
    pub samples: usize,
    /// Sum of `-ln(D(x) + 1e-12)` over the real images.
    pub sum_d_real: f64,
    /// Sum of `-ln(1 - D(G(z)) + 1e-12)` over the generated images.
    pub sum_d_fake: f64,
    /// Sum of `-ln(D(G(z)) + 1e-12)`: the generator's loss.
    pub sum_g: f64,
}

/// One worker's part of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    /// Gradient of the batch-mean loss, flat in layout order, without the L2 term.
    pub gradient: Vec<f32>,
    /// The generator's batch-norm statistics of this batch (means, unbiased variances).
    pub bn_stats: Vec<f32>,
    pub samples: usize,
}

/// One shard's batch of a step, held from the evaluation to the gradient phases.
///
/// Without dropout the evaluation's forward pass is exactly the discriminator phase's (same
/// parameters, same inputs, no masks) and the generator's part of it is exactly the generator
/// phase's (the generator does not change in between), so the batch keeps that pass: the D
/// phase only runs its backward and the G phase only runs the updated D forward. With dropout
/// each phase draws its own masks, as each TF1 `sess.run` did, and recomputes.
#[derive(Debug)]
pub struct StepBatch {
    images: Tensor,
    noise: Tensor,
    /// `G(z)` with the generator's graph.
    fake: Option<Tensor>,
    /// The discriminator's loss on the images and `G(z)` (detached), with D's graph.
    d_loss: Option<Tensor>,
    bn_stats: Vec<f32>,
}

/// Both networks on one device.
///
/// Dropout masks come from libtorch's process-wide generator, reseeded by each gradient call.
/// Replicas on other threads of the process (`--devices`) take turns at it: every call that
/// seeds it or draws from it holds `random_draws` meanwhile, so the masks stay a function of
/// the seed. Nothing else may draw from it while a replica trains.
#[derive(Debug)]
pub struct Replica {
    model: ModelSpec,
    image_size: usize,
    device: Device,
    kind: Kind,
    d: Discriminator,
    g: Generator,
    d_layout: NetLayout,
    g_layout: NetLayout,
    /// The variables in layout order; they share storage with the networks' tensors.
    d_vars: Vec<Tensor>,
    g_vars: Vec<Tensor>,
    /// The generator's running batch-norm statistics, flat, used only when sampling.
    bn_running: Tensor,
}

impl Replica {
    /// Builds both networks with f32 variables and checks them against the layout.
    pub fn new(model: &ModelSpec, image_size: usize, device: Device) -> Result<Replica> {
        Replica::with_kind(model, image_size, device, Kind::Float)
    }

    /// [`Replica::new`] with variables of `kind`: `Kind::Double` serves gradient checks.
    /// Buffers in and out stay `f32`.
    pub fn with_kind(model: &ModelSpec, image_size: usize, device: Device, kind: Kind) -> Result<Replica> {
        model::check_spec(model, image_size)?;
        let mut d_store = nn::VarStore::new(device);
        let mut g_store = nn::VarStore::new(device);
        d_store.set_kind(kind);
        g_store.set_kind(kind);
        // The variables' first values are random draws (the coordinator's replace them).
        let (d, g) = {
            let _draws = random_draws();
            (
                Discriminator::new(&d_store.root(), model, image_size)?,
                Generator::new(&g_store.root(), model, image_size)?,
            )
        };
        let d_layout = layout::discriminator_layout(model, image_size);
        let g_layout = layout::generator_layout(model);
        let d_vars = ordered_variables(&d_store, &d_layout, Net::Discriminator)?;
        let g_vars = ordered_variables(&g_store, &g_layout, Net::Generator)?;
        // The stores can go: the networks and the ordered lists hold the variables.
        // TF's initial moving averages (mean 0, variance 1) until the coordinator sends some.
        let mut running = Vec::with_capacity(layout::batch_norm_stats_len(model));
        for norm in layout::generator_batch_norms(model) {
            running.extend(std::iter::repeat_n(0.0f32, norm.channels));
            running.extend(std::iter::repeat_n(1.0f32, norm.channels));
        }
        let bn_running = to_device(&running, device, kind)?;
        Ok(Replica {
            model: model.clone(),
            image_size,
            device,
            kind,
            d,
            g,
            d_layout,
            g_layout,
            d_vars,
            g_vars,
            bn_running,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// Loads a network's flat parameters.
    pub fn set_params(&mut self, net: Net, flat: &[f32]) -> Result<()> {
        let (layout, vars, what) = match net {
            Net::Discriminator => (&self.d_layout, &mut self.d_vars, "discriminator parameters"),
            Net::Generator => (&self.g_layout, &mut self.g_vars, "generator parameters"),
        };
        check_len(what, layout.numel(), flat.len())?;
        // One transfer for the whole buffer, then a device-side copy per variable.
        let source = to_device(flat, self.device, self.kind)?;
        tch::no_grad(|| {
            for (var, (_, range)) in vars.iter_mut().zip(layout.ranges()) {
                let part = source.f_narrow(0, range.start as i64, range.len() as i64)?;
                var.f_copy_(&part.f_reshape(var.size())?)?;
            }
            Ok(())
        })
    }

    /// Loads part of a network's flat parameters as they arrive: `bytes` are little-endian
    /// f32 values for elements `offset..`, copied once into a tensor and once into the
    /// variables they cover, so a download needs no buffer of its own and the last chunk leaves
    /// only one chunk's work before the replica is ready.
    pub fn set_params_chunk(&mut self, net: Net, offset: usize, bytes: &[u8]) -> Result<()> {
        let (layout, vars, what) = match net {
            Net::Discriminator => (&self.d_layout, &mut self.d_vars, "discriminator parameter chunk"),
            Net::Generator => (&self.g_layout, &mut self.g_vars, "generator parameter chunk"),
        };
        let count = bytes.len() / 4;
        if !bytes.len().is_multiple_of(4) || offset + count > layout.numel() {
            return Err(WorkerError::Length {
                what,
                expected: layout.numel().saturating_sub(offset) * 4,
                found: bytes.len(),
            });
        }
        let source = Tensor::f_from_data_size(bytes, &[count as i64], Kind::Float)?
            .f_to_device(self.device)?
            .f_to_kind(self.kind)?;
        let end = offset + count;
        tch::no_grad(|| {
            for (var, (_, range)) in vars.iter_mut().zip(layout.ranges()) {
                let (from, to) = (range.start.max(offset), range.end.min(end));
                if from >= to {
                    continue;
                }
                let part = source.f_narrow(0, (from - offset) as i64, (to - from) as i64)?;
                let mut target = var
                    .f_view([-1])?
                    .f_narrow(0, (from - range.start) as i64, (to - from) as i64)?;
                target.f_copy_(&part)?;
            }
            Ok(())
        })
    }

    /// Loads the running batch-norm statistics that sampling normalises with.
    pub fn set_batch_norm_running(&mut self, flat: &[f32]) -> Result<()> {
        check_len(
            "batch-norm running statistics",
            layout::batch_norm_stats_len(&self.model),
            flat.len(),
        )?;
        self.bn_running = to_device(flat, self.device, self.kind)?;
        Ok(())
    }

    /// A network's parameters as the replica holds them, flat in layout order.
    pub fn params(&self, net: Net) -> Result<Vec<f32>> {
        let vars = match net {
            Net::Discriminator => &self.d_vars,
            Net::Generator => &self.g_vars,
        };
        let parts = vars
            .iter()
            .map(|v| v.f_detach()?.f_reshape([-1]))
            .collect::<Result<Vec<_>, _>>()?;
        to_vec(&parts)
    }

    /// The running batch-norm statistics as the replica holds them.
    pub fn batch_norm_running(&self) -> Result<Vec<f32>> {
        to_vec(std::slice::from_ref(&self.bn_running))
    }

    /// CRC32 of everything loaded, read back from the tensors so a bad load shows:
    /// `crc32_of([discriminator, generator, batch-norm running])`.
    pub fn params_crc32(&self) -> Result<u32> {
        let d = self.params(Net::Discriminator)?;
        let g = self.params(Net::Generator)?;
        let bn = self.batch_norm_running()?;
        Ok(wire::crc32_of(&[&d, &g, &bn]))
    }

    /// Both networks' losses on a batch, as TF's loss ops ran them: no gradients, no dropout,
    /// and batch norm with the batch's own statistics.
    pub fn evaluate(&self, images: &Tensor, noise: &Tensor) -> Result<LossSums> {
        let (images, noise, samples) = self.inputs(images, noise)?;
        tch::no_grad(|| {
            let (fake, _) = self.g.forward_train(&noise, 0.0)?;
            let real_p = self.d.forward(&images, 0.0)?;
            let fake_p = self.d.forward(&fake, 0.0)?;
            Ok(LossSums {
                samples,
                sum_d_real: sum(&bce_real(&real_p)?)?,
                sum_d_fake: sum(&bce_fake(&fake_p)?)?,
                sum_g: sum(&bce_real(&fake_p)?)?,
            })
        })
    }

    /// Evaluates a step's batch ([`Replica::evaluate`]'s losses) and keeps what the step's
    /// gradient phases can reuse (see [`StepBatch`]).
    pub fn evaluate_step(&self, images: Tensor, noise: Tensor) -> Result<(LossSums, StepBatch)> {
        if self.model.dropout > 0.0 {
            let sums = self.evaluate(&images, &noise)?;
            let batch = StepBatch {
                images,
                noise,
                fake: None,
                d_loss: None,
                bn_stats: Vec::new(),
            };
            return Ok((sums, batch));
        }
        let (on_device, noise_on_device, samples) = self.inputs(&images, &noise)?;
        let (fake, bn_stats) = self.g.forward_train(&noise_on_device, 0.0)?;
        let real_p = self.d.forward(&on_device, 0.0)?;
        let fake_p = self.d.forward(&fake.f_detach()?, 0.0)?;
        let (real_loss, fake_loss) = (bce_real(&real_p)?, bce_fake(&fake_p)?);
        let sums = tch::no_grad(|| -> Result<LossSums> {
            Ok(LossSums {
                samples,
                sum_d_real: sum(&real_loss)?,
                sum_d_fake: sum(&fake_loss)?,
                sum_g: sum(&bce_real(&fake_p)?)?,
            })
        })?;
        let d_loss = real_loss.f_add(&fake_loss)?.f_mul_scalar(0.5)?.f_mean(None::<Kind>)?;
        let batch = StepBatch {
            images,
            noise,
            fake: Some(fake),
            d_loss: Some(d_loss),
            bn_stats,
        };
        Ok((sums, batch))
    }

    /// The discriminator phase of a step's batch: [`Replica::discriminator_gradient`], from
    /// the kept forward pass when there is one.
    pub fn discriminator_phase(&mut self, batch: &mut StepBatch, dropout_seed: u64) -> Result<Contribution> {
        let Some(loss) = batch.d_loss.take() else {
            return self.discriminator_gradient(&batch.images, &batch.noise, dropout_seed);
        };
        zero_grads(&mut self.d_vars);
        loss.f_backward()?;
        Ok(Contribution {
            gradient: gradients(&self.d_vars)?,
            bn_stats: batch.bn_stats.clone(),
            samples: batch.images.size()[0] as usize,
        })
    }

    /// The generator phase of a step's batch: [`Replica::generator_gradient`], through the
    /// kept `G(z)` when there is one.
    pub fn generator_phase(&mut self, batch: &mut StepBatch, dropout_seed: u64) -> Result<Contribution> {
        let Some(fake) = batch.fake.take() else {
            return self.generator_gradient(&batch.noise, dropout_seed);
        };
        zero_grads(&mut self.g_vars);
        {
            let _frozen = Frozen::new(&self.d_vars)?;
            let fake_p = self.d.forward(&fake, 0.0)?;
            bce_real(&fake_p)?.f_mean(None::<Kind>)?.f_backward()?;
        }
        Ok(Contribution {
            gradient: gradients(&self.g_vars)?,
            bn_stats: batch.bn_stats.clone(),
            samples: batch.noise.size()[0] as usize,
        })
    }

    /// The discriminator's gradient on a batch in training mode. Dropout masks come from
    /// `dropout_seed`, drawn in a fixed order (generator, real images, generated images), so
    /// equal seeds give equal masks on every worker and every run.
    pub fn discriminator_gradient(
        &mut self,
        images: &Tensor,
        noise: &Tensor,
        dropout_seed: u64,
    ) -> Result<Contribution> {
        let (images, noise, samples) = self.inputs(images, noise)?;
        zero_grads(&mut self.d_vars);
        let (loss, bn_stats) = {
            // The forward pass draws the masks; the backward only reads them.
            let _draws = random_draws();
            tch::manual_seed(dropout_seed as i64);
            self.discriminator_loss(&images, &noise, self.model.dropout)?
        };
        loss.f_backward()?;
        Ok(Contribution {
            gradient: gradients(&self.d_vars)?,
            bn_stats,
            samples,
        })
    }

    /// The generator's gradient on a noise batch in training mode (dropout in both networks,
    /// masks drawn generator first). The discriminator is frozen meanwhile, so its weights
    /// neither collect gradients nor cost their backward convolutions.
    pub fn generator_gradient(&mut self, noise: &Tensor, dropout_seed: u64) -> Result<Contribution> {
        let noise = self.noise_input(noise, None)?;
        let samples = noise.size()[0] as usize;
        zero_grads(&mut self.g_vars);
        let bn_stats = {
            let _frozen = Frozen::new(&self.d_vars)?;
            let (loss, bn_stats) = {
                let _draws = random_draws();
                tch::manual_seed(dropout_seed as i64);
                self.generator_loss(&noise, self.model.dropout)?
            };
            loss.f_backward()?;
            bn_stats
        };
        Ok(Contribution {
            gradient: gradients(&self.g_vars)?,
            bn_stats,
            samples,
        })
    }

    /// Generated images for people to look at: no dropout, running batch-norm statistics.
    /// Interleaved RGB bytes, row after row, image after image.
    pub fn sample(&self, noise: &Tensor) -> Result<Vec<u8>> {
        let noise = self.noise_input(noise, None)?;
        let images = tch::no_grad(|| self.g.forward_sample(&noise, &self.bn_running))?;
        let hwc = images.f_permute([0, 2, 3, 1])?.f_contiguous()?.f_reshape([-1])?;
        Ok(grid::unit_to_u8(&to_vec(&[hwc])?))
    }

    /// Images `[B, 3, S, S]` in [0, 1] on the replica's device from a u8 store
    /// `[n, S, S, 3]` (pixels as the bytes arrive) and positions in it.
    pub fn batch(&self, store: &Tensor, positions: &[i64]) -> Result<Tensor> {
        let s = self.image_size as i64;
        let size = store.size();
        if store.f_kind()? != Kind::Uint8 || size.len() != 4 || size[1..] != [s, s, 3] {
            return Err(WorkerError::Shape {
                what: "image store",
                expected: format!("u8 [n, {s}, {s}, 3]"),
                found: size,
            });
        }
        let index = Tensor::f_from_slice(positions)?.f_to_device(store.device())?;
        // Bytes travel to the device, a quarter of the floats.
        let picked = store.f_index_select(0, &index)?.f_to_device(self.device)?;
        Ok(picked
            .f_permute([0, 3, 1, 2])?
            .f_contiguous()?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(255.0)?)
    }

    /// Mean discriminator loss `0.5 * (bce(1, D(x)) + bce(0, D(G(z))))`, with `G(z)` made
    /// without gradients, and the generator's batch statistics.
    fn discriminator_loss(&self, images: &Tensor, noise: &Tensor, dropout_p: f64) -> Result<(Tensor, Vec<f32>)> {
        let (fake, bn_stats) = tch::no_grad(|| self.g.forward_train(noise, dropout_p))?;
        let real_p = self.d.forward(images, dropout_p)?;
        let fake_p = self.d.forward(&fake, dropout_p)?;
        let per_sample = bce_real(&real_p)?.f_add(&bce_fake(&fake_p)?)?.f_mul_scalar(0.5)?;
        Ok((per_sample.f_mean(None::<Kind>)?, bn_stats))
    }

    /// Mean generator loss `bce(1, D(G(z)))` and the generator's batch statistics.
    fn generator_loss(&self, noise: &Tensor, dropout_p: f64) -> Result<(Tensor, Vec<f32>)> {
        let (fake, bn_stats) = self.g.forward_train(noise, dropout_p)?;
        let fake_p = self.d.forward(&fake, dropout_p)?;
        Ok((bce_real(&fake_p)?.f_mean(None::<Kind>)?, bn_stats))
    }

    /// Images and noise for one batch, checked against the model and each other.
    fn inputs(&self, images: &Tensor, noise: &Tensor) -> Result<(Tensor, Tensor, usize)> {
        let s = self.image_size as i64;
        let size = images.size();
        if size.len() != 4 || size[1..] != [3, s, s] {
            return Err(WorkerError::Shape {
                what: "images",
                expected: format!("[n, 3, {s}, {s}]"),
                found: size,
            });
        }
        let noise = self.noise_input(noise, Some(size[0]))?;
        let images = images.f_to_device(self.device)?.f_to_kind(self.kind)?;
        Ok((images, noise, size[0] as usize))
    }

    fn noise_input(&self, noise: &Tensor, rows: Option<i64>) -> Result<Tensor> {
        let dim = i64::from(self.model.noise_dim);
        let size = noise.size();
        if size.len() != 2 || size[1] != dim || rows.is_some_and(|n| n != size[0]) {
            let rows = rows.map_or("n".to_string(), |n| n.to_string());
            return Err(WorkerError::Shape {
                what: "noise",
                expected: format!("[{rows}, {dim}]"),
                found: size,
            });
        }
        Ok(noise.f_to_device(self.device)?.f_to_kind(self.kind)?)
    }
}

/// `count` rows of uniform [0, 1) noise from `seed`, identical on every machine.
pub fn noise(seed: u64, count: usize, dim: usize, device: Device) -> Result<Tensor> {
    let values = seeds::uniform_noise(seed, count, dim);
    Ok(Tensor::f_from_slice(&values)?
        .f_reshape([count as i64, dim as i64])?
        .f_to_device(device)?)
}

/// A store's variables sorted by name, after checking each against the layout.
fn ordered_variables(store: &nn::VarStore, layout: &NetLayout, net: Net) -> Result<Vec<Tensor>> {
    let mismatch = |problem: String| Err(WorkerError::Layout { net, problem });
    let mut named: Vec<(String, Tensor)> = store.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let expected = layout.params();
    for i in 0..named.len().max(expected.len()) {
        match (named.get(i), expected.get(i)) {
            (Some((name, _)), Some(spec)) if *name != spec.name => {
                return mismatch(format!("found `{name}` where the layout has `{}`", spec.name));
            }
            (Some((name, tensor)), Some(spec)) => {
                let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
                if shape != spec.shape {
                    return mismatch(format!("`{name}` has shape {shape:?}, the layout {:?}", spec.shape));
                }
                if !tensor.requires_grad() {
                    return mismatch(format!("`{name}` is not trainable"));
                }
            }
            (Some((name, _)), None) => return mismatch(format!("`{name}` is not in the layout")),
            (None, Some(spec)) => return mismatch(format!("`{}` is missing", spec.name)),
            (None, None) => {}
        }
    }
    Ok(named.into_iter().map(|(_, tensor)| tensor).collect())
}

/// Keeps a network's variables out of autograd while alive.
struct Frozen<'a>(&'a [Tensor]);

impl<'a> Frozen<'a> {
    fn new(vars: &'a [Tensor]) -> Result<Frozen<'a>> {
        // The guard first, so a failure half-way still thaws what was frozen.
        let frozen = Frozen(vars);
        for var in vars {
            let _ = var.f_set_requires_grad(false)?;
        }
        Ok(frozen)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        for var in self.0 {
            // Cannot fail for the float leaf tensors a VarStore holds, and drop could not
            // report it anyway.
            let _ = var.f_set_requires_grad(true);
        }
    }
}

fn zero_grads(vars: &mut [Tensor]) {
    for var in vars {
        var.zero_grad();
    }
}

/// The variables' gradients, flat; a variable the loss never reached counts as zero.
fn gradients(vars: &[Tensor]) -> Result<Vec<f32>> {
    let parts = vars
        .iter()
        .map(|var| {
            let grad = var.f_grad()?;
            let grad = if grad.defined() { grad } else { var.f_zeros_like()? };
            grad.f_reshape([-1])
        })
        .collect::<Result<Vec<_>, _>>()?;
    to_vec(&parts)
}

/// `-ln(p + 1e-12)`: cross-entropy against label 1.
fn bce_real(p: &Tensor) -> Result<Tensor> {
    Ok(p.f_add_scalar(BCE_EPSILON)?.f_log()?.f_neg()?)
}

/// `-ln(1 - p + 1e-12)`: against label 0; `1 - p` first, as TF, so p = 1 gives a finite loss.
fn bce_fake(p: &Tensor) -> Result<Tensor> {
    Ok(p.f_rsub_scalar(1.0)?.f_add_scalar(BCE_EPSILON)?.f_log()?.f_neg()?)
}

fn sum(t: &Tensor) -> Result<f64> {
    Ok(t.f_sum(Kind::Double)?.f_double_value(&[])?)
}

fn check_len(what: &'static str, expected: usize, found: usize) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(WorkerError::Length { what, expected, found })
    }
}

fn to_device(values: &[f32], device: Device, kind: Kind) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(values)?.f_to_device(device)?.f_to_kind(kind)?)
}

/// Flat tensors, concatenated and copied to the host as f32.
fn to_vec(parts: &[Tensor]) -> Result<Vec<f32>> {
    let flat = Tensor::f_cat(parts, 0)?
        .f_to_kind(Kind::Float)?
        .f_to_device(Device::Cpu)?;
    Ok(Vec::<f32>::try_from(&flat)?)
}

#[cfg(test)]
mod tests;
