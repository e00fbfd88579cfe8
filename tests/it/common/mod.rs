//! Helpers shared by the integration tests: the nv-tiny fixture, .npy reading, and small
//! checkpoints written with `ngpt init` that a test can then corrupt.
#![allow(dead_code)]

pub mod baseline;

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

/// Runs the built `ngpt` with `args` and returns what it did.
pub fn ngpt(args: &[&str]) -> Result<std::process::Output> {
    std::process::Command::new(ngpt_bin())
        .args(args)
        .output()
        .with_context(|| format!("running ngpt {args:?}"))
}

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `o` when its run succeeded, else an error with `what` and its stderr.
pub fn ok(o: std::process::Output, what: &str) -> Result<std::process::Output> {
    anyhow::ensure!(o.status.success(), "{what} failed: {}", stderr(&o));
    Ok(o)
}

pub fn utf8(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A minimal pickle (protocol 2) writer: what `torch.save` of NVIDIA's checkpoint dict uses
/// (dicts, strings, ints, floats, tensors rebuilt from numbered storages).
#[derive(Default)]
pub struct Pickle(pub Vec<u8>);

impl Pickle {
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
        self
    }
    pub fn int(&mut self, i: i32) -> &mut Self {
        self.0.push(b'J');
        self.0.extend(i.to_le_bytes());
        self
    }
    pub fn float(&mut self, f: f64) -> &mut Self {
        self.0.push(b'G');
        self.0.extend(f.to_be_bytes());
        self
    }
    pub fn op(&mut self, op: &[u8]) -> &mut Self {
        self.0.extend(op);
        self
    }
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    pub fn ints(&mut self, v: &[usize]) -> &mut Self {
        self.op(b"(");
        for &d in v {
            self.int(d as i32);
        }
        self.op(b"t")
    }
    /// `torch._utils._rebuild_tensor_v2(storage i, 0, shape, contiguous strides, False, {})`.
    pub fn tensor(&mut self, storage: usize, class: &str, shape: &[usize]) -> &mut Self {
        let numel: usize = shape.iter().product();
        let mut strides = vec![1usize; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * shape[i + 1];
        }
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"(");
        self.op(b"(").str("storage").global("torch", class);
        self.str(&storage.to_string()).str("cpu").int(numel as i32);
        self.op(b"tQ").int(0).ints(shape).ints(&strides).op(&[0x89]);
        self.global("collections", "OrderedDict").op(b")R");
        self.op(b"tR")
    }
    /// `model_args` of `config` as a dict, after the key already written.
    pub fn model_args(&mut self, config: &ngpt_compiler::config::Config) -> &mut Self {
        self.op(b"}(");
        for (k, v) in [
            ("use_nGPT", 1),
            ("n_layer", config.n_layer as i32),
            ("n_head", config.n_head as i32),
            ("n_embd", config.n_embd as i32),
            ("block_size", config.block_size as i32),
            ("vocab_size", config.vocab_size as i32),
        ] {
            self.str(k).int(v);
        }
        self.str("base_scale").float(config.base_scale);
        self.str("bias").op(&[0x89]).str("dropout").float(0.0);
        self.op(b"u")
    }
}

/// The `ngpt init` model of `opts` as NVIDIA's `ckpt.pt` would hold it: the pickle of
/// `{"model_args": {...}, "model": state dict}` with `prefix` before every key, and the
/// storages it names (`archive/data/0`, ...).
pub fn torch_ckpt_parts(opts: &InitOptions, prefix: &str) -> Result<(Vec<u8>, Vec<Vec<u8>>)> {
    let dir = tempfile::tempdir()?;
    ngpt_compiler::init::write(dir.path(), opts)?;
    let config = opts.config()?;
    let entries = read_entries(&dir.path().join("model.safetensors"))?;
    let mut p = Pickle::default();
    p.op(&[0x80, 2])
        .op(b"}(")
        .str("model_args")
        .model_args(&config);
    p.str("model").op(b"}(");
    let mut storages = vec![];
    for (i, e) in entries.iter().enumerate() {
        let class = match e.dtype {
            safetensors::Dtype::F32 => "FloatStorage",
            safetensors::Dtype::BF16 => "BFloat16Storage",
            other => anyhow::bail!("{}: unexpected dtype {other:?}", e.name),
        };
        p.str(&format!("{prefix}{}", e.name))
            .tensor(i, class, &e.shape);
        storages.push(e.data.clone());
    }
    p.op(b"uu.");
    Ok((p.0, storages))
}

/// A torch zip: `archive/data.pkl` and `archive/data/{i}`, stored uncompressed.
pub fn torch_zip_bytes(pickle: &[u8], storages: &[Vec<u8>]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts)?;
    zip.write_all(pickle)?;
    for (i, s) in storages.iter().enumerate() {
        zip.start_file(format!("archive/data/{i}"), opts)?;
        zip.write_all(s)?;
    }
    Ok(zip.finish()?.into_inner())
}
