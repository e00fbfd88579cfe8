//! SiLU and the multiply as one `swiglu` op (spec 3 step 7, 7.10).
//!
//! Pattern => `mul(slice(uv, 0, F), silu(slice(uv, F, F)))` with uv of width 2F.
//! Identity: `swiglu(uv) := u * SiLU(v)` with `[u | v] = uv`; SiLU on the second half.
//! Preconditions: the two slices are the first and second halves of the same value.
//! Numeric caveat: none; the same operations in the same order.
//!
//! ```text
//! %u = slice(%uv, 0, F); %v = slice(%uv, F, F); %m = mul(%u, silu(%v))   =>   %m = swiglu(%uv)
//! ```

use super::{rule_if, rule_if_let, Outcome, Patch};
use crate::error::Result;
use crate::graph::{Graph, NodeId, Op};

pub fn rule(g: &Graph, id: NodeId) -> Result<Outcome> {
    let node = &g.nodes[id];
    rule_if!(matches!(node.op, Op::Mul));
    let (u, act) = (node.inputs[0], node.inputs[1]);
    rule_if!(matches!(g.nodes[act].op, Op::Silu));
    let v = g.nodes[act].inputs[0];
    rule_if_let!(Op::Slice { start: us, len: ul } = g.nodes[u].op);
    rule_if_let!(Op::Slice { start: vs, len: vl } = g.nodes[v].op);
    let uv = g.nodes[u].inputs[0];
    rule_if!(g.nodes[v].inputs[0] == uv);
    if !(us == 0 && vs == ul && vl == ul && g.nodes[uv].fact.last() == Some(2 * ul)) {
        return Ok(Outcome::Skip(format!(
            "`{}`: the slices are not the two halves of one value",
            node.name
        )));
    }
    let mut p = Patch::new(g);
    let fused = p.node(node.name.clone(), Op::SwiGlu, vec![uv]);
    p.replace(id, fused);
    Ok(Outcome::Rewrite(p))
}
