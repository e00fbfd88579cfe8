//! `ngpt init`: trained-like random nGPT checkpoints for tests and benchmarks.
//!
//! Matrices are random and normalized the way NVIDIA's `normalize_matrices()` leaves them
//! (spec section 4); scaling vectors are perturbed away from their init values, some of
//! them negative, so that every folding mistake changes the logits. The output is a pure
//! function of the options: same options, same bytes.
//!
//! With [`Family::Nous`] it writes a Hugging Face directory of NousResearch's nGPT
//! (ngpt-hf-spec.md): `config.json` (`model_type` "ngpt") and a float32
//! `model.safetensors` with Conv1D weights [in, out], biases and learned positions,
//! normalized as `train_ngpt.py`'s `normalize_matrices()` leaves them; `lm_head_2`,
//! `wpe` and the biases are not normalized (lm_head_2's rows get norms 1.4 to 3.3, as
//! trained ones have).

use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::artifact;
use crate::config::Config;
pub use crate::config::Family;
use crate::error::{Error, Result};

/// Named model sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// 2 layers, 2 heads, n_embd 64, vocab 256.
    Tiny,
    /// 12 layers, 12 heads, n_embd 768, vocab 50304.
    Small,
    /// 24 layers, 16 heads, n_embd 1024, vocab 50304: NVIDIA's own nGPT configuration.
    Half,
    /// Hugging Face family: 2 layers, 2 heads, n_embd 64, n_inner 256, 128 positions,
    /// vocab 256.
    NousTiny,
    /// Hugging Face family, NousResearch/ngpt_0.5B_4k_200B's shape: 24 layers, 16 heads,
    /// n_embd 1024, n_inner 4096, 4096 positions, vocab 32000.
    NousHalf,
}

impl Preset {
    /// (n_layer, n_head, n_embd, vocab_size, block_size)
    pub fn dims(self) -> (usize, usize, usize, usize, usize) {
        match self {
            Preset::Tiny => (2, 2, 64, 256, 256),
            Preset::Small => (12, 12, 768, 50304, 1024),
            Preset::Half => (24, 16, 1024, 50304, 1024),
            Preset::NousTiny => (2, 2, 64, 256, 128),
            Preset::NousHalf => (24, 16, 1024, 32000, 4096),
        }
    }

    /// The family of checkpoint the preset writes.
    pub fn family(self) -> Family {
        match self {
            Preset::Tiny | Preset::Small | Preset::Half => Family::Nvidia,
            Preset::NousTiny | Preset::NousHalf => Family::Nous,
        }
    }
}

/// What `ngpt init` writes.
#[derive(Debug, Clone, PartialEq)]
pub struct InitOptions {
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block; `n_embd / n_head` must be even.
    pub n_head: usize,
    /// Model width C, a multiple of `n_head`.
    pub n_embd: usize,
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Context length recorded in `config.json` (`n_positions` for the Hugging Face family).
    pub block_size: usize,

    /// Seed of the random tensors: the same seed and sizes give the same bytes.
    pub seed: u64,
    /// `None` means train.py's choice, 1/sqrt(n_embd).
    pub base_scale: Option<f64>,
    /// Store the block matrices in BF16, as NVIDIA does.
    pub bf16: bool,
}

impl InitOptions {
    /// Options for a preset with seed 0, f32 and train.py's base_scale.
    pub fn preset(p: Preset) -> Self {
        let (n_layer, n_head, n_embd, vocab_size, block_size) = p.dims();
        InitOptions {
            n_layer,
            n_head,
            n_embd,
            vocab_size,
            block_size,
            seed: 0,
            base_scale: None,
            bf16: false,
        }
    }

