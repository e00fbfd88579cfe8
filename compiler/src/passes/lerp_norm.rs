//! The residual update as one `lerp_norm` op (spec 7.2, design "canonical form").
//!
//! Pattern => `norm_C(lerp(a, norm_C(b), lr))`.
//! Identity: `lerp_norm(a, b, lr) := Norm(a + lr * (Norm(b) - a))`, by definition.
//! Preconditions: both Norms cover the whole row.
//! Numeric caveat: none; the fused op computes the same sequence of operations.
//!
//! ```text
//! %b = norm(%a_out); %m = lerp(%h, %b, %lr); %n = norm(%m)   =>   %n = lerp_norm(%h, %a_out, %lr)
//! ```

use super::{rule_if, rule_if_let, Outcome, Patch};
use crate::error::Result;
use crate::graph::{Graph, NodeId, Op};

pub fn rule(g: &Graph, id: NodeId) -> Result<Outcome> {
    let node = &g.nodes[id];
    rule_if_let!(Op::Norm { group } = node.op);
    rule_if!(node.fact.last() == Some(group));
    let lerp = node.inputs[0];
    rule_if!(matches!(g.nodes[lerp].op, Op::Lerp));
    let (a, b, lr) = (
        g.nodes[lerp].inputs[0],
        g.nodes[lerp].inputs[1],
        g.nodes[lerp].inputs[2],
    );
    rule_if_let!(Op::Norm { group: inner } = g.nodes[b].op);
    rule_if!(inner == group);
    let branch = g.nodes[b].inputs[0];
    let mut p = Patch::new(g);
    let fused = p.node(node.name.clone(), Op::LerpNorm, vec![a, branch, lr]);
    p.replace(id, fused);
    Ok(Outcome::Rewrite(p))
}
