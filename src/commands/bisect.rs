//! `ngpt bisect`: run two engines with tracing and name the first layer and op where they
//! part.

use std::path::PathBuf;

use anyhow::{bail, Result};
use ngpt_compiler::reference::Precision;

use crate::engines::{Engine, Model, TracePoint};

/// Trace two engines on one prompt and name the first layer and op whose output diverges
/// beyond tolerance, with the error at every traced point before it.
#[derive(clap::Args)]
#[command(
    after_help = "Traced points: the reference's hidden state after each attention and MLP update \
and the branch outputs (h.L.attn.attention, h.L.attn.out, h.L.attn.residual.norm, h.L.mlp.gated, \
h.L.mlp.out, h.L.mlp.residual.norm, lm_head); every node of the IR; every step of the plan. \
Points both engines have are compared by relative error ||a - b||_F / ||b||_F. tract gives \
only the logits.\n\nExample:\n  ngpt bisect out/nv-tiny --tokens 45,64,77 --engines reference,plan-cpu\n  \
ngpt bisect out/nv-tiny --tokens 45,64,77 --engines ir,plan-cpu --tol 1e-6"
)]
pub struct Args {
    /// A compiled directory or a checkpoint.
    input: PathBuf,
    /// Comma-separated token ids.
    #[arg(long, allow_hyphen_values = true)]
    tokens: String,
    /// The two engines, `A,B`; B is the baseline errors are relative to.
    #[arg(long, default_value = "plan-cpu,reference")]
    engines: String,
    /// Relative error at which a point counts as diverged (default: 1e-5 when both compute
    /// in f32 or f64, 2e-2 when either has reduced-precision weights).
    #[arg(long, allow_hyphen_values = true)]
    tol: Option<f64>,
    /// Precision of reference and ir.
    #[arg(long, value_enum, default_value = "f64")]
    precision: super::logits::PrecisionArg,
}

/// One compared point.
pub struct Compared {
    pub name: String,
    pub rel_err: f64,
    pub max_abs: f64,
}

/// The points `a` and `b` share (same name and size), in `a`'s order, compared.
pub fn compare_traces(a: &[TracePoint], b: &[TracePoint]) -> Vec<Compared> {
    let mut out = vec![];
    for p in a {
        if out.iter().any(|c: &Compared| c.name == p.name) {
            continue;
        }
        let Some(q) = b
            .iter()
            .find(|q| q.name == p.name && q.values.len() == p.values.len())
        else {
            continue;
        };
        let (mut num, mut den, mut max_abs) = (0.0f64, 0.0f64, 0.0f64);
        for (x, y) in p.values.iter().zip(&q.values) {
            num += (x - y) * (x - y);
            den += y * y;
            max_abs = max_abs.max((x - y).abs());
        }
        let nan = p.values.iter().chain(&q.values).any(|v| v.is_nan());
        out.push(Compared {
            name: p.name.clone(),
            rel_err: if nan {
                f64::NAN
            } else if den == 0.0 {
                if num == 0.0 {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else {
                (num / den).sqrt()
            },
            max_abs: if nan { f64::NAN } else { max_abs },
        });
    }
    out
}

/// `h.3.mlp.out` -> ("3", "mlp.out"); other names have no layer.
pub fn layer_and_op(name: &str) -> (String, String) {
    if let Some(rest) = name.strip_prefix("h.") {
        if let Some((layer, op)) = rest.split_once('.') {
            if layer.parse::<usize>().is_ok() {
                return (layer.to_string(), op.to_string());
            }
        }
    }
    ("-".into(), name.to_string())
}

pub fn run(a: Args) -> Result<()> {
    let engines = Engine::parse_list(&a.engines, "--engines")?;
    let [ea, eb] = engines[..] else {
        bail!(
            "--engines {}: expected two engines, A,B (e.g. plan-cpu,reference)",
            a.engines
        );
    };
    let mut model = Model::open(&a.input);
    let vocab = model.vocab_size()?;
    let tokens = crate::tokens::parse_tokens(&a.tokens, vocab)?;
    let precision: Precision = a.precision.into();
    let (na, nb) = (
        model.numerics(ea, precision)?,
        model.numerics(eb, precision)?,
    );
    let tol = match a.tol {
        Some(t) if t.is_finite() && t > 0.0 => t,
        Some(t) => bail!("--tol {t}: expected a positive number"),
        None => na.tolerance().0.max(nb.tolerance().0).max(1e-5),
    };
    let ta = model.trace(ea, &tokens, precision)?;
    let tb = model.trace(eb, &tokens, precision)?;
    let compared = compare_traces(&ta, &tb);
    if compared.is_empty() {
        bail!(
            "{} and {} share no traced point (same name and size)",
            ea.name(),
            eb.name()
        );
    }
    println!(
        "bisect {} ({}) against {} ({}), {} tokens: {} shared points of {} and {}, tolerance {tol:e}",
        ea.name(),
        na.label(),
        eb.name(),
        nb.label(),
        tokens.len(),
        compared.len(),
        ta.len(),
        tb.len()
    );
    println!(
        "  {:<5} {:<22} {:>11} {:>11}",
        "layer", "op", "rel. error", "max |diff|"
    );
    let first_bad = compared
        .iter()
        .position(|c| c.rel_err.is_nan() || c.rel_err > tol);
    for (i, c) in compared.iter().enumerate() {
        let (layer, op) = layer_and_op(&c.name);
        let mark = match first_bad {
            Some(b) if b == i => "  <- first divergence",
            _ => "",
        };
        println!(
            "  {layer:<5} {op:<22} {:>11.2e} {:>11.2e}{mark}",
            c.rel_err, c.max_abs
        );
        if first_bad == Some(i) {
            break;
        }
    }
    match first_bad {
        None => {
            println!("no divergence: every shared point within {tol:e}");
            Ok(())
        }
        Some(b) => {
            let c = &compared[b];
            let (layer, op) = layer_and_op(&c.name);
            bail!(
                "bisect: {} and {} diverge first at layer {layer}, op {op} (`{}`): relative error {:.2e} > {tol:e}",
                ea.name(),
                eb.name(),
                c.name,
                c.rel_err
            )
        }
    }
}
