//! Undisturbed reference runs, and the check that a disturbed run of the same spec trained
//! exactly the same: every shard's batch, noise and dropout depend only on the step and the
//! shard, and a step that loses a worker is undone and retried, so faults may cost time but
//! never change a bit of the result.

use std::path::Path;
use std::time::Duration;

use forger_common::checkpoint::{self, TrainingState};
use forger_common::spec::JobSpec;

use crate::{TestCoordinator, metric_lines, shared_faces, small_spec};

/// Three shards on a slice of the faces. D is large enough that its gradient travels in two
/// chunks, so "during the upload" is a real moment; the heartbeat timeout is short so that a
/// hung worker costs seconds.
pub fn fault_spec(steps: u64) -> JobSpec {
    let mut spec = small_spec(&shared_faces(), steps, 3);
    spec.model.d_filters = vec![128, 64, 32];
    spec.train.seed = 11;
    let cluster = &mut spec.cluster;
    cluster.min_workers = 1;
    cluster.start_grace_secs = 2;
    cluster.heartbeat_timeout_secs = 3;
    spec.checkpoint.samples = 4;
    assert!(spec.validate().is_empty(), "the fault spec is valid");
    spec
}

/// What an undisturbed run produced.
#[derive(Debug)]
pub struct Reference {
    pub steps: u64,
    pub metrics: Vec<serde_json::Value>,
    pub last: TrainingState,
}

impl Reference {
    /// Trains `spec` with one local worker per shard and nothing going wrong.
    pub async fn compute(spec: JobSpec, limit: Duration) -> Reference {
        let run = tempfile::tempdir().unwrap();
        let steps = spec.train.steps;
        let shards = spec.cluster.workers as usize;
        let coordinator = TestCoordinator::start(spec, run.path(), false, Some(shards)).await;
        let summary = coordinator.finish(limit).await.expect("the reference run succeeds");
        assert_eq!((summary.step, summary.evictions), (steps, 0));
        Reference {
            steps,
            metrics: metric_lines(run.path()),
            last: final_state(run.path(), steps),
        }
    }

    /// The run logged every step exactly once, with the reference's losses and plans, and
    /// ended with the reference's state, bit for bit.
    pub fn assert_matched_by(&self, run_dir: &Path) {
        let metrics = metric_lines(run_dir);
        let steps: Vec<u64> = metrics.iter().map(|m| m["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, (1..=self.steps).collect::<Vec<_>>(), "each step once, in order");
        for (line, expected) in metrics.iter().zip(&self.metrics) {
            for key in [
                "loss_d",
                "loss_g",
                "loss_d_real",
                "loss_d_fake",
                "train_d",
                "train_g",
                "images",
            ] {
                assert_eq!(line[key], expected[key], "step {}: {key}", line["step"]);
            }
        }
        let last = final_state(run_dir, self.steps);
        let expected = &self.last;
        assert!(
            last.discriminator.params == expected.discriminator.params,
            "D parameters"
        );
        assert!(
            last.discriminator.mean_square == expected.discriminator.mean_square,
            "D RMSProp state"
        );
        assert!(last.generator.params == expected.generator.params, "G parameters");
        assert!(
            last.generator.mean_square == expected.generator.mean_square,
            "G RMSProp state"
        );
        assert_eq!(last.batch_norm, expected.batch_norm, "batch-norm statistics");
        assert_eq!(last.samplers, expected.samplers, "sampler positions");
    }
}

fn final_state(run_dir: &Path, step: u64) -> TrainingState {
    let path = run_dir.join("checkpoints").join(checkpoint::file_name(step));
    checkpoint::load(&path).expect("the final checkpoint loads").state
}

/// The lines of the run's `events.jsonl` of one kind.
pub fn events(run_dir: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("each event line is JSON"))
        .filter(|e| e["event"] == kind)
        .collect()
}
