//! The files of a dataset folder and its subfolders, links followed, each folder read once
//! however many links lead to it (so a link loop ends), sorted by path so that every process
//! and every run sees the same order.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::skip::{SkipKind, Skipped};
use crate::{Error, Result};

/// Files to decode, and entries passed over on the way.
#[derive(Debug, Default)]
pub struct Listing {
    pub files: Vec<PathBuf>,
    pub skipped: Vec<Skipped>,
}

/// Lists `root` recursively. Only `root` itself must be readable; a subfolder that is not
/// is reported and passed over.
pub fn list(root: &Path) -> Result<Listing> {
    let dataset_error = |message: String| Error::Dataset {
        path: root.to_path_buf(),
        message,
    };
    let canonical_root =
        std::fs::canonicalize(root).map_err(|e| dataset_error(format!("cannot read the folder: {e}")))?;
    if !canonical_root.is_dir() {
        return Err(dataset_error("is not a folder".into()));
    }
    let mut listing = Listing::default();
    let mut seen = HashSet::from([canonical_root]);
    let mut folders = vec![root.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let entries = match std::fs::read_dir(&folder) {
            Ok(entries) => entries,
            Err(e) if folder == root => return Err(dataset_error(format!("cannot read the folder: {e}"))),
            Err(e) => {
                listing.skipped.push(Skipped::new(
                    &folder,
                    SkipKind::Unreadable,
                    format!("cannot list the folder: {e}"),
                ));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    let reason = format!("cannot list the folder: {e}");
                    listing
                        .skipped
                        .push(Skipped::new(&folder, SkipKind::Unreadable, reason));
                    break;
                }
            };
            let path = entry.path();
            // Links are followed: a dataset assembled from links to other folders is common.
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => match std::fs::canonicalize(&path) {
                    Ok(canonical) if seen.insert(canonical.clone()) => folders.push(path),
                    Ok(canonical) => listing.skipped.push(Skipped::new(
                        path,
                        SkipKind::SeenFolder,
                        format!("leads to {}, which is read once", canonical.display()),
                    )),
                    Err(e) => listing
                        .skipped
                        .push(Skipped::new(path, SkipKind::Unreadable, e.to_string())),
                },
                // Only regular files: a FIFO named `x.jpg` would block a reader for ever.
                Ok(meta) if meta.is_file() => listing.files.push(path),
                Ok(_) => listing
                    .skipped
                    .push(Skipped::new(path, SkipKind::NotAFile, "a device, FIFO or socket")),
                // A link to nothing, a link loop (ELOOP), a file removed while listing.
                Err(e) => listing
                    .skipped
                    .push(Skipped::new(path, SkipKind::Unreadable, format!("cannot stat: {e}"))),
            }
        }
    }
    listing.files.sort();
    listing.skipped.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn nested_folders_are_read_and_link_loops_end() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/deeper")).unwrap();
        std::fs::write(root.join("a.png"), b"x").unwrap();
        std::fs::write(root.join("b/deeper/c.png"), b"x").unwrap();
        // b/up -> the root: a loop; self-a and self-b: a link loop between two files.
        symlink(root, root.join("b/up")).unwrap();
        symlink(root.join("self-b"), root.join("self-a")).unwrap();
        symlink(root.join("self-a"), root.join("self-b")).unwrap();
        symlink(root.join("nowhere"), root.join("dangling.jpg")).unwrap();
        let listing = list(root).unwrap();
        assert_eq!(listing.files, vec![root.join("a.png"), root.join("b/deeper/c.png")]);
        let kinds: Vec<(String, SkipKind)> = listing
            .skipped
            .iter()
            .map(|s| (s.file.strip_prefix(root).unwrap().display().to_string(), s.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("b/up".into(), SkipKind::SeenFolder),
                ("dangling.jpg".into(), SkipKind::Unreadable),
                ("self-a".into(), SkipKind::Unreadable),
                ("self-b".into(), SkipKind::Unreadable),
            ]
        );
    }

    #[test]
    fn a_file_given_as_the_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.png"), b"x").unwrap();
        let err = list(&dir.path().join("x.png")).unwrap_err().to_string();
        assert!(err.contains("is not a folder"), "{err}");
    }
}
