//! The second nGPT family, NousResearch's Hugging Face nGPT (ngpt-hf-spec.md), on
//! nous-tiny (a model trained and evaluated by the authors' unmodified code): the literal
//! reference against their float64 and float32 logits and greedy tokens; the Hugging Face
//! directory and train_ngpt.py's ckpt.pt give the same logits; `lm_head.weight` changes
//! nothing; other model types are refused in one line; `inspect` names the family; the ir,
//! tract and plan-cpu engines agree with the reference and `compile` writes the ONNX export
//! and the launch plan (f32 and bf16), which match the authors' float64 logits and, with
//! the KV cache, their greedy tokens; an odd-shaped model (head_dim 16, n_inner 100) runs
//! on plan-cpu too.

use crate::common;

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use common::*;
use ngpt_compiler::compare::compare;
use ngpt_compiler::config::Family;
use ngpt_compiler::import;
use ngpt_compiler::reference::{self, Precision};

/// `tests/fixtures/nous-tiny`.
fn nous_tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nous-tiny")
}

fn json(name: &str) -> Result<serde_json::Value> {
    let path = nous_tiny().join(name);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

fn tokens(file: &str, field: &str) -> Result<Vec<u32>> {
    json(file)?[field]
        .as_array()
        .with_context(|| format!("{file}: `{field}`"))?
        .iter()
        .map(|t| t.as_u64().map(|t| t as u32).context("a token id"))
        .collect()
}

/// A Hugging Face directory in `dir`: the fixture's config.json and model.safetensors.
fn hf_dir(dir: &Path) -> Result<PathBuf> {
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(nous_tiny().join(f), dir.join(f))?;
    }
    Ok(dir.to_path_buf())
}

/// train_ngpt.py's ckpt.pt with the config.json beside it, alone in `dir`.
fn ckpt_dir(dir: &Path) -> Result<PathBuf> {
    for f in ["config.json", "ckpt.pt"] {
        std::fs::copy(nous_tiny().join(f), dir.join(f))?;
    }
    Ok(dir.to_path_buf())
}

/// The importer's error on `path`, as one line.
fn import_error(path: &Path) -> Result<String> {
    match import::load(path) {
        Ok(_) => anyhow::bail!("{} imported", path.display()),
        Err(e) => {
            let msg = e.to_string();
            ensure!(!msg.contains('\n'), "not one line: {msg}");
            Ok(msg)
        }
    }
}

#[test]
fn the_reference_matches_the_authors_float64_and_float32_logits() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ckpt = import::load(&hf_dir(tmp.path())?)?;
    assert_eq!(ckpt.config.family, Family::Nous);
    let vocab = ckpt.config.vocab_size;
    let prompt = tokens("prompt.json", "tokens")?;
    for (p, file, dtype) in [
        (Precision::F64, "ref_logits_f64.npy", "f64"),
        (Precision::F32, "ref_logits_f32.npy", "f32"),
    ] {
        let (dims, _, theirs) = read_npy(&nous_tiny().join(file))?;
        assert_eq!(dims, vec![prompt.len(), vocab], "{file} shape");
        let ours = ref_logits(&ckpt, &prompt, p)?;
        let c = compare(&ours, &theirs, vocab);
        eprintln!(
            "{p:?} vs {file}: rel err {:.3e}, top-1 {}/{}",
            c.rel_err, c.top1_agree, c.positions
        );
        baseline::assert_within_baseline(
            &format!("reference_parity/vs-authors/nous-tiny/reference/{dtype}"),
            c.rel_err,
            1e-5,
        );
        assert_eq!(c.positions, prompt.len());
        assert_eq!(c.top1_agree, c.positions, "{p:?}: top-1 at every position");
    }
    Ok(())
}

#[test]
fn reference_greedy_equals_the_authors_whole_sequence_greedy() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ckpt = import::load(&hf_dir(tmp.path())?)?;
    let prompt = tokens("greedy.json", "prompt_tokens")?;
    let want = tokens("greedy.json", "greedy_tokens")?;
    let got = reference::greedy(&ckpt, &prompt, want.len(), Precision::F64)?;
    assert_eq!(got, want);
    Ok(())
}

