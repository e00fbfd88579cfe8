//! Fact inference and the graph invariants.

use super::{Dim, Fact, Graph, Kind, Op};

fn float2(f: &Fact, what: &str) -> Result<(Dim, usize), String> {
    match (f.kind, f.shape.as_slice()) {
        (Kind::Float, [rows, Dim::Fixed(n)]) => Ok((*rows, *n)),
        _ => Err(format!(
            "{what}: expected a float [rows, N] value, found {f:?}"
        )),
    }
}

fn arity(op: &Op, inputs: &[&Fact], n: usize) -> Result<(), String> {
    if inputs.len() == n {
        Ok(())
    } else {
        Err(format!(
            "{} takes {n} inputs, found {}",
            op.mnemonic(),
            inputs.len()
        ))
    }
}

fn heads_fit(width: usize, head_dim: usize) -> Result<(), String> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) || !width.is_multiple_of(head_dim) {
        Err(format!(
            "width {width} is not a whole number of even heads of {head_dim}"
        ))
    } else {
        Ok(())
    }
}

fn row_vector(f: &Fact, n: usize, what: &str) -> Result<(), String> {
    if f.kind == Kind::Float && f.shape == [Dim::Fixed(n)] {
        Ok(())
    } else {
        Err(format!(
            "{what}: expected a float [{n}] vector, found {f:?}"
        ))
    }
}

fn positions(f: &Fact, rows: Dim) -> Result<(), String> {
    if f.kind == Kind::Int && f.shape == [rows] {
        Ok(())
    } else {
        Err(format!("positions: expected int [{rows}], found {f:?}"))
    }
}

/// The fact of `op`'s output given its inputs' facts, or why the inputs do not fit.
pub(crate) fn infer(op: &Op, inputs: &[&Fact]) -> Result<Fact, String> {
    match op {
        Op::Input => Err("inputs are made by the builder, not inferred".into()),
        Op::Const(c) => {
            arity(op, inputs, 0)?;
            Ok(Fact::float(
                c.dims().iter().map(|&d| Dim::Fixed(d)).collect(),
            ))
        }
        Op::Gather => {
            arity(op, inputs, 2)?;
            let (_, c) = float2(inputs[0], "gather table")?;
            match (inputs[1].kind, inputs[1].shape.as_slice()) {
                (Kind::Int, [rows]) => Ok(Fact::float(vec![*rows, Dim::Fixed(c)])),
                _ => Err(format!(
                    "gather ids: expected int [rows], found {:?}",
                    inputs[1]
                )),
            }
        }
        Op::MatMulT => {
            if inputs.len() != 3 {
                arity(op, inputs, 2)?;
            }
            let (rows, k) = float2(inputs[0], "matmul_t x")?;
            let (n, k2) = float2(inputs[1], "matmul_t w")?;
            let Dim::Fixed(width) = n else {
                return Err(format!("matmul_t: w [{n}, {k2}] has no fixed row count"));
            };
            if k != k2 {
                return Err(format!("matmul_t: x [.., {k}] does not fit w [{n}, {k2}]"));
            }
            if let Some(bias) = inputs.get(2) {
                row_vector(bias, width, "matmul_t bias")?;
            }
            Ok(Fact::float(vec![rows, n]))
        }
        Op::Add => {
            arity(op, inputs, 2)?;
            let (a, b) = (inputs[0], inputs[1]);
            if a.kind != Kind::Float || b.kind != Kind::Float {
                return Err("add: expected float operands".into());
            }
            let fits = b.shape == a.shape
                || b.shape.as_slice() == [*a.shape.last().unwrap_or(&Dim::Fixed(0))];
            if fits {
                Ok(a.clone())
            } else {
                Err(format!(
                    "add: {:?} does not broadcast onto {:?}",
                    b.shape, a.shape
                ))
            }
        }
        Op::Mul => {
            arity(op, inputs, 2)?;
            let (a, b) = (inputs[0], inputs[1]);
            if a.kind != Kind::Float || b.kind != Kind::Float {
                return Err("mul: expected float operands".into());
            }
            let fits = b.shape.is_empty()
                || b.shape == a.shape
                || b.shape.as_slice() == [*a.shape.last().unwrap_or(&Dim::Fixed(0))];
            if fits {
                Ok(a.clone())
            } else {
                Err(format!(
                    "mul: {:?} does not broadcast onto {:?}",
                    b.shape, a.shape
                ))
            }
        }
        Op::Abs | Op::Silu => {
            arity(op, inputs, 1)?;
            Ok(inputs[0].clone())
        }
        Op::Norm { group } => {
            arity(op, inputs, 1)?;
            let n = inputs[0].last().ok_or("norm: last axis must be fixed")?;
            if *group == 0 || n % group != 0 {
                return Err(format!("norm: group {group} does not divide {n}"));
            }
            Ok(inputs[0].clone())
        }
        Op::PosStep { head_dim } | Op::PosDiag { head_dim } | Op::Rotary { head_dim } => {
            arity(op, inputs, 2)?;
            let (rows, n) = float2(inputs[0], op.mnemonic())?;
            heads_fit(n, *head_dim)?;
            positions(inputs[1], rows)?;
            Ok(inputs[0].clone())
        }
        Op::Attention { heads, .. } => {
            arity(op, inputs, 3)?;
            let q = float2(inputs[0], "attention q")?;
            let k = float2(inputs[1], "attention k")?;
            let v = float2(inputs[2], "attention v")?;
            if q != k || k != v || *heads == 0 || q.1 % heads != 0 {
                return Err(format!(
                    "attention: q {q:?}, k {k:?}, v {v:?} do not fit {heads} heads"
                ));
            }
            Ok(inputs[0].clone())
        }
        Op::Lerp | Op::LerpNorm => {
            arity(op, inputs, 3)?;
            let (rows, n) = float2(inputs[0], "lerp a")?;
            if float2(inputs[1], "lerp b")? != (rows, n) {
                return Err(format!(
                    "{}: operands differ: {:?} vs {:?}",
                    op.mnemonic(),
                    inputs[0],
                    inputs[1]
                ));
            }
            row_vector(inputs[2], n, "lerp lr")?;
            Ok(inputs[0].clone())
        }
        Op::Slice { start, len } => {
            arity(op, inputs, 1)?;
            let (rows, n) = float2(inputs[0], "slice")?;
            if *len == 0 || start + len > n {
                return Err(format!("slice {start}..{} outside width {n}", start + len));
            }
            Ok(Fact::float(vec![rows, Dim::Fixed(*len)]))
        }
        Op::PosNorm { head_dim } => {
            arity(op, inputs, 3)?;
            let (rows, n) = float2(inputs[0], "pos_norm")?;
            heads_fit(n, *head_dim)?;
            positions(inputs[1], rows)?;
            row_vector(inputs[2], n, "pos_norm scale")?;
            Ok(inputs[0].clone())
        }
        Op::SwiGlu => {
            arity(op, inputs, 1)?;
            let (rows, n) = float2(inputs[0], "swiglu")?;
            if n % 2 != 0 {
                return Err(format!("swiglu: odd width {n}"));
            }
            Ok(Fact::float(vec![rows, Dim::Fixed(n / 2)]))
        }
        Op::LastRow => {
            arity(op, inputs, 1)?;
            let (_, n) = float2(inputs[0], "last_row")?;
            Ok(Fact::float(vec![Dim::Fixed(1), Dim::Fixed(n)]))
        }
    }
}

