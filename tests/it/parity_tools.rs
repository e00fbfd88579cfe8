//! `ngpt snapshot`, `ngpt check` and `ngpt bisect` as users run them: records round-trip,
//! an edited record fails at the edited position, and a deliberately broken compile (a
//! fault injected into one pass at one layer) is caught by check and located by bisect.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::Result;
use common::*;
use ngpt_compiler::init;

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A 3-layer model with perturbed scales, base_scale 1/32 and BF16 blocks, and a prompts
/// file of three prompts (one with a comment line and a blank line around it).
fn model(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let mut o = small_opts();
    o.n_layer = 3;
    o.n_embd = 32;
    o.n_head = 4;
    o.vocab_size = 53;
    o.base_scale = Some(1.0 / 32.0);
    o.bf16 = true;
    let ckpt = dir.join("ckpt");
    init::write(&ckpt, &o)?;
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "3,40,7,7,1\n# comment\n\n52,0,11,5,9,30,2\n17\n")?;
    Ok((ckpt, prompts))
}

fn compile(ckpt: &Path, out: &Path, extra: &[&str]) -> Result<()> {
    let mut args = vec![
        "compile",
        ckpt.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = ngpt(&args)?;
    assert!(o.status.success(), "{}", text(&o).1);
    Ok(())
}

fn snapshot(input: &Path, prompts: &Path, out: &Path, extra: &[&str]) -> Result<()> {
    let mut args = vec![
        "snapshot",
        input.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = ngpt(&args)?;
    assert!(o.status.success(), "{}", text(&o).1);
    Ok(())
}

fn check(record: &Path, input: &Path, extra: &[&str]) -> Result<Output> {
    let mut args = vec!["check", record.to_str().unwrap(), input.to_str().unwrap()];
    args.extend_from_slice(extra);
    ngpt(&args)
}

#[test]
fn a_record_checks_against_its_own_engine_and_across_engines() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (ckpt, prompts) = model(tmp.path())?;
    let dir = tmp.path().join("out");
    compile(&ckpt, &dir, &[])?;
    let record = tmp.path().join("model.parity");
    snapshot(&dir, &prompts, &record, &["--greedy", "6"])?;
    let body = std::fs::read_to_string(&record)?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(v["engine"], "plan-cpu");
    assert_eq!(v["prompts"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        v["prompts"][1]["positions"].as_array().map(Vec::len),
        Some(7)
    );
    assert_eq!(v["prompts"][1]["greedy"].as_array().map(Vec::len), Some(6));
    // One line per position: a diff shows which moved.
    assert_eq!(
        body.lines().filter(|l| l.contains("\"pos\":")).count(),
        5 + 7 + 1
    );

    // The same engine passes; so do the reference (from the record's f32 to f64) and
    // tract, within the f32 tolerance.
    for engine in ["plan-cpu", "reference", "ir", "tract"] {
        let o = check(&record, &dir, &["--engine", engine])?;
        let (out, err) = text(&o);
        assert!(o.status.success(), "{engine}: {out}\n{err}");
        assert!(out.contains("0 drifted"), "{engine}: {out}");
    }
    // A checkpoint INPUT works too, and the record stays byte-identical when re-made.
    let again = tmp.path().join("again.parity");
    snapshot(&ckpt, &prompts, &again, &["--greedy", "6"])?;
    assert_eq!(std::fs::read_to_string(&again)?, body);
    Ok(())
}

#[test]
fn a_bf16_plan_checks_against_an_f32_record_with_the_reduced_precision_tolerance() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (ckpt, prompts) = model(tmp.path())?;
    let record = tmp.path().join("ref.parity");
    snapshot(
        &ckpt,
        &prompts,
        &record,
        &["--engine", "reference", "--dtype", "f64"],
    )?;
    let bf16 = tmp.path().join("bf16");
    compile(&ckpt, &bf16, &["--dtype", "bf16"])?;
    let o = check(&record, &bf16, &["--engine", "plan-cpu"])?;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        out.contains("(bf16 weights)") && out.contains("tolerance 1e-1"),
        "{out}"
    );
    // With the f32 tolerance forced, the same bf16 plan drifts.
    let o = check(&record, &bf16, &["--engine", "plan-cpu", "--tol", "1e-6"])?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o).0);
    Ok(())
}

