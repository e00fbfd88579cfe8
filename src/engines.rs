//! The engines that compute logits, behind one interface: what `logits`, `validate`,
//! `snapshot`, `check` and `bisect` run.
//!
//! A [`Model`] is opened on INPUT (a checkpoint or a compiled directory) and loads what an
//! engine needs on first use: the checkpoint, the canonical graph, the launch plan, the
//! tract session. From a compiled directory, plan-cpu and tract run the directory's own
//! `model.plan` and `model.onnx` (with the dtype it was compiled with); from a checkpoint,
//! they run an f32 plan and model lowered in memory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::ValueEnum;
use ngpt_compiler::compile::{self, is_compiled_dir, Compiled};
use ngpt_compiler::graph;
use ngpt_compiler::import::Checkpoint;
use ngpt_compiler::onnx::{self, tract};
use ngpt_compiler::reference::{self, Precision};
use ngpt_runtime::plan::{LoadedPlan, WeightsIo};

/// Copies of the `[n_head, T, T]` attention scores the reference, the IR and tract hold at
/// their peak: measured 3.8 (reference and IR, f64 and f32) and 2.4 (tract) at 4,000 tokens
/// on the tiny preset (RELIABILITY.md).
const SCORE_COPIES: f64 = 4.0;
/// Bytes the attention scores of a `t`-position forward hold at their peak, at
/// `element_bytes` a score.
pub fn score_bytes(n_head: f64, t: f64, element_bytes: f64) -> f64 {
    SCORE_COPIES * n_head * t * t * element_bytes
}

/// Bytes a logit takes on its way out: the engine's f32 or f64 tensor, the f64 copy every
/// engine returns, and the f32 `.npy` written from it.
const LOGIT_BYTES: f64 = 20.0;

/// Where logits come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// The literal float reference of spec section 3 (candle-core, CPU).
    Reference,
    /// The IR interpreter on the canonical (folded and fused) graph.
    Ir,
    /// The exported model.onnx run by tract.
    Tract,
    /// The launch plan on the runtime's CPU executor.
    PlanCpu,
    /// The launch plan on an NVIDIA GPU.
    PlanCuda,
}

impl Engine {
    /// The name the CLI uses (`plan-cpu`).
    pub fn name(self) -> &'static str {
        match self {
            Engine::Reference => "reference",
            Engine::Ir => "ir",
            Engine::Tract => "tract",
            Engine::PlanCpu => "plan-cpu",
            Engine::PlanCuda => "plan-cuda",
        }
    }

    /// Parses a comma-separated list of engine names (`reference,plan-cpu`).
    pub fn parse_list(s: &str, flag: &str) -> Result<Vec<Engine>> {
        s.split(',')
            .map(|name| {
                Engine::from_str(name.trim(), true).map_err(|_| {
                    anyhow::anyhow!(
                        "{flag}: unknown engine `{}`; expected one of reference, ir, tract, plan-cpu, plan-cuda",
                        name.trim()
                    )
                })
            })
            .collect()
    }
}

/// The precision an engine computes in, as far as tolerances go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Numerics {
    F64,
    F32,
    /// f16 weights (an ONNX export with `--onnx-dtype f16`), f32 activations.
    F16Weights,
    /// bf16 weights (a plan compiled with `--dtype bf16`), f32 activations.
    Bf16Weights,
    /// int8 block-quantized weights (`--dtype int8` / `--onnx-dtype int8`), f32 activations.
    Int8Weights,
    /// int4 block-quantized layer weights (`--dtype int4` / `--onnx-dtype int4`).
    Int4Weights,
    /// A plan's int8 weights with int8 activations (`--quant-activations int8`).
    Int8WeightsInt8Acts,
    /// A plan's int4 layer weights with int8 activations (`--quant-activations int8`).
    Int4WeightsInt8Acts,
}

