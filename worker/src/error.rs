//! The worker library's error type.

use crate::replica::Net;

/// Everything the worker library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The model spec cannot describe the article's network.
    #[error("invalid model spec: {0}")]
    Spec(String),
    /// A network's variables differ from the layout every process agreed on.
    #[error("{net} variables do not match the layout: {problem}")]
    Layout { net: Net, problem: String },
    /// A flat buffer from outside has the wrong number of values.
    #[error("{what} holds {found} values, expected {expected}")]
    Length {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    /// A tensor from outside has the wrong shape.
    #[error("{what} has shape {found:?}, expected {expected}")]
    Shape {
        what: &'static str,
        expected: String,
        found: Vec<i64>,
    },
    /// A command-line value is out of range or cannot work; the message names the flag.
    #[error("{0}")]
    Usage(String),
    /// The requested device cannot be used.
    #[error("device: {0}")]
    Device(String),
    /// A replica's thread failed to start or stopped, or the replicas of this process hold
    /// different parameters.
    #[error("replica: {0}")]
    Replica(String),
    /// The coordinator or this worker broke the protocol, or the session ended unexpectedly.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The session closed while the compute thread was sending a result.
    #[error("the session to the coordinator closed")]
    SessionClosed,
    /// The connection to the coordinator ended unexpectedly.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// A gRPC call failed. Only the code and message are shown: tonic's own display repeats
    /// them with its internal details.
    #[error("the coordinator answered {:?}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    /// A spec, checkpoint or file problem from the shared library.
    #[error(transparent)]
    Common(#[from] forger_common::Error),
    /// libtorch refused an operation.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// The worker library's result type.
pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

impl WorkerError {
    /// Whether trying again later may succeed: the coordinator is unreachable, restarting, or
    /// has no free place right now (a lost worker's place frees once it is evicted).
    pub fn is_transient(&self) -> bool {
        use tonic::Code;
        match self {
            WorkerError::Disconnected(_) | WorkerError::SessionClosed => true,
            WorkerError::Status(status) => matches!(
                status.code(),
                Code::Unavailable
                    | Code::Cancelled
                    | Code::Unknown
                    | Code::ResourceExhausted
                    | Code::NotFound
                    | Code::Aborted
            ),
            _ => false,
        }
    }
}

impl From<tonic::Status> for WorkerError {
    fn from(status: tonic::Status) -> Self {
        WorkerError::Status(status)
    }
}
