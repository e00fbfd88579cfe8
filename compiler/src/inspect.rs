//! What `ngpt inspect` reports about a checkpoint: config, tensors, effective scaling
//! statistics and how far each normalized matrix is from unit norm.

use std::fmt;

use candle_core::DType;

use crate::config::Family;
use crate::error::{CandleContext, Result};
use crate::import::Checkpoint;

/// min / median / max of a list of values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// The smallest value.
    pub min: f64,
    /// The middle value in sorted order (the upper of the two middle ones for an even
    /// count).
    pub median: f64,
    /// The largest value.
    pub max: f64,
    /// How many of the values were negative before any abs().
    pub negative: usize,
    /// How many values there are (all layers together).
    pub count: usize,
}

impl Stats {
    fn of(mut v: Vec<f64>, negative: usize) -> Stats {
        v.sort_by(f64::total_cmp);
        let count = v.len();
        Stats {
            min: v[0],
            median: v[count / 2],
            max: v[count - 1],
            negative,
            count,
        }
    }
}

/// Largest deviation of a matrix's unit vectors from norm 1 (spec section 4).
#[derive(Debug, Clone, PartialEq)]
pub struct UnitNorm {
    /// The matrix's state-dict name.
    pub name: String,
    /// Its stored dtype: BF16 rounding alone leaves norms a few 1e-3 off.
    pub dtype: DType,
    /// Largest `| ||w|| - 1 |` over its vectors along the n_embd axis (rows, or columns for
    /// `att_c_proj` and `mlp_c_proj`; for the Hugging Face family's [in, out] Conv1D
    /// weights, the output columns of `c_attn` and `c_fc` and the input rows of the two
    /// `c_proj`).
    pub max_dev: f64,
}

