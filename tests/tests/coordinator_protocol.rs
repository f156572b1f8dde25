//! The coordinator against fake workers that send known losses and gradients: exact
//! shard-order averages, TF1 RMSProp updates, balancing decisions, and what happens to workers
//! that drift, break the protocol, fall silent or send non-finite values.

use forger_common::balance::decide_balance;
use forger_common::checkpoint;
use forger_common::rmsprop::{RmsProp, initial_mean_square, update_moving_average};
use forger_common::wire;
use forger_proto::pb::{self, coordinator_message::Kind as In, worker_message::Kind as Out};
use forger_tests::fake_worker::{FakeWorker, open_data_connection};
use forger_tests::reference::events;
use forger_tests::{TestCoordinator, metric_lines, tiny_dataset, tiny_spec};
use std::time::Duration;

/// A coordinator in this process on the tiny dataset; the folders live as long as the guards.
async fn tiny_cluster(workers: u32, steps: u64) -> (tempfile::TempDir, tempfile::TempDir, TestCoordinator) {
    let data = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    tiny_dataset(data.path());
    let coordinator = TestCoordinator::start(tiny_spec(data.path(), workers, steps), run.path(), false, None).await;
    (data, run, coordinator)
}

/// `count` fake workers joined in turn.
async fn join(coordinator: &TestCoordinator, count: usize) -> Vec<FakeWorker> {
    let mut workers = Vec::new();
    for _ in 0..count {
        workers.push(FakeWorker::join(&coordinator.url()).await);
    }
    workers
}

