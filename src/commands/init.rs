//! `ngpt init`: write a trained-like random checkpoint.

use std::path::PathBuf;

use anyhow::Result;
use clap::ValueEnum;
use ngpt_compiler::init::{self, Family, Preset, Spec};

#[derive(Clone, Copy, ValueEnum)]
pub enum PresetArg {
    Tiny,
    Small,
    #[value(name = "0.5b")]
    Half,
    /// Hugging Face family (NousResearch's nGPT), 2 layers, n_embd 64, n_inner 256.
    NousTiny,
    /// Hugging Face family, NousResearch/ngpt_0.5B_4k_200B's shape (about 2 GB in f32).
    #[value(name = "nous-0.5b")]
    NousHalf,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FamilyArg {
    /// NVIDIA/ngpt's model.py checkpoint (model.safetensors + model_args config.json).
    Nvidia,
    /// NousResearch's Hugging Face nGPT directory (model_type "ngpt").
    Nous,
}

/// Write a random nGPT checkpoint (model.safetensors + config.json) for tests and benchmarks.
///
/// Matrices are normalized as NVIDIA's training leaves them; scaling vectors are perturbed
/// away from their init values (some negative) so folding mistakes show. With `--family nous`
/// (or a `nous-` preset) it writes a Hugging Face directory of NousResearch's nGPT instead.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  ngpt init out/tiny --preset tiny --seed 1\n  ngpt init out/nous --preset nous-0.5b\n  ngpt init out/odd --layers 3 --heads 3 --embd 96 --vocab 300 --base-scale 0.03125"
)]
pub struct Args {
    /// Output directory.
    dir: PathBuf,
    /// Model size to start from; the dimension flags override it.
    #[arg(long, value_enum, default_value = "tiny")]
    preset: PresetArg,
    /// Checkpoint family; default: the preset's (`nous` with the NVIDIA presets keeps their
    /// sizes).
    #[arg(long, value_enum)]
    family: Option<FamilyArg>,
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long)]
    heads: Option<usize>,
    #[arg(long)]
    embd: Option<usize>,
    #[arg(long)]
    vocab: Option<usize>,
    /// Context length (n_positions for the Hugging Face family).
    #[arg(long)]
    block: Option<usize>,
    /// Hugging Face family only: MLP width n_inner (default 4 * n_embd).
    #[arg(long)]
    inner: Option<usize>,
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
        PresetArg::NousTiny => Preset::NousTiny,
        PresetArg::NousHalf => Preset::NousHalf,
    };
    let mut spec = Spec::preset(preset);
    let o = &mut spec.opts;
    o.n_layer = a.layers.unwrap_or(o.n_layer);
    o.n_head = a.heads.unwrap_or(o.n_head);
    o.n_embd = a.embd.unwrap_or(o.n_embd);
    o.vocab_size = a.vocab.unwrap_or(o.vocab_size);
    o.block_size = a.block.unwrap_or(o.block_size);
    match a.family {
        Some(FamilyArg::Nvidia) => spec.family = Family::Nvidia,
        Some(FamilyArg::Nous) => spec.family = Family::Nous,
        None => {}
    }
    if a.inner.is_some() && spec.family != Family::Nous {
        anyhow::bail!("--inner is for the Hugging Face family (--family nous); NVIDIA's n_inner is 4 * n_embd");
    }
    spec.n_inner = a.inner;
    o.seed = a.seed;
    o.base_scale = a.base_scale;
    o.bf16 = a.bf16;
    init::write_spec(&a.dir, &spec)?;
    let c = spec.config()?;
    println!(
        "wrote {}/model.safetensors and config.json{}: {} layers, {} heads, n_embd {}, vocab {}, base_scale {}, {} parameters{}",
        a.dir.display(),
        match c.family {
            Family::Nvidia => String::new(),
            Family::Nous => format!(
                " (Hugging Face nGPT, n_inner {}, {} positions)",
                c.n_inner, c.n_positions
            ),
        },
        c.n_layer,
        c.n_head,
        c.n_embd,
        c.vocab_size,
        c.base_scale,
        c.parameter_count().unwrap_or(0),
        if spec.opts.bf16 { ", block matrices in BF16" } else { "" }
    );
    Ok(())
}
