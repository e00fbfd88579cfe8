//! The IR interpreter: evaluates any graph, literal or folded, on the CPU in f32 or f64.
//!
//! Fused ops are evaluated as the composition of the ops they replace, so a fusion that
//! fired correctly changes results only by the rounding its pass documents.

use candle_core::{DType, Device, Tensor, D};

use super::{Graph, Op};
use crate::error::{CandleContext, Error, Result};
pub use crate::numerics::ValueTrace;
use crate::numerics::{position_table, rotary_table, Precision};

type CResult<T> = candle_core::Result<T>;

fn norm_groups(x: &Tensor, group: usize) -> CResult<Tensor> {
    let dims = x.dims().to_vec();
    let n = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let g = x.reshape((rows, n / group, group))?;
    let g = g.broadcast_div(&g.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?;
    g.reshape(dims)
}

fn silu(z: &Tensor) -> CResult<Tensor> {
    z / (z.neg()?.exp()? + 1.0)?
}

/// Rows of the position table E for `positions`, `[T, head_dim]` in `dt`.
fn table_rows(positions: &[u32], head_dim: usize, dt: DType) -> CResult<Tensor> {
    let max = positions.iter().copied().max().unwrap_or(0) as usize + 1;
    let table = Tensor::from_vec(position_table(max, head_dim), (max, head_dim), &Device::Cpu)?
        .to_dtype(dt)?;
    table.index_select(&Tensor::new(positions, &Device::Cpu)?, 0)
}

/// `x` `[T, n]` viewed as pairs per head; returns (even, odd, sin, cos) as `[T, H, P, 1]`.
fn pos_parts(
    x: &Tensor,
    table: &Tensor,
    head_dim: usize,
) -> CResult<(Tensor, Tensor, Tensor, Tensor)> {
    let (t, n) = x.dims2()?;
    let (h, p) = (n / head_dim, head_dim / 2);
    let pairs = x.reshape((t, h, p, 2))?;
    let sin = table.narrow(1, 0, p)?.reshape((t, 1, p, 1))?;
    let cos = table.narrow(1, p, p)?.reshape((t, 1, p, 1))?;
    Ok((pairs.narrow(3, 0, 1)?, pairs.narrow(3, 1, 1)?, sin, cos))
}

/// Rotary rows for `positions`, `[T, head_dim]` in `dt` (cos then sin, see
/// [`rotary_table`]).
fn rotary_rows(positions: &[u32], head_dim: usize, dt: DType) -> CResult<Tensor> {
    let rows = rotary_table(positions.iter().map(|&p| p as usize), head_dim);
    Tensor::from_vec(rows, (positions.len(), head_dim), &Device::Cpu)?.to_dtype(dt)
}

/// The rotation of interleaved pairs: `(a, b) -> (a cos - b sin, b cos + a sin)`.
fn rotary(x: &Tensor, table: &Tensor, head_dim: usize) -> CResult<Tensor> {
    // pos_parts reads the table's first half as its `sin` and second as its `cos`; the
    // rotary table holds cos first, then sin.
    let (a, b, cos, sin) = pos_parts(x, table, head_dim)?;
    let out_a = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
    let out_b = (b.broadcast_mul(&cos)? + a.broadcast_mul(&sin)?)?;
    Tensor::cat(&[out_a, out_b], 3)?.reshape(x.dims())
}

fn pos_step(x: &Tensor, table: &Tensor, head_dim: usize) -> CResult<Tensor> {
    let (even, odd, sin, cos) = pos_parts(x, table, head_dim)?;
    let out = Tensor::cat(
        &[odd.broadcast_mul(&cos)?.neg()?, even.broadcast_mul(&sin)?],
        3,
    )?;
    out.reshape(x.dims())
}

fn pos_diag(x: &Tensor, table: &Tensor, head_dim: usize) -> CResult<Tensor> {
    let (even, odd, sin, cos) = pos_parts(x, table, head_dim)?;
    let out = Tensor::cat(&[even.broadcast_mul(&sin)?, odd.broadcast_mul(&cos)?], 3)?;
    out.reshape(x.dims())
}

fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    dt: DType,
) -> CResult<Tensor> {
    let (t, n) = q.dims2()?;
    let d = n / heads;
    let split = |x: &Tensor| x.reshape((t, heads, d))?.transpose(0, 1)?.contiguous();
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let mask: Vec<f64> = (0..t * t)
        .map(|i| {
            if i % t <= i / t {
                0.0
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (1, t, t), &Device::Cpu)?.to_dtype(dt)?;
    let scale = Tensor::new(scale, &Device::Cpu)?.to_dtype(dt)?;
    let scores = q
        .matmul(&k.t()?.contiguous()?)?
        .broadcast_mul(&scale)?
        .broadcast_add(&mask)?;
    let e = scores
        .broadcast_sub(&scores.max_keepdim(D::Minus1)?)?
        .exp()?;
    let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    probs.matmul(&v)?.transpose(0, 1)?.reshape((t, n))
}

fn lerp(a: &Tensor, b: &Tensor, lr: &Tensor) -> CResult<Tensor> {
    a + (b - a)?.broadcast_mul(lr)?
}

/// Evaluates `g` on one sequence: `tokens` at absolute `positions`. Returns the outputs.
///
/// ```no_run
/// use ngpt_compiler::{graph, import, reference::Precision};
/// let ckpt = import::load("tests/fixtures/nv-tiny".as_ref())?;
/// let g = graph::literal(&ckpt)?;
/// let out = graph::interp::run(&g, &[45, 64, 77], &[0, 1, 2], Precision::F64)?;
/// assert_eq!(out[0].dims(), &[3, ckpt.config.vocab_size]);
/// # Ok::<(), ngpt_compiler::Error>(())
/// ```
pub fn run(
    g: &Graph,
    tokens: &[u32],
    positions: &[u32],
    precision: Precision,
) -> Result<Vec<Tensor>> {
    evaluate(g, tokens, positions, precision, None)
}

/// As [`run`], calling `on_value(name, value)` with the value of every computed node (not
/// inputs or constants) as it is made: the trace `ngpt bisect` compares.
pub fn run_traced(
    g: &Graph,
    tokens: &[u32],
    positions: &[u32],
    precision: Precision,
    on_value: &mut dyn FnMut(&str, &Tensor),
) -> Result<Vec<Tensor>> {
    evaluate(g, tokens, positions, precision, Some(on_value))
}

fn evaluate(
    g: &Graph,
    tokens: &[u32],
    positions: &[u32],
    precision: Precision,
    mut on_value: Option<ValueTrace<'_>>,
) -> Result<Vec<Tensor>> {
    if tokens.is_empty() || tokens.len() != positions.len() {
        return Err(Error::Argument {
            what: "tokens".into(),
            problem: format!(
                "expected as many positions as tokens (at least one), found {} and {}",
                tokens.len(),
                positions.len()
            ),
        });
    }
    let dt = match precision {
        Precision::F32 => DType::F32,
        Precision::F64 => DType::F64,
    };
    let mut values: Vec<Option<Tensor>> = vec![None; g.nodes.len()];
    let mut tables: Vec<(usize, Tensor)> = vec![];
    for (id, node) in g.nodes.iter().enumerate() {
        let args = node
            .inputs
            .iter()
            .map(|&i| values[i].clone())
            .collect::<Option<Vec<Tensor>>>()
            .ok_or_else(|| Error::Argument {
                what: format!("IR node `{}`", node.name),
                problem: "input not computed (graph not in topological order)".into(),
            })?;
        let table = match node.op {
            Op::PosStep { head_dim } | Op::PosDiag { head_dim } | Op::PosNorm { head_dim } => {
                match tables.iter().find(|(d, _)| *d == head_dim) {
                    Some((_, t)) => Some(t.clone()),
                    None => {
                        let t = table_rows(positions, head_dim, dt).ctx("position table")?;
                        tables.push((head_dim, t.clone()));
                        Some(t)
                    }
                }
            }
            Op::Rotary { head_dim } => {
                Some(rotary_rows(positions, head_dim, dt).ctx("rotary table")?)
            }
            _ => None,
        };
        let out = match &node.op {
            Op::Input if node.name == "tokens" => Tensor::new(tokens, &Device::Cpu),
            Op::Input => Tensor::new(positions, &Device::Cpu),
            op => eval(op, &args, table.as_ref(), dt),
        };
        let out = out.ctx(&format!("IR node `{}` ({})", node.name, node.op.mnemonic()))?;
        if let Some(f) = on_value.as_mut() {
            if !matches!(node.op, Op::Input | Op::Const(_)) {
                f(&node.name, &out);
            }
        }
        values[id] = Some(out);
    }
    g.outputs
        .iter()
        .map(|&o| {
            values[o].clone().ok_or_else(|| Error::Argument {
                what: "IR outputs".into(),
                problem: "output not computed".into(),
            })
        })
        .collect()
}

/// One op on its input tensors; `table` holds the position rows for the position ops.
fn eval(op: &Op, a: &[Tensor], table: Option<&Tensor>, dt: DType) -> CResult<Tensor> {
    let table = || table.ok_or_else(|| candle_core::Error::Msg("position table missing".into()));
    match op {
        Op::Input => candle_core::bail!("inputs are bound by the caller"),
        Op::Const(c) => c.value()?.to_dtype(dt),
        Op::Gather => a[0].index_select(&a[1], 0),
        Op::MatMulT => match a.get(2) {
            Some(bias) => a[0].matmul(&a[1].t()?)?.broadcast_add(bias),
            None => a[0].matmul(&a[1].t()?),
        },
        Op::Add => a[0].broadcast_add(&a[1]),
        Op::Rotary { head_dim } => rotary(&a[0], table()?, *head_dim),
        Op::Mul => a[0].broadcast_mul(&a[1]),
        Op::Abs => a[0].abs(),
        Op::Norm { group } => norm_groups(&a[0], *group),
        Op::PosStep { head_dim } => pos_step(&a[0], table()?, *head_dim),
        Op::PosDiag { head_dim } => pos_diag(&a[0], table()?, *head_dim),
        Op::Attention { heads, scale } => attention(&a[0], &a[1], &a[2], *heads, *scale, dt),
        Op::Lerp => lerp(&a[0], &a[1], &a[2]),
        Op::Slice { start, len } => a[0].narrow(1, *start, *len),
        Op::Silu => silu(&a[0]),
        Op::LerpNorm => {
            let n = a[0].dims()[1];
            let b = norm_groups(&a[1], n)?;
            norm_groups(&lerp(&a[0], &b, &a[2])?, n)
        }
        Op::PosNorm { head_dim } => {
            let x = pos_diag(&a[0], table()?, *head_dim)?;
            norm_groups(&x, *head_dim)?.broadcast_mul(&a[2])
        }
        Op::SwiGlu => {
            let half = a[0].dims()[1] / 2;
            a[0].narrow(1, 0, half)? * silu(&a[0].narrow(1, half, half)?)?
        }
        Op::LastRow => a[0].narrow(0, a[0].dims()[0] - 1, 1),
    }
}
