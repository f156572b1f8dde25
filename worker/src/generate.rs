//! `forger-worker generate`: faces from a checkpoint, as one grid image, as single images, or
//! as walks between two draws of noise.
//!
//! Image `i` of a plain draw comes from noise row `i` of `--seed`. A walk of `K` frames goes
//! from noise row `i` of `--seed` to noise row `i` of `--to-seed`, for each of the `count`
//! rows; its grid holds one walk per row and one frame per column.

use std::path::{Path, PathBuf};

use forger_common::{checkpoint, grid, seeds};
use tch::{Device, Tensor};

use crate::error::{Result, WorkerError};
use crate::replica::{Net, Replica};

/// Most images in one draw (`--count`).
pub const MAX_COUNT: usize = 4096;
/// Most frames in one walk (`--interpolate`).
pub const MAX_FRAMES: usize = 256;
/// Most images drawn in all (`--count` times `--interpolate`): what the generator is asked
/// for, and held as bytes, at once.
pub const MAX_IMAGES: usize = 4096;
/// Largest upscale factor (`--scale`): 40x40 faces become 640x640.
pub const MAX_SCALE: u32 = 16;
/// Largest grid (`--out`) in pixels: 64 Mi, 192 MiB of RGB in memory before encoding.
pub const MAX_GRID_PIXELS: u64 = 1 << 26;
/// Noise rows per generator call, so a large draw does not hold every activation at once.
const SAMPLE_BATCH: usize = 256;

/// A walk between two draws of noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// Frames per walk, both ends included (`--interpolate`).
    pub frames: usize,
    /// Seed of the noise the walks end at (`--to-seed`).
    pub to_seed: u64,
}

/// What `generate` draws and where it writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Images, or walks when `walk` is set (`--count`).
    pub count: usize,
    /// Seed of the noise (`--seed`); a walk starts from it.
    pub seed: u64,
    pub walk: Option<Walk>,
    /// Nearest-neighbour upscale factor of every image written, in the grid too (`--scale`).
    pub scale: u32,
    /// The grid PNG (`--out`).
    pub grid: Option<PathBuf>,
    /// A folder for one PNG per image (`--images`), named by [`Request::image_file_name`].
    pub images: Option<PathBuf>,
}

/// What `generate` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Images drawn.
    pub images: usize,
    /// The grid's width and height, when one was written.
    pub grid: Option<(u32, u32)>,
    /// Single image files written.
    pub files: usize,
}

impl Request {
    /// Frames per row: a walk's length, or 1.
    pub fn frames(&self) -> usize {
        self.walk.map_or(1, |walk| walk.frames)
    }

    /// Images drawn in all.
    pub fn total(&self) -> usize {
        self.count.saturating_mul(self.frames())
    }

    /// The grid's columns: a walk's frames, or near-square.
    pub fn columns(&self) -> u32 {
        match self.walk {
            Some(walk) => walk.frames as u32,
            None => grid::square_columns(self.count),
        }
    }

    /// Every flag out of range, each named, in one error; the checkpoint is not needed.
    pub fn check(&self) -> Result<()> {
        let mut problems = Vec::new();
        if !(1..=MAX_COUNT).contains(&self.count) {
            problems.push(format!("--count must be 1 to {MAX_COUNT}, found {}", self.count));
        }
        if let Some(walk) = self.walk {
            if !(2..=MAX_FRAMES).contains(&walk.frames) {
                problems.push(format!(
                    "--interpolate must be 2 to {MAX_FRAMES} frames (both ends included), found {}",
                    walk.frames
                ));
            } else if self.count <= MAX_COUNT && self.total() > MAX_IMAGES {
                problems.push(format!(
                    "--count {} times --interpolate {} is {} images, more than {MAX_IMAGES}",
                    self.count,
                    walk.frames,
                    self.total()
                ));
            }
        }
        if !(1..=MAX_SCALE).contains(&self.scale) {
            problems.push(format!("--scale must be 1 to {MAX_SCALE}, found {}", self.scale));
        }
        match &self.grid {
            Some(out) if !out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) => {
                problems.push(format!("--out {} must name a .png file", out.display()));
            }
            None if self.images.is_none() => {
                problems.push("nothing to write: give --out FILE.png, --images DIR or both".into())
            }
            _ => {}
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(WorkerError::Usage(problems.join("; ")))
        }
    }

    /// Refuses a grid of images of side `image_size` too large to hold in memory.
    fn check_grid(&self, image_size: u32) -> Result<()> {
        if self.grid.is_none() {
            return Ok(());
        }
        let side = image_size.saturating_mul(self.scale);
        let (width, height) = grid::dimensions(self.total(), side, self.columns());
        if width * height > MAX_GRID_PIXELS || width > u64::from(u32::MAX) || height > u64::from(u32::MAX) {
            return Err(WorkerError::Usage(format!(
                "--out: the grid would be {width}x{height} pixels, more than {MAX_GRID_PIXELS}; \
                 lower --scale, --count or --interpolate, or write only --images"
            )));
        }
        Ok(())
    }

    /// The file of image `index` (grid order) in the `--images` folder: `0007.png` is image 7
    /// of a plain draw, from noise row 7; `0002-05.png` is frame 5 of walk 2. The numbers are
    /// zero-padded to the widest index, so the names sort in grid order.
    pub fn image_file_name(&self, index: usize) -> String {
        let row_digits = digits(self.count.saturating_sub(1)).max(4);
        match self.walk {
            None => format!("{index:0row_digits$}.png"),
            Some(walk) => {
                let frame_digits = digits(walk.frames - 1).max(2);
                let (row, frame) = (index / walk.frames, index % walk.frames);
                format!("{row:0row_digits$}-{frame:0frame_digits$}.png")
            }
        }
    }

    /// The generator's input for every image, row after row in grid order.
    pub fn noise(&self, dim: usize) -> Vec<f32> {
        let from = seeds::uniform_noise(self.seed, self.count, dim);
        match self.walk {
            None => from,
            Some(walk) => walk_noise(
                &from,
                &seeds::uniform_noise(walk.to_seed, self.count, dim),
                dim,
                walk.frames,
            ),
        }
    }
}