#[test]
fn the_hf_directory_and_train_ngpt_ckpt_give_the_same_logits() -> Result<()> {
    let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let hf = import::load(&hf_dir(a.path())?)?;
    let pt = import::load(&ckpt_dir(b.path())?)?;
    assert_eq!(hf.format, import::Format::Safetensors);
    assert_eq!(pt.format, import::Format::TorchCkpt);
    assert_eq!(hf.config, pt.config);
    // train_ngpt.py's state dict carries lm_head.weight (tied to wte): ignored, said so.
    assert!(
        pt.notes.iter().any(|n| n.contains("lm_head.weight")),
        "{:?}",
        pt.notes
    );
    let prompt = tokens("prompt.json", "tokens")?;
    for p in [Precision::F64, Precision::F32] {
        assert_eq!(
            ref_logits(&hf, &prompt, p)?,
            ref_logits(&pt, &prompt, p)?,
            "{p:?}"
        );
    }
    Ok(())
}

#[test]
fn an_lm_head_weight_changes_nothing() -> Result<()> {
    let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let plain = import::load(&hf_dir(a.path())?)?;
    let dir = hf_dir(b.path())?;
    edit_tensors(&dir, |e| {
        // Deliberately not wte: whatever it holds, the forward must not read it.
        e.push(Entry::f32("lm_head.weight", &[76, 64], 0.5))
    })?;
    let with = import::load(&dir)?;
    assert!(!with.tensors.contains_key("lm_head.weight"));
    let prompt = tokens("prompt.json", "tokens")?;
    assert_eq!(
        ref_logits(&plain, &prompt, Precision::F64)?,
        ref_logits(&with, &prompt, Precision::F64)?
    );
    Ok(())
}

#[test]
fn other_model_types_and_broken_state_dicts_are_refused_in_one_line() -> Result<()> {
    // config.json of another model type.
    for (model_type, needles) in [
        (
            "gpt2",
            vec![
                "config.json",
                "model_type `gpt2`",
                "not an nGPT",
                "ngpt reads",
            ],
        ),
        (
            "llama",
            vec![
                "config.json",
                "model_type `llama`",
                "not an nGPT",
                "\"ngpt\"",
            ],
        ),
    ] {
        let tmp = tempfile::tempdir()?;
        let dir = hf_dir(tmp.path())?;
        edit_config(&dir, |c| {
            c.insert("model_type".into(), model_type.into());
        })?;
        let msg = import_error(&dir)?;
        for n in needles {
            assert!(msg.contains(n), "{model_type}: {n:?} not in: {msg}");
        }
    }
    // A lucidrains-style config: neither model_type nor NVIDIA's keys.
    let tmp = tempfile::tempdir()?;
    let dir = hf_dir(tmp.path())?;
    std::fs::write(
        dir.join("config.json"),
        r#"{"dim": 64, "depth": 2, "heads": 2, "num_tokens": 76}"#,
    )?;
    let msg = import_error(&dir)?;
    for n in ["config.json", "not an nGPT", "depth", "ngpt reads"] {
        assert!(msg.contains(n), "{n:?} not in: {msg}");
    }
    // A missing tensor.
    let tmp = tempfile::tempdir()?;
    let dir = hf_dir(tmp.path())?;
    edit_tensors(&dir, |e| {
        e.retain(|e| e.name != "transformer.h.0.attn.c_attn.bias")
    })?;
    let msg = import_error(&dir)?;
    for n in [
        "model.safetensors",
        "`transformer.h.0.attn.c_attn.bias`",
        "missing",
        "[192]",
    ] {
        assert!(msg.contains(n), "{n:?} not in: {msg}");
    }
    // A wrong shape: c_attn.weight transposed to [3E, E] (nn.Linear's layout).
    let tmp = tempfile::tempdir()?;
    let dir = hf_dir(tmp.path())?;
    edit_tensors(&dir, |e| {
        for e in e.iter_mut() {
            if e.name == "transformer.h.1.attn.c_attn.weight" {
                e.shape = vec![192, 64];
            }
        }
    })?;
    let msg = import_error(&dir)?;
    for n in [
        "model.safetensors",
        "`transformer.h.1.attn.c_attn.weight`",
        "[192, 64]",
        "[64, 192]",
    ] {
        assert!(msg.contains(n), "{n:?} not in: {msg}");
    }
    // A GPT-2 state dict under a model_type ngpt config.
    let tmp = tempfile::tempdir()?;
    let dir = hf_dir(tmp.path())?;
    edit_tensors(&dir, |e| {
        e.retain(|e| !e.name.contains("sqk"));
        e.push(Entry::f32("transformer.ln_f.weight", &[64], 1.0));
    })?;
    let msg = import_error(&dir)?;
    for n in ["model.safetensors", "GPT-2", "ngpt reads"] {
        assert!(msg.contains(n), "{n:?} not in: {msg}");
    }
    // A ckpt.pt of train_ngpt.py without its config.json: where the shape comes from.
    let tmp = tempfile::tempdir()?;
    std::fs::copy(nous_tiny().join("ckpt.pt"), tmp.path().join("ckpt.pt"))?;
    let msg = import_error(&tmp.path().join("ckpt.pt"))?;
    for n in ["ckpt.pt", "model_args", "config.json"] {
        assert!(msg.contains(n), "{n:?} not in: {msg}");
    }
    Ok(())
}

