//! The exchange alone: a real `forger-coordinator` process and N fake worker processes (no
//! libtorch: each uploads a constant gradient and receives the broadcast), timed from the
//! coordinator's own per-step `seconds` in `metrics.jsonl`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use forger_common::compression::GradientCompression;
use forger_common::spec::JobSpec;
use serde_json::{Value, json};

use super::{Lens, Spawned, check_none_failed, gb_per_s, mean, median, model, this_exe};

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub workers: u32,
    pub steps: u64,
    pub filters: Vec<u32>,
    pub data: PathBuf,
    /// How the fake workers send gradients.
    pub compression: GradientCompression,
    /// The `forger-coordinator` executable.
    pub coordinator: PathBuf,
    /// The whole run must end within this.
    pub timeout: Duration,
    /// TLS and the job token (credentials made by `forger-coordinator credentials`), or
    /// `--insecure`.
    pub tls: bool,
}

/// `forger-coordinator` beside this executable.
pub fn default_coordinator() -> anyhow::Result<PathBuf> {
    let exe = this_exe()?;
    let dir = exe.parent().context("this executable has no folder")?;
    Ok(dir.join("forger-coordinator"))
}

/// The job spec: batch 16 per shard, just enough images for the shards, no parameter checks,
/// no checkpoint but the one after the last step, timeouts that a loaded machine cannot trip.
pub fn spec_text(config: &Config, data: &Path) -> anyhow::Result<String> {
    let filters = model(&config.filters)?.d_filters;
    let data = data.to_str().context("the data folder's path is not UTF-8")?;
    // A JSON string is a valid TOML basic string (the same escapes).
    let data = serde_json::to_string(data)?;
    Ok(format!(
        r#"version = 1
[data]
path = {data}
limit = {limit}
[model]
d_filters = {filters:?}
g_filters = {filters:?}
dropout = 0.0
[train]
steps = {steps}
batch_size = 16
check_params_every = 0
[cluster]
workers = {workers}
min_workers = {workers}
join_timeout_secs = 120
start_grace_secs = 120
step_timeout_secs = 300
stall_factor = 0
heartbeat_secs = 1
heartbeat_timeout_secs = 60
gradient_compression = "{compression}"
[checkpoint]
every = 1000000000
keep = 1
samples = 4
"#,
        limit = 64 * config.workers,
        steps = config.steps,
        workers = config.workers,
        compression = <&str>::from(config.compression),
    ))
}

