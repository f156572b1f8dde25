//! `forger-coordinator`: parse the flags, load the spec, bind, and run.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use forger_common::spec::JobSpec;
use forger_coordinator::{LocalWorkers, Resume, ServeConfig};

/// Trains the forger DCGAN data-parallel across the workers that join.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The job spec (TOML).
    #[arg(long, env = "FORGER_SPEC")]
    spec: PathBuf,
    /// The run directory: checkpoints, samples, metrics.
    #[arg(long, env = "FORGER_OUT")]
    out: PathBuf,
    /// Address to listen on for workers.
    #[arg(long, env = "FORGER_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    /// Continue from the newest checkpoint in the run directory. `--resume=auto` continues if
    /// there is one and starts fresh otherwise (for a coordinator that a supervisor restarts).
    #[arg(
        long,
        env = "FORGER_RESUME",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "yes",
        default_value = "no",
        value_name = "yes|no|auto",
        value_parser = parse_resume
    )]
    resume: Resume,
    /// Overrides the spec's data.path.
    #[arg(long, env = "FORGER_DATA")]
    data: Option<PathBuf>,
    /// Also start this many worker processes on this machine.
    #[arg(long, env = "FORGER_LOCAL_WORKERS")]
    local_workers: Option<usize>,
    /// libtorch threads per local worker (default: the cores shared out among them).
    #[arg(long, env = "FORGER_LOCAL_WORKER_THREADS")]
    local_worker_threads: Option<usize>,
    /// Device for local workers.
    #[arg(long, env = "FORGER_LOCAL_WORKER_DEVICE", default_value = "auto")]
    local_worker_device: String,
    /// The forger-worker executable for local workers (default: beside this one).
    #[arg(long, env = "FORGER_WORKER_BIN")]
    worker_bin: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    use std::io::IsTerminal as _;
    // Crash tests configure fail points through FAILPOINTS; unset, this does nothing.
    let _fail_points = forger_common::faults::setup();
    tracing_subscriber::fmt()
        // Colour only for people: log files and pipes get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Args::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let mut spec = match JobSpec::load(&args.spec) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(std::process::ExitCode::from(2));
        }
    };
    if let Some(data) = args.data {
        spec.data.path = data;
    }
    let mut local_workers = None;
    if let Some(count) = args.local_workers {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        local_workers = Some(LocalWorkers {
            count,
            threads: args.local_worker_threads.unwrap_or((cores / count.max(1)).max(1)),
            device: args.local_worker_device,
            binary: match args.worker_bin {
                Some(path) => path,
                None => LocalWorkers::default_binary()?,
            },
        });
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    let config = ServeConfig {
        spec,
        run_dir: args.out,
        resume: args.resume,
        local_workers,
    };
    let summary = forger_coordinator::serve(config, listener, shutdown_signal()).await?;
    if summary.interrupted && summary.step == 0 {
        eprintln!("stopped before the first step; nothing to resume, start again without --resume");
    } else if summary.interrupted {
        eprintln!("stopped at step {}; continue with --resume", summary.step);
    } else {
        eprintln!("finished at step {}", summary.step);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// `--resume`'s value: yes or no (also true/false, on/off, 1/0), or auto.
fn parse_resume(value: &str) -> Result<Resume, String> {
    match value.to_ascii_lowercase().as_str() {
        "auto" => Ok(Resume::IfAny),
        "yes" | "true" | "on" | "1" => Ok(Resume::Required),
        "no" | "false" | "off" | "0" => Ok(Resume::No),
        _ => Err(format!("expected yes, no or auto, found {value:?}")),
    }
}

/// The first Ctrl-C or SIGTERM asks the run to stop after the current step (abandoning it if
/// workers are late); a second one exits at once.
async fn shutdown_signal() {
    one_signal().await;
    tokio::spawn(async {
        one_signal().await;
        eprintln!("second signal: exiting now; --resume continues from the newest checkpoint");
        std::process::exit(130);
    });
}

async fn one_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
