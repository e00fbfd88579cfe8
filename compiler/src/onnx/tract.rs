//! Running an exported model with tract (pure Rust, CPU): load `model.onnx` with symbolic
//! batch and sequence dimensions, then prefill and decode with the KV cache, feeding
//! `present` back as `past`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::{
    Framework, InferenceModel, InferenceModelExt, IntoRunnable, IntoTValue, IntoTensor, TValue,
    Tensor, TypedRunnableModel,
};

use crate::error::{Error, Result};

use super::emit::{past_name, present_name, ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS};

fn tract_err(what: &str) -> impl Fn(tract_onnx::prelude::TractError) -> Error + '_ {
    move |e| Error::Argument {
        what: format!("tract: {what}"),
        problem: format!("{e:#}").replace('\n', " "),
    }
}

/// An exported model, loaded and optimized by tract.
pub struct Session {
    plan: Arc<TypedRunnableModel>,
    /// Position of each named input in the plan's inputs.
    inputs: HashMap<String, usize>,
    /// Index of each named output in the plan's outputs.
    outputs: HashMap<String, usize>,
    /// Number of layers, counted from the `past_key_values.{i}.key` inputs.
    pub layers: usize,
    /// Attention heads per layer, from the cache inputs' shape (0 without layers).
    pub heads: usize,
    /// Head dimension, from the cache inputs' shape (0 without layers).
    pub head_dim: usize,
    /// Vocabulary size: the last axis of `logits`.
    pub vocab: usize,
    /// Rows of the position table, from the metadata.
    pub max_seq_len: Option<usize>,
    /// The model's metadata_props.
    pub metadata: HashMap<String, String>,
}

/// The KV cache between calls: `[batch, n_head, len, head_dim]` keys and values per layer.
#[derive(Clone)]
pub struct Cache {
    /// Rows (sequences) of the batch.
    pub batch: usize,
    /// Positions the cache holds per row: the `past_sequence` of the next call.
    pub len: usize,
    tensors: Vec<Tensor>,
}

/// One call's result.
pub struct Step {
    /// `[batch, sequence, vocab]`, row-major.
    pub logits: Vec<f32>,
    /// Positions per row that `logits` holds: the call's sequence length, or 1 for a model
    /// compiled to compute the last position only.
    pub sequence: usize,
    /// The cache after this call, to pass to the next one.
    pub cache: Cache,
}

impl Session {
    /// Loads `model.onnx` from a file (external data is read from beside it).
    pub fn load(path: &Path) -> Result<Session> {
        let what = path.display().to_string();
        // Quantized weights are checked before tract reads them (mapped, not copied).
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read only while this function runs; ngpt never writes a
        // model.onnx in place (compiles write a new file and rename it).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        super::check_quantized(&map, &what)?;
        drop(map);
        let model = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(tract_err(&what))?;
        Self::from_model(model, &what)
    }

    /// Loads an encoded model held in memory (inline weights only).
    pub fn from_bytes(bytes: &[u8]) -> Result<Session> {
        super::check_quantized(bytes, "model.onnx")?;
        let model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(tract_err("model.onnx"))?;
        Self::from_model(model, "model.onnx")
    }

    fn from_model(model: InferenceModel, what: &str) -> Result<Session> {
        let err = tract_err(what);
        let mut metadata = HashMap::new();
        for (k, v) in &model.properties {
            if let Some(key) = k.strip_prefix("onnx.metadata_props.") {
                if let Ok(s) = v
                    .try_as_plain_ram()
                    .and_then(|p| p.to_scalar::<String>().cloned())
                {
                    metadata.insert(key.to_string(), s);
                }
            }
        }
        let mut inputs = HashMap::new();
        for (i, o) in model.input_outlets().map_err(&err)?.iter().enumerate() {
            inputs.insert(model.node(o.node).name.clone(), i);
        }
        let mut outputs = HashMap::new();
        for (i, o) in model.output_outlets().map_err(&err)?.iter().enumerate() {
            let label = model
                .outlet_label(*o)
                .map(str::to_string)
                .unwrap_or_else(|| model.node(o.node).name.clone());
            outputs.insert(label, i);
        }
        let layers = (0..)
            .take_while(|&i| inputs.contains_key(&past_name(i, "key")))
            .count();
        let typed = model.into_optimized().map_err(&err)?;
        let fixed = |input: usize, axis: usize| -> Result<usize> {
            let fact = typed.input_fact(input).map_err(&err)?;
            fact.shape
                .to_tvec()
                .get(axis)
                .and_then(|d| d.to_i64().ok())
                .map(|v| v as usize)
                .ok_or_else(|| Error::Argument {
                    what: format!("tract: {what}"),
                    problem: format!("input {input} has no fixed axis {axis}"),
                })
        };
        let (heads, head_dim) = match inputs.get(&past_name(0, "key")) {
            Some(&i) => (fixed(i, 1)?, fixed(i, 3)?),
            None => (0, 0),
        };
        let logits_fact = typed
            .output_fact(*outputs.get(LOGITS).unwrap_or(&0))
            .map_err(&err)?;
        let vocab = logits_fact
            .shape
            .to_tvec()
            .last()
            .and_then(|d| d.to_i64().ok())
            .unwrap_or(0) as usize;
        for name in [INPUT_IDS, ATTENTION_MASK, POSITION_IDS] {
            if !inputs.contains_key(name) {
                return Err(Error::Argument {
                    what: format!("tract: {what}"),
                    problem: format!("not an ngpt export: no `{name}` input"),
                });
            }
        }
        let plan = typed.into_runnable().map_err(&err)?;
        let max_seq_len = metadata.get("max_seq_len").and_then(|v| v.parse().ok());
        Ok(Session {
            plan,
            inputs,
            outputs,
            layers,
            heads,
            head_dim,
            vocab,
            max_seq_len,
            metadata,
        })
    }

