//! The literal reference against NVIDIA's own numbers on nv-tiny (a checkpoint trained by
//! NVIDIA/ngpt's model.py and saved by its train.py), and import-form equivalence: ckpt.pt,
//! model.safetensors and a `_orig_mod.`-prefixed copy give the same logits, bit for bit.

use crate::common;

use anyhow::{ensure, Result};
use common::*;
use ngpt_compiler::compare::compare;
use ngpt_compiler::import::{self, Format};
use ngpt_compiler::reference::{self, argmax, Precision};

fn prompt() -> Result<Vec<u32>> {
    fixture_tokens("prompt.json", "tokens")
}

fn nv_logits() -> Result<(Vec<usize>, Vec<f64>)> {
    let (dims, _, values) = read_npy(&nv_tiny().join("nv_logits_f64.npy"))?;
    Ok((dims, values))
}

/// The decade a relative error falls in, as `<1e-N`: stable under tiny numeric changes,
/// unlike the raw value.
fn decade(err: f64) -> String {
    if !err.is_finite() {
        return format!("{err}");
    }
    if err == 0.0 {
        return "0".into();
    }
    format!("<1e{}", err.log10().floor() as i32 + 1)
}

#[test]
fn f64_and_f32_match_nvidia_float64_logits() -> Result<()> {
    let ckpt = import::load(&nv_tiny().join("ckpt.pt"))?;
    let tokens = prompt()?;
    let (dims, nv) = nv_logits()?;
    let vocab = ckpt.config.vocab_size;
    assert_eq!(dims, vec![tokens.len(), vocab], "fixture logits shape");

    let mut digest = String::new();
    for (p, tol) in [(Precision::F64, 1e-6), (Precision::F32, 1e-5)] {
        let ours = ref_logits(&ckpt, &tokens, p)?;
        let c = compare(&ours, &nv, vocab);
        eprintln!(
            "{p:?}: rel err {:.3e}, top-1 {}/{}",
            c.rel_err, c.top1_agree, c.positions
        );
        let dtype = match p {
            Precision::F64 => "f64",
            Precision::F32 => "f32",
        };
        baseline::assert_within_baseline(
            &format!("reference_parity/vs-nvidia/nv-tiny/reference/{dtype}"),
            c.rel_err,
            tol,
        );
        assert_eq!(c.positions, tokens.len());
        assert_eq!(c.top1_agree, c.positions, "{p:?}: top-1 agreement");
        digest += &format!(
            "{p:?}: rel err {}, top-1 {}/{}\n",
            decade(c.rel_err),
            c.top1_agree,
            c.positions
        );
    }

    // What the model predicts after each prompt position, as text: a readable digest that
    // changes when the reference's argmax does.
    let chars: Vec<char> = fixture_json("vocab.json")?["chars"]
        .as_str()
        .unwrap_or_default()
        .chars()
        .collect();
    let ours = ref_logits(&ckpt, &tokens, Precision::F64)?;
    let top1: String = ours
        .chunks(vocab)
        .map(|row| chars.get(argmax(row)).copied().unwrap_or('?'))
        .collect();
    digest += &format!("top-1 after each position: {top1:?}\n");
    insta::assert_snapshot!(digest);
    Ok(())
}

#[test]
fn greedy_continuation_matches_nvidia() -> Result<()> {
    let ckpt = import::load(&nv_tiny().join("ckpt.pt"))?;
    let start = fixture_tokens("greedy.json", "prompt_tokens")?;
    let want = fixture_tokens("greedy.json", "greedy_tokens")?;
    assert_eq!(want.len(), 40);
    let got = reference::greedy(&ckpt, &start, want.len(), Precision::F64)?;
    assert_eq!(got, want, "f64 greedy continuation");
    Ok(())
}

#[test]
fn greedy_continuation_matches_in_f32_too() -> Result<()> {
    let ckpt = import::load(&nv_tiny().join("model.safetensors"))?;
    let start = fixture_tokens("greedy.json", "prompt_tokens")?;
    let want = fixture_tokens("greedy.json", "greedy_tokens")?;
    let got = reference::greedy(&ckpt, &start, want.len(), Precision::F32)?;
    assert_eq!(got, want, "f32 greedy continuation");
    Ok(())
}

#[test]
fn ckpt_pt_and_safetensors_give_identical_logits() -> Result<()> {
    let pt = import::load(&nv_tiny().join("ckpt.pt"))?;
    let st = import::load(&nv_tiny().join("model.safetensors"))?;
    assert_eq!(pt.format, Format::TorchCkpt);
    assert_eq!(st.format, Format::Safetensors);
    assert_eq!(pt.config, st.config);
    // Same names, shapes and stored dtypes (BF16 block matrices stay BF16).
    let describe = |c: &import::Checkpoint| -> Vec<(String, Vec<usize>, String)> {
        c.tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec(), format!("{:?}", t.dtype())))
            .collect()
    };
    assert_eq!(describe(&pt), describe(&st));
    assert!(describe(&pt)
        .iter()
        .any(|(n, _, d)| n.ends_with("query.weight") && d == "BF16"));

    let tokens = prompt()?;
    for p in [Precision::F64, Precision::F32] {
        let a = ref_logits(&pt, &tokens, p)?;
        let b = ref_logits(&st, &tokens, p)?;
        let a_bits: Vec<u64> = a.iter().map(|v| v.to_bits()).collect();
        let b_bits: Vec<u64> = b.iter().map(|v| v.to_bits()).collect();
        ensure!(
            a_bits == b_bits,
            "{p:?}: ckpt.pt and safetensors logits differ"
        );
    }
    Ok(())
}

