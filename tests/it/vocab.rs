//! Vocabularies: nanoGPT's char-level `meta.pkl`, ngpt's `vocab.json` and a Hugging Face
//! `tokenizer.json`, through the one `Vocab` type the CLI uses (`ngpt::tokens`) and through
//! `ngpt generate`.
//!
//! The meta.pkl fixtures under `tests/fixtures/vocab/` were written by Python's `pickle`
//! exactly as nanoGPT's `prepare.py` writes them (`make_meta.py` there); the variants the
//! tests corrupt are pickled here with serde-pickle, so no test needs Python.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{Context, Result};

use crate::common::{ngpt, ok, stderr, stdout, utf8};
use ngpt::tokens::{self, Vocab};
use serde_pickle::{HashableValue as H, SerOptions, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// nanoGPT's meta dict over `chars` (id = index), as `prepare.py` builds it.
fn meta(chars: &[char]) -> BTreeMap<H, Value> {
    let itos = chars
        .iter()
        .enumerate()
        .map(|(i, c)| (H::I64(i as i64), Value::String(c.to_string())))
        .collect();
    let stoi = chars
        .iter()
        .enumerate()
        .map(|(i, c)| (H::String(c.to_string()), Value::I64(i as i64)))
        .collect();
    BTreeMap::from([
        (
            H::String("vocab_size".into()),
            Value::I64(chars.len() as i64),
        ),
        (H::String("itos".into()), Value::Dict(itos)),
        (H::String("stoi".into()), Value::Dict(stoi)),
    ])
}

fn pickle(v: &Value) -> Vec<u8> {
    serde_pickle::value_to_vec(v, SerOptions::new()).expect("serde-pickle writes a Value")
}

/// The 16 characters of the tiny models' char vocabularies (a model with vocab_size 16).
const SIXTEEN: &str = " abcdeghilmnorst";

fn sixteen() -> Vec<char> {
    SIXTEEN.chars().collect()
}

/// A WordLevel tokenizer.json: `words` get ids 0.., split on whitespace, no decoder (so
/// decoding joins tokens with spaces). `[UNK]` must be one of the words.
fn word_level(words: &[&str]) -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
    .to_string()
}

/// Sixteen words for a model with vocab_size 16.
const WORDS: [&str; 16] = [
    "[UNK]", "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it", "was", "big",
    "red", ".",
];

/// A byte-level BPE tokenizer.json (GPT-2's scheme) whose vocabulary holds the two bytes of
/// "é" (U+00E9 = C3 A9, byte-level symbols "Ã" and "©") only as separate tokens, so "é"
/// is two tokens and the first alone is half a character.
fn byte_level_bpe() -> String {
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "vocab": {"c": 0, "a": 1, "f": 2, "Ã": 3, "©": 4, "Ġ": 5, "ca": 6, "caf": 7, "Ġc": 8},
            "merges": ["c a", "ca f", "Ġ c"]
        }
    })
    .to_string()
}

