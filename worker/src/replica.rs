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

/// Both networks on one device.
///
/// Dropout masks come from libtorch's process-wide generator, reseeded by each gradient call:
/// keep one replica per process, and let nothing else draw from that generator while a call
/// runs, or the masks stop being a function of the seed.
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
        let d = Discriminator::new(&d_store.root(), model, image_size)?;
        let g = Generator::new(&g_store.root(), model, image_size)?;
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
        tch::manual_seed(dropout_seed as i64);
        let (loss, bn_stats) = self.discriminator_loss(&images, &noise, self.model.dropout)?;
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
        tch::manual_seed(dropout_seed as i64);
        let bn_stats = {
            let _frozen = Frozen::new(&self.d_vars)?;
            let (loss, bn_stats) = self.generator_loss(&noise, self.model.dropout)?;
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
mod tests {
    use super::*;
    use crate::model::tests::torch_rng;
    use forger_common::init::initial_parameters;

    fn spec(filters: [u32; 3], dropout: f64) -> ModelSpec {
        ModelSpec {
            d_filters: filters.to_vec(),
            g_filters: filters.to_vec(),
            dropout,
            ..ModelSpec::default()
        }
    }

    /// A replica holding Glorot parameters and plausible running statistics.
    fn loaded(model: &ModelSpec, size: usize, kind: Kind) -> Replica {
        tch::set_num_threads(1);
        let mut replica = Replica::with_kind(model, size, Device::Cpu, kind).unwrap();
        let d = initial_parameters(&layout::discriminator_layout(model, size), 1);
        let g = initial_parameters(&layout::generator_layout(model), 2);
        replica.set_params(Net::Discriminator, &d).unwrap();
        replica.set_params(Net::Generator, &g).unwrap();
        let running: Vec<f32> = (0..layout::batch_norm_stats_len(model))
            .map(|i| 0.5 + (i % 7) as f32 * 0.1)
            .collect();
        replica.set_batch_norm_running(&running).unwrap();
        replica
    }

    fn images(count: i64, size: i64) -> Tensor {
        tch::manual_seed(11);
        Tensor::rand([count, 3, size, size], (Kind::Float, Device::Cpu))
    }

    fn value(t: &Tensor) -> f64 {
        t.double_value(&[])
    }

    #[test]
    fn replica_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Replica>();
    }

    #[test]
    fn bad_specs_are_rejected() {
        let err = Replica::new(&spec([4, 2, 2], 0.0), 42, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("image size 42"), "{err}");
        let mut model = spec([4, 2, 2], 0.0);
        model.g_filters = vec![4, 2];
        let err = Replica::new(&model, 40, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("g_filters"), "{err}");
    }

    #[test]
    fn a_store_that_differs_from_the_layout_is_named() {
        let store = nn::VarStore::new(Device::Cpu);
        Discriminator::new(&store.root(), &spec([4, 2, 2], 0.0), 40).unwrap();
        let other = layout::discriminator_layout(&spec([4, 2, 3], 0.0), 40);
        let err = ordered_variables(&store, &other, Net::Discriminator).unwrap_err();
        assert_eq!(
            err.to_string(),
            "discriminator variables do not match the layout: `conv3.bias` has shape [2], the layout [3]"
        );
        let store = nn::VarStore::new(Device::Cpu);
        Generator::new(&store.root(), &spec([4, 2, 2], 0.0), 40).unwrap();
        let _ = store.root().zeros("extra", &[1]);
        let g_layout = layout::generator_layout(&spec([4, 2, 2], 0.0));
        let err = ordered_variables(&store, &g_layout, Net::Generator).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("found `extra` where the layout has `fc.bias`"),
            "{err}"
        );
    }

    #[test]
    fn loaded_parameters_read_back_exactly_and_the_crc_sees_one_value() {
        let _rng = torch_rng();
        let model = spec([8, 4, 2], 0.0);
        let mut replica = loaded(&model, 40, Kind::Float);
        let mut d = initial_parameters(&layout::discriminator_layout(&model, 40), 1);
        let g = initial_parameters(&layout::generator_layout(&model), 2);
        assert_eq!(replica.params(Net::Discriminator).unwrap(), d);
        assert_eq!(replica.params(Net::Generator).unwrap(), g);
        let bn = replica.batch_norm_running().unwrap();
        let crc = replica.params_crc32().unwrap();
        assert_eq!(crc, wire::crc32_of(&[&d, &g, &bn]));
        d[1234] += 1e-3;
        replica.set_params(Net::Discriminator, &d).unwrap();
        assert_ne!(replica.params_crc32().unwrap(), crc);
        let err = replica.set_params(Net::Generator, &d).unwrap_err();
        assert!(matches!(err, WorkerError::Length { .. }), "{err}");
    }

    #[test]
    fn equal_replicas_give_bit_identical_contributions() {
        let _rng = torch_rng();
        let model = spec([8, 4, 2], 0.5);
        let (mut a, mut b) = (loaded(&model, 40, Kind::Float), loaded(&model, 40, Kind::Float));
        let (x, z) = (images(4, 40), noise(9, 4, 16, Device::Cpu).unwrap());
        let d = a.discriminator_gradient(&x, &z, 77).unwrap();
        assert_eq!(d, b.discriminator_gradient(&x, &z, 77).unwrap());
        assert_eq!(d.samples, 4);
        assert_eq!(d.gradient.len(), layout::discriminator_layout(&model, 40).numel());
        assert_eq!(d.bn_stats.len(), layout::batch_norm_stats_len(&model));
        let g = a.generator_gradient(&z, 78).unwrap();
        assert_eq!(g, b.generator_gradient(&z, 78).unwrap());
        assert_eq!(g.gradient.len(), layout::generator_layout(&model).numel());
        // The same call again: gradients were zeroed, not accumulated.
        assert_eq!(g, a.generator_gradient(&z, 78).unwrap());
        assert_eq!(d, a.discriminator_gradient(&x, &z, 77).unwrap());
        // The discriminator is trainable again after the generator's step.
        assert!(a.d_vars.iter().all(Tensor::requires_grad));
    }

    #[test]
    fn dropout_changes_the_gradient_and_its_seed_matters() {
        let _rng = torch_rng();
        let (x, z) = (images(4, 40), noise(9, 4, 16, Device::Cpu).unwrap());
        let mut plain = loaded(&spec([8, 4, 2], 0.0), 40, Kind::Float);
        let mut dropped = loaded(&spec([8, 4, 2], 0.5), 40, Kind::Float);
        let p1 = plain.discriminator_gradient(&x, &z, 1).unwrap();
        assert_eq!(p1, plain.discriminator_gradient(&x, &z, 2).unwrap());
        let d1 = dropped.discriminator_gradient(&x, &z, 1).unwrap();
        assert_ne!(p1.gradient, d1.gradient);
        assert_ne!(d1.gradient, dropped.discriminator_gradient(&x, &z, 2).unwrap().gradient);
    }

    #[test]
    fn evaluate_sums_are_batch_means_times_the_batch_size() {
        let _rng = torch_rng();
        let model = spec([8, 4, 2], 0.6);
        let replica = loaded(&model, 40, Kind::Float);
        let (x, z) = (images(6, 40), noise(3, 6, 16, Device::Cpu).unwrap());
        let sums = replica.evaluate(&x, &z).unwrap();
        assert_eq!(sums.samples, 6);
        // Independently: libtorch's own BCE on the networks' outputs, dropout off.
        let (real_p, fake_p) = tch::no_grad(|| {
            let (fake, _) = replica.g.forward_train(&z, 0.0).unwrap();
            (
                replica.d.forward(&x, 0.0).unwrap(),
                replica.d.forward(&fake, 0.0).unwrap(),
            )
        });
        let bce = |p: &Tensor, label: f64| {
            value(&p.binary_cross_entropy::<Tensor>(&p.full_like(label), None, tch::Reduction::Mean))
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-5 * b.abs().max(1.0);
        assert!(close(sums.sum_d_real / 6.0, bce(&real_p, 1.0)), "{sums:?}");
        assert!(close(sums.sum_d_fake / 6.0, bce(&fake_p, 0.0)), "{sums:?}");
        assert!(close(sums.sum_g / 6.0, bce(&fake_p, 1.0)), "{sums:?}");
        // And the losses the gradients differentiate, with dropout off, agree.
        let (xi, zi, _) = replica.inputs(&x, &z).unwrap();
        let (loss_d, _) = tch::no_grad(|| replica.discriminator_loss(&xi, &zi, 0.0)).unwrap();
        let (loss_g, _) = tch::no_grad(|| replica.generator_loss(&zi, 0.0)).unwrap();
        assert!(close(0.5 * (sums.sum_d_real + sums.sum_d_fake), 6.0 * value(&loss_d)));
        assert!(close(sums.sum_g, 6.0 * value(&loss_g)));
    }

    /// Nudges element `index` of `var` by `delta`, in the variable's own precision.
    fn nudge(var: &Tensor, index: i64, delta: f64) {
        tch::no_grad(|| {
            let mut element = var.view([-1]).get(index);
            let _ = element.f_add_scalar_(delta).unwrap();
        });
    }

    /// Central differences of `loss` against the analytic gradient at the first and last
    /// element of every variable, in f64.
    fn check_gradient(vars: &[Tensor], gradient: &[f32], mut loss: impl FnMut() -> f64) {
        let h = 1e-5;
        let mut offset = 0;
        for var in vars {
            let n = var.numel();
            for index in [0, n - 1] {
                nudge(var, index as i64, h);
                let up = loss();
                nudge(var, index as i64, -2.0 * h);
                let down = loss();
                nudge(var, index as i64, h);
                let numeric = (up - down) / (2.0 * h);
                let analytic = f64::from(gradient[offset + index]);
                assert!(
                    (numeric - analytic).abs() < 1e-7 + 1e-4 * analytic.abs(),
                    "element {index} of a {:?} variable: numeric {numeric}, analytic {analytic}",
                    var.size()
                );
            }
            offset += n;
        }
        assert_eq!(offset, gradient.len());
    }

    #[test]
    fn gradients_match_finite_differences() {
        let _rng = torch_rng();
        let model = ModelSpec {
            noise_dim: 5,
            ..spec([3, 2, 2], 0.5)
        };
        let mut replica = loaded(&model, 8, Kind::Double);
        let (x, z) = (images(4, 8), noise(4, 4, 5, Device::Cpu).unwrap());
        let (seed_d, seed_g) = (21, 22);
        let d = replica.discriminator_gradient(&x, &z, seed_d).unwrap();
        let g = replica.generator_gradient(&z, seed_g).unwrap();
        let (xi, zi, _) = replica.inputs(&x, &z).unwrap();
        // Reseeding before each evaluation redraws the very same dropout masks.
        let d_loss = || {
            tch::manual_seed(seed_d as i64);
            value(&tch::no_grad(|| replica.discriminator_loss(&xi, &zi, 0.5)).unwrap().0)
        };
        check_gradient(&replica.d_vars, &d.gradient, d_loss);
        let g_loss = || {
            tch::manual_seed(seed_g as i64);
            value(&tch::no_grad(|| replica.generator_loss(&zi, 0.5)).unwrap().0)
        };
        check_gradient(&replica.g_vars, &g.gradient, g_loss);
    }

    #[test]
    fn samples_are_hwc_bytes_of_the_inference_generator() {
        let _rng = torch_rng();
        let model = spec([8, 4, 2], 0.5);
        let replica = loaded(&model, 40, Kind::Float);
        let z = noise(5, 3, 16, Device::Cpu).unwrap();
        let bytes = replica.sample(&z).unwrap();
        assert_eq!(bytes.len(), 3 * 40 * 40 * 3);
        let images = tch::no_grad(|| replica.g.forward_sample(&z, &replica.bn_running)).unwrap();
        let (n, y, x, c) = (2, 7, 31, 1);
        let expected = grid::unit_to_u8(&[images.double_value(&[n, c, y, x]) as f32])[0];
        assert_eq!(bytes[(((n * 40 + y) * 40 + x) * 3 + c) as usize], expected);
        // With running statistics an image does not depend on the rest of its batch.
        assert_eq!(replica.sample(&z.narrow(0, 0, 1)).unwrap()[..], bytes[..40 * 40 * 3]);
    }

    #[test]
    fn batches_come_from_the_store_as_chw_floats() {
        let replica = Replica::new(&spec([4, 2, 2], 0.0), 8, Device::Cpu).unwrap();
        let pixels: Vec<u8> = (0..5 * 8 * 8 * 3).map(|i| (i % 251) as u8).collect();
        let store = Tensor::from_slice(&pixels).reshape([5, 8, 8, 3]);
        let batch = replica.batch(&store, &[3, 0]).unwrap();
        assert_eq!(batch.size(), [2, 3, 8, 8]);
        let (y, x, c) = (5, 2, 2);
        let byte = pixels[((3 * 8 + y) * 8 + x) * 3 + c];
        assert_eq!(
            batch.double_value(&[0, c as i64, y as i64, x as i64]),
            f64::from(f32::from(byte) / 255.0)
        );
        let wrong = Tensor::zeros([5, 3, 8, 8], (Kind::Uint8, Device::Cpu));
        assert!(replica.batch(&wrong, &[0]).is_err());
    }

    #[test]
    fn noise_is_the_common_uniform_noise() {
        let z = noise(42, 3, 16, Device::Cpu).unwrap();
        assert_eq!(z.size(), [3, 16]);
        let flat = Vec::<f32>::try_from(&z.reshape([-1])).unwrap();
        assert_eq!(flat, seeds::uniform_noise(42, 3, 16));
    }

    #[test]
    fn mismatched_inputs_are_shape_errors() {
        let _rng = torch_rng();
        let replica = Replica::new(&spec([4, 2, 2], 0.0), 8, Device::Cpu).unwrap();
        let z = noise(1, 3, 16, Device::Cpu).unwrap();
        let err = replica.evaluate(&images(2, 8), &z).unwrap_err();
        assert_eq!(err.to_string(), "noise has shape [3, 16], expected [2, 16]");
        assert!(replica.evaluate(&images(3, 12), &z).is_err());
    }

    /// Step timings for the report: `cargo test -p forger-worker --lib -- --ignored --nocapture`.
    #[test]
    #[ignore = "slow: times the article model"]
    fn time_one_step() {
        let _rng = torch_rng();
        for filters in [[64, 32, 16], [256, 128, 64]] {
            let model = spec(filters, 0.6);
            let mut replica = loaded(&model, 40, Kind::Float);
            let (x, z) = (images(16, 40), noise(1, 16, 16, Device::Cpu).unwrap());
            for threads in [1, 2] {
                tch::set_num_threads(threads);
                replica.discriminator_gradient(&x, &z, 1).unwrap();
                replica.generator_gradient(&z, 2).unwrap();
                let mut d_times = Vec::new();
                let mut g_times = Vec::new();
                for i in 0..3 {
                    let start = std::time::Instant::now();
                    replica.discriminator_gradient(&x, &z, i).unwrap();
                    d_times.push(start.elapsed().as_secs_f64());
                    let start = std::time::Instant::now();
                    replica.generator_gradient(&z, i).unwrap();
                    g_times.push(start.elapsed().as_secs_f64());
                }
                let start = std::time::Instant::now();
                replica.evaluate(&x, &z).unwrap();
                let eval = start.elapsed().as_secs_f64();
                d_times.sort_by(f64::total_cmp);
                g_times.sort_by(f64::total_cmp);
                println!(
                    "filters {filters:?} threads {threads}: discriminator_gradient {:.3} s, generator_gradient {:.3} s, evaluate {eval:.3} s (medians of 3, batch 16)",
                    d_times[1], g_times[1]
                );
            }
        }
        tch::set_num_threads(1);
    }
}
