//! The nGPT graph IR.
//!
//! A graph is a list of nodes in topological order; each node computes one value from the
//! values of earlier nodes. Shapes use one symbolic dimension, `T` (tokens of the
//! sequence). Constants hold candle tensors in whatever dtype is exact for them: stored
//! checkpoint dtypes until a fold rounds, f64 after. Activations have no dtype of their
//! own: the interpreter runs a graph in f32 or f64, emitters pick theirs.
//!
//! Every node has a name that traces back to a checkpoint tensor (`h.3.attn.q.norm`).
//! [`Graph::verify`] checks the invariants; passes run it after every rewrite in tests and
//! debug builds.

mod build;
pub mod interp;
mod print;
mod verify;

use std::fmt;

use candle_core::Tensor;

pub use build::literal;

/// Index of a node in [`Graph::nodes`].
pub type NodeId = usize;

/// One dimension: the symbolic sequence length or a fixed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    /// Tokens of the sequence being computed.
    T,
    /// A size known when the graph is built.
    Fixed(usize),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::T => write!(f, "T"),
            Dim::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// Element kind of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Floating point, precision chosen by whoever runs the graph.
    Float,
    /// Token ids and positions.
    Int,
}

/// The type of a value: kind and shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fact {
    /// Whether the elements are floats or integers.
    pub kind: Kind,
    /// The dimensions, outermost first; an empty shape is a scalar.
    pub shape: Vec<Dim>,
}

impl Fact {
    /// A float value of shape `shape`.
    pub fn float(shape: Vec<Dim>) -> Fact {
        Fact {
            kind: Kind::Float,
            shape,
        }
    }

    /// The last dimension's fixed size, if any.
    pub fn last(&self) -> Option<usize> {
        match self.shape.last() {
            Some(Dim::Fixed(n)) => Some(*n),
            _ => None,
        }
    }
}

/// A constant: a tensor as stored (checkpoint dtype) or as a fold computed it, with
/// perhaps a per-row scale folded in but not yet applied.
///
/// The row scale keeps large folded weights (c_fc, lm_head) lazy: their value is
/// `scale[r] * tensor[r]`, computed in f64 when an interpreter or emitter asks for it, one
/// constant at a time, so a compiled graph holds no second, f64 copy of those weights.
#[derive(Debug, Clone)]
pub struct Const {
    tensor: Tensor,
    row_scale: Option<Tensor>,
    /// Weight-only block quantization of the value (the `quantize` pass): made a block of
    /// rows at a time from the stored rows and the row scale when read, never held.
    quant: Option<crate::quant::Format>,
}

impl Const {
    /// A constant holding `tensor` as it is.
    pub fn new(tensor: Tensor) -> Const {
        Const {
            tensor,
            row_scale: None,
            quant: None,
        }
    }

    /// `self` with each row `r` scaled by `scale[r]` (a vector of the first dimension's
    /// length), lazily, in f64. Scales compose by multiplying them.
    ///
    /// ```
    /// # fn main() -> candle_core::Result<()> {
    /// use candle_core::{Device, Tensor};
    /// use ngpt_compiler::graph::Const;
    /// let w = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
    /// let c = Const::new(w).scale_rows(&Tensor::new(&[2.0f64, -0.5], &Device::Cpu)?)?;
    /// assert_eq!(c.value()?.to_vec2::<f64>()?, [[2.0, 4.0], [-1.5, -2.0]]);
    /// assert!(Const::new(Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu)?)
    ///     .scale_rows(&Tensor::new(&[1.0f64], &Device::Cpu)?)
    ///     .is_err());
    /// # Ok(()) }
    /// ```
    pub fn scale_rows(&self, scale: &Tensor) -> candle_core::Result<Const> {
        let scale = scale.to_dtype(candle_core::DType::F64)?;
        if scale.dims() != [self.dims().first().copied().unwrap_or(0)] {
            candle_core::bail!(
                "row scale of shape {:?} for a constant of shape {:?}",
                scale.dims(),
                self.dims()
            );
        }
        let row_scale = match &self.row_scale {
            Some(s) => s.mul(&scale)?,
            None => scale,
        };
        if self.quant.is_some() {
            candle_core::bail!("a row scale on a quantized constant");
        }
        Ok(Const {
            tensor: self.tensor.clone(),
            row_scale: Some(row_scale),
            quant: None,
        })
    }

