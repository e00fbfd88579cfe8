//! Lowering the canonical graph to a launch plan (`model.plan` + `model.weights`).
//!
//! The canonical form is fixed (design.md): per layer one QKV GEMM, one `pos_norm`
//! launch (position table, per-head Norm, q scale, KV-cache write), one attention launch,
//! the output GEMM, `lerp_norm`, the c_fc GEMM, `swiglu`, the projection GEMM and
//! `lerp_norm`; then the lm_head GEMM. Lowering walks the graph in order and maps each op
//! to steps over a fixed set of role buffers (`h`, `qkv`, `fc`, ...), so memory does not
//! grow with depth. Slices become column offsets, never copies.

mod kernels;

use std::collections::HashMap;

use ngpt_schemas::plan::{
    self as pb, arg, operand, step, Affine, Arg, Buffer, BufferKind, Dim3, Gemm, Launch, Operand,
    Plan, Program, Step, Symbol,
};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId, Op};

pub use kernels::{kernel_module, ENTRIES};

/// Weight dtype of a plan's GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    /// GEMM weights stored as float32.
    F32,
    /// GEMM weights rounded to bfloat16: half the bytes; vectors and tables stay float32.
    Bf16,
    /// GEMM weights the `quantize` pass quantized stay quantized: `I8` or `I4` blocks with
    /// their `F16` block scales as a companion weight (`Weight.quant`, schemas/plan.proto);
    /// GEMM weights it left in float (lm_head with `--quant-lm-head float`) are float32.
    /// On a graph without quantized constants this is [`WeightDtype::F32`].
    Quant,
}

/// A lowered plan and the bytes of `model.weights`.
pub struct Lowered {
    /// The launch plan, as `model.plan` encodes it.
    pub plan: Plan,
    /// The bytes of `model.weights`: each weight at the 256-byte-aligned offset its entry
    /// in the plan gives.
    pub weights: Vec<u8>,
}

const ALIGN: usize = 256;

fn aff(c0: u64, c_rows: u64, c_batch: u64) -> Option<Affine> {
    Some(Affine {
        c0,
        c_rows,
        c_batch,
    })
}

fn dim3(x: Option<Affine>, y: u64, z: u64) -> Option<Dim3> {
    Some(Dim3 {
        x,
        y: aff(y, 0, 0),
        z: aff(z, 0, 0),
    })
}

fn buf(i: u32) -> Arg {
    Arg {
        value: Some(arg::Value::Buffer(i)),
    }
}
fn wt(i: u32) -> Arg {
    Arg {
        value: Some(arg::Value::Weight(i)),
    }
}
fn sym(s: Symbol) -> Arg {
    Arg {
        value: Some(arg::Value::Symbol(s as i32)),
    }
}

struct Lowerer<'a> {
    g: &'a Graph,
    cfg: &'a Config,
    dtype: WeightDtype,
    max_seq_len: usize,
    weights: Vec<pb::Weight>,
    /// Where `model.weights` goes, and how many bytes went there.
    sink: &'a mut dyn std::io::Write,
    sink_path: &'a std::path::Path,
    written: u64,
    weight_of: HashMap<NodeId, u32>,
    buffers: Vec<Buffer>,
    buffer_of: HashMap<String, u32>,
    /// Where each lowered value lives: (buffer, column offset, row width).
    value_at: HashMap<NodeId, (u32, usize, usize)>,
    steps: Vec<Step>,
}

