//! Weight GEMMs of up to [`GEMM_MAX_N`] activation rows (decode steps, prompt chunks, prompts
//! of up to 512 tokens) over f32 or bf16 weights, register-tiled and batch-invariant: what the CPU
//! executor runs for every weight GEMM that small.
//!
//! The form is the plan's weight GEMM (`C = alpha W x^T + beta C`, [`Shape`]): weight rows
//! and activation rows both contiguous along K. Each output element `(i, j)` (weight row
//! `i`, activation row `j`) has ONE definition, whatever the other rows of the call, the
//! tile it falls in, the thread that runs it, and whether the CPU has AVX2 and FMA:
//!
//! - K is cut into chunks of [`Lanes::CHUNK`] elements (8 for f32, 16 for bf16), the last
//!   one padded with zeros (weight and activation alike);
//! - one accumulator of eight lanes, starting at +0; each chunk adds into it in
//!   `CHUNK / 8` steps, step `t` adding `w[e] * x[e]` into lane `l` as one fused
//!   multiply-add (one rounding), `e` = [`Lanes::elem`]`(t, l)`; chunks in order from 0;
//! - the eight lanes summed as `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`;
//! - then `alpha * sum`, or `alpha * sum + beta * c` (a multiply and an add each rounded).
//!
//! The portable code computes exactly that (`f32::mul_add` is the fused multiply-add); the
//! AVX2+FMA code computes it for a tile of up to 4 activation rows (3 for bf16) by 3
//! weight rows at once: twelve (nine) accumulators in registers, each weight vector loaded (and for bf16,
//! widened) once for four activation rows and each activation vector once for three
//! weight rows, so the loop is bound by the multiply-adds, not the loads. (The executor's
//! dot products before these tiles, four accumulators an output, needed four registers an
//! output and were bound by loads.) Where the CPU has AVX-512VL, prompt tiles take up to
//! 8 activation rows (6 for bf16) by 3 weight rows: the same 256-bit operations compiled
//! with its 32 vector registers (`tile_wide`), each weight vector then used for twice the
//! rows (`tile_rows` says how many a GEMM takes). No tile changes an output's
//! operations or their order, so a call of any number of rows up to [`GEMM_MAX_N`] gives
//! each row the bits it gets alone: the batch invariance the engine promises
//! (RELIABILITY.md).
//!
//! bf16 weights are widened in pairs (one 256-bit load is sixteen bf16 values: a shift
//! left by 16 makes the even elements f32, a mask keeps the odd ones), so for bf16 step 0
//! of a chunk takes its even elements and step 1 its odd ones, and the activation rows
//! are copied once per GEMM in that order (evens, then odds, of each sixteen).
//!
//! Work is split over rayon's threads by pieces of weight rows, each output computed by
//! one thread; each piece's weights are read from memory once and then from L2 while the
//! activation rows' tiles go over them.

use std::mem::size_of;

use rayon::prelude::*;

use super::weight_gemm::{self, in_pieces, with_scratch, Shape};

/// The executors take this path up to this many activation rows (the gemm crate beyond):
/// measured on the 2-core dev box (BENCHMARKS.md), the tiles prefill 64 tokens of the small
/// preset 1.3x (f32) to 1.8x (bf16) faster than the gemm crate (bf16: on widened blocks),
/// 128 tokens about 1.1x (session 12), and since their first pass prefetches (session 14)
/// 256 and 512 tokens 1.08x and 0.98x (f32: even), 1.19x and 1.13x (bf16); not measured
/// beyond 512 rows, so the gemm crate keeps those. Every row is computed alone at any
/// count; the engine's invariance promise stays at [`super::weight_gemm::MAX_N`] rows a
/// call.
pub const GEMM_MAX_N: usize = 512;

/// Weight rows of the AVX2 tile.
const TILE_W: usize = 3;
/// Weight rows of a piece of work, at most (a multiple of 24, see [`piece_rows`]).
const PIECE_ROWS: usize = 96;

/// What a tile reads ahead while it computes (`avx2::tile`'s `PF`): nothing,
const NONE: u8 = 0;
/// the next tile's weights into L1 (tiles whose own weights come from memory),
const NEXT_TILE: u8 = 1;
/// or its own rows of the next piece into L2 (the second pass over a piece).
const NEXT_PIECE: u8 = 2;

