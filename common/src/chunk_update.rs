//! The coordinator's pass over a chunk once the last of its parts (in shard order) arrives:
//! decoding that part, adding it to the sum of the others, RMSProp, and the copy of the new
//! parameters that goes on the wire, fused into one loop so the chunk's memory is walked once.
//! Memory traffic, not arithmetic, bounds the coordinator's work, and done as four passes this
//! read and wrote each value about three times as often.
//!
//! The bits are those of the separate passes: each value's sum is formed in the same order
//! (`0 + w0 * v0 + w1 * v1 + ...`, as the zeroed buffer of `average::weighted_average` gives)
//! and `RmsProp::apply_into` follows on it.

use crate::compression::{GradientCompression, widen};
use crate::rmsprop::RmsProp;

/// The part that completes a chunk's sum.
#[derive(Debug, Clone, Copy)]
pub struct LastPart<'a> {
    /// Its values, encoded as the job's `gradient_compression` says.
    pub bytes: &'a [u8],
    pub weight: f32,
    /// No part came before it: the sum starts from zero, whatever the buffer holds.
    pub first: bool,
}

/// One chunk's slices of a network's optimizer state.
#[derive(Debug)]
pub struct ChunkState<'a> {
    /// The parameters and mean square the step started from; left as they are.
    pub params: &'a [f32],
    pub mean_square: &'a [f32],
    /// In: the weighted sum of the earlier parts. Out: the new mean square.
    pub sum_then_mean_square: &'a mut [f32],
    /// Out: the new parameters.
    pub new_params: &'a mut [f32],
}

/// Completes the chunk's mean with `part` and applies `optimizer`, returning the new parameters
/// as a fresh buffer for the wire, or `None` if a value of `part` is not finite (the outputs
/// then hold garbage, which the caller discards by undoing the step).
pub fn finish_chunk(
    optimizer: &RmsProp,
    compression: GradientCompression,
    part: LastPart<'_>,
    state: ChunkState<'_>,
) -> Option<Vec<f32>> {
    let len = state.params.len();
    assert!(
        [
            state.mean_square.len(),
            state.sum_then_mean_square.len(),
            state.new_params.len(),
            part.bytes.len() / compression.value_bytes(),
        ]
        .iter()
        .all(|&n| n == len),
        "chunk buffers differ in length"
    );
    match compression {
        GradientCompression::None => finish_decoded(optimizer, part, state, f32::from_le_bytes),
        GradientCompression::Bf16 => finish_decoded(optimizer, part, state, |b| widen(u16::from_le_bytes(b))),
    }
}

/// One loop per encoding, so each is compiled with its own decoding.
fn finish_decoded<const N: usize>(
    optimizer: &RmsProp,
    part: LastPart<'_>,
    state: ChunkState<'_>,
    decode: impl Fn([u8; N]) -> f32,
) -> Option<Vec<f32>> {
    let mut finite = true;
    for (((sum, bytes), (&w, &ms)), new_w) in state
        .sum_then_mean_square
        .iter_mut()
        .zip(part.bytes.chunks_exact(N))
        .zip(state.params.iter().zip(state.mean_square))
        .zip(state.new_params.iter_mut())
    {
        let v = decode(bytes.try_into().expect("chunks_exact gives N bytes"));
        finite &= v.is_finite();
        let earlier = if part.first { 0.0 } else { *sum };
        (*new_w, *sum) = optimizer.step(w, ms, earlier + part.weight * v);
    }
    // A copy while the chunk is still in cache; the spare buffer becomes the master copy.
    finite.then(|| state.new_params.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::average::weighted_average;

    fn values(seed: u32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) as f32 * 1e-9).sin() * 1e-2)
            .collect()
    }

    #[test]
    fn gives_the_bits_of_summing_then_applying() {
        let optimizer = RmsProp {
            lr: 2e-4,
            decay: 0.9,
            epsilon: 1e-10,
            l2: 1e-6,
        };
        let len = 1000;
        let params = values(1, len);
        let mean_square: Vec<f32> = values(2, len).iter().map(|v| v.abs() + 0.5).collect();
        let parts = [values(3, len), values(4, len), values(5, len)];
        let samples = [16u32, 5, 11];
        for count in 1..=3 {
            let contributions: Vec<(&[f32], u32)> = parts[..count]
                .iter()
                .zip(samples)
                .map(|(p, n)| (p.as_slice(), n))
                .collect();
            let mut mean = vec![0.0; len];
            weighted_average(&contributions, &mut mean);
            let (mut expected_w, mut expected_ms) = (params.clone(), mean_square.clone());
            optimizer.apply(&mut expected_w, &mut expected_ms, &mean);

            // The earlier parts summed as the streamed reduce sums them, over a buffer holding
            // garbage that the first part must not read.
            let total: u32 = samples[..count].iter().sum();
            let weight = |n: u32| (f64::from(n) / f64::from(total)) as f32;
            let mut sum = vec![f32::NAN; len];
            for (p, &n) in parts[..count - 1].iter().zip(&samples) {
                let first = std::ptr::eq(p, &parts[0]);
                GradientCompression::None.add_weighted(&mut sum, bytemuck::cast_slice(p), weight(n), first);
            }
            let mut new_params = vec![0.0; len];
            let wire = finish_chunk(
                &optimizer,
                GradientCompression::None,
                LastPart {
                    bytes: bytemuck::cast_slice(&parts[count - 1]),
                    weight: weight(samples[count - 1]),
                    first: count == 1,
                },
                ChunkState {
                    params: &params,
                    mean_square: &mean_square,
                    sum_then_mean_square: &mut sum,
                    new_params: &mut new_params,
                },
            )
            .expect("finite");
            assert_eq!(new_params, expected_w, "{count} parts");
            assert_eq!(wire, expected_w, "{count} parts");
            assert_eq!(sum, expected_ms, "{count} parts");
        }
    }

    #[test]
    fn a_value_that_is_not_finite_is_reported() {
        let optimizer = RmsProp {
            lr: 1e-3,
            decay: 0.9,
            epsilon: 1e-10,
            l2: 0.0,
        };
        let bf16 = [0x3f80u16, 0x7f80].map(u16::to_le_bytes).concat(); // 1.0, +inf
        let mut sum = [0.0; 2];
        let outcome = finish_chunk(
            &optimizer,
            GradientCompression::Bf16,
            LastPart {
                bytes: &bf16,
                weight: 1.0,
                first: true,
            },
            ChunkState {
                params: &[0.0; 2],
                mean_square: &[1.0; 2],
                sum_then_mean_square: &mut sum,
                new_params: &mut [0.0; 2],
            },
        );
        assert!(outcome.is_none());
    }
}
