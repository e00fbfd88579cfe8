//! `ngpt plan show`: a compiled plan, step by step.

use std::path::PathBuf;

use anyhow::Result;
use ngpt_runtime::listing::{listing, Shape};
use ngpt_runtime::plan::LoadedPlan;

/// Inspect launch plans.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  ngpt compile tests/fixtures/nv-tiny -o out/nv-tiny\n  ngpt plan show out/nv-tiny --tokens 64"
)]
pub struct Args {
    #[command(subcommand)]
    command: PlanCommand,
}

#[derive(clap::Subcommand)]
enum PlanCommand {
    Show(ShowArgs),
}

/// List each program of a compiled plan step by step: kernel or GEMM, grid and block,
/// buffers, bytes moved and FLOPs, with totals.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  ngpt compile tests/fixtures/nv-tiny -o out/nv-tiny\n  ngpt plan show out/nv-tiny --tokens 64"
)]
pub struct ShowArgs {
    /// A compiled directory (holds model.plan and model.weights).
    dir: PathBuf,
    /// Sequences per request the costs are computed for.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Prompt tokens per sequence for the prefill costs.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Tokens in the cache for the decode costs.
    #[arg(long, default_value_t = 512)]
    context: usize,
}

pub fn run(a: Args) -> Result<()> {
    let PlanCommand::Show(s) = a.command;
    let plan = LoadedPlan::load_with(
        &s.dir,
        crate::settings::get()
            .weights_io
            .unwrap_or(ngpt_runtime::plan::WeightsIo::Map),
    )?;
    print!(
        "{}",
        listing(
            &plan,
            Shape {
                batch: s.batch,
                tokens: s.tokens,
                context: s.context
            }
        )
    );
    Ok(())
}
