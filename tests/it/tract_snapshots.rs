//! What tract computes on each test model's exported model.onnx, recorded as insta
//! snapshots, and every executor validated against those records.
//!
//! For each model (nv-tiny, trained by NVIDIA's code, and seeded `ngpt init` checkpoints
//! with 3 heads, a base_scale far from 1/sqrt(n_embd), bf16 blocks, scaling vectors away
//! from their init with some negative), tract runs a prefill of 8 tokens and 3 KV-cache
//! decode steps of fixed tokens. The record (`snapshots/it__tract_snapshots__tract_*.snap`)
//! holds, per position, the top 5 token ids with their logits rounded to 1e-3 (ids whose
//! logits lie within 2e-3 of each other are written as one tie group, ids ascending) and
//! the row's mean, standard deviation, minimum and maximum.
//!
//! The record is stable across CPUs (AVX2 and AVX-512 change the last bits): tract's fresh
//! output is held against the recorded numbers with a tolerance of 2e-3 (two rounding
//! steps), and where it holds the record's own text is what insta compares, so the
//! snapshot never flips on a last-bit difference (`ulp_perturbations_still_match`). Where
//! it does not hold (a tract upgrade or an export change that moves numbers), the fresh
//! text is compared and insta shows the diff, to be reviewed and accepted deliberately.
//!
//! Every executor is validated against the records from one test body per executor (the
//! candle `test_device!` habit): plan-cpu with f32 and bf16 weights here, plan-cuda where a
//! GPU is usable (scripts/gpu-check.sh places the records beside its test binary, so a GPU
//! machine checks against them without running tract), with the tolerance of its dtype.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use ngpt_compiler::import::{self, Checkpoint};
use ngpt_compiler::init::{self, InitOptions, Preset};
use ngpt_compiler::plan::{lower, WeightDtype};
use ngpt_compiler::{compile, onnx};
use ngpt_runtime::plan::LoadedPlan;
use ngpt_runtime::session::Session;
use ngpt_schemas::prost::Message;

/// Logits are recorded rounded to this.
const QUANTUM: f64 = 1e-3;
/// Ids within this of the group's first logit are one tie group.
const TIE: f64 = 2.0 * QUANTUM;
/// tract against its own record: two rounding steps.
const TRACT_TOL: f64 = 2.0 * QUANTUM;
/// Ids recorded per position (more where the last ones tie).
const TOP: usize = 5;
const PREFILL: usize = 8;
const DECODE: usize = 3;

/// A test model: its name in the snapshot files and its checkpoint.
struct Model {
    name: &'static str,
    _dir: Option<tempfile::TempDir>,
    ckpt: Checkpoint,
}

fn generated(name: &'static str, o: InitOptions) -> Result<Model> {
    let dir = tempfile::tempdir()?;
    init::write(dir.path(), &o)?;
    let ckpt = import::load(dir.path())?;
    Ok(Model {
        name,
        _dir: Some(dir),
        ckpt,
    })
}

fn models() -> Result<Vec<Model>> {
    let mut out = vec![Model {
        name: "nv-tiny",
        _dir: None,
        ckpt: import::load(&common::nv_tiny())?,
    }];
    // Three heads of 16, an odd vocabulary.
    let mut odd = InitOptions::preset(Preset::Tiny);
    (
        odd.n_layer,
        odd.n_head,
        odd.n_embd,
        odd.vocab_size,
        odd.seed,
    ) = (2, 3, 48, 97, 21);
    out.push(generated("3-heads", odd)?);
    // base_scale far from 1/sqrt(n_embd) (0.125 here), blocks stored in bf16.
    let mut bs = InitOptions::preset(Preset::Tiny);
    (bs.base_scale, bs.bf16, bs.seed) = (Some(0.3), true, 22);
    out.push(generated("base-0.3-bf16", bs)?);
    Ok(out)
}

/// The tokens a model's record is made from: 8 of prefill, then 3 decoded one at a time.
fn tokens(vocab: usize) -> Vec<u32> {
    (0..PREFILL + DECODE)
        .map(|i| ((i * 37 + 11) % vocab) as u32)
        .collect()
}

