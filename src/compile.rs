//! Compiling a checkpoint into a directory: what `ngpt compile` does, as a function.
//!
//! [`compile_dir`] imports a checkpoint (or the source a compiled directory names), runs
//! the pass pipeline, and writes the compiled directory (manifest.json, ir.txt,
//! passes.txt, model.onnx with genai_config.json, the tokenizer files found beside the
//! input, model.plan and model.weights): all files or none, an existing directory replaced
//! only once the new one is complete.
//!
//! ```no_run
//! use ngpt::compile::{compile_dir, Options, PlanWeights};
//!
//! let options = Options { plan: PlanWeights::Bf16, onnx: None, ..Options::default() };
//! let done = compile_dir("ckpt.pt".as_ref(), "out/bf16".as_ref(), &options)?;
//! println!("{} IR nodes, KV capacity {}", done.ir_nodes, done.max_seq_len);
//! # Ok::<(), ngpt::compile::Error>(())
//! ```
//!
//! Errors are typed ([`Error`]); none names a command-line flag.

use std::path::{Path, PathBuf};

use ngpt_compiler::compile::{self as pipeline, is_compiled_dir, Manifest};
use ngpt_compiler::plan::{self, WeightDtype};
use ngpt_compiler::{artifact, import, onnx, passes, quant};
use ngpt_schemas::prost::Message;

/// Weights of the launch plan's GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlanWeights {
    /// f32.
    #[default]
    F32,
    /// bf16.
    Bf16,
    /// Stored quantized (I8 / I4 blocks with f16 scales), as [`Options::quantize`] says;
    /// requires it.
    Quantized,
}

/// Weights of model.onnx's float matrices (quantized ones are MatMulNBits either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnnxWeights {
    /// f32.
    #[default]
    F32,
    /// f16, cast to f32 in the graph; not with [`Options::quantize`].
    F16,
}

/// What [`compile_dir`] writes. `Default`: a full f32 compile with model.onnx inline, the
/// KV capacity [`onnx::default_max_seq_len`] gives, no quantization, no replacing.
#[derive(Debug, Clone)]
pub struct Options {
    /// Run only the first N passes (no plan is lowered then: a plan needs them all).
    pub stop_after: Option<usize>,
    /// KV capacity of the plan and rows of the position table.
    pub max_seq_len: Option<usize>,
    /// The plan's weights.
    pub plan: PlanWeights,
    /// model.onnx's weights; `None` writes no model.onnx (nor genai_config.json).
    pub onnx: Option<OnnxWeights>,
    /// Put model.onnx's weights in model.onnx.data (automatic above 2 GiB).
    pub external_data: bool,
    /// Weight-only quantization of the graph's matrices (the `quantize` pass): the plan
    /// ([`PlanWeights::Quantized`]) or its dequantized values, and MatMulNBits in model.onnx.
    pub quantize: Option<quant::Options>,
    /// Replace a non-empty output directory (once the new one is complete).
    pub replace: bool,
    /// A deliberate miscompile, for testing the parity tools only.
    pub fault: Option<passes::Fault>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            stop_after: None,
            max_seq_len: None,
            plan: PlanWeights::F32,
            onnx: Some(OnnxWeights::F32),
            external_data: false,
            quantize: None,
            replace: false,
            fault: None,
        }
    }
}

/// What [`compile_dir`] wrote.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The directory.
    pub dir: PathBuf,
    /// The checkpoint compiled (a compiled input's recorded source).
    pub source: PathBuf,
    /// passes.txt: what each pass did, with times.
    pub pass_log: String,
    /// Nodes of the compiled graph.
    pub ir_nodes: usize,
    /// The plan's KV capacity and the position table's rows.
    pub max_seq_len: usize,
    /// model.onnx's files and sizes, where one was written.
    pub onnx: Option<onnx::Written>,
    /// The file names of the directory (as manifest.json lists them).
    pub files: Vec<String>,
    /// Notes for the user: the importer's, a compiled input's source, a missing
    /// tokenizer.json.
    pub notes: Vec<String>,
}

