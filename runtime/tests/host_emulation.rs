//! GPU kernels run on the CPU. Every kernel of runtime/src/cuda/ngpt.cu (the plan's
//! `embed`, `norm_rows`, `lerp_norm`, `swiglu`, `pos_norm`, and
//! `attention_prefill` and `attention_decode` with their untiled `_simple` twins), the
//! runtime's tensor-core `attention_prefill_mma` from helpers.cu, and
//! the weight-only quantized `gemv_i8_*` / `gemv_i4_*` and `dequant_rows`, and
//! `decode_persistent`'s gemv entries (bf16, f32, int8 and int4; with and without weight
//! streaming) are compiled with
//! g++ against `host_emulation/warp.hpp`: a block's threads are OS threads,
//! `__syncthreads` and warp collectives are barriers, `mma.sync` is computed from every
//! lane's fragments by the PTX ISA's layout, and for the persistent kernel every block is a
//! process sharing one mapping of "device memory", all resident at once as its grid
//! barrier needs. Each is checked against float64 arithmetic on odd shapes. This runs wherever g++ is (CI included), so what the kernels
//! compute is tested before a GPU runs them; on a GPU, runtime/tests/cuda.rs checks them
//! against the CPU executor and each other.
#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

const WARP_HPP: &str = include_str!("host_emulation/warp.hpp");
const CHECK_HPP: &str = include_str!("host_emulation/check.hpp");
const MAIN_CPP: &str = include_str!("host_emulation/attention.cpp");
const PERSISTENT_CPP: &str = include_str!("host_emulation/persistent.cpp");
const ROWS_CPP: &str = include_str!("host_emulation/rows.cpp");
const GEMV_CPP: &str = include_str!("host_emulation/gemv.cpp");
const NGPT_CU: &str = ngpt_runtime::cuda::NGPT_CU;
/// Keys per staged tile of ngpt.cu's attention_prefill (the compiler's `KV_TILE`).
const KV_TILE: usize = 32;

/// The widths a kernel is compiled for.
#[derive(Clone, Copy)]
struct Widths {
    c: usize,
    d: usize,
    max_seq: usize,
}

/// A kernel to emulate: its name, its source behind its prelude, dynamic shared memory.
struct Kernel {
    name: &'static str,
    source: String,
    shared: usize,
}

/// helpers.cu's attention_prefill_mma: the bf16 rounding it uses, the constant it needs,
/// and everything from its comment to the end of the file.
fn mma_kernel(w: Widths) -> Result<Kernel> {
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
    Ok(Kernel {
        name: "attention_prefill_mma",
        // The executor appends the KV capacity to the plan's arguments.
        source: format!(
            "#define NGPT_PD_C {}\n#define NGPT_PD_D {}\n#define NGPT_EMU_EXTRA_ARGS , NGPT_EMU_MAX_SEQ\n{neg}\n{}{}",
            w.c,
            w.d,
            &src[a..b],
            &src[m..]
        ),
        shared: 0,
    })
}

/// `src` (a kernel source, `file` naming it) with its dynamic shared memory array `array`
/// made a pointer to the emulation's, or an error when `src` no longer declares it so.
fn on_host(src: &str, file: &str, array: &str) -> Result<String> {
    let decl = format!("extern __shared__ __align__(16) float {array}[];");
    ensure!(src.contains(&decl), "{file} no longer declares `{decl}`");
    Ok(src.replace(&decl, &format!("float* {array} = g_dynamic_smem;")))
}

/// One of ngpt.cu's attention kernels, behind the prelude a plan gives it; its dynamic
/// shared memory array becomes a pointer to the emulation's.
fn ngpt_kernel(name: &'static str, w: Widths) -> Result<Kernel> {
    let body = on_host(NGPT_CU, "ngpt.cu", "tile")?;
    Ok(Kernel {
        name,
        source: format!(
            "#define NGPT_C {}\n#define NGPT_H {}\n#define NGPT_D {}\n#define NGPT_V 7\n#define NGPT_MAX_SEQ {}\n#define NGPT_KV_TILE {KV_TILE}\n#define NGPT_I {}\n{body}",
            w.c,
            w.c / w.d,
            w.d,
            w.max_seq,
            4 * w.c
        ),
        shared: if name.starts_with("attention_prefill") {
            2 * KV_TILE * w.d * 4
        } else {
            0
        },
    })
}

