//! GEMMs over bf16 weights with f32 accumulation: what a bf16 plan's GEMM steps run on the
//! CPU, reading half the bytes of widened f32 weights.
//!
//! Products of up to [`tiles::GEMM_MAX_N`] activation rows (decode steps, prompts) run on
//! bf16 weight rows directly ([`super::tiles`], shared with f32 weights); larger ones widen a
//! block of weight rows at a time into an f32 scratch and run the gemm crate on it. Every
//! output element is computed by one thread in a fixed order, so results do not depend on
//! the thread count.
//!
//! The blocks are as large as [`SCRATCH_BYTES`] allows (at least [`MIN_BLOCK_ROWS`] rows):
//! each gemm call packs the activations again and synchronizes its threads, so 256-row
//! blocks made a 128-token prefill of the 0.5b preset about 1,450 calls and 1.6x slower
//! than with f32 weights (BENCHMARKS.md). The scratch is kept per thread and reused, so
//! its pages are not faulted in and cleared for every GEMM.

use std::cell::RefCell;

use rayon::prelude::*;

use super::tiles;
use super::weight_gemm::{with_scratch, Shape};
use crate::plan::widen_bf16;

/// Widened weights held at a time on the blocked path.
pub const SCRATCH_BYTES: usize = 16 << 20;
/// The fewest weight rows widened at a time (for very long rows).
pub const MIN_BLOCK_ROWS: usize = 64;

thread_local! {
    /// The blocked path's scratch, reused by the calls of this thread.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs the GEMM. The caller has checked that `w`, `x` and `c` hold every element the
/// shape touches (the CPU executor checks every GEMM's extents first).
pub fn gemm(s: Shape, w: &[u16], x: &[f32], c: &mut [f32]) {
    if s.m == 0 || s.n == 0 {
        return;
    }
    // k = 0 (C = beta C, as cuBLAS and the f32 path compute it) has no rows to widen.
    if s.n <= tiles::GEMM_MAX_N || s.k == 0 {
        tiles::gemm(s, w, x, c)
    } else {
        blocked(s, w, x, c)
    }
}

fn blocked(s: Shape, w: &[u16], x: &[f32], c: &mut [f32]) {
    blocked_with(s, x, c, widen_rows(s, w));
}

/// Widens weight row `r` of bf16 `w` into `dst` (k values).
fn widen_rows(s: Shape, w: &[u16]) -> impl Fn(usize, &mut [f32]) + Sync + '_ {
    move |r, dst| {
        let src = &w[r * s.lda..r * s.lda + s.k];
        for (d, &b) in dst.iter_mut().zip(src) {
            *d = widen_bf16(b);
        }
    }
}

/// The blocked path for any stored weight: `fill(r, dst)` writes weight row `r`'s k
/// values in f32 (widened or dequantized) into `dst`; blocks of rows go through the
/// thread's scratch into the gemm crate. `s.k > 0`.
pub fn blocked_with(s: Shape, x: &[f32], c: &mut [f32], fill: impl Fn(usize, &mut [f32]) + Sync) {
    blocked_by(s, x, c, (SCRATCH_BYTES / 4 / s.k).max(MIN_BLOCK_ROWS), fill);
}

/// The blocked path, `block_rows` weight rows at a time.
fn blocked_by(
    s: Shape,
    x: &[f32],
    c: &mut [f32],
    block_rows: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) {
    let block_rows = block_rows.min(s.m);
    with_scratch(&SCRATCH, block_rows * s.k, |scratch| {
        blocks(s, x, c, block_rows, scratch, &fill)
    });
}

fn blocks(
    s: Shape,
    x: &[f32],
    c: &mut [f32],
    block_rows: usize,
    scratch: &mut [f32],
    fill: &(impl Fn(usize, &mut [f32]) + Sync),
) {
    for m0 in (0..s.m).step_by(block_rows) {
        let rows = block_rows.min(s.m - m0);
        scratch[..rows * s.k]
            .par_chunks_mut(s.k)
            .enumerate()
            .for_each(|(i, dst)| fill(m0 + i, dst));
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
    use crate::cpu::tiles::tests::case as exact_case;

    /// Both paths (dot products up to 8 columns, widened blocks beyond) on one shape.
    fn case(m: usize, n: usize, k: usize, beta: f32) {
        exact_case(m, n, k, beta, |v| (v.to_bits() >> 16) as u16, gemm);
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
    fn the_blocked_path_holds_across_blocks_and_a_partial_last_one() {
        // The widening scratch holds 64 rows: 517 rows are 8 whole blocks and 5 rows.
        for (n, k, beta) in [(9, 40, 0.0), (12, 33, 0.5)] {
            exact_case(
                517,
                n,
                k,
                beta,
                |v| (v.to_bits() >> 16) as u16,
                |s, w, x, c| blocked_by(s, x, c, 64, widen_rows(s, w)),
            );
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
}
