//! A quality score for generated images that needs no downloaded network: the sliced
//! Wasserstein distance (SWD) between patches of the Laplacian pyramids of real and generated
//! images, after Karras et al. 2018 ("Progressive growing of GANs", section 5 and appendix D).
//!
//! 1. Each image's Laplacian pyramid ([`pyramid`]): binomial 5-tap filter, halving the side
//!    while it stays at least 10 (a 7x7 patch then has 4x4 places). For 40x40 images the
//!    levels are 40 and 20 (details) and 10 (the low-pass residual); 5x5 would hold no patch.
//!    Karras et al. stop at 16 for 1024x1024 images; our images are too small for that.
//! 2. From every level, [`SwdSettings::patches_per_image`] 7x7x3 patches per image at seeded
//!    places, each a 147-value descriptor ([`patches`]). A level with fewer places than that
//!    (the 10x10 residual has 16) gives every place once per image instead. Image `i` gets the
//!    same places in both sets, so identical sets score exactly 0.
//! 3. Each level's descriptors are normalised per colour channel with the mean and standard
//!    deviation of the *real* set's descriptors at that level, for both sets. Karras et al.'s
//!    code normalises each set by its own statistics, which hides a colour shift or a contrast
//!    change of the generated set; with the real set's, such a shift shows (mostly in the
//!    residual level). Then the shared mean no longer matters (a common offset of both
//!    projections cancels) but it is subtracted anyway, for rounding's sake.
//! 4. Per level, [`SwdSettings::directions`] random unit directions; both sets are projected
//!    on each, the projections sorted, and the 1-D Wasserstein distance taken (the mean
//!    absolute difference of the sorted values; with unequal counts, of the quantile
//!    functions). The level's score is the mean over directions ([`swd`]).
//!
//! Scores are reported per level, finest first, and as their mean, times 1e3 as Karras et al.
//! report them. The real set's sorted projections are computed once ([`SwdReference::new`]);
//! scoring a generated set projects and sorts only that set.
//!
//! Random streams of [`crate::seeds::rng`]`(seed)`: `2 l + 1` places the patches of level `l`,
//! `2 l + 2` draws its directions.

pub mod job;
mod patches;
mod pyramid;
mod swd;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};
use patches::{DIMS, Placement, StatsSum};
use swd::{Projector, ROWS, SortScratch};

/// The smallest image side scored: below it the pyramid would have a single 7x7-patch level.
pub const MIN_SIZE: u32 = 16;
/// The fewest images per set: with fewer the patch sample is so small that the score is noise.
pub const MIN_IMAGES: usize = 16;

/// How the score samples patches and directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwdSettings {
    /// Patches drawn per image and level (Karras et al.: 128).
    pub patches_per_image: usize,
    /// Random directions per level (Karras et al.: 512).
    pub directions: usize,
    /// Seeds the patch places and the directions.
    pub seed: u64,
}

impl Default for SwdSettings {
    /// 64 patches and 128 directions. Measured on 512 vs 512 shared faces of 40x40 on one core:
    /// a score takes 0.15 s (0.2-0.4 s with other builds running), a reference about as long,
    /// and real-vs-real varies by about 3% over seeds. 512 directions or 256 patches cost 2 to 4
    /// times as long and changed that spread by less than its own uncertainty (5 seeds); most of
    /// it is the residual level's, whose 16 places per image are all used, so it comes from the
    /// directions. The reference's sorted projections take 38 MB at these values.
    fn default() -> Self {
        Self {
            patches_per_image: 64,
            directions: 128,
            seed: 0x5344_0001,
        }
    }
}

/// A generated set's distance to the real set, times 1e3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwdScore {
    /// One score per pyramid level, finest first (for 40x40: 40, 20, 10).
    pub levels: Vec<f64>,
    /// The mean of `levels`.
    pub mean: f64,
}

/// One level of the real set.
struct LevelReference {
    side: usize,
    projector: Projector,
    /// The real descriptors' projections, sorted, direction after direction.
    sorted: Vec<f32>,
    /// Descriptors of the real set at this level.
    descriptors: usize,
}

/// The real set, ready to score generated sets against.
pub struct SwdReference {
    size: u32,
    count: usize,
    settings: SwdSettings,
    levels: Vec<LevelReference>,
}

impl std::fmt::Debug for SwdReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwdReference")
            .field("size", &self.size)
            .field("count", &self.count)
            .field("settings", &self.settings)
            .field("levels", &self.levels.iter().map(|l| l.side).collect::<Vec<_>>())
            .finish()
    }
}

impl SwdReference {
    /// Prepares the real set: `count` interleaved RGB images of side `size`, one after another
    /// (the layout of [`crate::dataset::PreparedDataset::pixels`]).
    pub fn new(real_pixels: &[u8], count: usize, size: u32, settings: &SwdSettings) -> Result<Self> {
        if size < MIN_SIZE {
            return Err(problem(format!(
                "images of side {size} are too small (at least {MIN_SIZE})"
            )));
        }
        if settings.patches_per_image == 0 || settings.directions == 0 {
            return Err(problem(format!(
                "patches_per_image and directions must be at least 1 (got {} and {})",
                settings.patches_per_image, settings.directions
            )));
        }
        check_pixels("real", real_pixels, count, size)?;
        let sides = pyramid::level_sides(size as usize);
        let planes = pyramids(real_pixels, count, &sides);
        let mut scratch = SortScratch::default();
        let levels = sides
            .iter()
            .zip(&planes)
            .enumerate()
            .map(|(l, (&side, data))| {
                let placement =
                    Placement::new(side, count, settings.patches_per_image, settings.seed, 2 * l as u64 + 1);
                let mut stats = StatsSum::default();
                let mut descriptor = [0.0f32; DIMS];
                for index in 0..placement.len() {
                    placement.copy(index, image_level(data, &placement, index), &mut descriptor);
                    stats.add(&descriptor);
                }
                let projector = Projector::new(settings.directions, settings.seed, 2 * l as u64 + 2, &stats.finish());
                let mut sorted = project_all(data, &placement, &projector);
                for column in sorted.chunks_exact_mut(placement.len()) {
                    swd::sort(column, &mut scratch);
                }
                LevelReference {
                    side,
                    projector,
                    sorted,
                    descriptors: placement.len(),
                }
            })
            .collect();
        Ok(Self {
            size,
            count,
            settings: *settings,
            levels,
        })
    }

