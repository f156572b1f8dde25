//! The binaries as a user runs them: exit codes and messages for bad input, the linking that
//! keeps CUDA from silently disappearing, and a short real run of the README's main command.

use std::process::Command;

use forger_tests::{binary, metric_lines, shared_faces};

fn dynamic_section(path: &std::path::Path) -> String {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(path)
        .output()
        .expect("readelf (binutils) is installed");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_worker_links_libtorch_cuda_whenever_libtorch_has_it() {
    let worker = binary("forger-worker");
    let section = dynamic_section(&worker);
    let runpath = section
        .lines()
        .find(|l| l.contains("(RUNPATH)") || l.contains("(RPATH)"))
        .and_then(|l| l.split('[').nth(1))
        .and_then(|l| l.split(']').next())
        .expect("the worker carries a runpath to libtorch, so it runs with no environment set");
    let cuda_lib = std::path::Path::new(runpath).join("libtorch_cuda.so");
    if cuda_lib.exists() {
        assert!(
            section.contains("[libtorch_cuda.so]"),
            "libtorch has CUDA ({}), but the worker does not link it: CUDA would silently disappear",
            cuda_lib.display()
        );
    } else {
        eprintln!("libtorch at {runpath} has no CUDA; nothing to check");
    }
    // The worker starts and reports its version with no LD_LIBRARY_PATH.
    let out = Command::new(&worker)
        .arg("--version")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_coordinator_does_not_link_libtorch() {
    let section = dynamic_section(&binary("forger-coordinator"));
    assert!(
        !section.contains("libtorch"),
        "the coordinator must stay free of libtorch:\n{section}"
    );
}

#[test]
fn asking_for_cuda_without_a_gpu_is_an_error() {
    let out = Command::new(binary("forger-worker"))
        .args(["--device", "cuda", "--coordinator", "http://127.0.0.1:9", "--insecure"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if tch_sees_a_gpu(&stderr) {
        return;
    }
    assert!(!out.status.success());
    assert!(stderr.contains("no usable GPU"), "{stderr}");
}

#[test]
fn devices_all_without_a_gpu_says_where_to_look_and_devices_exclude_device() {
    let out = Command::new(binary("forger-worker"))
        .args(["--devices", "all", "--coordinator", "http://127.0.0.1:9", "--insecure"])
        .env("FORGER_PATIENCE_SECS", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !tch_sees_a_gpu(&stderr) {
        assert!(!out.status.success());
        assert!(
            stderr.contains("CUDA_VISIBLE_DEVICES") && stderr.contains("--device cpu"),
            "{stderr}"
        );
    }
    let out = Command::new(binary("forger-worker"))
        .args([
            "--device",
            "cpu",
            "--devices",
            "cpu,cpu",
            "--coordinator",
            "http://127.0.0.1:9",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

fn tch_sees_a_gpu(stderr: &str) -> bool {
    // On a CUDA machine the worker gets past device selection and fails to connect instead.
    stderr.contains("could not reach the coordinator")
}

#[test]
fn a_bad_spec_exits_2_naming_every_field_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("bad.toml");
    std::fs::write(
        &spec,
        "version = 1\n[data]\npath = \"x\"\n[model]\ndropout = 2.0\n[train]\nbatch_size = 0\nlr_d = -1.0\n",
    )
    .unwrap();
    let out_dir = dir.path().join("run");
    let out = Command::new(binary("forger-coordinator"))
        .arg("--spec")
        .arg(&spec)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for field in ["model.dropout", "train.batch_size", "train.lr_d"] {
        assert!(stderr.contains(field), "{field} missing from: {stderr}");
    }
    assert!(!out_dir.exists(), "nothing is written for a bad spec");

    std::fs::write(&spec, "version = 1\n[data]\npath = \"x\"\n[trian]\nsteps = 3\n").unwrap();
    let out = Command::new(binary("forger-coordinator"))
        .arg("--spec")
        .arg(&spec)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("trian"));
}

#[test]
fn an_empty_dataset_is_refused_before_any_worker_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("empty");
    std::fs::create_dir(&data).unwrap();
    let spec = dir.path().join("job.toml");
    std::fs::write(&spec, "version = 1\n[data]\npath = \"empty\"\n").unwrap();
    let out = Command::new(binary("forger-coordinator"))
        .arg("--spec")
        .arg(&spec)
        .arg("--out")
        .arg(dir.path().join("run"))
        .args(["--listen", "127.0.0.1:0", "--local-workers", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fewer than one batch") && stderr.contains("empty"),
        "{stderr}"
    );
    assert!(!stderr.contains("started local worker"), "{stderr}");
}

/// The README's main command on a spec in a test folder: a coordinator with two local workers
/// of one thread each, on the shared faces.
fn local_cluster_command(spec: &std::path::Path, run: &std::path::Path) -> Command {
    forger_tests::processes::local_cluster_command(spec, run, Some(&shared_faces()), 2)
}

#[test]
fn the_main_command_trains_with_local_workers() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("job.toml");
    std::fs::write(
        &spec,
        "version = 1\n[data]\npath = \"overridden-by-flag\"\nlimit = 64\n[model]\nd_filters = [8, 4, 4]\ng_filters = [8, 4, 4]\n\
         [train]\nsteps = 6\n[cluster]\nworkers = 2\n[checkpoint]\nevery = 3\nsamples = 4\n",
    )
    .unwrap();
    let run = dir.path().join("run");
    let out = local_cluster_command(&spec, &run).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("finished at step 6"), "{stderr}");
    assert_eq!(metric_lines(&run).len(), 6);
    assert!(run.join("checkpoints/step-00000006.safetensors").is_file());
    assert!(run.join("samples/step-00000003.png").is_file());
}

/// A coordinator started again on a complete run (as `docker compose up` does a second time)
/// has nothing to train; the worker started beside it must be told so and leave with success,
/// not dial until its patience runs out, and `--resume=auto` must not start the run afresh.
#[test]
fn a_worker_of_a_run_that_is_already_complete_is_told_so_and_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("job.toml");
    std::fs::write(
        &spec,
        "version = 1\n[data]\npath = \"overridden-by-flag\"\nlimit = 64\n[model]\nd_filters = [8, 4, 4]\ng_filters = [8, 4, 4]\n\
         [train]\nsteps = 2\n[cluster]\nworkers = 2\nstart_grace_secs = 3\n[checkpoint]\nevery = 2\nsamples = 4\n",
    )
    .unwrap();
    let run = dir.path().join("run");
    let out = local_cluster_command(&spec, &run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let address = forger_tests::processes::free_local_address();
    let coordinator = Command::new(binary("forger-coordinator"))
        .arg("--spec")
        .arg(&spec)
        .arg("--data")
        .arg(shared_faces())
        .arg("--out")
        .arg(&run)
        .args(["--listen", &address, "--resume=auto"])
        // The folder the first run made for its local workers.
        .arg("--credentials")
        .arg(run.join("credentials"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let worker = Command::new(binary("forger-worker"))
        .args([
            "--coordinator",
            &format!("http://{address}"),
            "--device",
            "cpu",
            "--patience-secs",
            "60",
            "--credentials",
        ])
        .arg(run.join("credentials"))
        .output()
        .unwrap();
    let worker_log = String::from_utf8_lossy(&worker.stderr);
    assert!(worker.status.success(), "{worker_log}");
    assert!(worker_log.contains("nothing left to train"), "{worker_log}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "the worker took {:?} to learn the run is over",
        started.elapsed()
    );
    let out = coordinator.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("finished at step 2"), "{stderr}");
    assert_eq!(metric_lines(&run).len(), 2, "nothing trained again");
}

/// Ctrl-C in a terminal signals the coordinator's whole process group. The coordinator must
/// finish the step, checkpoint and dismiss its local workers (which live in groups of their
/// own, so the signal does not kill them mid-step), and `--resume` must carry on.
#[test]
fn ctrl_c_stops_cleanly_with_a_checkpoint_and_resume_finishes() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("job.toml");
    std::fs::write(
        &spec,
        "version = 1\n[data]\npath = \"overridden-by-flag\"\nlimit = 64\n[model]\nd_filters = [8, 4, 4]\n\
         g_filters = [8, 4, 4]\n[train]\nsteps = 100000\n[cluster]\nworkers = 2\n[checkpoint]\nevery = 100000\nsamples = 4\n",
    )
    .unwrap();
    let run = dir.path().join("run");
    let coordinator = |resume: bool| {
        let mut command = local_cluster_command(&spec, &run);
        command.stderr(std::process::Stdio::piped()).process_group(0);
        if resume {
            command.arg("--resume");
        }
        command
    };
    let mut child = coordinator(false).spawn().unwrap();
    // Drain stderr while waiting, so a full pipe can never stall the coordinator.
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut text).unwrap();
        text
    });
    let started = std::time::Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 3 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "no training within 2 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let group = format!("-{}", child.id());
    assert!(
        Command::new("kill")
            .args(["-INT", "--", &group])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    let stderr = reader.join().unwrap();
    assert!(status.success(), "{stderr}");
    // The local workers (their logs go to the coordinator's stderr) leave with it instead of
    // waiting for a resumed coordinator, and without an error.
    assert_eq!(stderr.matches("leaving with it").count(), 2, "{stderr}");
    assert!(!stderr.contains("error:"), "{stderr}");
    let stopped_at: u64 = stderr
        .split("stopped at step ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no 'stopped at step' in: {stderr}"));
    assert!(
        run.join(format!("checkpoints/step-{stopped_at:08}.safetensors"))
            .is_file()
    );
    assert_eq!(metric_lines(&run).len() as u64, stopped_at);
    let stopped = forger_tests::reference::events(&run, "stopped");
    assert_eq!(stopped.len(), 1, "{stopped:?}");
    assert_eq!(stopped[0]["step"], stopped_at);

    // Aim the resumed run a few steps past the stop.
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("steps = 100000", &format!("steps = {}", stopped_at + 3));
    std::fs::write(&spec, text).unwrap();
    let out = coordinator(true).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let steps: Vec<u64> = metric_lines(&run).iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=stopped_at + 3).collect::<Vec<_>>());
}
