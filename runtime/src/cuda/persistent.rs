//! The step table of `decode_persistent` (helpers.cu): a decode program, resolved to device
//! addresses, as the entries one persistent launch walks, and the fusions that let it meet
//! at fewer grid barriers.
//!
//! Every entry is one of the plan kernels (`embed`, `norm_rows`, `lerp_norm`, `swiglu`,
//! `pos_norm`, `attention_decode`) or a `gemv_*` with its arguments, in parameter order.
//! [`fuse`] then folds, where the shapes allow:
//! - `lerp_norm` into the gemv after it that reads the updated rows: each block stages the
//!   rows in shared memory (one warp per row) and block 0 writes them to a second buffer,
//!   because other blocks still read the old rows; from there on every entry that named
//!   the rows' buffer names the one holding the current rows (the two alternate);
//! - `swiglu` into the gemv that reads its output (staged the same way), where nothing
//!   later reads that output;
//! - `pos_norm` into the `attention_decode` after it, where nothing later reads its q.
//!
//! Each fusion removes a grid barrier and a phase in which most blocks wait. The kernel
//! computes what the separate entries compute, with sums in another order.

use std::collections::HashMap;

/// Entry kinds (`PdKind` in helpers.cu).
pub(super) mod kind {
    pub const EMBED: i32 = 0;
    pub const NORM_ROWS: i32 = 1;
    pub const LERP_NORM: i32 = 2;
    pub const SWIGLU: i32 = 3;
    pub const POS_NORM: i32 = 4;
    pub const ATTENTION: i32 = 5;
    pub const GEMV_BF16: i32 = 6;
    pub const GEMV_F32: i32 = 7;
    pub const POS_ATTENTION: i32 = 8;
    /// `gemv_i8_N` / `gemv_i4_N`: p[7] the block scales, i[2] a weight row's bytes, i[5]
    /// the flags (bit 0 vec, bits 8.. log2 block).
    pub const GEMV_I8: i32 = 9;
    pub const GEMV_I4: i32 = 10;
}

/// Where a quantized gemv entry keeps its scales' address (the kernel's last parameter,
/// moved past the slots of the staged inputs, `PdOp.p[3..7]`).
pub(super) const QUANT_SCALES_SLOT: usize = 7;

/// Where a gemv entry's activations come from, `i[7]` (`PdInput` in helpers.cu).
pub(super) mod input {
    pub const GLOBAL: i32 = 0;
    pub const LERP: i32 = 1;
    pub const SWIGLU: i32 = 2;
}

/// Threads per block of `decode_persistent` (`PD_THREADS`).
pub(super) const THREADS: u32 = 512;
/// Largest head_dim `decode_persistent` takes (`PD_MAX_D`).
pub(super) const MAX_D: usize = 128;
/// Attention partials per (row, head) (`PD_SPLITS`), each of `MAX_D + 2` floats.
pub(super) const SPLITS: usize = 32;
/// Most dynamic shared memory a launch asks for, for staged gemv inputs.
pub(super) const MAX_STAGE_BYTES: usize = 96 << 10;

/// One entry of the table (`PdOp` in helpers.cu): addresses, ints and floats in the order
/// of the kernel's parameters; gemv entries add their column count (`i[6]`) and input
/// (`i[7]`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct PdOp {
    pub p: [u64; 10],
    pub i: [i32; 8],
    pub f: [f32; 2],
    pub kind: i32,
}

impl PdOp {
    /// Bytes of one entry in the device table (`sizeof(PdOp)`).
    pub const BYTES: usize = 128;

    /// Appends the entry as the kernel reads it (little-endian, no padding but the last
    /// word).
    pub fn write(&self, out: &mut Vec<u8>) {
        for p in self.p {
            out.extend_from_slice(&p.to_le_bytes());
        }
        for i in self.i {
            out.extend_from_slice(&i.to_le_bytes());
        }
        for f in self.f {
            out.extend_from_slice(&f.to_le_bytes());
        }
        out.extend_from_slice(&self.kind.to_le_bytes());
        out.extend_from_slice(&0i32.to_le_bytes());
    }