impl Lowerer<'_> {
    fn buffer(&mut self, name: &str, dtype: pb::DType, kind: BufferKind, elements: Affine) -> u32 {
        if let Some(&i) = self.buffer_of.get(name) {
            return i;
        }
        self.buffers.push(Buffer {
            name: name.into(),
            dtype: dtype as i32,
            kind: kind as i32,
            elements: Some(elements),
        });
        let i = (self.buffers.len() - 1) as u32;
        self.buffer_of.insert(name.to_string(), i);
        i
    }

    /// An activation buffer of `width` floats per row.
    fn rows(&mut self, name: &str, width: usize, kind: BufferKind) -> u32 {
        self.buffer(
            name,
            pb::DType::F32,
            kind,
            Affine {
                c0: 0,
                c_rows: width as u64,
                c_batch: 0,
            },
        )
    }

    /// Appends a weight to `model.weights` (256-byte aligned), its f32 values given a block
    /// at a time by `blocks` and written as they come, in `dtype`.
    fn push_weight(
        &mut self,
        name: String,
        shape: Vec<u64>,
        dtype: pb::DType,
        blocks: impl FnOnce(&mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()>,
    ) -> Result<u32> {
        let pad = (ALIGN as u64 - self.written % ALIGN as u64) % ALIGN as u64;
        let offset = self.written + pad;
        let (sink, sink_path) = (&mut *self.sink, self.sink_path);
        let write = |sink: &mut dyn std::io::Write, buf: &[u8]| {
            sink.write_all(buf).map_err(|source| Error::Io {
                path: sink_path.to_path_buf(),
                source,
            })
        };
        write(sink, &vec![0u8; pad as usize])?;
        let mut bytes = 0u64;
        let mut buf = vec![];
        blocks(&mut |values: &[f32]| {
            buf.clear();
            match dtype {
                pb::DType::Bf16 => values
                    .iter()
                    .for_each(|v| buf.extend(half::bf16::from_f32(*v).to_le_bytes())),
                _ => values.iter().for_each(|v| buf.extend(v.to_le_bytes())),
            }
            bytes += buf.len() as u64;
            write(sink, &buf)
        })?;
        self.written = offset + bytes;
        self.weights.push(pb::Weight {
            name,
            dtype: dtype as i32,
            shape,
            offset,
            bytes,
            quant: None,
        });
        Ok((self.weights.len() - 1) as u32)
    }

    /// Appends raw bytes as a weight (256-byte aligned), given a block at a time.
    fn push_raw(
        &mut self,
        w: pb::Weight,
        blocks: impl FnOnce(&mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>,
    ) -> Result<u32> {
        let pad = (ALIGN as u64 - self.written % ALIGN as u64) % ALIGN as u64;
        let offset = self.written + pad;
        let (sink, sink_path) = (&mut *self.sink, self.sink_path);
        let io = |source| Error::Io {
            path: sink_path.to_path_buf(),
            source,
        };
        sink.write_all(&vec![0u8; pad as usize]).map_err(io)?;
        let mut bytes = 0u64;
        blocks(&mut |b: &[u8]| {
            bytes += b.len() as u64;
            sink.write_all(b).map_err(io)
        })?;
        self.written = offset + bytes;
        self.weights.push(pb::Weight { offset, bytes, ..w });
        Ok((self.weights.len() - 1) as u32)
    }

    /// A quantized constant as an `I8` or `I4` weight and its `F16` block scales (the
    /// scales weight follows it, named `NAME.scales`): the integers are written as the
    /// quantizer makes them, 1,024 rows at a time, the scales (1/16 of int8's bytes) kept
    /// until the integers are out.
    fn quant_weight(
        &mut self,
        name: &str,
        t: &crate::graph::Const,
        fmt: crate::quant::Format,
    ) -> Result<u32> {
        use crate::quant::Bits;
        let (n, k) = match t.dims() {
            [n, k] => (*n, *k),
            d => {
                return Err(Error::Argument {
                    what: format!("plan lowering: `{name}`"),
                    problem: format!("a quantized weight must be a matrix, not {d:?}"),
                })
            }
        };
        let nb = crate::quant::n_blocks(k, fmt.block);
        let dtype = match fmt.bits {
            Bits::Int8 => pb::DType::I8,
            Bits::Int4 => pb::DType::I4,
        };
        let mut scales: Vec<u8> = Vec::with_capacity(n * nb * 2);
        let weight = pb::Weight {
            name: name.to_string(),
            dtype: dtype as i32,
            shape: vec![n as u64, k as u64],
            quant: Some(pb::Quant {
                block: fmt.block as u32,
                // The next weight: pushed right after this one.
                scales: self.weights.len() as u32 + 1,
            }),
            ..Default::default()
        };
        let w = self.push_raw(weight, |f| {
            let mut buf = vec![];
            t.quant_row_blocks(|q| {
                scales.extend(q.scales.iter().flat_map(|s| s.to_le_bytes()));
                buf.clear();
                match fmt.bits {
                    Bits::Int8 => buf.extend(q.ints.iter().map(|&v| v as u8)),
                    Bits::Int4 => {
                        for row in q.ints.chunks(k.max(1)) {
                            for pair in row.chunks(2) {
                                let lo = (pair[0] + 8) as u8;
                                let hi = pair.get(1).map_or(8, |&v| (v + 8) as u8);
                                buf.push(lo | (hi << 4));
                            }
                        }
                    }
                }
                f(&buf)
            })
        })?;
        let scale_weight = pb::Weight {
            name: format!("{name}.scales"),
            dtype: pb::DType::F16 as i32,
            shape: vec![n as u64, nb as u64],
            ..Default::default()
        };
        self.push_raw(scale_weight, |f| f(&scales))?;
        Ok(w)
    }

    /// The constant `id` as a weight; GEMM weights take the plan dtype, vectors stay f32.
    fn weight(&mut self, id: NodeId, gemm: bool) -> Result<u32> {
        if let Some(&w) = self.weight_of.get(&id) {
            return Ok(w);
        }
        let g = self.g;
        let node = &g.nodes[id];
        let t = g.const_of(id).ok_or_else(|| Error::Argument {
            what: format!("plan lowering: `{}`", node.name),
            problem: "expected a constant".into(),
        })?;
        if let (true, WeightDtype::Quant, Some(fmt)) = (gemm, self.dtype, t.quant()) {
            let w = self.quant_weight(&node.name, t, fmt)?;
            self.weight_of.insert(id, w);
            return Ok(w);
        }
        let dtype = if gemm && self.dtype == WeightDtype::Bf16 {
            pb::DType::Bf16
        } else {
            pb::DType::F32
        };
        let shape = t.dims().iter().map(|&d| d as u64).collect();
        let w = self.push_weight(node.name.clone(), shape, dtype, |f| {
            t.f32_row_blocks(&node.name, f)
        })?;
        self.weight_of.insert(id, w);
        Ok(w)
    }

    fn launch(
        &mut self,
        name: &str,
        entry: &str,
        grid: Option<Dim3>,
        block: u64,
        shared: u32,
        args: Vec<Arg>,
    ) {
        let launch = Launch {
            module: 0,
            entry: entry.into(),
            grid,
            block: dim3(aff(block, 0, 0), 1, 1),
            shared_bytes: shared,
            args,
        };
        self.steps.push(Step {
            name: name.into(),
            kind: Some(step::Kind::Launch(launch)),
        });
    }

    /// `out[R, N] = x[R, K] . W[N, K]^T` as cuBLAS sees it (column-major, C = out^T).
    fn gemm(
        &mut self,
        name: &str,
        x: (u32, usize, usize),
        w: u32,
        n: usize,
        k: usize,
        out: u32,
    ) -> Result<()> {
        if x.1 != 0 {
            return Err(Error::Argument {
                what: format!("plan lowering: `{name}`"),
                problem: "GEMM input must start at column 0".into(),
            });
        }
        let g = Gemm {
            trans_a: true,
            trans_b: false,
            m: aff(n as u64, 0, 0),
            n: aff(0, 1, 0),
            k: aff(k as u64, 0, 0),
            lda: k as u64,
            ldb: x.2 as u64,
            ldc: n as u64,
            alpha: 1.0,
            beta: 0.0,
            a: Some(Operand {
                source: Some(operand::Source::Weight(w)),
            }),
            b: Some(Operand {
                source: Some(operand::Source::Buffer(x.0)),
            }),
            c: Some(Operand {
                source: Some(operand::Source::Buffer(out)),
            }),
        };
        self.steps.push(Step {
            name: name.into(),
            kind: Some(step::Kind::Gemm(g)),
        });
        Ok(())
    }

    fn at(&self, id: NodeId) -> Result<(u32, usize, usize)> {
        self.value_at
            .get(&id)
            .copied()
            .ok_or_else(|| Error::Argument {
                what: format!("plan lowering: `{}`", self.g.nodes[id].name),
                problem: "used before it was lowered (not the canonical form?)".into(),
            })
    }

    fn unsupported(&self, id: NodeId) -> Error {
        Error::Argument {
            what: format!(
                "plan lowering: `{}` ({})",
                self.g.nodes[id].name,
                self.g.nodes[id].op.mnemonic()
            ),
            problem: "not in the canonical form plans are lowered from; run all passes".into(),
        }
    }

    fn lower(&mut self, decode: bool) -> Result<Vec<Step>> {
        self.steps.clear();
        self.value_at.clear();
        let (c, d, h) = (self.cfg.n_embd, self.cfg.head_dim(), self.cfg.n_head);
        let cache_elems = Affine {
            c0: 0,
            c_rows: 0,
            c_batch: (h * self.max_seq_len * d) as u64,
        };
        // One int32 a row: the token ids, their absolute positions and the KV-cache slot
        // (sequence) each row belongs to.
        let one_per_row = Affine {
            c0: 0,
            c_rows: 1,
            c_batch: 0,
        };
        let tokens = self.buffer("tokens", pb::DType::I32, BufferKind::Input, one_per_row);
        let positions = self.buffer("positions", pb::DType::I32, BufferKind::Input, one_per_row);
        let slots = self.buffer("slots", pb::DType::I32, BufferKind::Input, one_per_row);
        let rows_grid = aff(0, 1, 0);
        let mut layer = 0usize;
        for id in 0..self.g.nodes.len() {
            let node = &self.g.nodes[id];
            let name = node.name.clone();
            match &node.op {
                Op::Input => {
                    let b = if name == "tokens" { tokens } else { positions };
                    self.value_at.insert(id, (b, 0, 1));
                }
                Op::Const(_) | Op::PosNorm { .. } => {} // used by their consumers
                Op::Gather => {
                    let wte = self.weight(node.inputs[0], false)?;
                    let out = self.rows("x0", c, BufferKind::Activation);
                    self.launch(
                        &name,
                        "embed",
                        dim3(rows_grid, 1, 1),
                        256,
                        0,
                        vec![buf(tokens), wt(wte), buf(out), sym(Symbol::Rows)],
                    );
                    self.value_at.insert(id, (out, 0, c));
                }
                Op::Norm { group } if *group == c => {
                    let x = self.at(node.inputs[0])?;
                    let out = self.rows("h", c, BufferKind::Activation);
                    self.launch(
                        &name,
                        "norm_rows",
                        dim3(rows_grid, 1, 1),
                        256,
                        0,
                        vec![buf(x.0), buf(out), sym(Symbol::Rows)],
                    );
                    self.value_at.insert(id, (out, 0, c));
                }
                Op::MatMulT => {
                    let x = self.at(node.inputs[0])?;
                    let wshape = self.g.nodes[node.inputs[1]].fact.shape.clone();
                    let n = self.g.nodes[id].fact.last().unwrap_or(0);
                    let k = match wshape.get(1) {
                        Some(crate::graph::Dim::Fixed(k)) => *k,
                        _ => return Err(self.unsupported(id)),
                    };
                    let w = self.weight(node.inputs[1], true)?;
                    let role: &'static str = if self.g.outputs.contains(&id) {
                        "logits"
                    } else if n == 3 * c {
                        "qkv"
                    } else if n == 8 * c {
                        "fc"
                    } else if n == c {
                        "proj"
                    } else {
                        return Err(self.unsupported(id));
                    };
                    let kind = if role == "logits" {
                        BufferKind::Output
                    } else {
                        BufferKind::Activation
                    };
                    let out = self.rows(role, n, kind);
                    self.gemm(&name, x, w, n, k, out)?;
                    self.value_at.insert(id, (out, 0, n));
                }
                Op::Slice { start, len } => {
                    let x = self.at(node.inputs[0])?;
                    self.value_at.insert(id, (x.0, x.1 + start, *len));
                }
                Op::Attention { .. } => {
                    // q = pos_norm(slice(qkv)), k = pos_norm(slice(qkv)), v = slice(qkv).
                    let (q, k, v) = (node.inputs[0], node.inputs[1], node.inputs[2]);
                    let (Op::PosNorm { .. }, Op::PosNorm { .. }) =
                        (&self.g.nodes[q].op, &self.g.nodes[k].op)
                    else {
                        return Err(self.unsupported(id));
                    };
                    let qs = self.at(self.g.nodes[q].inputs[0])?;
                    let ks = self.at(self.g.nodes[k].inputs[0])?;
                    let vs = self.at(v)?;
                    if !(qs.0 == ks.0 && ks.0 == vs.0 && qs.1 == 0 && ks.1 == c && vs.1 == 2 * c) {
                        return Err(self.unsupported(id));
                    }
                    let table = self.table_weight()?;
                    let q_scale = self.weight(self.g.nodes[q].inputs[2], false)?;
                    let k_scale = self.weight(self.g.nodes[k].inputs[2], false)?;
                    let q_out = self.rows("q", c, BufferKind::Activation);
                    let kc = self.layer_cache(layer, 'k', cache_elems);
                    let vc = self.layer_cache(layer, 'v', cache_elems);
                    let base = name.trim_end_matches(".attention").to_string();
                    self.launch(
                        &format!("{base}.pos_norm"),
                        "pos_norm",
                        dim3(rows_grid, h as u64, 1),
                        (d / 2).div_ceil(32).max(1) as u64 * 32,
                        0,
                        vec![
                            buf(qs.0),
                            buf(positions),
                            wt(table),
                            wt(q_scale),
                            wt(k_scale),
                            buf(q_out),
                            buf(kc),
                            buf(vc),
                            sym(Symbol::Rows),
                            buf(slots),
                        ],
                    );
                    let out = self.rows("att", c, BufferKind::Activation);
                    let entry = if decode {
                        "attention_decode"
                    } else {
                        "attention_prefill"
                    };
                    let shared = if decode {
                        0
                    } else {
                        (2 * kernels::KV_TILE * d * 4) as u32
                    };
                    self.launch(
                        &name,
                        entry,
                        dim3(rows_grid, h as u64, 1),
                        128,
                        shared,
                        vec![
                            buf(q_out),
                            buf(kc),
                            buf(vc),
                            buf(positions),
                            buf(out),
                            sym(Symbol::Rows),
                            buf(slots),
                        ],
                    );
                    self.value_at.insert(id, (out, 0, c));
                    layer += 1;
                }
                Op::LerpNorm => {
                    let hx = self.at(node.inputs[0])?;
                    let br = self.at(node.inputs[1])?;
                    let lr = self.weight(node.inputs[2], false)?;
                    let out = self.rows("h", c, BufferKind::Activation);
                    if hx.0 != out {
                        return Err(self.unsupported(id));
                    }
                    self.launch(
                        &name,
                        "lerp_norm",
                        dim3(rows_grid, 1, 1),
                        256,
                        0,
                        vec![buf(out), buf(br.0), wt(lr), sym(Symbol::Rows)],
                    );
                    self.value_at.insert(id, (out, 0, c));
                }
                Op::SwiGlu => {
                    let x = self.at(node.inputs[0])?;
                    let out = self.rows("act", 4 * c, BufferKind::Activation);
                    self.launch(
                        &name,
                        "swiglu",
                        dim3(rows_grid, 1, 1),
                        256,
                        0,
                        vec![buf(x.0), buf(out), sym(Symbol::Rows)],
                    );
                    self.value_at.insert(id, (out, 0, 4 * c));
                }
                _ => return Err(self.unsupported(id)),
            }
        }
        Ok(std::mem::take(&mut self.steps))
    }

    fn layer_cache(&mut self, layer: usize, which: char, elements: Affine) -> u32 {
        self.buffer(
            &format!("h.{layer}.{which}_cache"),
            pb::DType::F32,
            BufferKind::Cache,
            elements,
        )
    }

    /// The diagonal position table M `[max_seq_len, head_dim]`: `M[t,2j] = E[t,j]`,
    /// `M[t,2j+1] = E[t,P+j]`, computed in f64 and rounded once.
    fn table_weight(&mut self) -> Result<u32> {
        if let Some(i) = self.weights.iter().position(|w| w.name == "position_table") {
            return Ok(i as u32);
        }
        let d = self.cfg.head_dim();
        let p = d / 2;
        let e = crate::reference::position_table(self.max_seq_len, d);
        let mut m = vec![0f32; self.max_seq_len * d];
        for t in 0..self.max_seq_len {
            for j in 0..p {
                m[t * d + 2 * j] = e[t * d + j] as f32;
                m[t * d + 2 * j + 1] = e[t * d + p + j] as f32;
            }
        }
        self.push_weight(
            "position_table".into(),
            vec![self.max_seq_len as u64, d as u64],
            pb::DType::F32,
            |f| m.chunks(1 << 20).try_for_each(f),
        )
    }
}