/// The `[PREFILL + DECODE, vocab]` logits tract computes: a prefill, then decode steps with
/// the KV cache it returned.
fn tract_rows(m: &Model) -> Result<Vec<Vec<f32>>> {
    let compiled = compile::compile(&m.ckpt, &compile::Options::default())?;
    let info = onnx::ModelInfo::new(&m.ckpt, &compiled.records)?;
    let exported = onnx::export(
        &compiled.graph,
        &info,
        &onnx::Options::for_config(&m.ckpt.config),
    )?;
    let s = onnx::tract::Session::from_bytes(&exported.model)?;
    let v = s.vocab;
    let toks: Vec<i64> = tokens(v).iter().map(|&t| t as i64).collect();
    let pos: Vec<i64> = (0..toks.len() as i64).collect();
    let step = s.run(
        &toks[..PREFILL],
        &[1; PREFILL],
        &pos[..PREFILL],
        &s.empty_cache(1),
    )?;
    let mut rows: Vec<Vec<f32>> = step.logits.chunks(v).map(<[f32]>::to_vec).collect();
    let mut cache = step.cache;
    for i in PREFILL..toks.len() {
        let step = s.run(&toks[i..=i], &vec![1; i + 1], &pos[i..=i], &cache)?;
        rows.push(step.logits);
        cache = step.cache;
    }
    Ok(rows)
}

/// One recorded position: tie groups of ids with their logit, then the row's statistics.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    groups: Vec<(Vec<u32>, f64)>,
    stats: [f64; 4],
}

fn stats(row: &[f32]) -> [f64; 4] {
    let n = row.len() as f64;
    let mean = row.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = row.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let min = row.iter().fold(f64::INFINITY, |a, &x| a.min(x as f64));
    let max = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
    [mean, var.sqrt(), min, max]
}

fn round(x: f64) -> f64 {
    (x / QUANTUM).round() * QUANTUM
}

/// A fresh row as it would be recorded.
fn record_row(row: &[f32]) -> Row {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    let mut groups: Vec<(Vec<u32>, f64)> = vec![];
    for (taken, &i) in order.iter().enumerate() {
        let x = row[i] as f64;
        match groups.last_mut() {
            Some((ids, head)) if *head - x <= TIE => ids.push(i as u32),
            _ if taken >= TOP => break,
            _ => groups.push((vec![i as u32], x)),
        }
    }
    for (ids, head) in &mut groups {
        ids.sort_unstable();
        *head = round(*head);
    }
    Row {
        groups,
        stats: stats(row).map(round),
    }
}

fn render(name: &str, rows: &[Row]) -> String {
    let mut s = format!(
        "tract on the exported model.onnx of {name}: a prefill of {PREFILL} tokens, then {DECODE} KV-cache decode steps\n\
         logits rounded to {QUANTUM:e}; the top {TOP} ids per position, ids within {TIE:e} of each other as one group\n"
    );
    for (i, r) in rows.iter().enumerate() {
        let kind = if i < PREFILL { "prefill" } else { "decode " };
        let groups: Vec<String> = r
            .groups
            .iter()
            .map(|(ids, v)| {
                let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
                if ids.len() == 1 {
                    format!("{}:{v:.3}", ids[0])
                } else {
                    format!("{{{}}}:{v:.3}", ids.join(","))
                }
            })
            .collect();
        let [mean, std, min, max] = r.stats;
        s += &format!(
            "{kind} {i:2}: {} | mean {mean:.3} std {std:.3} min {min:.3} max {max:.3}\n",
            groups.join(" ")
        );
    }
    s
}

/// Parses a record's text back into rows.
fn parse(text: &str) -> Result<Vec<Row>> {
    let mut rows = vec![];
    for line in text.lines().skip(2) {
        let (_, rest) = line.split_once(": ").context("a row without `: `")?;
        let (groups, st) = rest.split_once(" | ").context("a row without statistics")?;
        let mut parsed = vec![];
        // `id:v`, or `{a,b}:v` for a tie group.
        for e in groups.split_whitespace() {
            let (ids, v) = e.rsplit_once(':').context("an entry without `:`")?;
            let ids = ids.trim_start_matches('{').trim_end_matches('}');
            let ids = ids
                .split(',')
                .map(str::parse)
                .collect::<std::result::Result<Vec<u32>, _>>()?;
            parsed.push((ids, v.parse()?));
        }
        let nums: Vec<f64> = st
            .split_whitespace()
            .skip(1)
            .step_by(2)
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()?;
        ensure!(nums.len() == 4, "statistics: {st}");
        rows.push(Row {
            groups: parsed,
            stats: [nums[0], nums[1], nums[2], nums[3]],
        });
    }
    Ok(rows)
}

