//! The literal graph: spec section 3, node for node.

use candle_core::{Device, Tensor};

use super::{Const, Dim, Fact, Graph, Kind, Node, NodeId, Op};
use crate::error::{CandleContext, Result};
use crate::import::Checkpoint;

struct Builder<'a> {
    g: Graph,
    ckpt: &'a Checkpoint,
}

impl Builder<'_> {
    fn weight(&mut self, key: &str) -> Result<NodeId> {
        let tensor = self.ckpt.tensor(key)?.clone();
        self.g.push(key, Op::Const(Const::new(tensor)), vec![])
    }

    fn scalar(&mut self, name: String, value: f64) -> Result<NodeId> {
        let tensor = Tensor::new(value, &Device::Cpu).ctx("scalar constant")?;
        self.g.push(name, Op::Const(Const::new(tensor)), vec![])
    }

    fn op(&mut self, name: String, op: Op, inputs: Vec<NodeId>) -> Result<NodeId> {
        self.g.push(name, op, inputs)
    }

    /// `Norm(a + |alpha * 0.05/bs| * (Norm(branch) - a))` with `a = Norm(h)`, unfused.
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
    let cfg = &ckpt.config;
    let (c, h, d) = (cfg.n_embd, cfg.n_head, cfg.head_dim());
    let bs = cfg.base_scale;
    let mut b = Builder {
        g: Graph {
            nodes: vec![],
            outputs: vec![],
            n_embd: c,
            n_head: h,
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
    let wlm = b.weight("lm_head.weight")?;
    let raw = b.op("lm_head".into(), Op::MatMulT, vec![x, wlm])?;
    let sz = b.weight("sz")?;
    let inv_bs = b.scalar("sz.scale".into(), 1.0 / bs)?;
    let sz_eff = b.op("sz.eff".into(), Op::Mul, vec![sz, inv_bs])?;
    let logits = b.op("logits".into(), Op::Mul, vec![raw, sz_eff])?;
    b.g.outputs = vec![logits];
    b.g.compact();
    Ok(b.g)
}
