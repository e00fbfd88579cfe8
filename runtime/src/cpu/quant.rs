//! GEMMs over weight-only quantized weights (`I8` and `I4` blocks with f16 block scales,
//! [`QuantWeight`]): what an int8 or int4 plan's GEMM steps run on the CPU.
//!
//! Decode-sized products (at most [`dots::MAX_N`] activation rows) are dot products over
//! weight rows, as [`dots`] computes them: each weight is dequantized in registers
//! (`f32(scale) * q`, exact: the value [`QuantWeight::dequantize_rows`] and the compiler's
//! `quant::dequantize` give) and enters the same four accumulators of eight lanes in the
//! same order, separate multiplies and adds. So a quantized GEMM is bitwise the f32 GEMM of
//! its dequantized weights on the dot-product path, the AVX2 body is bitwise the portable
//! one, and an activation row's result does not depend on the other rows (batch
//! invariance, as [`dots`]). The row's f16 scales are widened once per piece of rows
//! (F16C where present, exact either way). Larger products dequantize blocks of rows
//! into the f32 scratch of [`super::bf16`]'s blocked path and run the gemm crate on it.

use rayon::prelude::*;

use super::dots::{self, Shape};
use crate::plan::{QuantBits, QuantWeight};

/// How far ahead (in bytes of integers) the AVX2 dot product prefetches.
const PREFETCH_BYTES: usize = 512;

/// Runs the GEMM `C = alpha W x^T + beta C` over quantized `w` (`s.lda == w.k`, `s.k ==
/// w.k`, `s.m <= w.rows`: the plan's validation holds this for every quantized GEMM; the
/// executor has checked x and c).
pub fn gemm(s: Shape, w: &QuantWeight, x: &[f32], c: &mut [f32]) {
    if s.m == 0 || s.n == 0 {
        return;
    }
    if s.n <= dots::MAX_N || s.k == 0 {
        dot_gemm(s, w, x, c)
    } else {
        super::bf16::blocked_with(s, x, c, |m0, out| w.dequantize_rows(m0, out));
    }
}

/// The row `r` of `w` as [`dot`] reads it.
#[derive(Clone, Copy)]
struct Row<'a> {
    bits: QuantBits,
    /// The row's integers as stored.
    bytes: &'a [u8],
    /// The row's scales, widened.
    scales: &'a [f32],
    /// log2 of the block size.
    shift: u32,
    /// Entries of the row used (the GEMM's k).
    k: usize,
}

impl Row<'_> {
    /// The dequantized value of entry `j`: `scale * q`, exact in f32.
    #[inline(always)]
    fn value(&self, j: usize) -> f32 {
        let q = match self.bits {
            QuantBits::Int8 => self.bytes[j] as i8,
            QuantBits::Int4 => ((self.bytes[j / 2] >> (4 * (j % 2))) & 0x0f) as i8 - 8,
        };
        self.scales[j >> self.shift] * f32::from(q)
    }

    /// Entries `from..k` dequantized (the part after the 32-wide body: fewer than 32).
    fn rest(&self, from: usize) -> ([f32; 32], usize) {
        let mut out = [0f32; 32];
        let n = self.k - from;
        for (i, o) in out[..n].iter_mut().enumerate() {
            *o = self.value(from + i);
        }
        (out, n)
    }
}

/// The portable dot product: [`dots::dot`]'s order over the dequantized values.
fn dot(row: Row<'_>, x: &[f32]) -> f32 {
    let k = row.k.min(x.len());
    let body = k / 32 * 32;
    let mut acc = [[0f32; 8]; 4];
    for i in (0..body).step_by(32) {
        for e in 0..32 {
            acc[e / 8][e % 8] += row.value(i + e) * x[i + e];
        }
    }
    let (rest, n) = Row { k, ..row }.rest(body);
    dots::finish(acc, &rest[..n], &x[body..k])
}

/// The dot products this CPU runs: AVX2 (with F16C for the scales) where present, the
/// portable [`dot`] otherwise; bitwise the same.
#[derive(Clone, Copy)]
struct Kernels {
    avx2: bool,
    f16c: bool,
}

