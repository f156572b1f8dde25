//! Putting a run together: run directory, state (fresh or resumed), dataset and shards, the
//! gRPC server, the workers, and then the trainer.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use forger_common::checkpoint::{self, TrainingState};
use forger_common::sampler::{BatchSampler, SamplerState, assign_shards, split_for};
use forger_common::spec::{JobSpec, SpecProblem};
use forger_common::{layout, wire};
use forger_proto::pb::coordinator_server::CoordinatorServer;
use forger_proto::tls::ServerSecurity;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::dataset::{self, PreparedDataset};
use crate::error::{CoordinatorError, Result};
use crate::listener;
use crate::local::{LocalCluster, LocalWorkers};
use crate::monitor::Monitoring;
use crate::peers::Peers;
use crate::quality::QualityProbe;
use crate::registry::{Job, Registry};
use crate::run_dir::{EventLog, MetricsLog, RunDir};
use crate::service::CoordinatorService;
use crate::trainer::{RunLogs, RunSummary, Trainer};

/// Everything `serve` needs besides the socket.
#[derive(Debug)]
pub struct ServeConfig {
    pub spec: JobSpec,
    pub run_dir: PathBuf,
    /// Whether to continue from the newest checkpoint in `run_dir`.
    pub resume: Resume,
    /// Also start worker processes on this machine.
    pub local_workers: Option<LocalWorkers>,
    /// TLS and the job token, or `--insecure`.
    pub security: Security,
    /// The console's progress, the status page, TensorBoard.
    pub monitoring: Monitoring,
}

/// Where the coordinator's TLS settings and job token come from.
#[derive(Debug, Clone)]
pub enum Security {
    /// Loaded already: `--credentials`, or `--insecure`.
    Given(ServerSecurity),
    /// `--local-workers` with neither flag: the folder `credentials/` in the run directory,
    /// made on first use once the job has passed its checks, so a refused job writes none.
    /// `mutual`: workers must show the folder's certificate.
    RunDirectory { mutual: bool },
}

impl Security {
    /// The folder `Security::RunDirectory` uses in `run_dir`.
    pub fn run_directory_folder(run_dir: &std::path::Path) -> PathBuf {
        run_dir.join("credentials")
    }

    fn resolve(self, run: &RunDir) -> Result<ServerSecurity> {
        match self {
            Security::Given(security) => Ok(security),
            Security::RunDirectory { mutual } => {
                let dir = Security::run_directory_folder(run.root());
                if !dir.join(forger_proto::tls::files::TOKEN).exists() {
                    crate::credentials::generate(&dir, &[], false)?;
                    info!(
                        folder = %dir.display(),
                        "made credentials for this run: workers on other machines need a copy of the folder"
                    );
                }
                ServerSecurity::load(&dir, mutual).map_err(|e| CoordinatorError::Refused(e.to_string()))
            }
        }
    }
}

/// What to do with the checkpoints already in the run directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Start fresh; a run directory that holds checkpoints is refused, so that nothing is
    /// overwritten by mistake.
    No,
    /// Continue from the newest checkpoint; there must be one.
    Required,
    /// Continue from the newest checkpoint if there is one, otherwise start fresh: for a
    /// coordinator that a supervisor (Docker, Kubernetes, Slurm) restarts with the same command.
    IfAny,
}

impl From<bool> for Resume {
    fn from(resume: bool) -> Resume {
        if resume { Resume::Required } else { Resume::No }
    }
}

