//! ONNX export: the canonical graph as a standard `ai.onnx` model (opset 18, IR version 8)
//! with a KV cache, named the way Hugging Face exports decoders.
//!
//! Interface (`batch`, `sequence` and `past_sequence` are symbolic; `past_sequence` is 0 at
//! prefill):
//! - inputs `input_ids` int64 `[batch, sequence]`, `attention_mask` int64
//!   `[batch, past_sequence + sequence]` (1 attend, 0 padding), `position_ids` int64
//!   `[batch, sequence]` (absolute positions, below `max_seq_len`), and per layer
//!   `past_key_values.{i}.key|value` float32 `[batch, n_head, past_sequence, head_dim]`;
//! - outputs `logits` float32 `[batch, sequence, vocab]` and
//!   `present.{i}.key|value` `[batch, n_head, past_sequence + sequence, head_dim]`.
//!
//! A consumer feeds `present` back as `past`; the metadata says what the cache holds (keys
//! after the position step and per-head Norm, in the folded basis). The causal mask is
//! built in the graph from the shapes, combined with `attention_mask`, so ragged
//! (left-padded) batches work.
//!
//! Export streams: initializers are made one at a time from the graph's constants and
//! written as they are made, to `model.onnx.data` with external data, else into
//! `model.onnx` itself.

mod builder;
mod emit;
pub mod genai;
pub mod summary;
#[cfg(feature = "tract")]
pub mod tract;

use std::io::Write;
use std::path::Path;

use ngpt_schemas::onnx::{
    tensor_proto::DataType, tensor_shape_proto::dimension, tensor_shape_proto::Dimension,
    type_proto, GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use ngpt_schemas::prost::Message;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::graph::Graph;
use emit::{past_name, present_name};
pub use emit::{ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS};

/// The ONNX operator set the export targets.
pub const OPSET: i64 = 18;
/// onnxruntime's contrib operator domain (MatMulNBits), imported at version 1 by a
/// quantized export only.
pub const CONTRIB_DOMAIN: &str = "com.microsoft";
/// The ONNX IR version written (2021-07-30, the one opset 18 tooling reads everywhere).
pub const IR_VERSION: i64 = 8;
/// File name of the ONNX model inside a compiled directory.
pub const MODEL_FILE: &str = "model.onnx";
/// File name of the external weights beside [`MODEL_FILE`], written only when
/// [`uses_external_data`] says so.
pub const DATA_FILE: &str = "model.onnx.data";
/// Weights above this many bytes go to external data: a protobuf message is limited to
/// 2 GiB, and the graph needs some room beside the weights.
pub const INLINE_LIMIT: u64 = (2 << 30) - (64 << 20);

/// Storage dtype of the weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// float32 (exact for BF16 checkpoints).
    #[default]
    F32,
    /// float16, cast to float32 in the graph: half the size, about 1e-3 relative error.
    F16,
}

impl WeightDtype {
    /// The dtype's name as the model's `weights_dtype` metadata records it: `f32` or `f16`.
    pub fn as_str(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
        }
    }
}

/// Options of the export.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Rows of the position table: the largest position id plus one.
    pub max_seq_len: usize,
    /// Storage dtype of the weight matrices; vectors and tables stay float32.
    pub weights: WeightDtype,
    /// Put the weights in `model.onnx.data` even when they would fit inline.
    pub external_data: bool,
}

/// The default `--max-seq-len`: the larger of block_size and 2048; for a model with learned
/// positions (the Hugging Face family) its `n_positions`, as wpe has no rows beyond it.
pub fn default_max_seq_len(config: &Config) -> usize {
    match config.family {
        crate::config::Family::Nous => config.n_positions,
        crate::config::Family::Nvidia => config.block_size.max(2048),
    }
}

/// Refuses a KV capacity beyond what the model's positions allow: a model with learned
/// positions has `n_positions` rows of wpe and nothing beyond them.
pub fn check_max_seq_len(config: &Config, max_seq_len: usize) -> Result<()> {
    if config.family == crate::config::Family::Nous && max_seq_len > config.n_positions {
        return Err(Error::Argument {
            what: "max_seq_len".into(),
            problem: format!(
                "{max_seq_len} is beyond the {} rows of transformer.wpe.weight (learned positions: the model has no position {})",
                config.n_positions, config.n_positions
            ),
        });
    }
    Ok(())
}

