//! A real worker process running two replicas (`forger-worker --devices cpu,cpu`) beside an
//! ordinary one, on a job of three shards: it holds two shards, computes them in parallel, and
//! sends one summed gradient per phase, so the coordinator takes two uploads per phase instead
//! of three. The result matches three ordinary workers' to rounding, not bit for bit: the
//! local sum changes the order of the additions.

use std::path::Path;
use std::time::Duration;

use forger_common::checkpoint::{self, TrainingState};
use forger_common::spec::JobSpec;
use forger_tests::processes::Process;
use forger_tests::reference::events;
use forger_tests::{TestCoordinator, metric_lines, shared_faces, small_spec};

const STEPS: u64 = 6;
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// Three shards, dropout on (replicas draw their masks in turn), a checkpoint at the end only,
/// and no start before all three replicas are there.
fn spec() -> JobSpec {
    let mut spec = small_spec(&shared_faces(), STEPS, 3);
    spec.cluster.min_workers = 3;
    spec.checkpoint.every = STEPS;
    spec
}

fn final_state(run_dir: &Path) -> TrainingState {
    let path = run_dir.join("checkpoints").join(checkpoint::file_name(STEPS));
    checkpoint::load(&path).expect("the final checkpoint loads").state
}

fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_of_two_replicas_holds_two_shards_and_sends_one_gradient_per_phase() {
    let differences = compare_with_ordinary_workers(spec()).await;
    // Six RMSProp steps move a parameter by up to about 1e-3; rounding moves it by far less
    // (here about 1e-8), and the losses by a relative 1e-8 or so.
    assert!(differences.loss < 1e-6, "{differences:?}");
    assert!(differences.d < 1e-6 && differences.g < 1e-6, "{differences:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_bf16_gradients_a_group_keeps_its_own_error_feedback() {
    // The group's sum is rounded to bf16, not each shard's gradient, so the rounding differs
    // from three ordinary workers'; error feedback keeps it from adding up.
    let mut spec = spec();
    spec.cluster.gradient_compression = forger_common::compression::GradientCompression::Bf16;
    let differences = compare_with_ordinary_workers(spec).await;
    // Here about 1e-7 in both.
    assert!(differences.loss < 1e-5, "{differences:?}");
    assert!(differences.d < 2e-6 && differences.g < 2e-6, "{differences:?}");
}

/// How far a run with a two-replica worker ended from three ordinary workers'.
#[derive(Debug)]
struct Differences {
    /// The largest relative difference of a step's loss.
    loss: f64,
    /// The largest difference of a final parameter.
    d: f32,
    g: f32,
}

/// Runs `spec` with three ordinary workers and again with a two-replica worker beside an
/// ordinary one, checks what the second run must show (who held what, two uploads a phase,
/// the same plans, the same first losses) and returns how far apart the two ended.
async fn compare_with_ordinary_workers(spec: JobSpec) -> Differences {
    // Three ordinary workers, one thread each.
    let ordinary = tempfile::tempdir().unwrap();
    let coordinator = TestCoordinator::start(spec.clone(), ordinary.path(), false, Some(3)).await;
    let summary = coordinator.finish(RUN_LIMIT).await.expect("the ordinary run succeeds");
    assert_eq!(summary.step, STEPS);

    // One worker of two replicas (two threads: one each) and one ordinary worker.
    let grouped = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let coordinator = TestCoordinator::start(spec, grouped.path(), false, None).await;
    let url = coordinator.url();
    let mut pair = Process::worker_on(
        "two-replicas",
        &url,
        logs.path(),
        None,
        &["--devices", "cpu,cpu", "--threads", "2"],
    );
    // Which shards the pair sums decides the rounding: it joins first, so it takes shards 0
    // and 1 and every run of this test computes the same bits.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !pair.log_text().contains("joined") {
        assert!(std::time::Instant::now() < deadline, "{}", pair.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut single = Process::worker("one-replica", &url, logs.path(), None);
    let summary = coordinator
        .finish(RUN_LIMIT)
        .await
        .expect("the run with a two-replica worker succeeds");
    assert_eq!((summary.step, summary.evictions, summary.retries), (STEPS, 0, 0));
    for worker in [&mut pair, &mut single] {
        let status = worker.wait(Duration::from_secs(30));
        assert!(status.success(), "{} failed:\n{}", worker.name, worker.log_text());
    }
    assert!(
        pair.log_text().contains("replicas ready") && pair.log_text().contains("cpu,cpu"),
        "{}",
        pair.log_text()
    );

    let joined = events(grouped.path(), "joined");
    let shards_by_replicas: Vec<(u64, usize)> = joined
        .iter()
        .map(|e| (e["replicas"].as_u64().unwrap(), e["shards"].as_array().unwrap().len()))
        .collect();
    assert_eq!(shards_by_replicas.len(), 2, "{joined:?}");
    assert!(
        shards_by_replicas.contains(&(2, 2)),
        "the two-replica worker holds two shards: {joined:?}"
    );
    assert!(shards_by_replicas.contains(&(1, 1)), "{joined:?}");
    assert_eq!(joined[0]["shards"], serde_json::json!([0, 1]), "{joined:?}");

    let expected = metric_lines(ordinary.path());
    let got = metric_lines(grouped.path());
    assert_eq!(got.len() as u64, STEPS);
    let phases = |m: &serde_json::Value| u64::from(m["train_d"] == true) + u64::from(m["train_g"] == true);
    let mut loss = 0f64;
    for (line, reference) in got.iter().zip(&expected) {
        let step = &line["step"];
        assert_eq!(
            line["contributions"].as_u64(),
            Some(2 * phases(line)),
            "step {step}: two uploads a phase"
        );
        assert_eq!(
            reference["contributions"].as_u64(),
            Some(3 * phases(reference)),
            "step {step}"
        );
        assert_eq!((line["workers"].as_u64(), line["images"].as_u64()), (Some(2), Some(24)));
        assert_eq!(line["train_d"], reference["train_d"], "step {step}: the same plan");
        assert_eq!(line["train_g"], reference["train_g"], "step {step}: the same plan");
        for key in ["loss_d", "loss_g", "loss_d_real", "loss_d_fake"] {
            let (a, b) = (line[key].as_f64().unwrap(), reference[key].as_f64().unwrap());
            loss = loss.max((a - b).abs() / b.abs());
        }
    }
    // Before any update the parameters are the same, and so is every shard's computation on
    // a replica's thread: the first losses agree exactly.
    for key in ["loss_d", "loss_g", "loss_d_real", "loss_d_fake"] {
        assert_eq!(got[0][key], expected[0][key], "step 1: {key}");
    }
    let (a, b) = (final_state(grouped.path()), final_state(ordinary.path()));
    assert_eq!(a.samplers, b.samplers);
    let differences = Differences {
        loss,
        d: largest_difference(&a.discriminator.params, &b.discriminator.params),
        g: largest_difference(&a.generator.params, &b.generator.params),
    };
    eprintln!("after {STEPS} steps: {differences:?}");
    differences
}
