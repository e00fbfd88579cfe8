//! Decode-sized weight GEMMs (a few activation rows) as dot products over weight rows, f32 or
//! bf16 weights alike: what a decode step spends its time on.
//!
//! The plan's weight GEMMs all have one form (`C = alpha W x^T + beta C`, column-major, `A =
//! W` transposed): weight rows are contiguous, activation rows are contiguous. With few
//! activation rows the product is bound by reading W once, so each weight row is read once
//! and dotted with every activation row while it sits in L1; pieces of rows go to rayon's
//! threads. A general GEMM (the gemm crate) packs W first, which at one activation row
//! moves the weights twice.
//!
//! Every output element is computed by one thread in a fixed order (four accumulators of
//! eight lanes, separate multiplies and adds, no FMA), so results are bitwise the same
//! whatever the thread count and whether or not the CPU has AVX2.

use std::mem::size_of;

use rayon::prelude::*;

/// At most this many activation rows take the dot-product path.
pub const MAX_N: usize = 8;
/// Weight rows per piece of work.
const ROWS_PER_PIECE: usize = 64;
/// How far ahead (in bytes) the AVX2 dot product prefetches weights. Measured on the 2-core
/// dev box (BENCHMARKS.md): none, 512, 1024, 2048 and 4096 bytes gave bf16 decode 41, 51,
/// 53, 53 and 56 tokens/s and f32 32, 32, 34, 30 and 31 (small preset).
const PREFETCH_BYTES: usize = 1024;

/// The shape of a weight GEMM: `C[m x n] = alpha * W[m x k] . X[n x k]^T + beta * C`, with
/// W rows `lda` apart, X rows `ldb` apart, C column-major with columns `ldc` apart.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
}

/// A weight element: f32, or bf16 bits (`u16`), read as f32 exactly.
pub trait Weight: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;

    /// Eight consecutive elements from `p`, widened.
    ///
    /// # Safety
    /// `p` points at eight readable elements; the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Weight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Weight for u16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        crate::plan::widen_bf16(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const u16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bits))
    }
}

/// The dot product, with AVX2 where the CPU has it (bitwise the portable result).
fn dot_fn<W: Weight>() -> fn(&[W], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            return |w, x| {
                // SAFETY: AVX2 is present (checked just above).
                unsafe { dot_avx2(w, x) }
            };
        }
    }
    dot
}

/// [`dot`] with the 32-wide body in AVX2 registers: the same four accumulators of eight
/// lanes, the same separate multiplies and adds in the same order, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2<W: Weight>(w: &[W], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let k = w.len().min(x.len());
    let body = k / 32 * 32;
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut v = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < body {
        // Weights are read once: ask for the lines PREFETCH_BYTES ahead of these 32
        // elements now (a prefetch past the end of the slice never faults).
        let ahead = pw
            .cast::<u8>()
            .wrapping_add(i * size_of::<W>() + PREFETCH_BYTES);
        let mut line = 0;
        while line < 32 * size_of::<W>() {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
            line += 64;
        }
        for (a, v) in v.iter_mut().enumerate() {
            let o = i + a * 8;
            // SAFETY: o + 8 <= body <= k: inside both slices.
            let p = _mm256_mul_ps(W::load8(pw.add(o)), _mm256_loadu_ps(px.add(o)));
            *v = _mm256_add_ps(*v, p);
        }
        i += 32;
    }
    let mut acc = [[0f32; 8]; 4];
    for (dst, v) in acc.iter_mut().zip(v) {
        _mm256_storeu_ps(dst.as_mut_ptr(), v);
    }
    finish(acc, &w[body..k], &x[body..k])
}

/// `sum_i w[i] * x[i]` in f32: four independent accumulators of eight lanes (so the adds
/// do not wait on each other), then [`finish`].
#[inline(always)]
pub(crate) fn dot<W: Weight>(w: &[W], x: &[f32]) -> f32 {
    let k = w.len().min(x.len());
    let (w, x) = (&w[..k], &x[..k]);
    let mut acc = [[0f32; 8]; 4];
    let (wc, xc) = (w.chunks_exact(32), x.chunks_exact(32));
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (w32, x32) in wc.zip(xc) {
        for (a, acc) in acc.iter_mut().enumerate() {
            for l in 0..8 {
                acc[l] += w32[a * 8 + l].widen() * x32[a * 8 + l];
            }
        }
    }
    finish(acc, wr, xr)
}

/// The end of a dot product after its 32-wide body: the rest eight at a time into the first
/// accumulator, the scalar tail, then every lane summed in a fixed tree.
#[inline(always)]
fn finish<W: Weight>(mut acc: [[f32; 8]; 4], w: &[W], x: &[f32]) -> f32 {
    let (wc, xc) = (w.chunks_exact(8), x.chunks_exact(8));
    let (wt, xt) = (wc.remainder(), xc.remainder());
    for (w8, x8) in wc.zip(xc) {
        for l in 0..8 {
            acc[0][l] += w8[l].widen() * x8[l];
        }
    }
    let mut tail = 0f32;
    for (&a, &b) in wt.iter().zip(xt) {
        tail += a.widen() * b;
    }
    let mut lanes = [0f32; 8];
    for (l, v) in lanes.iter_mut().enumerate() {
        *v = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    }
    let quads = [
        lanes[0] + lanes[4],
        lanes[1] + lanes[5],
        lanes[2] + lanes[6],
        lanes[3] + lanes[7],
    ];
    (quads[0] + quads[2]) + (quads[1] + quads[3]) + tail
}

