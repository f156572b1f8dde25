//! The article's DCGAN, with TF1's semantics, on libtorch.
//!
//! The layers are plain variables and functional ops rather than tch's `nn` layers because TF1
//! differs from PyTorch exactly where this model lives: 'SAME' padding of a strided
//! convolution is asymmetric, `tf.image.resize_images` is the legacy bilinear resize (no
//! half-pixel centres), and `tf.contrib.layers.batch_norm` has a shift but no scale and an
//! epsilon of 1e-3. Running batch-norm statistics live outside the model: the coordinator
//! averages each step's batch statistics across workers and sends the running values back.
//!
//! Every variable is created as zeros with its shape taken from [`forger_common::layout`], so
//! the layout is the one source of shapes; the coordinator sends the real values.
//!
//! Tensors are NCHW where TF ran NHWC. That only permutes the units on either side of the
//! reshapes (the discriminator's flatten, the generator's 4x4x3 seed image), which the
//! i.i.d. initialisation cannot tell apart; importing TF weights would have to permute them.

use forger_common::layout::{self, KERNEL, NetLayout, SEED_CHANNELS, SEED_SIDE};
use forger_common::spec::ModelSpec;
use tch::{Kind, Tensor, nn};

use crate::error::{Result, WorkerError};

/// Slope of TF's `lrelu(x) = max(x, 0.2 x)`.
const LEAK: f64 = 0.2;
/// `tf.contrib.layers.batch_norm`'s default epsilon.
const BN_EPSILON: f64 = 1e-3;
const K: i64 = KERNEL as i64;

/// Rejects specs the layout functions cannot describe (they index three filter counts).
pub fn check_spec(model: &ModelSpec, image_size: usize) -> Result<()> {
    let mut problems = Vec::new();
    if image_size < 8 || !image_size.is_multiple_of(4) {
        problems.push(format!("image size {image_size} is not a multiple of 4 of at least 8"));
    }
    if model.noise_dim == 0 {
        problems.push("noise_dim is 0".to_string());
    }
    for (name, filters) in [("d_filters", &model.d_filters), ("g_filters", &model.g_filters)] {
        if filters.len() != 3 || filters.contains(&0) {
            problems.push(format!("{name} {filters:?} is not three positive counts"));
        }
    }
    if !(0.0..1.0).contains(&model.dropout) {
        problems.push(format!("dropout {} is not in [0, 1)", model.dropout));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(WorkerError::Spec(problems.join("; ")))
    }
}

/// A weight and a bias: a convolution, a transposed convolution or a dense layer.
#[derive(Debug)]
struct Affine {
    weight: Tensor,
    bias: Tensor,
}

impl Affine {
    fn new(root: &nn::Path, layout: &NetLayout, layer: &str) -> Result<Affine> {
        Ok(Affine {
            weight: variable(root, layout, layer, "weight")?,
            bias: variable(root, layout, layer, "bias")?,
        })
    }

    fn dense(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.weight, Some(&self.bias))?)
    }
}

/// A zero variable named `layer.var` (through the sub-path, as tch names it) with the
/// layout's shape for that name.
fn variable(root: &nn::Path, layout: &NetLayout, layer: &str, var: &str) -> Result<Tensor> {
    let name = format!("{layer}.{var}");
    let spec = layout
        .params()
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| WorkerError::Spec(format!("the layout has no variable `{name}`")))?;
    let dims: Vec<i64> = spec.shape.iter().map(|&d| d as i64).collect();
    Ok((root / layer).f_zeros(var, &dims)?)
}

/// TF's 'SAME' padding of one axis of length `size` for a `KERNEL`-wide window:
/// `(before, after)`, the odd pixel going after.
pub(crate) fn same_padding(size: i64, stride: i64) -> (i64, i64) {
    let out = (size + stride - 1) / stride;
    let total = ((out - 1) * stride + K - size).max(0);
    (total / 2, total - total / 2)
}

/// `tf.nn.conv2d(padding='SAME')`: pad explicitly, because libtorch pads both sides equally.
pub(crate) fn conv2d_same(x: &Tensor, weight: &Tensor, bias: &Tensor, stride: i64) -> Result<Tensor> {
    let (_, _, h, w) = x.size4()?;
    let (top, bottom) = same_padding(h, stride);
    let (left, right) = same_padding(w, stride);
    let padded = x.f_constant_pad_nd([left, right, top, bottom])?;
    Ok(padded.f_conv2d(weight, Some(bias), [stride, stride], [0, 0], [1, 1], 1)?)
}