#[test]
fn more_positions_than_wpe_has_rows_are_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ckpt = import::load(&hf_dir(tmp.path())?)?;
    let toks = vec![1u32; ckpt.config.n_positions + 1];
    let msg = match reference::logits(&ckpt, &toks, Precision::F32) {
        Ok(_) => anyhow::bail!("129 positions ran"),
        Err(e) => e.to_string(),
    };
    for n in ["129 positions", "128 rows", "transformer.wpe.weight"] {
        assert!(msg.contains(n), "{n:?} not in: {msg}");
    }
    Ok(())
}

#[test]
fn inspect_names_the_family_and_checks_what_training_normalizes() -> Result<()> {
    let o = ok(ngpt(&["inspect", utf8(&nous_tiny())])?, "inspect nous-tiny")?;
    let out = stdout(&o);
    for needle in [
        "family: Hugging Face nGPT (NousResearch)",
        "\"model_type\": \"ngpt\"",
        "\"n_inner\": 256",
        "sv_eff",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.1.mlp.c_proj.weight",
        "all matrices unit-norm to f32 rounding",
        "lm_head_2.weight, transformer.wpe.weight and the biases are not normalized",
    ] {
        assert!(out.contains(needle), "inspect lacks {needle:?}:\n{out}");
    }
    // The matrices training leaves free are not in the unit-norm report.
    let report = out
        .split("distance from unit norm")
        .nth(1)
        .and_then(|s| s.split("worst").next())
        .context("unit-norm section")?;
    for free in ["lm_head_2.weight ", "wpe.weight ", ".bias "] {
        assert!(!report.contains(free), "{free:?} checked:\n{report}");
    }
    let o = ok(
        ngpt(&["inspect", utf8(&nv_tiny().join("ckpt.pt"))])?,
        "inspect nv-tiny",
    )?;
    assert!(stdout(&o).contains("family: NVIDIA nGPT (NVIDIA/ngpt)"));
    Ok(())
}

#[test]
fn logits_on_the_reference_ir_tract_and_plan_cpu_agree() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    std::fs::create_dir(tmp.path().join("hf"))?;
    let dir = hf_dir(&tmp.path().join("hf"))?;
    let npy = tmp.path().join("l.npy");
    let toks = "53,54,55,54,63";
    let ckpt = import::load(&dir)?;
    let want = ref_logits(&ckpt, &[53, 54, 55, 54, 63], Precision::F64)?;
    // `ngpt logits` defaults to the reference engine; ir and tract run the IR and its
    // ONNX export; plan-cpu a plan lowered in memory.
    for (engine, tol) in [
        ("reference", 1e-6),
        ("ir", 1e-6),
        ("tract", 1e-5),
        ("plan-cpu", 1e-5),
    ] {
        ok(
            ngpt(&[
                "logits",
                utf8(&dir),
                "--engine",
                engine,
                "--tokens",
                toks,
                "-o",
                utf8(&npy),
            ])?,
            engine,
        )?;
        let (dims, _, values) = read_npy(&npy)?;
        assert_eq!(dims, vec![5, 76], "{engine}");
        let c = compare(&values, &want, 76);
        eprintln!("{engine}: rel err {:.3e}", c.rel_err);
        ensure!(c.rel_err < tol && c.top1_agree == 5, "{engine}: {c:?}");
    }
    Ok(())
}