impl Numerics {
    pub fn label(self) -> &'static str {
        match self {
            Numerics::F64 => "f64",
            Numerics::F32 => "f32",
            Numerics::F16Weights => "f16 weights",
            Numerics::Bf16Weights => "bf16 weights",
            Numerics::Int8Weights => "int8 weights",
            Numerics::Int4Weights => "int4 weights",
            Numerics::Int8WeightsInt8Acts => "int8 weights, int8 acts",
            Numerics::Int4WeightsInt8Acts => "int4 weights, int8 acts",
        }
    }

    /// The default tolerance against the float64 reference: (relative error, top-1
    /// agreement fraction). f32 paths within 1e-5 with every position agreeing; reduced
    /// precision weights within 2e-2 (bf16) or 1e-2 (f16) with 95% of positions agreeing;
    /// quantized weights against the float model: int8 within 1e-2 (measured 1.6e-3 to
    /// 2.5e-3 on the trained fixtures) with 95%, int4 within 1e-1 (measured 1.9e-2 to
    /// 3.5e-2) with 85% (BENCHMARKS.md, weight-only quantization); with int8 activations
    /// the same (measured 4.1e-3 to 5.2e-3 for int8 weights, 2.2e-2 to 4.9e-2 for int4 on
    /// the trained fixtures, session 16).
    pub fn tolerance(self) -> (f64, f64) {
        match self {
            Numerics::F64 => (1e-9, 1.0),
            Numerics::F32 => (1e-5, 1.0),
            Numerics::F16Weights => (1e-2, 0.95),
            Numerics::Bf16Weights => (2e-2, 0.95),
            Numerics::Int8Weights => (1e-2, 0.95),
            Numerics::Int4Weights => (1e-1, 0.85),
            Numerics::Int8WeightsInt8Acts => (1e-2, 0.95),
            Numerics::Int4WeightsInt8Acts => (1e-1, 0.85),
        }
    }
}

/// INPUT, opened lazily for every engine.
pub struct Model {
    input: PathBuf,
    /// INPUT is a compiled directory (decided once, at open).
    compiled_dir: bool,
    ckpt: Option<Checkpoint>,
    compiled: Option<Compiled>,
    /// Weights of a plan lowered in memory (a compiled directory's plan has its own).
    plan_dtype: ngpt_compiler::plan::WeightDtype,
    plan: Option<Arc<LoadedPlan>>,
    tract: Option<tract::Session>,
    /// The vocabulary size and head count, once read.
    shape: Option<(usize, usize)>,
    /// One runtime session per plan engine, kept across calls on the same plan (a CUDA
    /// session's context, compiled kernels and uploaded weights are made once per model,
    /// not once per prompt and call). A prefill restarts a session's cache.
    sessions: Vec<(Engine, Arc<LoadedPlan>, ngpt_runtime::session::Session)>,
}

impl Model {
    /// Opens `input` without reading anything yet.
    pub fn open(input: &Path) -> Model {
        Model {
            input: input.to_path_buf(),
            compiled_dir: is_compiled_dir(input),
            ckpt: None,
            compiled: None,
            plan_dtype: ngpt_compiler::plan::WeightDtype::F32,
            plan: None,
            tract: None,
            shape: None,
            sessions: vec![],
        }
    }

    /// The weight dtype of plans lowered in memory from a checkpoint (default f32).
    pub fn set_plan_dtype(&mut self, dtype: ngpt_compiler::plan::WeightDtype) {
        if dtype != self.plan_dtype {
            self.plan = None;
        }
        self.plan_dtype = dtype;
    }

    /// The sha256 of the source checkpoint (recorded in a compiled directory's manifest).
    pub fn source_sha256(&mut self) -> Result<String> {
        if self.is_compiled() {
            return Ok(compile::Manifest::read(&self.input)?.source_sha256);
        }
        let source = self.checkpoint()?.source.clone();
        Ok(compile::sha256_file(&source)?)
    }

    /// True when INPUT is a compiled directory.
    pub fn is_compiled(&self) -> bool {
        self.compiled_dir
    }

    /// The checkpoint (a compiled directory's recorded source).
    pub fn checkpoint(&mut self) -> Result<&Checkpoint> {
        let ckpt = match self.ckpt.take() {
            Some(c) => c,
            None => crate::checkpoint::load_checkpoint(&self.input)?,
        };
        Ok(self.ckpt.insert(ckpt))
    }

    /// The canonical graph, compiled in memory.
    pub fn compiled(&mut self) -> Result<&Compiled> {
        let compiled = match self.compiled.take() {
            Some(c) => c,
            None => {
                // A compiled directory's graph as it was compiled (its quantization).
                let opts = if self.is_compiled() {
                    compile::Manifest::read(&self.input)?.compile_options()
                } else {
                    compile::Options::default()
                };
                compile::compile(self.checkpoint()?, &opts)?
            }
        };
        Ok(self.compiled.insert(compiled))
    }

