//! Weight-only block quantization of the matmul weights (runs when a compile asks for it;
//! not in `CANONICAL`).
//!
//! Pattern => `matmul_t(x, W)` with W a constant matrix `[N, K]`, not yet quantized, used
//! by this matmul only.
//! Identity: none; this pass changes the model on purpose. `W` becomes its quantized form
//! (`Const::quantized`: integers along K in blocks, f16 block scales holding any folded row
//! scale), whose value is `quant::dequantize` of those integers and scales, so every
//! emitter and the interpreter compute with the same dequantized weights.
//! Preconditions: the canonical passes ran (a folded row scale is in the constant; the
//! `quant::Options` say the bits). lm_head follows its own setting (kept in float when
//! asked). With `renorm`, rows are renormalized only where training keeps them unit-norm
//! along K (NVIDIA's q, k, v, c_fc and lm_head rows; the Hugging Face family's c_attn and
//! c_fc columns): a c_proj matrix is normalized along N, each of its unit vectors spread
//! over every row, so no common factor on one row's block scales restores them.
//! Numeric caveat: the quantization error itself (about 1e-2 relative for int4 rows);
//! scales are rounded to f16 once.
//!
//! ```text
//! %19 c_fc.weight.folded = const F64[512, 64]     %19' c_fc.weight.folded.int4 =
//! %20 fc = matmul_t(%18, %19)               =>         const F32[512, 64] int4/32
//!                                                 %20 fc = matmul_t(%18, %19')
//! ```

use super::{rule_if, rule_if_let, sole_consumer, Outcome, Patch};
use crate::error::{CandleContext, Result};
use crate::graph::{Graph, NodeId, Op};
use crate::quant::{Format, Options};

/// Whether training keeps the rows (of the `[N, K]` IR weight) named `name` unit-norm
/// along K (inspect.rs's unit-norm axes): NVIDIA's query/key/value (or their fused qkv),
/// c_fc and lm_head rows; the Hugging Face family's c_attn and c_fc columns (stored [K, N]
/// and transposed by the importer). Not the c_proj matrices, nor the Hugging Face
/// family's lm_head_2.
pub fn unit_rows(name: &str) -> bool {
    [
        ".query.weight",
        ".key.weight",
        ".value.weight",
        ".qkv.weight",
        "c_attn.weight",
        "c_fc.weight",
    ]
    .iter()
    .any(|p| name.contains(p))
        || name.starts_with("lm_head.weight")
}

/// The rule, for the options `opts`.
pub fn rule(g: &Graph, id: NodeId, opts: &Options) -> Result<Outcome> {
    let node = &g.nodes[id];
    rule_if!(matches!(node.op, Op::MatMulT));
    let w = node.inputs[1];
    rule_if_let!(Some(c) = g.const_of(w));
    rule_if!(c.quant().is_none() && c.rank() == 2);
    let name = &g.nodes[w].name;
    let bits = if name.starts_with("lm_head") {
        match opts.lm_head {
            Some(b) => b,
            None => {
                return Ok(Outcome::Skip(format!(
                    "`{name}`: lm_head kept in float (as asked)"
                )))
            }
        }
    } else {
        opts.bits
    };
    if sole_consumer(g, w).is_none() {
        return Ok(Outcome::Skip(format!(
            "`{name}` has other users; quantizing it would change them"
        )));
    }
    let k = c.dims()[1];
    let fmt = Format {
        bits,
        block: opts.block,
        renorm: opts.renorm && unit_rows(name),
        // `opts.block` is ACT_BLOCK where act_int8 is asked (`Options::check`). lm_head too:
        // onnxruntime's fast MatMulNBits path is its int8-activation one (accuracy_level 4;
        // an lm_head left at 0 made its decode 14x slower), and the plan computes what it
        // computes.
        act_int8: opts.act_int8 && k % crate::quant::ACT_BLOCK == 0,
    };
    let q = c.quantized(fmt).ctx("quantize")?;
    let mut p = Patch::new(g);
    let qc = p.constant_of(format!("{name}.{}", bits.as_str()), q);
    let mut inputs = node.inputs.clone();
    inputs[1] = qc;
    let out = p.node(node.name.clone(), Op::MatMulT, inputs);
    p.replace(id, out);
    if opts.act_int8 && !fmt.act_int8 {
        p.note(format!(
            "`{name}` keeps f32 activations: int8 activations need blocks of {} along K, and K = {k}",
            crate::quant::ACT_BLOCK
        ));
    }
    if opts.renorm && !fmt.renorm {
        p.note(if name.contains("c_proj") {
            "the c_proj matrices are not renormalized: training keeps their unit vectors \
             along N, each spread over every row, so no common factor on one row's block \
             scales (along K) restores them"
                .to_string()
        } else {
            format!("`{name}` is not renormalized: training does not keep its rows unit-norm")
        });
    }
    Ok(Outcome::Rewrite(p))
}

#[cfg(test)]
mod tests {
    use super::unit_rows;

    #[test]
    fn unit_rows_follow_what_training_normalizes_along_k() {
        for yes in [
            "h.0.attn.qkv.weight",
            "transformer.h.0.query.weight",
            "transformer.h.1.c_fc.weight.folded",
            "transformer.h.0.attn.c_attn.weight",
            "transformer.h.0.mlp.c_fc.weight.folded",
            "lm_head.weight.folded",
        ] {
            assert!(unit_rows(yes), "{yes}");
        }
        for no in [
            "transformer.h.0.att_c_proj.weight",
            "transformer.h.0.mlp_c_proj.weight",
            "transformer.h.0.attn.c_proj.weight",
            "transformer.h.0.mlp.c_proj.weight",
            "lm_head_2.weight.folded",
        ] {
            assert!(!unit_rows(no), "{no}");
        }
    }
}
