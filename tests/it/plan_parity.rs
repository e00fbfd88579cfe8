//! The launch plan on the CPU executor against the literal reference: prefill at every
//! position, KV decode step by step, a ragged batch, bf16 weights, and greedy generation.
//! Each body takes the executor (session factory) as a parameter, so plan-cuda joins by
//! adding one line.

use crate::common;

use std::sync::Arc;

use anyhow::Result;
use ngpt_compiler::compare::{compare, Comparison};
use ngpt_compiler::import::{self, Checkpoint};
use ngpt_compiler::init::{self, InitOptions, Preset};
use ngpt_compiler::plan::{lower, WeightDtype};
use ngpt_compiler::reference::Precision;
use ngpt_compiler::{compile, reference};
use ngpt_runtime::plan::LoadedPlan;
use ngpt_runtime::session::Session;
use ngpt_schemas::prost::Message;

/// Builds a session for a plan: the executor under test.
type Executor = fn(Arc<LoadedPlan>, usize) -> ngpt_runtime::Result<Session>;

const PLAN_CPU: Executor = Session::new;

fn plan_for(ckpt: &Checkpoint, dtype: WeightDtype, max_seq: usize) -> Result<Arc<LoadedPlan>> {
    let compiled = compile::compile(ckpt, &compile::Options::default())?;
    let lowered = lower(&compiled.graph, &ckpt.config, dtype, max_seq, "test")?;
    let bytes = lowered.plan.encode_to_vec();
    Ok(Arc::new(LoadedPlan::from_bytes(
        &bytes,
        &lowered.weights,
        "model.plan",
    )?))
}

fn generated(o: InitOptions) -> Result<(tempfile::TempDir, Checkpoint)> {
    let dir = tempfile::tempdir()?;
    init::write(dir.path(), &o)?;
    let ckpt = import::load(dir.path())?;
    Ok((dir, ckpt))
}

fn models() -> Result<Vec<(&'static str, Option<tempfile::TempDir>, Checkpoint)>> {
    let mut out = vec![("nv-tiny", None, import::load(&common::nv_tiny())?)];
    let mut t = InitOptions::preset(Preset::Tiny);
    t.seed = 11;
    let (d, c) = generated(t)?;
    out.push(("tiny", Some(d), c));
    let mut odd = InitOptions::preset(Preset::Tiny);
    (odd.n_layer, odd.n_head, odd.n_embd, odd.vocab_size) = (3, 3, 96, 211);
    let (d, c) = generated(odd)?;
    out.push(("odd", Some(d), c));
    let mut bs = InitOptions::preset(Preset::Tiny);
    (bs.n_embd, bs.n_head, bs.base_scale, bs.bf16) = (128, 4, Some(1.0 / 32.0), true);
    let (d, c) = generated(bs)?;
    out.push(("bs1/32-bf16", Some(d), c));
    Ok(out)
}

fn tokens(vocab: usize, n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104729 + 5) % vocab) as u32)
        .collect()
}

fn reference_rows(ckpt: &Checkpoint, toks: &[u32]) -> Result<Vec<f64>> {
    common::ref_logits(ckpt, toks, Precision::F64)
}

fn cmp(got: &[f32], want: &[f64], vocab: usize) -> Comparison {
    let got: Vec<f64> = got.iter().map(|&v| v as f64).collect();
    compare(&got, want, vocab)
}

/// The engine a session runs on, as baseline keys name it.
fn engine(s: &Session) -> &'static str {
    if s.executor().describe() == "plan-cpu" {
        "plan-cpu"
    } else {
        "plan-cuda"
    }
}

/// `c`'s error within `limit` and within 3x the baseline recorded for
/// `plan_parity/{what}/{model}/{engine}/{dtype}` (tests/fixtures/baselines.json).
fn within_baseline(what: &str, model: &str, engine: &str, dtype: &str, c: &Comparison, limit: f64) {
    common::baseline::assert_within_baseline(
        &format!("plan_parity/{what}/{model}/{engine}/{dtype}"),
        c.rel_err,
        limit,
    );
}

fn dtype_name(dtype: WeightDtype) -> &'static str {
    match dtype {
        WeightDtype::F32 => "f32",
        WeightDtype::Bf16 => "bf16",
        WeightDtype::Quant => "quantized",
    }
}

