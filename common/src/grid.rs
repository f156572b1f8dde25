//! Tiles generated images into one PNG that a person can open.

use std::io::Cursor;
use std::path::Path;

use image::{ImageFormat, Rgb, RgbImage};

use crate::{Error, Result};

/// Pixels between tiles, in a neutral grey.
const GAP: u32 = 2;

/// Arranges `count` square RGB images of side `size` (interleaved bytes, one after another)
/// in a near-square grid.
pub fn tile(pixels: &[u8], count: usize, size: u32) -> RgbImage {
    let per_image = (size * size * 3) as usize;
    assert_eq!(
        pixels.len(),
        per_image * count,
        "pixel buffer does not hold {count} images"
    );
    let columns = (count as f64).sqrt().ceil().max(1.0) as u32;
    let rows = (count as u32).div_ceil(columns).max(1);
    let width = columns * size + (columns + 1) * GAP;
    let height = rows * size + (rows + 1) * GAP;
    let mut canvas = RgbImage::from_pixel(width, height, Rgb([128, 128, 128]));
    for (i, image) in pixels.chunks_exact(per_image).enumerate() {
        let (col, row) = (i as u32 % columns, i as u32 / columns);
        let (x0, y0) = (GAP + col * (size + GAP), GAP + row * (size + GAP));
        for (p, rgb) in image.chunks_exact(3).enumerate() {
            let (x, y) = (p as u32 % size, p as u32 / size);
            canvas.put_pixel(x0 + x, y0 + y, Rgb([rgb[0], rgb[1], rgb[2]]));
        }
    }
    canvas
}

/// Encodes an image as PNG and writes it atomically.
pub fn save_png(path: &Path, image: &RgbImage) -> Result<()> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .map_err(|cause| Error::Image {
            path: path.to_path_buf(),
            cause,
        })?;
    crate::atomic::write_atomic(path, &bytes)
}

/// Converts values in [0, 1] to bytes, rounding to nearest.
pub fn unit_to_u8(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_each_image_in_its_cell() {
        // Five 2x2 images: a 3x2 grid.
        let pixels: Vec<u8> = (0..5u8).flat_map(|i| std::iter::repeat_n(i * 40, 12)).collect();
        let grid = tile(&pixels, 5, 2);
        assert_eq!(grid.dimensions(), (3 * 2 + 4 * GAP, 2 * 2 + 3 * GAP));
        assert_eq!(grid.get_pixel(GAP, GAP), &Rgb([0, 0, 0]));
        assert_eq!(grid.get_pixel(GAP + 2 + GAP, GAP), &Rgb([40, 40, 40]));
        assert_eq!(grid.get_pixel(GAP + 1, GAP + 2 + GAP + 1), &Rgb([120, 120, 120]));
        assert_eq!(grid.get_pixel(0, 0), &Rgb([128, 128, 128]));
    }

    #[test]
    fn unit_values_round_and_clamp() {
        assert_eq!(unit_to_u8(&[-1.0, 0.0, 0.5, 1.0, 2.0]), vec![0, 0, 128, 255, 255]);
    }
}