#[test]
fn an_edited_logit_fails_with_its_prompt_and_position_named() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (ckpt, prompts) = model(tmp.path())?;
    let record = tmp.path().join("model.parity");
    snapshot(&ckpt, &prompts, &record, &["--engine", "ir"])?;
    // Prompt 2, position 4: move its second-ranked logit by 0.01 (10x the tolerance).
    let body = std::fs::read_to_string(&record)?;
    let mut v: serde_json::Value = serde_json::from_str(&body)?;
    let entry = &mut v["prompts"][1]["positions"][4]["top"][1];
    let id = entry[0].as_u64().unwrap();
    let logit = entry[1].as_f64().unwrap();
    entry[1] = serde_json::json!(logit + 0.01);
    std::fs::write(&record, serde_json::to_string_pretty(&v)?)?;
    let o = check(&record, &ckpt, &[])?;
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    let drift: Vec<&str> = out.lines().filter(|l| l.ends_with("DRIFT")).collect();
    assert_eq!(drift.len(), 1, "{out}");
    let cols: Vec<&str> = drift[0].split_whitespace().collect();
    assert_eq!(&cols[..3], ["2", "4", &format!("logit[{id}]")], "{out}");
    assert!(err.contains("error: check: 1 value(s) drifted"), "{err}");
    Ok(())
}

#[test]
fn a_broken_compile_is_caught_by_check_and_located_by_bisect() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (ckpt, prompts) = model(tmp.path())?;
    let good = tmp.path().join("good");
    compile(&ckpt, &good, &[])?;
    let record = tmp.path().join("model.parity");
    snapshot(&good, &prompts, &record, &[])?;
    // fold_suv scales layer 1's c_fc by suv * sqrt(n_embd); the fault makes it 5% larger.
    let bad = tmp.path().join("bad");
    compile(&ckpt, &bad, &["--inject-fault", "fold_suv@1"])?;

    let o = check(&record, &bad, &[])?;
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(out.contains("DRIFT"), "{out}");
    // The good compile still checks clean.
    assert!(check(&record, &good, &[])?.status.success());

    let tokens = "3,40,7,7,1,22";
    for (engines, op) in [
        // The reference has no `mlp.fc` (its c_fc product is not scaled yet): the first
        // point it shares after the fault is the gated product.
        ("plan-cpu,reference", "mlp.gated"),
        ("plan-cpu,ir", "mlp.fc"),
    ] {
        let bisect = |dir: &Path| {
            ngpt(&[
                "bisect",
                dir.to_str().unwrap(),
                "--tokens",
                tokens,
                "--engines",
                engines,
            ])
        };
        let o = bisect(&bad)?;
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{engines}: {out}\n{err}");
        let want = format!("diverge first at layer 1, op {op} (`h.1.{op}`)");
        assert!(err.contains(&want), "{engines}: {err}");
        // Every point before it is printed and within tolerance: all of layer 0.
        let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("  0 ")).collect();
        assert!(rows.len() >= 6, "{out}");
        assert!(out.contains("<- first divergence"), "{out}");
        // On the good compile the same engines agree everywhere.
        let o = bisect(&good)?;
        let (out, err) = text(&o);
        assert!(o.status.success(), "{engines}: {out}\n{err}");
        assert!(out.contains("no divergence"), "{out}");
    }
    Ok(())
}

