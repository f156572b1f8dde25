//! `forger-worker`: join a coordinator and train, or draw faces from a checkpoint.

use std::path::PathBuf;

use anyhow::Context;
use clap::{ArgGroup, Parser, Subcommand};
use forger_proto::tls::ClientSecurity;
use forger_worker::client::{self, WorkerConfig};
use forger_worker::{device, generate};

/// A command line that cannot work: exit code 2, like clap's own errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// A forger worker: computes the DCGAN's losses and gradients with libtorch.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The coordinator's address, for example http://10.0.0.5:50051 (TLS is on unless
    /// --insecure, whichever the scheme).
    #[arg(long, env = "FORGER_COORDINATOR")]
    coordinator: Option<String>,
    /// The cluster's credentials folder (from `forger-coordinator credentials`): its CA, its
    /// job token and, for mutual TLS, the workers' certificate.
    #[arg(long, env = "FORGER_CREDENTIALS", conflicts_with = "insecure")]
    credentials: Option<PathBuf>,
    /// The name the coordinator's certificate must carry, when workers reach it by another
    /// (an address behind a proxy, say). Default: the host of --coordinator.
    #[arg(long, env = "FORGER_TLS_SERVER_NAME", conflicts_with = "insecure")]
    tls_server_name: Option<String>,
    /// No TLS and no job token, for a coordinator started with --insecure.
    #[arg(long, env = "FORGER_INSECURE")]
    insecure: bool,
    /// auto, cpu, cuda or cuda:N. `cuda` without a usable GPU is an error.
    #[arg(long, env = "FORGER_DEVICE", default_value = "auto", conflicts_with = "devices")]
    device: String,
    /// Several replicas in this one process, computing shards in parallel and sending one
    /// summed gradient: `all` (one per visible GPU) or a comma list such as cuda:0,cuda:1 or
    /// cpu,cpu. Instead of --device.
    #[arg(long, env = "FORGER_DEVICES")]
    devices: Option<String>,
    /// libtorch intra-op threads over all replicas, shared out among them (default: all
    /// cores).
    #[arg(long, env = "FORGER_THREADS")]
    threads: Option<usize>,
    /// How long to keep trying to reach the coordinator, or a free place in its job, before
    /// giving up (also after losing it mid-run), in seconds.
    #[arg(long, env = "FORGER_PATIENCE_SECS", default_value_t = 300)]
    patience_secs: u64,
    /// Leave when the coordinator stops the run, instead of waiting for it to be resumed (the
    /// coordinator passes this to its --local-workers, which end with it).
    #[arg(long, env = "FORGER_LEAVE_WHEN_STOPPED")]
    leave_when_stopped: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Draw faces from a checkpoint: a grid image, one PNG per face, or walks between two draws
    /// of noise.
    #[command(group(ArgGroup::new("output").required(true).multiple(true).args(["out", "images"])))]
    Generate {
        /// A checkpoint file from a run directory's checkpoints/ folder.
        #[arg(long)]
        checkpoint: PathBuf,
        /// How many faces to draw; with --interpolate, how many walks.
        #[arg(long, default_value_t = 64)]
        count: usize,
        /// The grid PNG to write: near-square, or with --interpolate one walk per row and one
        /// frame per column.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also (or, without --out, instead) write every face as its own PNG in this folder,
        /// created if missing: 0000.png, 0001.png ... in grid order, face i from noise row i of
        /// --seed; with --interpolate, 0003-07.png is frame 7 of walk 3. Files of the same
        /// names are replaced.
        #[arg(long, value_name = "DIR")]
        images: Option<PathBuf>,
        /// Enlarge every face N times, in the grid and in --images, by repeating pixels
        /// (nearest neighbour).
        #[arg(long, value_name = "N", default_value_t = 1)]
        scale: u32,
        /// Seed of the noise: the same seed draws the same faces.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Walk from each noise row of --seed to the same row of --to-seed in K frames, both
        /// ends included, along a straight line in noise space.
        #[arg(long, value_name = "K")]
        interpolate: Option<usize>,
        /// Seed of the noise the walks end at (default: --seed + 1).
        #[arg(long, requires = "interpolate")]
        to_seed: Option<u64>,
        #[arg(long, env = "FORGER_DEVICE", default_value = "auto")]
        device: String,
    },
    /// Print the quality score of checkpoints, one JSON line each: the sliced Wasserstein
    /// distance between the images their job holds out and images from their generator, as
    /// the coordinator computes it at checkpoints (lower is better).
    Score {
        /// Checkpoint files, of one run or several.
        #[arg(required = true)]
        checkpoints: Vec<PathBuf>,
        /// Overrides the checkpoints' data.path.
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, env = "FORGER_DEVICE", default_value = "auto")]
        device: String,
    },
    /// Train a spec in this one process, with no coordinator, and print its speed as JSON:
    /// the baseline the cluster is measured against (scripts/bench.sh).
    Bench {
        /// The job spec; `cluster.workers` is the number of shards, each a batch per step.
        #[arg(long)]
        spec: PathBuf,
        /// Overrides the spec's data.path.
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, default_value_t = 20)]
        steps: u64,
        /// Write the final state here as a checkpoint.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, env = "FORGER_DEVICE", default_value = "auto")]
        device: String,
        /// libtorch intra-op threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
}

