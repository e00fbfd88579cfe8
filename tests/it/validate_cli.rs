//! `ngpt validate`: the parity table of every engine, and its exit code.

use crate::common;

use std::path::Path;

use anyhow::Result;
use common::*;
use ngpt_compiler::init;

/// The table row of `engine` computing in `numerics`, if printed.
fn row<'a>(stdout: &'a str, engine: &str, numerics: &str) -> Option<&'a str> {
    stdout.lines().find(|l| {
        let mut words = l.split_whitespace();
        words.next() == Some(engine) && l.contains(numerics)
    })
}

/// A perturbed-scale model with base_scale 1/32 and BF16 blocks, compiled with bf16 plan
/// weights and f16 ONNX weights.
fn compiled(dir: &Path, extra: &[&str]) -> Result<std::path::PathBuf> {
    let mut o = small_opts();
    o.n_layer = 2;
    o.n_embd = 32;
    o.n_head = 4;
    o.vocab_size = 41;
    o.base_scale = Some(1.0 / 32.0);
    o.bf16 = true;
    let ckpt = dir.join("ckpt");
    init::write(&ckpt, &o)?;
    let out = dir.join("out");
    let mut args = vec![
        "compile",
        ckpt.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = ngpt(&args)?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Ok(out)
}

#[test]
fn every_engine_within_tolerance_on_f32_and_reduced_precision_dirs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for (name, extra, plan_numerics, onnx_numerics) in [
        ("f32", &[][..], "f32", "f32"),
        (
            "reduced",
            &["--dtype", "bf16", "--onnx-dtype", "f16"][..],
            "bf16 weights",
            "f16 weights",
        ),
    ] {
        let out = compiled(&tmp.path().join(name), extra)?;
        let o = ngpt(&[
            "validate",
            out.to_str().unwrap(),
            "--tokens",
            "3,40,7,7,1,22,39,5,11",
        ])?;
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{name}: {stdout}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(stdout.contains("9 positions"), "{stdout}");
        for (engine, numerics) in [
            ("reference", "f32"),
            ("ir", "f64"),
            ("ir", "f32"),
            ("tract", onnx_numerics),
            ("plan-cpu", plan_numerics),
        ] {
            let line = row(&stdout, engine, numerics)
                .unwrap_or_else(|| panic!("{name}: no {engine} {numerics} row in\n{stdout}"));
            assert!(line.ends_with(" ok"), "{name}: {line}");
            assert!(
                line.contains("9/9") || numerics.contains("weights"),
                "{line}"
            );
        }
        // plan-cuda is either run or skipped with its reason, never silently absent.
        let cuda = row(&stdout, "plan-cuda", "").expect("a plan-cuda row");
        assert!(cuda.contains(" ok") || cuda.contains("skipped: "), "{cuda}");
    }
    Ok(())
}

#[test]
fn a_corrupted_weights_file_fails_validation_with_the_engine_named() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = compiled(tmp.path(), &[])?;
    // Flip one exponent bit of every f32 in the first quarter of model.weights: the plan
    // still loads (its sizes are intact) but computes something else.
    let path = out.join("model.weights");
    let mut bytes = std::fs::read(&path)?;
    let quarter = bytes.len() / 4 / 4;
    for i in 0..quarter {
        bytes[i * 4 + 3] ^= 0x01;
    }
    std::fs::write(&path, bytes)?;
    let o = ngpt(&[
        "validate",
        out.to_str().unwrap(),
        "--engines",
        "ir,plan-cpu",
    ])?;
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stdout}\n{stderr}");
    let plan = row(&stdout, "plan-cpu", "f32").expect("plan-cpu row");
    assert!(plan.ends_with("FAIL"), "{plan}");
    assert!(row(&stdout, "ir", "f64").expect("ir row").ends_with(" ok"));
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors,
        ["error: validate: beyond tolerance or failed: plan-cpu (table above)"]
    );
    Ok(())
}

#[test]
fn bad_engine_lists_and_tokens_are_one_line_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = compiled(tmp.path(), &[])?;
    let dir = out.to_str().unwrap();
    for (args, expect) in [
        (
            vec!["validate", dir, "--engines", "ir,onnxruntime"],
            "--engines: unknown engine `onnxruntime`",
        ),
        (vec!["validate", dir, "--tokens", "1,41"], "41"),
        (vec!["validate", dir, "--tokens", ""], "--tokens"),
    ] {
        let o = ngpt(&args)?;
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("note:")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(
            lines[0].starts_with("error:") && lines[0].contains(expect),
            "{stderr}"
        );
    }
    Ok(())
}
