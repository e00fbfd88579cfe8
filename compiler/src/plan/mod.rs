//! Lowering the canonical graph to a launch plan (`model.plan` + `model.weights`).
//!
//! The canonical form is fixed (design.md): per layer one QKV GEMM, one `pos_norm`
//! launch (position table, per-head Norm, q scale, KV-cache write), one attention launch,
//! the output GEMM, `lerp_norm`, the c_fc GEMM, `swiglu`, the projection GEMM and
//! `lerp_norm`; then the lm_head GEMM. Lowering walks the graph in order and maps each op
//! to steps over a fixed set of role buffers (`h`, `qkv`, `fc`, ...), so memory does not
//! grow with depth. Slices become column offsets, never copies.
//!
//! The Hugging Face (NousResearch) family's canonical form differs in four places, each a
//! kernel entry of its own: the learned position row added to the token row (`embed_pos`),
//! the bias operand of each projection, added by the kernel that reads the GEMM's output
//! (`rotary_norm` for QKV, `lerp_norm_bias` for the two output projections, `swiglu_bias`
//! for c_fc, whose halves are n_inner wide), and the rotary embedding before the per-head
//! norm (`rotary_norm`: the interleaved pairs turned by a cos/sin table computed in f64 and
//! rounded once, then Norm, the q scale, and k and v into the cache; `sqk_onto_q` has moved
//! k's scale and the softmax scale onto q, so k carries none and attention runs with
//! scale 1, as NVIDIA's does).

mod kernels;

use std::collections::HashMap;

use ngpt_schemas::plan::{
    self as pb, arg, operand, step, Affine, Arg, Buffer, BufferKind, Dim3, Gemm, Launch, Operand,
    Plan, Program, Step, Symbol,
};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId, Op};

