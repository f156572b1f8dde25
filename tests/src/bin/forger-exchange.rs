//! `forger-exchange`: issue 4's "exchange alone" and "coordinator CPU cost" benchmarks. Prints
//! one JSON object on stdout; progress and errors go to stderr.
//!
//! - `allreduce`: a real coordinator and N fake worker processes (no libtorch) exchange the
//!   model's gradients and parameters for S steps; then a plain loopback TCP copy of the same
//!   bytes (the ceiling), and the ratio of the two bandwidths.
//! - `tcp`: the TCP copy alone.
//! - `reduce-cost`: `average::update_network` timed in-process, against memory copy bandwidth.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use forger_common::compression::GradientCompression;
use forger_tests::exchange::{self, Lens, allreduce, peer, reduce_cost, tcp};
use serde_json::json;

/// The exchange bandwidth the issue asks for, as a fraction of the plain TCP copy's.
const TARGET_RATIO: f64 = 0.6;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Benchmarks forger's all-reduce exchange and the coordinator's update"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The exchange through a real coordinator with fake workers, then the TCP ceiling.
    Allreduce {
        #[arg(long, default_value_t = 2)]
        workers: u32,
        #[arg(long, default_value_t = 6)]
        steps: u64,
        /// Feature maps of both networks.
        #[arg(long, value_delimiter = ',', default_value = "256,128,64")]
        filters: Vec<u32>,
        /// The image folder (only the first 64 x workers files are loaded).
        #[arg(long)]
        data: PathBuf,
        /// The forger-coordinator executable (default: beside this one).
        #[arg(long)]
        coordinator: Option<PathBuf>,
        /// Leave out the TCP copy.
        #[arg(long)]
        no_tcp: bool,
        /// Gradients go up as bf16 (`cluster.gradient_compression = "bf16"`); the TCP copy
        /// still moves f32 both ways.
        #[arg(long)]
        bf16: bool,
        /// TLS on both connections and the job token on every call, with credentials made by
        /// `forger-coordinator credentials` (the default of a real cluster); without it the
        /// coordinator runs --insecure.
        #[arg(long)]
        tls: bool,
        /// The cluster run must end within this many seconds.
        #[arg(long, default_value_t = 900)]
        timeout_secs: u64,
    },
    /// The plain loopback TCP copy of the same bytes alone.
    Tcp {
        #[arg(long, default_value_t = 2)]
        workers: u32,
        #[arg(long, default_value_t = 6)]
        rounds: u64,
        #[arg(long, value_delimiter = ',', default_value = "256,128,64")]
        filters: Vec<u32>,
    },
    /// The coordinator's update (average + RMSProp) in-process, against memory bandwidth.
    ReduceCost {
        #[arg(long, default_value_t = 2)]
        workers: usize,
        #[arg(long, value_delimiter = ',', default_value = "256,128,64")]
        filters: Vec<u32>,
        #[arg(long, default_value_t = 20)]
        repetitions: usize,
    },
    /// (internal) One fake worker process.
    #[command(hide = true)]
    FakeWorker {
        #[arg(long)]
        url: String,
        #[arg(long)]
        report: PathBuf,
        /// The credentials folder (none: --insecure).
        #[arg(long)]
        credentials: Option<PathBuf>,
    },
    /// (internal) One TCP copy client process.
    #[command(hide = true)]
    TcpClient {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        bytes: usize,
        #[arg(long)]
        rounds: u64,
    },
}

fn main() -> ExitCode {
    match run(Args::parse().command) {
        Ok(Some(report)) => {
            println!("{}", serde_json::to_string_pretty(&report).expect("JSON"));
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Cmd) -> anyhow::Result<Option<serde_json::Value>> {
    let report = match command {
        Cmd::Allreduce {
            workers,
            steps,
            filters,
            data,
            coordinator,
            no_tcp,
            bf16,
            tls,
            timeout_secs,
        } => {
            let model = exchange::model(&filters)?;
            let config = allreduce::Config {
                workers,
                steps,
                filters,
                data,
                compression: if bf16 {
                    GradientCompression::Bf16
                } else {
                    GradientCompression::None
                },
                coordinator: match coordinator {
                    Some(path) => path,
                    None => allreduce::default_coordinator()?,
                },
                timeout: Duration::from_secs(timeout_secs),
                tls,
            };
            let exchange = allreduce::run(&config)?;
            // The update alone, to set against the phases' wait (a few repetitions only).
            let update = reduce_cost::update_cost(&model, workers as usize, 5);
            let mut report = json!({
                "benchmark": "allreduce",
                "tls": tls,
                "d_filters": model.d_filters,
                "g_filters": model.g_filters,
                "exchange": exchange,
                "update_network_median_s": {
                    "discriminator": update["discriminator"]["median_s"],
                    "generator": update["generator"]["median_s"],
                },
            });
            if !no_tcp {
                let bytes = Lens::of(&model).bytes_per_worker();
                let copy = tcp::run(workers, steps, bytes)?;
                let ratio = report["exchange"]["gb_per_s"].as_f64().unwrap_or(f64::NAN)
                    / copy["gb_per_s"].as_f64().unwrap_or(f64::NAN);
                report["tcp"] = copy;
                report["exchange_vs_tcp"] = json!(ratio);
                report["target_ratio"] = json!(TARGET_RATIO);
                report["meets_target"] = json!(ratio >= TARGET_RATIO);
            }
            report
        }
        Cmd::Tcp {
            workers,
            rounds,
            filters,
        } => {
            let model = exchange::model(&filters)?;
            let mut report = tcp::run(workers, rounds, Lens::of(&model).bytes_per_worker())?;
            report["benchmark"] = json!("tcp");
            report["d_filters"] = json!(model.d_filters);
            report
        }
        Cmd::ReduceCost {
            workers,
            filters,
            repetitions,
        } => {
            anyhow::ensure!(
                workers >= 1 && repetitions >= 1,
                "--workers and --repetitions must be at least 1"
            );
            reduce_cost::run(&exchange::model(&filters)?, workers, repetitions)
        }
        Cmd::FakeWorker {
            url,
            report,
            credentials,
        } => {
            peer::main(&url, &report, credentials.as_deref())?;
            return Ok(None);
        }
        Cmd::TcpClient { addr, bytes, rounds } => {
            tcp::client(&addr, bytes, rounds)?;
            return Ok(None);
        }
    };
    Ok(Some(report))
}