/// `tf.nn.conv2d_transpose(padding='SAME')` with output `stride * input`.
///
/// It is the adjoint of the SAME convolution of that output size, so it equals the full
/// transposed convolution cropped to `[before, before + out)` on each axis. libtorch's
/// `padding = before` crops `before` from both ends, which leaves `after - before` surplus
/// rows and columns at the end (one, for stride 2) to cut off.
pub(crate) fn conv_transpose2d_same(x: &Tensor, weight: &Tensor, bias: &Tensor, stride: i64) -> Result<Tensor> {
    let (_, _, h, w) = x.size4()?;
    let (out_h, out_w) = (h * stride, w * stride);
    let (top, _) = same_padding(out_h, stride);
    let (left, _) = same_padding(out_w, stride);
    let full = x.f_conv_transpose2d(weight, Some(bias), [stride, stride], [top, left], [0, 0], 1, [1, 1])?;
    Ok(full.f_narrow(2, 0, out_h)?.f_narrow(3, 0, out_w)?)
}

fn lrelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.f_maximum(&x.f_mul_scalar(LEAK)?)?)
}

/// Drops a fraction `p` of the activations (scaling the rest by `1 / (1 - p)`), as
/// `tf.nn.dropout(keep_prob = 1 - p)`; `p = 0` is inference and draws no random numbers.
fn dropout(x: Tensor, p: f64) -> Result<Tensor> {
    if p > 0.0 { Ok(x.f_dropout(p, true)?) } else { Ok(x) }
}

/// The discriminator: three 5x5 convolutions (the first with stride 2), a hidden dense layer
/// and one sigmoid unit. No batch norm.
#[derive(Debug)]
pub struct Discriminator {
    conv1: Affine,
    conv2: Affine,
    conv3: Affine,
    fc1: Affine,
    fc2: Affine,
}

impl Discriminator {
    /// Creates the variables under `root` (`conv1.weight`, ..., `fc2.bias`).
    pub fn new(root: &nn::Path, model: &ModelSpec, image_size: usize) -> Result<Discriminator> {
        check_spec(model, image_size)?;
        let layout = layout::discriminator_layout(model, image_size);
        Ok(Discriminator {
            conv1: Affine::new(root, &layout, "conv1")?,
            conv2: Affine::new(root, &layout, "conv2")?,
            conv3: Affine::new(root, &layout, "conv3")?,
            fc1: Affine::new(root, &layout, "fc1")?,
            fc2: Affine::new(root, &layout, "fc2")?,
        })
    }

    /// Probabilities `[N, 1]` that images `[N, 3, S, S]` in [0, 1] are real. `dropout_p` is
    /// the fraction dropped after each convolution: the spec's value in training, else 0.
    pub fn forward(&self, images: &Tensor, dropout_p: f64) -> Result<Tensor> {
        let mut x = conv2d_same(images, &self.conv1.weight, &self.conv1.bias, 2)?;
        x = dropout(lrelu(&x)?, dropout_p)?;
        for conv in [&self.conv2, &self.conv3] {
            x = conv2d_same(&x, &conv.weight, &conv.bias, 1)?;
            x = dropout(lrelu(&x)?, dropout_p)?;
        }
        let hidden = lrelu(&self.fc1.dense(&x.f_flatten(1, -1)?)?)?;
        Ok(self.fc2.dense(&hidden)?.f_sigmoid()?)
    }
}

/// Which statistics the generator's batch norms normalise with.
#[derive(Debug, Clone, Copy)]
enum Norm<'a> {
    /// The batch's own (training), recorded for the coordinator.
    Batch,
    /// Running averages laid out as `layout::generator_batch_norms` says (sampling).
    Running(&'a Tensor),
}

