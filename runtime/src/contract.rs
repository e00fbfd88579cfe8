//! The kernel contract: one declarative table of every kernel entry a plan may launch,
//! read by plan validation (at load), the CPU executor and the CUDA executor (per call).
//!
//! A plan names kernels; it never carries their code. The runtime compiles only its own
//! sources (`cuda/ngpt.cu`, `cuda/helpers.cu`, built into the binary), specialized by the
//! compile-time widths a plan's module states, which [`check_module`] holds against the
//! plan's config before anything is compiled. For each entry the table says its argument
//! slots in order, the dtype and the elements each buffer or weight argument must hold, the
//! arguments that must be distinct buffers, and the launch shapes the CUDA kernel takes.
//! Adding a kernel is one [`Entry`] here, its CUDA kernel, its CPU twin and its lowering.
//!
//! ```
//! use ngpt_runtime::contract::{entry, Slot};
//! let e = entry("lerp_norm").expect("lerp_norm is in the contract");
//! assert_eq!(e.args.iter().map(|a| a.slot).collect::<Vec<_>>(),
//!            [Slot::Out, Slot::In, Slot::Weight, Slot::Symbol]);
//! assert!(entry("sample_topk").is_none()); // sampling stays on the host
//! ```

use ngpt_schemas::plan as pb;

/// The runtime's kernel module that plans launch from.
pub const MODULE: &str = "ngpt";

/// The version of the kernel ABI (the entries, their argument slots and contracts). A plan
/// states the ABI it was lowered for; a runtime refuses any other. 1 was format 1's source
/// carrying plans; 2 dropped `sample_topk`; 3: every row carries its KV-cache slot (the
/// int32 `slots` input), which `pos_norm` and attention take instead of tokens per sequence.
pub const KERNEL_ABI: u32 = pb::KERNEL_ABI;

/// Model dimensions, from the plan's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block.
    pub n_head: usize,
    /// Width of the hidden state (n_head x head_dim).
    pub n_embd: usize,
    /// Width of one head (even).
    pub head_dim: usize,
    /// Logits per position (the checkpoint's vocab_size, padding included).
    pub vocab: usize,
    /// KV-cache capacity per sequence and rows of the position table: no sequence can
    /// grow past it.
    pub max_seq_len: usize,
    /// Width I of the MLP's hidden layer (4 x n_embd for NVIDIA's family; the Hugging Face
    /// family's `n_inner`).
    pub n_inner: usize,
}

/// One argument slot of a kernel entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// A buffer the kernel reads.
    In,
    /// A buffer the kernel writes (and may read).
    Out,
    /// A weight (read as f32).
    Weight,
    /// A request size (rows or batch).
    Symbol,
}

/// The element type a buffer argument must have (weights are always read as f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// 32-bit floats.
    F32,
    /// 32-bit integers (token ids, positions, slots).
    I32,
}

/// A width in the model's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// One element.
    One,
    /// A multiple of n_embd.
    Embd(usize),
    /// vocab x n_embd (the embedding table).
    VocabEmbd,
    /// max_seq_len x head_dim (the position table).
    PosTable,
    /// n_head x max_seq_len x head_dim (one slot's KV cache of one layer).
    Cache,
    /// A multiple of n_inner (the MLP's hidden width).
    Inner(usize),
    /// max_seq_len x n_embd (the learned position rows a plan reads).
    PosEmbd,
}

impl Width {
    /// The width in elements for `d`.
    pub fn elements(self, d: &Dims) -> usize {
        match self {
            Width::One => 1,
            Width::Embd(k) => k * d.n_embd,
            Width::VocabEmbd => d.vocab * d.n_embd,
            Width::PosTable => d.max_seq_len * d.head_dim,
            Width::Cache => d.n_head * d.max_seq_len * d.head_dim,
            Width::Inner(k) => k * d.n_inner,
            Width::PosEmbd => d.max_seq_len * d.n_embd,
        }
    }
}

/// How many elements an argument must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Len {
    /// The width for every row of the request.
    PerRow(Width),
    /// The width for every KV slot the executor holds.
    PerSlot(Width),
    /// The width, whatever the request.
    Whole(Width),
    /// Nothing (a symbol).
    None,
}