/// A weight element type this path reads: f32 or bf16 bits (`u16`).
pub trait Lanes: Copy + Send + Sync + 'static {
    /// Elements a chunk of K: the unit of zero padding and of the activations' order.
    const CHUNK: usize;
    /// The zero weight (padding).
    const ZERO: Self;
    /// Activation rows of the AVX2 tile (at most 4): with `TILE_W` weight rows, as many
    /// accumulators as leave registers for the weights (bf16 widens them: 3 x 3; f32: 4 x
    /// 3, twelve accumulators, three weight vectors and one activation vector).
    const TILE_X: usize;
    /// Activation rows of the tile compiled with AVX-512VL's 32 vector registers
    /// (where the CPU has AVX-512F and VL): f32 8 x 3 (24 accumulators, three weight vectors, one
    /// activation vector), bf16 6 x 3 (its widening takes registers too).
    const WIDE_X: usize;
    /// Weight rows of the one- and two-row (decode) tiles: 6 or 8 (bf16 takes two dependent
    /// multiply-adds a chunk, so more rows keep enough in flight; measured).
    const DECODE_W: usize;
    /// Whether the second pass over a piece's weights (prompts of more than
    /// [`Lanes::TILE_X`] rows) reads the next piece into L2, so that its first pass finds
    /// its weights there (see `avx2::block`; measured, f32 only).
    const PIECE_AHEAD: bool;

    /// The element's value as f32, exactly.
    fn widen(self) -> f32;

    /// The element of a chunk that step `t` (below `CHUNK / 8`) adds into lane `l`.
    fn elem(t: usize, l: usize) -> usize;

    /// Step `t` of the chunk at `w`: its eight elements `elem(t, 0..8)` widened to f32.
    ///
    /// # Safety
    /// `w` points at `CHUNK` readable elements; the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn step(w: *const Self, t: usize) -> std::arch::x86_64::__m256;
}

impl Lanes for f32 {
    const CHUNK: usize = 8;
    const ZERO: f32 = 0.0;
    const TILE_X: usize = 4;
    const WIDE_X: usize = 8;
    const DECODE_W: usize = 6;
    const PIECE_AHEAD: bool = true;

    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[inline(always)]
    fn elem(_t: usize, l: usize) -> usize {
        l
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn step(w: *const f32, _t: usize) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's: eight readable elements, AVX2.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(w) }
    }
}

impl Lanes for u16 {
    const CHUNK: usize = 16;
    const ZERO: u16 = 0;
    const TILE_X: usize = 3;
    const WIDE_X: usize = 6;
    const DECODE_W: usize = 8;
    const PIECE_AHEAD: bool = false;

    #[inline(always)]
    fn widen(self) -> f32 {
        crate::plan::widen_bf16(self)
    }

    #[inline(always)]
    fn elem(t: usize, l: usize) -> usize {
        2 * l + t
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn step(w: *const u16, t: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's: sixteen readable elements (32 bytes), AVX2.
        unsafe {
            let words = _mm256_loadu_si256(w.cast());
            if t == 0 {
                // The even element of each 32-bit word is its low half.
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(words))
            } else {
                _mm256_castsi256_ps(_mm256_and_si256(
                    words,
                    _mm256_set1_epi32(0xffff_0000_u32 as i32),
                ))
            }
        }
    }
}

/// Activation row `x` (k values) copied into `out` (K padded to whole chunks, the padding
/// zero) in the order the chunk steps read it: `out[c * CHUNK + 8 t + l] = x[c * CHUNK +
/// elem(t, l)]`.
fn pack_row<W: Lanes>(x: &[f32], out: &mut [f32]) {
    for (c, dst) in out.chunks_exact_mut(W::CHUNK).enumerate() {
        let src = x.get(c * W::CHUNK..).unwrap_or(&[]);
        for t in 0..W::CHUNK / 8 {
            for l in 0..8 {
                let e = W::elem(t, l);
                dst[8 * t + l] = src.get(e).copied().unwrap_or(0.0);
            }
        }
    }
}

/// One output by the definition: weight row `w` (k elements) against packed activation
/// row `xp` (k padded to whole chunks), before alpha and beta.
fn dot_portable<W: Lanes>(w: &[W], xp: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (c, xc) in xp.chunks_exact(W::CHUNK).enumerate() {
        let wc = w.get(c * W::CHUNK..).unwrap_or(&[]);
        for t in 0..W::CHUNK / 8 {
            for (l, a) in acc.iter_mut().enumerate() {
                let wv = wc.get(W::elem(t, l)).map_or(0.0, |v| v.widen());
                *a = wv.mul_add(xc[8 * t + l], *a);
            }
        }
    }
    super::sum_tree::sum8(acc)
}

/// The kernels this CPU runs: AVX2 with FMA where present, portable otherwise (the same
/// bits).
#[derive(Clone, Copy, Debug)]
struct Kernels {
    /// The CPU has AVX2 and FMA (only [`Kernels::detect`] sets it).
    simd: bool,
    /// It has AVX-512F and VL as well: prompt tiles of [`Lanes::WIDE_X`] activation rows,
    /// the same 256-bit operations compiled with 32 vector registers.
    wide: bool,
}

