//! The q/k scales onto q alone, with softmax scale 1 (spec 7.6).
//!
//! Pattern => `attention(mul(nq, s), mul(nk, s), v, scale=c)` with one constant `s`.
//! Identity: `c <s nq, s nk> == <(c s^2) nq, nk>`; s's sign is irrelevant (squared).
//! Preconditions: q and k share the constant `s`; the position step is already a diagonal
//! table (pos_table ran), so `s` is the pair-swapped one.
//! Numeric caveat: `c s^2` is computed in f64; rounding differs from scaling both sides.
//!
//! ```text
//! attention(mul(nq, s), mul(nk, s), v) scale=sqrt(D)  =>  attention(mul(nq, sqrt(D) s^2), nk, v) scale=1
//! ```

use candle_core::DType;

use super::{rule_if, rule_if_let, Outcome, Patch};
use crate::error::{CandleContext, Result};
use crate::graph::{Graph, NodeId, Op};

pub fn rule(g: &Graph, id: NodeId) -> Result<Outcome> {
    let node = &g.nodes[id];
    rule_if_let!(Op::Attention { heads, scale } = node.op);
    let (q, k, v) = (node.inputs[0], node.inputs[1], node.inputs[2]);
    rule_if!(matches!(g.nodes[q].op, Op::Mul) && matches!(g.nodes[k].op, Op::Mul));
    let s = g.nodes[q].inputs[1];
    rule_if!(g.nodes[k].inputs[1] == s);
    rule_if_let!(Some(st) = g.const_of(s));
    let (nq, nk) = (g.nodes[q].inputs[0], g.nodes[k].inputs[0]);
    let before_norm = |n: NodeId| g.nodes[n].inputs.first().map(|&i| &g.nodes[i].op);
    if [nq, nk]
        .iter()
        .any(|&n| matches!(before_norm(n), Some(Op::PosStep { .. })))
    {
        return Ok(Outcome::Skip(format!(
            "`{}`: the position step is still a pair swap; run pos_table first",
            node.name
        )));
    }
    let folded = st
        .value()
        .and_then(|s| s.to_dtype(DType::F64))
        .and_then(|s| s.sqr())
        .and_then(|s| s * scale)
        .ctx("sqk_onto_q")?;
    let mut p = Patch::new(g);
    let c = p.constant(format!("{}.q_scale", node.name), folded);
    let q_new = p.node(g.nodes[q].name.clone(), Op::Mul, vec![nq, c]);
    let att = p.node(
        node.name.clone(),
        Op::Attention { heads, scale: 1.0 },
        vec![q_new, nk, v],
    );
    p.replace(id, att);
    Ok(Outcome::Rewrite(p))
}
