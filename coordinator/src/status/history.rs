//! The loss curves' history, bounded however long the run.
//!
//! Each point is a bucket of consecutive steps: its step is the bucket's last step and its
//! losses are the means of the bucket's finite losses (none finite: no value). Every bucket
//! holds `stride` steps, except the newest, which is still filling and so always ends at the
//! latest step. When [`MAX_HISTORY_POINTS`] buckets are full, neighbours are merged in pairs
//! (1 and 2, 3 and 4, ...) and the stride doubles. So the history is a function of the steps
//! pushed alone (deterministic), holds at most `MAX_HISTORY_POINTS` points, is increasing in
//! step, and costs O(1) amortised per step: a merge of n points happens once per n/2 steps.

use super::snapshot::LossCurves;

/// The most points the loss curves hold: about 20 bytes each in the JSON.
pub const MAX_HISTORY_POINTS: usize = 2000;

/// Consecutive steps merged into one point.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    last_step: u64,
    /// Steps in the bucket (0: empty).
    steps: u64,
    sum_d: f64,
    finite_d: u64,
    sum_g: f64,
    finite_g: u64,
}

impl Bucket {
    fn add(&mut self, step: u64, loss_d: f64, loss_g: f64) {
        self.last_step = step;
        self.steps += 1;
        if loss_d.is_finite() {
            self.sum_d += loss_d;
            self.finite_d += 1;
        }
        if loss_g.is_finite() {
            self.sum_g += loss_g;
            self.finite_g += 1;
        }
    }

    fn merged(self, later: Bucket) -> Bucket {
        Bucket {
            last_step: later.last_step,
            steps: self.steps + later.steps,
            sum_d: self.sum_d + later.sum_d,
            finite_d: self.finite_d + later.finite_d,
            sum_g: self.sum_g + later.sum_g,
            finite_g: self.finite_g + later.finite_g,
        }
    }
}

/// A mean as f32 (the curves need no more digits, and the JSON stays shorter), or none.
fn mean(sum: f64, count: u64) -> Option<f32> {
    let mean = (sum / count as f64) as f32;
    (count > 0 && mean.is_finite()).then_some(mean)
}

/// The downsampled loss history.
#[derive(Debug)]
pub(crate) struct LossHistory {
    full: Vec<Bucket>,
    open: Bucket,
    stride: u64,
    max_points: usize,
}

impl LossHistory {
    pub(crate) fn new() -> LossHistory {
        LossHistory::with_max_points(MAX_HISTORY_POINTS)
    }

    /// `max_points` is rounded up to an even number of at least 4, so that a merge leaves
    /// room for new buckets.
    pub(crate) fn with_max_points(max_points: usize) -> LossHistory {
        let max_points = max_points.max(4).next_multiple_of(2);
        LossHistory {
            full: Vec::with_capacity(max_points),
            open: Bucket::default(),
            stride: 1,
            max_points,
        }
    }

    /// Adds a step. One that is not after the last step pushed is left out, so the curves
    /// stay increasing in step.
    pub(crate) fn push(&mut self, step: u64, loss_d: f64, loss_g: f64) {
        let last = if self.open.steps > 0 {
            Some(self.open.last_step)
        } else {
            self.full.last().map(|b| b.last_step)
        };
        if last.is_some_and(|last| step <= last) {
            return;
        }
        self.open.add(step, loss_d, loss_g);
        if self.open.steps < self.stride {
            return;
        }
        self.full.push(std::mem::take(&mut self.open));
        // The open bucket is empty now, so the points never exceed max_points.
        if self.full.len() == self.max_points {
            self.full = self.full.chunks(2).map(|pair| pair[0].merged(pair[1])).collect();
            self.stride *= 2;
        }
    }

