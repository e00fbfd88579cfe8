//! Effective scaling vectors (spec 7.1, 7.2): constant-fold the scaling subgraphs.
//!
//! Pattern => `mul(const a, const b)` and `abs(const a)`.
//! Identity: `stored * (init_value / init_scaling)` and `|alpha_eff|` are constants, so
//! each becomes one constant: `sqk / bs`, `|alpha * 0.05 / bs|`, `suv * sqrt(C)`, `sz / bs`.
//! base_scale is the config's, never 1/sqrt(C). abs() on the alphas is kept (trained
//! alphas can be negative), never clamped.
//! Precondition: every input is a constant.
//! Numeric caveat: computed in f64 and kept in f64; emitters round once.
//!
//! ```text
//! %5 h.0.attn.sqk.eff = mul(%3, %4)      =>   %5 h.0.attn.sqk.eff = const F64[64]
//! ```

use candle_core::DType;

use super::{rule_if, rule_if_let, Outcome, Patch};
use crate::error::{CandleContext, Result};
use crate::graph::{Graph, NodeId, Op};

pub fn rule(g: &Graph, id: NodeId) -> Result<Outcome> {
    let node = &g.nodes[id];
    rule_if!(matches!(node.op, Op::Mul | Op::Abs));
    let consts: Option<Vec<_>> = node.inputs.iter().map(|&i| g.const_of(i)).collect();
    rule_if_let!(Some(consts) = consts);
    let wide = |c: &crate::graph::Const| c.value()?.to_dtype(DType::F64);
    let value = match node.op {
        Op::Abs => wide(consts[0]).and_then(|t| t.abs()),
        _ => wide(consts[0]).and_then(|a| a.broadcast_mul(&wide(consts[1])?)),
    }
    .ctx("fold_scaling")?;
    let mut p = Patch::new(g);
    let c = p.constant(node.name.clone(), value);
    p.replace(id, c);
    Ok(Outcome::Rewrite(p))
}
