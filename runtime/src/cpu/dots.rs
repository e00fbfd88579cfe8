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
//!
//! bf16 weights are widened in pairs: one 256-bit load of sixteen bf16 values is eight
//! 32-bit words, and a shift left by 16 turns each word's low half (the even element) into
//! an f32 while a mask keeps its high half (the odd element) as one. Two vector operations
//! per sixteen elements instead of a zero-extending shuffle and a shift per eight, which
//! took the bf16 dot product from compute bound to bandwidth bound (BENCHMARKS.md). The
//! even elements then sit in one accumulator and the odd ones in the next ([`Weight::slot`]),
//! so the activation row is read in the same split order: the AVX2 path gets a copy of it
//! with each sixteen values reordered evens first (`split_pairs`), made once per GEMM.

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
    /// Whether the AVX2 body reads the activation row in `split_pairs` order.
    const SPLIT_PAIRS: bool;

    fn widen(self) -> f32;

    /// The accumulator and lane that element `i` (0 to 31) of a 32-wide body chunk is
    /// added into; every pair is hit once per chunk.
    fn slot(i: usize) -> (usize, usize);

    /// One 32-wide chunk of the body: `v[a][l] += w[i] * x[i]` for every `i` at its
    /// [`Weight::slot`] `(a, l)`, with `x` in the order [`Weight::SPLIT_PAIRS`] says.
    ///
    /// # Safety
    /// `w` and `x` point at 32 readable elements; the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn body32(w: *const Self, x: *const f32, v: &mut [std::arch::x86_64::__m256; 4]);
}

impl Weight for f32 {
    const SPLIT_PAIRS: bool = false;

    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[inline(always)]
    fn slot(i: usize) -> (usize, usize) {
        (i / 8, i % 8)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn body32(w: *const f32, x: *const f32, v: &mut [std::arch::x86_64::__m256; 4]) {
        use std::arch::x86_64::*;
        for (a, v) in v.iter_mut().enumerate() {
            // SAFETY: a * 8 + 8 <= 32: inside both chunks.
            let p = _mm256_mul_ps(_mm256_loadu_ps(w.add(a * 8)), _mm256_loadu_ps(x.add(a * 8)));
            *v = _mm256_add_ps(*v, p);
        }
    }
}

impl Weight for u16 {
    const SPLIT_PAIRS: bool = true;

    #[inline(always)]
    fn widen(self) -> f32 {
        crate::plan::widen_bf16(self)
    }

    #[inline(always)]
    fn slot(i: usize) -> (usize, usize) {
        (2 * (i / 16) + i % 2, (i % 16) / 2)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn body32(w: *const u16, x: *const f32, v: &mut [std::arch::x86_64::__m256; 4]) {
        use std::arch::x86_64::*;
        let odd = _mm256_set1_epi32(0xffff_0000_u32 as i32);
        for h in 0..2 {
            // SAFETY: h * 16 + 16 <= 32: inside both chunks.
            let words = _mm256_loadu_si256(w.add(h * 16).cast());
            let even_w = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(words));
            let odd_w = _mm256_castsi256_ps(_mm256_and_si256(words, odd));
            let (even_x, odd_x) = (
                _mm256_loadu_ps(x.add(h * 16)),
                _mm256_loadu_ps(x.add(h * 16 + 8)),
            );
            v[2 * h] = _mm256_add_ps(v[2 * h], _mm256_mul_ps(even_w, even_x));
            v[2 * h + 1] = _mm256_add_ps(v[2 * h + 1], _mm256_mul_ps(odd_w, odd_x));
        }
    }
}

/// `x` with every sixteen values of each whole 32-wide chunk reordered evens first (`x0 x2
/// .. x14 x1 x3 .. x15`), the order [`Weight::body32`] reads for bf16 weights; the values
/// after the last whole chunk are copied as they are.
fn split_pairs(x: &[f32], out: &mut [f32]) {
    let body = x.len() / 32 * 32;
    for (src, dst) in x[..body].chunks_exact(16).zip(out.chunks_exact_mut(16)) {
        for l in 0..8 {
            dst[l] = src[2 * l];
            dst[8 + l] = src[2 * l + 1];
        }
    }
    out[body..x.len()].copy_from_slice(&x[body..]);
}

/// A dot product of a weight row with an activation row.
type DotFn<W> = fn(&[W], &[f32]) -> f32;

/// The dot product for this CPU: with AVX2 where it has it (bitwise the portable result),
/// and whether that one wants the activation row in `split_pairs` order.
fn dot_fn<W: Weight>() -> (DotFn<W>, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            let avx2: DotFn<W> = |w, x| {
                // SAFETY: AVX2 is present (checked just above).
                unsafe { dot_avx2(w, x) }
            };
            return (avx2, W::SPLIT_PAIRS);
        }
    }
    (dot, false)
}

