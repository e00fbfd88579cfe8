//! `ngpt plan show`: a plan, step by step, for review: kernel or GEMM, grid and block,
//! buffers, bytes moved and FLOPs, with totals.

use std::fmt::Write as _;

use ngpt_schemas::plan::{self as pb, arg, operand, step};

use crate::plan::{eval, LoadedPlan};

/// The request a listing is sized for.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Sequences run together (B).
    pub batch: usize,
    /// Prompt tokens per sequence (prefill).
    pub tokens: usize,
    /// Tokens already in the cache when a decode step runs.
    pub context: usize,
}

fn si(v: f64) -> String {
    let (d, s) = if v >= 1e9 {
        (1e9, "G")
    } else if v >= 1e6 {
        (1e6, "M")
    } else if v >= 1e3 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    format!("{:.2}{s}", v / d)
}

/// (bytes moved, FLOPs) of one step for `rows` rows; `keys` = mean keys a query reads.
fn cost(p: &LoadedPlan, s: &pb::Step, rows: usize, batch: usize, keys: f64) -> (f64, f64) {
    let d = &p.dims;
    let (r, c, i) = (rows as f64, d.n_embd as f64, d.n_inner as f64);
    match s.kind.as_ref() {
        Some(step::Kind::Gemm(g)) => {
            let m = eval(g.m.as_ref(), rows, batch).unwrap_or(0) as f64;
            let n = eval(g.n.as_ref(), rows, batch).unwrap_or(0) as f64;
            let k = eval(g.k.as_ref(), rows, batch).unwrap_or(0) as f64;
            let wbytes = match g.a.as_ref().and_then(|o| o.source.as_ref()) {
                Some(operand::Source::Weight(w)) => {
                    p.plan.weights.get(*w as usize).map_or(0.0, |w| {
                        // A quantized weight is read with its block scales.
                        let scales = w
                            .quant
                            .as_ref()
                            .and_then(|q| p.plan.weights.get(q.scales as usize))
                            .map_or(0, |s| s.bytes);
                        (w.bytes + scales) as f64
                    })
                }
                _ => m * k * 4.0,
            };
            (wbytes + k * n * 4.0 + m * n * 4.0, 2.0 * m * n * k)
        }
        Some(step::Kind::Launch(l)) => match l.entry.as_str() {
            "embed" => (r * c * 8.0, 0.0),
            "norm_rows" => (r * c * 8.0, r * c * 3.0),
            "lerp_norm" => (r * c * 12.0, r * c * 9.0),
            "swiglu" => (r * c * 48.0, r * c * 4.0 * 5.0),
            "pos_norm" => (r * c * 24.0, r * c * 12.0),
            "embed_pos" => (r * c * 12.0, r * c),
            "lerp_norm_bias" => (r * c * 12.0 + c * 4.0, r * c * 10.0),
            "swiglu_bias" => (r * i * 12.0 + i * 8.0, r * i * 7.0),
            "rotary_norm" => (r * c * 24.0 + c * 16.0, r * c * 16.0),
            "attention_prefill" | "attention_decode" => {
                (r * c * 8.0 + keys * r * c * 8.0, keys * r * c * 4.0)
            }
            _ => (0.0, 0.0),
        },
        None => (0.0, 0.0),
    }
}

/// Total (bytes moved, FLOPs) of one program for `shape`: prefill for `shape.tokens`
/// tokens per sequence, or one decode step against `shape.context` cached tokens.
///
/// ```no_run
/// use ngpt_runtime::listing::{program_cost, Shape};
/// use ngpt_runtime::plan::LoadedPlan;
/// let plan = LoadedPlan::load("out/nv-tiny".as_ref())?;
/// let shape = Shape { batch: 1, tokens: 64, context: 64 };
/// let (_, decode_flops) = program_cost(&plan, true, shape); // one step, 64 cached tokens
/// let (_, prefill_flops) = program_cost(&plan, false, shape); // a 64-token prompt
/// assert!(prefill_flops > 32.0 * decode_flops); // 64 rows through the GEMMs, not 1
/// # Ok::<(), ngpt_runtime::Error>(())
/// ```
pub fn program_cost(p: &LoadedPlan, decode: bool, shape: Shape) -> (f64, f64) {
    let (program, rows, keys) = if decode {
        (
            p.plan.decode.as_ref(),
            shape.batch,
            shape.context as f64 + 1.0,
        )
    } else {
        (
            p.plan.prefill.as_ref(),
            shape.batch * shape.tokens,
            (shape.tokens as f64 + 1.0) / 2.0,
        )
    };
    program.map_or((0.0, 0.0), |prog| {
        prog.steps.iter().fold((0.0, 0.0), |(b, f), s| {
            let (sb, sf) = cost(p, s, rows, shape.batch, keys);
            (b + sb, f + sf)
        })
    })
}

