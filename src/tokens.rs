//! Token lists and vocabularies from the command line.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Parses `--tokens 5,17,3` into ids below `vocab_size`.
pub fn parse_tokens(text: &str, vocab_size: usize) -> Result<Vec<u32>> {
    let text = text.trim();
    if text.is_empty() {
        bail!("--tokens: empty; expected comma-separated token ids such as 5,17,3");
    }
    text.split(',')
        .enumerate()
        .map(|(i, s)| {
            let s = s.trim();
            let v: i64 = s.parse().map_err(|_| {
                anyhow::anyhow!("--tokens: item {} `{s}` is not an integer token id", i + 1)
            })?;
            if v < 0 || v as u64 >= vocab_size as u64 {
                bail!(
                    "--tokens: token id {v} (item {}) is out of range; expected 0..{}",
                    i + 1,
                    vocab_size - 1
                );
            }
            Ok(v as u32)
        })
        .collect()
}

/// A character-level vocabulary: `vocab.json` with `{"chars": "..."}`, token id = index.
pub struct Vocab {
    chars: Vec<char>,
}

impl Vocab {
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        let chars = v
            .get("chars")
            .and_then(|c| c.as_str())
            .with_context(|| format!("{}: expected a `chars` string field", path.display()))?;
        Ok(Vocab {
            chars: chars.chars().collect(),
        })
    }

    /// Reads a `vocab.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading vocabulary {}", path.display()))?;
        Self::from_json_str(&text, path)
    }

    /// Token ids of `text`, one per character; a character outside the vocabulary is an error.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .map(|ch| {
                self.chars
                    .iter()
                    .position(|&c| c == ch)
                    .map(|i| i as u32)
                    .with_context(|| format!("--prompt: character {ch:?} is not in the vocabulary"))
            })
            .collect()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{fffd}'))
            .collect()
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
