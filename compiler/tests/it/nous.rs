//! The Hugging Face family (ngpt-hf-spec.md) through the IR, the passes and the ONNX
//! export, on nous-tiny (trained by the authors' code) and on odd shapes: the literal
//! graph equals the literal reference; every pass fires (output equal to the unfused
//! graph's) or skips and says why; tract's prefill, KV-cache decode and greedy equal the
//! reference and the authors' tokens.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor};
use ngpt_compiler::compare::compare;
use ngpt_compiler::graph::{self, interp, Graph};
use ngpt_compiler::import::{self, Checkpoint};
use ngpt_compiler::passes::{self, CANONICAL, LAST_POSITION};
use ngpt_compiler::reference::{self, Precision};

fn nous_tiny_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/nous-tiny")
}

fn flat(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
}

fn json_tokens(file: &str, field: &str) -> Result<Vec<u32>> {
    let path = nous_tiny_dir().join(file);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    v[field]
        .as_array()
        .with_context(|| format!("{file}: {field}"))?
        .iter()
        .map(|t| t.as_u64().map(|t| t as u32).context("a token id"))
        .collect()
}

/// A Hugging Face directory of odd shapes that fit no tile: n_embd 48 in 3 heads of 16,
/// n_inner 100, vocab 37, 40 positions, 3 layers, base_scale 0.2; trained-like weights from
/// `ngpt init` (unit-norm where training keeps them, lm_head_2 rows of norm 1.4 to 3.3,
/// scales perturbed from their init values, biases small).
fn odd() -> Result<(tempfile::TempDir, Checkpoint)> {
    use ngpt_compiler::init::{self, Family, InitOptions, Preset, Spec};
    let dir = tempfile::tempdir()?;
    let spec = Spec {
        opts: InitOptions {
            n_layer: 3,
            n_head: 3,
            n_embd: 48,
            vocab_size: 37,
            block_size: 40,
            seed: 1,
            base_scale: Some(0.2),
            ..InitOptions::preset(Preset::NousTiny)
        },
        family: Family::Nous,
        n_inner: Some(100),
    };
    init::write_spec(dir.path(), &spec)?;
    let ckpt = import::load(dir.path())?;
    Ok((dir, ckpt))
}

fn models() -> Result<Vec<(&'static str, Option<tempfile::TempDir>, Checkpoint)>> {
    let (d, c) = odd()?;
    Ok(vec![
        ("nous-tiny", None, import::load(&nous_tiny_dir())?),
        ("nous-odd", Some(d), c),
    ])
}

