//! Steps/s and images/s over a recent window: the last [`WINDOW_STEPS`] steps, fewer if they
//! span more than [`WINDOW_SECS`] of step time, so a rate follows a change of speed (a
//! worker joining or leaving) within about a minute whether steps are fast or slow.
//!
//! The time is the steps' own `seconds` as the trainer reports them: time between steps that
//! the trainer does not count into a step (waiting for workers, say) is not in the rates.

use std::collections::VecDeque;

/// The most recent steps the rates look at.
pub(crate) const WINDOW_STEPS: usize = 50;
/// The step time the window need not exceed.
pub(crate) const WINDOW_SECS: f64 = 60.0;

#[derive(Debug, Clone, Copy)]
struct Sample {
    images: u64,
    seconds: f64,
}

#[derive(Debug, Default)]
pub(crate) struct RateWindow {
    recent: VecDeque<Sample>,
}

/// The window's rates, when it has any time in it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Rates {
    pub(crate) steps_per_sec: f64,
    pub(crate) images_per_sec: f64,
}

impl RateWindow {
    /// Adds a step that took `seconds` and processed `images`. A duration that is negative or
    /// not finite counts as zero rather than poisoning the sums.
    pub(crate) fn push(&mut self, images: u64, seconds: f64) {
        let seconds = if seconds.is_finite() && seconds > 0.0 {
            seconds
        } else {
            0.0
        };
        self.recent.push_back(Sample { images, seconds });
        if self.recent.len() > WINDOW_STEPS {
            self.recent.pop_front();
        }
        // Drop the oldest step while the newer ones alone still cover the time window. The
        // window is at most WINDOW_STEPS long, so summing it afresh is O(1) and exact.
        let mut total: f64 = self.recent.iter().map(|s| s.seconds).sum();
        while self.recent.len() > 1 && total - self.recent[0].seconds >= WINDOW_SECS {
            total -= self.recent[0].seconds;
            self.recent.pop_front();
        }
    }

    pub(crate) fn rates(&self) -> Option<Rates> {
        let seconds: f64 = self.recent.iter().map(|s| s.seconds).sum();
        let images: u64 = self.recent.iter().map(|s| s.images).sum();
        (seconds > 0.0).then(|| Rates {
            steps_per_sec: self.recent.len() as f64 / seconds,
            images_per_sec: images as f64 / seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn status_rates_are_none_until_time_passes() {
        let mut window = RateWindow::default();
        assert_eq!(window.rates(), None);
        window.push(64, 0.0);
        assert_eq!(window.rates(), None);
        window.push(64, f64::NAN);
        assert_eq!(window.rates(), None);
    }

    #[test]
    fn status_rates_use_the_last_50_steps() {
        let mut window = RateWindow::default();
        // 100 slow steps, then 50 fast ones: only the fast ones count.
        for _ in 0..100 {
            window.push(10, 1.0);
        }
        for _ in 0..WINDOW_STEPS {
            window.push(256, 0.25);
        }
        let rates = window.rates().expect("rates");
        assert!(close(rates.steps_per_sec, 4.0), "{rates:?}");
        assert!(close(rates.images_per_sec, 1024.0), "{rates:?}");
    }

    #[test]
    fn status_rates_use_the_last_minute_of_slow_steps() {
        let mut window = RateWindow::default();
        for _ in 0..40 {
            window.push(1, 1.0);
        }
        // Steps of 10 s: after 6 of them the minute holds nothing else.
        for _ in 0..6 {
            window.push(100, 10.0);
        }
        let rates = window.rates().expect("rates");
        assert!(close(rates.steps_per_sec, 0.1), "{rates:?}");
        assert!(close(rates.images_per_sec, 10.0), "{rates:?}");
        // One step longer than the window still gives a rate.
        window.push(50, 500.0);
        let rates = window.rates().expect("rates");
        assert!(close(rates.steps_per_sec, 1.0 / 500.0), "{rates:?}");
        assert!(close(rates.images_per_sec, 0.1), "{rates:?}");
    }
}
