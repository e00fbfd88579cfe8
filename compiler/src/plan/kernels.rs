//! The runtime's kernel module as a plan names it: its entries and the compile-time widths
//! the compiler states for it. A plan never carries kernel code; the runtime compiles its
//! own `ngpt.cu` and checks these widths against the plan's config first
//! (`ngpt_runtime::contract`).

use ngpt_schemas::plan::{self as pb, Define, KernelModule};

use crate::config::Config;

/// Keys per shared-memory tile of `attention_prefill`.
pub const KV_TILE: usize = 32;

/// The kernel entries of the `ngpt` module, as plans name them.
pub const ENTRIES: [&str; 7] = [
    "embed",
    "norm_rows",
    "lerp_norm",
    "swiglu",
    "pos_norm",
    "attention_prefill",
    "attention_decode",
];

/// The module a plan for `cfg` with a KV capacity of `max_seq_len` launches from.
pub fn kernel_module(cfg: &Config, max_seq_len: usize) -> KernelModule {
    let defines = [
        ("NGPT_C", cfg.n_embd),
        ("NGPT_H", cfg.n_head),
        ("NGPT_D", cfg.head_dim()),
        ("NGPT_V", cfg.vocab_size),
        ("NGPT_MAX_SEQ", max_seq_len),
        ("NGPT_KV_TILE", KV_TILE),
    ];
    KernelModule {
        name: "ngpt".into(),
        source: String::new(),
        entries: ENTRIES.iter().map(|e| e.to_string()).collect(),
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
