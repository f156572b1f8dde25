//! The score as a job measures it: the ruler (patch positions, directions) and the generated
//! noise both come from the job seed, so the coordinator at each checkpoint and
//! `forger-worker score` afterwards measure the same thing.

use crate::Result;
use crate::seeds::{self, Stream};
use crate::spec::JobSpec;

use super::{SwdReference, SwdSettings};

/// One request for generated images: how many, from which noise seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageRequest {
    pub count: u32,
    pub seed: u64,
}

/// The reference a job scores against, from its held-out images' pixels.
pub fn reference(spec: &JobSpec, held_out_pixels: &[u8]) -> Result<SwdReference> {
    let settings = SwdSettings {
        seed: seeds::derive(spec.train.seed, Stream::QualityScore, &[]),
        ..SwdSettings::default()
    };
    let side = spec.data.image_size as usize;
    let count = held_out_pixels.len() / (3 * side * side);
    SwdReference::new(held_out_pixels, count, spec.data.image_size, &settings)
}

/// The generated set cut into messages a sample answer can carry, each from its own seed and
/// the same at every checkpoint: the score then follows the generator, not the noise.
pub fn requests(spec: &JobSpec) -> Vec<ImageRequest> {
    let per_message = spec.samples_per_message();
    let total = spec.quality.generated;
    (0..total.div_ceil(per_message))
        .map(|index| ImageRequest {
            count: per_message.min(total - index * per_message),
            seed: seeds::derive(spec.train.seed, Stream::QualityNoise, &[u64::from(index)]),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: u32, generated: u32) -> JobSpec {
        let text = format!(
            "version = 1\n[data]\npath = \"faces\"\nimage_size = {size}\n[checkpoint]\nsamples = 4\n[quality]\ngenerated = {generated}\n"
        );
        JobSpec::parse(&text, "test").unwrap()
    }

    #[test]
    fn the_generated_set_is_cut_into_messages_with_their_own_fixed_seeds() {
        // 40 px: one message carries all 512.
        let small = requests(&spec(40, 512));
        assert_eq!(small.len(), 1);
        assert_eq!(small[0].count, 512);
        // 256 px: 16 per message (3 MiB), so 100 images take 7 messages, the last of 4.
        let large = requests(&spec(256, 100));
        assert_eq!(
            large.iter().map(|r| r.count).collect::<Vec<_>>(),
            vec![16, 16, 16, 16, 16, 16, 4]
        );
        let seeds: std::collections::HashSet<u64> = large.iter().map(|r| r.seed).collect();
        assert_eq!(seeds.len(), 7);
        assert_eq!(large, requests(&spec(256, 100)));
    }
}
