//! The passes, three ways: each fired, each keeps the interpreter's logits, and each holds
//! on odd shapes; plus snapshots of the IR before and after each pass.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::DType;
use ngpt_compiler::compare::compare;
use ngpt_compiler::graph::{self, interp, Graph};
use ngpt_compiler::import::{self, Checkpoint};
use ngpt_compiler::init::{self, InitOptions, Preset};
use ngpt_compiler::passes::{self, Options, CANONICAL, LAST_POSITION};
use ngpt_compiler::reference::{self, Precision};

use crate::baseline;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/nv-tiny")
}

fn flat(t: &candle_core::Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A generated model in a temporary directory (kept alive by the returned guard).
fn generated(opts: InitOptions) -> Result<(tempfile::TempDir, Checkpoint)> {
    let dir = tempfile::tempdir()?;
    init::write(dir.path(), &opts)?;
    let ckpt = import::load(dir.path())?;
    Ok((dir, ckpt))
}

/// The models every pass is checked on: perturbed scales; base_scale 1/32 with n_embd
/// != 1024 and BF16 blocks; odd shapes that fit no tile (n_embd 96, vocab 211, 3 heads);
/// and the nv-tiny fixture trained by NVIDIA's code.
fn models() -> Result<Vec<(&'static str, Option<tempfile::TempDir>, Checkpoint)>> {
    let mut out = vec![];
    let mut tiny = InitOptions::preset(Preset::Tiny);
    tiny.seed = 3;
    let (d, c) = generated(tiny)?;
    out.push(("tiny", Some(d), c));
    let mut bs = InitOptions::preset(Preset::Tiny);
    bs.n_embd = 128;
    bs.n_head = 4;
    bs.base_scale = Some(1.0 / 32.0);
    bs.bf16 = true;
    let (d, c) = generated(bs)?;
    out.push(("bs1/32-bf16", Some(d), c));
    let mut odd = InitOptions::preset(Preset::Tiny);
    odd.n_layer = 3;
    odd.n_head = 3;
    odd.n_embd = 96;
    odd.vocab_size = 211;
    let (d, c) = generated(odd)?;
    out.push(("odd", Some(d), c));
    out.push(("nv-tiny", None, import::load(&fixture())?));
    Ok(out)
}

fn tokens(vocab: usize, n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

fn run(g: &Graph, toks: &[u32], p: Precision) -> Vec<f64> {
    let pos: Vec<u32> = (0..toks.len() as u32).collect();
    flat(&interp::run(g, toks, &pos, p).unwrap()[0])
}

#[test]
fn literal_graph_equals_reference() -> Result<()> {
    for (name, _dir, ckpt) in models()? {
        let g = graph::literal(&ckpt)?;
        g.verify().map_err(anyhow::Error::msg)?;
        let toks = tokens(ckpt.config.vocab_size, 19);
        for p in [Precision::F64, Precision::F32] {
            let r = flat(&reference::logits(&ckpt, &toks, p)?);
            let c = compare(&run(&g, &toks, p), &r, ckpt.config.vocab_size);
            let (tol, dtype) = if p == Precision::F64 {
                (1e-12, "f64")
            } else {
                (1e-5, "f32")
            };
            baseline::assert_within_baseline(
                &format!("passes/literal/{name}/ir/{dtype}"),
                c.rel_err,
                tol,
            );
            assert!(c.passes(tol, 1.0), "{name} {p:?}: {c:?}");
        }
    }
    Ok(())
}

#[test]
fn every_pass_keeps_the_logits() -> Result<()> {
    for (name, _dir, ckpt) in models()? {
        let toks = tokens(ckpt.config.vocab_size, 23);
        let mut g = graph::literal(&ckpt)?;
        let before64 = run(&g, &toks, Precision::F64);
        let before32 = run(&g, &toks, Precision::F32);
        for pass in CANONICAL {
            let rec = passes::run_pass(&mut g, pass, true)?;
            assert!(
                rec.rewrites > 0,
                "{name}: pass {} did not fire: {rec:?}",
                pass.name
            );
            let c64 = compare(
                &run(&g, &toks, Precision::F64),
                &before64,
                ckpt.config.vocab_size,
            );
            baseline::assert_within_baseline(
                &format!("passes/{}/{name}/ir/f64", pass.name),
                c64.rel_err,
                1e-12,
            );
            assert!(
                c64.passes(1e-12, 1.0),
                "{name} after {} (f64): {c64:?}",
                pass.name
            );
            let c32 = compare(
                &run(&g, &toks, Precision::F32),
                &before32,
                ckpt.config.vocab_size,
            );
            baseline::assert_within_baseline(
                &format!("passes/{}/{name}/ir/f32", pass.name),
                c32.rel_err,
                1e-5,
            );
            assert!(
                c32.passes(1e-5, 1.0),
                "{name} after {} (f32): {c32:?}",
                pass.name
            );
        }
        // The folded graph against the literal reference, in f32: the float32 path's bar.
        let r = flat(&reference::logits(&ckpt, &toks, Precision::F64)?);
        let c = compare(&run(&g, &toks, Precision::F32), &r, ckpt.config.vocab_size);
        baseline::assert_within_baseline(
            &format!("passes/folded-vs-reference/{name}/ir/f32"),
            c.rel_err,
            1e-5,
        );
        assert!(
            c.passes(1e-5, 1.0),
            "{name} folded f32 vs f64 reference: {c:?}"
        );
    }
    Ok(())
}

/// The tiny model the IR snapshots are taken on: 1 layer keeps them short.
fn snapshot_model() -> Result<(tempfile::TempDir, Checkpoint)> {
    let mut o = InitOptions::preset(Preset::Tiny);
    o.n_layer = 1;
    o.n_embd = 16;
    o.n_head = 2;
    o.vocab_size = 11;
    generated(o)
}

#[test]
fn ir_snapshots_before_and_after_each_pass() -> Result<()> {
    let (_dir, ckpt) = snapshot_model()?;
    let mut g = graph::literal(&ckpt)?;
    insta::assert_snapshot!("literal", g.to_string());
    for pass in CANONICAL {
        let rec = passes::run_pass(&mut g, pass, true)?;
        insta::assert_snapshot!(
            format!("after_{}", pass.name),
            format!("rewrites: {}\n{g}", rec.rewrites)
        );
    }
    insta::assert_snapshot!("canonical", g.to_string());
    Ok(())
}

#[test]
fn fusions_fire_and_unfused_patterns_are_gone() -> Result<()> {
    for (name, _dir, ckpt) in models()? {
        let n = ckpt.config.n_layer;
        let mut g = graph::literal(&ckpt)?;
        passes::run(
            &mut g,
            &Options {
                verify: true,
                ..Default::default()
            },
        )?;
        // Canonical form: four GEMMs a layer plus lm_head, two lerp_norms, two pos_norms, one swiglu.
        assert_eq!(g.count("matmul_t"), 4 * n + 1, "{name}");
        assert_eq!(g.count("lerp_norm"), 2 * n, "{name}");
        assert_eq!(g.count("pos_norm"), 2 * n, "{name}");
        assert_eq!(g.count("swiglu"), n, "{name}");
        // Only layer 0's input keeps a standalone Norm; no scaling multiply is left.
        assert_eq!(g.count("norm"), 1, "{name}");
        for gone in ["mul", "abs", "lerp", "silu", "pos_step", "pos_diag"] {
            assert_eq!(g.count(gone), 0, "{name}: `{gone}` left in\n{g}");
        }
        assert!(g.nodes.iter().all(
            |n| !matches!(n.op, ngpt_compiler::graph::Op::Attention { scale, .. } if scale != 1.0)
        ));
    }
    Ok(())
}

#[test]
fn last_position_pass_keeps_the_last_row() -> Result<()> {
    for (name, _dir, ckpt) in models()? {
        let toks = tokens(ckpt.config.vocab_size, 17);
        let mut g = graph::literal(&ckpt)?;
        passes::run(&mut g, &Options::default())?;
        let all = run(&g, &toks, Precision::F64);
        let rec = passes::run_pass(&mut g, LAST_POSITION, true)?;
        assert_eq!(rec.rewrites, 1, "{name}");
        assert_eq!(g.count("last_row"), 1, "{name}");
        let last = run(&g, &toks, Precision::F64);
        let v = ckpt.config.vocab_size;
        assert_eq!(last.len(), v, "{name}");
        let c = compare(&last, &all[all.len() - v..], v);
        baseline::assert_within_baseline(
            &format!("passes/last_position/{name}/ir/f64"),
            c.rel_err,
            1e-12,
        );
        assert!(c.passes(1e-12, 1.0), "{name}: {c:?}");
    }
    Ok(())
}

#[test]
fn a_failed_precondition_leaves_the_graph_and_says_why() -> Result<()> {
    let (_dir, ckpt) = snapshot_model()?;
    let mut g = graph::literal(&ckpt)?;
    passes::run_pass(&mut g, CANONICAL[0], true)?; // fold_scaling
    let before = g.to_string();
    let find = |name: &str| CANONICAL.into_iter().find(|p| p.name == name).unwrap();
    // sqk_onto_q and pos_norm need the diagonal position table first.
    for name in ["sqk_onto_q", "pos_norm"] {
        let rec = passes::run_pass(&mut g, find(name), true)?;
        assert_eq!(rec.rewrites, 0, "{name}");
        assert_eq!(g.to_string(), before, "{name} changed the graph");
        assert!(
            rec.skipped
                .iter()
                .any(|s| s.contains("run pos_table first")),
            "{name}: {:?}",
            rec.skipped
        );
    }
    // fold_sz before fold_scaling: the scale is not constant yet.
    let mut g = graph::literal(&ckpt)?;
    let before = g.to_string();
    let rec = passes::run_pass(&mut g, find("fold_sz"), true)?;
    assert_eq!((rec.rewrites, g.to_string() == before), (0, true));
    assert!(
        rec.skipped
            .iter()
            .any(|s| s.contains("run fold_scaling first")),
        "{:?}",
        rec.skipped
    );
    Ok(())
}

#[test]
fn stop_after_runs_a_prefix_of_the_passes() -> Result<()> {
    let (_dir, ckpt) = snapshot_model()?;
    for n in 0..=CANONICAL.len() {
        let mut g = graph::literal(&ckpt)?;
        let recs = passes::run(
            &mut g,
            &Options {
                stop_after: Some(n),
                verify: true,
                ..Default::default()
            },
        )?;
        let names: Vec<&str> = recs.iter().map(|r| r.name).collect();
        let want: Vec<&str> = CANONICAL[..n].iter().map(|p| p.name).collect();
        assert_eq!(names, want);
    }
    Ok(())
}
