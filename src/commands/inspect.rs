//! `ngpt inspect`: what a checkpoint holds.

use std::path::PathBuf;

use anyhow::Result;
use ngpt_compiler::{import, inspect};

/// Show a checkpoint's config, tensors, effective scaling statistics and unit-norm check.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  ngpt inspect tests/fixtures/nv-tiny/ckpt.pt")]
pub struct Args {
    /// A checkpoint: ckpt.pt, a .safetensors file with config.json beside it, or a directory.
    input: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let ckpt = import::load(&a.input)?;
    println!("checkpoint: {} ({:?})", ckpt.source.display(), ckpt.format);
    for note in &ckpt.notes {
        println!("note: {note}");
    }
    print!("{}", inspect::report(&ckpt)?);
    Ok(())
}
