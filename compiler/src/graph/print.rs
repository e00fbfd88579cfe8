//! The stable text form of a graph, one node a line.
//!
//! ```text
//! %3 wte.gather = gather(%2, %0) : [T, 64]
//! ```
//! Constants show their dtype and shape (scalars their value, to 6 significant digits), so
//! the text is stable across machines and fit for snapshots.

use std::fmt;

use super::{Graph, Op};

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (id, node) in self.nodes.iter().enumerate() {
            let shape: Vec<String> = node.fact.shape.iter().map(|d| d.to_string()).collect();
            let shape = format!("[{}]", shape.join(", "));
            match &node.op {
                Op::Input => writeln!(
                    f,
                    "%{id} {} = input : {:?}{shape}",
                    node.name, node.fact.kind
                )?,
                Op::Const(c) => {
                    if c.rank() == 0 {
                        let v = c
                            .value()
                            .and_then(|t| t.to_dtype(candle_core::DType::F64))
                            .and_then(|t| t.to_scalar::<f64>());
                        match v {
                            Ok(v) => {
                                writeln!(f, "%{id} {} = const {:?} {v:.6e}", node.name, c.dtype())?
                            }
                            Err(_) => writeln!(f, "%{id} {} = const {:?} ?", node.name, c.dtype())?,
                        }
                    } else if let Some(q) = c.quant() {
                        writeln!(f, "%{id} {} = const {:?}{shape} {q}", node.name, c.dtype())?
                    } else {
                        writeln!(f, "%{id} {} = const {:?}{shape}", node.name, c.dtype())?
                    }
                }
                op => {
                    let args: Vec<String> = node.inputs.iter().map(|i| format!("%{i}")).collect();
                    let attrs = match op {
                        Op::Norm { group } => format!(" group={group}"),
                        Op::PosStep { head_dim }
                        | Op::PosDiag { head_dim }
                        | Op::PosNorm { head_dim }
                        | Op::Rotary { head_dim } => {
                            format!(" head_dim={head_dim}")
                        }
                        Op::Attention { heads, scale } => {
                            format!(" heads={heads} scale={scale:.6e}")
                        }
                        Op::Slice { start, len } => format!(" start={start} len={len}"),
                        _ => String::new(),
                    };
                    writeln!(
                        f,
                        "%{id} {} = {}{attrs}({}) : {shape}",
                        node.name,
                        op.mnemonic(),
                        args.join(", ")
                    )?
                }
            }
        }
        let outs: Vec<String> = self.outputs.iter().map(|o| format!("%{o}")).collect();
        writeln!(f, "outputs({})", outs.join(", "))
    }
}
