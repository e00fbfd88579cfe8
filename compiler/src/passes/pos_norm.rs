//! Position step, per-head Norm and the q scale as one `pos_norm` op.
//!
//! Pattern => `mul(norm_D(pos_diag(x)), s)` (q, s constant) or `norm_D(pos_diag(x))` (k).
//! Identity: `pos_norm(x, pos, s) := Norm_head(M_pos * x) * s`; for k, s = 1.
//! Preconditions: the position step is the diagonal table (pos_table ran): the code's
//! pair swap is not what pos_norm computes. The Norm is per head.
//! Numeric caveat: multiplying by a constant 1 is exact.
//! Skips: the Hugging Face family's q and k go through `rotary`, not a diagonal table.
//!
//! ```text
//! %q = mul(norm(pos_diag(%x, %pos)), %s)   =>   %q = pos_norm(%x, %pos, %s)
//! ```

use candle_core::{DType, Device, Tensor};

use super::{rule_if, rule_if_let, Outcome, Patch};
use crate::error::{CandleContext, Result};
use crate::graph::{Graph, NodeId, Op};

pub fn rule(g: &Graph, id: NodeId) -> Result<Outcome> {
    let node = &g.nodes[id];
    // q: mul(norm(pos_diag)), s const; k: a norm(pos_diag) not under such a mul.
    let (norm, scale) = match node.op {
        Op::Mul
            if matches!(g.nodes[node.inputs[0]].op, Op::Norm { .. })
                && g.const_of(node.inputs[1]).is_some() =>
        {
            (node.inputs[0], Some(node.inputs[1]))
        }
        Op::Norm { .. } => (id, None),
        _ => return Ok(Outcome::NoMatch),
    };
    rule_if_let!(Op::Norm { group } = g.nodes[norm].op);
    let step = g.nodes[norm].inputs[0];
    let head_dim = match g.nodes[step].op {
        Op::PosDiag { head_dim } => head_dim,
        Op::PosStep { .. } => {
            return Ok(Outcome::Skip(format!(
                "`{}`: the position step is still a pair swap; run pos_table first",
                g.nodes[norm].name
            )))
        }
        Op::Rotary { .. } => {
            return Ok(Outcome::Skip(format!(
                "`{}`: the position op is the rotary embedding, a rotation that pos_norm's diagonal table cannot express",
                g.nodes[norm].name
            )))
        }
        _ => return Ok(Outcome::NoMatch),
    };
    rule_if!(group == head_dim);
    if scale.is_none() {
        // Leave a Norm that a scaling mul will fuse with.
        let users = g.consumers(norm);
        rule_if!(!users.iter().any(
            |&u| matches!(g.nodes[u].op, Op::Mul) && g.const_of(g.nodes[u].inputs[1]).is_some()
        ));
    }
    let (x, positions) = (g.nodes[step].inputs[0], g.nodes[step].inputs[1]);
    let width = g.nodes[x].fact.last().unwrap_or(0);
    let mut p = Patch::new(g);
    let s = match scale {
        Some(s) => s,
        None => {
            let ones = Tensor::ones(width, DType::F64, &Device::Cpu).ctx("pos_norm")?;
            p.constant(format!("{}.unit_scale", g.nodes[norm].name), ones)
        }
    };
    let base = g.nodes[norm].name.trim_end_matches(".norm").to_string();
    let fused = p.node(
        format!("{base}.pos_norm"),
        Op::PosNorm { head_dim },
        vec![x, positions, s],
    );
    p.replace(id, fused);
    Ok(Outcome::Rewrite(p))
}
