//! Character-level vocabularies: ngpt's `vocab.json` (`{"chars": "..."}`, id = index) and
//! nanoGPT's `meta.pkl` (a pickled dict with `stoi`, `itos` and `vocab_size`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_pickle::{DeOptions, HashableValue, Value};

/// A character per token id.
pub struct Chars {
    chars: Vec<char>,
    /// Character -> its first id.
    index: HashMap<char, u32>,
}

impl Chars {
    fn new(chars: Vec<char>) -> Chars {
        let mut index = HashMap::with_capacity(chars.len());
        for (i, &c) in chars.iter().enumerate() {
            index.entry(c).or_insert(i as u32);
        }
        Chars { chars, index }
    }

    /// A `vocab.json` already parsed: its `chars` string.
    pub fn from_json(v: &serde_json::Value, path: &Path) -> Result<Chars> {
        let chars = v
            .get("chars")
            .and_then(|c| c.as_str())
            .with_context(|| format!("{}: expected a `chars` string field", path.display()))?;
        if chars.is_empty() {
            bail!("{}: `chars` is empty", path.display());
        }
        Ok(Chars::new(chars.chars().collect()))
    }

    /// nanoGPT's `meta.pkl`: `itos` (id -> one-character string) must cover ids
    /// `0..vocab_size` exactly, and `stoi` must be its inverse.
    pub fn from_meta_pkl(bytes: &[u8], path: &Path) -> Result<Chars> {
        let p = path.display().to_string();
        let value = serde_pickle::value_from_slice(bytes, DeOptions::new())
            .with_context(|| format!("{p}: not a readable pickle (nanoGPT meta.pkl)"))?;
        let Value::Dict(dict) = value else {
            bail!(
                "{p}: expected a pickled dict with `stoi` and `itos` (nanoGPT meta.pkl), found {}",
                kind(&value)
            );
        };
        let entry = |name: &str| -> Result<&BTreeMap<HashableValue, Value>> {
            match dict.get(&HashableValue::String(name.into())) {
                Some(Value::Dict(d)) => Ok(d),
                Some(other) => bail!("{p}: `{name}` is {}, expected a dict", kind(other)),
                None => bail!("{p}: no `{name}` entry; a nanoGPT meta.pkl has `stoi` and `itos`"),
            }
        };
        let (itos, stoi) = (entry("itos")?, entry("stoi")?);
        let n = itos.len();
        let mut chars = vec![None; n];
        for (k, v) in itos {
            let id = match k {
                HashableValue::I64(i) => usize::try_from(*i).ok().filter(|&i| i < n),
                _ => bail!(
                    "{p}: `itos` has the key {}; expected integer token ids",
                    show_key(k)
                ),
            }
            .with_context(|| {
                format!(
                    "{p}: `itos` has the id {}; its {n} ids should be 0..{}",
                    show_key(k),
                    n.saturating_sub(1)
                )
            })?;
            chars[id] = Some(single_char(v, &p, || format!("itos[{id}]"))?);
        }
        // Keys are distinct and all below the length, so every slot is filled.
        let chars: Vec<char> = chars.into_iter().flatten().collect();
        if chars.is_empty() {
            bail!("{p}: `itos` is empty");
        }
        if stoi.len() != chars.len() {
            bail!(
                "{p}: `stoi` has {} entries but `itos` has {}",
                stoi.len(),
                chars.len()
            );
        }
        for (k, v) in stoi {
            let HashableValue::String(s) = k else {
                bail!(
                    "{p}: `stoi` has the key {}; expected one-character strings",
                    show_key(k)
                );
            };
            let c = single_char(&Value::String(s.clone()), &p, || {
                format!("the `stoi` key {s:?}")
            })?;
            let Value::I64(id) = v else {
                bail!("{p}: stoi[{s:?}] is {}, expected an integer id", kind(v));
            };
            match usize::try_from(*id).ok().and_then(|i| chars.get(i)) {
                Some(&back) if back == c => {}
                Some(back) => bail!("{p}: stoi[{s:?}] is {id} but itos[{id}] is {back:?}"),
                None => bail!(
                    "{p}: stoi[{s:?}] is {id}, outside itos's ids 0..{}",
                    chars.len() - 1
                ),
            }
        }
        match dict.get(&HashableValue::String("vocab_size".into())) {
            None => {}
            Some(Value::I64(v)) if usize::try_from(*v) == Ok(chars.len()) => {}
            Some(Value::I64(v)) => bail!(
                "{p}: vocab_size is {v} but `itos` has {} entries",
                chars.len()
            ),
            Some(other) => bail!("{p}: vocab_size is {}, expected an int", kind(other)),
        }
        Ok(Chars::new(chars))
    }

    pub fn len(&self) -> usize {
        self.chars.len()
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .map(|ch| {
                self.index
                    .get(&ch)
                    .copied()
                    .ok_or_else(|| crate::Error::CharacterNotInVocabulary { ch }.into())
            })
            .collect()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{fffd}'))
            .collect()
    }
}

/// The one character of a string value.
fn single_char(v: &Value, path: &str, what: impl Fn() -> String) -> Result<char> {
    let Value::String(s) = v else {
        bail!(
            "{path}: {} is {}, expected a one-character string",
            what(),
            kind(v)
        );
    };
    let mut it = s.chars();
    match (it.next(), it.next()) {
        (Some(c), None) => Ok(c),
        _ => bail!(
            "{path}: {} is {s:?}; a char-level vocabulary maps each id to one character",
            what()
        ),
    }
}

/// A dict key for messages: ints and strings as written, others by type.
fn show_key(k: &HashableValue) -> String {
    match k {
        HashableValue::I64(i) => i.to_string(),
        HashableValue::Int(i) => i.to_string(),
        HashableValue::String(s) => format!("{s:?}"),
        other => kind(&other.clone().into_value()).to_string(),
    }
}

/// A Python type name for messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "a bool",
        Value::I64(_) | Value::Int(_) => "an int",
        Value::F64(_) => "a float",
        Value::Bytes(_) => "bytes",
        Value::String(_) => "a str",
        Value::List(_) => "a list",
        Value::Tuple(_) => "a tuple",
        Value::Set(_) | Value::FrozenSet(_) => "a set",
        Value::Dict(_) => "a dict",
    }
}
