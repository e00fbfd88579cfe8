//! `ngpt init`: deterministic, trained-like test models that the importer accepts and
//! whose matrices are unit-norm as NVIDIA's training leaves them.

use crate::common;

use std::path::Path;

use anyhow::Result;
use candle_core::DType;
use common::*;
use ngpt_compiler::import;
use ngpt_compiler::init::{self, Family, InitOptions, Preset, Spec};
use ngpt_compiler::inspect;
use ngpt_compiler::reference::Precision;

fn files(dir: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
    Ok((
        std::fs::read(dir.join("model.safetensors"))?,
        std::fs::read(dir.join("config.json"))?,
    ))
}

fn written(opts: &InitOptions) -> Result<(tempfile::TempDir, Vec<u8>, Vec<u8>)> {
    let tmp = tempfile::tempdir()?;
    init::write(tmp.path(), opts)?;
    let (st, cfg) = files(tmp.path())?;
    Ok((tmp, st, cfg))
}

#[test]
fn same_options_give_byte_identical_files() -> Result<()> {
    for bf16 in [false, true] {
        let mut o = InitOptions::preset(Preset::Tiny);
        o.seed = 3;
        o.bf16 = bf16;
        let (_a, st_a, cfg_a) = written(&o)?;
        let (_b, st_b, cfg_b) = written(&o)?;
        assert!(
            st_a == st_b,
            "bf16={bf16}: model.safetensors differs between runs"
        );
        assert_eq!(cfg_a, cfg_b, "bf16={bf16}: config.json differs");
    }
    Ok(())
}

#[test]
fn different_seed_gives_different_weights_same_config() -> Result<()> {
    let mut o = InitOptions::preset(Preset::Tiny);
    let (_a, st_a, cfg_a) = written(&o)?;
    o.seed = 1;
    let (_b, st_b, cfg_b) = written(&o)?;
    assert_eq!(st_a.len(), st_b.len());
    assert!(st_a != st_b, "seed 0 and seed 1 wrote the same weights");
    assert_eq!(cfg_a, cfg_b);
    // Every tensor changes, not just one.
    let (a, b) = (
        read_entries(&_a.path().join("model.safetensors"))?,
        read_entries(&_b.path().join("model.safetensors"))?,
    );
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.name, y.name);
        assert_ne!(x.data, y.data, "{} identical across seeds", x.name);
    }
    Ok(())
}

#[test]
fn f32_matrices_are_unit_norm_and_scalings_have_negatives() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    init::write(tmp.path(), &InitOptions::preset(Preset::Tiny))?;
    let ckpt = import::load(tmp.path())?;
    let r = inspect::report(&ckpt)?;
    // wte, lm_head and six matrices per layer.
    assert_eq!(r.unit_norm.len(), 2 + 6 * ckpt.config.n_layer);
    for u in &r.unit_norm {
        assert_eq!(u.dtype, DType::F32, "{}", u.name);
        assert!(
            u.max_dev <= 1e-5,
            "{}: {:e} from unit norm",
            u.name,
            u.max_dev
        );
    }
    for (label, s) in &r.scaling {
        assert!(s.negative > 0, "{label}: no negative entries ({s:?})");
        assert!(s.negative < s.count / 2, "{label}: mostly negative ({s:?})");
    }
    Ok(())
}

#[test]
fn bf16_block_matrices_are_unit_norm_to_bf16_rounding() -> Result<()> {
    let mut o = InitOptions::preset(Preset::Tiny);
    o.bf16 = true;
    let tmp = tempfile::tempdir()?;
    init::write(tmp.path(), &o)?;
    let ckpt = import::load(tmp.path())?;
    let r = inspect::report(&ckpt)?;
    let mut bf16 = 0;
    for u in &r.unit_norm {
        let embedding = u.name == "transformer.wte.weight" || u.name == "lm_head.weight";
        // NVIDIA keeps wte and lm_head in f32 and the block matrices in BF16.
        let want = if embedding { DType::F32 } else { DType::BF16 };
        assert_eq!(u.dtype, want, "{}", u.name);
        let tol = if embedding { 1e-5 } else { 1e-2 };
        assert!(
            u.max_dev <= tol,
            "{}: {:e} from unit norm",
            u.name,
            u.max_dev
        );
        bf16 += (u.dtype == DType::BF16) as usize;
    }
    assert_eq!(bf16, 6 * ckpt.config.n_layer);
    Ok(())
}

