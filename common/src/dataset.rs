//! Reading the image folder into the prepared dataset the workers train on (the coordinator's,
//! and the single-process benchmark loop's).
//!
//! Each file is decoded, centre-cropped to a square, resized to the job's image size and kept
//! as interleaved RGB bytes. Files that do not decode are skipped and counted with their
//! reason; the caller reports them.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;

use crate::{Error, Result};

/// File endings read as images (compared case-insensitively).
const IMAGE_ENDINGS: &[&str] = &["jpg", "jpeg", "png", "bmp", "gif", "webp"];

/// The training images, ready to ship to workers.
#[derive(Debug)]
pub struct PreparedDataset {
    pub image_size: u32,
    /// `len() * image_size^2 * 3` bytes.
    pub pixels: Vec<u8>,
    /// The source file of each image.
    pub files: Vec<PathBuf>,
    /// Files that were passed over, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

impl PreparedDataset {
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn image_bytes(&self) -> usize {
        (self.image_size * self.image_size * 3) as usize
    }

    /// The bytes of image `index`.
    pub fn image(&self, index: usize) -> &[u8] {
        let n = self.image_bytes();
        &self.pixels[index * n..(index + 1) * n]
    }
}

/// Image files to read and entries passed over with the reason.
type Listing = (Vec<PathBuf>, Vec<(PathBuf, String)>);

/// Lists the folder's image files sorted by name, keeping the first `limit` (0: all).
fn list_images(dir: &Path, limit: usize) -> Result<Listing> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::Dataset {
        path: dir.to_path_buf(),
        message: format!("cannot read the folder: {e}"),
    })?;
    let mut files = Vec::new();
    let mut passed_over = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::Dataset {
            path: dir.to_path_buf(),
            message: format!("cannot list the folder: {e}"),
        })?;
        let path = entry.path();
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_ENDINGS.iter().any(|known| e.eq_ignore_ascii_case(known)));
        if !is_image {
            continue;
        }
        // Only regular files (symlinks followed): a FIFO named `x.jpg` would block a reader.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => files.push(path),
            Ok(_) => passed_over.push((path, "not a regular file".to_string())),
            Err(e) => passed_over.push((path, format!("cannot stat: {e}"))),
        }
    }
    files.sort();
    if limit > 0 {
        files.truncate(limit);
    }
    Ok((files, passed_over))
}

/// Decodes one file into `size x size` RGB bytes.
pub fn prepare_image(path: &Path, size: u32) -> std::result::Result<Vec<u8>, String> {
    let image = image::ImageReader::open(path)
        .map_err(|e| format!("cannot open: {e}"))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?
        .decode()
        .map_err(|e| format!("cannot decode: {e}"))?;
    let (w, h) = (image.width(), image.height());
    if w == 0 || h == 0 {
        return Err("image has no pixels".into());
    }
    let side = w.min(h);
    let square = image.crop_imm((w - side) / 2, (h - side) / 2, side, side);
    let resized = square.resize_exact(size, size, FilterType::Triangle);
    Ok(resized.to_rgb8().into_raw())
}

/// Loads the dataset, decoding on every core straight into one buffer of the final size (each
/// thread fills its own slice of it), so loading costs no more memory than the dataset.
pub fn load(dir: &Path, size: u32, limit: usize) -> Result<PreparedDataset> {
    let (files, passed_over) = list_images(dir, limit)?;
    let image_bytes = (size * size * 3) as usize;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len().max(1));
    let per_thread = files.len().div_ceil(threads.max(1)).max(1);
    let mut pixels = vec![0u8; files.len() * image_bytes];
    let failures: Vec<Option<String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .chunks(per_thread)
            .zip(pixels.chunks_mut(per_thread * image_bytes))
            .map(|(part, slots)| {
                scope.spawn(move || {
                    part.iter()
                        .zip(slots.chunks_exact_mut(image_bytes))
                        .map(|(file, slot)| {
                            prepare_image(file, size)
                                .map(|bytes| slot.copy_from_slice(&bytes))
                                .err()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("image decoding thread panicked"))
            .collect()
    });
    // Close the gaps the skipped files left, keeping the order of the rest.
    let mut dataset = PreparedDataset {
        image_size: size,
        pixels: Vec::new(),
        files: Vec::with_capacity(files.len()),
        skipped: passed_over,
    };
    for (index, (file, failure)) in files.into_iter().zip(failures).enumerate() {
        match failure {
            None => {
                let to = dataset.files.len() * image_bytes;
                pixels.copy_within(index * image_bytes..(index + 1) * image_bytes, to);
                dataset.files.push(file);
            }
            Some(reason) => dataset.skipped.push((file, reason)),
        }
    }
    pixels.truncate(dataset.files.len() * image_bytes);
    pixels.shrink_to_fit();
    dataset.pixels = pixels;
    Ok(dataset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    #[test]
    fn crops_to_the_centre_square_and_resizes() {
        let dir = tempfile::tempdir().unwrap();
        // 30x10: red left third, green middle, blue right third. The centre square is green.
        let mut img = RgbImage::new(30, 10);
        for (x, _, p) in img.enumerate_pixels_mut() {
            *p = match x {
                0..10 => Rgb([255, 0, 0]),
                10..20 => Rgb([0, 255, 0]),
                _ => Rgb([0, 0, 255]),
            };
        }
        img.save(dir.path().join("a.png")).unwrap();
        let bytes = prepare_image(&dir.path().join("a.png"), 4).unwrap();
        assert_eq!(bytes.len(), 4 * 4 * 3);
        assert!(bytes.chunks(3).all(|p| p == [0, 255, 0]), "{bytes:?}");
    }

    #[test]
    fn broken_files_are_skipped_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        RgbImage::new(8, 8).save(dir.path().join("good.png")).unwrap();
        std::fs::write(dir.path().join("broken.jpg"), b"not a jpeg").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
        std::fs::create_dir(dir.path().join("folder.png")).unwrap();
        let mut data = load(dir.path(), 8, 0).unwrap();
        assert_eq!(data.len(), 1);
        assert_eq!(data.skipped.len(), 2);
        assert!(
            data.skipped
                .iter()
                .any(|(f, r)| f.ends_with("folder.png") && r == "not a regular file")
        );
        data.skipped.retain(|(f, _)| f.ends_with("broken.jpg"));
        assert!(data.skipped[0].0.ends_with("broken.jpg"));
        assert!(data.skipped[0].1.contains("decode"), "{}", data.skipped[0].1);
    }

    #[test]
    fn limit_keeps_the_first_files_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["c.png", "a.png", "b.png"] {
            RgbImage::new(8, 8).save(dir.path().join(name)).unwrap();
        }
        let data = load(dir.path(), 8, 2).unwrap();
        let names: Vec<_> = data.files.iter().map(|f| f.file_name().unwrap().to_owned()).collect();
        assert_eq!(names, vec!["a.png", "b.png"]);
    }

    #[test]
    fn a_missing_folder_is_named() {
        let err = load(Path::new("/no/such/folder"), 8, 0).unwrap_err();
        assert!(err.to_string().contains("/no/such/folder"), "{err}");
    }
}
