//! Executor options: typed, documented, validated, and passed by the caller. No executor
//! reads the environment; a caller that wants the experiments' one environment variable,
//! `NGPT_CUDA_OPTIONS`, asks for it ([`CudaOptions::from_env`]), and it parses strictly.
//!
//! The text form is `key=value` pairs separated by commas, as `NGPT_CUDA_OPTIONS`, `ngpt
//! --cuda-options` and `CudaOptions`'s `Display` write them. An unknown key, a malformed
//! value or a key given twice is an error naming it.
//!
//! ```
//! use ngpt_runtime::options::{Attention, CudaOptions};
//! let o: CudaOptions = "graph=off,attention=simple,experimental.pd_stream=on".parse()?;
//! assert!(!o.graph && o.attention == Attention::Simple && o.experimental.pd_stream);
//! assert!("graph=false".parse::<CudaOptions>().is_err()); // on or off, nothing else
//! assert!("grpah=off".parse::<CudaOptions>().is_err()); // a typo is an error
//! assert!("blocks_per_sm=0".parse::<CudaOptions>().is_err()); // 0 blocks never runs
//! // The canonical text lists every key, and parses back to the same options.
//! assert_eq!(o.to_string().parse::<CudaOptions>()?, o);
//! # Ok::<(), ngpt_runtime::options::OptionError>(())
//! ```

use std::fmt;
use std::str::FromStr;

/// The environment variable for experiments with the CUDA executor's options.
pub const ENV: &str = "NGPT_CUDA_OPTIONS";

/// An option that could not be taken: which one, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: option `{key}`: {problem}")]
pub struct OptionError {
    /// Where the text came from (`NGPT_CUDA_OPTIONS`, `--cuda-options`, `options`).
    pub source_name: String,
    /// The key at fault, as written.
    pub key: String,
    /// What is wrong with it and what is expected, in one line.
    pub problem: String,
}

/// How the CUDA executor runs GEMMs with bf16 weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Bf16Gemm {
    /// cuBLAS with both operands bf16 (the activations rounded), f32 accumulation.
    #[default]
    Bf16,
    /// f32 copies of the weights and an f32 GEMM (more memory, no activation rounding).
    F32,
}

/// Which attention kernels the CUDA executor launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Attention {
    /// The tiled kernels (default).
    #[default]
    Tiled,
    /// The first, untiled kernels: slower, a GPU reference for the tiled ones.
    Simple,
}

/// `decode_persistent`'s grid barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Barrier {
    /// Full fences (default).
    #[default]
    Full,
    /// Release and acquire operations (experimental, unmeasured on a GPU).
    AcqRel,
}

/// `decode_persistent`'s decode attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PdAttention {
    /// Split across the KV length, combined after a barrier (default).
    #[default]
    Split,
    /// As many splits per (row, head) as the grid has warps for, float4 P.V
    /// (experimental, unmeasured on a GPU).
    Wide,
}

/// Paths that no GPU run has measured yet: each stays off by default until its rows in
/// `scripts/gpu-check.sh` pass and win (ARCHITECTURE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Experimental {
    /// Prefill attention on the tensor cores (`attention_prefill_mma`, bf16 plans).
    pub prefill_mma: bool,
    /// `decode_persistent` streams gemv weights through shared memory with `cp.async`.
    pub pd_stream: bool,
    /// `decode_persistent`'s grid barrier.
    pub pd_barrier: Barrier,
    /// `decode_persistent`'s decode attention.
    pub pd_attention: PdAttention,
    /// A `__launch_bounds__` minimum of blocks per SM for `decode_persistent` (2 and up),
    /// trading registers for residency; `None` leaves the compiler's choice.
    pub pd_min_blocks: Option<u32>,
}