/// Whether `fresh` holds the record `rec` within `tol`: every recorded id's logit, no
/// other id above the smallest recorded logit, and the statistics. The error names the
/// position and what moved.
fn check_row(i: usize, fresh: &[f32], rec: &Row, tol: f64) -> Result<()> {
    if let Some(x) = fresh.iter().find(|x| !x.is_finite()) {
        bail!("position {i}: a logit is {x}");
    }
    let mut recorded = vec![];
    let mut lowest = f64::INFINITY;
    for (ids, v) in &rec.groups {
        for &id in ids {
            let got = *fresh
                .get(id as usize)
                .with_context(|| format!("position {i}: id {id} beyond the vocabulary"))?
                as f64;
            // A tie group's members lie within TIE of its recorded head.
            let slack = if ids.len() > 1 { TIE } else { 0.0 };
            if got > v + tol || got < v - tol - slack {
                bail!(
                    "position {i}: id {id} has logit {got:.6}, recorded {v:.3} (tolerance {tol:e})"
                );
            }
            recorded.push(id as usize);
        }
        lowest = lowest.min(*v - if ids.len() > 1 { TIE } else { 0.0 });
    }
    for (id, &x) in fresh.iter().enumerate() {
        if !recorded.contains(&id) && x as f64 > lowest + tol {
            bail!(
                "position {i}: id {id} has logit {x:.6}, above the recorded top {TOP} (lowest {lowest:.3}, tolerance {tol:e})"
            );
        }
    }
    let fresh_stats = stats(fresh);
    for (k, name) in ["mean", "std", "min", "max"].iter().enumerate() {
        if (fresh_stats[k] - rec.stats[k]).abs() > tol {
            bail!(
                "position {i}: {name} {:.6}, recorded {:.3} (tolerance {tol:e})",
                fresh_stats[k],
                rec.stats[k]
            );
        }
    }
    Ok(())
}

/// Every row of `fresh` against the record; `tol_of(row)` is the tolerance for a row.
fn check(fresh: &[Vec<f32>], rec: &[Row], tol_of: impl Fn(&[f32]) -> f64) -> Result<()> {
    ensure!(
        fresh.len() == rec.len(),
        "{} positions, the record has {}",
        fresh.len(),
        rec.len()
    );
    for (i, (f, r)) in fresh.iter().zip(rec).enumerate() {
        check_row(i, f, r, tol_of(f))?;
    }
    Ok(())
}

fn snapshot_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/snapshots")
        .join(format!("it__tract_snapshots__tract_{name}.snap"))
}

/// The record's text, as insta stored it (after its header), if there is one.
fn recorded_text(name: &str) -> Option<String> {
    let file = std::fs::read_to_string(snapshot_path(name)).ok()?;
    let body = file.strip_prefix("---\n")?;
    let (_, content) = body.split_once("\n---\n")?;
    Some(content.to_string())
}

fn recorded(name: &str) -> Result<Vec<Row>> {
    let text = recorded_text(name).with_context(|| {
        format!(
            "no tract record for {name} at {} (run tract_snapshots::tract_records_hold first)",
            snapshot_path(name).display()
        )
    })?;
    parse(&text)
}

/// tract's output, held against its record: within TRACT_TOL the record's own text is
/// compared (so last-bit differences never flip it); otherwise the fresh text, so insta
/// shows what moved.
fn tract_text(name: &str, rows: &[Vec<f32>]) -> String {
    if let Some(text) = recorded_text(name) {
        if let Ok(rec) = parse(&text) {
            if check(rows, &rec, |_| TRACT_TOL).is_ok() {
                return text.trim_end().to_string();
            }
        }
    }
    render(
        name,
        &rows.iter().map(|r| record_row(r)).collect::<Vec<_>>(),
    )
    .trim_end()
    .to_string()
}

#[test]
fn tract_records_hold() -> Result<()> {
    for m in models()? {
        let rows = tract_rows(&m)?;
        insta::assert_snapshot!(format!("tract_{}", m.name), tract_text(m.name, &rows));
    }
    Ok(())
}

