//! `genai_config.json`: what onnxruntime-genai needs beside `model.onnx` to run it with its
//! own generation loop (its generic `decoder` model type). The export's I/O names are the
//! ones that model type reads (`input_ids`, `attention_mask`, `position_ids`,
//! `past_key_values.%d.key|value`, `logits`, `present.%d.key|value`); this file states the
//! shapes, the context length and the greedy search defaults.
//!
//! Our KV graph concatenates the new keys and values onto the past ones (it does not write
//! into max-length buffers), so `past_present_share_buffer` is false. Special token ids are
//! written only where the model's tokenizer files define them: onnxruntime-genai rejects
//! -1, and a made-up id that is a real token (the fixtures' `config.json` ids are training
//! leftovers) would stop generation at that character.
//!
//! ```
//! use ngpt_compiler::onnx::genai::{config_json, SpecialTokens};
//! let cfg = ngpt_compiler::init::InitOptions::preset(ngpt_compiler::init::Preset::Tiny).config()?;
//! let text = config_json(&cfg, 2048, "model.onnx", &SpecialTokens::default());
//! let v: serde_json::Value = serde_json::from_str(&text).expect("config_json writes JSON");
//! assert_eq!(v["model"]["type"], "decoder");
//! assert_eq!(v["model"]["context_length"], 2048);
//! assert!(v["model"].get("eos_token_id").is_none()); // none defined, none written
//! assert_eq!(v["search"]["past_present_share_buffer"], false);
//! # Ok::<(), ngpt_compiler::Error>(())
//! ```

use serde_json::{json, Map, Value};

use crate::config::Config;

use super::emit::{ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS};

/// File name of the configuration inside a compiled directory.
pub const CONFIG_FILE: &str = "genai_config.json";

/// Special token ids from the model's tokenizer files, where they define them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End of sequence: one id, or several (generation stops at any of them).
    pub eos: Vec<u32>,
    /// Padding.
    pub pad: Option<u32>,
}

/// The `genai_config.json` text for a model of `cfg` exported with a position table of
/// `context_length` rows to `filename`. Keys are sorted, so the text is deterministic.
pub fn config_json(
    cfg: &Config,
    context_length: usize,
    filename: &str,
    special: &SpecialTokens,
) -> String {
    let mut model = Map::new();
    model.insert("type".into(), json!("decoder"));
    model.insert("context_length".into(), json!(context_length));
    model.insert("vocab_size".into(), json!(cfg.vocab_size));
    if let Some(b) = special.bos {
        model.insert("bos_token_id".into(), json!(b));
    }
    match special.eos.as_slice() {
        [] => {}
        [one] => {
            model.insert("eos_token_id".into(), json!(one));
        }
        many => {
            model.insert("eos_token_id".into(), json!(many));
        }
    }
    if let Some(p) = special.pad {
        model.insert("pad_token_id".into(), json!(p));
    }
    model.insert(
        "decoder".into(),
        json!({
            "filename": filename,
            "head_size": cfg.head_dim(),
            "hidden_size": cfg.n_embd,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_head,
            "num_hidden_layers": cfg.n_layer,
            "session_options": {
                "log_id": "ngpt",
                "provider_options": []
            },
            "inputs": {
                "input_ids": INPUT_IDS,
                "attention_mask": ATTENTION_MASK,
                "position_ids": POSITION_IDS,
                "past_key_names": "past_key_values.%d.key",
                "past_value_names": "past_key_values.%d.value"
            },
            "outputs": {
                "logits": LOGITS,
                "present_key_names": "present.%d.key",
                "present_value_names": "present.%d.value"
            }
        }),
    );
    let config = json!({
        "model": Value::Object(model),
        "search": {
            "do_sample": false,
            "early_stopping": true,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": false,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0
        }
    });
    let mut text = serde_json::to_string_pretty(&config)
        .expect("a JSON value of maps, strings and finite numbers always serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Config {
        crate::init::InitOptions::preset(crate::init::Preset::Tiny)
            .config()
            .unwrap()
    }

    #[test]
    fn the_config_states_the_models_shapes_and_names() {
        let cfg = tiny();
        let v: Value = serde_json::from_str(&config_json(
            &cfg,
            96,
            "model.onnx",
            &SpecialTokens::default(),
        ))
        .unwrap();
        let d = &v["model"]["decoder"];
        assert_eq!(d["head_size"], cfg.head_dim());
        assert_eq!(d["hidden_size"], cfg.n_embd);
        assert_eq!(d["num_attention_heads"], cfg.n_head);
        assert_eq!(d["num_key_value_heads"], cfg.n_head);
        assert_eq!(d["num_hidden_layers"], cfg.n_layer);
        assert_eq!(d["inputs"]["past_key_names"], "past_key_values.%d.key");
        assert_eq!(d["outputs"]["present_value_names"], "present.%d.value");
        assert_eq!(v["model"]["vocab_size"], cfg.vocab_size);
        assert_eq!(v["search"]["max_length"], 96);
        for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            assert!(v["model"].get(k).is_none(), "{k}");
        }
    }

    #[test]
    fn special_tokens_are_written_where_defined() {
        let one = SpecialTokens {
            bos: Some(1),
            eos: vec![2],
            pad: None,
        };
        let v: Value = serde_json::from_str(&config_json(&tiny(), 8, "model.onnx", &one)).unwrap();
        assert_eq!(v["model"]["bos_token_id"], 1);
        assert_eq!(v["model"]["eos_token_id"], 2);
        assert!(v["model"].get("pad_token_id").is_none());
        let many = SpecialTokens {
            bos: None,
            eos: vec![2, 7],
            pad: Some(0),
        };
        let v: Value = serde_json::from_str(&config_json(&tiny(), 8, "model.onnx", &many)).unwrap();
        assert_eq!(v["model"]["eos_token_id"], json!([2, 7]));
        assert_eq!(v["model"]["pad_token_id"], 0);
    }
}
