//! One module per subcommand: its clap arguments (`Args`) and its `run`.

pub mod bench;
pub mod bisect;
pub mod check;
pub mod compile;
pub mod demo;
pub mod generate;
pub mod init;
pub mod input;
pub mod inspect;
pub mod logits;
pub mod perplexity;
pub mod plan;
pub mod serve;
pub mod snapshot;
pub mod validate;