/// FLOPs of a prefill that keeps only each sequence's last logits row
/// ([`crate::session::Session::prefill_last`], what generation runs): the prefill program's
/// FLOPs with its last step (the lm_head) costed for `shape.batch` rows instead of all.
pub fn prefill_last_flops(p: &LoadedPlan, shape: Shape) -> f64 {
    let (_, all) = program_cost(p, false, shape);
    let rows = shape.batch * shape.tokens;
    let keys = (shape.tokens as f64 + 1.0) / 2.0;
    match p.plan.prefill.as_ref().and_then(|prog| prog.steps.last()) {
        Some(last) => {
            all - cost(p, last, rows, shape.batch, keys).1
                + cost(p, last, shape.batch, shape.batch, keys).1
        }
        None => all,
    }
}

/// For a plan with quantized weights, one line: each format with its block size (and its
/// activations' where they are quantized too), how many matrices, and their bytes
/// (integers and f16 scales).
fn quant_line(p: &LoadedPlan, out: &mut String) {
    use std::collections::BTreeMap;
    let mut by: BTreeMap<(&str, usize, usize), (usize, u64, u64)> = BTreeMap::new();
    for (w, data) in p.plan.weights.iter().zip(&p.weights) {
        if let crate::plan::WeightData::Quant(q) = data {
            let scales = w
                .quant
                .as_ref()
                .and_then(|m| p.plan.weights.get(m.scales as usize))
                .map_or(0, |s| s.bytes);
            let e = by
                .entry((q.bits.as_str(), q.block, q.act_block))
                .or_default();
            *e = (e.0 + 1, e.1 + w.bytes, e.2 + scales);
        }
    }
    if by.is_empty() {
        return;
    }
    let parts: Vec<String> = by
        .iter()
        .map(|((bits, block, act), (n, ints, scales))| {
            format!(
                "{bits} in blocks of {block}{} ({n} matrices, {} of integers + {} of f16 scales)",
                if *act != 0 {
                    format!(", int8 activations in blocks of {act}")
                } else {
                    String::new()
                },
                si(*ints as f64) + "B",
                si(*scales as f64) + "B"
            )
        })
        .collect();
    let _ = writeln!(out, "quantized weights: {}", parts.join("; "));
}

