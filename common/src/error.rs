use std::path::PathBuf;

/// Errors of the shared forger library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written. The cause is part of the message (not a
    /// `source`), so error chains do not print it twice.
    #[error("{action} {path}: {cause}")]
    File {
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    /// The job spec is not valid TOML or does not match the schema.
    #[error("invalid job spec {origin}: {message}")]
    SpecSyntax { origin: String, message: String },
    /// The job spec parsed but some values are out of range; one line per problem.
    #[error("invalid job spec {origin}:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    SpecInvalid {
        origin: String,
        problems: Vec<crate::spec::SpecProblem>,
    },
    /// A checkpoint file is damaged or does not hold what forger writes.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// A checkpoint belongs to a model of another shape.
    #[error("checkpoint {path} does not fit this job: {message}")]
    CheckpointMismatch { path: PathBuf, message: String },
    /// The image folder cannot be read.
    #[error("dataset {path}: {message}")]
    Dataset { path: PathBuf, message: String },
    /// An image could not be encoded.
    #[error("failed to encode {path}: {cause}")]
    Image { path: PathBuf, cause: image::ImageError },
    /// Images handed to the quality score do not fit it.
    #[error("quality score: {message}")]
    Quality { message: String },
}

/// Result with the shared library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn file(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::File {
            action,
            path: path.into(),
            cause: source,
        }
    }
}
