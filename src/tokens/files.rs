//! The Hugging Face tokenizer files a compiled directory carries, and the special token ids
//! they define (for `genai_config.json`, and for stopping at end of sequence).
//!
//! Looked for beside the checkpoint. The ids come from `generation_config.json`
//! (`bos_token_id`, `eos_token_id` as one id or a list, `pad_token_id`), else from the
//! tokens `tokenizer_config.json` or `special_tokens_map.json` names (`bos_token`,
//! `eos_token`, `pad_token`, as text or as `{"content": ...}`), looked up in
//! `tokenizer.json`. Without a `tokenizer.json` there are none: a char-level `vocab.json` or
//! `meta.pkl` defines no special tokens, whatever ids the other files carry.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ngpt_compiler::onnx::genai::SpecialTokens;
use serde_json::Value;

use super::hf::Hf;

/// The files copied into a compiled directory when found beside the checkpoint, in this
/// order.
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// The tokenizer files in `dir` (those of [`TOKENIZER_FILES`] that exist).
pub fn tokenizer_files(dir: &Path) -> Vec<PathBuf> {
    TOKENIZER_FILES
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| p.is_file())
        .collect()
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", path.display()))?;
    if !v.is_object() {
        bail!("{}: expected a JSON object", path.display());
    }
    Ok(Some(v))
}

/// An id field: absent or null is none; otherwise a non-negative integer below `vocab`.
fn id_field(v: &Value, key: &str, path: &Path, vocab: usize) -> Result<Option<u32>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_u64() {
            Some(id) if (id as usize) < vocab => Ok(Some(id as u32)),
            _ => bail!(
                "{}: `{key}` is {x}; expected a token id in 0..{vocab} (the model's vocab_size)",
                path.display()
            ),
        },
    }
}