impl Kernels {
    fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        let simd = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let simd = false;
        #[cfg(target_arch = "x86_64")]
        let wide = simd
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl");
        #[cfg(not(target_arch = "x86_64"))]
        let wide = false;
        Kernels { simd, wide }
    }

    /// The AVX2 kernels with 16 vector registers only, where the CPU has AVX2 (for tests of
    /// the tiles a CPU without AVX-512 runs).
    #[cfg(test)]
    fn narrow() -> Kernels {
        Kernels {
            wide: false,
            ..Kernels::detect()
        }
    }

    #[cfg(test)]
    fn portable() -> Kernels {
        Kernels {
            simd: false,
            wide: false,
        }
    }
}

/// The outputs of weight rows `i0..i0 + rows` for activation rows `j0..j0 + cols`, written
/// to `out[(j - j0) * ld + (i - i0)]`, before alpha and beta. `w` holds the whole weight
/// (rows `lda` apart, k used), `xp` the packed activation rows (`kp` apart).
struct Block<'a, W> {
    w: &'a [W],
    lda: usize,
    k: usize,
    xp: &'a [f32],
    kp: usize,
    /// Whether the piece after this one lies right after it in memory, to be read ahead
    /// ([`Lanes::PIECE_AHEAD`]): not for rows filled into a scratch (`gemm_filled`).
    follows: bool,
}

