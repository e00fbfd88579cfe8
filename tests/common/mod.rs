//! Helpers shared by the integration tests: the nv-tiny fixture, .npy reading, and small
//! checkpoints written with `ngpt init` that a test can then corrupt.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use ngpt_compiler::import::Checkpoint;
use ngpt_compiler::init::InitOptions;
use ngpt_compiler::reference::{self, Precision};

/// `tests/fixtures/nv-tiny`: a checkpoint trained 300 steps by NVIDIA's own code.
pub fn nv_tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nv-tiny")
}

/// A fixture JSON file of nv-tiny, parsed.
pub fn fixture_json(name: &str) -> Result<serde_json::Value> {
    let path = nv_tiny().join(name);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

/// A list of token ids from a fixture JSON field.
pub fn fixture_tokens(file: &str, field: &str) -> Result<Vec<u32>> {
    let v = fixture_json(file)?;
    v[field]
        .as_array()
        .with_context(|| format!("{file}: `{field}` is not a list"))?
        .iter()
        .map(|t| {
            t.as_u64()
                .map(|t| t as u32)
                .with_context(|| format!("{file}: `{field}` holds a non-integer"))
        })
        .collect()
}

/// A tensor flattened to f64 values.
pub fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// Reads a .npy file as (dims, f64 values).
pub fn read_npy(path: &Path) -> Result<(Vec<usize>, DType, Vec<f64>)> {
    let t = Tensor::read_npy(path).with_context(|| path.display().to_string())?;
    Ok((t.dims().to_vec(), t.dtype(), to_f64(&t)?))
}

/// Reference logits `[T, vocab]`, flattened, in f64.
pub fn ref_logits(ckpt: &Checkpoint, tokens: &[u32], p: Precision) -> Result<Vec<f64>> {
    to_f64(&reference::logits(ckpt, tokens, p)?)
}

/// Options of a very small model: 1 layer, 2 heads, n_embd 8, vocab 16.
pub fn small_opts() -> InitOptions {
    InitOptions {
        n_layer: 1,
        n_head: 2,
        n_embd: 8,
        vocab_size: 16,
        block_size: 16,
        seed: 7,
        base_scale: None,
        bf16: false,
    }
}

/// One safetensors entry, owned, so tests can rename, reshape or corrupt it.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Entry {
    /// An F32 tensor of `shape` filled with `value`.
    pub fn f32(name: &str, shape: &[usize], value: f32) -> Entry {
        let n: usize = shape.iter().product();
        Entry {
            name: name.to_string(),
            dtype: safetensors::Dtype::F32,
            shape: shape.to_vec(),
            data: (0..n).flat_map(|_| value.to_le_bytes()).collect(),
        }
    }
}

/// Reads every tensor of a safetensors file.
pub fn read_entries(path: &Path) -> Result<Vec<Entry>> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut out: Vec<Entry> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| Entry {
            name,
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Writes `entries` as a safetensors file.
pub fn write_entries(path: &Path, entries: &[Entry]) -> Result<()> {
    let views = entries
        .iter()
        .map(|e| {
            Ok((
                e.name.clone(),
                safetensors::tensor::TensorView::new(e.dtype, e.shape.clone(), &e.data)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize_to_file(views, None, path)?;
    Ok(())
}

/// Rewrites `dir/model.safetensors` through `edit`.
pub fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<Entry>)) -> Result<()> {
    let path = dir.join("model.safetensors");
    let mut entries = read_entries(&path)?;
    edit(&mut entries);
    write_entries(&path, &entries)
}

/// Rewrites `dir/config.json` through `edit` on its JSON object.
pub fn edit_config(
    dir: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> Result<()> {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    edit(v.as_object_mut().context("config.json is an object")?);
    std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
    Ok(())
}

/// Path to the built `ngpt` binary.
pub fn ngpt_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ngpt")
}
