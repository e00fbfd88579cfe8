//! Passes: fold the scaling factors into constants, then fuse the normalize ops.
//!
//! Each pass lives in its own file as one rule, `fn rule(g: &Graph, id: NodeId) ->
//! Result<Outcome>`, tried on every node. A rule never edits the graph: it returns a
//! [`Patch`] (new nodes, and which old values they replace) and the [`run`] manager applies
//! it, compacts the graph, verifies it (in tests and debug builds) and tries again until no
//! rule fires. The rule-author contract is in `README.md` beside this file.

mod drop_norm;
mod fold_scaling;
mod fold_suv;
mod fold_sz;
mod fuse_qkv;
mod last_position;
mod lerp_norm;
mod pos_norm;
mod pos_table;
pub mod quantize;
mod sqk_onto_q;
mod swiglu;

use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::graph::{Const, Graph, NodeId, Op};

/// What a rule says about one node.
pub enum Outcome {
    /// The pattern is not here.
    NoMatch,
    /// The pattern is here but a precondition fails; the graph stays as it is.
    Skip(String),
    /// Rewrite.
    Rewrite(Patch),
}

/// Returns [`Outcome::NoMatch`] unless the condition holds.
macro_rules! rule_if {
    ($cond:expr) => {
        if !$cond {
            return Ok($crate::passes::Outcome::NoMatch);
        }
    };
}

/// Binds the pattern or returns [`Outcome::NoMatch`].
macro_rules! rule_if_let {
    ($pat:pat = $e:expr) => {
        let $pat = $e else {
            return Ok($crate::passes::Outcome::NoMatch);
        };
    };
}
pub(crate) use {rule_if, rule_if_let};

/// New nodes and the old values they replace. New nodes get the ids that follow the
/// graph's last node, in the order they are added, so they can refer to each other.
pub struct Patch {
    base: usize,
    nodes: Vec<(String, Op, Vec<NodeId>)>,
    replace: Vec<(NodeId, NodeId)>,
    outputs: Vec<(NodeId, NodeId)>,
    notes: Vec<String>,
}

impl Patch {
    /// An empty patch for `g`: its nodes will take the ids after `g`'s last node.
    pub fn new(g: &Graph) -> Patch {
        Patch {
            base: g.nodes.len(),
            nodes: vec![],
            replace: vec![],
            outputs: vec![],
            notes: vec![],
        }
    }

    /// A line for the pass record about what this rewrite did not do and why (for
    /// `passes.txt`), as `Skip` says it for a rewrite not made.
    pub fn note(&mut self, line: String) {
        self.notes.push(line);
    }

    /// Adds a node; returns the id it will have.
    pub fn node(&mut self, name: impl Into<String>, op: Op, inputs: Vec<NodeId>) -> NodeId {
        self.nodes.push((name.into(), op, inputs));
        self.base + self.nodes.len() - 1
    }

    /// Adds a constant node.
    pub fn constant(&mut self, name: impl Into<String>, tensor: Tensor) -> NodeId {
        self.node(name, Op::Const(Const::new(tensor)), vec![])
    }

    /// Adds a constant node holding `c` as it is (lazy row scale included).
    pub fn constant_of(&mut self, name: impl Into<String>, c: Const) -> NodeId {
        self.node(name, Op::Const(c), vec![])
    }

    /// Every use of `old` becomes a use of `new`.
    pub fn replace(&mut self, old: NodeId, new: NodeId) {
        self.replace.push((old, new));
    }

    /// The graph output `old` becomes `new`, whose fact may differ (the decode program
    /// changes the logits from `[T, V]` to `[1, V]`).
    pub fn replace_output(&mut self, old: NodeId, new: NodeId) {
        self.outputs.push((old, new));
    }

    fn apply(self, g: &mut Graph) -> Result<()> {
        for (name, op, inputs) in self.nodes {
            g.push(name, op, inputs)?;
        }
        for (old, new) in self.replace {
            g.replace_uses(old, new)?;
        }
        for (old, new) in self.outputs {
            g.outputs
                .iter_mut()
                .filter(|o| **o == old)
                .for_each(|o| *o = new);
        }
        g.compact();
        Ok(())
    }
}

/// A rule: looks at one node of the graph.
pub type Rule = fn(&Graph, NodeId) -> Result<Outcome>;