fn tokens(vocab: usize, n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

fn run(g: &Graph, toks: &[u32], p: Precision) -> Result<Vec<f64>> {
    let pos: Vec<u32> = (0..toks.len() as u32).collect();
    flat(&interp::run(g, toks, &pos, p)?[0])
}

#[test]
fn the_literal_graph_equals_the_reference_and_the_authors_logits() -> Result<()> {
    for (name, _dir, ckpt) in models()? {
        let g = graph::literal(&ckpt)?;
        g.verify().map_err(anyhow::Error::msg)?;
        assert_eq!(g.count("rotary"), 2 * ckpt.config.n_layer, "{name}");
        assert_eq!(g.count("pos_step"), 0, "{name}");
        let vocab = ckpt.config.vocab_size;
        let toks = tokens(vocab, 29);
        for (p, tol) in [(Precision::F64, 1e-12), (Precision::F32, 1e-5)] {
            let got = run(&g, &toks, p)?;
            let want = flat(&reference::logits(&ckpt, &toks, p)?)?;
            let c = compare(&got, &want, vocab);
            println!(
                "{name} {p:?} interp vs reference: rel err {:.3e}",
                c.rel_err
            );
            ensure!(c.passes(tol, 1.0), "{name} {p:?}: {c:?}");
        }
    }
    let ckpt = import::load(&nous_tiny_dir())?;
    let prompt = json_tokens("prompt.json", "tokens")?;
    let theirs = flat(&Tensor::read_npy(
        nous_tiny_dir().join("ref_logits_f64.npy"),
    )?)?;
    let got = run(&graph::literal(&ckpt)?, &prompt, Precision::F64)?;
    let c = compare(&got, &theirs, ckpt.config.vocab_size);
    println!(
        "nous-tiny interp f64 vs the authors' f64: rel err {:.3e}",
        c.rel_err
    );
    ensure!(c.passes(1e-5, 1.0), "{c:?}");
    Ok(())
}

/// What each pass does on the Hugging Face family: rewrites (per layer where it is per
/// layer) or the word its skip lines name.
fn expected(pass: &str, layers: usize) -> (usize, Option<&'static str>) {
    match pass {
        "fold_scaling" => (4 * layers + 1, None), // sqk, two alphas (mul, abs), sv, sz
        "fold_sz" => (1, None),
        "fold_suv" => (layers, None),
        "pos_table" => (0, Some("rotary embedding")),
        "sqk_onto_q" => (layers, None),
        "drop_norm" => (2 * layers - 1, None),
        "lerp_norm" => (2 * layers, None),
        "pos_norm" => (0, Some("rotary embedding")),
        "fuse_qkv" => (0, Some("c_attn")),
        "swiglu" => (layers, None),
        "last_position" => (1, None),
        other => panic!("no expectation for {other}"),
    }
}

/// Every pass, one at a time: it fired as many times as expected (or skipped every place,
/// saying why), and the interpreter's logits after it equal the literal graph's (1e-12 in
/// f64, 1e-5 with full top-1 in f32), on nous-tiny and on odd shapes.
#[test]
fn every_pass_fires_or_skips_and_keeps_the_logits() -> Result<()> {
    for (name, _dir, ckpt) in models()? {
        let layers = ckpt.config.n_layer;
        let vocab = ckpt.config.vocab_size;
        let mut g = graph::literal(&ckpt)?;
        let toks = tokens(vocab, 23);
        let want64 = run(&g, &toks, Precision::F64)?;
        let want32 = run(&g, &toks, Precision::F32)?;
        for pass in CANONICAL.iter().chain([&LAST_POSITION]) {
            let r = passes::run_pass(&mut g, *pass, true)?;
            let (rewrites, skip) = expected(pass.name, layers);
            let fold_scaling_min = pass.name == "fold_scaling";
            if fold_scaling_min {
                ensure!(r.rewrites >= rewrites, "{name} {}: {:?}", pass.name, r);
            } else {
                ensure!(r.rewrites == rewrites, "{name} {}: {:?}", pass.name, r);
            }
            match skip {
                Some(word) => {
                    ensure!(r.skipped.len() >= layers, "{name} {}: {:?}", pass.name, r);
                    for why in &r.skipped {
                        ensure!(why.contains(word), "{name} {}: {why}", pass.name);
                        ensure!(!why.contains('\n'));
                    }
                }
                None => ensure!(r.skipped.is_empty(), "{name} {}: {:?}", pass.name, r),
            }
            let last = pass.name == "last_position";
            for (p, want, tol) in [
                (Precision::F64, &want64, 1e-12),
                (Precision::F32, &want32, 1e-5),
            ] {
                let got = run(&g, &toks, p)?;
                let want = if last {
                    &want[want.len() - vocab..]
                } else {
                    &want[..]
                };
                let c = compare(&got, want, vocab);
                ensure!(
                    c.passes(tol, 1.0),
                    "{name} after {} ({p:?}): {c:?}",
                    pass.name
                );
            }
        }
        // The canonical form: no scaling multiply left but q's, fused residuals and MLPs.
        assert_eq!(g.count("lerp_norm"), 2 * layers, "{name}");
        assert_eq!(g.count("swiglu"), layers, "{name}");
        assert_eq!(g.count("rotary"), 2 * layers, "{name}");
        assert_eq!(g.count("mul"), layers, "{name}");
        assert!(g.nodes.iter().all(|n| !matches!(
            n.op,
            graph::Op::Attention { scale, .. } if scale != 1.0
        )));
    }
    Ok(())
}

/// The compile's pass record says why each skipped pass left the Nous graph alone.
#[test]
fn the_pass_log_says_why_passes_skip() -> Result<()> {
    let ckpt = import::load(&nous_tiny_dir())?;
    let c = ngpt_compiler::compile::compile(&ckpt, &Default::default())?;
    let log = c.pass_log();
    for want in [
        "skipped: `h.0.attn.attention`: q and k are turned by the rotary embedding",
        "skipped: `h.1.attn.k.norm`: the position op is the rotary embedding",
        "skipped: `h.1.attn.attention`: q, k and v are already column slices of one matmul (`h.1.attn.qkv`, c_attn)",
    ] {
        ensure!(log.contains(want), "{want:?} not in\n{log}");
    }
    Ok(())
}

#[cfg(feature = "tract")]
mod tract {
    use super::*;
    use ngpt_compiler::onnx::{self, tract::Session, Options};

    fn session(ckpt: &Checkpoint) -> Result<Session> {
        let c = ngpt_compiler::compile::compile(ckpt, &Default::default())?;
        let info = onnx::ModelInfo::new(ckpt, &c.records)?;
        let opts = Options::for_config(&ckpt.config);
        assert_eq!(opts.max_seq_len, ckpt.config.n_positions);
        Ok(Session::from_bytes(
            &onnx::export(&c.graph, &info, &opts)?.model,
        )?)
    }

    /// Prefill, then a chunk of 4 against the cache, then one token at a time: every
    /// position's logits equal the whole-sequence f64 reference within 1e-5.
    #[test]
    fn prefill_and_kv_cache_decode_equal_the_reference() -> Result<()> {
        for (name, _dir, ckpt) in models()? {
            let s = session(&ckpt)?;
            let vocab = ckpt.config.vocab_size;
            let toks = if name == "nous-tiny" {
                json_tokens("prompt.json", "tokens")?
            } else {
                tokens(vocab, 21)
            };
            let want = flat(&reference::logits(&ckpt, &toks, Precision::F64)?)?;
            let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            let prefill = compare(&f64s(&s.logits(&toks)?), &want, vocab);
            println!("{name} tract prefill: rel err {:.3e}", prefill.rel_err);
            ensure!(prefill.passes(1e-5, 1.0), "{name} prefill: {prefill:?}");
            let mut cache = s.empty_cache(1);
            let (mut logits, mut at) = (vec![], 0);
            for len in [5usize, 4].into_iter().chain(std::iter::repeat(1)) {
                if at >= toks.len() {
                    break;
                }
                let len = len.min(toks.len() - at);
                let ids: Vec<i64> = toks[at..at + len].iter().map(|&t| t as i64).collect();
                let pos: Vec<i64> = (at as i64..(at + len) as i64).collect();
                let step = s.run(&ids, &vec![1i64; at + len], &pos, &cache)?;
                logits.extend(step.logits);
                cache = step.cache;
                at += len;
            }
            let decode = compare(&f64s(&logits), &want, vocab);
            println!("{name} tract kv decode: rel err {:.3e}", decode.rel_err);
            ensure!(decode.passes(1e-5, 1.0), "{name} decode: {decode:?}");
        }
        let ckpt = import::load(&nous_tiny_dir())?;
        let s = session(&ckpt)?;
        let prompt = json_tokens("prompt.json", "tokens")?;
        let theirs = flat(&Tensor::read_npy(
            nous_tiny_dir().join("ref_logits_f64.npy"),
        )?)?;
        let got: Vec<f64> = s.logits(&prompt)?.iter().map(|&x| x as f64).collect();
        let c = compare(&got, &theirs, ckpt.config.vocab_size);
        println!(
            "nous-tiny tract vs the authors' f64: rel err {:.3e}",
            c.rel_err
        );
        ensure!(c.passes(1e-5, 1.0), "{c:?}");
        Ok(())
    }

    /// Greedy with the KV cache (prefill, then one token a call) gives greedy.json's 40
    /// tokens: the authors' whole-sequence greedy, not their cached generation.
    #[test]
    fn kv_cache_greedy_equals_the_authors_whole_sequence_greedy() -> Result<()> {
        let ckpt = import::load(&nous_tiny_dir())?;
        let s = session(&ckpt)?;
        let vocab = ckpt.config.vocab_size;
        let prompt = json_tokens("greedy.json", "prompt_tokens")?;
        let want = json_tokens("greedy.json", "greedy_tokens")?;
        let argmax = |row: &[f32]| {
            let v: Vec<f64> = row.iter().map(|&x| x as f64).collect();
            reference::argmax(&v) as u32
        };
        let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
        let pos: Vec<i64> = (0..prompt.len() as i64).collect();
        let mut step = s.run(&ids, &vec![1; ids.len()], &pos, &s.empty_cache(1))?;
        let mut got = vec![];
        while got.len() < want.len() {
            let next = argmax(&step.logits[step.logits.len() - vocab..]);
            got.push(next);
            let at = step.cache.len;
            step = s.run(&[next as i64], &vec![1; at + 1], &[at as i64], &step.cache)?;
        }
        assert_eq!(got, want);
        Ok(())
    }

    /// A KV capacity beyond wpe's rows is refused in one line naming them.
    #[test]
    fn max_seq_len_beyond_wpe_is_refused() -> Result<()> {
        let ckpt = import::load(&nous_tiny_dir())?;
        let c = ngpt_compiler::compile::compile(&ckpt, &Default::default())?;
        let info = onnx::ModelInfo::new(&ckpt, &c.records)?;
        let mut opts = Options::for_config(&ckpt.config);
        opts.max_seq_len = 129;
        let Err(e) = onnx::export(&c.graph, &info, &opts) else {
            anyhow::bail!("a 129-row export of a 128-position model was made");
        };
        let msg = e.to_string();
        ensure!(
            !msg.contains('\n') && msg.contains("128 rows of transformer.wpe.weight"),
            "{msg}"
        );
        opts.max_seq_len = 128;
        ensure!(onnx::export(&c.graph, &info, &opts).is_ok());
        Ok(())
    }
}

/// The canonical graph lowers to a launch plan of the family's own entries: per layer
/// `rotary_norm` (the QKV bias, rotation, per-head norm, q scale, cache writes), attention,
/// `lerp_norm_bias` twice and `swiglu_bias` n_inner wide; `embed_pos` for the learned
/// positions; the module states NGPT_I and the config n_inner. A KV capacity beyond wpe's
/// rows is refused in one line naming them.
#[test]
fn the_canonical_graph_lowers_to_the_familys_kernels() -> Result<()> {
    use ngpt_compiler::plan::{self, WeightDtype, NOUS_ENTRIES};
    use ngpt_schemas::plan::step;
    for (name, _dir, ckpt) in models()? {
        let c = ngpt_compiler::compile::compile(&ckpt, &Default::default())?;
        let cfg = &ckpt.config;
        let l = plan::lower(&c.graph, cfg, WeightDtype::F32, cfg.n_positions, "")?;
        let module = &l.plan.modules[0];
        ensure!(
            module.entries == NOUS_ENTRIES,
            "{name}: {:?}",
            module.entries
        );
        ensure!(
            module
                .defines
                .iter()
                .any(|d| d.name == "NGPT_I" && d.value == cfg.n_inner as i64),
            "{name}"
        );
        ensure!(l.plan.config.as_ref().map(|c| c.n_inner) == Some(cfg.n_inner as u32));
        for program in [&l.plan.prefill, &l.plan.decode] {
            let steps = &program.as_ref().context("program")?.steps;
            let entries: Vec<&str> = steps
                .iter()
                .map(|s| match &s.kind {
                    Some(step::Kind::Launch(l)) => l.entry.as_str(),
                    _ => "gemm",
                })
                .collect();
            let n = cfg.n_layer;
            let count = |e: &str| entries.iter().filter(|&&x| x == e).count();
            ensure!(
                entries[0] == "embed_pos" && entries[1] == "norm_rows",
                "{entries:?}"
            );
            ensure!(
                count("rotary_norm") == n && count("swiglu_bias") == n,
                "{entries:?}"
            );
            ensure!(count("lerp_norm_bias") == 2 * n && count("gemm") == 4 * n + 1);
            ensure!(entries
                .iter()
                .all(|e| NOUS_ENTRIES.contains(e) || *e == "gemm"));
        }
        let Err(e) = plan::lower(&c.graph, cfg, WeightDtype::F32, cfg.n_positions + 1, "") else {
            anyhow::bail!("{name}: a plan beyond wpe's rows was lowered");
        };
        let msg = e.to_string();
        ensure!(
            !msg.contains('\n') && msg.contains("transformer.wpe.weight") && msg.contains("rows"),
            "{msg}"
        );
    }
    Ok(())
}
