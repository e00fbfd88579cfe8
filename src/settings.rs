//! Process-wide settings from the global flags (`--cuda-options`, `--read-weights`) and the
//! one environment variable for experiments (`NGPT_CUDA_OPTIONS`), resolved once in `main`
//! and read where executors and plans are made. The runtime itself reads no environment.

use std::sync::OnceLock;

use anyhow::Result;
use ngpt_runtime::options::{self, CudaOptions};
use ngpt_runtime::plan::WeightsIo;

/// What every subcommand runs with.
#[derive(Debug, Clone, Copy, Default)]
pub struct Settings {
    /// The CUDA executor's options: defaults, then `NGPT_CUDA_OPTIONS`, then
    /// `--cuda-options`.
    pub cuda: CudaOptions,
    /// How a compiled directory's `model.weights` is brought in.
    pub weights_io: Option<WeightsIo>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Resolves the settings (once, from `main`) and prints one warning line for each `NGPT_*`
/// variable nothing reads.
pub fn init(cuda_flag: Option<&str>, read_weights: bool) -> Result<()> {
    for line in options::unknown_env(
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned()))),
    ) {
        eprintln!("{line}");
    }
    let mut cuda = CudaOptions::from_env()?;
    if let Some(text) = cuda_flag {
        cuda.apply(text, "--cuda-options")?;
    }
    let s = Settings {
        cuda,
        weights_io: read_weights.then_some(WeightsIo::Read),
    };
    let _ = SETTINGS.set(s);
    Ok(())
}

/// The resolved settings (the defaults before [`init`]).
pub fn get() -> Settings {
    SETTINGS.get().copied().unwrap_or_default()
}
