//! The CUDA side of the runtime, built everywhere (cudarc with dynamic loading): probing
//! for the CUDA libraries, compiling the runtime's own kernel modules (`ngpt.cu`, the
//! kernels plans launch, and `helpers.cu`) with NVRTC for a plan's checked widths (cached on
//! disk by sha256; a plan never carries code, `crate::contract`),
//! and the CUDA executor ([`CudaExecutor`], [`CudaSession`]): cuBLAS GEMMs, decode in a
//! CUDA graph.
//!
//! cudarc panics when a library it needs is missing, so every entry point here probes
//! first and returns a one-line reason instead ([`unavailable`]). CI has no GPU: it
//! compiles every module with NVRTC, so the kernel sources stay valid CUDA there.

mod device;
mod enqueue;
mod errors;
mod executor;
mod gemm;
mod graph;
mod lock;
mod modules;
mod persistent;
mod persistent_launch;
mod profile;
pub mod rates;
mod resolve;
mod session;

use std::path::PathBuf;

pub use executor::CudaExecutor;
pub use session::CudaSession;

use crate::error::{Error, Result};

/// The kernels plans launch (`embed`, `norm_rows`, `lerp_norm`, `swiglu`, `pos_norm`,
/// `attention_prefill`, `attention_decode`: [`crate::contract::ENTRIES`]), compiled behind
/// [`module_source`]'s prelude.
pub const NGPT_CU: &str = include_str!("ngpt.cu");

/// The runtime's own helper kernels (`f32_to_bf16`, the gemv products,
/// `decode_persistent`), compiled beside the `ngpt` module.
pub const HELPERS_CU: &str = include_str!("helpers.cu");

/// The `ngpt` module's full source for a loaded (so checked) plan: the prelude made from
/// its validated widths, then [`NGPT_CU`]. Nothing of the plan's text enters it.
///
/// ```
/// use ngpt_runtime::contract::{Dims, ModuleDims};
/// let d = Dims { n_layer: 1, n_head: 2, n_embd: 8, head_dim: 4, vocab: 5, max_seq_len: 16, n_inner: 32 };
/// let src = ngpt_runtime::cuda::module_source(&d, &ModuleDims { kv_tile: 32 });
/// assert!(src.contains("#define NGPT_D 4\n") && src.ends_with(ngpt_runtime::cuda::NGPT_CU));
/// ```
pub fn module_source(d: &crate::contract::Dims, md: &crate::contract::ModuleDims) -> String {
    format!("{}{NGPT_CU}", crate::contract::module_prelude(d, md))
}

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

/// Why the CUDA executor refuses `plan` on any device (`None`: it takes it): a plan whose
/// quantized GEMMs quantize their activations to int8 (`ngpt compile --quant-activations
/// int8`; no CUDA kernel computes that yet). Callers choosing an engine ask this before
/// picking the GPU, as [`CudaExecutor`] does before any device work.
pub fn refuses(plan: &crate::plan::LoadedPlan) -> Option<String> {
    let i = plan
        .weights()
        .iter()
        .position(|w| matches!(w, crate::plan::WeightData::Quant(q) if q.act_block != 0))?;
    Some(format!(
        "weight `{}` quantizes its GEMMs' activations to int8 (compiled with --quant-activations int8): only plan-cpu runs that; compile without it for the GPU",
        crate::contract::printable(&plan.plan().weights[i].name)
    ))
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

/// The kernel cache's file name for a module: sha256 over (name, source, arch, NVRTC
/// version), each length-prefixed so no two tuples share a key.
///
/// ```
/// use ngpt_runtime::cuda::cache_key;
/// let k = cache_key("ngpt", "int a;", "sm_90", (13, 0));
/// assert_eq!(k.len(), 64 + 4);
/// assert_ne!(k, cache_key("ngpt", "int a;", "sm_80", (13, 0)));
/// assert_ne!(k, cache_key("ngpt", "int a;", "sm_90", (12, 8)));
/// assert_ne!(k, cache_key("ngpt", "int b;", "sm_90", (13, 0)));
/// ```
pub fn cache_key(name: &str, source: &str, arch: &str, nvrtc: (i32, i32)) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let version = format!("nvrtc {}.{}", nvrtc.0, nvrtc.1);
    for part in ["ngpt kernel cache 1", name, arch, &version, source] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.ptx")
}

/// Compiles one of the runtime's kernel modules to PTX for `arch` (e.g. `sm_90`), through
/// the on-disk cache keyed by [`cache_key`]. NVRTC's log is in the error.
pub fn compile_module(name: &str, source: &str, arch: &'static str) -> Result<String> {
    if source.as_bytes().contains(&0) {
        return Err(Error::Plan {
            path: format!("kernel module `{name}`"),
            problem: "source holds a NUL byte".into(),
        });
    }
    let (major, minor) = nvrtc_version()?;
    let key = cache_key(name, source, arch, (major, minor));
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