fn err_text(e: anyhow::Error) -> String {
    // As the CLI prints it: the chain on one line.
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

// ---------------------------------------------------------------------------------------
// The Vocab type.
// ---------------------------------------------------------------------------------------

#[test]
fn python_meta_pkl_matches_vocab_json_in_every_protocol() -> Result<()> {
    let json = Vocab::from_file(&fixtures().join("nv-tiny/vocab.json"))?;
    let text = "Permission is granted, (free) of charge: 42.";
    let want = json.encode(text)?;
    let all: Vec<u32> = (0..86).collect();
    for name in ["meta.pkl", "meta-p0.pkl", "meta-p2.pkl", "meta-p5.pkl"] {
        let path = fixtures().join("vocab").join(name);
        let v = Vocab::from_file(&path)?;
        assert_eq!(v.len(), 86, "{name}");
        assert_eq!(v.encode(text)?, want, "{name}: encode");
        assert_eq!(v.decode(&want), text, "{name}: decode(encode(text))");
        assert_eq!(v.decode(&all), json.decode(&all), "{name}: every id");
        assert!(
            v.describe().contains("meta.pkl, 86 tokens"),
            "{}",
            v.describe()
        );
        v.check_model_vocab(86)?;
        let e = err_text(v.check_model_vocab(85).unwrap_err());
        assert!(e.contains(name) && e.contains("vocab_size is 85"), "{e}");
    }
    Ok(())
}

#[test]
fn generated_meta_pkl_round_trips() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("meta.pkl");
    std::fs::write(&path, pickle(&Value::Dict(meta(&sixteen()))))?;
    let v = Vocab::from_file(&path)?;
    assert_eq!(v.len(), 16);
    let text = "the cat sat on a mat";
    let ids = v.encode(text)?;
    assert_eq!(ids.len(), text.len());
    assert_eq!(
        ids[..3],
        [15, 7, 5],
        "ids are the sorted characters' indices"
    );
    assert_eq!(v.decode(&ids), text);
    // An id past the vocabulary decodes as U+FFFD; a character outside it is an error.
    assert_eq!(v.decode(&[1, 16, 2]), "a\u{fffd}b");
    let e = err_text(v.encode("cafe").unwrap_err());
    assert!(e.contains("'f' is not in the vocabulary"), "{e}");
    // A TextStream of a char vocabulary is plain decoding.
    let mut s = v.stream();
    let streamed: String = ids.chunks(3).map(|c| s.push(c)).collect::<String>() + &s.finish();
    assert_eq!(streamed, text);
    Ok(())
}

#[test]
fn word_level_tokenizer_json_encodes_and_decodes() -> Result<()> {
    let path = Path::new("tokenizer.json");
    let v = Vocab::from_tokenizer_json_str(&word_level(&WORDS), path)?;
    assert_eq!(v.len(), 16);
    let ids = v.encode("the big dog ran to a red mat .")?;
    assert_eq!(ids, [1, 13, 8, 9, 10, 5, 14, 6, 15]);
    assert_eq!(v.decode(&ids), "the big dog ran to a red mat .");
    // Unknown words are [UNK], as the tokenizer says; unknown ids decode as U+FFFD.
    assert_eq!(v.encode("the zebra")?, [1, 0]);
    assert_eq!(v.decode(&[1, 99, 2]), "the\u{fffd}cat");
    // Streaming: the space a WordLevel decode puts between tokens comes with each token.
    let mut s = v.stream();
    let chunks: Vec<String> = ids.iter().map(|&i| s.push(&[i])).collect();
    assert_eq!(chunks[..3], ["the", " big", " dog"]);
    assert_eq!(chunks.concat() + &s.finish(), v.decode(&ids));
    // Too many tokens for the model: one line naming the file.
    let e = err_text(v.check_model_vocab(15).unwrap_err());
    assert_eq!(
        e,
        "tokenizer.json: the vocabulary has 16 tokens but the model's vocab_size is 15"
    );
    Ok(())
}

#[test]
fn byte_level_bpe_streams_whole_characters() -> Result<()> {
    let v = Vocab::from_tokenizer_json_str(&byte_level_bpe(), Path::new("tokenizer.json"))?;
    let ids = v.encode("café caf")?;
    assert_eq!(ids, [7, 3, 4, 5, 7], "merges ca, caf; é as its two bytes");
    assert_eq!(v.decode(&ids), "café caf");
    // The first byte of "é" alone is no character: the stream holds it back.
    let mut s = v.stream();
    let chunks: Vec<String> = ids.iter().map(|&i| s.push(&[i])).collect();
    assert_eq!(chunks, ["caf", "", "é", " ", "caf"]);
    assert_eq!(s.finish(), "");
    // A stream that ends inside a character shows what it has at the end.
    let mut s = v.stream();
    assert_eq!(s.push(&[7, 3]), "caf");
    assert_eq!(s.finish(), "\u{fffd}");
    Ok(())
}