fn prefill_every_position(exec: Executor) -> Result<()> {
    for (name, _d, ckpt) in models()? {
        let v = ckpt.config.vocab_size;
        let toks = tokens(v, 29, 1);
        let plan = plan_for(&ckpt, WeightDtype::F32, 64)?;
        let mut s = exec(plan, 1)?;
        let got = s.prefill(std::slice::from_ref(&toks))?;
        let c = cmp(&got, &reference_rows(&ckpt, &toks)?, v);
        within_baseline("prefill", name, engine(&s), "f32", &c, 1e-5);
        assert!(c.passes(1e-5, 1.0), "{name}: {c:?}");
    }
    Ok(())
}

fn kv_decode_equals_full_recomputation(exec: Executor) -> Result<()> {
    for (name, _d, ckpt) in models()? {
        let v = ckpt.config.vocab_size;
        let toks = tokens(v, 24, 2);
        let want = reference_rows(&ckpt, &toks)?;
        let mut s = exec(plan_for(&ckpt, WeightDtype::F32, 32)?, 1)?;
        let first = s.prefill(&[toks[..5].to_vec()])?;
        let c = cmp(&first, &want[..5 * v], v);
        within_baseline("kv-prefill", name, engine(&s), "f32", &c, 1e-5);
        assert!(c.passes(1e-5, 1.0), "{name}: prefill");
        for i in 5..toks.len() {
            let row = s.decode(&[toks[i]])?;
            let c = cmp(&row, &want[i * v..(i + 1) * v], v);
            within_baseline("kv-decode", name, engine(&s), "f32", &c, 1e-5);
            assert!(c.passes(1e-5, 1.0), "{name}: decode step {i}: {c:?}");
        }
    }
    Ok(())
}

fn ragged_batch_of_two(exec: Executor) -> Result<()> {
    for (name, _d, ckpt) in models()? {
        let v = ckpt.config.vocab_size;
        let a = tokens(v, 13, 3);
        let b = tokens(v, 6, 4);
        let mut s = exec(plan_for(&ckpt, WeightDtype::F32, 32)?, 2)?;
        let got = s.prefill(&[a.clone(), b.clone()])?;
        let t = 13;
        let (wa, wb) = (reference_rows(&ckpt, &a)?, reference_rows(&ckpt, &b)?);
        let c = cmp(&got[..t * v], &wa, v);
        within_baseline("ragged-prefill", name, engine(&s), "f32", &c, 1e-5);
        assert!(c.passes(1e-5, 1.0), "{name}: row a");
        let c = cmp(&got[t * v..(t + 6) * v], &wb, v);
        within_baseline("ragged-prefill-padded", name, engine(&s), "f32", &c, 1e-5);
        assert!(c.passes(1e-5, 1.0), "{name}: row b");
        // Then both decode together, each at its own position.
        let (na, nb) = (7u32 % v as u32, 9u32 % v as u32);
        let step = s.decode(&[na, nb])?;
        let (mut a2, mut b2) = (a.clone(), b.clone());
        a2.push(na);
        b2.push(nb);
        let (wa2, wb2) = (reference_rows(&ckpt, &a2)?, reference_rows(&ckpt, &b2)?);
        let c = cmp(&step[..v], &wa2[13 * v..], v);
        within_baseline("ragged-decode", name, engine(&s), "f32", &c, 1e-5);
        assert!(c.passes(1e-5, 1.0), "{name}: decode a");
        let c = cmp(&step[v..], &wb2[6 * v..], v);
        within_baseline("ragged-decode", name, engine(&s), "f32", &c, 1e-5);
        assert!(c.passes(1e-5, 1.0), "{name}: decode b");
    }
    Ok(())
}

