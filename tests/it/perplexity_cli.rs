//! `ngpt perplexity`: equals a float64 perplexity computed here from `reference` logits.

use std::process::Command;

use anyhow::Result;
use ngpt_compiler::import;
use ngpt_compiler::reference::{self, Precision};

use crate::common::nv_tiny;

#[test]
fn perplexity_equals_an_independent_float64_computation_from_reference_logits() -> Result<()> {
    let text_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text/Apache-2.0.txt");
    // The first 300 characters: nv-tiny's vocabulary is char-level (vocab.json).
    let text: String = std::fs::read_to_string(&text_path)?
        .chars()
        .take(300)
        .collect();
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("text.txt");
    std::fs::write(&file, &text)?;
    let vocab: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(nv_tiny().join("vocab.json"))?)?;
    let chars: Vec<char> = vocab["chars"].as_str().expect("chars").chars().collect();
    let ids: Vec<u32> = text
        .chars()
        .map(|c| {
            chars
                .iter()
                .position(|&x| x == c)
                .expect("in the vocabulary") as u32
        })
        .collect();
    let ckpt = import::load(&nv_tiny())?;
    let (w, stride, v) = (64usize, 32usize, ckpt.config.vocab_size);
    // Windows [s, s + 64) every 32 tokens; each token after the first scored once, in the
    // first window that holds it with a token before it.
    let (mut sum, mut n, mut done, mut s) = (0f64, 0usize, 1usize, 0usize);
    loop {
        let e = (s + w).min(ids.len());
        let l = reference::logits(&ckpt, &ids[s..e], Precision::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        for t in done.max(s + 1)..e {
            let row = &l[(t - 1 - s) * v..(t - s) * v];
            let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
            sum += lse - row[ids[t] as usize];
            n += 1;
        }
        done = e;
        if e == ids.len() {
            break;
        }
        s += stride;
    }
    let want = (sum / n as f64).exp();
    let out = Command::new(env!("CARGO_BIN_EXE_ngpt"))
        .args(["perplexity", nv_tiny().to_str().expect("utf-8"), "--text"])
        .arg(&file)
        .arg("--json")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(got["tokens"].as_u64(), Some(ids.len() as u64 - 1));
    assert_eq!(got["window"].as_u64(), Some(64), "nv-tiny's block_size");
    let p = got["perplexity"].as_f64().expect("perplexity");
    assert!((p / want - 1.0).abs() < 1e-12, "{p} vs {want}");
    Ok(())
}
