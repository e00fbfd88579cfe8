//! Token lists and vocabularies from the command line.
//!
//! A [`Vocab`] is one of the three vocabularies the CLI contract names: ngpt's char-level
//! `vocab.json` (`{"chars": "..."}`), nanoGPT's char-level `meta.pkl` (`stoi`, `itos`,
//! `vocab_size`), or a Hugging Face `tokenizer.json`. `ngpt generate` takes `--vocab FILE`,
//! or else the first of [`FILE_NAMES`] found beside the model ([`Vocab::find`]).

mod chars;
pub mod files;
mod hf;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ngpt_compiler::compile::{is_compiled_dir, Manifest};

use chars::Chars;
use hf::{Hf, HfStream};

/// Parses a token list (`5,17,3`, as `--tokens` takes) into ids below `vocab_size`;
/// refusals are [`crate::Error`]s.
pub fn parse_tokens(text: &str, vocab_size: usize) -> Result<Vec<u32>> {
    let text = text.trim();
    if text.is_empty() {
        return Err(crate::Error::NoTokens.into());
    }
    text.split(',')
        .enumerate()
        .map(|(i, s)| {
            let s = s.trim();
            let v: i64 = s.parse().map_err(|_| crate::Error::NotATokenId {
                item: i + 1,
                text: s.to_string(),
            })?;
            if v < 0 || v as u64 >= vocab_size as u64 {
                return Err(crate::Error::TokenOutOfRange {
                    id: v,
                    item: i + 1,
                    vocab: vocab_size,
                }
                .into());
            }
            Ok(v as u32)
        })
        .collect()
}

/// The one line for a directory that holds a SentencePiece `tokenizer.model` but no
/// `tokenizer.json`: ngpt reads the latter, which transformers writes from the former.
pub fn sentencepiece_note(model: &Path) -> String {
    let dir = model.parent().unwrap_or(Path::new("."));
    format!(
        "note: {} is a SentencePiece model, which ngpt does not read; write tokenizer.json beside it with transformers: python3 -c \"from transformers import LlamaTokenizerFast as T; T.from_pretrained('{}').save_pretrained('{}')\"",
        model.display(),
        dir.display(),
        dir.display()
    )
}

/// The vocabulary files looked for beside a model, in this order.
pub const FILE_NAMES: [&str; 3] = ["tokenizer.json", "vocab.json", "meta.pkl"];

/// The directories a model's tokenizer files may be in, in search order: a compiled
/// directory, then its source's directory (for a checkpoint, the checkpoint's own).
pub fn model_dirs(input: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    let source = if is_compiled_dir(input) {
        dirs.push(input.to_path_buf());
        Manifest::read(input)?.source
    } else {
        input.to_path_buf()
    };
    dirs.push(if source.is_dir() {
        source
    } else {
        source.parent().map(Path::to_path_buf).unwrap_or_default()
    });
    Ok(dirs)
}

/// A vocabulary: text to token ids and back.
///
/// ```text
/// // The binary's own module, so this example is not compiled as a doctest.
/// let v = Vocab::from_json_str(r#"{"chars": "ab "}"#, "vocab.json".as_ref())?;
/// assert_eq!(v.encode("ba b")?, [1, 0, 2, 1]);
/// assert_eq!(v.decode(&[0, 2, 1]), "a b");
/// v.check_model_vocab(16)?; // 3 tokens fit a model with 16
/// ```
pub struct Vocab {
    kind: Kind,
    /// The file it came from (named in errors).
    path: PathBuf,
}

enum Kind {
    /// vocab.json or meta.pkl.
    Chars {
        chars: Chars,
        format: &'static str,
    },
    Hf(Box<Hf>),
}

