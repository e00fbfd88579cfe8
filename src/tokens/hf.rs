//! Hugging Face `tokenizer.json` vocabularies, through the `tokenizers` crate.

use std::path::Path;

use anyhow::{anyhow, Result};
use tokenizers::Tokenizer;

/// A tokenizer as `tokenizer.json` describes it, with padding and truncation turned off (a
/// prompt is encoded as written).
pub struct Hf {
    tokenizer: Tokenizer,
    /// One more than the largest id the tokenizer knows (added tokens included).
    ids: usize,
}

impl Hf {
    pub fn from_json_str(text: &str, path: &Path) -> Result<Hf> {
        let mut tokenizer = Tokenizer::from_bytes(text.as_bytes()).map_err(|e| {
            anyhow!(
                "{}: not a Hugging Face tokenizer.json: {}",
                path.display(),
                one_line(&e.to_string())
            )
        })?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| anyhow!("{}: {}", path.display(), one_line(&e.to_string())))?;
        let vocab = tokenizer.get_vocab(true);
        let ids = vocab
            .values()
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0)
            .max(tokenizer.get_vocab_size(true));
        if ids == 0 {
            anyhow::bail!("{}: the tokenizer has an empty vocabulary", path.display());
        }
        Ok(Hf { tokenizer, ids })
    }

    pub fn len(&self) -> usize {
        self.ids
    }

    /// The id of a token given by its text (`</s>`), added tokens included.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn encode(&self, text: &str, path: &Path) -> Result<Vec<u32>> {
        self.encode_with(text, path, true)
    }

    /// `encode`, with or without the special tokens the post-processor adds (a BOS, say).
    pub fn encode_with(&self, text: &str, path: &Path, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| crate::Error::CannotEncode {
                tokenizer: path.to_path_buf(),
                text: text.to_string(),
                reason: one_line(&e.to_string()),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    fn known(&self, id: u32) -> bool {
        self.tokenizer.id_to_token(id).is_some()
    }

    /// The text of `ids`; an id the tokenizer does not know becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        for (i, run) in ids.split(|&id| !self.known(id)).enumerate() {
            if i > 0 {
                out.push('\u{fffd}');
            }
            if !run.is_empty() {
                match self.tokenizer.decode(run, false) {
                    Ok(s) => out.push_str(&s),
                    Err(_) => out.push('\u{fffd}'),
                }
            }
        }
        out
    }
}

/// Incremental decoding: the text each new token adds. Multi-token characters (byte-level
/// BPE splits UTF-8 sequences) are held back until complete, and decoders that depend on
/// neighbours (spaces between WordLevel tokens, SentencePiece's leading space) see the
/// previous chunk as context.
pub struct HfStream {
    /// The ids of the last emitted chunk (context), then those not yet emitted.
    ids: Vec<u32>,
    /// How many of `ids` are context.
    start: usize,
    /// The text of the context ids.
    prefix: String,
}

impl HfStream {
    pub fn new() -> HfStream {
        HfStream {
            ids: Vec::new(),
            start: 0,
            prefix: String::new(),
        }
    }

    pub fn push(&mut self, hf: &Hf, id: u32) -> String {
        self.ids.push(id);
        let text = hf.decode(&self.ids);
        if text.len() <= self.prefix.len() || text.ends_with('\u{fffd}') {
            return String::new();
        }
        let new = match text.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest.to_string(),
            // The decoder rewrote the context: fall back to the new ids alone.
            None => hf.decode(&self.ids[self.start..]),
        };
        self.ids.drain(..self.start);
        self.start = self.ids.len();
        self.prefix = hf.decode(&self.ids);
        new
    }

    /// Whatever is still held back (an incomplete character, shown as U+FFFD).
    pub fn finish(&mut self, hf: &Hf) -> String {
        if self.start == self.ids.len() {
            return String::new();
        }
        let text = hf.decode(&self.ids);
        let rest = match text.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest.to_string(),
            None => hf.decode(&self.ids[self.start..]),
        };
        self.ids.clear();
        self.start = 0;
        self.prefix.clear();
        rest
    }
}

/// Errors from `tokenizers` (serde's among them) on one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
