//! Loading and validating a plan. Everything a step could index is checked before anything
//! runs; what depends on the request (rows, batch) is checked again per call.

use std::path::Path;

use ngpt_schemas::plan::{self as pb, arg, operand, step, Plan};
use ngpt_schemas::prost::Message;

use crate::contract::{self, ModuleDims, Slot};
use crate::error::{Error, Result};
use crate::mapped::{self, Elems};

pub use crate::contract::Dims;

/// A validated plan with its weights as stored: f32, or bf16 (kept as bf16, so a bf16
/// plan's weights take half the memory; executors widen only what they read as f32).
/// Loaded from a directory, the weights are read in place from the memory-mapped
/// `model.weights` ([`crate::mapped`]).
///
/// Its fields are private: a plan is validated whole at load and cannot be changed after;
/// read it through the accessors.
pub struct LoadedPlan {
    /// The decoded `model.plan`: programs, buffers, kernel modules, weight descriptions.
    pub(crate) plan: Plan,
    /// The model's dimensions, from the plan's config (validated).
    pub(crate) dims: Dims,
    /// One per plan weight.
    pub(crate) weights: Vec<WeightData>,
    /// What the plan's kernel module specializes beyond the config (checked against the
    /// contract at load, [`contract::check_module`]).
    pub(crate) module_dims: ModuleDims,
}

impl LoadedPlan {
    /// The decoded `model.plan`: programs, buffers, kernel modules, weight descriptions.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The model's dimensions, from the plan's config (validated).
    pub fn dims(&self) -> &Dims {
        &self.dims
    }

    /// The weights, one per entry of `plan().weights`, as stored.
    pub fn weights(&self) -> &[WeightData] {
        &self.weights
    }

    /// What the plan's kernel module specializes beyond the config.
    pub fn module_dims(&self) -> &ModuleDims {
        &self.module_dims
    }
}

/// bf16 bits to f32, exactly (the bits are the f32's upper half; NaNs kept as they are).
#[inline(always)]
pub fn widen_bf16(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// A weight's values as `model.weights` stores them (equality is of the stored bits).
#[derive(Debug, Clone, PartialEq)]
pub enum WeightData {
    /// f32 values.
    F32(Elems<f32>),
    /// bf16 bit patterns.
    Bf16(Elems<u16>),
    /// f16 bit patterns: the block scales of a quantized weight (read through it).
    F16(Elems<u16>),
    /// A weight-only quantized matrix with its block scales.
    Quant(QuantWeight),
}

/// Bits of a quantized weight's integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantBits {
    /// `I8`: signed bytes, K a row.
    Int8,
    /// `I4`: `q + 8` in nibbles, the even element low, `ceil(K / 2)` bytes a row.
    Int4,
}

impl QuantBits {
    /// `int8` or `int4`.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantBits::Int8 => "int8",
            QuantBits::Int4 => "int4",
        }
    }
}

/// A quantized `[rows, k]` matrix (`I8` or `I4`, schemas/plan.proto): value `(r, j)` is
/// `f32(scales[r * n_blocks + j / block]) * q(r, j)`, exactly the compiler's
/// `quant::dequantize`. Validated whole at load: sizes, scale count, finite scales.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantWeight {
    /// Bits of the integers.
    pub bits: QuantBits,
    /// Rows (N, the GEMM's outputs).
    pub rows: usize,
    /// Entries a row (K, the reduction dimension).
    pub k: usize,
    /// Entries a block along K (a power of two, at least 16).
    pub block: usize,
    /// 0: GEMMs multiply the f32 activations (weight-only); 32: they quantize each
    /// activation row to int8 in blocks of 32 first (`block` is 32 and `k` a multiple of
    /// 32 then), as `cpu/quant_act.rs` defines it.
    pub act_block: usize,
    /// The integers as stored, [`QuantWeight::row_bytes`] a row.
    pub data: Elems<u8>,
    /// The block scales' f16 bits, [`QuantWeight::n_blocks`] a row.
    pub scales: Elems<u16>,
}

impl QuantWeight {
    /// Bytes of one row of integers.
    pub fn row_bytes(&self) -> usize {
        match self.bits {
            QuantBits::Int8 => self.k,
            QuantBits::Int4 => self.k.div_ceil(2),
        }
    }

    /// Blocks (and scales) a row.
    pub fn n_blocks(&self) -> usize {
        self.k.div_ceil(self.block)
    }

    /// Integer `j` of row `r`'s bytes.
    #[inline(always)]
    pub fn int(&self, row: &[u8], j: usize) -> i8 {
        match self.bits {
            QuantBits::Int8 => row[j] as i8,
            QuantBits::Int4 => ((row[j / 2] >> (4 * (j % 2))) & 0x0f) as i8 - 8,
        }
    }

