//! The model config: NVIDIA/ngpt's `model_args` (spec section 1).

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};

/// Largest value ngpt accepts for any one dimension. Far above any real nGPT; the real
/// guard is that the tensors a config implies must fit in the checkpoint file.
pub const MAX_DIM: u64 = 1 << 24;

/// The model config, read from `model_args` (ckpt.pt) or `config.json`.
///
/// `n_head` and `base_scale` cannot be recovered from tensor shapes, so they always come
/// from the file, never from a guess.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    /// Number of transformer blocks (`transformer.h.{i}`).
    pub n_layer: usize,
    /// Attention heads per block; `n_embd / n_head` is the head dimension, which must be
    /// even.
    pub n_head: usize,
    /// Model width C: the length of every embedding row and residual vector, a multiple of
    /// `n_head`.
    pub n_embd: usize,
    /// Context length the model was trained with (1024 when the file does not say); the
    /// default ONNX position table covers at least this many positions.
    pub block_size: usize,
    /// Vocabulary size V: rows of `wte` and `lm_head` and length of `sz`; token ids must be
    /// below it.
    pub vocab_size: usize,
    /// NVIDIA's `base_scale`, finite and positive: the scale the stored scaling vectors are
    /// kept in, divided out to get their effective values (`sz_eff = sz / base_scale`).
    pub base_scale: f64,
    /// Whether the Linear layers have biases; always false, as ngpt rejects checkpoints
    /// that have them.
    pub bias: bool,
    /// `model_args`' `use_nGPT` flag; always 1, as ngpt reads only normalized-transformer
    /// checkpoints.
    #[serde(rename = "use_nGPT")]
    pub use_ngpt: i64,
    /// Training dropout rate (0.0 when the file does not say); inference ignores it.
    pub dropout: f64,
}

/// One value of `model_args`, as either the pickle or JSON holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum ArgValue {
    /// An integer: a pickle int or long, or a JSON number without a fraction.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A boolean; also accepted where an integer is expected, as 0 or 1.
    Bool(bool),
    /// Any other value (a string, `None`, a list, ...), kept as text for error messages.
    Other(String),
}

