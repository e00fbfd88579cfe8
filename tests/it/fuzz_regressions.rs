//! The fuzz targets' inputs under plain `cargo test` (CI has no nightly toolchain).
//!
//! `fuzz/src/inputs.rs` decides how a fuzz input reaches `import::load` or
//! `LoadedPlan::from_bytes`; this test includes the same file, so it replays committed inputs
//! exactly as the fuzz targets ran them:
//! - `fuzz/regressions/<target>/*`: every input a fuzz run found crashing, after its fix.
//!   A checkpoint must now be refused with an error; a plan must be refused, or run and
//!   return logits of the right size. Never a panic.
//! - `fuzz/seeds/<target>/*`: the seed corpora. Each must run without panicking, and the
//!   seeds generated here must still reach the end of their entry point (a checkpoint that
//!   imports, a plan that runs), so the fuzzers start deep.
//!
//! `NGPT_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_regressions` rewrites `fuzz/seeds/`;
//! `NGPT_FUZZ_CORPUS=1` also replays the corpora a local fuzz run left in `fuzz/corpus/`.

use crate::common;

#[path = "../../fuzz/src/inputs.rs"]
mod inputs;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use inputs::PlanOutcome;
use ngpt_compiler::plan::{lower, WeightDtype};
use ngpt_compiler::{compile, import, init};
use ngpt_schemas::prost::Message;

const TARGETS: [&str; 3] = ["import_safetensors", "import_torch", "plan"];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The small model's `model.safetensors` bytes.
fn safetensors_bytes(bf16: bool) -> Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    init::write(dir.path(), &inputs::small_opts(bf16))?;
    Ok(std::fs::read(dir.path().join("model.safetensors"))?)
}

/// The small model lowered to a plan (f32 or bf16, KV capacity 16): plan and weights bytes.
fn plan_parts(dtype: WeightDtype) -> Result<(ngpt_schemas::plan::Plan, Vec<u8>)> {
    let dir = tempfile::tempdir()?;
    init::write(dir.path(), &inputs::small_opts(false))?;
    let ckpt = import::load(dir.path())?;
    let compiled = compile::compile(&ckpt, &compile::Options::default())?;
    let l = lower(&compiled.graph, &ckpt.config, dtype, 16, "5eed")?;
    Ok((l.plan, l.weights))
}

/// Every seed: (target, file name, input bytes).
fn seeds() -> Result<Vec<(&'static str, String, Vec<u8>)>> {
    let mut out = vec![];
    let config = inputs::small_config_json();
    for bf16 in [false, true] {
        let tag = if bf16 { "bf16" } else { "f32" };
        let st = safetensors_bytes(bf16)?;
        out.push((
            "import_safetensors",
            format!("small-{tag}"),
            inputs::encode_safetensors(None, &st),
        ));
        out.push((
            "import_safetensors",
            format!("small-{tag}-config"),
            inputs::encode_safetensors(Some(config.as_bytes()), &st),
        ));
        for (prefix, name) in [("", "small"), ("_orig_mod.", "small-prefixed")] {
            let (pickle, storages) = common::torch_ckpt_parts(&inputs::small_opts(bf16), prefix)?;
            let storages: Vec<&[u8]> = storages.iter().map(Vec::as_slice).collect();
            out.push((
                "import_torch",
                format!("{name}-{tag}-parts"),
                inputs::encode_torch_parts(&pickle, &storages),
            ));
            if prefix.is_empty() {
                out.push((
                    "import_torch",
                    format!("{name}-{tag}-zip"),
                    inputs::encode_torch_file(&inputs::torch_zip(&pickle, &storages)?),
                ));
            }
        }
    }
    for (dtype, tag) in [(WeightDtype::F32, "f32"), (WeightDtype::Bf16, "bf16")] {
        let (plan, weights) = plan_parts(dtype)?;
        out.push((
            "plan",
            format!("small-{tag}"),
            inputs::encode_plan(&plan.encode_to_vec(), &weights),
        ));
    }
    Ok(out)
}

/// What one input did, when it did not panic.
#[derive(Debug, PartialEq)]
enum Replay {
    /// Imported, or a plan that loaded and ran.
    Accepted,
    /// Refused with this error.
    Refused(String),
}

