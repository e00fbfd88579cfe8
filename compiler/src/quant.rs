//! Weight-only block quantization: the format, the quantizer and the one dequantization
//! every reader uses.
//!
//! A matrix `[N, K]` (a `matmul_t` weight, K the reduction axis) is cut, row by row, into
//! blocks of `block` entries along K (the last block short when `block` does not divide
//! K). Each block holds signed integers `q` in `[-qmax, qmax]` (qmax 127 for int8, 7 for
//! int4: symmetric, no zero point) and one f16 scale; its values are `f32(scale) * q`,
//! exact in f32 (an 11-bit significand times at most 8 bits). That product is the only
//! meaning the bytes have: [`dequantize`] computes it, and the IR interpreter, the ONNX
//! export's readers and the tests all go through it.
//!
//! The per-row factors that folding put into a matrix multiply (`Const`'s row scale: sz
//! into lm_head, suv into c_fc) go into the block scales, never into the integers: the
//! integers quantize the stored (unit-norm) rows. With `renorm`, each row's block scales
//! are multiplied by one common factor so that the dequantized row has the norm of the
//! source row (in f64, before the scales are rounded to f16; after rounding it holds to
//! f16 rounding, a relative 2^-11 at most).

use half::f16;

use crate::error::{Error, Result};

/// Bits per weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bits {
    /// 8-bit integers in `[-127, 127]`.
    Int8,
    /// 4-bit integers in `[-7, 7]`.
    Int4,
}

impl Bits {
    /// The largest magnitude an integer takes (symmetric: -qmax..=qmax).
    pub fn qmax(self) -> i8 {
        match self {
            Bits::Int8 => 127,
            Bits::Int4 => 7,
        }
    }

    /// The number of bits, as MatMulNBits' `bits` attribute says it.
    pub fn bits(self) -> usize {
        match self {
            Bits::Int8 => 8,
            Bits::Int4 => 4,
        }
    }

    /// `int8` or `int4`.
    pub fn as_str(self) -> &'static str {
        match self {
            Bits::Int8 => "int8",
            Bits::Int4 => "int4",
        }
    }
}

/// Values a block of int8 activations (`act_int8`): the plan's one
/// [`ngpt_schemas::plan::INT8_ACT_BLOCK`]; the weights' block must be this too.
pub const ACT_BLOCK: usize = ngpt_schemas::plan::INT8_ACT_BLOCK as usize;

/// How one matrix is quantized: what a quantized [`crate::graph::Const`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Format {
    /// Bits per weight.
    pub bits: Bits,
    /// Entries per block along K (a power of two, at least 16: what MatMulNBits takes).
    pub block: usize,
    /// Rescale each row's block scales so the dequantized row keeps the source row's norm.
    pub renorm: bool,
    /// The plan's GEMMs with this matrix quantize their activations to int8 in blocks of
    /// 32 (plan `Quant.act_block`), and model.onnx's MatMulNBits says `accuracy_level` 4
    /// (onnxruntime may do the same); the graph's meaning (the IR, model.onnx read by a
    /// runtime that ignores the attribute) is the weight-only product either way.
    pub act_int8: bool,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.bits.as_str(), self.block)?;
        if self.renorm {
            write!(f, " renorm")?;
        }
        if self.act_int8 {
            write!(f, " act-int8")?;
        }
        Ok(())
    }
}

/// What the `quantize` pass does to a graph: the format of the layers' matrices and of
/// lm_head. The embedding is never quantized (it is a table read a row per token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Options {
    /// Bits of the layers' matrices (q, k, v, the projections, c_fc).
    pub bits: Bits,
    /// Entries per block along K; [`check_block`] holds it.
    pub block: usize,
    /// Renormalize the rows of the matrices whose training keeps them unit-norm along K.
    pub renorm: bool,
    /// Bits of lm_head; `None` keeps it in float.
    pub lm_head: Option<Bits>,
    /// The plan's GEMMs with the quantized matrices (the layers' and a quantized lm_head)
    /// quantize their activations to int8 in blocks of 32 (needs `block` 32), and
    /// model.onnx's MatMulNBits for them say `accuracy_level` 4: faster on a CPU, less
    /// accurate (BENCHMARKS.md measures both). Off by default.
    #[serde(default)]
    pub act_int8: bool,
}

