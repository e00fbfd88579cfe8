//! GPU kernels run on the CPU: `attention_prefill_mma` (runtime/src/cuda/helpers.cu) is
//! compiled with g++ against `host_emulation/warp.hpp` (threads for a block's threads,
//! barriers for `__syncthreads` and warp collectives, `mma.sync` computed from every lane's
//! fragments by the PTX ISA's layout) and checked against exact causal attention. This
//! runs on every machine with g++ (CI included), so the tensor-core kernel's fragment
//! arithmetic, masking and online softmax are tested before any GPU runs it; on a GPU,
//! runtime/tests/cuda.rs checks it against the f32 kernel.
#![cfg(feature = "cuda")]

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

const WARP_HPP: &str = include_str!("host_emulation/warp.hpp");
const MAIN_CPP: &str = include_str!("host_emulation/attention_prefill_mma.cpp");

/// The kernel's text from helpers.cu: the bf16 rounding it uses, the constant it needs,
/// and everything from its comment to the end of the file.
fn kernel_text() -> Result<String> {
    let src = ngpt_runtime::cuda::HELPERS_CU;
    let a = src
        .find("__device__ __forceinline__ unsigned short bf16_bits")
        .context("bf16_bits not in helpers.cu")?;
    let b = a + src[a..].find("\n}\n").context("end of bf16_bits")? + 3;
    let neg = src
        .lines()
        .find(|l| l.starts_with("#define PD_NEG_BIG"))
        .context("PD_NEG_BIG not in helpers.cu")?;
    let m = src
        .find("// attention_prefill_mma:")
        .context("attention_prefill_mma not in helpers.cu")?;
    Ok(format!("{neg}\n{}{}", &src[a..b], &src[m..]))
}

/// Builds the emulated kernel for one set of widths.
fn build(dir: &Path, c: usize, d: usize, max_seq: usize) -> Result<std::path::PathBuf> {
    std::fs::write(dir.join("warp.hpp"), WARP_HPP)?;
    std::fs::write(dir.join("attention_prefill_mma.cpp"), MAIN_CPP)?;
    std::fs::write(
        dir.join("kernel.inc"),
        format!(
            "#define NGPT_PD_C {c}\n#define NGPT_PD_D {d}\n#define NGPT_PD_MAX_SEQ {max_seq}\n{}",
            kernel_text()?
        ),
    )?;
    let exe = dir.join(format!("emu_{c}_{d}"));
    let out = Command::new("g++")
        .args(["-O1", "-std=c++20", "-pthread", "-w", "-o"])
        .arg(&exe)
        .arg(dir.join("attention_prefill_mma.cpp"))
        .output()?;
    if !out.status.success() {
        bail!("g++: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(exe)
}

#[test]
fn tensor_core_prefill_attention_matches_exact_attention_on_the_cpu() -> Result<()> {
    if Command::new("g++").arg("--version").output().is_err() {
        eprintln!("skipped: g++ not found (the emulation is compiled C++)");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // (n_embd, head_dim, KV capacity) and runs of (sequences, tokens, first position):
    // query tiles of 64 rows, whole and partial; a second prefill chunk after cached keys;
    // head dims 16, 64 and 128; key tiles of 64, whole and partial.
    type Run = (usize, usize, usize);
    let cases: [(usize, usize, usize, &[Run]); 3] = [
        (128, 64, 200, &[(2, 70, 0), (1, 130, 37), (3, 5, 0)]),
        (48, 16, 150, &[(2, 65, 0), (1, 64, 80)]),
        (128, 128, 140, &[(1, 129, 0)]),
    ];
    for (c, d, max_seq, runs) in cases {
        let exe = build(dir.path(), c, d, max_seq)?;
        for (seed, &(batch, tokens, offset)) in runs.iter().enumerate() {
            let out = Command::new(&exe)
                .args([batch, tokens, offset, seed + 1].map(|v| v.to_string()))
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            anyhow::ensure!(out.status.success(), "emulation failed: {text}");
            let field = |name: &str| -> Result<f64> {
                let mut words = text.split_whitespace();
                words
                    .by_ref()
                    .find(|w| *w == name)
                    .and_then(|_| words.next())
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("no {name} in {text:?}"))
            };
            let (rel, worst, unwritten) =
                (field("rel_err")?, field("worst_row")?, field("unwritten")?);
            let what = format!("head_dim {d}, {batch} x {tokens} rows from position {offset}");
            eprintln!("{what}: rel err {rel:.3e}, worst row {worst:.3e}");
            // bf16 operands (about 3e-3 here); NaN fails every comparison.
            assert!(rel <= 1e-2 && worst <= 3e-2, "{what}: {text}");
            assert_eq!(unwritten, 0.0, "{what}: outputs left unwritten");
        }
    }
    Ok(())
}
