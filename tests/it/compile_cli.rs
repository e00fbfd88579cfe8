//! `ngpt compile` and `ngpt logits --engine ir` through the binary.

use crate::common;

use std::process::Command;

use anyhow::Result;
use ngpt_compiler::compare::compare;
use ngpt_compiler::import;
use ngpt_compiler::reference::Precision;

fn ngpt(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ngpt"))
        .args(args)
        .output()
        .expect("ngpt runs")
}

fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn compile_writes_the_directory_and_ir_logits_match_the_reference() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("c");
    let ckpt_path = common::nv_tiny().join("ckpt.pt");
    let o = ngpt(&[
        "compile",
        ckpt_path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        entries(&out),
        [
            "genai_config.json",
            "ir.txt",
            "manifest.json",
            "model.onnx",
            "model.plan",
            "model.weights",
            "passes.txt"
        ]
    );
    assert_eq!(
        entries(tmp.path()),
        ["c"],
        "no temporary directory left beside the output"
    );
    let ir = std::fs::read_to_string(out.join("ir.txt"))?;
    assert!(ir.contains("lerp_norm") && ir.contains("pos_norm") && ir.contains("swiglu"));
    let passes = std::fs::read_to_string(out.join("passes.txt"))?;
    assert_eq!(
        passes.lines().filter(|l| l.contains("rewrites")).count(),
        10
    );

    // logits --engine ir on the compiled directory uses the recorded source.
    let tokens = common::fixture_tokens("prompt.json", "tokens")?;
    let list: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let npy = tmp.path().join("ir.npy");
    let o = ngpt(&[
        "logits",
        out.to_str().unwrap(),
        "--engine",
        "ir",
        "--precision",
        "f32",
        "--tokens",
        &list.join(","),
        "-o",
        npy.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (dims, _, got) = common::read_npy(&npy)?;
    let ckpt = import::load(&ckpt_path)?;
    assert_eq!(dims, [tokens.len(), ckpt.config.vocab_size]);
    let want = common::ref_logits(&ckpt, &tokens, Precision::F64)?;
    let c = compare(&got, &want, ckpt.config.vocab_size);
    assert!(c.passes(1e-5, 1.0), "{c:?}");
    Ok(())
}

#[test]
fn compile_refuses_an_occupied_directory_and_force_replaces_it_whole() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("c");
    std::fs::create_dir(&out)?;
    std::fs::write(out.join("old.txt"), "old")?;
    let src = common::nv_tiny();
    let o = ngpt(&[
        "compile",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--force")
            && err.lines().count() >= 1
            && err.lines().last().unwrap().starts_with("error:"),
        "{err}"
    );
    assert_eq!(entries(&out), ["old.txt"]);
    let o = ngpt(&[
        "compile",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--force",
        "--stop-after",
        "3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A partial compile has no plan (plans need the canonical form); every IR op exports.
    assert_eq!(
        entries(&out),
        [
            "genai_config.json",
            "ir.txt",
            "manifest.json",
            "model.onnx",
            "passes.txt"
        ]
    );
    assert_eq!(entries(tmp.path()), ["c"]);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json"))?)?;
    assert_eq!(manifest["stop_after"], 3);
    assert_eq!(manifest["passes"].as_array().unwrap().len(), 3);
    Ok(())
}

#[test]
fn a_failed_compile_leaves_nothing_behind() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("c");
    let o = ngpt(&[
        "compile",
        tmp.path().join("missing.pt").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(entries(tmp.path()).is_empty());
    let o = ngpt(&[
        "compile",
        common::nv_tiny().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--stop-after",
        "99",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--stop-after 99"));
    assert!(entries(tmp.path()).is_empty());
    Ok(())
}

#[test]
fn a_compiled_directory_whose_source_changed_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("m");
    std::fs::create_dir(&src)?;
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(common::nv_tiny().join(f), src.join(f))?;
    }
    let out = tmp.path().join("c");
    assert!(ngpt(&[
        "compile",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap()
    ])
    .status
    .success());
    let mut bytes = std::fs::read(src.join("model.safetensors"))?;
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(src.join("model.safetensors"), bytes)?;
    let npy = tmp.path().join("x.npy");
    let o = ngpt(&[
        "logits",
        out.to_str().unwrap(),
        "--engine",
        "ir",
        "--tokens",
        "1,2",
        "-o",
        npy.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("changed since it was compiled"));
    assert!(!npy.exists());
    Ok(())
}

/// A position table too large for the memory the process may still allocate is refused in
/// one line before it is built (an allocation that fails would abort the process), and
/// nothing is written; the same limit leaves the default table alone.
#[test]
fn a_position_table_too_large_for_memory_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("c");
    let run = |extra: &str| {
        let cmd = format!(
            "ulimit -v 4000000 && MALLOC_ARENA_MAX=2 exec \"$0\" compile \"$1\" -o \"$2\" {extra}"
        );
        Command::new("bash")
            .args([
                "-c",
                &cmd,
                env!("CARGO_BIN_EXE_ngpt"),
                common::nv_tiny().join("ckpt.pt").to_str().unwrap(),
                out.to_str().unwrap(),
            ])
            .output()
            .expect("bash runs")
    };
    // 100,000,000 rows of head_dim 32: 25.6 GB in f64 alone.
    let o = run("--max-seq-len 100000000");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: --max-seq-len 100000000 needs about 76.8 GB (for the position table, 100000000 x 32 values)"),
        "{err}"
    );
    assert!(entries(tmp.path()).is_empty());
    let o = run("");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("model.plan").exists());
    Ok(())
}

/// A Hugging Face WordLevel tokenizer.json of 16 tokens, `<s>` and `</s>` among them.
const TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,
    "added_tokens":[{"id":0,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
                    {"id":1,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
    "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
    "model":{"type":"WordLevel","vocab":{"<s>":0,"</s>":1,"a":2,"b":3,"c":4,"d":5,"e":6,"f":7,"g":8,"h":9,"i":10,"j":11,"k":12,"l":13,"m":14,"n":15},"unk_token":"</s>"}}"#;

fn json(path: &std::path::Path) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

#[test]
fn compile_writes_genai_config_and_carries_the_tokenizer_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // nv-tiny: a char-level vocab.json defines no special tokens, so none are written, and
    // the directory says it runs from token ids.
    let out = tmp.path().join("nv");
    let ckpt = common::nv_tiny().join("ckpt.pt");
    let o = ngpt(&[
        "compile",
        ckpt.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--max-seq-len",
        "96",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("note: no tokenizer.json beside") && err.contains("from token ids"),
        "{err}"
    );
    // Without model.onnx there is no genai_config.json, and no note about it.
    let plain = tmp.path().join("plain");
    let o = ngpt(&[
        "compile",
        ckpt.to_str().unwrap(),
        "-o",
        plain.to_str().unwrap(),
        "--no-onnx",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("tokenizer.json"), "{err}");
    let g = json(&out.join("genai_config.json"))?;
    let cfg = json(&common::nv_tiny().join("config.json"))?;
    let m = &g["model"];
    assert_eq!(m["type"], "decoder");
    assert_eq!(m["context_length"], 96);
    assert_eq!(m["vocab_size"], cfg["vocab_size"]);
    assert_eq!(m["decoder"]["num_hidden_layers"], cfg["n_layer"]);
    assert_eq!(m["decoder"]["num_attention_heads"], cfg["n_head"]);
    assert_eq!(m["decoder"]["hidden_size"], cfg["n_embd"]);
    assert_eq!(
        m["decoder"]["head_size"].as_u64(),
        Some(cfg["n_embd"].as_u64().unwrap() / cfg["n_head"].as_u64().unwrap())
    );
    for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        assert!(
            m.get(k).is_none(),
            "{k} written for a char-level vocabulary"
        );
    }
    assert_eq!(g["search"]["past_present_share_buffer"], false);
    let files = json(&out.join("manifest.json"))?["files"].clone();
    assert!(files
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "genai_config.json"));

    // A checkpoint with Hugging Face tokenizer files beside it: they are copied byte for
    // byte, listed in the manifest, and their special tokens reach genai_config.json.
    let src = tmp.path().join("hf");
    let o = ngpt(&["init", src.to_str().unwrap(), "--vocab", "16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let extra = [
        ("tokenizer.json", TOKENIZER),
        (
            "tokenizer_config.json",
            r#"{"bos_token": "<s>", "eos_token": {"content": "</s>"}}"#,
        ),
        ("chat_template.jinja", "{{ messages }}"),
    ];
    for (name, text) in extra {
        std::fs::write(src.join(name), text)?;
    }
    let out = tmp.path().join("hf-out");
    let o = ngpt(&[
        "compile",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--onnx-dtype",
        "f16",
        "--external-data",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("no tokenizer.json"));
    let files = json(&out.join("manifest.json"))?["files"].clone();
    for (name, text) in extra {
        assert_eq!(std::fs::read_to_string(out.join(name))?, text, "{name}");
        assert!(
            files.as_array().unwrap().iter().any(|f| f == name),
            "{name} not in the manifest"
        );
    }
    let m = json(&out.join("genai_config.json"))?["model"].clone();
    assert_eq!(
        (m["bos_token_id"].as_u64(), m["eos_token_id"].as_u64()),
        (Some(0), Some(1))
    );
    assert!(m.get("pad_token_id").is_none());
    assert!(out.join("model.onnx.data").is_file());

    // generation_config.json takes precedence; an id outside the vocabulary is refused in
    // one line naming the file and field, and no directory is left behind.
    std::fs::write(
        src.join("generation_config.json"),
        r#"{"eos_token_id": [1, 3], "pad_token_id": 2}"#,
    )?;
    let out = tmp.path().join("gen");
    let o = ngpt(&[
        "compile",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = json(&out.join("genai_config.json"))?["model"].clone();
    assert_eq!(m["eos_token_id"], serde_json::json!([1, 3]));
    assert_eq!(
        (m["bos_token_id"].as_u64(), m["pad_token_id"].as_u64()),
        (Some(0), Some(2))
    );
    std::fs::write(
        src.join("generation_config.json"),
        r#"{"eos_token_id": 16}"#,
    )?;
    let bad = tmp.path().join("bad");
    let o = ngpt(&[
        "compile",
        src.to_str().unwrap(),
        "-o",
        bad.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("generation_config.json: `eos_token_id` is 16; expected a token id in 0..16"),
        "{err}"
    );
    assert!(!bad.exists(), "a refused compile left {}", bad.display());
    Ok(())
}