    /// `self` quantized as `fmt` says (a matrix `[N, K]`, blocks along K), lazily: the
    /// value becomes the dequantized block-quantized rows ([`crate::quant::dequantize`]),
    /// f32, with the row scale in the block scales.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use candle_core::{DType, Device, Tensor};
    /// use ngpt_compiler::graph::Const;
    /// use ngpt_compiler::quant::{Bits, Format};
    /// let w = Tensor::new(&[[0.5f32, -1.0, 0.25], [2.0, 1.0, 0.0]], &Device::Cpu)?;
    /// let fmt = Format { bits: Bits::Int8, block: 16, renorm: false, act_int8: false };
    /// let q = Const::new(w).quantized(fmt)?;
    /// assert_eq!(q.quant(), Some(fmt));
    /// // Row 1's block scale is 2 / 127, rounded to f16: the values come back within it.
    /// let row = q.value_in(DType::F32)?.to_vec2::<f32>()?[1].clone();
    /// assert!(row.iter().zip([2.0, 1.0, 0.0]).all(|(a, b)| (a - b).abs() < 2.0 / 127.0));
    /// assert_ne!(row, [2.0, 1.0, 0.0]); // quantized, not the source
    /// # Ok(()) }
    /// ```
    pub fn quantized(&self, fmt: crate::quant::Format) -> candle_core::Result<Const> {
        if self.rank() != 2 || self.quant.is_some() {
            candle_core::bail!(
                "only an unquantized matrix is quantized, not a constant of shape {:?}",
                self.dims()
            );
        }
        Ok(Const {
            quant: Some(fmt),
            ..self.clone()
        })
    }

    /// The quantization format, when the constant is quantized.
    pub fn quant(&self) -> Option<crate::quant::Format> {
        self.quant
    }

    /// Rows `start..start + len` of a quantized constant as integers and block scales
    /// (`None` when it is not quantized).
    pub fn quant_rows(
        &self,
        start: usize,
        len: usize,
    ) -> crate::error::Result<Option<crate::quant::QuantRows>> {
        use crate::error::CandleContext;
        let Some(fmt) = self.quant else {
            return Ok(None);
        };
        let k = self.dims().get(1).copied().unwrap_or(0);
        let w = self
            .tensor
            .narrow(0, start, len)
            .and_then(|t| {
                t.to_dtype(candle_core::DType::F64)?
                    .flatten_all()?
                    .to_vec1()
            })
            .ctx("quantize")?;
        let s: Option<Vec<f64>> = match &self.row_scale {
            Some(s) => Some(
                s.narrow(0, start, len)
                    .and_then(|t| t.to_vec1())
                    .ctx("quantize")?,
            ),
            None => None,
        };
        crate::quant::quantize(&w, len, k, s.as_deref(), fmt).map(Some)
    }

    /// Calls `f` with a quantized constant's rows, up to 1024 at a time, in order (the
    /// ONNX emitter's MatMulNBits bytes); nothing when it is not quantized.
    pub fn quant_row_blocks(
        &self,
        mut f: impl FnMut(&crate::quant::QuantRows) -> crate::error::Result<()>,
    ) -> crate::error::Result<()> {
        let rows = self.dims().first().copied().unwrap_or(0);
        for start in (0..rows).step_by(Self::BLOCK_ROWS) {
            if let Some(q) = self.quant_rows(start, Self::BLOCK_ROWS.min(rows - start))? {
                f(&q)?;
            }
        }
        Ok(())
    }

    /// Rows of the value a block holds at most when it is made a block at a time.
    const BLOCK_ROWS: usize = 1024;

    /// Rows `start..start + len` of the value in `dtype`: the stored rows, scaled in f64
    /// (rounded to `dtype` once) when there is a row scale.
    fn rows_in(
        &self,
        start: usize,
        len: usize,
        dtype: candle_core::DType,
    ) -> candle_core::Result<Tensor> {
        if self.quant.is_some() {
            let q = self
                .quant_rows(start, len)
                .and_then(|q| q.map(|q| q.dequantize()).transpose())
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                .unwrap_or_default();
            let k = self.dims().get(1).copied().unwrap_or(0);
            return Tensor::from_vec(q, (len, k), self.tensor.device())?.to_dtype(dtype);
        }
        let w = self.tensor.narrow(0, start, len)?;
        match &self.row_scale {
            Some(s) => w
                .to_dtype(candle_core::DType::F64)?
                .broadcast_mul(&s.narrow(0, start, len)?.unsqueeze(1)?)?
                .to_dtype(dtype),
            None => w.to_dtype(dtype),
        }
    }

