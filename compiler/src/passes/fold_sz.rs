//! sz into the lm_head rows (spec 7.3).
//!
//! Pattern => `mul(matmul_t(h, lm_head.weight), sz_eff)` with sz_eff a constant `[V]`
//! (`lm_head_2.weight` in the Hugging Face family, whose rows are not unit-norm: the fold
//! assumes nothing about them).
//! Identity: `(h W^T) * s == h (diag(s) W)^T`: row v of the weight scaled by `sz_eff[v]`.
//! Preconditions: sz_eff is constant (fold_scaling ran); the matmul has no other user.
//! Numeric caveat: the folded weight is computed in f64; the sign of sz is kept.
//!
//! ```text
//! %9 lm_head = matmul_t(%7, %8)            %9 lm_head = matmul_t(%7, %8')
//! %11 logits = mul(%9, %10)          =>    (%8' = lm_head.weight.folded)
//! ```

use super::{fold_row_scale, Outcome};
use crate::error::Result;
use crate::graph::{Graph, NodeId};

pub fn rule(g: &Graph, id: NodeId) -> Result<Outcome> {
    match fold_row_scale(g, id, "lm_head.weight")? {
        Outcome::NoMatch => fold_row_scale(g, id, "lm_head_2.weight"),
        other => Ok(other),
    }
}