    pub(crate) fn curves(&self) -> LossCurves {
        let open = (self.open.steps > 0).then_some(&self.open);
        let points = self.full.iter().chain(open);
        let mut curves = LossCurves {
            stride: self.stride,
            step: Vec::with_capacity(self.full.len() + 1),
            loss_d: Vec::with_capacity(self.full.len() + 1),
            loss_g: Vec::with_capacity(self.full.len() + 1),
        };
        for bucket in points {
            curves.step.push(bucket.last_step);
            curves.loss_d.push(mean(bucket.sum_d, bucket.finite_d));
            curves.loss_g.push(mean(bucket.sum_g, bucket.finite_g));
        }
        curves
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_history_keeps_every_step_while_short() {
        let mut history = LossHistory::with_max_points(10);
        for step in 1..=9 {
            history.push(step, step as f64, -(step as f64));
        }
        let curves = history.curves();
        assert_eq!(curves.stride, 1);
        assert_eq!(curves.step, (1..=9).collect::<Vec<_>>());
        assert_eq!(curves.loss_d[3], Some(4.0));
        assert_eq!(curves.loss_g[8], Some(-9.0));
    }

    #[test]
    fn status_history_merges_neighbours_into_means() {
        let mut history = LossHistory::with_max_points(4);
        // Four full buckets merge into two of stride 2: (1,2) and (3,4).
        for step in 1..=5 {
            history.push(step, step as f64, 10.0 * step as f64);
        }
        let curves = history.curves();
        assert_eq!(curves.stride, 2);
        assert_eq!(curves.step, vec![2, 4, 5]);
        assert_eq!(curves.loss_d, vec![Some(1.5), Some(3.5), Some(5.0)]);
        assert_eq!(curves.loss_g, vec![Some(15.0), Some(35.0), Some(50.0)]);
    }

    #[test]
    fn status_history_stays_bounded_and_increasing_for_100000_steps() {
        let mut history = LossHistory::new();
        let mut stride = 1;
        for step in 1..=100_000u64 {
            history.push(step, (step % 7) as f64, 1.0);
            // Checking every step would be quadratic; every 997th and the tail suffice.
            if step.is_multiple_of(997) || step > 99_990 {
                let curves = history.curves();
                assert!(curves.step.len() <= MAX_HISTORY_POINTS, "{} points", curves.step.len());
                assert!(curves.step.windows(2).all(|w| w[0] < w[1]), "not increasing at {step}");
                assert_eq!(curves.step.last(), Some(&step), "latest step missing");
                assert!(curves.stride >= stride);
                stride = curves.stride;
            }
        }
        let curves = history.curves();
        // 100,000 steps in at most 2,000 points: buckets of 64 steps.
        assert_eq!(curves.stride, 64);
        assert!(curves.step.len() > MAX_HISTORY_POINTS / 2);
        assert_eq!(curves.step.len(), curves.loss_d.len());
        // A bucket of 64 consecutive steps averages step % 7 to about 3.
        let mid = curves.loss_d[curves.step.len() / 2].expect("finite");
        assert!((mid - 3.0).abs() < 0.1, "mean {mid}");
    }

    #[test]
    fn status_history_is_deterministic() {
        let run = || {
            let mut history = LossHistory::with_max_points(50);
            for step in 1..=12_345u64 {
                history.push(step, (step as f64).sin(), (step as f64).cos());
            }
            history.curves()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn status_history_skips_non_finite_losses_and_old_steps() {
        let mut history = LossHistory::with_max_points(4);
        history.push(10, f64::NAN, 1.0);
        history.push(11, 2.0, f64::INFINITY);
        history.push(11, 99.0, 99.0);
        history.push(5, 99.0, 99.0);
        let curves = history.curves();
        assert_eq!(curves.step, vec![10, 11]);
        assert_eq!(curves.loss_d, vec![None, Some(2.0)]);
        assert_eq!(curves.loss_g, vec![Some(1.0), None]);
        // Merged, the bucket's mean is over its finite values only.
        history.push(12, 4.0, 3.0);
        history.push(13, 6.0, 5.0);
        let curves = history.curves();
        assert_eq!(curves.step, vec![11, 13]);
        assert_eq!(curves.loss_d, vec![Some(2.0), Some(5.0)]);
        assert_eq!(curves.loss_g, vec![Some(1.0), Some(4.0)]);
    }
}
