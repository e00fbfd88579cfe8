//! ngpt's runtime: loads a launch plan (`model.plan` + `model.weights`), validates it whole,
//! and runs its programs. The CPU executor runs everywhere; every kernel entry has a Rust
//! twin with the CUDA kernel's semantics, and GEMM steps mean what cuBLAS computes.
//!
//! Architecture invariant: this crate depends on `ngpt-schemas` only, never on the compiler.
//!
//! ```no_run
//! use ngpt_runtime::{plan::LoadedPlan, session::Session};
//! let plan = std::sync::Arc::new(LoadedPlan::load("out/nv-tiny".as_ref())?);
//! let mut session = Session::new(plan, 1)?;
//! let logits = session.prefill(&[vec![45, 64, 77]])?; // [3, vocab]
//! let next = session.decode(&[12])?;                    // [1, vocab]
//! # Ok::<(), ngpt_runtime::Error>(())
//! ```

#![warn(missing_docs)]

pub mod bench;
pub mod contract;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod error;
pub mod listing;
pub mod mapped;
pub mod options;
pub mod plan;
pub mod rows;
pub mod sample;
pub mod session;

pub use error::{Error, Result};
pub use rows::Rows;