    /// An empty cache (past_sequence 0) for `batch` rows.
    pub fn empty_cache(&self, batch: usize) -> Cache {
        let t =
            Tensor::zero::<f32>(&[batch, self.heads, 0, self.head_dim]).expect("an empty tensor");
        Cache {
            batch,
            len: 0,
            tensors: vec![t; 2 * self.layers],
        }
    }

    /// One call: `input_ids` and `position_ids` are `[batch, sequence]`, `attention_mask`
    /// `[batch, cache.len + sequence]`, all row-major.
    pub fn run(
        &self,
        input_ids: &[i64],
        attention_mask: &[i64],
        position_ids: &[i64],
        cache: &Cache,
    ) -> Result<Step> {
        let b = cache.batch;
        let err = tract_err("run");
        let bad = |problem: String| Error::Argument {
            what: "tract: run".into(),
            problem,
        };
        if b == 0 || input_ids.is_empty() || !input_ids.len().is_multiple_of(b) {
            return Err(bad(format!(
                "{} input ids do not make {b} rows",
                input_ids.len()
            )));
        }
        let s = input_ids.len() / b;
        if position_ids.len() != b * s || attention_mask.len() != b * (cache.len + s) {
            return Err(bad(format!(
                "position_ids has {} entries and attention_mask {}, expected {} and {}",
                position_ids.len(),
                attention_mask.len(),
                b * s,
                b * (cache.len + s)
            )));
        }
        if let Some(max) = self.max_seq_len {
            if let Some(p) = position_ids.iter().find(|&&p| p < 0 || p as usize >= max) {
                return Err(bad(format!(
                    "position {p} is outside the model's position table of {max} rows \
                     (max_seq_len); re-export with a larger --max-seq-len"
                )));
            }
        }
        let mut values: Vec<Option<TValue>> = vec![None; self.inputs.len()];
        let mut put = |name: &str, t: Tensor| -> Result<()> {
            let i = *self
                .inputs
                .get(name)
                .ok_or_else(|| bad(format!("the model has no input `{name}`")))?;
            values[i] = Some(t.into_tvalue());
            Ok(())
        };
        let i64s = |v: &[i64], cols: usize| Tensor::from_shape(&[b, cols], v).map_err(&err);
        put(INPUT_IDS, i64s(input_ids, s)?)?;
        put(ATTENTION_MASK, i64s(attention_mask, cache.len + s)?)?;
        put(POSITION_IDS, i64s(position_ids, s)?)?;
        for l in 0..self.layers {
            put(&past_name(l, "key"), cache.tensors[2 * l].clone())?;
            put(&past_name(l, "value"), cache.tensors[2 * l + 1].clone())?;
        }
        let values = values
            .into_iter()
            .collect::<Option<Vec<TValue>>>()
            .ok_or_else(|| bad("the model has inputs ngpt does not know".into()))?;
        let out = self.plan.run(values.into()).map_err(&err)?;
        let at = |name: &str| -> Result<&TValue> {
            self.outputs
                .get(name)
                .and_then(|&i| out.get(i))
                .ok_or_else(|| bad(format!("the model has no output `{name}`")))
        };
        let logits: Vec<f32> = at(LOGITS)?
            .to_plain_array_view::<f32>()
            .map_err(&err)?
            .iter()
            .copied()
            .collect();
        let mut tensors = Vec::with_capacity(2 * self.layers);
        for l in 0..self.layers {
            for which in ["key", "value"] {
                tensors.push(at(&present_name(l, which))?.clone().into_tensor());
            }
        }
        let sequence = logits.len() / (b * self.vocab.max(1));
        Ok(Step {
            logits,
            sequence,
            cache: Cache {
                batch: b,
                len: cache.len + s,
                tensors,
            },
        })
    }

    /// Logits `[T, vocab]` of one sequence at positions 0..T-1, in one prefill call.
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let pos: Vec<i64> = (0..tokens.len() as i64).collect();
        let mask = vec![1i64; tokens.len()];
        Ok(self.run(&ids, &mask, &pos, &self.empty_cache(1))?.logits)
    }
}