/// Walks from each row of `from` to the same row of `to` (rows of `dim` values) in `frames`
/// steps, both ends included: frame `j` is `a + (b - a) * j / (frames - 1)`, walk after walk.
///
/// Linear, not spherical: the noise is uniform in the cube [0, 1)^dim, which is convex, so
/// every point on the segment is a point the generator was trained on. Spherical
/// interpolation is for Gaussian noise, whose mass lies near a sphere that a straight chord
/// would cut inside; here it would leave the cube. The sum is done in f64, where `b - a` is
/// exact, so the ends are the two draws to the bit and no frame leaves their range.
pub fn walk_noise(from: &[f32], to: &[f32], dim: usize, frames: usize) -> Vec<f32> {
    assert_eq!(from.len(), to.len(), "walk ends hold different numbers of values");
    assert!(
        dim >= 1 && from.len().is_multiple_of(dim),
        "walk ends are not rows of {dim} values"
    );
    assert!(frames >= 2, "a walk needs at least two frames");
    let last = (frames - 1) as f64;
    let mut out = Vec::with_capacity(from.len() * frames);
    for (a, b) in from.chunks_exact(dim).zip(to.chunks_exact(dim)) {
        for j in 0..frames {
            let t = j as f64 / last;
            out.extend(a.iter().zip(b).map(|(&a, &b)| {
                let (a, b) = (f64::from(a), f64::from(b));
                (a + (b - a) * t) as f32
            }));
        }
    }
    out
}

/// Draws what `request` asks from the checkpoint's generator and writes it.
pub fn generate(checkpoint_path: &Path, request: &Request, device: Device) -> Result<Written> {
    request.check()?;
    let checkpoint = checkpoint::load(checkpoint_path)?;
    let spec = &checkpoint.spec;
    let size = spec.data.image_size;
    request.check_grid(size)?;
    let mut replica = Replica::new(&spec.model, size as usize, device)?;
    replica.set_params(Net::Generator, &checkpoint.state.generator.params)?;
    replica.set_batch_norm_running(&checkpoint.state.batch_norm)?;
    let dim = spec.model.noise_dim as usize;
    let pixels = draw(&replica, &request.noise(dim), dim)?;
    let (pixels, side) = match request.scale {
        1 => (pixels, size),
        scale => (grid::upscale(&pixels, request.total(), size, scale), size * scale),
    };
    let mut written = Written {
        images: request.total(),
        grid: None,
        files: 0,
    };
    if let Some(dir) = &request.images {
        std::fs::create_dir_all(dir).map_err(|e| forger_common::Error::File {
            action: "failed to create the images folder",
            path: dir.clone(),
            cause: e,
        })?;
        let per_image = (side * side * 3) as usize;
        for (i, image) in pixels.chunks_exact(per_image).enumerate() {
            grid::save_png(&dir.join(request.image_file_name(i)), &grid::image(image, side))?;
            written.files += 1;
        }
    }
    if let Some(out) = &request.grid {
        let image = grid::tile_columns(&pixels, request.total(), side, request.columns());
        grid::save_png(out, &image)?;
        written.grid = Some(image.dimensions());
    }
    Ok(written)
}

/// The generator's images for `noise` (rows of `dim`), as interleaved RGB bytes.
fn draw(replica: &Replica, noise: &[f32], dim: usize) -> Result<Vec<u8>> {
    let mut pixels = Vec::new();
    for rows in noise.chunks(SAMPLE_BATCH * dim) {
        let batch = Tensor::f_from_slice(rows)?.f_reshape([(rows.len() / dim) as i64, dim as i64])?;
        pixels.extend(replica.sample(&batch)?);
    }
    Ok(pixels)
}

/// Decimal digits of `n`.
fn digits(n: usize) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

#[cfg(test)]
mod tests;