/// Skipped files named one by one in the log; the report file has them all.
const SKIPPED_LOGGED: usize = 20;
/// How long local workers get to exit once told to.
const LOCAL_EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// After a stop request, how long local workers get before they are killed.
const STOPPED_EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connections get to close after the run before the server is dropped.
const SERVER_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the job to its last step. `shutdown` resolving makes the run finish the current step,
/// checkpoint and stop.
pub async fn serve(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RunSummary> {
    let ServeConfig {
        mut spec,
        run_dir,
        resume,
        local_workers,
        security,
        monitoring,
    } = config;
    let workers = spec.cluster.workers as usize;
    if let Some(local) = &local_workers
        && local.count > workers
    {
        return Err(CoordinatorError::Refused(format!(
            "--local-workers {} is more than the job's cluster.workers = {workers}",
            local.count
        )));
    }
    // Saved specs must work from anywhere, so the dataset folder is recorded absolute.
    if let Ok(absolute) = std::fs::canonicalize(&spec.data.path) {
        spec.data.path = absolute;
    }
    // Everything that can refuse the job is checked before anything is written.
    let mut cleanup = RunDir::remove_if_refused(&run_dir);
    let run = RunDir::create(&run_dir)?;
    let _lock = run.lock()?;
    for path in run.remove_leftover_temporaries()? {
        warn!(path = %path.display(), "removed a temporary file left by a write that a crash interrupted");
    }
    let (state, changed) = initial_state(&spec, &run, resume)?;
    if state.step >= spec.train.steps {
        warn!(
            checkpoint_step = state.step,
            steps = spec.train.steps,
            "the checkpoint already reaches train.steps: nothing to train (raise train.steps to continue)"
        );
        // Workers started beside this coordinator are told the run is over, so they leave
        // instead of dialing until their patience runs out.
        let linger = Duration::from_secs(spec.cluster.start_grace_secs);
        let security = security.resolve(&run)?;
        crate::completed::answer_workers(listener, security, state.step, linger, shutdown).await;
        return Ok(RunSummary {
            step: state.step,
            ..RunSummary::default()
        });
    }
    let dataset = load_dataset(&spec)?;
    let split = split_for(&spec, dataset.len());
    if split.held_out.is_empty() && spec.quality.held_out > 0 {
        warn!(
            images = dataset.len(),
            held_out = spec.quality.held_out,
            "the dataset is too small to hold out quality.held_out images (it needs {} times as many): \
             every image is trained on and no quality score is computed",
            forger_common::spec::MIN_IMAGES_PER_HELD_OUT
        );
    }
    let training_images = split.training.len();
    let quality = tokio::task::block_in_place(|| QualityProbe::new(&spec, &dataset, &split.held_out))?;
    let shards = assign_shards(split.training, workers, spec.train.seed);
    check_shards(&spec, &shards)?;
    let samplers = samplers_for(&spec, &state, training_images, &shards);
    let mut state = state;
    let resumed_from = state.step;
    state.dataset_len = training_images;
    state.samplers = samplers.iter().map(BatchSampler::state).collect();
    run.check_writable()?;
    let security = security.resolve(&run)?;
    // Rewritten on every start: it describes the dataset this start loaded.
    forger_common::atomic::write_atomic(
        &dataset::report_path(run.root()),
        dataset::report(&dataset.skipped).as_bytes(),
    )?;

    cleanup.disarm();
    forger_common::atomic::write_atomic(&run.spec(), spec.to_toml().as_bytes())?;
    // A fresh start (allowed only with no checkpoints) begins a new log: lines left by a run
    // that never checkpointed belong to nothing that can be resumed.
    let metrics = MetricsLog::open(&run.metrics(), Some(state.step))?;
    let mut history = EventLog::open(&run.events())?;
    history.record(
        state.step,
        if resumed_from > 0 {
            "resumed-from-checkpoint"
        } else {
            "fresh-start"
        },
        serde_json::json!({ "shards": workers, "security": security.describe() }),
    );
    if !changed.is_empty() {
        history.record(state.step, "spec-changed", serde_json::json!({ "changes": changed }));
    }
    let image_size = spec.data.image_size as usize;
    let registry = Registry::new(Job {
        spec_toml: spec.to_toml(),
        fingerprint: layout::fingerprint(&spec.model, image_size),
        expected_workers: workers,
        dataset: Arc::new(dataset),
        shards,
    });

    let (events_tx, events_rx) = mpsc::channel(1024);
    let service = CoordinatorService::new(registry.clone(), events_tx);
    let address = listener
        .local_addr()
        .map_err(|e| CoordinatorError::io("failed to read the listening address", e))?;
    let (server_stop, server_stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .initial_stream_window_size(Some(wire::STREAM_WINDOW))
            .initial_connection_window_size(Some(wire::CONNECTION_WINDOW))
            .max_frame_size(Some(wire::MAX_FRAME))
            .add_service(CoordinatorServer::with_interceptor(service, security.require_token()))
            .serve_with_incoming_shutdown(
                listener::route(listener, Some(registry.clone()), security.clone()),
                async {
                    let _ = server_stopped.await;
                },
            ),
    );
    info!(%address, workers, security = security.describe(), "coordinator listening");

    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        info!("shutdown requested: finishing the current step");
        let _ = stop_tx.send(true);
    });

    let mut local = match &local_workers {
        Some(config) => Some(LocalCluster::start(config, address)?),
        None => None,
    };
    let peers = Peers::new(
        events_rx,
        registry.clone(),
        Duration::from_secs(spec.cluster.heartbeat_timeout_secs),
        stop,
    );
    let (monitor, status_server) = crate::monitor::start(monitoring, &run, &spec, resumed_from, quality.is_some())?;
    let logs = RunLogs {
        metrics,
        events: history,
        monitor,
        quality,
    };
    let mut trainer = Trainer::new(spec.clone(), run, logs, state, samplers, peers);
    // Local workers that all die before training starts (a broken install) would otherwise
    // leave us waiting for the join timeout. Once training runs, a lost worker is the
    // trainer's to handle: it evicts it and carries on.
    let gathered = match local.as_mut() {
        Some(cluster) => tokio::select! {
            gathered = trainer.gather() => gathered,
            failure = cluster.all_failed() => Err(failure),
        },
        None => trainer.gather().await,
    };
    let result = match gathered {
        Ok(()) => trainer.run().await,
        Err(CoordinatorError::Interrupted { .. }) => {
            // Like a stop mid-run: the workers wait for the coordinator to come back.
            trainer
                .dismiss(
                    "the coordinator was stopped before training began; it may be resumed",
                    true,
                )
                .await;
            Ok(RunSummary {
                step: resumed_from,
                interrupted: true,
                ..RunSummary::default()
            })
        }
        Err(e) => {
            trainer.dismiss(&format!("the run failed: {e}"), false).await;
            Err(e)
        }
    };
    if let Some(cluster) = local {
        match &result {
            // A stopped run may have left a worker stuck, or one that joined too late to be
            // dismissed: neither is a failure of the run.
            Ok(summary) if summary.interrupted => cluster.wait_or_kill(STOPPED_EXIT_TIMEOUT).await,
            Ok(_) => cluster.wait(LOCAL_EXIT_TIMEOUT).await,
            Err(_) => cluster.wait_or_kill(STOPPED_EXIT_TIMEOUT).await,
        }
    }
    if let Some(server) = status_server {
        server.stop(SERVER_DRAIN_TIMEOUT).await;
    }
    // Graceful shutdown waits for clients to hang up; a worker that never does must not hold
    // the coordinator open, so the wait is bounded.
    let _ = server_stop.send(());
    let server_abort = server.abort_handle();
    match tokio::time::timeout(SERVER_DRAIN_TIMEOUT, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, "grpc server ended with an error"),
        Ok(Err(e)) => warn!(error = %e, "grpc server task failed"),
        Err(_) => server_abort.abort(),
    }
    result
}