/// `prefill_last` (what generation uses: only each prompt's last row, whose lm_head rows
/// the CPU executor computes alone) against the same rows of a full prefill and the
/// reference, ragged batch of three, f32 and bf16 weights; then decode goes on from it.
fn prefill_last_rows_match_the_full_prefill(exec: Executor) -> Result<()> {
    for (name, _d, ckpt) in models()? {
        let v = ckpt.config.vocab_size;
        let prompts = [tokens(v, 13, 7), tokens(v, 1, 8), tokens(v, 9, 9)];
        for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
            let plan = plan_for(&ckpt, dtype, 32)?;
            let full: Vec<f64> = exec(Arc::clone(&plan), 3)?
                .prefill(&prompts)?
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            let mut s = exec(plan, 3)?;
            let last = s.prefill_last(&prompts)?;
            assert_eq!(last.len(), 3 * v, "{name}: [B, vocab]");
            for (b, p) in prompts.iter().enumerate() {
                let row = (b * 13 + p.len() - 1) * v;
                let c = cmp(&last[b * v..(b + 1) * v], &full[row..row + v], v);
                let dt = dtype_name(dtype);
                within_baseline("last-vs-prefill", name, engine(&s), dt, &c, 1e-6);
                assert!(c.passes(1e-6, 1.0), "{name} {dtype:?} prompt {b}: {c:?}");
                if dtype == WeightDtype::F32 {
                    let want = reference_rows(&ckpt, p)?;
                    let c = cmp(&last[b * v..(b + 1) * v], &want[(p.len() - 1) * v..], v);
                    within_baseline("prefill-last", name, engine(&s), "f32", &c, 1e-5);
                    assert!(c.passes(1e-5, 1.0), "{name} prompt {b} vs reference: {c:?}");
                }
            }
            assert_eq!(s.lens(), &[13, 1, 9]);
            let step = s.decode(&[1, 2, 3])?;
            // The decode after prefill_last against the reference, with the tolerance of
            // the plan's weights (bf16 as in `bf16_weights_stay_close`).
            let tol = match dtype {
                WeightDtype::F32 | WeightDtype::Quant => 1e-5,
                WeightDtype::Bf16 => 2e-2,
            };
            for (b, (p, t)) in prompts.iter().zip([1u32, 2, 3]).enumerate() {
                let mut q = p.clone();
                q.push(t % v as u32);
                let want = reference_rows(&ckpt, &q)?;
                let c = cmp(&step[b * v..(b + 1) * v], &want[p.len() * v..], v);
                let dt = dtype_name(dtype);
                within_baseline("decode-after-last", name, engine(&s), dt, &c, tol);
                assert!(
                    c.passes(tol, 1.0),
                    "{name} {dtype:?} decode {b} after prefill_last: {c:?}"
                );
            }
        }
    }
    Ok(())
}

fn bf16_weights_stay_close(exec: Executor) -> Result<()> {
    for (name, _d, ckpt) in models()? {
        let v = ckpt.config.vocab_size;
        let toks = tokens(v, 40, 5);
        let mut s = exec(plan_for(&ckpt, WeightDtype::Bf16, 64)?, 1)?;
        let c = cmp(
            &s.prefill(std::slice::from_ref(&toks))?,
            &reference_rows(&ckpt, &toks)?,
            v,
        );
        within_baseline("prefill", name, engine(&s), "bf16", &c, 2e-2);
        assert!(c.passes(2e-2, 0.95), "{name}: {c:?}");
    }
    Ok(())
}

fn greedy_reproduces_nvidia(exec: Executor) -> Result<()> {
    let ckpt = import::load(&common::nv_tiny())?;
    let prompt = common::fixture_tokens("greedy.json", "prompt_tokens")?;
    let want = common::fixture_tokens("greedy.json", "greedy_tokens")?;
    let mut s = exec(plan_for(&ckpt, WeightDtype::F32, 64)?, 1)?;
    let v = ckpt.config.vocab_size;
    let logits = s.prefill(std::slice::from_ref(&prompt))?;
    let mut next = ngpt_runtime::sample::argmax(&logits[(prompt.len() - 1) * v..]);
    let mut got = vec![next];
    while got.len() < want.len() {
        next = ngpt_runtime::sample::argmax(&s.decode(&[next])?);
        got.push(next);
    }
    assert_eq!(got, want);
    // And the reference's own greedy agrees (same oracle as the fixture).
    assert_eq!(
        reference::greedy(&ckpt, &prompt, 5, Precision::F64)?,
        want[..5]
    );
    Ok(())
}

/// The plan's executor and tract on the exported model.onnx agree at every position, for
/// prefill and for each KV decode step, and both sit within 1e-5 of the reference.
fn plan_agrees_with_tract(exec: Executor) -> Result<()> {
    use ngpt_compiler::onnx;
    for (name, _d, ckpt) in models()? {
        let v = ckpt.config.vocab_size;
        let toks = tokens(v, 21, 6);
        let compiled = compile::compile(&ckpt, &compile::Options::default())?;
        let info = onnx::ModelInfo::new(&ckpt, &compiled.records)?;
        let exported = onnx::export(
            &compiled.graph,
            &info,
            &onnx::Options::for_config(&ckpt.config),
        )?;
        let tract = onnx::tract::Session::from_bytes(&exported.model)?;
        let from_tract: Vec<f64> = tract.logits(&toks)?.iter().map(|&x| x as f64).collect();
        let mut s = exec(plan_for(&ckpt, WeightDtype::F32, 32)?, 1)?;
        let prefill = s.prefill(&[toks[..8].to_vec()])?;
        let c = cmp(&prefill, &from_tract[..8 * v], v);
        within_baseline("prefill-vs-tract", name, engine(&s), "f32", &c, 1e-5);
        assert!(c.passes(1e-5, 1.0), "{name}: prefill vs tract {c:?}");
        for i in 8..toks.len() {
            let c = cmp(&s.decode(&[toks[i]])?, &from_tract[i * v..(i + 1) * v], v);
            within_baseline("decode-vs-tract", name, engine(&s), "f32", &c, 1e-5);
            assert!(
                c.passes(1e-5, 1.0),
                "{name}: decode step {i} vs tract {c:?}"
            );
        }
        let c = compare(&from_tract, &reference_rows(&ckpt, &toks)?, v);
        within_baseline("tract-vs-reference", name, "tract", "f32", &c, 1e-5);
        assert!(c.passes(1e-5, 1.0), "{name}: tract vs reference {c:?}");
    }
    Ok(())
}

