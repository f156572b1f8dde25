//! One data shard on a worker, and the seeds of its part of a step. The compute thread and the
//! single-process loop both use these, so a shard's batch, noise and dropout are the same bits
//! whoever computes it.

use std::collections::HashMap;

use forger_common::seeds::{self, Stream};
use tch::Tensor;

use crate::error::{Result, WorkerError};

/// The dropout streams of the two training phases differ, so their masks are independent.
pub const DROPOUT_PHASE_D: u64 = 2;
pub const DROPOUT_PHASE_G: u64 = 3;

/// A shard's images as one `[count, size, size, 3]` byte tensor, and where each dataset index
/// sits in it.
#[derive(Debug)]
pub struct ShardStore {
    pub shard: u32,
    pub images: Tensor,
    positions: HashMap<u32, i64>,
}

impl ShardStore {
    /// `pixels` holds the images of `indices`, in that order, as interleaved RGB bytes.
    pub fn new(shard: u32, indices: &[u32], pixels: &[u8], size: u32) -> Result<ShardStore> {
        let side = i64::from(size);
        let images = Tensor::f_from_slice(pixels)?.f_view([indices.len() as i64, side, side, 3])?;
        let positions = indices.iter().enumerate().map(|(p, &i)| (i, p as i64)).collect();
        Ok(ShardStore {
            shard,
            images,
            positions,
        })
    }

    /// Where the dataset images of a batch sit in this shard; `step` names the request in errors.
    pub fn positions(&self, batch: &[u32], step: u64) -> Result<Vec<i64>> {
        batch
            .iter()
            .map(|i| {
                self.positions.get(i).copied().ok_or_else(|| {
                    WorkerError::Protocol(format!(
                        "step {step} asks for image {i}, which is not in shard {}",
                        self.shard
                    ))
                })
            })
            .collect()
    }
}

/// The seed of a shard's noise in a step.
pub fn noise_seed(job_seed: u64, step: u64, shard: u32) -> u64 {
    seeds::derive(job_seed, Stream::Noise, &[step, u64::from(shard)])
}

/// The seed of a shard's dropout masks in one phase of a step.
pub fn dropout_seed(job_seed: u64, step: u64, shard: u32, phase: u64) -> u64 {
    seeds::derive(job_seed, Stream::Dropout, &[step, u64::from(shard), phase])
}
