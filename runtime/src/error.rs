//! The runtime's error type: every variant names what was wrong and what was expected.

/// Errors from loading or running a plan. A caller tells the request errors apart by
/// variant (a full KV cache, a token outside the vocabulary, a prompt too long) without
/// parsing text; no message names a command-line flag.
///
/// ```
/// use ngpt_runtime::Error;
/// let e = Error::KvCacheFull { sequence: 1, capacity: 8 };
/// assert!(matches!(e, Error::KvCacheFull { capacity: 8, .. }));
/// assert_eq!(e.to_string(), "sequence 1 is full: the KV capacity is 8 tokens");
/// ```
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
    /// A token id the plan's vocabulary does not have.
    #[error("tokens: token id {token} is outside the vocabulary 0..{vocab}")]
    TokenOutsideVocabulary {
        /// The id.
        token: i64,
        /// The vocabulary size (logits per row).
        vocab: usize,
    },
    /// A prompt longer than the plan's KV capacity.
    #[error("prompt: {tokens} tokens exceed the KV capacity {capacity}")]
    SequenceTooLong {
        /// The prompt's tokens.
        tokens: usize,
        /// The plan's KV capacity per sequence.
        capacity: usize,
    },
    /// A request whose prompt and `max_tokens` together exceed the KV capacity.
    #[error(
        "prompt ({prompt} tokens) plus max_tokens {max_tokens} exceeds the KV capacity {capacity}"
    )]
    RequestTooLong {
        /// The prompt's tokens.
        prompt: usize,
        /// The tokens asked for.
        max_tokens: usize,
        /// The plan's KV capacity per sequence.
        capacity: usize,
    },
    /// The engine's queue holds as many waiting requests as it takes.
    #[error("queue: {limit} requests are already waiting; try again later")]
    QueueFull {
        /// Waiting requests the engine takes.
        limit: usize,
    },
    /// The engine is draining or stopped and takes no new requests.
    #[error("engine: shutting down; takes no new requests")]
    ShuttingDown,
    /// A sequence whose KV cache is full: another token has no slot.
    #[error("sequence {sequence} is full: the KV capacity is {capacity} tokens")]
    KvCacheFull {
        /// The sequence's index in its batch.
        sequence: usize,
        /// The plan's KV capacity per sequence.
        capacity: usize,
    },
    /// An executor or session for no sequences.
    #[error("batch: must be at least 1 sequence")]
    EmptyBatch,
    /// A program call with no rows.
    #[error("rows: a call needs at least one row")]
    NoRows,
    /// A call whose tokens, positions and slots differ in length.
    #[error("rows: tokens, positions and slots need one entry per row each, found {tokens}, {positions} and {slots}")]
    RowsMismatch {
        /// Token ids given.
        tokens: usize,
        /// Positions given.
        positions: usize,
        /// Slots given.
        slots: usize,
    },
    /// A row naming a KV slot the executor does not hold.
    #[error(
        "row {row}: slot {slot} is outside the {held} KV slots this executor holds (0..{held})"
    )]
    SlotOutOfRange {
        /// The row's index in the call.
        row: usize,
        /// Its slot.
        slot: i64,
        /// Slots the executor holds.
        held: usize,
    },
    /// A row at a position past the KV capacity (or negative).
    #[error("row {row}: position {position} is outside the KV capacity 0..{capacity}")]
    PositionOutOfRange {
        /// The row's index in the call.
        row: usize,
        /// Its position.
        position: i64,
        /// The plan's KV capacity per slot.
        capacity: usize,
    },
    /// Two rows of one call writing the same cache entry (they would race on a GPU).
    #[error("rows {first} and {second} both write slot {slot} at position {position}; a call writes each (slot, position) once")]
    DuplicateRow {
        /// The earlier row.
        first: usize,
        /// The later row.
        second: usize,
        /// Their slot.
        slot: usize,
        /// Their position.
        position: usize,
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
