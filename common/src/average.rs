//! The all-reduce's arithmetic, shared by the coordinator and the single-process benchmark
//! loop so that both average in exactly the same order.

use crate::checkpoint::NetState;
use crate::layout::BATCH_NORM_DECAY;
use crate::rmsprop::{RmsProp, update_moving_average};

/// The sample-weighted mean of the contributions, summed in the order given (shard order), so
/// the result is the same bits on every run. `out` is overwritten.
pub fn weighted_average(contributions: &[(&[f32], u32)], out: &mut [f32]) {
    let total: u64 = contributions.iter().map(|(_, n)| u64::from(*n)).sum();
    assert!(total > 0, "averaging contributions with no samples");
    out.fill(0.0);
    for (values, samples) in contributions {
        assert_eq!(values.len(), out.len(), "contribution length differs");
        let weight = (f64::from(*samples) / total as f64) as f32;
        for (acc, v) in out.iter_mut().zip(values.iter()) {
            *acc += weight * v;
        }
    }
}

/// One network's update from its shards' contributions, done the same way by the coordinator
/// and the single-process loop: the shard-order mean of the gradients, RMSProp, then the
/// batch-norm running averages from the shards' batch statistics. `average` is scratch space
/// as long as the parameters.
pub fn update_network(
    gradients: &[(&[f32], u32)],
    bn_stats: &[(&[f32], u32)],
    optimizer: &RmsProp,
    master: &mut NetState,
    average: &mut [f32],
    batch_norm: &mut [f32],
) {
    weighted_average(gradients, average);
    optimizer.apply(&mut master.params, &mut master.mean_square, average);
    let mut mean_stats = vec![0.0; batch_norm.len()];
    weighted_average(bn_stats, &mut mean_stats);
    update_moving_average(batch_norm, &mean_stats, BATCH_NORM_DECAY);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_average_is_its_gradient_exactly() {
        let g = [0.1f32, -3.7, 1e-20];
        let mut out = [9.0f32; 3];
        weighted_average(&[(&g, 16)], &mut out);
        assert_eq!(out, g);
    }

    #[test]
    fn weights_follow_the_samples() {
        let a = [1.0f32, 0.0];
        let b = [0.0f32, 4.0];
        let mut out = [0.0f32; 2];
        weighted_average(&[(&a, 3), (&b, 1)], &mut out);
        assert_eq!(out, [0.75, 1.0]);
    }
}
