//! The runtime's error type: every variant names what was wrong and what was expected.

/// Errors from loading or running a plan.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The plan file is not a plan, or is one ngpt cannot run.
    #[error("{path}: {problem}")]
    Plan { path: String, problem: String },
    /// A request the plan cannot serve (token ids, lengths, batch).
    #[error("{what}: {problem}")]
    Request { what: String, problem: String },
    /// A step would read or write outside a buffer (a tampered plan).
    #[error("step `{step}`: {problem}")]
    Step { step: String, problem: String },
}

/// Result alias of the runtime crate.
pub type Result<T> = std::result::Result<T, Error>;