    fn is_gemv(&self) -> bool {
        is_gemv_kind(self.kind)
    }

    /// The address slot this entry overwrites without reading it, if any (a gemv with
    /// beta != 0 reads its output too; caches and lerp_norm's rows are updated in place).
    fn output_slot(&self) -> Option<usize> {
        match self.kind {
            kind::GEMV_BF16 | kind::GEMV_F32 | kind::GEMV_I8 | kind::GEMV_I4 => {
                (self.f[1] == 0.0).then_some(2)
            }
            kind::EMBED => Some(2),
            kind::NORM_ROWS | kind::SWIGLU => Some(1),
            kind::POS_NORM => Some(5),
            kind::ATTENTION => Some(4),
            kind::POS_ATTENTION => Some(7),
            _ => None,
        }
    }
}

/// Whether an entry kind is a gemv (any weight format).
pub(super) fn is_gemv_kind(k: i32) -> bool {
    matches!(
        k,
        kind::GEMV_BF16 | kind::GEMV_F32 | kind::GEMV_I8 | kind::GEMV_I4
    )
}

/// Whether an entry of `later` reads `ptr` before one overwrites it.
fn read_later(later: &[PdOp], ptr: u64) -> bool {
    for e in later {
        let out = e.output_slot();
        if e.p
            .iter()
            .enumerate()
            .any(|(k, &p)| p == ptr && Some(k) != out)
        {
            return true;
        }
        if out.is_some_and(|k| e.p[k] == ptr) {
            return false;
        }
    }
    false
}

/// The entry kind of a loaded kernel or gemv, by its entry name.
pub(super) fn kind_of(entry: &str) -> Option<i32> {
    Some(match entry {
        "embed" => kind::EMBED,
        "norm_rows" => kind::NORM_ROWS,
        "lerp_norm" => kind::LERP_NORM,
        "swiglu" => kind::SWIGLU,
        "pos_norm" => kind::POS_NORM,
        "attention_decode" => kind::ATTENTION,
        _ if entry.starts_with("gemv_bf16_") => kind::GEMV_BF16,
        _ if entry.starts_with("gemv_f32_") => kind::GEMV_F32,
        _ if entry.starts_with("gemv_i8_") => kind::GEMV_I8,
        _ if entry.starts_with("gemv_i4_") => kind::GEMV_I4,
        _ => return None,
    })
}

/// What a profile calls an entry (the option `profile` times each inside the launch).
pub(super) fn label(e: &PdOp) -> String {
    match e.kind {
        kind::EMBED => "embed".into(),
        kind::NORM_ROWS => "norm_rows".into(),
        kind::LERP_NORM => "lerp_norm".into(),
        kind::SWIGLU => "swiglu".into(),
        kind::POS_NORM => "pos_norm".into(),
        kind::ATTENTION => "attention_decode (split, combine)".into(),
        kind::POS_ATTENTION => "pos_norm + attention_decode".into(),
        _ => format!(
            "gemv{} m{} k{}{}",
            match e.kind {
                kind::GEMV_BF16 => " bf16",
                kind::GEMV_F32 => " f32",
                kind::GEMV_I8 => " int8",
                kind::GEMV_I4 => " int4",
                _ => "",
            },
            e.i[0],
            e.i[1],
            match e.i[7] {
                input::LERP => " + lerp_norm",
                input::SWIGLU => " + swiglu",
                _ => "",
            }
        ),
    }
}

/// Dynamic shared memory for staging the gemv inputs of `rows` rows of width `c`: the
/// swiglu rows (4c wide) where they fit in [`MAX_STAGE_BYTES`], else the lerp_norm rows
/// (c wide), else none.
pub(super) fn stage_bytes(rows: usize, c: usize) -> usize {
    let f = std::mem::size_of::<f32>();
    [rows * 4 * c * f, rows * c * f]
        .into_iter()
        .find(|&b| b <= MAX_STAGE_BYTES)
        .unwrap_or(0)
}

