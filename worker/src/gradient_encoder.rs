//! Gradients into the bytes the coordinator expects, as the job's `gradient_compression`
//! says. With bf16, each shard the worker holds keeps an error-feedback residual per network
//! (see `forger_common::compression`).

use std::collections::HashMap;

use bytes::Bytes;
use forger_common::compression::{ErrorFeedback, GradientCompression, widen_all};
use forger_common::wire;

use crate::replica::Net;

#[derive(Debug)]
pub struct GradientEncoder {
    compression: GradientCompression,
    residuals: HashMap<(u32, Net), ErrorFeedback>,
}

impl GradientEncoder {
    pub fn new(compression: GradientCompression) -> Self {
        GradientEncoder {
            compression,
            residuals: HashMap::new(),
        }
    }

    /// Bytes per value in what `encode` returns.
    pub fn value_bytes(&self) -> usize {
        self.compression.value_bytes()
    }

    /// The wire bytes of `shard`'s gradient of `net` at `step`; f32 goes as it is, without a
    /// copy.
    pub fn encode(&mut self, step: u64, shard: u32, net: Net, gradient: Vec<f32>) -> Bytes {
        match self.compression {
            GradientCompression::None => wire::f32_bytes_owned(gradient),
            GradientCompression::Bf16 => {
                Bytes::from(self.feedback(shard, net, gradient.len()).compress(step, &gradient))
            }
        }
    }

    /// What the coordinator will decode from `encode`'s bytes: the single-process loop
    /// averages these so that it keeps the cluster's bits.
    pub fn delivered(&mut self, step: u64, shard: u32, net: Net, gradient: Vec<f32>) -> Vec<f32> {
        match self.compression {
            GradientCompression::None => gradient,
            GradientCompression::Bf16 => {
                widen_all(&self.feedback(shard, net, gradient.len()).compress(step, &gradient))
            }
        }
    }

    /// Forgets the residuals of shards the worker no longer holds. A shard that moves to
    /// another worker starts there from a zero residual: at most one step's rounding of its
    /// gradient is dropped, not carried.
    pub fn retain(&mut self, shards: &[u32]) {
        self.residuals.retain(|(shard, _), _| shards.contains(shard));
    }

    fn feedback(&mut self, shard: u32, net: Net, len: usize) -> &mut ErrorFeedback {
        self.residuals
            .entry((shard, net))
            .or_insert_with(|| ErrorFeedback::new(len))
    }
}
