//! Decode-sized weight GEMMs (a few activation rows) as dot products over weight rows, f32 or
//! bf16 weights alike. The executors' f32 and bf16 weight GEMMs now run on
//! [`super::tiles`] (register tiles, fused multiply-adds: faster for prompts, as fast for
//! decode) and the quantized ones on [`super::quant`]'s own kernels; no executor calls
//! [`gemm()`] any more (its tests and the tiles' tests compare against it). Attention's
//! scores use this module's dot product.
//!
//! The plan's weight GEMMs all have one form (`C = alpha W x^T + beta C`, column-major, `A =
//! W` transposed): weight rows are contiguous, activation rows are contiguous. With few
//! activation rows the product is bound by reading W once (one row) or by the multiplies (a
//! batch of rows), so each chunk of a weight row is loaded and widened once for a pair of
//! activation rows, and the pairs take a piece of weight rows in turn: the piece's weights
//! come from memory once, then from L2, while the pair's activation rows stay in L1 (every
//! weight row dotted with all of them at once put them all through L1 for each weight row:
//! 1.2x slower at 2 to 8 rows, BENCHMARKS.md). Pieces go to rayon's threads. A
//! general GEMM (the gemm crate) packs W first, which at one activation row moves the
//! weights twice; beyond [`MAX_N`] rows it wins.
//!
//! Every output element is computed by one thread in a fixed order (four accumulators of
//! eight lanes, separate multiplies and adds, no FMA), so results are bitwise the same
//! whatever the thread count, whether or not the CPU has AVX2, and whatever the other
//! activation rows: a sequence decoded in a batch of up to [`MAX_N`] gets the bits it gets
//! alone.
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

/// At most this many activation rows take the dot-product path. Measured on the 2-core dev
/// box (BENCHMARKS.md): at 16 rows it is 1.3x (f32 weights) to 1.8x (bf16) the gemm crate,
/// at 32 about even, at 64 the gemm crate is 1.2x faster (bf16).
pub const MAX_N: usize = 32;
/// Weight rows per piece of work, at most.
pub(crate) const ROWS_PER_PIECE: usize = 64;
/// A piece's weights when they are read more than once (more than two activation rows): at
/// most this many bytes, so that they stay in L2 between the column pairs.
pub(crate) const PIECE_BYTES: usize = 128 << 10;
/// How far ahead (in bytes) the AVX2 dot product prefetches weights. Measured on the 2-core
/// dev box (BENCHMARKS.md): none, 512, 1024, 2048 and 4096 bytes gave bf16 decode 41, 51,
/// 53, 53 and 56 tokens/s and f32 32, 32, 34, 30 and 31 (small preset).
const PREFETCH_BYTES: usize = 1024;

/// The shape of a weight GEMM: `C[m x n] = alpha * W[m x k] . X[n x k]^T + beta * C`, with
/// W rows `lda` apart, X rows `ldb` apart, C column-major with columns `ldc` apart.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Weight rows: the outputs per activation row (the rows of C).
    pub m: usize,
    /// Activation rows (the columns of C); the executors take this path for at most
    /// [`MAX_N`].
    pub n: usize,
    /// Elements per dot product: the length of each weight row and activation row used.
    pub k: usize,
    /// Elements from one weight row's start to the next's (at least `k`).
    pub lda: usize,
    /// Elements from one activation row's start to the next's (at least `k`).
    pub ldb: usize,
    /// Elements from one column of C to the next (at least `m`); column j holds activation
    /// row j's `m` outputs.
    pub ldc: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of what C held; 0 overwrites C without reading it, as cuBLAS does.
    pub beta: f32,
}

/// A weight element: f32, or bf16 bits (`u16`), read as f32 exactly.
pub trait Weight: Copy + Send + Sync + 'static {
    /// Whether the AVX2 body reads the activation row in `split_pairs` order.
    const SPLIT_PAIRS: bool;

    /// The element's value as f32, exactly (bf16 bits are an f32's upper half).
    fn widen(self) -> f32;

    /// The accumulator and lane that element `i` (0 to 31) of a 32-wide body chunk is
    /// added into; every pair is hit once per chunk.
    fn slot(i: usize) -> (usize, usize);

    /// Half `h` of a 32-wide chunk of weights (its elements `16h..16h + 16`) widened to
    /// f32 in accumulator order: element `i` lands in lane `l` of vector `a - 2h`, its
    /// [`Weight::slot`] `(a, l)`, so that vector `s` multiplies the activation values
    /// `16h + 8s..16h + 8s + 8` of the chunk as [`Weight::SPLIT_PAIRS`] orders them.
    ///
    /// # Safety
    /// `w` points at the half's 16 readable elements; the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen16(w: *const Self) -> [std::arch::x86_64::__m256; 2];
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
    unsafe fn widen16(w: *const f32) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        // SAFETY: both eight-element vectors lie inside the half.
        [_mm256_loadu_ps(w), _mm256_loadu_ps(w.add(8))]
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
    unsafe fn widen16(w: *const u16) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the sixteen elements are the half.
        let words = _mm256_loadu_si256(w.cast());
        [
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(words)),
            _mm256_castsi256_ps(_mm256_and_si256(
                words,
                _mm256_set1_epi32(0xffff_0000_u32 as i32),
            )),
        ]
    }
}

