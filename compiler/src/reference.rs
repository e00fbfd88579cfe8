//! The literal reference: spec section 3, unfolded, with candle-core on the CPU.
//!
//! Every Norm, every scaling multiply and the code's position step (not a rotation) are
//! computed as NVIDIA's model.py computes them, in f32 or f64. This is the oracle every
//! folded or compiled path is compared against; it favours being obviously right over
//! being fast.
//!
//! A checkpoint of the Hugging Face family (NousResearch's, ngpt-hf-spec.md) runs its own
//! literal forward, `nous.rs`; [`logits`] and [`greedy`] dispatch on the config's family.

use candle_core::{DType, Device, Tensor, D};

use crate::config::Family;
use crate::error::{CandleContext, Error, Result};
use crate::import::Checkpoint;
use crate::numerics::ValueTrace;
pub use crate::numerics::{position_table, Precision};

mod nous;

/// `Norm(x) = x / ||x||_2` over the last axis, with no epsilon (model.py `justnorm`).
fn norm(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

/// Logits of every position, `[T, vocab]`, for one token sequence at positions 0..T-1.
///
/// ```no_run
/// use ngpt_compiler::{import, reference::{self, Precision}};
/// let ckpt = import::load("tests/fixtures/nv-tiny".as_ref())?;
/// let logits = reference::logits(&ckpt, &[45, 64, 77], Precision::F64)?;
/// assert_eq!(logits.dims(), &[3, ckpt.config.vocab_size]);
/// # Ok::<(), ngpt_compiler::Error>(())
/// ```
pub fn logits(ckpt: &Checkpoint, tokens: &[u32], precision: Precision) -> Result<Tensor> {
    check_tokens(ckpt, tokens)?;
    forward(ckpt, tokens, precision.dtype(), None).ctx("reference forward")
}

/// As [`logits`], calling `on_value(name, value)` at the points of the forward that the
/// compiled graph also has, named as its nodes are (`h.{i}.attn.attention`,
/// `h.{i}.attn.out`, `h.{i}.attn.residual.norm`, `h.{i}.mlp.gated`, `h.{i}.mlp.out`,
/// `h.{i}.mlp.residual.norm`, `lm_head`; each `[T, width]`): the trace `ngpt bisect`
/// compares.
pub fn logits_traced(
    ckpt: &Checkpoint,
    tokens: &[u32],
    precision: Precision,
    on_value: &mut dyn FnMut(&str, &Tensor),
) -> Result<Tensor> {
    check_tokens(ckpt, tokens)?;
    forward(ckpt, tokens, precision.dtype(), Some(on_value)).ctx("reference forward")
}

fn check_tokens(ckpt: &Checkpoint, tokens: &[u32]) -> Result<()> {
    let cfg = &ckpt.config;
    if tokens.is_empty() {
        return Err(Error::Argument {
            what: "tokens".into(),
            problem: "empty; expected at least one token id".into(),
        });
    }
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        return Err(Error::Argument {
            what: "tokens".into(),
            problem: format!(
                "token id {bad} is out of range (vocab_size = {})",
                cfg.vocab_size
            ),
        });
    }
    if cfg.family == Family::Nous && tokens.len() > cfg.n_positions {
        return Err(Error::Argument {
            what: "tokens".into(),
            problem: format!(
                "{} positions, more than the {} rows of transformer.wpe.weight (n_positions)",
                tokens.len(),
                cfg.n_positions
            ),
        });
    }
    Ok(())
}