/// The CUDA executor's options. [`Default`] is what `ngpt` runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaOptions {
    /// Synchronize after every step and refuse NaN logits, so an error names its step
    /// (`check`; default on in debug builds, off in release builds).
    pub check: bool,
    /// Print GPU time per kernel and GEMM shape when the executor is dropped (`profile`).
    pub profile: bool,
    /// Decode replays a captured CUDA graph (`graph`, default on).
    pub graph: bool,
    /// GEMMs of at most 8 columns in the weight form run as the `gemv_*` kernels
    /// (`gemv`, default on).
    pub gemv: bool,
    /// Decode as one `decode_persistent` launch where every step allows it
    /// (`persistent`, default on).
    pub persistent: bool,
    /// `decode_persistent` folds lerp_norm and swiglu into the gemv after them and
    /// pos_norm into attention (`fuse`, default on).
    pub fuse: bool,
    /// `decode_persistent` prefetches the next entry's weights into L2 (`prefetch`,
    /// default on).
    pub prefetch: bool,
    /// `decode_persistent` is launched cooperatively, so the driver guarantees that every
    /// block is resident (its grid barrier needs it) or refuses the launch up front, and
    /// decode then goes launch by launch with a one-line note (`cooperative`, default
    /// on). Off: a plain launch sized by the occupancy calculation, which can hang beside
    /// other processes' kernels until the barrier's 4 s timeout traps.
    pub cooperative: bool,
    /// GEMMs with bf16 weights (`bf16_gemm=bf16|f32`).
    pub bf16_gemm: Bf16Gemm,
    /// The attention kernels (`attention=tiled|simple`).
    pub attention: Attention,
    /// At most this many `decode_persistent` blocks per SM (`blocks_per_sm=N`, N >= 1);
    /// `None`: as many as are resident.
    pub blocks_per_sm: Option<u32>,
    /// Unmeasured paths (`experimental.*`).
    pub experimental: Experimental,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            check: cfg!(debug_assertions),
            profile: false,
            graph: true,
            gemv: true,
            persistent: true,
            fuse: true,
            prefetch: true,
            cooperative: true,
            bf16_gemm: Bf16Gemm::Bf16,
            attention: Attention::Tiled,
            blocks_per_sm: None,
            experimental: Experimental::default(),
        }
    }
}

/// Every key, in the canonical order.
pub const KEYS: [&str; 16] = [
    "check",
    "profile",
    "graph",
    "gemv",
    "persistent",
    "fuse",
    "prefetch",
    "cooperative",
    "bf16_gemm",
    "attention",
    "blocks_per_sm",
    "experimental.prefill_mma",
    "experimental.pd_stream",
    "experimental.pd_barrier",
    "experimental.pd_attention",
    "experimental.pd_min_blocks",
];

fn on_off(v: bool) -> &'static str {
    if v {
        "on"
    } else {
        "off"
    }
}

impl CudaOptions {
    /// Applies `key=value,...` from `text` on top of `self`; `source_name` names the text
    /// in errors. Empty text changes nothing.
    pub fn apply(&mut self, text: &str, source_name: &str) -> Result<(), OptionError> {
        let mut seen: Vec<&str> = vec![];
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let err = |key: &str, problem: String| OptionError {
                source_name: source_name.to_string(),
                key: key.chars().flat_map(char::escape_debug).collect(),
                problem,
            };
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                err(
                    pair,
                    "expected key=value (keys: ".to_string() + &KEYS.join(", ") + ")",
                )
            })?;
            let (key, value) = (key.trim(), value.trim());
            if seen.contains(&key) {
                return Err(err(key, "given twice".into()));
            }
            seen.push(key);
            let flag = || match value {
                "on" => Ok(true),
                "off" => Ok(false),
                other => Err(err(
                    key,
                    format!(
                        "`{}` is not `on` or `off`",
                        other
                            .chars()
                            .flat_map(char::escape_debug)
                            .collect::<String>()
                    ),
                )),
            };
            let count = |min: u32, max: u32| match value.parse::<u32>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(err(
                    key,
                    format!(
                        "`{}` is not a whole number in {min}..={max}",
                        value
                            .chars()
                            .flat_map(char::escape_debug)
                            .collect::<String>()
                    ),
                )),
            };
            let choice = |names: &[&str]| {
                names.iter().position(|n| *n == value).ok_or_else(|| {
                    err(
                        key,
                        format!(
                            "`{}` is not one of {}",
                            value
                                .chars()
                                .flat_map(char::escape_debug)
                                .collect::<String>(),
                            names.join(", ")
                        ),
                    )
                })
            };
            let x = &mut self.experimental;
            match key {
                "check" => self.check = flag()?,
                "profile" => self.profile = flag()?,
                "graph" => self.graph = flag()?,
                "gemv" => self.gemv = flag()?,
                "persistent" => self.persistent = flag()?,
                "fuse" => self.fuse = flag()?,
                "prefetch" => self.prefetch = flag()?,
                "cooperative" => self.cooperative = flag()?,
                "bf16_gemm" => {
                    self.bf16_gemm = [Bf16Gemm::Bf16, Bf16Gemm::F32][choice(&["bf16", "f32"])?]
                }
                "attention" => {
                    self.attention =
                        [Attention::Tiled, Attention::Simple][choice(&["tiled", "simple"])?]
                }
                "blocks_per_sm" => {
                    self.blocks_per_sm = match value {
                        "max" => None,
                        _ => Some(count(1, 32)?),
                    }
                }
                "experimental.prefill_mma" => x.prefill_mma = flag()?,
                "experimental.pd_stream" => x.pd_stream = flag()?,
                "experimental.pd_barrier" => {
                    x.pd_barrier = [Barrier::Full, Barrier::AcqRel][choice(&["full", "acqrel"])?]
                }
                "experimental.pd_attention" => {
                    x.pd_attention =
                        [PdAttention::Split, PdAttention::Wide][choice(&["split", "wide"])?]
                }
                "experimental.pd_min_blocks" => {
                    x.pd_min_blocks = match value {
                        "none" => None,
                        _ => Some(count(2, 32)?),
                    }
                }
                _ => {
                    return Err(err(
                        key,
                        format!("unknown option (keys: {})", KEYS.join(", ")),
                    ))
                }
            }
        }
        Ok(())
    }

    /// The defaults with `NGPT_CUDA_OPTIONS` applied, if it is set. The only place the
    /// runtime reads these options from the environment; callers decide whether to call
    /// it.
    pub fn from_env() -> Result<CudaOptions, OptionError> {
        let mut o = CudaOptions::default();
        match std::env::var(ENV) {
            Ok(text) => o.apply(&text, ENV)?,
            Err(std::env::VarError::NotPresent) => {}
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(OptionError {
                    source_name: ENV.into(),
                    key: String::new(),
                    problem: "is not valid UTF-8".into(),
                })
            }
        }
        Ok(o)
    }
}