#[test]
fn vocabularies_are_told_apart_by_content() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // Names say nothing: a pickle named .bin, a tokenizer named vocab.json.
    let pkl = tmp.path().join("chars.bin");
    std::fs::write(&pkl, pickle(&Value::Dict(meta(&sixteen()))))?;
    assert!(Vocab::from_file(&pkl)?
        .describe()
        .contains("(meta.pkl, 16 tokens)"));
    let tok = tmp.path().join("vocab.json");
    std::fs::write(&tok, word_level(&WORDS))?;
    assert!(Vocab::from_file(&tok)?
        .describe()
        .contains("(tokenizer.json, 16 tokens)"));
    let chars = tmp.path().join("tokenizer.json");
    std::fs::write(&chars, format!("{{\"chars\": \"{SIXTEEN}\"}}"))?;
    assert!(Vocab::from_file(&chars)?
        .describe()
        .contains("(vocab.json, 16 tokens)"));
    Ok(())
}

/// Bad vocabulary files: (what, file name, bytes, text the error must hold). Every error is
/// one line and names the file.
fn bad_files() -> Vec<(&'static str, &'static str, Vec<u8>, &'static str)> {
    let good = meta(&sixteen());
    let with = |key: &str, v: Value| {
        let mut m = good.clone();
        m.insert(H::String(key.into()), v);
        pickle(&Value::Dict(m))
    };
    let without = |key: &str| {
        let mut m = good.clone();
        m.remove(&H::String(key.into()));
        pickle(&Value::Dict(m))
    };
    let itos_with = |edit: &dyn Fn(&mut BTreeMap<H, Value>)| {
        let mut m = good.clone();
        if let Some(Value::Dict(itos)) = m.get_mut(&H::String("itos".into())) {
            edit(itos);
        }
        pickle(&Value::Dict(m))
    };
    let stoi_with = |edit: &dyn Fn(&mut BTreeMap<H, Value>)| {
        let mut m = good.clone();
        if let Some(Value::Dict(stoi)) = m.get_mut(&H::String("stoi".into())) {
            edit(stoi);
        }
        pickle(&Value::Dict(m))
    };
    let full = pickle(&Value::Dict(good.clone()));
    let mut tokenizer_bad_model: serde_json::Value =
        serde_json::from_str(&word_level(&WORDS)).expect("json");
    tokenizer_bad_model["model"]["type"] = "Unigrammm".into();
    vec![
        (
            "a truncated meta.pkl",
            "meta.pkl",
            full[..full.len() / 2].to_vec(),
            "not a readable pickle",
        ),
        (
            "text in a .pkl",
            "meta.pkl",
            b"vocab_size = 16\n".to_vec(),
            "not a readable pickle",
        ),
        (
            "a pickled list",
            "meta.pkl",
            pickle(&Value::List(vec![Value::I64(1)])),
            "expected a pickled dict with `stoi` and `itos` (nanoGPT meta.pkl), found a list",
        ),
        ("no stoi", "meta.pkl", without("stoi"), "no `stoi` entry"),
        (
            "itos a list",
            "meta.pkl",
            with("itos", Value::List(vec![])),
            "`itos` is a list, expected a dict",
        ),
        (
            "itos with a gap",
            "meta.pkl",
            itos_with(&|itos| {
                if let Some(v) = itos.remove(&H::I64(15)) {
                    itos.insert(H::I64(40), v);
                }
            }),
            "`itos` has the id 40; its 16 ids should be 0..15",
        ),
        (
            "itos with a word",
            "meta.pkl",
            itos_with(&|itos| {
                itos.insert(H::I64(3), Value::String("cd".into()));
            }),
            "itos[3] is \"cd\"; a char-level vocabulary maps each id to one character",
        ),
        (
            "stoi disagreeing with itos",
            "meta.pkl",
            stoi_with(&|stoi| {
                stoi.insert(H::String("a".into()), Value::I64(2));
            }),
            "stoi[\"a\"] is 2 but itos[2] is 'b'",
        ),
        (
            "vocab_size disagreeing with itos",
            "meta.pkl",
            with("vocab_size", Value::I64(65)),
            "vocab_size is 65 but `itos` has 16 entries",
        ),
        (
            "more characters than the model has ids",
            "meta.pkl",
            pickle(&Value::Dict(meta(&"abcdefghijklmnopqrst".chars().collect::<Vec<_>>()))),
            "the vocabulary has 20 tokens but the model's vocab_size is 16",
        ),
        (
            "a tokenizer.json that is not JSON",
            "tokenizer.json",
            b"{\"model\": ".to_vec(),
            "not valid JSON",
        ),
        (
            "a tokenizer.json with an unknown model",
            "tokenizer.json",
            tokenizer_bad_model.to_string().into_bytes(),
            "not a Hugging Face tokenizer.json",
        ),
        (
            "a tokenizer.json with more tokens than the model",
            "tokenizer.json",
            word_level(&[&WORDS[..], &["x", "y"]].concat()).into_bytes(),
            "the vocabulary has 18 tokens but the model's vocab_size is 16",
        ),
        (
            "a vocab.json whose chars is no string",
            "vocab.json",
            b"{\"chars\": [\"a\", \"b\"]}".to_vec(),
            "expected a `chars` string field",
        ),
        (
            "a JSON file that is no vocabulary",
            "vocab.json",
            b"{\"tokens\": 16}".to_vec(),
            "not a vocabulary: expected a nanoGPT meta.pkl, a vocab.json with a `chars` string, or a Hugging Face tokenizer.json",
        ),
        (
            "a text file",
            "words.txt",
            b"the cat sat\n".to_vec(),
            "not a vocabulary",
        ),
    ]
}