/// A recorded form that absorbs last-bit differences: tract's output moved by a few ulps
/// in either direction still matches every record, as written.
#[test]
fn ulp_perturbations_still_match() -> Result<()> {
    for m in models()? {
        let rows = tract_rows(&m)?;
        let rec = recorded(m.name)?;
        for (k, shift) in [(1i32, 3u32), (-1, 5), (1, 8)] {
            let moved: Vec<Vec<f32>> = rows
                .iter()
                .map(|r| {
                    r.iter()
                        .enumerate()
                        .map(|(i, &x)| {
                            // Up or down by `shift` ulps, alternating by index.
                            let dir = if i % 2 == 0 { k } else { -k };
                            let bits =
                                x.to_bits() as i64 + dir as i64 * shift as i64 * x.signum() as i64;
                            f32::from_bits(bits as u32)
                        })
                        .collect()
                })
                .collect();
            check(&moved, &rec, |_| TRACT_TOL)
                .with_context(|| format!("{}: {shift} ulps", m.name))?;
            assert_eq!(
                tract_text(m.name, &moved),
                recorded_text(m.name).unwrap_or_default().trim_end(),
                "{}: the text moved",
                m.name
            );
        }
    }
    Ok(())
}

/// Deleting or editing one recorded value fails the check, naming the position.
#[test]
fn an_edited_record_fails() -> Result<()> {
    let m = &models()?[0];
    let rows = tract_rows(m)?;
    let text = recorded_text(m.name).context("the nv-tiny record")?;
    let rec = parse(&text)?;
    check(&rows, &rec, |_| TRACT_TOL)?;
    // Edit the top logit of position 3.
    let mut edited = rec.clone();
    edited[3].groups[0].1 += 0.01;
    let e = check(&rows, &edited, |_| TRACT_TOL)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("position 3: id"), "{e}");
    // Delete the second group of position 5: that id is now above the recorded top.
    let mut deleted = rec.clone();
    deleted[5].groups.remove(1);
    let e = check(&rows, &deleted, |_| TRACT_TOL)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("position 5") && e.contains("above the recorded top"),
        "{e}"
    );
    // The text a changed record produces differs, so insta would show the diff.
    let changed = render(m.name, &edited);
    assert_ne!(changed.trim_end(), text.trim_end());
    assert_eq!(
        parse(&render(m.name, &rec))?,
        rec,
        "render and parse round-trip"
    );
    Ok(())
}

/// Builds a session for a plan: the executor under test.
type Executor = fn(Arc<LoadedPlan>, usize) -> ngpt_runtime::Result<Session>;

fn plan_for(ckpt: &Checkpoint, dtype: WeightDtype) -> Result<Arc<LoadedPlan>> {
    let compiled = compile::compile(ckpt, &compile::Options::default())?;
    let lowered = lower(&compiled.graph, &ckpt.config, dtype, 64, "test")?;
    Ok(Arc::new(LoadedPlan::from_bytes(
        &lowered.plan.encode_to_vec(),
        &lowered.weights,
        "model.plan",
    )?))
}

/// The executor's rows for a model's record tokens: one prefill, then decode steps.
fn executor_rows(exec: Executor, m: &Model, dtype: WeightDtype) -> Result<Vec<Vec<f32>>> {
    let plan = plan_for(&m.ckpt, dtype)?;
    let v = plan.dims().vocab;
    let toks = tokens(v);
    let mut s = exec(plan, 1)?;
    let mut rows: Vec<Vec<f32>> = s
        .prefill(&[toks[..PREFILL].to_vec()])?
        .chunks(v)
        .map(<[f32]>::to_vec)
        .collect();
    for &t in &toks[PREFILL..] {
        rows.push(s.decode(&[t])?);
    }
    Ok(rows)
}

/// The tolerance of an executor's dtype for a row: f32 within the record's rounding plus
/// 1e-5 of the row's largest logit; bf16 weights within 2e-2 of it.
fn tolerance(dtype: WeightDtype) -> impl Fn(&[f32]) -> f64 {
    move |row: &[f32]| {
        let scale = row.iter().fold(0f64, |a, &x| a.max((x as f64).abs()));
        match dtype {
            // A graph without quantized constants lowers Quant as F32.
            WeightDtype::F32 | WeightDtype::Quant => TRACT_TOL + 1e-5 * scale,
            WeightDtype::Bf16 => TRACT_TOL + 2e-2 * scale,
        }
    }
}