    /// Rows `start..start + out.len() / k` dequantized into `out` (row-major, k a row).
    ///
    /// A block at a time, its scale widened once (a block starts on a whole byte: `block`
    /// is even): per element, the scale times the integer as [`QuantWeight::int`] reads
    /// it (exact, so the same bits in any order; the CPU executor's AVX2 copy,
    /// `cpu/quant.rs`, gives them too).
    pub fn dequantize_rows(&self, start: usize, out: &mut [f32]) {
        let (rb, nb, k) = (self.row_bytes(), self.n_blocks(), self.k);
        if k == 0 {
            return;
        }
        let block = self.block.max(2);
        for (i, dst) in out.chunks_exact_mut(k).enumerate() {
            let r = start + i;
            let row = &self.data[r * rb..(r + 1) * rb];
            let scales = &self.scales[r * nb..(r + 1) * nb];
            match self.bits {
                QuantBits::Int8 => {
                    let blocks = dst.chunks_mut(block).zip(row.chunks(block));
                    for ((dst, src), &sb) in blocks.zip(scales) {
                        let s = widen_f16(sb);
                        for (d, &q) in dst.iter_mut().zip(src) {
                            *d = s * f32::from(q as i8);
                        }
                    }
                }
                QuantBits::Int4 => {
                    let blocks = dst.chunks_mut(block).zip(row.chunks(block / 2));
                    for ((dst, src), &sb) in blocks.zip(scales) {
                        let s = widen_f16(sb);
                        let mut pairs = dst.chunks_exact_mut(2);
                        for (d, &byte) in (&mut pairs).zip(src) {
                            d[0] = s * f32::from((byte & 0x0f) as i8 - 8);
                            d[1] = s * f32::from((byte >> 4) as i8 - 8);
                        }
                        // An odd k's last entry: the low nibble of the row's last byte.
                        let last = pairs.into_remainder().first_mut().zip(src.last());
                        if let Some((d, &byte)) = last {
                            *d = s * f32::from((byte & 0x0f) as i8 - 8);
                        }
                    }
                }
            }
        }
    }
}

/// f16 bits to f32, exactly.
#[inline(always)]
pub fn widen_f16(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

impl WeightData {
    /// Number of elements (a quantized matrix's rows x k).
    pub fn len(&self) -> usize {
        match self {
            WeightData::F32(v) => v.len(),
            WeightData::Bf16(v) | WeightData::F16(v) => v.len(),
            WeightData::Quant(q) => q.rows * q.k,
        }
    }

    /// Whether the weight has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values in f32 (bf16 and f16 widened, a quantized matrix dequantized, exactly),
    /// borrowed when they already are f32.
    ///
    /// ```
    /// use ngpt_runtime::plan::WeightData;
    /// let w = WeightData::Bf16(vec![0x3fc0, 0xc000].into()); // 1.5, -2.0
    /// assert_eq!(&*w.to_f32(), &[1.5, -2.0]);
    /// ```
    pub fn to_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            WeightData::F32(v) => std::borrow::Cow::Borrowed(&v[..]),
            WeightData::Bf16(v) => v.iter().map(|&b| widen_bf16(b)).collect(),
            WeightData::F16(v) => v.iter().map(|&b| widen_f16(b)).collect(),
            WeightData::Quant(q) => {
                let mut out = vec![0f32; q.rows * q.k];
                q.dequantize_rows(0, &mut out);
                std::borrow::Cow::Owned(out)
            }
        }
    }

    /// The dtype name as the plan states it.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            WeightData::F32(_) => "F32",
            WeightData::Bf16(_) => "BF16",
            WeightData::F16(_) => "F16",
            WeightData::Quant(q) => match q.bits {
                QuantBits::Int8 => "I8",
                QuantBits::Int4 => "I4",
            },
        }
    }
}

fn bad(path: &str, problem: impl Into<String>) -> Error {
    Error::Plan {
        path: path.to_string(),
        problem: problem.into(),
    }
}

fn dtype_size(d: i32) -> Option<u64> {
    match pb::DType::try_from(d).ok()? {
        pb::DType::F32 | pb::DType::I32 => Some(4),
        pb::DType::Bf16 => Some(2),
        _ => None,
    }
}

/// How [`LoadedPlan::load_with`] brings `model.weights` into memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsIo {
    /// Map the file and view the weights in place: no copy, pages shared with every process
    /// that loads the same plan. The file must not be changed in place while it is loaded
    /// (truncating it makes the process fault); replacing it by rename is safe.
    Map,
    /// Read the file into memory once: the process keeps its own copy whatever happens to
    /// the file afterwards.
    Read,
}

