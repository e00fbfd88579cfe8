//! GEMMs over weight-only quantized weights (`I8` and `I4` blocks with f16 block scales,
//! [`QuantWeight`]): what an int8 or int4 plan's GEMM steps run on the CPU.
//!
//! Decode-sized products (at most [`MAX_N`] activation rows) are dot products over
//! weight rows. The block scale stays out of the inner loop: a row's integers are converted
//! to f32 (exact) and multiplied into the activations with fused multiply-adds, sixteen
//! entries ("a unit") at a time into one partial sum of eight lanes per block; at the end of
//! a block the partial sum enters the row's accumulator scaled by the block's scale (one
//! more fused multiply-add). Lane `l` of a unit's first vector holds entry `l` (int8) or
//! `2l` (int4: the low nibbles), of its second `8 + l` or `2l + 1` (the high nibbles); the
//! entries after the last whole unit (fewer than sixteen) form a scalar partial sum scaled
//! by the last block's scale. Int4 nibbles are converted as stored (`q + 8`, unsigned: no
//! subtraction per unit); the offset enters each block's partial sum as its start value,
//! `-8` times the sum of the activations that lane multiplies over the block, made once per
//! activation row and GEMM (`block_starts`). The eight lanes are summed in a fixed tree.
//! The portable `dot` and the AVX2 + FMA body compute exactly these operations in this
//! order, so they are bitwise equal; every output element is computed whole by one thread, in an order that
//! depends only on the weight row and the activation row, so results are bitwise the same
//! whatever the thread count and whatever the other activation rows (batch invariance,
//! [`super::weight_gemm`]: a sequence decoded in a batch of up to [`MAX_N`] gets the bits it gets
//! alone).
//!
//! This is not bitwise the f32 GEMM of the dequantized weights (that one multiplies each
//! weight by its scale, then sums the products in another order): it is the same sum in
//! exact arithmetic, rounded differently. Each output is within f32 rounding of the exact
//! dot product of the dequantized weights (unit tests: against f64), and the plans' logits
//! stay within relative 1e-5 of the IR on the same dequantized weights
//! (tests/it/quant_plans.rs).
//!
//! The AVX2 kernels take a tile of weight rows by activation rows a call, each converted
//! unit used for every activation row of the tile: 4 x 1 for one activation row (decode),
//! 2 x 2 for pairs, and 2 x 4 where the CPU has AVX-512VL. Where it has, every tile runs
//! the same 256-bit operations compiled with its 32 vector registers (the 2 x 4 tile's
//! partial sums and accumulators need them; the 4 x 1 decode tile spilled two of its four
//! accumulators to the stack every block with 16); the activation rows of a call are
//! packed once per GEMM, unit by unit (`Pack`), so that a tile reads them through one
//! pointer. No tile changes any output's operations or their order.
//!
//! A block's f16 scale is widened (exactly) where the kernel reaches the block: on the AVX2
//! path eight blocks' scales of a row at a time (one F16C conversion), no separate widening
//! pass over a piece's scales.
//! Larger products (a prompt of more than [`MAX_N`] tokens) dequantize each piece of weight
//! rows into a per-thread f32 scratch (AVX2: a unit at a time, `dequantize_rows`) and run
//! the f32 register tiles over it while it is in L2 (`tiles::gemm_filled`); beyond
//! [`super::tiles::GEMM_MAX_N`] rows, blocks of rows go into [`super::bf16`]'s blocked path
//! and the gemm crate. (Through the gemm crate at every size, with a scalar dequantization,
//! a 64-token int4 prefill of the 0.5b preset ran at 0.4x the bf16 plan's rate; now 0.9x.)
//!
//! A weight whose plan entry sets `act_block` 32 (`ngpt compile --quant-activations int8`)
//! takes none of this: its GEMMs of any row count quantize the activation rows to int8
//! and run integer dot products (`quant_act.rs`, which defines them).

use super::weight_gemm::{in_pieces, piece_rows, Shape, MAX_N};
use crate::plan::{QuantBits, QuantWeight};

/// Weight rows per piece of work, at most.
const ROWS_PER_PIECE: usize = 64;

/// Entries of a unit: what one step of the inner loop reads of a row.
const UNIT: usize = 16;

/// How many calls ahead (groups of rows a kernel call takes) the AVX2 body reads the
/// weight rows in, a unit of each row every step: the rows of a piece lie one after another,
/// so this is one stream the hardware need not discover row by row (short int4 rows are
/// 512 bytes: training the prefetcher on each cost as much as reading it; measured on the
/// 0.5b preset, 22 -> 42 tokens/s int8 and 29 -> 47 int4 with this and without the former
/// 512-bytes-ahead prefetch inside each row; 2 calls ahead and 3 were equal within noise).
const LOOK: usize = 2;

/// Runs the GEMM `C = alpha W x^T + beta C` over quantized `w` (`s.lda == w.k`, `s.k ==
/// w.k`, `s.m <= w.rows`: the plan's validation holds this for every quantized GEMM; the
/// executor has checked x and c).
pub fn gemm(s: Shape, w: &QuantWeight, x: &[f32], c: &mut [f32]) {
    if s.m == 0 || s.n == 0 {
        return;
    }
    if w.act_block != 0 {
        super::quant_act::gemm(s, w, x, c);
        return;
    }
    if s.n <= MAX_N || s.k == 0 {
        match w.bits {
            QuantBits::Int8 => dot_gemm::<I8>(s, w, x, c),
            QuantBits::Int4 => dot_gemm::<I4>(s, w, x, c),
        }
    } else {
        let kern = Kernels::detect();
        let fill = |m0: usize, out: &mut [f32]| dequantize_rows(kern, w, m0, out);
        if s.n <= super::tiles::GEMM_MAX_N {
            super::tiles::gemm_filled(s, x, c, fill);
        } else {
            super::bf16::blocked_with(s, x, c, fill);
        }
    }
}

