//! What the library refuses in a caller's input, typed: a caller tells a token outside the
//! vocabulary from a prompt too long for the position table by the variant, not by parsing
//! text. The messages name no command-line flag; the `ngpt` command prints
//! [`Error::cli_message`], which names the flag the value came from.
//!
//! The library's functions return `anyhow::Result`; these errors are inside, found with
//! `downcast_ref` (the runtime's own, [`ngpt_runtime::Error`], the same way):
//!
//! ```
//! let e = ngpt::tokens::parse_tokens("5,99", 50).unwrap_err();
//! assert!(matches!(
//!     e.downcast_ref::<ngpt::Error>(),
//!     Some(ngpt::Error::TokenOutOfRange { id: 99, item: 2, vocab: 50 })
//! ));
//! assert_eq!(e.to_string(), "token list: token id 99 (item 2) is out of range; expected 0..49");
//! ```

use std::path::PathBuf;

/// An input the library refuses.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A token list (`5,17,3`) with no ids.
    #[error("token list: empty; expected comma-separated token ids such as 5,17,3")]
    NoTokens,
    /// An item of a token list that is not an integer.
    #[error("token list: item {item} `{text}` is not an integer token id")]
    NotATokenId {
        /// 1-based.
        item: usize,
        /// The item as written.
        text: String,
    },
    /// An item of a token list outside `0..vocab`.
    #[error("token list: token id {id} (item {item}) is out of range; expected 0..{}", .vocab.saturating_sub(1))]
    TokenOutOfRange {
        /// The id as written (negative ones too).
        id: i64,
        /// 1-based.
        item: usize,
        /// The model's vocabulary size.
        vocab: usize,
    },
    /// A token id at or beyond the model's vocabulary size.
    #[error("token id {id} is not below the vocabulary size {vocab}")]
    TokenOutsideVocabulary {
        /// The id.
        id: u32,
        /// The model's vocabulary size.
        vocab: usize,
    },
    /// A character a char-level vocabulary does not have.
    #[error("character {ch:?} is not in the vocabulary")]
    CharacterNotInVocabulary {
        /// The character.
        ch: char,
    },
    /// A text a tokenizer.json cannot encode.
    #[error("{} cannot encode {text:?}: {reason}", .tokenizer.display())]
    CannotEncode {
        /// The tokenizer file.
        tokenizer: PathBuf,
        /// The text.
        text: String,
        /// The tokenizer's reason, on one line.
        reason: String,
    },
    /// More tokens than the model's position table has rows.
    #[error("{tokens} tokens, but {} has a position table of {max} rows (its max_seq_len)", .model.display())]
    TooManyTokens {
        /// Tokens asked for.
        tokens: usize,
        /// The model file.
        model: PathBuf,
        /// Rows of its position table.
        max: usize,
    },
    /// A forward over more positions than memory allows for this engine.
    #[error(transparent)]
    TooManyPositions(crate::memory::Insufficient),
    /// A compiled directory without model.plan (compiled for bisecting: not all passes).
    #[error("{}: no model.plan in this compiled directory (compiled with only the first passes, which writes no plan?); compile it again with all of them", .dir.display())]
    NoPlan {
        /// The directory.
        dir: PathBuf,
    },
    /// A compiled directory written without model.onnx, asked for an ONNX engine.
    #[error("{}: compiled without model.onnx; tract runs the ONNX export", .dir.display())]
    NoOnnx {
        /// The directory.
        dir: PathBuf,
    },
    /// The CUDA engine where CUDA cannot run.
    #[error("plan-cuda: {why}")]
    CudaUnavailable {
        /// What is missing.
        why: String,
    },
    /// A prompt given as text for a model with no vocabulary beside it.
    #[error("the line is text but no vocabulary was found beside the model; give one or write token ids")]
    NoVocabulary,
    /// A prompts file that cannot be read.
    #[error("prompts file {}: {io}", .path.display())]
    PromptsUnreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        io: std::io::Error,
    },
    /// A line of a prompts file that is not a prompt.
    #[error("prompts file {} line {line}: {problem:#}", .path.display())]
    PromptLine {
        /// The file.
        path: PathBuf,
        /// 1-based.
        line: usize,
        /// Why (an [`Error`] inside where the line's tokens or text were refused).
        problem: anyhow::Error,
    },
    /// A prompts file with no prompt in it.
    #[error("prompts file {}: holds no prompt", .path.display())]
    NoPrompts {
        /// The file.
        path: PathBuf,
    },
}

impl Error {
    /// The message as the `ngpt` command prints it: naming the flag the value came from.
    ///
    /// ```
    /// let e = ngpt::Error::CharacterNotInVocabulary { ch: 'é' };
    /// assert_eq!(e.cli_message(), "--prompt: character 'é' is not in the vocabulary");
    /// ```
    pub fn cli_message(&self) -> String {
        let tokens =
            |s: String| format!("--tokens: {}", s.strip_prefix("token list: ").unwrap_or(&s));
        match self {
            Error::NoTokens | Error::NotATokenId { .. } | Error::TokenOutOfRange { .. } => {
                tokens(self.to_string())
            }
            Error::TokenOutsideVocabulary { .. } | Error::TooManyPositions(_) => {
                format!("--tokens: {self}")
            }
            Error::CharacterNotInVocabulary { .. } | Error::CannotEncode { .. } => {
                format!("--prompt: {self}")
            }
            Error::TooManyTokens { tokens, model, max } => format!(
                "--tokens: {tokens} tokens, but {} has a position table of {max} rows (its \
                 --max-seq-len); compile again with --max-seq-len {tokens} or more",
                model.display()
            ),
            Error::NoPlan { dir } => format!(
                "{}: no model.plan in this compiled directory (compiled with --stop-after, which \
                 writes no plan?); compile it again without --stop-after",
                dir.display()
            ),
            Error::NoOnnx { dir } => format!(
                "{}: compiled without model.onnx (--no-onnx); tract runs the ONNX export",
                dir.display()
            ),
            Error::NoVocabulary => "the line is text but no vocabulary was found beside the \
                                    model; pass --vocab FILE or write token ids"
                .to_string(),
            Error::CudaUnavailable { why } => format!("--engine plan-cuda: {why}"),
            Error::PromptsUnreadable { path, io } => {
                format!("reading --prompts {}: {io}", path.display())
            }
            Error::PromptLine {
                path,
                line,
                problem,
            } => format!(
                "--prompts {} line {line}: {}",
                path.display(),
                cli_chain(problem)
            ),
            Error::NoPrompts { path } => format!("--prompts {}: holds no prompt", path.display()),
        }
    }
}

/// An error chain on one line as the `ngpt` command prints it: each cause after the
/// outermost context, a cause already in the text not repeated, this crate's errors in
/// their [`Error::cli_message`] form.
pub fn cli_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let cause = if let Some(c) = cause.downcast_ref::<candle_core::Error>() {
            ngpt_compiler::error::candle_message(c)
        } else if let Some(c) = cause.downcast_ref::<Error>() {
            // Its own message covers its causes.
            let text = c.cli_message();
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
            break;
        } else {
            cause.to_string()
        };
        if msg.contains(&cause) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&cause);
    }
    msg
}