/// `ngpt compile` writes the IR, model.onnx, genai_config.json and the launch plan; the
/// export runs in tract from the directory, and `validate` passes with plan-cpu in its
/// table. A `--max-seq-len` beyond wpe's rows is refused in one line.
#[test]
fn compile_writes_the_onnx_export_and_the_plan() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("compiled");
    let o = ok(
        ngpt(&["compile", utf8(&nous_tiny()), "-o", utf8(&out)])?,
        "compile",
    )?;
    ensure!(!stderr(&o).contains("no model.plan"), "{}", stderr(&o));
    for f in [
        "manifest.json",
        "ir.txt",
        "passes.txt",
        "model.onnx",
        "genai_config.json",
        "model.plan",
        "model.weights",
    ] {
        ensure!(out.join(f).is_file(), "no {f}");
    }
    let passes = std::fs::read_to_string(out.join("passes.txt"))?;
    ensure!(passes
        .contains("skipped: `h.0.attn.attention`: q and k are turned by the rotary embedding"));
    // The directory's model.onnx in tract.
    let prompt = tokens("prompt.json", "tokens")?;
    let session = ngpt_compiler::onnx::tract::Session::load(&out.join("model.onnx"))?;
    let got: Vec<f64> = session.logits(&prompt)?.iter().map(|&x| x as f64).collect();
    let (_, _, theirs) = read_npy(&nous_tiny().join("ref_logits_f64.npy"))?;
    let c = compare(&got, &theirs, 76);
    ensure!(c.rel_err < 1e-5 && c.top1_agree == c.positions, "{c:?}");
    // Through the CLI on the directory: tract's logits equal the session's above (the
    // vocabulary comes from genai_config.json), and `validate` passes with plan-cpu run
    // (plan-cuda is skipped only where no GPU is).
    let npy = tmp.path().join("tract.npy");
    let list: Vec<String> = prompt.iter().map(u32::to_string).collect();
    ok(
        ngpt(&[
            "logits",
            utf8(&out),
            "--engine",
            "tract",
            "--tokens",
            &list.join(","),
            "-o",
            utf8(&npy),
        ])?,
        "logits --engine tract on the directory",
    )?;
    let (_, _, cli) = read_npy(&npy)?;
    ensure!(compare(&cli, &got, 76).rel_err == 0.0);
    let v = ok(ngpt(&["validate", utf8(&out)])?, "validate")?;
    let table = stdout(&v);
    let plan_cpu: Vec<&str> = table
        .lines()
        .filter(|l| l.trim_start().starts_with("plan-cpu"))
        .collect();
    ensure!(
        plan_cpu.len() == 1 && plan_cpu[0].trim_end().ends_with(" ok"),
        "{table}"
    );
    ensure!(!table.contains("no model.plan"), "{table}");
    // bisect traces plan-cpu against the reference without a divergence (a biased GEMM's
    // step, whose output is still without its bias, is not a shared point).
    let b = ok(
        ngpt(&["bisect", utf8(&out), "--tokens", "53,54,55,54,63"])?,
        "bisect",
    )?;
    ensure!(
        stdout(&b).contains("no divergence") && stdout(&b).contains("mlp.gated"),
        "{}",
        stdout(&b)
    );

    let out2 = tmp.path().join("too-long");
    let o = ngpt(&[
        "compile",
        utf8(&nous_tiny()),
        "-o",
        utf8(&out2),
        "--max-seq-len",
        "129",
    ])?;
    one_line_refusal(
        &o,
        "--max-seq-len 129",
        &["error: ", "128 rows of transformer.wpe.weight"],
    )?;
    ensure!(!out2.exists());
    Ok(())
}

/// The logits `ngpt logits --engine plan-cpu` gives on `input` for `tokens`.
fn plan_cpu_logits(input: &Path, tokens: &[u32], scratch: &Path) -> Result<Vec<f64>> {
    let npy = scratch.join("plan-cpu.npy");
    let list: Vec<String> = tokens.iter().map(u32::to_string).collect();
    ok(
        ngpt(&[
            "logits",
            utf8(input),
            "--engine",
            "plan-cpu",
            "--tokens",
            &list.join(","),
            "-o",
            utf8(&npy),
        ])?,
        "logits --engine plan-cpu",
    )?;
    Ok(read_npy(&npy)?.2)
}

/// The greedy continuation `ngpt generate --engine plan-cpu` (the engine, with the KV
/// cache: a prefill, then one decode row a step) gives on `input`.
fn plan_cpu_greedy(input: &Path, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let list: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let o = ok(
        ngpt(&[
            "generate",
            utf8(input),
            "--engine",
            "plan-cpu",
            "--tokens",
            &list.join(","),
            "--max-new-tokens",
            &n.to_string(),
            "--ignore-eos",
            "--json",
        ])?,
        "generate --engine plan-cpu",
    )?;
    let out = stdout(&o);
    let line = out
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON line")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    v["tokens"]
        .as_array()
        .context("`tokens`")?
        .iter()
        .map(|t| t.as_u64().map(|t| t as u32).context("a token id"))
        .collect()
}