#[test]
fn directory_with_both_forms_reads_ckpt_pt_and_says_so() -> Result<()> {
    let ckpt = import::load(&nv_tiny())?;
    assert_eq!(ckpt.format, Format::TorchCkpt);
    assert!(ckpt.source.ends_with("ckpt.pt"));
    assert!(
        ckpt.notes.iter().any(|n| n.contains("reading ckpt.pt")),
        "notes: {:?}",
        ckpt.notes
    );
    Ok(())
}

/// Writes nv-tiny's safetensors with every key prefixed by `prefix`, plus its config.json,
/// and checks the copy loads, says it stripped the prefix, and computes identical logits.
fn prefixed_copy_matches(prefix: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut entries = read_entries(&nv_tiny().join("model.safetensors"))?;
    for e in &mut entries {
        e.name = format!("{prefix}{}", e.name);
    }
    write_entries(&dir.path().join("model.safetensors"), &entries)?;
    std::fs::copy(
        nv_tiny().join("config.json"),
        dir.path().join("config.json"),
    )?;

    let plain = import::load(&nv_tiny().join("model.safetensors"))?;
    let copy = import::load(dir.path())?;
    assert_eq!(copy.format, Format::Safetensors);
    assert!(
        copy.notes.iter().any(|n| n.contains("stripped")),
        "{prefix}: notes {:?}",
        copy.notes
    );
    assert!(plain.notes.iter().all(|n| !n.contains("stripped")));
    let names: Vec<&String> = copy.tensors.keys().collect();
    let plain_names: Vec<&String> = plain.tensors.keys().collect();
    assert_eq!(names, plain_names, "{prefix}: names after stripping");

    let tokens = prompt()?;
    let a = ref_logits(&plain, &tokens, Precision::F64)?;
    let b = ref_logits(&copy, &tokens, Precision::F64)?;
    ensure!(
        a.iter()
            .map(|v| v.to_bits())
            .eq(b.iter().map(|v| v.to_bits())),
        "{prefix}: prefixed copy gives different logits"
    );
    Ok(())
}

#[test]
fn orig_mod_prefixed_copy_loads_with_identical_logits() -> Result<()> {
    prefixed_copy_matches("_orig_mod.")
}

#[test]
fn ddp_and_compile_prefixes_together_are_stripped() -> Result<()> {
    prefixed_copy_matches("module._orig_mod.")
}

#[test]
fn logits_depend_on_the_tokens_and_positions() -> Result<()> {
    // Guards the parity test against a degenerate pass (e.g. comparing a file to itself):
    // a different sequence gives different logits, and the same token at two positions
    // gives two different rows (the position step is applied).
    let ckpt = import::load(&nv_tiny().join("model.safetensors"))?;
    let vocab = ckpt.config.vocab_size;
    let a = ref_logits(&ckpt, &[45, 64, 64], Precision::F64)?;
    let b = ref_logits(&ckpt, &[45, 64, 65], Precision::F64)?;
    assert_eq!(
        a[..2 * vocab],
        b[..2 * vocab],
        "causal: earlier rows unchanged"
    );
    assert_ne!(a[2 * vocab..], b[2 * vocab..]);
    assert_ne!(a[vocab..2 * vocab], a[2 * vocab..]);
    Ok(())
}

/// nv-tiny's safetensors with its BF16 matrices re-stored as `to` (F32 or F16).
fn restored_as(to: safetensors::Dtype) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let mut entries = read_entries(&nv_tiny().join("model.safetensors"))?;
    let mut changed = 0;
    for e in &mut entries {
        if e.dtype != safetensors::Dtype::BF16 {
            continue;
        }
        let values = e
            .data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32());
        e.data = match to {
            safetensors::Dtype::F32 => values.flat_map(f32::to_le_bytes).collect(),
            _ => values
                .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        };
        e.dtype = to;
        changed += 1;
    }
    ensure!(
        changed == 12,
        "nv-tiny has 12 BF16 block matrices, found {changed}"
    );
    write_entries(&dir.path().join("model.safetensors"), &entries)?;
    std::fs::copy(
        nv_tiny().join("config.json"),
        dir.path().join("config.json"),
    )?;
    Ok(dir)
}

#[test]
fn stored_dtypes_are_kept_and_widened_exactly() -> Result<()> {
    let tokens = prompt()?;
    let orig = import::load(&nv_tiny().join("model.safetensors"))?;
    let base = ref_logits(&orig, &tokens, Precision::F64)?;
    let vocab = orig.config.vocab_size;

    // BF16 -> F32 is exact, and the reference widens either to f64: same bits out.
    let f32_dir = restored_as(safetensors::Dtype::F32)?;
    let f32_ckpt = import::load(f32_dir.path())?;
    assert_eq!(
        f32_ckpt.tensor("transformer.h.0.query.weight")?.dtype(),
        candle_core::DType::F32
    );
    let widened = ref_logits(&f32_ckpt, &tokens, Precision::F64)?;
    ensure!(
        widened
            .iter()
            .map(|v| v.to_bits())
            .eq(base.iter().map(|v| v.to_bits())),
        "BF16 matrices stored as F32 give different logits"
    );

    // F16 is accepted and kept as F16; it rounds only the smallest entries.
    let f16_dir = restored_as(safetensors::Dtype::F16)?;
    let f16_ckpt = import::load(f16_dir.path())?;
    assert_eq!(
        f16_ckpt.tensor("transformer.h.1.c_fc.weight")?.dtype(),
        candle_core::DType::F16
    );
    let c = compare(
        &ref_logits(&f16_ckpt, &tokens, Precision::F64)?,
        &base,
        vocab,
    );
    baseline::assert_within_baseline(
        "reference_parity/f16-stored/nv-tiny/reference/f16",
        c.rel_err,
        1e-3,
    );
    assert_eq!(c.top1_agree, c.positions);
    Ok(())
}
