//! `ngpt snapshot`: record what a model computes on a set of prompts, for `ngpt check`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use ngpt_compiler::artifact;

use crate::engines::{Engine, Model};
use crate::parity::{self, Position, PromptRecord, Record, Stats};
use crate::tokens::Vocab;

/// Record, for each prompt of a file, the top-k logits at every position, the greedy
/// continuation and summary statistics, into a diff-friendly `model.parity` (JSON).
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  ngpt snapshot out/nv-tiny --prompts prompts.txt -o nv-tiny.parity\n  ngpt snapshot ckpt.pt --prompts prompts.txt --engine reference --dtype f64 -o ref.parity\n  ngpt check nv-tiny.parity out/nv-tiny"
)]
pub struct Args {
    /// A compiled directory or a checkpoint.
    pub input: PathBuf,
    /// One prompt per line: token ids (5,17,3), or text when a vocabulary is known.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output file.
    #[arg(short, long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "plan-cpu")]
    pub engine: Engine,
    /// What to compute in: f32 or f64 for reference and ir; f32 or bf16 weights for a
    /// plan made from a checkpoint (a compiled directory's plan has its own dtype).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dtype,
    /// Token ids recorded at each position, with their logits.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Greedy tokens generated after each prompt.
    #[arg(long, default_value_t = 8)]
    pub greedy: usize,
    /// Decimals the logits are rounded to.
    #[arg(long, default_value_t = 5)]
    pub decimals: u32,
    /// Vocabulary for text prompts (default: one found beside the model).
    #[arg(long)]
    pub vocab: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    F32,
    F64,
    Bf16,
}

/// Sets `model` up for `dtype` and returns the precision reference and ir compute in.
pub fn configure(
    model: &mut Model,
    engine: Engine,
    dtype: Dtype,
) -> Result<ngpt_compiler::reference::Precision> {
    use ngpt_compiler::reference::Precision;
    match (engine, dtype) {
        (Engine::Reference | Engine::Ir, Dtype::Bf16) => {
            bail!("--dtype bf16: {} computes in f32 or f64", engine.name())
        }
        (Engine::Tract | Engine::PlanCpu | Engine::PlanCuda, Dtype::F64) => {
            bail!("--dtype f64: only reference and ir compute in f64")
        }
        (_, Dtype::Bf16) => model.set_plan_dtype(ngpt_compiler::plan::WeightDtype::Bf16),
        _ => {}
    }
    Ok(match dtype {
        Dtype::F64 => Precision::F64,
        _ => Precision::F32,
    })
}

pub fn run(a: Args) -> Result<()> {
    if a.top_k == 0 {
        bail!("--top-k 0: expected at least 1");
    }
    if a.decimals > 12 {
        bail!("--decimals {}: expected at most 12", a.decimals);
    }
    let mut model = Model::open(&a.input);
    let precision = configure(&mut model, a.engine, a.dtype)?;
    let vocab_size = model.vocab_size()?;
    let vocab = match &a.vocab {
        Some(p) => Some(Vocab::from_file(p)?),
        None => Vocab::find(&a.input)?,
    };
    let prompts = parity::read_prompts(&a.prompts, vocab.as_ref(), vocab_size)?;
    let mut records = vec![];
    for (line, tokens) in prompts {
        let logits = model.logits(a.engine, &tokens, precision)?;
        let greedy = model.greedy(a.engine, &tokens, a.greedy, precision)?;
        let positions = logits
            .chunks(vocab_size)
            .enumerate()
            .map(|(pos, row)| Position {
                pos,
                top: parity::top_k(row, a.top_k.min(vocab_size))
                    .into_iter()
                    .map(|(id, l)| (id, parity::round(l, a.decimals)))
                    .collect(),
            })
            .collect();
        records.push(PromptRecord {
            prompt: line,
            tokens,
            greedy: greedy.iter().map(|g| g.0).collect(),
            greedy_margins: greedy
                .iter()
                .map(|g| parity::round(g.1, a.decimals))
                .collect(),
            stats: Stats::of(&logits).rounded(a.decimals),
            positions,
        });
    }
    let numerics = model.numerics(a.engine, precision)?;
    let record = Record {
        format: parity::FORMAT.into(),
        ngpt_version: env!("CARGO_PKG_VERSION").into(),
        engine: a.engine.name().into(),
        numerics: numerics.label().into(),
        source_sha256: model.source_sha256()?,
        vocab_size,
        logit_decimals: a.decimals,
        top_k: a.top_k.min(vocab_size),
        greedy_tokens: a.greedy,
        prompts: records,
    };
    let text = record.to_text()?;
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        artifact::create_dir(dir)?;
    }
    artifact::write_bytes(&a.out, text.as_bytes())?;
    let positions: usize = record.prompts.iter().map(|p| p.tokens.len()).sum();
    println!(
        "wrote {}: {} prompts, {positions} positions, top-{} logits to {} decimals, {} greedy tokens each ({} {})",
        a.out.display(),
        record.prompts.len(),
        record.top_k,
        a.decimals,
        a.greedy,
        record.engine,
        record.numerics
    );
    Ok(())
}