#[test]
fn base_scale_default_and_override_land_in_config_json() -> Result<()> {
    let mut o = small_opts();
    let (_a, _, cfg) = written(&o)?;
    let v: serde_json::Value = serde_json::from_slice(&cfg)?;
    assert_eq!(v["base_scale"].as_f64(), Some(1.0 / 8f64.sqrt()));
    assert_eq!(v["use_nGPT"].as_i64(), Some(1));
    assert_eq!(v["bias"].as_bool(), Some(false));

    o.base_scale = Some(1.0 / 32.0);
    let (b, _, cfg) = written(&o)?;
    let v: serde_json::Value = serde_json::from_slice(&cfg)?;
    assert_eq!(v["base_scale"].as_f64(), Some(0.03125));
    let ckpt = import::load(b.path())?;
    assert_eq!(ckpt.config.base_scale, 0.03125);
    // Scaling vectors are perturbed around init values that scale with base_scale, so the
    // effective values (stored / base_scale for sqk and sz) do not depend on it.
    let eff = |bs: Option<f64>| -> Result<Vec<(&'static str, f64, usize)>> {
        let mut o = small_opts();
        o.base_scale = bs;
        let tmp = tempfile::tempdir()?;
        init::write(tmp.path(), &o)?;
        let r = inspect::report(&import::load(tmp.path())?)?;
        Ok(r.scaling
            .iter()
            .map(|(l, s)| (*l, s.median, s.negative))
            .collect())
    };
    let (a, b) = (eff(None)?, eff(Some(1.0 / 32.0))?);
    for ((label, x, neg_x), (_, y, neg_y)) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "{label}: median {x} vs {y}"
        );
        assert_eq!(neg_x, neg_y, "{label}: negative count");
    }
    Ok(())
}

#[test]
fn imports_and_reference_logits_are_finite() -> Result<()> {
    for bf16 in [false, true] {
        let mut o = InitOptions::preset(Preset::Tiny);
        o.bf16 = bf16;
        let tmp = tempfile::tempdir()?;
        init::write(tmp.path(), &o)?;
        let ckpt = import::load(tmp.path())?;
        assert_eq!(ckpt.config, o.config()?);
        let names: Vec<String> = ckpt.tensors.keys().cloned().collect();
        let mut want: Vec<String> = ckpt
            .config
            .expected_tensors()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        want.sort();
        assert_eq!(names, want, "NVIDIA key names");
        let tokens: Vec<u32> = (0..20).map(|i| (i * 37 % 256) as u32).collect();
        for p in [Precision::F64, Precision::F32] {
            let l = ref_logits(&ckpt, &tokens, p)?;
            assert_eq!(l.len(), tokens.len() * 256);
            assert!(
                l.iter().all(|v| v.is_finite()),
                "bf16={bf16} {p:?}: non-finite logits"
            );
            // Not degenerate: logits vary across the vocabulary.
            let (lo, hi) = l
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
            assert!(hi - lo > 1e-3, "bf16={bf16} {p:?}: flat logits");
        }
    }
    Ok(())
}

#[test]
fn invalid_dimensions_are_refused_before_writing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("out");
    let mut o = small_opts();
    o.n_head = 3;
    let err = init::write(&dir, &o)
        .expect_err("n_embd 8 with 3 heads")
        .to_string();
    assert!(err.contains("not divisible"), "{err}");
    assert!(!dir.exists(), "a directory was created for a refused model");
    Ok(())
}

