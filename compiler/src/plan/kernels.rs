//! The runtime's kernel module as a plan names it: its entries and the compile-time widths
//! the compiler states for it. A plan never carries kernel code; the runtime compiles its
//! own `ngpt.cu` and checks these widths against the plan's config first
//! (`ngpt_runtime::contract`).

use ngpt_schemas::plan::{self as pb, Define, KernelModule};

use crate::config::{Config, Family};

/// Keys per shared-memory tile of `attention_prefill`.
pub const KV_TILE: usize = 32;

/// The kernel entries NVIDIA's family's plans launch.
pub const NVIDIA_ENTRIES: [&str; 7] = [
    "embed",
    "norm_rows",
    "lerp_norm",
    "swiglu",
    "pos_norm",
    "attention_prefill",
    "attention_decode",
];

/// The kernel entries the Hugging Face (NousResearch) family's plans launch: learned
/// positions (`embed_pos`), the GEMM biases added by the kernel after each GEMM
/// (`lerp_norm_bias`, `swiglu_bias`, `rotary_norm`), the rotary embedding before the per-head
/// norm (`rotary_norm`).
pub const NOUS_ENTRIES: [&str; 7] = [
    "embed_pos",
    "norm_rows",
    "lerp_norm_bias",
    "swiglu_bias",
    "rotary_norm",
    "attention_prefill",
    "attention_decode",
];

/// Every kernel entry of the `ngpt` module, as plans name them.
pub const ENTRIES: [&str; 11] = [
    "embed",
    "norm_rows",
    "lerp_norm",
    "swiglu",
    "pos_norm",
    "attention_prefill",
    "attention_decode",
    "embed_pos",
    "lerp_norm_bias",
    "swiglu_bias",
    "rotary_norm",
];

/// The module a plan for `cfg` with a KV capacity of `max_seq_len` launches from: the
/// entries its family's plans launch, and the compile-time widths (a Hugging Face family
/// plan also states `NGPT_I`, its MLP's hidden width).
pub fn kernel_module(cfg: &Config, max_seq_len: usize) -> KernelModule {
    let mut defines = vec![
        ("NGPT_C", cfg.n_embd),
        ("NGPT_H", cfg.n_head),
        ("NGPT_D", cfg.head_dim()),
        ("NGPT_V", cfg.vocab_size),
        ("NGPT_MAX_SEQ", max_seq_len),
        ("NGPT_KV_TILE", KV_TILE),
    ];
    let entries: &[&str] = match cfg.family {
        Family::Nvidia => &NVIDIA_ENTRIES,
        Family::Nous => {
            defines.push(("NGPT_I", cfg.n_inner));
            &NOUS_ENTRIES
        }
    };
    KernelModule {
        name: "ngpt".into(),
        source: String::new(),
        entries: entries.iter().map(|e| e.to_string()).collect(),
        abi: pb::KERNEL_ABI,
        defines: defines
            .iter()
            .map(|&(name, value)| Define {
                name: name.into(),
                value: value as i64,
            })
            .collect(),
    }
}