/// A format's integers as the dot products read them; the kernels are monomorphized per
/// format ([`I8`], [`I4`]), so no `match` on the bits runs inside a loop.
trait Ints: Copy + Send + Sync + 'static {
    /// Bytes of a unit (sixteen entries).
    const UNIT_BYTES: usize;
    /// Whether a unit's two vectors hold its even then its odd entries (the activation
    /// row is then read through [`split_units`] on the AVX2 path).
    const SPLIT: bool;

    /// What the unit body's integers are offset by: `stored = q + OFFSET` (0 for [`I8`],
    /// 8 for [`I4`], whose unsigned nibbles the body converts as they are and whose offset
    /// enters each block's partial sum as a start value, [`block_starts`]).
    const OFFSET: f32;

    /// The integer of entry `j` of a row's bytes.
    fn q(row: &[u8], j: usize) -> i8;

    /// Entry `j` as stored (`q + OFFSET`), as the unit body converts it.
    fn stored(row: &[u8], j: usize) -> f32;

    /// The entry that lane `l` of vector `v` (0 or 1) of a unit holds, from the unit's start.
    #[inline(always)]
    fn entry(v: usize, l: usize) -> usize {
        if Self::SPLIT {
            2 * l + v
        } else {
            8 * v + l
        }
    }

    /// The unit at `p` as stored, two vectors of f32 (exact), lanes as [`Ints::entry`]
    /// says.
    ///
    /// # Safety
    /// `p` points at the unit's [`Ints::UNIT_BYTES`] readable bytes; the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unit(p: *const u8) -> [std::arch::x86_64::__m256; 2];
}

/// `I8`: a signed byte an entry.
#[derive(Clone, Copy)]
struct I8;

/// `I4`: `q + 8` in a nibble, the even entry low.
#[derive(Clone, Copy)]
struct I4;

impl Ints for I8 {
    const UNIT_BYTES: usize = 16;
    const SPLIT: bool = false;
    const OFFSET: f32 = 0.0;

    #[inline(always)]
    fn q(row: &[u8], j: usize) -> i8 {
        row[j] as i8
    }

    #[inline(always)]
    fn stored(row: &[u8], j: usize) -> f32 {
        f32::from(row[j] as i8)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn unit(p: *const u8) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        // SAFETY: both eight-byte loads lie inside the unit.
        let a = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()));
        let b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8).cast()));
        [_mm256_cvtepi32_ps(a), _mm256_cvtepi32_ps(b)]
    }
}

impl Ints for I4 {
    const UNIT_BYTES: usize = 8;
    const SPLIT: bool = true;
    const OFFSET: f32 = 8.0;

    #[inline(always)]
    fn q(row: &[u8], j: usize) -> i8 {
        ((row[j / 2] >> (4 * (j % 2))) & 0x0f) as i8 - 8
    }

    #[inline(always)]
    fn stored(row: &[u8], j: usize) -> f32 {
        f32::from((row[j / 2] >> (4 * (j % 2))) & 0x0f)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn unit(p: *const u8) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the eight-byte load is the unit. Each lane gets one byte (two entries):
        // the low nibble is the even entry, the byte shifted right by 4 the odd one.
        let bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast()));
        let lo = _mm256_and_si256(bytes, _mm256_set1_epi32(0x0f));
        let hi = _mm256_srli_epi32::<4>(bytes);
        [_mm256_cvtepi32_ps(lo), _mm256_cvtepi32_ps(hi)]
    }
}

/// The end of a dot product: the eight lanes summed in the CPU kernels' one tree
/// ([`super::sum_tree`]), then the scalar tail's partial sum `tail` times the last block's
/// scale `scale`.
#[inline(always)]
fn finish(acc: [f32; 8], tail: f32, scale: f32) -> f32 {
    super::sum_tree::sum8(acc) + scale * tail
}

/// The scalar tail of a dot product: entries `from..k` (after the last whole unit), fused
/// multiply-adds in order from 0.
#[inline(always)]
fn tail<F: Ints>(row: &[u8], x: &[f32], from: usize, k: usize) -> f32 {
    let mut t = 0f32;
    for (j, &xj) in (from..k).zip(&x[from..k]) {
        t = f32::from(F::q(row, j)).mul_add(xj, t);
    }
    t
}

/// One weight row as the dot products read it.
#[derive(Clone, Copy)]
struct Row<'a> {
    /// The row's integers as stored.
    bytes: &'a [u8],
    /// The row's block scales (f16 bits).
    scales: &'a [u16],
    /// Entries of the row (the GEMM's k).
    k: usize,
    /// Units a block (the block size / 16).
    upb: usize,
}

impl Row<'_> {
    /// The scale of block `b`, widened.
    #[inline(always)]
    fn scale(&self, b: usize) -> f32 {
        crate::plan::widen_f16(self.scales[b])
    }

    /// The scale of the block that holds the entries after the last whole unit.
    fn tail_scale(&self) -> f32 {
        let units = self.k / UNIT;
        if units * UNIT < self.k {
            self.scale(units / self.upb)
        } else {
            0.0
        }
    }
}

/// The portable dot product of a weight row with an activation row (`x.len() >= row.k`):
/// the operations the module documentation describes, in its order.
fn dot<F: Ints>(row: Row<'_>, x: Act<'_>) -> f32 {
    let (k, upb) = (row.k, row.upb);
    let units = k / UNIT;
    let mut acc = [0f32; 8];
    let mut u = 0;
    while u < units {
        let end = (u + upb).min(units);
        let mut p = [0f32; 8];
        if F::OFFSET != 0.0 {
            p.copy_from_slice(&x.starts[u / upb * 8..u / upb * 8 + 8]);
        }
        for unit in u..end {
            for v in 0..2 {
                for (l, p) in p.iter_mut().enumerate() {
                    let j = unit * UNIT + F::entry(v, l);
                    *p = F::stored(row.bytes, j).mul_add(x.x[j], *p);
                }
            }
        }
        let scale = row.scale(u / upb);
        for (a, p) in acc.iter_mut().zip(p) {
            *a = p.mul_add(scale, *a);
        }
        u = end;
    }
    finish(
        acc,
        tail::<F>(row.bytes, x.x, units * UNIT, k),
        row.tail_scale(),
    )
}

/// Blocks of a row of `k` entries that hold a whole unit.
fn units_of(k: usize, upb: usize) -> usize {
    (k / UNIT).div_ceil(upb.max(1))
}

/// An activation row as the portable dot products read it.
#[derive(Clone, Copy)]
struct Act<'a> {
    /// The values, in natural order.
    x: &'a [f32],
    /// Where [`Ints::OFFSET`] is not 0, eight lanes a block: [`block_starts`].
    starts: &'a [f32],
}

