//! Writing output files: never half-written.
//!
//! Every artifact is written to a temporary file in the same directory, then renamed over
//! its final name, so a reader sees the old file, the new file, or none, never a torso.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The temporary name beside `path` that [`write_with`] writes first.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Runs `write` on a temporary path beside `path`, then renames it to `path`. On any error
/// the temporary file is removed and `path` is left untouched.
///
/// ```
/// let dir = std::env::temp_dir().join(format!("ngpt-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let out = dir.join("hello.txt");
/// ngpt_compiler::artifact::write_with(&out, |tmp| {
///     std::fs::write(tmp, b"hi").map_err(|source| ngpt_compiler::Error::Io { path: tmp.into(), source })
/// }).unwrap();
/// assert_eq!(std::fs::read(&out).unwrap(), b"hi");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    let result = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|source| Error::Io {
            path: tmp.to_path_buf(),
            source,
        })
    })
}

/// Creates `dir` (and its parents) or says which directory could not be made.
pub fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })
}