impl Vocab {
    /// A `vocab.json`'s text: `{"chars": "..."}`, token id = index of the character.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Ok(Vocab {
            kind: Kind::Chars {
                chars: Chars::from_json(&v, path)?,
                format: "vocab.json",
            },
            path: path.to_path_buf(),
        })
    }

    /// nanoGPT's char-level `meta.pkl` (any pickle protocol): a dict with `stoi`, `itos`
    /// and optionally `vocab_size`, which must agree.
    pub fn from_meta_pkl(bytes: &[u8], path: &Path) -> Result<Self> {
        Ok(Vocab {
            kind: Kind::Chars {
                chars: Chars::from_meta_pkl(bytes, path)?,
                format: "meta.pkl",
            },
            path: path.to_path_buf(),
        })
    }

    /// A Hugging Face `tokenizer.json`'s text. Padding and truncation are turned off.
    pub fn from_tokenizer_json_str(text: &str, path: &Path) -> Result<Self> {
        Ok(Vocab {
            kind: Kind::Hf(Box::new(Hf::from_json_str(text, path)?)),
            path: path.to_path_buf(),
        })
    }

    /// Reads any of the three, told apart by content: a pickle (or a `.pkl` name) is a
    /// meta.pkl; JSON with a `model` is a tokenizer.json, JSON with `chars` a vocab.json.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading vocabulary {}", path.display()))?;
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        // Pickle protocols 2 and up start with PROTO (0x80).
        if bytes.first() == Some(&0x80) || matches!(ext.as_deref(), Some("pkl" | "pickle")) {
            return Self::from_meta_pkl(&bytes, path);
        }
        let unknown = || {
            anyhow::anyhow!(
                "{}: not a vocabulary: expected a nanoGPT meta.pkl, a vocab.json with a `chars` string, or a Hugging Face tokenizer.json",
                path.display()
            )
        };
        let text = std::str::from_utf8(&bytes).map_err(|_| unknown())?;
        let json: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) if ext.as_deref() == Some("json") => {
                bail!("{}: not valid JSON: {e}", path.display())
            }
            Err(_) => return Err(unknown()),
        };
        if json.get("model").is_some() {
            Self::from_tokenizer_json_str(text, path)
        } else if json.get("chars").is_some() {
            Self::from_json_str(text, path)
        } else {
            Err(unknown())
        }
    }

    /// The vocabulary for a model: `INPUT` is a checkpoint file, a checkpoint directory or a
    /// compiled directory. Looks for [`FILE_NAMES`], in order, in the compiled directory,
    /// then beside the checkpoint (for a compiled directory, the source its manifest
    /// records). `None` when there is none; a file that is there but bad is an error.
    pub fn find(input: &Path) -> Result<Option<Self>> {
        let dirs = model_dirs(input)?;
        for dir in &dirs {
            for name in FILE_NAMES {
                let candidate = dir.join(name);
                if candidate.is_file() {
                    return Self::from_file(&candidate).map(Some);
                }
            }
        }
        // A SentencePiece model alone (Llama's tokenizer.model): say how to get the
        // tokenizer.json ngpt reads; token ids still work.
        if let Some(sp) = dirs
            .iter()
            .map(|d| d.join("tokenizer.model"))
            .find(|p| p.is_file())
        {
            eprintln!("{}", sentencepiece_note(&sp));
        }
        Ok(None)
    }

    /// Token ids it can produce: `0..len()`.
    pub fn len(&self) -> usize {
        match &self.kind {
            Kind::Chars { chars, .. } => chars.len(),
            Kind::Hf(hf) => hf.len(),
        }
    }

    /// Whether it has no tokens (a vocabulary file refuses that when read).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One line for the user: file, format and size.
    pub fn describe(&self) -> String {
        let format = match &self.kind {
            Kind::Chars { format, .. } => format,
            Kind::Hf(_) => "tokenizer.json",
        };
        format!("{} ({format}, {} tokens)", self.path.display(), self.len())
    }

    /// Errors when the vocabulary has ids the model has no row for. A model may have more
    /// ids than its vocabulary (nanoGPT pads GPT-2's 50257 to 50304).
    pub fn check_model_vocab(&self, model_vocab: usize) -> Result<()> {
        if self.len() > model_vocab {
            bail!(
                "{}: the vocabulary has {} tokens but the model's vocab_size is {model_vocab}",
                self.path.display(),
                self.len()
            );
        }
        Ok(())
    }

    /// Token ids of `text`. Char-level: one per character, a character outside the
    /// vocabulary is an error. tokenizer.json: as the tokenizer encodes it, special tokens
    /// (a BOS, say) included.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.kind {
            Kind::Chars { chars, .. } => chars.encode(text),
            Kind::Hf(hf) => hf.encode(text, &self.path),
        }
    }

    /// Token ids of `text` without the special tokens a tokenizer.json's post-processor
    /// adds: for text that already holds them, as a rendered chat template does
    /// (transformers' `apply_chat_template` tokenizes the same way).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        match &self.kind {
            Kind::Chars { chars, .. } => chars.encode(text),
            Kind::Hf(hf) => hf.encode_with(text, &self.path, false),
        }
    }

    /// The text of `ids`; an id outside the vocabulary becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.kind {
            Kind::Chars { chars, .. } => chars.decode(ids),
            Kind::Hf(hf) => hf.decode(ids),
        }
    }

    /// Decodes a token stream as it comes (see [`TextStream`]).
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            vocab: self,
            hf: HfStream::new(),
        }
    }
}

/// Text of a token stream, chunk by chunk: concatenating what [`TextStream::push`] and
/// [`TextStream::finish`] return gives the text of all the ids. With a tokenizer.json, text
/// that needs the next token (half a UTF-8 character) is held back until it comes.
pub struct TextStream<'a> {
    vocab: &'a Vocab,
    hf: HfStream,
}

impl TextStream<'_> {
    /// The text `ids` add.
    pub fn push(&mut self, ids: &[u32]) -> String {
        match &self.vocab.kind {
            Kind::Chars { chars, .. } => chars.decode(ids),
            Kind::Hf(hf) => ids.iter().map(|&id| self.hf.push(hf, id)).collect(),
        }
    }

    /// What is still held back.
    pub fn finish(&mut self) -> String {
        match &self.vocab.kind {
            Kind::Chars { .. } => String::new(),
            Kind::Hf(hf) => self.hf.finish(hf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(parse_tokens("5, 17,3", 20).unwrap(), vec![5, 17, 3]);
        assert!(parse_tokens("5,x", 20)
            .unwrap_err()
            .to_string()
            .contains("`x`"));
        assert!(parse_tokens("-1", 20)
            .unwrap_err()
            .to_string()
            .contains("out of range"));
        assert!(parse_tokens("20", 20)
            .unwrap_err()
            .to_string()
            .contains("out of range"));
        assert!(parse_tokens(" ", 20)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(parse_tokens("1,,2", 20).is_err());
    }
}
