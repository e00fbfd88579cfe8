//! Exporting a checkpoint to ONNX from Rust: import, compile (fold and fuse), export, and
//! run the result with tract.
//!
//! ```sh
//! cargo run --example export_onnx -- tests/fixtures/nv-tiny out/onnx-example
//! cargo run --example export_onnx -- ckpt.pt out/big --f16 --external-data
//! ```

use std::path::PathBuf;

use ngpt_compiler::onnx::{self, tract::Session};
use ngpt_compiler::{compile, import};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, out, flags @ ..] = args.as_slice() else {
        eprintln!("usage: export_onnx CHECKPOINT OUT_DIR [--f16] [--external-data] [--no-run]");
        std::process::exit(2);
    };
    let t0 = std::time::Instant::now();
    let ckpt = import::load(input.as_ref())?;
    let compiled = compile::compile(&ckpt, &compile::Options::default())?;
    let info = onnx::ModelInfo::new(&ckpt, &compiled.records)?;
    let mut opts = onnx::Options::for_config(&ckpt.config);
    if flags.iter().any(|f| f == "--f16") {
        opts.weights = onnx::WeightDtype::F16;
    }
    opts.external_data = flags.iter().any(|f| f == "--external-data");
    let dir = PathBuf::from(out);
    std::fs::create_dir_all(&dir)?;
    let written = onnx::write(&compiled.graph, &info, &opts, &dir)?;
    println!(
        "wrote {:?} in {}: model.onnx {} bytes, external data {} bytes ({:.1} s)",
        written.files,
        dir.display(),
        written.model_bytes,
        written.data_bytes,
        t0.elapsed().as_secs_f64()
    );
    if flags.iter().any(|f| f == "--no-run") {
        return Ok(());
    }
    // Load, prefill three tokens, then decode greedily against the KV cache.
    let t0 = std::time::Instant::now();
    let session = Session::load(&dir.join(onnx::MODEL_FILE))?;
    let load = t0.elapsed().as_secs_f64();
    let v = session.vocab;
    let argmax = |row: &[f32]| {
        (0..v)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap_or(0)
    };
    let t0 = std::time::Instant::now();
    let mut step = session.run(&[1, 2, 3], &[1, 1, 1], &[0, 1, 2], &session.empty_cache(1))?;
    let prefill = t0.elapsed().as_secs_f64();
    let mut tokens = vec![argmax(&step.logits[2 * v..])];
    let t0 = std::time::Instant::now();
    while tokens.len() < 16 {
        let n = step.cache.len;
        let last = *tokens.last().unwrap_or(&0) as i64;
        step = session.run(&[last], &vec![1; n + 1], &[n as i64], &step.cache)?;
        tokens.push(argmax(&step.logits));
    }
    let decode = t0.elapsed().as_secs_f64();
    println!(
        "tract: load {load:.2} s, prefill 3 tokens {:.1} ms, {} decode steps at {:.1} tokens/s; greedy {tokens:?}",
        prefill * 1e3,
        tokens.len() - 1,
        (tokens.len() - 1) as f64 / decode
    );
    Ok(())
}
