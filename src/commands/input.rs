//! Resolving INPUT: a checkpoint, or a compiled directory whose manifest names its source.

use std::path::Path;

use anyhow::Result;
use ngpt_compiler::compile::{is_compiled_dir, Manifest};
use ngpt_compiler::import::{self, Checkpoint};

/// Loads the checkpoint behind `input`, printing the importer's notes to stderr. A compiled
/// directory is recognised by its `manifest.json`; its recorded source is used, after
/// checking that it is still there and unchanged.
pub fn load_checkpoint(input: &Path) -> Result<Checkpoint> {
    let path = if is_compiled_dir(input) {
        let source = Manifest::read(input)?.checked_source(input)?;
        eprintln!(
            "note: {} is a compiled directory; using its source {}",
            input.display(),
            source.display()
        );
        source
    } else {
        input.to_path_buf()
    };
    let ckpt = import::load(&path)?;
    for note in &ckpt.notes {
        eprintln!("note: {note}");
    }
    Ok(ckpt)
}

/// The launch plan behind `input`: a compiled directory's `model.plan`, or one lowered in
/// memory (f32, KV capacity at least `min_seq_len`) from a checkpoint.
pub fn load_plan(input: &Path, min_seq_len: usize) -> Result<ngpt_runtime::plan::LoadedPlan> {
    use ngpt_schemas::prost::Message;
    if is_compiled_dir(input) {
        return Ok(ngpt_runtime::plan::LoadedPlan::load(input)?);
    }
    let ckpt = load_checkpoint(input)?;
    let compiled = ngpt_compiler::compile::compile(&ckpt, &Default::default())?;
    let max_seq = ckpt.config.block_size.max(2048).max(min_seq_len);
    let lowered = ngpt_compiler::plan::lower(
        &compiled.graph,
        &ckpt.config,
        ngpt_compiler::plan::WeightDtype::F32,
        max_seq,
        "",
    )?;
    Ok(ngpt_runtime::plan::LoadedPlan::from_bytes(
        &lowered.plan.encode_to_vec(),
        &lowered.weights,
        &input.display().to_string(),
    )?)
}