/// Whether `decode_persistent` takes a plan with this head_dim (its registers hold at
/// most [`MAX_D`] dims, in pairs).
pub(super) fn fits(head_dim: usize) -> bool {
    head_dim <= MAX_D && head_dim.is_multiple_of(2)
}

/// Floats of the attention partials for `rows` rows of `heads` heads on a grid of
/// `blocks` blocks: [`SPLITS`] per (row, head) by default, and in the wide build
/// (`NGPT_PD_WIDE`) as many per (row, head) as the grid's warps shared out over the pairs
/// (`pd_split_cap`), at most max(warps, rows x heads) in all; each `MAX_D + 2` floats.
pub(super) fn part_floats(rows: usize, heads: usize, blocks: usize) -> usize {
    let warps = blocks * (THREADS as usize / 32);
    let pairs = rows * heads;
    let wide = pairs * (warps / pairs.max(1)).max(1);
    (pairs * SPLITS).max(wide) * (MAX_D + 2)
}

/// Where the streaming buffers start in the dynamic shared memory: after `stage` bytes of
/// staged inputs, 16-byte aligned for `cp.async`.
pub(super) fn ring_offset(stage: usize) -> usize {
    stage.next_multiple_of(16)
}

/// Shared memory the kernel declares statically (attention rows, reductions; 25,168 bytes
/// in the sm_90 build), kept free when sizing the streaming buffers.
const STATIC_SHARED: usize = 28 << 10;

/// Bytes of each of `decode_persistent`'s two weight-streaming buffers, behind `stage`
/// bytes of staged inputs, for a block allowed `limit` bytes of shared memory: as much as
/// fits up to 64 KiB, in whole KiB; 0 (no streaming) where less than 8 KiB would.
pub(super) fn stream_slice(limit: usize, stage: usize) -> usize {
    let room = limit.saturating_sub(ring_offset(stage) + STATIC_SHARED) / 2;
    let slice = room.min(64 << 10) / 1024 * 1024;
    if slice >= 8 << 10 {
        slice
    } else {
        0
    }
}

/// How many entries [`fuse`] folded, by fusion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Fused {
    pub lerp_gemv: usize,
    pub swiglu_gemv: usize,
    pub pos_attention: usize,
}

