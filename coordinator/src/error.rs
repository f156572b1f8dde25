use std::path::PathBuf;

/// Errors of the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A shared-library operation failed (spec, checkpoint, file).
    #[error(transparent)]
    Common(#[from] forger_common::Error),
    /// A file or socket operation failed (the cause is part of the message).
    #[error("{action}: {cause}")]
    Io { action: String, cause: std::io::Error },
    /// The dataset cannot feed this job.
    #[error("dataset {path}: {message}")]
    Dataset { path: PathBuf, message: String },
    /// The run directory holds something that conflicts with the request.
    #[error("run directory {path}: {message}")]
    RunDir { path: PathBuf, message: String },
    /// A worker broke the protocol, failed, disappeared or timed out. The trainer evicts it
    /// and carries on without it.
    #[error("worker {worker} ({host}) at step {step}, phase {phase}: {message}")]
    Worker {
        worker: u64,
        host: String,
        step: u64,
        phase: &'static str,
        message: String,
    },
    /// A shard's gradient held a NaN or an infinity. Its chunks may already be in the streamed
    /// mean, so the step is undone and run again with the shard left out of that phase.
    #[error("worker {worker}, shard {shard} at step {step}, phase {phase}: the gradient is not finite")]
    NonFiniteGradient {
        worker: u64,
        shard: u32,
        step: u64,
        phase: &'static str,
    },
    /// Every shard's losses stayed non-finite for many steps in a row: the model itself has
    /// diverged (no non-finite value was ever applied, so the last checkpoint is sound).
    #[error(
        "at step {step}: no shard gave finite losses for {steps} steps in a row: training has diverged; lower the \
         learning rates and resume from an earlier checkpoint"
    )]
    Diverged { step: u64, steps: u32 },
    /// Not enough workers joined in time.
    #[error("only {joined} of {expected} workers joined within {secs} s")]
    JoinTimeout { joined: usize, expected: usize, secs: u64 },
    /// A request arrived that the coordinator cannot serve.
    #[error("{0}")]
    Refused(String),
    /// Every worker place is taken; a joining worker should try again later.
    #[error("{0}")]
    ClusterFull(String),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The training plot could not be drawn.
    #[error("training plot: {0}")]
    Plot(String),
    /// Training was stopped by a shutdown signal.
    #[error("stopped by signal at step {step}")]
    Interrupted { step: u64 },
    /// `forger-coordinator status` was given an address it cannot fetch.
    #[error("the status page address {url} is not usable: {reason}")]
    StatusUrl { url: String, reason: String },
    /// The status page did not answer (refused, unreachable, too slow).
    #[error("could not reach the status page at {url}: {reason}")]
    StatusUnreachable { url: String, reason: String },
    /// The status page answered with an error.
    #[error("the status page at {url} answered {status}: {body}")]
    StatusHttp { url: String, status: String, body: String },
    /// The status page answered with something that is not a status.
    #[error("the status page at {url} sent something that is not a forger status: {what}")]
    StatusMalformed { url: String, what: String },
}

impl CoordinatorError {
    pub(crate) fn io(action: impl Into<String>, source: std::io::Error) -> Self {
        CoordinatorError::Io {
            action: action.into(),
            cause: source,
        }
    }
}

impl From<CoordinatorError> for tonic::Status {
    fn from(error: CoordinatorError) -> Self {
        let message = error.to_string();
        match error {
            CoordinatorError::Refused(_) => tonic::Status::failed_precondition(message),
            CoordinatorError::ClusterFull(_) => tonic::Status::resource_exhausted(message),
            CoordinatorError::Worker { .. } => tonic::Status::invalid_argument(message),
            _ => tonic::Status::internal(message),
        }
    }
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
