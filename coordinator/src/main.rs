//! `forger-coordinator`: parse the flags, load the spec, bind, and run.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use forger_common::spec::JobSpec;
use forger_coordinator::credentials;
use forger_coordinator::{Console, LocalWorkers, Monitoring, ProgressMode, Resume, Security, ServeConfig};
use forger_proto::tls::ServerSecurity;

/// Trains the forger DCGAN data-parallel across the workers that join.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The job spec (TOML).
    #[arg(long, env = "FORGER_SPEC", required = true)]
    spec: Option<PathBuf>,
    /// The run directory: checkpoints, samples, metrics.
    #[arg(long, env = "FORGER_OUT", required = true)]
    out: Option<PathBuf>,
    /// The credentials folder (`forger-coordinator credentials` makes one): TLS on every
    /// connection and the job token on every call. With --local-workers and neither this nor
    /// --insecure, a folder is made in the run directory.
    #[arg(long, env = "FORGER_CREDENTIALS", conflicts_with = "insecure")]
    credentials: Option<PathBuf>,
    /// Mutual TLS: workers must also show the certificate of the credentials folder.
    #[arg(long, env = "FORGER_MTLS", conflicts_with = "insecure")]
    mtls: bool,
    /// No TLS and no token: anyone who reaches the port can join, read the dataset and send
    /// gradients. For experiments on a trusted network only.
    #[arg(long, env = "FORGER_INSECURE")]
    insecure: bool,
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
    /// Where to serve the status page (HTML at /, JSON at /status.json), or `off`. Plain
    /// HTTP and read-only; bind it beyond loopback only on a network you trust.
    #[arg(long, env = "FORGER_STATUS_ADDR", default_value = "127.0.0.1:50052", value_name = "HOST:PORT|off",
          value_parser = parse_status_addr)]
    status_addr: StatusAddr,
    /// Progress on the console: a live bar (on a terminal), `progress` log lines every
    /// --progress-secs, or off. auto: the bar on a terminal, lines otherwise.
    #[arg(
        long,
        env = "FORGER_PROGRESS",
        default_value = "auto",
        value_name = "auto|bar|lines|off"
    )]
    progress: ProgressMode,
    /// Seconds between `progress` lines.
    #[arg(long, env = "FORGER_PROGRESS_SECS", default_value_t = 10)]
    progress_secs: u64,
    /// Also write TensorBoard event files (losses, scores, sample grids) to RUN_DIR/tensorboard.
    #[arg(long, env = "FORGER_TENSORBOARD")]
    tensorboard: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a new cluster's credentials: a CA, the coordinator's certificate, the workers'
    /// client certificate and the job token. Give the coordinator and every worker the folder
    /// (keep ca.key off the nodes: no running process needs it).
    Credentials {
        /// The folder to write (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// A name or address workers reach the coordinator by (repeat for several); localhost,
        /// 127.0.0.1, ::1 and `coordinator` are always included.
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// Replace credentials already in the folder.
        #[arg(long, conflicts_with = "keep")]
        force: bool,
        /// Succeed without writing when the folder already holds a complete set: for a compose
        /// file or batch script that runs this on every start.
        #[arg(long)]
        keep: bool,
    },
    /// Print a running coordinator's status page in the terminal.
    Status {
        /// The status page's address, e.g. http://127.0.0.1:8080 (http:// may be left out).
        url: String,
        /// Print the raw JSON instead.
        #[arg(long)]
        json: bool,
        /// Give up after this many seconds.
        #[arg(long, value_name = "SECS", default_value_t = 10.0)]
        timeout: f64,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    use std::io::IsTerminal as _;
    // Crash tests configure fail points through FAILPOINTS; unset, this does nothing.
    let _fail_points = forger_common::faults::setup();
    let args = Args::parse();
    // Log lines go through the console, which lifts the progress bar for each.
    let console = Console::new(args.progress, std::time::Duration::from_secs(args.progress_secs.max(1)));
    tracing_subscriber::fmt()
        // Colour only for people: log files and pipes get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(console.clone())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(args, console).await {
        Ok(code) => code,
        // A spec that does not fit the dataset is a usage error, like one that does not parse.
        Err(e) if is_spec_error(&e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(args: Args, console: Console) -> anyhow::Result<std::process::ExitCode> {
    if let Some(Command::Status { url, json, timeout }) = &args.command {
        let timeout = std::time::Duration::try_from_secs_f64(*timeout).context("--timeout")?;
        print!(
            "{}",
            forger_coordinator::status::client::status_command(url, *json, timeout).await?
        );
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if let Some(Command::Credentials {
        out,
        hosts,
        force,
        keep,
    }) = args.command
    {
        if keep && credentials::complete(&out)? {
            eprintln!(
                "{} already holds a cluster's credentials; kept them (--keep)",
                out.display()
            );
            return Ok(std::process::ExitCode::SUCCESS);
        }
        let written = credentials::generate(&out, &hosts, force)?;
        for file in &written.files {
            println!("{}", file.display());
        }
        eprintln!(
            "wrote a new cluster's credentials to {}; the coordinator's certificate names {}",
            out.display(),
            written.hosts.join(", ")
        );
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let (spec_path, out) = (args.spec.expect("required"), args.out.expect("required"));
    let mut spec = match JobSpec::load(&spec_path) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(std::process::ExitCode::from(2));
        }
    };
    if let Some(data) = args.data {
        spec.data.path = data;
    }
    let credentials = match (args.credentials, args.insecure, args.local_workers) {
        (_, true, _) => None,
        (Some(dir), false, _) => Some(dir),
        // Workers on this machine only: they can share a folder nobody had to make.
        (None, false, Some(_)) => Some(Security::run_directory_folder(&out)),
        (None, false, None) => {
            eprintln!(
                "error: the coordinator needs credentials: --credentials DIR (make them with `forger-coordinator \
                 credentials --out DIR`), or --insecure on a trusted network"
            );
            return Ok(std::process::ExitCode::from(2));
        }
    };
    let security = match &credentials {
        Some(dir) if *dir == Security::run_directory_folder(&out) && !dir.exists() => {
            Security::RunDirectory { mutual: args.mtls }
        }
        Some(dir) => Security::Given(ServerSecurity::load(dir, args.mtls)?),
        None => {
            eprintln!(
                "WARNING: --insecure: no TLS and no job token. Anyone who can reach {} can join this job, read its \
                 dataset and send it gradients.",
                args.listen
            );
            Security::Given(ServerSecurity::Insecure)
        }
    };
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
            credentials: credentials.clone(),
        });
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    let status = match &args.status_addr {
        StatusAddr::At(address) => bind_status(address).await,
        StatusAddr::Off => None,
    };
    let config = ServeConfig {
        spec,
        run_dir: out,
        resume: args.resume,
        local_workers,
        security,
        monitoring: Monitoring {
            console,
            status,
            tensorboard: args.tensorboard,
        },
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

/// `--status-addr`'s value.
#[derive(Debug, Clone)]
enum StatusAddr {
    Off,
    At(String),
}

/// `--status-addr`: `off`, or HOST:PORT with a port number; a typo is a usage error, where
/// an address that cannot be bound at run time is only a warning.
fn parse_status_addr(value: &str) -> Result<StatusAddr, String> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(StatusAddr::Off);
    }
    let well_formed = value.rsplit_once(':').is_some_and(|(host, port)| {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
    });
    if well_formed {
        Ok(StatusAddr::At(value.to_string()))
    } else {
        Err(format!(
            "expected HOST:PORT (such as 127.0.0.1:50052) or off, found {value:?}"
        ))
    }
}

/// The status page's socket. A page that cannot be served (the port is taken: another
/// coordinator on this machine) is not worth refusing the run for: it is said and skipped.
async fn bind_status(address: &str) -> Option<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => {
            if listener.local_addr().is_ok_and(|a| !a.ip().is_loopback()) {
                tracing::warn!(
                    address,
                    "the status page is reachable from other machines: plain HTTP, no token, showing losses, \
                     sample images and worker hosts (keep it on 127.0.0.1 on a shared network)"
                );
            }
            Some(listener)
        }
        Err(e) => {
            tracing::warn!(
                address,
                error = %e,
                "cannot serve the status page there; the run goes on without it (choose another with --status-addr)"
            );
            None
        }
    }
}

fn is_spec_error(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<forger_coordinator::CoordinatorError>(),
        Some(forger_coordinator::CoordinatorError::Common(
            forger_common::Error::SpecInvalid { .. } | forger_common::Error::SpecSyntax { .. }
        ))
    )
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