impl<W: Lanes> Block<'_, W> {
    fn portable(&self, i0: usize, rows: usize, j0: usize, cols: usize, out: &mut [f32], ld: usize) {
        for j in 0..cols {
            let x = &self.xp[(j0 + j) * self.kp..(j0 + j + 1) * self.kp];
            for i in 0..rows {
                let r = (i0 + i) * self.lda;
                out[j * ld + i] = dot_portable(&self.w[r..r + self.k], x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::mem::size_of;

    use super::super::sum_tree::sum8_avx;
    use super::{tile_rows, Block, Lanes, NEXT_PIECE, NEXT_TILE, NONE, TILE_W};

    /// One chunk into the `R x C` accumulators: weight row pointers `w[c]` and packed
    /// activation pointers `x[r]` at the chunk's start.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn chunk<W: Lanes, const R: usize, const C: usize>(
        acc: &mut [[__m256; C]; R],
        w: [*const W; C],
        x: [*const f32; R],
    ) {
        for t in 0..W::CHUNK / 8 {
            // SAFETY: the caller's: a whole chunk behind every pointer, AVX2 and FMA.
            unsafe {
                let wv: [__m256; C] = std::array::from_fn(|c| W::step(w[c], t));
                for r in 0..R {
                    let xv = _mm256_loadu_ps(x[r].add(8 * t));
                    for c in 0..C {
                        acc[r][c] = _mm256_fmadd_ps(wv[c], xv, acc[r][c]);
                    }
                }
            }
        }
    }

    /// The body of [`tile`] and [`tile_wide`] (one text compiled under each function's
    /// target features), over the caller's `W`, `R`, `C`, `PF` and arguments.
    macro_rules! tile_body {
        ($b:ident, $i0:ident, $j0:ident, $out:ident, $ld:ident, $ahead:ident) => {{
            let (b, i0, j0, out, ld, ahead): (
                &Block<'_, W>,
                usize,
                usize,
                &mut [f32],
                usize,
                usize,
            ) = ($b, $i0, $j0, $out, $ld, $ahead);
            let body = b.k / W::CHUNK * W::CHUNK;
            let wp: [*const W; C] = std::array::from_fn(|c| b.w[(i0 + c) * b.lda..].as_ptr());
            let xp: [*const f32; R] = std::array::from_fn(|r| b.xp[(j0 + r) * b.kp..].as_ptr());
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let mut e = 0;
            while e < body {
                if PF == NEXT_TILE {
                    // The next tile's weights (C rows from here; a prefetch of an address past
                    // the weights never faults), this chunk's share of them in address order:
                    // the one- and two-row tiles read C short rows at once, which the hardware
                    // prefetcher does not follow as it follows one long stream (bf16 decode
                    // went from 1.25x slower than the dot products to even, BENCHMARKS.md).
                    let next = wp[0].cast::<u8>().wrapping_add(C * b.lda * size_of::<W>());
                    let mut off = e * size_of::<W>() * C;
                    while off < (e + W::CHUNK) * size_of::<W>() * C {
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(off).cast());
                        off += 64;
                    }
                }
                if PF == NEXT_PIECE {
                    // Into L2 only: the tile's own weights and activations hold L1.
                    let next = wp[0]
                        .cast::<u8>()
                        .wrapping_add(ahead * b.lda * size_of::<W>());
                    let mut off = e * size_of::<W>() * C;
                    while off < (e + W::CHUNK) * size_of::<W>() * C {
                        _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(off).cast());
                        off += 64;
                    }
                }
                // SAFETY: e + CHUNK <= body <= k: the chunk lies inside each weight row (rows
                // are lda >= k apart, and the caller's rows exist) and inside each packed
                // activation row (kp >= k).
                unsafe {
                    chunk::<W, R, C>(&mut acc, wp.map(|p| p.add(e)), xp.map(|p| p.add(e)));
                }
                e += W::CHUNK;
            }
            if body < b.k {
                // The last, partial chunk: the weights copied into zeroed chunks.
                let mut pad = [[W::ZERO; 16]; C];
                for (c, dst) in pad.iter_mut().enumerate() {
                    let r = (i0 + c) * b.lda;
                    dst[..b.k - body].copy_from_slice(&b.w[r + body..r + b.k]);
                }
                // SAFETY: each pad row holds 16 >= CHUNK elements; the packed activation rows
                // hold kp >= body + CHUNK.
                unsafe {
                    chunk::<W, R, C>(
                        &mut acc,
                        std::array::from_fn(|c| pad[c].as_ptr()),
                        xp.map(|p| p.add(body)),
                    );
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (c, v) in row.iter().enumerate() {
                    out[(j0 + r) * ld + i0 + c] = sum8_avx(*v);
                }
            }
        }};
    }

    /// The `R x C` tile at weight row `i0`, activation row `j0`, over all of K; `PF`: what
    /// it prefetches ([`NEXT_TILE`]: the next tile's weights, as its own come from memory,
    /// read once; [`NEXT_PIECE`]: the same rows `ahead` rows on, the next piece's).
    ///
    /// # Safety
    /// Weight rows `i0..i0 + C` and activation rows `j0..j0 + R` exist in `b`; the CPU has
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<W: Lanes, const R: usize, const C: usize, const PF: u8>(
        b: &Block<'_, W>,
        i0: usize,
        j0: usize,
        out: &mut [f32],
        ld: usize,
        ahead: usize,
    ) {
        // The body's unsafe blocks hold by this function's contract.
        tile_body!(b, i0, j0, out, ld, ahead)
    }

    /// [`tile`] compiled with AVX-512VL's 32 vector registers (the same operations: the same
    /// bits), for the tiles of more rows than [`Lanes::TILE_X`].
    ///
    /// # Safety
    /// As [`tile`]'s; AVX-512F and VL are present.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    unsafe fn tile_wide<W: Lanes, const R: usize, const C: usize, const PF: u8>(
        b: &Block<'_, W>,
        i0: usize,
        j0: usize,
        out: &mut [f32],
        ld: usize,
        ahead: usize,
    ) {
        // The body's unsafe blocks hold by this function's contract.
        tile_body!(b, i0, j0, out, ld, ahead)
    }

    /// [`tile`] (or [`tile_wide`] where `wide` and the tile has more rows than
    /// [`Lanes::TILE_X`]) with its prefetch `pf` ([`NONE`],
    /// [`NEXT_TILE`] or [`NEXT_PIECE`], the next piece `ahead` rows on) chosen at run time,
    /// once a tile.
    ///
    /// # Safety
    /// As [`tile`]'s ([`tile_wide`]'s where `wide`).
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_pf<W: Lanes, const R: usize, const C: usize>(
        wide: bool,
        pf: u8,
        b: &Block<'_, W>,
        i0: usize,
        j0: usize,
        out: &mut [f32],
        ld: usize,
        ahead: usize,
    ) {
        // SAFETY: the caller's.
        unsafe {
            if wide && R > W::TILE_X {
                return match pf {
                    NEXT_TILE => tile_wide::<W, R, C, NEXT_TILE>(b, i0, j0, out, ld, ahead),
                    NEXT_PIECE => tile_wide::<W, R, C, NEXT_PIECE>(b, i0, j0, out, ld, ahead),
                    _ => tile_wide::<W, R, C, NONE>(b, i0, j0, out, ld, ahead),
                };
            }
            match pf {
                NEXT_TILE => tile::<W, R, C, NEXT_TILE>(b, i0, j0, out, ld, ahead),
                NEXT_PIECE => tile::<W, R, C, NEXT_PIECE>(b, i0, j0, out, ld, ahead),
                _ => tile::<W, R, C, NONE>(b, i0, j0, out, ld, ahead),
            }
        }
    }

    /// Rows `i0..i0 + rows` by activation rows `0..n` into `out` (rows `ld` apart per
    /// activation row), in tiles.
    ///
    /// # Safety
    /// The rows exist in `b`; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block<W: Lanes>(
        wide: bool,
        b: &Block<'_, W>,
        i0: usize,
        rows: usize,
        n: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        // `out` is indexed from the piece's first row.
        let w = Block {
            w: &b.w[i0 * b.lda..],
            ..*b
        };
        // SAFETY (every call below): the tile's rows lie inside the piece and 0..n.
        unsafe {
            if n <= 2 {
                // Decode: weights from memory, read once; wide tiles so that enough
                // accumulators are in flight, and prefetching.
                let dw = W::DECODE_W;
                let mut i = 0;
                while i + dw <= rows {
                    match (n, dw) {
                        (1, 8) => tile::<W, 1, 8, NEXT_TILE>(&w, i, 0, out, ld, 0),
                        (_, 8) => tile::<W, 2, 8, NEXT_TILE>(&w, i, 0, out, ld, 0),
                        (1, _) => tile::<W, 1, 6, NEXT_TILE>(&w, i, 0, out, ld, 0),
                        _ => tile::<W, 2, 6, NEXT_TILE>(&w, i, 0, out, ld, 0),
                    }
                    i += dw;
                }
                while i < rows {
                    match n {
                        1 => tile::<W, 1, 1, NEXT_TILE>(&w, i, 0, out, ld, 0),
                        _ => tile::<W, 2, 1, NEXT_TILE>(&w, i, 0, out, ld, 0),
                    }
                    i += 1;
                }
                return;
            }
            // Rows dequantized into a scratch (`gemm_filled`) take the same tiles: the
            // 32-register ones lost there (0.89x, session 21) only while the packed rows
            // were 4 KiB apart (`packed_stride`); since, a 64-token int4 prefill of the
            // 0.5b preset runs 1.09x faster with them (BENCHMARKS.md, session 22).
            let most = tile_rows::<W>(wide, n);
            let first = n.min(most);
            let mut j = 0;
            while j < n {
                let r = (n - j).min(most);
                // The first tiles of the piece (j = 0, at least 3 rows since n > 2)
                // read its weights from memory: they prefetch the next tile's, as the
                // decode tiles do; the later ones find them in L2 (measured: bf16
                // prefill of 8 tokens 1.4x, f32 1.08x, BENCHMARKS.md). Without more,
                // memory is idle through the later passes and the first pass waits on
                // it with little arithmetic to hide it; so for f32 the second pass
                // reads the next piece (the thread's next, mostly: rayon hands a
                // thread neighbouring pieces) into L2 (f32 prefill of 8 to 64 tokens
                // 1.17x to 1.04x; bf16, whose weights are half the bytes, lost 5-10%;
                // BENCHMARKS.md, session 19).
                let pf = if j == 0 {
                    NEXT_TILE
                } else if b.follows && W::PIECE_AHEAD && j == first {
                    NEXT_PIECE
                } else {
                    NONE
                };
                let mut i = 0;
                while i + TILE_W <= rows {
                    match r {
                        1 => tile_pf::<W, 1, TILE_W>(wide, pf, &w, i, j, out, ld, rows),
                        2 => tile_pf::<W, 2, TILE_W>(wide, pf, &w, i, j, out, ld, rows),
                        3 => tile_pf::<W, 3, TILE_W>(wide, pf, &w, i, j, out, ld, rows),
                        4 => tile_pf::<W, 4, TILE_W>(wide, pf, &w, i, j, out, ld, rows),
                        5 => tile_pf::<W, 5, TILE_W>(wide, pf, &w, i, j, out, ld, rows),
                        6 => tile_pf::<W, 6, TILE_W>(wide, pf, &w, i, j, out, ld, rows),
                        7 => tile_pf::<W, 7, TILE_W>(wide, pf, &w, i, j, out, ld, rows),
                        _ => tile_pf::<W, 8, TILE_W>(wide, pf, &w, i, j, out, ld, rows),
                    }
                    i += TILE_W;
                }
                while i < rows {
                    match r {
                        1 => tile::<W, 1, 1, NONE>(&w, i, j, out, ld, 0),
                        2 => tile::<W, 2, 1, NONE>(&w, i, j, out, ld, 0),
                        3 => tile::<W, 3, 1, NONE>(&w, i, j, out, ld, 0),
                        4 => tile::<W, 4, 1, NONE>(&w, i, j, out, ld, 0),
                        5 => tile::<W, 5, 1, NONE>(&w, i, j, out, ld, 0),
                        6 => tile::<W, 6, 1, NONE>(&w, i, j, out, ld, 0),
                        7 => tile::<W, 7, 1, NONE>(&w, i, j, out, ld, 0),
                        _ => tile::<W, 8, 1, NONE>(&w, i, j, out, ld, 0),
                    }
                    i += 1;
                }
                j += r;
            }
        }
    }
}