impl Graph {
    /// Checks the invariants: inputs come before their users (topological order), every
    /// stored fact equals the re-inferred one, outputs exist, and no node is dead (every
    /// non-input node feeds an output).
    pub fn verify(&self) -> Result<(), String> {
        let n = self.nodes.len();
        let mut live = vec![false; n];
        for &o in &self.outputs {
            if o >= n {
                return Err(format!("output {o} does not exist"));
            }
            live[o] = true;
        }
        for (id, node) in self.nodes.iter().enumerate() {
            if let Some(&bad) = node.inputs.iter().find(|&&i| i >= id) {
                return Err(format!(
                    "node {id} `{}` uses node {bad}, which does not come before it",
                    node.name
                ));
            }
            if matches!(node.op, Op::Input) {
                continue;
            }
            let facts: Vec<&Fact> = node.inputs.iter().map(|&i| &self.nodes[i].fact).collect();
            let fact =
                infer(&node.op, &facts).map_err(|e| format!("node {id} `{}`: {e}", node.name))?;
            if fact != node.fact {
                return Err(format!(
                    "node {id} `{}`: stored fact {:?} but inputs give {fact:?}",
                    node.name, node.fact
                ));
            }
        }
        for id in (0..n).rev() {
            if live[id] {
                for &i in &self.nodes[id].inputs {
                    live[i] = true;
                }
            }
        }
        if let Some(dead) = (0..n).find(|&i| !live[i] && !matches!(self.nodes[i].op, Op::Input)) {
            return Err(format!("node {dead} `{}` is dead", self.nodes[dead].name));
        }
        Ok(())
    }
}
