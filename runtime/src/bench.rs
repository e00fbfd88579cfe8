//! The machine's own limits, measured: what `ngpt bench` compares an engine against.
//!
//! A decode step must at least stream its weights and KV cache through memory, and a
//! prefill must at least do its GEMM FLOPs; dividing by the rates measured here gives the
//! floors, and the measured time over the floor says how close an engine gets.

use std::time::Instant;

use rayon::prelude::*;

/// Read bandwidth of main memory in bytes/s: the best of `runs` parallel sums over a
/// buffer of `bytes` (use several times the last-level cache).
///
/// ```
/// let bw = ngpt_runtime::bench::memory_bandwidth(8 << 20, 2);
/// assert!(bw > 0.0);
/// ```
pub fn memory_bandwidth(bytes: usize, runs: usize) -> f64 {
    // Integer sums vectorize without a dependency chain, so the loop is bound by memory,
    // not by the latency of float adds.
    let n = (bytes / 8).max(1024);
    let data: Vec<u64> = (0..n as u64).collect();
    let mut best = f64::INFINITY;
    let mut sink = 0u64;
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        let s: u64 = data
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
            .reduce(|| 0, u64::wrapping_add);
        best = best.min(t0.elapsed().as_secs_f64());
        sink = sink.wrapping_add(s);
    }
    std::hint::black_box(sink);
    (n * 8) as f64 / best
}

/// The f32 GEMM rate of the CPU executor's GEMM (the gemm crate on rayon's pool) in
/// FLOP/s: the best of `runs` products of two `size x size` matrices.
///
/// ```
/// let rate = ngpt_runtime::bench::gemm_rate(64, 2);
/// assert!(rate > 0.0);
/// ```
pub fn gemm_rate(size: usize, runs: usize) -> f64 {
    let n = size.max(1);
    let a: Vec<f32> = (0..n * n).map(|i| ((i % 13) as f32) * 0.1).collect();
    let b: Vec<f32> = (0..n * n).map(|i| ((i % 7) as f32) * 0.1).collect();
    let mut c = vec![0f32; n * n];
    let mut best = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        // SAFETY: a, b and c are n x n, contiguous, row-major; c is distinct.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (n as f64).powi(3) / best
}

/// Peak resident memory of this process so far (VmHWM), in bytes, where the OS says.
///
/// ```
/// let touched = vec![1u8; 64 << 20]; // 64 MiB, written, so resident
/// // None where the OS does not say (Linux does, in /proc/self/status).
/// if let Some(peak) = ngpt_runtime::bench::peak_rss_bytes() {
///     assert!(peak >= touched.len() as u64);
/// }
/// ```
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