    /// The config these options describe, validated like an imported one.
    pub fn config(&self) -> Result<Config> {
        use crate::config::ArgValue::{Bool, Float, Int};
        let bs = self.base_scale.unwrap_or(1.0 / (self.n_embd as f64).sqrt());
        let args = [
            ("use_nGPT", Int(1)),
            ("n_layer", Int(self.n_layer as i64)),
            ("n_head", Int(self.n_head as i64)),
            ("n_embd", Int(self.n_embd as i64)),
            ("block_size", Int(self.block_size as i64)),
            ("base_scale", Float(bs)),
            ("bias", Bool(false)),
            ("vocab_size", Int(self.vocab_size as i64)),
            ("dropout", Float(0.0)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Config::from_args(&args, Path::new("ngpt init options"))
    }
}

/// What `ngpt init` writes, family included: [`InitOptions`] (the NVIDIA family's
/// options; for the Hugging Face family `block_size` is `n_positions` and `bf16` must be
/// off), the family, and the Hugging Face family's MLP width.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// Sizes, seed, base_scale.
    pub opts: InitOptions,
    /// Which nGPT family's checkpoint to write.
    pub family: Family,
    /// Hugging Face family only: the MLP width I; `None` means 4 * n_embd (NVIDIA's
    /// family always has 4 * n_embd).
    pub n_inner: Option<usize>,
}

impl Spec {
    /// A preset's options and family, seed 0.
    pub fn preset(p: Preset) -> Self {
        Spec {
            opts: InitOptions::preset(p),
            family: p.family(),
            n_inner: None,
        }
    }

