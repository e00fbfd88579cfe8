//! GEMMs over int8/int4 weights whose activation rows are quantized to int8 too (a plan's
//! `Quant.act_block` 32, `ngpt compile --quant-activations int8`): integer dot products, as
//! llama.cpp's Q4_0 x Q8_0 and onnxruntime's MatMulNBits `accuracy_level` 4 compute. Opt-in:
//! it trades the weight-only path's f32-rounding parity for fewer operations a weight
//! (on a CPU without AVX-512 the weight-only int4 kernel is bound by converting nibbles to
//! f32, BENCHMARKS.md).
//!
//! Every output element has one definition, whatever the other rows of the call, the
//! thread and the CPU:
//!
//! - each activation row is cut into blocks of [`QBLOCK`] values (the weights' blocks; K
//!   a multiple of 32, the plan's validation holds it); block `b` gets the scale `d = m /
//!   127` (f32), `m` the largest magnitude in the block, and the integers `round(x * (127 /
//!   m))` (ties to even; all 0 where `m` is 0). A NaN or an infinity in a block makes its
//!   scale NaN, so the outputs are NaN, never a number that hides it ([`quantize_row`]);
//! - eight lanes, each starting at +0. Int8 weights: block `b` adds, in lane `l`, the
//!   exact integer `sum q_w * q_x` over the block's entries `4l..4l + 4`, converted to f32,
//!   times `d_w * d_x` (one rounding), as one fused multiply-add. Int4 weights: the blocks
//!   go in pairs (`2p`, `2p + 1`; a last odd block pairs with nothing); lanes 0-3 take block
//!   `2p`, lanes 4-7 block `2p + 1`, lane `l` the entries `2i, 2i + 1` for `i` in `4 (l % 4)
//!   .. 4 (l % 4) + 4`, the same way;
//! - the lanes summed in the CPU kernels' one tree (`sum_tree.rs`).
//!
//! The integer sums are exact, so the AVX2 body (`maddubs` / `madd` on the integers) and
//! the portable code are bitwise equal; every output is computed whole by one thread in
//! an order that depends only on its weight row and activation row, so a sequence gets the
//! same bits alone or in any batch, at any thread count.

use super::quant::Kernels;
use super::weight_gemm::{in_pieces, Shape};
use crate::plan::widen_f16;
use crate::plan::{QuantBits, QuantWeight};

/// Values of an activation block: the only block this path takes (the weights' too).
pub(crate) const QBLOCK: usize = ngpt_schemas::plan::INT8_ACT_BLOCK as usize;

/// Weight rows per piece of work.
const ROWS_PER_PIECE: usize = 64;

/// One activation row quantized, laid out as the kernels read it.
#[derive(Debug, Default, Clone)]
pub(crate) struct ActRow {
    /// The integers: int8 weights, in order; int4 weights, 64 a pair of blocks: the even
    /// entries of both blocks (16 + 16), then the odd ones (an odd last block padded with
    /// 0s).
    q: Vec<i8>,
    /// Int4 weights: eight lanes a pair, `8 * (the sum of the integers the lane covers)`:
    /// the stored nibbles are `q_w + 8`.
    corr: Vec<i32>,
    /// Eight lanes a block (int8) or a pair (int4): the scale of the block each lane takes.
    d: Vec<f32>,
}

/// The scale and integers of one block of activations (see the module documentation).
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let m = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if x.iter().any(|v| !v.is_finite()) {
        q.fill(0);
        return f32::NAN;
    }
    let inv = if m > 0.0 { 127.0 / m } else { 0.0 };
    // 1.5 * 2^23: adding it leaves no fraction bits below 1 for values of magnitude under
    // 2^22, so the sum rounds to an integer, ties to even (the default rounding), and
    // subtracting it is exact: `round_ties_even` without the `rintf` call that x86-64's
    // baseline lowers it to (measured 3.6% of an int4 decode).
    const ROUND: f32 = 12_582_912.0;
    for (q, v) in q.iter_mut().zip(x) {
        // |v * inv| <= 127 (up to rounding, which cannot pass 127.5): the cast is exact.
        *q = ((v * inv + ROUND) - ROUND).clamp(-127.0, 127.0) as i8;
    }
    m / 127.0
}

