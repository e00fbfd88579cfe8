//! The inner loops of CPU attention for one (row, head): the scores `q . k_u` of a run of
//! keys, and the weighted sum `sum_u p_u v_u` of a run of value rows.
//!
//! Both have one fixed order of operations, so results are bitwise the same with or
//! without AVX2 (and whatever the thread count):
//! - a score is a dot product of four accumulators of eight lanes (element `i` of each
//!   32-wide chunk into accumulator `i / 8`, lane `i % 8`; what is left after the last
//!   chunk eight at a time into the first, then a scalar tail), separate multiplies and
//!   adds, the lanes summed in a fixed tree ([`dot`]); not one running sum whose 64
//!   dependent adds a key the compiler may not reorder;
//! - a weighted sum: each output element `o[j] = sum_u p_u v_u[j]`, keys in order from 0,
//!   a multiply then an add (no FMA); the AVX2 path keeps up to 64 outputs in registers
//!   across all the keys instead of loading and storing them for every key.
//!
//! Tried and left (BENCHMARKS.md): scores of eight keys at once summed by horizontal adds
//! gave a 2,000-token prefill 5% more but decode at 2,000 cached keys 8% less.

/// `out[u] = q . keys[u * hd..][..hd]` for every `u < out.len()`; `keys` holds at least
/// `out.len() * hd` values and `q` at least `hd`.
pub(crate) fn scores(q: &[f32], keys: &[f32], hd: usize, out: &mut [f32]) {
    if hd == 0 {
        // Empty dot products (plans have head_dim >= 1; the public kernels take any Dims).
        out.fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked just above).
        unsafe { scores_avx2(q, keys, hd, out) };
        return;
    }
    for (s, k) in out.iter_mut().zip(keys.chunks_exact(hd)) {
        *s = dot(k, &q[..hd]);
    }
}

/// [`scores`] with the AVX2 dot product inlined into the loop over the keys.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scores_avx2(q: &[f32], keys: &[f32], hd: usize, out: &mut [f32]) {
    for (s, k) in out.iter_mut().zip(keys.chunks_exact(hd)) {
        // SAFETY: AVX2 is present (this function's contract).
        *s = unsafe { dot_avx2(k, &q[..hd]) };
    }
}

/// How far ahead (in bytes) the AVX2 dot product prefetches the keys (measured on the
/// weight GEMMs it once served: 1024 bytes the best of none to 4096).
const PREFETCH_BYTES: usize = 1024;

/// `sum_i k[i] * q[i]` over `min(k.len(), q.len())` elements, in the order the module
/// documentation gives.
#[inline(always)]
fn dot(k: &[f32], q: &[f32]) -> f32 {
    let n = k.len().min(q.len());
    let (k, q) = (&k[..n], &q[..n]);
    let mut acc = [[0f32; 8]; 4];
    let (kc, qc) = (k.chunks_exact(32), q.chunks_exact(32));
    let (kr, qr) = (kc.remainder(), qc.remainder());
    for (k32, q32) in kc.zip(qc) {
        for i in 0..32 {
            acc[i / 8][i % 8] += k32[i] * q32[i];
        }
    }
    finish(acc, kr, qr)
}

/// The end of [`dot`] after its 32-wide body: the rest eight at a time into the first
/// accumulator, the scalar tail, then every lane summed in a fixed tree.
#[inline(always)]
fn finish(mut acc: [[f32; 8]; 4], k: &[f32], q: &[f32]) -> f32 {
    let (kc, qc) = (k.chunks_exact(8), q.chunks_exact(8));
    let (kt, qt) = (kc.remainder(), qc.remainder());
    for (k8, q8) in kc.zip(qc) {
        for l in 0..8 {
            acc[0][l] += k8[l] * q8[l];
        }
    }
    let mut tail = 0f32;
    for (&a, &b) in kt.iter().zip(qt) {
        tail += a * b;
    }
    let mut lanes = [0f32; 8];
    for (l, v) in lanes.iter_mut().enumerate() {
        *v = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    }
    super::sum_tree::sum8(lanes) + tail
}

/// [`dot`] in AVX2 registers: the same four accumulators, the same separate multiplies
/// and adds in the same order, the same tree, so the same bits.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(k: &[f32], q: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = k.len().min(q.len());
    let body = n / 32 * 32;
    let (pk, pq) = (k.as_ptr(), q.as_ptr());
    let mut v = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < body {
        // Ask for the keys PREFETCH_BYTES ahead (a prefetch past the slice never faults).
        let ahead = pk.cast::<u8>().wrapping_add(4 * i + PREFETCH_BYTES);
        _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64).cast());
        for (a, v) in v.iter_mut().enumerate() {
            // SAFETY: i + 32 <= body <= n: the chunk is inside both slices.
            let p = _mm256_mul_ps(
                _mm256_loadu_ps(pk.add(i + 8 * a)),
                _mm256_loadu_ps(pq.add(i + 8 * a)),
            );
            *v = _mm256_add_ps(*v, p);
        }
        i += 32;
    }
    // `finish` in registers: the rest eight at a time into the first accumulator, the four
    // accumulators lane by lane, then the lanes in its tree; the scalar tail as it has it.
    let whole = n / 8 * 8;
    while i < whole {
        // SAFETY: i + 8 <= whole <= n: inside both slices.
        let p = _mm256_mul_ps(_mm256_loadu_ps(pk.add(i)), _mm256_loadu_ps(pq.add(i)));
        v[0] = _mm256_add_ps(v[0], p);
        i += 8;
    }
    let mut tail = 0f32;
    for (&a, &b) in k[whole..n].iter().zip(&q[whole..n]) {
        tail += a * b;
    }
    let lanes = _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
    super::sum_tree::sum8_avx(lanes) + tail
}