/// The special token ids the tokenizer files in `dir` define, each below `vocab` (the
/// model's vocab_size). Only a vocabulary given as `tokenizer.json` defines any: beside a
/// char-level `vocab.json` or `meta.pkl`, the ids a `generation_config.json` or
/// `config.json` carries are training leftovers (a real character), not tokens to stop on.
pub fn special_tokens(dir: &Path, vocab: usize) -> Result<SpecialTokens> {
    let mut out = SpecialTokens::default();
    if !dir.join("tokenizer.json").is_file() {
        return Ok(out);
    }
    let gen_path = dir.join("generation_config.json");
    if let Some(g) = read_json(&gen_path)? {
        out.bos = id_field(&g, "bos_token_id", &gen_path, vocab)?;
        out.pad = id_field(&g, "pad_token_id", &gen_path, vocab)?;
        out.eos = match g.get("eos_token_id") {
            Some(Value::Array(ids)) => {
                let mut v = vec![];
                for (i, x) in ids.iter().enumerate() {
                    match x.as_u64() {
                        Some(id) if (id as usize) < vocab => v.push(id as u32),
                        _ => bail!(
                            "{}: `eos_token_id[{i}]` is {x}; expected a token id in 0..{vocab} (the model's vocab_size)",
                            gen_path.display()
                        ),
                    }
                }
                v
            }
            _ => id_field(&g, "eos_token_id", &gen_path, vocab)?
                .into_iter()
                .collect(),
        };
    }
    // Tokens named by text, looked up in tokenizer.json.
    let tok_path = dir.join("tokenizer.json");
    let mut hf: Option<Hf> = None;
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = dir.join(name);
        let Some(c) = read_json(&path)? else {
            continue;
        };
        for key in ["bos_token", "eos_token", "pad_token"] {
            let missing = match key {
                "bos_token" => out.bos.is_none(),
                "eos_token" => out.eos.is_empty(),
                _ => out.pad.is_none(),
            };
            let text = match c.get(key) {
                Some(Value::String(s)) => s.as_str(),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => s.as_str(),
                    _ => bail!(
                        "{}: `{key}` has no text `content`; expected a token such as \"</s>\"",
                        path.display()
                    ),
                },
                None | Some(Value::Null) => continue,
                Some(x) => bail!(
                    "{}: `{key}` is {x}; expected a token such as \"</s>\"",
                    path.display()
                ),
            };
            if !missing {
                continue;
            }
            if hf.is_none() {
                let json = std::fs::read_to_string(&tok_path)
                    .with_context(|| tok_path.display().to_string())?;
                hf = Some(Hf::from_json_str(&json, &tok_path)?);
            }
            let id = hf
                .as_ref()
                .and_then(|h| h.token_to_id(text))
                .filter(|&id| (id as usize) < vocab);
            let Some(id) = id else {
                bail!(
                    "{}: `{key}` names the token {text:?}, which tokenizer.json does not have below the model's vocab_size {vocab}",
                    path.display()
                );
            };
            match key {
                "bos_token" => out.bos = Some(id),
                "eos_token" => out.eos = vec![id],
                _ => out.pad = Some(id),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(d.path().join(name), text).unwrap();
        }
        d
    }

    const TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,
        "added_tokens":[{"id":0,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
                        {"id":1,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
        "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
        "model":{"type":"WordLevel","vocab":{"<s>":0,"</s>":1,"a":2,"b":3},"unk_token":"</s>"}}"#;

    #[test]
    fn ids_come_from_generation_config_then_named_tokens() {
        let none = dir_with(&[("vocab.json", r#"{"chars": "ab"}"#)]);
        assert_eq!(
            special_tokens(none.path(), 4).unwrap(),
            SpecialTokens::default()
        );
        let gen_json = r#"{"bos_token_id": 0, "eos_token_id": [1, 3], "pad_token_id": null}"#;
        // Beside a char-level vocabulary: training leftovers, not tokens.
        let chars = dir_with(&[
            ("vocab.json", r#"{"chars": "ab"}"#),
            ("generation_config.json", gen_json),
        ]);
        assert_eq!(
            special_tokens(chars.path(), 4).unwrap(),
            SpecialTokens::default()
        );
        let gen = dir_with(&[
            ("tokenizer.json", TOKENIZER),
            ("generation_config.json", gen_json),
        ]);
        let s = special_tokens(gen.path(), 4).unwrap();
        assert_eq!((s.bos, s.eos, s.pad), (Some(0), vec![1, 3], None));
        let named = dir_with(&[
            ("tokenizer.json", TOKENIZER),
            (
                "tokenizer_config.json",
                r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>"}"#,
            ),
        ]);
        let s = special_tokens(named.path(), 4).unwrap();
        assert_eq!((s.bos, s.eos, s.pad), (Some(0), vec![1], None));
    }

    #[test]
    fn bad_ids_and_unknown_tokens_are_one_line_errors() {
        for (files, vocab, says) in [
            (
                vec![
                    ("tokenizer.json", TOKENIZER),
                    ("generation_config.json", r#"{"eos_token_id": 9}"#),
                ],
                4,
                "`eos_token_id` is 9; expected a token id in 0..4",
            ),
            (
                vec![
                    ("tokenizer.json", TOKENIZER),
                    ("generation_config.json", r#"{"eos_token_id": -1}"#),
                ],
                4,
                "`eos_token_id` is -1",
            ),
            (
                vec![
                    ("tokenizer.json", TOKENIZER),
                    ("generation_config.json", "{nope"),
                ],
                4,
                "generation_config.json: not valid JSON",
            ),
            (
                vec![
                    ("tokenizer.json", TOKENIZER),
                    ("tokenizer_config.json", r#"{"eos_token": "<eos>"}"#),
                ],
                4,
                "names the token \"<eos>\", which tokenizer.json does not have",
            ),
            (
                vec![
                    ("tokenizer.json", TOKENIZER),
                    ("tokenizer_config.json", r#"{"eos_token": "</s>"}"#),
                ],
                1,
                "below the model's vocab_size 1",
            ),
        ] {
            let d = dir_with(&files);
            let e = special_tokens(d.path(), vocab).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
