//! The literal forward of the Hugging Face nGPT family (NousResearch's `modeling_ngpt.py`),
//! ngpt-hf-spec.md section "Forward", step by step, in f32 or f64: the oracle for this
//! family, independent of the IR.
//!
//! Where it differs from NVIDIA's (the parent module): learned positions added to the
//! embedding, a true rotary embedding of interleaved pairs applied before the q/k norm,
//! biases on the four projections, Conv1D weights stored [in, out], softmax scale
//! 1/sqrt(D), sqrt(E) on the MLP's v half only, and a head whose rows are not unit-norm.

use candle_core::{DType, Device, Tensor, D};

use super::{causal_mask, norm, residual};
use crate::import::Checkpoint;
use crate::numerics::ValueTrace;

/// The rotary angles' cos and sin, `[T, 1, D/2, 1]` each, computed in f64 and rounded once:
/// angle(t, i) = t * 10000^(-2i/D).
fn rotary_tables(t_len: usize, d: usize, dt: DType) -> candle_core::Result<(Tensor, Tensor)> {
    let p = d / 2;
    let (mut cos, mut sin) = (Vec::with_capacity(t_len * p), Vec::with_capacity(t_len * p));
    for t in 0..t_len {
        for i in 0..p {
            let theta = 10000f64.powf(-((2 * i) as f64) / d as f64);
            let angle = t as f64 * theta;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let dev = Device::Cpu;
    Ok((
        Tensor::from_vec(cos, (t_len, 1, p, 1), &dev)?.to_dtype(dt)?,
        Tensor::from_vec(sin, (t_len, 1, p, 1), &dev)?.to_dtype(dt)?,
    ))
}

/// Logits `[T, vocab]` of `tokens` at positions 0..T-1 (the caller has checked the ids and
/// that T fits in wpe's rows).
pub(super) fn forward(
    ckpt: &Checkpoint,
    tokens: &[u32],
    dt: DType,
    mut on_value: Option<ValueTrace<'_>>,
) -> candle_core::Result<Tensor> {
    let mut trace = |name: String, t: &Tensor| {
        if let Some(f) = on_value.as_mut() {
            f(&name, t);
        }
    };
    let cfg = &ckpt.config;
    let dev = Device::Cpu;
    let (t_len, e, h, d, inner) = (
        tokens.len(),
        cfg.n_embd,
        cfg.n_head,
        cfg.head_dim(),
        cfg.n_inner,
    );
    let p = d / 2;
    let bs = cfg.base_scale;
    let w = |name: &str| -> candle_core::Result<Tensor> {
        match ckpt.tensors.get(name) {
            Some(t) => t.to_dtype(dt),
            None => candle_core::bail!("missing tensor {name}"),
        }
    };
    let scalar = |v: f64| Tensor::new(v, &dev)?.to_dtype(dt);
    // Conv1D: y = x W + b, W stored [in, out].
    let conv1d = |x: &Tensor, name: &str| -> candle_core::Result<Tensor> {
        x.matmul(&w(&format!("{name}.weight"))?)?
            .broadcast_add(&w(&format!("{name}.bias"))?)
    };

    // Step 1: token rows plus learned position rows; no norm before layer 0.
    let ids = Tensor::new(tokens, &dev)?;
    let positions: Vec<u32> = (0..t_len as u32).collect();
    let pos = Tensor::new(positions.as_slice(), &dev)?;
    let mut x = (w("transformer.wte.weight")?.index_select(&ids, 0)?
        + w("transformer.wpe.weight")?.index_select(&pos, 0)?)?;

    let (cos, sin) = rotary_tables(t_len, d, dt)?;
    // A rotation of the interleaved pairs (2i, 2i+1) of each head: (a, b) ->
    // (a cos - b sin, b cos + a sin).
    let rotate = |q: &Tensor| -> candle_core::Result<Tensor> {
        let pairs = q.reshape((t_len, h, p, 2))?;
        let a = pairs.narrow(3, 0, 1)?;
        let b = pairs.narrow(3, 1, 1)?;
        let out_a = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
        let out_b = (b.broadcast_mul(&cos)? + a.broadcast_mul(&sin)?)?;
        Tensor::cat(&[out_a, out_b], 3)?.reshape((t_len, h, d))
    };

    let mask = causal_mask(t_len, &dev, dt)?;
    let softmax_scale = scalar(1.0 / (d as f64).sqrt())?;
    let alpha_scale = scalar(0.05 / bs)?;
    let sv_scale = scalar((e as f64).sqrt())?;

    for i in 0..cfg.n_layer {
        let pre = format!("transformer.h.{i}");
        let l = |n: &str| w(&format!("{pre}.{n}"));
        // Step 2: [q | k | v] = h W_attn + b_attn, no pre-norm.
        let qkv = conv1d(&x, &format!("{pre}.attn.c_attn"))?;
        let q = qkv.narrow(1, 0, e)?.reshape((t_len, h, d))?;
        let k = qkv.narrow(1, e, e)?.reshape((t_len, h, d))?;
        let v = qkv.narrow(1, 2 * e, e)?.reshape((t_len, h, d))?;
        // Rotary first, then the per-head norm and sqk/bs.
        let s = (l("attn.sqk")? / bs)?.reshape((1, h, d))?;
        let q = norm(&rotate(&q)?)?.broadcast_mul(&s)?;
        let k = norm(&rotate(&k)?)?.broadcast_mul(&s)?;
        // Causal softmax attention with scale 1/sqrt(D).
        let (q, k, v) = (
            q.transpose(0, 1)?.contiguous()?,
            k.transpose(0, 1)?,
            v.transpose(0, 1)?.contiguous()?,
        );
        let scores = q
            .matmul(&k.t()?.contiguous()?)?
            .broadcast_mul(&softmax_scale)?
            .broadcast_add(&mask)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let ex = scores.broadcast_sub(&max)?.exp()?;
        let probs = ex.broadcast_div(&ex.sum_keepdim(D::Minus1)?)?;
        let y = probs.matmul(&v)?.transpose(0, 1)?.reshape((t_len, e))?;
        let a = conv1d(&y, &format!("{pre}.attn.c_proj"))?;
        // Step 3: residual with |attn_alpha * 0.05/bs|.
        x = residual(&x, &a, &l("attn_alpha")?, &alpha_scale)?;
        trace(format!("h.{i}.attn.attention"), &y);
        trace(format!("h.{i}.attn.out"), &a);
        trace(format!("h.{i}.attn.residual.norm"), &x);
        // Step 4: MLP: u * su, v * (sv * sqrt(E)), u * silu(v).
        let uv = conv1d(&x, &format!("{pre}.mlp.c_fc"))?;
        let u = uv.narrow(1, 0, inner)?.broadcast_mul(&l("mlp.su")?)?;
        let gate = uv
            .narrow(1, inner, inner)?
            .broadcast_mul(&l("mlp.sv")?.broadcast_mul(&sv_scale)?)?;
        let silu = (&gate / (gate.neg()?.exp()? + 1.0)?)?;
        let gated = (u * silu)?;
        let m = conv1d(&gated, &format!("{pre}.mlp.c_proj"))?;
        x = residual(&x, &m, &l("mlp_alpha")?, &alpha_scale)?;
        trace(format!("h.{i}.mlp.gated"), &gated);
        trace(format!("h.{i}.mlp.out"), &m);
        trace(format!("h.{i}.mlp.residual.norm"), &x);
    }
    // Step 5: no final norm; (h lm_head_2^T) * (sz / bs).
    let sz = (w("sz")? / bs)?;
    let logits = x.matmul(&w("lm_head_2.weight")?.t()?)?.broadcast_mul(&sz)?;
    trace("lm_head".into(), &logits);
    Ok(logits)
}
