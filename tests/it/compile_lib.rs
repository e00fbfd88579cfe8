//! `ngpt::compile::compile_dir`, the library's `ngpt compile`: the same directory as the
//! command writes, and typed errors a caller can match on (none naming a flag).

use crate::common;

use anyhow::Result;
use ngpt::compile::{compile_dir, Error, OnnxWeights, Options, PlanWeights};
use ngpt_compiler::quant::{Bits, Options as Quant};

fn read(dir: &std::path::Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn compile_dir_writes_what_the_command_writes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ckpt = common::nv_tiny().join("ckpt.pt");
    let lib = tmp.path().join("lib");
    let opts = Options {
        plan: PlanWeights::Bf16,
        max_seq_len: Some(96),
        ..Options::default()
    };
    let done = compile_dir(&ckpt, &lib, &opts)?;
    assert_eq!(done.max_seq_len, 96);
    assert!(done.ir_nodes > 0);
    assert!(done.onnx.as_ref().is_some_and(|w| w.model_bytes > 0));
    assert!(
        done.notes.iter().any(|n| n.contains("no tokenizer.json")),
        "{:?}",
        done.notes
    );
    let cli = tmp.path().join("cli");
    let o = common::ngpt(&[
        "compile",
        ckpt.to_str().unwrap(),
        "-o",
        cli.to_str().unwrap(),
        "--dtype",
        "bf16",
        "--max-seq-len",
        "96",
    ])?;
    assert!(o.status.success(), "{}", common::stderr(&o));
    for f in &done.files {
        if f == "passes.txt" || f == "manifest.json" {
            continue; // pass times
        }
        assert!(read(&lib, f) == read(&cli, f), "{f} differs");
    }
    assert_eq!(done.files.len(), std::fs::read_dir(&lib)?.count());

    // A compiled directory as input: its source is compiled, and the note says so.
    let again = compile_dir(
        &lib,
        &tmp.path().join("again"),
        &Options {
            onnx: None,
            ..Options::default()
        },
    )?;
    assert!(again.notes[0].contains("is a compiled directory; using its source"));
    assert!(!again.files.iter().any(|f| f == "model.onnx"));
    Ok(())
}

#[test]
fn compile_dir_errors_are_typed_and_name_no_flags() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ckpt = common::nv_tiny().join("ckpt.pt");
    let out = tmp.path().join("out");
    let check = |opts: &Options| -> Error {
        let e = compile_dir(&ckpt, &out, opts).expect_err("refused");
        assert!(!e.to_string().contains("--"), "names a flag: {e}");
        assert!(!out.exists(), "nothing written for: {e}");
        e
    };
    let e = check(&Options {
        stop_after: Some(999),
        ..Options::default()
    });
    assert!(matches!(e, Error::StopAfter { requested: 999, passes } if passes > 0));
    let e = check(&Options {
        plan: PlanWeights::Quantized,
        ..Options::default()
    });
    assert!(matches!(e, Error::Options(_)), "{e}");
    let e = check(&Options {
        onnx: Some(OnnxWeights::F16),
        quantize: Some(Quant::new(Bits::Int8)),
        ..Options::default()
    });
    assert!(matches!(e, Error::Options(_)), "{e}");
    let e = check(&Options {
        quantize: Some(Quant {
            block: 24,
            ..Quant::new(Bits::Int4)
        }),
        ..Options::default()
    });
    assert!(
        matches!(e, Error::Compiler(_)) && e.to_string().contains("24"),
        "{e}"
    );

    // An existing directory stays as it was unless `replace`.
    std::fs::create_dir(&out)?;
    std::fs::write(out.join("keep"), b"x")?;
    let o = Options {
        onnx: None,
        ..Options::default()
    };
    let e = compile_dir(&ckpt, &out, &o).expect_err("exists");
    assert!(
        matches!(
            e,
            Error::Compiler(ngpt_compiler::Error::OutputExists { .. })
        ),
        "{e}"
    );
    assert_eq!(read(&out, "keep"), b"x");
    compile_dir(&ckpt, &out, &Options { replace: true, ..o })?;
    assert!(!out.join("keep").exists() && out.join("model.plan").is_file());
    Ok(())
}