/// Folds entries of `raw` (one decode program of `rows` rows, width `c`) as the module
/// says, with `stage` bytes of shared memory per block for staged rows and `shadow` the
/// address of a second buffer of `rows * c` floats for rows updated by a folded lerp_norm.
pub(super) fn fuse(
    raw: &[PdOp],
    rows: usize,
    c: usize,
    stage: usize,
    shadow: u64,
) -> (Vec<PdOp>, Fused) {
    let f32s = std::mem::size_of::<f32>();
    let (rows_i, c_i) = (rows as i64, c as i64);
    // The buffer now holding what the program calls buffer `k`.
    let mut current: HashMap<u64, u64> = HashMap::new();
    let renamed = |current: &HashMap<u64, u64>, mut e: PdOp| {
        for p in e.p.iter_mut() {
            if let Some(&to) = current.get(p) {
                *p = to;
            }
        }
        e
    };
    let mut out = Vec::with_capacity(raw.len());
    let mut fused = Fused::default();
    let mut i = 0;
    while i < raw.len() {
        let (e, next) = (raw[i], raw.get(i + 1).copied());
        let gemv_of = |g: &PdOp, b: u64, k: i64| {
            g.is_gemv()
                && g.p[1] == b
                && i64::from(g.i[6]) == rows_i
                && i64::from(g.i[1]) == k
                && i64::from(g.i[3]) == k
                && i64::from(e.i[0]) == rows_i
                && g.i[7] == input::GLOBAL
        };
        match next {
            Some(g)
                if e.kind == kind::LERP_NORM
                    && gemv_of(&g, e.p[0], c_i)
                    && rows * c * f32s <= stage
                    && shadow != 0 =>
            {
                let (h, h_in) = (e.p[0], renamed(&current, e).p[0]);
                let h_out = if h_in == h { shadow } else { h };
                let mut f = renamed(&current, g);
                f.i[7] = input::LERP;
                f.p[3] = h_in;
                f.p[4] = renamed(&current, e).p[1];
                f.p[5] = e.p[2];
                f.p[6] = h_out;
                if h_out == h {
                    current.remove(&h);
                } else {
                    current.insert(h, h_out);
                }
                out.push(f);
                fused.lerp_gemv += 1;
                i += 2;
            }
            Some(g)
                if e.kind == kind::SWIGLU
                    && gemv_of(&g, e.p[1], 4 * c_i)
                    && rows * 4 * c * f32s <= stage
                    && !read_later(&raw[i + 2..], e.p[1]) =>
            {
                let mut f = renamed(&current, g);
                f.i[7] = input::SWIGLU;
                f.p[3] = renamed(&current, e).p[0];
                out.push(f);
                fused.swiglu_gemv += 1;
                i += 2;
            }
            Some(a)
                if e.kind == kind::POS_NORM
                    && a.kind == kind::ATTENTION
                    // attention reads pos_norm's q, caches, positions and slots, same rows
                    && a.p[0] == e.p[5]
                    && a.p[1] == e.p[6]
                    && a.p[2] == e.p[7]
                    && a.p[3] == e.p[1]
                    && a.p[5] == e.p[8]
                    && a.i[0] == e.i[0]
                    && !read_later(&raw[i + 2..], e.p[5]) =>
            {
                let e = renamed(&current, e);
                let a = renamed(&current, a);
                let mut f = PdOp {
                    kind: kind::POS_ATTENTION,
                    ..PdOp::default()
                };
                // qkv, positions, table, q_scale, k_scale, k_cache, v_cache, out, slots; rows
                f.p[..9].copy_from_slice(&[
                    e.p[0], e.p[1], e.p[2], e.p[3], e.p[4], e.p[6], e.p[7], a.p[4], e.p[8],
                ]);
                f.i[0] = e.i[0];
                out.push(f);
                fused.pos_attention += 1;
                i += 2;
            }
            _ => {
                out.push(renamed(&current, e));
                i += 1;
            }
        }
    }
    (out, fused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_buffers_fit_beside_the_staged_rows() {
        // H200: 227 KiB a block. Batch 1 at n_embd 1024 stages 16 KiB: two full buffers.
        let limit = 227 << 10;
        assert_eq!(stream_slice(limit, stage_bytes(1, 1024)), 64 << 10);
        // Batch 6 stages 96 KiB of swiglu rows: what is left, in whole KiB; it all fits.
        let stage = stage_bytes(6, 1024);
        assert_eq!(stage, 96 << 10);
        let slice = stream_slice(limit, stage);
        assert!((8 << 10..64 << 10).contains(&slice) && slice.is_multiple_of(1024));
        assert!(ring_offset(stage) + 2 * slice + STATIC_SHARED <= limit);
        // No room: no streaming.
        assert_eq!(stream_slice(48 << 10, 16 << 10), 0);
    }

    const C: usize = 64;
    const SHADOW: u64 = 0x9000;

    fn op(kind: i32, p: &[u64], i: &[i32]) -> PdOp {
        let mut e = PdOp {
            kind,
            ..PdOp::default()
        };
        e.p[..p.len()].copy_from_slice(p);
        e.i[..i.len()].copy_from_slice(i);
        e
    }

    /// gemv of weight `w`: input `b` of width `k`, output `out`, `n` rows.
    fn gemv(w: u64, b: u64, out: u64, m: i32, k: i32, n: i32) -> PdOp {
        let mut e = op(kind::GEMV_BF16, &[w, b, out], &[m, k, k, k, m, 1, n]);
        e.f = [1.0, 0.0];
        e
    }

    // Buffers of a made-up decode program: addresses 0x100.. are activations, 0x800.. weights.
    const TOKENS: u64 = 0x100;
    const X0: u64 = 0x110;
    const H: u64 = 0x120;
    const QKV: u64 = 0x130;
    const POS: u64 = 0x140;
    const SLOTS: u64 = 0x1d0;
    const Q: u64 = 0x150;
    const KC: u64 = 0x160;
    const VC: u64 = 0x170;
    const ATT: u64 = 0x180;
    const PROJ: u64 = 0x190;
    const FC: u64 = 0x1a0;
    const ACT: u64 = 0x1b0;
    const LOGITS: u64 = 0x1c0;

    /// The decode program the compiler emits, `layers` layers of `rows` rows.
    fn program(layers: usize, rows: i32) -> Vec<PdOp> {
        let c = C as i32;
        let mut v = vec![
            op(kind::EMBED, &[TOKENS, 0x800, X0], &[rows]),
            op(kind::NORM_ROWS, &[X0, H], &[rows]),
        ];
        for l in 0..layers as u64 {
            let w = 0x1000 * (l + 1);
            let input = if l == 0 { X0 } else { H };
            v.extend([
                gemv(w, input, QKV, 3 * c, c, rows),
                op(
                    kind::POS_NORM,
                    &[QKV, POS, 0x810, w + 1, w + 2, Q, KC + l, VC + l, SLOTS],
                    &[rows],
                ),
                op(
                    kind::ATTENTION,
                    &[Q, KC + l, VC + l, POS, ATT, SLOTS],
                    &[rows],
                ),
                gemv(w + 3, ATT, PROJ, c, c, rows),
                op(kind::LERP_NORM, &[H, PROJ, w + 4], &[rows]),
                gemv(w + 5, H, FC, 8 * c, c, rows),
                op(kind::SWIGLU, &[FC, ACT], &[rows]),
                gemv(w + 6, ACT, PROJ, c, 4 * c, rows),
                op(kind::LERP_NORM, &[H, PROJ, w + 7], &[rows]),
            ]);
        }
        v.push(gemv(0x820, H, LOGITS, 97, c, rows));
        v
    }

    #[test]
    fn every_fusion_fires_on_the_compiled_decode_program() {
        let raw = program(3, 1);
        let (out, fused) = fuse(&raw, 1, C, stage_bytes(1, C), SHADOW);
        // Per layer: lerp into fc, swiglu into the MLP's gemv, pos_norm into attention,
        // and the MLP's lerp into the next gemv (next layer's qkv, or lm_head).
        assert_eq!(
            fused,
            Fused {
                lerp_gemv: 6,
                swiglu_gemv: 3,
                pos_attention: 3
            }
        );
        assert_eq!(out.len(), raw.len() - 12);
        assert!(out.iter().all(|e| e.kind != kind::LERP_NORM
            && e.kind != kind::SWIGLU
            && e.kind != kind::POS_NORM));
    }

    #[test]
    fn quantized_gemvs_are_entries_and_fold_like_bf16_ones() {
        assert_eq!(kind_of("gemv_i8_3"), Some(kind::GEMV_I8));
        assert_eq!(kind_of("gemv_i4_8"), Some(kind::GEMV_I4));
        assert_eq!(kind_of("dequant_rows"), None);
        // The compiled decode program with int4 and int8 weights folds as with bf16 ones:
        // the same folds fire, and every gemv keeps its kind and its scales' address.
        for k in [kind::GEMV_I4, kind::GEMV_I8] {
            let raw: Vec<PdOp> = program(2, 2)
                .into_iter()
                .map(|mut e| {
                    if e.kind == kind::GEMV_BF16 {
                        e.kind = k;
                        e.p[QUANT_SCALES_SLOT] = e.p[0] + 0x10;
                    }
                    e
                })
                .collect();
            let (folded, fused) = fuse(&raw, 2, C, stage_bytes(2, C), SHADOW);
            assert_eq!(
                fused,
                Fused {
                    lerp_gemv: 4,
                    swiglu_gemv: 2,
                    pos_attention: 2
                }
            );
            assert!(folded
                .iter()
                .filter(|e| e.is_gemv())
                .all(|e| e.kind == k && e.p[QUANT_SCALES_SLOT] == e.p[0] + 0x10));
            assert!(label(&folded[2]).starts_with("gemv int"));
        }
    }

    #[test]
    fn the_updated_rows_alternate_between_the_buffer_and_its_shadow() {
        let raw = program(2, 2);
        let (out, _) = fuse(&raw, 2, C, stage_bytes(2, C), SHADOW);
        let lerps: Vec<(u64, u64)> = out
            .iter()
            .filter(|e| e.is_gemv() && e.i[7] == input::LERP)
            .map(|e| (e.p[3], e.p[6]))
            .collect();
        // in -> out pairs chain: each reads what the previous one wrote.
        assert_eq!(
            lerps,
            vec![(H, SHADOW), (SHADOW, H), (H, SHADOW), (SHADOW, H)]
        );
        // Between the first and second fused lerp, the layer's residual reads are renamed:
        // nothing unfused reads H while the rows live in the shadow.
        let first = out.iter().position(|e| e.i[7] == input::LERP).unwrap();
        let second = first
            + 1
            + out[first + 1..]
                .iter()
                .position(|e| e.i[7] == input::LERP)
                .unwrap();
        for e in &out[first + 1..second] {
            assert!(!e.p.contains(&H), "{e:?} reads the stale rows");
        }
    }

    #[test]
    fn fusions_hold_back_where_shapes_or_later_reads_forbid() {
        // Too little shared memory: no staged rows, only pos_norm folds.
        let raw = program(2, 1);
        let (out, fused) = fuse(&raw, 1, C, 0, SHADOW);
        assert_eq!(
            (fused.lerp_gemv, fused.swiglu_gemv, fused.pos_attention),
            (0, 0, 2)
        );
        assert_eq!(out.len(), raw.len() - 2);
        // Room for c-wide rows only: lerp_norm folds, swiglu does not.
        let (_, fused) = fuse(&raw, 1, C, C * 4, SHADOW);
        assert_eq!((fused.lerp_gemv, fused.swiglu_gemv), (4, 0));
        // A later read of swiglu's output or of pos_norm's q keeps them separate (the
        // compiled program only overwrites them, in the next layer: those fold, above).
        let mut raw = program(1, 1);
        raw.push(op(kind::LERP_NORM, &[Q, ACT, 0x830], &[1]));
        let (_, fused) = fuse(&raw, 1, C, stage_bytes(1, C), SHADOW);
        assert_eq!((fused.swiglu_gemv, fused.pos_attention), (0, 0));
        // Attention reading other slots than pos_norm wrote with stays separate.
        let mut raw = program(1, 1);
        for e in raw.iter_mut().filter(|e| e.kind == kind::ATTENTION) {
            e.p[5] = SLOTS + 1;
        }
        let (_, fused) = fuse(&raw, 1, C, stage_bytes(1, C), SHADOW);
        assert_eq!(fused.pos_attention, 0);
        // A gemv with more columns than the lerp's rows does not take staged rows.
        let raw = program(1, 2);
        let (_, fused) = fuse(&raw, 1, C, stage_bytes(2, C), SHADOW);
        assert_eq!((fused.lerp_gemv, fused.swiglu_gemv), (0, 0));
    }

    #[test]
    fn entries_are_written_in_the_kernels_layout() {
        let mut e = op(
            kind::POS_ATTENTION,
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            &[11, 12],
        );
        e.f = [0.5, -2.0];
        let mut bytes = vec![];
        e.write(&mut bytes);
        assert_eq!(bytes.len(), PdOp::BYTES);
        assert_eq!(bytes[72..80], 10u64.to_le_bytes());
        assert_eq!(bytes[80..84], 11i32.to_le_bytes());
        assert_eq!(bytes[112..116], 0.5f32.to_le_bytes());
        assert_eq!(bytes[120..124], kind::POS_ATTENTION.to_le_bytes());
    }

    #[test]
    fn staging_fits_swiglu_rows_then_lerp_rows_then_nothing() {
        assert_eq!(stage_bytes(1, 1024), 16 << 10);
        assert_eq!(stage_bytes(8, 1024), 32 << 10);
        assert_eq!(stage_bytes(8, 8192), 0);
    }

    /// A host model of the table: every buffer by address, each entry kind as the kernel
    /// computes it in shape (simplified where the fusions do not care: pos_norm
    /// normalizes whole q and k rows into one cache slot per row, attention mixes q with
    /// that slot). Running a table and its folded form must leave the same logits and
    /// caches: the folding pass's renaming and liveness rules, checked without a GPU.
    struct Host {
        c: usize,
        rows: usize,
        mem: HashMap<u64, Vec<f64>>,
    }

    impl Host {
        fn buf(&mut self, a: u64) -> &mut Vec<f64> {
            let n = self.rows * 8 * self.c;
            // Weights (0x800 and up) hold values of their address; activations start as NaN.
            self.mem.entry(a).or_insert_with(|| {
                (0..n.max(97 * 64))
                    .map(|i| {
                        if a >= 0x800 {
                            (((a as usize * 31 + i * 17) % 101) as f64 - 50.0) / 50.0
                        } else {
                            f64::NAN
                        }
                    })
                    .collect()
            })
        }
        fn row(&mut self, a: u64, r: usize, w: usize) -> Vec<f64> {
            self.buf(a)[r * w..(r + 1) * w].to_vec()
        }
        fn set_row(&mut self, a: u64, r: usize, w: usize, v: &[f64]) {
            self.buf(a)[r * w..(r + 1) * w].copy_from_slice(v);
        }
        fn norm(v: &[f64]) -> Vec<f64> {
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| x / n).collect()
        }
        fn lerp(&mut self, h: u64, br: u64, lr: u64, r: usize) -> Vec<f64> {
            let c = self.c;
            let (hv, bv, lv) = (
                self.row(h, r, c),
                Self::norm(&self.row(br, r, c)),
                self.row(lr, 0, c),
            );
            Self::norm(
                &(0..c)
                    .map(|j| hv[j] + lv[j] * (bv[j] - hv[j]))
                    .collect::<Vec<_>>(),
            )
        }
        fn swiglu(&mut self, fc: u64, r: usize) -> Vec<f64> {
            let (c, f) = (self.c, self.row(fc, r, 8 * self.c));
            (0..4 * c)
                .map(|j| f[j] * (f[4 * c + j] / (1.0 + (-f[4 * c + j]).exp())))
                .collect()
        }
        /// pos_norm's q, and its k and v written to the caches.
        fn pos(&mut self, e: &PdOp, k_at: usize, r: usize) -> Vec<f64> {
            let c = self.c;
            let row = self.row(e.p[0], r, 3 * c);
            self.set_row(e.p[k_at], r, c, &Self::norm(&row[c..2 * c]));
            self.set_row(e.p[k_at + 1], r, c, &row[2 * c..]);
            Self::norm(&row[..c])
        }
        fn attend(&mut self, q: &[f64], kc: u64, vc: u64, out: u64, r: usize) {
            let c = self.c;
            let (k, v) = (self.row(kc, r, c), self.row(vc, r, c));
            let o: Vec<f64> = (0..c).map(|j| q[j] * k[(j + 1) % c] + v[j]).collect();
            self.set_row(out, r, c, &o);
        }
        fn run(&mut self, table: &[PdOp]) {
            let c = self.c;
            for e in table {
                for r in 0..self.rows {
                    match e.kind {
                        kind::LERP_NORM => {
                            let h = self.lerp(e.p[0], e.p[1], e.p[2], r);
                            self.set_row(e.p[0], r, c, &h);
                        }
                        kind::SWIGLU => {
                            let a = self.swiglu(e.p[0], r);
                            self.set_row(e.p[1], r, 4 * c, &a);
                        }
                        kind::POS_NORM => {
                            let q = self.pos(e, 6, r);
                            self.set_row(e.p[5], r, c, &q);
                        }
                        kind::ATTENTION => {
                            let q = self.row(e.p[0], r, c);
                            self.attend(&q, e.p[1], e.p[2], e.p[4], r);
                        }
                        kind::POS_ATTENTION => {
                            let q = self.pos(e, 5, r);
                            self.attend(&q, e.p[5], e.p[6], e.p[7], r);
                        }
                        kind::GEMV_BF16 | kind::GEMV_F32 | kind::GEMV_I8 | kind::GEMV_I4 => {
                            let (m, k) = (e.i[0] as usize, e.i[1] as usize);
                            let x = match e.i[7] {
                                input::LERP => {
                                    let h = self.lerp(e.p[3], e.p[4], e.p[5], r);
                                    self.set_row(e.p[6], r, c, &h);
                                    h
                                }
                                input::SWIGLU => self.swiglu(e.p[3], r),
                                _ => self.row(e.p[1], r, e.i[3] as usize),
                            };
                            let w = self.buf(e.p[0]).clone();
                            let y: Vec<f64> = (0..m)
                                .map(|i| (0..k).map(|kk| w[(i * k + kk) % w.len()] * x[kk]).sum())
                                .collect();
                            self.set_row(e.p[2], r, m, &y);
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    #[test]
    fn attention_partials_hold_every_split_the_kernel_may_write() {
        // pd_split_cap: PD_SPLITS, or (wide) max(1, warps / pairs) per (row, head).
        for (rows, heads, blocks) in [
            (1, 16, 132),
            (8, 16, 132),
            (32, 16, 132),
            (1, 3, 3),
            (3, 4, 1),
        ] {
            let warps = blocks * 16;
            let pairs = rows * heads;
            let cap = (warps / pairs).max(1);
            let have = part_floats(rows, heads, blocks) / (MAX_D + 2);
            assert!(have >= pairs * SPLITS, "{rows} {heads} {blocks}");
            assert!(have >= pairs * cap, "{rows} {heads} {blocks}");
        }
        // One H200 grid at batch 1: 2,112 warps, 132 splits a head.
        assert_eq!(part_floats(1, 16, 132), 16 * 132 * (MAX_D + 2));
    }

    #[test]
    fn a_folded_table_computes_what_the_unfolded_one_does() {
        for (layers, rows) in [(1, 1), (3, 2), (2, 3)] {
            // From the first gemv on (embedding left out): X0 and H hold a row each.
            let raw: Vec<PdOp> = program(layers, rows as i32)
                .into_iter()
                .filter(|e| e.kind != kind::EMBED && e.kind != kind::NORM_ROWS)
                .collect();
            let (folded, fused) = fuse(&raw, rows, C, stage_bytes(rows, C), SHADOW);
            assert_eq!(fused.lerp_gemv, 2 * layers);
            let mut results = vec![];
            for table in [&raw, &folded] {
                let mut host = Host {
                    c: C,
                    rows,
                    mem: HashMap::new(),
                };
                for (a, salt) in [(X0, 1.0), (H, 2.0)] {
                    for r in 0..rows {
                        let v: Vec<f64> = (0..C)
                            .map(|j| ((j * 7 + r) % 13) as f64 - 6.0 + salt)
                            .collect();
                        host.set_row(a, r, C, &Host::norm(&v));
                    }
                }
                host.run(table);
                let mut out = host.buf(LOGITS)[..rows * 97].to_vec();
                for l in 0..layers as u64 {
                    out.extend_from_slice(&host.buf(KC + l)[..rows * C]);
                    out.extend_from_slice(&host.buf(VC + l)[..rows * C]);
                }
                assert!(
                    out.iter().all(|x| x.is_finite()),
                    "a read of an unwritten buffer"
                );
                results.push(out);
            }
            assert_eq!(results[0], results[1], "{layers} layers, {rows} rows");
        }
    }
}