/// Where a plan's weight bytes come from: a mapped `model.weights` or a buffer the plan
/// keeps (weights viewed in place), or borrowed bytes (copied).
#[derive(Clone, Copy)]
enum WeightBytes<'a> {
    Shared(&'a mapped::Shared),
    Copied(&'a [u8]),
}

impl LoadedPlan {
    /// Reads `dir/model.plan` and maps `dir/model.weights` (read in place, not copied; see
    /// [`crate::mapped`] for the one condition that comes with mapping a file);
    /// [`LoadedPlan::load_with`] can read it into memory instead.
    pub fn load(dir: &Path) -> Result<LoadedPlan> {
        Self::load_with(dir, WeightsIo::Map)
    }

    /// As [`LoadedPlan::load`], with `model.weights` brought in as `how` says.
    ///
    /// ```no_run
    /// use ngpt_runtime::plan::{LoadedPlan, WeightsIo};
    /// let dir = std::path::Path::new("out/nv-tiny");
    /// let mapped = LoadedPlan::load_with(dir, WeightsIo::Map)?;
    /// let read = LoadedPlan::load_with(dir, WeightsIo::Read)?;
    /// assert_eq!(mapped.weights(), read.weights());
    /// # Ok::<(), ngpt_runtime::Error>(())
    /// ```
    pub fn load_with(dir: &Path, how: WeightsIo) -> Result<LoadedPlan> {
        let io = |p: &Path| {
            let path = p.display().to_string();
            move |source| Error::Io { path, source }
        };
        let plan_path = dir.join("model.plan");
        let plan = std::fs::read(&plan_path).map_err(io(&plan_path))?;
        let path = plan_path.display().to_string();
        let weights_path = dir.join("model.weights");
        if how == WeightsIo::Read {
            let weights = std::fs::read(&weights_path).map_err(io(&weights_path))?;
            return Self::from_vec(&plan, weights, &path);
        }
        let file = std::fs::File::open(&weights_path).map_err(io(&weights_path))?;
        let meta = file.metadata().map_err(io(&weights_path))?;
        if !meta.is_file() {
            // Mapping a directory or a device fails with "No such device": say what is wrong.
            return Err(Error::Plan {
                path: weights_path.display().to_string(),
                problem: "is not a regular file".into(),
            });
        }
        let len = meta.len();
        if len == 0 {
            // Nothing to map (and an empty mapping is an error on some systems).
            return Self::decode(&plan, WeightBytes::Copied(&[]), &path);
        }
        let map = mapped::map_file(&file).map_err(io(&weights_path))?;
        Self::decode(&plan, WeightBytes::Shared(&map), &path)
    }

    /// Decodes and validates a plan whose weights are given as bytes (copied into the
    /// loaded plan); `path` names it in errors.
    pub fn from_bytes(plan_bytes: &[u8], weights: &[u8], path: &str) -> Result<LoadedPlan> {
        Self::decode(plan_bytes, WeightBytes::Copied(weights), path)
    }

    /// As [`LoadedPlan::from_bytes`], but keeps `weights` and views each weight in it
    /// instead of copying it (a plan lowered in memory then costs its weights once).
    ///
    /// ```no_run
    /// # fn lowered() -> (Vec<u8>, Vec<u8>) { unimplemented!() }
    /// use ngpt_runtime::plan::{LoadedPlan, WeightData};
    /// let (plan_bytes, weights) = lowered(); // e.g. ngpt_compiler::plan::lower's output
    /// let plan = LoadedPlan::from_vec(&plan_bytes, weights, "in memory")?;
    /// assert!(plan.weights().iter().all(|w| match w {
    ///     WeightData::F32(v) => v.is_in_place(),
    ///     WeightData::Bf16(v) | WeightData::F16(v) => v.is_in_place(),
    ///     WeightData::Quant(q) => q.data.is_in_place() && q.scales.is_in_place(),
    /// }));
    /// # Ok::<(), ngpt_runtime::Error>(())
    /// ```
    pub fn from_vec(plan_bytes: &[u8], weights: Vec<u8>, path: &str) -> Result<LoadedPlan> {
        let shared: mapped::Shared = std::sync::Arc::new(weights);
        Self::decode(plan_bytes, WeightBytes::Shared(&shared), path)
    }

    /// Validates a plan already in memory (as `ngpt_compiler::plan::lower` returns it) and
    /// keeps `weights` as [`LoadedPlan::from_vec`] does: the same checks as a plan read
    /// from disk, without encoding it and decoding it again.
    ///
    /// ```no_run
    /// # fn lowered() -> (ngpt_schemas::plan::Plan, Vec<u8>) { unimplemented!() }
    /// use ngpt_runtime::plan::LoadedPlan;
    /// let (plan, weights) = lowered(); // e.g. ngpt_compiler::plan::lower's plan and weights
    /// let loaded = LoadedPlan::from_plan(plan, weights, "in memory")?;
    /// assert!(loaded.dims().vocab > 0);
    /// # Ok::<(), ngpt_runtime::Error>(())
    /// ```
    pub fn from_plan(plan: Plan, weights: Vec<u8>, path: &str) -> Result<LoadedPlan> {
        let shared: mapped::Shared = std::sync::Arc::new(weights);
        Self::validate(plan, WeightBytes::Shared(&shared), path)
    }

    fn decode(plan_bytes: &[u8], source: WeightBytes<'_>, path: &str) -> Result<LoadedPlan> {
        let plan = Plan::decode(plan_bytes).map_err(|e| {
            bad(
                path,
                format!("not a valid ngpt plan (protobuf decode: {e})"),
            )
        })?;
        Self::validate(plan, source, path)
    }

    fn validate(plan: Plan, source: WeightBytes<'_>, path: &str) -> Result<LoadedPlan> {
        let weights: &[u8] = match source {
            WeightBytes::Copied(b) => b,
            WeightBytes::Shared(m) => (**m).as_ref(),
        };
        if plan.format_major != pb::FORMAT_MAJOR {
            let writer = if plan.producer.is_empty() {
                "an unknown producer".to_string()
            } else {
                contract::printable(&plan.producer)
            };
            let hint = if plan.format_major < pb::FORMAT_MAJOR {
                "; recompile the checkpoint with this ngpt (`ngpt compile`)"
            } else {
                "; a newer ngpt wrote it"
            };
            return Err(bad(
                path,
                format!(
                    "plan format {} (written by {writer}) is not supported: this runtime reads format {}{hint}",
                    plan.format_major,
                    pb::FORMAT_MAJOR
                ),
            ));
        }
        let cfg = plan
            .config
            .as_ref()
            .ok_or_else(|| bad(path, "no model config"))?;
        let dims = Dims {
            n_layer: cfg.n_layer as usize,
            n_head: cfg.n_head as usize,
            n_embd: cfg.n_embd as usize,
            head_dim: cfg.head_dim as usize,
            vocab: cfg.vocab_size as usize,
            max_seq_len: plan.max_seq_len as usize,
            n_inner: match cfg.n_inner {
                0 => (cfg.n_embd as usize).saturating_mul(4),
                i => i as usize,
            },
        };
        let limit = 1usize << 24;
        for (name, v) in [
            ("n_layer", dims.n_layer),
            ("n_head", dims.n_head),
            ("n_embd", dims.n_embd),
            ("head_dim", dims.head_dim),
            ("vocab_size", dims.vocab),
            ("max_seq_len", dims.max_seq_len),
            ("n_inner", dims.n_inner),
        ] {
            if v == 0 || v > limit {
                return Err(bad(
                    path,
                    format!("config field `{name}` = {v} is outside 1..={limit}"),
                ));
            }
        }
        if dims.n_head * dims.head_dim != dims.n_embd || !dims.head_dim.is_multiple_of(2) {
            return Err(bad(
                path,
                format!(
                    "n_head {} x head_dim {} != n_embd {} (or odd head_dim)",
                    dims.n_head, dims.head_dim, dims.n_embd
                ),
            ));
        }
        if plan.weights_file_bytes != weights.len() as u64 {
            return Err(bad(
                path,
                format!(
                    "model.weights holds {} bytes, the plan expects {}",
                    weights.len(),
                    plan.weights_file_bytes
                ),
            ));
        }
        // Weights: in bounds, sized by shape and dtype, not overlapping.
        let mut spans = vec![];
        let mut data = Vec::with_capacity(plan.weights.len());
        // Quantized weights' integers, made whole with their scales below.
        let mut ints: Vec<(usize, Elems<u8>)> = vec![];
        for (wi, w) in plan.weights.iter().enumerate() {
            let dtype = pb::DType::try_from(w.dtype).ok();
            let elems = w.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let want = match (dtype, w.shape.as_slice()) {
                (Some(pb::DType::F32), _) => elems.and_then(|e| e.checked_mul(4)),
                (Some(pb::DType::Bf16 | pb::DType::F16), _) => elems.and_then(|e| e.checked_mul(2)),
                (Some(pb::DType::I8), [_, _]) => elems,
                (Some(pb::DType::I4), [n, k]) => n.checked_mul(k.div_ceil(2)),
                (Some(pb::DType::I8 | pb::DType::I4), _) => {
                    return Err(bad(
                        path,
                        format!(
                            "weight `{}`: a quantized weight is a matrix [N, K], not shape {:?}",
                            w.name, w.shape
                        ),
                    ))
                }
                _ => {
                    return Err(bad(
                        path,
                        format!(
                        "weight `{}`: dtype {} is not F32 or BF16 (nor a quantized I8, I4 or F16)",
                        w.name, w.dtype
                    ),
                    ))
                }
            };
            if want != Some(w.bytes) {
                return Err(bad(
                    path,
                    format!(
                        "weight `{}`: {} bytes do not match shape {:?}{}",
                        w.name,
                        w.bytes,
                        w.shape,
                        match dtype {
                            Some(d @ (pb::DType::I8 | pb::DType::I4 | pb::DType::F16)) =>
                                format!(" as {} (truncated?)", d.as_str_name()),
                            _ => String::new(),
                        }
                    ),
                ));
            }
            let quantized = matches!(dtype, Some(pb::DType::I8 | pb::DType::I4));
            if w.quant.is_some() != quantized {
                return Err(bad(
                    path,
                    format!(
                        "weight `{}`: Weight.quant is set exactly for I8 and I4 weights",
                        w.name
                    ),
                ));
            }
            let end = w
                .offset
                .checked_add(w.bytes)
                .filter(|&e| e <= weights.len() as u64);
            let end = end.ok_or_else(|| {
                bad(
                    path,
                    format!(
                        "weight `{}`: bytes {}..+{} lie outside model.weights",
                        w.name, w.offset, w.bytes
                    ),
                )
            })?;
            spans.push((w.offset, end, w.name.clone()));
            // In bounds (checked just above), so these casts and the slice cannot fail.
            let start = w.offset as usize;
            let raw = &weights[start..end as usize];
            fn view<T: mapped::Element>(
                source: WeightBytes<'_>,
                start: usize,
                raw: &[u8],
            ) -> Elems<T> {
                match source {
                    WeightBytes::Shared(m) => {
                        Elems::in_place(m, start, raw.len() / std::mem::size_of::<T>())
                    }
                    WeightBytes::Copied(_) => Elems::decode(raw),
                }
            }
            data.push(match dtype {
                Some(pb::DType::Bf16) => WeightData::Bf16(view(source, start, raw)),
                Some(pb::DType::F16) => WeightData::F16(view(source, start, raw)),
                Some(pb::DType::I8 | pb::DType::I4) => {
                    ints.push((wi, view(source, start, raw)));
                    // Replaced below, once its scales are checked.
                    WeightData::F32(Vec::new().into())
                }
                _ => WeightData::F32(view(source, start, raw)),
            });
        }
        let mut scale_of = vec![false; data.len()];
        for (wi, bytes) in ints {
            let w = &plan.weights[wi];
            let q = quant_weight(w, bytes, &plan.weights, &data).map_err(|p| {
                bad(
                    path,
                    format!("weight `{}`: {p}", contract::printable(&w.name)),
                )
            })?;
            if let Some(m) = &w.quant {
                scale_of[m.scales as usize] = true;
            }
            data[wi] = WeightData::Quant(q);
        }
        if let Some(i) =
            (0..data.len()).find(|&i| matches!(data[i], WeightData::F16(_)) && !scale_of[i])
        {
            return Err(bad(
                path,
                format!(
                    "weight `{}`: an F16 weight is only the block scales of an I8 or I4 weight",
                    plan.weights[i].name
                ),
            ));
        }
        spans.sort();
        for pair in spans.windows(2) {
            if pair[1].0 < pair[0].1 {
                return Err(bad(
                    path,
                    format!(
                        "weights `{}` and `{}` overlap in model.weights",
                        pair[0].2, pair[1].2
                    ),
                ));
            }
        }
        // Buffers: a dtype, a kind, and a size no larger than this model can need (a row of
        // fc or logits, one sequence's KV cache), so a tampered size cannot make the
        // executor allocate terabytes.
        let cap = [
            8 * dims.n_embd as u64,
            dims.vocab as u64,
            dims.n_embd as u64 * dims.max_seq_len as u64,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        for (i, b) in plan.buffers.iter().enumerate() {
            let elements = match b.elements.as_ref() {
                Some(e)
                    if dtype_size(b.dtype).is_some()
                        && pb::BufferKind::try_from(b.kind)
                            .is_ok_and(|k| k != pb::BufferKind::Unspecified) =>
                {
                    e
                }
                _ => {
                    return Err(bad(
                        path,
                        format!("buffer {i} `{}` has no valid dtype, kind or size", b.name),
                    ))
                }
            };
            for (what, v) in [
                ("c0", elements.c0),
                ("c_rows", elements.c_rows),
                ("c_batch", elements.c_batch),
            ] {
                if v > cap {
                    return Err(bad(
                        path,
                        format!(
                            "buffer {i} `{}`: size coefficient {what} = {v} exceeds {cap}, the most this model can need",
                            b.name
                        ),
                    ));
                }
            }
        }
        // A KV cache is B x n_head x max_seq_len x head_dim, exactly: decode reaches its
        // last slots only at the end of a long sequence, so a short one is refused here.
        let per_seq = (dims.n_head * dims.max_seq_len * dims.head_dim) as u64;
        for b in &plan.buffers {
            let e = b.elements.as_ref().map(|e| (e.c0, e.c_rows, e.c_batch));
            if b.kind == pb::BufferKind::Cache as i32 && e != Some((0, 0, per_seq)) {
                let (c0, c_rows, c_batch) = e.unwrap_or_default();
                return Err(bad(
                    path,
                    format!(
                        "buffer `{}`: a KV cache holds n_head x max_seq_len x head_dim = {per_seq} elements per sequence; this one holds {c0} + {c_rows} x R + {c_batch} x B",
                        b.name
                    ),
                ));
            }
        }
        // The buffers the executor fills and reads by name.
        for (name, dtype, per_row) in [
            ("tokens", pb::DType::I32, 1u64),
            ("positions", pb::DType::I32, 1),
            ("slots", pb::DType::I32, 1),
            ("logits", pb::DType::F32, dims.vocab as u64),
        ] {
            let b = plan
                .buffers
                .iter()
                .find(|b| b.name == name)
                .ok_or_else(|| bad(path, format!("no buffer named `{name}`")))?;
            let rows = b.elements.as_ref().map_or(0, |e| e.c_rows);
            if b.dtype != dtype as i32 || rows < per_row {
                return Err(bad(
                    path,
                    format!(
                        "buffer `{name}` should be {} with {per_row} elements per row, found {} with {rows}",
                        dtype.as_str_name(),
                        pb::DType::try_from(b.dtype).map_or("?", |d| d.as_str_name()),
                    ),
                ));
            }
        }
        if plan.modules.len() != 1 {
            return Err(bad(
                path,
                format!(
                    "the plan names {} kernel modules; plans launch from the runtime's one module `{}`",
                    plan.modules.len(),
                    contract::MODULE
                ),
            ));
        }
        let module_dims =
            contract::check_module(&plan.modules[0], &dims).map_err(|p| bad(path, p))?;
        for program in [&plan.prefill, &plan.decode] {
            let program = program
                .as_ref()
                .ok_or_else(|| bad(path, "a program (prefill or decode) is missing"))?;
            for s in &program.steps {
                validate_step(&plan, &dims, &module_dims, s).map_err(|p| {
                    bad(
                        path,
                        format!("program `{}`, step `{}`: {p}", program.name, s.name),
                    )
                })?;
            }
        }
        Ok(LoadedPlan {
            plan,
            dims,
            weights: data,
            module_dims,
        })
    }

    /// The weights some step reads as f32 values: kernel arguments, and GEMM operands other
    /// than `a` in the weight form (`trans_a` and not `trans_b`: rows of W contiguous, which
    /// the executors read as bf16 directly).
    pub fn f32_weight_reads(&self) -> std::collections::BTreeSet<usize> {
        let mut set = std::collections::BTreeSet::new();
        let programs = [&self.plan.prefill, &self.plan.decode];
        for s in programs.into_iter().flatten().flat_map(|p| &p.steps) {
            match s.kind.as_ref() {
                Some(step::Kind::Launch(l)) => {
                    for a in &l.args {
                        if let Some(arg::Value::Weight(w)) = a.value {
                            set.insert(w as usize);
                        }
                    }
                }
                Some(step::Kind::Gemm(g)) => {
                    let weight = |o: Option<&pb::Operand>| match o.and_then(|o| o.source) {
                        Some(operand::Source::Weight(w)) => Some(w as usize),
                        _ => None,
                    };
                    let weight_form = g.trans_a && !g.trans_b;
                    if !weight_form {
                        set.extend(weight(g.a.as_ref()));
                    }
                    set.extend(weight(g.b.as_ref()));
                    set.extend(weight(g.c.as_ref()));
                }
                _ => {}
            }
        }
        set
    }

    /// The buffer's element count for `rows` rows and `batch` sequences.
    pub fn buffer_len(&self, index: usize, rows: usize, batch: usize) -> Result<usize> {
        let b = &self.plan.buffers[index];
        eval(b.elements.as_ref(), rows, batch).ok_or_else(|| Error::Request {
            what: format!("buffer `{}`", b.name),
            problem: format!("size overflows for {rows} rows and batch {batch}"),
        })
    }
}

/// A quantized weight made whole: its block size, its scales weight (F16 `[N, n_blocks]`,
/// every scale finite). The problem, for the caller to name the weight.
fn quant_weight(
    w: &pb::Weight,
    data: Elems<u8>,
    all: &[pb::Weight],
    loaded: &[WeightData],
) -> std::result::Result<QuantWeight, String> {
    let q = w.quant.as_ref().ok_or("no Weight.quant")?;
    let block = q.block as usize;
    if block < 16 || !block.is_power_of_two() {
        return Err(format!(
            "block {block} is not a power of two of at least 16"
        ));
    }
    let (rows, k) = match w.shape.as_slice() {
        [n, k] => (*n as usize, *k as usize),
        _ => return Err(format!("shape {:?} is not [N, K]", w.shape)),
    };
    let nb = k.div_ceil(block);
    let si = q.scales as usize;
    let (sw, scales) = match (all.get(si), loaded.get(si)) {
        (Some(sw), Some(WeightData::F16(v))) => (sw, v),
        _ => {
            return Err(format!(
                "its scales (weight {si}) are not an F16 weight of the plan"
            ))
        }
    };
    if sw.shape != [rows as u64, nb as u64] || scales.len() != rows * nb {
        return Err(format!(
            "its scales `{}` have shape {:?} ({} values); [N, K] = [{rows}, {k}] in blocks of {block} needs [{rows}, {nb}] (wrong count?)",
            contract::printable(&sw.name),
            sw.shape,
            scales.len()
        ));
    }
    // f16 with an all-ones exponent: infinite or NaN.
    if let Some(i) = scales.iter().position(|&b| b & 0x7c00 == 0x7c00) {
        return Err(format!(
            "block scale {i} in `{}` is {} (not finite)",
            contract::printable(&sw.name),
            widen_f16(scales[i])
        ));
    }
    let bits = if w.dtype == pb::DType::I4 as i32 {
        QuantBits::Int4
    } else {
        QuantBits::Int8
    };
    let act_block = q.act_block as usize;
    let want = pb::INT8_ACT_BLOCK as usize;
    if act_block != 0 && (act_block != want || block != want || k % want != 0) {
        return Err(format!(
            "act_block {act_block} with block {block} and K = {k}: int8 activations need act_block {want}, block {want} and K a multiple of {want} (or act_block 0)"
        ));
    }
    Ok(QuantWeight {
        bits,
        rows,
        k,
        block,
        act_block,
        data,
        scales: scales.clone(),
    })
}

/// The buffer a step writes first: a GEMM's C, a launch's first `Out` argument (what
/// both executors hand a step tracer).
pub fn written_buffer(s: &pb::Step) -> Option<usize> {
    match s.kind.as_ref()? {
        step::Kind::Gemm(g) => match g.c.as_ref()?.source.as_ref()? {
            operand::Source::Buffer(b) => Some(*b as usize),
            operand::Source::Weight(_) => None,
        },
        step::Kind::Launch(l) => {
            let e = contract::entry(&l.entry)?;
            let i = e.args.iter().position(|a| a.slot == Slot::Out)?;
            match l.args.get(i)?.value.as_ref()? {
                arg::Value::Buffer(b) => Some(*b as usize),
                _ => None,
            }
        }
    }
}

/// A GEMM step's sizes for one request, and the elements each operand must hold
/// (column-major, as cuBLAS reads them).
#[derive(Debug, Clone, Copy)]
pub struct GemmExtents {
    /// Rows of op(A) and of C.
    pub m: usize,
    /// Columns of op(B) and of C (rows of the request, for the plans ngpt makes).
    pub n: usize,
    /// The shared dimension: columns of op(A), rows of op(B).
    pub k: usize,
    /// Leading dimension of A, in elements.
    pub lda: usize,
    /// Leading dimension of B, in elements.
    pub ldb: usize,
    /// Leading dimension of C, in elements.
    pub ldc: usize,
    /// Elements A must hold from its offset on.
    pub need_a: usize,
    /// Elements B must hold from its offset on.
    pub need_b: usize,
    /// Elements C must hold from its offset on.
    pub need_c: usize,
}

/// Evaluates `g` for `rows` rows of `batch` sequences and checks its leading dimensions;
/// the error is the problem, for the caller to attach to the step.
pub fn gemm_extents(
    g: &pb::Gemm,
    rows: usize,
    batch: usize,
) -> std::result::Result<GemmExtents, String> {
    let dim = |a: Option<&pb::Affine>, what: &str| {
        eval(a, rows, batch).ok_or_else(|| format!("GEMM {what} overflows"))
    };
    let (m, n, k) = (
        dim(g.m.as_ref(), "m")?,
        dim(g.n.as_ref(), "n")?,
        dim(g.k.as_ref(), "k")?,
    );
    let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
    let need = |r: usize, c: usize, ld: usize, what: &str| -> std::result::Result<usize, String> {
        if ld < r.max(1) {
            return Err(format!("GEMM {what}: leading dimension {ld} < {r}"));
        }
        if c == 0 {
            return Ok(0);
        }
        (c - 1)
            .checked_mul(ld)
            .and_then(|x| x.checked_add(r))
            .ok_or_else(|| "GEMM size overflows".to_string())
    };
    let (ar, ac) = if g.trans_a { (k, m) } else { (m, k) };
    let (br, bc) = if g.trans_b { (n, k) } else { (k, n) };
    Ok(GemmExtents {
        m,
        n,
        k,
        lda,
        ldb,
        ldc,
        need_a: need(ar, ac, lda, "a")?,
        need_b: need(br, bc, ldb, "b")?,
        need_c: need(m, n, ldc, "c")?,
    })
}

/// Evaluates an affine size; `None` on overflow or absence.
pub fn eval(a: Option<&pb::Affine>, rows: usize, batch: usize) -> Option<usize> {
    let a = a?;
    let v = (a.c_rows as u128) * rows as u128 + (a.c_batch as u128) * batch as u128 + a.c0 as u128;
    usize::try_from(v).ok().filter(|&v| v <= (1usize << 40))
}

fn validate_step(
    plan: &Plan,
    dims: &Dims,
    module_dims: &ModuleDims,
    s: &pb::Step,
) -> std::result::Result<(), String> {
    let n_buf = plan.buffers.len() as u32;
    let n_w = plan.weights.len() as u32;
    match s.kind.as_ref().ok_or("empty step")? {
        step::Kind::Launch(l) => {
            let module = plan
                .modules
                .get(l.module as usize)
                .ok_or(format!("module {} does not exist", l.module))?;
            if !module.entries.iter().any(|e| e == &l.entry) {
                return Err(format!(
                    "entry `{}` is not in module `{}`",
                    contract::printable(&l.entry),
                    contract::printable(&module.name)
                ));
            }
            let e = contract::entry(&l.entry).ok_or(format!(
                "unknown kernel entry `{}`",
                contract::printable(&l.entry)
            ))?;
            if e.args.len() != l.args.len() {
                return Err(format!(
                    "`{}` takes {} arguments, the step passes {}",
                    l.entry,
                    e.args.len(),
                    l.args.len()
                ));
            }
            // The block is fixed per plan: checked here, so both executors refuse a launch
            // shape the CUDA kernel cannot take.
            let block = l
                .block
                .as_ref()
                .and_then(|b| {
                    let fixed = |a: Option<&pb::Affine>| match a {
                        None => Some(1),
                        Some(a) if a.c_rows == 0 && a.c_batch == 0 => u32::try_from(a.c0).ok(),
                        Some(_) => None,
                    };
                    b.x.as_ref()?;
                    Some((
                        fixed(b.x.as_ref())?,
                        fixed(b.y.as_ref())?,
                        fixed(b.z.as_ref())?,
                    ))
                })
                .ok_or("the block is missing or depends on the request")?;
            e.check_block(dims, module_dims.kv_tile, block, l.shared_bytes)?;
            if l.grid.as_ref().and_then(|g| g.x.as_ref()).is_none() {
                return Err("the grid is missing".into());
            }
            for (i, (spec, a)) in e.args.iter().zip(&l.args).enumerate() {
                let slot = &spec.slot;
                let missing = |what: &str, index: u32, have: u32| {
                    format!(
                        "argument {i} of `{}`: {what} {index} does not exist (the plan has {have})",
                        l.entry
                    )
                };
                match (slot, a.value.as_ref()) {
                    (Slot::In | Slot::Out, Some(arg::Value::Buffer(b))) if *b >= n_buf => {
                        return Err(missing("buffer", *b, n_buf))
                    }
                    (Slot::Weight, Some(arg::Value::Weight(w))) if *w >= n_w => {
                        return Err(missing("weight", *w, n_w))
                    }
                    (Slot::Weight, Some(arg::Value::Weight(w)))
                        if !float_weight(&plan.weights[*w as usize]) =>
                    {
                        return Err(format!(
                            "argument {i} of `{}`: weight `{}` is {}; kernels take F32 or BF16 weights",
                            l.entry,
                            contract::printable(&plan.weights[*w as usize].name),
                            dtype_name(plan.weights[*w as usize].dtype)
                        ))
                    }
                    (Slot::In | Slot::Out, Some(arg::Value::Buffer(_)))
                    | (Slot::Weight, Some(arg::Value::Weight(_))) => {}
                    (Slot::Symbol, Some(arg::Value::Symbol(v)))
                        if pb::Symbol::try_from(*v)
                            .is_ok_and(|s| s == pb::Symbol::Rows || s == pb::Symbol::Batch) => {}
                    (_, value) => {
                        let want = match slot {
                            Slot::In => "a buffer it reads",
                            Slot::Out => "a buffer it writes",
                            Slot::Weight => "a weight",
                            Slot::Symbol => "a request size (ROWS or BATCH)",
                        };
                        return Err(format!(
                            "argument {i} of `{}` should be {want}, found {}",
                            l.entry,
                            describe(value)
                        ));
                    }
                }
            }
            Ok(())
        }
        step::Kind::Gemm(g) => {
            let check = |o: Option<&pb::Operand>, what: &str, weight_ok: bool| match o
                .and_then(|o| o.source.as_ref())
            {
                Some(operand::Source::Buffer(b)) if *b < n_buf => Ok(()),
                Some(operand::Source::Weight(w)) if weight_ok && *w < n_w => Ok(()),
                Some(operand::Source::Buffer(b)) => Err(format!(
                    "GEMM operand {what}: buffer {b} does not exist (the plan has {n_buf})"
                )),
                Some(operand::Source::Weight(w)) if weight_ok => Err(format!(
                    "GEMM operand {what}: weight {w} does not exist (the plan has {n_w})"
                )),
                found => Err(format!(
                    "GEMM operand {what} should be {}, found {}",
                    if weight_ok {
                        "a buffer or a weight"
                    } else {
                        "a buffer"
                    },
                    match found {
                        Some(operand::Source::Weight(w)) => format!("weight {w}"),
                        _ => "nothing".to_string(),
                    }
                )),
            };
            check(g.a.as_ref(), "a", true)?;
            check(g.b.as_ref(), "b", true)?;
            check(g.c.as_ref(), "c", false)?;
            if g.m.is_none() || g.n.is_none() || g.k.is_none() {
                return Err("GEMM without m, n or k".into());
            }
            check_quant_gemm(plan, g)
        }
    }
}

/// Whether a weight holds floats a kernel or any GEMM operand can read (F32 or BF16).
fn float_weight(w: &pb::Weight) -> bool {
    w.dtype == pb::DType::F32 as i32 || w.dtype == pb::DType::Bf16 as i32
}

fn dtype_name(d: i32) -> &'static str {
    pb::DType::try_from(d).map_or("an unknown dtype", |d| d.as_str_name())
}

/// A quantized weight is read only as `a` of a GEMM in the weight form (`op(A) = A^T`,
/// `op(B) = B`: the rows of W contiguous), over whole rows: k and lda its K, m at most
/// its N. F16 scales are read only through their weight.
fn check_quant_gemm(plan: &Plan, g: &pb::Gemm) -> std::result::Result<(), String> {
    let weight = |o: Option<&pb::Operand>| match o.and_then(|o| o.source) {
        Some(operand::Source::Weight(w)) => plan.weights.get(w as usize),
        _ => None,
    };
    for (what, o) in [("b", g.b.as_ref()), ("c", g.c.as_ref())] {
        if let Some(w) = weight(o).filter(|w| !float_weight(w)) {
            return Err(format!(
                "GEMM operand {what}: weight `{}` is {}; only operand a in the weight form reads a quantized weight",
                contract::printable(&w.name),
                dtype_name(w.dtype)
            ));
        }
    }
    let Some(w) = weight(g.a.as_ref()).filter(|w| !float_weight(w)) else {
        return Ok(());
    };
    let name = contract::printable(&w.name);
    if w.quant.is_none() {
        return Err(format!(
            "GEMM operand a: weight `{name}` is {}, which no GEMM reads",
            dtype_name(w.dtype)
        ));
    }
    if !g.trans_a || g.trans_b {
        return Err(format!(
            "GEMM operand a: weight `{name}` is {} (quantized), read only in the weight form (trans_a and not trans_b); this GEMM has trans_a {} trans_b {}",
            dtype_name(w.dtype),
            g.trans_a,
            g.trans_b
        ));
    }
    let fixed =
        |a: Option<&pb::Affine>| a.filter(|a| a.c_rows == 0 && a.c_batch == 0).map(|a| a.c0);
    let (rows, k) = (w.shape[0], w.shape[1]);
    let (m, gk) = (fixed(g.m.as_ref()), fixed(g.k.as_ref()));
    if gk != Some(k) || g.lda != k || m.is_none_or(|m| m > rows) {
        return Err(format!(
            "GEMM over the quantized weight `{name}` [{rows}, {k}] must read whole rows: k and lda {k} and a fixed m of at most {rows}, found m {m:?}, k {gk:?}, lda {}",
            g.lda
        ));
    }
    Ok(())
}

/// What an argument holds, for messages.
fn describe(v: Option<&arg::Value>) -> String {
    match v {
        None => "nothing".into(),
        Some(arg::Value::Buffer(b)) => format!("buffer {b}"),
        Some(arg::Value::Weight(w)) => format!("weight {w}"),
        Some(arg::Value::IntConst(c)) => format!("the integer {c}"),
        Some(arg::Value::FloatConst(c)) => format!("the float {c}"),
        Some(arg::Value::Symbol(s)) => format!("symbol {s}"),
    }
}
