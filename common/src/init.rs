//! Fresh parameters, as TF1 initialises them: Glorot-uniform kernels and zero biases, and the
//! whole training state of step 0.

use crate::checkpoint::{NetState, TrainingState};
use crate::layout::{self, Init, NetLayout};
use crate::rmsprop::initial_mean_square;
use crate::seeds::{self, Stream};
use crate::spec::JobSpec;

/// A flat buffer for `layout` drawn from `seed`.
pub fn initial_parameters(layout: &NetLayout, seed: u64) -> Vec<f32> {
    let mut rng = seeds::rng(seed);
    let mut values = vec![0f32; layout.numel()];
    for (param, range) in layout.ranges() {
        if let Init::GlorotUniform { fan_in, fan_out } = param.init {
            let limit = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
            for v in &mut values[range] {
                *v = (2.0 * seeds::unit_f32(&mut rng) - 1.0) * limit;
            }
        }
    }
    values
}

/// The state of step 0: Glorot-initialised networks from the job seed, TF1's initial RMSProp
/// mean squares, batch-norm running statistics at their start.
pub fn fresh_state(spec: &JobSpec) -> TrainingState {
    let seed = spec.train.seed;
    let d_layout = layout::discriminator_layout(&spec.model, spec.data.image_size as usize);
    let g_layout = layout::generator_layout(&spec.model);
    TrainingState {
        step: 0,
        discriminator: NetState {
            params: initial_parameters(&d_layout, seeds::derive(seed, Stream::InitDiscriminator, &[])),
            mean_square: initial_mean_square(d_layout.numel()),
        },
        generator: NetState {
            params: initial_parameters(&g_layout, seeds::derive(seed, Stream::InitGenerator, &[])),
            mean_square: initial_mean_square(g_layout.numel()),
        },
        batch_norm: layout::initial_batch_norm_running(&spec.model),
        samplers: Vec::new(),
        dataset_len: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::discriminator_layout;
    use crate::spec::ModelSpec;

    #[test]
    fn kernels_are_glorot_bounded_and_biases_zero() {
        let layout = discriminator_layout(&ModelSpec::default(), 40);
        let values = initial_parameters(&layout, 5);
        for (param, range) in layout.ranges() {
            let slice = &values[range];
            match param.init {
                Init::Zeros => assert!(slice.iter().all(|&v| v == 0.0), "{}", param.name),
                Init::GlorotUniform { fan_in, fan_out } => {
                    let limit = (6.0 / (fan_in + fan_out) as f32).sqrt();
                    assert!(slice.iter().all(|v| v.abs() <= limit), "{}", param.name);
                    // A uniform draw over +-limit has standard deviation limit / sqrt(3).
                    let mean_sq = slice.iter().map(|v| v * v).sum::<f32>() / slice.len() as f32;
                    let expected = limit * limit / 3.0;
                    assert!((mean_sq - expected).abs() < 0.1 * expected, "{}", param.name);
                }
            }
        }
        assert_eq!(values, initial_parameters(&layout, 5));
        assert_ne!(values, initial_parameters(&layout, 6));
    }
}
