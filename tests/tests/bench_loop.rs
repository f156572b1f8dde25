//! The single-process loop of `forger-worker bench` is the cluster's loop without the network:
//! it must end a run with exactly the state a two-worker cluster reaches, or its speed would
//! not be a fair baseline.

use std::process::Command;
use std::time::Duration;

use forger_common::checkpoint::{self, TrainingState};
use forger_common::compression::GradientCompression;
use forger_tests::{TestCoordinator, binary, shared_faces, small_spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_single_process_loop_ends_where_the_cluster_ends() {
    // With dropout every phase recomputes its forward pass; without, the evaluation's pass is
    // kept for both updates: both paths must agree with the cluster.
    for dropout in [0.5, 0.0] {
        let mut spec = small_spec(&shared_faces(), 6, 2);
        spec.model.dropout = dropout;
        single_process_equals_cluster(spec).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_bf16_gradients_the_loop_and_the_cluster_round_alike() {
    // The workers' error feedback and the coordinator's bf16 decoding must give the bits the
    // single-process loop computes, and the rounding must change the result, a little.
    let mut spec = small_spec(&shared_faces(), 6, 2);
    spec.model.dropout = 0.0;
    let exact = single_process_equals_cluster(spec.clone()).await;
    spec.cluster.gradient_compression = GradientCompression::Bf16;
    let rounded = single_process_equals_cluster(spec).await;
    let largest_difference = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    for (net, a, b) in [
        ("D", &exact.discriminator.params, &rounded.discriminator.params),
        ("G", &exact.generator.params, &rounded.generator.params),
    ] {
        let difference = largest_difference(a, b);
        assert!(difference > 0.0, "{net}: bf16 gradients changed nothing");
        // Six RMSProp steps of at most 2e-4 each: rounding moves them by far less.
        assert!(
            difference < 2e-4,
            "{net}: bf16 gradients moved a parameter by {difference}"
        );
    }
}

/// Runs `spec` both ways, checks the final states are equal and returns the cluster's.
async fn single_process_equals_cluster(spec: forger_common::spec::JobSpec) -> TrainingState {
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("spec.toml");
    std::fs::write(&spec_path, spec.to_toml()).unwrap();
    let single = dir.path().join("single.safetensors");
    let output = Command::new(binary("forger-worker"))
        .args(["bench", "--steps", "6", "--threads", "1", "--device", "cpu", "--spec"])
        .arg(&spec_path)
        .arg("--out")
        .arg(&single)
        .output()
        .expect("run forger-worker bench");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON line");
    assert_eq!(
        (report["steps"].as_u64(), report["images"].as_u64()),
        (Some(6), Some(6 * 2 * 8))
    );
    assert!(report["images_per_second"].as_f64().unwrap() > 0.0);

    let run = dir.path().join("run");
    let coordinator = TestCoordinator::start(spec, &run, false, Some(2)).await;
    coordinator
        .finish(Duration::from_secs(300))
        .await
        .expect("the cluster run succeeds");
    let cluster = checkpoint::load(&run.join("checkpoints").join(checkpoint::file_name(6)))
        .unwrap()
        .state;
    let single = checkpoint::load(&single).unwrap().state;
    assert_eq!(single.step, 6);
    assert!(single.discriminator == cluster.discriminator, "D and its RMSProp state");
    assert!(single.generator == cluster.generator, "G and its RMSProp state");
    assert_eq!(single.batch_norm, cluster.batch_norm);
    assert_eq!(single.samplers, cluster.samplers);
    cluster
}
