//! Rust twins of the kernels in `compiler/kernels/ngpt.cu`: same arguments, same
//! semantics; a launch's grid decides nothing here, each twin covers the whole range.
//! Every index goes through checked slicing, so a tampered plan fails, never reads out of
//! bounds.
//!
//! The heavy twins (attention over (row, head) pairs; norm_rows, lerp_norm, swiglu and
//! pos_norm over rows) spread their work over rayon's global pool, the one the GEMMs use.
//! Each output element is computed by exactly one thread, with the same operations in the
//! same order as on one thread, so every [`Threading`] mode gives bitwise identical
//! results, run after run. A request that fails reports the error the one-thread loop
//! meets first.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::plan::Dims;

/// How a twin spreads its work over threads. Only speed differs between the modes: the
/// results are bitwise identical.
///
/// ```
/// use ngpt_runtime::cpu::kernels::Threading;
/// assert_eq!(Threading::default(), Threading::Auto);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Threading {
    /// Threads when a launch has enough work to pay for them (rayon's global pool).
    #[default]
    Auto,
    /// Everything on the calling thread: the reference order.
    Sequential,
    /// Threads whatever the size, in pieces of at most this many rows (or (row, head)
    /// pairs); tests use it to force many, uneven pieces on a tiny model.
    Pieces(usize),
}

/// Work (about one multiply-add per unit) below which `Auto` stays on one thread.
const MIN_PARALLEL_WORK: usize = 1 << 15;

/// Pieces per pool thread under `Auto`, so uneven pieces (causal attention) still balance.
const PIECES_PER_THREAD: usize = 8;

impl Threading {
    /// Items per piece for `items` items of `work` total work, or `None` for one thread.
    fn piece_len(self, items: usize, work: usize) -> Option<usize> {
        match self {
            Threading::Sequential => None,
            Threading::Pieces(n) => Some(n.max(1)),
            Threading::Auto => {
                let threads = rayon::current_num_threads();
                if threads < 2 || items < 2 || work < MIN_PARALLEL_WORK {
                    return None;
                }
                Some(items.div_ceil(threads * PIECES_PER_THREAD).max(1))
            }
        }
    }
}

/// Checked sub-slice `[start, start + len)`.
fn span<'a, T>(v: &'a [T], start: usize, len: usize, what: &str) -> Result<&'a [T]> {
    start
        .checked_add(len)
        .and_then(|end| v.get(start..end))
        .ok_or_else(|| oob(what, start, len, v.len()))
}

fn span_mut<'a, T>(v: &'a mut [T], start: usize, len: usize, what: &str) -> Result<&'a mut [T]> {
    let n = v.len();
    start
        .checked_add(len)
        .and_then(|end| v.get_mut(start..end))
        .ok_or_else(|| oob(what, start, len, n))
}

/// Checks that `[start, start + len)` lies in a buffer of `have` elements.
fn fits(have: usize, start: usize, len: usize, what: &str) -> Result<()> {
    match start.checked_add(len) {
        Some(end) if end <= have => Ok(()),
        _ => Err(oob(what, start, len, have)),
    }
}

fn oob(what: &str, start: usize, len: usize, have: usize) -> Error {
    Error::Step {
        step: what.to_string(),
        problem: format!(
            "needs elements {start}..{} of a buffer of {have}",
            start.saturating_add(len)
        ),
    }
}

fn inv_norm(x: &[f32]) -> f32 {
    1.0 / x.iter().map(|v| v * v).sum::<f32>().sqrt()
}

/// One thread's part of an output buffer: the elements of a run of items, addressed by
/// their index in the whole buffer. A range outside the buffer gets the error the whole
/// buffer's `span_mut` would give.
struct Piece<'a> {
    data: &'a mut [f32],
    /// Index of `data[0]` in the whole buffer.
    base: usize,
    /// Length of the whole buffer.
    total: usize,
}

impl Piece<'_> {
    fn get(&mut self, start: usize, len: usize, what: &str) -> Result<&mut [f32]> {
        let (total, base) = (self.total, self.base);
        start
            .checked_add(len)
            .filter(|&end| start >= base && end <= base + self.data.len())
            .map(|end| &mut self.data[start - base..end - base])
            .ok_or_else(|| oob(what, start, len, total))
    }
}

/// Runs `body(scratch, i, piece)` for items `0..items`, item `i` owning the `width`
/// elements of `out` from `i * width` (clipped to `out`). On one thread, or on several in
/// pieces of consecutive items, each piece with its own `scratch`. Returns the error of the
/// lowest failing item: the one the one-thread loop meets first.
fn for_items<S, I, F>(
    threading: Threading,
    out: &mut [f32],
    width: usize,
    items: usize,
    work: usize,
    scratch: I,
    body: F,
) -> Result<()>
where
    I: Fn() -> S + Sync,
    F: Fn(&mut S, usize, &mut Piece) -> Result<()> + Sync,
{
    let total = out.len();
    let run = |first: usize, end: usize, data: &mut [f32]| -> Result<()> {
        let mut s = scratch();
        let mut piece = Piece {
            data,
            base: first.saturating_mul(width),
            total,
        };
        (first..end).try_for_each(|i| body(&mut s, i, &mut piece))
    };
    let Some(per) = threading.piece_len(items, work) else {
        return run(0, items, out);
    };
    let mut pieces = Vec::with_capacity(items.div_ceil(per));
    let mut rest = out;
    let mut first = 0;
    while first < items {
        let end = (first + per).min(items);
        let take = (end - first).saturating_mul(width).min(rest.len());
        let (data, tail) = std::mem::take(&mut rest).split_at_mut(take);
        rest = tail;
        pieces.push((first, end, data));
        first = end;
    }
    let results: Vec<Result<()>> = pieces
        .into_par_iter()
        .map(|(first, end, data)| run(first, end, data))
        .collect();
    results.into_iter().collect()
}