    /// The value in `dtype`: as [`Const::value`] then converted, but a row-scaled constant
    /// is made a block of rows at a time, so the full f64 product never exists at once.
    pub fn value_in(&self, dtype: candle_core::DType) -> candle_core::Result<Tensor> {
        if self.row_scale.is_none() && self.quant.is_none() {
            return self.tensor.to_dtype(dtype);
        }
        let rows = self.dims().first().copied().unwrap_or(0);
        let parts = (0..rows)
            .step_by(Self::BLOCK_ROWS)
            .map(|start| self.rows_in(start, Self::BLOCK_ROWS.min(rows - start), dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }

    /// Calls `f` with the value in f32, a block of up to 1024 rows (of the first dimension)
    /// at a time, in order: the values of `value_in(F32)`, bit for bit, without a
    /// full-size copy of the value ever existing (emitters stream them into their files).
    /// A candle error is reported with `context`.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use candle_core::{Device, Tensor};
    /// use ngpt_compiler::graph::Const;
    /// let w = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
    /// let scale = Tensor::new(&[2.0f64, -0.5], &Device::Cpu)?;
    /// let c = Const::new(w).scale_rows(&scale)?;
    /// let mut all = vec![];
    /// c.f32_row_blocks("w", |block| Ok(all.extend_from_slice(block)))?;
    /// assert_eq!(all, [2.0, 4.0, -1.5, -2.0]);
    /// # Ok(()) }
    /// ```
    pub fn f32_row_blocks(
        &self,
        context: &str,
        mut f: impl FnMut(&[f32]) -> crate::error::Result<()>,
    ) -> crate::error::Result<()> {
        use crate::error::CandleContext;
        let f32 = candle_core::DType::F32;
        if self.rank() == 0 {
            return f(&self
                .value_in(f32)
                .and_then(|t| t.flatten_all()?.to_vec1())
                .ctx(context)?);
        }
        let rows = self.dims()[0];
        for start in (0..rows).step_by(Self::BLOCK_ROWS) {
            let len = Self::BLOCK_ROWS.min(rows - start);
            let block = self
                .rows_in(start, len, f32)
                .and_then(|t| t.flatten_all()?.to_vec1());
            f(&block.ctx(context)?)?;
        }
        Ok(())
    }

    /// The value: the tensor, with any row scale applied in f64.
    pub fn value(&self) -> candle_core::Result<Tensor> {
        if self.quant.is_some() {
            return self.value_in(candle_core::DType::F32);
        }
        match &self.row_scale {
            None => Ok(self.tensor.clone()),
            Some(s) => self
                .tensor
                .to_dtype(candle_core::DType::F64)?
                .broadcast_mul(&s.unsqueeze(1)?),
        }
    }

    /// The shape of the value (a row scale does not change it).
    pub fn dims(&self) -> &[usize] {
        self.tensor.dims()
    }

    /// The number of dimensions of the value.
    pub fn rank(&self) -> usize {
        self.tensor.rank()
    }

    /// The number of elements of the value.
    pub fn elem_count(&self) -> usize {
        self.tensor.elem_count()
    }

    /// The dtype of [`Const::value`]: f64 once a row scale is folded in, f32 when
    /// quantized (the dequantized values).
    pub fn dtype(&self) -> candle_core::DType {
        if self.quant.is_some() {
            return candle_core::DType::F32;
        }
        match self.row_scale {
            Some(_) => candle_core::DType::F64,
            None => self.tensor.dtype(),
        }
    }
}

/// The operations of the IR. Literal ops come from spec section 3; fused ops are made by
/// the passes. Shapes are `[T, N]` for activations unless noted.
#[derive(Debug, Clone)]
pub enum Op {
    /// A graph input: `tokens` or `positions`, both Int `[T]`.
    Input,
    /// A constant tensor.
    Const(Const),
    /// `table[ids]`: rows of a `[V, C]` table.
    Gather,
    /// `x @ w^T` for x `[T, K]`, w `[N, K]`, plus a bias row `[N]` when there is a third
    /// input (the Hugging Face family's projections; NVIDIA's have none).
    MatMulT,
    /// Elementwise sum; the second operand is a row vector `[N]` or the same shape as the
    /// first (the learned position rows added to the token rows).
    Add,
    /// Elementwise product; the second operand is a row vector `[N]`, a scalar `[]`, or
    /// the same shape as the first.
    Mul,
    /// Elementwise |x|.
    Abs,
    /// `x / ||x||_2` over consecutive groups of `group` entries of the last axis (the whole
    /// row when group is the row length; one head when it is head_dim). No epsilon.
    Norm {
        /// Entries per normalized group; it divides the last axis.
        group: usize,
    },
    /// NVIDIA's position step (spec section 3 step 2) per head of `head_dim`:
    /// `out[2j] = -x[2j+1] E[t,P+j]`, `out[2j+1] = x[2j] E[t,j]`. Inputs: x, positions.
    PosStep {
        /// Head dimension D, even; the last axis is a whole number of heads.
        head_dim: usize,
    },
    /// The same step as a diagonal scaling (spec 7.7): `out[2j] = x[2j] E[t,j]`,
    /// `out[2j+1] = x[2j+1] E[t,P+j]`. Inputs: x, positions.
    PosDiag {
        /// Head dimension D, even; the last axis is a whole number of heads.
        head_dim: usize,
    },
    /// The Hugging Face family's rotary embedding per head of `head_dim`: each interleaved
    /// pair `(a, b) = (x[2i], x[2i+1])` turns by `angle = p_t * 10000^(-2i/D)` to
    /// `(a cos - b sin, b cos + a sin)`; cos and sin computed in f64, rounded once by
    /// whoever runs the graph. Inputs: x, positions.
    Rotary {
        /// Head dimension D, even; the last axis is a whole number of heads.
        head_dim: usize,
    },
    /// Causal attention over `heads` heads: `softmax_u(scale <q_t, k_u>) v_u`, u <= t.
    /// Inputs: q, k, v.
    Attention {
        /// Number of heads; q, k and v are `[T, heads * head_dim]`.
        heads: usize,
        /// Factor on the scores before the softmax: sqrt(head_dim) in NVIDIA's literal
        /// graph, 1/sqrt(head_dim) in the Hugging Face family's, 1 once `sqk_onto_q` has
        /// moved it onto q.
        scale: f64,
    },
    /// `a + lr * (b - a)`, lr a row vector. Inputs: a, b, lr.
    Lerp,
    /// Columns `start..start+len` of the last axis.
    Slice {
        /// First column taken.
        start: usize,
        /// Number of columns taken, at least 1.
        len: usize,
    },
    /// `z * sigmoid(z)`.
    Silu,
    /// Fused residual update: `Norm(h + lr * (Norm(branch) - h))`. Inputs: h, branch, lr.
    LerpNorm,
    /// Fused `Norm_head(PosDiag(x)) * scale`. Inputs: x, positions, scale `[N]`.
    PosNorm {
        /// Head dimension D, even; the last axis is a whole number of heads.
        head_dim: usize,
    },
    /// Fused `u * Silu(v)` with `[u | v] = x`, output `[T, N/2]`.
    SwiGlu,
    /// The last row: `[T, N] -> [1, N]`, for decoding.
    LastRow,
}

impl Op {
    /// A short lowercase name, as the printer shows it.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Op::Input => "input",
            Op::Const(_) => "const",
            Op::Gather => "gather",
            Op::MatMulT => "matmul_t",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Abs => "abs",
            Op::Norm { .. } => "norm",
            Op::PosStep { .. } => "pos_step",
            Op::PosDiag { .. } => "pos_diag",
            Op::Rotary { .. } => "rotary",
            Op::Attention { .. } => "attention",
            Op::Lerp => "lerp",
            Op::Slice { .. } => "slice",
            Op::Silu => "silu",
            Op::LerpNorm => "lerp_norm",
            Op::PosNorm { .. } => "pos_norm",
            Op::SwiGlu => "swiglu",
            Op::LastRow => "last_row",
        }
    }
}