    /// The vocabulary size, from whatever is cheapest to read.
    pub fn vocab_size(&mut self) -> Result<usize> {
        Ok(self.shape()?.0)
    }

    /// The vocabulary size and the number of attention heads, from whatever is cheapest to
    /// read (a loaded plan, a compiled directory's plan header, the checkpoint), read once.
    fn shape(&mut self) -> Result<(usize, usize)> {
        if let Some(shape) = self.shape {
            return Ok(shape);
        }
        let shape = if let Some(p) = &self.plan {
            (p.dims().vocab, p.dims().n_head)
        } else if self.is_compiled() && self.input.join("model.plan").is_file() {
            match self.plan_header_config()? {
                Some(c) => (c.vocab_size as usize, c.n_head as usize),
                None => {
                    let p = self.plan(0)?;
                    (p.dims().vocab, p.dims().n_head)
                }
            }
        } else if let Some(shape) = self.genai_shape() {
            // A compiled directory without a plan (the Hugging Face family for now).
            shape
        } else {
            let c = &self.checkpoint()?.config;
            (c.vocab_size, c.n_head)
        };
        self.shape = Some(shape);
        Ok(shape)
    }

    /// A compiled directory's model config, from its plan's header without its weights
    /// (`None` when the plan does not record one).
    /// A compiled directory's vocabulary size and head count from its genai_config.json.
    fn genai_shape(&self) -> Option<(usize, usize)> {
        if !self.is_compiled() {
            return None;
        }
        let text = std::fs::read_to_string(self.input.join(onnx::genai::CONFIG_FILE)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let m = &v["model"];
        let vocab = m["vocab_size"].as_u64()? as usize;
        let heads = m["decoder"]["num_attention_heads"].as_u64()? as usize;
        (vocab > 0 && heads > 0).then_some((vocab, heads))
    }

    fn plan_header_config(&self) -> Result<Option<ngpt_schemas::plan::ModelConfig>> {
        use ngpt_schemas::prost::Message;
        let path = self.input.join("model.plan");
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let plan = ngpt_schemas::plan::Plan::decode(&bytes[..])
            .map_err(|e| anyhow::anyhow!("{}: not an ngpt plan ({e})", path.display()))?;
        Ok(plan.config.filter(|c| c.vocab_size > 0 && c.n_head > 0))
    }

    /// Fails, before anything is allocated, when a forward of `t` tokens in `engine` would
    /// need more memory than this process can still get: the reference, the IR and tract
    /// hold attention scores of every head and position pair at once (memory in T^2), and
    /// every engine returns all `[T, vocab]` logits. An allocation that fails aborts the
    /// process (Rust's allocator) or panics (tract), so this is the one place to say so.
    fn check_memory(&mut self, engine: Engine, t: usize, precision: Precision) -> Result<()> {
        let (vocab, n_head) = self.shape()?;
        let (vocab, n_head, tf) = (vocab as f64, n_head as f64, t as f64);
        let scores = match (engine, precision) {
            (Engine::Reference | Engine::Ir, Precision::F64) => 8.0,
            (Engine::Reference | Engine::Ir | Engine::Tract, _) => 4.0,
            (Engine::PlanCpu | Engine::PlanCuda, _) => 0.0,
        };
        let quadratic = score_bytes(n_head, tf, scores);
        let logits = LOGIT_BYTES * tf * vocab;
        let gb = |b: f64| b / 1e9;
        let what = format!("{t} positions through the {} engine", engine.name());
        if quadratic > 0.0 {
            crate::memory::ensure_fits(
                quadratic + logits,
                &what,
                &format!(
                    "{:.1} GB of attention scores, {n_head} heads x {t}^2 x {scores} bytes about \
                     {SCORE_COPIES} times over, and {:.1} GB of logits",
                    gb(quadratic),
                    gb(logits)
                ),
                "use the plan-cpu engine (its memory grows linearly with the tokens) or fewer \
                 tokens",
            )
            .map_err(crate::Error::TooManyPositions)?;
        } else {
            crate::memory::ensure_fits(
                logits,
                &what,
                &format!("for the logits, {t} x {vocab} in f32 and f64"),
                "pass fewer tokens",
            )
            .map_err(crate::Error::TooManyPositions)?;
        }
        Ok(())
    }

    /// The launch plan: a compiled directory's, or an f32 plan lowered in memory with a KV
    /// capacity of at least `min_seq_len`.
    pub fn plan(&mut self, min_seq_len: usize) -> Result<Arc<LoadedPlan>> {
        if let Some(p) = &self.plan {
            if p.dims().max_seq_len >= min_seq_len || self.is_compiled() {
                return Ok(Arc::clone(p));
            }
        }
        let plan = if self.is_compiled() {
            if !self.input.join("model.plan").is_file() {
                return Err(crate::Error::NoPlan {
                    dir: self.input.clone(),
                }
                .into());
            }
            LoadedPlan::load_with(
                &self.input,
                crate::settings::get().weights_io.unwrap_or(WeightsIo::Map),
            )?
        } else {
            let label = self.input.display().to_string();
            let config = self.checkpoint()?.config.clone();
            // NVIDIA's family: block_size, 2048 or the tokens; learned positions: the rows
            // of wpe, and never more.
            let max_seq = onnx::default_max_seq_len(&config).max(min_seq_len);
            onnx::check_max_seq_len(&config, max_seq)?;
            crate::memory::ensure_table_fits(
                &format!("a plan of {max_seq} positions (block_size, 2048 or the tokens)"),
                max_seq,
                config.head_dim(),
            )?;
            let dtype = self.plan_dtype;
            let lowered =
                ngpt_compiler::plan::lower(&self.compiled()?.graph, &config, dtype, max_seq, "")?;
            LoadedPlan::from_plan(lowered.plan, lowered.weights, &label)?
        };
        let plan = Arc::new(plan);
        self.plan = Some(Arc::clone(&plan));
        Ok(plan)
    }

    /// Whether this is a compiled directory made without model.onnx on purpose (its
    /// manifest lists none), so tract has nothing to run.
    pub fn onnx_missing_by_choice(&self) -> bool {
        self.is_compiled()
            && !self.input.join(onnx::MODEL_FILE).is_file()
            && compile::Manifest::read(&self.input)
                .is_ok_and(|m| !m.files.iter().any(|f| f == onnx::MODEL_FILE))
    }

    /// The tract session on model.onnx: a compiled directory's, or one exported in memory
    /// with a position table of at least `min_seq_len` rows.
    pub fn tract(&mut self, min_seq_len: usize) -> Result<&tract::Session> {
        let stale = match &self.tract {
            None => true,
            Some(s) => !self.is_compiled() && s.max_seq_len.is_some_and(|m| m < min_seq_len),
        };
        let session = match self.tract.take() {
            Some(s) if !stale => s,
            _ => {
                let session = if self.is_compiled() {
                    let path = self.input.join(onnx::MODEL_FILE);
                    if !path.is_file() {
                        let no_onnx = compile::Manifest::read(&self.input)
                            .is_ok_and(|m| !m.files.iter().any(|f| f == onnx::MODEL_FILE));
                        if no_onnx {
                            return Err(crate::Error::NoOnnx {
                                dir: self.input.clone(),
                            }
                            .into());
                        }
                        bail!(
                            "{}: no {} in this compiled directory (compiled by an older ngpt?); compile it again",
                            self.input.display(),
                            onnx::MODEL_FILE
                        );
                    }
                    tract::Session::load(&path)?
                } else {
                    self.compiled()?; // loads the checkpoint too
                    let (Some(ckpt), Some(compiled)) = (&self.ckpt, &self.compiled) else {
                        bail!("{}: checkpoint not loaded", self.input.display());
                    };
                    let mut opts = onnx::Options::for_config(&ckpt.config);
                    opts.max_seq_len = opts.max_seq_len.max(min_seq_len);
                    crate::memory::ensure_table_fits(
                        &format!(
                            "an ONNX export of {} positions (block_size, 2048 or the tokens)",
                            opts.max_seq_len
                        ),
                        opts.max_seq_len,
                        ckpt.config.head_dim(),
                    )?;
                    let info = onnx::ModelInfo::new(ckpt, &compiled.records)?;
                    if onnx::uses_external_data(&compiled.graph, &opts) {
                        // Too large for one protobuf: through a temporary directory, as tract
                        // reads external data from beside the model file.
                        let dir = tempfile::tempdir().context("creating a temporary directory")?;
                        onnx::write(&compiled.graph, &info, &opts, dir.path())?;
                        tract::Session::load(&dir.path().join(onnx::MODEL_FILE))?
                    } else {
                        tract::Session::from_bytes(
                            &onnx::export(&compiled.graph, &info, &opts)?.model,
                        )?
                    }
                };
                session
            }
        };
        Ok(self.tract.insert(session))
    }

    /// Loads what `engine` needs for `tokens` tokens, so that timing `logits` times the
    /// computation alone.
    pub fn prepare(&mut self, engine: Engine, tokens: usize) -> Result<()> {
        match engine {
            Engine::Reference => drop(self.checkpoint()?),
            Engine::Ir => drop(self.compiled()?),
            Engine::Tract => drop(self.tract(tokens)?),
            Engine::PlanCpu | Engine::PlanCuda => drop(self.plan(tokens)?),
        }
        Ok(())
    }

    /// What `engine` computes in, for its default tolerance.
    pub fn numerics(&mut self, engine: Engine, precision: Precision) -> Result<Numerics> {
        // A quantized compiled directory: every engine but the reference computes with its
        // dequantized weights (the IR recompiles with the manifest's quantization).
        if engine != Engine::Reference && self.is_compiled() {
            let manifest = compile::Manifest::read(&self.input)?;
            if let Some(q) = manifest.quantize {
                // The coarser of the layers' and lm_head's formats.
                let int4 = q.bits == ngpt_compiler::quant::Bits::Int4
                    || q.lm_head == Some(ngpt_compiler::quant::Bits::Int4);
                // The plan engines quantize activations where the compile asked and the plan
                // is quantized (its summary says so); the IR and tract compute the
                // weight-only product.
                let plan_acts = manifest
                    .plan_weights
                    .is_some_and(|p| p.activations == "int8");
                let acts = plan_acts && matches!(engine, Engine::PlanCpu | Engine::PlanCuda);
                return Ok(match (int4, acts) {
                    (true, false) => Numerics::Int4Weights,
                    (false, false) => Numerics::Int8Weights,
                    (true, true) => Numerics::Int4WeightsInt8Acts,
                    (false, true) => Numerics::Int8WeightsInt8Acts,
                });
            }
        }
        Ok(match engine {
            Engine::Reference | Engine::Ir => match precision {
                Precision::F64 => Numerics::F64,
                Precision::F32 => Numerics::F32,
            },
            Engine::Tract => {
                if self.is_compiled() {
                    match self
                        .tract(0)?
                        .metadata
                        .get("weights_dtype")
                        .map(String::as_str)
                    {
                        Some("f16") => Numerics::F16Weights,
                        _ => Numerics::F32,
                    }
                } else {
                    Numerics::F32
                }
            }
            Engine::PlanCpu | Engine::PlanCuda => {
                if self.plan(0)?.plan().weight_dtype == ngpt_schemas::plan::DType::Bf16 as i32 {
                    Numerics::Bf16Weights
                } else {
                    Numerics::F32
                }
            }
        })
    }

    /// The logits `[T, vocab]`, row-major, of `tokens` at positions `0..T`. `precision`
    /// applies to the reference and the IR; the other engines compute as compiled.
    pub fn logits(
        &mut self,
        engine: Engine,
        tokens: &[u32],
        precision: Precision,
    ) -> Result<Vec<f64>> {
        let vocab = self.vocab_size()?;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(crate::Error::TokenOutsideVocabulary { id: *bad, vocab }.into());
        }
        self.check_memory(engine, tokens.len(), precision)?;
        let widen = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
        match engine {
            Engine::Reference => {
                let t = reference::logits(self.checkpoint()?, tokens, precision)?;
                tensor_to_f64(&t)
            }
            Engine::Ir => {
                let positions: Vec<u32> = (0..tokens.len() as u32).collect();
                let mut outs =
                    graph::interp::run(&self.compiled()?.graph, tokens, &positions, precision)?;
                tensor_to_f64(&outs.remove(0))
            }
            Engine::Tract => {
                let input = self.input.clone();
                let session = self.tract(tokens.len())?;
                if let Some(max) = session.max_seq_len {
                    if tokens.len() > max {
                        return Err(crate::Error::TooManyTokens {
                            tokens: tokens.len(),
                            model: input.join(onnx::MODEL_FILE),
                            max,
                        }
                        .into());
                    }
                }
                Ok(widen(session.logits(tokens)?))
            }
            Engine::PlanCpu | Engine::PlanCuda => {
                let session = self.session(engine, tokens.len())?;
                Ok(widen(session.prefill(&[tokens.to_vec()])?))
            }
        }
    }
}

