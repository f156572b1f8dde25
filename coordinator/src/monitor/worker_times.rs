//! How long each worker took in a step: per phase, from the coordinator's request to the
//! worker's last answer (its losses, or the final chunk of its gradient), summed over the
//! phases. That is the worker's compute and upload time as the coordinator sees it; the slowest
//! worker's sets the pace of the step.

use std::collections::HashMap;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct WorkerTimes {
    /// The current phase's latest answer per worker.
    phase: HashMap<u64, Duration>,
    /// The phases so far of the current step, summed.
    step: HashMap<u64, Duration>,
}

impl WorkerTimes {
    /// A worker answered `since_request` after the phase's request went out; a later answer in
    /// the same phase (a further gradient chunk) replaces an earlier one.
    pub fn answered(&mut self, worker: u64, since_request: Duration) {
        let latest = self.phase.entry(worker).or_default();
        *latest = (*latest).max(since_request);
    }

    /// The phase is over: its answers count toward the step.
    pub fn end_phase(&mut self) {
        for (worker, time) in self.phase.drain() {
            *self.step.entry(worker).or_default() += time;
        }
    }

    /// The step is over (or was undone): each worker's time in it, and a clean slate.
    pub fn end_step(&mut self) -> HashMap<u64, Duration> {
        self.end_phase();
        std::mem::take(&mut self.step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_sums_each_phases_last_answer() {
        let ms = Duration::from_millis;
        let mut times = WorkerTimes::default();
        times.answered(1, ms(10));
        times.answered(2, ms(30));
        times.end_phase();
        // Chunks: the last one counts.
        times.answered(1, ms(5));
        times.answered(1, ms(50));
        times.answered(2, ms(20));
        let step = times.end_step();
        assert_eq!(step[&1], ms(60));
        assert_eq!(step[&2], ms(50));
        assert!(times.end_step().is_empty());
    }
}
