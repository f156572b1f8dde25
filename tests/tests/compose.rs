//! The docker-compose cluster of `deploy/`: the images built from the release build, a
//! coordinator and three workers in containers on a private network. One worker is killed
//! with `docker kill` mid-run and the others finish the job; the coordinator is restarted with
//! `compose restart` and resumes from its checkpoint. Skips, saying so, where no Docker engine
//! runs.

use std::path::Path;
use std::time::{Duration, Instant};

use forger_common::checkpoint;
use forger_tests::compose::{self, ComposeProject};
use forger_tests::processes::latest_step;
use forger_tests::reference::events;
use forger_tests::{repo_root, shared_faces};

const STEPS: u64 = 90;
const LIMIT: Duration = Duration::from_secs(600);
/// The images' user, who must be able to write the run directory.
const IMAGE_UID: u32 = 10001;

/// The compose file's own spec, shortened: the same model and workers, fewer steps and
/// images, checkpoints often enough that a restart has one to resume from.
fn short_spec(dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo_root().join("deploy/faces-small.toml")).expect("deploy/faces-small.toml");
    let text = text
        .replace("steps = 1000", &format!("steps = {STEPS}"))
        .replace("every = 200", "every = 10")
        .replace("keep = 3", "keep = 20")
        .replace("image_size = 40", "image_size = 40\nlimit = 480");
    let spec = forger_common::spec::JobSpec::parse(&text, "compose test spec").expect("the shortened spec is valid");
    assert_eq!(
        (spec.train.steps, spec.checkpoint.every, spec.data.limit),
        (STEPS, 10, 480)
    );
    let path = dir.join("spec.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool, project: &ComposeProject) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {limit:?}; coordinator log:\n{}",
            project.log_tail("coordinator")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn compose_cluster_survives_a_killed_worker_and_a_restarted_coordinator() {
    if !compose::engine_runs() {
        eprintln!("SKIPPED: no Docker engine answers here (`docker info` failed); the compose test needs one");
        return;
    }
    compose::build_images();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(IMAGE_UID), Some(IMAGE_UID)).unwrap();
    let spec = short_spec(dir.path());
    let port = forger_tests::processes::free_local_address()
        .rsplit_once(':')
        .unwrap()
        .1
        .to_string();
    let project = ComposeProject::up(
        "forger-compose-test",
        &[
            ("FORGER_SPEC_FILE", spec.display().to_string()),
            ("FORGER_RUN_DIR", run.display().to_string()),
            (
                "FORGER_DATA_DIR",
                shared_faces().canonicalize().unwrap().display().to_string(),
            ),
            ("FORGER_PORT", port),
        ],
        dir.path(),
    );

    // A third of the way in, one worker is killed; its shard goes to the others.
    wait_until("step 30", LIMIT, || latest_step(&run) >= 30, &project);
    project.kill("worker-3");
    wait_until(
        "the killed worker's eviction",
        LIMIT,
        || !events(&run, "evicted").is_empty(),
        &project,
    );
    let evicted_at = latest_step(&run);
    wait_until("step 60", LIMIT, || latest_step(&run) >= 60, &project);

    // The coordinator is restarted (SIGTERM: it checkpoints the step it is at) and resumes.
    project.compose(&["restart", "--timeout", "60", "coordinator"]);
    let ended = project.wait_stopped("coordinator", LIMIT);
    assert_eq!(ended.exit_code, 0, "{}", project.log_tail("coordinator"));

    let resumed = events(&run, "resumed-from-checkpoint");
    assert_eq!(resumed.len(), 1, "one resume: {resumed:?}");
    let resumed_from = resumed[0]["step"].as_u64().unwrap();
    // Both starts of the coordinator used the credentials the compose file made once.
    assert_eq!(resumed[0]["security"], "mutual TLS", "{resumed:?}");
    assert_eq!(events(&run, "fresh-start")[0]["security"], "mutual TLS");
    assert!(
        (60..STEPS).contains(&resumed_from),
        "resumed from step {resumed_from}, after the restart at step 60 or later"
    );
    let finished = events(&run, "finished");
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0]["step"].as_u64(), Some(STEPS));
    let newest = checkpoint::load_newest(&run.join("checkpoints")).unwrap();
    assert_eq!(newest.found.expect("a final checkpoint").1.state.step, STEPS);

    // The killed worker stayed down; the other two found the restarted coordinator again and
    // were dismissed by it at the end.
    let killed = project.state("worker-3");
    assert_eq!((killed.running, killed.exit_code, killed.restarts), (false, 137, 0));
    assert_eq!(finished[0]["workers_dismissed"].as_u64(), Some(2));
    for worker in ["worker-1", "worker-2"] {
        let state = project.wait_stopped(worker, Duration::from_secs(60));
        assert_eq!(state.exit_code, 0, "{worker}:\n{}", project.log_tail(worker));
    }
    eprintln!("compose: worker-3 evicted by step {evicted_at}, coordinator resumed from step {resumed_from}");
}
