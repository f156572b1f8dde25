//! The coordinator against fake workers that send known losses and gradients: exact
//! rank-order averages, TF1 RMSProp updates, balancing decisions, replica checks, refusals.

use std::path::Path;

use forger_common::balance::decide_balance;
use forger_common::checkpoint;
use forger_common::rmsprop::{RmsProp, initial_mean_square, update_moving_average};
use forger_common::spec::JobSpec;
use forger_common::wire;
use forger_proto::pb::{self, coordinator_message::Kind as In, worker_message::Kind as Out};
use forger_tests::fake_worker::FakeWorker;
use forger_tests::{TestCoordinator, metric_lines};
use std::time::Duration;

/// Twelve 8x8 images in a fresh folder.
fn tiny_dataset(dir: &Path) {
    for i in 0..12u8 {
        let img = image::RgbImage::from_pixel(8, 8, image::Rgb([i * 20, 255 - i * 20, 128]));
        img.save(dir.join(format!("img{i:02}.png"))).unwrap();
    }
}

fn tiny_spec(data: &Path, workers: u32, steps: u64) -> JobSpec {
    let text = format!(
        "version = 1\n[data]\npath = \"{}\"\nimage_size = 8\n[model]\nd_filters = [2, 3, 2]\ng_filters = [3, 2, 2]\n\
         [train]\nsteps = {steps}\nbatch_size = 2\ncheck_params_every = 1\n[cluster]\nworkers = {workers}\n\
         join_timeout_secs = 30\nstep_timeout_secs = 30\n[checkpoint]\nevery = 100\nsamples = 4\n",
        data.display()
    );
    JobSpec::parse(&text, "tiny").unwrap()
}

/// A coordinator in this process on the tiny dataset; the folders live as long as the guards.
async fn tiny_cluster(workers: u32, steps: u64) -> (tempfile::TempDir, tempfile::TempDir, TestCoordinator) {
    let data = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    tiny_dataset(data.path());
    let coordinator = TestCoordinator::start(tiny_spec(data.path(), workers, steps), run.path(), false, None).await;
    (data, run, coordinator)
}

/// The error a run ends with; the run must fail within 30 s.
async fn run_error(coordinator: TestCoordinator) -> String {
    coordinator
        .finish(Duration::from_secs(30))
        .await
        .expect_err("the run should fail")
        .to_string()
}

/// Deterministic, irregular values, so rounding depends on the order of summation.
fn pseudo_random(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 10f32.powi((state % 7) as i32 - 3)
        })
        .collect()
}

/// The rank-order weighted mean, written out independently of the coordinator's code.
fn rank_order_mean(parts: &[Vec<f32>], samples: &[u32]) -> Vec<f32> {
    let total: u32 = samples.iter().sum();
    let mut out = vec![0f32; parts[0].len()];
    for (part, &n) in parts.iter().zip(samples) {
        let w = (f64::from(n) / f64::from(total)) as f32;
        for (o, v) in out.iter_mut().zip(part) {
            *o += w * v;
        }
    }
    out
}

struct Replicas {
    d: Vec<f32>,
    g: Vec<f32>,
    bn: Vec<f32>,
}

async fn receive_initial(workers: &mut [FakeWorker]) -> Replicas {
    let mut first = None;
    for w in workers.iter_mut() {
        let (net_d, step_d, d, _) = w.recv_params().await;
        let (net_g, step_g, g, bn) = w.recv_params().await;
        assert_eq!(
            (net_d, net_g, step_d, step_g),
            (pb::Network::Discriminator, pb::Network::Generator, 0, 0)
        );
        assert_eq!((d.len(), g.len(), bn.len()), (w.d_len(), w.g_len(), w.bn_len()));
        match &first {
            None => first = Some(Replicas { d, g, bn }),
            Some(r) => assert!(
                r.d == d && r.g == g && r.bn == bn,
                "every worker starts from the same parameters"
            ),
        }
    }
    first.unwrap()
}

async fn evaluate(workers: &mut [FakeWorker], step: u64, sums: (f64, f64, f64), replicas: &Replicas) {
    let crc = wire::crc32_of(&[&replicas.d, &replicas.g, &replicas.bn]);
    for w in workers.iter_mut() {
        let In::Evaluate(e) = w.recv().await else {
            panic!("expected Evaluate")
        };
        assert_eq!(e.step, step);
        assert_eq!(e.batch.len(), 2);
        assert!(
            e.batch.iter().all(|i| w.shard.contains(i)),
            "batches come from the worker's own shard"
        );
        assert!(e.check_params);
        w.send(Out::Losses(pb::Losses {
            step,
            samples: 2,
            sum_d_real: sums.0,
            sum_d_fake: sums.1,
            sum_g: sums.2,
            params_crc32: Some(crc),
        }))
        .await;
    }
}

