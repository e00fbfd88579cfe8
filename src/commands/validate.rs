//! `ngpt validate`: every available engine on one prompt, against the float64 reference.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use ngpt_compiler::compare::{compare, Comparison};
use ngpt_compiler::reference::Precision;

use crate::engines::{cuda_unavailable, Engine, Model, Numerics};

/// Run every available engine on a prompt and print a parity table against the float64
/// reference; exit non-zero when any engine is beyond its tolerance.
#[derive(clap::Args)]
#[command(
    after_help = "Tolerances against the float64 reference: f32 paths 1e-5 relative error with every \
position's top-1 agreeing; bf16 weights 2e-2 and f16 weights 1e-2, with 95% top-1 agreement.\n\n\
Example:\n  ngpt compile tests/fixtures/nv-tiny/ckpt.pt -o out/nv-tiny\n  ngpt validate out/nv-tiny\n  \
ngpt validate out/nv-tiny --tokens 45,64,77 --engines tract,plan-cpu"
)]
pub struct Args {
    /// A compiled directory (its own model.onnx and model.plan are run) or a checkpoint
    /// (f32 exports made in memory).
    input: PathBuf,
    /// Comma-separated token ids; default: 64 pseudo-random ids (seeded, so runs repeat).
    #[arg(long, allow_hyphen_values = true)]
    tokens: Option<String>,
    /// Engines to run (comma-separated); default: all of them.
    #[arg(long, default_value = "reference,ir,tract,plan-cpu,plan-cuda")]
    engines: String,
}

/// One row of the parity table.
pub struct Row {
    pub engine: Engine,
    pub numerics: Option<Numerics>,
    pub outcome: Outcome,
}

pub enum Outcome {
    Ran {
        cmp: Comparison,
        tolerance: (f64, f64),
        /// Computing the logits.
        millis: f64,
        /// Loading, compiling or exporting first.
        load_millis: f64,
    },
    Skipped(String),
    Failed(String),
}

impl Row {
    pub fn passed(&self) -> bool {
        match &self.outcome {
            Outcome::Ran { cmp, tolerance, .. } => cmp.passes(tolerance.0, tolerance.1),
            Outcome::Skipped(_) => true,
            Outcome::Failed(_) => false,
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    let engines = Engine::parse_list(&a.engines, "--engines")?;
    let mut model = Model::open(&a.input);
    let vocab = model.vocab_size()?;
    let tokens = match &a.tokens {
        Some(t) => crate::tokens::parse_tokens(t, vocab)?,
        None => pseudo_random_tokens(64, vocab),
    };
    let rows = parity_table(&mut model, &tokens, &engines)?;
    print_table(&rows, tokens.len());
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.engine.name())
        .collect();
    if !failed.is_empty() {
        bail!(
            "validate: beyond tolerance or failed: {} (table above)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// `n` token ids below `vocab` from a fixed-seed generator: random inputs, never zeros,
/// the same every run.
pub fn pseudo_random_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % vocab.max(1) as u64) as u32
        })
        .collect()
}

/// Runs the float64 reference, then each engine (the reference and the IR in f32 and,
/// for the IR, f64), and compares.
pub fn parity_table(model: &mut Model, tokens: &[u32], engines: &[Engine]) -> Result<Vec<Row>> {
    let vocab = model.vocab_size()?;
    let reference = model.logits(Engine::Reference, tokens, Precision::F64)?;
    let mut rows = vec![];
    for &engine in engines {
        let precisions: &[Precision] = match engine {
            Engine::Reference => &[Precision::F32],
            Engine::Ir => &[Precision::F64, Precision::F32],
            _ => &[Precision::F32],
        };
        for &p in precisions {
            let skip = match engine {
                // A plan the CUDA executor refuses on any device is skipped, saying why
                // (not a parity failure); a plan that does not load fails below.
                Engine::PlanCuda => match model.plan(tokens.len()) {
                    Ok(p) => crate::engines::cuda_cannot_run(&p),
                    Err(_) => cuda_unavailable(),
                },
                Engine::Tract => model
                    .onnx_missing_by_choice()
                    .then(|| "compiled with --no-onnx: no model.onnx".to_string()),
                _ => None,
            };
            if let Some(why) = skip {
                rows.push(Row {
                    engine,
                    numerics: None,
                    outcome: Outcome::Skipped(why),
                });
                continue;
            }
            let t0 = Instant::now();
            let got = model
                .prepare(engine, tokens.len())
                .map(|()| Instant::now())
                .and_then(|t| {
                    let got = model.logits(engine, tokens, p)?;
                    Ok((got, t.elapsed()))
                });
            let load = t0.elapsed();
            let row = match got.and_then(|(got, took)| Ok((got, took, model.numerics(engine, p)?)))
            {
                Ok((got, took, numerics)) => Row {
                    engine,
                    numerics: Some(numerics),
                    outcome: Outcome::Ran {
                        cmp: compare(&got, &reference, vocab),
                        tolerance: numerics.tolerance(),
                        millis: took.as_secs_f64() * 1e3,
                        load_millis: (load - took).as_secs_f64() * 1e3,
                    },
                },
                Err(e) => Row {
                    engine,
                    numerics: None,
                    outcome: Outcome::Failed(format!("{e:#}")),
                },
            };
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Prints the table: engine, what it computes in, relative error, top-1, time, verdict.
pub fn print_table(rows: &[Row], positions: usize) {
    println!(
        "parity against the float64 reference, {positions} positions (relative error ||out - ref||_F / ||ref||_F):"
    );
    // The "computes in" column as wide as its longest label.
    let w = rows
        .iter()
        .map(|r| r.numerics.map_or(1, |n| n.label().len()))
        .fold("computes in".len(), usize::max);
    println!(
        "  {:<10} {:<w$} {:>10} {:>9} {:>10} {:>10} {:>10}  result",
        "engine", "computes in", "rel. error", "top-1", "tolerance", "time", "load"
    );
    for r in rows {
        let numerics = r.numerics.map_or("-", |n| n.label());
        match &r.outcome {
            Outcome::Ran {
                cmp,
                tolerance,
                millis,
                load_millis,
            } => println!(
                "  {:<10} {:<w$} {:>10.2e} {:>9} {:>10.0e} {:>8.1}ms {:>8.1}ms  {}",
                r.engine.name(),
                numerics,
                cmp.rel_err,
                format!("{}/{}", cmp.top1_agree, cmp.positions),
                tolerance.0,
                millis,
                load_millis,
                if r.passed() { "ok" } else { "FAIL" }
            ),
            Outcome::Skipped(why) | Outcome::Failed(why) => println!(
                "  {:<10} {:<w$} {:>10} {:>9} {:>10} {:>10} {:>10}  {}: {why}",
                r.engine.name(),
                numerics,
                "-",
                "-",
                "-",
                "-",
                "-",
                if r.passed() { "skipped" } else { "FAIL" }
            ),
        }
    }
}