/// `x` with every sixteen values of each whole 32-wide chunk reordered evens first (`x0 x2
/// .. x14 x1 x3 .. x15`), the order [`Weight::widen16`] pairs with bf16 weights; the values
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

/// The dot products this CPU runs: with AVX2 where it has it, portable otherwise; every
/// one bitwise the portable [`dot`].
#[derive(Clone, Copy)]
struct Kernels {
    /// The CPU has AVX2 (only [`Kernels::detect`] sets it).
    avx2: bool,
}

impl Kernels {
    fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::arch::is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        Kernels { avx2 }
    }

    /// Whether the kernels want activation rows in `split_pairs` order.
    fn split<W: Weight>(self) -> bool {
        self.avx2 && W::SPLIT_PAIRS
    }

    /// `[dot(w, x) for x in xs]`, with `xs` in [`Kernels::split`] order.
    fn dots<W: Weight, const C: usize>(self, w: &[W], xs: [&[f32]; C]) -> [f32; C] {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: AVX2 is present (`detect` checked it).
            return unsafe { dots_avx2(w, xs) };
        }
        xs.map(|x| dot(w, x))
    }
}

/// The f32 dot product for this CPU, as the weight GEMMs use it (AVX2 where present,
/// bitwise the portable [`dot`]).
pub(crate) fn f32_dot() -> DotFn<f32> {
    #[cfg(target_arch = "x86_64")]
    if Kernels::detect().avx2 {
        // SAFETY: AVX2 is present (checked just above).
        return |w, x| unsafe { dots_avx2(w, [x])[0] };
    }
    dot
}

