//! Reading the image folder into the prepared dataset the workers train on (the coordinator's,
//! and the single-process benchmark loop's).
//!
//! Every file under the folder (subfolders included, see [`listing`]) is tried: it either
//! decodes into the job's image size ([`decode`]) or is skipped with its reason ([`skip`]),
//! which the caller reports as one summary line and a report file.

mod decode;
mod listing;
mod skip;

use std::path::{Path, PathBuf};

pub use decode::{MAX_DECODE_BYTES, MAX_SIDE, MIN_SIDE_FRACTION, prepare_image};
pub use skip::{SkipKind, Skipped, report, report_path, summary};

use crate::Result;

/// The training images, ready to ship to workers.
#[derive(Debug)]
pub struct PreparedDataset {
    pub image_size: u32,
    /// `len() * image_size^2 * 3` bytes.
    pub pixels: Vec<u8>,
    /// The source file of each image.
    pub files: Vec<PathBuf>,
    /// Files that were passed over, with the reason, sorted by path.
    pub skipped: Vec<Skipped>,
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

    /// The images at `indices`, one after another: a shard, or the held-out set.
    pub fn gather(&self, indices: &[u32]) -> Vec<u8> {
        let mut pixels = Vec::with_capacity(indices.len() * self.image_bytes());
        for &i in indices {
            pixels.extend_from_slice(self.image(i as usize));
        }
        pixels
    }
}

/// Loads the dataset, decoding on every core straight into one buffer of the final size (each
/// thread fills its own slice of it), so loading costs no more memory than the dataset.
///
/// `limit` keeps the first files by path (0: all); files skipped among them are not replaced.
pub fn load(dir: &Path, size: u32, limit: usize) -> Result<PreparedDataset> {
    let listing::Listing {
        mut files,
        skipped: passed_over,
    } = listing::list(dir)?;
    if limit > 0 {
        files.truncate(limit);
    }
    let image_bytes = (size * size * 3) as usize;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len().max(1));
    let per_thread = files.len().div_ceil(threads.max(1)).max(1);
    let mut pixels = vec![0u8; files.len() * image_bytes];
    let failures: Vec<Option<Skipped>> = std::thread::scope(|scope| {
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
            Some(skipped) => dataset.skipped.push(skipped),
        }
    }
    dataset.skipped.sort_by(|a, b| a.file.cmp(&b.file));
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
        std::fs::write(dir.path().join("notes.txt"), b"some notes").unwrap();
        let data = load(dir.path(), 8, 0).unwrap();
        assert_eq!(data.len(), 1);
        let skipped: Vec<(&str, SkipKind)> = data
            .skipped
            .iter()
            .map(|s| (s.file.file_name().unwrap().to_str().unwrap(), s.kind))
            .collect();
        assert_eq!(
            skipped,
            [("broken.jpg", SkipKind::Damaged), ("notes.txt", SkipKind::NotAnImage)]
        );
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
