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
            let tol = if p == Precision::F64 { 1e-12 } else { 1e-5 };
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
            assert!(
                c32.passes(1e-5, 1.0),
                "{name} after {} (f32): {c32:?}",
                pass.name
            );
        }
        // The folded graph against the literal reference, in f32: the float32 path's bar.
        let r = flat(&reference::logits(&ckpt, &toks, Precision::F64)?);
        let c = compare(&run(&g, &toks, Precision::F32), &r, ckpt.config.vocab_size);
        assert!(
            c.passes(1e-5, 1.0),
            "{name} folded f32 vs f64 reference: {c:?}"
        );
    }
    Ok(())
}
