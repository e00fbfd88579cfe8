//! `ngpt demo`: every stage that exists, on the built-in nv-tiny model.
//!
//! nv-tiny is a real checkpoint trained for 300 steps by NVIDIA's own model.py and saved as
//! their train.py saves it; it ships inside the binary with the logits NVIDIA's code
//! computes for its prompt, so the demo needs no downloads and checks itself.

use anyhow::{Context, Result};
use candle_core::DType;
use ngpt_compiler::compare::compare;
use ngpt_compiler::reference::{self, Precision};
use ngpt_compiler::{compile, graph, import, inspect};

use crate::engines::Engine;
use crate::tokens::Vocab;

const CKPT: &[u8] = include_bytes!("../../tests/fixtures/nv-tiny/ckpt.pt");
const VOCAB: &str = include_str!("../../tests/fixtures/nv-tiny/vocab.json");
const PROMPT: &str = include_str!("../../tests/fixtures/nv-tiny/prompt.json");
const NV_LOGITS: &[u8] = include_bytes!("../../tests/fixtures/nv-tiny/nv_logits_f64.npy");

/// Run every stage on the built-in nv-tiny model (trained by NVIDIA's code) and report.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  ngpt demo\n  ngpt demo --new-tokens 80")]
pub struct Args {
    /// Tokens to generate after the prompt (at most 1000).
    #[arg(long, default_value_t = 40)]
    new_tokens: usize,
}

/// The most `--new-tokens` the demo takes: its greedy reference recomputes the whole
/// sequence for every token, and its plan holds 2048 positions.
const MAX_NEW_TOKENS: usize = 1000;

