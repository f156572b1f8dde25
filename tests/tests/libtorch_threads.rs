//! A worker with `--threads 2` runs libtorch's parallel operations on its replica's thread
//! alone. libgomp gives every thread that runs a parallel operation a pool of its own, and it
//! stops letting pools busy-wait once it manages more threads than there are cores; a pool on
//! the compute thread (built while loading a shard) or on the main thread once made every
//! operation of the replica 25-35% slower on 2 cores (docs/BENCHMARKS.md).
//!
//! A pool's threads carry the name of the thread that started it, so the worker's threads,
//! listed by name from /proc while it trains, say which threads have pools.

use std::collections::BTreeMap;
use std::time::Duration;

use forger_tests::processes::{Process, wait_for_step};
use forger_tests::{TestCoordinator, shared_faces, small_spec};

/// Thread names of a live process (Linux truncates them to 15 bytes), with their counts.
fn thread_names(pid: u32) -> BTreeMap<String, usize> {
    let mut names = BTreeMap::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the worker's threads are listed");
    for task in tasks {
        let comm = task.expect("a thread entry").path().join("comm");
        if let Ok(name) = std::fs::read_to_string(comm) {
            *names.entry(name.trim_end().to_string()).or_insert(0) += 1;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_replica_thread_has_a_libtorch_pool() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    // Large enough operations that libtorch splits them between threads (its grain is 32,768
    // values), and long enough a run to look at it while it trains.
    let mut spec = small_spec(&shared_faces(), 200, 1);
    spec.model.d_filters = vec![64, 32, 16];
    spec.model.g_filters = vec![64, 32, 16];
    spec.train.batch_size = 16;
    spec.checkpoint.every = 200;
    let coordinator = TestCoordinator::start(spec, &run_dir, false, None).await;
    let worker = Process::worker_on(
        "worker",
        &coordinator.url(),
        dir.path(),
        None,
        &["--threads", "2", "--device", "cpu"],
    );
    wait_for_step(&run_dir, 3, Duration::from_secs(120)).await;
    let names = thread_names(worker.pid());
    let count = |name: &str| names.get(name).copied().unwrap_or(0);
    // The replica's thread and the one other thread of its pool.
    assert_eq!(count("forger-replica-"), 2, "{names:?}\n{}", worker.log_text());
    assert_eq!(
        count("forger-compute"),
        1,
        "the compute thread started a pool: {names:?}"
    );
    assert_eq!(count("forger-worker"), 1, "the main thread started a pool: {names:?}");
}