#[test]
fn odd_shapes_and_custom_base_scale_import() -> Result<()> {
    // The shape the CLI help shows: 3 heads of 32, a vocabulary that is no power of two.
    let o = InitOptions {
        n_layer: 3,
        n_head: 3,
        n_embd: 96,
        vocab_size: 300,
        block_size: 64,
        seed: 11,
        base_scale: Some(0.03125),
        bf16: true,
    };
    let tmp = tempfile::tempdir()?;
    init::write(tmp.path(), &o)?;
    let ckpt = import::load(tmp.path())?;
    assert_eq!(ckpt.config.head_dim(), 32);
    let l = ref_logits(&ckpt, &[1, 299, 5], Precision::F32)?;
    assert!(l.iter().all(|v| v.is_finite()));
    Ok(())
}

#[cfg(unix)]
#[test]
fn model_file_gets_the_same_permissions_as_config_json() -> Result<()> {
    // safetensors writes through an owner-only temporary file; the model must not end up
    // unreadable to the group when config.json beside it is readable.
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir()?;
    init::write(tmp.path(), &small_opts())?;
    let mode = |name: &str| -> Result<u32> {
        Ok(std::fs::metadata(tmp.path().join(name))?
            .permissions()
            .mode()
            & 0o777)
    };
    assert_eq!(
        format!("{:o}", mode("model.safetensors")?),
        format!("{:o}", mode("config.json")?)
    );
    Ok(())
}

fn written_spec(spec: &Spec) -> Result<(tempfile::TempDir, Vec<u8>, Vec<u8>)> {
    let tmp = tempfile::tempdir()?;
    init::write_spec(tmp.path(), spec)?;
    let (st, cfg) = files(tmp.path())?;
    Ok((tmp, st, cfg))
}

