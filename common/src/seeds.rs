//! Every random draw of a run comes from a seed derived here, so a run is a function of the
//! job seed: the same on every machine, and the same after a resume.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

/// What a stream of random numbers is for; part of its seed so the streams never overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    InitDiscriminator = 1,
    InitGenerator = 2,
    Shards = 3,
    Epoch = 4,
    Noise = 5,
    Dropout = 6,
    SampleNoise = 7,
    /// Which images are held out for the quality score.
    HeldOut = 8,
    /// The generated images scored at each checkpoint.
    QualityNoise = 9,
    /// The quality score's patch positions and projection directions.
    QualityScore = 10,
}

/// Mixes the parts of a seed into one well-spread `u64` (SplitMix64's finaliser on each part).
pub fn derive(job_seed: u64, stream: Stream, parts: &[u64]) -> u64 {
    let mut state = splitmix(job_seed ^ splitmix(stream as u64));
    for &part in parts {
        state = splitmix(state ^ splitmix(part.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    }
    state
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A portable generator (ChaCha8) from a derived seed.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A uniform f32 in [0, 1) from the top 24 bits, so every value is exactly representable.
pub fn unit_f32(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// `count * dim` noise values, uniform in [0, 1), row after row.
pub fn uniform_noise(seed: u64, count: usize, dim: usize) -> Vec<f32> {
    let mut rng = rng(seed);
    (0..count * dim).map(|_| unit_f32(&mut rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_reproducible_and_in_range() {
        let a = uniform_noise(derive(7, Stream::Noise, &[3, 1]), 16, 16);
        let b = uniform_noise(derive(7, Stream::Noise, &[3, 1]), 16, 16);
        assert_eq!(a, b);
        assert!(a.iter().all(|v| (0.0..1.0).contains(v)));
        let c = uniform_noise(derive(7, Stream::Noise, &[3, 2]), 16, 16);
        assert_ne!(a, c);
    }

    #[test]
    fn streams_differ() {
        assert_ne!(derive(1, Stream::Noise, &[0]), derive(1, Stream::Dropout, &[0]));
        assert_ne!(derive(1, Stream::Noise, &[1, 2]), derive(1, Stream::Noise, &[2, 1]));
    }
}