/// Why [`compile_dir`] failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Import, passes, emitters, writing the directory (`OutputExists` among them).
    #[error(transparent)]
    Compiler(#[from] ngpt_compiler::Error),
    /// `stop_after` beyond the pipeline.
    #[error("stop after {requested} passes: there are only {passes}")]
    StopAfter {
        /// What was asked.
        requested: usize,
        /// Passes in the pipeline.
        passes: usize,
    },
    /// The options contradict each other.
    #[error("{0}")]
    Options(&'static str),
    /// The position table would not fit in memory.
    #[error(transparent)]
    Memory(#[from] crate::memory::Insufficient),
    /// A tokenizer file beside the checkpoint is unreadable or names ids outside the
    /// vocabulary (the message names the file and field).
    #[error("{0:#}")]
    Tokenizer(anyhow::Error),
    /// The thread hashing the checkpoint stopped.
    #[error("hashing {} failed", .0.display())]
    Hashing(PathBuf),
}

/// Compiles `input` (a checkpoint, or a compiled directory: its recorded source) into
/// `out`, as [`Options`] say. See the [module](self) example.
pub fn compile_dir(input: &Path, out: &Path, opts: &Options) -> Result<Compiled, Error> {
    if let Some(n) = opts.stop_after {
        if n > passes::CANONICAL.len() {
            return Err(Error::StopAfter {
                requested: n,
                passes: passes::CANONICAL.len(),
            });
        }
    }
    if opts.plan == PlanWeights::Quantized && opts.quantize.is_none() {
        return Err(Error::Options(
            "a quantized plan needs quantize options (the bits, block and lm_head setting)",
        ));
    }
    if opts.quantize.is_some() && opts.onnx == Some(OnnxWeights::F16) {
        return Err(Error::Options(
            "a quantized graph writes its matrices as MatMulNBits: model.onnx's other weights stay f32, not f16",
        ));
    }
    if let Some(q) = &opts.quantize {
        q.check()?;
    }
    let mut notes = Vec::new();
    let hashing = hash_in_background(input);
    let path = if is_compiled_dir(input) {
        let source = Manifest::read(input)?.checked_source(input)?;
        notes.push(format!(
            "{} is a compiled directory; using its source {}",
            input.display(),
            source.display()
        ));
        source
    } else {
        input.to_path_buf()
    };
    let mut ckpt = import::load(&path)?;
    notes.append(&mut ckpt.notes);
    let max_seq_len = opts
        .max_seq_len
        .unwrap_or(onnx::default_max_seq_len(&ckpt.config));
    onnx::check_max_seq_len(&ckpt.config, max_seq_len)?;
    crate::memory::ensure_table_fits(
        &format!("max_seq_len {max_seq_len}"),
        max_seq_len,
        ckpt.config.head_dim(),
    )?;
    let compiled = pipeline::compile(
        &ckpt,
        &pipeline::Options {
            stop_after: opts.stop_after,
            fault: opts.fault.clone(),
            quantize: opts.quantize,
        },
    )?;
    // The graph holds what it still needs (lazily folded weights keep their stored
    // tensors); drop the checkpoint's own references so that the Q, K and V matrices
    // fuse_qkv concatenated do not stay in memory twice while the files are written.
    ckpt.tensors.clear();
    let source = std::fs::canonicalize(&ckpt.source).unwrap_or_else(|_| ckpt.source.clone());
    let source_sha256 = match hashing {
        Some((hashed, h)) if hashed == source => {
            h.join().map_err(|_| Error::Hashing(source.clone()))??
        }
        _ => pipeline::sha256_file(&source)?,
    };
    let dtype = match opts.plan {
        PlanWeights::F32 => WeightDtype::F32,
        PlanWeights::Bf16 => WeightDtype::Bf16,
        PlanWeights::Quantized => WeightDtype::Quant,
    };
    // A plan needs the canonical form: only a full compile lowers one.
    let lowers_plan = opts.stop_after.is_none();
    let onnx_opts = onnx::Options {
        max_seq_len,
        weights: match opts.onnx {
            Some(OnnxWeights::F16) => onnx::WeightDtype::F16,
            // Quantized: the matrices go as MatMulNBits, the rest stays f32.
            Some(OnnxWeights::F32) | None => onnx::WeightDtype::F32,
        },
        external_data: opts.external_data,
    };
    let onnx_info = onnx::ModelInfo {
        config: ckpt.config.clone(),
        source_sha256: Some(source_sha256.clone()),
        source_name: source.file_name().map(|n| n.to_string_lossy().into_owned()),
        passes: compiled
            .records
            .iter()
            .map(|r| r.name.to_string())
            .collect(),
    };
    let writes_onnx = opts.onnx.is_some();
    let onnx_files: &[&str] = if !writes_onnx {
        &[]
    } else if onnx::uses_external_data(&compiled.graph, &onnx_opts) {
        &[onnx::MODEL_FILE, onnx::DATA_FILE]
    } else {
        &[onnx::MODEL_FILE]
    };
    // Tokenizer files beside the checkpoint (or in a compiled input) travel with the
    // directory, so onnxruntime-genai's `og.Tokenizer(model)` and ngpt's own text paths
    // work from it alone; their special token ids go into genai_config.json.
    let source_dir = if source.is_dir() {
        source.clone()
    } else {
        source.parent().map(PathBuf::from).unwrap_or_default()
    };
    let token_dir = [input.to_path_buf(), source_dir]
        .into_iter()
        .find(|d| !crate::tokens::files::tokenizer_files(d).is_empty());
    let token_files = token_dir
        .as_deref()
        .map(crate::tokens::files::tokenizer_files)
        .unwrap_or_default();
    let special = match &token_dir {
        Some(d) => crate::tokens::files::special_tokens(d, ckpt.config.vocab_size)
            .map_err(Error::Tokenizer)?,
        None => Default::default(),
    };
    let genai = onnx::genai::config_json(&ckpt.config, max_seq_len, onnx::MODEL_FILE, &special);
    let token_names: Vec<String> = token_files
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let mut manifest = Manifest {
        producer: "ngpt".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        source_sha256,
        source,
        stop_after: opts.stop_after,
        passes: compiled
            .records
            .iter()
            .map(|r| r.name.to_string())
            .collect(),
        files: ["manifest.json", "ir.txt", "passes.txt"]
            .into_iter()
            .chain(onnx_files.iter().copied())
            .chain(writes_onnx.then_some(onnx::genai::CONFIG_FILE))
            .chain(token_names.iter().map(String::as_str))
            .chain(
                lowers_plan
                    .then_some(["model.plan", "model.weights"])
                    .into_iter()
                    .flatten(),
            )
            .map(String::from)
            .collect(),
        quantize: opts.quantize,
        plan_weights: None,
    };
    let pass_log = compiled.pass_log();
    let mut written = None;
    artifact::write_dir(out, opts.replace, |dir| {
        artifact::write_bytes(&dir.join("ir.txt"), compiled.graph.to_string().as_bytes())?;
        artifact::write_bytes(&dir.join("passes.txt"), pass_log.as_bytes())?;
        if writes_onnx {
            written = Some(onnx::write(&compiled.graph, &onnx_info, &onnx_opts, dir)?);
            artifact::write_bytes(&dir.join(onnx::genai::CONFIG_FILE), genai.as_bytes())?;
        }
        for (from, name) in token_files.iter().zip(&token_names) {
            let bytes = std::fs::read(from).map_err(|source| ngpt_compiler::Error::Io {
                path: from.clone(),
                source,
            })?;
            artifact::write_bytes(&dir.join(name), &bytes)?;
        }
        if lowers_plan {
            // model.weights streams: each weight is made and written in turn.
            let mut plan = None;
            artifact::write_with(&dir.join("model.weights"), |tmp| {
                // Written by a thread of its own, beside the lowering.
                let mut file = artifact::BackgroundWriter::create(tmp)?;
                plan = Some(plan::lower_into(
                    &compiled.graph,
                    &ckpt.config,
                    dtype,
                    max_seq_len,
                    &manifest.source_sha256,
                    &mut file,
                    tmp,
                )?);
                file.finish()
            })?;
            if let Some(p) = plan {
                artifact::write_bytes(&dir.join("model.plan"), &p.encode_to_vec())?;
                manifest.plan_weights = plan::weights_summary(&p, manifest.quantize);
            }
        }
        let json = serde_json::to_string_pretty(&manifest).map_err(|e| {
            ngpt_compiler::Error::Argument {
                what: "manifest".into(),
                problem: e.to_string(),
            }
        })?;
        artifact::write_bytes(&dir.join("manifest.json"), json.as_bytes())
    })?;
    // Only where there is a genai_config.json for onnxruntime-genai to read.
    if writes_onnx && !token_names.iter().any(|n| n == "tokenizer.json") {
        notes.push(format!(
            "no tokenizer.json beside {}: onnxruntime-genai runs {} from token ids (og.Tokenizer needs one)",
            manifest.source.display(),
            out.display()
        ));
    }
    Ok(Compiled {
        dir: out.to_path_buf(),
        source: manifest.source,
        pass_log,
        ir_nodes: compiled.graph.nodes.len(),
        max_seq_len,
        onnx: written,
        files: manifest.files,
        notes,
    })
}

/// The checkpoint file being hashed and the thread hashing it.
type Hashing = (
    PathBuf,
    std::thread::JoinHandle<ngpt_compiler::Result<String>>,
);

/// The sha256 of the checkpoint file `input` resolves to, on a thread of its own while the
/// checkpoint is imported and compiled (hashing a 2 GB file is about 1.2 s of one core,
/// 7% of a 0.5b compile's samples). `None` where the file is not known before import (a
/// compiled directory as input): the caller hashes then.
fn hash_in_background(input: &Path) -> Option<Hashing> {
    if is_compiled_dir(input) {
        return None;
    }
    let (file, _, _) = import::resolve(input).ok()?;
    let file = std::fs::canonicalize(file).ok()?;
    let path = file.clone();
    let handle = std::thread::Builder::new()
        .name("sha256".into())
        .spawn(move || pipeline::sha256_file(&path))
        .ok()?;
    Some((file, handle))
}