/// Runs the GEMM. The caller has checked that `w`, `x` and `c` hold every element the
/// shape touches (the CPU executor checks every GEMM's extents first).
pub fn gemm<W: Weight>(s: Shape, w: &[W], x: &[f32], c: &mut [f32]) {
    if s.m == 0 || s.n == 0 {
        return;
    }
    let dot = dot_fn::<W>();
    // Each piece computes its rows of C for every column, into its own buffer: a weight row
    // is read once and dotted with every activation row.
    let pieces: Vec<(usize, Vec<f32>)> = (0..s.m)
        .step_by(ROWS_PER_PIECE)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|m0| {
            let rows = ROWS_PER_PIECE.min(s.m - m0);
            let mut out = vec![0f32; rows * s.n];
            for i in 0..rows {
                let r = m0 + i;
                let wr = &w[r * s.lda..r * s.lda + s.k];
                for j in 0..s.n {
                    out[j * rows + i] = dot(wr, &x[j * s.ldb..j * s.ldb + s.k]);
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
pub(crate) mod tests {
    use super::*;

    fn bf16(v: f32) -> u16 {
        (v.to_bits() >> 16) as u16
    }

    /// A GEMM of shape m x n x k (padded leading dimensions, alpha 0.75) run by `gemm`,
    /// against exact f64 products; C's padding rows must stay untouched.
    pub(crate) fn case<W: Weight>(
        m: usize,
        n: usize,
        k: usize,
        beta: f32,
        make: fn(f32) -> W,
        gemm: fn(Shape, &[W], &[f32], &mut [f32]),
    ) {
        let (lda, ldb, ldc) = (k + 3, k + 1, m + 2);
        let w: Vec<W> = (0..m * lda)
            .map(|i| make(((i * 37 % 101) as f32 - 50.0) / 64.0))
            .collect();
        let x: Vec<f32> = (0..n * ldb)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 8.0)
            .collect();
        let c0: Vec<f32> = (0..n * ldc).map(|i| (i % 5) as f32).collect();
        let mut c = c0.clone();
        let s = Shape {
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
            alpha: 0.75,
            beta,
        };
        gemm(s, &w, &x, &mut c);
        for j in 0..n {
            for r in 0..m {
                let exact: f64 = (0..k)
                    .map(|i| w[r * lda + i].widen() as f64 * x[j * ldb + i] as f64)
                    .sum::<f64>()
                    * 0.75
                    + beta as f64 * c0[j * ldc + r] as f64;
                let got = c[j * ldc + r] as f64;
                assert!(
                    (got - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                    "m{m} n{n} k{k} ({r},{j}): {got} vs {exact}"
                );
            }
            // Padding rows of C are untouched.
            for r in m..ldc {
                assert_eq!(c[j * ldc + r], c0[j * ldc + r]);
            }
        }
    }

    #[test]
    fn f32_and_bf16_weights_match_exact_products_on_odd_shapes() {
        // k crosses the 32-wide body, the 8-wide remainder and the scalar tail.
        for (m, n, k) in [
            (1, 1, 1),
            (67, 1, 13),
            (130, 3, 70),
            (300, 8, 33),
            (65, 2, 32),
            (129, 5, 103),
            (64, 1, 0),
        ] {
            for beta in [0.0, 0.5] {
                case(m, n, k, beta, |v| v, gemm);
                case(m, n, k, beta, bf16, gemm);
            }
        }
    }

    #[test]
    fn the_avx2_dot_product_is_bitwise_the_portable_one() {
        let w: Vec<u16> = (0..1000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 17) as u16 & 0x7f7f)
            .collect();
        let wf: Vec<f32> = w.iter().map(|&b| b.widen()).collect();
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 7.0)
            .collect();
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 41, 100, 1000] {
            let want = dot(&w[..n], &x[..n]).to_bits();
            assert_eq!(dot_fn::<u16>()(&w[..n], &x[..n]).to_bits(), want);
            // f32 weights holding the same values give the same bits.
            assert_eq!(dot_fn::<f32>()(&wf[..n], &x[..n]).to_bits(), want);
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (m, n, k) = (333, 4, 100);
        let w: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0)
            .collect();
        let x: Vec<f32> = (0..n * k).map(|i| (i % 17) as f32 * 0.25).collect();
        let s = Shape {
            m,
            n,
            k,
            lda: k,
            ldb: k,
            ldc: m,
            alpha: 1.0,
            beta: 0.0,
        };
        let run = |threads| {
            let mut c = vec![0f32; m * n];
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool")
                .install(|| gemm(s, &w, &x, &mut c));
            c
        };
        assert_eq!(run(1), run(5));
    }
}
