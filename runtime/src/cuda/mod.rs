//! The CUDA side of the runtime, built everywhere (cudarc with dynamic loading): probing
//! for the CUDA libraries, compiling a plan's kernel modules with NVRTC (cached on disk),
//! and the CUDA executor ([`CudaExecutor`], [`CudaSession`]): cuBLAS GEMMs, decode in a
//! CUDA graph.
//!
//! cudarc panics when a library it needs is missing, so every entry point here probes
//! first and returns a one-line reason instead ([`unavailable`]). CI has no GPU: it
//! compiles every module with NVRTC, so the kernel sources stay valid CUDA there.

mod executor;
mod persistent;
pub mod rates;
mod session;

use std::path::PathBuf;

pub use executor::CudaExecutor;
pub use session::CudaSession;

use crate::error::{Error, Result};

/// The runtime's own helper kernels (`f32_to_bf16`), compiled beside each plan's modules.
pub const HELPERS_CU: &str = include_str!("helpers.cu");

/// Which CUDA libraries this process can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Availability {
    /// libcuda, the NVIDIA driver's library, loads.
    pub driver: bool,
    /// libnvrtc, which compiles the plan's kernel modules, loads.
    pub nvrtc: bool,
    /// libcublas, which runs the plan's GEMM steps, loads.
    pub cublas: bool,
}

/// Probes for libcuda, libnvrtc and libcublas without panicking.
///
/// ```
/// let have = ngpt_runtime::cuda::probe();
/// // `missing` names what is absent, and only when something is.
/// assert_eq!(have.missing().is_none(), have.driver && have.nvrtc && have.cublas);
/// ```
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

/// Why the CUDA executor cannot run in this process, or `None` when it can: a library
/// missing (libcuda, libnvrtc, libcublas), the driver failing to start, or no device.
/// Calls into libcuda only after probing that it loads.
///
/// ```
/// match ngpt_runtime::cuda::unavailable() {
///     None => {} // `Session::cuda` can start here
///     Some(why) => assert!(why.starts_with("no usable CUDA here")),
/// }
/// ```
pub fn unavailable() -> Option<String> {
    if let Some(why) = probe().missing() {
        return Some(why);
    }
    match cudarc::driver::CudaContext::device_count() {
        Ok(n) if n > 0 => None,
        Ok(_) => Some("no usable CUDA here: the driver sees no device".into()),
        Err(e) => Some(format!(
            "no usable CUDA here: the driver did not start ({:?})",
            e.0
        )),
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
        // A name of its own per write: threads of one process compile the same module
        // at once (parallel tests), and a shared temporary could be renamed half written.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
        if std::fs::write(&tmp, &text).is_err() || std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(text)
}