/// The generator: a dense layer to a 4x4x3 seed image, a bilinear resize to a quarter of the
/// image side, and four 5x5 transposed convolutions (two with stride 2), with batch norm
/// (shift only) after the dense layer and each hidden transposed convolution.
#[derive(Debug)]
pub struct Generator {
    fc: Affine,
    deconv: [Affine; 4],
    /// `bn0.beta` .. `bn3.beta`.
    beta: [Tensor; 4],
    /// Channels of `bn0` .. `bn3` (bn0 normalises the 48 dense units).
    channels: [i64; 4],
    /// The seed image's resize along one axis, `[S / 4, 4]`, and its transpose.
    resize: Tensor,
    resize_t: Tensor,
}

impl Generator {
    /// Creates the variables under `root` (`fc.weight`, `deconv1.weight`, ..., `bn3.beta`).
    pub fn new(root: &nn::Path, model: &ModelSpec, image_size: usize) -> Result<Generator> {
        check_spec(model, image_size)?;
        let layout = layout::generator_layout(model);
        let norms = layout::generator_batch_norms(model);
        let beta = |i: usize| variable(root, &layout, norms[i].name, "beta");
        let side = image_size / 4;
        let resize = Tensor::f_from_slice(&legacy_bilinear_matrix(SEED_SIDE, side))?
            .f_reshape([side as i64, SEED_SIDE as i64])?
            .f_to_kind(root.kind())?
            .f_to_device(root.device())?;
        Ok(Generator {
            fc: Affine::new(root, &layout, "fc")?,
            deconv: [
                Affine::new(root, &layout, "deconv1")?,
                Affine::new(root, &layout, "deconv2")?,
                Affine::new(root, &layout, "deconv3")?,
                Affine::new(root, &layout, "deconv4")?,
            ],
            beta: [beta(0)?, beta(1)?, beta(2)?, beta(3)?],
            channels: [0, 1, 2, 3].map(|i| norms[i].channels as i64),
            resize_t: resize.f_transpose(0, 1)?,
            resize,
        })
    }

    /// Training mode: images `[N, 3, S, S]` in (0, 1) from noise `[N, noise_dim]`, dropping a
    /// fraction `dropout_p` after each hidden layer and normalising with the batch's own
    /// statistics. Also returns those statistics, detached, flat as
    /// `layout::generator_batch_norms` lays them out: per layer its means, then its unbiased
    /// variances (what the running averages track).
    pub fn forward_train(&self, noise: &Tensor, dropout_p: f64) -> Result<(Tensor, Vec<f32>)> {
        let mut stats = Vec::with_capacity(8);
        let images = self.forward(noise, dropout_p, Norm::Batch, &mut stats)?;
        let flat = Tensor::f_cat(&stats, 0)?
            .f_to_kind(Kind::Float)?
            .f_to_device(tch::Device::Cpu)?;
        Ok((images, Vec::<f32>::try_from(&flat)?))
    }

    /// Inference mode: no dropout, batch norm with the running statistics `running` (flat, on
    /// the model's device and kind).
    pub fn forward_sample(&self, noise: &Tensor, running: &Tensor) -> Result<Tensor> {
        self.forward(noise, 0.0, Norm::Running(running), &mut Vec::new())
    }

    fn forward(&self, noise: &Tensor, dropout_p: f64, norm: Norm<'_>, stats: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut offset = 0;
        let mut x = dropout(lrelu(&self.fc.dense(noise)?)?, dropout_p)?;
        x = self.batch_norm(&x, 0, norm, &mut offset, stats)?;
        let seed = [-1, SEED_CHANNELS as i64, SEED_SIDE as i64, SEED_SIDE as i64];
        // R x R^T resizes both axes: exact, differentiable, and a few hundred flops.
        x = self.resize.f_matmul(&x.f_reshape(seed)?)?.f_matmul(&self.resize_t)?;
        for (layer, stride) in [(0, 2), (1, 2), (2, 1)] {
            let conv = &self.deconv[layer];
            x = conv_transpose2d_same(&x, &conv.weight, &conv.bias, stride)?;
            x = dropout(lrelu(&x)?, dropout_p)?;
            x = self.batch_norm(&x, layer + 1, norm, &mut offset, stats)?;
        }
        let last = &self.deconv[3];
        Ok(conv_transpose2d_same(&x, &last.weight, &last.bias, 1)?.f_sigmoid()?)
    }

