//! The one order in which the CPU kernels sum an accumulator's eight lanes:
//! `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`. The weight GEMM tiles
//! ([`super::tiles`]), the int8/int4 dot products ([`super::quant`]) and attention's scores
//! ([`super::attend`]) end every output with it, in portable code ([`sum8`]) and in AVX
//! registers ([`sum8_avx`]); the two are bitwise equal, which is what keeps each kernel's
//! AVX2 body bitwise its portable twin.

/// The eight lanes of `a` summed in the module's tree.
#[inline(always)]
pub(crate) fn sum8(a: [f32; 8]) -> f32 {
    let quads = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (quads[0] + quads[2]) + (quads[1] + quads[3])
}

/// [`sum8`] over the lanes of `v`, in registers.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx")]
pub(crate) fn sum8_avx(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    // (l0 + l4, l1 + l5, l2 + l6, l3 + l7), then (q0 + q2, q1 + q3), then the two.
    let quads = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let halves = _mm_add_ps(quads, _mm_movehl_ps(quads, quads));
    _mm_cvtss_f32(_mm_add_ss(halves, _mm_movehdup_ps(halves)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_register_tree_is_bitwise_the_portable_one() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx") {
            // Lanes of very different sizes, so that any other order rounds differently.
            let cases: [[f32; 8]; 3] = [
                [1e8, 3.0, -1e8, 0.25, 7.0, 1e-3, 5.5, -2.0],
                [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                [-0.0, -0.0, -0.0, -0.0, -0.0, -0.0, -0.0, -0.0],
            ];
            for a in cases {
                // SAFETY: AVX is present (checked above); the load reads a's eight lanes.
                let got = unsafe { sum8_avx(std::arch::x86_64::_mm256_loadu_ps(a.as_ptr())) };
                assert_eq!(got.to_bits(), sum8(a).to_bits(), "{a:?}");
            }
        }
    }
}
