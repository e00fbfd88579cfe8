//! The `ngpt` binary as a user runs it: exit codes, one-line errors, no files left
//! behind on failure, outputs equal to the library's, and `--help` with examples.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{Context, Result};
use candle_core::DType;
use common::*;
use ngpt_compiler::import;
use ngpt_compiler::reference::Precision;

/// The run failed the way the CLI contract says: non-zero exit, one stderr line starting
/// with `error:`, and nothing that looks like a panic.
fn assert_clean_failure(o: &Output, what: &str) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "{what}: exited 0; stderr: {err}");
    assert_ne!(
        o.status.code(),
        Some(101),
        "{what}: exit code 101 is a panic"
    );
    assert!(!err.contains("panicked"), "{what}: panic text: {err}");
    assert!(!err.contains("RUST_BACKTRACE"), "{what}: panic text: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: stderr is not one line: {err}");
    assert!(lines[0].starts_with("error: "), "{what}: {err}");
    // A cause printed twice ("...: No such file (os error 2): No such file (os error 2)")
    // is noise the user has to read past.
    let parts: Vec<&str> = lines[0].split(": ").collect();
    for pair in parts.windows(2) {
        assert_ne!(pair[0], pair[1], "{what}: repeated cause: {err}");
    }
    err
}

fn dir_listing(dir: &Path) -> Result<Vec<String>> {
    let mut v = std::fs::read_dir(dir)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>>>()?;
    v.sort();
    Ok(v)
}

/// Reads `F64: relative error 9.48e-8 ...` from the demo's output.
fn demo_rel_err(out: &str, label: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.trim_start().starts_with(label))?;
    let rest = line.split("relative error ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn demo_runs_and_prints_parity() -> Result<()> {
    let o = ngpt(&["demo"])?;
    let out = stdout(&o);
    assert!(o.status.success(), "demo failed: {}", stderr(&o));
    assert!(
        stderr(&o).is_empty(),
        "demo wrote to stderr: {}",
        stderr(&o)
    );
    for needle in ["1. import", "2. inspect", "3. reference", "4. greedy"] {
        assert!(out.contains(needle), "demo lacks {needle:?}:\n{out}");
    }
    let f64_err = demo_rel_err(&out, "F64:").context("F64 parity line")?;
    let f32_err = demo_rel_err(&out, "F32:").context("F32 parity line")?;
    assert!(f64_err <= 1e-6, "demo F64 rel err {f64_err}");
    assert!(f32_err <= 1e-5, "demo F32 rel err {f32_err}");
    assert_eq!(out.matches("top-1 agreement 64/64").count(), 2, "{out}");
    // greedy.json's greedy_text: the continuation NVIDIA's code produced.
    let greedy = fixture_json("greedy.json")?;
    let text = greedy["greedy_text"].as_str().context("greedy_text")?;
    assert!(
        out.contains(&format!("{text:?}")),
        "greedy text missing:\n{out}"
    );
    // More new tokens than the demo takes: one line, at once (it used to run the
    // full-forward greedy reference until memory ran out).
    let o = ngpt(&["demo", "--new-tokens", "18446744073709551615"])?;
    let err = assert_clean_failure(&o, "demo --new-tokens");
    assert!(err.contains("at most 1000"), "{err}");
    Ok(())
}

#[test]
fn logits_writes_float32_npy_equal_to_the_library() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let input = nv_tiny().join("ckpt.pt");
    let ckpt = import::load(&input)?;
    let tokens = [45u32, 64, 77, 72, 3];
    let list = "45,64,77,72,3";
    for (flag, p) in [("f64", Precision::F64), ("f32", Precision::F32)] {
        let out = tmp.path().join(format!("sub/{flag}.npy"));
        let o = ngpt(&[
            "logits",
            input.to_str().context("utf-8 path")?,
            "--tokens",
            list,
            "-o",
            out.to_str().context("utf-8 path")?,
            "--precision",
            flag,
        ])?;
        assert!(o.status.success(), "{flag}: {}", stderr(&o));
        assert!(stdout(&o).contains("[5 x 86]"), "{}", stdout(&o));
        let (dims, dtype, values) = read_npy(&out)?;
        assert_eq!(dims, vec![tokens.len(), 86]);
        assert_eq!(dtype, DType::F32);
        let want: Vec<f32> = ref_logits(&ckpt, &tokens, p)?
            .iter()
            .map(|v| *v as f32)
            .collect();
        let got: Vec<f32> = values.iter().map(|v| *v as f32).collect();
        assert!(
            got.iter()
                .map(|v| v.to_bits())
                .eq(want.iter().map(|v| v.to_bits())),
            "{flag}: CLI logits differ from the library's"
        );
    }
    assert_eq!(
        dir_listing(&tmp.path().join("sub"))?,
        ["f32.npy", "f64.npy"]
    );
    Ok(())
}

