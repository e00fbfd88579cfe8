//! How ngpt compares logits: relative Frobenius error plus per-position top-1 agreement.

/// The result of comparing `out` against `reference`, both `[T, vocab]` row-major.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// `||out - ref||_F / ||ref||_F`; NaN when either side holds NaN.
    pub rel_err: f64,
    /// Positions whose argmax agrees.
    pub top1_agree: usize,
    /// Positions compared.
    pub positions: usize,
}

impl Comparison {
    /// Fraction of positions whose argmax agrees.
    pub fn top1_fraction(&self) -> f64 {
        self.top1_agree as f64 / self.positions.max(1) as f64
    }

    /// True when the relative error is at most `tol` (NaN never passes) and at least
    /// `min_top1` of the positions agree on their argmax.
    ///
    /// ```
    /// use ngpt_compiler::compare::compare;
    /// // Two positions over a vocabulary of 2: the second one's argmax flips.
    /// let c = compare(&[1.0, 2.0, 3.1, 2.9], &[1.0, 2.0, 2.9, 3.1], 2);
    /// assert_eq!(c.top1_fraction(), 0.5);
    /// assert!(c.passes(0.1, 0.5));
    /// assert!(!c.passes(0.1, 1.0));
    /// assert!(!c.passes(1e-6, 0.5));
    /// assert!(!compare(&[f64::NAN, 0.0], &[1.0, 0.0], 2).passes(f64::INFINITY, 0.0));
    /// ```
    pub fn passes(&self, tol: f64, min_top1: f64) -> bool {
        self.rel_err <= tol && self.top1_fraction() >= min_top1
    }
}

/// Compares two `[positions, vocab]` row-major logit arrays.
///
/// ```
/// use ngpt_compiler::compare::compare;
/// let c = compare(&[1.0, 2.0, 4.0, 3.0], &[1.0, 2.0, 4.0, 3.0], 2);
/// assert_eq!(c.rel_err, 0.0);
/// assert_eq!(c.top1_agree, 2);
/// ```
pub fn compare(out: &[f64], reference: &[f64], vocab: usize) -> Comparison {
    let positions = reference.len().checked_div(vocab).unwrap_or(0);
    if out.len() != reference.len() || vocab == 0 {
        return Comparison {
            rel_err: f64::NAN,
            top1_agree: 0,
            positions,
        };
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (o, r) in out.iter().zip(reference) {
        num += (o - r) * (o - r);
        den += r * r;
    }
    let rel_err = if out.iter().chain(reference).any(|v| v.is_nan()) {
        f64::NAN
    } else {
        num.sqrt() / den.sqrt()
    };
    let top1_agree = out
        .chunks(vocab)
        .zip(reference.chunks(vocab))
        .filter(|(o, r)| crate::reference::argmax(o) == crate::reference::argmax(r))
        .count();
    Comparison {
        rel_err,
        top1_agree,
        positions,
    }
}