impl FromStr for CudaOptions {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut o = CudaOptions::default();
        o.apply(s, "options")?;
        Ok(o)
    }
}

impl fmt::Display for CudaOptions {
    /// Every key, in [`KEYS`]' order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let x = &self.experimental;
        write!(
            f,
            "check={},profile={},graph={},gemv={},persistent={},fuse={},prefetch={},cooperative={},bf16_gemm={},attention={},blocks_per_sm={},experimental.prefill_mma={},experimental.pd_stream={},experimental.pd_barrier={},experimental.pd_attention={},experimental.pd_min_blocks={}",
            on_off(self.check),
            on_off(self.profile),
            on_off(self.graph),
            on_off(self.gemv),
            on_off(self.persistent),
            on_off(self.fuse),
            on_off(self.prefetch),
            on_off(self.cooperative),
            match self.bf16_gemm {
                Bf16Gemm::Bf16 => "bf16",
                Bf16Gemm::F32 => "f32",
            },
            match self.attention {
                Attention::Tiled => "tiled",
                Attention::Simple => "simple",
            },
            self.blocks_per_sm.map_or("max".to_string(), |n| n.to_string()),
            on_off(x.prefill_mma),
            on_off(x.pd_stream),
            match x.pd_barrier {
                Barrier::Full => "full",
                Barrier::AcqRel => "acqrel",
            },
            match x.pd_attention {
                PdAttention::Split => "split",
                PdAttention::Wide => "wide",
            },
            x.pd_min_blocks.map_or("none".to_string(), |n| n.to_string()),
        )
    }
}

/// Environment variables that `ngpt` reads, and those its scripts and tests read.
pub const KNOWN_ENV: [&str; 14] = [
    ENV,
    "NGPT_CACHE_DIR",
    // Scripts and tests, not the ngpt binary:
    "NGPT_CUDA_TEST_PLANS",
    "NGPT_CI_VENV",
    "NGPT_GPU_PARTS",
    "NGPT_GPU_CPU_ROWS",
    "NGPT_GPU_TORCH",
    "NGPT_GPU_CHECK_HALF",
    "NGPT_GPU_TEST_REPEAT",
    "NGPT_PLAN_FLIPS",
    "NGPT_WRITE_FUZZ_SEEDS",
    "NGPT_FUZZ_CORPUS",
    "NGPT_BASELINE_RECORD",
    "NGPT_BUNDLE_DIR",
];