impl Options {
    /// The defaults for `bits`: block 32, no renormalization, lm_head in int8 (int8 and
    /// int4 both: llama.cpp keeps its output matrix at higher precision too).
    ///
    /// ```
    /// use ngpt_compiler::quant::{Bits, Options};
    /// assert_eq!(Options::new(Bits::Int4).lm_head, Some(Bits::Int8));
    /// ```
    pub fn new(bits: Bits) -> Options {
        Options {
            bits,
            block: 32,
            renorm: false,
            lm_head: Some(Bits::Int8),
            act_int8: false,
        }
    }

    /// Checks the options: the block ([`check_block`]), and blocks of 32 where the
    /// activations are quantized.
    ///
    /// ```
    /// use ngpt_compiler::quant::{Bits, Options};
    /// let mut o = Options::new(Bits::Int4);
    /// o.act_int8 = true;
    /// assert!(o.check().is_ok());
    /// o.block = 64;
    /// assert!(o.check().is_err());
    /// ```
    pub fn check(&self) -> Result<()> {
        check_block(self.block)?;
        if self.act_int8 && self.block != ACT_BLOCK {
            return Err(Error::Argument {
                what: format!("int8 activations with quantization block {}", self.block),
                problem: format!(
                    "int8 activations are quantized in blocks of {ACT_BLOCK} and need weight blocks of {ACT_BLOCK}"
                ),
            });
        }
        Ok(())
    }
}

/// Checks a block size: a power of two, at least 16 (onnxruntime's MatMulNBits takes
/// those only).
///
/// ```
/// assert!(ngpt_compiler::quant::check_block(32).is_ok());
/// assert!(ngpt_compiler::quant::check_block(24).is_err());
/// ```
pub fn check_block(block: usize) -> Result<()> {
    if block < 16 || !block.is_power_of_two() {
        return Err(Error::Argument {
            what: format!("quantization block {block}"),
            problem: "must be a power of two of at least 16 (as MatMulNBits takes)".into(),
        });
    }
    Ok(())
}

/// Rows of a quantized matrix: the integers `[rows, k]` and the block scales
/// `[rows, n_blocks]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantRows {
    /// Rows held.
    pub rows: usize,
    /// Entries per row (the reduction dimension K).
    pub k: usize,
    /// Entries per block.
    pub block: usize,
    /// The integers, `rows * k`, each within `[-qmax, qmax]`.
    pub ints: Vec<i8>,
    /// The block scales, `rows * n_blocks(k, block)`.
    pub scales: Vec<f16>,
}

impl QuantRows {
    /// The scales widened (exactly) to f32.
    pub fn scales_f32(&self) -> Vec<f32> {
        self.scales.iter().map(|s| s.to_f32()).collect()
    }

    /// The dequantized values, `rows * k`, through [`dequantize`].
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        dequantize(&self.ints, &self.scales_f32(), self.k, self.block)
    }
}

/// Blocks per row: `ceil(k / block)`.
pub fn n_blocks(k: usize, block: usize) -> usize {
    k.div_ceil(block.max(1))
}