impl Kernels {
    fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        {
            Kernels {
                avx2: std::arch::is_x86_feature_detected!("avx2"),
                f16c: std::arch::is_x86_feature_detected!("f16c"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Kernels {
            avx2: false,
            f16c: false,
        }
    }

    fn dots<const C: usize>(self, row: Row<'_>, xs: [&[f32]; C]) -> [f32; C] {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: AVX2 is present (`detect` checked it).
            return unsafe { dots_avx2(row, xs) };
        }
        xs.map(|x| dot(row, x))
    }

    /// f16 bits to f32, exactly.
    fn widen(self, src: &[u16], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.f16c && self.avx2 {
            // SAFETY: F16C and AVX are present (`detect` checked them).
            unsafe { widen_f16c(src, dst) };
            return;
        }
        crate::plan::widen_f16s(src, dst);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_f16c(src: &[u16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let body = n / 8 * 8;
    for i in (0..body).step_by(8) {
        // SAFETY: i + 8 <= n: inside both slices.
        let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
    }
    crate::plan::widen_f16s(&src[body..n], &mut dst[body..n]);
}

/// Sixteen integers from entry `j` (a multiple of 16, `j + 16 <= k`) as two vectors of f32.
///
/// # Safety
/// AVX2 is present; the row holds the sixteen entries.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn ints16(row: &Row<'_>, j: usize) -> [std::arch::x86_64::__m256; 2] {
    use std::arch::x86_64::*;
    let bytes = match row.bits {
        // SAFETY: entries j..j + 16 are bytes j..j + 16 of the row.
        QuantBits::Int8 => _mm_loadu_si128(row.bytes.as_ptr().add(j).cast()),
        QuantBits::Int4 => {
            // SAFETY: entries j..j + 16 are bytes j / 2..j / 2 + 8 of the row.
            let packed = _mm_loadl_epi64(row.bytes.as_ptr().add(j / 2).cast());
            let mask = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(packed, mask);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(packed), mask);
            _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), _mm_set1_epi8(8))
        }
    };
    [
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(bytes))),
    ]
}

/// [`dot`] of one weight row with each of `C` activation rows, the 32-wide body in AVX2
/// registers: the weights dequantized sixteen at a time (a half lies inside one block:
/// blocks are powers of two of at least 16), then [`dots`]' accumulators and order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dots_avx2<const C: usize>(row: Row<'_>, xs: [&[f32]; C]) -> [f32; C] {
    use std::arch::x86_64::*;
    let k = xs.iter().fold(row.k, |k, x| k.min(x.len()));
    let body = k / 32 * 32;
    let per_entry = match row.bits {
        QuantBits::Int8 => 2,
        QuantBits::Int4 => 1,
    };
    let pb = row.bytes.as_ptr();
    let mut v = [[_mm256_setzero_ps(); 4]; C];
    let mut i = 0;
    while i < body {
        // A prefetch past the end of the row never faults.
        _mm_prefetch::<_MM_HINT_T0>(pb.wrapping_add(i * per_entry / 2 + PREFETCH_BYTES).cast());
        for h in 0..2 {
            let j = i + 16 * h;
            let scale = _mm256_set1_ps(row.scales[j >> row.shift]);
            // SAFETY: j + 16 <= body <= k: inside the row and every activation row.
            let q = ints16(&row, j);
            let wv = [_mm256_mul_ps(q[0], scale), _mm256_mul_ps(q[1], scale)];
            for (v, x) in v.iter_mut().zip(&xs) {
                let px = x.as_ptr().add(j);
                for (s, wv) in wv.iter().enumerate() {
                    let p = _mm256_mul_ps(*wv, _mm256_loadu_ps(px.add(8 * s)));
                    v[2 * h + s] = _mm256_add_ps(v[2 * h + s], p);
                }
            }
        }
        i += 32;
    }
    let (rest, n) = Row { k, ..row }.rest(body);
    std::array::from_fn(|c| {
        let mut acc = [[0f32; 8]; 4];
        for (dst, v) in acc.iter_mut().zip(v[c]) {
            _mm256_storeu_ps(dst.as_mut_ptr(), v);
        }
        dots::finish(acc, &rest[..n], &xs[c][body..k])
    })
}

