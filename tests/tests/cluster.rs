//! End to end: a coordinator and two real worker processes on loopback train on a slice of
//! the shared faces. Checks the run directory, replica agreement (the coordinator verifies
//! parameter checksums every step) and bit-exact resume.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use forger_common::checkpoint;
use forger_tests::{TestCoordinator, binary, metric_lines, shared_faces, small_spec};

const RUN_LIMIT: Duration = Duration::from_secs(600);

async fn train(run_dir: &Path, steps: u64, resume: bool) -> u64 {
    let spec = small_spec(&shared_faces(), steps, 2);
    let coordinator = TestCoordinator::start(spec, run_dir, resume, Some(2)).await;
    let summary = coordinator.finish(RUN_LIMIT).await.expect("the run succeeds");
    assert!(!summary.interrupted);
    summary.step
}

/// Metrics without the wall-clock time, which is the one field allowed to differ.
fn metrics_without_time(run_dir: &Path) -> Vec<serde_json::Value> {
    metric_lines(run_dir)
        .into_iter()
        .map(|mut line| {
            line.as_object_mut().unwrap().remove("seconds");
            line
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_train_checkpoint_and_resume_bit_exactly() {
    let straight = tempfile::tempdir().unwrap();
    let split = tempfile::tempdir().unwrap();

    assert_eq!(train(straight.path(), 20, false).await, 20);

    // The run directory holds what a user opens.
    let checkpoints: Vec<u64> = checkpoint::list(&straight.path().join("checkpoints"))
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(checkpoints, vec![5, 10, 15, 20]);
    for step in [5, 10, 15, 20] {
        let grid =
            image::open(straight.path().join(format!("samples/step-{step:08}.png"))).expect("sample grid decodes");
        // 16 samples of 40 px in a 4x4 grid with 2 px gaps.
        assert_eq!((grid.width(), grid.height()), (4 * 40 + 5 * 2, 4 * 40 + 5 * 2));
    }
    assert!(straight.path().join("spec.toml").is_file());
    let metrics = metric_lines(straight.path());
    let steps: Vec<u64> = metrics.iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=20).collect::<Vec<_>>());
    for m in &metrics {
        for key in ["loss_d", "loss_g", "loss_d_real", "loss_d_fake"] {
            let v = m[key].as_f64().unwrap();
            assert!(v.is_finite() && v > 0.0, "{key} = {v}");
        }
        assert!(m["train_d"].is_boolean() && m["train_g"].is_boolean());
        assert_eq!(m["workers"], 2);
        assert_eq!(m["images"], 16);
    }
    // Training moved the discriminator: its loss on real images fell from the start.
    let first = metrics[0]["loss_d_real"].as_f64().unwrap();
    let last = metrics[19]["loss_d_real"].as_f64().unwrap();
    assert!(last < first, "loss_d_real {first} -> {last}");

    // 10 steps, stop, resume with steps raised to 20: the same tensors, bit for bit.
    assert_eq!(train(split.path(), 10, false).await, 10);
    assert_eq!(train(split.path(), 20, true).await, 20);
    let a = checkpoint::load(&straight.path().join("checkpoints/step-00000020.safetensors")).unwrap();
    let b = checkpoint::load(&split.path().join("checkpoints/step-00000020.safetensors")).unwrap();
    assert!(
        a.state.discriminator == b.state.discriminator,
        "discriminator and its optimizer state match"
    );
    assert!(
        a.state.generator == b.state.generator,
        "generator and its optimizer state match"
    );
    assert_eq!(a.state.batch_norm, b.state.batch_norm);
    assert_eq!(a.state.samplers, b.state.samplers);
    assert_eq!(
        metrics_without_time(straight.path()),
        metrics_without_time(split.path())
    );

    // A finished run refuses to be overwritten without --resume.
    let spec = small_spec(&shared_faces(), 20, 2);
    let refused = TestCoordinator::start(spec, straight.path(), false, Some(2)).await;
    let err = refused.finish(RUN_LIMIT).await.unwrap_err().to_string();
    assert!(err.contains("already holds checkpoints"), "{err}");

    // The generate command draws faces from the final checkpoint.
    let out = straight.path().join("generated.png");
    let status = Command::new(binary("forger-worker"))
        .args([
            "generate",
            "--count",
            "9",
            "--seed",
            "3",
            "--device",
            "cpu",
            "--checkpoint",
        ])
        .arg(straight.path().join("checkpoints/step-00000020.safetensors"))
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let grid = image::open(&out).unwrap();
    assert_eq!((grid.width(), grid.height()), (3 * 40 + 4 * 2, 3 * 40 + 4 * 2));
}
