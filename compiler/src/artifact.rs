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
/// ngpt_compiler::artifact::create_dir(&dir)?;
/// let out = dir.join("hello.txt");
/// ngpt_compiler::artifact::write_with(&out, |tmp| {
///     std::fs::write(tmp, b"hi").map_err(|source| ngpt_compiler::Error::Io { path: tmp.into(), source })
/// })?;
/// assert_eq!(std::fs::read(&out).ok().as_deref(), Some(&b"hi"[..]));
/// # let _ = std::fs::remove_dir_all(&dir);
/// # Ok::<(), ngpt_compiler::Error>(())
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
    std::fs::create_dir_all(dir).map_err(|source| {
        // A file where the directory should be: the OS says only "File exists".
        let source = if dir.exists() && !dir.is_dir() {
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a directory",
            )
        } else {
            source
        };
        Error::Io {
            path: dir.to_path_buf(),
            source,
        }
    })
}

/// Writes a whole output directory or nothing: `fill` writes into a temporary directory
/// beside `out`, which is then renamed into place. An existing `out` that holds anything is
/// an error unless `force` is set; with `force` it is replaced only once the new directory
/// is complete.
pub fn write_dir(out: &Path, force: bool, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let exists = out.exists();
    if exists && !force {
        let occupied = !out.is_dir() || std::fs::read_dir(out).map_err(io(out))?.next().is_some();
        if occupied {
            return Err(Error::Argument {
                what: format!("--out {}", out.display()),
                problem: "already exists and is not empty; pass --force to replace it".into(),
            });
        }
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    create_dir(&parent)?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if exists {
        if let Err(e) = std::fs::rename(out, &old) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(io(out)(e));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, out) {
        if exists {
            let _ = std::fs::rename(&old, out);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(io(out)(e));
    }
    if exists {
        let _ = if old.is_dir() {
            std::fs::remove_dir_all(&old)
        } else {
            std::fs::remove_file(&old)
        };
    }
    Ok(())
}
