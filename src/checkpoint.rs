//! Loading the checkpoint behind INPUT: a checkpoint, or a compiled directory whose
//! manifest names its source. Below both `engines` and `commands`.

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
