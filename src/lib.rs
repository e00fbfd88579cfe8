//! ngpt as a library: what the `ngpt` command does, in code. The member crates hold the
//! pieces ([`ngpt_compiler`]: import, IR, passes, ONNX and plan emitters, the reference;
//! [`ngpt_runtime`]: plans, executors, the generation engine); this crate puts them
//! together as the command line does: compiling a checkpoint into a directory
//! ([`compile::compile_dir`]), every engine behind one model opened on a path
//! ([`engines::Model`]), the vocabularies and tokenizers ([`tokens`]), the parity records
//! ([`parity`]) and the OpenAI-compatible server ([`serve`]).
//!
//! Open a checkpoint or a compiled directory, and generate from text:
//!
//! ```no_run
//! use std::sync::mpsc;
//! use ngpt::engines::{plan_engine, Engine, Model};
//! use ngpt::tokens::Vocab;
//! use ngpt_runtime::engine::{EngineOptions, Event, Request, SamplingParams};
//!
//! let input = std::path::Path::new("out/nv-tiny"); // or a ckpt.pt, a model directory
//! // A compiled directory's plan as it is, or a checkpoint compiled and lowered in memory
//! // (no encoding and decoding of the plan in between).
//! let plan = Model::open(input).plan(0)?;
//! let vocab = Vocab::find(input)?.expect("a vocabulary beside the model");
//! let mut generator = plan_engine(Engine::PlanCpu, plan, EngineOptions::new(4))?;
//! let (tx, rx) = mpsc::channel();
//! let params = SamplingParams { max_tokens: 20, temperature: 0.0, ..Default::default() };
//! generator.submit(
//!     Request { prompt: vocab.encode("Permission is ")?, params },
//!     Box::new(move |e| tx.send(e).is_ok()),
//! )?;
//! while generator.step() {}
//! let ids: Vec<u32> = rx
//!     .try_iter()
//!     .filter_map(|e| match e { Event::Token(g) => Some(g.token), _ => None })
//!     .collect();
//! println!("{}", vocab.decode(&ids));
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! Logits from any engine, against the float64 reference:
//!
//! ```no_run
//! use ngpt::engines::{Engine, Model};
//! use ngpt_compiler::reference::Precision;
//! let mut model = Model::open("tests/fixtures/nv-tiny".as_ref());
//! let reference = model.logits(Engine::Reference, &[45, 64, 77], Precision::F64)?;
//! let plan = model.logits(Engine::PlanCpu, &[45, 64, 77], Precision::F32)?;
//! let e = ngpt_compiler::compare::compare(&plan, &reference, model.vocab_size()?);
//! assert!(e.rel_err < 1e-5);
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! The library's functions return `anyhow` errors; what they refuse in a caller's input is
//! typed inside ([`Error`]: a token outside the vocabulary, too many tokens for the position
//! table, a character the vocabulary lacks, ...; the runtime's [`ngpt_runtime::Error`]: KV
//! cache full, sequence too long, ...), matched with `downcast_ref`, and no message names a
//! command-line flag ([`compile::compile_dir`] returns its own typed error).

pub mod checkpoint;
/// The command line's subcommands (each `Args` and `run`), for the `ngpt` binary.
#[doc(hidden)]
pub mod commands;
pub mod compile;
pub mod engines;
pub mod error;
pub mod memory;
pub mod parity;
pub mod serve;
pub mod settings;
pub mod tokens;

pub use error::Error;