/// The start of each block's partial sum where the unit body reads integers offset by
/// [`Ints::OFFSET`]: lane `l` of block `b` is `-OFFSET * s`, `s` the sum (in f32, in
/// order) over the block's whole units of the two values that lane multiplies
/// ([`Ints::entry`]), so that the block's partial sum is that of `q = stored - OFFSET`.
/// `x` in its natural order; `out` gets eight lanes for each block that holds a whole unit.
fn block_starts<F: Ints>(x: &[f32], upb: usize, out: &mut Vec<f32>) {
    out.clear();
    let units = x.len() / UNIT;
    for b0 in (0..units).step_by(upb.max(1)) {
        let mut s = [0f32; 8];
        for u in b0..(b0 + upb).min(units) {
            for v in 0..2 {
                for (l, s) in s.iter_mut().enumerate() {
                    *s += x[u * UNIT + F::entry(v, l)];
                }
            }
        }
        out.extend(s.iter().map(|s| -F::OFFSET * s));
    }
}

/// `x`'s whole units with each unit's sixteen values reordered evens first (`x0 x2 .. x14
/// x1 x3 .. x15`), the order the AVX2 body reads an [`I4`] unit in; the values after the
/// last whole unit are copied as they are.
fn split_units(x: &[f32], out: &mut [f32]) {
    let body = x.len() / UNIT * UNIT;
    for (src, dst) in x[..body].chunks_exact(UNIT).zip(out.chunks_exact_mut(UNIT)) {
        for l in 0..8 {
            dst[l] = src[2 * l];
            dst[8 + l] = src[2 * l + 1];
        }
    }
    out[body..x.len()].copy_from_slice(&x[body..]);
}

/// The dot products this CPU runs: AVX2 + FMA + F16C where present, the portable [`dot`]
/// otherwise; bitwise the same.
#[derive(Clone, Copy)]
pub(super) struct Kernels {
    /// AVX2, FMA and F16C are present (only [`Kernels::detect`] sets it; every x86 CPU
    /// with AVX2 so far has had the other two): the kernels widen their f16 scales in
    /// registers.
    pub(super) avx2: bool,
    /// AVX-512F and VL are present as well: the same 256-bit kernels compiled with 32
    /// vector registers, which hold the tiles of four activation rows ([`group_of`]) and
    /// the decode tile's accumulators.
    pub(super) wide: bool,
}

impl Kernels {
    pub(super) fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            Kernels {
                avx2,
                wide: avx2
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Kernels {
            avx2: false,
            wide: false,
        }
    }

    /// The portable kernels only (for tests comparing the two).
    #[cfg(test)]
    pub(super) fn portable() -> Kernels {
        Kernels {
            avx2: false,
            wide: false,
        }
    }

    /// The AVX2 kernels with 16 vector registers, where the CPU has AVX2 (for tests of
    /// the tiles a CPU without AVX-512 runs).
    #[cfg(test)]
    pub(super) fn narrow() -> Kernels {
        Kernels {
            wide: false,
            ..Kernels::detect()
        }
    }
}

/// `[[dot(rows[r], xs[c]) for c] for r]`: the portable kernel of [`piece_dots`].
#[inline(always)]
fn dots_portable<F: Ints, const R: usize, const C: usize>(
    rows: [Row<'_>; R],
    xs: [Act<'_>; C],
) -> [[f32; C]; R] {
    rows.map(|row| xs.map(|x| dot::<F>(row, x)))
}

/// The body of [`dots_avx2`] and [`dots_wide`] (a macro: one text compiled under each
/// function's target features), over the caller's generics `F`, `R`, `C`, `U`.
macro_rules! dots_body {
    ($rows:ident, $xs:ident) => {{
        let (rows, xs): ([Row<'_>; R], Pack<'_, C>) = ($rows, $xs);
        use std::arch::x86_64::*;
        let (k, upb) = (rows[0].k, rows[0].upb);
        debug_assert!(U == 0 || U == upb);
        debug_assert!(rows.iter().all(|r| r.k == k
            && r.upb == upb
            && r.bytes.len() >= k / UNIT * F::UNIT_BYTES
            && r.scales.len() >= k.div_ceil(upb * UNIT)));
        debug_assert!(
            xs.x.len() >= k / UNIT * UNIT * C
                && (F::OFFSET == 0.0 || xs.starts.len() >= units_of(k, upb) * 8 * C)
                && xs.rows.iter().all(|x| x.len() >= k)
        );
        let upb = if U > 0 { U } else { upb };
        let units = k / UNIT;
        let pw: [*const u8; R] = std::array::from_fn(|r| rows[r].bytes.as_ptr());
        let ps: [*const u16; R] = std::array::from_fn(|r| rows[r].scales.as_ptr());
        let (px, pst) = (xs.x.as_ptr(), xs.starts.as_ptr());
        // Where the rows of the call LOOK calls after this one start when rows lie one after
        // another (a piece's rows do): read in while these are computed, so that call finds
        // them cached.
        let next = pw[R - 1].wrapping_add(rows[R - 1].bytes.len() * (1 + R * (LOOK - 1)));
        // And their scales, which lie one row after another too (2 bytes a block), at the start.
        let nb = rows[R - 1].scales.len();
        let next_sc = ps[R - 1]
            .wrapping_add(nb * (1 + R * (LOOK - 1)))
            .cast::<u8>();
        for off in (0..R * nb * 2).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(next_sc.wrapping_add(off).cast());
        }
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        // Each row's scales of the eight blocks from a multiple of eight, widened together: one
        // F16C conversion a row and eight blocks, the blocks then broadcasting theirs from here
        // (a load). Widening each block's scale alone (`vcvtph2ps` per block) held the int4
        // kernel to 0.89x this rate on Zen 4.
        let mut wide = [[0f32; 8]; R];
        // One block of `$n` units from unit `$u0`, its scale `$b` (a macro, not a closure, so
        // that the body is compiled with this function's target features).
        macro_rules! block {
            ($u0:expr, $n:expr, $b:expr) => {{
                let (u0, n, b): (usize, usize, usize) = ($u0, $n, $b);
                if b % 8 == 0 {
                    for (r, wide) in wide.iter_mut().enumerate() {
                        let scales = rows[r].scales;
                        let h = if b + 8 <= scales.len() {
                            // SAFETY: blocks b..b + 8 are the row's: their scales are inside.
                            _mm_loadu_si128(ps[r].add(b).cast())
                        } else {
                            let mut t = [0u16; 8];
                            t[..scales.len() - b].copy_from_slice(&scales[b..]);
                            _mm_loadu_si128(t.as_ptr().cast())
                        };
                        _mm256_storeu_ps(wide.as_mut_ptr(), _mm256_cvtph_ps(h));
                    }
                }
                let mut p = [[_mm256_setzero_ps(); C]; R];
                if F::OFFSET != 0.0 {
                    for c in 0..C {
                        // SAFETY: b is a block with a whole unit: its eight start lanes exist.
                        let start = _mm256_loadu_ps(pst.add(8 * (b * C + c)));
                        for p in p.iter_mut() {
                            p[c] = start;
                        }
                    }
                }
                for u in u0..u0 + n {
                    // The next R rows, a unit's worth of their bytes each step (a prefetch
                    // past the weights never faults).
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(u * R * F::UNIT_BYTES).cast());
                    let mut xv = [[_mm256_setzero_ps(); 2]; C];
                    for (c, xv) in xv.iter_mut().enumerate() {
                        // SAFETY: u < units: the unit's values lie inside the pack.
                        let p = px.add((u * C + c) * UNIT);
                        *xv = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))];
                    }
                    for r in 0..R {
                        // SAFETY: u < units: the unit's bytes lie inside the row.
                        let q = F::unit(pw[r].add(u * F::UNIT_BYTES));
                        for c in 0..C {
                            p[r][c] = _mm256_fmadd_ps(q[0], xv[c][0], p[r][c]);
                            p[r][c] = _mm256_fmadd_ps(q[1], xv[c][1], p[r][c]);
                        }
                    }
                }
                for r in 0..R {
                    let scale = _mm256_broadcast_ss(&wide[r][b % 8]);
                    for c in 0..C {
                        acc[r][c] = _mm256_fmadd_ps(p[r][c], scale, acc[r][c]);
                    }
                }
            }};
        }
        let whole = units / upb;
        for b in 0..whole {
            block!(b * upb, upb, b);
        }
        if whole * upb < units {
            block!(whole * upb, units - whole * upb, whole);
        }
        // The lanes summed in `finish`'s tree; loops, not `map` closures, as in `quant_act.rs`:
        // a closure does not get this function's target features, so `sum8_avx` became a call
        // with each vector spilled to pass it (4% of an int4 decode's samples).
        let mut out = [[0f32; C]; R];
        for ((out, acc), row) in out.iter_mut().zip(&acc).zip(&rows) {
            for ((o, &v), x) in out.iter_mut().zip(acc).zip(xs.rows) {
                let sum = super::sum_tree::sum8_avx(v);
                // No tail: `finish` adds 0 * 0.
                *o = if units * UNIT == k {
                    sum + 0.0
                } else {
                    sum + row.tail_scale() * tail::<F>(row.bytes, x, units * UNIT, k)
                };
            }
        }
        out
    }};
}

