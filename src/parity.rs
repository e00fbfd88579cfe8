//! The `model.parity` file: what a model computed on a set of prompts, recorded by
//! `ngpt snapshot` and compared by `ngpt check`.
//!
//! Pretty JSON with one line per position, so that a diff of two records shows which
//! positions moved. Logits are rounded to `logit_decimals` decimals; everything else is
//! exact.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The format tag of the first field; a reader refuses other majors.
pub const FORMAT: &str = "ngpt-parity/1";

/// A whole record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub format: String,
    pub ngpt_version: String,
    /// The engine that computed it (`plan-cpu`) and in what (`f32`, `bf16 weights`).
    pub engine: String,
    pub numerics: String,
    pub source_sha256: String,
    pub vocab_size: usize,
    /// Logits are rounded to this many decimals.
    pub logit_decimals: u32,
    pub top_k: usize,
    pub greedy_tokens: usize,
    pub prompts: Vec<PromptRecord>,
}

/// What one prompt gave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptRecord {
    /// The line of the prompts file, as written.
    pub prompt: String,
    pub tokens: Vec<u32>,
    /// Greedy continuation after the prompt, with each step's lead of the top-1 logit over
    /// the runner-up (a small lead marks a near tie).
    pub greedy: Vec<u32>,
    pub greedy_margins: Vec<f64>,
    /// Over all logits of the prompt: mean, standard deviation, min, max.
    pub stats: Stats,
    /// One entry per position: the top-k (token id, logit), best first.
    pub positions: Vec<Position>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Stats {
        let n = values.len().max(1) as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        Stats {
            mean,
            std: var.sqrt(),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }

    pub fn rounded(self, decimals: u32) -> Stats {
        Stats {
            mean: round(self.mean, decimals),
            std: round(self.std, decimals),
            min: round(self.min, decimals),
            max: round(self.max, decimals),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Position {
    pub pos: usize,
    pub top: Vec<(u32, f64)>,
}

/// `v` rounded to `decimals` decimals.
pub fn round(v: f64, decimals: u32) -> f64 {
    let s = 10f64.powi(decimals as i32);
    (v * s).round() / s
}

/// The top `k` (id, logit) of `row`, best first; ties keep the lower id first.
pub fn top_k(row: &[f64], k: usize) -> Vec<(u32, f64)> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.into_iter().map(|i| (i as u32, row[i])).collect()
}

impl Record {
    /// The record as text: pretty JSON, one line per position.
    pub fn to_text(&self) -> Result<String> {
        let j = |v: &dyn erased::Json| v.json();
        let mut s = String::from("{\n");
        let header: [(&str, String); 9] = [
            ("format", j(&self.format)?),
            ("ngpt_version", j(&self.ngpt_version)?),
            ("engine", j(&self.engine)?),
            ("numerics", j(&self.numerics)?),
            ("source_sha256", j(&self.source_sha256)?),
            ("vocab_size", j(&self.vocab_size)?),
            ("logit_decimals", j(&self.logit_decimals)?),
            ("top_k", j(&self.top_k)?),
            ("greedy_tokens", j(&self.greedy_tokens)?),
        ];
        for (k, v) in header {
            s.push_str(&format!("  \"{k}\": {v},\n"));
        }
        s.push_str("  \"prompts\": [");
        for (i, p) in self.prompts.iter().enumerate() {
            s.push_str(if i == 0 { "\n" } else { ",\n" });
            s.push_str("    {\n");
            s.push_str(&format!("      \"prompt\": {},\n", j(&p.prompt)?));
            s.push_str(&format!("      \"tokens\": {},\n", j(&p.tokens)?));
            s.push_str(&format!("      \"greedy\": {},\n", j(&p.greedy)?));
            s.push_str(&format!(
                "      \"greedy_margins\": {},\n",
                j(&p.greedy_margins)?
            ));
            s.push_str(&format!("      \"stats\": {},\n", j(&p.stats)?));
            s.push_str("      \"positions\": [");
            for (n, pos) in p.positions.iter().enumerate() {
                s.push_str(if n == 0 { "\n" } else { ",\n" });
                s.push_str(&format!("        {}", j(pos)?));
            }
            s.push_str("\n      ]\n    }");
        }
        s.push_str("\n  ]\n}\n");
        Ok(s)
    }

    /// Reads and checks a record.
    pub fn read(path: &Path) -> Result<Record> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let r: Record = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not an ngpt parity record: {e}", path.display()))?;
        if r.format != FORMAT {
            bail!(
                "{}: format `{}`; this ngpt reads `{FORMAT}`",
                path.display(),
                r.format
            );
        }
        for (i, p) in r.prompts.iter().enumerate() {
            if p.tokens.is_empty()
                || p.positions.len() != p.tokens.len()
                || p.greedy.len() != p.greedy_margins.len()
                || p.positions.iter().any(|q| q.top.is_empty())
            {
                bail!(
                    "{}: prompt {} is inconsistent (tokens, positions, greedy and margins must agree in length; every position needs a top-k)",
                    path.display(),
                    i + 1
                );
            }
            if let Some(t) = p
                .tokens
                .iter()
                .chain(&p.greedy)
                .chain(
                    p.positions
                        .iter()
                        .flat_map(|q| q.top.iter().map(|(id, _)| id)),
                )
                .find(|&&t| t as usize >= r.vocab_size)
            {
                bail!(
                    "{}: prompt {}: token id {t} is not below vocab_size {}",
                    path.display(),
                    i + 1,
                    r.vocab_size
                );
            }
        }
        Ok(r)
    }
}

/// serde_json through a trait object, for the writer's table of fields.
mod erased {
    pub trait Json {
        fn json(&self) -> anyhow::Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> anyhow::Result<String> {
            Ok(serde_json::to_string(self)?)
        }
    }
}

/// The tolerance of a check, relative to the spread of a prompt's logits: a recorded
/// logit `e` and a recomputed `g` agree when `|g - e| <= abs`, with
/// `abs = max(rel x std, 2 x the rounding step)` and `std` the recorded standard
/// deviation of that prompt's logits. Relative to the spread, because logits of
/// different models differ in scale by orders of magnitude.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub rel: f64,
}