fn main() -> std::process::ExitCode {
    use std::io::IsTerminal as _;
    // Crash tests configure fail points through FAILPOINTS; unset, this does nothing.
    let _fail_points = forger_common::faults::setup();
    tracing_subscriber::fmt()
        // Colour only for people: log files and pipes get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<UsageError>() => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if let Some(Command::Generate {
        checkpoint,
        count,
        out,
        images,
        scale,
        seed,
        interpolate,
        to_seed,
        device,
    }) = args.command
    {
        let request = generate::Request {
            count,
            seed,
            walk: interpolate.map(|frames| generate::Walk {
                frames,
                to_seed: to_seed.unwrap_or(seed.wrapping_add(1)),
            }),
            scale,
            grid: out,
            images,
        };
        request.check().map_err(|e| UsageError(e.to_string()))?;
        let device = device::resolve(&device)?;
        let written = generate::generate(&checkpoint, &request, device)
            .with_context(|| format!("failed to generate from {}", checkpoint.display()))?;
        if let (Some(out), Some((width, height))) = (&request.grid, written.grid) {
            eprintln!(
                "wrote {} images to {} ({width}x{height})",
                written.images,
                out.display()
            );
        }
        if let Some(dir) = &request.images {
            eprintln!("wrote {} image files to {}", written.files, dir.display());
        }
        return Ok(());
    }
    if let Some(Command::Score {
        checkpoints,
        data,
        device,
    }) = args.command
    {
        let device = device::resolve(&device)?;
        let mut scorer = forger_worker::score::Scorer::new(data.as_deref(), device);
        // One bad file among many (a glob) must not hide the others' scores.
        let mut failed = 0;
        for checkpoint in &checkpoints {
            match scorer.score(checkpoint) {
                Ok(scored) => println!("{}", serde_json::to_string(&scored)?),
                Err(e) => {
                    eprintln!("error: {}: {e}", checkpoint.display());
                    failed += 1;
                }
            }
        }
        anyhow::ensure!(
            failed == 0,
            "{failed} of {} checkpoints could not be scored",
            checkpoints.len()
        );
        return Ok(());
    }
    if let Some(Command::Bench {
        spec,
        data,
        steps,
        out,
        device,
        threads,
    }) = args.command
    {
        anyhow::ensure!(steps >= 1, "--steps must be at least 1");
        let mut spec = forger_common::spec::JobSpec::load(&spec)?;
        if let Some(data) = data {
            spec.data.path = data;
        }
        let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        tch::set_num_threads(threads as i32);
        tch::set_num_interop_threads(1);
        let device = device::resolve(&device)?;
        let report = forger_worker::bench::run(&spec, steps, device, out.as_deref())?;
        let total: f64 = report.step_seconds.iter().sum();
        // The first step pays for allocations and kernel loading; the rate leaves it out.
        let settled: f64 = report.step_seconds.iter().skip(1).sum();
        let per_step_images = report.images as f64 / steps as f64;
        let mut settled_steps: Vec<f64> = report.step_seconds.iter().skip(1).copied().collect();
        settled_steps.sort_by(f64::total_cmp);
        let middle = settled_steps.len() / 2;
        let median = match settled_steps.len() {
            0 => total,
            n if n % 2 == 1 => settled_steps[middle],
            _ => (settled_steps[middle - 1] + settled_steps[middle]) / 2.0,
        };
        let line = serde_json::json!({
            "steps": steps,
            "threads": threads,
            "device": device::describe(device),
            "images": report.images,
            "seconds": total,
            "first_step_seconds": report.step_seconds[0],
            "mean_step_seconds": if steps > 1 { settled / (steps - 1) as f64 } else { total },
            "median_step_seconds": median,
            "images_per_second": if steps > 1 { per_step_images * (steps - 1) as f64 / settled } else { per_step_images / total },
            "loss_d": report.losses.iter().map(|l| l.0).collect::<Vec<_>>(),
            "loss_g": report.losses.iter().map(|l| l.1).collect::<Vec<_>>(),
        });
        println!("{line}");
        return Ok(());
    }
    let Some(coordinator) = args.coordinator else {
        return Err(UsageError("--coordinator URL is required (or FORGER_COORDINATOR)".into()).into());
    };
    let security = match (&args.credentials, args.insecure) {
        (Some(dir), _) => ClientSecurity::load(dir, args.tls_server_name.clone())?,
        (None, true) => {
            eprintln!("WARNING: --insecure: no TLS and no job token; gradients and parameters travel in the clear");
            ClientSecurity::Insecure
        }
        (None, false) => {
            return Err(UsageError(
                "the worker needs the cluster's credentials: --credentials DIR (the folder the coordinator uses), \
                 or --insecure for a coordinator started with --insecure"
                    .into(),
            )
            .into());
        }
    };
    let devices = match &args.devices {
        Some(list) => device::resolve_list(list)?,
        None => vec![device::resolve(&args.device)?],
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    anyhow::ensure!(threads >= 1, "--threads must be at least 1");
    if threads < devices.len() {
        tracing::warn!(
            threads,
            replicas = devices.len(),
            "fewer threads than replicas: each replica gets one"
        );
    }
    // The replica threads take their shares of `threads`; this one only starts them.
    forger_worker::libtorch_threads::single_threaded();
    tch::set_num_interop_threads(1);
    let config = WorkerConfig {
        coordinator,
        devices,
        threads,
        patience: std::time::Duration::from_secs(args.patience_secs),
        leave_when_stopped: args.leave_when_stopped,
        security,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async {
        let (leave_tx, leave) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            stop_signal().await;
            let _ = leave_tx.send(true);
            stop_signal().await;
            eprintln!("second signal: exiting now");
            std::process::exit(130);
        });
        client::run(config, leave).await
    })?;
    Ok(())
}

/// The first SIGTERM or Ctrl-C asks the worker to leave the cluster at the end of the step;
/// the second exits at once.
async fn stop_signal() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminate.recv() => {},
    }
}