/// Quantizes activation row `x` (a multiple of [`QBLOCK`] values) for weights of `bits`
/// into `out`, reusing its allocations.
pub(crate) fn quantize_row(x: &[f32], bits: QuantBits, out: &mut ActRow) {
    let nb = x.len() / QBLOCK;
    let mut q = [0i8; QBLOCK];
    match bits {
        QuantBits::Int8 => {
            out.q.resize(nb * QBLOCK, 0);
            out.corr.clear();
            out.d.clear();
            for (xs, qs) in x.chunks_exact(QBLOCK).zip(out.q.chunks_exact_mut(QBLOCK)) {
                out.d.extend([quantize_block(xs, qs); 8]);
            }
        }
        QuantBits::Int4 => {
            let np = nb.div_ceil(2);
            out.q.clear();
            out.q.resize(np * 64, 0);
            out.corr.clear();
            out.corr.resize(np * 8, 0);
            out.d.clear();
            out.d.resize(np * 8, 0.0);
            for b in 0..nb {
                let (p, h) = (b / 2, b % 2);
                let d = quantize_block(&x[b * QBLOCK..(b + 1) * QBLOCK], &mut q);
                let at = &mut out.q[p * 64..(p + 1) * 64];
                for i in 0..16 {
                    at[16 * h + i] = q[2 * i];
                    at[32 + 16 * h + i] = q[2 * i + 1];
                }
                out.d[p * 8 + 4 * h..p * 8 + 4 * h + 4].fill(d);
            }
            for p in 0..np {
                let at = &out.q[p * 64..(p + 1) * 64];
                for l in 0..8 {
                    let s: i32 = (4 * l..4 * l + 4)
                        .map(|i| i32::from(at[i]) + i32::from(at[32 + i]))
                        .sum();
                    out.corr[p * 8 + l] = 8 * s;
                }
            }
        }
    }
}

/// The portable dot product of one row of `w` (its bytes and its f16 scales' bits) with a
/// quantized activation row: the module documentation's operations in its order.
fn dot(w: &QuantWeight, row: &[u8], scales: &[u16], a: &ActRow, k: usize) -> f32 {
    let nb = k / QBLOCK;
    let q_w = |j: usize| i32::from(w.int(row, j));
    let mut acc = [0f32; 8];
    match w.bits {
        QuantBits::Int8 => {
            for (b, &dw) in scales[..nb].iter().enumerate() {
                let s = widen_f16(dw) * a.d[8 * b];
                for (l, acc) in acc.iter_mut().enumerate() {
                    let i: i32 = (QBLOCK * b + 4 * l..QBLOCK * b + 4 * l + 4)
                        .map(|j| q_w(j) * i32::from(a.q[j]))
                        .sum();
                    *acc = (i as f32).mul_add(s, *acc);
                }
            }
        }
        QuantBits::Int4 => {
            for p in 0..nb.div_ceil(2) {
                let q = &a.q[p * 64..(p + 1) * 64];
                for (l, acc) in acc.iter_mut().enumerate() {
                    let (h, lane) = (l / 4, l % 4);
                    let b = 2 * p + h;
                    if b >= nb {
                        // Lanes of the missing block: 0 times a scale of 0, as the AVX2
                        // body adds it.
                        *acc = 0f32.mul_add(0.0, *acc);
                        continue;
                    }
                    let mut i = 0i32;
                    for t in 0..4 {
                        let e = 4 * lane + t; // byte of the block
                        let j = QBLOCK * b + 2 * e;
                        i += q_w(j) * i32::from(q[16 * h + e])
                            + q_w(j + 1) * i32::from(q[32 + 16 * h + e]);
                    }
                    let s = widen_f16(scales[b]) * a.d[p * 8 + l];
                    *acc = (i as f32).mul_add(s, *acc);
                }
            }
        }
    }
    super::sum_tree::sum8(acc)
}