impl Tolerance {
    /// The default for a pair of numerics (`f32`, `bf16 weights`, ...): 1e-4 when both
    /// sides compute in f32 or f64 (their logits differ by about 1e-7), 0.1 when either
    /// has reduced-precision weights.
    pub fn default_for(a: &str, b: &str) -> Tolerance {
        let full = |n: &str| n == "f32" || n == "f64";
        Tolerance {
            rel: if full(a) && full(b) { 1e-4 } else { 0.1 },
        }
    }

    /// The absolute tolerance for one recorded prompt.
    pub fn abs_for(&self, rec: &PromptRecord, decimals: u32) -> f64 {
        let step = 10f64.powi(-(decimals as i32));
        (self.rel * rec.stats.std).max(step)
    }
}

/// One line of the check's table.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// 1-based prompt number.
    pub prompt: usize,
    /// Position in the prompt, or the greedy step (`greedy 3`), or `-` for the whole prompt.
    pub at: String,
    pub metric: String,
    pub expected: String,
    pub got: String,
    /// False for what is reported but is not drift (a swap between near-tied logits).
    pub failure: bool,
}

/// What was recomputed for one prompt.
pub struct Recomputed {
    /// `[T, vocab]` logits.
    pub logits: Vec<f64>,
    pub greedy: Vec<(u32, f64)>,
}

/// Compares one recorded prompt with what was recomputed.
pub fn compare_prompt(
    n: usize,
    rec: &PromptRecord,
    got: &Recomputed,
    vocab: usize,
    tol: f64,
) -> Vec<Finding> {
    let mut out = vec![];
    let mut finding = |at: String, metric: &str, expected: String, got: String, failure| {
        out.push(Finding {
            prompt: n,
            at,
            metric: metric.into(),
            expected,
            got,
            failure,
        })
    };
    for (p, rec_pos) in rec.positions.iter().enumerate() {
        let row = &got.logits[p * vocab..(p + 1) * vocab];
        let (exp_top, exp_logit) = rec_pos.top[0];
        let (got_top, _) = crate::engines::top_two(row);
        for &(id, logit) in &rec_pos.top {
            let g = row[id as usize];
            if (g - logit).abs() > tol || g.is_nan() {
                finding(
                    p.to_string(),
                    &format!("logit[{id}]"),
                    format!("{logit}"),
                    format!("{g:.6}"),
                    true,
                );
            }
        }
        if got_top != exp_top {
            // A swap is a near tie when the recorded logits of both ids are within
            // tolerance of each other (and, checked above, each of its recorded value).
            let rec_other = rec_pos.top.iter().find(|(id, _)| *id == got_top);
            let near = rec_other.is_some_and(|(_, l)| (exp_logit - l).abs() <= 2.0 * tol);
            finding(
                p.to_string(),
                if near {
                    "top-1 swap (near tie)"
                } else {
                    "top-1"
                },
                exp_top.to_string(),
                got_top.to_string(),
                !near,
            );
        } else {
            let got_order: Vec<u32> = top_k(row, rec_pos.top.len())
                .iter()
                .map(|(id, _)| *id)
                .collect();
            let exp_order: Vec<u32> = rec_pos.top.iter().map(|(id, _)| *id).collect();
            if got_order != exp_order {
                finding(
                    p.to_string(),
                    "top-k order swap (near tie)",
                    format!("{exp_order:?}"),
                    format!("{got_order:?}"),
                    false,
                );
            }
        }
    }
    for (i, (&exp, (g, _))) in rec.greedy.iter().zip(&got.greedy).enumerate() {
        if exp != *g {
            let near = rec.greedy_margins[i] <= 2.0 * tol;
            finding(
                format!("greedy {i}"),
                if near {
                    "greedy swap (near tie)"
                } else {
                    "greedy token"
                },
                exp.to_string(),
                g.to_string(),
                !near,
            );
            break; // the continuations differ from here on
        }
    }
    if got.greedy.len() < rec.greedy.len() {
        finding(
            "-".into(),
            "greedy length",
            rec.greedy.len().to_string(),
            got.greedy.len().to_string(),
            true,
        );
    }
    let s = Stats::of(&got.logits);
    for (name, e, g) in [
        ("mean", rec.stats.mean, s.mean),
        ("std", rec.stats.std, s.std),
        ("min", rec.stats.min, s.min),
        ("max", rec.stats.max, s.max),
    ] {
        if (e - g).abs() > tol || g.is_nan() {
            finding("-".into(), name, format!("{e}"), format!("{g:.6}"), true);
        }
    }
    out
}