/// One node: an op, its inputs, its name and the fact of its output.
#[derive(Debug, Clone)]
pub struct Node {
    /// The name, tracing back to a checkpoint tensor (`h.3.attn.q.norm`); a node a pass
    /// makes to replace another usually keeps that node's name.
    pub name: String,
    /// What the node computes.
    pub op: Op,
    /// The nodes whose values the op takes, in the op's order; each comes earlier in
    /// [`Graph::nodes`].
    pub inputs: Vec<NodeId>,
    /// Kind and shape of the output, as inferred from the op and its inputs' facts.
    pub fact: Fact,
}

/// A graph: nodes in topological order, named inputs and outputs.
#[derive(Debug, Clone)]
pub struct Graph {
    /// The nodes in topological order, each after its inputs; the graph inputs `tokens`
    /// and `positions` come first.
    pub nodes: Vec<Node>,
    /// Output node ids, in order (`logits`).
    pub outputs: Vec<NodeId>,
    /// Model width C (config `n_embd`), for passes that need it.
    pub n_embd: usize,
    /// Attention heads per layer (config `n_head`), for passes that need it.
    pub n_head: usize,
}

impl Graph {
    /// Appends a node, inferring its fact from its op and inputs.
    pub fn push(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: Vec<NodeId>,
    ) -> crate::Result<NodeId> {
        let name = name.into();
        let facts: Vec<&Fact> = inputs.iter().map(|&i| &self.nodes[i].fact).collect();
        let fact = verify::infer(&op, &facts).map_err(|problem| crate::Error::Argument {
            what: format!("IR node `{name}`"),
            problem,
        })?;
        self.nodes.push(Node {
            name,
            op,
            inputs,
            fact,
        });
        Ok(self.nodes.len() - 1)
    }

