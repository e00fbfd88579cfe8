//! The compiler's error type.
//!
//! Every variant names the file and the tensor or field it is about, so the CLI can print
//! one line that tells the user what to fix.

use std::path::PathBuf;

/// Errors raised while importing a checkpoint or computing with it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file system refused an operation on `path`.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a checkpoint of a form ngpt reads.
    #[error("{}: {reason}", path.display())]
    Format {
        /// The file or directory that was read.
        path: PathBuf,
        /// What about it is wrong, in words.
        reason: String,
    },
    /// An output directory that exists and is not empty (a caller may replace it by
    /// asking to: `artifact::write_dir`'s `force`).
    #[error("{}: already exists and is not empty", path.display())]
    OutputExists {
        /// The directory.
        path: PathBuf,
    },
    /// A config field is missing or holds a value ngpt cannot use.
    #[error("{}: config field `{field}`: {problem}", path.display())]
    Config {
        /// Where the config came from: `ckpt.pt`, `config.json`, or a description of the
        /// options it was built from.
        path: PathBuf,
        /// The `model_args` key, spelled as NVIDIA spells it (`n_head`, `base_scale`).
        field: String,
        /// What is wrong with its value, or that it is missing.
        problem: String,
    },
    /// A tensor is missing, has the wrong shape or dtype, or holds NaN or Inf.
    #[error("{}: tensor `{name}`: {problem}", path.display())]
    Tensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor's state-dict name, prefixes stripped (`transformer.h.0.sqk`).
        name: String,
        /// What is wrong with it: missing, shape, dtype, or non-finite values.
        problem: String,
    },
    /// The checkpoint uses a feature ngpt does not support.
    #[error("{}: {what} is not supported ({why})", path.display())]
    Unsupported {
        /// The checkpoint or config file.
        path: PathBuf,
        /// The feature, as the file states it (`bias = true`).
        what: String,
        /// Why ngpt does not support it, and what it reads instead.
        why: String,
    },
    /// A caller passed an argument outside what the model accepts.
    #[error("{what}: {problem}")]
    Argument {
        /// The argument or operation at fault (`tokens`, `--max-seq-len`, an IR node).
        what: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A tensor operation failed inside candle.
    #[error("tensor math ({context}): {}", candle_message(.source))]
    Candle {
        /// What ngpt was computing (`reference forward`, a tensor name).
        context: String,
        /// The error candle returned.
        #[source]
        source: candle_core::Error,
    },
}

/// A candle error as one line: without the backtrace candle attaches when `RUST_BACKTRACE`
/// is set, and without the `path: "..."` it adds (ngpt's messages start with the path).
pub fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } | E::WithPath { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        other => other
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// Result alias of the compiler crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Adds context to candle errors, turning them into [`Error::Candle`].
pub(crate) trait CandleContext<T> {
    fn ctx(self, context: &str) -> Result<T>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn ctx(self, context: &str) -> Result<T> {
        self.map_err(|source| Error::Candle {
            context: context.to_string(),
            source,
        })
    }
}
