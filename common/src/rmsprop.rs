//! TF1's RMSProp, written out because tch's differs in every detail that matters here.
//!
//! TF1 (`ApplyRMSProp` with momentum 0) keeps a mean square `ms` that starts at ONE, and per
//! element does, with the L2 term already folded into the gradient:
//!
//! ```text
//! g   = grad + l2 * w
//! ms  = ms + (g * g - ms) * (1 - decay)
//! w   = w - lr * g / sqrt(ms + epsilon)      // epsilon inside the root
//! ```
//!
//! The update is written in TF's order of operations so that results match it as closely as
//! f32 allows.

/// Hyperparameters of one network's optimizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmsProp {
    pub lr: f32,
    pub decay: f32,
    pub epsilon: f32,
    pub l2: f32,
}

/// The initial mean square of every parameter, as TF1 sets it.
pub fn initial_mean_square(len: usize) -> Vec<f32> {
    vec![1.0; len]
}

impl RmsProp {
    /// The optimizer of the job's spec for a network trained at learning rate `lr`.
    pub fn for_spec(train: &crate::spec::TrainSpec, lr: f64) -> RmsProp {
        RmsProp {
            lr: lr as f32,
            decay: train.rmsprop_decay as f32,
            epsilon: train.rmsprop_epsilon as f32,
            l2: train.l2 as f32,
        }
    }

    /// Applies one update to `params` in place from the cluster-averaged `grads`.
    pub fn apply(&self, params: &mut [f32], mean_square: &mut [f32], grads: &[f32]) {
        assert_eq!(params.len(), grads.len(), "gradient length differs from parameters");
        assert_eq!(
            params.len(),
            mean_square.len(),
            "optimizer state length differs from parameters"
        );
        for ((w, ms), &grad) in params.iter_mut().zip(mean_square.iter_mut()).zip(grads) {
            (*w, *ms) = self.step(*w, *ms, grad);
        }
    }

    /// [`RmsProp::apply`] with its results written elsewhere: the new parameters into
    /// `new_params`, and the new mean square over the gradients in `grads_then_mean_square`;
    /// `params` and `mean_square` stay as they were. The coordinator updates this way so that,
    /// until a step can no longer be undone, the state it started from is intact, with no
    /// buffer beyond the reduce buffer (which held the gradients) and one spare.
    pub fn apply_into(
        &self,
        params: &[f32],
        mean_square: &[f32],
        grads_then_mean_square: &mut [f32],
        new_params: &mut [f32],
    ) {
        assert!(
            [mean_square.len(), grads_then_mean_square.len(), new_params.len()]
                .iter()
                .all(|&n| n == params.len()),
            "optimizer buffers differ in length"
        );
        for (((&w, &ms), grad), new_w) in params
            .iter()
            .zip(mean_square)
            .zip(grads_then_mean_square.iter_mut())
            .zip(new_params)
        {
            (*new_w, *grad) = self.step(w, ms, *grad);
        }
    }

    /// One variable's update: `(w, ms)` after a step with gradient `grad`.
    #[inline]
    pub fn step(&self, w: f32, ms: f32, grad: f32) -> (f32, f32) {
        let g = grad + self.l2 * w;
        let ms = ms + (g * g - ms) * (1.0 - self.decay);
        (w - self.lr * g / (ms + self.epsilon).sqrt(), ms)
    }
}

