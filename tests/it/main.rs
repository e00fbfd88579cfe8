//! The integration tests of the `ngpt` command and its crates, one module per concern,
//! linked as one test binary (a binary per file would link tract and candle eighteen times).

mod common;

mod bad_inputs_corpus;
mod bench_cli;
mod cli;
mod compile_cli;
mod cpu_threads;
mod determinism;
mod engine;
mod fuzz_regressions;
mod import_errors;
mod init;
mod library;
mod nous_family;
mod onnx_cli;
mod parity_tools;
mod perplexity_cli;
mod plan_cli;
mod plan_parity;
mod quant_plans;
mod reference_parity;
mod serve;
mod slots;
mod tract_snapshots;
mod validate_cli;
mod vocab;
