//! GEMMs over bf16 weights with f32 accumulation: what a bf16 plan's GEMM steps run on the
//! CPU, reading half the bytes of widened f32 weights.
//!
//! The plan's GEMMs all have one form (`C = alpha W x^T + beta C`, column-major, `A = W`
//! transposed): weight rows are contiguous, activation rows are contiguous. Decode-sized
//! products (few activation rows) are dot products over bf16 weight rows, bound by memory
//! bandwidth; larger ones widen a block of weight rows at a time into an f32 scratch and
//! run the gemm crate on it. Every output element is computed by one thread in a fixed
//! order, so results do not depend on the thread count.

use rayon::prelude::*;

/// At most this many activation rows take the dot-product path.
const DOT_MAX_N: usize = 8;
/// Weight rows per piece of work.
const ROWS_PER_PIECE: usize = 64;
/// Weight rows widened at a time on the blocked path.
const BLOCK_ROWS: usize = 256;

/// bf16 bits to f32 (exact).
#[inline]
fn widen(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// bf16 bits of `v`, which must be a widened bf16 (exact; the low 16 bits are zero).
pub fn narrow_exact(v: f32) -> u16 {
    (v.to_bits() >> 16) as u16
}

/// The dot product, compiled for AVX2 where the CPU has it. Each of the eight lanes does
/// the same separate multiplies and adds in the same order whatever the vector width (no
/// FMA), so the result is bitwise the same on every x86-64 machine.
fn dot_fn() -> fn(&[u16], &[f32]) -> f32 {
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(w: &[u16], x: &[f32]) -> f32 {
    dot(w, x)
}

/// `sum_i widen(w[i]) * x[i]` in f32, eight lanes then their sum.
#[inline(always)]
fn dot(w: &[u16], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (wc, xc) = (w.chunks_exact(8), x.chunks_exact(8));
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (w8, x8) in wc.zip(xc) {
        for l in 0..8 {
            acc[l] += widen(w8[l]) * x8[l];
        }
    }
    let mut tail = 0f32;
    for (&a, &b) in wr.iter().zip(xr) {
        tail += widen(a) * b;
    }
    let pairs = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (pairs[0] + pairs[2]) + (pairs[1] + pairs[3]) + tail
}

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

/// Runs the GEMM. The caller has checked that `w`, `x` and `c` hold every element the
/// shape touches (the CPU executor checks every GEMM's extents first).
pub fn gemm(s: Shape, w: &[u16], x: &[f32], c: &mut [f32]) {
    if s.m == 0 || s.n == 0 {
        return;
    }
    // k = 0 (C = beta C, as cuBLAS and the f32 path compute it) has no rows to widen.
    if s.n <= DOT_MAX_N || s.k == 0 {
        dots(s, w, x, c)
    } else {
        blocked(s, w, x, c)
    }
}

fn dots(s: Shape, w: &[u16], x: &[f32], c: &mut [f32]) {
    let dot = dot_fn();
    // Each piece computes its rows of C for every column, into its own buffer.
    let pieces: Vec<(usize, Vec<f32>)> = (0..s.m)
        .step_by(ROWS_PER_PIECE)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|m0| {
            let m1 = (m0 + ROWS_PER_PIECE).min(s.m);
            let mut out = Vec::with_capacity((m1 - m0) * s.n);
            for j in 0..s.n {
                let xj = &x[j * s.ldb..j * s.ldb + s.k];
                for r in m0..m1 {
                    out.push(dot(&w[r * s.lda..r * s.lda + s.k], xj));
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

fn blocked(s: Shape, w: &[u16], x: &[f32], c: &mut [f32]) {
    let mut scratch = vec![0f32; BLOCK_ROWS * s.k];
    for m0 in (0..s.m).step_by(BLOCK_ROWS) {
        let rows = BLOCK_ROWS.min(s.m - m0);
        scratch[..rows * s.k]
            .par_chunks_mut(s.k)
            .enumerate()
            .for_each(|(i, dst)| {
                let src = &w[(m0 + i) * s.lda..(m0 + i) * s.lda + s.k];
                for (d, &b) in dst.iter_mut().zip(src) {
                    *d = widen(b);
                }
            });
        // SAFETY: the block's C rows m0..m0+rows of every column lie inside c (the caller
        // checked the whole m x n extent), scratch holds rows x k, x holds n rows of k.
        unsafe {
            gemm::gemm(
                rows,
                s.n,
                s.k,
                c.as_mut_ptr().add(m0),
                s.ldc as isize,
                1,
                s.beta != 0.0,
                scratch.as_ptr(),
                1,
                s.k as isize,
                x.as_ptr(),
                s.ldb as isize,
                1,
                s.beta,
                s.alpha,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(m: usize, n: usize, k: usize, beta: f32) {
        let (lda, ldb, ldc) = (k + 3, k + 1, m + 2);
        let w: Vec<u16> = (0..m * lda)
            .map(|i| narrow_exact(((i * 37 % 101) as f32 - 50.0) / 64.0))
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
                    .map(|i| widen(w[r * lda + i]) as f64 * x[j * ldb + i] as f64)
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
    fn both_paths_match_exact_products_on_odd_shapes() {
        for (m, n, k) in [
            (1, 1, 1),
            (67, 1, 13),
            (130, 3, 70),
            (300, 8, 33),
            (517, 9, 40),
            (64, 40, 17),
        ] {
            case(m, n, k, 0.0);
            case(m, n, k, 0.5);
        }
    }

    #[test]
    fn k_zero_scales_c_by_beta_on_both_paths() {
        // Found by fuzz/ (target plan): the blocked path chunked its scratch by k and
        // panicked on k = 0.
        for n in [3, 40] {
            case(64, n, 0, 0.0);
            case(64, n, 0, 0.5);
        }
    }

    #[test]
    fn the_avx2_dot_product_is_bitwise_the_portable_one() {
        let w: Vec<u16> = (0..1000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 17) as u16 & 0x7f7f)
            .collect();
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 7.0)
            .collect();
        for n in [0, 1, 7, 8, 9, 100, 1000] {
            assert_eq!(
                dot_fn()(&w[..n], &x[..n]).to_bits(),
                dot(&w[..n], &x[..n]).to_bits()
            );
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (m, n, k) = (333, 4, 100);
        let w: Vec<u16> = (0..m * k)
            .map(|i| (i as u16).wrapping_mul(7919) & 0x3fff)
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
        let mut one = vec![0f32; m * n];
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool")
            .install(|| gemm(s, &w, &x, &mut one));
        let mut many = vec![0f32; m * n];
        rayon::ThreadPoolBuilder::new()
            .num_threads(5)
            .build()
            .expect("pool")
            .install(|| gemm(s, &w, &x, &mut many));
        assert_eq!(one, many);
    }
}
