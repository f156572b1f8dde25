//! The flat parameter layout of both networks.
//!
//! The coordinator keeps every network as one flat `f32` buffer; a worker copies that buffer
//! into its libtorch variables and back. Both sides derive the same list here, sorted by
//! variable name, and compare a fingerprint at Join so a mismatch is caught before any step.
//! Shapes are libtorch's: conv weights `[out, in, k, k]`, transposed-conv weights
//! `[in, out, k, k]`, dense weights `[out, in]`.

use crate::spec::ModelSpec;

/// Kernel side of every convolution in the article's model.
pub const KERNEL: usize = 5;
/// Units of the discriminator's hidden dense layer.
pub const D_HIDDEN: usize = 128;
/// The generator's first dense layer makes a `SEED_SIDE x SEED_SIDE x SEED_CHANNELS` image.
pub const SEED_SIDE: usize = 4;
pub const SEED_CHANNELS: usize = 3;
/// Colour channels of the images.
pub const CHANNELS: usize = 3;
/// The generator's batch-norm decay (TF1 `decay=0.9`: running-average momentum 0.1).
pub const BATCH_NORM_DECAY: f32 = 0.9;
/// TF1 contrib batch norm's epsilon.
pub const BATCH_NORM_EPSILON: f64 = 1e-3;

/// How a parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// TF1's default kernel initialiser: uniform in +-sqrt(6 / (fan_in + fan_out)).
    GlorotUniform { fan_in: usize, fan_out: usize },
    /// Biases and batch-norm shifts.
    Zeros,
}

/// One trainable variable.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A network's variables in the order every process agrees on.
#[derive(Debug, Clone, PartialEq)]
pub struct NetLayout {
    params: Vec<ParamSpec>,
}

impl NetLayout {
    fn sorted(mut params: Vec<ParamSpec>) -> Self {
        params.sort_by(|a, b| a.name.cmp(&b.name));
        NetLayout { params }
    }

    pub fn params(&self) -> &[ParamSpec] {
        &self.params
    }

    /// Total number of f32 values.
    pub fn numel(&self) -> usize {
        self.params.iter().map(ParamSpec::numel).sum()
    }

    /// Each variable with its range in the flat buffer.
    pub fn ranges(&self) -> impl Iterator<Item = (&ParamSpec, std::ops::Range<usize>)> {
        let mut offset = 0;
        self.params.iter().map(move |p| {
            let range = offset..offset + p.numel();
            offset = range.end;
            (p, range)
        })
    }
}

/// A batch-norm layer of the generator: its statistics are per channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchNormLayer {
    pub name: &'static str,
    pub channels: usize,
}

/// The generator's batch-norm layers in forward order. Their statistics travel as one flat
/// vector: for each layer its means, then its variances.
pub fn generator_batch_norms(model: &ModelSpec) -> Vec<BatchNormLayer> {
    let g = &model.g_filters;
    vec![
        BatchNormLayer {
            name: "bn0",
            channels: SEED_SIDE * SEED_SIDE * SEED_CHANNELS,
        },
        BatchNormLayer {
            name: "bn1",
            channels: g[0] as usize,
        },
        BatchNormLayer {
            name: "bn2",
            channels: g[1] as usize,
        },
        BatchNormLayer {
            name: "bn3",
            channels: g[2] as usize,
        },
    ]
}

/// Length of the flat batch-norm statistics vector (means and variances of every layer).
pub fn batch_norm_stats_len(model: &ModelSpec) -> usize {
    generator_batch_norms(model).iter().map(|l| 2 * l.channels).sum()
}

/// Running statistics before any training: means 0 and variances 1, as TF1 starts them.
pub fn initial_batch_norm_running(model: &ModelSpec) -> Vec<f32> {
    let mut stats = Vec::with_capacity(batch_norm_stats_len(model));
    for layer in generator_batch_norms(model) {
        stats.extend(std::iter::repeat_n(0.0, layer.channels));
        stats.extend(std::iter::repeat_n(1.0, layer.channels));
    }
    stats
}

fn conv(name: &str, in_ch: usize, out_ch: usize) -> [ParamSpec; 2] {
    let area = KERNEL * KERNEL;
    [
        ParamSpec {
            name: format!("{name}.weight"),
            shape: vec![out_ch, in_ch, KERNEL, KERNEL],
            init: Init::GlorotUniform {
                fan_in: area * in_ch,
                fan_out: area * out_ch,
            },
        },
        zeros(format!("{name}.bias"), out_ch),
    ]
}

