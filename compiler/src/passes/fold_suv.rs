//! suv (with its sqrt(n_embd)) into the c_fc rows (spec 7.4); in the Hugging Face family,
//! su and sv * sqrt(n_embd) into the rows of their halves.
//!
//! Pattern => `mul(matmul_t(h, c_fc.weight), suv_eff)` with suv_eff a constant `[8C]`
//! (NVIDIA), or `matmul_t(h, c_fc.weight, b)` whose every user is a column slice scaled
//! by a constant vector, `mul(slice(uv, 0, I), su)` and `mul(slice(uv, I, I), sv_eff)`
//! (Hugging Face: sqrt(E) on the v half only).
//! Identity: `(h W^T + b) * s == h (diag(s) W)^T + b * s`: row r of the weight and entry
//! r of the bias scaled by `s[r]`; in the halves form s is the slices' scales end to end
//! and each scaled slice becomes a plain slice of the folded product.
//! Preconditions: the scales are constant (fold_scaling ran); the matmul has no other
//! user; the slices cover its columns exactly once.
//! Numeric caveat: the folded weight is computed in f64 from the stored rows (the bias in
//! f64 too); emitters round once.
//!
//! ```text
//! %20 h.0.mlp.fc = matmul_t(%18, %19)          %20 h.0.mlp.fc = matmul_t(%18, %19')
//! %22 h.0.mlp.fc.scale = mul(%20, %21)   =>    (%19' = c_fc.weight.folded)
//!
//! %u = mul(slice(%fc, 0, I), %su)              %u = slice(%fc', 0, I)
//! %v = mul(slice(%fc, I, I), %sv_eff)    =>    %v = slice(%fc', I, I)
//! ```

use candle_core::{DType, Tensor};

use super::{fold_row_scale, rule_if, rule_if_let, scaled_bias, sole_consumer, Outcome, Patch};
use crate::error::{CandleContext, Result};
use crate::graph::{Graph, NodeId, Op};

pub fn rule(g: &Graph, id: NodeId) -> Result<Outcome> {
    if matches!(g.nodes[id].op, Op::MatMulT) {
        return halves(g, id);
    }
    fold_row_scale(g, id, "c_fc.weight")
}

/// The Hugging Face form: every user of the c_fc product is `mul(slice, const)`.
fn halves(g: &Graph, id: NodeId) -> Result<Outcome> {
    let mm = &g.nodes[id];
    let w = mm.inputs[1];
    rule_if!(g.nodes[w].name.ends_with("c_fc.weight") && !g.outputs.contains(&id));
    rule_if_let!(Some(wt) = g.const_of(w));
    let users = g.consumers(id);
    rule_if!(
        !users.is_empty()
            && users
                .iter()
                .all(|&u| matches!(g.nodes[u].op, Op::Slice { .. }))
    );
    // (start, len, slice, mul, scale) per user.
    let mut parts = vec![];
    for &slice in &users {
        let Op::Slice { start, len } = g.nodes[slice].op else {
            return Ok(Outcome::NoMatch);
        };
        let mul = sole_consumer(g, slice)
            .filter(|&m| matches!(g.nodes[m].op, Op::Mul) && g.nodes[m].inputs[0] == slice);
        rule_if_let!(Some(mul) = mul);
        let s = g.nodes[mul].inputs[1];
        let Some(sc) = g.const_of(s) else {
            return Ok(Outcome::Skip(format!(
                "`{}`: the scale is not constant (run fold_scaling first)",
                g.nodes[mul].name
            )));
        };
        rule_if!(sc.dims() == [len]);
        parts.push((start, len, slice, mul, s));
    }
    parts.sort_by_key(|p| p.0);
    let width = mm.fact.last().unwrap_or(0);
    let mut next = 0;
    for &(start, len, ..) in &parts {
        if start != next {
            return Ok(Outcome::Skip(format!(
                "`{}`: its scaled slices do not cover its columns exactly once",
                mm.name
            )));
        }
        next = start + len;
    }
    if next != width {
        return Ok(Outcome::Skip(format!(
            "`{}`: its scaled slices do not cover its columns exactly once",
            mm.name
        )));
    }
    let scales = parts
        .iter()
        .map(|p| g.const_of(p.4).map(|c| c.value()))
        .collect::<Option<candle_core::Result<Vec<Tensor>>>>();
    rule_if_let!(Some(scales) = scales);
    let scale = scales
        .and_then(|v| {
            let v = v
                .iter()
                .map(|t| t.to_dtype(DType::F64))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&v, 0)
        })
        .ctx("fold_suv")?;
    let folded = wt.scale_rows(&scale).ctx("fold_suv")?;
    let mut p = Patch::new(g);
    let c = p.constant_of(format!("{}.folded", g.nodes[w].name), folded);
    let mut inputs = vec![mm.inputs[0], c];
    if let Some(&bias) = mm.inputs.get(2) {
        let Some(b) = scaled_bias(g, bias, &scale)? else {
            return Ok(Outcome::Skip(format!(
                "`{}`: its bias is not constant",
                mm.name
            )));
        };
        inputs.push(p.constant(format!("{}.folded", g.nodes[bias].name), b));
    }
    let out = p.node(mm.name.clone(), Op::MatMulT, inputs);
    for (start, len, slice, mul, _) in parts {
        let s = p.node(
            g.nodes[slice].name.clone(),
            Op::Slice { start, len },
            vec![out],
        );
        p.replace(mul, s);
    }
    Ok(Outcome::Rewrite(p))
}