    /// Scores `count` generated images, laid out as the real ones and of the same side.
    pub fn score(&self, generated_pixels: &[u8], count: usize) -> Result<SwdScore> {
        check_pixels("generated", generated_pixels, count, self.size)?;
        let sides: Vec<usize> = self.levels.iter().map(|l| l.side).collect();
        let planes = pyramids(generated_pixels, count, &sides);
        let mut scratch = SortScratch::default();
        let levels: Vec<f64> = self
            .levels
            .iter()
            .zip(&planes)
            .enumerate()
            .map(|(l, (real, data))| {
                let s = &self.settings;
                let placement = Placement::new(real.side, count, s.patches_per_image, s.seed, 2 * l as u64 + 1);
                let mut projected = project_all(data, &placement, &real.projector);
                let total: f64 = projected
                    .chunks_exact_mut(placement.len())
                    .zip(real.sorted.chunks_exact(real.descriptors))
                    .map(|(column, reference)| {
                        swd::sort(column, &mut scratch);
                        swd::wasserstein_sorted(reference, column)
                    })
                    .sum();
                total / real.projector.directions() as f64 * 1e3
            })
            .collect();
        let mean = levels.iter().sum::<f64>() / levels.len() as f64;
        Ok(SwdScore { levels, mean })
    }

    /// The side of the images this reference scores.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// How many real images it holds.
    pub fn count(&self) -> usize {
        self.count
    }

    pub fn settings(&self) -> &SwdSettings {
        &self.settings
    }

    /// The sides of its pyramid levels, finest first (the order of [`SwdScore::levels`]).
    pub fn level_sides(&self) -> Vec<u32> {
        self.levels.iter().map(|l| l.side as u32).collect()
    }
}

fn problem(message: String) -> Error {
    Error::Quality { message }
}

/// Checks that `pixels` holds `count` images of side `size`, and that `count` is enough.
fn check_pixels(what: &str, pixels: &[u8], count: usize, size: u32) -> Result<()> {
    if count < MIN_IMAGES {
        return Err(problem(format!(
            "{count} {what} images are too few (at least {MIN_IMAGES})"
        )));
    }
    let per_image = (size as usize).pow(2) * 3;
    if pixels.len() == per_image * count {
        return Ok(());
    }
    // Name the side the buffer would fit, the likeliest mistake.
    let fits = if pixels.len().is_multiple_of(3 * count) {
        let area = pixels.len() / (3 * count);
        let side = area.isqrt();
        if side * side == area {
            format!(", as if they were {side}x{side}")
        } else {
            String::new()
        }
    } else {
        String::new()
    };
    Err(problem(format!(
        "{what} pixels hold {} bytes, not {count} images of {size}x{size} RGB ({} bytes){fits}",
        pixels.len(),
        per_image * count
    )))
}

/// The Laplacian pyramids of all images, one buffer per level: image after image, each planar
/// `[3][side][side]`.
fn pyramids(pixels: &[u8], count: usize, sides: &[usize]) -> Vec<Vec<f32>> {
    let mut levels: Vec<Vec<f32>> = sides.iter().map(|n| vec![0.0; count * 3 * n * n]).collect();
    let mut scratch = pyramid::Scratch::default();
    let per_image = sides[0] * sides[0] * 3;
    for (i, image) in pixels.chunks_exact(per_image).enumerate() {
        let mut views: Vec<&mut [f32]> = levels
            .iter_mut()
            .zip(sides)
            .map(|(level, n)| &mut level[i * 3 * n * n..(i + 1) * 3 * n * n])
            .collect();
        pyramid::laplacian(image, sides, &mut views, &mut scratch);
    }
    levels
}

/// The level planes of the image patch `index` belongs to.
fn image_level<'a>(data: &'a [f32], placement: &Placement, index: usize) -> &'a [f32] {
    let plane = 3 * placement.side * placement.side;
    let image = index / placement.per_image;
    &data[image * plane..(image + 1) * plane]
}

/// Every descriptor of a level projected on every direction: `[directions][descriptors]`.
fn project_all(data: &[f32], placement: &Placement, projector: &Projector) -> Vec<f32> {
    let n = placement.len();
    let mut out = vec![0.0f32; projector.directions() * n];
    let mut block = [0.0f32; ROWS * DIMS];
    for first in (0..n).step_by(ROWS) {
        let rows = ROWS.min(n - first);
        for (r, descriptor) in block.chunks_exact_mut(DIMS).enumerate().take(rows) {
            placement.copy(first + r, image_level(data, placement, first + r), descriptor);
        }
        projector.project(&block, rows, &mut out, n, first);
    }
    out
}

#[cfg(test)]
mod tests;
