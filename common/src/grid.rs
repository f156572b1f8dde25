//! Tiles generated images into one PNG that a person can open, and enlarges them.

use std::io::Cursor;
use std::path::Path;

use image::{ImageFormat, Rgb, RgbImage};

use crate::{Error, Result};

/// Pixels between tiles, in a neutral grey.
const GAP: u32 = 2;

/// Arranges `count` square RGB images of side `size` (interleaved bytes, one after another)
/// in a near-square grid.
pub fn tile(pixels: &[u8], count: usize, size: u32) -> RgbImage {
    tile_columns(pixels, count, size, square_columns(count))
}

/// The number of columns of [`tile`]'s near-square grid for `count` images.
pub fn square_columns(count: usize) -> u32 {
    (count as f64).sqrt().ceil().max(1.0) as u32
}

/// Arranges `count` square RGB images of side `size` row after row, `columns` to a row: image
/// `i` lands in row `i / columns`, column `i % columns`.
pub fn tile_columns(pixels: &[u8], count: usize, size: u32, columns: u32) -> RgbImage {
    assert!(columns >= 1, "a grid needs at least one column");
    let per_image = (size * size * 3) as usize;
    assert_eq!(
        pixels.len(),
        per_image * count,
        "pixel buffer does not hold {count} images"
    );
    let (width, height) = dimensions(count, size, columns);
    let mut canvas = RgbImage::from_pixel(width as u32, height as u32, Rgb([128, 128, 128]));
    for (i, image) in pixels.chunks_exact(per_image).enumerate() {
        let (x0, y0) = cell_origin(i, size, columns);
        for (p, rgb) in image.chunks_exact(3).enumerate() {
            let (x, y) = (p as u32 % size, p as u32 / size);
            canvas.put_pixel(x0 + x, y0 + y, Rgb([rgb[0], rgb[1], rgb[2]]));
        }
    }
    canvas
}

/// Width and height in pixels of a grid of `count` images of side `size` in `columns`
/// columns, in `u64` so a caller can refuse a grid too large to build before building it.
pub fn dimensions(count: usize, size: u32, columns: u32) -> (u64, u64) {
    let columns = u64::from(columns.max(1));
    let rows = (count as u64).div_ceil(columns).max(1);
    let (size, gap) = (u64::from(size), u64::from(GAP));
    (columns * size + (columns + 1) * gap, rows * size + (rows + 1) * gap)
}

/// The top-left pixel of image `index`'s cell in a grid of images of side `size` in
/// `columns` columns.
pub fn cell_origin(index: usize, size: u32, columns: u32) -> (u32, u32) {
    let (col, row) = (index as u32 % columns, index as u32 / columns);
    (GAP + col * (size + GAP), GAP + row * (size + GAP))
}

/// One square image of side `size` from its interleaved RGB bytes.
pub fn image(pixels: &[u8], size: u32) -> RgbImage {
    RgbImage::from_raw(size, size, pixels.to_vec())
        .unwrap_or_else(|| panic!("pixel buffer of {} bytes is not one {size}x{size} image", pixels.len()))
}

/// `count` square images of side `size` (interleaved RGB, one after another), each enlarged
/// `scale` times by repeating every pixel (nearest neighbour): a 40x40 face is easier to look
/// at as 160x160, and no smoothing invents detail the generator did not draw.
pub fn upscale(pixels: &[u8], count: usize, size: u32, scale: u32) -> Vec<u8> {
    let (size, scale) = (size as usize, scale.max(1) as usize);
    assert_eq!(
        pixels.len(),
        size * size * 3 * count,
        "pixel buffer does not hold {count} images"
    );
    let side = size * scale;
    let mut out = Vec::with_capacity(side * side * 3 * count);
    for image in pixels.chunks_exact(size * size * 3) {
        for y in 0..side {
            let row = &image[(y / scale) * size * 3..][..size * 3];
            for rgb in row.chunks_exact(3) {
                for _ in 0..scale {
                    out.extend_from_slice(rgb);
                }
            }
        }
    }
    out
}

/// Encodes an image as PNG and writes it atomically.
pub fn save_png(path: &Path, image: &RgbImage) -> Result<()> {
    crate::atomic::write_atomic(path, &encode_png(path, image)?)
}