/// Writes the emulation program `main` (one of host_emulation/) into folder `sub` of
/// `dir`, beside warp.hpp, check.hpp and `kernel_inc` (the kernel source it includes), and
/// compiles it with g++.
fn compile(dir: &Path, sub: &str, main: (&str, &str), kernel_inc: &str) -> Result<PathBuf> {
    let sub = dir.join(sub);
    std::fs::create_dir_all(&sub)?;
    std::fs::write(sub.join("warp.hpp"), WARP_HPP)?;
    std::fs::write(sub.join("check.hpp"), CHECK_HPP)?;
    std::fs::write(sub.join(main.0), main.1)?;
    std::fs::write(sub.join("kernel.inc"), kernel_inc)?;
    let exe = sub.join("emu");
    let out = Command::new("g++")
        .args([
            "-O1",
            "-std=c++20",
            "-pthread",
            "-w",
            "-fsanitize=alignment",
            "-fno-sanitize-recover=alignment",
            "-o",
        ])
        .arg(&exe)
        .arg(sub.join(main.0))
        .output()?;
    if !out.status.success() {
        bail!("g++ ({}): {}", main.0, String::from_utf8_lossy(&out.stderr));
    }
    Ok(exe)
}

/// Runs an emulation program; what it printed (`name value` pairs) when it exited 0.
fn emulate(exe: &Path, args: &[String], what: &str) -> Result<String> {
    let out = Command::new(exe).args(args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "{what}: emulation failed ({}): {text} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// The number after `name` in an emulation program's output.
fn field(text: &str, name: &str) -> Result<f64> {
    let mut words = text.split_whitespace();
    words
        .by_ref()
        .find(|w| *w == name)
        .and_then(|_| words.next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {name} in {text:?}"))
}

/// Builds the emulation of one attention kernel for one set of widths.
fn build(dir: &Path, k: &Kernel, w: Widths) -> Result<PathBuf> {
    compile(
        dir,
        &format!("{}_{}_{}", k.name, w.c, w.d),
        ("attention.cpp", MAIN_CPP),
        &format!(
            "#define NGPT_EMU_KERNEL {}\n#define NGPT_EMU_SHARED {}\n#define NGPT_EMU_C {}\n#define NGPT_EMU_D {}\n#define NGPT_EMU_MAX_SEQ {}\n{}",
            k.name, k.shared, w.c, w.d, w.max_seq, k.source
        ),
    )
}

/// A call's rows as attention.cpp takes them: chunks `slot:start:len`, comma-separated.
type Run = String;

/// A rectangle: `batch` sequences (slot = sequence) of `tokens` rows from position
/// `offset`; decode rows (`tokens` 1) 13 positions apart.
fn rect(batch: usize, tokens: usize, offset: usize) -> Run {
    (0..batch)
        .map(|b| {
            let start = offset + if tokens == 1 { 13 * b } else { 0 };
            format!("{b}:{start}:{tokens}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs the emulation on each of `runs`; the worst relative error and worst row's.
fn check(exe: &Path, what: &str, runs: &[Run], tol: (f64, f64)) -> Result<()> {
    for (seed, chunks) in runs.iter().enumerate() {
        let run = format!("{what}, rows (slot:start:len) {chunks}");
        let args = [chunks.clone(), (seed + 1).to_string()];
        let text = emulate(exe, &args, &run)?;
        let (rel, worst, unwritten) = (
            field(&text, "rel_err")?,
            field(&text, "worst_row")?,
            field(&text, "unwritten")?,
        );
        eprintln!("{run}: rel err {rel:.3e}, worst row {worst:.3e}");
        // NaN fails both comparisons.
        assert!(rel <= tol.0 && worst <= tol.1, "{run}: {text}");
        assert_eq!(unwritten, 0.0, "{run}: outputs left unwritten");
    }
    Ok(())
}

fn gxx() -> bool {
    let found = Command::new("g++").arg("--version").output().is_ok();
    if !found {
        eprintln!("skipped: g++ not found (the emulation is compiled C++)");
        // CI has g++, so the emulation runs there; its absence fails the test, not skips it.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide g++ for the host emulation"
        );
    }
    found
}

#[test]
fn tensor_core_prefill_attention_matches_exact_attention_on_the_cpu() -> Result<()> {
    if !gxx() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // Query tiles of 64 rows, whole and partial; a second prefill chunk after cached keys;
    // head dims 16, 64 and 128; key tiles of 64, whole and partial; rows of several slots
    // in one call, tiles not aligned to 64 (a chunk from position 5 of slot 1, a decode row
    // of slot 0, a chunk from 0 of slot 2; a slot's chunks out of order). bf16 operands:
    // about 3e-3 here.
    let mixed = |s: &str| -> Run { s.into() };
    let cases: [(Widths, Vec<Run>); 3] = [
        (
            Widths {
                c: 128,
                d: 64,
                max_seq: 200,
            },
            vec![
                rect(2, 70, 0),
                rect(1, 130, 37),
                rect(3, 5, 0),
                mixed("1:5:70,0:17:1,2:0:66"),
                mixed("2:100:3,0:60:9,1:0:1,0:10:7,2:63:2"),
            ],
        ),
        (
            Widths {
                c: 48,
                d: 16,
                max_seq: 150,
            },
            vec![
                rect(2, 65, 0),
                rect(1, 64, 80),
                mixed("1:5:70,0:17:1,2:0:66"),
            ],
        ),
        (
            Widths {
                c: 128,
                d: 128,
                max_seq: 140,
            },
            vec![rect(1, 129, 0), mixed("1:5:40,0:90:1,2:0:20")],
        ),
    ];
    for (w, runs) in cases {
        let k = mma_kernel(w)?;
        let exe = build(dir.path(), &k, w)?;
        check(
            &exe,
            &format!("{}, head_dim {}", k.name, w.d),
            &runs,
            (1e-2, 3e-2),
        )?;
    }
    Ok(())
}

#[test]
fn f32_attention_kernels_match_exact_attention_on_the_cpu() -> Result<()> {
    if !gxx() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // Head dims 12 (not a multiple of 4: the scalar staging), 32 and 64; key tiles of 32
    // whole and partial; query tiles (32 rows at these head dims) whole and partial;
    // decode rows of different lengths, one past a 128-key tile.
    let widths = [
        Widths {
            c: 36,
            d: 12,
            max_seq: 150,
        },
        Widths {
            c: 96,
            d: 32,
            max_seq: 180,
        },
        Widths {
            c: 128,
            d: 64,
            max_seq: 160,
        },
    ];
    // Rows of several slots in one call: a chunk from position 5 of slot 1 (its tiles cut
    // at 16 or 32, not 5 rows on), a decode row of slot 0, a chunk from 0 of slot 2; then
    // a slot's chunks out of order and consecutive chunks that continue one another.
    let mixed = [
        "1:5:40,0:17:1,2:0:35".to_string(),
        "0:40:8,1:0:3,0:20:8,2:31:2,2:33:30".to_string(),
    ];
    let prefill: Vec<Run> = [rect(2, 40, 0), rect(1, 33, 41)]
        .into_iter()
        .chain(mixed.clone())
        .collect();
    let decode: Vec<Run> = [
        rect(3, 1, 5),
        rect(2, 1, 130),
        "2:7:1,0:100:1,1:44:1".into(),
    ]
    .into_iter()
    .chain(mixed)
    .collect();
    for w in widths {
        for (name, runs) in [
            ("attention_prefill", &prefill),
            ("attention_prefill_simple", &prefill),
            ("attention_decode", &decode),
            ("attention_decode_simple", &decode),
        ] {
            let k = ngpt_kernel(name, w)?;
            let exe = build(dir.path(), &k, w)?;
            check(
                &exe,
                &format!("{name}, head_dim {}", w.d),
                runs,
                (1e-5, 1e-5),
            )?;
        }
    }
    Ok(())
}

#[test]
fn persistent_kernel_entries_match_float64_gemvs_streamed_or_not_and_split_attention() -> Result<()>
{
    if !gxx() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let src = on_host(ngpt_runtime::cuda::HELPERS_CU, "helpers.cu", "xs")?;
    // Buffers of 4 KiB (a slice holds 8 to 64 of a block's rows, never all of the
    // 1,000-row gemv's), behind 8 KiB of staged rows (8 rows of swiglu at n_embd 64).
    let (slice, ring) = (4096, 8192);
    // (table, rows, blocks, streaming for gemv / pos_norm folded into attention)
    type Runs<'a> = &'a [(&'a str, usize, usize, usize)];
    let default_runs: Runs = &[
        ("gemv", 1, 3, 0),
        ("gemv", 1, 3, 1),
        ("gemv", 3, 3, 1),
        ("gemv", 8, 2, 1),
        ("gemv", 8, 2, 0),
        ("attention", 3, 3, 0),
        ("attention", 3, 3, 1),
        ("attention", 8, 2, 1),
    ];
    // The wide attention (NGPT_PD_WIDE): at 3 blocks (48 warps) one row of 4 heads has 12
    // splits, 2 rows 6 (position 40: a tile a split; 1,100: three), 8 rows on 2 blocks one.
    let wide_runs: Runs = &[
        ("attention", 1, 3, 1),
        ("attention", 2, 3, 1),
        ("attention", 3, 3, 0),
        ("attention", 8, 2, 1),
    ];
    // (build, n_embd, head_dim, extra defines, runs): head_dim 16 and 64 take the float4
    // P.V (4 and 16 lanes a value row), 12 the row-at-a-time one.
    let builds: [(&str, usize, usize, &str, Runs); 4] = [
        ("default", 64, 16, "", default_runs),
        ("wide", 64, 16, "#define NGPT_PD_WIDE 1\n", wide_runs),
        (
            "wide_d64",
            128,
            64,
            "#define NGPT_PD_WIDE 1\n",
            &wide_runs[1..3],
        ),
        (
            "wide_d12",
            36,
            12,
            "#define NGPT_PD_WIDE 1\n",
            &wide_runs[1..2],
        ),
    ];
    for (build, c, d, defines, runs) in builds {
        let exe = compile(
            dir.path(),
            &format!("persistent_{build}"),
            ("persistent.cpp", PERSISTENT_CPP),
            &format!(
                "#define NGPT_PD_C {c}\n#define NGPT_PD_D {d}\n{defines}#define NGPT_PD_STREAM 1\n#define NGPT_EMU_SLICE {slice}\n#define NGPT_EMU_RING {ring}\n#define NGPT_EMU_SHARED {}\n{}",
                ring + 2 * slice,
                src
            ),
        )?;
        for &(table, rows, blocks, flag) in runs {
            let what = format!(
                "decode_persistent ({build}) {table} entries, {rows} rows, {blocks} blocks, flag {flag}"
            );
            let args = [
                table.to_string(),
                rows.to_string(),
                blocks.to_string(),
                flag.to_string(),
            ];
            let text = emulate(&exe, &args, &what)?;
            let (worst, unwritten) = (field(&text, "worst_rel_err")?, field(&text, "unwritten")?);
            eprintln!("{what}: worst relative error {worst:.3e}");
            assert!(worst <= 1e-5, "{what}: {text}");
            assert_eq!(unwritten, 0.0, "{what}: outputs left unwritten");
        }
    }
    Ok(())
}

#[test]
fn plan_row_kernels_match_float64_on_the_cpu() -> Result<()> {
    if !gxx() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let body = on_host(NGPT_CU, "ngpt.cu", "tile")?;
    // (n_embd, n_head, vocab, KV capacity, n_inner): head dims 16, 12 (pos_norm's and
    // rotary_norm's pairs fill part of one warp) and 64 (one warp of pairs); odd
    // vocabularies; MLP widths other than 4 x n_embd (the Hugging Face family's n_inner).
    for (c, h, v, max_seq, inner) in [
        (48, 3, 37, 40, 100),
        (36, 3, 97, 24, 144),
        (128, 2, 101, 80, 341),
    ] {
        let exe = compile(
            dir.path(),
            &format!("rows_{c}_{h}"),
            ("rows.cpp", ROWS_CPP),
            &format!(
                "#define NGPT_C {c}\n#define NGPT_H {h}\n#define NGPT_D {}\n#define NGPT_V {v}\n#define NGPT_MAX_SEQ {max_seq}\n#define NGPT_KV_TILE {KV_TILE}\n#define NGPT_I {inner}\n{}",
                c / h,
                body
            ),
        )?;
        // (rows, tokens per sequence)
        for (rows, tokens) in [(5, 3), (1, 1), (8, 8)] {
            let what =
                format!("ngpt.cu row kernels, n_embd {c}, {h} heads, {rows} rows of {tokens}");
            let text = emulate(&exe, &[rows, tokens].map(|v: i32| v.to_string()), &what)?;
            let (worst, unwritten) = (field(&text, "worst_rel_err")?, field(&text, "unwritten")?);
            eprintln!("{what}: worst relative error {worst:.3e}");
            assert!(worst <= 1e-5, "{what}: {text}");
            assert_eq!(unwritten, 0.0, "{what}: outputs left unwritten");
        }
    }
    Ok(())
}

#[test]
fn quantized_gemv_kernels_match_float64_on_the_dequantized_weights() -> Result<()> {
    if !gxx() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let src = on_host(ngpt_runtime::cuda::HELPERS_CU, "helpers.cu", "xs")?;
    let exe = compile(dir.path(), "gemv_quant", ("gemv.cpp", GEMV_CPP), &src)?;
    // (bits, m, k, block, columns, ldb, beta, 16-byte path): rows not a multiple of a
    // block's 8; K not a multiple of the block (a short last block), of the 16-byte run or
    // odd (int4: half a byte of padding); blocks of 16 (an int4 load spans two blocks), 32,
    // 64 and 128; 1, 3, 5 and 8 columns; ldb past k; beta != 0; the 0.5b's K of 1024.
    let cases = [
        (8, 37, 80, 32, 3, 80, 0.0, true),
        (8, 29, 256, 128, 8, 260, 0.5, true),
        (8, 13, 45, 16, 2, 45, 0.0, false),
        (8, 21, 40, 32, 1, 44, 0.0, false),
        (4, 37, 96, 64, 3, 96, 0.0, true),
        (4, 19, 64, 16, 5, 68, -0.25, true),
        (4, 23, 45, 16, 1, 45, 0.0, false),
        (4, 11, 48, 32, 8, 48, 0.0, false),
        (4, 9, 1024, 32, 2, 1024, 0.0, true),
        (8, 9, 1024, 32, 1, 1024, 0.0, true),
    ];
    for (bits, m, k, block, n, ldb, beta, vec) in cases {
        let what = format!("gemv_i{bits}_{n}: m {m}, k {k}, block {block}, ldb {ldb}, beta {beta}");
        let args = [bits, m, k, block, n, ldb].map(|v: i32| v.to_string());
        let mut args = args.to_vec();
        args.push(beta.to_string());
        let text = emulate(&exe, &args, &what)?;
        let (worst, unwritten) = (field(&text, "worst_rel_err")?, field(&text, "unwritten")?);
        eprintln!("{what}: relative error {worst:.3e} (16-byte path: {vec})");
        assert_eq!(
            field(&text, "vec")?,
            f64::from(u8::from(vec)),
            "{what}: path"
        );
        assert!(worst <= 1e-6, "{what}: {text}");
        assert_eq!(unwritten, 0.0, "{what}: outputs left unwritten");
        assert_eq!(field(&text, "touched")?, 0.0, "{what}: wrote past row m");
        // dequant_rows (the prefill GEMM's tiles) gives exactly f32(scale) * q.
        assert_eq!(field(&text, "dequant_diff")?, 0.0, "{what}: dequant_rows");
    }
    Ok(())
}