impl Model {
    /// The batch-1 session of a plan engine on a plan of at least `min_seq_len` positions,
    /// made on first use and kept while the plan is the same.
    fn session(
        &mut self,
        engine: Engine,
        min_seq_len: usize,
    ) -> Result<&mut ngpt_runtime::session::Session> {
        let plan = self.plan(min_seq_len)?;
        let at = self
            .sessions
            .iter()
            .position(|(e, p, _)| *e == engine && Arc::ptr_eq(p, &plan));
        let at = match at {
            Some(i) => i,
            None => {
                let session = plan_session(engine, Arc::clone(&plan), 1)?;
                self.sessions.retain(|(e, _, _)| *e != engine);
                self.sessions.push((engine, plan, session));
                self.sessions.len() - 1
            }
        };
        Ok(&mut self.sessions[at].2)
    }
}

impl Model {
    /// The greedy continuation of `prompt`: `n` tokens, each with its margin (top-1 minus
    /// top-2 logit) at the step that chose it. plan-cpu decodes with its KV cache; the
    /// other engines recompute the whole sequence each step.
    pub fn greedy(
        &mut self,
        engine: Engine,
        prompt: &[u32],
        n: usize,
        precision: Precision,
    ) -> Result<Vec<(u32, f64)>> {
        let vocab = self.vocab_size()?;
        let mut out = vec![];
        if n == 0 {
            return Ok(out);
        }
        if matches!(engine, Engine::PlanCpu | Engine::PlanCuda) {
            let session = self.session(engine, prompt.len() + n)?;
            let logits = session.prefill_last(&[prompt.to_vec()])?;
            let mut last: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();
            loop {
                let (id, margin) = top_two(&last);
                out.push((id, margin));
                if out.len() == n {
                    return Ok(out);
                }
                last = session.decode(&[id])?.into_iter().map(f64::from).collect();
            }
        }
        let mut seq = prompt.to_vec();
        while out.len() < n {
            let logits = self.logits(engine, &seq, precision)?;
            let (id, margin) = top_two(&logits[(seq.len() - 1) * vocab..]);
            out.push((id, margin));
            seq.push(id);
        }
        Ok(out)
    }
}