/// A fresh state, or the newest checkpoint's when resuming, with the settings that changed
/// since that checkpoint's spec (beyond `train.steps`, which is how a run is extended).
fn initial_state(spec: &JobSpec, run: &RunDir, resume: Resume) -> Result<(TrainingState, Vec<String>)> {
    let checkpoint::Newest { found: newest, skipped } = checkpoint::load_newest(&run.checkpoints())?;
    if resume == Resume::IfAny && newest.is_none() && skipped.is_empty() {
        info!(path = %run.root().display(), "no checkpoint in the run directory: starting fresh");
        return Ok((forger_common::init::fresh_state(spec), Vec::new()));
    }
    if resume == Resume::No {
        if newest.is_some() || !skipped.is_empty() {
            return Err(CoordinatorError::RunDir {
                path: run.root().to_path_buf(),
                message: "already holds checkpoints; pass --resume to continue that run, or choose another --out"
                    .into(),
            });
        }
        return Ok((forger_common::init::fresh_state(spec), Vec::new()));
    }
    let Some((path, checkpoint)) = newest else {
        return Err(CoordinatorError::RunDir {
            path: run.root().to_path_buf(),
            message: if skipped.is_empty() {
                "--resume was given but there is no checkpoint to resume from".into()
            } else {
                // The newest one's reason: another format or spec version, or damage.
                format!(
                    "--resume was given but no checkpoint loads ({} refused; the newest: {})",
                    skipped.len(),
                    skipped[0]
                )
            },
        });
    };
    let shape = |s: &JobSpec| {
        format!(
            "noise_dim {}, d_filters {:?}, g_filters {:?}, image_size {}",
            s.model.noise_dim, s.model.d_filters, s.model.g_filters, s.data.image_size
        )
    };
    if shape(&checkpoint.spec) != shape(spec) {
        return Err(forger_common::Error::CheckpointMismatch {
            path,
            message: format!(
                "it holds a model of {}, the spec asks for {}",
                shape(&checkpoint.spec),
                shape(spec)
            ),
        }
        .into());
    }
    info!(step = checkpoint.state.step, path = %path.display(), "resuming");
    let changed: Vec<String> = spec
        .changes_since(&checkpoint.spec)
        .into_iter()
        .filter(|change| !change.starts_with("train.steps:"))
        .collect();
    for change in &changed {
        // Allowed (lowering a learning rate late in a run is common practice), but the run is
        // then no longer the one the earlier steps belong to: say so, and record it.
        warn!(%change, "the spec differs from the checkpoint's; the run continues with the new value");
    }
    Ok((checkpoint.state, changed))
}