    /// The config this spec describes, validated like an imported one.
    pub fn config(&self) -> Result<Config> {
        use crate::config::ArgValue::{Float, Int};
        let o = &self.opts;
        let bs = o.base_scale.unwrap_or(1.0 / (o.n_embd as f64).sqrt());
        if self.family == Family::Nvidia {
            if self.n_inner.is_some_and(|i| i != 4 * o.n_embd) {
                return Err(Error::Argument {
                    what: "n_inner".into(),
                    problem: "NVIDIA's family has n_inner = 4 * n_embd".into(),
                });
            }
            return o.config();
        }
        let args = [
            ("n_layer", Int(o.n_layer as i64)),
            ("n_head", Int(o.n_head as i64)),
            ("n_embd", Int(o.n_embd as i64)),
            ("n_inner", Int(self.n_inner.unwrap_or(4 * o.n_embd) as i64)),
            ("n_positions", Int(o.block_size as i64)),
            ("vocab_size", Int(o.vocab_size as i64)),
            ("base_scale", Float(bs)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Config::from_hf_args(&args, Path::new("ngpt init options"))
    }
}

/// How a matrix is normalized (spec section 4): along the n_embd axis.
#[derive(Clone, Copy)]
enum Unit {
    Rows,
    Columns,
}

/// One generated tensor: name, shape, values (f32), whether stored as BF16.
struct Generated {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
    bf16: bool,
}

fn rng_for(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

fn normal_matrix(rng: &mut ChaCha8Rng, rows: usize, cols: usize, unit: Unit) -> Vec<f32> {
    let mut m: Vec<f32> = (0..rows * cols)
        .map(|_| StandardNormal.sample(rng))
        .collect();
    match unit {
        Unit::Rows => {
            for row in m.chunks_mut(cols) {
                let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                row.iter_mut().for_each(|v| *v /= n);
            }
        }
        Unit::Columns => {
            let mut norms = vec![0f32; cols];
            for row in m.chunks(cols) {
                norms.iter_mut().zip(row).for_each(|(n, v)| *n += v * v);
            }
            norms.iter_mut().for_each(|n| *n = n.sqrt());
            for row in m.chunks_mut(cols) {
                row.iter_mut().zip(&norms).for_each(|(v, n)| *v /= n);
            }
        }
    }
    m
}

/// `init * (1 + 0.8 z)`: about one entry in ten ends up negative.
fn perturbed(rng: &mut ChaCha8Rng, len: usize, init: f64) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            (init * (1.0 + 0.8 * z)) as f32
        })
        .collect()
}

/// How one Hugging Face tensor is drawn.
enum NousKind {
    /// Standard normal, then unit-norm along `Unit`.
    Unit(Unit),
    /// Unit rows, each then scaled by a norm drawn uniformly in [1.4, 3.3] (lm_head_2).
    RowNorms,
    /// Normal entries of this standard deviation, not normalized (wpe, biases).
    Normal(f64),
    /// `init * (1 + 0.8 z)`, as [`perturbed`].
    Perturbed(f64),
}

/// Generates the Hugging Face family's state dict for `config` (ngpt-hf-spec.md, "Files"):
/// every tensor from its own stream of `seed`, so the bytes do not depend on threads.
fn generate_nous(seed: u64, config: &Config) -> Vec<Generated> {
    let (e, i_, v, bs) = (
        config.n_embd,
        config.n_inner,
        config.vocab_size,
        config.base_scale,
    );
    let mut jobs: Vec<(String, Vec<usize>, NousKind)> = vec![
        (
            "transformer.wte.weight".into(),
            vec![v, e],
            NousKind::Unit(Unit::Rows),
        ),
        (
            "transformer.wpe.weight".into(),
            vec![config.n_positions, e],
            NousKind::Normal(0.02),
        ),
    ];
    for l in 0..config.n_layer {
        let p = format!("transformer.h.{l}");
        let mut put =
            |k: &str, shape: Vec<usize>, kind| jobs.push((format!("{p}.{k}"), shape, kind));
        // Conv1D [in, out]: c_attn and c_fc keep each output column (an E-vector) unit;
        // the projections keep each input row (an E-vector) unit.
        put(
            "attn.c_attn.weight",
            vec![e, 3 * e],
            NousKind::Unit(Unit::Columns),
        );
        put("attn.c_attn.bias", vec![3 * e], NousKind::Normal(0.02));
        put("attn.c_proj.weight", vec![e, e], NousKind::Unit(Unit::Rows));
        put("attn.c_proj.bias", vec![e], NousKind::Normal(0.02));
        put("attn.sqk", vec![e], NousKind::Perturbed(bs));
        put("attn_alpha", vec![e], NousKind::Perturbed(bs));
        put("mlp_alpha", vec![e], NousKind::Perturbed(bs));
        put(
            "mlp.c_fc.weight",
            vec![e, 2 * i_],
            NousKind::Unit(Unit::Columns),
        );
        put("mlp.c_fc.bias", vec![2 * i_], NousKind::Normal(0.02));
        put("mlp.c_proj.weight", vec![i_, e], NousKind::Unit(Unit::Rows));
        put("mlp.c_proj.bias", vec![e], NousKind::Normal(0.02));
        put("mlp.su", vec![i_], NousKind::Perturbed(1.0));
        put("mlp.sv", vec![i_], NousKind::Perturbed(1.0));
    }
    jobs.push(("lm_head_2.weight".into(), vec![v, e], NousKind::RowNorms));
    jobs.push(("sz".into(), vec![v], NousKind::Perturbed(bs)));

    let make = |idx: usize, (name, shape, kind): &(String, Vec<usize>, NousKind)| {
        let mut rng = rng_for(seed, idx as u64);
        let len: usize = shape.iter().product();
        let values = match kind {
            NousKind::Unit(unit) => normal_matrix(&mut rng, shape[0], shape[1], *unit),
            NousKind::RowNorms => {
                let mut m = normal_matrix(&mut rng, shape[0], shape[1], Unit::Rows);
                let norms = rand_distr::Uniform::new(1.4f32, 3.3f32).expect("1.4 < 3.3");
                for row in m.chunks_mut(shape[1]) {
                    let norm = norms.sample(&mut rng);
                    row.iter_mut().for_each(|x| *x *= norm);
                }
                m
            }
            NousKind::Normal(std) => (0..len)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    (std * z) as f32
                })
                .collect(),
            NousKind::Perturbed(init) => perturbed(&mut rng, len, *init),
        };
        Generated {
            name: name.clone(),
            shape: shape.clone(),
            values,
            bf16: false,
        }
    };
    // Each job has its own stream: split the jobs over a few threads.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let jobs = &jobs;
                let make = &make;
                s.spawn(move || {
                    jobs.iter()
                        .enumerate()
                        .filter(|(i, _)| i % threads == t)
                        .map(|(i, j)| make(i, j))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("init worker thread does not panic"))
            .collect()
    })
}

