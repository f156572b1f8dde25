//! The article's loss balancing: a network that is far ahead sits the step out.

/// Which networks a step trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPlan {
    pub train_d: bool,
    pub train_g: bool,
}

/// Decides the step's plan from the cluster-wide mean losses.
///
/// With `ratio` 1.35 (the article's): if `loss_g * ratio < loss_d` the generator is winning and
/// skips the step; if `loss_d * ratio < loss_g` the discriminator skips. Both can never skip
/// because `ratio >= 1` is enforced by the spec.
// The negated comparisons are the article's rule as written: a NaN loss compares false, so
// neither network is skipped on its account (non-finite losses are handled upstream).
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub fn decide_balance(loss_d: f64, loss_g: f64, ratio: f64) -> StepPlan {
    StepPlan {
        train_g: !(loss_g * ratio < loss_d),
        train_d: !(loss_d * ratio < loss_g),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_train_when_close() {
        assert_eq!(
            decide_balance(0.7, 0.8, 1.35),
            StepPlan {
                train_d: true,
                train_g: true
            }
        );
    }

    #[test]
    fn generator_far_ahead_skips_generator() {
        // 0.5 * 1.35 = 0.675 < 0.7
        assert_eq!(
            decide_balance(0.7, 0.5, 1.35),
            StepPlan {
                train_d: true,
                train_g: false
            }
        );
    }

    #[test]
    fn discriminator_far_ahead_skips_discriminator() {
        assert_eq!(
            decide_balance(0.3, 1.2, 1.35),
            StepPlan {
                train_d: false,
                train_g: true
            }
        );
    }

    #[test]
    fn exact_ratio_trains_both() {
        // The article uses a strict comparison: equality is not "far ahead".
        assert_eq!(
            decide_balance(1.35, 1.0, 1.35),
            StepPlan {
                train_d: true,
                train_g: true
            }
        );
        assert_eq!(
            decide_balance(1.0, 1.35, 1.35),
            StepPlan {
                train_d: true,
                train_g: true
            }
        );
    }
}
