//! `ngpt logits`: the logits of every position, as a float32 .npy.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::DType;
use clap::ValueEnum;
use ngpt_compiler::{artifact, compile, graph, reference};

#[derive(Clone, Copy, ValueEnum)]
pub enum Engine {
    /// The literal float reference of spec section 3 (candle-core, CPU).
    Reference,
    /// The IR interpreter on the canonical (folded and fused) graph.
    Ir,
    /// The launch plan on the runtime's CPU executor.
    PlanCpu,
    /// The exported model.onnx run by tract: a compiled directory's own, or one exported
    /// in memory from a checkpoint.
    Tract,
}

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
    if let Engine::PlanCpu = a.engine {
        let plan = super::input::load_plan(&a.input, 0)?;
        let vocab = plan.dims.vocab;
        let tokens = crate::tokens::parse_tokens(&a.tokens, vocab)?;
        let plan = if plan.dims.max_seq_len < tokens.len()
            && !ngpt_compiler::compile::is_compiled_dir(&a.input)
        {
            super::input::load_plan(&a.input, tokens.len())?
        } else {
            plan
        };
        let mut session = ngpt_runtime::session::Session::new(std::sync::Arc::new(plan), 1)?;
        let logits = session.prefill(&[tokens.clone()])?;
        let t =
            candle_core::Tensor::from_vec(logits, (tokens.len(), vocab), &candle_core::Device::Cpu)
                .context("logits")?;
        return write_npy(&a.out, &t, tokens.len(), vocab);
    }
    if let Engine::Tract = a.engine {
        let (logits, n, vocab) = tract_logits(&a)?;
        let t = candle_core::Tensor::from_vec(logits, (n, vocab), &candle_core::Device::Cpu)
            .context("logits")?;
        return write_npy(&a.out, &t, n, vocab);
    }
    let ckpt = super::input::load_checkpoint(&a.input)?;
    let tokens = crate::tokens::parse_tokens(&a.tokens, ckpt.config.vocab_size)?;
    let logits = match a.engine {
        Engine::PlanCpu | Engine::Tract => unreachable!("handled above"),
        Engine::Reference => reference::logits(&ckpt, &tokens, a.precision.into())?,
        Engine::Ir => {
            let compiled = compile::compile(&ckpt, &compile::Options::default())?;
            let positions: Vec<u32> = (0..tokens.len() as u32).collect();
            let mut outs =
                graph::interp::run(&compiled.graph, &tokens, &positions, a.precision.into())?;
            outs.remove(0)
        }
    };
    let logits = logits.to_dtype(DType::F32).context("logits to float32")?;
    write_npy(&a.out, &logits, tokens.len(), ckpt.config.vocab_size)
}

/// Logits `[T, vocab]` from model.onnx through tract, with T and vocab.
fn tract_logits(a: &Args) -> Result<(Vec<f32>, usize, usize)> {
    use ngpt_compiler::onnx::{self, tract::Session};
    if compile::is_compiled_dir(&a.input) {
        let path = a.input.join(onnx::MODEL_FILE);
        anyhow::ensure!(
            path.is_file(),
            "{}: no {} in this compiled directory (compiled by an older ngpt?); compile it again",
            a.input.display(),
            onnx::MODEL_FILE
        );
        let session = Session::load(&path)?;
        let tokens = crate::tokens::parse_tokens(&a.tokens, session.vocab)?;
        if let Some(max) = session.max_seq_len {
            anyhow::ensure!(
                tokens.len() <= max,
                "--tokens: {} tokens, but {} has a position table of {max} rows (its \
                 --max-seq-len); compile again with --max-seq-len {} or more",
                tokens.len(),
                path.display(),
                tokens.len()
            );
        }
        let logits = session.logits(&tokens)?;
        return Ok((logits, tokens.len(), session.vocab));
    }
    let ckpt = super::input::load_checkpoint(&a.input)?;
    let tokens = crate::tokens::parse_tokens(&a.tokens, ckpt.config.vocab_size)?;
    let compiled = compile::compile(&ckpt, &compile::Options::default())?;
    let mut opts = onnx::Options::for_config(&ckpt.config);
    opts.max_seq_len = opts.max_seq_len.max(tokens.len());
    let info = onnx::ModelInfo::new(&ckpt, &compiled.records)?;
    let session = if onnx::uses_external_data(&compiled.graph, &opts) {
        // Too large for one protobuf: through a temporary directory, as tract reads
        // external data from beside the model file.
        let dir = tempfile::tempdir().context("creating a temporary directory")?;
        onnx::write(&compiled.graph, &info, &opts, dir.path())?;
        Session::load(&dir.path().join(onnx::MODEL_FILE))?
    } else {
        Session::from_bytes(&onnx::export(&compiled.graph, &info, &opts)?.model)?
    };
    let logits = session.logits(&tokens)?;
    Ok((logits, tokens.len(), session.vocab))
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