// ---------------------------------------------------------------------------------------
// `ngpt generate` with each vocabulary.
// ---------------------------------------------------------------------------------------

/// Exit 1, no panic, stderr exactly one `error: ` line.
fn clean_failure(o: &Output, what: &str) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{what}: {err}");
    assert!(!err.contains("panicked"), "{what}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: stderr is not one line: {err}");
    assert!(lines[0].starts_with("error: "), "{what}: {err}");
    lines[0].to_string()
}

fn last_json(o: &Output) -> Result<serde_json::Value> {
    let out = stdout(o);
    let last = out.lines().last().context("no stdout")?;
    serde_json::from_str(last).with_context(|| format!("last line is not JSON: {last}"))
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|t| t.as_u64().unwrap_or_else(|| panic!("not an id: {t}")) as u32)
        .collect()
}

/// `ngpt init DIR` with vocab_size 16 (1 layer, 2 heads, n_embd 8).
fn tiny_model(dir: &Path) -> Result<()> {
    ok(
        ngpt(&[
            "init",
            utf8(dir),
            "--layers",
            "1",
            "--heads",
            "2",
            "--embd",
            "8",
            "--vocab",
            "16",
            "--block",
            "16",
            "--seed",
            "7",
        ])?,
        "init",
    )?;
    Ok(())
}

/// `ngpt generate INPUT --prompt PROMPT --max-new-tokens 8` plus `extra`, as JSON and
/// streamed: (tokens, JSON text, streamed stdout, stderr of the streamed run).
fn generate(
    input: &Path,
    prompt: &str,
    extra: &[&str],
) -> Result<(Vec<u32>, String, String, String)> {
    let mut args = vec![
        "generate",
        utf8(input),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "8",
    ];
    args.extend_from_slice(extra);
    let streamed = ok(ngpt(&args)?, "generate")?;
    args.push("--json");
    let j = last_json(&ok(ngpt(&args)?, "generate --json")?)?;
    let text = j["text"]
        .as_str()
        .context("no `text` in the JSON")?
        .to_string();
    Ok((
        ids(&j["tokens"]),
        text,
        stdout(&streamed),
        stderr(&streamed),
    ))
}

