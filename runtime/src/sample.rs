//! Choosing the next token: greedy, or temperature sampling among the top-k and top-p
//! tokens, on the host with a seeded RNG (both executors pick the same token from the same
//! logits), and the log-probabilities a caller may ask for.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling settings. Temperature 0 (or top-k 1) is greedy; top-k 0 and top-p 1 sample
/// among all tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Divides the logits before the softmax: below 1 sharpens, above 1 flattens; 0 or
    /// less picks the largest logit.
    pub temperature: f32,
    /// Keeps the tokens whose logit is at least the k-th largest distinct value (ties count
    /// once); 1 is greedy, 0 keeps every token.
    pub top_k: usize,
    /// Nucleus sampling: of the tokens top-k kept, keeps the most likely ones whose
    /// probabilities (at this temperature) add up to at least `top_p` (ties at the edge
    /// kept together); 1 keeps them all. In (0, 1].
    pub top_p: f32,
}

impl Sampling {
    /// Greedy: the largest logit, first on ties.
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };
}

/// A deterministic sampler: same seed, same tokens.
///
/// ```
/// use ngpt_runtime::sample::{Sampler, Sampling};
/// let logits = [0.1, 3.0, 2.9, -1.0];
/// let top2 = Sampling { temperature: 1.0, top_k: 2, top_p: 1.0 };
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
/// let greedy = Sampling::GREEDY;
/// assert_eq!(pick(&row, greedy, 0.9), 1); // the draw does not matter
/// let top2 = Sampling { temperature: 1.0, top_k: 2, top_p: 1.0 };
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
    // Top-p: the smallest set of the most likely kept values whose probabilities reach
    // top_p, as a threshold on the logit (ties at the edge kept together). top_p 1 keeps
    // the top-k set as it is, so those draws are unchanged.
    let kth = if s.top_p < 1.0 {
        let weight = |v: f32| ((v - top) / s.temperature).exp();
        let counts = |v: f32| row.iter().filter(|&&x| x == v).count() as f32;
        let kept: Vec<f32> = sorted.iter().copied().filter(|&v| v >= kth).collect();
        let z: f32 = kept.iter().map(|&v| weight(v) * counts(v)).sum();
        let mut cum = 0.0;
        let mut edge = kth;
        for &v in &kept {
            cum += weight(v) * counts(v) / z;
            edge = v;
            if cum >= s.top_p {
                break;
            }
        }
        edge
    } else {
        kth
    };
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

/// The log-probability of `token` under the softmax of the raw logits `row` (temperature
/// 1, as OpenAI's `logprobs` report), and the `n` most likely tokens with theirs, most
/// likely first (ties by lower id). Sums in f64.
///
/// ```
/// use ngpt_runtime::sample::logprobs;
/// let (lp, top) = logprobs(&[0.0, 1.0, 1.0f32.ln()], 1, 2);
/// assert!((lp - (1.0f64 / (2.0 + std::f64::consts::E)).ln() as f32 - 1.0).abs() < 1e-6);
/// assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 0]);
/// ```
pub fn logprobs(row: &[f32], token: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = (top as f64)
        + row
            .iter()
            .map(|&v| ((v - top) as f64).exp())
            .sum::<f64>()
            .ln();
    let lp = |v: f32| (v as f64 - lse) as f32;
    let chosen = row
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&v| lp(v));
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    let n = n.min(row.len());
    if n > 0 {
        order.select_nth_unstable_by(n - 1, |&a, &b| {
            row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b))
        });
    }
    order.truncate(n);
    order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    (
        chosen,
        order
            .into_iter()
            .map(|t| (t, lp(row[t as usize])))
            .collect(),
    )
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
                    top_k: 0,
                    top_p: 1.0,
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
                    top_p: 1.0,
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
                    top_k: 2,
                    top_p: 1.0,
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
                    top_k: 2,
                    top_p: 1.0,
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
            top_p: 1.0,
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
            top_p: 1.0,
        };
        assert_eq!(pick(&tie, two, 0.999), 2);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities at temperature 1 of [ln 5, ln 3, ln 2]: 0.5, 0.3, 0.2.
        let row = [5f32.ln(), 3f32.ln(), 2f32.ln()];
        let with = |top_p| Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p,
        };
        let seen = |top_p| -> std::collections::BTreeSet<u32> {
            (0..1000)
                .map(|i| pick(&row, with(top_p), i as f32 / 1000.0))
                .collect()
        };
        assert_eq!(seen(0.4).into_iter().collect::<Vec<_>>(), [0]);
        assert_eq!(seen(0.75).into_iter().collect::<Vec<_>>(), [0, 1]);
        assert_eq!(seen(0.85).into_iter().collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(seen(1.0).into_iter().collect::<Vec<_>>(), [0, 1, 2]);
        // Top-p 1 draws exactly what it drew before top-p existed.
        for i in 0..100 {
            let u = i as f32 / 100.0;
            let a = pick(&row, with(1.0), u);
            let b = pick(&row, with(0.999_999_9), u);
            assert_eq!(a, b, "u {u}");
        }
    }

    #[test]
    fn logprobs_sum_to_one_and_rank() {
        let row = [0.3f32, -1.0, 2.0, 2.0, 0.0];
        let (lp, top) = logprobs(&row, 4, 3);
        let total: f64 = (0..5u32)
            .map(|t| (logprobs(&row, t, 0).0 as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert!(lp < 0.0);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [2, 3, 0]);
        assert_eq!(top[0].1, top[1].1);
    }
}