/// One warning line for each `NGPT_*` variable in `vars` that nothing reads (a typo, or a
/// setting from before options were typed), saying what replaced a retired one.
///
/// ```
/// use ngpt_runtime::options::unknown_env;
/// let w = unknown_env([("NGPT_CUDA_GRAPH".to_string(), "0".to_string())]);
/// assert_eq!(w.len(), 1);
/// assert!(w[0].contains("NGPT_CUDA_OPTIONS=graph=off"), "{}", w[0]);
/// assert!(unknown_env([("NGPT_CACHE_DIR".to_string(), "/x".to_string())]).is_empty());
/// ```
pub fn unknown_env(vars: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    let mut out = vec![];
    for (name, value) in vars {
        if !name.starts_with("NGPT_") || KNOWN_ENV.contains(&name.as_str()) {
            continue;
        }
        let off_if_0 = |key: &str| {
            format!(
                "{ENV}={key}={}",
                if value.trim() == "0" { "off" } else { "on" }
            )
        };
        let hint = match name.as_str() {
            "NGPT_CUDA_CHECK" => Some(off_if_0("check")),
            "NGPT_CUDA_PROFILE" => Some(off_if_0("profile")),
            "NGPT_CUDA_GRAPH" => Some(off_if_0("graph")),
            "NGPT_CUDA_GEMV" => Some(off_if_0("gemv")),
            "NGPT_CUDA_PERSISTENT" => Some(off_if_0("persistent")),
            "NGPT_CUDA_PD_FUSE" => Some(off_if_0("fuse")),
            "NGPT_CUDA_PD_PREFETCH" => Some(off_if_0("prefetch")),
            "NGPT_CUDA_BF16_GEMM" => Some(format!("{ENV}=bf16_gemm={value}")),
            "NGPT_CUDA_ATTENTION" => Some(format!("{ENV}=attention={value}")),
            "NGPT_CUDA_PD_BLOCKS_PER_SM" => Some(format!("{ENV}=blocks_per_sm={value}")),
            "NGPT_CUDA_PREFILL_MMA" => Some(off_if_0("experimental.prefill_mma")),
            "NGPT_CUDA_PD_STREAM" => Some(off_if_0("experimental.pd_stream")),
            "NGPT_CUDA_PD_BARRIER" => Some(format!("{ENV}=experimental.pd_barrier={value}")),
            "NGPT_CUDA_PD_ATTENTION" => Some(format!("{ENV}=experimental.pd_attention={value}")),
            "NGPT_CUDA_PD_MIN_BLOCKS" => Some(format!("{ENV}=experimental.pd_min_blocks={value}")),
            "NGPT_MMAP" => Some("the --read-weights flag".to_string()),
            _ => None,
        };
        out.push(match hint {
            Some(h) => format!("warning: {name} is no longer read; use {h}"),
            None => format!(
                "warning: {name} is not a variable ngpt reads (it reads {ENV} and NGPT_CACHE_DIR)"
            ),
        });
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses_and_prints_back() {
        let text = "check=on,profile=on,graph=off,gemv=off,persistent=off,fuse=off,prefetch=off,cooperative=off,bf16_gemm=f32,attention=simple,blocks_per_sm=2,experimental.prefill_mma=on,experimental.pd_stream=on,experimental.pd_barrier=acqrel,experimental.pd_attention=wide,experimental.pd_min_blocks=3";
        let o: CudaOptions = text.parse().unwrap();
        assert_eq!(o.to_string(), text);
        assert_eq!(o.blocks_per_sm, Some(2));
        assert_eq!(o.experimental.pd_min_blocks, Some(3));
        let d = CudaOptions::default();
        assert_eq!(d.to_string().parse::<CudaOptions>().unwrap(), d);
        assert_eq!("".parse::<CudaOptions>().unwrap(), d);
        assert_eq!(text.split(',').count(), KEYS.len());
    }

    #[test]
    fn malformed_options_are_errors_that_name_the_key() {
        for (text, says) in [
            ("graph=false", "`graph`: `false` is not `on` or `off`"),
            ("graph=0", "`graph`: `0` is not `on` or `off`"),
            ("grpah=off", "`grpah`: unknown option"),
            ("graph", "`graph`: expected key=value"),
            ("graph=on,graph=off", "`graph`: given twice"),
            (
                "blocks_per_sm=0",
                "`blocks_per_sm`: `0` is not a whole number in 1..=32",
            ),
            (
                "attention=fast",
                "`attention`: `fast` is not one of tiled, simple",
            ),
            ("experimental.pd_min_blocks=1", "2..=32"),
        ] {
            let e = text.parse::<CudaOptions>().unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
            assert!(e.starts_with("options: option"), "{e}");
        }
    }

    #[test]
    fn retired_variables_get_their_replacement() {
        let w = unknown_env(
            [
                ("NGPT_CUDA_PD_STREAM", "1"),
                ("NGPT_CUDA_PERSISTENT", "0"),
                ("NGPT_CUDA_GRPAH", "0"),
                ("NGPT_MMAP", "0"),
                ("PATH", "/bin"),
                ("NGPT_CUDA_OPTIONS", "graph=off"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string())),
        );
        assert_eq!(w.len(), 4, "{w:?}");
        assert!(w.iter().any(|l| l.contains("experimental.pd_stream=on")));
        assert!(w.iter().any(|l| l.contains("persistent=off")));
        assert!(w
            .iter()
            .any(|l| l.contains("NGPT_CUDA_GRPAH is not a variable")));
        assert!(w.iter().any(|l| l.contains("--read-weights")));
    }
}