/// Refuses, in one line naming the first such node, a graph with an op the runtime has no
/// kernel for yet: the Hugging Face family's rotary embedding, learned position rows and
/// biases (issue 21's runtime half).
fn refuse_hf_ops(g: &Graph) -> Result<()> {
    let hf = g.nodes.iter().find(|n| {
        matches!(n.op, Op::Rotary { .. } | Op::Add)
            || (matches!(n.op, Op::MatMulT) && n.inputs.len() == 3)
    });
    match hf {
        None => Ok(()),
        Some(n) => Err(Error::Argument {
            what: format!("plan lowering: `{}` ({})", n.name, n.op.mnemonic()),
            problem: "the runtime has no kernel for the Hugging Face nGPT family's learned positions, biases and rotary embedding yet; the IR, model.onnx and tract run it".into(),
        }),
    }
}

/// Lowers the canonical graph `g` of a model with config `cfg` to a plan, with the bytes
/// of `model.weights` in memory (for small models and tests; [`lower_into`] streams them).
pub fn lower(
    g: &Graph,
    cfg: &Config,
    dtype: WeightDtype,
    max_seq_len: usize,
    source_sha256: &str,
) -> Result<Lowered> {
    let mut weights = vec![];
    let plan = lower_into(
        g,
        cfg,
        dtype,
        max_seq_len,
        source_sha256,
        &mut weights,
        std::path::Path::new("model.weights"),
    )?;
    Ok(Lowered { plan, weights })
}