/// One traced value: a named point of the forward (`h.1.mlp.out`) and its `[T, width]`
/// values, row-major.
pub struct TracePoint {
    pub name: String,
    pub values: Vec<f64>,
}

impl Model {
    /// The named intermediate values of a forward over `tokens`, in the order computed:
    /// the reference's hidden states and branch outputs, every IR node, every plan step.
    /// tract offers only the logits.
    pub fn trace(
        &mut self,
        engine: Engine,
        tokens: &[u32],
        precision: Precision,
    ) -> Result<Vec<TracePoint>> {
        self.check_memory(engine, tokens.len(), precision)?;
        let mut points = vec![];
        let mut from_tensor = |name: &str, t: &candle_core::Tensor| {
            if let Ok(values) = tensor_to_f64(t) {
                points.push(TracePoint {
                    name: name.to_string(),
                    values,
                });
            }
        };
        match engine {
            Engine::Reference => {
                reference::logits_traced(self.checkpoint()?, tokens, precision, &mut from_tensor)?;
            }
            Engine::Ir => {
                let positions: Vec<u32> = (0..tokens.len() as u32).collect();
                graph::interp::run_traced(
                    &self.compiled()?.graph,
                    tokens,
                    &positions,
                    precision,
                    &mut from_tensor,
                )?;
            }
            Engine::PlanCpu | Engine::PlanCuda => {
                let session = self.session(engine, tokens.len())?;
                session.prefill_traced(tokens, &mut |name, _width, values| {
                    points.push(TracePoint {
                        name: name.to_string(),
                        values: values.iter().map(|&v| f64::from(v)).collect(),
                    })
                })?;
            }
            Engine::Tract => {
                let vocab = self.vocab_size()?;
                let values = self.logits(engine, tokens, precision)?;
                debug_assert_eq!(values.len(), tokens.len() * vocab);
                points.push(TracePoint {
                    name: "lm_head".into(),
                    values,
                });
            }
        }
        Ok(points)
    }
}