impl<W: Lanes> Block<'_, W> {
    /// Rows `i0..i0 + rows` for activation rows `0..n`: `out[j * rows + i]`.
    fn run(&self, kern: Kernels, i0: usize, rows: usize, n: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if kern.simd {
            // SAFETY: AVX2 and FMA are present (`Kernels::detect`); the piece's rows exist
            // (the caller splits 0..m) and so do the n packed activation rows.
            unsafe { avx2::block(kern.wide, self, i0, rows, n, out, rows) };
            return;
        }
        let _ = kern;
        self.portable(i0, rows, 0, n, out, rows);
    }
}

/// Activation rows of the prompt tiles for a GEMM of `n` rows: [`Lanes::TILE_X`] with 16
/// vector registers; with 32 ([`Kernels::wide`]) [`Lanes::WIDE_X`], except that where
/// the second pass over a piece reads the next one ahead ([`Lanes::PIECE_AHEAD`], f32) the
/// tiles stay low enough for two passes, `n / 2` rows down to `TILE_X` (one pass of eight
/// f32 rows lost that read: an 8-token prefill of the small preset ran at 0.77x).
fn tile_rows<W: Lanes>(wide: bool, n: usize) -> usize {
    // `avx2::block` dispatches tiles of 1 to 8 rows.
    const { assert!(W::TILE_X <= 4 && W::TILE_X <= W::WIDE_X && W::WIDE_X <= 8) };
    if !wide {
        W::TILE_X
    } else if W::PIECE_AHEAD {
        (n / 2).clamp(W::TILE_X, W::WIDE_X)
    } else {
        W::WIDE_X
    }
}

