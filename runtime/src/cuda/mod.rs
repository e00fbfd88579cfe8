//! The CUDA side of the runtime, built everywhere (cudarc with dynamic loading): probing
//! for the CUDA libraries and compiling a plan's kernel modules with NVRTC, cached on disk.
//!
//! cudarc panics when a library it needs is missing, so every entry point here probes
//! first and returns a one-line reason instead. The CUDA executor (cuBLAS GEMMs, CUDA
//! graphs for decode) is not written yet; NVRTC compilation is, and CI checks every
//! module with it, so the kernel sources stay valid CUDA on machines without a GPU.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// Which CUDA libraries this process can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Availability {
    pub driver: bool,
    pub nvrtc: bool,
    pub cublas: bool,
}

/// Probes for libcuda, libnvrtc and libcublas without panicking.
pub fn probe() -> Availability {
    // SAFETY: these only try to dlopen the libraries; they do not call into them.
    unsafe {
        Availability {
            driver: cudarc::driver::sys::is_culib_present(),
            nvrtc: cudarc::nvrtc::sys::is_culib_present(),
            cublas: cudarc::cublas::sys::is_culib_present(),
        }
    }
}

impl Availability {
    /// Why plan-cuda cannot run here, if it cannot.
    pub fn missing(&self) -> Option<String> {
        let mut gone = vec![];
        for (ok, name) in [
            (self.driver, "libcuda (NVIDIA driver)"),
            (self.nvrtc, "libnvrtc"),
            (self.cublas, "libcublas"),
        ] {
            if !ok {
                gone.push(name);
            }
        }
        (!gone.is_empty()).then(|| {
            format!(
                "no usable CUDA here: {} not found (LD_LIBRARY_PATH)",
                gone.join(", ")
            )
        })
    }
}

/// The NVRTC version as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !probe().nvrtc {
        return Err(Error::Request {
            what: "NVRTC".into(),
            problem: "libnvrtc not found (LD_LIBRARY_PATH)".into(),
        });
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: libnvrtc is present (probed above); nvrtcVersion writes two ints.
    let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Request {
            what: "NVRTC".into(),
            problem: format!("nvrtcVersion failed: {rc:?}"),
        });
    }
    Ok((major, minor))
}

/// The kernel cache directory: `$NGPT_CACHE_DIR`, else `$XDG_CACHE_HOME/ngpt/kernels`,
/// else `~/.cache/ngpt/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("NGPT_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("ngpt/kernels"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ngpt/kernels"))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Compiles one kernel module to PTX for `arch` (e.g. `sm_90`), through the on-disk cache
/// keyed by (source hash, arch, NVRTC version). NVRTC's log is in the error.
pub fn compile_module(name: &str, source: &str, arch: &'static str) -> Result<String> {
    if source.as_bytes().contains(&0) {
        return Err(Error::Plan {
            path: format!("kernel module `{name}`"),
            problem: "source holds a NUL byte".into(),
        });
    }
    let (major, minor) = nvrtc_version()?;
    let key = format!(
        "{:016x}-{arch}-nvrtc{major}.{minor}.ptx",
        fnv1a(source.as_bytes())
    );
    let cached = cache_dir().map(|d| d.join(&key));
    if let Some(text) = cached
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
    {
        return Ok(text);
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| {
        let detail = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().trim().replace('\n', " | ")
            }
            other => format!("{other:?}"),
        };
        Error::Plan {
            path: format!("kernel module `{name}`"),
            problem: format!("NVRTC failed for {arch}: {detail}"),
        }
    })?;
    let text = ptx.to_src();
    if let Some(path) = cached {
        // The cache is an optimisation: a failed write is not an error.
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &text).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(text)
}
