//! What the literal reference and the IR interpreter share: the arithmetic precision,
//! the position table E, and the value-trace callback type. Both sit above this module,
//! so neither imports the other.

use candle_core::{DType, Tensor};

/// Arithmetic precision of the reference and IR engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit floats throughout.
    F32,
    /// 64-bit floats throughout: the tightest reference.
    F64,
}

impl Precision {
    pub(crate) fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F64 => DType::F64,
        }
    }
}

/// The Hugging Face family's rotary angles for each of `positions`, in f64: a row of
/// `head_dim` values per position, `cos(angle_i)` for i < D/2 then `sin(angle_i)`, with
/// `angle_i = p * 10000^(-2i/D)` (ngpt-hf-spec.md step 2).
pub fn rotary_table(positions: impl IntoIterator<Item = usize>, head_dim: usize) -> Vec<f64> {
    let half = head_dim / 2;
    let theta: Vec<f64> = (0..half)
        .map(|i| 10000f64.powf(-((2 * i) as f64) / head_dim as f64))
        .collect();
    let mut out = vec![];
    for p in positions {
        let angles: Vec<f64> = theta.iter().map(|w| p as f64 * w).collect();
        out.extend(angles.iter().map(|a| a.cos()));
        out.extend(angles.iter().map(|a| a.sin()));
    }
    out
}

/// The position table E of spec section 3 step 2, `[t_len, head_dim]`, computed in f64:
/// `E[t, c] = sin(t * w_{c/2})` for even c and `cos(t * w_{c/2})` for odd c, with
/// `w_k = 10000^(-2k/D)`.
pub fn position_table(t_len: usize, head_dim: usize) -> Vec<f64> {
    let mut out = vec![0.0; t_len * head_dim];
    let step = -(10000f64.ln()) / head_dim as f64;
    for t in 0..t_len {
        for c in 0..head_dim {
            let w = ((2 * (c / 2)) as f64 * step).exp();
            let angle = t as f64 * w;
            out[t * head_dim + c] = if c % 2 == 0 { angle.sin() } else { angle.cos() };
        }
    }
    out
}

/// A value tracer: called with (node or point name, value) as each is computed; shared
/// by the interpreter and the literal reference.
pub type ValueTrace<'a> = &'a mut dyn FnMut(&str, &Tensor);