#[test]
fn bad_records_and_arguments_are_one_line_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (ckpt, prompts) = model(tmp.path())?;
    let record = tmp.path().join("model.parity");
    snapshot(
        &ckpt,
        &prompts,
        &record,
        &["--engine", "ir", "--greedy", "2"],
    )?;
    let body = std::fs::read_to_string(&record)?;
    let c = ckpt.to_str().unwrap();
    let write = |name: &str, s: String| -> Result<String> {
        let p = tmp.path().join(name);
        std::fs::write(&p, s)?;
        Ok(p.to_str().unwrap().to_string())
    };
    let other_format = write("f.parity", body.replace("ngpt-parity/1", "ngpt-parity/9"))?;
    let not_json = write("j.parity", body[..body.len() / 2].to_string())?;
    let big_id = write(
        "v.parity",
        body.replacen("\"tokens\": [3,", "\"tokens\": [99,", 1),
    )?;
    let bad_prompts = write("p.txt", "1,2\nhello\n".into())?;
    let empty_prompts = write("e.txt", "# nothing\n\n".into())?;
    let p = prompts.to_str().unwrap();
    let out = tmp.path().join("x.parity");
    let o = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["check", &other_format, c], "format `ngpt-parity/9`"),
        (vec!["check", &not_json, c], "not an ngpt parity record"),
        (
            vec!["check", &big_id, c],
            "token id 99 is not below vocab_size 53",
        ),
        (
            vec!["check", record.to_str().unwrap(), c, "--tol", "-1"],
            "--tol -1",
        ),
        (
            vec!["snapshot", c, "--prompts", &bad_prompts, "-o", o],
            "line 2",
        ),
        (
            vec!["snapshot", c, "--prompts", &empty_prompts, "-o", o],
            "holds no prompt",
        ),
        (
            vec![
                "snapshot",
                c,
                "--prompts",
                p,
                "-o",
                o,
                "--engine",
                "tract",
                "--dtype",
                "f64",
            ],
            "--dtype f64",
        ),
        (
            vec!["snapshot", c, "--prompts", p, "-o", o, "--top-k", "0"],
            "--top-k 0",
        ),
        (
            vec!["bisect", c, "--tokens", "1,2", "--engines", "ir"],
            "expected two engines",
        ),
        (
            vec!["bisect", c, "--tokens", "1,53", "--engines", "ir,reference"],
            "53",
        ),
    ];
    for (args, expect) in cases {
        let o = ngpt(&args)?;
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("note:")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(expect),
            "{args:?}: {err}"
        );
    }
    assert!(!out.exists(), "a failed snapshot left {}", out.display());
    Ok(())
}

#[test]
fn the_ci_example_records_then_checks_nv_tiny() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let record = tmp.path().join("model.parity");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/parity_ci/parity.sh");
    let run = |arg: Option<&str>| -> Result<Output> {
        let mut c = Command::new("bash");
        c.arg(&script)
            .args(arg)
            .env("NGPT", ngpt_bin())
            .env("MODEL", nv_tiny())
            .env("RECORD", &record);
        Ok(c.output()?)
    };
    let o = run(Some("record"))?;
    assert!(o.status.success(), "{}", text(&o).1);
    let o = run(None)?;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        out.contains("3 prompts") && out.contains("0 drifted"),
        "{out}"
    );
    Ok(())
}

/// A sha256 edited into a parity record or a manifest to something that is not hex (here
/// byte 12 falls inside a two-byte character) is shown cut at a character boundary: `check`
/// still runs and notes the difference, and a compiled directory whose manifest no longer
/// matches its source is refused in one line; neither panics.
#[test]
fn a_non_ascii_sha256_in_a_record_or_manifest_is_reported_not_a_panic() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (ckpt, prompts) = model(tmp.path())?;
    let dir = tmp.path().join("out");
    compile(&ckpt, &dir, &[])?;
    let record = tmp.path().join("model.parity");
    snapshot(&dir, &prompts, &record, &[])?;
    let odd = format!("a{}", "é".repeat(12));
    let retag = |path: &Path, to: &str| -> Result<()> {
        let body = std::fs::read_to_string(path)?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let sha = v["source_sha256"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("{}: no source_sha256", path.display()))?;
        std::fs::write(path, body.replace(sha, to))?;
        Ok(())
    };

    // The record's sha256 edited: check runs, notes the difference, and passes.
    let edited = tmp.path().join("edited.parity");
    std::fs::copy(&record, &edited)?;
    retag(&edited, &odd)?;
    let o = check(&edited, &dir, &[])?;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("0 drifted"), "{out}");
    assert!(
        err.contains(&format!("sha256 a{}…", "é".repeat(11))),
        "{err}"
    );

    // The manifest's sha256 edited: plan-cpu does not read the source, so check passes
    // with the note; an engine that loads the source refuses it in one line.
    retag(&dir.join("manifest.json"), &format!("b{}", "é".repeat(12)))?;
    let o = check(&record, &dir, &[])?;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        err.contains(&format!("this one is b{}…", "é".repeat(11))),
        "{err}"
    );
    let npy = tmp.path().join("x.npy");
    let o = ngpt(&[
        "logits",
        dir.to_str().unwrap(),
        "--engine",
        "reference",
        "--tokens",
        "1,2",
        "-o",
        npy.to_str().unwrap(),
    ])?;
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("note:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("error: ")
            && lines[0].contains("changed since it was compiled")
            && lines[0].contains(&format!("b{} then", "é".repeat(11))),
        "{err}"
    );
    assert!(!npy.exists());
    Ok(())
}