/// One argument of an entry.
#[derive(Debug, Clone, Copy)]
pub struct ArgSpec {
    /// What the argument names, for messages (`qkv`, `k_cache`, `rows`).
    pub name: &'static str,
    /// Its slot.
    pub slot: Slot,
    /// The dtype of a buffer argument.
    pub dtype: Dtype,
    /// The elements it must hold.
    pub len: Len,
}

/// The launch shapes a CUDA kernel takes (the CPU twins take any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockRule {
    /// Any block of 1..=1024 threads.
    Any,
    /// A multiple of 32 threads, at least this many (0: half the head dim).
    Warps(u32),
    /// Exactly this many threads.
    Exactly(u32),
    /// At least this many threads, and dynamic shared memory for two tiles of
    /// `NGPT_KV_TILE` keys of one head.
    KvTiles(u32),
}

/// One kernel entry: what a plan passes it and what it needs.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// The entry's name in the module.
    pub name: &'static str,
    /// Its arguments, in order.
    pub args: &'static [ArgSpec],
    /// Groups of arguments that must be distinct buffers.
    pub distinct: &'static [&'static [usize]],
    /// The argument holding the request's rows.
    pub rows: usize,
    /// Its block shape on CUDA.
    pub block: BlockRule,
    /// Whether the grid's y dimension runs over heads (at most n_head).
    pub heads_on_grid_y: bool,
}

const fn arg(name: &'static str, slot: Slot, dtype: Dtype, len: Len) -> ArgSpec {
    ArgSpec {
        name,
        slot,
        dtype,
        len,
    }
}

const ROWS: ArgSpec = arg("rows", Slot::Symbol, Dtype::I32, Len::None);

const fn rows_f32(name: &'static str, slot: Slot, embd: usize) -> ArgSpec {
    arg(name, slot, Dtype::F32, Len::PerRow(Width::Embd(embd)))
}

const fn rows_i32(name: &'static str) -> ArgSpec {
    arg(name, Slot::In, Dtype::I32, Len::PerRow(Width::One))
}

const fn inner_f32(name: &'static str, slot: Slot, k: usize) -> ArgSpec {
    arg(name, slot, Dtype::F32, Len::PerRow(Width::Inner(k)))
}

const fn cache(name: &'static str, slot: Slot) -> ArgSpec {
    arg(name, slot, Dtype::F32, Len::PerSlot(Width::Cache))
}

const fn weight(name: &'static str, w: Width) -> ArgSpec {
    arg(name, Slot::Weight, Dtype::F32, Len::Whole(w))
}

/// Threads per block of `attention_decode` (`NGPT_DEC_TILE` in ngpt.cu).
pub const DEC_TILE: u32 = 128;

const ATTENTION_ARGS: &[ArgSpec] = &[
    rows_f32("q", Slot::In, 1),
    cache("k_cache", Slot::In),
    cache("v_cache", Slot::In),
    rows_i32("positions"),
    rows_f32("out", Slot::Out, 1),
    ROWS,
    rows_i32("slots"),
];