/// Quantizes `rows` rows of `k` values (`w`, row-major, f64), row `r` to be scaled by
/// `row_scale[r]` (the folded factor, into the block scales). Block scale before rounding:
/// `row_scale * max|w_block| / qmax` (times the row's common renormalization factor); the
/// integers `round(w / (max|w_block| / qmax))`. Fails when a scale is beyond f16's range.
///
/// ```
/// use ngpt_compiler::quant::{quantize, Bits, Format};
/// let fmt = Format { bits: Bits::Int4, block: 16, renorm: false, act_int8: false };
/// let w: Vec<f64> = (0..20).map(|i| i as f64 - 10.0).collect();
/// let q = quantize(&w, 1, 20, Some(&[0.5]), fmt)?;
/// assert_eq!((q.ints.len(), q.scales.len()), (20, 2)); // a block of 16, a short one of 4
/// assert_eq!(q.ints[0], -7); // -10 is the first block's largest magnitude
/// assert_eq!(q.scales[0].to_f64(), half::f16::from_f64(0.5 * 10.0 / 7.0).to_f64());
/// # Ok::<(), ngpt_compiler::Error>(())
/// ```
pub fn quantize(
    w: &[f64],
    rows: usize,
    k: usize,
    row_scale: Option<&[f64]>,
    fmt: Format,
) -> Result<QuantRows> {
    let bad = |problem: String| Error::Argument {
        what: "quantize".into(),
        problem,
    };
    if w.len() != rows * k || row_scale.is_some_and(|s| s.len() != rows) || fmt.block == 0 {
        return Err(bad(format!(
            "{} values and {:?} row scales for {rows} rows of {k}",
            w.len(),
            row_scale.map(<[f64]>::len)
        )));
    }
    let nb = n_blocks(k, fmt.block);
    let qmax = f64::from(fmt.bits.qmax());
    let mut ints = vec![0i8; rows * k];
    let mut scales = Vec::with_capacity(rows * nb);
    let mut block_scales = vec![0f64; nb];
    for r in 0..rows {
        let row = &w[r * k..(r + 1) * k];
        let (mut src, mut deq) = (0f64, 0f64);
        for (b, s) in block_scales.iter_mut().enumerate() {
            let span = b * fmt.block..((b + 1) * fmt.block).min(k);
            let amax = row[span.clone()].iter().fold(0f64, |m, v| m.max(v.abs()));
            *s = amax / qmax;
            for i in span {
                let q = if *s > 0.0 {
                    (row[i] / *s).round().clamp(-qmax, qmax)
                } else {
                    0.0
                };
                ints[r * k + i] = q as i8;
                src += row[i] * row[i];
                deq += (q * *s) * (q * *s);
            }
        }
        let common = if fmt.renorm && deq > 0.0 {
            (src / deq).sqrt()
        } else {
            1.0
        };
        let fold = row_scale.map_or(1.0, |s| s[r]);
        for &s in &block_scales {
            let v = s * common * fold;
            let h = f16::from_f64(v);
            if !h.is_finite() || !v.is_finite() {
                return Err(bad(format!(
                    "row {r}: block scale {v:e} is beyond float16's range"
                )));
            }
            scales.push(h);
        }
    }
    Ok(QuantRows {
        rows,
        k,
        block: fmt.block,
        ints,
        scales,
    })
}

/// The values of quantized rows: `scales[r * n_blocks + i / block] * ints[r * k + i]`, in
/// f32 (exact: the scales are f16 values widened). The one dequantization: every reader
/// of a quantized weight (the IR interpreter, the tests, the ONNX checks) computes this.
/// Refuses scales that are not finite and counts that do not fit, in one line.
///
/// ```
/// use ngpt_compiler::quant::dequantize;
/// // Two rows of K = 3 in blocks of 2: the second block of each row is short.
/// let v = dequantize(&[1, -2, 3, 4, 5, -6], &[0.5, 2.0, 1.0, -1.0], 3, 2)?;
/// assert_eq!(v, [0.5, -1.0, 6.0, 4.0, 5.0, 6.0]);
/// assert!(dequantize(&[1, 2, 3], &[f32::NAN, 1.0], 3, 2).is_err());
/// assert!(dequantize(&[1, 2, 3], &[1.0], 3, 2).is_err());
/// # Ok::<(), ngpt_compiler::Error>(())
/// ```
pub fn dequantize(ints: &[i8], scales: &[f32], k: usize, block: usize) -> Result<Vec<f32>> {
    let nb = n_blocks(k, block);
    let rows = ints.len().checked_div(k).unwrap_or(0);
    check_scales(scales, rows * nb, "block scales")?;
    if rows * k != ints.len() || block == 0 {
        return Err(Error::Argument {
            what: "dequantize".into(),
            problem: format!(
                "{} integers are not whole rows of {k} (block {block})",
                ints.len()
            ),
        });
    }
    Ok(ints
        .iter()
        .enumerate()
        .map(|(j, &q)| scales[(j / k) * nb + (j % k) / block] * f32::from(q))
        .collect())
}

/// Checks block scales read from a file: `want` of them, each finite; one line naming
/// `what` otherwise.
pub fn check_scales(scales: &[f32], want: usize, what: &str) -> Result<()> {
    if scales.len() != want {
        return Err(Error::Argument {
            what: what.into(),
            problem: format!(
                "{} scales where the shape needs {want} (truncated?)",
                scales.len()
            ),
        });
    }
    if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
        return Err(Error::Argument {
            what: what.into(),
            problem: format!("scale {i} is {} (not finite)", scales[i]),
        });
    }
    Ok(())
}

