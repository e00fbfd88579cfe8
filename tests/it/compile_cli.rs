//! `ngpt compile` and `ngpt logits --engine ir` through the binary.

use crate::common;

use std::process::Command;

use anyhow::Result;
use ngpt_compiler::compare::compare;
use ngpt_compiler::import;
use ngpt_compiler::reference::Precision;

fn ngpt(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ngpt"))
        .args(args)
        .output()
        .expect("ngpt runs")
}

fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn compile_writes_the_directory_and_ir_logits_match_the_reference() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("c");
    let ckpt_path = common::nv_tiny().join("ckpt.pt");
    let o = ngpt(&[
        "compile",
        ckpt_path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        entries(&out),
        [
            "ir.txt",
            "manifest.json",
            "model.onnx",
            "model.plan",
            "model.weights",
            "passes.txt"
        ]
    );
    assert_eq!(
        entries(tmp.path()),
        ["c"],
        "no temporary directory left beside the output"
    );
    let ir = std::fs::read_to_string(out.join("ir.txt"))?;
    assert!(ir.contains("lerp_norm") && ir.contains("pos_norm") && ir.contains("swiglu"));
    let passes = std::fs::read_to_string(out.join("passes.txt"))?;
    assert_eq!(
        passes.lines().filter(|l| l.contains("rewrites")).count(),
        10
    );

    // logits --engine ir on the compiled directory uses the recorded source.
    let tokens = common::fixture_tokens("prompt.json", "tokens")?;
    let list: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let npy = tmp.path().join("ir.npy");
    let o = ngpt(&[
        "logits",
        out.to_str().unwrap(),
        "--engine",
        "ir",
        "--precision",
        "f32",
        "--tokens",
        &list.join(","),
        "-o",
        npy.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (dims, _, got) = common::read_npy(&npy)?;
    let ckpt = import::load(&ckpt_path)?;
    assert_eq!(dims, [tokens.len(), ckpt.config.vocab_size]);
    let want = common::ref_logits(&ckpt, &tokens, Precision::F64)?;
    let c = compare(&got, &want, ckpt.config.vocab_size);
    assert!(c.passes(1e-5, 1.0), "{c:?}");
    Ok(())
}

#[test]
fn compile_refuses_an_occupied_directory_and_force_replaces_it_whole() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("c");
    std::fs::create_dir(&out)?;
    std::fs::write(out.join("old.txt"), "old")?;
    let src = common::nv_tiny();
    let o = ngpt(&[
        "compile",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--force")
            && err.lines().count() >= 1
            && err.lines().last().unwrap().starts_with("error:"),
        "{err}"
    );
    assert_eq!(entries(&out), ["old.txt"]);
    let o = ngpt(&[
        "compile",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--force",
        "--stop-after",
        "3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A partial compile has no plan (plans need the canonical form); every IR op exports.
    assert_eq!(
        entries(&out),
        ["ir.txt", "manifest.json", "model.onnx", "passes.txt"]
    );
    assert_eq!(entries(tmp.path()), ["c"]);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json"))?)?;
    assert_eq!(manifest["stop_after"], 3);
    assert_eq!(manifest["passes"].as_array().unwrap().len(), 3);
    Ok(())
}

#[test]
fn a_failed_compile_leaves_nothing_behind() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("c");
    let o = ngpt(&[
        "compile",
        tmp.path().join("missing.pt").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(entries(tmp.path()).is_empty());
    let o = ngpt(&[
        "compile",
        common::nv_tiny().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--stop-after",
        "99",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--stop-after 99"));
    assert!(entries(tmp.path()).is_empty());
    Ok(())
}

#[test]
fn a_compiled_directory_whose_source_changed_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("m");
    std::fs::create_dir(&src)?;
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(common::nv_tiny().join(f), src.join(f))?;
    }
    let out = tmp.path().join("c");
    assert!(ngpt(&[
        "compile",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap()
    ])
    .status
    .success());
    let mut bytes = std::fs::read(src.join("model.safetensors"))?;
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(src.join("model.safetensors"), bytes)?;
    let npy = tmp.path().join("x.npy");
    let o = ngpt(&[
        "logits",
        out.to_str().unwrap(),
        "--engine",
        "ir",
        "--tokens",
        "1,2",
        "-o",
        npy.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("changed since it was compiled"));
    assert!(!npy.exists());
    Ok(())
}

/// A position table too large for the memory the process may still allocate is refused in
/// one line before it is built (an allocation that fails would abort the process), and
/// nothing is written; the same limit leaves the default table alone.
#[test]
fn a_position_table_too_large_for_memory_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("c");
    let run = |extra: &str| {
        let cmd = format!(
            "ulimit -v 4000000 && MALLOC_ARENA_MAX=2 exec \"$0\" compile \"$1\" -o \"$2\" {extra}"
        );
        Command::new("bash")
            .args([
                "-c",
                &cmd,
                env!("CARGO_BIN_EXE_ngpt"),
                common::nv_tiny().join("ckpt.pt").to_str().unwrap(),
                out.to_str().unwrap(),
            ])
            .output()
            .expect("bash runs")
    };
    // 100,000,000 rows of head_dim 32: 25.6 GB in f64 alone.
    let o = run("--max-seq-len 100000000");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: --max-seq-len 100000000 needs about 76.8 GB (for the position table, 100000000 x 32 values)"),
        "{err}"
    );
    assert!(entries(tmp.path()).is_empty());
    let o = run("");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("model.plan").exists());
    Ok(())
}