#[test]
fn logits_on_a_directory_notes_which_file_it_read() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("l.npy");
    let o = ngpt(&[
        "logits",
        nv_tiny().to_str().context("utf-8")?,
        "--tokens",
        "1,2",
        "-o",
        out.to_str().context("utf-8")?,
    ])?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).starts_with("note: "), "{}", stderr(&o));
    assert!(stderr(&o).contains("reading ckpt.pt"), "{}", stderr(&o));
    assert!(out.is_file());
    Ok(())
}

#[test]
fn logits_bad_inputs_fail_cleanly_and_leave_nothing() -> Result<()> {
    let ckpt = nv_tiny().join("ckpt.pt");
    let ckpt = ckpt.to_str().context("utf-8")?;
    let tmp = tempfile::tempdir()?;
    let missing = tmp.path().join("missing.pt");
    let missing = missing.to_str().context("utf-8")?;
    let not_ckpt = nv_tiny().join("vocab.json");
    let not_ckpt = not_ckpt.to_str().context("utf-8")?;
    // (what, input, --tokens value, text the one error line must hold)
    let cases: [(&str, &str, &str, &str); 8] = [
        ("unknown file", missing, "1,2", "missing.pt"),
        ("not a checkpoint", not_ckpt, "1,2", "vocab.json"),
        ("non-integer token", ckpt, "5,x", "`x`"),
        ("negative token", ckpt, "-1", "out of range"),
        ("negative token later", ckpt, "3,-1", "out of range"),
        (
            "token id = vocab",
            ckpt,
            "86",
            "out of range; expected 0..85",
        ),
        ("empty tokens", ckpt, "", "empty"),
        ("empty item", ckpt, "1,,2", "item 2"),
    ];
    let mut lines = String::new();
    for (what, input, tokens, needle) in cases {
        let out_dir = tmp.path().join("out");
        let out = out_dir.join("logits.npy");
        let o = ngpt(&[
            "logits",
            input,
            "--tokens",
            tokens,
            "-o",
            out.to_str().context("utf-8")?,
        ])?;
        let err = assert_clean_failure(&o, what);
        assert!(err.contains(needle), "{what}: lacks {needle:?}: {err}");
        assert!(!out.exists(), "{what}: output file left behind");
        if out_dir.exists() {
            assert!(
                dir_listing(&out_dir)?.is_empty(),
                "{what}: files left behind"
            );
        }
        lines += &format!(
            "{what}: {}",
            err.replace(&tmp.path().display().to_string(), "<TMP>")
        );
        lines = lines.replace(&nv_tiny().display().to_string(), "<FIXTURE>");
    }
    assert_eq!(dir_listing(tmp.path())?, Vec::<String>::new());
    insta::assert_snapshot!(lines);
    Ok(())
}

#[test]
fn inspect_reports_the_fixture() -> Result<()> {
    let o = ngpt(&[
        "inspect",
        nv_tiny().join("ckpt.pt").to_str().context("utf-8")?,
    ])?;
    let out = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    for needle in [
        "\"n_embd\": 64",
        "transformer.h.1.c_fc.weight",
        "BF16",
        "|attn_alpha_eff|",
        "sz_eff",
        "normal for BF16 matrices",
    ] {
        assert!(out.contains(needle), "inspect lacks {needle:?}:\n{out}");
    }
    let o = ngpt(&["inspect", "/nonexistent/ngpt/ckpt.pt"])?;
    assert_clean_failure(&o, "inspect of a missing file");
    Ok(())
}

