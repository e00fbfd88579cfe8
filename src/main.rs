//! The `ngpt` command line: compile nGPT checkpoints, run them, check their parity.

mod checkpoint;
mod commands;
mod engines;
mod memory;
mod parity;
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
    Compile(commands::compile::Args),
    Demo(commands::demo::Args),
    Generate(commands::generate::Args),
    Init(commands::init::Args),
    Inspect(commands::inspect::Args),
    Logits(commands::logits::Args),
    Plan(commands::plan::Args),
    Snapshot(commands::snapshot::Args),
    Check(commands::check::Args),
    Bench(commands::bench::Args),
    Bisect(commands::bisect::Args),
    Validate(commands::validate::Args),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help and --version print and exit 0
        Err(e) => {
            // One line, like every other error: clap's first line, without its usage block.
            let text = e.render().to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("error: {first}");
            std::process::exit(2);
        }
    };
    let result = match cli.command {
        Command::Compile(a) => commands::compile::run(a),
        Command::Demo(a) => commands::demo::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Init(a) => commands::init::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Logits(a) => commands::logits::run(a),
        Command::Plan(a) => commands::plan::run(a),
        Command::Snapshot(a) => commands::snapshot::run(a),
        Command::Check(a) => commands::check::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Bisect(a) => commands::bisect::run(a),
        Command::Validate(a) => commands::validate::run(a),
    };
    if let Err(e) = result {
        // One line: the outermost context, then each cause. The compiler's errors already
        // print their source (`path: io error`), so a cause whose text is already in the
        // message is not repeated; candle errors are shown without the backtrace they carry
        // when RUST_BACKTRACE is set.
        let mut msg = String::new();
        for cause in e.chain() {
            let cause = match cause.downcast_ref::<candle_core::Error>() {
                Some(c) => ngpt_compiler::error::candle_message(c),
                None => cause.to_string(),
            };
            if msg.contains(&cause) {
                continue;
            }
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&cause);
        }
        eprintln!("error: {}", msg.replace('\n', " "));
        std::process::exit(1);
    }
}