/// Weight rows a piece for `n` activation rows and weight rows of `row_bytes` bytes: a
/// multiple of 24: of [`TILE_W`] and of the decode tiles' widths (6, 8).
fn piece_rows(n: usize, row_bytes: usize) -> usize {
    weight_gemm::piece_rows(n, row_bytes, 24, PIECE_ROWS) / 24 * 24
}

/// Runs the GEMM (any `n`; the executors take it for at most [`GEMM_MAX_N`] rows). The caller
/// has checked that `w`, `x` and `c` hold every element the shape touches.
///
/// ```
/// use ngpt_runtime::cpu::weight_gemm::Shape;
/// use ngpt_runtime::cpu::tiles::gemm;
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
pub fn gemm<W: Lanes>(s: Shape, w: &[W], x: &[f32], c: &mut [f32]) {
    gemm_with(Kernels::detect(), s, w, x, c)
}

/// Runs `f` on the activation rows packed once for the tiles of `W` (padded to whole
/// chunks, in the steps' order) and their stride, in this thread's scratch: every value is
/// written (`pack_row`), so a reused scratch needs no clearing, and a prompt's rows are
/// packed on every thread (against one thread packing into freshly allocated pages while
/// the others waited: a 512-token f32 prefill paired 1.015, BENCHMARKS.md, session 22).
fn with_packed<W: Lanes, R>(s: Shape, x: &[f32], f: impl FnOnce(&[f32], usize) -> R) -> R {
    let kp = packed_stride::<W>(s.k);
    with_scratch(&PACKED, s.n * kp, |xp| {
        if cfg!(debug_assertions) {
            // A value `pack_row` leaves unwritten shows in the tests' results.
            xp.fill(f32::NAN);
        }
        if kp > 0 {
            let pack =
                |(j, dst): (usize, &mut [f32])| pack_row::<W>(&x[j * s.ldb..j * s.ldb + s.k], dst);
            if s.n * kp >= PACK_PARALLEL {
                xp.par_chunks_exact_mut(kp).enumerate().for_each(pack);
            } else {
                xp.chunks_exact_mut(kp).enumerate().for_each(pack);
            }
        }
        f(xp, kp)
    })
}

/// Values from one packed activation row's start to the next's: K padded to whole chunks,
/// and 64 values (256 bytes) more where that is a multiple of 4 KiB. Rows a multiple of 4
/// KiB apart put a tile's activation vectors at one offset in every page, and Zen 4 ran
/// the GEMMs of K = 1024 (the 0.5b preset's) at two thirds of the rate of the K around
/// them at 64 and 512 rows (8 x 3 tiles, 64 rows, two threads: 112 against 165-189
/// GFLOP/s; 177 with these 256 bytes; 64 bytes gave 163 and lost 8% at K = 2048;
/// BENCHMARKS.md, session 22).
fn packed_stride<W: Lanes>(k: usize) -> usize {
    let kp = k.div_ceil(W::CHUNK) * W::CHUNK;
    if kp > 0 && (kp * size_of::<f32>()).is_multiple_of(4096) {
        kp + STRIDE_PAD
    } else {
        kp
    }
}

/// What [`packed_stride`] adds (a multiple of every [`Lanes::CHUNK`]).
const STRIDE_PAD: usize = 64;

/// Packed values from which the rows are packed on rayon's threads (a 64 x 512 prompt
/// chunk: below it, packing takes less than waking the threads).
const PACK_PARALLEL: usize = 32 << 10;

