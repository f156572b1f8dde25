//! What every forger process agrees on.
//!
//! - [`spec`]: the job spec (TOML), its defaults and its validation.
//! - [`layout`]: the flat, name-sorted order of every network's parameters and batch-norm
//!   statistics, which the coordinator and the workers check against each other.
//! - [`init`]: Glorot-uniform initialisation of a flat parameter buffer from a seed.
//! - [`rmsprop`]: TF1's RMSProp update and batch-norm running averages on flat buffers.
//! - [`balance`]: the article's loss-balancing rule.
//! - [`sampler`]: sharding the dataset and drawing each step's batches.
//! - [`seeds`]: the per-step seeds for noise and dropout.
//! - [`dataset`]: the image folder decoded, cropped and resized into training bytes.
//! - [`checkpoint`]: the training state and its atomic, checksummed safetensors file.
//! - [`average`]: the sample-weighted mean of per-shard buffers, in shard order.
//! - [`chunk_update`]: the coordinator's fused last pass over a chunk (sum, RMSProp, wire copy).
//! - [`atomic`]: crash-safe file replacement.
//! - [`faults`]: fail points that let tests crash a process at a chosen moment.
//! - [`grid`]: sample images tiled into one PNG.
//! - [`wire`]: f32 buffers to and from little-endian bytes.
//! - [`compression`]: bf16 gradients on the wire, with error feedback.
//! - [`quality`]: the sliced Wasserstein distance between real and generated images' patches.

pub mod atomic;
pub mod average;
pub mod balance;
pub mod checkpoint;
pub mod chunk_update;
pub mod compression;
pub mod dataset;
mod error;
pub mod faults;
pub mod grid;
pub mod init;
pub mod layout;
pub mod quality;
pub mod rmsprop;
pub mod sampler;
pub mod seeds;
pub mod spec;
pub mod wire;

pub use error::{Error, Result};
