//! Lowering the IR to ONNX nodes: each IR op becomes a few standard `ai.onnx` ops (opset 18).
//!
//! IR activations are `[T, N]`; their ONNX values are `[batch, sequence, N]`. Values that do
//! not depend on the tokens (weights, scale vectors) keep their IR shape. Every ONNX node is
//! named `{IR node}/{op type}`, so it traces back to the IR node and from there to the
//! checkpoint tensor.

use candle_core::{DType, Tensor};
use ngpt_schemas::onnx::tensor_proto::DataType;

use super::builder::{Attr, Builder};
use super::{Options, WeightDtype};
use crate::error::{CandleContext, Error, Result};
use crate::graph::{Const, Graph, NodeId, Op};
use crate::reference::position_table;

/// Name of the token-id input, int64 `[batch, sequence]`.
pub const INPUT_IDS: &str = "input_ids";
/// Name of the mask input, int64 `[batch, past_sequence + sequence]`: 1 for tokens to
/// attend to, 0 for padding.
pub const ATTENTION_MASK: &str = "attention_mask";
/// Name of the position input, int64 `[batch, sequence]`: absolute positions, below the
/// export's `max_seq_len`.
pub const POSITION_IDS: &str = "position_ids";
/// Name of the logits output, float32 `[batch, sequence, vocab]`.
pub const LOGITS: &str = "logits";

pub fn past_name(layer: usize, which: &str) -> String {
    format!("past_key_values.{layer}.{which}")
}

pub fn present_name(layer: usize, which: &str) -> String {
    format!("present.{layer}.{which}")
}

/// One attention op's cache: the IR nodes whose values it holds.
pub struct Layer {
    pub heads: usize,
    pub head_dim: usize,
    /// IR name of the attention's key input (what `past_key_values.{i}.key` holds).
    pub key_source: String,
    pub key_op: String,
    /// IR name of the attention's value input.
    pub value_source: String,
}

/// What the lowering made, besides the builder's nodes and initializers.
pub struct Lowered {
    pub layers: Vec<Layer>,
    /// Logits are for the last position only (`last_row` in the graph).
    pub last_row_only: bool,
    pub vocab: usize,
}

/// Which position table: the code's step (pair swap and product) or its diagonal form.
#[derive(Clone, Copy)]
enum Table {
    Diag,
    Step,
}

struct Emit<'g, 'b> {
    g: &'g Graph,
    b: &'g mut Builder<'b>,
    opts: &'g Options,
    values: Vec<Option<String>>,
    /// Whether a constant is used other than as a `matmul_t` weight.
    plain_use: Vec<bool>,
    /// Whether the node's ONNX value has a leading batch axis.
    batched: Vec<bool>,
    layers: Vec<Layer>,
}

fn argument(problem: String) -> Error {
    Error::Argument {
        what: "ONNX export".into(),
        problem,
    }
}

/// The lowering's entry point: emits every live IR node into `b`.
pub fn lower(g: &Graph, opts: &Options, b: &mut Builder) -> Result<Lowered> {
    let n = g.nodes.len();
    let mut plain_use = vec![false; n];
    let mut batched = vec![false; n];
    for (id, node) in g.nodes.iter().enumerate() {
        for (slot, &i) in node.inputs.iter().enumerate() {
            if !(matches!(node.op, Op::MatMulT) && slot == 1) {
                plain_use[i] = true;
            }
        }
        batched[id] = match node.op {
            Op::Input => true,
            Op::Const(_) => false,
            _ => node.inputs.iter().any(|&i| batched[i]),
        };
    }
    if g.outputs.len() != 1 {
        return Err(argument(format!(
            "expected one graph output (the logits), found {}",
            g.outputs.len()
        )));
    }
    let out = g.outputs[0];
    if !batched[out] {
        return Err(argument("the logits do not depend on the tokens".into()));
    }
    let vocab = g.nodes[out].fact.last().unwrap_or(0);
    let last_row_only = matches!(g.nodes[out].op, Op::LastRow);
    let mut e = Emit {
        g,
        b,
        opts,
        values: vec![None; n],
        plain_use,
        batched,
        layers: vec![],
    };
    for id in 0..n {
        if matches!(g.nodes[id].op, Op::Const(_)) {
            continue; // made where used, in the form the user needs
        }
        let v = e.node(id).map_err(|err| match err {
            Error::Argument { what, problem } if what == "ONNX export" => argument(format!(
                "IR node `{}` ({}): {problem}",
                g.nodes[id].name,
                g.nodes[id].op.mnemonic()
            )),
            other => other,
        })?;
        e.values[id] = Some(v);
    }
    Ok(Lowered {
        layers: e.layers,
        last_row_only,
        vocab,
    })
}

