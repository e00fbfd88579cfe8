//! ngpt's compiler: checkpoint import, the literal reference, and (in later stages) the
//! graph IR, its passes and the ONNX and launch-plan emitters.
//!
//! The entry point is [`import::load`]; [`reference::logits`] is the oracle every other
//! path is checked against.

#![warn(missing_docs)]

pub mod artifact;
pub mod compare;
pub mod compile;
pub mod config;
pub mod error;
pub mod graph;
pub mod import;
pub mod init;
pub mod inspect;
pub mod numerics;
pub mod onnx;
pub mod passes;
mod pickle_guard;
pub mod plan;
pub mod quant;
pub mod reference;

pub use error::{Error, Result};
