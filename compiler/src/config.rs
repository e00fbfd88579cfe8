//! The model config: NVIDIA/ngpt's `model_args` (spec section 1), or a Hugging Face nGPT's
//! `config.json` (`model_type` "ngpt", NousResearch's reproduction; ngpt-hf-spec.md).

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};

/// Largest value ngpt accepts for any one dimension. Far above any real nGPT; the real
/// guard is that the tensors a config implies must fit in the checkpoint file.
pub const MAX_DIM: u64 = 1 << 24;

/// Which nGPT code a checkpoint was trained with: the two compute different functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum Family {
    /// NVIDIA/ngpt's `model.py` (`model_args` with `use_nGPT`): ngpt-spec.md.
    #[default]
    Nvidia,
    /// NousResearch's Hugging Face nGPT (`model_type` "ngpt", `modeling_ngpt.py`):
    /// ngpt-hf-spec.md. Learned positions, a true rotary embedding, biases, Conv1D weights.
    Nous,
}

impl Family {
    /// The family in words, as `ngpt inspect` and error messages name it.
    pub fn describe(self) -> &'static str {
        match self {
            Family::Nvidia => "NVIDIA nGPT (NVIDIA/ngpt)",
            Family::Nous => "Hugging Face nGPT (NousResearch)",
        }
    }
}

