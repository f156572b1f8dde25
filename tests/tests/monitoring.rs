//! Watching a run: the quality score at checkpoints, the status page and `status` command,
//! the training plot and the TensorBoard event file, with real processes on real sockets.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use forger_common::dataset;
use forger_common::sampler::split_for;
use forger_common::spec::JobSpec;
use forger_tests::processes::{free_local_address, local_cluster_command};
use forger_tests::{binary, metric_lines, quality_lines, shared_faces};

fn write_spec(dir: &Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!("version = 1\n[data]\npath = \"overridden-by-flag\"\n{body}"),
    )
    .unwrap();
    path
}

fn coordinator(spec: &Path, run: &Path) -> Command {
    local_cluster_command(spec, run, Some(&shared_faces()), 1)
}

/// The check of the score itself: real faces against other real faces score far
/// below real faces against noise, and far below an untrained generator's faces, which come
/// from a real run's first checkpoint and its metrics log.
#[test]
fn the_score_puts_real_faces_far_below_noise_and_an_untrained_generator() {
    let dir = tempfile::tempdir().unwrap();
    let spec_path = write_spec(
        dir.path(),
        "[model]\nd_filters = [16, 8, 4]\ng_filters = [16, 8, 4]\n[train]\nsteps = 1\n[cluster]\nworkers = 1\n\
         [checkpoint]\nevery = 1\nsamples = 4\n[quality]\nheld_out = 512\ngenerated = 512\n",
    );
    let run = dir.path().join("run");
    let out = coordinator(&spec_path, &run)
        .args(["--status-addr", "off"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let scores = quality_lines(&run);
    assert_eq!(scores.len(), 1, "one score, at the one checkpoint: {scores:?}");
    assert_eq!(scores[0]["step"], 1);
    assert_eq!(scores[0]["held_out"], 512);
    let untrained = scores[0]["swd"].as_f64().expect("a finite score");

    // The same reference the coordinator built, from the spec it saved.
    let mut spec = JobSpec::load(&run.join("spec.toml")).unwrap();
    spec.data.path = shared_faces();
    let faces = dataset::load(&spec.data.path, 40, 0).unwrap();
    let split = split_for(&spec, faces.len());
    assert_eq!(split.held_out.len(), 512);
    let reference = forger_common::quality::job::reference(&spec, &faces.gather(&split.held_out)).unwrap();
    let real = reference
        .score(&faces.gather(&split.training[..512]), 512)
        .unwrap()
        .mean;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..512 * 40 * 40 * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 56) as u8
        })
        .collect();
    let noise = reference.score(&noise, 512).unwrap().mean;
    eprintln!("swd: real vs real {real:.1}, real vs untrained generator {untrained:.1}, real vs noise {noise:.1}");
    assert!(real * 3.0 < untrained, "real {real} against untrained {untrained}");
    assert!(real * 3.0 < noise, "real {real} against noise {noise}");
}

