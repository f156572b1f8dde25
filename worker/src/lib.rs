//! A forger worker: computes the DCGAN's losses and gradients with libtorch.
//!
//! - [`model`]: the article's discriminator and generator with TF1's padding, resize and
//!   batch-norm semantics, their variables named and shaped as `forger_common::layout` says.
//! - [`replica`]: one worker's copy of both networks on a device: loading flat parameters,
//!   evaluating losses, computing gradients and batch-norm statistics, sampling images.
//! - [`client`]: Join, shard download and the Session stream with the coordinator.
//! - [`data_link`]: the data connection beside the Session, carrying gradients and
//!   parameters.
//! - [`replica_set`]: a worker's replicas (`--devices`), one thread each, computing shards in
//!   parallel.
//! - [`compute`]: the thread that drives the replicas and follows the coordinator's steps.
//! - [`gradient_encoder`]: gradients to wire bytes, bf16 with error feedback when asked.
//! - [`device`]: `--device` and `--devices` names to libtorch devices.
//! - [`libtorch_threads`]: only the replica threads run libtorch's parallel operations.
//! - [`generate`]: faces from a checkpoint: a grid, single images, walks between two draws;
//!   [`score`]: checkpoints' quality scores.
//! - [`error`]: the crate's error type.

pub mod bench;
pub mod client;
pub mod compute;
pub mod data_link;
pub mod device;
pub mod error;
pub mod generate;
pub mod gradient_encoder;
pub mod libtorch_threads;
pub mod model;
pub mod replica;
pub mod replica_set;
pub mod score;
pub mod shard;