/// Generates the state dict for `opts` (NVIDIA key names).
fn generate(opts: &InitOptions, config: &Config) -> Vec<Generated> {
    let (c, v, bs) = (config.n_embd, config.vocab_size, config.base_scale);
    // (name, rows, cols, unit, stored as bf16 when requested)
    let mut mats: Vec<(String, usize, usize, Unit, bool)> =
        vec![("transformer.wte.weight".into(), v, c, Unit::Rows, false)];
    let mut vecs: Vec<(String, usize, f64)> = vec![];
    for i in 0..config.n_layer {
        let p = format!("transformer.h.{i}");
        mats.push((format!("{p}.query.weight"), c, c, Unit::Rows, true));
        mats.push((format!("{p}.key.weight"), c, c, Unit::Rows, true));
        mats.push((format!("{p}.value.weight"), c, c, Unit::Rows, true));
        mats.push((format!("{p}.att_c_proj.weight"), c, c, Unit::Columns, true));
        mats.push((format!("{p}.c_fc.weight"), 8 * c, c, Unit::Rows, true));
        mats.push((
            format!("{p}.mlp_c_proj.weight"),
            c,
            4 * c,
            Unit::Columns,
            true,
        ));
        vecs.push((format!("{p}.attn_alpha"), c, bs));
        vecs.push((format!("{p}.mlp_alpha"), c, bs));
        vecs.push((format!("{p}.sqk"), c, bs));
        vecs.push((format!("{p}.suv"), 8 * c, 1.0));
    }
    mats.push(("lm_head.weight".into(), v, c, Unit::Rows, false));
    vecs.push(("sz".into(), v, bs));

    let n_mats = mats.len();
    let make_mat =
        |(idx, (name, rows, cols, unit, bf16)): (usize, (String, usize, usize, Unit, bool))| {
            let mut rng = rng_for(opts.seed, idx as u64);
            Generated {
                name,
                shape: vec![rows, cols],
                values: normal_matrix(&mut rng, rows, cols, unit),
                bf16: bf16 && opts.bf16,
            }
        };
    // Matrices dominate the time; generate them on two threads (each has its own stream,
    // so the bytes do not depend on the split).
    let indexed: Vec<_> = mats.into_iter().enumerate().collect();
    let (evens, odds): (Vec<_>, Vec<_>) = indexed.into_iter().partition(|(i, _)| i % 2 == 0);
    let mut out: Vec<Generated> = std::thread::scope(|s| {
        let h = s.spawn(|| odds.into_iter().map(make_mat).collect::<Vec<_>>());
        let mut a: Vec<Generated> = evens.into_iter().map(make_mat).collect();
        a.extend(h.join().expect("init worker thread does not panic"));
        a
    });
    for (j, (name, len, init)) in vecs.into_iter().enumerate() {
        let mut rng = rng_for(opts.seed, (n_mats + j) as u64);
        out.push(Generated {
            name,
            shape: vec![len],
            values: perturbed(&mut rng, len, init),
            bf16: false,
        });
    }
    out
}

/// Writes `model.safetensors` and `config.json` into `dir`.
///
/// ```
/// use ngpt_compiler::config::Config;
/// use ngpt_compiler::init::{write, InitOptions, Preset};
/// let dir = std::env::temp_dir().join(format!("ngpt-doc-init-{}", std::process::id()));
/// let opts = InitOptions { seed: 7, ..InitOptions::preset(Preset::Tiny) };
/// write(&dir, &opts)?;
/// assert!(dir.join("model.safetensors").is_file());
/// let config = Config::from_json_file(&dir.join("config.json"))?;
/// assert_eq!(config, opts.config()?);
/// assert_eq!((config.n_layer, config.n_embd, config.vocab_size), (2, 64, 256));
/// # let _ = std::fs::remove_dir_all(&dir);
/// # Ok::<(), ngpt_compiler::Error>(())
/// ```
pub fn write(dir: &Path, opts: &InitOptions) -> Result<()> {
    write_spec(
        dir,
        &Spec {
            opts: opts.clone(),
            family: Family::Nvidia,
            n_inner: None,
        },
    )
}

