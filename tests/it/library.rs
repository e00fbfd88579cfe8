//! The `ngpt` library: `compile::compile_dir` (the library's `ngpt compile`: the same
//! directory as the command writes) and the typed errors a caller matches on, none of whose
//! messages names a flag.

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

#[test]
fn refused_inputs_are_typed_errors_that_name_no_flag() -> Result<()> {
    use ngpt::engines::{Engine, Model};
    use ngpt_compiler::reference::Precision;
    let tiny = common::nv_tiny();
    let named = |e: &anyhow::Error| -> String {
        let text = format!("{e:#}");
        assert!(!text.contains("--"), "names a flag: {text}");
        text
    };
    let mut model = Model::open(&tiny);
    let e = model
        .logits(Engine::PlanCpu, &[3, 9999], Precision::F32)
        .expect_err("outside the vocabulary");
    named(&e);
    assert!(matches!(
        e.downcast_ref::<ngpt::Error>(),
        Some(ngpt::Error::TokenOutsideVocabulary { id: 9999, .. })
    ));
    let e = ngpt::tokens::parse_tokens("1,x", 10).expect_err("not an id");
    named(&e);
    assert!(matches!(
        e.downcast_ref::<ngpt::Error>(),
        Some(ngpt::Error::NotATokenId { item: 2, .. })
    ));
    let vocab = ngpt::tokens::Vocab::find(&tiny)?.expect("nv-tiny has a vocabulary");
    let e = vocab
        .encode("caf\u{e9}")
        .expect_err("é is not in a license text's characters");
    named(&e);
    assert!(matches!(
        e.downcast_ref::<ngpt::Error>(),
        Some(ngpt::Error::CharacterNotInVocabulary { ch: '\u{e9}' })
    ));
    let tmp = tempfile::tempdir()?;
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "1,2\n# a comment\n4,99\n")?;
    let e = ngpt::parity::read_prompts(&prompts, None, 50).expect_err("line 3 is out of range");
    let text = named(&e);
    assert!(text.contains("line 3") && text.contains("99"), "{text}");
    let Some(ngpt::Error::PromptLine {
        line: 3, problem, ..
    }) = e.downcast_ref::<ngpt::Error>()
    else {
        panic!("{text}")
    };
    assert!(matches!(
        problem.downcast_ref::<ngpt::Error>(),
        Some(ngpt::Error::TokenOutOfRange { id: 99, .. })
    ));
    // The command line prints the same refusal with the flag it came from.
    let o = common::ngpt(&[
        "logits",
        tiny.to_str().unwrap(),
        "--engine",
        "plan-cpu",
        "--tokens",
        "3,9999",
        "-o",
        tmp.path().join("l.npy").to_str().unwrap(),
    ])?;
    assert!(
        common::stderr(&o).contains("error: --tokens: token id 9999 (item 2) is out of range"),
        "{}",
        common::stderr(&o)
    );
    Ok(())
}