/// f32 values of one entry.
fn f32s(e: &Entry) -> Vec<f32> {
    e.data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Norms of the rows (`by_row`) or the columns of a [rows, cols] matrix, in f64.
fn norms(v: &[f32], cols: usize, by_row: bool) -> Vec<f64> {
    let rows = v.len() / cols;
    let n = if by_row { rows } else { cols };
    (0..n)
        .map(|k| {
            let sq: f64 = if by_row {
                v[k * cols..(k + 1) * cols]
                    .iter()
                    .map(|x| (*x as f64).powi(2))
                    .sum()
            } else {
                (0..rows).map(|r| (v[r * cols + k] as f64).powi(2)).sum()
            };
            sq.sqrt()
        })
        .collect()
}

#[test]
fn nous_tiny_imports_as_the_hugging_face_family_with_trained_like_norms() -> Result<()> {
    let (tmp, _, cfg) = written_spec(&Spec::preset(Preset::NousTiny))?;
    let cfg: serde_json::Value = serde_json::from_slice(&cfg)?;
    assert_eq!(cfg["model_type"], "ngpt");
    assert_eq!(cfg["architectures"][0], "NgptLMHeadModel");
    let ckpt = import::load(tmp.path())?;
    let c = &ckpt.config;
    assert_eq!(c.family, Family::Nous);
    assert_eq!(
        (
            c.n_layer,
            c.n_head,
            c.n_embd,
            c.n_inner,
            c.n_positions,
            c.vocab_size
        ),
        (2, 2, 64, 256, 128, 256)
    );
    assert_eq!(c.base_scale, 1.0 / 8.0);
    let entries = read_entries(&tmp.path().join("model.safetensors"))?;
    let mut names: Vec<_> = entries.iter().map(|e| e.name.clone()).collect();
    let mut want: Vec<_> = c.expected_tensors().into_iter().map(|(n, _)| n).collect();
    names.sort();
    want.sort();
    assert_eq!(names, want, "the spec's keys, no lm_head.weight");
    for (name, shape) in c.expected_tensors() {
        let e = entries.iter().find(|e| e.name == name).unwrap();
        assert_eq!(e.shape, shape, "{name}");
        assert_eq!(e.dtype, safetensors::Dtype::F32, "{name}");
        let v = f32s(e);
        // (by_row, whether unit) for the matrices; None for the vectors.
        let unit = if name == "transformer.wte.weight"
            || name.ends_with("attn.c_proj.weight")
            || name.ends_with("mlp.c_proj.weight")
        {
            Some(true)
        } else if name.ends_with("c_attn.weight") || name.ends_with("c_fc.weight") {
            Some(false)
        } else {
            None
        };
        if let Some(by_row) = unit {
            for n in norms(&v, shape[1], by_row) {
                assert!((n - 1.0).abs() <= 1e-6, "{name}: norm {n}");
            }
        } else if name == "lm_head_2.weight" {
            let n = norms(&v, shape[1], true);
            assert!(
                n.iter().all(|n| (1.4 - 1e-5..=3.3 + 1e-5).contains(n)),
                "{name}"
            );
            assert!(n.iter().filter(|n| (*n - 1.0).abs() < 0.1).count() == 0);
        } else if name == "transformer.wpe.weight" || name.ends_with(".bias") {
            let n = norms(&v, shape[shape.len() - 1], true);
            assert!(
                n.iter().all(|n| (*n - 1.0).abs() > 1e-3),
                "{name}: unit rows"
            );
            assert!(v.iter().all(|x| x.abs() < 0.2), "{name}: not small");
            assert!(v.iter().any(|x| *x < 0.0), "{name}: no negatives");
        } else {
            // Scaling vectors: perturbed from init, a few negative.
            let neg = v.iter().filter(|x| **x < 0.0).count();
            assert!(neg > 0 && neg < v.len() / 2, "{name}: {neg} negative");
            assert!(v.windows(2).any(|w| w[0] != w[1]), "{name}: constant");
        }
    }
    Ok(())
}

#[test]
fn nous_tiny_reference_and_interpreter_agree() -> Result<()> {
    use ngpt_compiler::compare::compare;
    use ngpt_compiler::graph::interp;
    let mut s = Spec::preset(Preset::NousTiny);
    s.opts.seed = 5;
    let (tmp, _, _) = written_spec(&s)?;
    let ckpt = import::load(tmp.path())?;
    let c = ngpt_compiler::compile::compile(&ckpt, &Default::default())?;
    let toks: Vec<u32> = vec![3, 250, 17, 0, 99, 42, 128];
    let pos: Vec<u32> = (0..toks.len() as u32).collect();
    let flat = |t: &candle_core::Tensor| -> Result<Vec<f64>> {
        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
    };
    let got = flat(&interp::run(&c.graph, &toks, &pos, Precision::F32)?[0])?;
    let want = flat(&ngpt_compiler::reference::logits(
        &ckpt,
        &toks,
        Precision::F32,
    )?)?;
    let v = ckpt.config.vocab_size;
    // The compiled graph may keep only the last position.
    let want = &want[want.len() - got.len()..];
    assert!(got.len() >= v);
    let cmp = compare(&got, want, v);
    assert!(cmp.passes(1e-5, 1.0), "{cmp:?}");
    Ok(())
}

#[test]
fn nous_same_options_give_the_same_bytes_and_flags_override_the_preset() -> Result<()> {
    let mut s = Spec::preset(Preset::NousTiny);
    s.opts.seed = 9;
    let (_a, st_a, cfg_a) = written_spec(&s)?;
    let (_b, st_b, cfg_b) = written_spec(&s)?;
    assert!(st_a == st_b, "model.safetensors differs between runs");
    assert_eq!(cfg_a, cfg_b);
    // The 0.5b preset's shape, without writing it.
    let big = Spec::preset(Preset::NousHalf).config()?;
    assert_eq!(
        (
            big.n_layer,
            big.n_head,
            big.n_embd,
            big.n_inner,
            big.n_positions,
            big.vocab_size
        ),
        (24, 16, 1024, 4096, 4096, 32000)
    );
    // Dimension overrides, and --family nous on an NVIDIA preset.
    let mut s = Spec::preset(Preset::Tiny);
    s.family = Family::Nous;
    s.opts.n_layer = 1;
    s.n_inner = Some(96);
    s.opts.block_size = 16;
    let (tmp, _, _) = written_spec(&s)?;
    let c = import::load(tmp.path())?.config;
    assert_eq!((c.n_layer, c.n_inner, c.n_positions), (1, 96, 16));
    // BF16 is NVIDIA's storage; the Hugging Face family is float32.
    s.opts.bf16 = true;
    assert!(init::write_spec(&tmp.path().join("bf16"), &s).is_err());
    Ok(())
}
