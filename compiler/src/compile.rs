//! Compiling a checkpoint: the canonical graph, the pass records, and the compiled
//! directory (`manifest.json`, `ir.txt`, `passes.txt`, and the emitters' files).

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::graph::{self, Graph};
use crate::import::Checkpoint;
use crate::passes::{self, PassRecord};

/// Options of [`compile`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Run only the first N passes.
    pub stop_after: Option<usize>,
    /// A deliberate miscompile, for testing `ngpt check` and `ngpt bisect`.
    pub fault: Option<passes::Fault>,
    /// Quantize the matmul weights (the `quantize` pass) as these options say.
    pub quantize: Option<crate::quant::Options>,
}

/// The format of a quantized plan's weights, as manifest.json states it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlanWeights {
    /// The layers' matrices: `int8` or `int4` (I8 / I4 blocks, f16 block scales).
    pub format: String,
    /// Entries per block along K.
    pub block: usize,
    /// lm_head's format: `int8`, `int4` or `f32`.
    pub lm_head: String,
    /// `int8` where the layers' GEMMs quantize their activations
    /// (`--quant-activations int8`; lm_head's keep f32), `f32` otherwise.
    #[serde(default = "f32_name")]
    pub activations: String,
    /// Bytes of the quantized weights (integers and scales) in model.weights.
    pub quantized_bytes: u64,
    /// Bytes of model.weights in all (with the f32 embedding and vectors).
    pub total_bytes: u64,
}

fn f32_name() -> String {
    "f32".into()
}

/// A compiled model: the canonical graph and what each pass did.
pub struct Compiled {
    /// The graph after the passes: the canonical form, or an intermediate one when
    /// [`Options::stop_after`] cut the pass list short.
    pub graph: Graph,
    /// One record per pass that ran, in order; [`Compiled::pass_log`] prints them.
    pub records: Vec<PassRecord>,
}

/// Builds the literal graph of `ckpt` and runs the passes.
///
/// ```
/// use ngpt_compiler::{compile, import, init, passes};
/// let dir = std::env::temp_dir().join(format!("ngpt-doc-compile-{}", std::process::id()));
/// init::write(&dir, &init::InitOptions::preset(init::Preset::Tiny))?;
/// let ckpt = import::load(&dir)?;
///
/// let full = compile::compile(&ckpt, &compile::Options::default())?;
/// assert_eq!(full.records.len(), passes::CANONICAL.len());
/// assert_eq!(full.graph.count("lerp_norm"), 2 * ckpt.config.n_layer);
///
/// // The first two passes only fold constants: nothing is fused yet.
/// let opts = compile::Options { stop_after: Some(2), ..Default::default() };
/// let partial = compile::compile(&ckpt, &opts)?;
/// assert_eq!(partial.records.len(), 2);
/// assert_eq!(partial.graph.count("lerp_norm"), 0);
/// # let _ = std::fs::remove_dir_all(&dir);
/// # Ok::<(), ngpt_compiler::Error>(())
/// ```
pub fn compile(ckpt: &Checkpoint, opts: &Options) -> Result<Compiled> {
    let mut g = graph::literal(ckpt)?;
    let records = passes::run(
        &mut g,
        &passes::Options {
            stop_after: opts.stop_after,
            fault: opts.fault.clone(),
            quantize: opts.quantize,
            ..Default::default()
        },
    )?;
    Ok(Compiled { graph: g, records })
}

impl Compiled {
    /// The pass log: each pass, its rewrites, its time, and why it skipped places.
    pub fn pass_log(&self) -> String {
        let mut s = String::new();
        for (i, r) in self.records.iter().enumerate() {
            let _ = writeln!(
                s,
                "{:>2} {:<14} {:>4} rewrites {:>9.3} ms",
                i + 1,
                r.name,
                r.rewrites,
                r.time.as_secs_f64() * 1e3
            );
            for why in &r.skipped {
                let _ = writeln!(s, "     skipped: {why}");
            }
            for note in &r.notes {
                let _ = writeln!(s, "     note: {note}");
            }
        }
        s
    }
}

/// The sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The first 12 characters of a sha256 for a message, cut at a character boundary: the
/// value may come from an edited `manifest.json` or parity record and hold anything.
pub fn short_sha256(sha: &str) -> &str {
    match sha.char_indices().nth(12) {
        Some((end, _)) => &sha[..end],
        None => sha,
    }
}

/// What `manifest.json` records about a compile.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// The program that wrote the directory: `"ngpt"`.
    pub producer: String,
    /// The producer's version (ngpt's crate version at compile time).
    pub version: String,
    /// Absolute path of the checkpoint file compiled.
    pub source: PathBuf,
    /// sha256 of the source file when it was compiled, lowercase hex;
    /// [`Manifest::checked_source`] compares the file against it.
    pub source_sha256: String,
    /// The `--stop-after` pass count, or `None` for a full compile (the only kind that
    /// writes `model.plan` and `model.weights`).
    pub stop_after: Option<usize>,
    /// Names of the passes that ran, in order.
    pub passes: Vec<String>,
    /// Names of the files in the compiled directory, relative to it, `manifest.json` first.
    pub files: Vec<String>,
    /// The quantize pass's options, when the compile quantized the weights (absent
    /// otherwise): `--engine ir` on the directory compiles its source the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<crate::quant::Options>,
    /// What model.plan's weights are, for a quantized plan (`--dtype int8|int4`; absent
    /// for float plans and directories without a plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_weights: Option<PlanWeights>,
}

impl Manifest {
    /// The compile options that give this directory's weights again (its quantization;
    /// the engines compile a source's full canonical graph, whatever `stop_after` was).
    pub fn compile_options(&self) -> Options {
        Options {
            quantize: self.quantize,
            ..Default::default()
        }
    }
}

impl Manifest {
    /// Reads `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Format {
            path,
            reason: format!("not an ngpt manifest: {e}"),
        })
    }

    /// The source checkpoint, checked to be there and unchanged.
    pub fn checked_source(&self, dir: &Path) -> Result<PathBuf> {
        let manifest = dir.join("manifest.json");
        if !self.source.is_file() {
            return Err(Error::Format {
                path: manifest,
                reason: format!(
                    "the source checkpoint {} recorded here is gone",
                    self.source.display()
                ),
            });
        }
        let now = sha256_file(&self.source)?;
        if now != self.source_sha256 {
            return Err(Error::Format {
                path: manifest,
                reason: format!(
                    "the source checkpoint {} changed since it was compiled (sha256 {} now, {} then)",
                    self.source.display(),
                    short_sha256(&now),
                    short_sha256(&self.source_sha256)
                ),
            });
        }
        Ok(self.source.clone())
    }
}

/// True when `path` is a compiled directory (it holds `manifest.json`).
pub fn is_compiled_dir(path: &Path) -> bool {
    path.is_dir() && path.join("manifest.json").is_file()
}

#[cfg(test)]
mod short_sha256_tests {
    use super::short_sha256;

    #[test]
    fn a_short_sha256_is_cut_at_a_character_boundary() {
        assert_eq!(short_sha256("0123456789abcdef"), "0123456789ab");
        assert_eq!(short_sha256("ab"), "ab");
        assert_eq!(short_sha256(""), "");
        // Byte 12 falls inside the seventh `é`: twelve characters, not twelve bytes.
        let odd = format!("a{}", "é".repeat(12));
        assert_eq!(short_sha256(&odd), format!("a{}", "é".repeat(11)));
    }
}
