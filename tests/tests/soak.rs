//! The soak run behind docs/RELIABILITY.md (ignored by default; `scripts/soak.sh` runs it):
//! a few hundred steps while, every few seconds, one worker is killed with SIGKILL, or frozen
//! with SIGSTOP (a hung worker, found by its missing heartbeats), and a fresh one started in
//! its place. The run must reach its last step with every step logged once and end bit for bit
//! where an undisturbed run of the same spec ends.
//!
//! Settings: FORGER_SOAK_STEPS (default 300), FORGER_SOAK_EVERY_SECS (default 3),
//! FORGER_SOAK_REPORT (a file to write the summary into).

use std::time::{Duration, Instant};

use forger_tests::TestCoordinator;
use forger_tests::processes::{Process, latest_step};
use forger_tests::reference::{Reference, events, fault_spec};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak run of several minutes; scripts/soak.sh runs it"]
async fn soak_with_workers_killed_and_replaced_every_few_seconds() {
    let steps = setting("FORGER_SOAK_STEPS", 300);
    let every = Duration::from_secs(setting("FORGER_SOAK_EVERY_SECS", 3));
    let limit = Duration::from_secs(3600);
    let spec = fault_spec(steps);

    let reference_started = Instant::now();
    let reference = Reference::compute(spec.clone(), limit).await;
    let reference_secs = reference_started.elapsed().as_secs_f64();

    let run = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let coordinator = TestCoordinator::start(spec, run.path(), false, None).await;
    let url = coordinator.url();
    let mut next_name = 0;
    let spawn = |next_name: &mut usize| {
        *next_name += 1;
        Process::worker(&format!("worker-{next_name}"), &url, logs.path(), None)
    };
    let mut workers: Vec<Process> = (0..3).map(|_| spawn(&mut next_name)).collect();
    let mut frozen: Vec<(Process, Instant)> = Vec::new();
    let (mut kills, mut freezes) = (0u64, 0u64);
    let mut coordinator_task = tokio::spawn(coordinator.finish(limit));
    let summary = loop {
        tokio::select! {
            finished = &mut coordinator_task => break finished.expect("the coordinator task").expect("the soak run succeeds"),
            _ = tokio::time::sleep(every) => {}
        }
        if latest_step(run.path()) >= steps {
            continue;
        }
        // Take the oldest worker away; every fifth time freeze it instead of killing it.
        let mut victim = workers.remove(0);
        if (kills + freezes) % 5 == 4 {
            let status = std::process::Command::new("kill")
                .args(["-STOP", &victim.pid().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
            freezes += 1;
            frozen.push((victim, Instant::now()));
        } else {
            victim.kill();
            kills += 1;
        }
        workers.push(spawn(&mut next_name));
        // A frozen worker has long been evicted after a few heartbeat timeouts; end it.
        frozen.retain_mut(|(process, since)| {
            if since.elapsed() > Duration::from_secs(10) {
                process.kill();
                false
            } else {
                true
            }
        });
    };
    let soak_secs = started.elapsed().as_secs_f64();
    for worker in &mut workers {
        let _ = worker.wait(Duration::from_secs(60));
    }
    reference.assert_matched_by(run.path());
    let metrics = forger_tests::metric_lines(run.path());
    let retried = metrics.iter().filter(|m| m["attempts"].as_u64() > Some(1)).count();
    let heartbeat_evictions = events(run.path(), "evicted")
        .iter()
        .filter(|e| e["reason"].as_str().unwrap_or_default().contains("heartbeat"))
        .count();
    let report = format!(
        "| steps | kills (SIGKILL) | freezes (SIGSTOP) | evictions | of which by heartbeat | joins after start | step retries | steps retried | wall time (s) | undisturbed (s) | result |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n\
         | {} | {kills} | {freezes} | {} | {heartbeat_evictions} | {} | {} | {retried} | {soak_secs:.0} | {reference_secs:.0} | every step once; final state bit-identical to the undisturbed run |\n",
        summary.step, summary.evictions, summary.joins, summary.retries,
    );
    // Why each eviction happened, by the first words of its reason.
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for event in events(run.path(), "evicted") {
        let reason = event["reason"].as_str().unwrap_or_default();
        let key: String = reason.split(':').next().unwrap_or_default().chars().take(60).collect();
        *reasons.entry(key).or_default() += 1;
    }
    let report = format!("{report}\nEvictions by reason: {reasons:?}\n");
    println!("{report}");
    if let Ok(path) = std::env::var("FORGER_SOAK_REPORT") {
        std::fs::write(path, &report).expect("write the soak report");
    }
    assert_eq!(summary.step, steps);
}