/// Packs rows of integers into MatMulNBits' `B` layout, `[rows, n_blocks, blob]` with
/// `blob = block * bits / 8`: each integer stored unsigned as `q + 2^(bits-1)` (the zero
/// point onnxruntime assumes when none is given: 8 for int4, 128 for int8), two 4-bit
/// values a byte low nibble first, a short last block padded with the zero point.
///
/// ```
/// use ngpt_compiler::quant::{pack, unpack, Bits};
/// let q = [-7i8, 7, 0, 1, 2];
/// let b = pack(&q, Bits::Int4, 5, 16);
/// assert_eq!(b.len(), 8); // one row: one block of 16 nibbles, padded with the zero point
/// assert_eq!(b[0], 0x01 | (15 << 4)); // -7 + 8 low, 7 + 8 high
/// assert_eq!(unpack(&b, Bits::Int4, 5, 16)?, q);
/// # Ok::<(), ngpt_compiler::Error>(())
/// ```
pub fn pack(ints: &[i8], bits: Bits, k: usize, block: usize) -> Vec<u8> {
    let nb = n_blocks(k, block);
    let rows = ints.len().checked_div(k).unwrap_or(0);
    let blob = block * bits.bits() / 8;
    let mut out = vec![0u8; rows * nb * blob];
    for r in 0..rows {
        for i in 0..nb * block {
            let q = if i < k { ints[r * k + i] } else { 0 };
            let at = r * nb * blob;
            match bits {
                Bits::Int8 => out[at + i] = (i16::from(q) + 128) as u8,
                Bits::Int4 => {
                    let u = (q + 8) as u8 & 0x0f;
                    out[at + i / 2] |= if i % 2 == 0 { u } else { u << 4 };
                }
            }
        }
    }
    out
}

/// The integers of [`pack`]'s bytes (the inverse, dropping a short block's padding);
/// fails when the bytes are not whole rows.
pub fn unpack(bytes: &[u8], bits: Bits, k: usize, block: usize) -> Result<Vec<i8>> {
    let nb = n_blocks(k, block);
    let blob = block * bits.bits() / 8;
    let row_bytes = nb * blob;
    if row_bytes == 0 || !bytes.len().is_multiple_of(row_bytes) {
        return Err(Error::Argument {
            what: "quantized weight".into(),
            problem: format!(
                "{} bytes are not whole rows of {row_bytes} (K {k}, block {block})",
                bytes.len()
            ),
        });
    }
    let rows = bytes.len() / row_bytes;
    let mut out = Vec::with_capacity(rows * k);
    for r in 0..rows {
        for i in 0..k {
            let at = r * row_bytes;
            out.push(match bits {
                Bits::Int8 => (i16::from(bytes[at + i]) - 128) as i8,
                Bits::Int4 => ((bytes[at + i / 2] >> (4 * (i % 2))) & 0x0f) as i8 - 8,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_packs_and_unpacks_with_a_short_block() -> Result<()> {
        let q: Vec<i8> = (0..2 * 40).map(|i| ((i * 37) % 255 - 127) as i8).collect();
        let b = pack(&q, Bits::Int8, 40, 32);
        assert_eq!(b.len(), 2 * 2 * 32);
        assert_eq!(unpack(&b, Bits::Int8, 40, 32)?, q);
        Ok(())
    }

    #[test]
    fn renormalized_rows_keep_their_norm_before_rounding() -> Result<()> {
        let k = 70;
        let w: Vec<f64> = (0..k).map(|i| ((i as f64) * 0.7).sin()).collect();
        let norm = w.iter().map(|v| v * v).sum::<f64>().sqrt();
        for bits in [Bits::Int4, Bits::Int8] {
            let fmt = Format {
                bits,
                block: 32,
                renorm: true,
                act_int8: false,
            };
            let q = quantize(&w, 1, k, Some(&[2.0]), fmt)?;
            let deq = q.dequantize()?;
            let got = deq
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                .sqrt();
            // f16 scales: within 2^-11 of the source norm (times the row scale 2).
            assert!(
                (got / (2.0 * norm) - 1.0).abs() <= 2f64.powi(-11),
                "{bits:?} {got}"
            );
        }
        Ok(())
    }
}
