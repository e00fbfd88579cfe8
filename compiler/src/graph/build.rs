//! The literal graph: spec section 3, node for node.

use candle_core::{Device, Tensor};

use super::{Const, Dim, Fact, Graph, Kind, Node, NodeId, Op};
use crate::error::{CandleContext, Result};
use crate::import::Checkpoint;

struct Builder<'a> {
    g: Graph,
    ckpt: &'a Checkpoint,
}

impl<'a> Builder<'a> {
    /// A builder holding the graph inputs `tokens` (id 0) and `positions` (id 1).
    fn new(ckpt: &'a Checkpoint) -> Builder<'a> {
        let cfg = &ckpt.config;
        let mut b = Builder {
            g: Graph {
                nodes: vec![],
                outputs: vec![],
                n_embd: cfg.n_embd,
                n_head: cfg.n_head,
            },
            ckpt,
        };
        for name in ["tokens", "positions"] {
            b.g.nodes.push(Node {
                name: name.into(),
                op: Op::Input,
                inputs: vec![],
                fact: Fact {
                    kind: Kind::Int,
                    shape: vec![Dim::T],
                },
            });
        }
        b
    }

    fn weight(&mut self, key: &str) -> Result<NodeId> {
        let tensor = self.ckpt.tensor(key)?.clone();
        self.g.push(key, Op::Const(Const::new(tensor)), vec![])
    }

    /// A Conv1D weight, stored `[in, out]`, as the `[out, in]` constant `matmul_t` takes:
    /// a permutation, exact, in the stored dtype.
    fn conv1d_weight(&mut self, key: &str) -> Result<NodeId> {
        let tensor = self.ckpt.tensor(key)?;
        let t = tensor.t().and_then(|t| t.contiguous()).ctx(key)?;
        self.g.push(key, Op::Const(Const::new(t)), vec![])
    }

    fn scalar(&mut self, name: String, value: f64) -> Result<NodeId> {
        let tensor = Tensor::new(value, &Device::Cpu).ctx("scalar constant")?;
        self.g.push(name, Op::Const(Const::new(tensor)), vec![])
    }

    fn op(&mut self, name: String, op: Op, inputs: Vec<NodeId>) -> Result<NodeId> {
        self.g.push(name, op, inputs)
    }

    /// `Norm(a + |alpha * 0.05/bs| * (Norm(branch) - a))` with `a = Norm(h)`, unfused.
    /// The output head of both families: `(x W^T) * (sz / bs)`, no final norm; `weight`
    /// is NVIDIA's `lm_head.weight` or the Hugging Face family's `lm_head_2.weight`.
    fn head(&mut self, x: NodeId, weight: &str, bs: f64) -> Result<NodeId> {
        let wlm = self.weight(weight)?;
        let raw = self.op("lm_head".into(), Op::MatMulT, vec![x, wlm])?;
        let sz = self.weight("sz")?;
        let inv_bs = self.scalar("sz.scale".into(), 1.0 / bs)?;
        let sz_eff = self.op("sz.eff".into(), Op::Mul, vec![sz, inv_bs])?;
        self.op("logits".into(), Op::Mul, vec![raw, sz_eff])
    }

    fn residual(&mut self, p: &str, h: NodeId, branch: NodeId, alpha_key: &str) -> Result<NodeId> {
        let c = self.g.n_embd;
        let bs = self.ckpt.config.base_scale;
        let alpha = self.weight(alpha_key)?;
        let k = self.scalar(format!("{p}.alpha.scale"), 0.05 / bs)?;
        let alpha_eff = self.op(format!("{p}.alpha.eff"), Op::Mul, vec![alpha, k])?;
        let lr = self.op(format!("{p}.lr"), Op::Abs, vec![alpha_eff])?;
        let a = self.op(format!("{p}.in.norm"), Op::Norm { group: c }, vec![h])?;
        let b = self.op(format!("{p}.out.norm"), Op::Norm { group: c }, vec![branch])?;
        let mixed = self.op(format!("{p}.lerp"), Op::Lerp, vec![a, b, lr])?;
        self.op(format!("{p}.norm"), Op::Norm { group: c }, vec![mixed])
    }
}

/// Builds the literal graph of `ckpt`: every Norm, every scaling multiply and the code's
/// position step, exactly as spec section 3 lists them. Inputs: `tokens` and `positions`
/// (int `[T]`); output: `logits` `[T, vocab]`.
pub fn literal(ckpt: &Checkpoint) -> Result<Graph> {
    if ckpt.config.family == crate::config::Family::Nous {
        return literal_nous(ckpt);
    }
    let cfg = &ckpt.config;
    let (c, h, d) = (cfg.n_embd, cfg.n_head, cfg.head_dim());
    let bs = cfg.base_scale;
    let mut b = Builder::new(ckpt);
    let (tokens, positions) = (0, 1);
    let wte = b.weight("transformer.wte.weight")?;
    let mut x = b.op("wte.gather".into(), Op::Gather, vec![wte, tokens])?;
    for i in 0..cfg.n_layer {
        let key = |n: &str| format!("transformer.h.{i}.{n}");
        let p = format!("h.{i}.attn");
        let mut qk = vec![];
        let sqk = b.weight(&key("sqk"))?;
        let inv_bs = b.scalar(format!("{p}.sqk.scale"), 1.0 / bs)?;
        let s = b.op(format!("{p}.sqk.eff"), Op::Mul, vec![sqk, inv_bs])?;
        for (which, w) in [("q", "query.weight"), ("k", "key.weight")] {
            let wt = b.weight(&key(w))?;
            let y = b.op(format!("{p}.{which}"), Op::MatMulT, vec![x, wt])?;
            let y = b.op(
                format!("{p}.{which}.pos"),
                Op::PosStep { head_dim: d },
                vec![y, positions],
            )?;
            let y = b.op(format!("{p}.{which}.norm"), Op::Norm { group: d }, vec![y])?;
            qk.push(b.op(format!("{p}.{which}.scale"), Op::Mul, vec![y, s])?);
        }
        let wv = b.weight(&key("value.weight"))?;
        let v = b.op(format!("{p}.v"), Op::MatMulT, vec![x, wv])?;
        let att = Op::Attention {
            heads: h,
            scale: (d as f64).sqrt(),
        };
        let y = b.op(format!("{p}.attention"), att, vec![qk[0], qk[1], v])?;
        let wo = b.weight(&key("att_c_proj.weight"))?;
        let a = b.op(format!("{p}.out"), Op::MatMulT, vec![y, wo])?;
        x = b.residual(&format!("h.{i}.attn.residual"), x, a, &key("attn_alpha"))?;

        let p = format!("h.{i}.mlp");
        let wfc = b.weight(&key("c_fc.weight"))?;
        let uv = b.op(format!("{p}.fc"), Op::MatMulT, vec![x, wfc])?;
        let suv = b.weight(&key("suv"))?;
        let sq = b.scalar(format!("{p}.suv.scale"), (c as f64).sqrt())?;
        let suv_eff = b.op(format!("{p}.suv.eff"), Op::Mul, vec![suv, sq])?;
        let uv = b.op(format!("{p}.fc.scale"), Op::Mul, vec![uv, suv_eff])?;
        let u = b.op(
            format!("{p}.u"),
            Op::Slice {
                start: 0,
                len: 4 * c,
            },
            vec![uv],
        )?;
        let gate = b.op(
            format!("{p}.v"),
            Op::Slice {
                start: 4 * c,
                len: 4 * c,
            },
            vec![uv],
        )?;
        let act = b.op(format!("{p}.v.silu"), Op::Silu, vec![gate])?;
        let m = b.op(format!("{p}.gated"), Op::Mul, vec![u, act])?;
        let wmp = b.weight(&key("mlp_c_proj.weight"))?;
        let m = b.op(format!("{p}.out"), Op::MatMulT, vec![m, wmp])?;
        x = b.residual(&format!("h.{i}.mlp.residual"), x, m, &key("mlp_alpha"))?;
    }
    let logits = b.head(x, "lm_head.weight", bs)?;
    b.g.outputs = vec![logits];
    b.g.compact();
    Ok(b.g)
}

/// The literal graph of the Hugging Face family (ngpt-hf-spec.md "Forward"), node for node:
/// learned position rows added to the token rows, one c_attn product (with its bias) split
/// into q, k and v, the rotary embedding before the per-head Norm and sqk/bs, softmax scale
/// 1/sqrt(D), su on u and sv * sqrt(E) on v only, and `(h lm_head_2^T) * (sz / bs)`. Conv1D
/// weights, stored `[in, out]`, are held as the `[out, in]` constants `matmul_t` takes.
fn literal_nous(ckpt: &Checkpoint) -> Result<Graph> {
    let cfg = &ckpt.config;
    let (e, d, inner) = (cfg.n_embd, cfg.head_dim(), cfg.n_inner);
    let bs = cfg.base_scale;
    let mut b = Builder::new(ckpt);
    let (tokens, positions) = (0, 1);
    let wte = b.weight("transformer.wte.weight")?;
    let tok = b.op("wte.gather".into(), Op::Gather, vec![wte, tokens])?;
    let wpe = b.weight("transformer.wpe.weight")?;
    let pos = b.op("wpe.gather".into(), Op::Gather, vec![wpe, positions])?;
    let mut x = b.op("embed".into(), Op::Add, vec![tok, pos])?;
    for i in 0..cfg.n_layer {
        let key = |n: &str| format!("transformer.h.{i}.{n}");
        let p = format!("h.{i}.attn");
        let w = b.conv1d_weight(&key("attn.c_attn.weight"))?;
        let bias = b.weight(&key("attn.c_attn.bias"))?;
        let qkv = b.op(format!("{p}.qkv"), Op::MatMulT, vec![x, w, bias])?;
        let sqk = b.weight(&key("attn.sqk"))?;
        let inv_bs = b.scalar(format!("{p}.sqk.scale"), 1.0 / bs)?;
        let s = b.op(format!("{p}.sqk.eff"), Op::Mul, vec![sqk, inv_bs])?;
        let mut qkv_out = vec![];
        for (j, which) in ["q", "k", "v"].into_iter().enumerate() {
            let slice = Op::Slice {
                start: j * e,
                len: e,
            };
            let y = b.op(format!("{p}.{which}"), slice, vec![qkv])?;
            if which == "v" {
                qkv_out.push(y);
                continue;
            }
            let y = b.op(
                format!("{p}.{which}.rotary"),
                Op::Rotary { head_dim: d },
                vec![y, positions],
            )?;
            let y = b.op(format!("{p}.{which}.norm"), Op::Norm { group: d }, vec![y])?;
            qkv_out.push(b.op(format!("{p}.{which}.scale"), Op::Mul, vec![y, s])?);
        }
        let att = Op::Attention {
            heads: cfg.n_head,
            scale: 1.0 / (d as f64).sqrt(),
        };
        let y = b.op(format!("{p}.attention"), att, qkv_out)?;
        let wo = b.conv1d_weight(&key("attn.c_proj.weight"))?;
        let bo = b.weight(&key("attn.c_proj.bias"))?;
        let a = b.op(format!("{p}.out"), Op::MatMulT, vec![y, wo, bo])?;
        x = b.residual(&format!("h.{i}.attn.residual"), x, a, &key("attn_alpha"))?;

        let p = format!("h.{i}.mlp");
        let wfc = b.conv1d_weight(&key("mlp.c_fc.weight"))?;
        let bfc = b.weight(&key("mlp.c_fc.bias"))?;
        let uv = b.op(format!("{p}.fc"), Op::MatMulT, vec![x, wfc, bfc])?;
        let u = b.op(
            format!("{p}.u"),
            Op::Slice {
                start: 0,
                len: inner,
            },
            vec![uv],
        )?;
        let su = b.weight(&key("mlp.su"))?;
        let u = b.op(format!("{p}.u.scale"), Op::Mul, vec![u, su])?;
        let gate = b.op(
            format!("{p}.v"),
            Op::Slice {
                start: inner,
                len: inner,
            },
            vec![uv],
        )?;
        let sv = b.weight(&key("mlp.sv"))?;
        let sq = b.scalar(format!("{p}.sv.scale"), (e as f64).sqrt())?;
        let sv_eff = b.op(format!("{p}.sv.eff"), Op::Mul, vec![sv, sq])?;
        let gate = b.op(format!("{p}.v.scale"), Op::Mul, vec![gate, sv_eff])?;
        let act = b.op(format!("{p}.v.silu"), Op::Silu, vec![gate])?;
        let m = b.op(format!("{p}.gated"), Op::Mul, vec![u, act])?;
        let wmp = b.conv1d_weight(&key("mlp.c_proj.weight"))?;
        let bmp = b.weight(&key("mlp.c_proj.bias"))?;
        let m = b.op(format!("{p}.out"), Op::MatMulT, vec![m, wmp, bmp])?;
        x = b.residual(&format!("h.{i}.mlp.residual"), x, m, &key("mlp_alpha"))?;
    }
    let logits = b.head(x, "lm_head_2.weight", bs)?;
    b.g.outputs = vec![logits];
    b.g.compact();
    Ok(b.g)
}