#[test]
fn generate_with_each_vocabulary_beside_the_model() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let files: [(&str, Vec<u8>, &str); 3] = [
        (
            "meta.pkl",
            pickle(&Value::Dict(meta(&sixteen()))),
            "the cat sat",
        ),
        (
            "vocab.json",
            format!("{{\"chars\": \"{SIXTEEN}\"}}").into_bytes(),
            "the cat sat",
        ),
        (
            "tokenizer.json",
            word_level(&WORDS).into_bytes(),
            "the cat sat on a",
        ),
    ];
    for (name, bytes, prompt) in files {
        let model = tmp.path().join(name.replace('.', "-"));
        tiny_model(&model)?;
        let file = model.join(name);
        std::fs::write(&file, &bytes)?;
        let vocab = Vocab::from_file(&file)?;
        let (tokens, text, streamed, err) = generate(&model, prompt, &[])?;
        assert_eq!(tokens.len(), 8, "{name}");
        assert!(tokens.iter().all(|&t| t < 16), "{name}: {tokens:?}");
        assert_eq!(
            text,
            vocab.decode(&tokens),
            "{name}: text is the tokens decoded"
        );
        assert!(
            err.contains(&format!("vocabulary: {}", file.display())),
            "{name}: {err}"
        );
        // Streamed: the prompt, then the new text (with the space a WordLevel decode puts
        // between words), then a newline.
        let mut all = vocab.encode(prompt)?;
        all.extend(&tokens);
        assert_eq!(streamed, format!("{}\n", vocab.decode(&all)), "{name}");
        assert!(streamed.starts_with(prompt), "{name}: {streamed}");
        // --vocab FILE names the same file from elsewhere: the same tokens.
        let elsewhere = tmp.path().join(format!("elsewhere-{name}"));
        std::fs::write(&elsewhere, &bytes)?;
        std::fs::remove_file(&file)?;
        let (again, ..) = generate(&model, prompt, &["--vocab", utf8(&elsewhere)])?;
        assert_eq!(again, tokens, "{name}: --vocab");
        // Without the file, text prompts need a vocabulary.
        let o = ngpt(&["generate", utf8(&model), "--prompt", prompt])?;
        let e = clean_failure(&o, "no vocabulary");
        assert!(e.contains("--prompt needs a vocabulary"), "{e}");
    }
    Ok(())
}

#[test]
fn nv_tiny_generates_the_same_with_its_meta_pkl() -> Result<()> {
    let ckpt = fixtures().join("nv-tiny/ckpt.pt");
    let prompt = "Permission is ";
    // The fixture directory holds vocab.json; the meta.pkl of the same characters must give
    // the same tokens and text.
    let (want, want_text, want_streamed, _) = generate(&ckpt, prompt, &[])?;
    for name in ["meta.pkl", "meta-p0.pkl"] {
        let pkl = fixtures().join("vocab").join(name);
        let (tokens, text, streamed, err) = generate(&ckpt, prompt, &["--vocab", utf8(&pkl)])?;
        assert_eq!(tokens, want, "{name}");
        assert_eq!(text, want_text, "{name}");
        assert_eq!(streamed, want_streamed, "{name}");
        assert!(err.contains("(meta.pkl, 86 tokens)"), "{err}");
    }
    Ok(())
}