/// Runs the cluster and reports the exchange's step latency and bandwidth.
pub fn run(config: &Config) -> anyhow::Result<Value> {
    if config.steps < 2 {
        bail!("--steps must be at least 2 (the first step is left out)");
    }
    if config.workers < 1 {
        bail!("--workers must be at least 1");
    }
    if !config.coordinator.is_file() {
        bail!(
            "{} is not built: run `cargo build --release -p forger-coordinator`, or pass --coordinator",
            config.coordinator.display()
        );
    }
    let data = std::fs::canonicalize(&config.data)
        .with_context(|| format!("the data folder {} is not there", config.data.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("forger-exchange-")
        .tempdir()
        .context("cannot create a temporary folder")?;
    let text = spec_text(config, &data)?;
    let spec = JobSpec::parse(&text, "exchange spec").context("the benchmark's spec is invalid")?;
    let lens = Lens::of(&spec.model);
    let spec_path = dir.path().join("spec.toml");
    std::fs::write(&spec_path, &text)?;
    let run_dir = dir.path().join("run");
    let address = free_address()?;
    let url = format!("http://{address}");

    let credentials = dir.path().join("credentials");
    if config.tls {
        let made = Command::new(&config.coordinator)
            .args(["credentials", "--out"])
            .arg(&credentials)
            .output()
            .context("cannot run forger-coordinator credentials")?;
        if !made.status.success() {
            bail!(
                "forger-coordinator credentials failed: {}",
                String::from_utf8_lossy(&made.stderr)
            );
        }
    }
    let mut command = Command::new(&config.coordinator);
    command
        .arg("--spec")
        .arg(&spec_path)
        .arg("--out")
        .arg(&run_dir)
        .args(["--listen", &address])
        .env("RUST_LOG", "info");
    if config.tls {
        command.arg("--credentials").arg(&credentials);
    } else {
        command.arg("--insecure");
    }
    let mut coordinator = Spawned::start("forger-coordinator", command, dir.path().join("coordinator.log"))?;
    wait_listening(&mut coordinator, &address, Duration::from_secs(60))?;
    eprintln!(
        "exchange: coordinator on {address}; {} fake workers, {} steps, D {} + G {} values",
        config.workers, config.steps, lens.d, lens.g
    );

    let exe = this_exe()?;
    let mut workers = Vec::new();
    for i in 0..config.workers {
        let mut command = Command::new(&exe);
        command
            .args(["fake-worker", "--url", &url, "--report"])
            .arg(dir.path().join(format!("worker-{i}.json")));
        if config.tls {
            command.arg("--credentials").arg(&credentials);
        }
        let log = dir.path().join(format!("worker-{i}.log"));
        workers.push(Spawned::start(&format!("fake worker {i}"), command, log)?);
    }

    let deadline = Instant::now() + config.timeout;
    loop {
        if let Some(status) = coordinator.poll()? {
            if !status.success() {
                let mut message = format!("the coordinator failed ({status})\n{}", coordinator.tail());
                for w in &mut workers {
                    if let Some(s) = w.poll()?
                        && !s.success()
                    {
                        message.push_str(&format!("\n{} failed ({s})\n{}", w.name, w.tail()));
                    }
                }
                bail!(message);
            }
            break;
        }
        if let Err(e) = check_none_failed(&mut workers) {
            bail!("{e:#}\n{}", coordinator.tail());
        }
        if Instant::now() >= deadline {
            bail!(
                "the run did not finish within {:?}\n{}",
                config.timeout,
                coordinator.tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for w in &mut workers {
        if w.wait(Duration::from_secs(30))?.is_none() {
            bail!("{} did not exit after the run ended\n{}", w.name, w.tail());
        }
        w.check_success()?;
    }

    let metrics = read_metrics(&run_dir)?;
    if metrics.len() as u64 != config.steps {
        bail!(
            "metrics.jsonl holds {} steps, expected {}\n{}",
            metrics.len(),
            config.steps,
            coordinator.tail()
        );
    }
    let timed = &metrics[1..];
    let both_trained = timed
        .iter()
        .filter(|m| m["train_d"] == true && m["train_g"] == true)
        .count();
    if both_trained != timed.len() {
        eprintln!(
            "warning: only {both_trained} of {} timed steps trained both networks",
            timed.len()
        );
    }
    let retried = timed.iter().filter(|m| m["attempts"].as_u64() != Some(1)).count();
    if retried > 0 {
        eprintln!("warning: {retried} timed steps were retried (a worker was evicted?)");
    }
    let seconds: Vec<f64> = timed.iter().filter_map(|m| m["seconds"].as_f64()).collect();
    if seconds.len() != timed.len() {
        bail!("metrics.jsonl lacks `seconds` on some steps");
    }
    let step_s = mean(&seconds);
    // Parameters come back as f32; gradients go up as the compression says.
    let down = u64::from(config.workers) * lens.bytes_per_worker() as u64;
    let up = down / 4 * config.compression.value_bytes() as u64;
    let reports = read_reports(dir.path(), config.workers)?;
    Ok(json!({
        "workers": config.workers,
        "steps": config.steps,
        "steps_timed": timed.len(),
        "steps_training_both": both_trained,
        "d_values": lens.d,
        "g_values": lens.g,
        "gradient_bytes_per_step": up,
        "param_bytes_per_step": down,
        "gradient_compression": <&str>::from(config.compression),
        "mean_step_s": step_s,
        "median_step_s": median(&seconds),
        "min_step_s": seconds.iter().copied().fold(f64::INFINITY, f64::min),
        "max_step_s": seconds.iter().copied().fold(0.0, f64::max),
        "first_step_s": metrics[0]["seconds"].as_f64(),
        "gb_per_s": gb_per_s((up + down) as f64, step_s),
        "worker_phases_mean_s": phase_means(&reports),
        "worker_phases_by_worker_s": reports
            .iter()
            .map(|r| {
                let mut means = phase_means(std::slice::from_ref(r));
                means["worker"] = r["worker"].clone();
                means["shards"] = r["shards"].clone();
                means
            })
            .collect::<Vec<_>>(),
        "worker_phases_legend": "upload: encode and queue the gradient chunks; wait: last chunk queued to first \
            parameter chunk back (wire, other workers, update, encoding); download: first to last parameter chunk \
            decoded; evaluate: Evaluate received to Plan received",
    }))
}

/// A loopback address whose port was free a moment ago.
fn free_address() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(listener.local_addr()?.to_string())
}

/// Waits until the coordinator accepts connections, failing with its log if it exits.
fn wait_listening(coordinator: &mut Spawned, address: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let socket: std::net::SocketAddr = address.parse()?;
    loop {
        if let Some(status) = coordinator.poll()? {
            bail!("the coordinator failed to start ({status})\n{}", coordinator.tail());
        }
        if std::net::TcpStream::connect_timeout(&socket, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the coordinator did not listen on {address} within {limit:?}\n{}",
                coordinator.tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_metrics(run_dir: &Path) -> anyhow::Result<Vec<Value>> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("a line of {} is not JSON", path.display())))
        .collect::<anyhow::Result<_>>()?;
    // Quality scores (lines with `swd`) are no steps.
    Ok(lines.into_iter().filter(|l| l.get("swd").is_none()).collect())
}

fn read_reports(dir: &Path, workers: u32) -> anyhow::Result<Vec<Value>> {
    (0..workers)
        .map(|i| {
            let path = dir.join(format!("worker-{i}.json"));
            let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", path.display()))
        })
        .collect()
}

/// Means over every worker and every step after the first of what the fake workers timed.
fn phase_means(reports: &[Value]) -> Value {
    let steps: Vec<&Value> = reports
        .iter()
        .filter_map(|r| r["steps"].as_array())
        .flatten()
        .filter(|s| s["step"].as_u64().is_some_and(|step| step > 1))
        .collect();
    let field = |path: &[&str]| {
        let values: Vec<f64> = steps
            .iter()
            .filter_map(|s| path.iter().try_fold(*s, |v, key| v.get(key)).and_then(Value::as_f64))
            .collect();
        mean(&values)
    };
    let phase = |network: &str| {
        json!({
            "upload_s": field(&[network, "upload_s"]),
            "wait_s": field(&[network, "wait_s"]),
            "download_s": field(&[network, "download_s"]),
        })
    };
    json!({
        "evaluate_s": field(&["evaluate_s"]),
        "discriminator": phase("discriminator"),
        "generator": phase("generator"),
        "evaluate_to_last_params_s": field(&["from_evaluate_s"]),
    })
}