impl Options {
    /// Defaults for a model: f32 weights, inline, `default_max_seq_len` rows.
    pub fn for_config(config: &Config) -> Options {
        Options {
            max_seq_len: default_max_seq_len(config),
            weights: WeightDtype::F32,
            external_data: false,
        }
    }
}

/// What the model's metadata says about where it came from.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The model config, written to the metadata as `model_args` JSON.
    pub config: Config,
    /// sha256 of the source checkpoint file, lowercase hex.
    pub source_sha256: Option<String>,
    /// File name of the source checkpoint (no directories, so the bytes do not depend on
    /// where it was).
    pub source_name: Option<String>,
    /// Names of the passes that ran, in order.
    pub passes: Vec<String>,
}

impl ModelInfo {
    /// The info of a compiled checkpoint: hashes its source file.
    pub fn new(
        ckpt: &crate::import::Checkpoint,
        records: &[crate::passes::PassRecord],
    ) -> Result<ModelInfo> {
        Ok(ModelInfo {
            config: ckpt.config.clone(),
            source_sha256: Some(crate::compile::sha256_file(&ckpt.source)?),
            source_name: ckpt
                .source
                .file_name()
                .map(|n| n.to_string_lossy().into_owned()),
            passes: records.iter().map(|r| r.name.to_string()).collect(),
        })
    }
}

/// An export held in memory: the encoded `model.onnx`, and the bytes of
/// `model.onnx.data` when the weights are external.
pub struct Exported {
    /// The encoded `model.onnx`.
    pub model: Vec<u8>,
    /// The bytes of `model.onnx.data`; `Some` exactly when the weights are external.
    pub data: Option<Vec<u8>>,
}

/// What [`write()`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// File names, relative to the directory: `model.onnx` and maybe `model.onnx.data`.
    pub files: Vec<String>,
    /// Size of `model.onnx` in bytes.
    pub model_bytes: u64,
    /// Size of `model.onnx.data` in bytes; 0 when the weights are inline.
    pub data_bytes: u64,
}

/// Exports `g` in memory.
///
/// ```no_run
/// use ngpt_compiler::{compile, import, onnx};
/// let ckpt = import::load("tests/fixtures/nv-tiny".as_ref())?;
/// let c = compile::compile(&ckpt, &Default::default())?;
/// let info = onnx::ModelInfo::new(&ckpt, &c.records)?;
/// let out = onnx::export(&c.graph, &info, &onnx::Options::for_config(&ckpt.config))?;
/// assert!(out.data.is_none());
/// # Ok::<(), ngpt_compiler::Error>(())
/// ```
pub fn export(g: &Graph, info: &ModelInfo, opts: &Options) -> Result<Exported> {
    let mut model = vec![];
    if uses_external_data(g, opts) {
        let mut data = vec![];
        let proto = build(g, info, opts, sink_external(&mut data))?;
        encode(proto, &mut model).map_err(|e| io_error(MODEL_FILE, e))?;
        Ok(Exported {
            model,
            data: Some(data),
        })
    } else {
        let proto = build(g, info, opts, sink_inline(&mut model))?;
        encode(proto, &mut model).map_err(|e| io_error(MODEL_FILE, e))?;
        Ok(Exported { model, data: None })
    }
}

fn sink_external(out: &mut dyn Write) -> builder::Sink<'_> {
    builder::Sink::External {
        out,
        location: DATA_FILE.into(),
        offset: 0,
    }
}

fn sink_inline(out: &mut dyn Write) -> builder::Sink<'_> {
    builder::Sink::Inline { out }
}