#[test]
fn vocabulary_search_order() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = tmp.path().join("m");
    tiny_model(&model)?;
    std::fs::write(
        model.join("meta.pkl"),
        pickle(&Value::Dict(meta(&sixteen()))),
    )?;
    std::fs::write(
        model.join("vocab.json"),
        format!("{{\"chars\": \"{SIXTEEN}\"}}"),
    )?;
    std::fs::write(model.join("tokenizer.json"), word_level(&WORDS))?;
    let used = |input: &Path| -> Result<String> {
        let o = ok(
            ngpt(&[
                "generate",
                utf8(input),
                "--tokens",
                "1,2",
                "--max-new-tokens",
                "2",
            ])?,
            "generate",
        )?;
        let err = stderr(&o);
        let line = err
            .lines()
            .find(|l| l.starts_with("vocabulary: "))
            .with_context(|| format!("no vocabulary line: {err}"))?;
        Ok(line.replace(&tmp.path().display().to_string(), "<TMP>"))
    };
    // Beside the checkpoint (a directory, then its safetensors file): tokenizer.json first.
    for input in [model.clone(), model.join("model.safetensors")] {
        assert_eq!(
            used(&input)?,
            "vocabulary: <TMP>/m/tokenizer.json (tokenizer.json, 16 tokens)"
        );
    }
    // A compiled directory carries the checkpoint's tokenizer.json (compile copies it)...
    let compiled = tmp.path().join("c");
    ok(
        ngpt(&["compile", utf8(&model), "-o", utf8(&compiled)])?,
        "compile",
    )?;
    assert_eq!(
        used(&compiled)?,
        "vocabulary: <TMP>/c/tokenizer.json (tokenizer.json, 16 tokens)"
    );
    // ...without it, the checkpoint's files through the manifest...
    std::fs::remove_file(compiled.join("tokenizer.json"))?;
    assert_eq!(
        used(&compiled)?,
        "vocabulary: <TMP>/m/tokenizer.json (tokenizer.json, 16 tokens)"
    );
    // ...unless the compiled directory holds one itself.
    std::fs::copy(model.join("meta.pkl"), compiled.join("meta.pkl"))?;
    assert_eq!(
        used(&compiled)?,
        "vocabulary: <TMP>/c/meta.pkl (meta.pkl, 16 tokens)"
    );
    std::fs::remove_file(compiled.join("meta.pkl"))?;
    // Then vocab.json, then meta.pkl.
    std::fs::remove_file(model.join("tokenizer.json"))?;
    assert_eq!(
        used(&compiled)?,
        "vocabulary: <TMP>/m/vocab.json (vocab.json, 16 tokens)"
    );
    std::fs::remove_file(model.join("vocab.json"))?;
    assert_eq!(
        used(&model)?,
        "vocabulary: <TMP>/m/meta.pkl (meta.pkl, 16 tokens)"
    );
    // --vocab wins over every file found.
    let other = tmp.path().join("words.json");
    std::fs::write(&other, word_level(&WORDS))?;
    let o = ok(
        ngpt(&[
            "generate",
            utf8(&model),
            "--tokens",
            "1",
            "--max-new-tokens",
            "1",
            "--vocab",
            utf8(&other),
        ])?,
        "generate --vocab",
    )?;
    assert!(
        stderr(&o).contains("vocabulary: ")
            && stderr(&o).contains("words.json (tokenizer.json, 16 tokens)"),
        "{}",
        stderr(&o)
    );
    Ok(())
}

#[test]
fn bad_vocabulary_files_fail_with_one_line() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = tmp.path().join("m");
    tiny_model(&model)?;
    let mut lines = String::new();
    for (what, name, bytes, needle) in bad_files() {
        // Given with --vocab, and found beside the model.
        let given = tmp.path().join(name);
        std::fs::write(&given, &bytes)?;
        let found = model.join(name);
        std::fs::write(&found, &bytes)?;
        for (how, path, args) in [
            ("--vocab", &given, vec!["--vocab", utf8(&given)]),
            ("found", &found, vec![]),
        ] {
            if how == "found" && !tokens::FILE_NAMES.contains(&name) {
                continue;
            }
            let mut full = vec!["generate", utf8(&model), "--prompt", "the cat"];
            full.extend(args);
            let e = clean_failure(&ngpt(&full)?, what);
            assert!(e.contains(needle), "{what} ({how}): lacks {needle:?}: {e}");
            assert!(
                e.starts_with(&format!("error: {}: ", path.display())),
                "{what} ({how}): the error does not start with the file: {e}"
            );
            if how == "--vocab" {
                lines += &format!("{what}: {e}\n");
            }
        }
        std::fs::remove_file(&found).ok();
        // The API says the same (but the model's size, which only the CLI knows).
        if !needle.contains("vocab_size is 16") {
            let e = err_text(Vocab::from_file(&given).err().context(what)?);
            assert!(e.contains(needle), "{what}: {e}");
        }
    }
    insta::assert_snapshot!(
        "vocab_errors",
        lines.replace(&tmp.path().display().to_string(), "<TMP>")
    );
    Ok(())
}