/// [`dot`] of `R` weight rows with each of `C` activation rows (a [`Pack`]), the whole
/// units in AVX2 registers: each unit of activations is loaded once for
/// the `R` rows, each unit of integers converted once for the `C` activation rows; per
/// (row, activation row) the operations and order of [`dot`]. `U` is the units a block
/// when it is 1, 2, 4 or 8 (the block loop unrolled), 0 for any other block.
///
/// # Safety
/// AVX2, FMA and F16C are present; every row has the same `k` and `upb` (`U` when not 0)
/// and holds its `k` entries and their scales; every activation row holds `k` values.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_avx2<F: Ints, const R: usize, const C: usize, const U: usize>(
    rows: [Row<'_>; R],
    xs: Pack<'_, C>,
) -> [[f32; C]; R] {
    // SAFETY: as this function's contract.
    unsafe { dots_body!(rows, xs) }
}

/// [`dots_avx2`] compiled with AVX-512VL's 32 vector registers (the same 256-bit
/// operations in the same order: bitwise equal), for the tiles of two weight rows by four
/// activation rows, whose partial sums and accumulators alone take 16 registers (compiled
/// with AVX2's 16 they spilled to the stack).
///
/// # Safety
/// As [`dots_avx2`]'s; AVX-512F and VL are present.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
unsafe fn dots_wide<F: Ints, const R: usize, const C: usize, const U: usize>(
    rows: [Row<'_>; R],
    xs: Pack<'_, C>,
) -> [[f32; C]; R] {
    // SAFETY: as this function's contract.
    unsafe { dots_body!(rows, xs) }
}

/// Weight rows a kernel call takes together for `C` activation rows: four for one (a
/// decode step: four rows' partial sums in flight), two for a pair or a group of four.
const fn rows_per_call(c: usize) -> usize {
    match c {
        1 => 4,
        _ => 2,
    }
}

/// Activation rows the AVX2 kernels take a call, at most: four where the CPU has 32
/// vector registers for the 2 x 4 tile's partial sums and accumulators ([`Kernels::wide`]),
/// two with 16; the rows after the last whole group go in pairs, the last one alone.
/// Measured on the 2-core Zen 4 VM (BENCHMARKS.md, session 20): groups of four took 16- and
/// 32-token int4 prefills 1.4x faster than pairs; groups of eight, one weight row a call,
/// were slower at K = 1024 (eight rows' activations, 32 KiB, no longer fit L1 beside the
/// weights), and four with one weight row a call gained at most 10% and lost at K = 4096.
fn group_of(kern: Kernels) -> usize {
    if kern.wide {
        4
    } else {
        2
    }
}

/// The loop of [`piece_dots`] over the kernel `$dots` (`dots_portable`, or `dots_avx2` /
/// `dots_wide` with its `U`): [`rows_per_call`] rows a kernel call, the last ones one at a time, each result
/// into `out[c * rows + i]`. A macro, so that the AVX2 loop is compiled inside a function
/// with the kernels' target features ([`piece_avx2`]), where the kernel calls inline: called
/// once per group of rows from a function without them, they were calls returning their
/// sums through memory (6% of an int4 decode's samples in the call sites).
macro_rules! piece_loop {
    ($dots:ident [$($u:tt)*], $rows:expr, $row:expr, $xs:expr, $out:expr) => {{
        let (rows, row, xs, out): (usize, _, _, &mut [f32]) = ($rows, $row, $xs, $out);
        let per = rows_per_call(C);
        let mut i = 0;
        while i + per <= rows {
            if per == 4 {
                let r = $dots::<F, 4, C $($u)*>([row(i), row(i + 1), row(i + 2), row(i + 3)], xs);
                store(out, rows, i, r);
            } else {
                store(out, rows, i, $dots::<F, 2, C $($u)*>([row(i), row(i + 1)], xs));
            }
            i += per;
        }
        while i < rows {
            store(out, rows, i, $dots::<F, 1, C $($u)*>([row(i)], xs));
            i += 1;
        }
    }};
}

/// The results of weight rows `i..i + R` (a kernel call's `[row][activation row]`) into a
/// piece's `out[c * rows + i + d]`.
#[inline(always)]
fn store<const R: usize, const C: usize>(out: &mut [f32], rows: usize, i: usize, r: [[f32; C]; R]) {
    for (d, r) in r.iter().enumerate() {
        for (c, &v) in r.iter().enumerate() {
            out[c * rows + i + d] = v;
        }
    }
}

/// `C` activation rows as the AVX2 kernels read them: unit `u` of row `c` (in
/// [`split_units`] order where [`Ints::SPLIT`]) at `x[(u * C + c) * UNIT..]`, block `b`'s start lanes of row
/// `c` ([`block_starts`]) at `starts[(b * C + c) * 8..]`: one pointer each for the whole
/// group, where a pointer per row (`2 C` of them) took the general registers (a tile of
/// eight rows reloaded them from the stack every unit). `rows`: each row's values in
/// natural order, for the entries after the last whole unit.
#[derive(Clone, Copy)]
struct Pack<'a, const C: usize> {
    x: &'a [f32],
    starts: &'a [f32],
    rows: [&'a [f32]; C],
}

impl<'a, const C: usize> Pack<'a, C> {
    /// The pack of `x` and `starts` (as [`pack`] wrote them) whose row `i` is `row(i)`.
    fn new(x: &'a [f32], starts: &'a [f32], row: impl Fn(usize) -> &'a [f32]) -> Self {
        Pack {
            x,
            starts,
            rows: std::array::from_fn(row),
        }
    }
}

/// Activation rows `j0..j0 + c` of `x` (rows `ldb` apart, `k` values) packed as [`Pack`]
/// reads them: their whole units into `xs` (`units * c * UNIT` values) and their block
/// starts into `starts` (`c * 8` a block with a whole unit; none where the format has no
/// offset).
#[allow(clippy::too_many_arguments)]
fn pack<F: Ints>(
    x: &[f32],
    ldb: usize,
    k: usize,
    j0: usize,
    c: usize,
    upb: usize,
    xs: &mut [f32],
    starts: &mut [f32],
) {
    let units = k / UNIT;
    let mut split = [0f32; UNIT];
    let mut st = Vec::new();
    for i in 0..c {
        let row = &x[(j0 + i) * ldb..(j0 + i) * ldb + k];
        for u in 0..units {
            let src = &row[u * UNIT..(u + 1) * UNIT];
            let src = if F::SPLIT {
                split_units(src, &mut split);
                &split[..]
            } else {
                src
            };
            xs[(u * c + i) * UNIT..(u * c + i + 1) * UNIT].copy_from_slice(src);
        }
        if F::OFFSET != 0.0 {
            block_starts::<F>(row, upb, &mut st);
            for (b, lanes) in st.chunks_exact(8).enumerate() {
                starts[(b * c + i) * 8..(b * c + i + 1) * 8].copy_from_slice(lanes);
            }
        }
    }
}

/// The dot products of rows `0..rows` (through `row`; every row of block `upb` units)
/// with activation rows `xs` (natural order), into `out[c * rows + i]`: the portable
/// kernels, a pair of activation rows at a time.
#[inline(always)]
fn piece_dots<'a, F: Ints, const C: usize>(
    rows: usize,
    row: impl Fn(usize) -> Row<'a>,
    xs: [Act<'_>; C],
    out: &mut [f32],
) {
    piece_loop!(dots_portable[], rows, row, xs, out);
}

/// [`piece_dots`] on the AVX2 kernels over a [`Pack`] of `C` activation rows: the
/// kernel with its block size `U` (1, 2, 4 or 8 units, 0 for any other), compiled with 32
/// vector registers where `kern.wide` (every call: groups of four activation rows need
/// them, [`group_of`]; the 4 x 1 decode tile spilled accumulators without them and ran
/// int4 GEMVs 3-5% slower, BENCHMARKS.md session 21), with 16 otherwise.
///
/// # Safety
/// `kern.avx2` (AVX2, FMA and F16C are present; AVX-512F and VL too where `kern.wide`);
/// as [`dots_avx2`]'s for every group of rows.
#[cfg(target_arch = "x86_64")]
unsafe fn piece_packed<'a, F: Ints, const C: usize>(
    kern: Kernels,
    rows: usize,
    upb: usize,
    row: impl Fn(usize) -> Row<'a>,
    xs: Pack<'_, C>,
    out: &mut [f32],
) {
    macro_rules! on {
        ($f:ident) => {
            match upb {
                1 => $f::<F, C, 1>(rows, row, xs, out),
                2 => $f::<F, C, 2>(rows, row, xs, out),
                4 => $f::<F, C, 4>(rows, row, xs, out),
                8 => $f::<F, C, 8>(rows, row, xs, out),
                _ => $f::<F, C, 0>(rows, row, xs, out),
            }
        };
    }
    // SAFETY: as this function's contract.
    unsafe {
        if kern.wide {
            on!(piece_wide)
        } else {
            on!(piece_avx2)
        }
    }
}