fn forward(
    ckpt: &Checkpoint,
    tokens: &[u32],
    dt: DType,
    mut on_value: Option<ValueTrace<'_>>,
) -> candle_core::Result<Tensor> {
    if ckpt.config.family == Family::Nous {
        return nous::forward(ckpt, tokens, dt, on_value);
    }
    let mut trace = |name: String, t: &Tensor| {
        if let Some(f) = on_value.as_mut() {
            f(&name, t);
        }
    };
    let cfg = &ckpt.config;
    let dev = Device::Cpu;
    let (t_len, c, h, d) = (tokens.len(), cfg.n_embd, cfg.n_head, cfg.head_dim());
    let p = d / 2;
    let bs = cfg.base_scale;
    let w = |name: &str| -> candle_core::Result<Tensor> {
        match ckpt.tensors.get(name) {
            Some(t) => t.to_dtype(dt),
            None => candle_core::bail!("missing tensor {name}"),
        }
    };
    let scalar = |v: f64| Tensor::new(v, &dev)?.to_dtype(dt);

    // Step 0: raw embedding rows, not normalized.
    let ids = Tensor::new(tokens, &dev)?;
    let mut x = w("transformer.wte.weight")?.index_select(&ids, 0)?;

    // The position table, in f64 and rounded once, split as the code's E.chunk(2, -1).
    let table = Tensor::from_vec(position_table(t_len, d), (t_len, d), &dev)?.to_dtype(dt)?;
    let sin = table.narrow(1, 0, p)?.reshape((t_len, 1, p, 1))?;
    let cos = table.narrow(1, p, p)?.reshape((t_len, 1, p, 1))?;
    let pos_step = |q: &Tensor| -> candle_core::Result<Tensor> {
        // q: [T, H, D] viewed as pairs [T, H, P, 2].
        let pairs = q.reshape((t_len, h, p, 2))?;
        let even = pairs.narrow(3, 0, 1)?;
        let odd = pairs.narrow(3, 1, 1)?;
        let out_even = odd.broadcast_mul(&cos)?.neg()?;
        let out_odd = even.broadcast_mul(&sin)?;
        Tensor::cat(&[out_even, out_odd], 3)?.reshape((t_len, h, d))
    };

    let mask = causal_mask(t_len, &dev, dt)?;
    let softmax_scale = scalar((d as f64).sqrt())?;
    let alpha_scale = scalar(0.05 / bs)?;
    let suv_scale = scalar((c as f64).sqrt())?;

    for i in 0..cfg.n_layer {
        let l = |n: &str| w(&format!("transformer.h.{i}.{n}"));
        // Step 1: projections, viewed [T, H, D].
        let q = x.matmul(&l("query.weight")?.t()?)?.reshape((t_len, h, d))?;
        let k = x.matmul(&l("key.weight")?.t()?)?.reshape((t_len, h, d))?;
        let v = x.matmul(&l("value.weight")?.t()?)?.reshape((t_len, h, d))?;
        // Steps 2 and 3: position step, then per-head Norm, then sqk/bs on both q and k.
        let s = (l("sqk")? / bs)?.reshape((1, h, d))?;
        let q = norm(&pos_step(&q)?)?.broadcast_mul(&s)?;
        let k = norm(&pos_step(&k)?)?.broadcast_mul(&s)?;
        // Step 4: causal attention with softmax scale sqrt(D).
        let (q, k, v) = (
            q.transpose(0, 1)?,
            k.transpose(0, 1)?,
            v.transpose(0, 1)?.contiguous()?,
        );
        let scores = q
            .contiguous()?
            .matmul(&k.t()?.contiguous()?)?
            .broadcast_mul(&softmax_scale)?
            .broadcast_add(&mask)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let y = probs.matmul(&v)?.transpose(0, 1)?.reshape((t_len, c))?;
        // Step 5: output projection.
        let h_att = y.matmul(&l("att_c_proj.weight")?.t()?)?;
        // Step 6: residual with |alpha_eff|.
        x = residual(&x, &h_att, &l("attn_alpha")?, &alpha_scale)?;
        trace(format!("h.{i}.attn.attention"), &y);
        trace(format!("h.{i}.attn.out"), &h_att);
        trace(format!("h.{i}.attn.residual.norm"), &x);
        // Step 7: MLP, suv * sqrt(C) on both halves, SiLU on the second half.
        let uv = x
            .matmul(&l("c_fc.weight")?.t()?)?
            .broadcast_mul(&l("suv")?.broadcast_mul(&suv_scale)?)?;
        let u = uv.narrow(1, 0, 4 * c)?;
        let gate = uv.narrow(1, 4 * c, 4 * c)?;
        let silu = (&gate / (gate.neg()?.exp()? + 1.0)?)?;
        let gated = (u * silu)?;
        let h_mlp = gated.matmul(&l("mlp_c_proj.weight")?.t()?)?;
        // Step 8: residual with |mlp_alpha_eff|.
        x = residual(&x, &h_mlp, &l("mlp_alpha")?, &alpha_scale)?;
        trace(format!("h.{i}.mlp.gated"), &gated);
        trace(format!("h.{i}.mlp.out"), &h_mlp);
        trace(format!("h.{i}.mlp.residual.norm"), &x);
    }
    // Output: sz/bs times the lm_head product; no final norm.
    let sz = (w("sz")? / bs)?;
    let logits = x.matmul(&w("lm_head.weight")?.t()?)?.broadcast_mul(&sz)?;
    trace("lm_head".into(), &logits);
    Ok(logits)
}

/// The causal mask `[1, T, T]`: 0 where key u <= query t, -inf after.
fn causal_mask(t_len: usize, dev: &Device, dt: DType) -> candle_core::Result<Tensor> {
    let mask: Vec<f64> = (0..t_len * t_len)
        .map(|i| {
            if i % t_len <= i / t_len {
                0.0
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect();
    Tensor::from_vec(mask, (1, t_len, t_len), dev)?.to_dtype(dt)
}

/// `Norm(A + |alpha * 0.05/bs| * (B - A))` with `A = Norm(h)`, `B = Norm(branch)`.
fn residual(
    h: &Tensor,
    branch: &Tensor,
    alpha: &Tensor,
    scale: &Tensor,
) -> candle_core::Result<Tensor> {
    let lr = alpha.broadcast_mul(scale)?.abs()?;
    let a = norm(h)?;
    let b = norm(branch)?;
    norm(&(&a + (b - &a)?.broadcast_mul(&lr)?)?)
}

/// Greedy continuation: `n_new` argmax tokens after `prompt`, each step a full causal
/// forward of the whole prefix (no KV cache; this is the oracle, not the fast path).
pub fn greedy(
    ckpt: &Checkpoint,
    prompt: &[u32],
    n_new: usize,
    precision: Precision,
) -> Result<Vec<u32>> {
    let mut seq = prompt.to_vec();
    for _ in 0..n_new {
        let l = logits(ckpt, &seq, precision)?;
        let last = l
            .get(seq.len() - 1)
            .and_then(|r| r.to_dtype(DType::F64))
            .and_then(|r| r.to_vec1::<f64>())
            .ctx("greedy step")?;
        seq.push(argmax(&last) as u32);
    }
    Ok(seq[prompt.len()..].to_vec())
}

/// Index of the largest value; the first one on ties; NaN never wins.
pub fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best
}