thread_local! {
    /// [`with_packed`]'s activation rows, reused by this thread's next GEMM.
    static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// [`gemm_filled`]'s weight rows, reused by the pieces this thread runs.
    static FILLED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The GEMM over f32 weight rows that `fill(r0, dst)` writes, row-major, for rows `r0..r0 +
/// dst.len() / k` (dequantized ones: the quantized GEMMs of more rows than their dot
/// products take): each piece of rows is filled into this thread's scratch, then run
/// through the f32 tiles while it is in L2. Outputs are as [`gemm`] computes them over
/// those weights (`s.lda` is not read: the filled rows are `k` apart).
pub(crate) fn gemm_filled(
    s: Shape,
    x: &[f32],
    c: &mut [f32],
    fill: impl Fn(usize, &mut [f32]) + Sync,
) {
    if s.m == 0 || s.n == 0 {
        return;
    }
    let kern = Kernels::detect();
    with_packed::<f32, _>(s, x, |xp, kp| {
        let per = piece_rows(s.n, s.k * size_of::<f32>());
        in_pieces(s, per, c, |i0, rows, out| {
            with_scratch(&FILLED, rows * s.k, |w| {
                fill(i0, w);
                let b = Block {
                    w,
                    lda: s.k,
                    k: s.k,
                    xp,
                    kp,
                    follows: false,
                };
                b.run(kern, 0, rows, s.n, out);
            })
        })
    });
}

fn gemm_with<W: Lanes>(kern: Kernels, s: Shape, w: &[W], x: &[f32], c: &mut [f32]) {
    if s.m == 0 || s.n == 0 {
        return;
    }
    with_packed::<W, _>(s, x, |xp, kp| {
        let b = Block {
            w,
            lda: s.lda,
            k: s.k,
            xp,
            kp,
            follows: true,
        };
        let per = piece_rows(s.n, s.k * size_of::<W>());
        in_pieces(s, per, c, |i0, rows, out| b.run(kern, i0, rows, s.n, out));
    });
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn bf16(v: f32) -> u16 {
        (v.to_bits() >> 16) as u16
    }

    /// A GEMM of shape m x n x k (padded leading dimensions, alpha 0.75) run by `gemm`,
    /// against exact f64 products; C's padding rows must stay untouched.
    pub(crate) fn case<W: Lanes>(
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

    /// Shapes whose m, n and k are not multiples of the tiles (3 weight rows, 4 activation
    /// rows, 6 for decode), the chunks (8, 16) or the pieces, and some that are.
    const SHAPES: [(usize, usize, usize); 12] = [
        (1, 1, 1),
        (67, 1, 13),
        (130, 3, 70),
        (300, 8, 33),
        (65, 2, 32),
        (129, 5, 103),
        (64, 1, 0),
        (97, 7, 16),
        (200, 32, 47),
        (31, 17, 9),
        (12, 4, 64),
        (250, 13, 768),
    ];

    #[test]
    fn f32_and_bf16_weights_match_exact_products_on_odd_shapes() {
        for (m, n, k) in SHAPES {
            for beta in [0.0, 0.5] {
                case(m, n, k, beta, |v| v, gemm::<f32>);
                case(m, n, k, beta, bf16, gemm::<u16>);
            }
        }
    }

    fn weights<W: Lanes>(len: usize, make: fn(f32) -> W) -> Vec<W> {
        (0..len)
            .map(|i| make(((i.wrapping_mul(2654435761) >> 7) % 2001) as f32 / 1000.0 - 1.0))
            .collect()
    }

    fn acts(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 7.0)
            .collect()
    }

    fn shape(m: usize, n: usize, k: usize, lda: usize, ldb: usize, beta: f32) -> Shape {
        Shape {
            m,
            n,
            k,
            lda,
            ldb,
            ldc: m + 1,
            alpha: 0.75,
            beta,
        }
    }

    /// The documented definition, written out independently: lanes, fused multiply-adds,
    /// zero padding, the tree, alpha and beta.
    fn defined<W: Lanes>(s: Shape, w: &[W], x: &[f32], c: &mut [f32]) {
        for j in 0..s.n {
            for i in 0..s.m {
                let mut acc = [0f32; 8];
                let chunks = s.k.div_ceil(W::CHUNK);
                for ch in 0..chunks {
                    for t in 0..W::CHUNK / 8 {
                        for (l, a) in acc.iter_mut().enumerate() {
                            let e = ch * W::CHUNK + W::elem(t, l);
                            let (wv, xv) = if e < s.k {
                                (w[i * s.lda + e].widen(), x[j * s.ldb + e])
                            } else {
                                (0.0, 0.0)
                            };
                            *a = wv.mul_add(xv, *a);
                        }
                    }
                }
                let sum = ((acc[0] + acc[4]) + (acc[2] + acc[6]))
                    + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
                let d = &mut c[j * s.ldc + i];
                *d = if s.beta == 0.0 {
                    s.alpha * sum
                } else {
                    s.alpha * sum + s.beta * *d
                };
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The AVX2 tiles (where this CPU has AVX2 and FMA), the portable code and the
    /// definition give the same bits on every shape, decode tiles included.
    #[test]
    fn simd_portable_and_the_definition_agree_bitwise() {
        fn check<W: Lanes>(make: fn(f32) -> W) {
            #[cfg(target_arch = "x86_64")]
            {
                // Where the CPU has AVX-512VL, the 32-register tiles run (and `narrow` the
                // others); otherwise this compares fewer kernels than it says.
                let avx512 = std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl");
                assert_eq!(Kernels::detect().wide, Kernels::detect().simd && avx512);
            }
            // Every tile height with 32 registers: f32 5 to 8 rows (10, 13, 14 and 17
            // rows), bf16 4 to 6 (5, 7, 13); packed rows 4 KiB apart before their padding
            // (`packed_stride`), with and without a partial last chunk.
            let more = [
                (40, 2, 1000),
                (7, 1, 17),
                (150, 14, 40),
                (70, 10, 24),
                (30, 9, 1024),
                (27, 11, 1020),
            ];
            for (m, n, k) in SHAPES.into_iter().chain(more) {
                for beta in [0.0, -1.5] {
                    let (lda, ldb) = (k + 5, k + 3);
                    let s = shape(m, n, k, lda, ldb, beta);
                    let w = weights(m * lda, make);
                    let x = acts(n * ldb);
                    let c0: Vec<f32> = (0..n * s.ldc).map(|i| (i % 7) as f32 - 3.0).collect();
                    let mut want = c0.clone();
                    defined(s, &w, &x, &mut want);
                    for kern in [Kernels::detect(), Kernels::narrow(), Kernels::portable()] {
                        let mut got = c0.clone();
                        gemm_with(kern, s, &w, &x, &mut got);
                        assert!(
                            bits(&got) == bits(&want),
                            "{} {kern:?} m{m} n{n} k{k} beta {beta}",
                            std::any::type_name::<W>()
                        );
                    }
                }
            }
        }
        check::<f32>(|v| v);
        check::<u16>(bf16);
    }

    /// Packed activation rows whose stride would be a multiple of 4 KiB get 64 values
    /// more; others keep K padded to whole chunks.
    #[test]
    fn packed_rows_4_kib_apart_are_padded() {
        assert_eq!(packed_stride::<f32>(1024), 1088);
        assert_eq!(packed_stride::<f32>(1020), 1088);
        assert_eq!(packed_stride::<f32>(3072), 3136);
        assert_eq!(packed_stride::<f32>(768), 768);
        assert_eq!(packed_stride::<f32>(1000), 1000);
        assert_eq!(packed_stride::<f32>(13), 16);
        assert_eq!(packed_stride::<u16>(1010), 1088);
        assert_eq!(packed_stride::<u16>(2048), 2112);
        assert_eq!(packed_stride::<u16>(1000), 1008);
        assert_eq!(packed_stride::<u16>(0), 0);
    }

    /// Batch invariance: each activation row of a call of n = 1 to 32 (and 40, 100, 300) rows
    /// gets bitwise what it gets alone, whatever the thread count.
    #[test]
    fn each_row_is_bitwise_its_gemm_alone() {
        fn check<W: Lanes>(make: fn(f32) -> W) {
            for (m, k) in [(70, 1000), (19, 200), (5, 45), (131, 33)] {
                let w = weights(m * k, make);
                let x = acts(300 * k);
                let alone: Vec<Vec<u32>> = (0..300)
                    .map(|j| {
                        let mut c = vec![f32::NAN; m + 1];
                        gemm(
                            shape(m, 1, k, k, k, 0.0),
                            &w,
                            &x[j * k..(j + 1) * k],
                            &mut c,
                        );
                        bits(&c[..m])
                    })
                    .collect();
                for n in (1..=32).chain([40, 100, 300]) {
                    for threads in [1, 3] {
                        let mut c = vec![f32::NAN; n * (m + 1)];
                        rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .build()
                            .expect("pool")
                            .install(|| gemm(shape(m, n, k, k, k, 0.0), &w, &x, &mut c));
                        for (j, col) in c.chunks(m + 1).enumerate() {
                            assert!(
                                bits(&col[..m]) == alone[j],
                                "{} m{m} k{k}: row {j} of {n}, {threads} threads",
                                std::any::type_name::<W>()
                            );
                        }
                    }
                }
            }
        }
        check::<f32>(|v| v);
        check::<u16>(bf16);
    }
}
