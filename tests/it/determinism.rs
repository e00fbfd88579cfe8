//! Determinism (issue 8): the same checkpoint compiles to byte-identical artifacts, and the
//! plan's CPU executor gives bitwise-identical logits from run to run.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use common::*;
use ngpt_runtime::plan::LoadedPlan;
use ngpt_runtime::session::Session;

fn utf8(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn ngpt(args: &[&str], envs: &[(&str, &str)]) -> Result<()> {
    let o = Command::new(ngpt_bin())
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .with_context(|| format!("running ngpt {args:?}"))?;
    ensure!(
        o.status.success(),
        "ngpt {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

fn files(dir: &Path) -> Result<Vec<String>> {
    let mut v = std::fs::read_dir(dir)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>>>()?;
    v.sort();
    Ok(v)
}

/// Asserts `a/f` and `b/f` hold the same bytes for each of `names`.
fn same_files(a: &Path, b: &Path, names: &[String]) -> Result<()> {
    for f in names {
        let (x, y) = (std::fs::read(a.join(f))?, std::fs::read(b.join(f))?);
        assert!(!x.is_empty(), "{f} is empty");
        assert!(
            x == y,
            "{f} differs between two compiles of the same checkpoint ({} vs {} bytes, first difference at byte {:?})",
            x.len(),
            y.len(),
            x.iter().zip(&y).position(|(p, q)| p != q)
        );
    }
    Ok(())
}

/// Compiles nv-tiny's ckpt.pt twice, then a copy of it at another path, with the default
/// options and with bf16 plan weights, f16 ONNX weights in external data.
#[test]
fn the_same_checkpoint_compiles_to_identical_bytes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = nv_tiny().join("ckpt.pt");
    let copy_dir = tmp.path().join("elsewhere");
    std::fs::create_dir(&copy_dir)?;
    let copy = copy_dir.join("ckpt.pt");
    std::fs::copy(&src, &copy)?;
    for (tag, extra) in [
        ("default", &[][..]),
        (
            "bf16-f16-external",
            &[
                "--dtype",
                "bf16",
                "--onnx-dtype",
                "f16",
                "--external-data",
                "--max-seq-len",
                "128",
            ][..],
        ),
    ] {
        let dirs: Vec<_> = ["a", "b", "copy"]
            .iter()
            .map(|n| tmp.path().join(format!("{tag}-{n}")))
            .collect();
        for (dir, input) in dirs.iter().zip([&src, &src, &copy]) {
            let mut args = vec!["compile", utf8(input), "-o", utf8(dir)];
            args.extend_from_slice(extra);
            ngpt(&args, &[])?;
        }
        let names = files(&dirs[0])?;
        for must in ["model.onnx", "model.plan", "model.weights"] {
            assert!(
                names.iter().any(|n| n == must),
                "{tag}: no {must}: {names:?}"
            );
        }
        if tag != "default" {
            assert!(names.iter().any(|n| n == "model.onnx.data"), "{names:?}");
        }
        assert_eq!(files(&dirs[1])?, names);
        assert_eq!(files(&dirs[2])?, names);
        // passes.txt is the compile's log, with each pass's wall-clock time: the same but
        // for the times.
        let log = |d: &Path| -> Result<String> {
            let text = std::fs::read_to_string(d.join("passes.txt"))?;
            // ` 1 fold_scaling     13 rewrites     0.573 ms` -> ` 1 fold_scaling     13 rewrites`
            Ok(text
                .lines()
                .map(
                    |l| match l.strip_suffix(" ms").and_then(|l| l.rsplit_once(' ')) {
                        Some((rest, time)) if time.parse::<f64>().is_ok() => rest.trim_end(),
                        _ => l,
                    },
                )
                .collect::<Vec<_>>()
                .join("\n"))
        };
        let first_log = log(&dirs[0])?;
        assert!(first_log.contains("fuse_qkv"), "{first_log}");
        for d in &dirs[1..] {
            assert_eq!(
                log(d)?,
                first_log,
                "{tag}: pass logs differ beyond their times"
            );
        }
        // The same path: every other file, manifest included.
        let others: Vec<String> = names
            .iter()
            .filter(|n| n.as_str() != "passes.txt")
            .cloned()
            .collect();
        same_files(&dirs[0], &dirs[1], &others)?;
        // Another path to the same bytes: all but the manifest, which records the source
        // path. The artifacts record the source by sha256 and file name only.
        let artifacts: Vec<String> = others
            .iter()
            .filter(|n| n.as_str() != "manifest.json")
            .cloned()
            .collect();
        same_files(&dirs[0], &dirs[2], &artifacts)?;
    }
    Ok(())
}

/// `ngpt logits --engine plan-cpu` twice on the same compiled directory: the same .npy
/// bytes. Also with one rayon thread against the default pool, as the GEMMs split work
/// across threads.
#[test]
fn plan_cpu_logits_are_bitwise_identical_run_to_run() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("c");
    ngpt(
        &[
            "compile",
            utf8(&nv_tiny().join("ckpt.pt")),
            "-o",
            utf8(&dir),
            "--max-seq-len",
            "128",
        ],
        &[],
    )?;
    let tokens: Vec<String> = fixture_tokens("prompt.json", "tokens")?
        .iter()
        .map(|t| t.to_string())
        .collect();
    let tokens = tokens.join(",");
    let mut outs = vec![];
    for (name, envs) in [
        ("a", &[][..]),
        ("b", &[][..]),
        ("one-thread", &[("RAYON_NUM_THREADS", "1")][..]),
        ("three-threads", &[("RAYON_NUM_THREADS", "3")][..]),
    ] {
        let npy = tmp.path().join(format!("{name}.npy"));
        ngpt(
            &[
                "logits",
                utf8(&dir),
                "--engine",
                "plan-cpu",
                "--tokens",
                &tokens,
                "-o",
                utf8(&npy),
            ],
            envs,
        )?;
        outs.push((name, std::fs::read(&npy)?));
    }
    let (dims, _, values) = read_npy(&tmp.path().join("a.npy"))?;
    assert_eq!(dims, [tokens.split(',').count(), 86]);
    assert!(values.iter().all(|v| v.is_finite()));
    for (name, bytes) in &outs[1..] {
        assert!(
            *bytes == outs[0].1,
            "plan-cpu logits of run `{name}` differ from run `a`"
        );
    }
    Ok(())
}

/// Through the library: a ragged batch (prompts of 7 and 3 tokens) then three decode steps,
/// in two fresh sessions and again in the first session after a restart by prefill: every
/// logit bitwise identical.
#[test]
fn ragged_batches_are_bitwise_identical_run_to_run() -> Result<()> {
    use ngpt_compiler::plan::{lower, WeightDtype};
    use ngpt_compiler::{compile, import};
    use ngpt_schemas::prost::Message;
    let ckpt = import::load(&nv_tiny().join("ckpt.pt"))?;
    let compiled = compile::compile(&ckpt, &compile::Options::default())?;
    let l = lower(&compiled.graph, &ckpt.config, WeightDtype::F32, 64, "")?;
    let plan = Arc::new(LoadedPlan::from_bytes(
        &l.plan.encode_to_vec(),
        &l.weights,
        "model.plan",
    )?);
    let prompt = fixture_tokens("prompt.json", "tokens")?;
    let prompts = vec![prompt[..7].to_vec(), prompt[7..10].to_vec()];
    let run = |s: &mut Session| -> Result<Vec<u32>> {
        let mut bits: Vec<u32> = s.prefill(&prompts)?.iter().map(|v| v.to_bits()).collect();
        for step in 0..3u32 {
            let next = [step + 1, step + 2];
            bits.extend(s.decode(&next)?.iter().map(|v| v.to_bits()));
        }
        Ok(bits)
    };
    let mut first = Session::new(Arc::clone(&plan), 2)?;
    let a = run(&mut first)?;
    let b = run(&mut Session::new(Arc::clone(&plan), 2)?)?;
    let again = run(&mut first)?;
    assert_eq!(a.len(), (2 * 7 + 3 * 2) * 86);
    assert!(a == b, "two sessions differ");
    assert!(
        a == again,
        "a session restarted by prefill differs from a fresh one"
    );
    Ok(())
}

/// nv-tiny compiled and lowered to f32 and bf16 plans of KV capacity 64.
fn nv_tiny_plans() -> Result<Vec<(ngpt_compiler::plan::WeightDtype, Arc<LoadedPlan>)>> {
    use ngpt_compiler::plan::{lower, WeightDtype};
    use ngpt_compiler::{compile, import};
    use ngpt_schemas::prost::Message;
    let ckpt = import::load(&nv_tiny().join("ckpt.pt"))?;
    let compiled = compile::compile(&ckpt, &compile::Options::default())?;
    [WeightDtype::F32, WeightDtype::Bf16]
        .into_iter()
        .map(|dtype| {
            let l = lower(&compiled.graph, &ckpt.config, dtype, 64, "")?;
            let plan = LoadedPlan::from_bytes(&l.plan.encode_to_vec(), &l.weights, "model.plan")?;
            Ok((dtype, Arc::new(plan)))
        })
        .collect()
}

/// Batch invariance: with at most `cpu::weight_gemm::MAX_N` rows a GEMM computes each row on its own
/// (and attention each (row, head) pair), so a sequence's prefill and decode logits are the
/// same bits alone as in a ragged batch of three, f32 and bf16 weights alike.
#[test]
fn a_sequence_gives_the_same_bits_alone_and_in_a_batch() -> Result<()> {
    let prompt = fixture_tokens("prompt.json", "tokens")?;
    let prompts = vec![
        prompt[..7].to_vec(),
        prompt[7..10].to_vec(),
        prompt[2..7].to_vec(),
    ];
    let steps: [[u32; 3]; 3] = [[5, 17, 2], [40, 1, 9], [3, 3, 60]];
    for (dtype, plan) in nv_tiny_plans()? {
        let vocab = 86;
        let mut batch = Session::new(Arc::clone(&plan), 3)?;
        let t = 7;
        let pre = batch.prefill(&prompts)?;
        let dec: Vec<Vec<f32>> = steps
            .iter()
            .map(|next| batch.decode(next))
            .collect::<Result<_, _>>()?;
        for (b, p) in prompts.iter().enumerate() {
            let mut alone = Session::new(Arc::clone(&plan), 1)?;
            let want = alone.prefill(std::slice::from_ref(p))?;
            let got = &pre[b * t * vocab..(b * t + p.len()) * vocab];
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(
                bits(got) == bits(&want),
                "{dtype:?}: prefill of sequence {b} differs alone"
            );
            assert!(want.iter().all(|v| v.is_finite()));
            for (i, next) in steps.iter().enumerate() {
                let want = alone.decode(&[next[b]])?;
                assert!(
                    bits(&dec[i][b * vocab..(b + 1) * vocab]) == bits(&want),
                    "{dtype:?}: decode step {i} of sequence {b} differs alone"
                );
            }
        }
    }
    Ok(())
}

/// Batch invariance over a prompt-sized call: six prompts of 12 to 50 tokens prefilled
/// together are one call of 300 rows (six sequences padded to 50), past the 32 the engine
/// promises and within `cpu::tiles::GEMM_MAX_N` (512), where f32 and bf16 weight GEMMs
/// still compute each row on its own: each sequence's logits are the bits it gets alone.
#[test]
fn a_prompt_gives_the_same_bits_alone_and_in_a_300_row_call() -> Result<()> {
    let vocab = 86;
    let lens = [50usize, 31, 44, 50, 12, 47];
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(b, &n)| (0..n).map(|i| ((i * 7 + b * 13) % vocab) as u32).collect())
        .collect();
    let t = 50;
    for (dtype, plan) in nv_tiny_plans()? {
        let mut batch = Session::new(Arc::clone(&plan), lens.len())?;
        let pre = batch.prefill(&prompts)?;
        assert_eq!(pre.len(), lens.len() * t * vocab);
        for (b, p) in prompts.iter().enumerate() {
            let mut alone = Session::new(Arc::clone(&plan), 1)?;
            let want = alone.prefill(std::slice::from_ref(p))?;
            let got = &pre[b * t * vocab..(b * t + p.len()) * vocab];
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(want.iter().all(|v| v.is_finite()));
            assert!(
                bits(got) == bits(&want),
                "{dtype:?}: prefill of sequence {b} ({} tokens) differs alone",
                p.len()
            );
        }
    }
    Ok(())
}