fn io_error(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Error {
    Error::Io {
        path: path.into(),
        source,
    }
}

/// Exports `g` into `dir` (which must exist): `model.onnx`, and `model.onnx.data` when the
/// weights are external. Tensors are written as they are made, into `model.onnx` itself
/// for an inline model, so memory never holds the exported weights and every byte is
/// written once.
pub fn write(g: &Graph, info: &ModelInfo, opts: &Options, dir: &Path) -> Result<Written> {
    // Written by a thread of its own: the kernel's copying runs beside the export.
    let create = crate::artifact::BackgroundWriter::create;
    let external = uses_external_data(g, opts);
    let data_path = dir.join(DATA_FILE);
    let mut proto = None;
    if external {
        crate::artifact::write_with(&data_path, |tmp| {
            let mut w = create(tmp)?;
            proto = Some(build(g, info, opts, sink_external(&mut w))?);
            w.finish()
        })?;
    }
    let mut model_bytes = 0;
    crate::artifact::write_with(&dir.join(MODEL_FILE), |tmp| {
        let mut w = create(tmp)?;
        let (proto, weights) = match proto.take() {
            Some(p) => (p, 0),
            None => {
                let mut counted = Counted::new(&mut w);
                let p = build(g, info, opts, sink_inline(&mut counted))?;
                (p, counted.bytes)
            }
        };
        model_bytes = weights + encode(proto, &mut w).map_err(|e| io_error(tmp, e))?;
        w.finish()
    })?;
    let (files, data_bytes) = if external {
        let len = std::fs::metadata(&data_path)
            .map_err(|e| io_error(&data_path, e))?
            .len();
        (vec![MODEL_FILE.to_string(), DATA_FILE.to_string()], len)
    } else {
        (vec![MODEL_FILE.to_string()], 0)
    };
    Ok(Written {
        files,
        model_bytes,
        data_bytes,
    })
}

/// A writer that counts what passes through it.
struct Counted<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Counted<W> {
    fn new(inner: W) -> Self {
        Counted { inner, bytes: 0 }
    }
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Encodes `model` into `out` and returns the bytes written: the model's other fields, then
/// the graph (field 7), whose initializers (field 5) come after its other fields, one at a
/// time. Parsers accept fields in any order; the order here is fixed, so the output is
/// deterministic. Large inline initializers were written before this, as records of their
/// own ([`builder::Sink::Inline`]).
fn encode(mut model: ModelProto, out: &mut impl Write) -> std::io::Result<u64> {
    use builder::{key, varint, varint_len, GRAPH_INITIALIZER, MODEL_GRAPH};
    let mut graph = model.graph.take().unwrap_or_default();
    let initializers = std::mem::take(&mut graph.initializer);
    let lens: Vec<u64> = initializers
        .iter()
        .map(|t| t.encoded_len() as u64)
        .collect();
    let mut head = model.encode_to_vec();
    let body = graph.encode_to_vec();
    let graph_len = body.len() as u64 + lens.iter().map(|&l| 1 + varint_len(l) + l).sum::<u64>();
    head.push(key(MODEL_GRAPH));
    varint(graph_len, &mut head);
    out.write_all(&head)?;
    out.write_all(&body)?;
    let mut written = (head.len() + body.len()) as u64;
    for (t, len) in initializers.into_iter().zip(lens) {
        let mut bytes = vec![key(GRAPH_INITIALIZER)];
        varint(len, &mut bytes);
        t.encode(&mut bytes).map_err(std::io::Error::other)?;
        out.write_all(&bytes)?;
        written += bytes.len() as u64;
    }
    Ok(written)
}

/// What the model's `quantization` metadata says of a graph with quantized weights (the
/// matrices' formats, as MatMulNBits stores them); `None` for a float graph.
fn quantization(g: &Graph) -> Option<String> {
    let mut formats = std::collections::BTreeMap::<String, usize>::new();
    for n in &g.nodes {
        if let crate::graph::Op::Const(c) = &n.op {
            if let Some(q) = c.quant() {
                *formats.entry(q.to_string()).or_default() += 1;
            }
        }
    }
    if formats.is_empty() {
        return None;
    }
    let list: Vec<String> = formats.iter().map(|(f, n)| format!("{n} x {f}")).collect();
    Some(format!(
        "weight-only, symmetric, blocks along K, f16 block scales (widened to f32) as \
         com.microsoft MatMulNBits (zero point 2^(bits-1), accuracy_level 0, or 4 for the \
         act-int8 ones: onnxruntime may quantize their activations to int8): {}; \
         values are scale * (code - zero point)",
        list.join(", ")
    ))
}

/// Bytes of the initializers the export would make (weights and position tables).
pub fn weight_bytes(g: &Graph, opts: &Options) -> u64 {
    let elem = |rank: usize| match (opts.weights, rank) {
        (WeightDtype::F16, 2) => 2,
        _ => 4,
    };
    let consts: u64 = g
        .nodes
        .iter()
        .filter_map(|n| match &n.op {
            crate::graph::Op::Const(c) => Some(match c.quant() {
                // MatMulNBits: packed integers and f32 scales per block.
                Some(q) => {
                    let (n, k) = (c.dims()[0] as u64, c.dims()[1] as u64);
                    let nb = crate::quant::n_blocks(k as usize, q.block) as u64;
                    n * nb * (q.block * q.bits.bits() / 8 + 4) as u64
                }
                None => c.elem_count() as u64 * elem(c.rank()),
            }),
            _ => None,
        })
        .sum();
    let heads: std::collections::BTreeSet<usize> = g
        .nodes
        .iter()
        .filter_map(|n| match n.op {
            crate::graph::Op::PosNorm { head_dim }
            | crate::graph::Op::PosDiag { head_dim }
            | crate::graph::Op::PosStep { head_dim }
            | crate::graph::Op::Rotary { head_dim } => Some(head_dim),
            _ => None,
        })
        .collect();
    consts
        + heads
            .iter()
            .map(|&d| (opts.max_seq_len * d * 4) as u64)
            .sum::<u64>()
}

/// Whether the export puts the weights in `model.onnx.data`: on request, or when they
/// would not fit a 2 GiB protobuf.
pub fn uses_external_data(g: &Graph, opts: &Options) -> bool {
    opts.external_data || weight_bytes(g, opts) > INLINE_LIMIT
}

fn dim(d: &str) -> Dimension {
    Dimension {
        value: Some(dimension::Value::DimParam(d.into())),
        denotation: None,
    }
}

fn fixed(n: usize) -> Dimension {
    Dimension {
        value: Some(dimension::Value::DimValue(n as i64)),
        denotation: None,
    }
}

fn value_info(name: &str, dtype: DataType, dims: Vec<Dimension>, doc: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(dtype as i32),
                shape: Some(TensorShapeProto { dim: dims }),
            })),
            denotation: None,
        }),
        doc_string: Some(doc.into()),
    }
}