/// [`piece_packed`] with AVX2's 16 vector registers.
///
/// # Safety
/// As [`dots_avx2`]'s, for every group of rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn piece_avx2<'a, F: Ints, const C: usize, const U: usize>(
    rows: usize,
    row: impl Fn(usize) -> Row<'a>,
    xs: Pack<'_, C>,
    out: &mut [f32],
) {
    // SAFETY: as this function's contract.
    unsafe { piece_loop!(dots_avx2[, U], rows, row, xs, out) }
}

/// [`piece_packed`] with AVX-512VL's 32 vector registers: the same 256-bit operations in
/// the same order (bitwise [`piece_avx2`]).
///
/// # Safety
/// As [`dots_avx2`]'s, for every group of rows; AVX-512F and VL are present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
unsafe fn piece_wide<'a, F: Ints, const C: usize, const U: usize>(
    rows: usize,
    row: impl Fn(usize) -> Row<'a>,
    xs: Pack<'_, C>,
    out: &mut [f32],
) {
    // SAFETY: as this function's contract.
    unsafe { piece_loop!(dots_wide[, U], rows, row, xs, out) }
}

/// Rows `start..start + out.len() / k` of `w` dequantized into `out`: bitwise
/// [`QuantWeight::dequantize_rows`] (each entry the exact product of its block scale and its
/// integer), the whole units in AVX2 registers where the CPU has them (the portable loop
/// held the quantized prefill GEMMs' dequantization to 17% of a 64-token int4 prefill).
fn dequantize_rows(kern: Kernels, w: &QuantWeight, start: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if kern.avx2 && w.block.is_multiple_of(UNIT) {
        // SAFETY: AVX2, FMA and F16C are present (`detect`); `out` holds whole rows of
        // `w` from `start` (the callers' pieces), checked again inside.
        unsafe {
            match w.bits {
                QuantBits::Int8 => dequantize_avx2::<I8>(w, start, out),
                QuantBits::Int4 => dequantize_avx2::<I4>(w, start, out),
            }
        }
        return;
    }
    let _ = kern;
    w.dequantize_rows(start, out)
}