/// The dot-product path: pieces of weight rows on rayon's threads, the activation rows in
/// pairs sharing each dequantized chunk, as [`dots::gemm`] does.
fn dot_gemm(s: Shape, w: &QuantWeight, x: &[f32], c: &mut [f32]) {
    let kern = Kernels::detect();
    let (rb, nb) = (w.row_bytes(), w.n_blocks());
    let shift = w.block.trailing_zeros();
    let row_bytes = rb + 2 * nb;
    let piece_rows = if s.n <= 2 {
        dots::ROWS_PER_PIECE
    } else {
        (dots::PIECE_BYTES / row_bytes.max(1)).clamp(8, dots::ROWS_PER_PIECE)
    };
    let xrow = |j: usize| &x[j * s.ldb..j * s.ldb + s.k];
    let pieces: Vec<(usize, Vec<f32>)> = (0..s.m)
        .step_by(piece_rows)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|m0| {
            let rows = piece_rows.min(s.m - m0);
            let mut scales = vec![0f32; rows * nb];
            kern.widen(&w.scales[m0 * nb..(m0 + rows) * nb], &mut scales);
            let row = |i: usize| Row {
                bits: w.bits,
                bytes: &w.data[(m0 + i) * rb..(m0 + i + 1) * rb],
                scales: &scales[i * nb..(i + 1) * nb],
                shift,
                k: s.k,
            };
            let mut out = vec![0f32; rows * s.n];
            for j in (0..s.n).step_by(2) {
                if j + 1 < s.n {
                    for i in 0..rows {
                        let [a, b] = kern.dots(row(i), [xrow(j), xrow(j + 1)]);
                        out[j * rows + i] = a;
                        out[(j + 1) * rows + i] = b;
                    }
                } else {
                    for i in 0..rows {
                        out[j * rows + i] = kern.dots(row(i), [xrow(j)])[0];
                    }
                }
            }
            (m0, out)
        })
        .collect();
    for (m0, out) in pieces {
        let rows = out.len() / s.n;
        for j in 0..s.n {
            for (i, v) in out[j * rows..(j + 1) * rows].iter().enumerate() {
                let dst = &mut c[j * s.ldc + m0 + i];
                *dst = if s.beta == 0.0 {
                    s.alpha * v
                } else {
                    s.alpha * v + s.beta * *dst
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `rows x k` quantized matrix with integers spanning the range and scales of
    /// several magnitudes (f16 bits).
    pub(crate) fn weight(bits: QuantBits, rows: usize, k: usize, block: usize) -> QuantWeight {
        let qmax = match bits {
            QuantBits::Int8 => 127,
            QuantBits::Int4 => 7,
        };
        let nb = k.div_ceil(block);
        let ints: Vec<i8> = (0..rows * k)
            .map(|i| (((i * 37 + i / 7) % (2 * qmax + 1)) as i32 - qmax as i32) as i8)
            .collect();
        let scales: Vec<u16> = (0..rows * nb)
            .map(|i| half::f16::from_f32(((i * 13 % 23) as f32 - 11.0) / 97.0).to_bits())
            .collect();
        let data: Vec<u8> = match bits {
            QuantBits::Int8 => ints.iter().map(|&q| q as u8).collect(),
            QuantBits::Int4 => ints
                .chunks(k.max(1))
                .flat_map(|row| {
                    row.chunks(2)
                        .map(|p| (p[0] + 8) as u8 | ((p.get(1).map_or(8, |&h| h + 8) as u8) << 4))
                        .collect::<Vec<u8>>()
                })
                .collect(),
        };
        QuantWeight {
            bits,
            rows,
            k,
            block,
            data: data.into(),
            scales: scales.into(),
        }
    }

    fn shape(m: usize, n: usize, k: usize) -> Shape {
        Shape {
            m,
            n,
            k,
            lda: k,
            ldb: k + 1,
            ldc: m + 2,
            alpha: 0.75,
            beta: 0.0,
        }
    }

    fn xs(n: usize, k: usize) -> Vec<f32> {
        (0..n * (k + 1))
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 8.0)
            .collect()
    }

    const CASES: [(usize, usize, usize); 6] = [
        (67, 13, 16),
        (130, 70, 32),
        (65, 32, 16),
        (40, 1000, 64),
        (9, 33, 32),
        (64, 0, 32),
    ];

    #[test]
    fn dot_products_are_bitwise_the_f32_gemm_of_the_dequantized_weights() {
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            for (m, k, block) in CASES {
                let w = weight(bits, m, k, block);
                let deq = dequantized(&w);
                for n in [1, 2, 3, 5, 32] {
                    let s = shape(m, n, k);
                    let x = xs(n, k);
                    let mut got = vec![f32::NAN; n * s.ldc];
                    let mut want = got.clone();
                    gemm(s, &w, &x, &mut got);
                    dots::gemm(s, &deq, &x, &mut want);
                    let bits_of = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits_of(&got),
                        bits_of(&want),
                        "{bits:?} m{m} k{k} b{block} n{n}"
                    );
                }
            }
        }
    }

    /// The dequantized matrix in f32 (through the plan's one dequantization).
    fn dequantized(w: &QuantWeight) -> Vec<f32> {
        let mut out = vec![0f32; w.rows * w.k];
        w.dequantize_rows(0, &mut out);
        out
    }

    #[test]
    fn the_avx2_body_is_bitwise_the_portable_order() {
        let kern = Kernels::detect();
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            for (_, k, block) in CASES {
                let w = weight(bits, 3, k, block);
                let mut scales = vec![0f32; w.n_blocks()];
                kern.widen(&w.scales[..w.n_blocks()], &mut scales);
                let mut portable = vec![0f32; w.n_blocks()];
                crate::plan::widen_f16s(&w.scales[..w.n_blocks()], &mut portable);
                assert_eq!(scales, portable);
                let row = Row {
                    bits,
                    bytes: &w.data[..w.row_bytes()],
                    scales: &scales,
                    shift: block.trailing_zeros(),
                    k,
                };
                let x = xs(2, k);
                let (x0, x1) = (&x[..k], &x[k + 1..2 * k + 1]);
                let [a, b] = kern.dots(row, [x0, x1]);
                let [c] = kern.dots(row, [x0]);
                assert_eq!(
                    [a, b, c].map(f32::to_bits),
                    [dot(row, x0), dot(row, x1), dot(row, x0)].map(f32::to_bits),
                    "{bits:?} k{k} block {block}"
                );
            }
        }
    }

    #[test]
    fn each_activation_row_is_bitwise_its_gemm_alone() {
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            let (m, k) = (150, 200);
            let w = weight(bits, m, k, 32);
            let x = xs(8, k);
            let s1 = shape(m, 1, k);
            for n in 1..=8 {
                let s = shape(m, n, k);
                let mut c = vec![f32::NAN; n * s.ldc];
                gemm(s, &w, &x, &mut c);
                for j in 0..n {
                    let mut alone = vec![f32::NAN; s1.ldc];
                    gemm(s1, &w, &x[j * s.ldb..], &mut alone);
                    assert_eq!(
                        c[j * s.ldc..j * s.ldc + m]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>(),
                        alone[..m].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{bits:?}: row {j} of {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_blocked_path_matches_exact_products() {
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            for (m, k, block) in [(70, 45, 16), (517, 64, 32), (33, 0, 32)] {
                let w = weight(bits, m, k, block);
                let deq = dequantized(&w);
                let n = 40;
                let mut s = shape(m, n, k);
                s.beta = 0.5;
                let x = xs(n, k);
                let c0: Vec<f32> = (0..n * s.ldc).map(|i| (i % 5) as f32).collect();
                let mut c = c0.clone();
                gemm(s, &w, &x, &mut c);
                for j in 0..n {
                    for r in 0..m {
                        let exact: f64 = (0..k)
                            .map(|i| f64::from(deq[r * k + i]) * f64::from(x[j * s.ldb + i]))
                            .sum::<f64>()
                            * 0.75
                            + 0.5 * f64::from(c0[j * s.ldc + r]);
                        let got = f64::from(c[j * s.ldc + r]);
                        assert!(
                            (got - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                            "{bits:?} m{m} k{k} ({r},{j}): {got} vs {exact}"
                        );
                    }
                    for r in m..s.ldc {
                        assert_eq!(c[j * s.ldc + r], c0[j * s.ldc + r]);
                    }
                }
            }
        }
    }
}