    /// Ids of the nodes that use `id` as an input.
    pub fn consumers(&self, id: NodeId) -> Vec<NodeId> {
        (0..self.nodes.len())
            .filter(|&n| self.nodes[n].inputs.contains(&id))
            .collect()
    }

    /// The node named `name`, if any.
    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// The constant of node `id`, if it is a constant.
    pub fn const_of(&self, id: NodeId) -> Option<&Const> {
        match &self.nodes[id].op {
            Op::Const(c) => Some(c),
            _ => None,
        }
    }

    /// Counts nodes by op mnemonic.
    pub fn count(&self, mnemonic: &str) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.op.mnemonic() == mnemonic)
            .count()
    }

    /// Replaces every use of `old` by `new` (inputs and outputs). Fails at once when the
    /// facts differ.
    pub fn replace_uses(&mut self, old: NodeId, new: NodeId) -> crate::Result<()> {
        if self.nodes[old].fact != self.nodes[new].fact {
            return Err(crate::Error::Argument {
                what: format!(
                    "IR replace `{}` by `{}`",
                    self.nodes[old].name, self.nodes[new].name
                ),
                problem: format!(
                    "facts differ: {:?} vs {:?}",
                    self.nodes[old].fact, self.nodes[new].fact
                ),
            });
        }
        for n in &mut self.nodes {
            for i in &mut n.inputs {
                if *i == old {
                    *i = new;
                }
            }
        }
        for o in &mut self.outputs {
            if *o == old {
                *o = new;
            }
        }
        Ok(())
    }

    /// Re-sorts the nodes topologically (depth first from the outputs, inputs in order)
    /// and drops the nodes no output depends on. Graph inputs are always kept, first.
    pub fn compact(&mut self) {
        let n = self.nodes.len();
        let mut order = Vec::with_capacity(n);
        let mut state = vec![0u8; n]; // 0 new, 1 on stack, 2 done
        for (i, node) in self.nodes.iter().enumerate() {
            if matches!(node.op, Op::Input) {
                state[i] = 2;
                order.push(i);
            }
        }
        for &root in &self.outputs {
            let mut stack = vec![(root, 0usize)];
            while let Some((id, next)) = stack.pop() {
                if state[id] == 2 {
                    continue;
                }
                state[id] = 1;
                if let Some(&child) = self.nodes[id].inputs.get(next) {
                    stack.push((id, next + 1));
                    if state[child] == 0 {
                        stack.push((child, 0));
                    }
                } else {
                    state[id] = 2;
                    order.push(id);
                }
            }
        }
        let mut remap = vec![usize::MAX; n];
        for (new, &old) in order.iter().enumerate() {
            remap[old] = new;
        }
        let mut nodes: Vec<Node> = order.iter().map(|&old| self.nodes[old].clone()).collect();
        for node in &mut nodes {
            node.inputs.iter_mut().for_each(|i| *i = remap[*i]);
        }
        self.outputs.iter_mut().for_each(|o| *o = remap[*o]);
        self.nodes = nodes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn f32_row_blocks_are_value_in_f32_bit_for_bit() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // 2,500 rows: two whole blocks of 1,024 and a short one; bf16 storage, a row scale
        // with negative entries (the f64 product rounded once).
        let (rows, cols) = (2500, 3);
        let v: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let w = Tensor::from_vec(v, (rows, cols), &dev)?.to_dtype(DType::BF16)?;
        let scale: Vec<f64> = (0..rows).map(|r| 0.5 - (r % 7) as f64 * 0.3).collect();
        let scaled = Const::new(w.clone()).scale_rows(&Tensor::from_vec(scale, rows, &dev)?)?;
        let vector = Const::new(Tensor::from_vec(vec![1.5f32, -2.0, 3.25], 3, &dev)?);
        let scalar = Const::new(Tensor::new(0.125f32, &dev)?);
        for (c, blocks) in [(Const::new(w), 3), (scaled, 3), (vector, 1), (scalar, 1)] {
            let want = c.value_in(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let (mut got, mut seen) = (vec![], 0);
            c.f32_row_blocks("c", |b| {
                got.extend_from_slice(b);
                seen += 1;
                Ok(())
            })?;
            assert_eq!(seen, blocks);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want));
        }
        Ok(())
    }
}
