//! Faults with real processes on loopback: workers killed at chosen points of a step, workers
//! joining and leaving mid-run, the coordinator killed with SIGKILL (also between writing a
//! checkpoint and renaming it) and resumed, a damaged checkpoint.
//!
//! Every shard's batch, noise and dropout depend only on the step and the shard, and a step
//! that loses a worker is undone and retried, so each disturbed run must end with exactly the
//! parameters, optimizer state and per-step losses of an undisturbed run of the same spec.

use std::path::{Path, PathBuf};
use std::time::Duration;

use forger_common::checkpoint;
use forger_common::compression::GradientCompression;
use forger_tests::processes::{Process, free_local_address, latest_step, wait_for_step};
use forger_tests::reference::{Reference, events, fault_spec};
use forger_tests::{TestCoordinator, metric_lines};
use tokio::sync::OnceCell;

const STEPS: u64 = 30;
const LIMIT: Duration = Duration::from_secs(300);

/// The undisturbed run, computed once for every test in this file.
async fn reference() -> &'static Reference {
    static REFERENCE: OnceCell<Reference> = OnceCell::const_new();
    REFERENCE
        .get_or_init(|| Reference::compute(fault_spec(STEPS), LIMIT))
        .await
}

fn assert_same_training(run_dir: &Path, reference: &Reference) {
    reference.assert_matched_by(run_dir);
}

/// The first step from `from` on whose plan satisfies `wanted`.
fn step_where(reference: &Reference, from: u64, wanted: impl Fn(&serde_json::Value) -> bool) -> u64 {
    reference
        .metrics
        .iter()
        .find(|m| m["step"].as_u64().unwrap() >= from && wanted(m))
        .expect("such a step exists in the reference run")["step"]
        .as_u64()
        .unwrap()
}

