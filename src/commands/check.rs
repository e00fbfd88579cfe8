//! `ngpt check`: recompute a `model.parity` record and report drift.

use std::path::PathBuf;

use anyhow::{bail, Result};
use ngpt_compiler::compile::short_sha256;

use crate::engines::{Engine, Model};
use crate::parity::{self, Recomputed, Record, Tolerance};

/// Recompute what a `model.parity` (from `ngpt snapshot`) recorded and compare: exits 1
/// on drift, with a table of where (prompt, position, metric, expected, got).
#[derive(clap::Args)]
#[command(
    after_help = "Tolerance on each logit, as a fraction of the standard deviation of the prompt's \
recorded logits: by default 1e-4 when both the record and this run compute in f32 or f64, 0.1 \
when either has bf16 or f16 weights. A top-1 or top-k order swap between \
logits that were recorded within tolerance of each other is reported as a near tie, not \
as drift.\n\nExample:\n  ngpt check nv-tiny.parity out/nv-tiny\n  ngpt check nv-tiny.parity out/nv-tiny-bf16 --engine plan-cpu --tol 0.05"
)]
pub struct Args {
    /// The record.
    parity: PathBuf,
    /// A compiled directory or a checkpoint.
    input: PathBuf,
    /// Engine to recompute with (default: the recorded one).
    #[arg(long, value_enum)]
    engine: Option<Engine>,
    /// f32 or f64 for reference and ir, f32 or bf16 for a plan made from a checkpoint
    /// (default: f64 when the record is f64, else f32).
    #[arg(long, value_enum)]
    dtype: Option<super::snapshot::Dtype>,
    /// Tolerance on each logit and statistic, as a fraction of the standard deviation of
    /// the prompt's recorded logits (at least the rounding step).
    #[arg(long, allow_hyphen_values = true)]
    tol: Option<f64>,
    /// Vocabulary for text prompts (default: one found beside the model).
    #[arg(long)]
    vocab: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let record = Record::read(&a.parity)?;
    let engine = match a.engine {
        Some(e) => e,
        None => Engine::parse_list(&record.engine, &format!("{} engine", a.parity.display()))?
            .first()
            .copied()
            .unwrap_or(Engine::PlanCpu),
    };
    let dtype = a.dtype.unwrap_or(
        if record.numerics == "f64" && matches!(engine, Engine::Reference | Engine::Ir) {
            super::snapshot::Dtype::F64
        } else {
            super::snapshot::Dtype::F32
        },
    );
    let mut model = Model::open(&a.input);
    let precision = super::snapshot::configure(&mut model, engine, dtype)?;
    let vocab = model.vocab_size()?;
    if vocab != record.vocab_size {
        bail!(
            "{}: recorded with vocab_size {}, but {} has {vocab}",
            a.parity.display(),
            record.vocab_size,
            a.input.display()
        );
    }
    let numerics = model.numerics(engine, precision)?;
    let tol = match a.tol {
        Some(t) if t.is_finite() && t >= 0.0 => Tolerance { rel: t },
        Some(t) => bail!("--tol {t}: expected a non-negative number"),
        None => Tolerance::default_for(&record.numerics, numerics.label()),
    };
    let sha = model.source_sha256()?;
    if sha != record.source_sha256 {
        eprintln!(
            "note: {} was recorded from a checkpoint with sha256 {}…; this one is {}…",
            a.parity.display(),
            short_sha256(&record.source_sha256),
            short_sha256(&sha)
        );
    }
    let mut findings = vec![];
    for (n, p) in record.prompts.iter().enumerate() {
        let got = Recomputed {
            logits: model.logits(engine, &p.tokens, precision)?,
            greedy: model.greedy(engine, &p.tokens, p.greedy.len(), precision)?,
        };
        let abs = tol.abs_for(p, record.logit_decimals);
        findings.extend(parity::compare_prompt(n + 1, p, &got, vocab, abs));
    }
    let positions: usize = record.prompts.iter().map(|p| p.tokens.len()).sum();
    let failures = findings.iter().filter(|f| f.failure).count();
    let ties = findings.len() - failures;
    println!(
        "check {}: recorded by {} ({}), recomputed by {} ({}), {} prompts, {positions} positions, tolerance {:e} x the logits' std",
        a.parity.display(),
        record.engine,
        record.numerics,
        engine.name(),
        numerics.label(),
        record.prompts.len(),
        tol.rel
    );
    if !findings.is_empty() {
        println!(
            "  {:<6} {:<10} {:<28} {:>14} {:>14}",
            "prompt", "at", "metric", "expected", "got"
        );
        for f in &findings {
            println!(
                "  {:<6} {:<10} {:<28} {:>14} {:>14}{}",
                f.prompt,
                f.at,
                f.metric,
                f.expected,
                f.got,
                if f.failure { "  DRIFT" } else { "" }
            );
        }
    }
    println!("{failures} drifted, {ties} near-tie swaps");
    if failures > 0 {
        bail!("check: {failures} value(s) drifted beyond tolerance (table above)");
    }
    Ok(())
}
