//! `ngpt compile`: checkpoint in, compiled directory out.

use std::path::PathBuf;

use anyhow::Result;
use ngpt_compiler::passes;

/// Compile a checkpoint: fold the scaling factors, fuse the normalize ops, and write the
/// compiled directory (manifest.json, ir.txt, passes.txt, model.onnx, model.plan and
/// model.weights), all files or none.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  ngpt compile tests/fixtures/nv-tiny/ckpt.pt -o out/nv-tiny\n  ngpt compile ckpt.pt -o out/bisect --stop-after 4 --force\n  ngpt compile ckpt.pt -o out/f16 --onnx-dtype f16 --external-data\n  ngpt compile ckpt.pt -o out/int4 --onnx-dtype int4 --quant-renorm\n  ngpt compile ckpt.pt -o out/plan-only --no-onnx"
)]
pub struct Args {
    /// A checkpoint: ckpt.pt, a .safetensors file with config.json beside it, or a directory.
    input: PathBuf,
    /// Output directory.
    #[arg(short, long)]
    out: PathBuf,
    /// Run only the first N passes (to bisect a miscompile).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Replace an existing output directory (only once the new one is complete).
    #[arg(long)]
    force: bool,
    /// Weight dtype of the launch plan's GEMMs: f32, bf16, or int8/int4: the `quantize`
    /// pass (as `--onnx-dtype int8|int4`, with the `--quant-*` options) and its matrices
    /// stored quantized in model.plan (I8 / I4 blocks with f16 block scales), what
    /// plan-cpu runs; model.onnx then carries the same weights as MatMulNBits.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: PlanDtype,
    /// KV capacity of the plan and rows of the position table (default: the larger of
    /// block_size and 2048).
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Weight dtype of model.onnx: f32, or f16 (half the size, about 1e-3 relative error;
    /// cast to f32 in the graph), or int8/int4: weight-only block quantization (the
    /// `quantize` pass, written as onnxruntime's com.microsoft MatMulNBits). A quantized
    /// compile quantizes the graph itself: ir.txt, `--engine ir` on the directory and
    /// model.plan (quantized with `--dtype` of the same bits, its dequantized values as
    /// floats otherwise) all compute with the same dequantized weights.
    #[arg(long, value_enum, default_value = "f32")]
    onnx_dtype: OnnxDtype,
    /// Entries per quantization block along K (a power of two, at least 16); a last block
    /// is short where it does not divide K.
    #[arg(long, default_value_t = 32)]
    quant_block: usize,
    /// Rescale each quantized row's block scales by one factor so the row keeps its source
    /// norm, for the matrices training keeps unit-norm along K (q, k, v, c_fc, NVIDIA's
    /// lm_head; not c_proj: passes.txt says why).
    #[arg(long)]
    quant_renorm: bool,
    /// lm_head under int8/int4: `int8` (the default for both), `int4`, or `float` (kept as
    /// the float matrices are).
    #[arg(long, value_enum, default_value = "int8")]
    quant_lm_head: LmHead,
    /// Activations of the GEMMs with int8/int4 matrices: `f32` (the default:
    /// weight-only, within f32 rounding of the dequantized weights' product), or `int8`:
    /// each activation row quantized in blocks of 32 (needs `--quant-block 32`) and integer
    /// dot products, as llama.cpp's Q8_0 activations do: faster on a CPU, less accurate
    /// (`ngpt validate` and `ngpt perplexity` measure it). It applies to the int8/int4 plan
    /// (`--dtype`), whose CUDA executor refuses it, and to the int8/int4 model.onnx
    /// (`--onnx-dtype`), whose MatMulNBits then say accuracy_level 4 (onnxruntime's int8
    /// activations), lm_head included where it is int8/int4; the IR stays weight-only.
    #[arg(long, value_enum, default_value = "f32")]
    quant_activations: Activations,
    /// Write no model.onnx (nor genai_config.json): a directory for the plan engines only.
    #[arg(long)]
    no_onnx: bool,
    /// Put model.onnx's weights in model.onnx.data (ONNX external data); automatic when
    /// they exceed 2 GiB.
    #[arg(long)]
    external_data: bool,
    /// For testing `ngpt check` and `ngpt bisect` only: a deliberate miscompile,
    /// `PASS@LAYER` (the first constant that pass makes in that layer is scaled by 1.5).
    #[arg(long, hide = true, value_parser = parse_fault)]
    inject_fault: Option<passes::Fault>,
}

fn parse_fault(s: &str) -> Result<passes::Fault, String> {
    let (pass, layer) = s
        .split_once('@')
        .ok_or_else(|| format!("`{s}`: expected PASS@LAYER, e.g. fold_suv@1"))?;
    let layer = layer
        .parse()
        .map_err(|_| format!("`{s}`: the layer `{layer}` is not a number"))?;
    Ok(passes::Fault {
        pass: pass.to_string(),
        layer,
        factor: 1.5,
    })
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum OnnxDtype {
    F32,
    F16,
    Int8,
    Int4,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum Activations {
    F32,
    Int8,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LmHead {
    Int8,
    Int4,
    Float,
}

/// The quantize pass's options the flags ask for (`None`: no quantization).
fn quantize_options(a: &Args) -> Result<Option<ngpt_compiler::quant::Options>> {
    use ngpt_compiler::quant::{self, Bits};
    let plan_bits = match a.dtype {
        PlanDtype::F32 | PlanDtype::Bf16 => None,
        PlanDtype::Int8 => Some(Bits::Int8),
        PlanDtype::Int4 => Some(Bits::Int4),
    };
    let onnx_bits = match a.onnx_dtype {
        OnnxDtype::F32 | OnnxDtype::F16 => None,
        OnnxDtype::Int8 => Some(Bits::Int8),
        OnnxDtype::Int4 => Some(Bits::Int4),
    };
    let act_int8 = a.quant_activations == Activations::Int8;
    if act_int8 && plan_bits.is_none() && (onnx_bits.is_none() || a.no_onnx) {
        anyhow::bail!(
            "--quant-activations int8 is how int8/int4 GEMMs run: give --dtype int8|int4 (the plan) or --onnx-dtype int8|int4 (model.onnx)"
        );
    }
    let bits = match (plan_bits, onnx_bits) {
        (None, None) => return Ok(None),
        (Some(p), Some(o)) if p != o => anyhow::bail!(
            "--dtype {} with --onnx-dtype {}: one compile quantizes its graph one way; give both the same bits",
            p.as_str(),
            o.as_str()
        ),
        (Some(_), None) if matches!(a.onnx_dtype, OnnxDtype::F16) => anyhow::bail!(
            "--dtype {} with --onnx-dtype f16: a quantized graph writes its matrices as MatMulNBits; use --onnx-dtype f32 (the default) or --no-onnx",
            plan_bits.map_or("", Bits::as_str)
        ),
        (Some(b), _) | (None, Some(b)) => b,
    };
    quant::check_block(a.quant_block).map_err(|e| anyhow::anyhow!("--quant-block: {e}"))?;
    if act_int8 && a.quant_block != quant::ACT_BLOCK {
        anyhow::bail!(
            "--quant-activations int8 with --quant-block {}: int8 activations are quantized in blocks of {b} and need weight blocks of {b}",
            a.quant_block,
            b = quant::ACT_BLOCK
        );
    }
    Ok(Some(quant::Options {
        act_int8,
        bits,
        block: a.quant_block,
        renorm: a.quant_renorm,
        lm_head: match a.quant_lm_head {
            LmHead::Int8 => Some(Bits::Int8),
            LmHead::Int4 => Some(Bits::Int4),
            LmHead::Float => None,
        },
    }))
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum PlanDtype {
    F32,
    Bf16,
    Int8,
    Int4,
}

pub fn run(a: Args) -> Result<()> {
    use crate::compile::{compile_dir, Error, OnnxWeights, Options, PlanWeights};
    keep_freed_memory();
    let quantize = quantize_options(&a)?;
    let opts = Options {
        stop_after: a.stop_after,
        max_seq_len: a.max_seq_len,
        plan: match a.dtype {
            PlanDtype::F32 => PlanWeights::F32,
            PlanDtype::Bf16 => PlanWeights::Bf16,
            PlanDtype::Int8 | PlanDtype::Int4 => PlanWeights::Quantized,
        },
        onnx: (!a.no_onnx).then_some(match a.onnx_dtype {
            OnnxDtype::F16 => OnnxWeights::F16,
            OnnxDtype::F32 | OnnxDtype::Int8 | OnnxDtype::Int4 => OnnxWeights::F32,
        }),
        external_data: a.external_data,
        quantize,
        replace: a.force,
        fault: a.inject_fault.clone(),
    };
    let done = compile_dir(&a.input, &a.out, &opts).map_err(|e| match e {
        // The library's messages name its options; the command line's name the flags.
        Error::Compiler(ngpt_compiler::Error::OutputExists { path }) => anyhow::anyhow!(
            "--out {}: already exists and is not empty; pass --force to replace it",
            path.display()
        ),
        Error::StopAfter { requested, passes } => {
            anyhow::anyhow!("--stop-after {requested}: there are only {passes} passes")
        }
        Error::Memory(m) => anyhow::anyhow!(crate::memory::Insufficient {
            what: m.what.replace("max_seq_len", "--max-seq-len"),
            ..m
        }),
        e => e.into(),
    })?;
    print!("{}", done.pass_log);
    let weights_label = match (quantize, opts.onnx) {
        (Some(q), _) => format!("{} MatMulNBits", q.bits.as_str()),
        (None, Some(OnnxWeights::F16)) => "f16".to_string(),
        (None, _) => "f32".to_string(),
    };
    let max_seq_len = done.max_seq_len;
    if let Some(w) = &done.onnx {
        let kb = |b: u64| b as f64 / 1024.0;
        if w.data_bytes > 0 {
            println!(
                "model.onnx {:.1} KB + model.onnx.data {:.1} KB ({} weights, external data, position table of {max_seq_len} rows)",
                kb(w.model_bytes),
                kb(w.data_bytes),
                weights_label
            );
        } else {
            println!(
                "model.onnx {:.1} KB ({} weights, position table of {max_seq_len} rows)",
                kb(w.model_bytes),
                weights_label
            );
        }
    }
    for note in &done.notes {
        eprintln!("note: {note}");
    }
    println!("wrote {} ({} IR nodes)", a.out.display(), done.ir_nodes);
    Ok(())
}

/// A compile streams gigabytes through short-lived tensor buffers. glibc serves each large
/// one with a fresh mmap and unmaps it when freed, so every buffer's pages fault in, zeroed,
/// again: 4.6 million page faults (18 GB touched) and 13 s in the kernel for the 0.5b
/// preset's 21 s. Freed memory stays in the heap for the next buffer instead: 0.74 million
/// faults, 15 s, peak memory 2.48 -> 2.76 GiB (BENCHMARKS.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator parameters (it takes the allocator's own lock);
    // a failure leaves the defaults, which are correct, only slower.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
