//! Replace a file so that a crash at any moment leaves either the old content or the new.
//!
//! The bytes go to a temporary sibling, which is fsynced, renamed over the final name, and then
//! the directory is fsynced so the rename itself survives a power cut.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with_hook(path, bytes, || {})
}

/// Like [`write_atomic`], calling `before_rename` once the temporary file is durable. Tests use
/// the hook to stop a process at the worst moment.
pub fn write_atomic_with_hook(path: &Path, bytes: &[u8], before_rename: impl FnOnce()) -> Result<()> {
    write_atomic_via(
        path,
        |tmp| {
            let mut file = File::create(tmp).map_err(|e| create_error(tmp, e))?;
            file.write_all(bytes)
                .map_err(|e| Error::file("failed to write", tmp, e))
        },
        before_rename,
    )
}

/// Like [`write_atomic_with_hook`] for content that `write` streams into the temporary file
/// it is given (creating it), so the whole content never has to sit in memory at once.
pub fn write_atomic_via(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<()>,
    before_rename: impl FnOnce(),
) -> Result<()> {
    // A bare file name has an empty parent, which names no directory to fsync.
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp"));
    let written = write(&tmp).and_then(|()| {
        let file = File::options()
            .write(true)
            .open(&tmp)
            .map_err(|e| Error::file("failed to reopen", &tmp, e))?;
        file.sync_all().map_err(|e| Error::file("failed to fsync", &tmp, e))
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    before_rename();
    if let Err(e) = fs::rename(&tmp, path) {
        // Leave no temporary behind; the old file, if any, is untouched.
        let _ = fs::remove_file(&tmp);
        return Err(Error::file("failed to rename into place", path, e));
    }
    let dir_handle = File::open(dir).map_err(|e| Error::file("failed to open directory", dir, e))?;
    dir_handle
        .sync_all()
        .map_err(|e| Error::file("failed to fsync directory", dir, e))?;
    Ok(())
}

/// The error of creating `tmp`, naming the folder when that is what is missing.
pub fn create_error(tmp: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        let dir = tmp.parent().unwrap_or(Path::new("."));
        Error::file("no such folder to write into:", dir, e)
    } else {
        Error::file("failed to create", tmp, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file.bin");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("file.bin")]);
    }

    #[test]
    fn a_bare_file_name_writes_into_the_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        let previous = std::env::current_dir().unwrap();
        std::env::set_current_dir(dir.path()).unwrap();
        let result = write_atomic(Path::new("bare.png"), b"x");
        std::env::set_current_dir(previous).unwrap();
        result.unwrap();
        assert_eq!(fs::read(dir.path().join("bare.png")).unwrap(), b"x");
    }

    #[test]
    fn old_content_survives_until_the_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file.bin");
        write_atomic(&path, b"old").unwrap();
        write_atomic_with_hook(&path, b"new", || {
            assert_eq!(fs::read(&path).unwrap(), b"old");
        })
        .unwrap();
    }
}