/// `R` rows' dot products with each of `C` activation rows in AVX2 registers: rows `row +
/// r * rb` (`rb` bytes a row), f16 scales `sc + r * nb` (widened here, exactly: a separate
/// widening pass over each piece's scales was 7.7% of an int4 decode, most of it waiting
/// on memory for the scales); `out[c][r]` is bitwise [`dot`]
/// of row `r` with `acts[c]` (each pair has its own accumulator and the same operations in
/// the same order, whatever `R` and `C`: several activation rows share the loads and the
/// unpacking of each weight block, nothing else).
///
/// # Safety
/// AVX2, FMA and F16C are present; the `R` rows hold `k` entries (`k` a multiple of 32)
/// and their `k / 32` scales; each of `acts` was quantized from `k` values for these bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_avx2<const R: usize, const C: usize>(
    bits: QuantBits,
    row: *const u8,
    rb: usize,
    sc: *const u16,
    nb_row: usize,
    acts: [&ActRow; C],
    k: usize,
) -> [[f32; R]; C] {
    use std::arch::x86_64::*;
    let nb = k / QBLOCK;
    let mut acc = [[_mm256_setzero_ps(); R]; C];
    // The next calls' rows (a prefetch past the weights never faults): rows lie one after
    // another, as in `quant`'s kernels.
    let next = row.wrapping_add(2 * R * rb);
    // And their scales, at the start: R rows' are R * nb * 2 bytes.
    let next_sc = sc.wrapping_add(2 * R * nb_row).cast::<u8>();
    for off in (0..R * nb_row * 2).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(next_sc.wrapping_add(off).cast());
    }
    let ones = _mm256_set1_epi16(1);
    match bits {
        QuantBits::Int8 => {
            for b in 0..nb {
                // R blocks of 32 bytes a step: R / 2 lines.
                let at = next.wrapping_add(b * R * QBLOCK);
                _mm_prefetch::<_MM_HINT_T0>(at.cast());
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64).cast());
                for r in 0..R {
                    // SAFETY (loads): block b lies inside every row and activation row.
                    let w = _mm256_loadu_si256(row.add(r * rb + QBLOCK * b).cast());
                    let aw = _mm256_abs_epi8(w);
                    let h = _mm_cvtsi32_si128(i32::from(*sc.add(r * nb_row + b)));
                    let dw = _mm256_broadcastss_ps(_mm_cvtph_ps(h));
                    for (acc, a) in acc.iter_mut().zip(acts) {
                        let qx = _mm256_loadu_si256(a.q.as_ptr().add(QBLOCK * b).cast());
                        let dx = _mm256_loadu_ps(a.d.as_ptr().add(8 * b));
                        // |w| * (q_x with w's sign): exact, at most 2 * 128 * 127 a pair.
                        let s16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(qx, w));
                        let i = _mm256_madd_epi16(s16, ones);
                        let s = _mm256_mul_ps(dw, dx);
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), s, acc[r]);
                    }
                }
            }
        }
        QuantBits::Int4 => {
            let m = _mm256_set1_epi8(0x0f);
            let idx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
            let whole = nb / 2;
            for p in 0..nb.div_ceil(2) {
                // R pairs of 32 bytes a step: R / 2 lines.
                let at = next.wrapping_add(p * R * 32);
                _mm_prefetch::<_MM_HINT_T0>(at.cast());
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64).cast());
                for r in 0..R {
                    let (w, dw) = if p < whole {
                        // Two blocks: 32 bytes, two scales.
                        let w = _mm256_loadu_si256(row.add(r * rb + 32 * p).cast());
                        let h2 = sc.add(r * nb_row + 2 * p).cast::<i32>().read_unaligned();
                        (w, _mm_cvtph_ps(_mm_cvtsi32_si128(h2)))
                    } else {
                        // The last, odd block alone: 16 bytes (the rest 0: adds 0) and
                        // its scale (the other lanes' 0).
                        let w = _mm256_zextsi128_si256(_mm_loadu_si128(
                            row.add(r * rb + 32 * p).cast(),
                        ));
                        let h = i32::from(*sc.add(r * nb_row + 2 * p));
                        (w, _mm_cvtph_ps(_mm_cvtsi32_si128(h)))
                    };
                    let lo = _mm256_and_si256(w, m);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), m);
                    let dw = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dw), idx);
                    for (acc, a) in acc.iter_mut().zip(acts) {
                        let qlo = _mm256_loadu_si256(a.q.as_ptr().add(64 * p).cast());
                        let qhi = _mm256_loadu_si256(a.q.as_ptr().add(64 * p + 32).cast());
                        let corr = _mm256_loadu_si256(a.corr.as_ptr().add(8 * p).cast());
                        let dx = _mm256_loadu_ps(a.d.as_ptr().add(8 * p));
                        // Nibbles (0..15) times q_x: at most 2 * 15 * 127 a pair, twice.
                        let s16 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, qlo),
                            _mm256_maddubs_epi16(hi, qhi),
                        );
                        let i = _mm256_sub_epi32(_mm256_madd_epi16(s16, ones), corr);
                        let s = _mm256_mul_ps(dw, dx);
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), s, acc[r]);
                    }
                }
            }
        }
    }
    // Loops, not `map` closures: those were calls the compiler did not inline (8% of a
    // prompt's time).
    let mut out = [[0f32; R]; C];
    for (out, acc) in out.iter_mut().zip(&acc) {
        for (o, &v) in out.iter_mut().zip(acc) {
            *o = super::sum_tree::sum8_avx(v);
        }
    }
    out
}