/// Every entry of the `ngpt` module.
pub const ENTRIES: &[Entry] = &[
    Entry {
        name: "embed",
        args: &[
            rows_i32("tokens"),
            weight("table", Width::VocabEmbd),
            rows_f32("out", Slot::Out, 1),
            ROWS,
        ],
        distinct: &[&[0, 2]],
        rows: 3,
        block: BlockRule::Any,
        heads_on_grid_y: false,
    },
    Entry {
        name: "norm_rows",
        args: &[
            rows_f32("x", Slot::In, 1),
            rows_f32("out", Slot::Out, 1),
            ROWS,
        ],
        distinct: &[&[0, 1]],
        rows: 2,
        block: BlockRule::Warps(32),
        heads_on_grid_y: false,
    },
    Entry {
        name: "lerp_norm",
        args: &[
            rows_f32("h", Slot::Out, 1),
            rows_f32("branch", Slot::In, 1),
            weight("lr", Width::Embd(1)),
            ROWS,
        ],
        distinct: &[&[0, 1]],
        rows: 3,
        block: BlockRule::Warps(32),
        heads_on_grid_y: false,
    },
    Entry {
        name: "swiglu",
        args: &[
            rows_f32("uv", Slot::In, 8),
            rows_f32("out", Slot::Out, 4),
            ROWS,
        ],
        distinct: &[&[0, 1]],
        rows: 2,
        block: BlockRule::Any,
        heads_on_grid_y: false,
    },
    Entry {
        name: "pos_norm",
        args: &[
            rows_f32("qkv", Slot::In, 3),
            rows_i32("positions"),
            weight("pos_table", Width::PosTable),
            weight("sqk_q", Width::Embd(1)),
            weight("sqk_k", Width::Embd(1)),
            rows_f32("q", Slot::Out, 1),
            cache("k_cache", Slot::Out),
            cache("v_cache", Slot::Out),
            ROWS,
            rows_i32("slots"),
        ],
        distinct: &[&[0, 1, 5, 6, 7], &[5, 9], &[6, 9], &[7, 9]],
        rows: 8,
        block: BlockRule::Warps(0),
        heads_on_grid_y: true,
    },
    // The Hugging Face (NousResearch) family's entries: learned positions, biases folded
    // into the kernel after each GEMM, the interleaved rotary embedding before the per-head
    // norm. NVIDIA's plans do not launch them.
    Entry {
        name: "embed_pos",
        args: &[
            rows_i32("tokens"),
            rows_i32("positions"),
            weight("table", Width::VocabEmbd),
            weight("pos_rows", Width::PosEmbd),
            rows_f32("out", Slot::Out, 1),
            ROWS,
        ],
        distinct: &[&[0, 4], &[1, 4]],
        rows: 5,
        block: BlockRule::Any,
        heads_on_grid_y: false,
    },
    Entry {
        name: "lerp_norm_bias",
        args: &[
            rows_f32("h", Slot::Out, 1),
            rows_f32("branch", Slot::In, 1),
            weight("bias", Width::Embd(1)),
            weight("lr", Width::Embd(1)),
            ROWS,
        ],
        distinct: &[&[0, 1]],
        rows: 4,
        block: BlockRule::Warps(32),
        heads_on_grid_y: false,
    },
    Entry {
        name: "swiglu_bias",
        args: &[
            inner_f32("uv", Slot::In, 2),
            weight("bias", Width::Inner(2)),
            inner_f32("out", Slot::Out, 1),
            ROWS,
        ],
        distinct: &[&[0, 2]],
        rows: 3,
        block: BlockRule::Any,
        heads_on_grid_y: false,
    },
    Entry {
        name: "rotary_norm",
        args: &[
            rows_f32("qkv", Slot::In, 3),
            rows_i32("positions"),
            weight("rotary_table", Width::PosTable),
            weight("bias", Width::Embd(3)),
            weight("q_scale", Width::Embd(1)),
            rows_f32("q", Slot::Out, 1),
            cache("k_cache", Slot::Out),
            cache("v_cache", Slot::Out),
            ROWS,
            rows_i32("slots"),
        ],
        distinct: &[&[0, 1, 5, 6, 7], &[5, 9], &[6, 9], &[7, 9]],
        rows: 8,
        block: BlockRule::Warps(0),
        heads_on_grid_y: true,
    },
    Entry {
        name: "attention_prefill",
        args: ATTENTION_ARGS,
        distinct: &[&[0, 1, 3, 4], &[2, 4], &[4, 6]],
        rows: 5,
        block: BlockRule::KvTiles(128),
        heads_on_grid_y: true,
    },
    Entry {
        name: "attention_decode",
        args: ATTENTION_ARGS,
        distinct: &[&[0, 1, 3, 4], &[2, 4], &[4, 6]],
        rows: 5,
        block: BlockRule::Exactly(DEC_TILE),
        heads_on_grid_y: true,
    },
];

/// The entry named `name`, or `None` for one the runtime does not have.
pub fn entry(name: &str) -> Option<&'static Entry> {
    ENTRIES.iter().find(|e| e.name == name)
}

/// An argument as an executor bound it for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound<'a> {
    /// A buffer: its index, name, whether it holds int32, and its elements now.
    Buffer {
        /// Index in the plan's buffers.
        index: usize,
        /// Its name, for messages.
        name: &'a str,
        /// Whether it holds int32 (else f32).
        int32: bool,
        /// Elements it holds for this call.
        len: usize,
    },
    /// A weight: its index and elements.
    Weight {
        /// Index in the plan's weights.
        index: usize,
        /// Elements it holds.
        len: usize,
    },
    /// A request size or an integer constant.
    Int(i64),
    /// A float constant.
    Float,
}