/// [`dequantize_rows`] on AVX2: a unit (sixteen entries) at a time, its two vectors of
/// stored integers ([`Ints::unit`]) put in natural order, less the offset (exact), times
/// the block's scale; the entries after the last whole unit one by one.
///
/// # Safety
/// AVX2, FMA and F16C are present; `w.block` is a multiple of [`UNIT`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_avx2<F: Ints>(w: &QuantWeight, start: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (rb, nb, k) = (w.row_bytes(), w.n_blocks(), w.k);
    if k == 0 {
        return;
    }
    let (upb, units) = (w.block / UNIT, k / UNIT);
    for (i, dst) in out.chunks_exact_mut(k).enumerate() {
        let r = start + i;
        let row = &w.data[r * rb..(r + 1) * rb];
        let scales = &w.scales[r * nb..(r + 1) * nb];
        assert!(row.len() >= units * F::UNIT_BYTES && scales.len() >= units.div_ceil(upb));
        for u in 0..units {
            let s = _mm256_set1_ps(crate::plan::widen_f16(scales[u / upb]));
            // SAFETY: u < units: the unit's bytes lie inside the row (asserted above).
            let [a, b] = unsafe { F::unit(row.as_ptr().add(u * F::UNIT_BYTES)) };
            // Natural order: split units hold the even entries, then the odd ones.
            let (a, b) = if F::SPLIT {
                let (lo, hi) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
                (
                    _mm256_permute2f128_ps::<0x20>(lo, hi),
                    _mm256_permute2f128_ps::<0x31>(lo, hi),
                )
            } else {
                (a, b)
            };
            let off = _mm256_set1_ps(F::OFFSET);
            let d = &mut dst[u * UNIT..(u + 1) * UNIT];
            // SAFETY: `d` holds sixteen values.
            unsafe {
                _mm256_storeu_ps(d.as_mut_ptr(), _mm256_mul_ps(s, _mm256_sub_ps(a, off)));
                _mm256_storeu_ps(
                    d.as_mut_ptr().add(8),
                    _mm256_mul_ps(s, _mm256_sub_ps(b, off)),
                );
            }
        }
        for (j, d) in dst.iter_mut().enumerate().skip(units * UNIT) {
            *d = crate::plan::widen_f16(scales[j / w.block]) * f32::from(F::q(row, j));
        }
    }
}

/// The dot-product path: pieces of weight rows on rayon's threads ([`in_pieces`]), the
/// activation rows in groups sharing each converted unit ([`group_of`]; the portable kernels
/// in pairs).
fn dot_gemm<F: Ints>(s: Shape, w: &QuantWeight, x: &[f32], c: &mut [f32]) {
    dot_gemm_with::<F>(Kernels::detect(), s, w, x, c)
}

/// The calls of a dot-product GEMM over `n` activation rows: `(first row, rows)`, groups of
/// `group` rows, then pairs, then the last row alone.
fn calls(n: usize, group: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut j = 0;
    for size in [group, 2, 1] {
        while j + size <= n {
            out.push((j, size));
            j += size;
        }
    }
    out
}

/// [`dot_gemm`] with the given kernels.
fn dot_gemm_with<F: Ints>(kern: Kernels, s: Shape, w: &QuantWeight, x: &[f32], c: &mut [f32]) {
    let (rb, nb) = (w.row_bytes(), w.n_blocks());
    let upb = (w.block / UNIT).max(1);
    let row_bytes = rb + 2 * nb;
    let per = piece_rows(s.n, row_bytes, 8, ROWS_PER_PIECE);
    // The weight's slices, once: `Elems` derefs through a mapping's `dyn AsRef` (a call the
    // compiler cannot inline; per row it showed in decode profiles, though removing it
    // moved decode by less than this VM's noise, 1.01x).
    let (data, scales): (&[u8], &[u16]) = (&w.data, &w.scales);
    let rows_from = |m0: usize| {
        move |i: usize| Row {
            bytes: &data[(m0 + i) * rb..(m0 + i + 1) * rb],
            scales: &scales[(m0 + i) * nb..(m0 + i + 1) * nb],
            k: s.k,
            upb,
        }
    };
    let xrow = |j: usize| &x[j * s.ldb..j * s.ldb + s.k];
    #[cfg(target_arch = "x86_64")]
    if kern.avx2 {
        // The activation rows packed once per call of the kernels ([`Pack`]).
        let calls = calls(s.n, group_of(kern));
        // Values and start lanes an activation row takes in the pack (no starts where the
        // format has no offset).
        let xn = s.k / UNIT * UNIT;
        let sn = if F::OFFSET != 0.0 {
            units_of(s.k, upb) * 8
        } else {
            0
        };
        let mut xs = vec![0f32; s.n * xn];
        let mut st = vec![0f32; s.n * sn];
        for &(j0, n) in &calls {
            pack::<F>(
                x,
                s.ldb,
                s.k,
                j0,
                n,
                upb,
                &mut xs[j0 * xn..(j0 + n) * xn],
                &mut st[j0 * sn..(j0 + n) * sn],
            );
        }
        let packed =
            |j0: usize, n: usize| (&xs[j0 * xn..(j0 + n) * xn], &st[j0 * sn..(j0 + n) * sn]);
        in_pieces(s, per, c, |m0, rows, out| {
            let row = rows_from(m0);
            for &(j0, n) in &calls {
                let (xs, starts) = packed(j0, n);
                let out = &mut out[j0 * rows..];
                // SAFETY: `kern` comes from `detect` (or a test's narrowing of it): AVX2, FMA
                // and F16C are present, AVX-512F and VL where `wide`; every row holds `s.k`
                // entries and their scales, the pack its rows' units and starts.
                unsafe {
                    let at = |i: usize| xrow(j0 + i);
                    macro_rules! on {
                        ($c:literal) => {
                            piece_packed::<F, $c>(
                                kern,
                                rows,
                                upb,
                                row,
                                Pack::new(xs, starts, at),
                                out,
                            )
                        };
                    }
                    match n {
                        4 => on!(4),
                        2 => on!(2),
                        _ => {
                            // `calls` makes groups of `group_of` (2 or 4), pairs and lone rows.
                            debug_assert_eq!(n, 1);
                            on!(1)
                        }
                    }
                }
            }
        });
        return;
    }
    // The portable kernels: each activation row's block starts (none where the format has
    // no offset), the rows in pairs.
    let mut starts: Vec<Vec<f32>> = vec![Vec::new(); s.n];
    if F::OFFSET != 0.0 {
        for (j, st) in starts.iter_mut().enumerate() {
            block_starts::<F>(xrow(j), upb, st);
        }
    }
    let act = |j: usize| Act {
        x: xrow(j),
        starts: &starts[j],
    };
    in_pieces(s, per, c, |m0, rows, out| {
        let row = rows_from(m0);
        for j in (0..s.n).step_by(2) {
            let out = &mut out[j * rows..];
            if j + 1 < s.n {
                piece_dots::<F, 2>(rows, row, [act(j), act(j + 1)], out);
            } else {
                piece_dots::<F, 1>(rows, row, [act(j)], out);
            }
        }
    });
}