/// Runs the GEMM `C = alpha W x^T + beta C` with `x`'s rows quantized (`w.act_block` 32,
/// `s.k == w.k` a multiple of 32: the plan's validation holds both; the executor has
/// checked x and c). Any number of activation rows.
pub(crate) fn gemm(s: Shape, w: &QuantWeight, x: &[f32], c: &mut [f32]) {
    gemm_with(Kernels::detect(), s, w, x, c)
}

/// [`gemm`] with the given kernels (the portable ones where `kern.avx2` is false).
fn gemm_with(kern: Kernels, s: Shape, w: &QuantWeight, x: &[f32], c: &mut [f32]) {
    if s.m == 0 || s.n == 0 {
        return;
    }
    // What the plan's validation and the executor hold; the unsafe bodies rely on it.
    assert!(
        w.act_block == QBLOCK
            && s.k == w.k
            && s.k.is_multiple_of(QBLOCK)
            && s.m <= w.rows
            && x.len() >= (s.n - 1) * s.ldb + s.k,
        "quant_act::gemm: shape {s:?} does not fit a {}x{} weight with act_block {} and {} activations",
        w.rows,
        w.k,
        w.act_block,
        x.len()
    );
    let acts: Vec<ActRow> = (0..s.n)
        .map(|j| {
            let mut a = ActRow::default();
            quantize_row(&x[j * s.ldb..j * s.ldb + s.k], w.bits, &mut a);
            a
        })
        .collect();
    in_pieces(s, ROWS_PER_PIECE, c, |m0, rows, out| {
        let mut j = 0;
        #[cfg(target_arch = "x86_64")]
        if kern.avx2 {
            // SAFETY (both calls): AVX2, FMA and F16C are present (`Kernels::detect`); the
            // piece's rows m0.. exist with their scales; the activation rows were quantized
            // from s.k == w.k values for w.bits (the assert above).
            while j + ACT_ROWS <= acts.len() {
                let a = std::array::from_fn(|c| &acts[j + c]);
                unsafe { piece_avx2::<WEIGHT_ROWS, ACT_ROWS>(w, m0, rows, a, j, out) };
                j += ACT_ROWS;
            }
            while j < acts.len() {
                unsafe { piece_avx2::<4, 1>(w, m0, rows, [&acts[j]], j, out) };
                j += 1;
            }
        }
        let (rb, nb) = (w.row_bytes(), w.n_blocks());
        for (j, a) in acts.iter().enumerate().skip(j) {
            for (i, o) in out[j * rows..(j + 1) * rows].iter_mut().enumerate() {
                let r = m0 + i;
                let (row, sc) = (
                    &w.data[r * rb..(r + 1) * rb],
                    &w.scales[r * nb..(r + 1) * nb],
                );
                *o = dot(w, row, sc, a, w.k);
            }
        }
    });
}

/// Activation rows a call of the AVX2 kernel takes in a prompt or a batch (each weight
/// block is loaded and unpacked once for all of them), and weight rows beside them: one
/// (four accumulators; two weight rows spilled registers and ran slower, BENCHMARKS.md
/// session 16).
const ACT_ROWS: usize = 4;
/// See [`ACT_ROWS`].
const WEIGHT_ROWS: usize = 1;