/// `o[j] = sum_u p[u] * vals[u * hd + j]` for `j < hd`, keys `u < p.len()` in order;
/// `o` holds at least `hd` values and `vals` at least `p.len() * hd`.
pub(crate) fn weighted_sum(p: &[f32], vals: &[f32], hd: usize, o: &mut [f32]) {
    if hd == 0 {
        return;
    }
    let o = &mut o[..hd];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above).
            unsafe { weighted_sum_avx2(p, vals, hd, o) };
            return;
        }
    }
    o.fill(0.0);
    for (&w, v) in p.iter().zip(vals.chunks_exact(hd)) {
        for (o, v) in o.iter_mut().zip(v) {
            *o += w * v;
        }
    }
}

/// [`weighted_sum`] with AVX2, for `hd >= 1` (it returns before calling this for 0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn weighted_sum_avx2(p: &[f32], vals: &[f32], hd: usize, o: &mut [f32]) {
    let n = p.len().min(vals.len() / hd);
    let whole = hd / 8 * 8;
    // Outputs 64 at a time (eight registers, a count known at compile time so that they
    // stay in registers), each over every key.
    let mut j0 = 0;
    while j0 < whole {
        match (whole - j0) / 8 {
            1 => weighted_block::<1>(&p[..n], vals, hd, j0, o),
            2 => weighted_block::<2>(&p[..n], vals, hd, j0, o),
            3 => weighted_block::<3>(&p[..n], vals, hd, j0, o),
            4 => weighted_block::<4>(&p[..n], vals, hd, j0, o),
            5 => weighted_block::<5>(&p[..n], vals, hd, j0, o),
            6 => weighted_block::<6>(&p[..n], vals, hd, j0, o),
            7 => weighted_block::<7>(&p[..n], vals, hd, j0, o),
            _ => weighted_block::<8>(&p[..n], vals, hd, j0, o),
        }
        j0 += 64;
    }
    for j in whole..hd {
        let mut t = 0f32;
        for (u, &w) in p[..n].iter().enumerate() {
            t += w * vals[u * hd + j];
        }
        o[j] = t;
    }
}

/// Outputs `j0 .. j0 + 8 R` of [`weighted_sum_avx2`]: `R` registers over every key.
///
/// # Safety
/// AVX2 is present; `j0 + 8 R <= hd <= o.len()`; `vals` holds `p.len()` rows of `hd`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn weighted_block<const R: usize>(
    p: &[f32],
    vals: &[f32],
    hd: usize,
    j0: usize,
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); R];
    let base = vals.as_ptr().wrapping_add(j0);
    for (u, &w) in p.iter().enumerate() {
        // The value row four keys on (decode reads them from memory once).
        let ahead = base.wrapping_add((u + 4) * hd).cast::<u8>();
        let mut line = 0;
        while line < R * 32 {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
            line += 64;
        }
        let wv = _mm256_set1_ps(w);
        for (r, a) in acc.iter_mut().enumerate() {
            // SAFETY: row u < p.len(), columns j0 + 8 r .. + 8 <= hd.
            let v = _mm256_loadu_ps(base.add(u * hd + 8 * r));
            *a = _mm256_add_ps(*a, _mm256_mul_ps(wv, v));
        }
    }
    for (r, a) in acc.iter().enumerate() {
        // SAFETY: j0 + 8 r + 8 <= hd <= o.len().
        _mm256_storeu_ps(o.as_mut_ptr().add(j0 + 8 * r), *a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 9) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn scores_and_weighted_sums_are_bitwise_the_portable_order_and_near_exact() {
        // Head dims below, at and between whole chunks and past 64; key counts below,
        // at and past the eight a step takes.
        for hd in [0, 1, 6, 8, 12, 16, 64, 72, 100, 128] {
            for n in [0, 1, 7, 8, 9, 17, 40] {
                let q = values(hd, 1);
                let keys = values(n * hd, 2);
                let mut got = vec![f32::NAN; n];
                scores(&q, &keys, hd, &mut got);
                let p = values(n, 3);
                let mut o = vec![f32::NAN; hd];
                weighted_sum(&p, &keys, hd, &mut o);
                for u in 0..n {
                    let k = &keys[u * hd..(u + 1) * hd];
                    let want = dot(k, &q);
                    assert_eq!(got[u].to_bits(), want.to_bits(), "hd {hd}, key {u}");
                    let exact: f64 = q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                    assert!((got[u] as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()));
                }
                for j in 0..hd {
                    let mut want = 0f32;
                    for u in 0..n {
                        want += p[u] * keys[u * hd + j];
                    }
                    assert_eq!(o[j].to_bits(), want.to_bits(), "hd {hd}, n {n}, output {j}");
                }
            }
        }
    }
}
