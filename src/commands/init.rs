//! `ngpt init`: write a trained-like random checkpoint.

use std::path::PathBuf;

use anyhow::Result;
use clap::ValueEnum;
use ngpt_compiler::init::{self, InitOptions, Preset};

#[derive(Clone, Copy, ValueEnum)]
pub enum PresetArg {
    Tiny,
    Small,
    #[value(name = "0.5b")]
    Half,
}

/// Write a random nGPT checkpoint (model.safetensors + config.json) for tests and benchmarks.
///
/// Matrices are normalized as NVIDIA's training leaves them; scaling vectors are perturbed
/// away from their init values (some negative) so folding mistakes show.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  ngpt init out/tiny --preset tiny --seed 1\n  ngpt init out/odd --layers 3 --heads 3 --embd 96 --vocab 300 --base-scale 0.03125"
)]
pub struct Args {
    /// Output directory.
    dir: PathBuf,
    /// Model size to start from; the dimension flags override it.
    #[arg(long, value_enum, default_value = "tiny")]
    preset: PresetArg,
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long)]
    heads: Option<usize>,
    #[arg(long)]
    embd: Option<usize>,
    #[arg(long)]
    vocab: Option<usize>,
    #[arg(long)]
    block: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// base_scale recorded in config.json (default: train.py's 1/sqrt(n_embd)).
    #[arg(long)]
    base_scale: Option<f64>,
    /// Store the block matrices in BF16, as NVIDIA does.
    #[arg(long)]
    bf16: bool,
}

pub fn run(a: Args) -> Result<()> {
    let preset = match a.preset {
        PresetArg::Tiny => Preset::Tiny,
        PresetArg::Small => Preset::Small,
        PresetArg::Half => Preset::Half,
    };
    let mut o = InitOptions::preset(preset);
    o.n_layer = a.layers.unwrap_or(o.n_layer);
    o.n_head = a.heads.unwrap_or(o.n_head);
    o.n_embd = a.embd.unwrap_or(o.n_embd);
    o.vocab_size = a.vocab.unwrap_or(o.vocab_size);
    o.block_size = a.block.unwrap_or(o.block_size);
    o.seed = a.seed;
    o.base_scale = a.base_scale;
    o.bf16 = a.bf16;
    init::write(&a.dir, &o)?;
    let c = o.config()?;
    println!(
        "wrote {}/model.safetensors and config.json: {} layers, {} heads, n_embd {}, vocab {}, base_scale {}, {} parameters{}",
        a.dir.display(),
        c.n_layer,
        c.n_head,
        c.n_embd,
        c.vocab_size,
        c.base_scale,
        c.parameter_count().unwrap_or(0),
        if o.bf16 { ", block matrices in BF16" } else { "" }
    );
    Ok(())
}
