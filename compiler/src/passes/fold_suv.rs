//! suv (with its sqrt(n_embd)) into the c_fc rows (spec 7.4).
//!
//! Pattern => `mul(matmul_t(h, c_fc.weight), suv_eff)` with suv_eff a constant `[8C]`.
//! Identity: `(h W^T) * s == h (diag(s) W)^T`; the scale covers both halves, u and v.
//! Preconditions: suv_eff is constant (fold_scaling ran); the matmul has no other user;
//! bias = false (a bias would need the same scale).
//! Numeric caveat: the folded weight is computed in f64 from the stored BF16 rows.
//!
//! ```text
//! %20 h.0.mlp.fc = matmul_t(%18, %19)          %20 h.0.mlp.fc = matmul_t(%18, %19')
//! %22 h.0.mlp.fc.scale = mul(%20, %21)   =>    (%19' = c_fc.weight.folded)
//! ```

use super::{fold_row_scale, Outcome};
use crate::error::Result;
use crate::graph::{Graph, NodeId};

pub fn rule(g: &Graph, id: NodeId) -> Result<Outcome> {
    fold_row_scale(g, id, "c_fc.weight")
}