#[test]
fn init_cli_is_deterministic_and_refuses_bad_dims() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut bytes = vec![];
    for name in ["a", "b"] {
        let dir = tmp.path().join(name);
        let o = ngpt(&[
            "init",
            dir.to_str().context("utf-8")?,
            "--layers",
            "1",
            "--embd",
            "32",
            "--vocab",
            "50",
            "--seed",
            "4",
            "--bf16",
        ])?;
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).contains("BF16"), "{}", stdout(&o));
        bytes.push(std::fs::read(dir.join("model.safetensors"))?);
        assert_eq!(import::load(&dir)?.config.vocab_size, 50);
    }
    assert!(bytes[0] == bytes[1], "init via CLI is not deterministic");

    let bad = tmp.path().join("bad");
    let o = ngpt(&[
        "init",
        bad.to_str().context("utf-8")?,
        "--embd",
        "30",
        "--heads",
        "4",
    ])?;
    let err = assert_clean_failure(&o, "init with n_embd 30, 4 heads");
    assert!(err.contains("not divisible"), "{err}");
    assert!(!bad.exists(), "init left a directory behind");
    Ok(())
}

#[test]
fn every_subcommand_help_has_an_example() -> Result<()> {
    let top = ngpt(&["--help"])?;
    assert!(top.status.success());
    let text = stdout(&top);
    // The subcommands listed under "Commands:", so a new one is covered automatically.
    let subcommands: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    for must in ["demo", "init", "inspect", "logits"] {
        assert!(
            subcommands.iter().any(|c| c == must),
            "{must} not in:\n{text}"
        );
    }
    for sub in &subcommands {
        let o = ngpt(&[sub, "--help"])?;
        assert!(o.status.success(), "{sub} --help failed");
        let help = stdout(&o);
        assert!(
            help.contains("Example"),
            "{sub} --help has no example:\n{help}"
        );
        assert!(
            help.contains(&format!("ngpt {sub}")),
            "{sub} example does not run {sub}"
        );
    }
    Ok(())
}

#[test]
fn errors_stay_one_line_with_rust_backtrace_set() -> Result<()> {
    // candle attaches a multi-line backtrace to its errors when RUST_BACKTRACE is set; the
    // CLI must still print one line. A truncated safetensors file fails inside candle.
    let tmp = tempfile::tempdir()?;
    let bytes = std::fs::read(nv_tiny().join("model.safetensors"))?;
    std::fs::write(
        tmp.path().join("model.safetensors"),
        &bytes[..bytes.len() - 100],
    )?;
    std::fs::copy(
        nv_tiny().join("config.json"),
        tmp.path().join("config.json"),
    )?;
    for backtrace in ["1", "full"] {
        let o = Command::new(ngpt_bin())
            .args(["inspect", tmp.path().to_str().context("utf-8")?])
            .env("RUST_BACKTRACE", backtrace)
            .env("RUST_LIB_BACKTRACE", backtrace)
            .output()?;
        let err = assert_clean_failure(&o, "truncated safetensors");
        assert!(err.contains("not a valid safetensors file"), "{err}");
        assert!(!err.contains("candle_core::"), "backtrace frames: {err}");
        assert!(err.len() < 300, "{} bytes: {err}", err.len());
    }
    Ok(())
}

/// A forward whose attention scores (memory in T^2 in the reference, the IR and tract), or
/// whose in-memory plan or ONNX export has a position table, that cannot fit what the
/// process may still allocate is refused in one line before anything is allocated, instead
/// of an allocation failure aborting the process; the same limit leaves a short prompt
/// alone.
#[test]
fn a_forward_too_large_for_memory_is_refused_in_one_line() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ckpt = nv_tiny().join("ckpt.pt");
    let out = tmp.path().join("logits.npy");
    let tokens = |n: usize| {
        (0..n)
            .map(|i| (i % 80).to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    // 12,000 tokens: at least 4.6 GB of f64 scores a head; 4 GB of address space (few
    // malloc arenas, so that threads do not reserve much of it).
    let limited = |engine: &str, n: usize| -> Result<Output> {
        let cmd = format!(
            "ulimit -v 4000000 && MALLOC_ARENA_MAX=2 exec \"$0\" logits \"$1\" --engine {engine} --tokens {} -o \"$2\"",
            tokens(n)
        );
        Command::new("bash")
            .args(["-c", &cmd, ngpt_bin(), utf8(&ckpt), utf8(&out)])
            .output()
            .context("running ngpt under ulimit -v")
    };
    for engine in ["reference", "ir", "tract"] {
        let o = limited(engine, 12_000)?;
        let err = assert_clean_failure(&o, engine);
        assert!(
            err.contains(&format!(
                "--tokens: 12000 positions through the {engine} engine needs about"
            )) && err.contains("of attention scores, ")
                && err.contains("use the plan-cpu engine"),
            "{engine}: {err}"
        );
        assert!(!out.exists(), "{engine}: wrote {}", out.display());
    }
    // A plan or ONNX export lowered in memory gets block_size rows of position table: at
    // import's largest block_size (2^24), 12.9 GB for nv-tiny's head_dim of 32.
    let big = tmp.path().join("big");
    std::fs::create_dir(&big)?;
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(nv_tiny().join(f), big.join(f))?;
    }
    edit_config(&big, |c| {
        c.insert("block_size".into(), (1u64 << 24).into());
    })?;
    for engine in ["plan-cpu", "tract"] {
        let cmd = format!(
            "ulimit -v 4000000 && MALLOC_ARENA_MAX=2 exec \"$0\" logits \"$1\" --engine {engine} --tokens 1,2,3 -o \"$2\""
        );
        let o = Command::new("bash")
            .args(["-c", &cmd, ngpt_bin(), utf8(&big), utf8(&out)])
            .output()?;
        let err = assert_clean_failure(&o, engine);
        assert!(
            err.contains("16777216 positions (block_size, 2048 or the tokens) needs about 12.9 GB"),
            "{engine}: {err}"
        );
        assert!(!out.exists(), "{engine}: wrote {}", out.display());
    }
    let o = limited("reference", 64)?;
    assert!(o.status.success(), "64 tokens: {}", stderr(&o));
    let (dims, _, values) = read_npy(&out)?;
    assert_eq!(dims, [64, 86]);
    assert!(values.iter().all(|v| v.is_finite()));
    Ok(())
}

