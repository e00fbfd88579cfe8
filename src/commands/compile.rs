//! `ngpt compile`: checkpoint in, compiled directory out.

use std::path::PathBuf;

use anyhow::Result;
use ngpt_compiler::compile::{self, Manifest};
use ngpt_compiler::plan::{self, WeightDtype};
use ngpt_compiler::{artifact, onnx, passes};
use ngpt_schemas::prost::Message;

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
    Ok(Some(quant::Options {
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
    keep_freed_memory();
    let hashing = hash_in_background(&a.input);
    let ckpt = super::input::load_checkpoint(&a.input)?;
    if let Some(n) = a.stop_after {
        anyhow::ensure!(
            n <= passes::CANONICAL.len(),
            "--stop-after {n}: there are only {} passes",
            passes::CANONICAL.len()
        );
    }
    let max_seq_len = a
        .max_seq_len
        .unwrap_or(onnx::default_max_seq_len(&ckpt.config));
    onnx::check_max_seq_len(&ckpt.config, max_seq_len)?;
    crate::memory::ensure_table_fits(
        &format!("--max-seq-len {max_seq_len}"),
        max_seq_len,
        ckpt.config.head_dim(),
    )?;
    let quantize = quantize_options(&a)?;
    let compiled = compile::compile(
        &ckpt,
        &compile::Options {
            stop_after: a.stop_after,
            fault: a.inject_fault.clone(),
            quantize,
        },
    )?;
    // The graph holds what it still needs (lazily folded weights keep their stored
    // tensors); drop the checkpoint's own references so that the Q, K and V matrices
    // fuse_qkv concatenated do not stay in memory twice while the files are written.
    let mut ckpt = ckpt;
    ckpt.tensors.clear();
    let source = std::fs::canonicalize(&ckpt.source).unwrap_or_else(|_| ckpt.source.clone());
    let source_sha256 = match hashing {
        Some((hashed, h)) if hashed == source => h
            .join()
            .map_err(|_| anyhow::anyhow!("hashing {} failed", source.display()))??,
        _ => compile::sha256_file(&source)?,
    };
    let dtype = match a.dtype {
        PlanDtype::F32 => WeightDtype::F32,
        PlanDtype::Bf16 => WeightDtype::Bf16,
        PlanDtype::Int8 | PlanDtype::Int4 => WeightDtype::Quant,
    };
    // A plan needs the canonical form: only a full compile lowers one.
    let lowers_plan = a.stop_after.is_none();
    let onnx_opts = onnx::Options {
        max_seq_len,
        weights: match a.onnx_dtype {
            OnnxDtype::F16 => onnx::WeightDtype::F16,
            // Quantized: the matrices go as MatMulNBits, the rest stays f32.
            OnnxDtype::F32 | OnnxDtype::Int8 | OnnxDtype::Int4 => onnx::WeightDtype::F32,
        },
        external_data: a.external_data,
    };
    let onnx_info = onnx::ModelInfo {
        config: ckpt.config.clone(),
        source_sha256: Some(source_sha256.clone()),
        source_name: source.file_name().map(|n| n.to_string_lossy().into_owned()),
        passes: compiled
            .records
            .iter()
            .map(|r| r.name.to_string())
            .collect(),
    };
    let onnx_files: &[&str] = if a.no_onnx {
        &[]
    } else if onnx::uses_external_data(&compiled.graph, &onnx_opts) {
        &[onnx::MODEL_FILE, onnx::DATA_FILE]
    } else {
        &[onnx::MODEL_FILE]
    };
    // Tokenizer files beside the checkpoint (or in a compiled INPUT) travel with the
    // directory, so onnxruntime-genai's `og.Tokenizer(model)` and ngpt's own text paths
    // work from it alone; their special token ids go into genai_config.json.
    let source_dir = if source.is_dir() {
        source.clone()
    } else {
        source.parent().map(PathBuf::from).unwrap_or_default()
    };
    let token_dir = [a.input.clone(), source_dir]
        .into_iter()
        .find(|d| !crate::tokens::files::tokenizer_files(d).is_empty());
    let token_files = token_dir
        .as_deref()
        .map(crate::tokens::files::tokenizer_files)
        .unwrap_or_default();
    let special = match &token_dir {
        Some(d) => crate::tokens::files::special_tokens(d, ckpt.config.vocab_size)?,
        None => Default::default(),
    };
    let genai = onnx::genai::config_json(&ckpt.config, max_seq_len, onnx::MODEL_FILE, &special);
    let token_names: Vec<String> = token_files
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let mut manifest = Manifest {
        producer: "ngpt".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        source_sha256,
        source,
        stop_after: a.stop_after,
        passes: compiled
            .records
            .iter()
            .map(|r| r.name.to_string())
            .collect(),
        files: ["manifest.json", "ir.txt", "passes.txt"]
            .into_iter()
            .chain(onnx_files.iter().copied())
            .chain((!a.no_onnx).then_some(onnx::genai::CONFIG_FILE))
            .chain(token_names.iter().map(String::as_str))
            .chain(
                lowers_plan
                    .then_some(["model.plan", "model.weights"])
                    .into_iter()
                    .flatten(),
            )
            .map(String::from)
            .collect(),
        quantize,
        plan_weights: None,
    };
    let log = compiled.pass_log();
    let mut written = None;
    artifact::write_dir(&a.out, a.force, |dir| {
        artifact::write_bytes(&dir.join("ir.txt"), compiled.graph.to_string().as_bytes())?;
        artifact::write_bytes(&dir.join("passes.txt"), log.as_bytes())?;
        if !a.no_onnx {
            written = Some(onnx::write(&compiled.graph, &onnx_info, &onnx_opts, dir)?);
            artifact::write_bytes(&dir.join(onnx::genai::CONFIG_FILE), genai.as_bytes())?;
        }
        for (from, name) in token_files.iter().zip(&token_names) {
            let bytes = std::fs::read(from).map_err(|source| ngpt_compiler::Error::Io {
                path: from.clone(),
                source,
            })?;
            artifact::write_bytes(&dir.join(name), &bytes)?;
        }
        if lowers_plan {
            // model.weights streams: each weight is made and written in turn.
            let mut plan = None;
            artifact::write_with(&dir.join("model.weights"), |tmp| {
                // Written by a thread of its own, beside the lowering.
                let mut file = artifact::BackgroundWriter::create(tmp)?;
                plan = Some(plan::lower_into(
                    &compiled.graph,
                    &ckpt.config,
                    dtype,
                    max_seq_len,
                    &manifest.source_sha256,
                    &mut file,
                    tmp,
                )?);
                file.finish()
            })?;
            if let Some(p) = plan {
                artifact::write_bytes(&dir.join("model.plan"), &p.encode_to_vec())?;
                manifest.plan_weights = plan::weights_summary(&p, manifest.quantize);
            }
        }
        let json = serde_json::to_string_pretty(&manifest).map_err(|e| {
            ngpt_compiler::Error::Argument {
                what: "manifest".into(),
                problem: e.to_string(),
            }
        })?;
        artifact::write_bytes(&dir.join("manifest.json"), json.as_bytes())
    })
    .map_err(|e| match e {
        ngpt_compiler::Error::OutputExists { path } => anyhow::anyhow!(
            "--out {}: already exists and is not empty; pass --force to replace it",
            path.display()
        ),
        e => e.into(),
    })?;
    print!("{log}");
    let weights_label = match quantize {
        Some(q) => format!("{} MatMulNBits", q.bits.as_str()),
        None => onnx_opts.weights.as_str().to_string(),
    };
    if let Some(w) = written {
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
    if !token_names.iter().any(|n| n == "tokenizer.json") {
        eprintln!(
            "note: no tokenizer.json beside {}: onnxruntime-genai runs {} from token ids (og.Tokenizer needs one)",
            manifest.source.display(),
            a.out.display()
        );
    }
    println!(
        "wrote {} ({} IR nodes)",
        a.out.display(),
        compiled.graph.nodes.len()
    );
    Ok(())
}

/// The sha256 of the checkpoint file `input` resolves to, on a thread of its own while the
/// checkpoint is imported and compiled (hashing a 2 GB file is about 1.2 s of one core,
/// 7% of a 0.5b compile's samples). `None` where the file is not known before import (a
/// compiled directory as input): the caller hashes then.
fn hash_in_background(
    input: &std::path::Path,
) -> Option<(
    PathBuf,
    std::thread::JoinHandle<ngpt_compiler::Result<String>>,
)> {
    if ngpt_compiler::compile::is_compiled_dir(input) {
        return None;
    }
    let (file, _, _) = ngpt_compiler::import::resolve(input).ok()?;
    let file = std::fs::canonicalize(file).ok()?;
    let path = file.clone();
    let handle = std::thread::Builder::new()
        .name("sha256".into())
        .spawn(move || compile::sha256_file(&path))
        .ok()?;
    Some((file, handle))
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