/// One pass: a name and its rule.
#[derive(Clone, Copy)]
pub struct Pass {
    /// The name the pass log, the manifest and [`Fault::pass`] use (`fold_scaling`).
    pub name: &'static str,
    /// The rule, tried on every node until it no longer fires.
    pub rule: Rule,
}

/// What one pass did.
#[derive(Debug, Clone)]
pub struct PassRecord {
    /// The pass's [`Pass::name`].
    pub name: &'static str,
    /// How many rewrites the pass applied before reaching its fixpoint.
    pub rewrites: usize,
    /// Why the pass left matching places alone, one line each, without repeats.
    pub skipped: Vec<String>,
    /// Notes the rewrites left (what they did not do and why), one line each, without
    /// repeats.
    pub notes: Vec<String>,
    /// Wall-clock time the pass took, verification included.
    pub time: Duration,
}

/// The passes that turn the literal graph into the canonical form, in order. Folding the
/// scaling factors comes first (pos_table must run before sqk_onto_q); fusions after.
pub const CANONICAL: [Pass; 10] = [
    Pass {
        name: "fold_scaling",
        rule: fold_scaling::rule,
    },
    Pass {
        name: "fold_sz",
        rule: fold_sz::rule,
    },
    Pass {
        name: "fold_suv",
        rule: fold_suv::rule,
    },
    Pass {
        name: "pos_table",
        rule: pos_table::rule,
    },
    Pass {
        name: "sqk_onto_q",
        rule: sqk_onto_q::rule,
    },
    Pass {
        name: "drop_norm",
        rule: drop_norm::rule,
    },
    Pass {
        name: "lerp_norm",
        rule: lerp_norm::rule,
    },
    Pass {
        name: "pos_norm",
        rule: pos_norm::rule,
    },
    Pass {
        name: "fuse_qkv",
        rule: fuse_qkv::rule,
    },
    Pass {
        name: "swiglu",
        rule: swiglu::rule,
    },
];

/// The decode program's extra pass: logits for the last position only.
pub const LAST_POSITION: Pass = Pass {
    name: "last_position",
    rule: last_position::rule,
};

/// Options of [`run`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Run only the first N passes (to bisect a miscompile).
    pub stop_after: Option<usize>,
    /// Also compute logits for the last position only (the decode program).
    pub last_position_only: bool,
    /// Verify the graph after every rewrite (always on in debug builds).
    pub verify: bool,
    /// A deliberate miscompile, for testing the tools that must catch one.
    pub fault: Option<Fault>,
    /// Quantize the matmul weights after the other passes (the `quantize` pass), as these
    /// options say; `None` keeps them in float.
    pub quantize: Option<crate::quant::Options>,
}

/// A deliberate miscompile: after pass `pass`, the first constant it made in layer `layer`
/// is multiplied by `factor`. Only for testing `ngpt check` and `ngpt bisect`, which must
/// catch and locate it.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// Name of the pass after which the fault is injected; it must be one that runs.
    pub pass: String,
    /// The layer (`h.{layer}.`) whose first new constant is corrupted.
    pub layer: usize,
    /// The factor that constant is multiplied by.
    pub factor: f64,
}

impl Fault {
    fn apply(&self, g: &mut Graph, before: &std::collections::HashSet<String>) -> Result<()> {
        use crate::error::CandleContext;
        let prefix = format!("h.{}.", self.layer);
        let in_layer =
            |name: &str| name.starts_with(&prefix) || name.contains(&format!(".{prefix}"));
        let target = g.nodes.iter().position(|n| {
            matches!(n.op, Op::Const(_)) && !before.contains(&n.name) && in_layer(&n.name)
        });
        let Some(id) = target else {
            return Err(Error::Argument {
                what: format!("fault injection after {}", self.pass),
                problem: format!("the pass made no constant in layer {}", self.layer),
            });
        };
        let Op::Const(c) = &g.nodes[id].op else {
            return Ok(());
        };
        let scaled = c.value().and_then(|t| {
            let t = t.to_dtype(candle_core::DType::F64)?;
            t.affine(self.factor, 0.0)
        });
        g.nodes[id].op = Op::Const(Const::new(scaled.ctx("fault injection")?));
        Ok(())
    }
}