fn load_dataset(spec: &JobSpec) -> Result<PreparedDataset> {
    let path = &spec.data.path;
    let started = std::time::Instant::now();
    let dataset = dataset::load(path, spec.data.image_size, spec.data.limit)?;
    for skipped in dataset.skipped.iter().take(SKIPPED_LOGGED) {
        // Debug formatting quotes the name: a file called "x\nERROR ..." cannot forge a log line.
        warn!(file = ?skipped.file, kind = skipped.kind.label(), reason = ?skipped.reason, "skipped a file");
    }
    if let Some(summary) = dataset::summary(&dataset.skipped) {
        warn!(path = %path.display(), "{summary}; once the run starts, skipped-images.tsv in its directory lists them all");
    }
    info!(
        path = %path.display(),
        images = dataset.len(),
        skipped = dataset.skipped.len(),
        seconds = started.elapsed().as_secs_f64(),
        "dataset loaded"
    );
    let batch = spec.train.batch_size as usize;
    if dataset.len() < batch {
        return Err(CoordinatorError::Dataset {
            path: path.clone(),
            message: format!(
                "holds {} usable images ({}), fewer than one batch of {batch}",
                dataset.len(),
                dataset::summary(&dataset.skipped).unwrap_or_else(|| "none skipped".into())
            ),
        });
    }
    Ok(dataset)
}

fn check_shards(spec: &JobSpec, shards: &[Vec<u32>]) -> Result<()> {
    let batch = spec.train.batch_size as usize;
    let smallest = shards.iter().map(Vec::len).min().unwrap_or(0);
    if smallest < batch {
        // A spec problem (exit code 2): the batch does not fit this dataset's shards.
        return Err(forger_common::Error::SpecInvalid {
            origin: "for this dataset".into(),
            problems: vec![SpecProblem {
                field: "train.batch_size".into(),
                message: format!(
                    "{batch} is larger than a shard: {} images split among cluster.workers = {} leave {smallest} in the \
                     smallest; expected at most {smallest}",
                    shards.iter().map(Vec::len).sum::<usize>(),
                    shards.len()
                ),
            }],
        }
        .into());
    }
    Ok(())
}

/// Samplers continue where the checkpoint left them, unless the dataset or the worker count
/// changed, in which case the shards are new and the samplers start over.
fn samplers_for(spec: &JobSpec, state: &TrainingState, dataset_len: usize, shards: &[Vec<u32>]) -> Vec<BatchSampler> {
    let same_data = state.dataset_len == dataset_len && state.samplers.len() == shards.len();
    if !same_data && state.step > 0 {
        warn!(
            was_images = state.dataset_len,
            images = dataset_len,
            was_workers = state.samplers.len(),
            workers = shards.len(),
            "dataset or worker count changed since the checkpoint: shards start afresh"
        );
    }
    shards
        .iter()
        .enumerate()
        .map(|(rank, shard)| {
            let position = if same_data {
                state.samplers[rank]
            } else {
                SamplerState::default()
            };
            BatchSampler::new(spec.train.seed, rank as u32, shard.clone(), position)
        })
        .collect()
}
