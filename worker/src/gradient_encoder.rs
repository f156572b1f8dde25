//! Gradients into the bytes the coordinator expects, as the job's `gradient_compression`
//! says. With bf16, each shard the worker holds keeps an error-feedback residual per network
//! (see `forger_common::compression`); a worker that sends its shards' local sum as one
//! group keeps one residual per network for the group instead.

use std::collections::HashMap;

use bytes::Bytes;
use forger_common::compression::{ErrorFeedback, GradientCompression, widen_all};
use forger_common::wire;

use crate::replica::Net;

#[derive(Debug)]
pub struct GradientEncoder {
    compression: GradientCompression,
    residuals: HashMap<(u32, Net), ErrorFeedback>,
    /// Per network, the shards of the last group sent and its residual.
    groups: HashMap<Net, (Vec<u32>, ErrorFeedback)>,
}

impl GradientEncoder {
    pub fn new(compression: GradientCompression) -> Self {
        GradientEncoder {
            compression,
            residuals: HashMap::new(),
            groups: HashMap::new(),
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

    /// The wire bytes of a group's summed gradient of `net` at `step`, `shards` in shard
    /// order. The residual belongs to the group: the same shards again carry it on, other
    /// shards (a shard moved, or sits this update out) start from a zero residual, as a shard
    /// that moves to another worker does.
    pub fn encode_group(&mut self, step: u64, shards: &[u32], net: Net, gradient: Vec<f32>) -> Bytes {
        match self.compression {
            GradientCompression::None => wire::f32_bytes_owned(gradient),
            GradientCompression::Bf16 => {
                let (members, feedback) = self
                    .groups
                    .entry(net)
                    .or_insert_with(|| (shards.to_vec(), ErrorFeedback::new(gradient.len())));
                if members.as_slice() != shards {
                    *members = shards.to_vec();
                    *feedback = ErrorFeedback::new(gradient.len());
                }
                Bytes::from(feedback.compress(step, &gradient))
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
        self.groups
            .retain(|_, (members, _)| members.iter().all(|s| shards.contains(s)));
    }

    fn feedback(&mut self, shard: u32, net: Net, len: usize) -> &mut ErrorFeedback {
        self.residuals
            .entry((shard, net))
            .or_insert_with(|| ErrorFeedback::new(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forger_common::compression::widen_all;

    #[test]
    fn a_group_keeps_its_residual_until_its_shards_change() {
        let gradient = |step: u64| vec![0.1f32 * step as f32 + 1.0 / 3.0, -2.0 / 7.0];
        let mut encoder = GradientEncoder::new(GradientCompression::Bf16);
        let mut reference = ErrorFeedback::new(2);
        for step in 1..=3 {
            let sent = encoder.encode_group(step, &[0, 2], Net::Discriminator, gradient(step));
            assert_eq!(sent.to_vec(), reference.compress(step, &gradient(step)), "step {step}");
        }
        // The generator's group has a residual of its own.
        let fresh = ErrorFeedback::new(2).compress(3, &gradient(3));
        assert_eq!(
            encoder.encode_group(3, &[0, 2], Net::Generator, gradient(3)).to_vec(),
            fresh
        );
        // Other shards: a fresh residual, not the old group's.
        let moved = encoder.encode_group(4, &[0, 1, 2], Net::Discriminator, gradient(4));
        assert_eq!(moved.to_vec(), ErrorFeedback::new(2).compress(4, &gradient(4)));
        assert_ne!(
            widen_all(&moved),
            widen_all(&reference.compress(4, &gradient(4))),
            "the old residual would have changed the rounding"
        );
        // Dropping a shard of the group forgets the residual.
        encoder.retain(&[0, 1]);
        assert!(encoder.groups.is_empty());
    }

    #[test]
    fn f32_groups_go_as_they_are() {
        let mut encoder = GradientEncoder::new(GradientCompression::None);
        let sent = encoder.encode_group(1, &[0, 1], Net::Generator, vec![1.5, -0.25]);
        assert_eq!(sent, wire::f32_bytes(&[1.5, -0.25]));
    }
}
