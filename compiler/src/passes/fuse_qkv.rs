//! Wq, Wk, Wv as one QKV matmul (spec 7.10).
//!
//! Pattern => three `matmul_t(x, W*)` on the same x, feeding one attention's q, k and v.
//! Identity: `x [Wq; Wk; Wv]^T == [x Wq^T | x Wk^T | x Wv^T]`; each old product becomes a
//! column slice of the fused one.
//! Preconditions: the three weights are constants of one dtype (concatenation is exact)
//! and share the input x.
//! Numeric caveat: exact.
//! Skips: the Hugging Face family's q, k and v already come from one matmul (c_attn).
//!
//! ```text
//! %q = matmul_t(%h, %wq); %k = matmul_t(%h, %wk); %v = matmul_t(%h, %wv)
//!   =>  %qkv = matmul_t(%h, [%wq; %wk; %wv]); %q = slice(%qkv, 0, C); ...
//! ```

use candle_core::Tensor;

use super::{rule_if, rule_if_let, Outcome, Patch};
use crate::error::{CandleContext, Result};
use crate::graph::{Graph, NodeId, Op};

/// Walks from an attention input back through its per-token ops to a matmul_t.
fn source_matmul(g: &Graph, mut id: NodeId) -> Option<NodeId> {
    loop {
        match g.nodes[id].op {
            Op::MatMulT => return Some(id),
            Op::PosNorm { .. }
            | Op::PosDiag { .. }
            | Op::PosStep { .. }
            | Op::Norm { .. }
            | Op::Mul => id = g.nodes[id].inputs[0],
            _ => return None,
        }
    }
}

/// The matmul whose column slice feeds attention input `id` (through its per-token ops),
/// when its weight is the Hugging Face family's `c_attn`, one product already.
fn c_attn_slice(g: &Graph, mut id: NodeId) -> Option<NodeId> {
    loop {
        match g.nodes[id].op {
            Op::Slice { .. } => {
                let mm = g.nodes[id].inputs[0];
                let fused = matches!(g.nodes[mm].op, Op::MatMulT)
                    && g.nodes[g.nodes[mm].inputs[1]]
                        .name
                        .contains("c_attn.weight");
                return fused.then_some(mm);
            }
            Op::Rotary { .. } | Op::Norm { .. } | Op::Mul => id = g.nodes[id].inputs[0],
            _ => return None,
        }
    }
}

pub fn rule(g: &Graph, id: NodeId) -> Result<Outcome> {
    let node = &g.nodes[id];
    rule_if!(matches!(node.op, Op::Attention { .. }));
    let sources: Option<Vec<NodeId>> = node.inputs.iter().map(|&i| c_attn_slice(g, i)).collect();
    if let Some(s) = sources.filter(|s| s.iter().all(|&m| m == s[0])) {
        return Ok(Outcome::Skip(format!(
            "`{}`: q, k and v are already column slices of one matmul (`{}`, c_attn)",
            node.name, g.nodes[s[0]].name
        )));
    }
    let mms: Option<Vec<NodeId>> = node.inputs.iter().map(|&i| source_matmul(g, i)).collect();
    rule_if_let!(Some(mms) = mms);
    let x = g.nodes[mms[0]].inputs[0];
    rule_if!(mms.iter().all(|&m| g.nodes[m].inputs[0] == x));
    if mms.iter().any(|&m| g.nodes[m].inputs.len() > 2) {
        return Ok(Outcome::Skip(format!(
            "`{}`: the q, k, v products carry biases",
            node.name
        )));
    }
    let ws: Option<Vec<_>> = mms
        .iter()
        .map(|&m| g.const_of(g.nodes[m].inputs[1]))
        .collect();
    rule_if_let!(Some(ws) = ws);
    let ws: Vec<Tensor> = ws
        .iter()
        .map(|c| c.value())
        .collect::<candle_core::Result<_>>()
        .ctx("fuse_qkv")?;
    if ws.iter().any(|w| w.dtype() != ws[0].dtype()) {
        return Ok(Outcome::Skip(format!(
            "`{}`: Wq, Wk, Wv differ in dtype",
            node.name
        )));
    }
    let fused = Tensor::cat(&ws, 0).ctx("fuse_qkv")?;
    let base = node.name.trim_end_matches(".attention").to_string();
    let mut p = Patch::new(g);
    let w = p.constant(format!("{base}.qkv.weight"), fused);
    let qkv = p.node(format!("{base}.qkv"), Op::MatMulT, vec![x, w]);
    let mut start = 0;
    for (&m, wt) in mms.iter().zip(&ws) {
        let len = wt.dims()[0];
        let s = p.node(g.nodes[m].name.clone(), Op::Slice { start, len }, vec![qkv]);
        p.replace(m, s);
        start += len;
    }
    Ok(Outcome::Rewrite(p))
}
