//! Resolving INPUT: a checkpoint, or a compiled directory whose manifest names its source.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;

pub use crate::checkpoint::load_checkpoint;

/// The launch plan behind `input`: a compiled directory's `model.plan` (its weights
/// mapped), or one lowered in memory (f32, KV capacity at least `min_seq_len`) from a
/// checkpoint, whose tensors and graph are freed once the plan holds its weights.
pub fn load_plan(input: &Path, min_seq_len: usize) -> Result<Arc<ngpt_runtime::plan::LoadedPlan>> {
    crate::engines::Model::open(input).plan(min_seq_len)
}
