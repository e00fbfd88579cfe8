//! Drop Norm(h) where h is already the output of a Norm (spec 7.9).
//!
//! Pattern => `norm_C(x)` where x is `norm_C(..)` or `lerp_norm(..)`.
//! Identity: `Norm(Norm(x)) == Norm(x)`.
//! Preconditions: same group (the whole row). Layer 0's input is a raw embedding row,
//! not a Norm output, so its Norm stays.
//! Numeric caveat: Norm of a unit vector moves it by rounding only (~1e-16 in f64).
//!
//! ```text
//! %30 h.0.attn.residual.norm = norm(%29)
//! %31 h.0.mlp.residual.in.norm = norm(%30)   =>   uses of %31 become uses of %30
//! ```

use super::{rule_if, rule_if_let, Outcome, Patch};
use crate::error::Result;
use crate::graph::{Graph, NodeId, Op};

pub fn rule(g: &Graph, id: NodeId) -> Result<Outcome> {
    rule_if_let!(Op::Norm { group } = g.nodes[id].op);
    let x = g.nodes[id].inputs[0];
    let already_unit = match g.nodes[x].op {
        Op::Norm { group: inner } => inner == group,
        Op::LerpNorm => true,
        _ => false,
    };
    rule_if!(already_unit && g.nodes[x].fact.last() == Some(group));
    let mut p = Patch::new(g);
    p.replace(id, x);
    Ok(Outcome::Rewrite(p))
}