/// Everything `ngpt inspect` prints.
#[derive(Debug, Clone)]
pub struct Report {
    /// The checkpoint's family, in words ([`Family::describe`]).
    pub family: &'static str,
    /// What the unit-norm check leaves out and why (the Hugging Face family's lm_head_2,
    /// wpe and biases, which training does not normalize).
    pub notes: Vec<String>,
    /// (name, shape, dtype) of every tensor, in name order.
    pub tensors: Vec<(String, Vec<usize>, DType)>,
    /// (label, stats) of the effective scaling vectors.
    pub scaling: Vec<(&'static str, Stats)>,
    /// Distance from unit norm of every matrix, in name order.
    pub unit_norm: Vec<UnitNorm>,
    /// The config as `model_args` JSON ([`Config::to_json`](crate::config::Config::to_json)).
    pub config_json: String,
    /// Number of parameters the config implies (0 if that overflows a u64).
    pub parameters: u64,
}

/// Computes the report of `ckpt`.
pub fn report(ckpt: &Checkpoint) -> Result<Report> {
    let cfg = &ckpt.config;
    let bs = cfg.base_scale;
    let values = |name: &str| -> Result<Vec<f64>> {
        ckpt.tensor(name)?
            .to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .ctx(name)
    };
    let gather = |suffix: &str, scale: f64, abs: bool| -> Result<Stats> {
        let mut all = vec![];
        for i in 0..cfg.n_layer {
            all.extend(
                values(&format!("transformer.h.{i}.{suffix}"))?
                    .into_iter()
                    .map(|v| v * scale),
            );
        }
        let negative = all.iter().filter(|v| **v < 0.0).count();
        if abs {
            all.iter_mut().for_each(|v| *v = v.abs());
        }
        Ok(Stats::of(all, negative))
    };
    let sz: Vec<f64> = values("sz")?.into_iter().map(|v| v / bs).collect();
    let sz_neg = sz.iter().filter(|v| **v < 0.0).count();
    let scaling = match cfg.family {
        Family::Nvidia => vec![
            ("|attn_alpha_eff|", gather("attn_alpha", 0.05 / bs, true)?),
            ("|mlp_alpha_eff|", gather("mlp_alpha", 0.05 / bs, true)?),
            ("sqk_eff", gather("sqk", 1.0 / bs, false)?),
            ("suv_eff", gather("suv", (cfg.n_embd as f64).sqrt(), false)?),
            ("sz_eff", Stats::of(sz, sz_neg)),
        ],
        Family::Nous => vec![
            ("|attn_alpha_eff|", gather("attn_alpha", 0.05 / bs, true)?),
            ("|mlp_alpha_eff|", gather("mlp_alpha", 0.05 / bs, true)?),
            ("sqk_eff", gather("attn.sqk", 1.0 / bs, false)?),
            ("su_eff", gather("mlp.su", 1.0, false)?),
            (
                "sv_eff",
                gather("mlp.sv", (cfg.n_embd as f64).sqrt(), false)?,
            ),
            ("sz_eff", Stats::of(sz, sz_neg)),
        ],
    };
    let notes = match cfg.family {
        Family::Nvidia => vec![],
        Family::Nous => vec![
            "lm_head_2.weight, transformer.wpe.weight and the biases are not normalized by training (train_ngpt.py's normalize_matrices): not checked".to_string(),
        ],
    };

    let mut unit_norm = vec![];
    for (name, t) in &ckpt.tensors {
        // The n_embd axis, the axis summed over: rows for most matrices, columns for the
        // two output projections. The Hugging Face family stores Conv1D weights [in, out]:
        // c_attn's and c_fc's output columns, the c_proj's input rows.
        let dim = match cfg.family {
            Family::Nvidia => {
                if name.ends_with("att_c_proj.weight") || name.ends_with("mlp_c_proj.weight") {
                    0
                } else if t.rank() == 2 {
                    1
                } else {
                    continue;
                }
            }
            Family::Nous => {
                if name.ends_with("c_attn.weight") || name.ends_with("c_fc.weight") {
                    0
                } else if name.ends_with("c_proj.weight") || name == "transformer.wte.weight" {
                    1
                } else {
                    continue;
                }
            }
        };
        let norms = t
            .to_dtype(DType::F64)
            .and_then(|t| t.sqr())
            .and_then(|t| t.sum(dim))
            .and_then(|t| t.sqrt())
            .and_then(|t| t.to_vec1::<f64>())
            .ctx(name)?;
        let max_dev = norms.iter().map(|n| (n - 1.0).abs()).fold(0.0, f64::max);
        unit_norm.push(UnitNorm {
            name: name.clone(),
            dtype: t.dtype(),
            max_dev,
        });
    }
    Ok(Report {
        family: cfg.family.describe(),
        notes,
        tensors: ckpt
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec(), t.dtype()))
            .collect(),
        scaling,
        unit_norm,
        config_json: cfg.to_json(),
        parameters: cfg.parameter_count().unwrap_or(0),
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "family: {}", self.family)?;
        let label = if self.config_json.contains("\"model_type\"") {
            "config (config.json)"
        } else {
            "config (model_args)"
        };
        writeln!(f, "{label}:\n{}", self.config_json)?;
        writeln!(f, "parameters: {}", self.parameters)?;
        writeln!(f, "\ntensors:")?;
        for (name, shape, dtype) in &self.tensors {
            writeln!(f, "  {name:<40} {:<14} {dtype:?}", format!("{shape:?}"))?;
        }
        writeln!(f, "\neffective scaling vectors (all layers):")?;
        writeln!(
            f,
            "  {:<18} {:>11} {:>11} {:>11} {:>9}",
            "", "min", "median", "max", "negative"
        )?;
        for (label, s) in &self.scaling {
            writeln!(
                f,
                "  {label:<18} {:>11.4e} {:>11.4e} {:>11.4e} {:>4}/{}",
                s.min, s.median, s.max, s.negative, s.count
            )?;
        }
        writeln!(
            f,
            "\ndistance from unit norm along n_embd (max over vectors of | ||w|| - 1 |):"
        )?;
        for u in &self.unit_norm {
            writeln!(f, "  {:<40} {:?} {:.2e}", u.name, u.dtype, u.max_dev)?;
        }
        let worst = self.unit_norm.iter().map(|u| u.max_dev).fold(0.0, f64::max);
        let has_bf16 = self.unit_norm.iter().any(|u| u.dtype == DType::BF16);
        let verdict = if worst < 1e-5 {
            "all matrices unit-norm to f32 rounding"
        } else if has_bf16 && worst < 1e-2 {
            "normal for BF16 matrices: NVIDIA normalizes in f32 and rounds to BF16, leaving norms a few 1e-3 off"
        } else {
            "larger than training leaves them: this checkpoint may not be normalized"
        };
        writeln!(f, "  worst {worst:.2e}: {verdict}")?;
        for note in &self.notes {
            writeln!(f, "  note: {note}")?;
        }
        Ok(())
    }
}