pub fn run(a: Args) -> Result<()> {
    if a.new_tokens > MAX_NEW_TOKENS {
        anyhow::bail!(
            "--new-tokens {}: the demo generates at most {MAX_NEW_TOKENS} (use `ngpt generate` \
             for more)",
            a.new_tokens
        );
    }
    let dir = tempfile::tempdir().context("creating a temporary directory for the demo")?;
    let ckpt_path = dir.path().join("ckpt.pt");
    std::fs::write(&ckpt_path, CKPT).with_context(|| format!("writing {}", ckpt_path.display()))?;
    let vocab = Vocab::from_json_str(VOCAB, "vocab.json".as_ref())?;
    let prompt: serde_json::Value = serde_json::from_str(PROMPT).context("built-in prompt.json")?;
    let tokens: Vec<u32> = prompt["tokens"]
        .as_array()
        .context("prompt.json: tokens")?
        .iter()
        .filter_map(|v| v.as_u64().map(|v| v as u32))
        .collect();

    println!("ngpt demo: nv-tiny, a checkpoint trained 300 steps by NVIDIA/ngpt's own code\n");
    let t0 = std::time::Instant::now();
    let ckpt = import::load(&ckpt_path)?;
    let c = &ckpt.config;
    println!(
        "1. import   ckpt.pt ({} KB): {} layers, {} heads, n_embd {}, vocab {}, base_scale {} ({:.1} ms)",
        CKPT.len() / 1024,
        c.n_layer,
        c.n_head,
        c.n_embd,
        c.vocab_size,
        c.base_scale,
        t0.elapsed().as_secs_f64() * 1e3
    );
    let report = inspect::report(&ckpt)?;
    let worst = report
        .unit_norm
        .iter()
        .map(|u| u.max_dev)
        .fold(0.0, f64::max);
    println!("2. inspect  {} tensors, {} parameters; matrices within {worst:.1e} of unit norm (BF16 rounding)", report.tensors.len(), report.parameters);
    for (label, s) in &report.scaling {
        println!(
            "             {label:<17} median {:>9.4} ({} of {} negative before abs)",
            s.median, s.negative, s.count
        );
    }

    let nv_path = dir.path().join("nv.npy");
    std::fs::write(&nv_path, NV_LOGITS).context("writing built-in logits")?;
    let nv = candle_core::Tensor::read_npy(&nv_path)
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .context("reading built-in nv_logits_f64.npy")?;
    println!(
        "3. reference logits for the {}-token prompt {:?}",
        tokens.len(),
        vocab.decode(&tokens)
    );
    for p in [Precision::F64, Precision::F32] {
        let t0 = std::time::Instant::now();
        let ours = reference::logits(&ckpt, &tokens, p)?
            .to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .context("logits")?;
        let cmp = compare(&ours, &nv, c.vocab_size);
        println!(
            "             {p:?}: relative error {:.2e} vs NVIDIA's float64 logits, top-1 agreement {}/{} ({:.1} ms)",
            cmp.rel_err,
            cmp.top1_agree,
            cmp.positions,
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    let start = &tokens[..24.min(tokens.len())];
    let t0 = std::time::Instant::now();
    let new = reference::greedy(&ckpt, start, a.new_tokens, Precision::F64)?;
    println!(
        "4. greedy   {} new tokens ({:.1} ms, full forward each step):\n             {:?} + {:?}",
        new.len(),
        t0.elapsed().as_secs_f64() * 1e3,
        vocab.decode(start),
        vocab.decode(&new)
    );

    let t0 = std::time::Instant::now();
    let compiled = compile::compile(&ckpt, &compile::Options::default())?;
    let literal_nodes = graph::literal(&ckpt)?.nodes.len();
    println!(
        "5. compile  literal graph {literal_nodes} nodes -> canonical {} nodes ({:.1} ms):",
        compiled.graph.nodes.len(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    let fired: Vec<String> = compiled
        .records
        .iter()
        .map(|r| format!("{} x{}", r.name, r.rewrites))
        .collect();
    for chunk in fired.chunks(5) {
        println!("             {}", chunk.join(", "));
    }
    let positions: Vec<u32> = (0..tokens.len() as u32).collect();
    for p in [Precision::F64, Precision::F32] {
        let out = graph::interp::run(&compiled.graph, &tokens, &positions, p)?;
        let ours = out[0]
            .to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .context("IR logits")?;
        let cmp = compare(&ours, &nv, c.vocab_size);
        println!(
            "             folded IR {p:?}: relative error {:.2e} vs NVIDIA's float64 logits, top-1 {}/{}",
            cmp.rel_err, cmp.top1_agree, cmp.positions
        );
    }

    onnx_parity(&ckpt, &compiled, &tokens, &nv)?;

    // 6. The launch plan on the CPU executor: parity, then generation with the KV cache.
    use ngpt_schemas::prost::Message;
    let t0 = std::time::Instant::now();
    let lowered = ngpt_compiler::plan::lower(
        &compiled.graph,
        c,
        ngpt_compiler::plan::WeightDtype::F32,
        2048,
        "",
    )?;
    let plan_bytes = lowered.plan.encode_to_vec();
    let plan = std::sync::Arc::new(ngpt_runtime::plan::LoadedPlan::from_bytes(
        &plan_bytes,
        &lowered.weights,
        "model.plan",
    )?);
    let steps = lowered
        .plan
        .prefill
        .as_ref()
        .map_or(&[][..], |p| &p.steps[..]);
    let gemms = steps
        .iter()
        .filter(|s| matches!(s.kind, Some(ngpt_schemas::plan::step::Kind::Gemm(_))))
        .count();
    println!(
        "6. plan     prefill: {} kernel launches and {gemms} GEMMs; {} KB plan, {} KB weights ({:.1} ms)",
        steps.len() - gemms,
        plan_bytes.len() / 1024,
        lowered.weights.len() / 1024,
        t0.elapsed().as_secs_f64() * 1e3
    );
    let mut session = ngpt_runtime::session::Session::new(std::sync::Arc::clone(&plan), 1)?;
    let got: Vec<f64> = session
        .prefill(std::slice::from_ref(&tokens))?
        .iter()
        .map(|&v| v as f64)
        .collect();
    let cmp = compare(&got, &nv, c.vocab_size);
    println!(
        "             plan-cpu: relative error {:.2e} vs NVIDIA's float64 logits, top-1 {}/{}",
        cmp.rel_err, cmp.top1_agree, cmp.positions
    );
    let logits = session.prefill_last(&[start.to_vec()])?;
    let mut next = ngpt_runtime::sample::argmax(&logits);
    let mut out = vec![next];
    let t0 = std::time::Instant::now();
    while out.len() < a.new_tokens {
        next = ngpt_runtime::sample::argmax(&session.decode(&[next])?);
        out.push(next);
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "7. generate {} tokens through the plan with the KV cache ({:.0} tokens/s): {:?}",
        out.len(),
        (out.len().saturating_sub(1)) as f64 / secs.max(1e-9),
        vocab.decode(&out)
    );
    println!(
        "             {} the reference's greedy continuation",
        if out == new { "equals" } else { "DIFFERS FROM" }
    );

    println!("8. validate every engine on the prompt (`ngpt validate`):");
    let mut model = crate::engines::Model::open(&ckpt_path);
    let engines = [
        Engine::Reference,
        Engine::Ir,
        Engine::Tract,
        Engine::PlanCpu,
        Engine::PlanCuda,
    ];
    let rows = super::validate::parity_table(&mut model, &tokens, &engines)?;
    super::validate::print_table(&rows, tokens.len());
    anyhow::ensure!(
        rows.iter().all(|r| r.passed()),
        "demo: an engine is beyond tolerance (table above)"
    );
    Ok(())
}

/// The ONNX export of the canonical graph, run by tract: its size, and its parity with
/// NVIDIA's logits for f32 and f16 weights (one prefill of the whole prompt).
fn onnx_parity(
    ckpt: &import::Checkpoint,
    compiled: &compile::Compiled,
    tokens: &[u32],
    nv: &[f64],
) -> Result<()> {
    use ngpt_compiler::onnx::{self, tract::Session};
    let info = onnx::ModelInfo::new(ckpt, &compiled.records)?;
    let mut opts = onnx::Options::for_config(&ckpt.config);
    let mut parts = vec![];
    for dtype in [onnx::WeightDtype::F32, onnx::WeightDtype::F16] {
        opts.weights = dtype;
        let t0 = std::time::Instant::now();
        let e = onnx::export(&compiled.graph, &info, &opts)?;
        let export_ms = t0.elapsed().as_secs_f64() * 1e3;
        let session = Session::from_bytes(&e.model)?;
        let got: Vec<f64> = session.logits(tokens)?.iter().map(|&v| v as f64).collect();
        let cmp = compare(&got, nv, ckpt.config.vocab_size);
        parts.push(format!(
            "{}: {} KB, tract relative error {:.2e}, top-1 {}/{} ({export_ms:.0} ms export)",
            dtype.as_str(),
            e.model.len() / 1024,
            cmp.rel_err,
            cmp.top1_agree,
            cmp.positions
        ));
    }
    println!(
        "             ONNX exported (opset {}, KV cache, {} position rows) vs NVIDIA's float64 logits:",
        onnx::OPSET,
        opts.max_seq_len
    );
    for p in parts {
        println!("               model.onnx {p}");
    }
    Ok(())
}