/// The f32 dot product for this CPU, as the weight GEMMs use it (AVX2 where present,
/// bitwise the portable [`dot`]).
pub(crate) fn f32_dot() -> DotFn<f32> {
    dot_fn::<f32>().0
}

/// [`dot`] with the 32-wide body in AVX2 registers: the same four accumulators of eight
/// lanes, the same separate multiplies and adds in the same order, so the same bits. `x`
/// is in `split_pairs` order where `W::SPLIT_PAIRS`.
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
        // SAFETY: i + 32 <= body <= k: inside both slices.
        W::body32(pw.add(i), px.add(i), &mut v);
        i += 32;
    }
    let mut acc = [[0f32; 8]; 4];
    for (dst, v) in acc.iter_mut().zip(v) {
        _mm256_storeu_ps(dst.as_mut_ptr(), v);
    }
    finish(acc, &w[body..k], &x[body..k])
}

/// `sum_i w[i] * x[i]` in f32: four independent accumulators of eight lanes (so the adds
/// do not wait on each other; element `i` of each 32-wide chunk goes to
/// [`Weight::slot`]), then [`finish`].
#[inline(always)]
pub(crate) fn dot<W: Weight>(w: &[W], x: &[f32]) -> f32 {
    let k = w.len().min(x.len());
    let (w, x) = (&w[..k], &x[..k]);
    let mut acc = [[0f32; 8]; 4];
    let (wc, xc) = (w.chunks_exact(32), x.chunks_exact(32));
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (w32, x32) in wc.zip(xc) {
        for i in 0..32 {
            let (a, l) = W::slot(i);
            acc[a][l] += w32[i].widen() * x32[i];
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
    let (dot, split) = dot_fn::<W>();
    // The activation rows in the order the dot product reads them, made once.
    let (x, ldb) = if split {
        let mut xs = vec![0f32; s.n * s.k];
        for j in 0..s.n {
            split_pairs(
                &x[j * s.ldb..j * s.ldb + s.k],
                &mut xs[j * s.k..(j + 1) * s.k],
            );
        }
        (std::borrow::Cow::Owned(xs), s.k)
    } else {
        (std::borrow::Cow::Borrowed(x), s.ldb)
    };
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
                    out[j * rows + i] = dot(wr, &x[j * ldb..j * ldb + s.k]);
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
        /// The dot product this CPU runs, fed as `gemm` feeds it.
        fn fast<W: Weight>(w: &[W], x: &[f32]) -> f32 {
            let (f, split) = dot_fn::<W>();
            let mut xs = x.to_vec();
            if split {
                split_pairs(x, &mut xs);
            }
            f(w, &xs)
        }
        for n in [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 41, 48, 64, 100, 1000] {
            assert_eq!(
                fast(&w[..n], &x[..n]).to_bits(),
                dot(&w[..n], &x[..n]).to_bits(),
                "bf16, k = {n}"
            );
            assert_eq!(
                fast(&wf[..n], &x[..n]).to_bits(),
                dot(&wf[..n], &x[..n]).to_bits(),
                "f32, k = {n}"
            );
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