/// One body per executor and dtype: every model's rows against tract's record.
fn validates_against_tract(exec: Executor, dtype: WeightDtype) -> Result<()> {
    for m in models()? {
        let rec = recorded(m.name)?;
        let rows = executor_rows(exec, &m, dtype)?;
        check(&rows, &rec, tolerance(dtype))
            .with_context(|| format!("{} ({dtype:?} weights) against tract's record", m.name))?;
        eprintln!(
            "{}: {dtype:?} weights match tract's record ({} positions)",
            m.name,
            rows.len()
        );
    }
    Ok(())
}

/// A test-only fault: the executor's logits with one value moved by `delta` at each call.
struct Faulty {
    inner: Box<dyn ngpt_runtime::session::Executor>,
    delta: f32,
    out: Vec<f32>,
}

impl ngpt_runtime::session::Executor for Faulty {
    fn plan(&self) -> &Arc<LoadedPlan> {
        self.inner.plan()
    }
    fn batch(&self) -> usize {
        self.inner.batch()
    }
    fn describe(&self) -> String {
        format!("{} with a fault", self.inner.describe())
    }
    fn run(
        &mut self,
        kind: ngpt_runtime::cpu::ProgramKind,
        rows: &ngpt_runtime::Rows<'_>,
    ) -> ngpt_runtime::Result<&[f32]> {
        self.out = self.inner.run(kind, rows)?.to_vec();
        let v = self.plan().dims().vocab;
        // The top logit of the last row.
        let last = self.out.len() - v;
        let top = (0..v)
            .max_by(|&a, &b| self.out[last + a].total_cmp(&self.out[last + b]))
            .unwrap_or(0);
        self.out[last + top] += self.delta;
        Ok(&self.out)
    }
    fn run_traced(
        &mut self,
        kind: ngpt_runtime::cpu::ProgramKind,
        rows: &ngpt_runtime::Rows<'_>,
        _on_step: &mut dyn FnMut(&str, usize, &[f32]),
    ) -> ngpt_runtime::Result<&[f32]> {
        self.run(kind, rows)
    }
}

fn faulty_cpu(plan: Arc<LoadedPlan>, batch: usize) -> ngpt_runtime::Result<Session> {
    let inner = Box::new(ngpt_runtime::cpu::CpuExecutor::new(plan, batch)?);
    Ok(Session::with_executor(Box::new(Faulty {
        inner,
        delta: 0.05,
        out: vec![],
    })))
}

/// A deliberately perturbed executor fails its validation against the records.
#[test]
fn a_perturbed_executor_fails_validation() -> Result<()> {
    let e = validates_against_tract(faulty_cpu, WeightDtype::F32)
        .expect_err("a perturbed executor passed")
        .to_string();
    assert!(e.contains("against tract's record"), "{e}");
    Ok(())
}

/// A CUDA session with the defaults and `NGPT_CUDA_OPTIONS`.
#[allow(dead_code)]
fn cuda_session(plan: Arc<LoadedPlan>, batch: usize) -> ngpt_runtime::Result<Session> {
    let options = ngpt_runtime::options::CudaOptions::from_env().map_err(|e| {
        ngpt_runtime::Error::Request {
            what: e.source_name.clone(),
            problem: e.to_string(),
        }
    })?;
    Session::cuda_with(plan, batch, &options)
}

mod plan_cpu {
    use super::*;
    #[test]
    fn f32_weights_match_tract() -> Result<()> {
        validates_against_tract(Session::new, WeightDtype::F32)
    }
    #[test]
    fn bf16_weights_match_tract() -> Result<()> {
        validates_against_tract(Session::new, WeightDtype::Bf16)
    }
}

mod plan_cuda {
    use super::*;
    fn usable() -> bool {
        match ngpt_runtime::cuda::unavailable() {
            Some(why) => {
                eprintln!("skipped: {why}");
                false
            }
            None => true,
        }
    }
    #[test]
    fn f32_weights_match_tract() -> Result<()> {
        if !usable() {
            return Ok(());
        }
        validates_against_tract(cuda_session, WeightDtype::F32)
    }
    #[test]
    fn bf16_weights_match_tract() -> Result<()> {
        if !usable() {
            return Ok(());
        }
        validates_against_tract(cuda_session, WeightDtype::Bf16)
    }
}
