//! One module per subcommand: its clap arguments (`Args`) and its `run`.

pub mod demo;
pub mod init;
pub mod inspect;
pub mod logits;