/// The CPU executor's `run_rows` multiplies only the chosen rows by the lm_head (it
/// fired), and the same rows as a full run otherwise (odd shapes and bf16 included above).
#[test]
fn cpu_run_rows_multiplies_only_the_chosen_rows() -> Result<()> {
    use ngpt_runtime::cpu::{CpuExecutor, ProgramKind};
    for (name, _d, ckpt) in models()? {
        let v = ckpt.config.vocab_size;
        let plan = plan_for(&ckpt, WeightDtype::F32, 32)?;
        let mut ex = CpuExecutor::new(plan, 2)?;
        let toks: Vec<i32> = tokens(v, 20, 3).iter().map(|&t| t as i32).collect();
        let pos: Vec<i32> = (0..10).chain(0..10).collect();
        let slots: Vec<i32> = (0..20).map(|r| r / 10).collect();
        let rq = ngpt_runtime::Rows {
            tokens: &toks,
            positions: &pos,
            slots: &slots,
        };
        let full = ex.run(ProgramKind::Prefill, &rq)?.to_vec();
        assert_eq!(ex.logits_rows_computed(), 20);
        let rows = [4, 9, 13];
        let some = ex.run_rows(ProgramKind::Prefill, &rq, &rows)?;
        assert_eq!(
            ex.logits_rows_computed(),
            3,
            "{name}: the lm_head was not narrowed"
        );
        for (i, &r) in rows.iter().enumerate() {
            let want: Vec<f64> = full[r * v..(r + 1) * v]
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            let c = cmp(&some[i * v..(i + 1) * v], &want, v);
            assert!(c.passes(1e-6, 1.0), "{name} row {r}: {c:?}");
        }
        // Rows out of order cannot be gathered in place: computed in full, then copied.
        let back = ex.run_rows(ProgramKind::Prefill, &rq, &[13, 4])?;
        assert_eq!(ex.logits_rows_computed(), 20);
        assert_eq!(&back[..v], &full[13 * v..14 * v]);
        assert!(ex.run_rows(ProgramKind::Prefill, &rq, &[20]).is_err());
    }
    Ok(())
}

/// A CUDA session with the defaults and `NGPT_CUDA_OPTIONS` (scripts/gpu-check.sh runs
/// these bodies again with the opt-in paths on).
#[allow(dead_code)]
fn cuda_session(
    plan: std::sync::Arc<ngpt_runtime::plan::LoadedPlan>,
    batch: usize,
) -> ngpt_runtime::Result<ngpt_runtime::session::Session> {
    let options = ngpt_runtime::options::CudaOptions::from_env().map_err(|e| {
        ngpt_runtime::Error::Request {
            what: e.source_name.clone(),
            problem: e.to_string(),
        }
    })?;
    ngpt_runtime::session::Session::cuda_with(plan, batch, &options)
}

macro_rules! test_executors {
    ($($body:ident),*) => {
        mod plan_cpu {
            $(#[test] fn $body() -> anyhow::Result<()> { super::$body(super::PLAN_CPU) })*
        }
        mod plan_cuda { $(#[test] fn $body() -> anyhow::Result<()> { if let Some(why) = ngpt_runtime::cuda::unavailable() { eprintln!("skipped: {why}"); return Ok(()) } super::$body(super::cuda_session) })* }
    };
}

test_executors!(
    prefill_every_position,
    kv_decode_equals_full_recomputation,
    ragged_batch_of_two,
    prefill_last_rows_match_the_full_prefill,
    bf16_weights_stay_close,
    greedy_reproduces_nvidia,
    plan_agrees_with_tract
);