/// `out[r] = wte[tokens[r]]` for rows `0..rows`: each token's row of the embedding table
/// (`[vocab, n_embd]`) copied into `out` (`[rows, n_embd]`). A token id outside `0..vocab`
/// is an [`Error::Request`].
pub fn embed(d: &Dims, tokens: &[i32], wte: &[f32], out: &mut [f32], rows: usize) -> Result<()> {
    let c = d.n_embd;
    for r in 0..rows {
        let t = *tokens
            .get(r)
            .ok_or_else(|| oob("embed tokens", r, 1, tokens.len()))?;
        let t = usize::try_from(t).ok().filter(|&t| t < d.vocab).ok_or(
            Error::TokenOutsideVocabulary {
                token: t as i64,
                vocab: d.vocab,
            },
        )?;
        span_mut(out, r * c, c, "embed out")?.copy_from_slice(span(wte, t * c, c, "embed wte")?);
    }
    Ok(())
}

/// `out[r] = x[r] / ||x[r]||` for rows `0..rows` of `n_embd` values: each row scaled to unit
/// L2 norm (an all-zero row gives NaNs, as on the GPU).
pub fn norm_rows(
    d: &Dims,
    x: &[f32],
    out: &mut [f32],
    rows: usize,
    threading: Threading,
) -> Result<()> {
    let c = d.n_embd;
    for_items(
        threading,
        out,
        c,
        rows,
        rows.saturating_mul(c),
        || (),
        |_, r, out| {
            let xr = span(x, r * c, c, "norm_rows x")?;
            let inv = inv_norm(xr);
            out.get(r * c, c, "norm_rows out")?
                .iter_mut()
                .zip(xr)
                .for_each(|(o, v)| *o = v * inv);
            Ok(())
        },
    )
}

/// The nGPT residual update, in place: `h[r] = Norm(h[r] + lr * (Norm(branch[r]) - h[r]))`
/// for rows `0..rows` of `n_embd` values, with `lr` the per-channel rate (`[n_embd]`) and
/// Norm scaling a row to unit L2 norm.
pub fn lerp_norm(
    d: &Dims,
    h: &mut [f32],
    branch: &[f32],
    lr: &[f32],
    rows: usize,
    threading: Threading,
) -> Result<()> {
    let c = d.n_embd;
    let lr = span(lr, 0, c, "lerp_norm lr")?;
    for_items(
        threading,
        h,
        c,
        rows,
        rows.saturating_mul(c),
        || vec![0f32; c],
        |m, r, h| {
            let br = span(branch, r * c, c, "lerp_norm branch")?;
            let hr = h.get(r * c, c, "lerp_norm h")?;
            let inv_b = inv_norm(br);
            for i in 0..c {
                m[i] = hr[i] + lr[i] * (br[i] * inv_b - hr[i]);
            }
            let inv_m = inv_norm(m);
            hr.iter_mut()
                .zip(m.iter())
                .for_each(|(o, v)| *o = v * inv_m);
            Ok(())
        },
    )
}

/// `out[r, j] = u * SiLU(v)` with `u = fc[r, j]` and `v = fc[r, 4 n_embd + j]`: each `fc` row
/// holds the two `4 x n_embd` halves of the c_fc GEMM side by side (`[rows, 8 n_embd]`), and
/// each `out` row is `4 x n_embd` wide.
pub fn swiglu(
    d: &Dims,
    fc: &[f32],
    out: &mut [f32],
    rows: usize,
    threading: Threading,
) -> Result<()> {
    let f = 4 * d.n_embd;
    for_items(
        threading,
        out,
        f,
        rows,
        rows.saturating_mul(f).saturating_mul(4),
        || (),
        |_, r, out| {
            let row = span(fc, r * 2 * f, 2 * f, "swiglu fc")?;
            let o = out.get(r * f, f, "swiglu out")?;
            for j in 0..f {
                let v = row[f + j];
                o[j] = row[j] * (v / (1.0 + (-v).exp()));
            }
            Ok(())
        },
    )
}

fn position(d: &Dims, positions: &[i32], r: usize) -> Result<usize> {
    let p = *positions
        .get(r)
        .ok_or_else(|| oob("positions", r, 1, positions.len()))?;
    usize::try_from(p)
        .ok()
        .filter(|&p| p < d.max_seq_len)
        .ok_or_else(|| Error::Request {
            what: "positions".into(),
            problem: format!(
                "position {p} is outside the KV capacity 0..{}",
                d.max_seq_len
            ),
        })
}

/// Row r's KV-cache slot, checked to lie inside a cache of `cache_len` elements.
fn slot(d: &Dims, slots: &[i32], r: usize, cache_len: usize) -> Result<usize> {
    let s = *slots
        .get(r)
        .ok_or_else(|| oob("slots", r, 1, slots.len()))?;
    let per_slot = d.n_head * d.max_seq_len * d.head_dim;
    usize::try_from(s)
        .ok()
        .filter(|&s| {
            s.checked_mul(per_slot)
                .is_some_and(|at| at < cache_len || per_slot == 0)
        })
        .ok_or_else(|| Error::Request {
            what: "slots".into(),
            problem: format!(
                "row {r}: slot {s} is outside the {} slots of the KV cache",
                cache_len / per_slot.max(1)
            ),
        })
}

fn cache_offset(d: &Dims, b: usize, head: usize, pos: usize) -> usize {
    ((b * d.n_head + head) * d.max_seq_len + pos) * d.head_dim
}