/// Three workers, the third crashing itself at fail point `point` of `step`; the run must
/// finish with the other two and match the reference.
async fn kill_one_worker_at(point: &str, step: u64) {
    let reference = reference().await;
    let run = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let coordinator = TestCoordinator::start(fault_spec(STEPS), run.path(), false, None).await;
    let url = coordinator.url();
    let mut a = Process::worker("a", &url, logs.path(), None);
    let mut b = Process::worker("b", &url, logs.path(), None);
    let mut doomed = Process::worker("doomed", &url, logs.path(), Some(&format!("{point}=return({step})")));
    let summary = coordinator
        .finish(LIMIT)
        .await
        .expect("the run finishes without the lost worker");
    assert!(!doomed.wait(LIMIT).success(), "the worker crashed itself");
    assert!(
        doomed
            .log_text()
            .contains(&format!("fail point {point} at step {step}"))
    );
    assert_eq!((summary.step, summary.evictions, summary.retries), (STEPS, 1, 1));
    for worker in [&mut a, &mut b] {
        assert!(worker.wait(LIMIT).success(), "{}", worker.log_text());
    }
    let evicted = events(run.path(), "evicted");
    assert_eq!(evicted.len(), 1, "{evicted:?}");
    assert_eq!(evicted[0]["step"], step);
    let finished = events(run.path(), "finished");
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(
        (finished[0]["step"].as_u64(), finished[0]["workers_dismissed"].as_u64()),
        (Some(STEPS), Some(2))
    );
    let metrics = metric_lines(run.path());
    let at = &metrics[step as usize - 1];
    assert_eq!((at["attempts"].as_u64(), at["workers"].as_u64()), (Some(2), Some(2)));
    assert_same_training(run.path(), reference);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_during_its_discriminator_upload_is_evicted_and_the_step_retried() {
    let reference = reference().await;
    let step = step_where(reference, 6, |m| m["train_d"] == true);
    let d_len = forger_common::layout::discriminator_layout(&fault_spec(1).model, 40).numel();
    assert!(d_len > forger_common::wire::CHUNK_VALUES, "D travels in several chunks");
    kill_one_worker_at("worker-d-upload", step).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_waiting_for_the_plan_is_evicted_and_the_step_retried() {
    kill_one_worker_at("worker-after-losses", 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_in_the_generator_phase_is_evicted_and_the_step_retried() {
    let reference = reference().await;
    let step = step_where(reference, 8, |m| m["train_g"] == true && m["train_d"] == true);
    kill_one_worker_at("worker-g-phase", step).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_scales_from_one_worker_to_three_and_back_to_one() {
    let reference = reference().await;
    let run = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let coordinator = TestCoordinator::start(fault_spec(STEPS), run.path(), false, None).await;
    let url = coordinator.url();
    let mut first = Process::worker("first", &url, logs.path(), None);
    wait_for_step(run.path(), 4, LIMIT).await;
    let mut leaver = Process::worker("leaver", &url, logs.path(), None);
    let mut killed = Process::worker("killed", &url, logs.path(), None);
    // Both newcomers are admitted at step boundaries and hold a shard each.
    let deadline = std::time::Instant::now() + LIMIT;
    while events(run.path(), "joined").len() < 3 {
        assert!(std::time::Instant::now() < deadline, "the newcomers were not admitted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let joined_at = latest_step(run.path());
    wait_for_step(run.path(), joined_at + 3, LIMIT).await;
    // One leaves as a scheduler would stop it, the other dies.
    leaver.terminate();
    killed.kill();
    assert!(leaver.wait(LIMIT).success(), "a worker asked to stop leaves cleanly");
    let summary = coordinator.finish(LIMIT).await.expect("the run finishes on one worker");
    assert!(first.wait(LIMIT).success());
    assert_eq!((summary.step, summary.joins, summary.evictions), (STEPS, 2, 1));
    assert_eq!(events(run.path(), "left").len(), 1);
    let workers: Vec<u64> = metric_lines(run.path())
        .iter()
        .map(|m| m["workers"].as_u64().unwrap())
        .collect();
    assert_eq!((workers[0], workers[STEPS as usize - 1]), (1, 1));
    assert!(workers.contains(&3), "three workers trained together: {workers:?}");
    assert_same_training(run.path(), reference);
}

/// A coordinator process (with `fail_points`, if any) on a fixed loopback address, so that a
/// restarted one is found by the same workers, and three worker processes.
struct Cluster {
    spec: PathBuf,
    run: PathBuf,
    address: String,
    coordinator: Process,
    workers: Vec<Process>,
}

impl Cluster {
    fn start(dir: &Path, fail_points: Option<&str>) -> Cluster {
        let spec = dir.join("spec.toml");
        std::fs::write(&spec, fault_spec(STEPS).to_toml()).unwrap();
        let run = dir.join("run");
        let address = free_local_address();
        let url = format!("http://{address}");
        let coordinator = Process::coordinator("coordinator-1", &spec, &run, &address, false, dir, fail_points);
        let workers = (0..3)
            .map(|i| Process::worker(&format!("worker-{i}"), &url, dir, None))
            .collect();
        Cluster {
            spec,
            run,
            address,
            coordinator,
            workers,
        }
    }
}

fn checkpoint_steps(run_dir: &Path) -> Vec<u64> {
    checkpoint::list(&run_dir.join("checkpoints"))
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_of_the_coordinator_a_resume_continues_and_the_workers_come_back_by_themselves() {
    let reference = reference().await;
    let dir = tempfile::tempdir().unwrap();
    let Cluster {
        spec,
        run,
        address,
        mut coordinator,
        mut workers,
    } = Cluster::start(dir.path(), None);
    wait_for_step(&run, 12, LIMIT).await;
    coordinator.kill();
    let newest = *checkpoint_steps(&run).last().expect("a checkpoint was written");
    assert!(newest >= 10);

    let mut resumed = Process::coordinator("coordinator-2", &spec, &run, &address, true, dir.path(), None);
    assert!(resumed.wait(LIMIT).success(), "{}", resumed.log_text());
    for worker in &mut workers {
        assert!(worker.wait(LIMIT).success(), "{}", worker.log_text());
        assert!(
            worker.log_text().contains("lost the coordinator"),
            "the worker reconnected"
        );
    }
    let resumes = events(&run, "resumed-from-checkpoint");
    assert_eq!(resumes.len(), 1);
    assert_eq!(
        resumes[0]["step"], newest,
        "at most the steps since the checkpoint are redone"
    );
    assert_same_training(&run, reference);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_a_checkpoint_s_rename_and_a_damaged_checkpoint_lose_nothing_else() {
    let reference = reference().await;
    let dir = tempfile::tempdir().unwrap();
    let Cluster {
        spec,
        run,
        address,
        mut coordinator,
        mut workers,
    } = Cluster::start(dir.path(), Some("checkpoint-before-rename=return(15)"));
    assert!(
        !coordinator.wait(LIMIT).success(),
        "the coordinator crashed at the fail point"
    );
    assert_eq!(
        checkpoint_steps(&run),
        vec![5, 10],
        "the step-15 checkpoint never got its name"
    );
    let temporary = run
        .join("checkpoints")
        .join(format!(".{}.tmp", checkpoint::file_name(15)));
    assert!(temporary.is_file(), "the crash left the written temporary behind");
    // Damage the newest checkpoint too: resume must notice and fall back to step 5.
    let newest = run.join("checkpoints").join(checkpoint::file_name(10));
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();

    let mut resumed = Process::coordinator("coordinator-2", &spec, &run, &address, true, dir.path(), None);
    assert!(resumed.wait(LIMIT).success(), "{}", resumed.log_text());
    let log = resumed.log_text();
    assert!(
        log.contains("skipping unreadable checkpoint") && log.contains(&checkpoint::file_name(10)),
        "the damaged checkpoint is named in a warning:\n{log}"
    );
    for worker in &mut workers {
        assert!(worker.wait(LIMIT).success(), "{}", worker.log_text());
    }
    assert_eq!(events(&run, "resumed-from-checkpoint")[0]["step"], 5);
    assert!(
        !temporary.exists(),
        "the rewritten checkpoint replaced the stale temporary"
    );
    assert_same_training(&run, reference);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_is_evicted_by_its_silence_and_rejoins_when_thawed() {
    let reference = reference().await;
    let run = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let coordinator = TestCoordinator::start(fault_spec(STEPS), run.path(), false, None).await;
    let url = coordinator.url();
    let mut workers: Vec<Process> = (0..3)
        .map(|i| Process::worker(&format!("worker-{i}"), &url, logs.path(), None))
        .collect();
    wait_for_step(run.path(), 6, LIMIT).await;
    let signal = |name: &str, pid: u32| {
        let status = std::process::Command::new("kill")
            .args([name, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let frozen_at = std::time::Instant::now();
    signal("-STOP", workers[2].pid());
    let deadline = frozen_at + LIMIT;
    while events(run.path(), "evicted").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the frozen worker was never evicted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let detected = frozen_at.elapsed();
    // Heartbeat timeout 3 s: found within seconds, though the step timeout is a minute.
    assert!(detected < Duration::from_secs(10), "evicted after {detected:?}");
    signal("-CONT", workers[2].pid());
    let summary = coordinator.finish(LIMIT).await.expect("the run finishes");
    for worker in &mut workers {
        assert!(worker.wait(LIMIT).success(), "{}", worker.log_text());
    }
    assert!(
        workers[2].log_text().contains("joining again"),
        "{}",
        workers[2].log_text()
    );
    assert_eq!((summary.step, summary.evictions), (STEPS, 1));
    assert!(
        events(run.path(), "evicted")[0]["reason"]
            .as_str()
            .unwrap()
            .contains("heartbeat")
    );
    assert_same_training(run.path(), reference);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_bf16_gradients_a_lost_worker_costs_only_its_shards_residuals() {
    // The error-feedback residuals live in the workers, not in checkpoints: a shard that moves
    // to a survivor starts there from zero. Up to the loss the run is the undisturbed one bit
    // for bit; after it, the result differs by a dropped residual: about as much as bf16
    // rounding itself changes against f32 (both under 2e-7 when this was written).
    let mut spec = fault_spec(STEPS);
    spec.cluster.gradient_compression = GradientCompression::Bf16;
    let undisturbed = Reference::compute(spec.clone(), LIMIT).await;
    let exact = reference().await;
    let step = 7;
    let run = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let coordinator = TestCoordinator::start(spec, run.path(), false, None).await;
    let url = coordinator.url();
    let mut survivors = [
        Process::worker("a", &url, logs.path(), None),
        Process::worker("b", &url, logs.path(), None),
    ];
    let mut doomed = Process::worker(
        "doomed",
        &url,
        logs.path(),
        Some(&format!("worker-after-losses=return({step})")),
    );
    let summary = coordinator
        .finish(LIMIT)
        .await
        .expect("the run finishes without the lost worker");
    assert!(!doomed.wait(LIMIT).success(), "the worker crashed itself");
    assert_eq!((summary.step, summary.evictions, summary.retries), (STEPS, 1, 1));
    for worker in &mut survivors {
        assert!(worker.wait(LIMIT).success(), "{}", worker.log_text());
    }
    let metrics = metric_lines(run.path());
    for (line, expected) in metrics.iter().zip(&undisturbed.metrics).take(step as usize) {
        // The loss is measured before step 7's gradients, so step 7's losses still agree.
        for key in ["loss_d", "loss_g", "train_d", "train_g"] {
            assert_eq!(line[key], expected[key], "step {}: {key}", line["step"]);
        }
    }
    let last = checkpoint::load(&run.path().join("checkpoints").join(checkpoint::file_name(STEPS)))
        .unwrap()
        .state;
    let largest_difference = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    for (net, disturbed, rounded, f32_run) in [
        (
            "D",
            &last.discriminator.params,
            &undisturbed.last.discriminator.params,
            &exact.last.discriminator.params,
        ),
        (
            "G",
            &last.generator.params,
            &undisturbed.last.generator.params,
            &exact.last.generator.params,
        ),
    ] {
        assert!(disturbed.iter().all(|v| v.is_finite()), "{net}: parameters stay finite");
        let lost = largest_difference(disturbed, rounded);
        let rounding = largest_difference(f32_run, rounded);
        eprintln!("{net}: dropped residual moved parameters by {lost}, bf16 against f32 by {rounding}");
        assert!(
            lost > 0.0,
            "{net}: the moved shard's residual was dropped, so something differs"
        );
        assert!(lost < 1e-5, "{net}: a dropped residual moved a parameter by {lost}");
    }
}
