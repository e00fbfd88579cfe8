//! The runtime's error type: every variant names what was wrong and what was expected.

/// Errors from loading or running a plan.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file of the plan directory could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file, as the caller's path named it (e.g. `out/nv-tiny/model.plan`).
        path: String,
        /// What the OS reported.
        #[source]
        source: std::io::Error,
    },
    /// The plan file is not a plan, or is one ngpt cannot run.
    #[error("{path}: {problem}")]
    Plan {
        /// What was being read: a file, `model.plan`, or a kernel module
        /// (``kernel module `name` ``).
        path: String,
        /// What is wrong with it and what was expected, in one line.
        problem: String,
    },
    /// A request the plan cannot serve (token ids, lengths, batch).
    #[error("{what}: {problem}")]
    Request {
        /// The part of the request at fault (e.g. `tokens`, `prompts`, `--batch`,
        /// `sequence 0`).
        what: String,
        /// Why it cannot be served and what would be, in one line.
        problem: String,
    },
    /// A step would read or write outside a buffer (a tampered plan).
    #[error("step `{step}`: {problem}")]
    Step {
        /// The name of the plan step that failed.
        step: String,
        /// What it would have touched (e.g. the element range and the buffer's length).
        problem: String,
    },
}

/// Result alias of the runtime crate.
pub type Result<T> = std::result::Result<T, Error>;
