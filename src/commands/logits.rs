//! `ngpt logits`: the logits of every position, as a float32 .npy.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::ValueEnum;
use ngpt_compiler::{artifact, reference};

use crate::engines::{Engine, Model};

#[derive(Clone, Copy, ValueEnum)]
pub enum PrecisionArg {
    F32,
    F64,
}

impl From<PrecisionArg> for reference::Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => reference::Precision::F32,
            PrecisionArg::F64 => reference::Precision::F64,
        }
    }
}

/// Compute the logits of every position of a token sequence and write them as a
/// float32 .npy of shape [T, vocab].
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  ngpt logits tests/fixtures/nv-tiny/ckpt.pt --tokens 45,64,77 -o logits.npy --precision f64\n  ngpt logits out/nv-tiny --engine ir --tokens 45,64,77 -o ir.npy\n  ngpt logits out/nv-tiny --engine tract --tokens 45,64,77 -o tract.npy"
)]
pub struct Args {
    /// A checkpoint (ckpt.pt, a .safetensors file with config.json beside it, or a directory
    /// holding one) or a compiled directory (its recorded source is used).
    input: PathBuf,
    /// Comma-separated token ids, at positions 0..T-1.
    // Hyphen values allowed so that `--tokens -1` reaches the range check (one-line error)
    // instead of clap's "unexpected argument" usage text.
    #[arg(long, allow_hyphen_values = true)]
    tokens: String,
    /// Output .npy file.
    #[arg(short, long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "reference")]
    engine: Engine,
    #[arg(long, value_enum, default_value = "f64")]
    precision: PrecisionArg,
}

pub fn run(a: Args) -> Result<()> {
    let mut model = Model::open(&a.input);
    let vocab = model.vocab_size()?;
    let tokens = crate::tokens::parse_tokens(&a.tokens, vocab)?;
    let logits = model.logits(a.engine, &tokens, a.precision.into())?;
    let logits: Vec<f32> = logits.into_iter().map(|v| v as f32).collect();
    let t = candle_core::Tensor::from_vec(logits, (tokens.len(), vocab), &candle_core::Device::Cpu)
        .context("logits")?;
    write_npy(&a.out, &t, tokens.len(), vocab)
}

/// Writes `[t, vocab]` float32 logits as .npy, through a temporary file.
fn write_npy(
    out: &std::path::Path,
    logits: &candle_core::Tensor,
    t: usize,
    vocab: usize,
) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        artifact::create_dir(dir)?;
    }
    artifact::write_with(out, |tmp| {
        logits.write_npy(tmp).map_err(|e| ngpt_compiler::Error::Io {
            path: tmp.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })
    })?;
    println!("wrote {} [{t} x {vocab}] float32", out.display());
    Ok(())
}
