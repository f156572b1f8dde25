//! The single-process loop of `forger-worker bench` is the cluster's loop without the network:
//! it must end a run with exactly the state a two-worker cluster reaches, or its speed would
//! not be a fair baseline.

use std::process::Command;
use std::time::Duration;

use forger_common::checkpoint;
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

async fn single_process_equals_cluster(spec: forger_common::spec::JobSpec) {
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
}