/// The products of a piece's `rows` weight rows (from row `m0`) with activation rows
/// `j..j + C` (`acts`), into `out[(j + c) * rows + i]`: `R` weight rows a kernel call,
/// then one at a time.
///
/// # Safety
/// As [`dots_avx2`]: AVX2, FMA and F16C are present; rows `m0..m0 + rows` exist with their
/// scales; `acts` were quantized from `w.k` values for `w.bits`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn piece_avx2<const R: usize, const C: usize>(
    w: &QuantWeight,
    m0: usize,
    rows: usize,
    acts: [&ActRow; C],
    j: usize,
    out: &mut [f32],
) {
    let (rb, nb) = (w.row_bytes(), w.n_blocks());
    // The weight's slices once (`Elems` derefs through a `dyn AsRef`, a call).
    let (data, scales): (&[u8], &[u16]) = (&w.data, &w.scales);
    let mut store = |i: usize, v: &[f32], c: usize| {
        out[(j + c) * rows + i..(j + c) * rows + i + v.len()].copy_from_slice(v)
    };
    let mut i = 0;
    while i + R <= rows {
        let (row, sc) = (
            data[(m0 + i) * rb..].as_ptr(),
            scales[(m0 + i) * nb..].as_ptr(),
        );
        let v = dots_avx2::<R, C>(w.bits, row, rb, sc, nb, acts, w.k);
        v.iter().enumerate().for_each(|(c, v)| store(i, v, c));
        i += R;
    }
    while i < rows {
        let (row, sc) = (
            data[(m0 + i) * rb..].as_ptr(),
            scales[(m0 + i) * nb..].as_ptr(),
        );
        let v = dots_avx2::<1, C>(w.bits, row, rb, sc, nb, acts, w.k);
        v.iter().enumerate().for_each(|(c, v)| store(i, v, c));
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::quant::tests::{dequantized, shape, weight};

    /// `n` activation rows of `k` values (rows `k + 1` apart, as [`shape`] says) whose
    /// blocks of 32 have different largest magnitudes from block to block and from row to
    /// row, so that each (row, block) has its own scale: a kernel that took another row's
    /// or block's scale fails.
    fn xs(n: usize, k: usize) -> Vec<f32> {
        (0..n * (k + 1))
            .map(|i| {
                let (j, e) = (i / (k + 1), i % (k + 1));
                let size = 1 + (e / QBLOCK * 7 + j * 3) % 5;
                ((i * 13 % 29) as f32 - 14.0) / 8.0 * size as f32
            })
            .collect()
    }

    /// `w` with int8 activations.
    fn act(mut w: QuantWeight) -> QuantWeight {
        w.act_block = QBLOCK;
        w
    }

    /// (rows, k): rows not a multiple of the kernel's four; k of 1 to 88 blocks, odd and
    /// even counts (int4's last block alone), the 0.5b preset's 1024 and 2816.
    const CASES: [(usize, usize); 7] = [
        (1, 32),
        (7, 64),
        (9, 96),
        (66, 160),
        (13, 1024),
        (5, 2816),
        (130, 256),
    ];

    fn bits_of(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn quantized_blocks_take_127_at_their_largest_value_and_round_ties_to_even() {
        let mut x = vec![0f32; 2 * QBLOCK];
        // Block 0: largest magnitude 127 (scale 1, exact): 0.5 and 2.5 are ties to even,
        // 1.5 too.
        x[..5].copy_from_slice(&[-127.0, 0.5, 1.5, 2.5, 63.7]);
        // Block 1: all zeros: scale 0 and integers 0.
        let mut a = ActRow::default();
        quantize_row(&x, QuantBits::Int8, &mut a);
        assert_eq!(&a.q[..5], &[-127, 0, 2, 2, 64]);
        assert_eq!(&a.d[..8], &[1.0; 8]);
        assert!(a.q[QBLOCK..].iter().all(|&q| q == 0) && a.d[8..].iter().all(|&d| d == 0.0));
        // Int4's layout: the evens of both blocks, then the odds.
        quantize_row(&x, QuantBits::Int4, &mut a);
        assert_eq!(
            (a.q[0], a.q[1], a.q[2], a.q[32], a.q[33]),
            (-127, 2, 64, 0, 2)
        );
        // Lane 0 covers entries 0..8 of block 0: 8 times their sum.
        assert_eq!(a.corr[0], 8 * (-127 + 2 + 64 + 2));
        assert_eq!(&a.d[..8], &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn a_nan_or_an_infinity_in_an_activation_block_makes_its_outputs_nan() {
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            for bad in [f32::NAN, f32::INFINITY] {
                let (m, k) = (9, 96);
                let w = act(weight(bits, m, k, 32));
                let s = shape(m, 1, k);
                let mut x = xs(1, k);
                x[70] = bad;
                let mut c = vec![0f32; s.ldc];
                gemm(s, &w, &x, &mut c);
                assert!(
                    c[..m].iter().all(|v| v.is_nan()),
                    "{bits:?} {bad}: {:?}",
                    &c[..m]
                );
            }
        }
    }

    #[test]
    fn outputs_are_the_exact_dot_products_of_the_dequantized_integers() {
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            for (m, k) in CASES {
                let w = act(weight(bits, m, k, 32));
                let deq = dequantized(&w);
                // One call of the 4-activation-row kernel and a lone row.
                let n = 5;
                let s = shape(m, n, k);
                let x = xs(n, k);
                let mut c = vec![f32::NAN; n * s.ldc];
                gemm(s, &w, &x, &mut c);
                for j in 0..n {
                    // The activations as the kernels see them: q * d per block.
                    let xj = &x[j * s.ldb..j * s.ldb + k];
                    let mut xq = vec![0f64; k];
                    for (b, xs) in xj.chunks(QBLOCK).enumerate() {
                        let mut q = [0i8; QBLOCK];
                        let d = quantize_block(xs, &mut q);
                        for i in 0..QBLOCK {
                            xq[b * QBLOCK + i] = f64::from(q[i]) * f64::from(d);
                        }
                        // The dequantized activations are within half a step of x.
                        for (i, &v) in xs.iter().enumerate() {
                            assert!(
                                (xq[b * QBLOCK + i] - f64::from(v)).abs() <= 0.5001 * f64::from(d)
                            );
                        }
                    }
                    for r in 0..m {
                        let (dot, mag) = (0..k).fold((0f64, 0f64), |(d, a), i| {
                            let t = f64::from(deq[r * k + i]) * xq[i];
                            (d + t, a + t.abs())
                        });
                        let got = f64::from(c[j * s.ldc + r]);
                        let want = 0.75 * dot;
                        // f32 rounding of block partial sums: far below 1e-6 of the terms.
                        assert!(
                            (got - want).abs() <= 1e-6 * mag + 1e-30,
                            "{bits:?} m{m} k{k} ({r},{j}): {got} vs {want} (terms {mag})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_avx2_body_is_bitwise_the_portable_one() {
        if !Kernels::detect().avx2 {
            eprintln!("no AVX2 on this CPU: the portable body is the only one");
            return;
        }
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            for (m, k) in CASES {
                let w = act(weight(bits, m, k, 32));
                // The 4-activation-row kernel, then lone rows (four weight rows a call,
                // the rows left over one at a time where m is not a multiple of 4).
                let n = 6;
                let s = shape(m, n, k);
                let x = xs(n, k);
                let run = |kern| {
                    let mut c = vec![f32::NAN; n * s.ldc];
                    gemm_with(kern, s, &w, &x, &mut c);
                    bits_of(&c)
                };
                assert_eq!(
                    run(Kernels::detect()),
                    run(Kernels::portable()),
                    "{bits:?} m{m} k{k}"
                );
            }
        }
    }

    #[test]
    fn each_activation_row_is_bitwise_its_gemm_alone_at_any_thread_count() {
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            let (m, k) = (75, 160);
            let w = act(weight(bits, m, k, 32));
            let n = 40;
            let s = shape(m, n, k);
            let x = xs(n, k);
            let mut all = vec![f32::NAN; n * s.ldc];
            rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .expect("pool")
                .install(|| gemm(s, &w, &x, &mut all));
            let s1 = shape(m, 1, k);
            for j in 0..n {
                let mut alone = vec![f32::NAN; s1.ldc];
                gemm(s1, &w, &x[j * s.ldb..], &mut alone);
                assert_eq!(
                    bits_of(&all[j * s.ldc..j * s.ldc + m]),
                    bits_of(&alone[..m]),
                    "{bits:?}: row {j} of {n}"
                );
            }
        }
    }
}