    /// `tf.contrib.layers.batch_norm(center=True, scale=False, epsilon=1e-3)` over every axis
    /// but the channel one. `offset` walks the flat statistics layout.
    fn batch_norm(
        &self,
        x: &Tensor,
        layer: usize,
        norm: Norm<'_>,
        offset: &mut i64,
        stats: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let c = self.channels[layer];
        let (dims, shape): (&[i64], &[i64]) = if x.dim() == 2 {
            (&[0], &[1, c])
        } else {
            (&[0, 2, 3], &[1, c, 1, 1])
        };
        let (mean, var) = match norm {
            Norm::Batch => {
                let mean = x.f_mean_dim(dims, true, None::<Kind>)?;
                // TF normalises with the biased variance (tf.nn.moments).
                let var = x.f_var_correction(dims, 0, true)?;
                // TF's fused batch norm tracks the unbiased one, and so divides by n - 1
                // only when n > 1.
                let n = x.numel() as i64 / c;
                let bessel = n as f64 / (n - 1).max(1) as f64;
                stats.push(mean.f_detach()?.f_reshape([-1])?);
                stats.push(var.f_detach()?.f_mul_scalar(bessel)?.f_reshape([-1])?);
                (mean, var)
            }
            Norm::Running(running) => (
                running.f_narrow(0, *offset, c)?.f_reshape(shape)?,
                running.f_narrow(0, *offset + c, c)?.f_reshape(shape)?,
            ),
        };
        *offset += 2 * c;
        let inv_std = var.f_add_scalar(BN_EPSILON)?.f_rsqrt()?;
        Ok(x.f_sub(&mean)?
            .f_mul(&inv_std)?
            .f_add(&self.beta[layer].f_reshape(shape)?)?)
    }
}