/// The listing of both programs for `shape`.
///
/// ```no_run
/// use ngpt_runtime::listing::{listing, Shape};
/// use ngpt_runtime::plan::LoadedPlan;
/// let plan = LoadedPlan::load("out/nv-tiny".as_ref())?;
/// let text = listing(&plan, Shape { batch: 1, tokens: 64, context: 64 });
/// assert!(text.starts_with("plan format"));
/// assert!(text.contains("total:"));
/// # Ok::<(), ngpt_runtime::Error>(())
/// ```
pub fn listing(p: &LoadedPlan, shape: Shape) -> String {
    let d = &p.dims;
    let mut out = String::new();
    let wdt = pb::DType::try_from(p.plan.weight_dtype)
        .map(|t| t.as_str_name())
        .unwrap_or("?");
    let _ = writeln!(
        out,
        "plan format {}.{} by {}: {} layers, {} heads x {}, n_embd {}, vocab {}, weights {} ({} in model.weights), KV capacity {}",
        p.plan.format_major,
        p.plan.format_minor,
        crate::contract::printable(&p.plan.producer),
        d.n_layer,
        d.n_head,
        d.head_dim,
        d.n_embd,
        d.vocab,
        wdt,
        si(p.plan.weights_file_bytes as f64) + "B",
        d.max_seq_len
    );
    quant_line(p, &mut out);
    let _ = writeln!(
        out,
        "kernels: the runtime's `{}` module, kernel ABI {}, KV tile {} (a plan carries no code)",
        crate::contract::MODULE,
        crate::contract::KERNEL_ABI,
        p.module_dims.kv_tile
    );
    let names = |args: &[pb::Arg]| -> String {
        args.iter()
            .filter_map(|a| match a.value.as_ref()? {
                arg::Value::Buffer(b) => p.plan.buffers.get(*b as usize).map(|b| b.name.clone()),
                arg::Value::Weight(w) => p
                    .plan
                    .weights
                    .get(*w as usize)
                    .map(|w| format!("w:{}", w.name)),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let programs = [
        (
            p.plan.prefill.as_ref(),
            shape.batch * shape.tokens,
            (shape.tokens as f64 + 1.0) / 2.0,
            format!("batch {} x {} tokens", shape.batch, shape.tokens),
        ),
        (
            p.plan.decode.as_ref(),
            shape.batch,
            shape.context as f64 + 1.0,
            format!("batch {}, {} tokens in cache", shape.batch, shape.context),
        ),
    ];
    for (program, rows, keys, what) in programs {
        let Some(program) = program else { continue };
        let _ = writeln!(out, "\nprogram {} ({what}; rows R = {rows}):", program.name);
        let (mut tb, mut tf) = (0.0, 0.0);
        for (i, s) in program.steps.iter().enumerate() {
            let (bytes, flops) = cost(p, s, rows, shape.batch, keys);
            tb += bytes;
            tf += flops;
            let what = match s.kind.as_ref() {
                Some(step::Kind::Launch(l)) => {
                    let g = l.grid.as_ref();
                    let gx = eval(g.and_then(|g| g.x.as_ref()), rows, shape.batch).unwrap_or(0);
                    let gy = eval(g.and_then(|g| g.y.as_ref()), rows, shape.batch).unwrap_or(0);
                    let bx = eval(
                        l.block.as_ref().and_then(|b| b.x.as_ref()),
                        rows,
                        shape.batch,
                    )
                    .unwrap_or(0);
                    format!(
                        "{:<17} grid {gx}x{gy} block {bx} smem {:<5} {}",
                        l.entry,
                        l.shared_bytes,
                        names(&l.args)
                    )
                }
                Some(step::Kind::Gemm(g)) => {
                    let ev = |a: Option<&pb::Affine>| eval(a, rows, shape.batch).unwrap_or(0);
                    let op = |o: Option<&pb::Operand>| match o.and_then(|o| o.source.as_ref()) {
                        Some(operand::Source::Buffer(b)) => p
                            .plan
                            .buffers
                            .get(*b as usize)
                            .map_or("?".into(), |b| b.name.clone()),
                        Some(operand::Source::Weight(w)) => p
                            .plan
                            .weights
                            .get(*w as usize)
                            .map_or("?".into(), |w| format!("w:{}", w.name)),
                        None => "?".into(),
                    };
                    format!(
                        "{:<17} m {} n {} k {} op(a)={} {} x {} -> {}",
                        "gemm",
                        ev(g.m.as_ref()),
                        ev(g.n.as_ref()),
                        ev(g.k.as_ref()),
                        if g.trans_a { "T" } else { "N" },
                        op(g.a.as_ref()),
                        op(g.b.as_ref()),
                        op(g.c.as_ref())
                    )
                }
                None => "empty".into(),
            };
            let _ = writeln!(
                out,
                "  {i:>3} {:<34} {what:<96} {:>9}B {:>9}FLOP",
                s.name,
                si(bytes),
                si(flops)
            );
        }
        let _ = writeln!(
            out,
            "  total: {} steps, {}B moved, {}FLOP",
            program.steps.len(),
            si(tb),
            si(tf)
        );
    }
    out
}