async fn expect_plan(workers: &mut [FakeWorker], step: u64) -> (bool, bool) {
    let mut plans = Vec::new();
    for w in workers.iter_mut() {
        let In::Plan(p) = w.recv().await else {
            panic!("expected Plan")
        };
        assert_eq!(p.step, step);
        plans.push((p.train_d, p.train_g));
    }
    assert!(
        plans.windows(2).all(|p| p[0] == p[1]),
        "every worker gets the same plan"
    );
    plans[0]
}

/// Uploads per-rank gradients for one phase and checks the broadcast against TF1 RMSProp
/// applied to the rank-order mean.
async fn phase(
    workers: &mut [FakeWorker],
    step: u64,
    phase: pb::Phase,
    params: &mut [f32],
    mean_square: &mut [f32],
    bn: &mut [f32],
    optimizer: RmsProp,
) {
    let len = params.len();
    let bn_len = bn.len();
    let grads: Vec<Vec<f32>> = (0..workers.len())
        .map(|r| pseudo_random(step * 100 + r as u64 + phase as u64 * 10, len))
        .collect();
    let stats: Vec<Vec<f32>> = (0..workers.len())
        .map(|r| {
            pseudo_random(step * 1000 + r as u64, bn_len)
                .iter()
                .map(|v| v.abs())
                .collect()
        })
        .collect();
    for (w, (g, s)) in workers.iter().zip(grads.iter().zip(&stats)) {
        w.upload(step, phase, g, 2, s.clone()).await;
    }
    let mean = rank_order_mean(&grads, &[2, 2, 2]);
    let reversed: Vec<Vec<f32>> = grads.iter().rev().cloned().collect();
    assert_ne!(
        mean,
        rank_order_mean(&reversed, &[2, 2, 2]),
        "the test values are order-sensitive"
    );
    optimizer.apply(params, mean_square, &mean);
    update_moving_average(bn, &rank_order_mean(&stats, &[2, 2, 2]), 0.9);
    let network = if phase == pb::Phase::Discriminator {
        pb::Network::Discriminator
    } else {
        pb::Network::Generator
    };
    for w in workers.iter_mut() {
        let (net, at, values, running) = w.recv_params().await;
        assert_eq!((net, at), (network, step));
        assert!(
            values == *params,
            "broadcast parameters equal TF1 RMSProp on the rank-order mean, bit for bit"
        );
        assert_eq!(&running, bn);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn averages_in_rank_order_updates_exactly_and_follows_the_balance() {
    let data = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    tiny_dataset(data.path());
    let spec = tiny_spec(data.path(), 3, 2);
    let coordinator = TestCoordinator::start(spec.clone(), run.path(), false, None).await;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(FakeWorker::join(&coordinator.url()).await);
    }
    assert_eq!(workers.iter().map(|w| w.rank).collect::<Vec<_>>(), vec![0, 1, 2]);
    let mut shards: Vec<u32> = workers.iter().flat_map(|w| w.shard.clone()).collect();
    shards.sort();
    assert_eq!(shards, (0..12).collect::<Vec<_>>(), "the shards partition the dataset");

    let mut replicas = receive_initial(&mut workers).await;
    let opt = |lr: f64| RmsProp {
        lr: lr as f32,
        decay: 0.9,
        epsilon: 1e-10,
        l2: 1e-6,
    };
    let mut ms_d = initial_mean_square(replicas.d.len());
    let mut ms_g = initial_mean_square(replicas.g.len());

    // Step 1: loss_d = 0.7, loss_g = 0.8: both train.
    evaluate(&mut workers, 1, (1.4, 1.4, 1.6), &replicas).await;
    assert_eq!(
        decide_balance(0.7, 0.8, 1.35),
        forger_common::balance::StepPlan {
            train_d: true,
            train_g: true
        }
    );
    assert_eq!(expect_plan(&mut workers, 1).await, (true, true));
    phase(
        &mut workers,
        1,
        pb::Phase::Discriminator,
        &mut replicas.d,
        &mut ms_d,
        &mut replicas.bn,
        opt(spec.train.lr_d),
    )
    .await;
    phase(
        &mut workers,
        1,
        pb::Phase::Generator,
        &mut replicas.g,
        &mut ms_g,
        &mut replicas.bn,
        opt(spec.train.lr_g),
    )
    .await;

    // Step 2: loss_d = 1.0, loss_g = 0.5: the generator is far ahead and sits out.
    evaluate(&mut workers, 2, (2.0, 2.0, 1.0), &replicas).await;
    assert_eq!(expect_plan(&mut workers, 2).await, (true, false));
    phase(
        &mut workers,
        2,
        pb::Phase::Discriminator,
        &mut replicas.d,
        &mut ms_d,
        &mut replicas.bn,
        opt(spec.train.lr_d),
    )
    .await;

    // The last step is checkpointed with a sample grid drawn by rank 0.
    let In::Sample(request) = workers[0].recv().await else {
        panic!("expected a sample request")
    };
    assert_eq!((request.step, request.count), (2, 4));
    workers[0]
        .send(Out::Samples(pb::Samples {
            step: 2,
            count: 4,
            image_size: 8,
            pixels: vec![200u8; 4 * 8 * 8 * 3].into(),
        }))
        .await;
    for w in workers.iter_mut() {
        assert!(matches!(w.recv().await, In::Shutdown(_)));
    }
    let summary = coordinator
        .finish(Duration::from_secs(30))
        .await
        .expect("the run succeeds");
    assert_eq!(summary.step, 2);

    let metrics = metric_lines(run.path());
    assert_eq!(metrics.len(), 2);
    assert_eq!(metrics[0]["train_d"], true);
    assert_eq!(metrics[0]["train_g"], true);
    assert_eq!(metrics[1]["train_g"], false);
    assert!((metrics[0]["loss_d"].as_f64().unwrap() - 0.7).abs() < 1e-12);
    assert!((metrics[0]["loss_g"].as_f64().unwrap() - 0.8).abs() < 1e-12);
    assert_eq!(metrics[0]["workers"], 3);
    assert_eq!(metrics[0]["images"], 6);
    let saved = checkpoint::load(&run.path().join("checkpoints/step-00000002.safetensors")).unwrap();
    assert_eq!(saved.state.discriminator.params, replicas.d);
    assert_eq!(saved.state.discriminator.mean_square, ms_d);
    assert_eq!(saved.state.generator.params, replicas.g);
    assert_eq!(saved.state.batch_norm, replicas.bn);
    let grid = image::open(run.path().join("samples/step-00000002.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (2 * 8 + 3 * 2, 2 * 8 + 3 * 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drifted_replica_stops_the_run_naming_the_worker() {
    let (_data, _run, coordinator) = tiny_cluster(2, 3).await;
    let mut workers = vec![
        FakeWorker::join(&coordinator.url()).await,
        FakeWorker::join(&coordinator.url()).await,
    ];
    let mut replicas = receive_initial(&mut workers).await;
    // Rank 1 claims parameters that differ in one value.
    replicas.g[0] += 1.0;
    let crc_bad = wire::crc32_of(&[&replicas.d, &replicas.g, &replicas.bn]);
    replicas.g[0] -= 1.0;
    let crc_good = wire::crc32_of(&[&replicas.d, &replicas.g, &replicas.bn]);
    for (w, crc) in workers.iter_mut().zip([crc_good, crc_bad]) {
        let In::Evaluate(_) = w.recv().await else {
            panic!("expected Evaluate")
        };
        w.send(Out::Losses(pb::Losses {
            step: 1,
            samples: 2,
            sum_d_real: 1.0,
            sum_d_fake: 1.0,
            sum_g: 1.0,
            params_crc32: Some(crc),
        }))
        .await;
    }
    let err = run_error(coordinator).await;
    assert!(
        err.contains("worker 2") && err.contains("step 1") && err.contains("drifted"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gradient_of_the_wrong_length_is_refused_naming_the_worker() {
    let (_data, run, coordinator) = tiny_cluster(1, 3).await;
    let mut workers = vec![FakeWorker::join(&coordinator.url()).await];
    let replicas = receive_initial(&mut workers).await;
    evaluate(&mut workers, 1, (1.4, 1.4, 1.6), &replicas).await;
    expect_plan(&mut workers, 1).await;
    let short = vec![0.0f32; workers[0].d_len() - 1];
    let bn = vec![1.0; workers[0].bn_len()];
    workers[0].upload(1, pb::Phase::Discriminator, &short, 2, bn).await;
    let err = run_error(coordinator).await;
    assert!(
        err.contains("worker 1") && err.contains("discriminator") && err.contains("ended after"),
        "{err}"
    );
    // Nothing was completed, so nothing was checkpointed; the run directory is still usable.
    assert!(checkpoint::list(&run.path().join("checkpoints")).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_beyond_the_spec_is_refused_at_join() {
    let (_data, _run, coordinator) = tiny_cluster(1, 1).await;
    let _first = FakeWorker::join(&coordinator.url()).await;
    let mut client = pb::coordinator_client::CoordinatorClient::connect(coordinator.url())
        .await
        .unwrap();
    let status = client
        .join(pb::JoinRequest {
            protocol_version: forger_proto::PROTOCOL_VERSION,
            host: "extra".into(),
            device: "none".into(),
            threads: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("full"), "{}", status.message());
    let status = client
        .join(pb::JoinRequest {
            protocol_version: 99,
            host: "old".into(),
            device: "none".into(),
            threads: 1,
        })
        .await
        .unwrap_err();
    assert!(status.message().contains("protocol version 99"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_coordinator_on_the_same_run_directory_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    tiny_dataset(data.path());
    let mut first = TestCoordinator::start(tiny_spec(data.path(), 1, 1), run.path(), false, None).await;
    // The first waits for its worker; the second must not share its folder.
    let _worker = FakeWorker::join(&first.url()).await;
    let second = TestCoordinator::start(tiny_spec(data.path(), 1, 1), run.path(), false, None).await;
    let err = run_error(second).await;
    assert!(err.contains("another coordinator is using it"), "{err}");
    first.stop();
    let summary = first.finish(Duration::from_secs(30)).await.unwrap();
    assert!(summary.interrupted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_waiting_for_workers_ends_at_once_and_dismisses_who_came() {
    let (_data, _run, mut coordinator) = tiny_cluster(2, 3).await;
    let mut early = FakeWorker::join(&coordinator.url()).await;
    coordinator.stop();
    let summary = coordinator.finish(Duration::from_secs(10)).await.expect("a clean stop");
    assert_eq!((summary.step, summary.interrupted), (0, true));
    let In::Shutdown(s) = early.recv().await else {
        panic!("expected Shutdown")
    };
    assert!(s.reason.contains("stopped"), "{}", s.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_leaves_before_the_start_is_replaced() {
    // Two places, so one departure happens while the coordinator is still gathering.
    let (_data, _run, coordinator) = tiny_cluster(2, 1).await;
    let leaver = FakeWorker::join(&coordinator.url()).await;
    assert_eq!(leaver.rank, 0);
    drop(leaver);
    // Its place is free again once its session has closed.
    let mut replacement = None;
    for _ in 0..50 {
        let mut client = pb::coordinator_client::CoordinatorClient::connect(coordinator.url())
            .await
            .unwrap();
        let probe = client
            .join(pb::JoinRequest {
                protocol_version: forger_proto::PROTOCOL_VERSION,
                host: "probe".into(),
                device: "none".into(),
                threads: 1,
            })
            .await;
        if let Ok(reply) = probe {
            replacement = Some(reply.into_inner());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = replacement.expect("the departed worker's place was freed");
    assert_eq!(reply.rank, 0);
    drop(coordinator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_losses_stop_the_run_naming_the_worker() {
    let (_data, _run, coordinator) = tiny_cluster(1, 3).await;
    let mut workers = vec![FakeWorker::join(&coordinator.url()).await];
    let replicas = receive_initial(&mut workers).await;
    evaluate(&mut workers, 1, (f64::NAN, 1.0, 1.0), &replicas).await;
    let err = run_error(coordinator).await;
    assert!(
        err.contains("worker 1") && err.contains("non-finite") && err.contains("step 1"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverged_run_saves_no_checkpoint_of_its_ruined_weights() {
    let (_data, run, coordinator) = tiny_cluster(1, 5).await;
    let mut workers = vec![FakeWorker::join(&coordinator.url()).await];
    let mut replicas = receive_initial(&mut workers).await;
    // Step 1 completes: D is far ahead (0.2 * 1.35 < 2.0), so only G trains.
    evaluate(&mut workers, 1, (0.2, 0.2, 2.0), &replicas).await;
    assert_eq!(expect_plan(&mut workers, 1).await, (false, true));
    let (g_len, bn_len) = (workers[0].g_len(), workers[0].bn_len());
    workers[0]
        .upload(1, pb::Phase::Generator, &vec![0.5; g_len], 2, vec![1.0; bn_len])
        .await;
    let (_, _, g, bn) = workers[0].recv_params().await;
    (replicas.g, replicas.bn) = (g, bn);
    // Step 2 reports NaN: the run stops and checkpoints nothing, since what it holds may
    // already be ruined and saving it would prune a good checkpoint.
    evaluate(&mut workers, 2, (f64::NAN, 0.2, 2.0), &replicas).await;
    let err = run_error(coordinator).await;
    assert!(err.contains("diverged"), "{err}");
    assert!(checkpoint::list(&run.path().join("checkpoints")).unwrap().is_empty());
}