/// Per row and head: q = Norm(M_pos * q) * q_scale; k likewise with k_scale into the cache;
/// v copied into the cache, both at the row's (slot, position).
///
/// On threads, rows are computed in parallel into a row-major scratch `[rows, 3 x n_embd]`
/// (q, k, v, each checked against its destination exactly as the one-thread loop checks
/// it), then copied into `q_out` and the caches in row order: the cache slot two rows
/// share (only a tampered request does that) holds the later row, as on one thread.
#[allow(clippy::too_many_arguments)]
pub fn pos_norm(
    d: &Dims,
    qkv: &[f32],
    positions: &[i32],
    table: &[f32],
    q_scale: &[f32],
    k_scale: &[f32],
    q_out: &mut [f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    rows: usize,
    slots: &[i32],
    threading: Threading,
) -> Result<()> {
    let (c, hd) = (d.n_embd, d.head_dim);
    let cache_len = k_cache.len();
    if threading
        .piece_len(rows, rows.saturating_mul(3 * c))
        .is_none()
    {
        let mut q = vec![0f32; hd];
        let mut k = vec![0f32; hd];
        for r in 0..rows {
            let b = slot(d, slots, r, cache_len)?;
            let pos = position(d, positions, r)?;
            let row = span(qkv, r * 3 * c, 3 * c, "pos_norm qkv")?;
            let m = span(table, pos * hd, hd, "pos_norm table")?;
            for head in 0..d.n_head {
                let o = head * hd;
                for i in 0..hd {
                    q[i] = row[o + i] * m[i];
                    k[i] = row[c + o + i] * m[i];
                }
                let (iq, ik) = (inv_norm(&q), inv_norm(&k));
                let qs = span(q_scale, o, hd, "pos_norm q_scale")?;
                let ks = span(k_scale, o, hd, "pos_norm k_scale")?;
                let qo = span_mut(q_out, r * c + o, hd, "pos_norm q_out")?;
                for i in 0..hd {
                    qo[i] = q[i] * iq * qs[i];
                }
                let at = cache_offset(d, b, head, pos);
                let kc = span_mut(k_cache, at, hd, "pos_norm k_cache")?;
                for i in 0..hd {
                    kc[i] = k[i] * ik * ks[i];
                }
                span_mut(v_cache, at, hd, "pos_norm v_cache")?
                    .copy_from_slice(&row[2 * c + o..2 * c + o + hd]);
            }
        }
        return Ok(());
    }
    // Threads: every value computed and every destination checked, then copied in order.
    let mut staged = Vec::new();
    staged
        .try_reserve_exact(rows.saturating_mul(3 * c))
        .map_err(|_| Error::Request {
            what: "pos_norm".into(),
            problem: format!("cannot allocate {rows} x {} scratch elements", 3 * c),
        })?;
    staged.resize(rows * 3 * c, 0f32);
    let (q_len, k_len, v_len) = (q_out.len(), k_cache.len(), v_cache.len());
    for_items(
        threading,
        &mut staged,
        3 * c,
        rows,
        rows.saturating_mul(3 * c),
        || (vec![0f32; hd], vec![0f32; hd]),
        |(q, k), r, staged| {
            let b = slot(d, slots, r, cache_len)?;
            let pos = position(d, positions, r)?;
            let row = span(qkv, r * 3 * c, 3 * c, "pos_norm qkv")?;
            let m = span(table, pos * hd, hd, "pos_norm table")?;
            let out = staged.get(r * 3 * c, 3 * c, "pos_norm scratch")?;
            for head in 0..d.n_head {
                let o = head * hd;
                for i in 0..hd {
                    q[i] = row[o + i] * m[i];
                    k[i] = row[c + o + i] * m[i];
                }
                let (iq, ik) = (inv_norm(q), inv_norm(k));
                let qs = span(q_scale, o, hd, "pos_norm q_scale")?;
                let ks = span(k_scale, o, hd, "pos_norm k_scale")?;
                fits(q_len, r * c + o, hd, "pos_norm q_out")?;
                for i in 0..hd {
                    out[o + i] = q[i] * iq * qs[i];
                }
                let at = cache_offset(d, b, head, pos);
                fits(k_len, at, hd, "pos_norm k_cache")?;
                for i in 0..hd {
                    out[c + o + i] = k[i] * ik * ks[i];
                }
                fits(v_len, at, hd, "pos_norm v_cache")?;
                out[2 * c + o..2 * c + o + hd].copy_from_slice(&row[2 * c + o..2 * c + o + hd]);
            }
            Ok(())
        },
    )?;
    for r in 0..rows {
        let b = slot(d, slots, r, cache_len)?;
        let pos = position(d, positions, r)?;
        let s = span(&staged, r * 3 * c, 3 * c, "pos_norm scratch")?;
        span_mut(q_out, r * c, c, "pos_norm q_out")?.copy_from_slice(&s[..c]);
        for head in 0..d.n_head {
            let (o, at) = (head * hd, cache_offset(d, b, head, pos));
            span_mut(k_cache, at, hd, "pos_norm k_cache")?.copy_from_slice(&s[c + o..c + o + hd]);
            span_mut(v_cache, at, hd, "pos_norm v_cache")?
                .copy_from_slice(&s[2 * c + o..2 * c + o + hd]);
        }
    }
    Ok(())
}

/// The Hugging Face family's embedding: `out[r] = wte[tokens[r]] + wpe[positions[r]]`, the
/// token's row of the embedding table (`[vocab, n_embd]`) plus the learned position row
/// (`[max_seq_len, n_embd]`, the rows of `wpe` the plan keeps), one f32 sum per element.
pub fn embed_pos(
    d: &Dims,
    tokens: &[i32],
    positions: &[i32],
    wte: &[f32],
    wpe: &[f32],
    out: &mut [f32],
    rows: usize,
) -> Result<()> {
    let c = d.n_embd;
    for r in 0..rows {
        let t = *tokens
            .get(r)
            .ok_or_else(|| oob("embed_pos tokens", r, 1, tokens.len()))?;
        let t = usize::try_from(t).ok().filter(|&t| t < d.vocab).ok_or(
            Error::TokenOutsideVocabulary {
                token: t as i64,
                vocab: d.vocab,
            },
        )?;
        let p = position(d, positions, r)?;
        let (w, pr) = (
            span(wte, t * c, c, "embed_pos wte")?,
            span(wpe, p * c, c, "embed_pos wpe")?,
        );
        span_mut(out, r * c, c, "embed_pos out")?
            .iter_mut()
            .zip(w.iter().zip(pr))
            .for_each(|(o, (a, b))| *o = a + b);
    }
    Ok(())
}

/// [`lerp_norm`] with the branch's bias added first (the bias of the GEMM that made
/// `branch`, `[n_embd]`): `h[r] = Norm(h[r] + lr * (Norm(branch[r] + bias) - h[r]))`.
pub fn lerp_norm_bias(
    d: &Dims,
    h: &mut [f32],
    branch: &[f32],
    bias: &[f32],
    lr: &[f32],
    rows: usize,
    threading: Threading,
) -> Result<()> {
    let c = d.n_embd;
    let lr = span(lr, 0, c, "lerp_norm_bias lr")?;
    let bias = span(bias, 0, c, "lerp_norm_bias bias")?;
    for_items(
        threading,
        h,
        c,
        rows,
        rows.saturating_mul(c),
        || (vec![0f32; c], vec![0f32; c]),
        |(b, m), r, h| {
            let br = span(branch, r * c, c, "lerp_norm_bias branch")?;
            let hr = h.get(r * c, c, "lerp_norm_bias h")?;
            for i in 0..c {
                b[i] = br[i] + bias[i];
            }
            let inv_b = inv_norm(b);
            for i in 0..c {
                m[i] = hr[i] + lr[i] * (b[i] * inv_b - hr[i]);
            }
            let inv_m = inv_norm(m);
            hr.iter_mut()
                .zip(m.iter())
                .for_each(|(o, v)| *o = v * inv_m);
            Ok(())
        },
    )
}

/// `out[r, j] = u * SiLU(v)` with `u = uv[r, j] + bias[j]` and `v = uv[r, I + j] + bias[I +
/// j]`: the c_fc GEMM's two halves of width I = n_inner (`[rows, 2 I]`) and its bias
/// (`[2 I]`); each `out` row is I wide.
pub fn swiglu_bias(
    d: &Dims,
    uv: &[f32],
    bias: &[f32],
    out: &mut [f32],
    rows: usize,
    threading: Threading,
) -> Result<()> {
    let f = d.n_inner;
    let bias = span(bias, 0, 2 * f, "swiglu_bias bias")?;
    for_items(
        threading,
        out,
        f,
        rows,
        rows.saturating_mul(f).saturating_mul(4),
        || (),
        |_, r, out| {
            let row = span(uv, r * 2 * f, 2 * f, "swiglu_bias uv")?;
            let o = out.get(r * f, f, "swiglu_bias out")?;
            for j in 0..f {
                let u = row[j] + bias[j];
                let v = row[f + j] + bias[f + j];
                o[j] = u * (v / (1.0 + (-v).exp()));
            }
            Ok(())
        },
    )
}

/// The Hugging Face family's attention inputs, per row and head:
/// `q = Norm(Rot_pos(q + b_q)) * q_scale`, `k = Norm(Rot_pos(k + b_k))` into the key cache,
/// `v + b_v` into the value cache, both at the row's (slot, position). `Rot_pos` turns each
/// interleaved pair `(a, b) = (x[2i], x[2i+1])` of a head to
/// `(a cos - b sin, b cos + a sin)` with `cos = table[pos, 2i]`, `sin = table[pos, 2i + 1]`
/// (the angles `pos * 10000^(-2i/D)`, computed in f64 and rounded once by the compiler).
/// `bias` is the QKV GEMM's (`[3 n_embd]`).
///
/// Rows are computed (on threads when the work pays) into a row-major scratch `[rows, 3 x
/// n_embd]`, each destination checked as it is computed, then copied into `q_out` and the
/// caches in row order, as [`pos_norm`] does.
#[allow(clippy::too_many_arguments)]
pub fn rotary_norm(
    d: &Dims,
    qkv: &[f32],
    positions: &[i32],
    table: &[f32],
    bias: &[f32],
    q_scale: &[f32],
    q_out: &mut [f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    rows: usize,
    slots: &[i32],
    threading: Threading,
) -> Result<()> {
    let (c, hd) = (d.n_embd, d.head_dim);
    let bias = span(bias, 0, 3 * c, "rotary_norm bias")?;
    let q_scale = span(q_scale, 0, c, "rotary_norm q_scale")?;
    let cache_len = k_cache.len();
    let (q_len, k_len, v_len) = (q_out.len(), k_cache.len(), v_cache.len());
    let mut staged = Vec::new();
    staged
        .try_reserve_exact(rows.saturating_mul(3 * c))
        .map_err(|_| Error::Request {
            what: "rotary_norm".into(),
            problem: format!("cannot allocate {rows} x {} scratch elements", 3 * c),
        })?;
    staged.resize(rows * 3 * c, 0f32);
    let rotate = |x: &[f32], m: &[f32], out: &mut [f32]| {
        for i in 0..hd / 2 {
            let (a, b) = (x[2 * i], x[2 * i + 1]);
            let (cos, sin) = (m[2 * i], m[2 * i + 1]);
            out[2 * i] = a * cos - b * sin;
            out[2 * i + 1] = b * cos + a * sin;
        }
    };
    for_items(
        threading,
        &mut staged,
        3 * c,
        rows,
        rows.saturating_mul(3 * c),
        || (vec![0f32; hd], vec![0f32; hd], vec![0f32; hd]),
        |(x, q, k), r, staged| {
            let b = slot(d, slots, r, cache_len)?;
            let pos = position(d, positions, r)?;
            let row = span(qkv, r * 3 * c, 3 * c, "rotary_norm qkv")?;
            let m = span(table, pos * hd, hd, "rotary_norm table")?;
            let out = staged.get(r * 3 * c, 3 * c, "rotary_norm scratch")?;
            for head in 0..d.n_head {
                let o = head * hd;
                for i in 0..hd {
                    x[i] = row[o + i] + bias[o + i];
                }
                rotate(x, m, q);
                for i in 0..hd {
                    x[i] = row[c + o + i] + bias[c + o + i];
                }
                rotate(x, m, k);
                let (iq, ik) = (inv_norm(q), inv_norm(k));
                fits(q_len, r * c + o, hd, "rotary_norm q_out")?;
                for i in 0..hd {
                    out[o + i] = q[i] * iq * q_scale[o + i];
                }
                let at = cache_offset(d, b, head, pos);
                fits(k_len, at, hd, "rotary_norm k_cache")?;
                for i in 0..hd {
                    out[c + o + i] = k[i] * ik;
                }
                fits(v_len, at, hd, "rotary_norm v_cache")?;
                for i in 0..hd {
                    out[2 * c + o + i] = row[2 * c + o + i] + bias[2 * c + o + i];
                }
            }
            Ok(())
        },
    )?;
    for r in 0..rows {
        let b = slot(d, slots, r, cache_len)?;
        let pos = position(d, positions, r)?;
        let s = span(&staged, r * 3 * c, 3 * c, "rotary_norm scratch")?;
        span_mut(q_out, r * c, c, "rotary_norm q_out")?.copy_from_slice(&s[..c]);
        for head in 0..d.n_head {
            let (o, at) = (head * hd, cache_offset(d, b, head, pos));
            span_mut(k_cache, at, hd, "rotary_norm k_cache")?
                .copy_from_slice(&s[c + o..c + o + hd]);
            span_mut(v_cache, at, hd, "rotary_norm v_cache")?
                .copy_from_slice(&s[2 * c + o..2 * c + o + hd]);
        }
    }
    Ok(())
}

/// Causal attention over the cache: row r attends keys 0..=`positions[r]` of KV slot
/// `slots[r]`, softmax scale 1. A row's result depends on its q and its slot's cache only,
/// never on the other rows of the call. Both attention entries (prefill, decode) compute this.
///
/// Decode (and any call with few rows a thread) takes one (row, head) pair per work item.
/// Prefill takes blocks of up to [`ROWS_PER_BLOCK`] consecutive rows, every head, and
/// goes head by head through the block's rows, so that a head's keys and values (up to
/// 1 MB at 2,000 positions) are read from memory once per block and from the core's
/// cache for its other rows; row by row they were read again for every row, each time
/// after the other heads' had pushed them out. Every (row, head) is computed the same
/// way either way, so both give the same bits.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    d: &Dims,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    positions: &[i32],
    out: &mut [f32],
    rows: usize,
    slots: &[i32],
    threading: Threading,
) -> Result<()> {
    // Eight blocks a thread where the rows allow (attention_in_blocks clamps to 1..=16),
    // when rows share slots (prefill chunks); one (row, head) per item for decode rows.
    // Both give the same bits.
    let rs = &slots[..rows.min(slots.len())];
    let per = if rs.windows(2).any(|w| w[0] == w[1]) {
        rows / (8 * rayon::current_num_threads()).max(1)
    } else {
        1
    };
    attention_in_blocks(
        d, q, k_cache, v_cache, positions, out, rows, slots, threading, per,
    )
}

/// Most rows a work item of [`attention`] takes.
pub const ROWS_PER_BLOCK: usize = 16;

/// [`attention`] with blocks of `per` rows (1: one (row, head) pair per work item).
#[allow(clippy::too_many_arguments)]
fn attention_in_blocks(
    d: &Dims,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    positions: &[i32],
    out: &mut [f32],
    rows: usize,
    slots: &[i32],
    threading: Threading,
    per: usize,
) -> Result<()> {
    let (c, hd, nh) = (d.n_embd, d.head_dim, d.n_head);
    let context = positions
        .iter()
        .take(rows)
        .map(|&p| usize::try_from(p).unwrap_or(0).min(d.max_seq_len))
        .max()
        .unwrap_or(0)
        + 1;
    let work = rows
        .saturating_mul(nh)
        .saturating_mul(context)
        .saturating_mul(2 * hd);
    // One (row, head): its extents checked in the order position, q, keys, values, output
    // (`run` false: only that, so a block fails as its pairs one at a time would), then
    // the scores against keys 0..=pos (eight lanes a key, not one running sum), softmax,
    // and P.V with the outputs in registers: AVX2 where present, the same bits without it
    // (attend.rs).
    let pair =
        |r: usize, head: usize, scores: &mut [f32], out: &mut Piece, run: bool| -> Result<()> {
            let pos = position(d, positions, r)?;
            let qr = span(q, r * c + head * hd, hd, "attention q")?;
            let base = cache_offset(d, slot(d, slots, r, k_cache.len())?, head, 0);
            let keys = span(k_cache, base, (pos + 1) * hd, "attention k_cache")?;
            let vals = span(v_cache, base, (pos + 1) * hd, "attention v_cache")?;
            let o = out.get(r * c + head * hd, hd, "attention out")?;
            if !run {
                return Ok(());
            }
            let scores = &mut scores[..=pos];
            super::attend::scores(qr, keys, hd, scores);
            let max = scores.iter().fold(f32::MIN, |m, &s| m.max(s));
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for s in scores.iter_mut() {
                *s /= sum;
            }
            super::attend::weighted_sum(scores, vals, hd, o);
            Ok(())
        };
    let scratch = || vec![0f32; d.max_seq_len];
    let per = per.clamp(1, ROWS_PER_BLOCK);
    if per == 1 {
        // Item i is (row i / n_head, head i % n_head); its output starts at
        // r * c + head * hd = i * hd, since c = n_head * hd (checked when the plan loads).
        let items = rows.saturating_mul(nh);
        return for_items(threading, out, hd, items, work, scratch, |s, i, out| {
            pair(i / nh, i % nh, s, out, true)
        });
    }
    // Item i is rows i * per .. (i + 1) * per (clipped), every head.
    for_items(
        threading,
        out,
        per * c,
        rows.div_ceil(per),
        work,
        scratch,
        |s, i, out| {
            let block = i * per..((i + 1) * per).min(rows);
            for r in block.clone() {
                for head in 0..nh {
                    pair(r, head, s, out, false)?;
                }
            }
            for head in 0..nh {
                for r in block.clone() {
                    pair(r, head, s, out, true)?;
                }
            }
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An odd shape: 3 heads of 6 (n_embd 18), KV capacity 23, 3 sequences of 7 tokens.
    const D: Dims = Dims {
        n_layer: 1,
        n_head: 3,
        n_embd: 18,
        head_dim: 6,
        vocab: 5,
        max_seq_len: 23,
        n_inner: 72,
    };
    const B: usize = 3;
    const T: usize = 7;

    /// Deterministic values in (-1, 1) (xorshift), so tests need no RNG crate.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
            })
            .collect()
    }

    /// The slots of a rectangle: `rows` rows, `tokens` a sequence, slot = sequence.
    fn rect(rows: usize, tokens: usize) -> Vec<i32> {
        (0..rows).map(|r| (r / tokens) as i32).collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Every mode the tests compare with the one-thread order: pieces of one item, of
    /// sizes that do not divide the work, one piece holding everything, and `Auto`.
    const MODES: [Threading; 5] = [
        Threading::Pieces(1),
        Threading::Pieces(2),
        Threading::Pieces(5),
        Threading::Pieces(1000),
        Threading::Auto,
    ];

    /// What every twin writes, for one mode: a prefill (ragged positions) then a decode.
    fn run_all(t: Threading, positions: &[i32], rows: usize, tokens: usize) -> Vec<Vec<u32>> {
        let slots = rect(rows, tokens);
        let c = D.n_embd;
        let cache = B * D.n_head * D.max_seq_len * D.head_dim;
        let x = values(rows * c, 1);
        let mut normed = vec![0f32; rows * c];
        norm_rows(&D, &x, &mut normed, rows, t).expect("norm_rows");
        let mut h = normed.clone();
        let branch = values(rows * c, 2);
        let lr = values(c, 3);
        lerp_norm(&D, &mut h, &branch, &lr, rows, t).expect("lerp_norm");
        let fc = values(rows * 8 * c, 4);
        let mut act = vec![0f32; rows * 4 * c];
        swiglu(&D, &fc, &mut act, rows, t).expect("swiglu");
        let qkv = values(rows * 3 * c, 5);
        let table = values(D.max_seq_len * D.head_dim, 6);
        let (qs, ks) = (values(c, 7), values(c, 8));
        let mut q = vec![0f32; rows * c];
        // Caches start from values, so slots a request does not write are compared too.
        let mut kc = values(cache, 9);
        let mut vc = values(cache, 10);
        pos_norm(
            &D, &qkv, positions, &table, &qs, &ks, &mut q, &mut kc, &mut vc, rows, &slots, t,
        )
        .expect("pos_norm");
        let mut att = vec![0f32; rows * c];
        attention(&D, &q, &kc, &vc, positions, &mut att, rows, &slots, t).expect("attention");
        // The Hugging Face family's twins.
        let mut hb = normed.clone();
        let bias = values(3 * c, 11);
        lerp_norm_bias(&D, &mut hb, &branch, &bias[..c], &lr, rows, t).expect("lerp_norm_bias");
        let uv = values(rows * 2 * D.n_inner, 12);
        let fc_bias = values(2 * D.n_inner, 13);
        let mut act_b = vec![0f32; rows * D.n_inner];
        swiglu_bias(&D, &uv, &fc_bias, &mut act_b, rows, t).expect("swiglu_bias");
        let mut rq = vec![0f32; rows * c];
        let mut rk = values(cache, 14);
        let mut rv = values(cache, 15);
        rotary_norm(
            &D, &qkv, positions, &table, &bias, &qs, &mut rq, &mut rk, &mut rv, rows, &slots, t,
        )
        .expect("rotary_norm");
        [normed, h, act, q, kc, vc, att, hb, act_b, rq, rk, rv]
            .iter()
            .map(|v| bits(v))
            .collect()
    }

    fn prefill_positions() -> Vec<i32> {
        // Sequence 1 is shorter (its last rows are padding past the prompt, as in a ragged
        // batch) and sequence 2 is a second chunk starting at position 9.
        (0..B * T)
            .map(|r| {
                let (b, i) = (r / T, (r % T) as i32);
                match b {
                    2 => 9 + i,
                    _ => i,
                }
            })
            .collect()
    }

    #[test]
    fn the_hugging_face_twins_match_float64() {
        let (c, hd, rows) = (D.n_embd, D.head_dim, 4);
        let close = |got: f32, want: f64, what: &str| {
            assert!(
                (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{what}: {got} vs {want}"
            );
        };
        // embed_pos: the token row plus the position row.
        let (wte, wpe) = (values(D.vocab * c, 1), values(D.max_seq_len * c, 2));
        let (tokens, positions) = (vec![3, 0, 4, 3], vec![0i32, 7, 22, 1]);
        let mut out = vec![0f32; rows * c];
        embed_pos(&D, &tokens, &positions, &wte, &wpe, &mut out, rows).expect("embed_pos");
        for r in 0..rows {
            let (t, p) = (tokens[r] as usize, positions[r] as usize);
            for i in 0..c {
                let want = wte[t * c + i] as f64 + wpe[p * c + i] as f64;
                close(out[r * c + i], want, "embed_pos");
            }
        }
        // swiglu_bias: u * silu(v) over the biased halves.
        let f = D.n_inner;
        let (uv, bias) = (values(rows * 2 * f, 3), values(2 * f, 4));
        let mut act = vec![0f32; rows * f];
        swiglu_bias(&D, &uv, &bias, &mut act, rows, Threading::Sequential).expect("swiglu_bias");
        for r in 0..rows {
            for j in 0..f {
                let u = uv[r * 2 * f + j] as f64 + bias[j] as f64;
                let v = uv[r * 2 * f + f + j] as f64 + bias[f + j] as f64;
                close(act[r * f + j], u * v / (1.0 + (-v).exp()), "swiglu_bias");
            }
        }
        // rotary_norm: the rotation by a cos/sin table, then the per-head norm.
        let qkv = values(rows * 3 * c, 5);
        let bias = values(3 * c, 6);
        let q_scale = values(c, 7);
        let mut table = vec![0f32; D.max_seq_len * hd];
        for t in 0..D.max_seq_len {
            for i in 0..hd / 2 {
                let a = t as f64 * 10000f64.powf(-((2 * i) as f64) / hd as f64);
                table[t * hd + 2 * i] = a.cos() as f32;
                table[t * hd + 2 * i + 1] = a.sin() as f32;
            }
        }
        let slots = vec![0i32, 1, 1, 0];
        let cache = B * D.n_head * D.max_seq_len * hd;
        let (mut q, mut kc, mut vc) = (vec![0f32; rows * c], vec![0f32; cache], vec![0f32; cache]);
        rotary_norm(
            &D,
            &qkv,
            &positions,
            &table,
            &bias,
            &q_scale,
            &mut q,
            &mut kc,
            &mut vc,
            rows,
            &slots,
            Threading::Sequential,
        )
        .expect("rotary_norm");
        for r in 0..rows {
            let p = positions[r] as usize;
            for head in 0..D.n_head {
                let o = head * hd;
                let turn = |part: usize| -> Vec<f64> {
                    let x = |i: usize| {
                        qkv[r * 3 * c + part * c + o + i] as f64 + bias[part * c + o + i] as f64
                    };
                    let mut y = vec![0f64; hd];
                    for i in 0..hd / 2 {
                        let a = p as f64 * 10000f64.powf(-((2 * i) as f64) / hd as f64);
                        let (cs, sn) = (a.cos(), a.sin());
                        y[2 * i] = x(2 * i) * cs - x(2 * i + 1) * sn;
                        y[2 * i + 1] = x(2 * i + 1) * cs + x(2 * i) * sn;
                    }
                    let n = y.iter().map(|v| v * v).sum::<f64>().sqrt();
                    y.iter().map(|v| v / n).collect()
                };
                let (wq, wk) = (turn(0), turn(1));
                let at = cache_offset(&D, slots[r] as usize, head, p);
                for i in 0..hd {
                    close(
                        q[r * c + o + i],
                        wq[i] * q_scale[o + i] as f64,
                        "rotary_norm q",
                    );
                    close(kc[at + i], wk[i], "rotary_norm k");
                    let v = qkv[r * 3 * c + 2 * c + o + i] as f64 + bias[2 * c + o + i] as f64;
                    close(vc[at + i], v, "rotary_norm v");
                }
            }
        }
    }

    #[test]
    fn threaded_twins_are_bitwise_the_sequential_ones() {
        let names = [
            "norm_rows",
            "lerp_norm",
            "swiglu",
            "q",
            "k_cache",
            "v_cache",
            "attention",
            "lerp_norm_bias",
            "swiglu_bias",
            "rotary_norm q",
            "rotary_norm k_cache",
            "rotary_norm v_cache",
        ];
        // Prefill: 21 rows; decode: one row per sequence at uneven positions.
        let cases: [(Vec<i32>, usize, usize); 2] =
            [(prefill_positions(), B * T, T), (vec![22, 5, 13], B, 1)];
        for (positions, rows, tokens) in cases {
            let want = run_all(Threading::Sequential, &positions, rows, tokens);
            for t in MODES {
                let got = run_all(t, &positions, rows, tokens);
                for (i, name) in names.iter().enumerate() {
                    assert!(
                        got[i] == want[i],
                        "{name} differs from the one-thread result under {t:?} ({rows} rows)"
                    );
                }
                // Run to run, too.
                assert!(
                    got == run_all(t, &positions, rows, tokens),
                    "{t:?} is not deterministic"
                );
            }
        }
    }

    #[test]
    fn attention_in_blocks_of_rows_is_bitwise_one_pair_at_a_time() {
        let (c, rows) = (D.n_embd, B * T);
        let cache = B * D.n_head * D.max_seq_len * D.head_dim;
        let (q, kc, vc) = (values(rows * c, 11), values(cache, 12), values(cache, 13));
        let slots = rect(rows, T);
        // The output and the error, with an output buffer `short` elements short and the
        // value cache cut to `vc_len` values.
        let run = |positions: &[i32], t: Threading, per: usize, (short, vc_len): (usize, usize)| {
            let mut out = vec![f32::NAN; rows * c - short];
            let vc = &vc[..vc_len];
            let r = attention_in_blocks(&D, &q, &kc, vc, positions, &mut out, rows, &slots, t, per);
            (r.map_err(|e| e.to_string()), bits(&out))
        };
        let good = prefill_positions();
        let mut bad = good.clone();
        bad[12] = 23;
        // Row 15's position is bad and row 14's last head reads past the value cache's
        // end (sequence 2, head 2, position 9): one pair at a time meets row 14 first, a
        // block of rows 14 and 15 taken head by head would meet row 15 first.
        let mut late = good.clone();
        late[15] = 23;
        let cut = ((2 * D.n_head + 2) * D.max_seq_len + 9) * D.head_dim + 3;
        let want = run(&good, Threading::Sequential, 1, (0, cache));
        assert!(want.0.is_ok() && want.1.iter().all(|&b| !f32::from_bits(b).is_nan()));
        let errors = [
            (
                &bad,
                (0, cache),
                "positions: position 23 is outside the KV capacity 0..23",
            ),
            (
                &good,
                (4, cache),
                "step `attention out`: needs elements 372..378 of a buffer of 374",
            ),
            (
                &late,
                (0, cut),
                "step `attention v_cache`: needs elements 1104..1164 of a buffer of 1161",
            ),
        ];
        for (positions, cuts, message) in errors {
            let got = run(positions, Threading::Sequential, 1, cuts).0;
            assert_eq!(got.err().as_deref(), Some(message));
        }
        // Blocks of 2, 3, 5 and 16 rows cross the sequences' ends (7 rows each) and
        // sequence 1's padding rows; 40 is clamped to ROWS_PER_BLOCK.
        for per in [2, 3, 5, 16, 40] {
            for t in MODES {
                assert!(
                    run(&good, t, per, (0, cache)) == want,
                    "{per} rows a block, {t:?}"
                );
                for (positions, cuts, message) in errors {
                    let got = run(positions, t, per, cuts).0;
                    assert_eq!(got.err().as_deref(), Some(message), "{per}, {t:?}");
                }
            }
        }
    }

    #[test]
    fn a_slot_two_rows_share_holds_the_later_row_in_every_mode() {
        // A tampered request: rows 0 and 3 of sequence 0 both write position 2.
        let mut positions = prefill_positions();
        positions[3] = 2;
        let want = run_all(Threading::Sequential, &positions, B * T, T);
        for t in MODES {
            assert!(run_all(t, &positions, B * T, T) == want, "{t:?}");
        }
    }

    /// The error each twin returns, for one mode.
    fn errors(t: Threading) -> Vec<String> {
        let (c, rows) = (D.n_embd, B * T);
        let cache = B * D.n_head * D.max_seq_len * D.head_dim;
        let mut positions = prefill_positions();
        let slots = rect(rows, T);
        let mut out = Vec::new();
        let mut short = vec![0f32; rows * c - 1];
        out.push(norm_rows(&D, &values(rows * c, 1), &mut short, rows, t));
        out.push(lerp_norm(
            &D,
            &mut short,
            &values(rows * c, 2),
            &values(c, 3),
            rows,
            t,
        ));
        let mut act = vec![0f32; rows * 4 * c];
        // The input one row short: row 20 fails on its input first.
        out.push(swiglu(
            &D,
            &values((rows - 1) * 8 * c, 4),
            &mut act,
            rows,
            t,
        ));
        let qkv = values(rows * 3 * c, 5);
        let table = values(D.max_seq_len * D.head_dim, 6);
        let mut q = vec![0f32; rows * c];
        let mut kc = vec![0f32; cache];
        // The v cache ends inside sequence 2's last head at position 9 (row 14, after its
        // q and k are checked); before that, position 40 at row 17 is never reached.
        let mut vc = vec![0f32; ((2 * D.n_head + 2) * D.max_seq_len + 9) * D.head_dim + 3];
        positions[17] = 40;
        positions[10] = 40;
        out.push(pos_norm(
            &D,
            &qkv,
            &positions,
            &table,
            &values(c, 7),
            &values(c, 8),
            &mut q,
            &mut kc,
            &mut vc,
            rows,
            &slots,
            t,
        ));
        positions[10] = 3;
        out.push(pos_norm(
            &D,
            &qkv,
            &positions,
            &table,
            &values(c, 7),
            &values(c, 8),
            &mut q,
            &mut kc,
            &mut vc,
            rows,
            &slots,
            t,
        ));
        positions[17] = 12;
        let mut att = vec![0f32; rows * c - 4];
        out.push(attention(
            &D, &q, &kc, &kc, &positions, &mut att, rows, &slots, t,
        ));
        positions[5] = -1;
        out.push(attention(
            &D, &q, &kc, &kc, &positions, &mut att, rows, &slots, t,
        ));
        out.into_iter()
            .map(|r| match r {
                Ok(()) => "ok".to_string(),
                Err(e) => e.to_string(),
            })
            .collect()
    }

    #[test]
    fn failures_are_the_sequential_first_error_in_every_mode() {
        let want = errors(Threading::Sequential);
        assert_eq!(
            want,
            [
                "step `norm_rows out`: needs elements 360..378 of a buffer of 377",
                "step `lerp_norm h`: needs elements 360..378 of a buffer of 377",
                "step `swiglu fc`: needs elements 2880..3024 of a buffer of 2880",
                "positions: position 40 is outside the KV capacity 0..23",
                "step `pos_norm v_cache`: needs elements 1158..1164 of a buffer of 1161",
                "step `attention out`: needs elements 372..378 of a buffer of 374",
                "positions: position -1 is outside the KV capacity 0..23",
            ]
        );
        for t in MODES {
            assert_eq!(errors(t), want, "{t:?}");
        }
    }

    #[test]
    fn each_row_gets_the_same_bits_whatever_rows_share_its_call() {
        // The rectangle's rows (3 sequences of 7, slot = sequence), then the same rows
        // reordered (slots 2, 0, 1 interleaved) in one call, then each row alone after the
        // rows before it in its sequence: q and attention per row, and the caches, agree.
        let (c, rows) = (D.n_embd, B * T);
        let cache = B * D.n_head * D.max_seq_len * D.head_dim;
        let positions = prefill_positions();
        let slots = rect(rows, T);
        let qkv = values(rows * 3 * c, 5);
        let table = values(D.max_seq_len * D.head_dim, 6);
        let (qs, ks) = (values(c, 7), values(c, 8));
        // Runs `order` (rows of the rectangle) as calls of `call` rows; returns per
        // rectangle row its q and attention bits, and the caches.
        let run = |order: &[usize], call: usize, t: Threading| {
            let (mut kc, mut vc) = (values(cache, 9), values(cache, 10));
            let mut q_of = vec![vec![]; rows];
            let mut att_of = vec![vec![]; rows];
            for chunk in order.chunks(call) {
                let n = chunk.len();
                let x: Vec<f32> = chunk
                    .iter()
                    .flat_map(|&r| qkv[r * 3 * c..(r + 1) * 3 * c].to_vec())
                    .collect();
                let p: Vec<i32> = chunk.iter().map(|&r| positions[r]).collect();
                let sl: Vec<i32> = chunk.iter().map(|&r| slots[r]).collect();
                let mut q = vec![0f32; n * c];
                pos_norm(
                    &D, &x, &p, &table, &qs, &ks, &mut q, &mut kc, &mut vc, n, &sl, t,
                )
                .expect("pos_norm");
                let mut att = vec![0f32; n * c];
                attention(&D, &q, &kc, &vc, &p, &mut att, n, &sl, t).expect("attention");
                for (i, &r) in chunk.iter().enumerate() {
                    q_of[r] = bits(&q[i * c..(i + 1) * c]);
                    att_of[r] = bits(&att[i * c..(i + 1) * c]);
                }
            }
            (q_of, att_of, bits(&kc), bits(&vc))
        };
        let straight: Vec<usize> = (0..rows).collect();
        let want = run(&straight, rows, Threading::Sequential);
        // Slot order 2, 0, 1, each sequence's rows in order.
        let mut mixed = vec![];
        for i in 0..T {
            mixed.extend([2 * T + i, i, T + i]);
        }
        for t in MODES {
            assert!(run(&straight, rows, t) == want, "{t:?}");
            assert!(run(&mixed, rows, t) == want, "mixed, {t:?}");
            assert!(run(&mixed, 1, t) == want, "one row a call, {t:?}");
            assert!(run(&mixed, 4, t) == want, "four rows a call, {t:?}");
        }
    }
}