/// A rule that keeps firing has no fixpoint: a bug in the rule, reported as an error.
const MAX_REWRITES: usize = 100_000;

/// The name of the quantize pass in records, the manifest and `--inject-fault`.
pub const QUANTIZE: &str = "quantize";

/// Runs one pass to its fixpoint.
pub fn run_pass(g: &mut Graph, pass: Pass, verify: bool) -> Result<PassRecord> {
    run_rule(g, pass.name, &pass.rule, verify)
}

/// Runs the quantize pass with `opts` to its fixpoint.
///
/// ```no_run
/// use ngpt_compiler::{graph, import, passes, quant};
/// let ckpt = import::load("tests/fixtures/nv-tiny".as_ref())?;
/// let mut g = graph::literal(&ckpt)?;
/// passes::run(&mut g, &passes::Options::default())?;
/// let r = passes::run_quantize(&mut g, &quant::Options::new(quant::Bits::Int4), false)?;
/// assert_eq!(r.rewrites, 4 * ckpt.config.n_layer + 1);
/// # Ok::<(), ngpt_compiler::Error>(())
/// ```
pub fn run_quantize(
    g: &mut Graph,
    opts: &crate::quant::Options,
    verify: bool,
) -> Result<PassRecord> {
    opts.check()?;
    run_rule(g, QUANTIZE, &|g, id| quantize::rule(g, id, opts), verify)
}

fn run_rule(
    g: &mut Graph,
    name: &'static str,
    rule: &dyn Fn(&Graph, NodeId) -> Result<Outcome>,
    verify: bool,
) -> Result<PassRecord> {
    let start = Instant::now();
    let mut record = PassRecord {
        name,
        rewrites: 0,
        skipped: vec![],
        notes: vec![],
        time: Duration::ZERO,
    };
    'scan: loop {
        for id in 0..g.nodes.len() {
            match rule(g, id)? {
                Outcome::NoMatch => {}
                Outcome::Skip(why) => {
                    if !record.skipped.contains(&why) {
                        record.skipped.push(why);
                    }
                }
                Outcome::Rewrite(mut patch) => {
                    for note in std::mem::take(&mut patch.notes) {
                        if !record.notes.contains(&note) {
                            record.notes.push(note);
                        }
                    }
                    patch.apply(g)?;
                    record.rewrites += 1;
                    if verify || cfg!(debug_assertions) {
                        g.verify().map_err(|e| Error::Argument {
                            what: format!("pass {} (rewrite {})", name, record.rewrites),
                            problem: format!("left an invalid graph: {e}"),
                        })?;
                    }
                    if record.rewrites > MAX_REWRITES {
                        return Err(Error::Argument {
                            what: format!("pass {}", name),
                            problem: "does not reach a fixpoint".into(),
                        });
                    }
                    continue 'scan;
                }
            }
        }
        break;
    }
    record.time = start.elapsed();
    Ok(record)
}

/// Runs the canonical passes (and the last-position pass when asked) on `g`.
///
/// ```no_run
/// use ngpt_compiler::{graph, import, passes};
/// let ckpt = import::load("tests/fixtures/nv-tiny".as_ref())?;
/// let mut g = graph::literal(&ckpt)?;
/// let records = passes::run(&mut g, &passes::Options::default())?;
/// assert_eq!(g.count("lerp_norm"), 2 * ckpt.config.n_layer);
/// # Ok::<(), ngpt_compiler::Error>(())
/// ```
pub fn run(g: &mut Graph, opts: &Options) -> Result<Vec<PassRecord>> {
    let mut passes: Vec<Pass> = CANONICAL.to_vec();
    if opts.last_position_only {
        passes.push(LAST_POSITION);
    }
    let n = opts.stop_after.unwrap_or(passes.len()).min(passes.len());
    if let Some(f) = &opts.fault {
        let quantizes = opts.quantize.is_some() && f.pass == QUANTIZE;
        if !quantizes && !passes.iter().any(|p| p.name == f.pass) {
            return Err(Error::Argument {
                what: "fault injection".into(),
                problem: format!("no pass named `{}`", f.pass),
            });
        }
    }
    let mut records = vec![];
    for &p in &passes[..n] {
        let before: std::collections::HashSet<String> = match &opts.fault {
            Some(f) if f.pass == p.name => g.nodes.iter().map(|n| n.name.clone()).collect(),
            _ => Default::default(),
        };
        records.push(run_pass(g, p, opts.verify)?);
        if let Some(f) = opts.fault.as_ref().filter(|f| f.pass == p.name) {
            f.apply(g, &before)?;
        }
    }
    if let Some(q) = &opts.quantize {
        let before: std::collections::HashSet<String> = match &opts.fault {
            Some(f) if f.pass == QUANTIZE => g.nodes.iter().map(|n| n.name.clone()).collect(),
            _ => Default::default(),
        };
        records.push(run_quantize(g, q, opts.verify)?);
        if let Some(f) = opts.fault.as_ref().filter(|f| f.pass == QUANTIZE) {
            f.apply(g, &before)?;
        }
    }
    Ok(records)
}