fn conv_transpose(name: &str, in_ch: usize, out_ch: usize) -> [ParamSpec; 2] {
    let area = KERNEL * KERNEL;
    [
        ParamSpec {
            name: format!("{name}.weight"),
            shape: vec![in_ch, out_ch, KERNEL, KERNEL],
            init: Init::GlorotUniform {
                fan_in: area * out_ch,
                fan_out: area * in_ch,
            },
        },
        zeros(format!("{name}.bias"), out_ch),
    ]
}

fn dense(name: &str, inputs: usize, outputs: usize) -> [ParamSpec; 2] {
    [
        ParamSpec {
            name: format!("{name}.weight"),
            shape: vec![outputs, inputs],
            init: Init::GlorotUniform {
                fan_in: inputs,
                fan_out: outputs,
            },
        },
        zeros(format!("{name}.bias"), outputs),
    ]
}

fn zeros(name: String, len: usize) -> ParamSpec {
    ParamSpec {
        name,
        shape: vec![len],
        init: Init::Zeros,
    }
}

/// The discriminator: three 5x5 convolutions (the first with stride 2), a hidden dense layer
/// and one sigmoid output.
pub fn discriminator_layout(model: &ModelSpec, image_size: usize) -> NetLayout {
    let f: Vec<usize> = model.d_filters.iter().map(|&v| v as usize).collect();
    let half = image_size / 2;
    let mut params = Vec::new();
    params.extend(conv("conv1", CHANNELS, f[0]));
    params.extend(conv("conv2", f[0], f[1]));
    params.extend(conv("conv3", f[1], f[2]));
    params.extend(dense("fc1", half * half * f[2], D_HIDDEN));
    params.extend(dense("fc2", D_HIDDEN, 1));
    NetLayout::sorted(params)
}

/// The generator: a dense layer to a 4x4x3 seed image, four 5x5 transposed convolutions, and
/// a learned shift (no scale) for each batch norm.
pub fn generator_layout(model: &ModelSpec) -> NetLayout {
    let g: Vec<usize> = model.g_filters.iter().map(|&v| v as usize).collect();
    let seed_len = SEED_SIDE * SEED_SIDE * SEED_CHANNELS;
    let mut params = Vec::new();
    params.extend(dense("fc", model.noise_dim as usize, seed_len));
    params.extend(conv_transpose("deconv1", SEED_CHANNELS, g[0]));
    params.extend(conv_transpose("deconv2", g[0], g[1]));
    params.extend(conv_transpose("deconv3", g[1], g[2]));
    params.extend(conv_transpose("deconv4", g[2], CHANNELS));
    for layer in generator_batch_norms(model) {
        params.push(zeros(format!("{}.beta", layer.name), layer.channels));
    }
    NetLayout::sorted(params)
}

/// A fingerprint of both layouts and the batch-norm layers: equal fingerprints mean two
/// processes lay out every buffer the same way.
pub fn fingerprint(model: &ModelSpec, image_size: usize) -> u64 {
    let mut text = String::new();
    for (net, layout) in [
        ("d", discriminator_layout(model, image_size)),
        ("g", generator_layout(model)),
    ] {
        for p in layout.params() {
            text.push_str(&format!("{net}/{}:{:?};", p.name, p.shape));
        }
    }
    for layer in generator_batch_norms(model) {
        text.push_str(&format!("bn/{}:{};", layer.name, layer.channels));
    }
    // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn article_discriminator_has_the_article_parameter_count() {
        assert_eq!(discriminator_layout(&ModelSpec::default(), 40).numel(), 4_320_705);
    }

    #[test]
    fn article_generator_has_the_article_parameter_count() {
        assert_eq!(generator_layout(&ModelSpec::default()).numel(), 1_049_763);
    }

    #[test]
    fn layouts_are_sorted_by_name() {
        let layout = generator_layout(&ModelSpec::default());
        let names: Vec<_> = layout.params().iter().map(|p| p.name.clone()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }

    #[test]
    fn fingerprint_changes_with_shape() {
        let small = ModelSpec {
            d_filters: vec![64, 32, 16],
            ..ModelSpec::default()
        };
        assert_ne!(fingerprint(&ModelSpec::default(), 40), fingerprint(&small, 40));
        assert_ne!(fingerprint(&small, 40), fingerprint(&small, 48));
        assert_eq!(fingerprint(&small, 40), fingerprint(&small.clone(), 40));
    }

    #[test]
    fn batch_norm_stats_cover_every_channel_twice() {
        assert_eq!(batch_norm_stats_len(&ModelSpec::default()), 2 * (48 + 256 + 128 + 64));
    }
}
