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

/// Runs `piece(i0, rows, out)` for pieces of `per` weight rows (the last one shorter) on
/// rayon's threads, each writing the products of its rows `i0..i0 + rows` with every
/// activation row into its own `out` (`out[j * rows + i]`: row `i0 + i`, activation row
/// `j`), then stores them into C as `alpha * out` or `alpha * out + beta * C`. Each output
/// comes from one piece, whatever the thread count.
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
    let pieces: Vec<(usize, Vec<f32>)> = (0..s.m)
        .step_by(per)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|i0| {
            let rows = per.min(s.m - i0);
            let mut out = vec![0f32; rows * s.n];
            piece(i0, rows, &mut out);
            (i0, out)
        })
        .collect();
    for (i0, out) in pieces {
        let rows = out.len() / s.n;
        for (j, col) in out.chunks_exact(rows).enumerate() {
            let dst = &mut c[j * s.ldc + i0..j * s.ldc + i0 + rows];
            for (d, v) in dst.iter_mut().zip(col) {
                *d = if s.beta == 0.0 {
                    s.alpha * v
                } else {
                    s.alpha * v + s.beta * *d
                };
            }
        }
    }
}
