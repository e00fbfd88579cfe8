//! `ngpt compile`: checkpoint in, compiled directory out.

use std::path::PathBuf;

use anyhow::Result;
use ngpt_compiler::compile::{self, Manifest};
use ngpt_compiler::{artifact, passes};

/// Compile a checkpoint: fold the scaling factors, fuse the normalize ops, and write the
/// compiled directory (manifest.json, ir.txt, passes.txt), all files or none.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  ngpt compile tests/fixtures/nv-tiny/ckpt.pt -o out/nv-tiny\n  ngpt compile ckpt.pt -o out/bisect --stop-after 4 --force"
)]
pub struct Args {
    /// A checkpoint: ckpt.pt, a .safetensors file with config.json beside it, or a directory.
    input: PathBuf,
    /// Output directory.
    #[arg(short, long)]
    out: PathBuf,
    /// Run only the first N passes (to bisect a miscompile).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Replace an existing output directory (only once the new one is complete).
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args) -> Result<()> {
    let ckpt = super::input::load_checkpoint(&a.input)?;
    if let Some(n) = a.stop_after {
        anyhow::ensure!(
            n <= passes::CANONICAL.len(),
            "--stop-after {n}: there are only {} passes",
            passes::CANONICAL.len()
        );
    }
    let compiled = compile::compile(
        &ckpt,
        &compile::Options {
            stop_after: a.stop_after,
        },
    )?;
    let source = std::fs::canonicalize(&ckpt.source).unwrap_or_else(|_| ckpt.source.clone());
    let manifest = Manifest {
        producer: "ngpt".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        source_sha256: compile::sha256_file(&source)?,
        source,
        stop_after: a.stop_after,
        passes: compiled
            .records
            .iter()
            .map(|r| r.name.to_string())
            .collect(),
        files: vec!["manifest.json".into(), "ir.txt".into(), "passes.txt".into()],
    };
    let log = compiled.pass_log();
    artifact::write_dir(&a.out, a.force, |dir| {
        artifact::write_bytes(&dir.join("ir.txt"), compiled.graph.to_string().as_bytes())?;
        artifact::write_bytes(&dir.join("passes.txt"), log.as_bytes())?;
        let json = serde_json::to_string_pretty(&manifest).map_err(|e| {
            ngpt_compiler::Error::Argument {
                what: "manifest".into(),
                problem: e.to_string(),
            }
        })?;
        artifact::write_bytes(&dir.join("manifest.json"), json.as_bytes())
    })?;
    print!("{log}");
    println!(
        "wrote {} ({} IR nodes)",
        a.out.display(),
        compiled.graph.nodes.len()
    );
    Ok(())
}