impl Config {
    /// Head dimension D = n_embd / n_head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Builds and validates a config from `model_args` key/value pairs read from `path`.
    ///
    /// ```
    /// use std::collections::BTreeMap;
    /// use ngpt_compiler::config::{ArgValue, Config};
    /// let mut args = BTreeMap::new();
    /// for (k, v) in [("n_layer", 2), ("n_head", 2), ("n_embd", 64), ("vocab_size", 86), ("use_nGPT", 1)] {
    ///     args.insert(k.to_string(), ArgValue::Int(v));
    /// }
    /// args.insert("base_scale".into(), ArgValue::Float(0.125));
    /// let config = Config::from_args(&args, "config.json".as_ref())?;
    /// assert_eq!(config.head_dim(), 32);
    /// # Ok::<(), ngpt_compiler::Error>(())
    /// ```
    pub fn from_args(args: &BTreeMap<String, ArgValue>, path: &Path) -> Result<Self> {
        let err = |field: &str, problem: String| Error::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            problem,
        };
        let int = |field: &str, default: Option<i64>| -> Result<i64> {
            match args.get(field) {
                Some(ArgValue::Int(v)) => Ok(*v),
                Some(ArgValue::Bool(b)) => Ok(*b as i64),
                Some(other) => Err(err(field, format!("expected an integer, found {other:?}"))),
                None => default.ok_or_else(|| err(field, "missing".to_string())),
            }
        };
        let dim = |field: &str, default: Option<i64>| -> Result<usize> {
            let v = int(field, default)?;
            if v <= 0 || v as u64 > MAX_DIM {
                return Err(err(
                    field,
                    format!("expected a positive integer at most {MAX_DIM}, found {v}"),
                ));
            }
            Ok(v as usize)
        };
        let use_ngpt = int("use_nGPT", None)?;
        if use_ngpt != 1 {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: format!("use_nGPT = {use_ngpt}"),
                why: "ngpt reads normalized-transformer checkpoints only, which have use_nGPT = 1"
                    .into(),
            });
        }
        let bias = match args.get("bias") {
            None => false,
            Some(ArgValue::Bool(b)) => *b,
            Some(ArgValue::Int(i)) => *i != 0,
            Some(other) => return Err(err("bias", format!("expected a boolean, found {other:?}"))),
        };
        if bias {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: "bias = true".into(),
                why: "nGPT checkpoints with Linear biases are not supported; NVIDIA's nGPT runs use bias = false".into(),
            });
        }
        let base_scale = match args.get("base_scale") {
            Some(ArgValue::Float(v)) => *v,
            Some(ArgValue::Int(v)) => *v as f64,
            Some(other) => return Err(err("base_scale", format!("expected a number, found {other:?}"))),
            None => {
                return Err(err(
                    "base_scale",
                    "missing; it cannot be recovered from the tensors (train.py sets 1/sqrt(n_embd), GPTConfig defaults to 1/32)".into(),
                ))
            }
        };
        if !(base_scale.is_finite() && base_scale > 0.0) {
            return Err(err(
                "base_scale",
                format!("expected a finite positive number, found {base_scale}"),
            ));
        }
        let dropout = match args.get("dropout") {
            Some(ArgValue::Float(v)) => *v,
            Some(ArgValue::Int(v)) => *v as f64,
            _ => 0.0,
        };
        let config = Config {
            n_layer: dim("n_layer", None)?,
            n_head: dim("n_head", None)?,
            n_embd: dim("n_embd", None)?,
            block_size: dim("block_size", Some(1024))?,
            vocab_size: dim("vocab_size", None)?,
            base_scale,
            bias,
            use_ngpt,
            dropout,
        };
        if !config.n_embd.is_multiple_of(config.n_head) {
            return Err(err(
                "n_embd",
                format!(
                    "{} is not divisible by n_head = {}",
                    config.n_embd, config.n_head
                ),
            ));
        }
        if !config.head_dim().is_multiple_of(2) {
            return Err(err(
                "n_head",
                format!(
                    "head_dim = n_embd / n_head = {} is odd; the position step needs an even head_dim",
                    config.head_dim()
                ),
            ));
        }
        Ok(config)
    }

    /// Reads `config.json` (the same keys as `model_args`).
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let obj = value.as_object().ok_or_else(|| Error::Format {
            path: path.to_path_buf(),
            reason: "expected a JSON object of model_args".into(),
        })?;
        let args = obj
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::Bool(b) => ArgValue::Bool(*b),
                    serde_json::Value::Number(n) => match n.as_i64() {
                        Some(i) => ArgValue::Int(i),
                        None => ArgValue::Float(n.as_f64().unwrap_or(f64::NAN)),
                    },
                    other => ArgValue::Other(other.to_string()),
                };
                (k.clone(), v)
            })
            .collect();
        Self::from_args(&args, path)
    }

    /// The config as `model_args` JSON, the form `config.json` holds.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("Config serializes to JSON")
    }

    /// The state-dict keys and shapes a bias-free nGPT of this config has (spec section 2).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (c, v) = (self.n_embd, self.vocab_size);
        let mut out = vec![("transformer.wte.weight".to_string(), vec![v, c])];
        for i in 0..self.n_layer {
            let p = format!("transformer.h.{i}");
            out.push((format!("{p}.query.weight"), vec![c, c]));
            out.push((format!("{p}.key.weight"), vec![c, c]));
            out.push((format!("{p}.value.weight"), vec![c, c]));
            out.push((format!("{p}.att_c_proj.weight"), vec![c, c]));
            out.push((format!("{p}.c_fc.weight"), vec![8 * c, c]));
            out.push((format!("{p}.mlp_c_proj.weight"), vec![c, 4 * c]));
            out.push((format!("{p}.attn_alpha"), vec![c]));
            out.push((format!("{p}.mlp_alpha"), vec![c]));
            out.push((format!("{p}.sqk"), vec![c]));
            out.push((format!("{p}.suv"), vec![8 * c]));
        }
        out.push(("lm_head.weight".to_string(), vec![v, c]));
        out.push(("sz".to_string(), vec![v]));
        out
    }

    /// Number of parameters the config implies, or `None` on overflow.
    pub fn parameter_count(&self) -> Option<u64> {
        let c = self.n_embd as u64;
        let v = self.vocab_size as u64;
        let per_layer = c
            .checked_mul(c)?
            .checked_mul(16)?
            .checked_add(c.checked_mul(11)?)?;
        let embed = v.checked_mul(c)?.checked_mul(2)?.checked_add(v)?;
        per_layer
            .checked_mul(self.n_layer as u64)?
            .checked_add(embed)
    }
}
