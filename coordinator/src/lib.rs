//! The forger coordinator: it reads the dataset and shards it, owns the master parameters
//! and optimizer state as flat f32 buffers (no libtorch here), runs every step, all-reduces
//! the workers' gradients, decides the loss balancing and writes the run directory.
//!
//! - [`serve`]: the entry point; takes a bound listener and a shutdown future.
//! - `registry`, `service`: Join, FetchShard and Session over gRPC.
//! - `listener`, `data_link`: the one port's second kind of connection, the workers' data
//!   connections carrying gradients and parameters.
//! - `peers`: the trainer's handle on the worker sessions, with heartbeats and eviction.
//! - `assignment`: which worker holds which data shards.
//! - `trainer`: the step loop; `reduce`: chunk assembly and rank-order averaging.
//! - `run_dir`: checkpoints, samples, metrics; `local`: `--local-workers`.
//! - `quality`: the score at checkpoints; `monitor`: the console's progress, the status page's
//!   board ([`status`]), the training plot ([`plot`]) and TensorBoard's events ([`tensorboard`]).
//! - [`credentials`]: a new cluster's CA, certificates and job token.

mod assignment;
mod completed;
pub mod credentials;
mod data_link;
pub use forger_common::dataset;
mod error;
pub mod format;
mod listener;
pub mod local;
pub mod monitor;
mod peers;
pub mod plot;
mod quality;
pub mod reduce;
mod registry;
pub mod run_dir;
mod service;
mod start;
pub mod status;
pub mod tensorboard;
pub mod trainer;

pub use error::{CoordinatorError, Result};
pub use local::LocalWorkers;
pub use monitor::{Console, Monitoring, ProgressMode};
pub use start::{Resume, Security, ServeConfig, serve};
pub use trainer::RunSummary;