impl Emit<'_, '_> {
    fn name(&self, id: NodeId) -> &str {
        &self.g.nodes[id].name
    }

    /// The ONNX name of node `id`'s final value.
    fn out_name(&self, id: NodeId) -> String {
        if self.g.outputs.contains(&id) {
            LOGITS.to_string()
        } else {
            self.name(id).to_string()
        }
    }

    /// ONNX rank of node `id`'s value.
    fn rank(&self, id: NodeId) -> usize {
        self.g.nodes[id].fact.shape.len() + self.batched[id] as usize
    }

    fn width(&self, id: NodeId) -> Result<usize> {
        self.g.nodes[id]
            .fact
            .last()
            .ok_or_else(|| argument(format!("`{}` has no fixed last axis", self.name(id))))
    }

    /// The value of input node `id`, making a constant's initializer on first use.
    fn value(&mut self, id: NodeId) -> Result<String> {
        if let Some(v) = &self.values[id] {
            return Ok(v.clone());
        }
        let Some(t) = self.g.const_of(id) else {
            return Err(argument(format!(
                "`{}` used before it is computed",
                self.name(id)
            )));
        };
        let name = self.name(id).to_string();
        let v = self.constant(&name, t, false)?;
        self.values[id] = Some(v.clone());
        Ok(v)
    }

    /// `x @ W^T` for a quantized weight `W` `[N, K]` (node `w`): onnxruntime's
    /// `com.microsoft` MatMulNBits, `B` the packed integers `[N, n_blocks, blob]` (unsigned,
    /// the default zero point 2^(bits-1)), `scales` f32 `[N * n_blocks]` (the f16 block
    /// scales widened exactly), `accuracy_level` 0 (activations stay f32), or 4 where the
    /// compile asked for int8 activations (the format's `act_int8`: onnxruntime may then
    /// quantize the activations to int8 per block, as the plan does; the graph's meaning
    /// stays the weight-only product, which a runtime that ignores the attribute computes).
    /// Made a block of rows at a time.
    fn matmul_nbits(
        &mut self,
        scope: &str,
        x: &str,
        w: NodeId,
        out: Option<&str>,
    ) -> Result<String> {
        let Some(c) = self.g.const_of(w) else {
            return Err(argument(format!("`{}` is not a constant", self.name(w))));
        };
        let Some(fmt) = c.quant() else {
            return Err(argument(format!("`{}` is not quantized", self.name(w))));
        };
        let (n, k) = (c.dims()[0], c.dims()[1]);
        let nb = crate::quant::n_blocks(k, fmt.block);
        let blob = fmt.block * fmt.bits.bits() / 8;
        let (mut packed, mut scales) = (
            Vec::with_capacity(n * nb * blob),
            Vec::with_capacity(n * nb * 4),
        );
        c.quant_row_blocks(|q| {
            packed.extend(crate::quant::pack(&q.ints, fmt.bits, k, fmt.block));
            q.scales
                .iter()
                .for_each(|s| scales.extend(s.to_f32().to_le_bytes()));
            Ok(())
        })?;
        let name = self.name(w).to_string();
        let b = self.b.initializer(
            &format!("{name}.B"),
            &[n, nb, blob],
            DataType::Uint8,
            packed,
            Some(format!(
                "{} codes of [{n}, {k}] in blocks of {} along K, stored as code + {}",
                fmt.bits.as_str(),
                fmt.block,
                1 << (fmt.bits.bits() - 1)
            )),
        )?;
        let sc = self.b.initializer(
            &format!("{name}.scales"),
            &[n * nb],
            DataType::Float,
            scales,
            Some("f16 block scales, widened to f32".into()),
        )?;
        self.b.contrib_op(
            scope,
            "MatMulNBits",
            &[x, &b, &sc],
            vec![
                ("K", Attr::Int(k as i64)),
                ("N", Attr::Int(n as i64)),
                ("bits", Attr::Int(fmt.bits.bits() as i64)),
                ("block_size", Attr::Int(fmt.block as i64)),
                (
                    "accuracy_level",
                    Attr::Int(if fmt.act_int8 { 4 } else { 0 }),
                ),
            ],
            out,
        )
    }

