//! Choosing the next token: greedy, or top-k with temperature (the `sample_topk` kernel's
//! twin; the host draws the uniform number, so both executors pick the same token).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling settings. Temperature 0 (or top-k 1) is greedy; top-k 0 samples among all
/// tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Divides the logits before the softmax: below 1 sharpens, above 1 flattens; 0 or
    /// less picks the largest logit.
    pub temperature: f32,
    /// Keeps the tokens whose logit is at least the k-th largest distinct value (ties count
    /// once); 1 is greedy, 0 keeps every token.
    pub top_k: usize,
}

/// A deterministic sampler: same seed, same tokens.
///
/// ```
/// use ngpt_runtime::sample::{Sampler, Sampling};
/// let logits = [0.1, 3.0, 2.9, -1.0];
/// let top2 = Sampling { temperature: 1.0, top_k: 2 };
/// let (mut a, mut b) = (Sampler::new(top2, 7), Sampler::new(top2, 7));
/// for _ in 0..20 {
///     let t = a.pick(&logits);
///     assert!(t == 1 || t == 2); // only the two largest logits are kept
///     assert_eq!(t, b.pick(&logits)); // same seed, same tokens
/// }
/// ```
pub struct Sampler {
    /// The settings every [`Sampler::pick`] applies; changing them keeps the random stream.
    pub settings: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler with `settings` whose uniform draws come from ChaCha8 seeded with `seed`.
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
///
/// ```
/// assert_eq!(ngpt_runtime::sample::argmax(&[0.5, 2.0, 2.0, -1.0]), 1);
/// ```
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
///
/// ```
/// use ngpt_runtime::sample::{pick, Sampling};
/// let row = [0.1, 3.0, 2.9, -1.0];
/// let greedy = Sampling { temperature: 0.0, top_k: 0 };
/// assert_eq!(pick(&row, greedy, 0.9), 1); // the draw does not matter
/// let top2 = Sampling { temperature: 1.0, top_k: 2 };
/// // `u` walks the kept tokens' probabilities in index order: token 1 (p ~ 0.52), then 2.
/// assert_eq!(pick(&row, top2, 0.0), 1);
/// assert_eq!(pick(&row, top2, 0.999), 2);
/// ```
pub fn pick(row: &[f32], s: Sampling, u: f32) -> u32 {
    if s.temperature <= 0.0 || s.top_k == 1 || row.is_empty() {
        return argmax(row);
    }
    // As the kernel: the threshold is the k-th largest distinct value; top-k 0 (or a k
    // beyond the distinct values) keeps every finite logit.
    let mut sorted: Vec<f32> = row.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted.dedup();
    let kth = match s.top_k {
        0 => f32::MIN,
        k => sorted.get(k - 1).copied().unwrap_or(f32::MIN),
    };
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

    #[test]
    fn top_k_zero_samples_among_all_tokens() {
        // Top-k 0 means all tokens (as the kernel reads it), not greedy.
        let row = [0.1, 3.0, 2.9, -1.0];
        let all = Sampling {
            temperature: 1.0,
            top_k: 0,
        };
        let picked: std::collections::BTreeSet<u32> = (0..1000)
            .map(|i| pick(&row, all, i as f32 / 1000.0))
            .collect();
        assert_eq!(picked.into_iter().collect::<Vec<_>>(), [0, 1, 2, 3]);
        // Ties count once toward k, as in the kernel: top-2 of [3, 3, 1] keeps the 1.
        let tie = [3.0, 3.0, 1.0];
        let two = Sampling {
            temperature: 1.0,
            top_k: 2,
        };
        assert_eq!(pick(&tie, two, 0.999), 2);
    }
}