/// A small run watched as a user would: the status page's JSON through `forger-coordinator
/// status`, the page itself, and what a finished run leaves in its directory.
#[test]
fn a_run_can_be_watched_on_its_status_page_and_judged_from_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let spec_path = write_spec(
        dir.path(),
        "limit = 64\n[model]\nd_filters = [8, 4, 4]\ng_filters = [8, 4, 4]\n[train]\nsteps = 40\n[cluster]\n\
         workers = 1\n[checkpoint]\nevery = 20\nsamples = 4\n",
    );
    let run = dir.path().join("run");
    let status_address = free_local_address();
    let child = coordinator(&spec_path, &run)
        .args(["--status-addr", &status_address, "--tensorboard", "--progress", "lines"])
        .args(["--progress-secs", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://{status_address}");
    let status = |json: bool| {
        let mut command = Command::new(binary("forger-coordinator"));
        command.args(["status", &url]);
        if json {
            command.arg("--json");
        }
        command.output().unwrap()
    };
    // Watched while it trains: the JSON shows steps going by and the worker's row.
    let started = Instant::now();
    let snapshot = loop {
        let out = status(true);
        if out.status.success() {
            let snapshot: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json prints JSON");
            if snapshot["step"].as_u64().unwrap_or(0) >= 1 && !snapshot["workers"].as_array().unwrap().is_empty() {
                break snapshot;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the status page never showed a step"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(snapshot["steps_total"], 40);
    assert_eq!(snapshot["workers"][0]["device"], "cpu");
    let text = status(false);
    assert!(text.status.success(), "{}", String::from_utf8_lossy(&text.stderr));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("/ 40") && text.contains("cpu"), "{text}");

    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Not on a terminal: periodic progress lines, not a line per step.
    let progress = stderr.lines().filter(|l| l.contains("progress")).count();
    assert!(progress >= 1, "{stderr}");
    assert!(!stderr.contains("step complete"), "{stderr}");
    assert!(stderr.contains(&format!("http://{status_address}/")), "{stderr}");

    assert_eq!(metric_lines(&run).len(), 40);
    // Too few images to hold any out: no score, and the log says why.
    assert!(quality_lines(&run).is_empty());
    assert!(stderr.contains("too small to hold out"), "{stderr}");
    let plot = image::open(run.join("training.png")).expect("the training plot is a PNG");
    assert!(plot.width() >= 400 && plot.height() >= 200);
    let events: Vec<_> = std::fs::read_dir(run.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        events.iter().any(|name| name.starts_with("events.out.tfevents.")),
        "{events:?}"
    );
    // Once the coordinator is gone the command says so and fails.
    let gone = status(false);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains(&status_address));
}

/// A run stopped between checkpoints writes a checkpoint without asking a worker for
/// anything; resumed, it draws that checkpoint's grid and score first, so every checkpoint
/// of the run has both (and the plot's best score is not missing one).
#[test]
fn a_resumed_run_completes_the_grid_and_score_of_the_checkpoint_it_stopped_at() {
    let dir = tempfile::tempdir().unwrap();
    // 640 faces are the fewest that hold out 64 (ten times as many).
    let spec_path = write_spec(
        dir.path(),
        "limit = 640\n[model]\nd_filters = [8, 4, 4]\ng_filters = [8, 4, 4]\n[train]\nsteps = 400\n[cluster]\n\
         workers = 1\n[checkpoint]\nevery = 400\nsamples = 4\n[quality]\nheld_out = 64\ngenerated = 64\n",
    );
    let run = dir.path().join("run");
    let mut first = coordinator(&spec_path, &run)
        .args(["--status-addr", "off"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while forger_tests::processes::latest_step(&run) < 3 {
        assert!(started.elapsed() < Duration::from_secs(120), "the run never got going");
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(first.wait().unwrap().success());
    let stopped_at = forger_tests::processes::latest_step(&run);
    assert!(stopped_at < 400);
    let grid = run.join(format!("samples/step-{stopped_at:08}.png"));
    assert!(!grid.exists(), "a stop asks no worker for a grid");
    assert!(quality_lines(&run).is_empty());

    let out = coordinator(&spec_path, &run)
        .args(["--status-addr", "off", "--resume"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("completing the checkpoint resumed from"), "{stderr}");
    assert!(grid.is_file());
    let scored: Vec<u64> = quality_lines(&run)
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(scored, vec![stopped_at, 400]);
    assert_eq!(metric_lines(&run).len(), 400);

    // `forger-worker score` measures a checkpoint as the coordinator did, to the bit; a bad
    // file among the ones it is given is named and the others are still scored.
    let missing = run.join("checkpoints/step-00000999.safetensors");
    let out = Command::new(binary("forger-worker"))
        .args(["score", "--device", "cpu"])
        .arg(run.join("checkpoints/step-00000400.safetensors"))
        .arg(&missing)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["step"], 400);
    assert_eq!(lines[0]["swd"], quality_lines(&run)[1]["swd"]);
}

/// A mistyped status address is a usage error, before anything is loaded; one that is well
/// formed but cannot be bound is only a warning (a second coordinator on the machine).
#[test]
fn a_mistyped_status_address_is_refused_with_the_flag_named() {
    for bad in ["garbage", "", "127.0.0.1:99999", ":80"] {
        let out = Command::new(binary("forger-coordinator"))
            .args([
                "--spec",
                "unused.toml",
                "--out",
                "unused",
                "--insecure",
                "--status-addr",
                bad,
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {stderr}");
        assert!(
            stderr.contains("--status-addr") && stderr.contains("HOST:PORT"),
            "{bad:?}: {stderr}"
        );
    }
}
