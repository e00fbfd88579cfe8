//! Rust twins of the kernels in `compiler/kernels/ngpt.cu`: same arguments, same
//! semantics; a launch's grid decides nothing here, each twin covers the whole range.
//! Every index goes through checked slicing, so a tampered plan fails, never reads out of
//! bounds.

use crate::error::{Error, Result};
use crate::plan::Dims;

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

pub fn embed(d: &Dims, tokens: &[i32], wte: &[f32], out: &mut [f32], rows: usize) -> Result<()> {
    let c = d.n_embd;
    for r in 0..rows {
        let t = *tokens
            .get(r)
            .ok_or_else(|| oob("embed tokens", r, 1, tokens.len()))?;
        let t = usize::try_from(t)
            .ok()
            .filter(|&t| t < d.vocab)
            .ok_or_else(|| Error::Request {
                what: "tokens".into(),
                problem: format!("token id {t} is outside 0..{}", d.vocab),
            })?;
        span_mut(out, r * c, c, "embed out")?.copy_from_slice(span(wte, t * c, c, "embed wte")?);
    }
    Ok(())
}

pub fn norm_rows(d: &Dims, x: &[f32], out: &mut [f32], rows: usize) -> Result<()> {
    let c = d.n_embd;
    for r in 0..rows {
        let xr = span(x, r * c, c, "norm_rows x")?;
        let inv = inv_norm(xr);
        span_mut(out, r * c, c, "norm_rows out")?
            .iter_mut()
            .zip(xr)
            .for_each(|(o, v)| *o = v * inv);
    }
    Ok(())
}

pub fn lerp_norm(d: &Dims, h: &mut [f32], branch: &[f32], lr: &[f32], rows: usize) -> Result<()> {
    let c = d.n_embd;
    let lr = span(lr, 0, c, "lerp_norm lr")?;
    let mut m = vec![0f32; c];
    for r in 0..rows {
        let br = span(branch, r * c, c, "lerp_norm branch")?;
        let hr = span_mut(h, r * c, c, "lerp_norm h")?;
        let inv_b = inv_norm(br);
        for i in 0..c {
            m[i] = hr[i] + lr[i] * (br[i] * inv_b - hr[i]);
        }
        let inv_m = inv_norm(&m);
        hr.iter_mut().zip(&m).for_each(|(o, v)| *o = v * inv_m);
    }
    Ok(())
}

pub fn swiglu(d: &Dims, fc: &[f32], out: &mut [f32], rows: usize) -> Result<()> {
    let f = 4 * d.n_embd;
    for r in 0..rows {
        let row = span(fc, r * 2 * f, 2 * f, "swiglu fc")?;
        let o = span_mut(out, r * f, f, "swiglu out")?;
        for j in 0..f {
            let v = row[f + j];
            o[j] = row[j] * (v / (1.0 + (-v).exp()));
        }
    }
    Ok(())
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

fn cache_offset(d: &Dims, b: usize, head: usize, pos: usize) -> usize {
    ((b * d.n_head + head) * d.max_seq_len + pos) * d.head_dim
}

/// Per row and head: q = Norm(M_pos * q) * q_scale; k likewise with k_scale into the cache;
/// v copied into the cache, both at the row's position.
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
    tokens: usize,
) -> Result<()> {
    let (c, hd) = (d.n_embd, d.head_dim);
    let mut q = vec![0f32; hd];
    let mut k = vec![0f32; hd];
    for r in 0..rows {
        let b = r / tokens.max(1);
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
    Ok(())
}

/// Causal attention over the cache: row r attends keys 0..=positions[r] of its sequence,
/// softmax scale 1. Both attention entries (prefill, decode) compute this.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    d: &Dims,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    positions: &[i32],
    out: &mut [f32],
    rows: usize,
    tokens: usize,
) -> Result<()> {
    let (c, hd) = (d.n_embd, d.head_dim);
    let mut scores = vec![0f32; d.max_seq_len];
    for r in 0..rows {
        let b = r / tokens.max(1);
        let pos = position(d, positions, r)?;
        for head in 0..d.n_head {
            let qr = span(q, r * c + head * hd, hd, "attention q")?;
            let base = cache_offset(d, b, head, 0);
            let keys = span(k_cache, base, (pos + 1) * hd, "attention k_cache")?;
            let vals = span(v_cache, base, (pos + 1) * hd, "attention v_cache")?;
            let mut max = f32::MIN;
            for u in 0..=pos {
                let s: f32 = qr
                    .iter()
                    .zip(&keys[u * hd..(u + 1) * hd])
                    .map(|(a, b)| a * b)
                    .sum();
                scores[u] = s;
                max = max.max(s);
            }
            let mut sum = 0f32;
            for s in &mut scores[..=pos] {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = span_mut(out, r * c + head * hd, hd, "attention out")?;
            o.fill(0.0);
            for u in 0..=pos {
                let p = scores[u] / sum;
                o.iter_mut()
                    .zip(&vals[u * hd..(u + 1) * hd])
                    .for_each(|(o, v)| *o += p * v);
            }
        }
    }
    Ok(())
}