/// An image's PNG bytes; `path` only names the file it is meant for in an error.
pub fn encode_png(path: &Path, image: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .map_err(|cause| Error::Image {
            path: path.to_path_buf(),
            cause,
        })?;
    Ok(bytes)
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

    /// `count` 2x2 images, image `i` filled with `i * 40`.
    fn flat_images(count: u8) -> Vec<u8> {
        (0..count).flat_map(|i| std::iter::repeat_n(i * 40, 12)).collect()
    }

    #[test]
    fn places_each_image_in_its_cell() {
        // Five 2x2 images: a 3x2 grid.
        let grid = tile(&flat_images(5), 5, 2);
        assert_eq!(grid.dimensions(), (3 * 2 + 4 * GAP, 2 * 2 + 3 * GAP));
        assert_eq!(grid.get_pixel(GAP, GAP), &Rgb([0, 0, 0]));
        assert_eq!(grid.get_pixel(GAP + 2 + GAP, GAP), &Rgb([40, 40, 40]));
        assert_eq!(grid.get_pixel(GAP + 1, GAP + 2 + GAP + 1), &Rgb([120, 120, 120]));
        assert_eq!(grid.get_pixel(0, 0), &Rgb([128, 128, 128]));
    }

    #[test]
    fn a_given_number_of_columns_fills_rows_in_order() {
        // Six 2x2 images in 4 columns: rows of 4 and 2, the last two cells left grey.
        let grid = tile_columns(&flat_images(6), 6, 2, 4);
        assert_eq!(grid.dimensions(), (4 * 2 + 5 * GAP, 2 * 2 + 3 * GAP));
        let (w, h) = dimensions(6, 2, 4);
        assert_eq!((w as u32, h as u32), grid.dimensions());
        for i in 0..6 {
            let (x, y) = cell_origin(i, 2, 4);
            assert_eq!(
                (x, y),
                (GAP + (i as u32 % 4) * (2 + GAP), GAP + (i as u32 / 4) * (2 + GAP))
            );
            let v = i as u8 * 40;
            assert_eq!(grid.get_pixel(x + 1, y + 1), &Rgb([v, v, v]), "image {i}");
        }
        let (x, y) = cell_origin(7, 2, 4);
        assert_eq!(grid.get_pixel(x, y), &Rgb([128, 128, 128]));
        // One column: a single strip, top to bottom.
        assert_eq!(
            tile_columns(&flat_images(3), 3, 2, 1).dimensions(),
            (2 + 2 * GAP, 3 * 2 + 4 * GAP)
        );
        // The near-square grid is the same as asking for its columns.
        assert_eq!(
            tile(&flat_images(5), 5, 2),
            tile_columns(&flat_images(5), 5, 2, square_columns(5))
        );
    }

    #[test]
    fn upscaling_repeats_each_pixel() {
        // Two 2x2 images with four different pixels each.
        let pixels: Vec<u8> = (0..24u8).collect();
        let big = upscale(&pixels, 2, 2, 3);
        assert_eq!(big.len(), 2 * 6 * 6 * 3);
        for image in 0..2 {
            for y in 0..6 {
                for x in 0..6 {
                    let src = image * 12 + ((y / 3) * 2 + x / 3) * 3;
                    let dst = image * 108 + (y * 6 + x) * 3;
                    assert_eq!(big[dst..dst + 3], pixels[src..src + 3], "image {image} ({x}, {y})");
                }
            }
        }
        assert_eq!(upscale(&pixels, 2, 2, 1), pixels);
    }

    #[test]
    fn one_image_keeps_its_pixels() {
        let pixels: Vec<u8> = (0..12u8).collect();
        let img = image(&pixels, 2);
        assert_eq!(img.get_pixel(1, 0), &Rgb([3, 4, 5]));
        assert_eq!(img.get_pixel(0, 1), &Rgb([6, 7, 8]));
    }

    #[test]
    fn unit_values_round_and_clamp() {
        assert_eq!(unit_to_u8(&[-1.0, 0.0, 0.5, 1.0, 2.0]), vec![0, 0, 128, 255, 255]);
    }
}