    /// The transposed `[K, N]` form of `matmul_t`'s weight `[N, K]`.
    fn weight_t(&mut self, id: NodeId) -> Result<String> {
        let Some(t) = self.g.const_of(id) else {
            let w = self.value(id)?;
            let scope = self.name(id).to_string();
            return self.b.op(
                &scope,
                "Transpose",
                &[&w],
                vec![("perm", Attr::Ints(vec![1, 0]))],
                None,
            );
        };
        let mut name = self.name(id).to_string();
        if self.plain_use[id] {
            name.push_str(".transposed");
        }
        self.constant(&name, t, true)
    }

    /// An initializer for a constant (its `[N, K]` matrix as `[K, N]` when `transposed`):
    /// f32, or f16 for matrices under `--onnx-dtype f16` (followed by a Cast to f32).
    /// Returns the f32 value's name.
    fn constant(&mut self, name: &str, c: &Const, transposed: bool) -> Result<String> {
        let mut dims = c.dims().to_vec();
        if transposed {
            dims.reverse();
        }
        let half = self.opts.weights == WeightDtype::F16 && dims.len() == 2;
        let doc = transposed.then(|| {
            format!(
                "transposed to [{}, {}] for MatMul (the checkpoint's layout is [{}, {}])",
                dims[0], dims[1], dims[1], dims[0]
            )
        });
        let ctx = format!("initializer `{name}`");
        if half {
            // f16 is rounded once, from the exact (f64) value.
            let values = c
                .value_in(DType::F64)
                .and_then(|t| {
                    if transposed {
                        transposed_f64(&t)
                    } else {
                        Ok(t)
                    }
                })
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f64>())
                .ctx(&ctx)?;
            if let Some(v) = values.iter().find(|v| v.abs() > 65504.0) {
                return Err(argument(format!(
                    "`{name}` holds {v:e}, beyond float16's range; export with --onnx-dtype f32"
                )));
            }
            let bytes = values
                .iter()
                .flat_map(|&v| half::f16::from_f64(v).to_le_bytes())
                .collect();
            let init = self
                .b
                .initializer(name, &dims, DataType::Float16, bytes, doc)?;
            self.b.op(
                name,
                "Cast",
                &[&init],
                vec![("to", Attr::Int(DataType::Float as i64))],
                None,
            )
        } else if transposed {
            // Written straight into the initializer's bytes a block of rows at a time, so
            // neither the value nor its transpose exists in f32 besides them.
            let (k, n) = (dims[0], dims[1]);
            let mut bytes = vec![0u8; n * k * 4];
            let mut row = 0;
            c.f32_row_blocks(&ctx, |block| {
                transpose_into(block, k, row, n, &mut bytes);
                row += block.len() / k.max(1);
                Ok(())
            })?;
            self.b.initializer(name, &dims, DataType::Float, bytes, doc)
        } else {
            let mut bytes = Vec::with_capacity(dims.iter().product::<usize>() * 4);
            c.f32_row_blocks(&ctx, |block| {
                block.iter().for_each(|v| bytes.extend(v.to_le_bytes()));
                Ok(())
            })?;
            self.b.initializer(name, &dims, DataType::Float, bytes, doc)
        }
    }

    fn reshape(&mut self, scope: &str, x: &str, dims: &[i64], out: Option<&str>) -> Result<String> {
        let shape = self.b.i64s(dims, false)?;
        self.b.op(scope, "Reshape", &[x, &shape], vec![], out)
    }

    /// `x / sqrt(ReduceSumSquare(x))` over the last axis (no epsilon, as the model).
    fn norm_last(&mut self, scope: &str, x: &str, out: Option<&str>) -> Result<String> {
        let axes = self.b.i64s(&[-1], false)?;
        let ss = self.b.op(
            scope,
            "ReduceSumSquare",
            &[x, &axes],
            vec![("keepdims", Attr::Int(1))],
            None,
        )?;
        let n = self.b.op(scope, "Sqrt", &[&ss], vec![], None)?;
        self.b.op(scope, "Div", &[x, &n], vec![], out)
    }

    /// `Norm` over groups of `group` entries of the last axis of node `id`'s input `x`.
    fn norm_groups(
        &mut self,
        scope: &str,
        x: &str,
        rank: usize,
        width: usize,
        group: usize,
        out: Option<&str>,
    ) -> Result<String> {
        if group == width {
            return self.norm_last(scope, x, out);
        }
        let mut dims = vec![0i64; rank - 1];
        dims.extend([(width / group) as i64, group as i64]);
        let g = self.reshape(scope, x, &dims, None)?;
        let n = self.norm_last(scope, &g, None)?;
        let mut back = vec![0i64; rank - 1];
        back.push(width as i64);
        self.reshape(scope, &n, &back, out)
    }

    fn slice(
        &mut self,
        scope: &str,
        x: &str,
        start: i64,
        end: i64,
        axis: i64,
        out: Option<&str>,
    ) -> Result<String> {
        let s = self.b.i64s(&[start], false)?;
        let e = self.b.i64s(&[end], false)?;
        let a = self.b.i64s(&[axis], false)?;
        self.b.op(scope, "Slice", &[x, &s, &e, &a], vec![], out)
    }

    /// Rows of a position table for `position_ids`, `[batch, sequence, 1, head_dim]`,
    /// gathered once per table and shared by every layer.
    fn position_rows(&mut self, table: Table, head_dim: usize, positions: &str) -> Result<String> {
        let tag = match table {
            Table::Diag => "diag",
            Table::Step => "step",
        };
        let key = format!("position_table.{tag}.{head_dim}/{positions}");
        let max = self.opts.max_seq_len;
        let positions = positions.to_string();
        self.b.cached(&key, |b| {
            let p = head_dim / 2;
            let e = position_table(max, head_dim);
            let mut m = vec![0f32; max * head_dim];
            for t in 0..max {
                let row = &e[t * head_dim..(t + 1) * head_dim];
                for j in 0..p {
                    let (even, odd) = match table {
                        Table::Diag => (row[j], row[p + j]),
                        Table::Step => (row[p + j], row[j]),
                    };
                    m[t * head_dim + 2 * j] = even as f32;
                    m[t * head_dim + 2 * j + 1] = odd as f32;
                }
            }
            let name = format!("position_table.{tag}.{head_dim}");
            let doc = match table {
                Table::Diag => format!(
                    "M[t, 2j] = E[t, j], M[t, 2j+1] = E[t, {p}+j]: the model's position step as a \
                     per-position diagonal scaling (spec 7.7), E computed in float64 and rounded \
                     once; rows = positions 0..{max}"
                ),
                Table::Step => format!(
                    "M'[t, 2j] = E[t, {p}+j], M'[t, 2j+1] = E[t, j]: the model's position step \
                     after its signed pair swap; rows = positions 0..{max}"
                ),
            };
            let bytes = m.iter().flat_map(|v| v.to_le_bytes()).collect();
            let init = b.initializer(&name, &[max, head_dim], DataType::Float, bytes, Some(doc))?;
            table_rows(b, &name, &init, &positions, &[2])
        })
    }

    /// The rotary embedding's cos and sin rows for `position_ids`, each
    /// `[batch, sequence, 1, head_dim / 2, 1]`, gathered once and shared by every layer.
    /// The tables hold positions `0..max_seq_len`, computed in f64 and rounded once.
    fn rotary_rows(&mut self, head_dim: usize, positions: &str) -> Result<(String, String)> {
        let max = self.opts.max_seq_len;
        let half = head_dim / 2;
        let table = crate::numerics::rotary_table(0..max, head_dim);
        let mut part = |part: &str, offset: usize| {
            let key = format!("rotary.{part}.{head_dim}/{positions}");
            self.b.cached(&key, |b| {
                let bytes = (0..max)
                    .flat_map(|t| &table[t * head_dim + offset..t * head_dim + offset + half])
                    .flat_map(|&v| (v as f32).to_le_bytes())
                    .collect();
                let name = format!("rotary.{part}.{head_dim}");
                let doc = format!(
                    "{part}(t * 10000^(-2i/{head_dim})) for positions t = 0..{max} and pairs \
                     i = 0..{half}: the rotary embedding's angles, computed in float64 and \
                     rounded once"
                );
                let init = b.initializer(&name, &[max, half], DataType::Float, bytes, Some(doc))?;
                table_rows(b, &name, &init, positions, &[2, 4])
            })
        };
        let cos = part("cos", 0)?;
        let sin = part("sin", half)?;
        Ok((cos, sin))
    }

    /// The rotary embedding per head: pairs `(a, b)` of `[batch, sequence, H, D/2, 2]` turn
    /// to `(a cos - b sin, b cos + a sin)`, in the interpreter's order.
    fn rotary(&mut self, id: NodeId, head_dim: usize, out: Option<&str>) -> Result<String> {
        let node = &self.g.nodes[id];
        let (s, inputs) = (node.name.clone(), node.inputs.clone());
        let s = s.as_str();
        if !self.batched[inputs[0]] || self.rank(inputs[0]) != 3 {
            return Err(argument("expected a [batch, sequence, N] operand".into()));
        }
        let x = self.value(inputs[0])?;
        let positions = self.value(inputs[1])?;
        let width = self.width(inputs[0])?;
        let (h, d) = ((width / head_dim) as i64, head_dim as i64);
        let (cos, sin) = self.rotary_rows(head_dim, &positions)?;
        let pairs = self.reshape(s, &x, &[0, 0, h, d / 2, 2], None)?;
        let a = self.slice(s, &pairs, 0, 1, -1, None)?;
        let b = self.slice(s, &pairs, 1, 2, -1, None)?;
        let a_cos = self.b.op(s, "Mul", &[&a, &cos], vec![], None)?;
        let b_sin = self.b.op(s, "Mul", &[&b, &sin], vec![], None)?;
        let out_a = self.b.op(s, "Sub", &[&a_cos, &b_sin], vec![], None)?;
        let b_cos = self.b.op(s, "Mul", &[&b, &cos], vec![], None)?;
        let a_sin = self.b.op(s, "Mul", &[&a, &sin], vec![], None)?;
        let out_b = self.b.op(s, "Add", &[&b_cos, &a_sin], vec![], None)?;
        let turned = self.b.op(
            s,
            "Concat",
            &[&out_a, &out_b],
            vec![("axis", Attr::Int(-1))],
            None,
        )?;
        self.reshape(s, &turned, &[0, 0, width as i64], out)
    }

    /// The attention mask `[batch, 1, sequence, past + sequence]` (bool): key j is seen by
    /// query i iff `j <= past + i` and `attention_mask[b, j] == 1`. Built once.
    fn mask(&mut self) -> Result<String> {
        let past_key = past_name(0, "key");
        self.b.cached("attention/mask", |b| {
            let scope = "attention.mask";
            let one = b.i64s(&[1], true)?;
            let two = b.i64s(&[2], true)?;
            let zero = b.i64s(&[0], true)?;
            let ids_shape = b.op(scope, "Shape", &[INPUT_IDS], vec![], None)?;
            let seq = b.op(
                scope,
                "Gather",
                &[&ids_shape, &one],
                vec![("axis", Attr::Int(0))],
                None,
            )?;
            let past_shape = b.op(scope, "Shape", &[&past_key], vec![], None)?;
            let past = b.op(
                scope,
                "Gather",
                &[&past_shape, &two],
                vec![("axis", Attr::Int(0))],
                None,
            )?;
            let total = b.op(scope, "Add", &[&past, &seq], vec![], None)?;
            let q = b.op(scope, "Range", &[&zero, &seq, &one], vec![], None)?;
            let q = b.op(scope, "Add", &[&q, &past], vec![], None)?;
            let k = b.op(scope, "Range", &[&zero, &total, &one], vec![], None)?;
            let ax0 = b.i64s(&[0], false)?;
            let ax1 = b.i64s(&[1], false)?;
            let k = b.op(scope, "Unsqueeze", &[&k, &ax0], vec![], None)?;
            let q = b.op(scope, "Unsqueeze", &[&q, &ax1], vec![], None)?;
            let causal = b.op(scope, "LessOrEqual", &[&k, &q], vec![], None)?;
            let keep = b.op(scope, "Equal", &[ATTENTION_MASK, &one], vec![], None)?;
            let ax12 = b.i64s(&[1, 2], false)?;
            let keep = b.op(scope, "Unsqueeze", &[&keep, &ax12], vec![], None)?;
            b.op(scope, "And", &[&keep, &causal], vec![], None)
        })
    }

    fn node(&mut self, id: NodeId) -> Result<String> {
        let node = &self.g.nodes[id];
        let op = node.op.clone();
        let scope = node.name.clone();
        let inputs = node.inputs.clone();
        let out_name = self.out_name(id);
        let out = Some(out_name.as_str());
        let s = scope.as_str();
        match op {
            Op::Input => {
                let name = match s {
                    "tokens" => INPUT_IDS,
                    "positions" => POSITION_IDS,
                    other => return Err(argument(format!("unknown graph input `{other}`"))),
                };
                Ok(name.to_string())
            }
            Op::Const(_) => self.value(id),
            Op::Gather => {
                let table = self.value(inputs[0])?;
                let ids = self.value(inputs[1])?;
                self.b.op(
                    s,
                    "Gather",
                    &[&table, &ids],
                    vec![("axis", Attr::Int(0))],
                    out,
                )
            }
            Op::MatMulT => {
                let x = self.value(inputs[0])?;
                if self
                    .g
                    .const_of(inputs[1])
                    .is_some_and(|c| c.quant().is_some())
                {
                    let Some(&bias) = inputs.get(2) else {
                        return self.matmul_nbits(s, &x, inputs[1], out);
                    };
                    let y = self.matmul_nbits(s, &x, inputs[1], None)?;
                    let bias = self.value(bias)?;
                    return self.b.op(s, "Add", &[&y, &bias], vec![], out);
                }
                let w = self.weight_t(inputs[1])?;
                let Some(&bias) = inputs.get(2) else {
                    return self.b.op(s, "MatMul", &[&x, &w], vec![], out);
                };
                let y = self.b.op(s, "MatMul", &[&x, &w], vec![], None)?;
                let bias = self.value(bias)?;
                self.b.op(s, "Add", &[&y, &bias], vec![], out)
            }
            Op::Add => {
                let a = self.value(inputs[0])?;
                let c = self.value(inputs[1])?;
                self.b.op(s, "Add", &[&a, &c], vec![], out)
            }
            Op::Rotary { head_dim } => self.rotary(id, head_dim, out),
            Op::Mul => {
                let a = self.value(inputs[0])?;
                let c = self.value(inputs[1])?;
                self.b.op(s, "Mul", &[&a, &c], vec![], out)
            }
            Op::Abs => {
                let x = self.value(inputs[0])?;
                self.b.op(s, "Abs", &[&x], vec![], out)
            }
            Op::Silu => {
                let x = self.value(inputs[0])?;
                let sg = self.b.op(s, "Sigmoid", &[&x], vec![], None)?;
                self.b.op(s, "Mul", &[&x, &sg], vec![], out)
            }
            Op::Norm { group } => {
                let x = self.value(inputs[0])?;
                let (rank, width) = (self.rank(inputs[0]), self.width(inputs[0])?);
                self.norm_groups(s, &x, rank, width, group, out)
            }
            Op::Lerp => {
                let (a, b, lr) = (
                    self.value(inputs[0])?,
                    self.value(inputs[1])?,
                    self.value(inputs[2])?,
                );
                self.lerp(s, &a, &b, &lr, out)
            }
            Op::LerpNorm => {
                let (h, br, lr) = (
                    self.value(inputs[0])?,
                    self.value(inputs[1])?,
                    self.value(inputs[2])?,
                );
                let nb = self.norm_last(s, &br, None)?;
                let l = self.lerp(s, &h, &nb, &lr, None)?;
                self.norm_last(s, &l, out)
            }
            Op::Slice { start, len } => {
                let x = self.value(inputs[0])?;
                self.slice(s, &x, start as i64, (start + len) as i64, -1, out)
            }
            Op::SwiGlu => {
                let x = self.value(inputs[0])?;
                let half = (self.width(inputs[0])? / 2) as i64;
                let u = self.slice(s, &x, 0, half, -1, None)?;
                let v = self.slice(s, &x, half, 2 * half, -1, None)?;
                let sg = self.b.op(s, "Sigmoid", &[&v], vec![], None)?;
                let silu = self.b.op(s, "Mul", &[&v, &sg], vec![], None)?;
                self.b.op(s, "Mul", &[&u, &silu], vec![], out)
            }
            Op::LastRow => {
                let x = self.value(inputs[0])?;
                let axis = self.rank(inputs[0]) as i64 - 2;
                self.slice(s, &x, -1, i64::MAX, axis, out)
            }
            Op::PosDiag { head_dim } | Op::PosStep { head_dim } | Op::PosNorm { head_dim } => {
                self.position_op(id, head_dim, out)
            }
            Op::Attention { heads, scale } => self.attention(id, heads, scale, out),
        }
    }

    /// `a + lr * (b - a)`, in the interpreter's order.
    fn lerp(&mut self, s: &str, a: &str, b: &str, lr: &str, out: Option<&str>) -> Result<String> {
        let d = self.b.op(s, "Sub", &[b, a], vec![], None)?;
        let m = self.b.op(s, "Mul", &[&d, lr], vec![], None)?;
        self.b.op(s, "Add", &[a, &m], vec![], out)
    }

    /// pos_step, pos_diag and pos_norm: per head `[batch, sequence, H, D]`, times the
    /// gathered table rows; pos_norm then normalizes each head and applies its scale.
    fn position_op(&mut self, id: NodeId, head_dim: usize, out: Option<&str>) -> Result<String> {
        let node = &self.g.nodes[id];
        let (op, s, inputs) = (node.op.clone(), node.name.clone(), node.inputs.clone());
        let s = s.as_str();
        if !self.batched[inputs[0]] || self.rank(inputs[0]) != 3 {
            return Err(argument("expected a [batch, sequence, N] operand".into()));
        }
        let x = self.value(inputs[0])?;
        let positions = self.value(inputs[1])?;
        let width = self.width(inputs[0])?;
        let (h, d) = ((width / head_dim) as i64, head_dim as i64);
        let x = match op {
            Op::PosStep { .. } => {
                let pairs = self.reshape(s, &x, &[0, 0, h, d / 2, 2], None)?;
                let even = self.slice(s, &pairs, 0, 1, -1, None)?;
                let odd = self.slice(s, &pairs, 1, 2, -1, None)?;
                let neg = self.b.op(s, "Neg", &[&odd], vec![], None)?;
                let swapped = self.b.op(
                    s,
                    "Concat",
                    &[&neg, &even],
                    vec![("axis", Attr::Int(-1))],
                    None,
                )?;
                self.reshape(s, &swapped, &[0, 0, h, d], None)?
            }
            _ => self.reshape(s, &x, &[0, 0, h, d], None)?,
        };
        let table = if matches!(op, Op::PosStep { .. }) {
            Table::Step
        } else {
            Table::Diag
        };
        let rows = self.position_rows(table, head_dim, &positions)?;
        let m = self.b.op(s, "Mul", &[&x, &rows], vec![], None)?;
        let Op::PosNorm { .. } = op else {
            return self.reshape(s, &m, &[0, 0, width as i64], out);
        };
        let n = self.norm_last(s, &m, None)?;
        let unit = match self.g.const_of(inputs[2]) {
            Some(t) => t
                .value()
                .and_then(|t| t.to_dtype(DType::F64))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f64>())
                .ctx("pos_norm scale")?
                .iter()
                .all(|&v| v == 1.0),
            None => false,
        };
        if unit {
            // A scale of exact ones (the key side after sqk_onto_q) is left out.
            return self.reshape(s, &n, &[0, 0, width as i64], out);
        }
        let r = self.reshape(s, &n, &[0, 0, width as i64], None)?;
        let scale = self.value(inputs[2])?;
        self.b.op(s, "Mul", &[&r, &scale], vec![], out)
    }

    /// Causal attention against the KV cache: the new keys and values are appended to
    /// `past_key_values.{i}` (the result is `present.{i}`), scores are masked by the causal
    /// mask and `attention_mask`, softmax over keys, weighted sum of values.
    fn attention(
        &mut self,
        id: NodeId,
        heads: usize,
        scale: f64,
        out: Option<&str>,
    ) -> Result<String> {
        let node = &self.g.nodes[id];
        let (s, inputs) = (node.name.clone(), node.inputs.clone());
        let s = s.as_str();
        let width = self.width(inputs[0])?;
        let (h, d) = (heads as i64, (width / heads) as i64);
        let layer = self.layers.len();
        let key_op = self.g.nodes[inputs[1]].op.mnemonic().to_string();
        self.layers.push(Layer {
            heads,
            head_dim: width / heads,
            key_source: self.name(inputs[1]).to_string(),
            key_op,
            value_source: self.name(inputs[2]).to_string(),
        });
        let split = |e: &mut Self, i: usize| -> Result<String> {
            let x = e.value(inputs[i])?;
            let r = e.reshape(s, &x, &[0, 0, h, d], None)?;
            e.b.op(
                s,
                "Transpose",
                &[&r],
                vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
                None,
            )
        };
        let q = split(self, 0)?;
        let k = split(self, 1)?;
        let v = split(self, 2)?;
        let past_k = past_name(layer, "key");
        let past_v = past_name(layer, "value");
        self.b.declare(&past_k)?;
        self.b.declare(&past_v)?;
        let present_k = present_name(layer, "key");
        let present_v = present_name(layer, "value");
        let axis2 = vec![("axis", Attr::Int(2))];
        let k = self
            .b
            .op(s, "Concat", &[&past_k, &k], axis2, Some(&present_k))?;
        let axis2 = vec![("axis", Attr::Int(2))];
        let v = self
            .b
            .op(s, "Concat", &[&past_v, &v], axis2, Some(&present_v))?;
        let kt = self.b.op(
            s,
            "Transpose",
            &[&k],
            vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))],
            None,
        )?;
        let mut scores = self.b.op(s, "MatMul", &[&q, &kt], vec![], None)?;
        if scale != 1.0 {
            let c = self.b.f32_scalar(scale as f32)?;
            scores = self.b.op(s, "Mul", &[&scores, &c], vec![], None)?;
        }
        let mask = self.mask()?;
        // The lowest finite float, not -inf: a row with every key masked (a padding query)
        // then gets a uniform softmax instead of NaN.
        let lowest = self.b.f32_scalar(f32::MIN)?;
        let masked = self
            .b
            .op(s, "Where", &[&mask, &scores, &lowest], vec![], None)?;
        let probs = self.b.op(
            s,
            "Softmax",
            &[&masked],
            vec![("axis", Attr::Int(-1))],
            None,
        )?;
        let y = self.b.op(s, "MatMul", &[&probs, &v], vec![], None)?;
        let y = self.b.op(
            s,
            "Transpose",
            &[&y],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
            None,
        )?;
        self.reshape(s, &y, &[0, 0, width as i64], out)
    }
}