/// A Llama-style tokenizer.json: `<s>` (id 1) added at the start of every encoding by its
/// post-processor, as Hugging Face's fast tokenizer does.
fn with_bos() -> String {
    let mut t: serde_json::Value = serde_json::from_str(&word_level(&WORDS)).unwrap();
    t["model"]["vocab"] = serde_json::json!({
        "[UNK]": 0, "<s>": 1, "the": 2, "cat": 3, "sat": 4, "on": 5, "a": 6, "mat": 7,
        "and": 8, "dog": 9, "ran": 10, "to": 11, "it": 12, "was": 13, "big": 14, "red": 15
    });
    t["added_tokens"] = serde_json::json!([{"id": 1, "content": "<s>", "single_word": false,
        "lstrip": false, "rstrip": false, "normalized": false, "special": true}]);
    t["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
    });
    t.to_string()
}

/// A tokenizer whose post-processor adds BOS gives exactly one BOS at the start of a
/// prompt, never two (ngpt adds none of its own), through generate and a compiled
/// directory alike; a SentencePiece tokenizer.model alone gets one note saying how to
/// write tokenizer.json, and token ids still work.
#[test]
fn bos_comes_once_from_the_tokenizer_and_tokenizer_model_is_explained() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = tmp.path().join("m");
    tiny_model(&model)?;
    std::fs::write(model.join("tokenizer.json"), with_bos())?;
    let compiled = tmp.path().join("c");
    ok(
        ngpt(&["compile", utf8(&model), "-o", utf8(&compiled)])?,
        "compile",
    )?;
    for input in [&model, &compiled] {
        let o = ok(
            ngpt(&[
                "generate",
                utf8(input),
                "--prompt",
                "the big dog ran",
                "--max-new-tokens",
                "2",
                "--json",
            ])?,
            "generate --prompt",
        )?;
        let j: serde_json::Value =
            serde_json::from_str(stdout(&o).lines().last().context("no JSON line")?)?;
        let ids: Vec<u64> = j["prompt_tokens"]
            .as_array()
            .context("prompt_tokens")?
            .iter()
            .filter_map(|v| v.as_u64())
            .collect();
        assert_eq!(ids, [1, 2, 14, 9, 10], "{}", input.display());
        assert_eq!(ids.iter().filter(|&&t| t == 1).count(), 1, "BOS twice");
    }
    // tokenizer.model alone: one note, and generation from token ids still runs.
    std::fs::remove_file(model.join("tokenizer.json"))?;
    std::fs::write(model.join("tokenizer.model"), b"not read")?;
    let o = ok(
        ngpt(&[
            "generate",
            utf8(&model),
            "--tokens",
            "1,2",
            "--max-new-tokens",
            "1",
        ])?,
        "generate --tokens beside tokenizer.model",
    )?;
    let notes: Vec<String> = stderr(&o)
        .lines()
        .filter(|l| l.contains("tokenizer.model"))
        .map(String::from)
        .collect();
    assert_eq!(notes.len(), 1, "{}", stderr(&o));
    assert!(
        notes[0].starts_with("note: ")
            && notes[0].contains("SentencePiece")
            && notes[0].contains("LlamaTokenizerFast")
            && notes[0].contains("save_pretrained"),
        "{}",
        notes[0]
    );
    Ok(())
}
