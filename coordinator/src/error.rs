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
    /// A worker broke the protocol, failed, disappeared or timed out.
    #[error("worker {worker} ({host}) at step {step}, phase {phase}: {message}")]
    Worker {
        worker: u64,
        host: String,
        step: u64,
        phase: &'static str,
        message: String,
    },
    /// A worker's losses were not finite: the parameters are ruined.
    #[error(
        "worker {worker} ({host}) at step {step}, phase evaluate: reported non-finite losses (loss_d {loss_d}, \
         loss_g {loss_g}): training has diverged; lower the learning rates and resume from an earlier checkpoint"
    )]
    Diverged {
        worker: u64,
        host: String,
        step: u64,
        loss_d: f64,
        loss_g: f64,
    },
    /// Not enough workers joined in time.
    #[error("only {joined} of {expected} workers joined within {secs} s")]
    JoinTimeout { joined: usize, expected: usize, secs: u64 },
    /// A request arrived that the coordinator cannot serve.
    #[error("{0}")]
    Refused(String),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Training was stopped by a shutdown signal.
    #[error("stopped by signal at step {step}")]
    Interrupted { step: u64 },
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
            CoordinatorError::Worker { .. } => tonic::Status::invalid_argument(message),
            _ => tonic::Status::internal(message),
        }
    }
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
