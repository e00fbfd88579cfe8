//! `ngpt compile` writes model.onnx; `ngpt logits --engine tract` runs it; through the binary.

use crate::common;

use std::path::Path;
use std::process::Command;

use anyhow::Result;
use ngpt_compiler::compare::compare;
use ngpt_compiler::import;
use ngpt_compiler::reference::Precision;

fn ngpt(args: &[&str]) -> std::process::Output {
    Command::new(common::ngpt_bin())
        .args(args)
        .output()
        .expect("ngpt runs")
}

fn ok(o: &std::process::Output) {
    assert!(
        o.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn compile(out: &Path, extra: &[&str]) {
    let ckpt = common::nv_tiny().join("ckpt.pt");
    let mut args = vec![
        "compile",
        ckpt.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ok(&ngpt(&args));
}

fn prompt() -> Result<(Vec<u32>, String)> {
    let tokens = common::fixture_tokens("prompt.json", "tokens")?;
    let list: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    Ok((tokens, list.join(",")))
}

/// `ngpt logits INPUT --engine tract`, compared with the float64 reference.
fn tract_logits(input: &Path, npy: &Path) -> Result<ngpt_compiler::compare::Comparison> {
    let (tokens, list) = prompt()?;
    ok(&ngpt(&[
        "logits",
        input.to_str().unwrap(),
        "--engine",
        "tract",
        "--tokens",
        &list,
        "-o",
        npy.to_str().unwrap(),
    ]));
    let (dims, _, got) = common::read_npy(npy)?;
    let ckpt = import::load(&common::nv_tiny().join("ckpt.pt"))?;
    assert_eq!(dims, [tokens.len(), ckpt.config.vocab_size]);
    let want = common::ref_logits(&ckpt, &tokens, Precision::F64)?;
    Ok(compare(&got, &want, ckpt.config.vocab_size))
}

#[test]
fn compile_writes_model_onnx_and_tract_runs_it_at_parity() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("c");
    compile(&out, &[]);
    assert!(out.join("model.onnx").is_file());
    assert!(!out.join("model.onnx.data").exists());
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json"))?)?;
    assert!(manifest["files"]
        .as_array()
        .unwrap()
        .contains(&"model.onnx".into()));

    let c = tract_logits(&out, &tmp.path().join("dir.npy"))?;
    assert!(c.passes(1e-5, 1.0), "compiled dir: {c:?}");
    // From a checkpoint: exported in memory.
    let c = tract_logits(&common::nv_tiny(), &tmp.path().join("ckpt.npy"))?;
    assert!(c.passes(1e-5, 1.0), "checkpoint: {c:?}");

    // Same checkpoint, same bytes.
    let again = tmp.path().join("again");
    compile(&again, &[]);
    assert!(
        std::fs::read(out.join("model.onnx"))? == std::fs::read(again.join("model.onnx"))?,
        "two compiles wrote different model.onnx"
    );
    Ok(())
}

#[test]
fn f16_external_data_compiles_and_runs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("c");
    compile(
        &out,
        &[
            "--onnx-dtype",
            "f16",
            "--external-data",
            "--max-seq-len",
            "128",
        ],
    );
    let model = std::fs::metadata(out.join("model.onnx"))?.len();
    let data = std::fs::metadata(out.join("model.onnx.data"))?.len();
    assert!(model < 64 << 10 && data > 200 << 10, "{model} {data}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json"))?)?;
    let files = manifest["files"].as_array().unwrap();
    assert!(files.contains(&"model.onnx".into()) && files.contains(&"model.onnx.data".into()));
    let c = tract_logits(&out, &tmp.path().join("f16.npy"))?;
    assert!(c.passes(1e-2, 0.95), "{c:?}");
    Ok(())
}

#[test]
fn tract_refuses_tokens_beyond_the_position_table_in_one_line() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("c");
    compile(&out, &["--max-seq-len", "8"]);
    let npy = tmp.path().join("x.npy");
    let o = ngpt(&[
        "logits",
        out.to_str().unwrap(),
        "--engine",
        "tract",
        "--tokens",
        "1,2,3,4,5,6,7,8,9",
        "-o",
        npy.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error:") && err.contains("8 rows") && err.contains("--max-seq-len 9"),
        "{err}"
    );
    assert!(!npy.exists());

    // A compiled directory without model.onnx (an older compile) says so.
    std::fs::remove_file(out.join("model.onnx"))?;
    let o = ngpt(&[
        "logits",
        out.to_str().unwrap(),
        "--engine",
        "tract",
        "--tokens",
        "1,2",
        "-o",
        npy.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no model.onnx"), "{err}");
    Ok(())
}

#[test]
fn demo_reports_onnx_parity() {
    let o = ngpt(&["demo", "--new-tokens", "2"]);
    ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("model.onnx")).collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("f32") && lines[0].contains("top-1 64/64"),
        "{text}"
    );
    assert!(lines[1].contains("f16"), "{text}");
}
