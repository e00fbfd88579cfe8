//! The CPU executor's threads change speed, never bits: a whole plan of an odd shape (3
//! heads of 6, vocab 37, 2 layers) run as a ragged prefill of two sequences and KV-cache
//! decode steps gives bitwise the same logits on one thread and split over threads in
//! pieces of every size, run after run.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use ngpt_runtime::cpu::{CpuExecutor, ProgramKind, Threading};
use ngpt_runtime::plan::LoadedPlan;

fn ngpt(args: &[&str]) -> Result<()> {
    let o = Command::new(env!("CARGO_BIN_EXE_ngpt"))
        .args(args)
        .output()
        .with_context(|| format!("running ngpt {args:?}"))?;
    ensure!(
        o.status.success(),
        "ngpt {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

/// `ngpt init` + `ngpt compile` of the odd model, loaded.
fn odd_plan(dir: &Path, dtype: &str) -> Result<Arc<LoadedPlan>> {
    let (model, compiled) = (dir.join("m"), dir.join(format!("c-{dtype}")));
    let utf8 = |p: &Path| p.to_str().map(str::to_string).context("utf-8 path");
    if !model.exists() {
        ngpt(&[
            "init",
            &utf8(&model)?,
            "--layers",
            "2",
            "--heads",
            "3",
            "--embd",
            "18",
            "--vocab",
            "37",
            "--block",
            "32",
            "--seed",
            "3",
        ])?;
    }
    ngpt(&[
        "compile",
        &utf8(&model)?,
        "-o",
        &utf8(&compiled)?,
        "--max-seq-len",
        "40",
        "--dtype",
        dtype,
    ])?;
    Ok(Arc::new(LoadedPlan::load(&compiled)?))
}

/// The logits of a ragged prefill (11 and 6 tokens, right-padded) and 6 greedy decode
/// steps, as bits, under `threading`.
fn run(plan: &Arc<LoadedPlan>, threading: Threading) -> Result<Vec<Vec<u32>>> {
    let v = plan.dims().vocab;
    let mut exec = CpuExecutor::new(Arc::clone(plan), 2)?;
    exec.set_threading(threading);
    assert_eq!(exec.threading(), threading);
    let prompts: [Vec<i32>; 2] = [
        vec![3, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7],
        vec![27, 1, 8, 28, 18, 36],
    ];
    let t = 11;
    let mut tokens = vec![];
    let mut positions = vec![];
    for p in &prompts {
        tokens.extend((0..t).map(|i| p.get(i).copied().unwrap_or(0)));
        positions.extend(0..t as i32);
    }
    let bits = |l: &[f32]| l.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
            .0 as i32
    };
    let slots: Vec<i32> = (0..tokens.len()).map(|r| (r / t) as i32).collect();
    let logits = exec.run(
        ProgramKind::Prefill,
        &ngpt_runtime::Rows {
            tokens: &tokens,
            positions: &positions,
            slots: &slots,
        },
    )?;
    let mut out = vec![bits(logits)];
    let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut next: Vec<i32> = (0..2)
        .map(|b| argmax(&logits[(b * t + lens[b] - 1) * v..(b * t + lens[b]) * v]))
        .collect();
    for _ in 0..6 {
        let pos: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let logits = exec.run(
            ProgramKind::Decode,
            &ngpt_runtime::Rows {
                tokens: &next,
                positions: &pos,
                slots: &[0, 1],
            },
        )?;
        out.push(bits(logits));
        next = (0..2)
            .map(|b| argmax(&logits[b * v..(b + 1) * v]))
            .collect();
        lens.iter_mut().for_each(|l| *l += 1);
    }
    Ok(out)
}

#[test]
fn threaded_executor_is_bitwise_the_sequential_one() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for dtype in ["f32", "bf16"] {
        let plan = odd_plan(tmp.path(), dtype)?;
        let want = run(&plan, Threading::Sequential)?;
        assert_eq!(want.len(), 7);
        for t in [
            Threading::Pieces(1),
            Threading::Pieces(4),
            Threading::Pieces(7),
            Threading::Pieces(1000),
            Threading::Auto,
        ] {
            let got = run(&plan, t)?;
            for (step, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g == w,
                    "{dtype}, {t:?}: logits of step {step} (0 = prefill) differ from one thread's"
                );
            }
            assert!(run(&plan, t)? == got, "{dtype}, {t:?}: not deterministic");
        }
    }
    Ok(())
}

/// Programs run from several threads at once share rayon's pool, whose threads spin for
/// the steps of each while they run (`keep_awake` in the CPU executor): every run finishes,
/// with the bits it has alone. A spinner that could start on a thread running another
/// program's steps made two programs wait for each other (the test then fails on its
/// timeout rather than hanging).
#[test]
fn programs_on_several_threads_at_once_finish_with_their_bits_alone() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let plan = odd_plan(tmp.path(), "f32")?;
    let want = run(&plan, Threading::Auto)?;
    let (tx, rx) = std::sync::mpsc::channel();
    for caller in 0..6 {
        let (plan, tx) = (Arc::clone(&plan), tx.clone());
        std::thread::spawn(move || {
            let runs: Result<Vec<_>> = (0..8).map(|_| run(&plan, Threading::Auto)).collect();
            // The receiver may have given up (timeout): nothing left to tell.
            let _ = tx.send((caller, runs));
        });
    }
    drop(tx);
    for _ in 0..6 {
        let (caller, runs) = rx
            .recv_timeout(std::time::Duration::from_secs(300))
            .context("programs on 6 threads at once did not all finish within 300 s")?;
        for got in runs? {
            assert!(
                got == want,
                "caller {caller}: logits differ from a run alone"
            );
        }
    }
    Ok(())
}
