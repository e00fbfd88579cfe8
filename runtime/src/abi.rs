//! The kernel ABI: each entry's arguments, in order. Plans are checked against it at load,
//! and the CPU twins and CUDA kernels both follow it.

/// One argument slot of a kernel entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// A buffer the kernel reads.
    In,
    /// A buffer the kernel writes (and may read).
    Out,
    /// A weight.
    Weight,
    /// A request size (rows, batch or tokens).
    Symbol,
}

use Slot::*;

/// The argument slots of `entry`, or `None` for an unknown entry.
pub fn signature(entry: &str) -> Option<&'static [Slot]> {
    Some(match entry {
        "embed" => &[In, Weight, Out, Symbol],
        "norm_rows" => &[In, Out, Symbol],
        "lerp_norm" => &[Out, In, Weight, Symbol],
        "swiglu" => &[In, Out, Symbol],
        "pos_norm" => &[
            In, In, Weight, Weight, Weight, Out, Out, Out, Symbol, Symbol,
        ],
        "attention_prefill" | "attention_decode" => &[In, In, In, In, Out, Symbol, Symbol],
        "sample_topk" => &[In, In, Out, Symbol],
        _ => return None,
    })
}