/// `t` ([N, K], f64) transposed to a contiguous [K, N], tile by tile: candle's strided
/// copy walks the source a column at a time, a cache miss per element, and was a quarter of
/// the 0.5b compile.
fn transposed_f64(t: &Tensor) -> candle_core::Result<Tensor> {
    let (n, k) = t.dims2()?;
    let flat = t.flatten_all()?.to_vec1::<f64>()?;
    let mut out = vec![0f64; n * k];
    transpose_tiles(n, k, |r, c| out[c * n + r] = flat[r * k + c]);
    Tensor::from_vec(out, (k, n), t.device())
}

/// Writes `block`, rows `row0..` of a row-major `[N, cols]` f32 matrix, into `out`, the
/// little-endian bytes of its `[cols, N]` transpose.
fn transpose_into(block: &[f32], cols: usize, row0: usize, n: usize, out: &mut [u8]) {
    let rows = block.len() / cols.max(1);
    transpose_tiles(rows, cols, |r, c| {
        let at = (c * n + row0 + r) * 4;
        out[at..at + 4].copy_from_slice(&block[r * cols + c].to_le_bytes());
    });
}

/// Calls `put(r, c)` for every element of a `rows x cols` matrix, in 32 x 32 tiles (so a
/// transpose reads and writes within a few cache lines at a time).
fn transpose_tiles(rows: usize, cols: usize, mut put: impl FnMut(usize, usize)) {
    const TILE: usize = 32;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for c in c0..(c0 + TILE).min(cols) {
                for r in r0..(r0 + TILE).min(rows) {
                    put(r, c);
                }
            }
        }
    }
}