pub use kernels::{kernel_module, ENTRIES, NOUS_ENTRIES, NVIDIA_ENTRIES};

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
    /// The bias weight of a GEMM output (or a slice of one) that no kernel has added yet:
    /// only the kernels that add it may read the value.
    bias_of: HashMap<NodeId, u32>,
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
                act_block: if fmt.act_int8 { pb::INT8_ACT_BLOCK } else { 0 },
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

    /// Where `id` lives; refuses a GEMM output whose bias is still to be added.
    fn at(&self, id: NodeId) -> Result<(u32, usize, usize)> {
        if self.bias_of.contains_key(&id) {
            return Err(self.unsupported(id));
        }
        self.at_biased(id)
    }

    /// Where `id` lives, its pending bias aside ([`Lowerer::bias_of`]).
    fn at_biased(&self, id: NodeId) -> Result<(u32, usize, usize)> {
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
        self.bias_of.clear();
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
                // Used by their consumers: pos_norm, and the Hugging Face family's rotary
                // embedding, per-head norm and q scale (lowered by the attention below).
                Op::Const(_) | Op::PosNorm { .. } | Op::Rotary { .. } | Op::Mul => {}
                Op::Norm { group } if *group != c => {}
                // The token and position rows of the Hugging Face family: one `embed_pos`
                // launch for the add of the two gathers.
                Op::Gather
                    if self
                        .g
                        .consumers(id)
                        .iter()
                        .all(|&u| matches!(self.g.nodes[u].op, Op::Add)) => {}
                Op::Add => {
                    let (wte, wpe) = self.embed_tables(id)?;
                    let wte = self.weight(wte, false)?;
                    let wpe = self.weight(wpe, false)?;
                    let out = self.rows("x0", c, BufferKind::Activation);
                    self.launch(
                        &name,
                        "embed_pos",
                        dim3(rows_grid, 1, 1),
                        256,
                        0,
                        vec![
                            buf(tokens),
                            buf(positions),
                            wt(wte),
                            wt(wpe),
                            buf(out),
                            sym(Symbol::Rows),
                        ],
                    );
                    self.value_at.insert(id, (out, 0, c));
                }
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
                    let bias = match node.inputs.get(2) {
                        Some(&b) => Some(self.weight(b, false)?),
                        None => None,
                    };
                    let feeds_swiglu = self
                        .g
                        .consumers(id)
                        .iter()
                        .any(|&u| matches!(self.g.nodes[u].op, Op::SwiGlu));
                    let role: &'static str = if self.g.outputs.contains(&id) {
                        if bias.is_some() {
                            return Err(self.unsupported(id));
                        }
                        "logits"
                    } else if feeds_swiglu {
                        "fc"
                    } else if n == 3 * c {
                        "qkv"
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
                    // A biased GEMM's output is not yet the node's value (the kernel that
                    // reads it adds the bias): its step says so, so traces (`bisect`)
                    // never compare it with the node.
                    let step = match bias {
                        Some(_) => format!("{name}.without_bias"),
                        None => name.clone(),
                    };
                    self.gemm(&step, x, w, n, k, out)?;
                    self.value_at.insert(id, (out, 0, n));
                    if let Some(b) = bias {
                        self.bias_of.insert(id, b);
                    }
                }
                Op::Slice { start, len } => {
                    let x = self.at_biased(node.inputs[0])?;
                    self.value_at.insert(id, (x.0, x.1 + start, *len));
                    if let Some(&b) = self.bias_of.get(&node.inputs[0]) {
                        self.bias_of.insert(id, b);
                    }
                }
                Op::Attention { scale, .. } if *scale != 1.0 => {
                    return Err(Error::Argument {
                        what: format!("plan lowering: `{name}` (attention)"),
                        problem: format!(
                            "softmax scale {scale}: the attention kernels take 1 (sqk_onto_q moves the scale onto q)"
                        ),
                    })
                }
                Op::Attention { .. }
                    if matches!(self.g.nodes[node.inputs[0]].op, Op::Mul) =>
                {
                    self.rotary_attention(id, layer, decode, cache_elems)?;
                    layer += 1;
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
                    self.attention_launch(&name, decode, q_out, kc, vc, out);
                    self.value_at.insert(id, (out, 0, c));
                    layer += 1;
                }
                Op::LerpNorm => {
                    let hx = self.at(node.inputs[0])?;
                    let br = self.at_biased(node.inputs[1])?;
                    let lr = self.weight(node.inputs[2], false)?;
                    let out = self.rows("h", c, BufferKind::Activation);
                    if hx.0 != out || br.1 != 0 || br.2 != c {
                        return Err(self.unsupported(id));
                    }
                    let (entry, args) = match self.bias_of.get(&node.inputs[1]) {
                        None => ("lerp_norm", vec![buf(out), buf(br.0), wt(lr), sym(Symbol::Rows)]),
                        Some(&b) => (
                            "lerp_norm_bias",
                            vec![buf(out), buf(br.0), wt(b), wt(lr), sym(Symbol::Rows)],
                        ),
                    };
                    self.launch(&name, entry, dim3(rows_grid, 1, 1), 256, 0, args);
                    self.value_at.insert(id, (out, 0, c));
                }
                Op::SwiGlu => {
                    let x = self.at_biased(node.inputs[0])?;
                    let half = self.g.nodes[id].fact.last().unwrap_or(0);
                    let inner = match self.cfg.family {
                        crate::config::Family::Nvidia => 4 * c,
                        crate::config::Family::Nous => self.cfg.n_inner,
                    };
                    if half != inner || x.1 != 0 || x.2 != 2 * inner {
                        return Err(self.unsupported(id));
                    }
                    let out = self.rows("act", inner, BufferKind::Activation);
                    let (entry, args) = match self.bias_of.get(&node.inputs[0]) {
                        None => ("swiglu", vec![buf(x.0), buf(out), sym(Symbol::Rows)]),
                        Some(&b) => (
                            "swiglu_bias",
                            vec![buf(x.0), wt(b), buf(out), sym(Symbol::Rows)],
                        ),
                    };
                    self.launch(&name, entry, dim3(rows_grid, 1, 1), 256, 0, args);
                    self.value_at.insert(id, (out, 0, inner));
                }
                _ => return Err(self.unsupported(id)),
            }
        }
        Ok(std::mem::take(&mut self.steps))
    }

    /// The Hugging Face family's `add(gather(wte, tokens), gather(wpe, positions))`: the two
    /// tables, token table first.
    fn embed_tables(&self, id: NodeId) -> Result<(NodeId, NodeId)> {
        let g = self.g;
        let gather_of = |i: NodeId, input: &str| -> Option<NodeId> {
            let n = &g.nodes[i];
            let on = *n.inputs.get(1)?;
            (matches!(n.op, Op::Gather) && g.nodes[on].name == input)
                .then_some(n.inputs[0])
                .filter(|&t| g.const_of(t).is_some())
        };
        let node = &g.nodes[id];
        let (a, b) = match node.inputs[..] {
            [a, b] => (a, b),
            _ => return Err(self.unsupported(id)),
        };
        let tables = match (gather_of(a, "tokens"), gather_of(b, "positions")) {
            (Some(t), Some(p)) => Some((t, p)),
            _ => gather_of(b, "tokens").zip(gather_of(a, "positions")),
        };
        let (wte, wpe) = tables.ok_or_else(|| self.unsupported(id))?;
        let rows = match g.nodes[wpe].fact.shape.first() {
            Some(crate::graph::Dim::Fixed(r)) => *r,
            _ => 0,
        };
        if rows < self.max_seq_len {
            return Err(Error::Argument {
                what: format!("plan lowering: `{}`", g.nodes[wpe].name),
                problem: format!(
                    "the learned position table has {rows} rows, fewer than the KV capacity {}",
                    self.max_seq_len
                ),
            });
        }
        Ok((wte, wpe))
    }

    /// The Hugging Face family's attention: `q = Mul(Norm_D(Rotary(Slice q)), q_scale)`,
    /// `k = Norm_D(Rotary(Slice k))`, `v = Slice v` of one biased QKV GEMM, lowered to a
    /// `rotary_norm` launch (bias, rotation, norm, q scale, the cache writes) and the
    /// attention launch.
    fn rotary_attention(
        &mut self,
        id: NodeId,
        layer: usize,
        decode: bool,
        cache_elems: Affine,
    ) -> Result<()> {
        let g = self.g;
        let (c, d, h) = (self.cfg.n_embd, self.cfg.head_dim(), self.cfg.n_head);
        let node = &g.nodes[id];
        let (q, k, v) = (node.inputs[0], node.inputs[1], node.inputs[2]);
        let norm_rot = |n: NodeId| -> Option<NodeId> {
            let norm = &g.nodes[n];
            let Op::Norm { group } = norm.op else {
                return None;
            };
            let rot = &g.nodes[*norm.inputs.first()?];
            match rot.op {
                Op::Rotary { head_dim } if group == d && head_dim == d => {
                    (g.nodes[*rot.inputs.get(1)?].name == "positions").then_some(rot.inputs[0])
                }
                _ => None,
            }
        };
        let q_parts = match g.nodes[q].inputs[..] {
            [n, s] => norm_rot(n).zip(g.const_of(s).map(|_| s)),
            _ => None,
        };
        let (Some((qslice, q_scale)), Some(kslice)) = (q_parts, norm_rot(k)) else {
            return Err(self.unsupported(id));
        };
        let (qs, ks, vs) = (
            self.at_biased(qslice)?,
            self.at_biased(kslice)?,
            self.at_biased(v)?,
        );
        if !(qs.0 == ks.0 && ks.0 == vs.0 && qs.1 == 0 && ks.1 == c && vs.1 == 2 * c) {
            return Err(self.unsupported(id));
        }
        let bias = match (
            self.bias_of.get(&qslice),
            self.bias_of.get(&kslice),
            self.bias_of.get(&v),
        ) {
            (Some(&a), Some(&b), Some(&cc)) if a == b && b == cc => a,
            _ => return Err(self.unsupported(id)),
        };
        let table = self.rotary_table_weight()?;
        let q_scale = self.weight(q_scale, false)?;
        let q_out = self.rows("q", c, BufferKind::Activation);
        let kc = self.layer_cache(layer, 'k', cache_elems);
        let vc = self.layer_cache(layer, 'v', cache_elems);
        let (rows_grid, positions, slots) = (
            aff(0, 1, 0),
            self.buffer_of["positions"],
            self.buffer_of["slots"],
        );
        let base = node.name.trim_end_matches(".attention").to_string();
        self.launch(
            &format!("{base}.rotary_norm"),
            "rotary_norm",
            dim3(rows_grid, h as u64, 1),
            (d / 2).div_ceil(32).max(1) as u64 * 32,
            0,
            vec![
                buf(qs.0),
                buf(positions),
                wt(table),
                wt(bias),
                wt(q_scale),
                buf(q_out),
                buf(kc),
                buf(vc),
                sym(Symbol::Rows),
                buf(slots),
            ],
        );
        let out = self.rows("att", c, BufferKind::Activation);
        self.attention_launch(&node.name, decode, q_out, kc, vc, out);
        self.value_at.insert(id, (out, 0, c));
        Ok(())
    }

    /// The attention launch over `q_out` and one layer's caches into `out`.
    fn attention_launch(
        &mut self,
        name: &str,
        decode: bool,
        q_out: u32,
        kc: u32,
        vc: u32,
        out: u32,
    ) {
        let (d, h) = (self.cfg.head_dim(), self.cfg.n_head);
        let (positions, slots) = (self.buffer_of["positions"], self.buffer_of["slots"]);
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
            name,
            entry,
            dim3(aff(0, 1, 0), h as u64, 1),
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
    }

    /// The rotary table `[max_seq_len, head_dim]` of the Hugging Face family: `R[t, 2i] =
    /// cos(t theta_i)`, `R[t, 2i+1] = sin(t theta_i)`, `theta_i = 10000^(-2i/D)`, computed in
    /// f64 (`numerics::rotary_table`) and rounded once.
    fn rotary_table_weight(&mut self) -> Result<u32> {
        if let Some(i) = self.weights.iter().position(|w| w.name == "rotary_table") {
            return Ok(i as u32);
        }
        let d = self.cfg.head_dim();
        let p = d / 2;
        let e = crate::numerics::rotary_table(0..self.max_seq_len, d);
        let mut m = vec![0f32; self.max_seq_len * d];
        for t in 0..self.max_seq_len {
            for i in 0..p {
                m[t * d + 2 * i] = e[t * d + i] as f32;
                m[t * d + 2 * i + 1] = e[t * d + p + i] as f32;
            }
        }
        self.push_weight(
            "rotary_table".into(),
            vec![self.max_seq_len as u64, d as u64],
            pb::DType::F32,
            |f| m.chunks(1 << 20).try_for_each(f),
        )
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
        bias_of: HashMap::new(),
        steps: vec![],
    };
    let prefill = l.lower(false)?;
    let decode = l.lower(true)?;
    // A quantized plan states its layers' format (I4 where any weight is I4) and is
    // format minor 1 (2 where a quantized weight's GEMMs quantize their activations); a
    // plan without quantized weights is what older readers read.
    let has = |d: pb::DType| l.weights.iter().any(|w| w.dtype == d as i32);
    let quant_minor = if l
        .weights
        .iter()
        .any(|w| w.quant.as_ref().is_some_and(|q| q.act_block != 0))
    {
        pb::FORMAT_MINOR
    } else {
        1
    };
    let (wdt, minor) = match dtype {
        WeightDtype::F32 => (pb::DType::F32, 0),
        WeightDtype::Bf16 => (pb::DType::Bf16, 0),
        WeightDtype::Quant if has(pb::DType::I4) => (pb::DType::I4, quant_minor),
        WeightDtype::Quant if has(pb::DType::I8) => (pb::DType::I8, quant_minor),
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
            n_inner: match cfg.family {
                crate::config::Family::Nvidia => 0,
                crate::config::Family::Nous => cfg.n_inner as u32,
            },
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
        activations: if q.act_int8 { "int8" } else { "f32" }.into(),
        quantized_bytes: bytes,
        total_bytes: p.weights_file_bytes,
    })
}
