//! The plan's weight GEMM as the CPU executor runs it: its [`Shape`], the row count up to
//! which every row's result is its own ([`MAX_N`]), and the split of the weight rows over
//! rayon's threads that the kernels share (`in_pieces`).
//!
//! Every weight GEMM of a plan has one form: `C = alpha W x^T + beta C`, W's rows and the
//! activation rows both contiguous along K, C column-major (column `j` holds activation
//! row `j`'s outputs). Which kernel runs it depends on the weights and the activation rows:
//!
//! - f32 and bf16 weights, up to [`super::tiles::GEMM_MAX_N`] rows: [`super::tiles`]
//!   (register tiles); more rows: the gemm crate ([`super::bf16`] widens bf16 blocks for it);
//! - int8 and int4 weights, up to [`MAX_N`] rows: [`super::quant`]'s dot products; more:
//!   dequantized pieces of rows through the f32 tiles, and beyond
//!   [`super::tiles::GEMM_MAX_N`] dequantized blocks of rows into the gemm crate.
//!
//! Up to [`MAX_N`] rows, each output is computed whole by one thread in an order that
//! depends only on its weight row and its activation row: a sequence decoded in a batch
//! gets the bits it gets alone (the engine's batch invariance, RELIABILITY.md).

use rayon::prelude::*;

/// At most this many activation rows a GEMM call for batch invariance on every weight
/// format: the tiles hold it up to [`super::tiles::GEMM_MAX_N`] (512), the quantized dot
/// products up to this.
pub const MAX_N: usize = 32;

/// The shape of a weight GEMM: `C[m x n] = alpha * W[m x k] . X[n x k]^T + beta * C`, with
/// W rows `lda` apart, X rows `ldb` apart, C column-major with columns `ldc` apart.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Weight rows: the outputs per activation row (the rows of C).
    pub m: usize,
    /// Activation rows (the columns of C).
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

/// A piece's weights, at most, when they are read more than once (more than two
/// activation rows): they stay in L2 while the activation rows go over them.
const PIECE_BYTES: usize = 128 << 10;

/// Weight rows a piece for `n` activation rows and weight rows of `row_bytes` bytes: `max`
/// when the piece is read once or twice (at most two activation rows: bound by memory, not
/// by L2), else as many as [`PIECE_BYTES`] holds, between `min` and `max`.
pub(crate) fn piece_rows(n: usize, row_bytes: usize, min: usize, max: usize) -> usize {
    if n <= 2 {
        max
    } else {
        (PIECE_BYTES / row_bytes.max(1)).clamp(min, max)
    }
}

/// Runs `f` on the first `len` values of this thread's scratch `key` (grown as needed and
/// kept for the thread's next call, so its pages are not faulted in and cleared per GEMM),
/// or on a fresh buffer where that scratch is in use on this thread already (a GEMM rayon
/// ran here while another one waited): never a panic.
pub(crate) fn with_scratch<R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0.0);
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

thread_local! {
    /// [`in_pieces`]' products of a piece, reused by the pieces this thread runs.
    static PRODUCTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `piece(i0, rows, out)` for pieces of `per` weight rows (the last one shorter) on
/// rayon's threads, each writing the products of its rows `i0..i0 + rows` with every
/// activation row into `out` (`out[j * rows + i]`: row `i0 + i`, activation row `j`; every
/// element, as `out` holds whatever this thread's scratch held), which the same thread then
/// stores into its part of C as `alpha * out` or `alpha * out + beta * C`. Each output
/// comes from one piece, whatever the thread count.
///
/// The stores run in the pieces, on every thread, while the products are in cache: stored
/// by one thread after all pieces, they took 7-8% of a 512-row GEMM of the small preset on
/// two threads (BENCHMARKS.md, session 22).
pub(crate) fn in_pieces(
    s: Shape,
    per: usize,
    c: &mut [f32],
    piece: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    if s.m == 0 || s.n == 0 {
        return;
    }
    let per = per.max(1);
    let count = s.m.div_ceil(per);
    // Each piece's part of each of the n columns of C (rows i0..i0 + rows), piece by
    // piece: disjoint slices, so the pieces store in parallel without sharing one.
    let mut cols: Vec<_> = c
        .chunks_mut(s.ldc)
        .take(s.n)
        .map(|col| col[..s.m].chunks_mut(per))
        .collect();
    let mut parts = Vec::with_capacity(count * s.n);
    for _ in 0..count {
        parts.extend(cols.iter_mut().filter_map(Iterator::next));
    }
    // The caller has checked that C holds n columns of m rows: every part is there.
    debug_assert_eq!(parts.len(), count * s.n);
    parts.par_chunks_mut(s.n).enumerate().for_each(|(p, part)| {
        let (i0, rows) = (p * per, per.min(s.m - p * per));
        with_scratch(&PRODUCTS, rows * s.n, |out| {
            if cfg!(debug_assertions) {
                // An element the piece leaves unwritten shows in the tests' results.
                out.fill(f32::NAN);
            }
            piece(i0, rows, out);
            for (dst, col) in part.iter_mut().zip(out.chunks_exact(rows)) {
                for (d, v) in dst.iter_mut().zip(col) {
                    *d = if s.beta == 0.0 {
                        s.alpha * v
                    } else {
                        s.alpha * v + s.beta * *d
                    };
                }
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every output lands in its place of C, stored as `alpha * out + beta * C` by the
    /// piece that computed it, with C's padding rows untouched, for pieces that do not
    /// divide m, on one thread and on three.
    #[test]
    fn pieces_store_their_products_into_their_part_of_c() {
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (m, n, per, beta) in [(10, 3, 4, 0.0), (7, 1, 7, 0.5), (25, 5, 3, -2.0)] {
                let ldc = m + 3;
                let s = Shape {
                    m,
                    n,
                    k: 1,
                    lda: 1,
                    ldb: 1,
                    ldc,
                    alpha: 0.75,
                    beta,
                };
                let c0: Vec<f32> = (0..n * ldc).map(|i| (i % 7) as f32 - 3.0).collect();
                let mut c = c0.clone();
                // Output (i, j) is 100 i + j, written by the piece that holds row i.
                pool.install(|| {
                    in_pieces(s, per, &mut c, |i0, rows, out| {
                        assert!(i0 % per == 0 && rows == per.min(m - i0));
                        for j in 0..n {
                            for i in 0..rows {
                                out[j * rows + i] = (100 * (i0 + i) + j) as f32;
                            }
                        }
                    })
                });
                for j in 0..n {
                    for i in 0..ldc {
                        let at = j * ldc + i;
                        let want = if i < m {
                            0.75 * (100 * i + j) as f32
                                + if beta == 0.0 { 0.0 } else { beta * c0[at] }
                        } else {
                            c0[at]
                        };
                        assert_eq!(
                            c[at], want,
                            "m{m} n{n} per{per} ({i},{j}), {threads} threads"
                        );
                    }
                }
            }
        }
    }
}