/// The single consumer of `id`, if it has exactly one and is not a graph output.
pub(crate) fn sole_consumer(g: &Graph, id: NodeId) -> Option<NodeId> {
    let users = g.consumers(id);
    (users.len() == 1 && !g.outputs.contains(&id)).then(|| users[0])
}

/// Folds a per-row scale into the weight of the matmul it multiplies:
/// `mul(matmul_t(x, W), v)` => `matmul_t(x, W')` with `W'[r] = v[r] * W[r]`, computed in
/// f64 when read. Shared by fold_sz and fold_suv; `weight_suffix` picks the matmul.
pub(crate) fn fold_row_scale(g: &Graph, id: NodeId, weight_suffix: &str) -> Result<Outcome> {
    use crate::error::CandleContext;
    let node = &g.nodes[id];
    rule_if!(matches!(node.op, Op::Mul));
    let (mm, v) = (node.inputs[0], node.inputs[1]);
    rule_if!(matches!(g.nodes[mm].op, Op::MatMulT));
    let (x, w) = (g.nodes[mm].inputs[0], g.nodes[mm].inputs[1]);
    rule_if!(g.nodes[w].name.ends_with(weight_suffix));
    rule_if_let!(Some(wt) = g.const_of(w));
    let Some(vt) = g.const_of(v) else {
        return Ok(Outcome::Skip(format!(
            "`{}`: the row scale is not constant (run fold_scaling first)",
            node.name
        )));
    };
    let vt = vt.value().ctx("fold_row_scale")?;
    if vt.rank() != 1 {
        return Ok(Outcome::NoMatch);
    }
    if sole_consumer(g, mm).is_none() {
        return Ok(Outcome::Skip(format!(
            "`{}` has other users; folding would change them",
            g.nodes[mm].name
        )));
    }
    // Lazy: the product is made in f64 when the constant is read (see `Const`).
    let folded = wt.scale_rows(&vt).ctx("fold_row_scale")?;
    let mut p = Patch::new(g);
    let c = p.constant_of(format!("{}.folded", g.nodes[w].name), folded);
    let mut inputs = vec![x, c];
    if let Some(&bias) = g.nodes[mm].inputs.get(2) {
        match scaled_bias(g, bias, &vt)? {
            Some(b) => inputs.push(p.constant(format!("{}.folded", g.nodes[bias].name), b)),
            None => {
                return Ok(Outcome::Skip(format!(
                    "`{}`: its bias is not constant",
                    g.nodes[mm].name
                )))
            }
        }
    }
    let out = p.node(g.nodes[mm].name.clone(), Op::MatMulT, inputs);
    p.replace(id, out);
    Ok(Outcome::Rewrite(p))
}

/// The constant bias `bias` times `scale`, in f64 (a fold that scales a matmul's outputs
/// scales its bias alike); `None` when the bias is not a constant.
pub(crate) fn scaled_bias(g: &Graph, bias: NodeId, scale: &Tensor) -> Result<Option<Tensor>> {
    use crate::error::CandleContext;
    let Some(b) = g.const_of(bias) else {
        return Ok(None);
    };
    let v = b
        .value()
        .and_then(|b| b.to_dtype(candle_core::DType::F64))
        .and_then(|b| b.mul(&scale.to_dtype(candle_core::DType::F64)?))
        .ctx("fold bias")?;
    Ok(Some(v))
}
