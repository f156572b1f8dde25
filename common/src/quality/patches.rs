//! Where the 7x7 patches sit, and copying them out of a pyramid level as descriptors.

use rand_chacha::rand_core::Rng;

use crate::seeds;

/// A patch's side in pixels (Karras et al.'s neighbourhood).
pub(crate) const PATCH: usize = 7;
/// Values in one descriptor: 7x7 pixels of 3 channels, ordered channel, row, column.
pub(crate) const DIMS: usize = PATCH * PATCH * 3;
/// Values of one channel in a descriptor.
pub(crate) const PER_CHANNEL: usize = PATCH * PATCH;

/// The patches of one level, image after image: `per_image` top-left corners per image.
#[derive(Debug)]
pub(crate) struct Placement {
    pub(crate) side: usize,
    pub(crate) per_image: usize,
    /// Top-left corners as offsets `y * side + x` into a channel plane.
    pub(crate) corners: Vec<u32>,
}

impl Placement {
    /// The patches of `images` images at a level of side `side`.
    ///
    /// A level with no more places than `wanted` (the coarsest of 40x40 images has 16) uses
    /// every place once per image: the same distribution a random draw aims at, without its
    /// noise. Otherwise each image gets `wanted` places drawn uniformly (with replacement, as
    /// Karras et al. do) from `stream` of `seed`, image after image, so image `i` gets the
    /// same places whatever the number of images: the real and the generated sets are sampled
    /// alike and identical sets score exactly 0.
    pub(crate) fn new(side: usize, images: usize, wanted: usize, seed: u64, stream: u64) -> Self {
        let room = side - PATCH + 1;
        if room * room <= wanted {
            let one: Vec<u32> = (0..room * room)
                .map(|p| ((p / room) * side + p % room) as u32)
                .collect();
            return Self {
                side,
                per_image: one.len(),
                corners: one.repeat(images),
            };
        }
        let mut rng = seeds::rng(seed);
        rng.set_stream(stream);
        // Multiply-shift maps 32 random bits onto 0..room; the bias (room / 2^32) is immaterial.
        let mut draw = || ((u64::from(rng.next_u32()) * room as u64) >> 32) as usize;
        let corners = (0..images * wanted)
            .map(|_| {
                let (y, x) = (draw(), draw());
                (y * side + x) as u32
            })
            .collect();
        Self {
            side,
            per_image: wanted,
            corners,
        }
    }

    /// Descriptors of this level in all.
    pub(crate) fn len(&self) -> usize {
        self.corners.len()
    }

    /// Copies the descriptor of patch `index` out of the image's level (planar `[3][side][side]`).
    pub(crate) fn copy(&self, index: usize, level: &[f32], out: &mut [f32]) {
        let plane = self.side * self.side;
        let corner = self.corners[index] as usize;
        for c in 0..3 {
            for dy in 0..PATCH {
                let from = c * plane + corner + dy * self.side;
                let to = c * PER_CHANNEL + dy * PATCH;
                out[to..to + PATCH].copy_from_slice(&level[from..from + PATCH]);
            }
        }
    }
}

/// Mean and standard deviation of each colour channel over a set of descriptors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChannelStats {
    pub(crate) mean: [f32; 3],
    pub(crate) std: [f32; 3],
}

/// Sums for [`ChannelStats`], in f64 so millions of values add up without drift.
#[derive(Debug, Default)]
pub(crate) struct StatsSum {
    count: u64,
    sum: [f64; 3],
    squares: [f64; 3],
}

impl StatsSum {
    pub(crate) fn add(&mut self, descriptor: &[f32]) {
        self.count += PER_CHANNEL as u64;
        for (c, values) in descriptor.chunks_exact(PER_CHANNEL).enumerate() {
            let (mut s, mut q) = (0.0f64, 0.0f64);
            for &v in values {
                s += f64::from(v);
                q += f64::from(v) * f64::from(v);
            }
            self.sum[c] += s;
            self.squares[c] += q;
        }
    }

    /// The statistics; a channel that never varies gets a deviation of 1, so it divides nothing
    /// by zero and its (constant) values still compare.
    pub(crate) fn finish(&self) -> ChannelStats {
        let n = self.count.max(1) as f64;
        let mean = self.sum.map(|s| s / n);
        let mut std = [1.0f32; 3];
        for c in 0..3 {
            let var = (self.squares[c] / n - mean[c] * mean[c]).max(0.0);
            if var.sqrt() > 1e-6 {
                std[c] = var.sqrt() as f32;
            }
        }
        ChannelStats {
            mean: mean.map(|m| m as f32),
            std,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_levels_use_every_place_once() {
        let p = Placement::new(10, 2, 64, 1, 1);
        assert_eq!(p.per_image, 16);
        assert_eq!(p.len(), 32);
        assert_eq!(&p.corners[..5], &[0, 1, 2, 3, 10]);
        assert_eq!(p.corners[15], 33);
    }

    #[test]
    fn drawn_places_fit_and_do_not_depend_on_the_image_count() {
        let few = Placement::new(40, 3, 64, 9, 1);
        let many = Placement::new(40, 10, 64, 9, 1);
        assert_eq!(few.corners[..], many.corners[..few.len()]);
        assert!(
            many.corners
                .iter()
                .all(|&c| (c as usize / 40) <= 33 && (c as usize % 40) <= 33)
        );
        let other = Placement::new(40, 3, 64, 9, 2);
        assert_ne!(few.corners, other.corners);
    }

    #[test]
    fn descriptors_are_channel_row_column() {
        let side = 10;
        let level: Vec<f32> = (0..3 * side * side).map(|v| v as f32).collect();
        let p = Placement {
            side,
            per_image: 1,
            corners: vec![(2 * side + 3) as u32],
        };
        let mut d = vec![0.0; DIMS];
        p.copy(0, &level, &mut d);
        assert_eq!(d[0], 23.0);
        assert_eq!(d[6], 29.0);
        assert_eq!(d[7], 33.0);
        assert_eq!(d[PER_CHANNEL], 123.0);
        assert_eq!(d[DIMS - 1], (200 + 8 * 10 + 9) as f32);
    }
}