/// What ngpt reads, for the messages that refuse something else.
pub const READS: &str = "ngpt reads NVIDIA/ngpt checkpoints (model_args with use_nGPT) and Hugging Face nGPT directories (model_type \"ngpt\")";

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
    /// Whether the Linear layers have biases: false for NVIDIA's family (ngpt rejects
    /// NVIDIA checkpoints that have them), true for the Hugging Face family.
    pub bias: bool,
    /// `model_args`' `use_nGPT` flag; always 1, as ngpt reads only normalized-transformer
    /// checkpoints.
    #[serde(rename = "use_nGPT")]
    pub use_ngpt: i64,
    /// Training dropout rate (0.0 when the file does not say); inference ignores it.
    pub dropout: f64,
    /// Which nGPT code the checkpoint comes from. Not serialized: NVIDIA's `model_args`
    /// JSON stays as it was; [`Config::to_json`] writes the Hugging Face form for Nous.
    #[serde(skip)]
    pub family: Family,
    /// Width I of the MLP's hidden layer: 4 * n_embd for NVIDIA; config.json's `n_inner`
    /// for Nous (floor(8 * n_embd / 3) when it is null).
    #[serde(skip)]
    pub n_inner: usize,
    /// Rows of the learned position table `transformer.wpe.weight` (Nous); for NVIDIA,
    /// which has none, equal to `block_size`.
    #[serde(skip)]
    pub n_positions: usize,
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
            family: Family::Nvidia,
            n_inner: 0,
            n_positions: 0,
        };
        let config = Config {
            n_inner: 4 * config.n_embd,
            n_positions: config.block_size,
            ..config
        };
        config.check_heads(path)?;
        Ok(config)
    }

    /// Builds and validates a Hugging Face nGPT config (`model_type` "ngpt") from the
    /// keys of its `config.json` (ngpt-hf-spec.md, "Files").
    pub fn from_hf_args(args: &BTreeMap<String, ArgValue>, path: &Path) -> Result<Self> {
        let err = |field: &str, problem: String| Error::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            problem,
        };
        let dim = |field: &str, default: Option<i64>| -> Result<usize> {
            let v = match args.get(field) {
                Some(ArgValue::Int(v)) => *v,
                Some(other) => {
                    return Err(err(field, format!("expected an integer, found {other:?}")))
                }
                None => default.ok_or_else(|| err(field, "missing".to_string()))?,
            };
            if v <= 0 || v as u64 > MAX_DIM {
                return Err(err(
                    field,
                    format!("expected a positive integer at most {MAX_DIM}, found {v}"),
                ));
            }
            Ok(v as usize)
        };
        let n_embd = dim("n_embd", None)?;
        let n_inner = match args.get("n_inner") {
            None => (8 * n_embd) / 3,
            Some(ArgValue::Other(s)) if s == "null" => (8 * n_embd) / 3,
            Some(_) => dim("n_inner", None)?,
        };
        if n_inner == 0 {
            return Err(err("n_inner", "floor(8 * n_embd / 3) is 0".into()));
        }
        let base_scale = match args.get("base_scale") {
            Some(ArgValue::Float(v)) => *v,
            Some(ArgValue::Int(v)) => *v as f64,
            Some(other) => {
                return Err(err(
                    "base_scale",
                    format!("expected a number, found {other:?}"),
                ))
            }
            // NgptConfig's default.
            None => 1.0 / (n_embd as f64).sqrt(),
        };
        if !(base_scale.is_finite() && base_scale > 0.0) {
            return Err(err(
                "base_scale",
                format!("expected a finite positive number, found {base_scale}"),
            ));
        }
        let n_positions = dim("n_positions", Some(1024))?;
        let config = Config {
            n_layer: dim("n_layer", None)?,
            n_head: dim("n_head", None)?,
            n_embd,
            block_size: n_positions,
            vocab_size: dim("vocab_size", None)?,
            base_scale,
            bias: true,
            use_ngpt: 1,
            dropout: 0.0,
            family: Family::Nous,
            n_inner,
            n_positions,
        };
        config.check_heads(path)?;
        Ok(config)
    }

    /// n_embd splits into n_head heads of an even width.
    fn check_heads(&self, path: &Path) -> Result<()> {
        let err = |field: &str, problem: String| Error::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            problem,
        };
        let config = self;
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
                    "head_dim = n_embd / n_head = {} is odd; the {} needs an even head_dim",
                    config.head_dim(),
                    match config.family {
                        Family::Nvidia => "position step",
                        Family::Nous => "rotary embedding",
                    }
                ),
            ));
        }
        Ok(())
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
        let family = match obj.get("model_type") {
            Some(serde_json::Value::String(t)) if t == "ngpt" => Family::Nous,
            Some(serde_json::Value::String(t)) => {
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    reason: format!("model_type `{t}` is not an nGPT; {READS}"),
                })
            }
            Some(other) => {
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    reason: format!("model_type {other} is not an nGPT; {READS}"),
                })
            }
            None => {
                const NVIDIA_KEYS: [&str; 5] =
                    ["use_nGPT", "n_layer", "n_head", "n_embd", "base_scale"];
                if !NVIDIA_KEYS.iter().any(|k| obj.contains_key(*k)) {
                    let mut keys: Vec<&str> = obj.keys().map(String::as_str).take(6).collect();
                    if obj.len() > 6 {
                        keys.push("...");
                    }
                    return Err(Error::Format {
                        path: path.to_path_buf(),
                        reason: format!(
                            "neither a `model_type` nor NVIDIA's model_args keys (n_layer, n_embd, use_nGPT), only {{{}}}: not an nGPT config ngpt knows; {READS}",
                            keys.join(", ")
                        ),
                    });
                }
                Family::Nvidia
            }
        };
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
        match family {
            Family::Nvidia => Self::from_args(&args, path),
            Family::Nous => Self::from_hf_args(&args, path),
        }
    }

    /// The config as `model_args` JSON, the form `config.json` holds (for Nous, the keys
    /// of its Hugging Face config.json that the forward reads).
    pub fn to_json(&self) -> String {
        match self.family {
            Family::Nvidia => serde_json::to_string_pretty(self),
            Family::Nous => serde_json::to_string_pretty(&serde_json::json!({
                "model_type": "ngpt",
                "n_layer": self.n_layer,
                "n_head": self.n_head,
                "n_embd": self.n_embd,
                "n_inner": self.n_inner,
                "n_positions": self.n_positions,
                "vocab_size": self.vocab_size,
                "base_scale": self.base_scale,
            })),
        }
        .expect("Config serializes to JSON")
    }

    /// The state-dict keys and shapes a model of this config has: NVIDIA's bias-free nGPT
    /// (spec section 2), or the Hugging Face family's (ngpt-hf-spec.md, "Files"; Conv1D
    /// weights [in, out]; `lm_head.weight` is not listed: the importer ignores it).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        if self.family == Family::Nous {
            return self.expected_nous_tensors();
        }
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

    fn expected_nous_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (e, v, i_) = (self.n_embd, self.vocab_size, self.n_inner);
        let mut out = vec![
            ("transformer.wte.weight".to_string(), vec![v, e]),
            (
                "transformer.wpe.weight".to_string(),
                vec![self.n_positions, e],
            ),
        ];
        for l in 0..self.n_layer {
            let p = format!("transformer.h.{l}");
            out.push((format!("{p}.attn.c_attn.weight"), vec![e, 3 * e]));
            out.push((format!("{p}.attn.c_attn.bias"), vec![3 * e]));
            out.push((format!("{p}.attn.c_proj.weight"), vec![e, e]));
            out.push((format!("{p}.attn.c_proj.bias"), vec![e]));
            out.push((format!("{p}.attn.sqk"), vec![e]));
            out.push((format!("{p}.attn_alpha"), vec![e]));
            out.push((format!("{p}.mlp_alpha"), vec![e]));
            out.push((format!("{p}.mlp.c_fc.weight"), vec![e, 2 * i_]));
            out.push((format!("{p}.mlp.c_fc.bias"), vec![2 * i_]));
            out.push((format!("{p}.mlp.c_proj.weight"), vec![i_, e]));
            out.push((format!("{p}.mlp.c_proj.bias"), vec![e]));
            out.push((format!("{p}.mlp.su"), vec![i_]));
            out.push((format!("{p}.mlp.sv"), vec![i_]));
        }
        out.push(("lm_head_2.weight".to_string(), vec![v, e]));
        out.push(("sz".to_string(), vec![v]));
        out
    }

    /// Number of parameters the config implies, or `None` on overflow.
    pub fn parameter_count(&self) -> Option<u64> {
        if self.family == Family::Nous {
            // Per layer 4E^2 + 3EI + 8E + 4I (c_attn, c_proj, c_fc, mlp.c_proj with their
            // biases; sqk, the two alphas, su, sv); wte, wpe, lm_head_2 and sz.
            let (e, i_) = (self.n_embd as u64, self.n_inner as u64);
            let (v, p) = (self.vocab_size as u64, self.n_positions as u64);
            let per_layer = e
                .checked_mul(e)?
                .checked_mul(4)?
                .checked_add(e.checked_mul(i_)?.checked_mul(3)?)?
                .checked_add(e.checked_mul(8)?)?
                .checked_add(i_.checked_mul(4)?)?;
            let embed = v
                .checked_mul(e)?
                .checked_mul(2)?
                .checked_add(p.checked_mul(e)?)?
                .checked_add(v)?;
            return per_layer
                .checked_mul(self.n_layer as u64)?
                .checked_add(embed);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hf_config(extra: &[(&str, serde_json::Value)]) -> Result<Config> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ngpt-config-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let mut obj = serde_json::json!({
            "model_type": "ngpt", "n_layer": 2, "n_head": 2, "n_embd": 96,
            "n_inner": null, "n_positions": 128, "vocab_size": 76, "base_scale": 0.125,
        });
        for (k, v) in extra {
            obj[*k] = v.clone();
        }
        let path = dir.join("config.json");
        std::fs::write(&path, obj.to_string()).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let config = Config::from_json_file(&path);
        let _ = std::fs::remove_dir_all(&dir);
        config
    }

    #[test]
    fn a_null_n_inner_is_floor_8e_over_3_and_the_family_is_nous() -> Result<()> {
        let c = hf_config(&[])?;
        assert_eq!(c.family, Family::Nous);
        assert_eq!(c.n_inner, 256); // floor(8 * 96 / 3)
        assert_eq!(c.n_positions, 128);
        let c = hf_config(&[("n_inner", 200.into()), ("n_embd", 64.into())])?;
        assert_eq!(c.n_inner, 200);
        // Every expected tensor counted once.
        let counted: usize = c
            .expected_tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(c.parameter_count(), Some(counted as u64));
        Ok(())
    }

    #[test]
    fn another_model_type_is_refused_naming_it() {
        let e = hf_config(&[("model_type", "llama".into())]).map(|_| ());
        let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("model_type `llama` is not an nGPT"), "{msg}");
        assert!(msg.contains(READS), "{msg}");
    }

    #[test]
    fn nvidia_json_keeps_its_form() -> Result<()> {
        let mut args = BTreeMap::new();
        for (k, v) in [
            ("n_layer", 2),
            ("n_head", 2),
            ("n_embd", 64),
            ("vocab_size", 86),
            ("use_nGPT", 1),
        ] {
            args.insert(k.to_string(), ArgValue::Int(v));
        }
        args.insert("base_scale".into(), ArgValue::Float(0.125));
        let c = Config::from_args(&args, "config.json".as_ref())?;
        assert_eq!(c.family, Family::Nvidia);
        assert_eq!(c.n_inner, 4 * 64);
        let json = c.to_json();
        assert!(
            !json.contains("family") && !json.contains("n_inner"),
            "{json}"
        );
        assert!(json.contains("\"use_nGPT\": 1"), "{json}");
        Ok(())
    }
}