/// [`dot`] of one weight row with each of `C` activation rows, the 32-wide body in AVX2
/// registers: per activation row the same four accumulators of eight lanes, the same
/// separate multiplies and adds in the same order, so the same bits; each chunk of weights
/// is loaded and widened once for all `C`. The rows are `k = min` of all lengths long; `x`
/// is in `split_pairs` order where `W::SPLIT_PAIRS`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dots_avx2<W: Weight, const C: usize>(w: &[W], xs: [&[f32]; C]) -> [f32; C] {
    use std::arch::x86_64::*;
    let k = xs.iter().fold(w.len(), |k, x| k.min(x.len()));
    let body = k / 32 * 32;
    let pw = w.as_ptr();
    let mut v = [[_mm256_setzero_ps(); 4]; C];
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
        for h in 0..2 {
            // SAFETY: i + 32 <= body <= k: the chunk is inside every slice.
            let wv = W::widen16(pw.add(i + 16 * h));
            for (v, x) in v.iter_mut().zip(&xs) {
                let px = x.as_ptr().add(i + 16 * h);
                for (s, wv) in wv.iter().enumerate() {
                    let p = _mm256_mul_ps(*wv, _mm256_loadu_ps(px.add(8 * s)));
                    v[2 * h + s] = _mm256_add_ps(v[2 * h + s], p);
                }
            }
        }
        i += 32;
    }
    std::array::from_fn(|c| {
        let mut acc = [[0f32; 8]; 4];
        for (dst, v) in acc.iter_mut().zip(v[c]) {
            _mm256_storeu_ps(dst.as_mut_ptr(), v);
        }
        finish(acc, &w[body..k], &xs[c][body..k])
    })
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
pub(crate) fn finish<W: Weight>(mut acc: [[f32; 8]; 4], w: &[W], x: &[f32]) -> f32 {
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

/// Weight rows per piece for `n` activation rows and weight rows of `row_bytes` bytes.
fn piece_rows(n: usize, row_bytes: usize) -> usize {
    if n <= 2 {
        ROWS_PER_PIECE
    } else {
        (PIECE_BYTES / row_bytes.max(1)).clamp(8, ROWS_PER_PIECE)
    }
}

/// Runs the GEMM. The caller has checked that `w`, `x` and `c` hold every element the
/// shape touches (the CPU executor checks every GEMM's extents first).
///
/// ```
/// use ngpt_runtime::cpu::dots::{gemm, Shape};
/// // W is 2 x 3, one activation row x; C = W x^T, 2 x 1.
/// let w = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
/// let x = [1.0f32, 0.0, -2.0];
/// let s = Shape { m: 2, n: 1, k: 3, lda: 3, ldb: 3, ldc: 2, alpha: 1.0, beta: 0.0 };
/// let mut c = [f32::NAN; 2]; // beta 0: never read
/// gemm(s, &w, &x, &mut c);
/// assert_eq!(c, [-5.0, -8.0]);
/// // The same weights as bf16 bits (exact here): the same result.
/// let w16: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
/// gemm(s, &w16, &x, &mut c);
/// assert_eq!(c, [-5.0, -8.0]);
/// ```
pub fn gemm<W: Weight>(s: Shape, w: &[W], x: &[f32], c: &mut [f32]) {
    if s.m == 0 || s.n == 0 {
        return;
    }
    let kern = Kernels::detect();
    // The activation rows in the order the dot product reads them, made once.
    let (x, ldb) = if kern.split::<W>() {
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
    let xrow = |j: usize| &x[j * ldb..j * ldb + s.k];
    let piece_rows = piece_rows(s.n, s.k * size_of::<W>());
    // Each piece computes its rows of C for every column, into its own buffer. Columns go
    // in pairs, each chunk of a weight row widened once for both; the pairs go over the
    // piece's rows one after another, so the piece's weights come from memory once and
    // then from L2, and the pair's activation rows stay in L1.
    let pieces: Vec<(usize, Vec<f32>)> = (0..s.m)
        .step_by(piece_rows)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|m0| {
            let rows = piece_rows.min(s.m - m0);
            let mut out = vec![0f32; rows * s.n];
            let wrow = |i: usize| &w[(m0 + i) * s.lda..(m0 + i) * s.lda + s.k];
            for j in (0..s.n).step_by(2) {
                if j + 1 < s.n {
                    for i in 0..rows {
                        let [a, b] = kern.dots(wrow(i), [xrow(j), xrow(j + 1)]);
                        out[j * rows + i] = a;
                        out[(j + 1) * rows + i] = b;
                    }
                } else {
                    for i in 0..rows {
                        out[j * rows + i] = kern.dots(wrow(i), [xrow(j)])[0];
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
        // A second activation row for the two-row kernel.
        let x2: Vec<f32> = x.iter().rev().map(|v| v * 0.5 - 1.0).collect();
        /// The dot products this CPU runs, fed as `gemm` feeds them: one row, then two.
        fn fast<W: Weight>(w: &[W], x: &[f32], x2: &[f32]) -> [u32; 3] {
            let kern = Kernels::detect();
            let (mut xs, mut xs2) = (x.to_vec(), x2.to_vec());
            if kern.split::<W>() {
                split_pairs(x, &mut xs);
                split_pairs(x2, &mut xs2);
            }
            let [a, b] = kern.dots(w, [&xs[..], &xs2]);
            [kern.dots(w, [&xs[..]])[0], a, b].map(f32::to_bits)
        }
        fn portable<W: Weight>(w: &[W], x: &[f32], x2: &[f32]) -> [u32; 3] {
            [dot(w, x), dot(w, x), dot(w, x2)].map(f32::to_bits)
        }
        for n in [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 41, 48, 64, 100, 1000] {
            let (x, x2) = (&x[..n], &x2[..n]);
            assert_eq!(
                fast(&w[..n], x, x2),
                portable(&w[..n], x, x2),
                "bf16, k = {n}"
            );
            assert_eq!(
                fast(&wf[..n], x, x2),
                portable(&wf[..n], x, x2),
                "f32, k = {n}"
            );
        }
    }

    /// A column's result does not depend on the other columns of the GEMM: each of n = 1
    /// to 8 columns is bitwise the GEMM of that column alone (decode in a batch computes
    /// each sequence as it would alone), over several pieces and a lone last column.
    #[test]
    fn each_column_is_bitwise_its_gemm_alone() {
        fn check<W: Weight>(make: fn(usize) -> W) {
            for (m, k) in [(70, 1000), (19, 8200), (5, 45)] {
                let w: Vec<W> = (0..m * k).map(make).collect();
                let x: Vec<f32> = (0..8 * k)
                    .map(|i| ((i * 29 % 83) as f32 - 41.0) / 16.0)
                    .collect();
                let shape = |n| Shape {
                    m,
                    n,
                    k,
                    lda: k,
                    ldb: k,
                    ldc: m,
                    alpha: 1.0,
                    beta: 0.0,
                };
                let alone: Vec<Vec<f32>> = (0..8)
                    .map(|j| {
                        let mut c = vec![f32::NAN; m];
                        gemm(shape(1), &w, &x[j * k..(j + 1) * k], &mut c);
                        c
                    })
                    .collect();
                for n in 1..=8 {
                    let mut c = vec![f32::NAN; m * n];
                    gemm(shape(n), &w, &x[..n * k], &mut c);
                    for (j, col) in c.chunks(m).enumerate() {
                        let (got, want): (Vec<u32>, Vec<u32>) = col
                            .iter()
                            .zip(&alone[j])
                            .map(|(a, b)| (a.to_bits(), b.to_bits()))
                            .unzip();
                        assert!(
                            got == want,
                            "{} m{m} k{k}: column {j} of {n}",
                            std::any::type_name::<W>()
                        );
                    }
                }
            }
        }
        check::<f32>(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0);
        check::<u16>(|i| bf16(((i * 37 % 101) as f32 - 50.0) / 64.0));
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