/// Lowers as [`lower`] does, writing `model.weights` to `weights` one tensor at a time
/// (each made from its constant just before it is written); `weights_path` names the file
/// in write errors.
pub fn lower_into(
    g: &Graph,
    cfg: &Config,
    dtype: WeightDtype,
    max_seq_len: usize,
    source_sha256: &str,
    weights: &mut dyn std::io::Write,
    weights_path: &std::path::Path,
) -> Result<Plan> {
    if max_seq_len == 0 || max_seq_len > 1 << 20 {
        return Err(Error::Argument {
            what: "max_seq_len".into(),
            problem: format!("{max_seq_len} is outside 1..=1048576"),
        });
    }
    refuse_hf_ops(g)?;
    let mut l = Lowerer {
        g,
        cfg,
        dtype,
        max_seq_len,
        weights: vec![],
        sink: weights,
        sink_path: weights_path,
        written: 0,
        weight_of: HashMap::new(),
        buffers: vec![],
        buffer_of: HashMap::new(),
        value_at: HashMap::new(),
        steps: vec![],
    };
    let prefill = l.lower(false)?;
    let decode = l.lower(true)?;
    // A quantized plan states its layers' format (I4 where any weight is I4) and is
    // format minor 1; a plan without quantized weights is what older readers read.
    let has = |d: pb::DType| l.weights.iter().any(|w| w.dtype == d as i32);
    let (wdt, minor) = match dtype {
        WeightDtype::F32 => (pb::DType::F32, 0),
        WeightDtype::Bf16 => (pb::DType::Bf16, 0),
        WeightDtype::Quant if has(pb::DType::I4) => (pb::DType::I4, pb::FORMAT_MINOR),
        WeightDtype::Quant if has(pb::DType::I8) => (pb::DType::I8, pb::FORMAT_MINOR),
        WeightDtype::Quant => (pb::DType::F32, 0),
    };
    let module = kernel_module(cfg, max_seq_len);
    let plan = Plan {
        format_major: pb::FORMAT_MAJOR,
        format_minor: minor,
        producer: format!("ngpt {}", env!("CARGO_PKG_VERSION")),
        config: Some(pb::ModelConfig {
            n_layer: cfg.n_layer as u32,
            n_head: cfg.n_head as u32,
            n_embd: cfg.n_embd as u32,
            head_dim: cfg.head_dim() as u32,
            vocab_size: cfg.vocab_size as u32,
            block_size: cfg.block_size as u32,
            base_scale: cfg.base_scale,
        }),
        weight_dtype: wdt as i32,
        max_seq_len: max_seq_len as u32,
        weights_file_bytes: l.written,
        weights: l.weights,
        buffers: l.buffers,
        modules: vec![module],
        prefill: Some(Program {
            name: "prefill".into(),
            steps: prefill,
        }),
        decode: Some(Program {
            name: "decode".into(),
            steps: decode,
        }),
        source_sha256: source_sha256.into(),
    };
    l.sink.flush().map_err(|source| Error::Io {
        path: weights_path.to_path_buf(),
        source,
    })?;
    Ok(plan)
}

/// What a lowered plan's quantized weights are, for manifest.json (`None` when the plan
/// holds none).
pub fn weights_summary(
    p: &Plan,
    q: Option<crate::quant::Options>,
) -> Option<crate::compile::PlanWeights> {
    let q = q?;
    let quantized = |d: i32| d == pb::DType::I8 as i32 || d == pb::DType::I4 as i32;
    let scales: std::collections::HashSet<u32> = p
        .weights
        .iter()
        .filter_map(|w| w.quant.as_ref().map(|q| q.scales))
        .collect();
    let bytes: u64 = p
        .weights
        .iter()
        .enumerate()
        .filter(|(i, w)| quantized(w.dtype) || scales.contains(&(*i as u32)))
        .map(|(_, w)| w.bytes)
        .sum();
    if bytes == 0 {
        return None;
    }
    Some(crate::compile::PlanWeights {
        format: q.bits.as_str().into(),
        block: q.block,
        lm_head: q.lm_head.map_or("f32", |b| b.as_str()).into(),
        quantized_bytes: bytes,
        total_bytes: p.weights_file_bytes,
    })
}
