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
pub(crate) mod tests;
