//! The all-reduce's arithmetic, shared by the coordinator and the single-process benchmark
//! loop so that both average in exactly the same order.

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