/// The argmax of `row` (the first on ties) and its lead over the runner-up.
pub fn top_two(row: &[f64]) -> (u32, f64) {
    let mut best = (0usize, f64::NEG_INFINITY);
    let mut second = f64::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > best.1 {
            second = best.1;
            best = (i, v);
        } else if v > second {
            second = v;
        }
    }
    (best.0 as u32, best.1 - second)
}

/// Why plan-cuda cannot run in this process, or `None` when it can.
pub fn cuda_unavailable() -> Option<String> {
    ngpt_runtime::cuda::unavailable()
}

/// Why plan-cuda cannot run `plan` here (`None`: it can): a plan the CUDA executor refuses
/// on any device (`ngpt_runtime::cuda::refuses`), or CUDA missing. A command with no
/// `--engine` runs plan-cpu then, saying why.
pub fn cuda_cannot_run(plan: &LoadedPlan) -> Option<String> {
    ngpt_runtime::cuda::refuses(plan).or_else(cuda_unavailable)
}

/// A runtime session on `plan` for the plan engines: the CPU executor, or the CUDA one
/// (an error naming what is missing where CUDA is not usable).
pub fn plan_session(
    engine: Engine,
    plan: Arc<LoadedPlan>,
    batch: usize,
) -> Result<ngpt_runtime::session::Session> {
    use ngpt_runtime::session::Session;
    Ok(match engine {
        Engine::PlanCpu => Session::new(plan, batch)?,
        Engine::PlanCuda => {
            if let Some(why) = cuda_unavailable() {
                return Err(crate::Error::CudaUnavailable { why }.into());
            }
            Session::cuda_with(plan, batch, &crate::settings::get().cuda)?
        }
        other => bail!("{} is not a plan engine", other.name()),
    })
}

