//! Choosing the next token: greedy, or top-k with temperature (the `sample_topk` kernel's
//! twin; the host draws the uniform number, so both executors pick the same token).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling settings. Temperature 0 (or top-k 1) is greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: usize,
}

/// A deterministic sampler: same seed, same tokens.
pub struct Sampler {
    pub settings: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(settings: Sampling, seed: u64) -> Sampler {
        Sampler {
            settings,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// One token from a row of logits.
    pub fn pick(&mut self, row: &[f32]) -> u32 {
        let u: f32 = self.rng.random();
        pick(row, self.settings, u)
    }
}

/// Index of the largest value (the first on ties).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// `sample_topk` on one row with the uniform draw `u` in [0, 1).
pub fn pick(row: &[f32], s: Sampling, u: f32) -> u32 {
    if s.temperature <= 0.0 || s.top_k == 1 || row.is_empty() {
        return argmax(row);
    }
    let k = s.top_k.clamp(1, row.len());
    let mut sorted: Vec<f32> = row.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    let top = sorted[0];
    let z: f32 = row
        .iter()
        .filter(|&&v| v >= kth)
        .map(|v| ((v - top) / s.temperature).exp())
        .sum();
    let target = u * z;
    let mut c = 0.0;
    let mut pick = 0;
    for (i, v) in row.iter().enumerate() {
        if *v < kth {
            continue;
        }
        c += ((v - top) / s.temperature).exp();
        pick = i;
        if c > target {
            break;
        }
    }
    pick as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_top_k() {
        let row = [0.1, 3.0, 2.9, -1.0];
        assert_eq!(
            pick(
                &row,
                Sampling {
                    temperature: 0.0,
                    top_k: 0
                },
                0.7
            ),
            1
        );
        // top-2 never picks outside {1, 2}
        for i in 0..100 {
            let t = pick(
                &row,
                Sampling {
                    temperature: 1.0,
                    top_k: 2,
                },
                i as f32 / 100.0,
            );
            assert!(t == 1 || t == 2);
        }
        assert_eq!(
            pick(
                &row,
                Sampling {
                    temperature: 1.0,
                    top_k: 2
                },
                0.0
            ),
            1
        );
        assert_eq!(
            pick(
                &row,
                Sampling {
                    temperature: 1.0,
                    top_k: 2
                },
                0.999
            ),
            2
        );
    }
}