/// Symbolic name of the batch dimension, the first axis of every input and output.
pub const BATCH: &str = "batch";
/// Symbolic name of the new tokens' dimension of `input_ids`, `position_ids` and `logits`.
pub const SEQUENCE: &str = "sequence";
/// Symbolic name of the cached positions' dimension of `past_key_values.*`; 0 at prefill.
pub const PAST_SEQUENCE: &str = "past_sequence";
/// Symbolic name of the dimension of `attention_mask` and `present.*`: cached plus new
/// positions.
pub const TOTAL_SEQUENCE: &str = "past_sequence + sequence";

fn build(g: &Graph, info: &ModelInfo, opts: &Options, sink: builder::Sink) -> Result<ModelProto> {
    if opts.max_seq_len == 0 {
        return Err(Error::Argument {
            what: "max_seq_len".into(),
            problem: "must be at least 1".into(),
        });
    }
    check_max_seq_len(&info.config, opts.max_seq_len)?;
    let mut b = builder::Builder::new(sink);
    for name in [INPUT_IDS, ATTENTION_MASK, POSITION_IDS] {
        b.declare(name)?;
    }
    let lowered = emit::lower(g, opts, &mut b)?;
    let (seq_out, total) = (
        if lowered.last_row_only {
            fixed(1)
        } else {
            dim(SEQUENCE)
        },
        TOTAL_SEQUENCE,
    );

    let mut inputs = vec![
        value_info(
            INPUT_IDS,
            DataType::Int64,
            vec![dim(BATCH), dim(SEQUENCE)],
            "token ids",
        ),
        value_info(
            ATTENTION_MASK,
            DataType::Int64,
            vec![dim(BATCH), dim(total)],
            "1 for tokens to attend to, 0 for padding; covers the cache and the new tokens",
        ),
        value_info(
            POSITION_IDS,
            DataType::Int64,
            vec![dim(BATCH), dim(SEQUENCE)],
            &format!(
                "absolute position of each token (0 for the first real token of a \
                 left-padded row), below max_seq_len = {}",
                opts.max_seq_len
            ),
        ),
    ];
    let mut outputs = vec![value_info(
        LOGITS,
        DataType::Float,
        vec![dim(BATCH), seq_out, fixed(lowered.vocab)],
        "logits, float32",
    )];
    for (i, l) in lowered.layers.iter().enumerate() {
        for which in ["key", "value"] {
            let shape = |s: &str| vec![dim(BATCH), fixed(l.heads), dim(s), fixed(l.head_dim)];
            inputs.push(value_info(
                &past_name(i, which),
                DataType::Float,
                shape(PAST_SEQUENCE),
                "the cache: present from the previous call (past_sequence 0 at prefill)",
            ));
            outputs.push(value_info(
                &present_name(i, which),
                DataType::Float,
                shape(total),
                "past with this call's entries appended",
            ));
        }
    }

    let kv = match lowered.layers.first() {
        None => "no attention layers: the model has no cache".to_string(),
        Some(l) => {
            let key = l.key_source.replacen(".0.", ".{i}.", 1);
            let value = l.value_source.replacen(".0.", ".{i}.", 1);
            let what = if l.key_op == "pos_norm" {
                "keys after the position step (as a per-position diagonal scaling) and the \
                 per-head Norm: unit vectors per head in the folded basis, not the \
                 checkpoint's raw k; the q side carries sqrt(head_dim) * sqk^2, so scores \
                 use softmax scale 1"
                    .to_string()
            } else if l.key_op == "norm" {
                "keys after the rotary embedding at their absolute positions and the per-head \
                 Norm: unit vectors per head; the q side carries sqk^2 / (base_scale^2 \
                 sqrt(head_dim)), so scores use softmax scale 1"
                    .to_string()
            } else {
                format!("keys as the IR's `{}` op leaves them", l.key_op)
            };
            format!(
                "past_key_values.{{i}}.key holds IR `{key}` ({what}); \
                 past_key_values.{{i}}.value holds IR `{value}` (v = h Wv^T, neither normalized \
                 nor scaled); layout [batch, n_head, position, head_dim] float32. Feed present.* \
                 back as past_key_values.*; start with past_sequence = 0."
            )
        }
    };
    let prop = |k: &str, v: String| StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v),
    };
    let model_args = serde_json::to_string(&info.config).map_err(|e| Error::Argument {
        what: "model_args".into(),
        problem: e.to_string(),
    })?;
    let mut metadata = vec![
        prop("model_args", model_args),
        prop("producer", format!("ngpt {}", env!("CARGO_PKG_VERSION"))),
        prop("passes", info.passes.join(",")),
        prop("kv_cache", kv),
        prop("max_seq_len", opts.max_seq_len.to_string()),
        prop("weights_dtype", opts.weights.as_str().to_string()),
        prop(
            "positions",
            format!(
                "position_ids index a table of max_seq_len = {} rows; a larger id is out of \
                 range (runtimes fail); re-export with a larger --max-seq-len",
                opts.max_seq_len
            ),
        ),
    ];
    if let Some(q) = quantization(g) {
        metadata.push(prop("quantization", q));
    }
    if let Some(sha) = &info.source_sha256 {
        metadata.push(prop("source_sha256", sha.clone()));
    }
    if let Some(name) = &info.source_name {
        metadata.push(prop("source_file", name.clone()));
    }

    let b_contrib = b.contrib;
    let graph = GraphProto {
        node: b.nodes,
        name: Some("ngpt".into()),
        initializer: b.initializers,
        doc_string: Some(format!(
            "nGPT ({} layers, {} heads, n_embd {}, vocab {}) exported by ngpt from its folded \
             and fused IR",
            info.config.n_layer, info.config.n_head, info.config.n_embd, info.config.vocab_size
        )),
        input: inputs,
        output: outputs,
        value_info: vec![],
    };
    Ok(ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: std::iter::once(OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        })
        .chain(b_contrib.then(|| OperatorSetIdProto {
            domain: Some(CONTRIB_DOMAIN.into()),
            version: Some(1),
        }))
        .collect(),
        producer_name: Some("ngpt".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        domain: None,
        model_version: None,
        doc_string: None,
        graph: Some(graph),
        metadata_props: metadata,
    })
}

