//! How fast the CPU executor's weight GEMM kernels run for one activation row (a decode
//! step's GEMV), per weight format, on one thread with the weights in cache and on every
//! thread over weights far larger than the caches: the compute ceiling each format's
//! decode meets, beside the memory floor `ngpt bench` prints.
//!
//! ```text
//! cargo run --release -p ngpt-runtime --example kernel_rates
//! ```
//!
//! Prints, per format (`int8a` and `int4a`: with int8 activations), giga-weights a second
//! (and the weight bytes a second that makes);
//! then each format's rate over 8, 64 and 128 activation rows (a prompt's prefill), in
//! GFLOP/s.
//! A format whose in-cache rate on all cores is below what its bytes allow at the machine's
//! read bandwidth is bound by its arithmetic, not by memory.

use std::time::Instant;

use ngpt_runtime::cpu::{quant, tiles, weight_gemm::Shape};
use ngpt_runtime::plan::{QuantBits, QuantWeight};

/// Seconds one call of `f` takes: the best of three timings of enough calls for ~0.3 s.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-7);
    let reps = ((0.3 / once) as usize).clamp(1, 100_000);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    best
}

/// A `rows x k` int8 or int4 matrix in blocks of 32 with f16 scales near 1/64.
fn quantized(bits: QuantBits, rows: usize, k: usize) -> QuantWeight {
    let row_bytes = match bits {
        QuantBits::Int8 => k,
        QuantBits::Int4 => k.div_ceil(2),
    };
    let data: Vec<u8> = (0..rows * row_bytes)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let scales: Vec<u16> = (0..rows * k.div_ceil(32))
        .map(|i| 0x2400 + (i % 97) as u16)
        .collect();
    QuantWeight {
        bits,
        rows,
        k,
        block: 32,
        act_block: 0,
        data: data.into(),
        scales: scales.into(),
    }
}

/// The GEMM of format `name` over a `rows x k` matrix and `n` activation rows: a closure
/// that runs it once.
fn gemm_of(name: &str, rows: usize, n: usize, k: usize) -> Box<dyn FnMut() + Send> {
    let x: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut c = vec![0f32; rows * n];
    let s = Shape {
        m: rows,
        n,
        k,
        lda: k,
        ldb: k,
        ldc: rows,
        alpha: 1.0,
        beta: 0.0,
    };
    match name {
        "f32" => {
            let w: Vec<f32> = (0..rows * k).map(|i| (i % 251) as f32 / 251.0).collect();
            Box::new(move || tiles::gemm(s, &w, &x, &mut c))
        }
        "bf16" => {
            let w: Vec<u16> = (0..rows * k).map(|i| 0x3c00 + (i % 251) as u16).collect();
            Box::new(move || tiles::gemm(s, &w, &x, &mut c))
        }
        "int8" | "int4" | "int8a" | "int4a" => {
            let bits = if name.starts_with("int8") {
                QuantBits::Int8
            } else {
                QuantBits::Int4
            };
            let mut w = quantized(bits, rows, k);
            // `a`: int8 activations (`--quant-activations int8`).
            w.act_block = if name.ends_with('a') { 32 } else { 0 };
            Box::new(move || quant::gemm(s, &w, &x, &mut c))
        }
        _ => unreachable!("a format this example names"),
    }
}

/// Bytes a weight of `name` takes (int8/int4 with their f16 scale per 32).
fn bytes_per_weight(name: &str) -> f64 {
    match name {
        "f32" => 4.0,
        "bf16" => 2.0,
        "int8" | "int8a" => 1.0 + 2.0 / 32.0,
        _ => 0.5 + 2.0 / 32.0,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let threads = rayon::current_num_threads();
    println!("weight GEMV rates, one activation row (G weights/s, and GB/s of weights)");
    for name in ["f32", "bf16", "int8", "int4", "int8a", "int4a"] {
        let gw = |rows: usize, t: f64| (rows * 1024) as f64 / t / 1e9;
        // 192 KiB of weights (in L2) and 1024 x 1024 (a 0.5b preset attention projection,
        // in L2/L3) on one thread.
        let l2_rows = ((192usize << 10) as f64 / (bytes_per_weight(name) * 1024.0)) as usize;
        let mut h = gemm_of(name, l2_rows, 1, 1024);
        let t2 = one.install(|| time(&mut h));
        let mut f = gemm_of(name, 1024, 1, 1024);
        let t1 = one.install(|| time(&mut f));
        // 256 MiB of weights or more: from memory, on one thread and on every thread.
        let big_rows = ((256usize << 20) as f64 / (bytes_per_weight(name) * 1024.0)) as usize;
        let mut g = gemm_of(name, big_rows, 1, 1024);
        let t3 = one.install(|| time(&mut g));
        let tn = time(&mut g);
        println!(
            "  {name:>5}: 1 thread: in L2 {:6.2} G/s, 1024x1024 {:6.2} G/s, from memory {:6.2} G/s; from memory, {threads} threads {:6.2} G/s ({:5.1} GB/s)",
            gw(l2_rows, t2),
            gw(1024, t1),
            gw(big_rows, t3),
            gw(big_rows, tn),
            gw(big_rows, tn) * bytes_per_weight(name),
        );
    }
    println!("weight GEMM rates over a prompt's rows (GFLOP/s; 2304 x 768 weights, the small preset's qkv, in cache)");
    for name in ["f32", "bf16", "int8", "int4", "int8a", "int4a"] {
        for n in [8, 64, 128] {
            let (rows, k) = (2304, 768);
            let mut f = gemm_of(name, rows, n, k);
            let t1 = one.install(|| time(&mut f));
            let tn = time(&mut f);
            let gf = |t: f64| 2.0 * (rows * n * k) as f64 / t / 1e9;
            println!(
                "  {name:>4}, {n:>3} rows: 1 thread {:6.1} GFLOP/s; {threads} threads {:6.1} GFLOP/s",
                gf(t1),
                gf(tn)
            );
        }
    }
    println!("the same from memory (GFLOP/s; 24576 x 768 weights: 72 MiB f32, each GEMM reads them once)");
    for name in ["f32", "bf16"] {
        for n in [8, 32, 64, 128] {
            let (rows, k) = (24576, 768);
            let mut f = gemm_of(name, rows, n, k);
            let tn = time(&mut f);
            let gf = |t: f64| 2.0 * (rows * n * k) as f64 / t / 1e9;
            println!(
                "  {name:>4}, {n:>3} rows: {threads} threads {:6.1} GFLOP/s",
                gf(tn)
            );
        }
    }
    Ok(())
}