/// nous-tiny compiled to f32 and bf16 plans: plan-cpu within 1e-5 (f32) and 2e-2 (bf16) of
/// the authors' float64 logits with their top-1 at every position, and, with the KV cache,
/// the authors' whole-sequence greedy tokens (f32; bf16 is held to the tolerance, not the
/// tokens: greedy.json's smallest top-1/top-2 gap, 0.012, is below bf16's error).
#[test]
fn plans_match_the_authors_logits_and_greedy_tokens() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let prompt = tokens("prompt.json", "tokens")?;
    let (_, _, theirs) = read_npy(&nous_tiny().join("ref_logits_f64.npy"))?;
    for (dtype, limit) in [("f32", 1e-5), ("bf16", 2e-2)] {
        let out = tmp.path().join(dtype);
        ok(
            ngpt(&[
                "compile",
                utf8(&nous_tiny()),
                "-o",
                utf8(&out),
                "--dtype",
                dtype,
            ])?,
            "compile",
        )?;
        let got = plan_cpu_logits(&out, &prompt, tmp.path())?;
        let c = compare(&got, &theirs, 76);
        eprintln!(
            "plan-cpu {dtype} vs the authors' f64: rel err {:.3e}, top-1 {}/{}",
            c.rel_err, c.top1_agree, c.positions
        );
        baseline::assert_within_baseline(
            &format!("plan_parity/vs-authors/nous-tiny/plan-cpu/{dtype}"),
            c.rel_err,
            limit,
        );
        assert_eq!(c.positions, prompt.len());
        assert_eq!(
            c.top1_agree, c.positions,
            "{dtype}: top-1 at every position"
        );
        if dtype == "f32" {
            let prompt = tokens("greedy.json", "prompt_tokens")?;
            let want = tokens("greedy.json", "greedy_tokens")?;
            assert_eq!(plan_cpu_greedy(&out, &prompt, want.len())?, want);
        }
    }
    Ok(())
}

/// An odd-shaped model of this family (`ngpt init`: 3 layers, n_embd 48 in 3 heads of 16,
/// n_inner 100, vocab 37, 40 positions, base_scale 0.2): plan-cpu (a plan lowered in
/// memory, and compiled f32 and bf16 plans) against the float64 reference, and its KV-cache
/// greedy tokens equal to the reference's whole-sequence greedy.
#[test]
fn an_odd_shaped_model_runs_on_plan_cpu() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("odd");
    ok(
        ngpt(&[
            "init",
            utf8(&dir),
            "--family",
            "nous",
            "--layers",
            "3",
            "--heads",
            "3",
            "--embd",
            "48",
            "--inner",
            "100",
            "--vocab",
            "37",
            "--block",
            "40",
            "--base-scale",
            "0.2",
            "--seed",
            "1",
        ])?,
        "init",
    )?;
    let ckpt = import::load(&dir)?;
    assert_eq!(
        (ckpt.config.family, ckpt.config.n_inner),
        (Family::Nous, 100)
    );
    let toks: Vec<u32> = (0..29).map(|i| ((i * 7919 + 13) % 37) as u32).collect();
    let want = ref_logits(&ckpt, &toks, Precision::F64)?;
    let c = compare(&plan_cpu_logits(&dir, &toks, tmp.path())?, &want, 37);
    eprintln!("odd plan-cpu (in memory) f32: rel err {:.3e}", c.rel_err);
    baseline::assert_within_baseline("plan_parity/nous-odd/plan-cpu/f32", c.rel_err, 1e-5);
    assert_eq!(c.top1_agree, c.positions);
    for (dtype, limit) in [("f32", 1e-5), ("bf16", 2e-2)] {
        let out = tmp.path().join(format!("odd-{dtype}"));
        ok(
            ngpt(&["compile", utf8(&dir), "-o", utf8(&out), "--dtype", dtype])?,
            "compile",
        )?;
        let c = compare(&plan_cpu_logits(&out, &toks, tmp.path())?, &want, 37);
        eprintln!("odd plan-cpu (compiled) {dtype}: rel err {:.3e}", c.rel_err);
        baseline::assert_within_baseline(
            &format!("plan_parity/nous-odd/plan-cpu-compiled/{dtype}"),
            c.rel_err,
            limit,
        );
        if dtype == "f32" {
            let prompt = &toks[..7];
            let greedy = reference::greedy(&ckpt, prompt, 20, Precision::F64)?;
            assert_eq!(plan_cpu_greedy(&out, prompt, 20)?, greedy);
        }
    }
    Ok(())
}