/// Checks every `com.microsoft` MatMulNBits node of an encoded model whose B and scales
/// are inline initializers: B holds `N * ceil(K / block_size) * blob` bytes and scales
/// `N * ceil(K / block_size)` finite floats, so a truncated or corrupted quantized weight
/// is refused in one line naming it before a runtime reads past its end or computes NaN.
/// `what` names the file. Models without such nodes pass untouched (nothing is decoded
/// unless the bytes mention MatMulNBits).
///
/// ```
/// assert!(ngpt_compiler::onnx::check_quantized(b"", "model.onnx").is_ok());
/// ```
pub fn check_quantized(bytes: &[u8], what: &str) -> Result<()> {
    const OP: &[u8] = b"MatMulNBits";
    if !bytes.windows(OP.len()).any(|w| w == OP) {
        return Ok(());
    }
    let bad = |reason: String| Error::Format {
        path: what.into(),
        reason,
    };
    let model = ModelProto::decode(bytes).map_err(|e| bad(format!("not an ONNX model ({e})")))?;
    let Some(graph) = &model.graph else {
        return Ok(());
    };
    let inits: std::collections::HashMap<&str, &ngpt_schemas::onnx::TensorProto> = graph
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref().map(|n| (n, t)))
        .collect();
    for node in &graph.node {
        if node.op_type.as_deref() != Some("MatMulNBits") {
            continue;
        }
        let name = node.name.clone().unwrap_or_default();
        let attr = |key: &str| {
            node.attribute
                .iter()
                .find(|a| a.name.as_deref() == Some(key))
                .and_then(|a| a.i)
                .and_then(|i| usize::try_from(i).ok())
        };
        let (Some(k), Some(n), Some(block)) = (attr("K"), attr("N"), attr("block_size")) else {
            return Err(bad(format!("MatMulNBits `{name}`: no K, N or block_size")));
        };
        let bits = attr("bits").unwrap_or(4);
        if block == 0 || !matches!(bits, 2 | 4 | 8) {
            return Err(bad(format!(
                "MatMulNBits `{name}`: bits {bits}, block_size {block}"
            )));
        }
        let nb = crate::quant::n_blocks(k, block);
        let raw = |slot: usize| {
            node.input
                .get(slot)
                .and_then(|i| inits.get(i.as_str()))
                .filter(|t| t.external_data.is_empty())
                .map(|t| (t.raw_data.as_deref(), t.float_data.as_slice()))
        };
        if let Some((Some(b), _)) = raw(1) {
            let want = n * nb * (block * bits / 8);
            if b.len() != want {
                return Err(bad(format!(
                    "MatMulNBits `{name}`: B holds {} bytes where K {k}, N {n}, block {block}, \
                     bits {bits} need {want} (truncated?)",
                    b.len()
                )));
            }
        }
        if let Some((raw, floats)) = raw(2) {
            let scales: Vec<f32> = match raw {
                Some(r) => r
                    .chunks(4)
                    .map(|c| {
                        let mut a = [0u8; 4];
                        a[..c.len()].copy_from_slice(c);
                        f32::from_le_bytes(a)
                    })
                    .collect(),
                None => floats.to_vec(),
            };
            if let Some(r) = raw.filter(|r| r.len() % 4 != 0) {
                return Err(bad(format!(
                    "MatMulNBits `{name}`: scales hold {} bytes, not whole floats (truncated?)",
                    r.len()
                )));
            }
            crate::quant::check_scales(&scales, n * nb, &format!("MatMulNBits `{name}`"))
                .map_err(|e| bad(e.to_string()))?;
        }
    }
    Ok(())
}