/// TF1's `assign_moving_average`: `stat -= (stat - batch) * (1 - decay)`, for batch-norm
/// running statistics.
pub fn update_moving_average(running: &mut [f32], batch: &[f32], decay: f32) {
    assert_eq!(running.len(), batch.len(), "batch statistics length differs");
    let keep = 1.0 - decay;
    for (r, &b) in running.iter_mut().zip(batch) {
        *r -= (*r - b) * keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn article(lr: f32) -> RmsProp {
        RmsProp {
            lr,
            decay: 0.9,
            epsilon: 1e-10,
            l2: 1e-6,
        }
    }

    #[test]
    fn first_step_matches_hand_computation() {
        // w = 0.5, grad = 0.2, lr = 1e-4:
        // g = 0.2 + 1e-6 * 0.5 = 0.2000005
        // ms = 1 + (0.2000005^2 - 1) * 0.1 = 0.9040002
        // w = 0.5 - 1e-4 * 0.2000005 / sqrt(0.9040002 + 1e-10) = 0.49997896...
        let mut w = [0.5f32];
        let mut ms = initial_mean_square(1);
        article(1e-4).apply(&mut w, &mut ms, &[0.2]);
        let g = 0.2f64 + 1e-6 * 0.5;
        let ms_expected = 1.0 + (g * g - 1.0) * 0.1;
        let w_expected = 0.5 - 1e-4 * g / (ms_expected + 1e-10).sqrt();
        assert!((ms[0] as f64 - ms_expected).abs() < 1e-7, "{}", ms[0]);
        assert!((w[0] as f64 - w_expected).abs() < 1e-7, "{} vs {w_expected}", w[0]);
        assert!((w[0] - 0.499_978_96).abs() < 1e-7);
    }

    #[test]
    fn applying_into_other_buffers_gives_the_bits_of_applying_in_place() {
        let opt = article(2e-4);
        let params: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let mean_square: Vec<f32> = (0..1000).map(|i| 0.5 + (i % 13) as f32 * 0.1).collect();
        let grads: Vec<f32> = (0..1000).map(|i| (i as f32 * 1.3).cos() * 1e-2).collect();
        let (mut w, mut ms) = (params.clone(), mean_square.clone());
        opt.apply(&mut w, &mut ms, &grads);
        let mut new_w = vec![0.0; 1000];
        let mut new_ms = grads.clone();
        let (params_before, mean_square_before) = (params.clone(), mean_square.clone());
        opt.apply_into(&params, &mean_square, &mut new_ms, &mut new_w);
        assert_eq!((new_w, new_ms), (w, ms));
        assert_eq!((params, mean_square), (params_before, mean_square_before));
    }

    #[test]
    fn second_step_uses_the_decayed_mean_square() {
        let mut w = [1.0f32, -2.0];
        let mut ms = initial_mean_square(2);
        let opt = article(2e-4);
        opt.apply(&mut w, &mut ms, &[0.5, -1.0]);
        opt.apply(&mut w, &mut ms, &[0.25, 3.0]);
        // Same arithmetic in f64, step by step.
        let mut we = [1.0f64, -2.0];
        let mut mse = [1.0f64, 1.0];
        for grads in [[0.5, -1.0], [0.25, 3.0]] {
            for i in 0..2 {
                let g = grads[i] + 1e-6 * we[i];
                mse[i] += (g * g - mse[i]) * 0.1;
                we[i] -= 2e-4 * g / (mse[i] + 1e-10).sqrt();
            }
        }
        for i in 0..2 {
            assert!((w[i] as f64 - we[i]).abs() < 1e-6, "w[{i}] {} vs {}", w[i], we[i]);
            assert!((ms[i] as f64 - mse[i]).abs() < 1e-6, "ms[{i}] {} vs {}", ms[i], mse[i]);
        }
    }

    #[test]
    fn zero_gradient_still_decays_weights_through_l2() {
        // g = 0 + 0.1 * 3 = 0.3; ms = 1 + (0.09 - 1) * 0.1 = 0.909; w = 3 - 0.01 * 0.3 / sqrt(0.909)
        let opt = RmsProp {
            l2: 0.1,
            ..article(0.01)
        };
        let mut w = [3.0f32];
        let mut ms = initial_mean_square(1);
        opt.apply(&mut w, &mut ms, &[0.0]);
        let expected = 3.0 - 0.01 * 0.3 / 0.909f64.sqrt();
        assert!((w[0] as f64 - expected).abs() < 1e-6, "{}", w[0]);
    }

    #[test]
    fn epsilon_is_inside_the_root() {
        // With ms driven to zero, sqrt(0 + eps) = 1e-5, so the step is lr * g / 1e-5.
        let opt = RmsProp {
            lr: 1.0,
            decay: 0.5,
            epsilon: 1e-10,
            l2: 0.0,
        };
        let mut w = [0.0f32];
        let mut ms = [0.0f32];
        opt.apply(&mut w, &mut ms, &[1e-6]);
        // ms = 0 + (1e-12 - 0) * 0.5 = 5e-13; step = 1e-6 / sqrt(5e-13 + 1e-10)
        let expected = -1e-6 / (5e-13f64 + 1e-10).sqrt();
        assert!((w[0] as f64 - expected).abs() < 1e-4 * expected.abs());
    }

    #[test]
    fn moving_average_follows_tf() {
        let mut running = [0.0f32, 1.0];
        update_moving_average(&mut running, &[2.0, 3.0], 0.9);
        assert!((running[0] - 0.2).abs() < 1e-7);
        assert!((running[1] - 1.2).abs() < 1e-6);
    }
}