impl Entry {
    /// The rows of a call from its bound arguments.
    pub fn request(&self, bound: &[Bound<'_>]) -> Result<usize, String> {
        match bound.get(self.rows) {
            Some(Bound::Int(v)) => {
                usize::try_from(*v).map_err(|_| "rows must not be negative".to_string())
            }
            _ => Err(format!(
                "argument {} of `{}` is not a request size",
                self.rows, self.name
            )),
        }
    }

    /// Checks one call's bound arguments against the contract for an executor holding
    /// `slots` KV slots: count, dtypes, the elements each must hold for its rows and slots,
    /// distinct buffers. (The slot of every row is below `slots`: the executors check the
    /// rows before anything runs.) The error is the problem, for the caller to attach to
    /// the step.
    pub fn check_args(&self, d: &Dims, bound: &[Bound<'_>], slots: usize) -> Result<(), String> {
        if bound.len() != self.args.len() {
            return Err(format!(
                "`{}` takes {} arguments, the step passes {}",
                self.name,
                self.args.len(),
                bound.len()
            ));
        }
        let rows = self.request(bound)?;
        for (i, (spec, b)) in self.args.iter().zip(bound).enumerate() {
            let need = match spec.len {
                Len::PerRow(w) => rows.checked_mul(w.elements(d)),
                Len::PerSlot(w) => slots.checked_mul(w.elements(d)),
                Len::Whole(w) => Some(w.elements(d)),
                Len::None => Some(0),
            }
            .ok_or_else(|| format!("argument {i} `{}`: size overflows", spec.name))?;
            match (spec.slot, b) {
                (
                    Slot::In | Slot::Out,
                    Bound::Buffer {
                        name, int32, len, ..
                    },
                ) => {
                    if *int32 != (spec.dtype == Dtype::I32) {
                        return Err(format!(
                            "argument {i} `{}`: buffer `{name}` should be {}",
                            spec.name,
                            if spec.dtype == Dtype::I32 {
                                "int32"
                            } else {
                                "f32"
                            }
                        ));
                    }
                    if *len < need {
                        return Err(format!(
                            "argument {i} `{}` needs elements 0..{need} of buffer `{name}`, which holds {len}",
                            spec.name
                        ));
                    }
                }
                (Slot::Weight, Bound::Weight { index, len }) => {
                    if *len < need {
                        return Err(format!(
                            "argument {i} `{}` needs elements 0..{need} of weight {index}, which holds {len}",
                            spec.name
                        ));
                    }
                }
                (Slot::Symbol, Bound::Int(_)) => {}
                _ => {
                    return Err(format!(
                        "argument {i} `{}` of `{}` does not fit its slot",
                        spec.name, self.name
                    ))
                }
            }
        }
        for group in self.distinct {
            let ids: Vec<Option<usize>> = group
                .iter()
                .map(|&i| match bound.get(i) {
                    Some(Bound::Buffer { index, .. }) => Some(*index),
                    _ => None,
                })
                .collect();
            for (a, x) in ids.iter().enumerate() {
                if x.is_some() && ids[a + 1..].contains(x) {
                    return Err(
                        "a buffer is passed twice where the kernel needs distinct buffers".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// Checks a launch's block and dynamic shared memory against what the CUDA kernel
    /// takes, for a module whose tiles hold `kv_tile` keys.
    pub fn check_block(
        &self,
        d: &Dims,
        kv_tile: usize,
        block: (u32, u32, u32),
        shared_bytes: u32,
    ) -> Result<(), String> {
        if block.1 != 1 || block.2 != 1 || block.0 == 0 || block.0 > 1024 {
            return Err(format!(
                "block {block:?}: the kernels take 1..=1024 threads in x only"
            ));
        }
        let threads = block.0;
        match self.block {
            BlockRule::Any => Ok(()),
            BlockRule::Warps(min) => {
                let min = if min == 0 {
                    (d.head_dim / 2) as u32
                } else {
                    min
                };
                if !threads.is_multiple_of(32) || threads < min {
                    return Err(format!(
                        "block of {threads} threads: `{}` needs a multiple of 32, at least {min}",
                        self.name
                    ));
                }
                Ok(())
            }
            BlockRule::Exactly(n) if threads != n => Err(format!(
                "`{}` runs {n} threads a block, not {threads}",
                self.name
            )),
            BlockRule::Exactly(_) => Ok(()),
            BlockRule::KvTiles(min) => {
                if threads < min {
                    return Err(format!(
                        "`{}` needs at least {min} threads a block, not {threads}",
                        self.name
                    ));
                }
                let tile = 2 * kv_tile * d.head_dim * 4;
                if (shared_bytes as usize) < tile {
                    return Err(format!(
                        "`{}` needs {tile} bytes of shared memory for its tiles, the step gives {shared_bytes}",
                        self.name
                    ));
                }
                Ok(())
            }
        }
    }

    /// Checks a launch's grid: every dimension positive and within CUDA's limits, heads
    /// on y at most n_head where the entry runs over heads.
    pub fn check_grid(&self, d: &Dims, grid: (u32, u32, u32)) -> Result<(), String> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 || grid.1 > 65535 || grid.2 > 65535 {
            return Err(format!("grid {grid:?} is outside the device's limits"));
        }
        if self.heads_on_grid_y && grid.1 as usize > d.n_head {
            return Err(format!("grid.y {} exceeds n_head {}", grid.1, d.n_head));
        }
        Ok(())
    }
}

/// The compile-time widths of the `ngpt` module, by the names its source reads.
pub const DEFINES: [&str; 6] = [
    "NGPT_C",
    "NGPT_H",
    "NGPT_D",
    "NGPT_V",
    "NGPT_MAX_SEQ",
    "NGPT_KV_TILE",
];

/// A compile-time width a module may state: `NGPT_I`, the MLP's hidden width (the Hugging
/// Face family's plans state it; a module without it has NVIDIA's 4 x n_embd).
pub const OPTIONAL_DEFINES: [&str; 1] = ["NGPT_I"];

/// What a checked module specializes beyond the plan's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleDims {
    /// Keys per shared-memory tile of `attention_prefill` (a power of two up to 128).
    pub kv_tile: usize,
}

/// Checks a plan's kernel module before anything is compiled: it is the runtime's `ngpt`
/// module at this [`KERNEL_ABI`], it carries no source, its entries are in the contract,
/// and its compile-time widths are exactly [`DEFINES`], each equal to the plan's config
/// (the kernels index with them).
pub fn check_module(m: &pb::KernelModule, d: &Dims) -> Result<ModuleDims, String> {
    if m.name != MODULE {
        return Err(format!(
            "kernel module `{}` is not one this runtime has (it compiles only its own `{MODULE}` module)",
            printable(&m.name)
        ));
    }
    if !m.source.is_empty() {
        return Err(format!(
            "kernel module `{MODULE}` carries {} bytes of kernel source; a plan names kernels and never carries code (the runtime compiles only its own)",
            m.source.len()
        ));
    }
    if m.abi != KERNEL_ABI {
        return Err(format!(
            "kernel module `{MODULE}` was lowered for kernel ABI {}, this runtime has ABI {KERNEL_ABI} (recompile the checkpoint with this ngpt)",
            m.abi
        ));
    }
    for e in &m.entries {
        if entry(e).is_none() {
            return Err(format!(
                "kernel module `{MODULE}` lists entry `{}`, which the runtime does not have",
                printable(e)
            ));
        }
    }
    let mut kv_tile = None;
    for (i, def) in m.defines.iter().enumerate() {
        if !DEFINES.contains(&def.name.as_str()) && !OPTIONAL_DEFINES.contains(&def.name.as_str()) {
            return Err(format!(
                "kernel module `{MODULE}`: unknown compile-time width `{}` (the module takes {}, and optionally {})",
                printable(&def.name),
                DEFINES.join(", "),
                OPTIONAL_DEFINES.join(", ")
            ));
        }
        if m.defines[..i].iter().any(|o| o.name == def.name) {
            return Err(format!(
                "kernel module `{MODULE}`: `{}` is defined twice",
                def.name
            ));
        }
        let want = match def.name.as_str() {
            "NGPT_C" => Some(d.n_embd),
            "NGPT_H" => Some(d.n_head),
            "NGPT_D" => Some(d.head_dim),
            "NGPT_V" => Some(d.vocab),
            "NGPT_MAX_SEQ" => Some(d.max_seq_len),
            "NGPT_I" => Some(d.n_inner),
            _ => None,
        };
        match want {
            Some(w) if def.value != w as i64 => {
                return Err(format!(
                    "kernel module `{MODULE}`: {} = {} differs from the plan's config ({w})",
                    def.name, def.value
                ))
            }
            Some(_) => {}
            None => {
                let t = def.value;
                if !(1..=128).contains(&t) || !(t as u64).is_power_of_two() {
                    return Err(format!(
                        "kernel module `{MODULE}`: NGPT_KV_TILE = {t} is not a power of two in 1..=128"
                    ));
                }
                kv_tile = Some(t as usize);
            }
        }
    }
    for name in DEFINES {
        if !m.defines.iter().any(|d| d.name == name) {
            return Err(format!(
                "kernel module `{MODULE}`: compile-time width `{name}` is missing"
            ));
        }
    }
    if d.n_inner != 4 * d.n_embd && !m.defines.iter().any(|def| def.name == "NGPT_I") {
        return Err(format!(
            "kernel module `{MODULE}`: compile-time width `NGPT_I` is missing (the plan's n_inner {} is not 4 x n_embd)",
            d.n_inner
        ));
    }
    Ok(ModuleDims {
        kv_tile: kv_tile.unwrap_or(0),
    })
}

/// The `#define` prelude of the `ngpt` module for a checked plan: made from the validated
/// numbers, never from plan text.
pub fn module_prelude(d: &Dims, md: &ModuleDims) -> String {
    format!(
        "// ngpt runtime kernels, ABI {KERNEL_ABI}, specialized for this plan.\n#define NGPT_C {}\n#define NGPT_H {}\n#define NGPT_D {}\n#define NGPT_V {}\n#define NGPT_MAX_SEQ {}\n#define NGPT_KV_TILE {}\n#define NGPT_I {}\n\n",
        d.n_embd, d.n_head, d.head_dim, d.vocab, d.max_seq_len, md.kv_tile, d.n_inner
    )
}

/// A plan-supplied string for a one-line message: control characters escaped, at most 64
/// characters.
pub(crate) fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_debug).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Dims = Dims {
        n_layer: 1,
        n_head: 2,
        n_embd: 8,
        head_dim: 4,
        vocab: 5,
        max_seq_len: 16,
        n_inner: 32,
    };

    fn module() -> pb::KernelModule {
        pb::KernelModule {
            name: MODULE.into(),
            source: String::new(),
            entries: ENTRIES.iter().map(|e| e.name.to_string()).collect(),
            abi: KERNEL_ABI,
            defines: [
                ("NGPT_C", 8),
                ("NGPT_H", 2),
                ("NGPT_D", 4),
                ("NGPT_V", 5),
                ("NGPT_MAX_SEQ", 16),
                ("NGPT_KV_TILE", 32),
            ]
            .map(|(n, v)| pb::Define {
                name: n.into(),
                value: v,
            })
            .to_vec(),
        }
    }

    #[test]
    fn a_module_is_checked_against_the_config_and_carries_no_code() {
        assert_eq!(check_module(&module(), &D), Ok(ModuleDims { kv_tile: 32 }));
        let refused = |f: &dyn Fn(&mut pb::KernelModule), says: &str| {
            let mut m = module();
            f(&mut m);
            let e = check_module(&m, &D).unwrap_err();
            assert!(e.contains(says), "{e}");
            assert!(!e.contains('\n'), "{e}");
        };
        refused(
            &|m| m.source = "__global__ void x() {}".into(),
            "carries 22 bytes",
        );
        refused(&|m| m.name = "evil\n".into(), "`evil\\n` is not one");
        refused(&|m| m.abi = 1, "kernel ABI 1");
        refused(&|m| m.entries.push("sample_topk".into()), "`sample_topk`");
        refused(&|m| m.defines[2].value = 8, "NGPT_D = 8 differs");
        refused(&|m| m.defines[5].value = 48, "NGPT_KV_TILE = 48");
        refused(&|m| m.defines[5].value = 256, "NGPT_KV_TILE = 256");
        refused(
            &|m| m.defines.pop().map(drop).unwrap_or(()),
            "`NGPT_KV_TILE` is missing",
        );
        refused(
            &|m| {
                m.defines.push(pb::Define {
                    name: "NGPT_C".into(),
                    value: 8,
                })
            },
            "defined twice",
        );
        refused(
            &|m| {
                m.defines[0].name = "NGPT_X); evil(".into();
            },
            "unknown compile-time width",
        );
    }

    #[test]
    fn ngpt_i_is_optional_and_checked_where_stated() {
        let with_i = |v: i64| {
            let mut m = module();
            m.defines.push(pb::Define {
                name: "NGPT_I".into(),
                value: v,
            });
            m
        };
        // NVIDIA's modules state no NGPT_I: n_inner is 4 x n_embd.
        assert!(check_module(&module(), &D).is_ok());
        assert!(check_module(&with_i(32), &D).is_ok());
        let e = check_module(&with_i(33), &D).unwrap_err();
        assert!(e.contains("NGPT_I = 33 differs"), "{e}");
        // A Hugging Face family plan whose n_inner is not 4 x n_embd must state it.
        let odd = Dims { n_inner: 20, ..D };
        assert!(check_module(&with_i(20), &odd).is_ok());
        let e = check_module(&module(), &odd).unwrap_err();
        assert!(e.contains("`NGPT_I` is missing"), "{e}");
        assert!(module_prelude(&odd, &ModuleDims { kv_tile: 32 }).contains("#define NGPT_I 20\n"));
    }

    #[test]
    fn the_prelude_is_made_from_numbers() {
        let p = module_prelude(&D, &ModuleDims { kv_tile: 32 });
        assert!(p.contains("#define NGPT_C 8\n#define NGPT_H 2\n#define NGPT_D 4\n"));
        assert!(p.contains("#define NGPT_KV_TILE 32\n"));
    }

    #[test]
    fn arguments_are_checked_for_dtype_length_and_aliasing() {
        let e = entry("lerp_norm").unwrap();
        let buf = |index, len| Bound::Buffer {
            index,
            name: "b",
            int32: false,
            len,
        };
        let ok = [
            buf(0, 24),
            buf(1, 24),
            Bound::Weight { index: 0, len: 8 },
            Bound::Int(3),
        ];
        assert_eq!(e.check_args(&D, &ok, 1), Ok(()));
        let mut short = ok;
        short[1] = buf(1, 23);
        assert!(e.check_args(&D, &short, 1).unwrap_err().contains("0..24"));
        let mut alias = ok;
        alias[1] = buf(0, 24);
        assert!(e
            .check_args(&D, &alias, 1)
            .unwrap_err()
            .contains("distinct"));
        let mut int = ok;
        int[0] = Bound::Buffer {
            index: 0,
            name: "b",
            int32: true,
            len: 24,
        };
        assert!(e
            .check_args(&D, &int, 1)
            .unwrap_err()
            .contains("should be f32"));
        assert!(e
            .check_args(&D, &ok[..3], 1)
            .unwrap_err()
            .contains("takes 4"));
        // Slots: a KV cache per slot held (5 rows over 3 slots).
        let a = entry("attention_decode").unwrap();
        let cache = 3 * D.n_head * D.max_seq_len * D.head_dim;
        let pos = Bound::Buffer {
            index: 3,
            name: "positions",
            int32: true,
            len: 5,
        };
        let args = |kc| {
            [
                buf(0, 40),
                buf(1, kc),
                buf(2, cache),
                pos,
                buf(4, 40),
                Bound::Int(5),
                Bound::Buffer {
                    index: 5,
                    name: "slots",
                    int32: true,
                    len: 5,
                },
            ]
        };
        assert_eq!(a.check_args(&D, &args(cache), 3), Ok(()));
        assert!(a.check_args(&D, &args(cache - 1), 3).is_err());
        assert!(a.check_args(&D, &args(cache), 4).is_err());
        let mut old = args(cache);
        old[6] = Bound::Int(2); // ABI 2's tokens per sequence
        assert!(a.check_args(&D, &old, 3).unwrap_err().contains("`slots`"));
        assert_eq!(a.check_block(&D, 32, (DEC_TILE, 1, 1), 0), Ok(()));
        assert!(a.check_block(&D, 32, (64, 1, 1), 0).is_err());
        assert!(a.check_grid(&D, (5, 3, 1)).unwrap_err().contains("n_head"));
        let p = entry("attention_prefill").unwrap();
        assert!(p.check_block(&D, 32, (128, 1, 1), 1023).is_err());
        assert_eq!(p.check_block(&D, 32, (128, 1, 1), 1024), Ok(()));
    }
}