/// Writes the checkpoint `spec` describes into `dir`: NVIDIA's (as [`write()`]) or a
/// Hugging Face directory of NousResearch's nGPT.
///
/// ```
/// use ngpt_compiler::init::{write_spec, Family, Preset, Spec};
/// let dir = std::env::temp_dir().join(format!("ngpt-doc-init-nous-{}", std::process::id()));
/// write_spec(&dir, &Spec::preset(Preset::NousTiny))?;
/// let ckpt = ngpt_compiler::import::load(&dir)?;
/// assert_eq!(ckpt.config.family, Family::Nous);
/// assert_eq!((ckpt.config.n_inner, ckpt.config.n_positions), (256, 128));
/// # let _ = std::fs::remove_dir_all(&dir);
/// # Ok::<(), ngpt_compiler::Error>(())
/// ```
pub fn write_spec(dir: &Path, spec: &Spec) -> Result<()> {
    let opts = &spec.opts;
    let config = spec.config()?;
    if config.parameter_count().is_none_or(|n| n > 8_000_000_000) {
        return Err(Error::Argument {
            what: "model size".into(),
            problem: "more than 8e9 parameters; ngpt init makes test models".into(),
        });
    }
    if config.family == Family::Nous && opts.bf16 {
        return Err(Error::Argument {
            what: "bf16".into(),
            problem: "the Hugging Face family's checkpoints are float32".into(),
        });
    }
    artifact::create_dir(dir)?;
    let tensors = match config.family {
        Family::Nvidia => generate(opts, &config),
        Family::Nous => generate_nous(opts.seed, &config),
    };
    let bytes: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = tensors
        .into_iter()
        .map(|g| {
            let (dtype, data) = if g.bf16 {
                let d = g
                    .values
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect();
                (safetensors::Dtype::BF16, d)
            } else {
                (
                    safetensors::Dtype::F32,
                    g.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            };
            (g.name, g.shape, dtype, data)
        })
        .collect();
    let st_path = dir.join("model.safetensors");
    artifact::write_with(&st_path, |tmp| {
        let views = bytes
            .iter()
            .map(|(name, shape, dtype, data)| {
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| Error::Argument {
                        what: name.clone(),
                        problem: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let io = |source| Error::Io {
            path: tmp.to_path_buf(),
            source,
        };
        // safetensors writes through a NamedTempFile, which is created owner-only (0600);
        // keep the mode a plain create gives (0666 less the umask), as config.json has.
        let perms = std::fs::File::create(tmp)
            .and_then(|f| f.metadata())
            .map_err(io)?
            .permissions();
        safetensors::tensor::serialize_to_file(views, None, tmp)
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        std::fs::set_permissions(tmp, perms).map_err(io)
    })?;
    artifact::write_bytes(&dir.join("config.json"), config_json(&config).as_bytes())
}

/// `config.json`: NVIDIA's `model_args`, or a Hugging Face config (`model_type` "ngpt",
/// `architectures` ["NgptLMHeadModel"]) for the Nous family.
fn config_json(config: &Config) -> String {
    match config.family {
        Family::Nvidia => config.to_json(),
        Family::Nous => serde_json::to_string_pretty(&serde_json::json!({
            "architectures": ["NgptLMHeadModel"],
            "model_type": "ngpt",
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_embd": config.n_embd,
            "n_inner": config.n_inner,
            "n_positions": config.n_positions,
            "vocab_size": config.vocab_size,
            "base_scale": config.base_scale,
            "torch_dtype": "float32",
        }))
        .expect("a JSON value serializes"),
    }
}