#[cfg(test)]
pub(crate) mod tests {
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
            act_block: 0,
            data: data.into(),
            scales: scales.into(),
        }
    }

    pub(crate) fn shape(m: usize, n: usize, k: usize) -> Shape {
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

    pub(crate) fn xs(n: usize, k: usize) -> Vec<f32> {
        (0..n * (k + 1))
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 8.0)
            .collect()
    }

    /// (rows, k, block): k crosses whole blocks, a short last block, whole units after
    /// the last block and the scalar tail; blocks of 1, 2, 4, 8 and 16 units (the last
    /// through the kernel's general block loop).
    const CASES: [(usize, usize, usize); 12] = [
        (67, 13, 16),
        (130, 70, 32),
        (65, 32, 16),
        (40, 1000, 64),
        (9, 33, 32),
        (64, 0, 32),
        (21, 200, 128),
        (18, 1027, 128),
        (11, 300, 256),
        (13, 96, 64),
        (7, 47, 16),
        (6, 16, 32),
    ];

    /// The GEMM of the dequantized weights in f64, column-major as `gemm` writes it, and
    /// beside each element the sum of its terms' magnitudes (what bounds f32 rounding).
    fn exact(s: Shape, deq: &[f32], x: &[f32], c0: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let mut out: Vec<f64> = c0.iter().map(|&v| f64::from(v)).collect();
        let mut mag = vec![0f64; out.len()];
        for j in 0..s.n {
            for r in 0..s.m {
                let terms =
                    (0..s.k).map(|i| f64::from(deq[r * s.k + i]) * f64::from(x[j * s.ldb + i]));
                let (dot, abs) = terms.fold((0f64, 0f64), |(d, a), t| (d + t, a + t.abs()));
                let c = &mut out[j * s.ldc + r];
                mag[j * s.ldc + r] = f64::from(s.alpha) * abs + (f64::from(s.beta) * *c).abs();
                *c = f64::from(s.alpha) * dot + f64::from(s.beta) * *c;
            }
        }
        (out, mag)
    }

    /// `||got - want||_F / ||want||_F`.
    fn rel(got: &[f32], want: &[f64]) -> f64 {
        let (mut d, mut n) = (0f64, 0f64);
        for (&g, &w) in got.iter().zip(want) {
            d += (f64::from(g) - w).powi(2);
            n += w * w;
        }
        (d / n.max(f64::MIN_POSITIVE)).sqrt()
    }

    #[test]
    fn dot_products_match_an_f64_dot_over_the_dequantized_weights() {
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            for (m, k, block) in CASES {
                let w = weight(bits, m, k, block);
                let deq = dequantized(&w);
                for n in [1, 2, 3, 5, 32] {
                    for beta in [0.0, 0.5] {
                        let mut s = shape(m, n, k);
                        s.beta = beta;
                        let x = xs(n, k);
                        let c0: Vec<f32> = (0..n * s.ldc).map(|i| (i % 5) as f32).collect();
                        let mut got = c0.clone();
                        gemm(s, &w, &x, &mut got);
                        let (want, mag) = exact(s, &deq, &x, &c0);
                        let e = rel(&got, &want);
                        assert!(e <= 1e-6, "{bits:?} m{m} k{k} b{block} n{n}: {e:e}");
                        // Elementwise too (a wrong row can hide in a Frobenius norm), to
                        // f32 rounding of sums of the terms' magnitudes; C's padding rows
                        // are untouched.
                        for j in 0..n {
                            for r in 0..s.ldc {
                                let (g, w) = (got[j * s.ldc + r], want[j * s.ldc + r]);
                                if r >= m {
                                    assert_eq!(g, c0[j * s.ldc + r]);
                                }
                                assert!(
                                    (f64::from(g) - w).abs() <= 1e-6 * mag[j * s.ldc + r],
                                    "{bits:?} m{m} k{k} b{block} n{n} ({r},{j}): {g} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The dequantized matrix in f32 (through the plan's one dequantization).
    pub(crate) fn dequantized(w: &QuantWeight) -> Vec<f32> {
        let mut out = vec![0f32; w.rows * w.k];
        w.dequantize_rows(0, &mut out);
        out
    }

    /// The GEMM through the given kernels, as `gemm` runs it.
    fn gemm_with(kern: Kernels, s: Shape, w: &QuantWeight, x: &[f32], c: &mut [f32]) {
        match w.bits {
            QuantBits::Int8 => dot_gemm_with::<I8>(kern, s, w, x, c),
            QuantBits::Int4 => dot_gemm_with::<I4>(kern, s, w, x, c),
        }
    }

    #[test]
    fn the_avx2_body_is_bitwise_the_portable_one() {
        let kern = Kernels::detect();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // Otherwise this compares the portable kernels with themselves.
            assert!(kern.avx2);
            // And where the CPU has AVX-512VL, the 2 x 4 tiles run (`wide`).
            assert_eq!(
                kern.wide,
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            );
        }
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            for (m, k, block) in CASES {
                let w = weight(bits, m, k, block);
                // Every kernel shape: 4 or 2 weight rows a call and the rows left over;
                // one activation row, pairs, groups of four (wide) and what follows them.
                for n in [1, 2, 3, 4, 7, 11] {
                    let s = shape(m, n, k);
                    let x = xs(n, k);
                    let mut slow = vec![f32::NAN; n * s.ldc];
                    gemm_with(Kernels::portable(), s, &w, &x, &mut slow);
                    let bits_of = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    for kern in [kern, Kernels::narrow()] {
                        let mut fast = vec![f32::NAN; n * s.ldc];
                        gemm_with(kern, s, &w, &x, &mut fast);
                        assert_eq!(
                            bits_of(&fast),
                            bits_of(&slow),
                            "{bits:?} m{m} k{k} b{block} n{n} wide {}",
                            kern.wide
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn calls_cover_every_activation_row_once_in_groups_then_pairs() {
        for group in [2, 4] {
            for n in 0..=MAX_N {
                let calls = calls(n, group);
                let mut next = 0;
                for &(j0, c) in &calls {
                    assert_eq!(j0, next, "n {n} group {group}: {calls:?}");
                    assert!([group, 2, 1].contains(&c), "n {n} group {group}: {calls:?}");
                    next += c;
                }
                assert_eq!(next, n, "n {n} group {group}: {calls:?}");
                // Groups first, then at most one pair and one lone row.
                let small = calls.iter().filter(|&&(_, c)| c < group).count();
                assert!(small <= 2, "n {n} group {group}: {calls:?}");
                assert_eq!(calls.len(), n / group + small);
            }
        }
    }

    /// A row alone and the same row amid 31 others (the most the dot-product path takes):
    /// the same bits, at every position of the 32 and for both formats.
    #[test]
    fn a_row_amid_31_others_is_bitwise_the_row_alone() {
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            let (m, k) = (75, 1000);
            let w = weight(bits, m, k, 32);
            let n = MAX_N;
            let s = shape(m, n, k);
            let x = xs(n, k);
            let mut all = vec![f32::NAN; n * s.ldc];
            gemm(s, &w, &x, &mut all);
            let s1 = shape(m, 1, k);
            for j in 0..n {
                let mut alone = vec![f32::NAN; s1.ldc];
                gemm(s1, &w, &x[j * s.ldb..], &mut alone);
                assert_eq!(
                    all[j * s.ldc..j * s.ldc + m]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    alone[..m].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{bits:?}: row {j} of {n}"
                );
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            let (m, n, k) = (333, 3, 200);
            let w = weight(bits, m, k, 32);
            let s = shape(m, n, k);
            let x = xs(n, k);
            let run = |threads| {
                let mut c = vec![0f32; n * s.ldc];
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("pool")
                    .install(|| gemm(s, &w, &x, &mut c));
                c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(run(1), run(5), "{bits:?}");
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

    /// `QuantWeight::dequantize_rows` (a block at a time) and this module's AVX2 copy are,
    /// per element, the row's block scale times the integer as `QuantWeight::int` reads it,
    /// from any start row, on odd K (the last block short, int4's last byte half used, entries
    /// after the last whole unit).
    #[test]
    fn dequantized_rows_are_each_scale_times_its_integer() {
        let shapes = [
            (4, 45, 16),
            (3, 64, 32),
            (5, 17, 16),
            (2, 1, 16),
            (3, 200, 64),
        ];
        let cases = [QuantBits::Int8, QuantBits::Int4]
            .into_iter()
            .flat_map(|bits| {
                shapes.into_iter().flat_map(move |shape| {
                    [Kernels::detect(), Kernels::portable()].map(|kern| (bits, shape, kern))
                })
            });
        for (bits, (m, k, block), kern) in cases {
            let w = weight(bits, m, k, block);
            let (rb, nb) = (w.row_bytes(), w.n_blocks());
            for start in [0, 1] {
                let mut got = vec![f32::NAN; (m - start) * k];
                dequantize_rows(kern, &w, start, &mut got);
                for r in start..m {
                    let row = &w.data[r * rb..(r + 1) * rb];
                    for j in 0..k {
                        let scale = crate::plan::widen_f16(w.scales[r * nb + j / block]);
                        let want = scale * f32::from(w.int(row, j));
                        assert_eq!(
                            got[(r - start) * k + j].to_bits(),
                            want.to_bits(),
                            "{bits:?} m{m} k{k} block {block} avx2 {}: row {r} entry {j}",
                            kern.avx2
                        );
                    }
                }
            }
        }
    }

    /// More activation rows than the dot products take: dequantized pieces through the
    /// f32 tiles (up to `GEMM_MAX_N` rows), dequantized blocks through the gemm crate beyond.
    #[test]
    fn the_dequantizing_paths_match_exact_products() {
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            for (m, k, block, n) in [
                (70, 45, 16, 40),
                (517, 64, 32, 40),
                (33, 0, 32, 40),
                (50, 1024, 32, 37),
                (70, 45, 16, 520),
                (33, 0, 32, 520),
            ] {
                let w = weight(bits, m, k, block);
                let deq = dequantized(&w);
                let mut s = shape(m, n, k);
                s.beta = 0.5;
                let x = xs(n, k);
                let c0: Vec<f32> = (0..n * s.ldc).map(|i| (i % 5) as f32).collect();
                let mut c = c0.clone();
                gemm(s, &w, &x, &mut c);
                if n <= super::super::tiles::GEMM_MAX_N {
                    // Bitwise the f32 tiles over the dequantized weights.
                    let mut t = c0.clone();
                    super::super::tiles::gemm(Shape { lda: k, ..s }, &deq, &x, &mut t);
                    assert!(
                        c.iter().zip(&t).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{bits:?} m{m} k{k} n{n}"
                    );
                }
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