/// Rows of a `[max_seq_len, ...]` table for `positions` (Gather on axis 0), with unit axes
/// inserted at `axes` so they broadcast against the activations: the position table's and
/// the rotary embedding's.
fn table_rows(
    b: &mut Builder,
    name: &str,
    table: &str,
    positions: &str,
    axes: &[i64],
) -> Result<String> {
    let rows = b.op(
        name,
        "Gather",
        &[table, positions],
        vec![("axis", Attr::Int(0))],
        None,
    )?;
    let axes = b.i64s(axes, false)?;
    b.op(name, "Unsqueeze", &[&rows, &axes], vec![], None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiled_transposes_equal_candles_on_odd_shapes_and_blocks() -> candle_core::Result<()> {
        for (n, k) in [(1, 1), (1, 70), (33, 1), (31, 33), (65, 97), (128, 64)] {
            let v: Vec<f32> = (0..n * k).map(|i| i as f32 * 0.5 - 7.0).collect();
            let t = Tensor::from_vec(v.clone(), (n, k), &candle_core::Device::Cpu)?;
            let want = t.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            // Rows handed over in blocks of 7 (the last one short), as f32_row_blocks does.
            let mut bytes = vec![0u8; n * k * 4];
            for (b, block) in v.chunks(7 * k).enumerate() {
                transpose_into(block, k, b * 7, n, &mut bytes);
            }
            let got: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(got, want, "{n} x {k}");
            let got64 = transposed_f64(&t.to_dtype(DType::F64)?)?;
            assert_eq!(got64.dims(), [k, n]);
            let want64: Vec<f64> = want.iter().map(|&x| x as f64).collect();
            assert_eq!(got64.flatten_all()?.to_vec1::<f64>()?, want64);
        }
        Ok(())
    }
}