/// Replays one input; `Err` is a panic or a broken contract, with its message.
fn replay(target: &str, data: &[u8]) -> std::result::Result<Replay, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let imported = |r: ngpt_compiler::Result<_>| match r {
        Ok(_) => Ok(Replay::Accepted),
        Err(e) => Ok(Replay::Refused(e.to_string())),
    };
    let run = || match target {
        "import_safetensors" => imported(inputs::import_safetensors(data, dir.path())),
        "import_torch" => imported(inputs::import_torch(data, dir.path())),
        "plan" => match inputs::plan(data) {
            PlanOutcome::Ran => Ok(Replay::Accepted),
            PlanOutcome::LoadErr(e) | PlanOutcome::RunErr(e) => Ok(Replay::Refused(e)),
            PlanOutcome::Broken(what) => Err(what),
        },
        other => Err(format!("unknown target {other}")),
    };
    catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|e| {
        Err(e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into()))
    })
}

#[test]
fn generated_seeds_reach_the_end_of_each_entry_point() -> Result<()> {
    let seeds = seeds()?;
    assert_eq!(seeds.len(), 12);
    let write = std::env::var_os("NGPT_WRITE_FUZZ_SEEDS").is_some();
    for (target, name, data) in &seeds {
        assert_eq!(
            replay(target, data),
            Ok(Replay::Accepted),
            "{target}/{name} is not accepted"
        );
        if write {
            let dir = fuzz_dir().join("seeds").join(target);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(name), data)?;
        }
    }
    Ok(())
}

/// The files of `fuzz/<kind>/<target>/`, sorted.
fn committed(kind: &str, target: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let dir = fuzz_dir().join(kind).join(target);
    let mut out = vec![];
    for e in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
        let path = e?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') || name.ends_with(".md") {
            continue;
        }
        out.push((name, std::fs::read(&path)?));
    }
    out.sort();
    Ok(out)
}

/// The seeds; with `NGPT_FUZZ_CORPUS=1`, also the local (uncommitted) corpora a fuzz run
/// grew in `fuzz/corpus/<target>/`, with counts of what was accepted.
#[test]
fn committed_seeds_never_panic() -> Result<()> {
    let mut kinds = vec!["seeds"];
    if std::env::var_os("NGPT_FUZZ_CORPUS").is_some() {
        kinds.push("corpus");
    }
    for kind in kinds {
        for target in TARGETS {
            if kind == "corpus" && !fuzz_dir().join(kind).join(target).is_dir() {
                continue;
            }
            let files = committed(kind, target)?;
            assert!(!files.is_empty(), "no {kind} for {target}");
            let mut accepted = 0;
            for (name, data) in &files {
                match replay(target, data) {
                    Ok(Replay::Accepted) => accepted += 1,
                    Ok(Replay::Refused(_)) => {}
                    Err(p) => panic!("{kind}/{target}/{name}: {p}"),
                }
            }
            eprintln!(
                "{kind}/{target}: {} inputs, {accepted} accepted, {} refused",
                files.len(),
                files.len() - accepted
            );
        }
    }
    Ok(())
}

#[test]
fn crashing_inputs_found_by_fuzzing_no_longer_crash() -> Result<()> {
    let mut replayed = 0;
    for target in TARGETS {
        let dir = fuzz_dir().join("regressions").join(target);
        if !dir.is_dir() {
            continue;
        }
        for (name, data) in committed("regressions", target)? {
            match replay(target, &data) {
                Ok(Replay::Refused(e)) => eprintln!("regressions/{target}/{name}: {e}"),
                // A plan's fix may make it run (a GEMM with k = 0 computes C = beta C);
                // `replay` has checked the logits' size.
                Ok(Replay::Accepted) if target == "plan" => {
                    eprintln!("regressions/{target}/{name}: runs")
                }
                Ok(Replay::Accepted) => {
                    panic!("regressions/{target}/{name} is accepted; expected an error")
                }
                Err(p) => panic!("regressions/{target}/{name}: {p}"),
            }
            replayed += 1;
        }
    }
    eprintln!("{replayed} fuzz regressions replayed");
    Ok(())
}
