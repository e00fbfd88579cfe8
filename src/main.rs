//! The `ngpt` command line: compile nGPT checkpoints, run them, check their parity.

use ngpt::{commands, settings};

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
    /// Options of the CUDA executor (plan-cuda), KEY=VALUE,... over NGPT_CUDA_OPTIONS
    ///
    /// KEY=VALUE pairs separated by commas, applied over NGPT_CUDA_OPTIONS: check, profile, graph, gemv, persistent, fuse,
    /// prefetch, cooperative (on|off), bf16_gemm (bf16|f32), attention (tiled|simple), blocks_per_sm
    /// (1..=32|max), and the unmeasured experimental.prefill_mma, experimental.pd_stream
    /// (on|off), experimental.pd_barrier (full|acqrel), experimental.pd_attention
    /// (split|wide), experimental.pd_min_blocks (2..=32|none).
    #[arg(long, global = true, value_name = "KEY=VALUE,...")]
    cuda_options: Option<String>,
    /// Read a compiled directory's model.weights into memory instead of mapping it
    ///
    /// The process keeps its own copy, whatever later happens to the file.
    #[arg(long, global = true)]
    read_weights: bool,
}

#[derive(Subcommand)]
enum Command {
    Compile(commands::compile::Args),
    Demo(commands::demo::Args),
    Generate(commands::generate::Args),
    Init(commands::init::Args),
    Inspect(commands::inspect::Args),
    Logits(commands::logits::Args),
    Perplexity(commands::perplexity::Args),
    Plan(commands::plan::Args),
    Serve(commands::serve::Args),
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
    if !matches!(cli.command, Command::Serve(_)) {
        quiet_on_closed_stdout();
    }
    if let Err(e) = settings::init(cli.cuda_options.as_deref(), cli.read_weights) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let result = match cli.command {
        Command::Compile(a) => commands::compile::run(a),
        Command::Demo(a) => commands::demo::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Init(a) => commands::init::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Logits(a) => commands::logits::run(a),
        Command::Perplexity(a) => commands::perplexity::run(a),
        Command::Plan(a) => commands::plan::run(a),
        Command::Serve(a) => commands::serve::run(a),
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
        // when RUST_BACKTRACE is set; the library's typed errors name the flag.
        let mut msg = ngpt::error::cli_chain(&e);
        // The runtime's typed errors name no flag; say which one changes the capacity.
        let capacity = e.chain().any(|c| {
            matches!(
                c.downcast_ref::<ngpt_runtime::Error>(),
                Some(
                    ngpt_runtime::Error::SequenceTooLong { .. }
                        | ngpt_runtime::Error::KvCacheFull { .. }
                )
            )
        });
        if capacity {
            msg.push_str(" (compile with a larger --max-seq-len)");
        }
        eprintln!("error: {}", msg.replace('\n', " "));
        std::process::exit(1);
    }
}

/// Output into a reader that stops early (`ngpt plan show DIR | head`) ends the process
/// quietly, as it ends other Unix tools, instead of a panic from `println!` (Rust starts
/// programs with SIGPIPE ignored, so the write fails and `println!` panics). Not for
/// `serve`: a server must not end because a pipe it writes to closed.
fn quiet_on_closed_stdout() {
    #[cfg(unix)]
    // SAFETY: at start-up, before this process starts a thread; SIG_DFL is a valid action
    // for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
