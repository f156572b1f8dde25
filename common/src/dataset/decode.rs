//! One file to `size x size` RGB bytes, the way a photo is meant to be seen: turned upright as
//! its EXIF orientation says, transparency laid over white, any bit depth or colour model
//! (grey, CMYK, 16-bit) converted to 8-bit RGB; then the centre square, resized.
//!
//! Decoding is bounded: an image wider or taller than [`MAX_SIDE`], or whose pixels would take
//! more than [`MAX_DECODE_BYTES`], is refused before its pixels are allocated, so a small file
//! that expands to gigabytes (a decompression bomb) costs nothing.

use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits, RgbImage};

use super::skip::{SkipKind, Skipped};

/// The longest side decoded, in pixels: larger than any camera's.
pub const MAX_SIDE: u32 = 16_384;
/// The most memory one image's pixels may take while decoding.
pub const MAX_DECODE_BYTES: u64 = 512 << 20;
/// An image whose shorter side is under this fraction of the training size is skipped: it
/// would be enlarged more than twice, and blur is not what the model should learn.
pub const MIN_SIDE_FRACTION: f64 = 0.5;

/// Decodes `path` into `size x size` interleaved RGB bytes, or says why not.
pub fn prepare_image(path: &Path, size: u32) -> Result<Vec<u8>, Skipped> {
    let skip = |kind, reason: String| Skipped::new(path, kind, reason);
    let bytes = std::fs::metadata(path).map_err(|e| skip(SkipKind::Unreadable, format!("cannot stat: {e}")))?;
    if bytes.len() == 0 {
        return Err(skip(SkipKind::Empty, "zero bytes".into()));
    }
    let mut reader = ImageReader::open(path)
        .map_err(|e| skip(SkipKind::Unreadable, format!("cannot open: {e}")))?
        .with_guessed_format()
        .map_err(|e| skip(SkipKind::Unreadable, format!("cannot read: {e}")))?;
    if reader.format().is_none() {
        return Err(skip(
            SkipKind::NotAnImage,
            "neither its content nor its name is a known image format (JPEG, PNG, GIF, WebP, BMP)".into(),
        ));
    }
    if reader.format() == Some(ImageFormat::Jpeg) {
        check_jpeg_end(path).map_err(|reason| skip(SkipKind::Damaged, reason))?;
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let failed = |e: ImageError| skip(kind_of(&e), e.to_string());
    let mut decoder = reader.into_decoder().map_err(failed)?;
    // The limits above are only as strict as each decoder makes them; the header's own
    // count of bytes is checked here before a byte of pixels is allocated.
    let (w, h) = decoder.dimensions();
    if decoder.total_bytes() > MAX_DECODE_BYTES {
        return Err(skip(
            SkipKind::TooLarge,
            format!(
                "{w}x{h} pixels of {:?} would take {} MiB to decode, over the limit of {} MiB",
                decoder.color_type(),
                decoder.total_bytes() >> 20,
                MAX_DECODE_BYTES >> 20
            ),
        ));
    }
    // A broken EXIF block is no reason to lose the picture: it stays as stored.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(failed)?;
    image.apply_orientation(orientation);

    let (w, h) = (image.width(), image.height());
    let min_side = (f64::from(size) * MIN_SIDE_FRACTION).ceil() as u32;
    if w.min(h) < min_side.max(1) {
        return Err(skip(
            SkipKind::TooSmall,
            format!("{w}x{h} pixels; training at {size}x{size} needs a shorter side of at least {min_side}"),
        ));
    }
    let side = w.min(h);
    let square = image.crop_imm((w - side) / 2, (h - side) / 2, side, side);
    let resized = square.resize_exact(size, size, FilterType::Triangle);
    Ok(over_white(resized).into_raw())
}

/// RGB of an image, any transparency composited over white (dropping alpha would show
/// whatever colour the transparent pixels happen to store, often black).
fn over_white(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba8();
    let mut rgb = RgbImage::new(rgba.width(), rgba.height());
    for (out, pixel) in rgb.pixels_mut().zip(rgba.pixels()) {
        let alpha = u32::from(pixel[3]);
        for c in 0..3 {
            let value = u32::from(pixel[c]) * alpha + 255 * (255 - alpha);
            out[c] = ((value + 127) / 255) as u8;
        }
    }
    rgb
}

/// JPEG decoders conceal a cut-off file (the missing rows come out grey), so a JPEG must end
/// with its end-of-image marker, give or take padding. Data some cameras append after the
/// marker would be refused too; the report names such a file.
fn check_jpeg_end(path: &Path) -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL: u64 = 64;
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let len = file.metadata().map_err(|e| format!("cannot stat: {e}"))?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL)))
        .map_err(|e| format!("cannot read: {e}"))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).map_err(|e| format!("cannot read: {e}"))?;
    let end = tail
        .iter()
        .rposition(|&b| !matches!(b, 0 | b'\r' | b'\n' | b' ' | b'\t'));
    match end {
        Some(i) if i >= 1 && tail[i - 1..=i] == [0xFF, 0xD9] => Ok(()),
        _ => Err("truncated: the JPEG does not end with its end-of-image marker".into()),
    }
}

fn kind_of(error: &ImageError) -> SkipKind {
    match error {
        ImageError::Limits(_) => SkipKind::TooLarge,
        ImageError::IoError(e) if e.kind() != std::io::ErrorKind::UnexpectedEof => SkipKind::Unreadable,
        ImageError::Unsupported(_) => SkipKind::NotAnImage,
        _ => SkipKind::Damaged,
    }
}