/// The prompts of a `--prompts FILE`: one per line, token ids (`5,17,3`) or text (encoded
/// with `vocab`); blank lines and lines starting with `#` are skipped. Returns each line
/// with its tokens.
pub fn read_prompts(
    path: &Path,
    vocab: Option<&crate::tokens::Vocab>,
    vocab_size: usize,
) -> Result<Vec<(String, Vec<u32>)>> {
    let text = std::fs::read_to_string(path).map_err(|io| crate::Error::PromptsUnreadable {
        path: path.to_path_buf(),
        io,
    })?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let numeric = trimmed
            .chars()
            .all(|c| c.is_ascii_digit() || c == ',' || c == ' ' || c == '-');
        let tokens = match (numeric, vocab) {
            (true, _) => crate::tokens::parse_tokens(trimmed, vocab_size),
            (false, Some(v)) => v.encode(line),
            (false, None) => Err(crate::Error::NoVocabulary.into()),
        }
        .and_then(|t| {
            anyhow::ensure!(!t.is_empty(), "encodes to no tokens");
            Ok(t)
        })
        .map_err(|problem| crate::Error::PromptLine {
            path: path.to_path_buf(),
            line: i + 1,
            problem,
        })?;
        out.push((line.to_string(), tokens));
    }
    if out.is_empty() {
        return Err(crate::Error::NoPrompts {
            path: path.to_path_buf(),
        }
        .into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(row: &[f64]) -> PromptRecord {
        PromptRecord {
            prompt: "1".into(),
            tokens: vec![1],
            greedy: vec![top_k(row, 1)[0].0],
            greedy_margins: vec![crate::engines::top_two(row).1],
            stats: Stats::of(row).rounded(4),
            positions: vec![Position {
                pos: 0,
                top: top_k(row, 3)
                    .into_iter()
                    .map(|(i, l)| (i, round(l, 4)))
                    .collect(),
            }],
        }
    }

    fn check(rec: &PromptRecord, row: &[f64]) -> Vec<Finding> {
        let got = Recomputed {
            logits: row.to_vec(),
            greedy: vec![crate::engines::top_two(row)],
        };
        compare_prompt(1, rec, &got, row.len(), 1e-3)
    }

    #[test]
    fn the_same_logits_pass_and_a_moved_one_fails_at_its_position() {
        let row = [0.5, 3.25, -1.0, 2.0, 3.0];
        let rec = record(&row);
        assert!(check(&rec, &row).is_empty());
        let mut moved = row;
        moved[3] += 0.004;
        let f = check(&rec, &moved);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(
            (f[0].at.as_str(), f[0].metric.as_str(), f[0].failure),
            ("0", "logit[3]", true)
        );
    }

    #[test]
    fn a_swap_between_near_tied_logits_is_reported_not_failed() {
        let row = [0.0, 2.0, 2.0004, -1.0];
        let rec = record(&row);
        let swapped = [0.0, 2.0004, 2.0, -1.0];
        let f = check(&rec, &swapped);
        assert!(f.iter().all(|f| !f.failure), "{f:?}");
        assert!(
            f.iter().any(|f| f.metric == "top-1 swap (near tie)"),
            "{f:?}"
        );
        // Far apart, the same swap is drift.
        let rec = record(&[0.0, 2.0, 2.5, -1.0]);
        let f = check(&rec, &[0.0, 2.5, 2.0, -1.0]);
        assert!(f.iter().any(|f| f.failure && f.metric == "top-1"), "{f:?}");
    }

    #[test]
    fn text_round_trips_and_has_one_line_per_position() -> Result<()> {
        let r = Record {
            format: FORMAT.into(),
            ngpt_version: "0".into(),
            engine: "ir".into(),
            numerics: "f32".into(),
            source_sha256: "ab".into(),
            vocab_size: 5,
            logit_decimals: 4,
            top_k: 3,
            greedy_tokens: 1,
            prompts: vec![record(&[0.5, 3.25, -1.0, 2.0, 3.0])],
        };
        let text = r.to_text()?;
        assert!(
            text.contains("\n        {\"pos\":0,\"top\":[[1,3.25],[4,3.0],[3,2.0]]}\n"),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Record>(&text)?, r);
        Ok(())
    }
}