/// Runs ngpt with extra environment variables.
fn ngpt_env(args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let mut c = Command::new(ngpt_bin());
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().with_context(|| format!("running ngpt {args:?}"))
}

#[test]
fn cuda_options_parse_strictly_and_retired_variables_are_named() -> Result<()> {
    let ckpt = nv_tiny().join("ckpt.pt");
    let ckpt = ckpt.to_str().context("utf-8")?;
    // Malformed options are errors naming where they came from and the key, before any
    // subcommand runs.
    for (args, env, says) in [
        (
            vec!["--cuda-options", "grpah=off", "inspect", ckpt],
            vec![],
            "--cuda-options: option `grpah`: unknown option",
        ),
        (
            vec!["inspect", ckpt, "--cuda-options", "graph=false"],
            vec![],
            "--cuda-options: option `graph`: `false` is not `on` or `off`",
        ),
        (
            vec!["inspect", ckpt],
            vec![("NGPT_CUDA_OPTIONS", "blocks_per_sm=0")],
            "NGPT_CUDA_OPTIONS: option `blocks_per_sm`: `0` is not a whole number",
        ),
    ] {
        let o = ngpt_env(&args, &env)?;
        let err = assert_clean_failure(&o, &format!("{args:?} {env:?}"));
        assert!(err.contains(says), "{err}");
    }
    // Good options run; a retired variable still set gets one line naming its replacement.
    let o = ngpt_env(
        &[
            "--cuda-options",
            "graph=off,experimental.pd_stream=on",
            "inspect",
            ckpt,
        ],
        &[("NGPT_CUDA_PERSISTENT", "0"), ("NGPT_MMAP", "0")],
    )?;
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(
            "warning: NGPT_CUDA_PERSISTENT is no longer read; use NGPT_CUDA_OPTIONS=persistent=off"
        ),
        "{err}"
    );
    assert!(
        err.contains("warning: NGPT_MMAP is no longer read; use the --read-weights flag"),
        "{err}"
    );
    Ok(())
}

#[test]
fn read_weights_gives_the_mapped_plans_logits() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("c");
    let dir_s = dir.to_str().context("utf-8")?;
    ok(
        ngpt(&[
            "compile",
            nv_tiny().join("ckpt.pt").to_str().context("utf-8")?,
            "-o",
            dir_s,
        ])?,
        "compile",
    )?;
    let mut outs = vec![];
    for extra in [&[][..], &["--read-weights"][..]] {
        let out = tmp.path().join(format!("l{}.npy", outs.len()));
        let mut args = vec![
            "logits",
            dir_s,
            "--engine",
            "plan-cpu",
            "--tokens",
            "1,2,3",
            "-o",
            out.to_str().context("utf-8")?,
        ];
        args.extend_from_slice(extra);
        ok(ngpt(&args)?, "logits")?;
        outs.push(std::fs::read(&out)?);
    }
    assert_eq!(outs[0], outs[1], "--read-weights changed the logits");
    Ok(())
}
