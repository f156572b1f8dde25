//! Test harness for forger's cluster tests: where the binaries and the shared faces are,
//! job specs for small runs, a coordinator started in-process on a port-0 listener, a fake
//! worker that speaks the protocol with gradients the test chooses, real worker and
//! coordinator processes for fault tests, and the checks that hold the deployment files
//! under `deploy/` to the binaries (`manifest_check`).

pub mod compose;
pub mod exchange;
pub mod fake_worker;
pub mod manifest_check;
pub mod processes;
pub mod reference;

use std::path::{Path, PathBuf};
use std::time::Duration;

use forger_common::spec::JobSpec;
use forger_coordinator::{LocalWorkers, RunSummary, Security, ServeConfig};
use forger_proto::tls::ServerSecurity;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `../shared/data/faces` beside the repository, or `FORGER_TEST_FACES` if set.
pub fn shared_faces() -> PathBuf {
    if let Some(path) = std::env::var_os("FORGER_TEST_FACES") {
        return PathBuf::from(path);
    }
    let path = repo_root().join("../shared/data/faces");
    assert!(
        path.is_dir(),
        "the shared faces are expected at {} (set FORGER_TEST_FACES to point elsewhere)",
        path.display()
    );
    path
}

/// A built binary of the workspace (`forger-worker`, `forger-coordinator`), found beside the
/// test executable's target folder. `scripts/test.sh` builds them before the tests.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lies in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built; run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A spec for a short CPU run on a slice of the shared faces.
pub fn small_spec(data: &Path, steps: u64, workers: u32) -> JobSpec {
    let text = format!(
        r#"
version = 1
[data]
path = "{}"
limit = 96
[model]
d_filters = [16, 8, 4]
g_filters = [16, 8, 4]
dropout = 0.5
[train]
steps = {steps}
batch_size = 8
seed = 7
check_params_every = 1
[cluster]
workers = {workers}
join_timeout_secs = 120
step_timeout_secs = 60
[checkpoint]
every = 5
keep = 10
samples = 16
"#,
        data.display()
    );
    JobSpec::parse(&text, "test spec").expect("test spec is valid")
}

/// Twelve 8x8 images in a fresh folder: a dataset for protocol tests, where what is learnt
/// does not matter.
pub fn tiny_dataset(dir: &Path) {
    for i in 0..12u8 {
        let img = image::RgbImage::from_pixel(8, 8, image::Rgb([i * 20, 255 - i * 20, 128]));
        img.save(dir.join(format!("img{i:02}.png"))).unwrap();
    }
}

/// A fresh temporary folder holding [`tiny_dataset`] in `data/`; the folder lives as long as
/// the guard.
pub fn tiny_data_folder() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("the data folder");
    tiny_dataset(&data);
    (dir, data)
}

/// A spec for [`tiny_dataset`]: tiny networks, short timeouts, `workers` shards.
pub fn tiny_spec(data: &Path, workers: u32, steps: u64) -> JobSpec {
    let text = format!(
        "version = 1\n[data]\npath = \"{}\"\nimage_size = 8\n[model]\nd_filters = [2, 3, 2]\ng_filters = [3, 2, 2]\n\
         [train]\nsteps = {steps}\nbatch_size = 2\ncheck_params_every = 1\n[cluster]\nworkers = {workers}\n\
         min_workers = 1\njoin_timeout_secs = 30\nstart_grace_secs = 30\nstep_timeout_secs = 30\n\
         heartbeat_timeout_secs = 2\n[checkpoint]\nevery = 100\nsamples = 4\n",
        data.display()
    );
    JobSpec::parse(&text, "tiny").unwrap()
}

/// A coordinator running in this process on a loopback port chosen by the OS.
#[derive(Debug)]
pub struct TestCoordinator {
    pub address: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<forger_coordinator::Result<RunSummary>>,
}

impl TestCoordinator {
    /// Binds first, then spawns, so workers can never race the listener.
    pub async fn start(spec: JobSpec, run_dir: &Path, resume: bool, local_workers: Option<usize>) -> TestCoordinator {
        TestCoordinator::start_secured(spec, run_dir, resume, local_workers, None, false).await
    }

    /// With TLS and the job token from the `credentials` folder (`mutual`: workers must show
    /// its certificate), or `--insecure` without one; local workers get the same folder.
    pub async fn start_secured(
        spec: JobSpec,
        run_dir: &Path,
        resume: bool,
        local_workers: Option<usize>,
        credentials: Option<&Path>,
        mutual: bool,
    ) -> TestCoordinator {
        let security = Security::Given(match credentials {
            Some(dir) => ServerSecurity::load(dir, mutual).expect("test credentials load"),
            None => ServerSecurity::Insecure,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let address = listener.local_addr().expect("local address");
        let local_workers = local_workers.map(|count| LocalWorkers {
            count,
            threads: 1,
            device: "cpu".into(),
            binary: binary("forger-worker"),
            credentials: credentials.map(Path::to_path_buf),
        });
        let config = ServeConfig {
            spec,
            run_dir: run_dir.to_path_buf(),
            resume: resume.into(),
            local_workers,
            security,
            monitoring: forger_coordinator::Monitoring::default(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(forger_coordinator::serve(config, listener, async {
            let _ = stopped.await;
        }));
        TestCoordinator {
            address,
            stop: Some(stop),
            task,
        }
    }

    /// Sends the shutdown signal (what Ctrl-C does in the binary).
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Waits for the run to end by itself, within `limit`.
    pub async fn finish(mut self, limit: Duration) -> forger_coordinator::Result<RunSummary> {
        let outcome = tokio::time::timeout(limit, &mut self.task)
            .await
            .expect("the coordinator did not finish in time");
        drop(self.stop.take());
        outcome.expect("the coordinator task panicked")
    }
}

/// The steps of a run's metrics log, in order (its quality lines, which have `swd`, left out).
pub fn metric_lines(run_dir: &Path) -> Vec<serde_json::Value> {
    all_metric_lines(run_dir)
        .into_iter()
        .filter(|line| line.get("swd").is_none())
        .collect()
}

/// The quality scores of a run's metrics log, in order.
pub fn quality_lines(run_dir: &Path) -> Vec<serde_json::Value> {
    all_metric_lines(run_dir)
        .into_iter()
        .filter(|line| line.get("swd").is_some())
        .collect()
}

fn all_metric_lines(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .expect("metrics.jsonl exists")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each metrics line is JSON"))
        .collect()
}