/// Fails unless `o` failed with exactly one `error:` line (notes may precede it) holding
/// each of `needles`.
fn one_line_refusal(o: &std::process::Output, what: &str, needles: &[&str]) -> Result<()> {
    let err = stderr(o);
    ensure!(!o.status.success(), "{what}: exited 0: {err}");
    ensure!(
        o.status.code() == Some(1),
        "{what}: exit {:?}: {err}",
        o.status.code()
    );
    let errors: Vec<&str> = err.lines().filter(|l| !l.starts_with("note: ")).collect();
    ensure!(errors.len() == 1, "{what}: not one line: {err}");
    for n in needles {
        ensure!(errors[0].contains(n), "{what}: {n:?} not in: {err}");
    }
    Ok(())
}

#[test]
fn a_pytorch_model_bin_directory_gives_the_same_logits() -> Result<()> {
    // `save_pretrained(safe_serialization=False)`: the state dict itself, pickled in a
    // torch zip, beside config.json.
    let entries = read_entries(&nous_tiny().join("model.safetensors"))?;
    let mut p = Pickle::default();
    p.op(&[0x80, 2]).op(b"}(");
    let mut storages = vec![];
    for (i, e) in entries.iter().enumerate() {
        p.str(&e.name).tensor(i, "FloatStorage", &e.shape);
        storages.push(e.data.clone());
    }
    p.op(b"u.");
    let tmp = tempfile::tempdir()?;
    std::fs::copy(
        nous_tiny().join("config.json"),
        tmp.path().join("config.json"),
    )?;
    std::fs::write(
        tmp.path().join("pytorch_model.bin"),
        torch_zip_bytes(&p.0, &storages)?,
    )?;
    let bin = import::load(tmp.path())?;
    assert!(bin.source.ends_with("pytorch_model.bin"));
    let st_dir = tempfile::tempdir()?;
    let st = import::load(&hf_dir(st_dir.path())?)?;
    let prompt = tokens("prompt.json", "tokens")?;
    assert_eq!(
        ref_logits(&bin, &prompt, Precision::F64)?,
        ref_logits(&st, &prompt, Precision::F64)?
    );
    Ok(())
}

/// The parity tools work on this family as on NVIDIA's: a record made by the reference is
/// checked by plan-cpu and tract on a compiled directory (no drift), one made by plan-cpu
/// by the reference; and `ngpt perplexity` scores a text on plan-cpu as the IR does.
#[test]
fn snapshot_check_and_perplexity_work_on_a_compiled_directory() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("nt");
    let (out_s, src) = (utf8(&out).to_string(), utf8(&nous_tiny()).to_string());
    ok(ngpt(&["compile", &src, "-o", &out_s])?, "compile")?;
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "53,54,55\n1,2,3,4,5,6,7\n")?;
    let record = |engine: &str| -> Result<String> {
        let p = dir.path().join(format!("{engine}.parity"));
        let ps = utf8(&p).to_string();
        ok(
            ngpt(&[
                "snapshot",
                &out_s,
                "--prompts",
                utf8(&prompts),
                "--engine",
                engine,
                "-o",
                &ps,
            ])?,
            "snapshot",
        )?;
        Ok(ps)
    };
    for (recorded, recompute) in [
        ("reference", "plan-cpu"),
        ("reference", "tract"),
        ("plan-cpu", "reference"),
    ] {
        let p = record(recorded)?;
        let o = ok(
            ngpt(&["check", &p, &out_s, "--engine", recompute])?,
            "check",
        )?;
        ensure!(
            stdout(&o).contains("0 drifted"),
            "{recorded} checked by {recompute}: {}",
            stdout(&o)
        );
    }
    let text = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text/Apache-2.0.txt");
    let ppl = |engine: &str| -> Result<f64> {
        let o = ok(
            ngpt(&[
                "perplexity",
                &out_s,
                "--text",
                utf8(&text),
                "--engine",
                engine,
                "--json",
            ])?,
            "perplexity",
        )?;
        let line = stdout(&o).lines().last().unwrap_or_default().to_string();
        let v: serde_json::Value = serde_json::from_str(&line).context("perplexity --json")?;
        v["perplexity"].as_f64().context("a perplexity")
    };
    let (plan, ir) = (ppl("plan-cpu")?, ppl("ir")?);
    ensure!((plan - ir).abs() < 1e-4 * ir, "plan-cpu {plan} vs ir {ir}");
    Ok(())
}