/// A bare Join from `host`, of this build's protocol version, with no session after it.
async fn join_request(
    client: &mut pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    host: &str,
) -> Result<tonic::Response<pb::JoinReply>, tonic::Status> {
    client
        .join(pb::JoinRequest {
            protocol_version: forger_proto::PROTOCOL_VERSION,
            host: host.into(),
            device: "none".into(),
            threads: 1,
            replicas: 1,
            forger_version: env!("CARGO_PKG_VERSION").into(),
        })
        .await
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

/// The shard-order weighted mean, written out independently of the coordinator's code.
fn shard_order_mean(parts: &[Vec<f32>], samples: &[u32]) -> Vec<f32> {
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

impl Replicas {
    fn crc(&self) -> u32 {
        wire::crc32_of(&[&self.d, &self.g, &self.bn])
    }
}

/// Each worker takes its shards, then receives both networks.
async fn receive_initial(workers: &mut [FakeWorker], step: u64) -> Replicas {
    let mut first = None;
    for w in workers.iter_mut() {
        w.take_assignment().await;
        let replicas = receive_both(w, step).await;
        match &first {
            None => first = Some(replicas),
            Some(r) => assert!(
                r.d == replicas.d && r.g == replicas.g && r.bn == replicas.bn,
                "every worker starts from the same parameters"
            ),
        }
    }
    first.unwrap()
}

async fn receive_both(w: &mut FakeWorker, step: u64) -> Replicas {
    let (net_d, step_d, d, _) = w.recv_params().await;
    let (net_g, step_g, g, bn) = w.recv_params().await;
    assert_eq!(
        (net_d, net_g, step_d, step_g),
        (pb::Network::Discriminator, pb::Network::Generator, step, step)
    );
    assert_eq!((d.len(), g.len(), bn.len()), (w.d_len(), w.g_len(), w.bn_len()));
    Replicas { d, g, bn }
}

/// Answers one Evaluate with the same loss sums for every shard the worker holds; returns the
/// attempt it named.
async fn answer_evaluate(w: &mut FakeWorker, step: u64, sums: (f64, f64, f64), crc: u32) -> u32 {
    let In::Evaluate(e) = w.recv().await else {
        panic!("expected Evaluate")
    };
    assert_eq!(e.step, step);
    assert!(e.check_params);
    let held: Vec<u32> = w.shards.keys().copied().collect();
    assert_eq!(e.batches.iter().map(|b| b.shard).collect::<Vec<_>>(), held);
    for b in &e.batches {
        assert_eq!(b.indices.len(), 2);
        assert!(
            b.indices.iter().all(|i| w.shards[&b.shard].contains(i)),
            "batches come from the shard they name"
        );
    }
    let shards = e
        .batches
        .iter()
        .map(|b| pb::ShardLosses {
            shard: b.shard,
            samples: 2,
            sum_d_real: sums.0,
            sum_d_fake: sums.1,
            sum_g: sums.2,
        })
        .collect();
    w.send(Out::Losses(pb::Losses {
        step,
        attempt: e.attempt,
        shards,
        params_crc32: Some(crc),
    }))
    .await;
    e.attempt
}

async fn evaluate(workers: &mut [FakeWorker], step: u64, sums: (f64, f64, f64), replicas: &Replicas) {
    for w in workers.iter_mut() {
        answer_evaluate(w, step, sums, replicas.crc()).await;
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

/// The optimizer state the test keeps beside the coordinator's.
struct Reference {
    params: Vec<f32>,
    mean_square: Vec<f32>,
    optimizer: RmsProp,
}

impl Reference {
    /// Fresh optimizer state at `params`, as the coordinator starts a run.
    fn starting_at(params: &[f32], lr: f64) -> Reference {
        Reference {
            params: params.to_vec(),
            mean_square: initial_mean_square(params.len()),
            optimizer: optimizer(lr),
        }
    }
}

fn optimizer(lr: f64) -> RmsProp {
    RmsProp {
        lr: lr as f32,
        decay: 0.9,
        epsilon: 1e-10,
        l2: 1e-6,
    }
}

/// Uploads per-shard gradients for one phase (`poison` shards get a NaN and arrive last) and checks the
/// broadcast against TF1 RMSProp applied to the shard-order mean of the finite ones.
async fn phase(
    workers: &mut [FakeWorker],
    (step, attempt): (u64, u32),
    phase: pb::Phase,
    reference: &mut Reference,
    bn: &mut [f32],
    poison: &[u32],
) {
    let len = reference.params.len();
    let bn_len = bn.len();
    let shards: usize = workers.iter().map(|w| w.shards.len()).sum();
    let grads: Vec<Vec<f32>> = (0..shards)
        .map(|s| {
            let mut g = pseudo_random(step * 100 + s as u64 + phase as u64 * 10, len);
            if poison.contains(&(s as u32)) {
                g[len / 2] = f32::NAN;
            }
            g
        })
        .collect();
    let stats: Vec<Vec<f32>> = (0..shards)
        .map(|s| {
            pseudo_random(step * 1000 + s as u64, bn_len)
                .iter()
                .map(|v| v.abs())
                .collect()
        })
        .collect();
    // Poisoned shards sit out: they upload only after the broadcast, so an answer the
    // coordinator no longer waits for arrives late, as a slow worker's would.
    let sitting_out = |shard: u32| poison.contains(&shard);
    upload_shards(workers, (step, attempt), phase, (&grads, &stats), |s| !sitting_out(s)).await;
    let finite: Vec<usize> = (0..shards).filter(|s| !poison.contains(&(*s as u32))).collect();
    let pick = |all: &[Vec<f32>]| finite.iter().map(|&s| all[s].clone()).collect::<Vec<_>>();
    let samples = vec![2; finite.len()];
    let mean = shard_order_mean(&pick(&grads), &samples);
    // Two equal-weight terms commute exactly; three or more show the order.
    if finite.len() > 2 {
        let reversed: Vec<Vec<f32>> = pick(&grads).into_iter().rev().collect();
        assert_ne!(
            mean,
            shard_order_mean(&reversed, &samples),
            "the test values are order-sensitive"
        );
    }
    reference
        .optimizer
        .apply(&mut reference.params, &mut reference.mean_square, &mean);
    update_moving_average(bn, &shard_order_mean(&pick(&stats), &samples), 0.9);
    let network = if phase == pb::Phase::Discriminator {
        pb::Network::Discriminator
    } else {
        pb::Network::Generator
    };
    for w in workers.iter_mut() {
        let (net, at, values, running) = w.recv_params().await;
        assert_eq!((net, at), (network, step));
        assert!(
            values == reference.params,
            "broadcast parameters equal TF1 RMSProp on the shard-order mean, bit for bit"
        );
        assert_eq!(&running, bn);
    }
    upload_shards(workers, (step, attempt), phase, (&grads, &stats), sitting_out).await;
}

/// Uploads, for every shard the workers hold that `pick` selects, its gradient and statistics.
async fn upload_shards(
    workers: &[FakeWorker],
    (step, attempt): (u64, u32),
    phase: pb::Phase,
    (grads, stats): (&[Vec<f32>], &[Vec<f32>]),
    pick: impl Fn(u32) -> bool,
) {
    for w in workers {
        for &shard in w.shards.keys().filter(|&&s| pick(s)) {
            let s = shard as usize;
            w.upload((step, attempt), phase, shard, &grads[s], 2, stats[s].clone())
                .await;
        }
    }
}

/// After the losses of step 1: follows the plan, checking each broadcast against the reference
/// update from the initial parameters.
async fn train_first_step(workers: &mut [FakeWorker], attempt: u32, replicas: &Replicas) {
    let (train_d, train_g) = expect_plan(workers, 1).await;
    let mut bn = replicas.bn.clone();
    if train_d {
        let mut d = Reference::starting_at(&replicas.d, 1e-4);
        phase(workers, (1, attempt), pb::Phase::Discriminator, &mut d, &mut bn, &[]).await;
    }
    if train_g {
        let mut g = Reference::starting_at(&replicas.g, 2e-4);
        phase(workers, (1, attempt), pb::Phase::Generator, &mut g, &mut bn, &[]).await;
    }
}

/// Answers the sample request the last step's checkpoint makes.
async fn answer_samples(w: &mut FakeWorker, step: u64) {
    let In::Sample(request) = w.recv().await else {
        panic!("expected a sample request")
    };
    assert_eq!((request.step, request.count), (step, 4));
    w.send(Out::Samples(pb::Samples {
        step,
        count: 4,
        image_size: 8,
        pixels: vec![200u8; 4 * 8 * 8 * 3].into(),
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn averages_in_shard_order_updates_exactly_and_follows_the_balance() {
    let (_data, run, coordinator) = tiny_cluster(3, 2).await;
    let mut workers = join(&coordinator, 3).await;
    let spec = workers[0].spec.clone();
    assert_eq!(workers.iter().map(|w| w.rank).collect::<Vec<_>>(), vec![0, 1, 2]);
    let mut replicas = receive_initial(&mut workers, 0).await;
    assert_eq!(
        workers
            .iter()
            .map(|w| w.shards.keys().copied().collect())
            .collect::<Vec<Vec<u32>>>(),
        vec![vec![0], vec![1], vec![2]]
    );
    let mut images: Vec<u32> = workers
        .iter()
        .flat_map(|w| w.shards.values().flatten().copied())
        .collect();
    images.sort();
    assert_eq!(images, (0..12).collect::<Vec<_>>(), "the shards partition the dataset");

    let mut d = Reference::starting_at(&replicas.d, spec.train.lr_d);
    let mut g = Reference::starting_at(&replicas.g, spec.train.lr_g);

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
        (1, 1),
        pb::Phase::Discriminator,
        &mut d,
        &mut replicas.bn,
        &[],
    )
    .await;
    phase(
        &mut workers,
        (1, 1),
        pb::Phase::Generator,
        &mut g,
        &mut replicas.bn,
        &[],
    )
    .await;
    (replicas.d, replicas.g) = (d.params.clone(), g.params.clone());

    // Step 2: loss_d = 1.0, loss_g = 0.5: the generator is far ahead and sits out.
    evaluate(&mut workers, 2, (2.0, 2.0, 1.0), &replicas).await;
    assert_eq!(expect_plan(&mut workers, 2).await, (true, false));
    phase(
        &mut workers,
        (2, 1),
        pb::Phase::Discriminator,
        &mut d,
        &mut replicas.bn,
        &[],
    )
    .await;

    // The last step is checkpointed with a sample grid drawn by the first worker.
    answer_samples(&mut workers[0], 2).await;
    for w in workers.iter_mut() {
        assert!(matches!(w.recv().await, In::Shutdown(s) if !s.rejoin));
    }
    let summary = coordinator
        .finish(Duration::from_secs(30))
        .await
        .expect("the run succeeds");
    assert_eq!((summary.step, summary.evictions, summary.retries), (2, 0, 0));

    let metrics = metric_lines(run.path());
    assert_eq!(metrics.len(), 2);
    assert_eq!(metrics[0]["train_d"], true);
    assert_eq!(metrics[0]["train_g"], true);
    assert_eq!(metrics[1]["train_g"], false);
    assert!((metrics[0]["loss_d"].as_f64().unwrap() - 0.7).abs() < 1e-12);
    assert!((metrics[0]["loss_g"].as_f64().unwrap() - 0.8).abs() < 1e-12);
    assert_eq!(metrics[0]["workers"], 3);
    assert_eq!(metrics[0]["images"], 6);
    assert_eq!(
        (metrics[0]["attempts"].as_u64(), metrics[0]["dropped"].as_u64()),
        (Some(1), Some(0))
    );
    let saved = checkpoint::load(&run.path().join("checkpoints/step-00000002.safetensors")).unwrap();
    assert_eq!(saved.state.discriminator.params, d.params);
    assert_eq!(saved.state.discriminator.mean_square, d.mean_square);
    assert_eq!(saved.state.generator.params, g.params);
    assert_eq!(saved.state.batch_norm, replicas.bn);
    let grid = image::open(run.path().join("samples/step-00000002.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (2 * 8 + 3 * 2, 2 * 8 + 3 * 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drifted_replica_is_evicted_and_the_step_retried_by_the_survivor() {
    let (_data, run, coordinator) = tiny_cluster(2, 1).await;
    let mut workers = join(&coordinator, 2).await;
    let replicas = receive_initial(&mut workers, 0).await;
    // The second worker claims parameters that differ in one value.
    let mut drifted = Replicas {
        d: replicas.d.clone(),
        g: replicas.g.clone(),
        bn: replicas.bn.clone(),
    };
    drifted.g[0] += 1.0;
    answer_evaluate(&mut workers[0], 1, (1.4, 1.4, 1.6), replicas.crc()).await;
    answer_evaluate(&mut workers[1], 1, (1.4, 1.4, 1.6), drifted.crc()).await;
    let mut bad = workers.pop().unwrap();
    let In::Shutdown(shutdown) = bad.recv().await else {
        panic!("expected Shutdown")
    };
    assert!(
        shutdown.rejoin && shutdown.reason.contains("drifted"),
        "{}",
        shutdown.reason
    );

    // The survivor holds both shards and retries step 1 as attempt 2; a late answer to the
    // abandoned attempt is ignored.
    let survivor = &mut workers[0];
    assert_eq!(survivor.take_assignment().await, vec![0, 1]);
    let again = receive_both(survivor, 0).await;
    assert!(again.d == replicas.d && again.g == replicas.g);
    survivor
        .send(Out::Losses(pb::Losses {
            step: 1,
            attempt: 1,
            shards: vec![],
            params_crc32: None,
        }))
        .await;
    assert_eq!(answer_evaluate(survivor, 1, (1.4, 1.4, 1.6), replicas.crc()).await, 2);
    let mut d = Reference::starting_at(&replicas.d, 1e-4);
    let mut g = Reference::starting_at(&replicas.g, 2e-4);
    let mut bn = replicas.bn.clone();
    assert_eq!(expect_plan(&mut workers, 1).await, (true, true));
    phase(&mut workers, (1, 2), pb::Phase::Discriminator, &mut d, &mut bn, &[]).await;
    phase(&mut workers, (1, 2), pb::Phase::Generator, &mut g, &mut bn, &[]).await;
    answer_samples(&mut workers[0], 1).await;
    let summary = coordinator.finish(Duration::from_secs(30)).await.unwrap();
    assert_eq!((summary.step, summary.evictions, summary.retries), (1, 1, 1));
    let metrics = metric_lines(run.path());
    assert_eq!(
        (
            metrics.len(),
            metrics[0]["attempts"].as_u64(),
            metrics[0]["workers"].as_u64()
        ),
        (1, Some(2), Some(1))
    );
    let evicted = events(run.path(), "evicted");
    assert_eq!(evicted.len(), 1);
    assert_eq!(evicted[0]["worker"], bad.id);
    assert!(evicted[0]["reason"].as_str().unwrap().contains("drifted"));
    let saved = checkpoint::load(&run.path().join("checkpoints/step-00000001.safetensors")).unwrap();
    assert_eq!(saved.state.discriminator.params, d.params);
    assert_eq!(saved.state.generator.params, g.params);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gradient_of_the_wrong_length_evicts_the_worker_the_run_pauses_and_resumes_with_a_new_one() {
    let (_data, run, coordinator) = tiny_cluster(1, 1).await;
    let mut workers = join(&coordinator, 1).await;
    let replicas = receive_initial(&mut workers, 0).await;
    evaluate(&mut workers, 1, (1.4, 1.4, 1.6), &replicas).await;
    expect_plan(&mut workers, 1).await;
    let short = vec![0.0f32; workers[0].d_len() - 1];
    let bn = vec![1.0; workers[0].bn_len()];
    workers[0]
        .upload((1, 1), pb::Phase::Discriminator, 0, &short, 2, bn)
        .await;
    let In::Shutdown(shutdown) = workers[0].recv().await else {
        panic!("expected Shutdown")
    };
    let expected = format!("chunk 0 holds {} values, expected {}", short.len(), short.len() + 1);
    assert!(shutdown.reason.contains(&expected), "{}", shutdown.reason);
    // With no worker left the run pauses rather than failing or spinning.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while events(run.path(), "paused").is_empty() {
        assert!(std::time::Instant::now() < deadline, "the pause is recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing was completed, so nothing was checkpointed.
    assert!(checkpoint::list(&run.path().join("checkpoints")).unwrap().is_empty());
    // A new worker resumes the run: it gets the shard and the untouched parameters, and step 1
    // is tried again.
    let mut workers = join(&coordinator, 1).await;
    let again = receive_initial(&mut workers, 0).await;
    assert!(again.d == replicas.d && again.g == replicas.g);
    assert_eq!(
        answer_evaluate(&mut workers[0], 1, (1.4, 1.4, 1.6), replicas.crc()).await,
        2
    );
    train_first_step(&mut workers, 2, &replicas).await;
    answer_samples(&mut workers[0], 1).await;
    let summary = coordinator.finish(Duration::from_secs(30)).await.unwrap();
    assert_eq!((summary.step, summary.evictions, summary.retries), (1, 1, 1));
    assert!(!events(run.path(), "resumed").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nan_gradient_undoes_the_step_and_the_retry_applies_the_others() {
    let (_data, run, coordinator) = tiny_cluster(3, 1).await;
    let mut workers = join(&coordinator, 3).await;
    let spec = workers[0].spec.clone();
    let mut replicas = receive_initial(&mut workers, 0).await;
    let mut d = Reference::starting_at(&replicas.d, spec.train.lr_d);
    let mut g = Reference::starting_at(&replicas.g, spec.train.lr_g);
    evaluate(&mut workers, 1, (1.4, 1.4, 1.6), &replicas).await;
    assert_eq!(expect_plan(&mut workers, 1).await, (true, true));
    // Shard 1's D gradient holds a NaN. The streamed mean may already hold other chunks, so
    // the coordinator undoes the attempt, sends every worker the parameters again, and runs
    // the step once more with shard 1 left out of the D update only.
    let len = d.params.len();
    for w in &workers {
        for &shard in w.shards.keys() {
            let mut gradient = pseudo_random(shard as u64, len);
            if shard == 1 {
                gradient[len / 2] = f32::NAN;
            }
            w.upload(
                (1, 1),
                pb::Phase::Discriminator,
                shard,
                &gradient,
                2,
                vec![0.5; w.bn_len()],
            )
            .await;
        }
    }
    for w in workers.iter_mut() {
        let again = receive_both(w, 0).await;
        assert!(
            again.d == replicas.d && again.g == replicas.g,
            "the undone attempt left nothing behind"
        );
    }
    for w in workers.iter_mut() {
        assert_eq!(answer_evaluate(w, 1, (1.4, 1.4, 1.6), replicas.crc()).await, 2);
    }
    assert_eq!(expect_plan(&mut workers, 1).await, (true, true));
    // Shard 1 still sends its NaN; it is ignored, and the update is the mean of 0 and 2.
    phase(
        &mut workers,
        (1, 2),
        pb::Phase::Discriminator,
        &mut d,
        &mut replicas.bn,
        &[1],
    )
    .await;
    phase(
        &mut workers,
        (1, 2),
        pb::Phase::Generator,
        &mut g,
        &mut replicas.bn,
        &[],
    )
    .await;
    answer_samples(&mut workers[0], 1).await;
    let summary = coordinator.finish(Duration::from_secs(30)).await.unwrap();
    assert_eq!((summary.step, summary.evictions, summary.retries), (1, 0, 1));
    let metrics = metric_lines(run.path());
    assert_eq!(
        (metrics[0]["dropped"].as_u64(), metrics[0]["attempts"].as_u64()),
        (Some(1), Some(2))
    );
    let dropped = events(run.path(), "dropped");
    assert_eq!(dropped.len(), 1);
    assert_eq!(
        (dropped[0]["shard"].as_u64(), dropped[0]["phase"].as_str()),
        (Some(1), Some("discriminator"))
    );
    let saved = checkpoint::load(&run.path().join("checkpoints/step-00000001.safetensors")).unwrap();
    assert!(saved.state.discriminator.params.iter().all(|v| v.is_finite()));
    assert_eq!(saved.state.discriminator.params, d.params);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_with_nan_losses_sits_the_step_out() {
    let (_data, run, coordinator) = tiny_cluster(2, 1).await;
    let mut workers = join(&coordinator, 2).await;
    let replicas = receive_initial(&mut workers, 0).await;
    // Shard 0 reports NaN: the plan follows shard 1 alone (D far ahead: only G trains).
    answer_evaluate(&mut workers[0], 1, (f64::NAN, 1.0, 1.0), replicas.crc()).await;
    answer_evaluate(&mut workers[1], 1, (0.2, 0.2, 2.0), replicas.crc()).await;
    assert_eq!(expect_plan(&mut workers, 1).await, (false, true));
    let mut g = Reference::starting_at(&replicas.g, 2e-4);
    // Both upload; shard 0's finite-looking gradient is still left out, as its losses were not
    // finite. The reference drops it the same way.
    let mut bn = replicas.bn.clone();
    phase(&mut workers, (1, 1), pb::Phase::Generator, &mut g, &mut bn, &[0]).await;
    answer_samples(&mut workers[0], 1).await;
    coordinator.finish(Duration::from_secs(30)).await.unwrap();
    let metrics = metric_lines(run.path());
    assert!((metrics[0]["loss_d"].as_f64().unwrap() - 0.1).abs() < 1e-12);
    assert_eq!(
        (metrics[0]["images"].as_u64(), metrics[0]["dropped"].as_u64()),
        (Some(2), Some(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_worker_is_evicted_within_the_heartbeat_timeout() {
    let (_data, run, coordinator) = tiny_cluster(2, 1).await;
    let mut workers = join(&coordinator, 2).await;
    let replicas = receive_initial(&mut workers, 0).await;
    answer_evaluate(&mut workers[0], 1, (1.4, 1.4, 1.6), replicas.crc()).await;
    // The second worker hangs: no answer, no heartbeat; the step timeout is 30 s, the
    // heartbeat timeout 2 s.
    workers[1].stop_heartbeats();
    let hung_at = std::time::Instant::now();
    let survivor = &mut workers[0];
    assert_eq!(survivor.take_assignment().await, vec![0, 1]);
    let waited = hung_at.elapsed();
    assert!(waited < Duration::from_secs(10), "evicted after {waited:?}");
    receive_both(survivor, 0).await;
    assert_eq!(answer_evaluate(survivor, 1, (1.4, 1.4, 1.6), replicas.crc()).await, 2);
    drop(coordinator);
    let evicted = events(run.path(), "evicted");
    assert!(
        evicted[0]["reason"].as_str().unwrap().contains("heartbeat"),
        "{evicted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_beyond_the_spec_is_told_the_cluster_is_full() {
    let (_data, _run, coordinator) = tiny_cluster(1, 1).await;
    let _first = FakeWorker::join(&coordinator.url()).await;
    let mut client = pb::coordinator_client::CoordinatorClient::connect(coordinator.url())
        .await
        .unwrap();
    let status = join_request(&mut client, "extra").await.unwrap_err();
    // Resource-exhausted: a worker retries, since a place frees when another is evicted.
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("full"), "{}", status.message());
    let status = client
        .join(pb::JoinRequest {
            protocol_version: 99,
            host: "old".into(),
            device: "none".into(),
            threads: 1,
            replicas: 1,
            forger_version: "9.9.9".into(),
        })
        .await
        .unwrap_err();
    // The refusal says what differs: both versions of the protocol and of forger.
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    for says in [
        "protocol version 99",
        "forger 9.9.9",
        &format!("version {}", forger_proto::PROTOCOL_VERSION),
    ] {
        assert!(status.message().contains(says), "{says}: {}", status.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_may_fetch_only_the_shards_assigned_to_it() {
    let (_data, _run, coordinator) = tiny_cluster(2, 1).await;
    let mut workers = join(&coordinator, 2).await;
    receive_initial(&mut workers, 0).await;
    let mut client = pb::coordinator_client::CoordinatorClient::connect(coordinator.url())
        .await
        .unwrap();
    let status = client
        .fetch_shard(pb::ShardRequest {
            worker_id: workers[0].id,
            shard: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_coordinator_on_the_same_run_directory_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    tiny_dataset(data.path());
    let mut first = TestCoordinator::start(tiny_spec(data.path(), 2, 1), run.path(), false, None).await;
    // The first waits for its workers; the second must not share its folder.
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
    assert!(
        s.rejoin && s.stopped,
        "a stopped run's workers wait for it to be resumed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_leaves_before_the_start_is_replaced() {
    // Two places, so one departure happens while the coordinator is still gathering.
    let (_data, run, coordinator) = tiny_cluster(2, 1).await;
    let leaver = FakeWorker::join(&coordinator.url()).await;
    assert_eq!(leaver.rank, 0);
    drop(leaver);
    // The coordinator writes the departure down once it has freed the place. A probe sent
    // before that would be given the other free place, so wait for the record first.
    let waited = std::time::Instant::now();
    while events(run.path(), "evicted").is_empty() {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the departure was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let departed = events(run.path(), "evicted");
    assert_eq!(departed[0]["phase"], "before training", "{departed:?}");
    let mut client = pb::coordinator_client::CoordinatorClient::connect(coordinator.url())
        .await
        .unwrap();
    let reply = join_request(&mut client, "probe")
        .await
        .expect("the departed worker's place was freed")
        .into_inner();
    assert_eq!(reply.rank, 0);
    drop(coordinator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_losses_everywhere_for_ten_steps_stop_the_run_as_diverged() {
    let (_data, run, coordinator) = tiny_cluster(1, 20).await;
    let mut workers = join(&coordinator, 1).await;
    let replicas = receive_initial(&mut workers, 0).await;
    for step in 1..=10 {
        evaluate(&mut workers, step, (f64::NAN, 1.0, 1.0), &replicas).await;
        if step < 10 {
            assert_eq!(expect_plan(&mut workers, step).await, (false, false));
        }
    }
    let err = run_error(coordinator).await;
    assert!(err.contains("diverged") && err.contains("10 steps"), "{err}");
    // Nothing non-finite was ever applied: the checkpoint saved on the way out holds the
    // untouched parameters, and the skipped steps are in the log.
    let saved = checkpoint::load(&run.path().join("checkpoints/step-00000009.safetensors")).unwrap();
    assert_eq!(saved.state.discriminator.params, replicas.d);
    let metrics = metric_lines(run.path());
    assert_eq!(metrics.len(), 9);
    assert!(metrics.iter().all(|m| m["skipped"] == true && m["loss_d"].is_null()));
    let failed = events(run.path(), "failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0]["error"].as_str().unwrap().contains("diverged"), "{failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_session_or_data_connection_claiming_a_worker_s_id_is_refused_and_the_worker_trains_on() {
    let (_data, run, coordinator) = tiny_cluster(1, 1).await;
    let mut workers = join(&coordinator, 1).await;
    let replicas = receive_initial(&mut workers, 0).await;
    let (id, token) = (workers[0].id, workers[0].token.clone());
    let mut client = pb::coordinator_client::CoordinatorClient::connect(coordinator.url())
        .await
        .unwrap();
    let hello = |session_token: bytes::Bytes| pb::WorkerMessage {
        kind: Some(Out::Hello(pb::Hello {
            worker_id: id,
            session_token,
        })),
    };
    // Knowing the id is not enough: without the token the answer is Unauthenticated.
    let guessed = bytes::Bytes::from(vec![0u8; token.len()]);
    let status = client
        .session(futures::stream::iter(vec![hello(guessed.clone())]))
        .await
        .expect_err("a wrong token is refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{}", status.message());
    let status = client
        .session(futures::stream::iter(vec![hello(token.clone())]))
        .await
        .expect_err("an id has one session");
    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{}", status.message());
    // The data connection follows the same rules, and says why it refuses.
    let refusal = open_data_connection(&coordinator.url(), id, &guessed)
        .await
        .unwrap_err();
    assert!(refusal.contains("session token is not the one"), "{refusal}");
    let refusal = open_data_connection(&coordinator.url(), id, &token).await.unwrap_err();
    assert!(refusal.contains("already has a session"), "{refusal}");
    let refusal = open_data_connection(&coordinator.url(), id + 100, &token)
        .await
        .unwrap_err();
    assert!(refusal.contains("holds no place"), "{refusal}");
    // The real worker is untouched: it finishes the run.
    evaluate(&mut workers, 1, (1.4, 1.4, 1.6), &replicas).await;
    train_first_step(&mut workers, 1, &replicas).await;
    answer_samples(&mut workers[0], 1).await;
    let summary = coordinator.finish(Duration::from_secs(30)).await.unwrap();
    assert_eq!((summary.step, summary.evictions), (1, 0));
    assert!(events(run.path(), "evicted").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_s_oversized_hello_is_refused_before_memory_is_reserved_for_it() {
    use tokio::io::AsyncWriteExt as _;
    let (_data, _run, coordinator) = tiny_cluster(1, 1).await;
    let address = coordinator.url().trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream.write_all(&forger_proto::data::DATA_MAGIC).await.unwrap();
    stream.write_all(&(1u32 << 20).to_le_bytes()).await.unwrap();
    stream.write_all(&0u32.to_le_bytes()).await.unwrap();
    let mut reader = forger_proto::data::FrameReader::handshake(stream);
    let (welcome, _) = tokio::time::timeout(Duration::from_secs(10), reader.read::<pb::DataWelcome>())
        .await
        .expect("answered at once")
        .unwrap()
        .expect("a welcome frame");
    let limit = forger_proto::data::MAX_HANDSHAKE_BYTES;
    assert!(
        welcome.refusal.contains(&format!("over the limit of {limit}")),
        "{}",
        welcome.refusal
    );
    drop(coordinator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_without_a_data_connection_is_refused_with_the_reason() {
    let (_data, _run, coordinator) = tiny_cluster(1, 1).await;
    let mut client = pb::coordinator_client::CoordinatorClient::connect(coordinator.url())
        .await
        .unwrap();
    let reply = join_request(&mut client, "no-data").await.unwrap().into_inner();
    let hello = pb::WorkerMessage {
        kind: Some(Out::Hello(pb::Hello {
            worker_id: reply.worker_id,
            session_token: reply.session_token,
        })),
    };
    let status = client
        .session(futures::stream::iter(vec![hello]))
        .await
        .expect_err("the data connection comes first");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{}", status.message());
    assert!(status.message().contains("no data connection"), "{}", status.message());
    drop(coordinator);
}

/// Starts step 1 of a one-worker run, has the worker misbehave on its connections with
/// `misbehave`, and returns the reason it was evicted with; the run then pauses, unharmed.
async fn evicted_for(misbehave: impl AsyncFnOnce(&FakeWorker)) -> String {
    let (_data, run, coordinator) = tiny_cluster(1, 1).await;
    let mut workers = join(&coordinator, 1).await;
    let replicas = receive_initial(&mut workers, 0).await;
    evaluate(&mut workers, 1, (1.4, 1.4, 1.6), &replicas).await;
    expect_plan(&mut workers, 1).await;
    misbehave(&workers[0]).await;
    let In::Shutdown(shutdown) = workers[0].recv().await else {
        panic!("expected Shutdown")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while events(run.path(), "paused").is_empty() {
        assert!(std::time::Instant::now() < deadline, "the pause is recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(checkpoint::list(&run.path().join("checkpoints")).unwrap().is_empty());
    drop(coordinator);
    shutdown.reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_frame_larger_than_a_chunk_drops_the_worker() {
    let reason = evicted_for(async |w: &FakeWorker| {
        let oversized = pb::GradientChunk {
            step: 1,
            attempt: 1,
            phase: pb::Phase::Discriminator as i32,
            values: vec![0u8; wire::CHUNK_VALUES * 4 + 4].into(),
            ..Default::default()
        };
        w.send_frame(oversized).await;
    })
    .await;
    let limit = wire::CHUNK_VALUES * 4;
    let expected = format!("payload of {} bytes is over the limit of {limit}", limit + 4);
    assert!(reason.contains(&expected), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gradient_sent_on_the_session_drops_the_worker() {
    let reason = evicted_for(async |w: &FakeWorker| {
        w.send(Out::Gradient(pb::GradientChunk {
            step: 1,
            attempt: 1,
            phase: pb::Phase::Discriminator as i32,
            values: vec![0u8; 16].into(),
            ..Default::default()
        }))
        .await;
    })
    .await;
    assert!(reason.contains("gradients travel on the data connection"), "{reason}");
}

/// A gradient for a step or phase the coordinator is not in: refused (the worker is dropped),
/// never summed into the update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gradient_for_a_future_step_or_the_wrong_phase_is_refused_not_applied() {
    for (step, phase, says) in [
        (7, pb::Phase::Discriminator, "step 7"),
        (1, pb::Phase::Generator, "generator"),
    ] {
        let reason = evicted_for(async |w: &FakeWorker| {
            w.send_frame(pb::GradientChunk {
                step,
                attempt: 1,
                phase: phase as i32,
                shard: 0,
                offset: 0,
                values: vec![0u8; 16].into(),
                ..Default::default()
            })
            .await;
        })
        .await;
        assert!(reason.to_lowercase().contains(says), "step {step} {phase:?}: {reason}");
    }
}

/// One step answered with zero gradients, following whatever the plan says; the replicas
/// follow the broadcasts so that the next checksum matches.
async fn loose_step(workers: &mut [FakeWorker], step: u64, replicas: &mut Replicas) {
    evaluate(workers, step, (1.4, 1.4, 1.6), replicas).await;
    let (train_d, train_g) = expect_plan(workers, step).await;
    for (trains, phase) in [(train_d, pb::Phase::Discriminator), (train_g, pb::Phase::Generator)] {
        if !trains {
            continue;
        }
        for w in workers.iter() {
            let len = if phase == pb::Phase::Discriminator {
                w.d_len()
            } else {
                w.g_len()
            };
            for &shard in w.shards.keys() {
                w.upload((step, 1), phase, shard, &vec![0.0; len], 2, vec![1.0; w.bn_len()])
                    .await;
            }
        }
        for w in workers.iter_mut() {
            let (net, _, values, bn) = w.recv_params().await;
            if net == pb::Network::Discriminator {
                replicas.d = values;
            } else {
                replicas.g = values;
            }
            replicas.bn = bn;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_heartbeats_but_never_answers_is_evicted_long_before_the_step_timeout() {
    let (_data, run, coordinator) = tiny_cluster(2, 5).await;
    let mut workers = join(&coordinator, 2).await;
    let mut replicas = receive_initial(&mut workers, 0).await;
    // The first step is each worker's warm-up and sets no pace; the second does.
    loose_step(&mut workers, 1, &mut replicas).await;
    loose_step(&mut workers, 2, &mut replicas).await;
    // Step 3: the second worker's computation is stuck; its heartbeats keep coming.
    let In::Evaluate(_) = workers[1].recv().await else {
        panic!("expected Evaluate")
    };
    answer_evaluate(&mut workers[0], 3, (1.4, 1.4, 1.6), replicas.crc()).await;
    let stuck_at = std::time::Instant::now();
    assert_eq!(workers[0].take_assignment().await, vec![0, 1]);
    let waited = stuck_at.elapsed();
    // The phases so far took milliseconds, so the stall deadline is its 10 s floor; the step
    // timeout of this spec is 30 s.
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(20),
        "evicted after {waited:?}"
    );
    let evicted = events(run.path(), "evicted");
    assert!(
        evicted[0]["reason"].as_str().unwrap().contains("phase deadline"),
        "{evicted:?}"
    );
    drop(coordinator);
}

/// Each shard's gradient and batch-norm statistics for one phase of a step, as the group tests
/// upload them.
fn phase_values(
    step: u64,
    phase: pb::Phase,
    shards: usize,
    len: usize,
    bn_len: usize,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let grads = (0..shards)
        .map(|s| pseudo_random(step * 100 + s as u64 + phase as u64 * 10, len))
        .collect();
    let stats = (0..shards)
        .map(|s| {
            pseudo_random(step * 1000 + s as u64, bn_len)
                .iter()
                .map(|v| v.abs())
                .collect()
        })
        .collect();
    (grads, stats)
}

/// One phase in which a worker with several replicas uploads one group for the `averaged`
/// shards it holds (one shard alone goes plain) and every other worker uploads per shard.
/// Checks the broadcast, bit for bit, against RMSProp on the mean taken as the coordinator
/// must take it: each group's own sample-weighted mean, weighted by the group's samples, in
/// the order of first shards; and that mean against the per-shard one, within rounding.
/// Returns how many uploads the phase took.
async fn grouped_phase(
    workers: &mut [FakeWorker],
    at: (u64, u32),
    phase: pb::Phase,
    reference: &mut Reference,
    bn: &mut [f32],
    averaged: &[u32],
) -> usize {
    let len = reference.params.len();
    let shards: usize = workers.iter().map(|w| w.shards.len()).sum();
    let (grads, stats) = phase_values(at.0, phase, shards, len, bn.len());
    // Every upload: (first shard, gradient, samples).
    let mut parts: Vec<(u32, Vec<f32>, u32)> = Vec::new();
    for w in workers.iter() {
        let own: Vec<u32> = w.shards.keys().copied().filter(|s| averaged.contains(s)).collect();
        if w.replicas > 1 && own.len() > 1 {
            let members: Vec<(u32, &[f32], u32, Vec<f32>)> = own
                .iter()
                .map(|&s| (s, grads[s as usize].as_slice(), 2, stats[s as usize].clone()))
                .collect();
            w.upload_group(at, phase, &members).await;
            let local = shard_order_mean(
                &own.iter().map(|&s| grads[s as usize].clone()).collect::<Vec<_>>(),
                &vec![2; own.len()],
            );
            parts.push((own[0], local, 2 * own.len() as u32));
        } else {
            for &s in &own {
                w.upload(at, phase, s, &grads[s as usize], 2, stats[s as usize].clone())
                    .await;
                parts.push((s, grads[s as usize].clone(), 2));
            }
        }
    }
    parts.sort_by_key(|p| p.0);
    let mean = shard_order_mean(
        &parts.iter().map(|p| p.1.clone()).collect::<Vec<_>>(),
        &parts.iter().map(|p| p.2).collect::<Vec<_>>(),
    );
    let pick = |all: &[Vec<f32>]| averaged.iter().map(|&s| all[s as usize].clone()).collect::<Vec<_>>();
    let per_shard = shard_order_mean(&pick(&grads), &vec![2; averaged.len()]);
    for (i, (a, b)) in mean.iter().zip(&per_shard).enumerate() {
        let scale: f32 = pick(&grads).iter().map(|g| g[i].abs()).sum::<f32>() / averaged.len() as f32;
        assert!(
            (a - b).abs() <= 1e-6 * scale,
            "element {i}: {a} against the per-shard {b}"
        );
    }
    reference
        .optimizer
        .apply(&mut reference.params, &mut reference.mean_square, &mean);
    update_moving_average(bn, &shard_order_mean(&pick(&stats), &vec![2; averaged.len()]), 0.9);
    let network = if phase == pb::Phase::Discriminator {
        pb::Network::Discriminator
    } else {
        pb::Network::Generator
    };
    for w in workers.iter_mut() {
        let (net, step, values, running) = w.recv_params().await;
        assert_eq!((net, step), (network, at.0));
        assert!(
            values == reference.params,
            "broadcast parameters equal RMSProp on the mean of the groups, bit for bit"
        );
        assert_eq!(&running, bn);
    }
    parts.len()
}

/// A worker of two replicas beside one of one, on three shards, each joined and synced.
async fn two_replicas_and_one(coordinator: &TestCoordinator) -> (Vec<FakeWorker>, Replicas) {
    let mut workers = vec![
        FakeWorker::join_with_replicas(&coordinator.url(), 2).await,
        FakeWorker::join(&coordinator.url()).await,
    ];
    let replicas = receive_initial(&mut workers, 0).await;
    let held: Vec<Vec<u32>> = workers.iter().map(|w| w.shards.keys().copied().collect()).collect();
    assert_eq!(held, vec![vec![0, 1], vec![2]], "shards in proportion to replicas");
    (workers, replicas)
}

/// The next Plan, whole.
async fn next_plan(w: &mut FakeWorker) -> pb::Plan {
    let In::Plan(plan) = w.recv().await else {
        panic!("expected Plan")
    };
    plan
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_of_two_replicas_sends_one_group_per_phase_and_the_update_follows_it() {
    let (_data, run, coordinator) = tiny_cluster(3, 1).await;
    let (mut workers, mut replicas) = two_replicas_and_one(&coordinator).await;
    let spec = workers[0].spec.clone();
    let mut d = Reference::starting_at(&replicas.d, spec.train.lr_d);
    let mut g = Reference::starting_at(&replicas.g, spec.train.lr_g);
    evaluate(&mut workers, 1, (1.4, 1.4, 1.6), &replicas).await;
    for w in workers.iter_mut() {
        let plan = next_plan(w).await;
        assert_eq!((plan.train_d, plan.train_g), (true, true));
        assert!(plan.sit_out_d.is_empty() && plan.sit_out_g.is_empty());
    }
    let all = [0, 1, 2];
    let d_uploads = grouped_phase(
        &mut workers,
        (1, 1),
        pb::Phase::Discriminator,
        &mut d,
        &mut replicas.bn,
        &all,
    )
    .await;
    let g_uploads = grouped_phase(
        &mut workers,
        (1, 1),
        pb::Phase::Generator,
        &mut g,
        &mut replicas.bn,
        &all,
    )
    .await;
    assert_eq!((d_uploads, g_uploads), (2, 2));
    answer_samples(&mut workers[0], 1).await;
    for w in workers.iter_mut() {
        assert!(matches!(w.recv().await, In::Shutdown(s) if !s.rejoin));
    }
    let summary = coordinator.finish(Duration::from_secs(30)).await.unwrap();
    assert_eq!((summary.step, summary.evictions, summary.retries), (1, 0, 0));
    let metrics = metric_lines(run.path());
    assert_eq!(
        (
            metrics[0]["workers"].as_u64(),
            metrics[0]["images"].as_u64(),
            metrics[0]["contributions"].as_u64()
        ),
        (Some(2), Some(6), Some(4)),
        "two uploads per phase for three shards"
    );
    let joined = events(run.path(), "joined");
    assert_eq!(joined[0]["replicas"], 2);
    assert_eq!(joined[0]["shards"], serde_json::json!([0, 1]));
    let saved = checkpoint::load(&run.path().join("checkpoints/step-00000001.safetensors")).unwrap();
    assert_eq!(saved.state.discriminator.params, d.params);
    assert_eq!(saved.state.generator.params, g.params);
    assert_eq!(saved.state.batch_norm, replicas.bn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_naming_a_shard_its_worker_does_not_hold_drops_that_worker_and_the_other_trains_on() {
    let (_data, run, coordinator) = tiny_cluster(3, 1).await;
    let (mut workers, replicas) = two_replicas_and_one(&coordinator).await;
    evaluate(&mut workers, 1, (1.4, 1.4, 1.6), &replicas).await;
    assert_eq!(expect_plan(&mut workers, 1).await, (true, true));
    // Shard 2 is the other worker's.
    let len = replicas.d.len();
    let bn_len = workers[0].bn_len();
    let group = [0u32, 2]
        .iter()
        .map(|&shard| pb::GroupShard {
            shard,
            samples: 2,
            bn_batch_stats: vec![0.5; bn_len],
            non_finite: false,
        })
        .collect();
    let encoded = wire::f32_bytes(&pseudo_random(5, len));
    workers[0]
        .upload_group_encoded((1, 1), pb::Phase::Discriminator, group, encoded)
        .await;
    let mut bad = workers.remove(0);
    let In::Shutdown(shutdown) = bad.recv().await else {
        panic!("expected Shutdown")
    };
    assert!(
        shutdown
            .reason
            .contains("group gradient covers (shard, samples) [(0, 2), (2, 2)]")
            && shutdown.reason.contains("expected [(0, 2), (1, 2)]"),
        "{}",
        shutdown.reason
    );
    // The other worker takes every shard and runs the step again, alone.
    let survivor = &mut workers[0];
    assert_eq!(survivor.take_assignment().await, vec![0, 1, 2]);
    let again = receive_both(survivor, 0).await;
    assert!(again.d == replicas.d && again.g == replicas.g, "the attempt was undone");
    assert_eq!(answer_evaluate(survivor, 1, (1.4, 1.4, 1.6), replicas.crc()).await, 2);
    train_first_step(&mut workers, 2, &replicas).await;
    answer_samples(&mut workers[0], 1).await;
    let summary = coordinator.finish(Duration::from_secs(30)).await.unwrap();
    assert_eq!((summary.step, summary.evictions, summary.retries), (1, 1, 1));
    let evicted = events(run.path(), "evicted");
    assert_eq!(evicted.len(), 1);
    assert_eq!(evicted[0]["worker"], bad.id);
    let metrics = metric_lines(run.path());
    assert_eq!(
        metrics[0]["contributions"], 6,
        "three shards, one upload each, in both phases"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_naming_a_non_finite_shard_retries_the_step_without_it_and_the_plan_says_so() {
    let (_data, run, coordinator) = tiny_cluster(3, 1).await;
    let (mut workers, mut replicas) = two_replicas_and_one(&coordinator).await;
    let spec = workers[0].spec.clone();
    let mut d = Reference::starting_at(&replicas.d, spec.train.lr_d);
    let mut g = Reference::starting_at(&replicas.g, spec.train.lr_g);
    evaluate(&mut workers, 1, (1.4, 1.4, 1.6), &replicas).await;
    assert_eq!(expect_plan(&mut workers, 1).await, (true, true));
    // Shard 1's D gradient holds a NaN: the group's sum does too, and its first chunk says
    // whose it is.
    let len = d.params.len();
    let bn_len = workers[0].bn_len();
    let mut poisoned = pseudo_random(1, len);
    poisoned[len / 2] = f32::NAN;
    let clean = pseudo_random(0, len);
    let members = [
        (0u32, clean.as_slice(), 2u32, vec![0.5; bn_len]),
        (1, poisoned.as_slice(), 2, vec![0.5; bn_len]),
    ];
    workers[0]
        .upload_group((1, 1), pb::Phase::Discriminator, &members)
        .await;
    for w in workers.iter_mut() {
        let again = receive_both(w, 0).await;
        assert!(again.d == replicas.d && again.g == replicas.g);
    }
    for w in workers.iter_mut() {
        assert_eq!(answer_evaluate(w, 1, (1.4, 1.4, 1.6), replicas.crc()).await, 2);
    }
    for w in workers.iter_mut() {
        let plan = next_plan(w).await;
        assert_eq!((plan.attempt, plan.sit_out_d, plan.sit_out_g), (2, vec![1], vec![]));
    }
    // D without shard 1: the group is shard 0 alone, sent plain; G with every shard.
    let d_uploads = grouped_phase(
        &mut workers,
        (1, 2),
        pb::Phase::Discriminator,
        &mut d,
        &mut replicas.bn,
        &[0, 2],
    )
    .await;
    let g_uploads = grouped_phase(
        &mut workers,
        (1, 2),
        pb::Phase::Generator,
        &mut g,
        &mut replicas.bn,
        &[0, 1, 2],
    )
    .await;
    assert_eq!((d_uploads, g_uploads), (2, 2));
    answer_samples(&mut workers[0], 1).await;
    let summary = coordinator.finish(Duration::from_secs(30)).await.unwrap();
    assert_eq!((summary.step, summary.evictions, summary.retries), (1, 0, 1));
    let dropped = events(run.path(), "dropped");
    assert_eq!(
        (dropped[0]["shard"].as_u64(), dropped[0]["phase"].as_str()),
        (Some(1), Some("discriminator"))
    );
    let metrics = metric_lines(run.path());
    assert_eq!(
        (metrics[0]["dropped"].as_u64(), metrics[0]["attempts"].as_u64()),
        (Some(1), Some(2))
    );
    let saved = checkpoint::load(&run.path().join("checkpoints/step-00000001.safetensors")).unwrap();
    assert_eq!(saved.state.discriminator.params, d.params);
    assert_eq!(saved.state.generator.params, g.params);
}
