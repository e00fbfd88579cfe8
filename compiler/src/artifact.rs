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
            return Err(Error::OutputExists {
                path: out.to_path_buf(),
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

/// Bytes handed to the writer thread at a time.
const CHUNK: usize = 8 << 20;

/// Chunks in flight to the writer thread at most (besides the one being filled).
const IN_FLIGHT: usize = 3;

/// A file written by a thread of its own: [`std::io::Write::write`] copies into 8 MiB
/// chunks and hands each full one to the thread (at most three waiting), so the kernel's
/// copy of the bytes into the page cache (30% of a 0.5b compile's perf samples) runs on
/// another core beside the work that makes them. Written chunks come back for reuse.
/// [`BackgroundWriter::finish`] hands over the rest, waits, and returns the first error
/// with the file's path; dropping it without `finish` still waits for the thread.
///
/// ```
/// use std::io::Write;
/// let path = std::env::temp_dir().join(format!("ngpt-bg-{}.bin", std::process::id()));
/// let mut w = ngpt_compiler::artifact::BackgroundWriter::create(&path)?;
/// w.write_all(b"hello, ").and_then(|()| w.write_all(b"world")).map_err(|source| {
///     ngpt_compiler::Error::Io { path: path.clone(), source }
/// })?;
/// w.finish()?;
/// assert_eq!(std::fs::read(&path).ok().as_deref(), Some(&b"hello, world"[..]));
/// # let _ = std::fs::remove_file(&path);
/// # Ok::<(), ngpt_compiler::Error>(())
/// ```
pub struct BackgroundWriter {
    path: PathBuf,
    buf: Vec<u8>,
    to_thread: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    recycled: std::sync::mpsc::Receiver<Vec<u8>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl BackgroundWriter {
    /// Creates (truncates) `path` and starts its writer thread.
    pub fn create(path: &Path) -> Result<BackgroundWriter> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::create(path).map_err(io)?;
        let (to_thread, from_writer) = std::sync::mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT);
        let (give_back, recycled) = std::sync::mpsc::channel::<Vec<u8>>();
        let thread = std::thread::Builder::new()
            .name("ngpt-writer".into())
            .spawn(move || -> std::io::Result<()> {
                use std::io::Write;
                for mut chunk in from_writer {
                    file.write_all(&chunk)?;
                    chunk.clear();
                    // The writer may be gone (finishing): then the chunk is just freed.
                    let _ = give_back.send(chunk);
                }
                file.flush()
            })
            .map_err(io)?;
        Ok(BackgroundWriter {
            path: path.to_path_buf(),
            buf: Vec::with_capacity(CHUNK),
            to_thread: Some(to_thread),
            recycled,
            thread: Some(thread),
        })
    }

    /// Hands the filled chunk to the thread and takes an empty one.
    fn hand_over(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = self
            .recycled
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
        let full = std::mem::replace(&mut self.buf, next);
        let sent = self.to_thread.as_ref().map(|tx| tx.send(full));
        match sent {
            Some(Ok(())) => Ok(()),
            // The thread stopped on an error; `finish` reports it.
            _ => Err(std::io::Error::other("the writer thread stopped")),
        }
    }

    /// Writes what is left, waits for the thread, and returns the first error.
    pub fn finish(mut self) -> Result<()> {
        let handed = self.hand_over();
        let joined = self.join();
        joined.and(handed).map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Closes the channel and waits for the thread: its error, if it had one.
    fn join(&mut self) -> std::io::Result<()> {
        self.to_thread = None;
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("the writer thread panicked")),
            None => Ok(()),
        }
    }
}

impl std::io::Write for BackgroundWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.hand_over()?;
        }
        Ok(n)
    }

    /// Hands what is buffered to the thread (it does not wait for the file).
    fn flush(&mut self) -> std::io::Result<()> {
        self.hand_over()
    }
}

impl Drop for BackgroundWriter {
    fn drop(&mut self) {
        let _ = self.join();
    }
}

#[cfg(test)]
mod background_writer_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn bytes_arrive_in_order_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        let mut w = BackgroundWriter::create(&path).unwrap();
        // Odd-sized writes crossing several 8 MiB chunk boundaries, and a flush between.
        let mut want = vec![];
        for i in 0..3000u32 {
            let piece: Vec<u8> = (0..(i % 17) * 811 + 5).map(|j| (i ^ j) as u8).collect();
            w.write_all(&piece).unwrap();
            want.extend_from_slice(&piece);
            if i == 1500 {
                w.flush().unwrap();
            }
        }
        assert!(want.len() > 2 * CHUNK);
        w.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }

    #[test]
    fn a_failed_write_is_an_error_naming_the_file() {
        // /dev/full refuses every write with ENOSPC.
        let path = Path::new("/dev/full");
        if !path.exists() {
            eprintln!("skipped: no /dev/full on this system");
            return;
        }
        let mut w = BackgroundWriter::create(path).unwrap();
        // More chunks than the channel holds: once the thread has stopped on the first,
        // a later write fails instead of blocking, and `finish` returns the thread's own
        // error (ENOSPC, os error 28) with the path.
        let chunk = vec![7u8; CHUNK];
        let early = (0..IN_FLIGHT + 3).try_for_each(|_| w.write_all(&chunk));
        assert!(
            early.is_err(),
            "writes went on after the writer thread failed"
        );
        let err = w.finish().unwrap_err().to_string();
        assert!(
            err.contains("/dev/full") && err.contains("os error 28"),
            "{err}"
        );
    }
}
