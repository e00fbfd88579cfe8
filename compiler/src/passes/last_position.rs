//! The decode program computes logits for the last position only (spec 7.10).
//!
//! Pattern => the output `matmul_t(h, W)` with h of T rows.
//! Identity: row t of `h W^T` depends on row t of h only, so the last row of the logits is
//! `last_row(h) W^T`.
//! Preconditions: the matmul is a graph output.
//! Numeric caveat: exact.
//!
//! ```text
//! %out = matmul_t(%h, %w)   =>   %last = last_row(%h); %out = matmul_t(%last, %w)
//! ```

use super::{rule_if, Outcome, Patch};
use crate::error::Result;
use crate::graph::{Dim, Graph, NodeId, Op};

pub fn rule(g: &Graph, id: NodeId) -> Result<Outcome> {
    let node = &g.nodes[id];
    rule_if!(matches!(node.op, Op::MatMulT) && g.outputs.contains(&id));
    let (h, w) = (node.inputs[0], node.inputs[1]);
    rule_if!(g.nodes[h].fact.shape.first() == Some(&Dim::T));
    let mut p = Patch::new(g);
    let last = p.node(
        format!("{}.last_row", g.nodes[h].name),
        Op::LastRow,
        vec![h],
    );
    let mut inputs = vec![last, w];
    inputs.extend(node.inputs.get(2)); // a bias, if any
    let out = p.node(node.name.clone(), Op::MatMulT, inputs);
    // The output's shape changes from [T, V] to [1, V]: rewire the output directly.
    p.replace_output(id, out);
    Ok(Outcome::Rewrite(p))
}