/// TF1's legacy bilinear resize of one axis (`align_corners=False`,
/// `half_pixel_centers=False`) as a row-major `[output, input]` matrix: output pixel `d`
/// samples `d * input / output`, between its floor and `min(ceil, input - 1)`. Computed in f32
/// as TF computes it.
pub(crate) fn legacy_bilinear_matrix(input: usize, output: usize) -> Vec<f32> {
    let scale = input as f32 / output as f32;
    let mut matrix = vec![0f32; output * input];
    for dst in 0..output {
        let src = dst as f32 * scale;
        let lower = src.floor();
        let lerp = src - lower;
        let lo = lower as usize;
        let hi = (src.ceil() as usize).min(input - 1);
        matrix[dst * input + lo] += 1.0 - lerp;
        matrix[dst * input + hi] += lerp;
    }
    matrix
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Mutex, MutexGuard};
    use tch::Device;

    /// libtorch has one process-wide generator and the test harness runs tests in parallel:
    /// every test that seeds or draws from it holds this, so no other test's draws interleave.
    pub(crate) fn torch_rng() -> MutexGuard<'static, ()> {
        static LOCK: Mutex<()> = Mutex::new(());
        LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn small(filters: u32) -> ModelSpec {
        ModelSpec {
            d_filters: vec![4 * filters, 2 * filters, filters],
            g_filters: vec![4 * filters, 2 * filters, filters],
            ..ModelSpec::default()
        }
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&t.to_kind(Kind::Double).reshape([-1])).unwrap()
    }

    fn numel(store: &nn::VarStore) -> usize {
        store.trainable_variables().iter().map(Tensor::numel).sum()
    }

    #[test]
    fn same_padding_puts_the_odd_pixel_after() {
        assert_eq!(same_padding(40, 2), (1, 2));
        assert_eq!(same_padding(41, 2), (2, 2));
        assert_eq!(same_padding(40, 1), (2, 2));
    }

    #[test]
    fn strided_conv_pads_one_before_and_two_after_as_tf_does() {
        tch::set_num_threads(1);
        // Distinct taps, so each output names the tap that reached it.
        let taps: Vec<f32> = (0..25).map(|i| (10 * (i / 5) + i % 5 + 1) as f32).collect();
        let weight = Tensor::from_slice(&taps).reshape([1, 1, 5, 5]);
        let bias = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let impulse = |y: i64, x: i64| {
            let t = Tensor::zeros([1, 1, 40, 40], (Kind::Float, Device::Cpu));
            let _ = t.get(0).get(0).get(y).get(x).fill_(1.0);
            conv2d_same(&t, &weight, &bias, 2).unwrap()
        };
        // Output i reads inputs 2i - 1 ..= 2i + 3.
        let first = impulse(0, 0);
        assert_eq!(first.size(), [1, 1, 20, 20]);
        assert_eq!(first.double_value(&[0, 0, 0, 0]), 12.0); // tap (1, 1)
        assert_eq!(first.sum(Kind::Double).double_value(&[]), 12.0);
        let last = impulse(39, 39);
        assert_eq!(last.double_value(&[0, 0, 18, 18]), 45.0); // tap (4, 4)
        assert_eq!(last.double_value(&[0, 0, 19, 19]), 23.0); // tap (2, 2)
        assert_eq!(last.double_value(&[0, 0, 18, 19]), 43.0); // tap (4, 2)
        assert_eq!(last.double_value(&[0, 0, 19, 18]), 25.0); // tap (2, 4)
        assert_eq!(last.sum(Kind::Double).double_value(&[]), 45.0 + 23.0 + 43.0 + 25.0);
    }

    #[test]
    fn transposed_conv_is_the_adjoint_of_the_same_conv() {
        let _rng = torch_rng();
        tch::set_num_threads(1);
        let opts = (Kind::Double, Device::Cpu);
        tch::manual_seed(3);
        for (stride, side) in [(2, 10), (1, 12)] {
            // Transposed: 3 channels of side `side` -> 2 of side `stride * side`.
            let weight = Tensor::randn([3, 2, 5, 5], opts);
            let small = Tensor::randn([2, 3, side, side], opts);
            let big = Tensor::randn([2, 2, stride * side, stride * side], opts);
            let up = conv_transpose2d_same(&small, &weight, &Tensor::zeros([2], opts), stride).unwrap();
            let down = conv2d_same(&big, &weight, &Tensor::zeros([3], opts), stride).unwrap();
            assert_eq!(up.size(), big.size());
            assert_eq!(down.size(), small.size());
            let lhs = (&up * &big).sum(Kind::Double).double_value(&[]);
            let rhs = (&down * &small).sum(Kind::Double).double_value(&[]);
            assert!(
                (lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0),
                "stride {stride}: {lhs} vs {rhs}"
            );
        }
    }

    #[test]
    fn legacy_bilinear_samples_without_half_pixel_centres() {
        let m = legacy_bilinear_matrix(4, 10);
        let row = |r: usize| &m[r * 4..r * 4 + 4];
        assert_eq!(row(0), [1.0, 0.0, 0.0, 0.0]);
        assert_eq!(row(5), [0.0, 0.0, 1.0, 0.0]); // 5 * 0.4 = 2
        assert_eq!(row(9), [0.0, 0.0, 0.0, 1.0]); // 3.6 clamps to the last pixel
        let expected = [0.6, 0.4, 0.0, 0.0];
        assert!(
            row(1).iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6),
            "{:?}",
            row(1)
        );
        assert!(m.chunks(4).all(|r| (r.iter().sum::<f32>() - 1.0).abs() < 1e-6));
    }

    #[test]
    fn generator_resizes_rows_and_columns() {
        let store = nn::VarStore::new(Device::Cpu);
        let g = Generator::new(&store.root(), &small(2), 40).unwrap();
        let seed: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let x = Tensor::from_slice(&seed).reshape([1, 1, 4, 4]);
        let out = g.resize.matmul(&x).matmul(&g.resize_t);
        assert_eq!(out.size(), [1, 1, 10, 10]);
        let at = |y, x| out.double_value(&[0, 0, y, x]);
        assert_eq!(at(9, 9), 15.0);
        assert!((at(1, 0) - (0.6 * 0.0 + 0.4 * 4.0)).abs() < 1e-5); // down a column
        assert!((at(0, 1) - (0.6 * 0.0 + 0.4 * 1.0)).abs() < 1e-5); // along a row
    }

    #[test]
    fn output_shapes_follow_the_image_size() {
        let _rng = torch_rng();
        tch::set_num_threads(1);
        for size in [40, 48] {
            let spec = small(4);
            let (d_store, g_store) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
            let d = Discriminator::new(&d_store.root(), &spec, size).unwrap();
            let g = Generator::new(&g_store.root(), &spec, size).unwrap();
            let noise = Tensor::rand([5, 16], (Kind::Float, Device::Cpu));
            let (images, stats) = g.forward_train(&noise, 0.5).unwrap();
            assert_eq!(images.size(), [5, 3, size as i64, size as i64]);
            assert_eq!(stats.len(), layout::batch_norm_stats_len(&spec));
            assert_eq!(d.forward(&images, 0.5).unwrap().size(), [5, 1]);
            let running = Tensor::ones([stats.len() as i64], (Kind::Float, Device::Cpu));
            assert_eq!(g.forward_sample(&noise, &running).unwrap().size(), images.size());
        }
    }

    #[test]
    fn article_model_has_the_article_parameter_counts() {
        let spec = ModelSpec::default();
        let (d_store, g_store) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
        Discriminator::new(&d_store.root(), &spec, 40).unwrap();
        Generator::new(&g_store.root(), &spec, 40).unwrap();
        assert_eq!(numel(&d_store), 4_320_705);
        assert_eq!(numel(&g_store), 1_049_763);
    }

    #[test]
    fn batch_norm_shifts_each_channel_to_beta_with_unit_scale() {
        let _rng = torch_rng();
        tch::set_num_threads(1);
        let store = nn::VarStore::new(Device::Cpu);
        let g = Generator::new(&store.root(), &small(1), 40).unwrap();
        let opts = (Kind::Double, Device::Cpu);
        tch::manual_seed(5);
        let betas = [0.5, -1.0, 2.0, 0.0];
        let mut beta = g.beta[1].shallow_clone();
        tch::no_grad(|| beta.copy_(&Tensor::from_slice(&betas)));
        // Channel scales 0.01 .. 3 so epsilon's effect shows.
        let scales = Tensor::from_slice(&[0.01, 0.1, 1.0, 3.0])
            .to_kind(Kind::Double)
            .view([1, 4, 1, 1]);
        let x = (Tensor::randn([6, 4, 5, 5], opts) * scales + 7.0).to_kind(Kind::Float);
        let (mut offset, mut stats) = (0, Vec::new());
        let y = g.batch_norm(&x, 1, Norm::Batch, &mut offset, &mut stats).unwrap();
        assert_eq!(offset, 8);
        let x64 = x.to_kind(Kind::Double);
        let v_in = values(&x64.var_correction(&[0, 2, 3][..], 0, false));
        let mean_out = values(&y.mean_dim(&[0, 2, 3][..], false, None::<Kind>));
        let var_out = values(&y.to_kind(Kind::Double).var_correction(&[0, 2, 3][..], 0, false));
        for c in 0..4 {
            assert!(
                (mean_out[c] - betas[c]).abs() < 1e-4,
                "channel {c} mean {}",
                mean_out[c]
            );
            let expected = v_in[c] / (v_in[c] + BN_EPSILON);
            assert!(
                (var_out[c] - expected).abs() < 1e-4 * expected.max(1e-2),
                "channel {c}: {} vs {expected}",
                var_out[c]
            );
        }
        // The recorded statistics: batch means and unbiased (n = 150) variances.
        let mean_in = values(&x64.mean_dim(&[0, 2, 3][..], false, None::<Kind>));
        let unbiased = values(&x64.var_correction(&[0, 2, 3][..], 1, false));
        let (m, v) = (values(&stats[0]), values(&stats[1]));
        for c in 0..4 {
            assert!((m[c] - mean_in[c]).abs() < 1e-5);
            assert!((v[c] - unbiased[c]).abs() < 1e-5 * unbiased[c].max(1e-3));
        }
        // Running statistics normalise with exactly the values given: means 7, variances 4.
        let running = Tensor::from_slice(&[[7.0f32; 4], [4.0; 4]].concat());
        let mut offset = 0;
        let y = g
            .batch_norm(&x, 1, Norm::Running(&running), &mut offset, &mut Vec::new())
            .unwrap();
        let want = (&x64 - 7.0) / (4.0f64 + BN_EPSILON).sqrt() + Tensor::from_slice(&betas).view([1, 4, 1, 1]);
        let err = (y.to_kind(Kind::Double) - want).abs().max().double_value(&[]);
        assert!(err < 1e-5, "{err}");
    }
}
