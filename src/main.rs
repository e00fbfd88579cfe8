//! The `ngpt` command line: compile nGPT checkpoints, run them, check their parity.

mod commands;
mod tokens;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ngpt",
    version,
    about = "Compiler and runtime for nGPT (normalized transformer) checkpoints"
)]
#[command(
    after_help = "Start with `ngpt demo`: it runs every stage on a built-in model trained by NVIDIA's code."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Demo(commands::demo::Args),
    Init(commands::init::Args),
    Inspect(commands::inspect::Args),
    Logits(commands::logits::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => commands::demo::run(a),
        Command::Init(a) => commands::init::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Logits(a) => commands::logits::run(a),
    };
    if let Err(e) = result {
        // One line: the outermost context, then each cause.
        let msg = e
            .chain()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(": ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}
