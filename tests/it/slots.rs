//! Kernel ABI 3: every row carries its KV-cache slot, so rows of different sequences,
//! prefill chunks and decode rows, can share a call in any order (what a continuous-batching
//! scheduler sends). On the CPU each row's logits are the bits it gets with its sequence
//! alone in a batch-1 session, while every call has at most 32 rows (`cpu::weight_gemm::MAX_N`).

use crate::common;

use std::sync::Arc;

use anyhow::Result;
use common::*;
use ngpt_runtime::cpu::{CpuExecutor, ProgramKind};
use ngpt_runtime::plan::LoadedPlan;
use ngpt_runtime::session::Session;
use ngpt_runtime::{Error, Rows};

fn plan(dtype: ngpt_compiler::plan::WeightDtype) -> Result<Arc<LoadedPlan>> {
    use ngpt_compiler::{compile, import, plan::lower};
    use ngpt_schemas::prost::Message;
    let ckpt = import::load(&nv_tiny().join("ckpt.pt"))?;
    let compiled = compile::compile(&ckpt, &compile::Options::default())?;
    let l = lower(&compiled.graph, &ckpt.config, dtype, 64, "")?;
    Ok(Arc::new(LoadedPlan::from_bytes(
        &l.plan.encode_to_vec(),
        &l.weights,
        "model.plan",
    )?))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// One call: its program and rows (slot, position); the token is the sequence's at that
/// position.
type Call = (ProgramKind, Vec<(usize, usize)>);

#[test]
fn rows_interleaved_across_calls_give_each_sequence_its_bits_alone() -> Result<()> {
    use ngpt_compiler::plan::WeightDtype;
    let prompt = fixture_tokens("prompt.json", "tokens")?;
    // Three sequences: prompts of 9, 4 and 12 tokens, then 3 decoded tokens each.
    let lens = [9usize, 4, 12];
    let decoded: [[u32; 3]; 3] = [[5, 17, 2], [40, 1, 9], [3, 3, 60]];
    let seq: Vec<Vec<u32>> = (0..3)
        .map(|s| {
            let mut v: Vec<u32> = (0..lens[s])
                .map(|i| prompt[(3 * i + 5 * s) % prompt.len()])
                .collect();
            v.extend(decoded[s]);
            v
        })
        .collect();
    use ProgramKind::{Decode, Prefill};
    let run = |s: usize, p: std::ops::Range<usize>| p.map(move |p| (s, p));
    // Slot order 2, 0, 1; prefill chunks beside decode rows; a chunk of slot 2 from
    // position 5; slot 1's whole prompt and its first decode rows while the others prefill.
    let calls: Vec<Call> = vec![
        (Prefill, run(2, 0..5).chain(run(0, 0..3)).collect()),
        (Prefill, run(1, 0..4).collect()),
        (
            Prefill,
            run(2, 5..12)
                .chain(run(1, 4..5))
                .chain(run(0, 3..7))
                .collect(),
        ),
        (Prefill, run(0, 7..9).chain(run(1, 5..6)).collect()),
        (Decode, vec![(2, 12), (0, 9), (1, 6)]),
        (Prefill, run(0, 10..11).chain(run(2, 13..15)).collect()),
        (Decode, vec![(0, 11)]),
    ];
    // Every position of every sequence is run exactly once, each call at most 32 rows.
    let mut seen: Vec<Vec<usize>> = vec![vec![]; 3];
    for (_, rows) in &calls {
        assert!(!rows.is_empty() && rows.len() <= 32);
        for &(s, p) in rows {
            seen[s].push(p);
        }
    }
    for (s, mut ps) in seen.into_iter().enumerate() {
        ps.sort_unstable();
        assert_eq!(ps, (0..seq[s].len()).collect::<Vec<_>>(), "sequence {s}");
    }
    for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
        let plan = plan(dtype)?;
        let v = plan.dims().vocab;
        // (a) Each sequence alone: its prompt, then its decoded tokens one at a time.
        let alone: Vec<Vec<Vec<u32>>> = (0..3)
            .map(|s| -> Result<_> {
                let mut one = Session::new(Arc::clone(&plan), 1)?;
                let pre = one.prefill(&[seq[s][..lens[s]].to_vec()])?;
                let mut rows: Vec<Vec<u32>> = pre.chunks(v).map(bits).collect();
                for &t in &decoded[s] {
                    rows.push(bits(&one.decode(&[t])?));
                }
                Ok(rows)
            })
            .collect::<Result<_>>()?;
        // (b) The calls above on one executor holding three slots.
        let mut ex = CpuExecutor::new(Arc::clone(&plan), 3)?;
        for (i, (kind, rows)) in calls.iter().enumerate() {
            let tokens: Vec<i32> = rows.iter().map(|&(s, p)| seq[s][p] as i32).collect();
            let positions: Vec<i32> = rows.iter().map(|&(_, p)| p as i32).collect();
            let slots: Vec<i32> = rows.iter().map(|&(s, _)| s as i32).collect();
            let rq = Rows {
                tokens: &tokens,
                positions: &positions,
                slots: &slots,
            };
            let logits = ex.run(*kind, &rq)?;
            for (r, &(s, p)) in rows.iter().enumerate() {
                assert!(
                    bits(&logits[r * v..(r + 1) * v]) == alone[s][p],
                    "{dtype:?}: call {i} row {r} (slot {s}, position {p}) differs from its sequence alone"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn bad_rows_are_typed_errors_before_anything_runs() -> Result<()> {
    let plan = plan(ngpt_compiler::plan::WeightDtype::F32)?;
    let (v, cap) = (plan.dims().vocab as i32, plan.dims().max_seq_len as i32);
    let mut ex = CpuExecutor::new(plan, 3)?;
    let mut run = |t: &[i32], p: &[i32], s: &[i32]| {
        ex.run(
            ProgramKind::Prefill,
            &Rows {
                tokens: t,
                positions: p,
                slots: s,
            },
        )
        .map(|_| ())
    };
    assert!(matches!(
        run(&[1, 2], &[0, 0], &[0, 3]),
        Err(Error::SlotOutOfRange {
            row: 1,
            slot: 3,
            held: 3
        })
    ));
    assert!(matches!(
        run(&[1, 2, 3], &[4, 5, 4], &[2, 2, 2]),
        Err(Error::DuplicateRow {
            first: 0,
            second: 2,
            slot: 2,
            position: 4
        })
    ));
    assert!(matches!(
        run(&[1, 2], &[0, 1], &[0]),
        Err(Error::RowsMismatch {
            tokens: 2,
            positions: 2,
            slots: 1
        })
    ));
    assert!(matches!(run(&[], &[], &[]), Err(Error::NoRows)));
    assert!(matches!(
        run(&[v], &[0], &[0]),
        Err(Error::TokenOutsideVocabulary { .. })
    ));
    assert!(matches!(
        run(&[1], &[cap], &[0]),
        Err(Error::PositionOutOfRange { .. })
    ));
    // Each message is one line; then a good call still runs on the same executor.
    let e = run(&[1, 2], &[7, 7], &[1, 1]).expect_err("duplicate");
    assert_eq!(
        e.to_string(),
        "rows 0 and 1 both write slot 1 at position 7; a call writes each (slot, position) once"
    );
    run(&[1, 2], &[7, 7], &[1, 0])?;
    Ok(())
}