/// The generation engine on `plan` for a plan engine: the CPU executor, or the CUDA one
/// (an error naming what is missing where CUDA is not usable).
pub fn plan_engine(
    engine: Engine,
    plan: Arc<LoadedPlan>,
    opts: ngpt_runtime::engine::EngineOptions,
) -> Result<ngpt_runtime::engine::Engine> {
    use ngpt_runtime::engine::Engine as Generator;
    Ok(match engine {
        Engine::PlanCpu => Generator::cpu(plan, opts)?,
        Engine::PlanCuda => {
            if let Some(why) = cuda_unavailable() {
                return Err(crate::Error::CudaUnavailable { why }.into());
            }
            Generator::cuda(plan, opts, &crate::settings::get().cuda)?
        }
        other => bail!("{} is not a plan engine", other.name()),
    })
}

fn tensor_to_f64(t: &candle_core::Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .context("reading logits")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `check` and `snapshot` call `logits` and `greedy` once per prompt: the plan engines
    /// reuse one session for all of them, and its results are those of a fresh session.
    #[test]
    fn plan_engines_keep_one_session_per_model() -> Result<()> {
        let input = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nv-tiny");
        let mut model = Model::open(&input);
        let a = model.logits(Engine::PlanCpu, &[1, 2, 3, 4], Precision::F32)?;
        let g = model.greedy(Engine::PlanCpu, &[5, 6], 3, Precision::F32)?;
        let b = model.logits(Engine::PlanCpu, &[1, 2, 3, 4], Precision::F32)?;
        let short = model.logits(Engine::PlanCpu, &[7], Precision::F32)?;
        assert_eq!(model.sessions.len(), 1);
        assert_eq!(a, b, "a reused session computes what it computed first");
        let mut fresh = Model::open(&input);
        assert_eq!(
            fresh.greedy(Engine::PlanCpu, &[5, 6], 3, Precision::F32)?,
            g
        );
        assert_eq!(fresh.logits(Engine::PlanCpu, &[7], Precision::F32)?, short);
        Ok(())
    }
}
