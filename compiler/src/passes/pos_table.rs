//! The position step as a per-position diagonal table (spec 7.7).
//!
//! Pattern => `attention(mul(norm_D(pos_step(xq)), s), mul(norm_D(pos_step(xk)), s), v)`
//! with the same constant `s` on q and k.
//! Identity: the code's step is `m_t * (R x)` with R a signed pair swap. R acts on q and k
//! alike and everything after it is elementwise or a dot product, so the scores equal
//! those of `M_t * x` with `M[t,2j] = E[t,j]`, `M[t,2j+1] = E[t,P+j]` and `s` replaced by
//! the pair-swapped `s~[d] = s[d xor 1]` (the signs of R cancel in q.k).
//! Preconditions: both q and k go through the step, each Norm is per head, and they share
//! one constant scale (so both sides change together).
//! Numeric caveat: exact (a permutation of products); the table itself is computed in
//! f64 and rounded once by whoever runs the graph.
//! Skips: the Hugging Face family's rotary embedding (a true rotation, not the step) has no
//! position table; each attention says so in the pass record.
//!
//! ```text
//! pos_step(x) -> norm -> mul(s)   =>   pos_diag(x) -> norm -> mul(s~)
//! ```

use candle_core::{DType, Tensor};

use super::{rule_if, rule_if_let, Outcome, Patch};
use crate::error::{CandleContext, Result};
use crate::graph::{Graph, NodeId, Op};

/// `(x, positions, norm node, head_dim)` when `id` is `mul(norm_D(pos_step(x)), s)`.
fn chain(g: &Graph, id: NodeId) -> Option<(NodeId, NodeId, NodeId, usize, NodeId)> {
    let mul = &g.nodes[id];
    if !matches!(mul.op, Op::Mul) {
        return None;
    }
    let norm = mul.inputs[0];
    let Op::Norm { group } = g.nodes[norm].op else {
        return None;
    };
    let step = g.nodes[norm].inputs[0];
    let Op::PosStep { head_dim } = g.nodes[step].op else {
        return None;
    };
    (group == head_dim).then(|| {
        (
            g.nodes[step].inputs[0],
            g.nodes[step].inputs[1],
            norm,
            head_dim,
            mul.inputs[1],
        )
    })
}

/// The rotary node under `id` when `id` is `mul(norm(rotary(..)), s)` or `norm(rotary(..))`
/// (the Hugging Face family, which has no position table).
fn rotated(g: &Graph, mut id: NodeId) -> Option<NodeId> {
    if matches!(g.nodes[id].op, Op::Mul) {
        id = g.nodes[id].inputs[0];
    }
    if !matches!(g.nodes[id].op, Op::Norm { .. }) {
        return None;
    }
    let r = g.nodes[id].inputs[0];
    matches!(g.nodes[r].op, Op::Rotary { .. }).then_some(r)
}

fn pair_swap(s: &Tensor) -> candle_core::Result<Tensor> {
    let v = s.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let swapped: Vec<f64> = (0..v.len()).map(|d| v[d ^ 1]).collect();
    Tensor::new(swapped, s.device())
}

pub fn rule(g: &Graph, id: NodeId) -> Result<Outcome> {
    let node = &g.nodes[id];
    rule_if!(matches!(node.op, Op::Attention { .. }));
    if let Some(rot) = rotated(g, node.inputs[0]).or_else(|| rotated(g, node.inputs[1])) {
        return Ok(Outcome::Skip(format!(
            "`{}`: q and k are turned by the rotary embedding (`{}`), not NVIDIA's position step: no position table to fold",
            node.name, g.nodes[rot].name
        )));
    }
    let (q, k) = (chain(g, node.inputs[0]), chain(g, node.inputs[1]));
    rule_if!(q.is_some() || k.is_some());
    let (Some(q), Some(k)) = (q, k) else {
        return Ok(Outcome::Skip(format!(
            "`{}`: only one of q and k goes through the position step",
            node.name
        )));
    };
    if q.4 != k.4 {
        return Ok(Outcome::Skip(format!(
            "`{}`: q and k are scaled by different values",
            node.name
        )));
    }
    rule_if_let!(Some(s) = g.const_of(q.4));
    if s.rank() != 1 {
        return Ok(Outcome::Skip(format!(
            "`{}`: the q/k scale is not a per-channel vector",
            node.name
        )));
    }
    let swapped = s.value().and_then(|s| pair_swap(&s)).ctx("pos_table")?;
    let mut p = Patch::new(g);
    let s_new = p.constant(format!("{}.swapped", g.nodes[q.4].name), swapped);
    let mut new_inputs = vec![];
    for (x, positions, norm, head_dim, _) in [q, k] {
        let base = g.nodes[norm].name.trim_end_matches(".norm").to_string();
        let diag = p.node(
            format!("{base}.pos"),
            Op::PosDiag { head_dim },
            vec![x, positions],
        );
        let n = p.node(
            format!("{base}.norm"),
            Op::Norm { group: head_dim },
            vec![diag],
        );
        new_inputs.push(p.node(format!("{base}.scale"), Op::Mul, vec![n, s_new]));
    }
    p.replace(node.inputs[0], new_inputs[0]);
    p.replace(node.inputs[1], new_inputs[1]);
    Ok(Outcome::Rewrite(p))
}
