//! `ngpt perplexity`: token-level negative log-likelihood of a text under the model.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::logits::PrecisionArg;
use crate::engines::{Engine, Model};
use crate::tokens::Vocab;

/// The perplexity of a text: the text is tokenized with the model's vocabulary, cut into
/// windows of --window tokens (default: the model's trained context, block_size or
/// n_positions) that start every --stride tokens (default: half a window), and every token
/// after the first is scored once: the first window's with what precedes them, each
/// later one in the window that first reaches it, with at least window - stride tokens
/// of context. Prints the tokens scored, the mean negative log-likelihood in nats and its
/// exponential, the perplexity.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  ngpt perplexity tests/fixtures/nv-tiny --text tests/fixtures/text/Apache-2.0.txt\n  ngpt perplexity out/int4 --text tests/fixtures/text/Apache-2.0.txt --engine tract --window 128"
)]
pub struct Args {
    /// A checkpoint or a compiled directory (its own model.onnx and model.plan run under
    /// tract and plan-cpu; reference and ir use its recorded source, quantized as compiled).
    input: PathBuf,
    /// The text file to score.
    #[arg(long)]
    text: PathBuf,
    #[arg(long, value_enum, default_value = "reference")]
    engine: Engine,
    /// Tokens per window (default: the model's trained context).
    #[arg(long)]
    window: Option<usize>,
    /// Tokens between window starts (default: half the window).
    #[arg(long)]
    stride: Option<usize>,
    /// Vocabulary file (default: the one beside the model, as `generate` finds it).
    #[arg(long)]
    vocab: Option<PathBuf>,
    /// Precision of the reference and ir engines.
    #[arg(long, value_enum, default_value = "f64")]
    precision: PrecisionArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// What a perplexity run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Score {
    /// Tokens scored (every token of the text but the first).
    pub tokens: usize,
    /// Mean negative log-likelihood, nats per token.
    pub nll: f64,
    /// exp(nll).
    pub perplexity: f64,
    /// Tokens per window and between window starts.
    pub window: usize,
    pub stride: usize,
}

/// Scores `ids` with `logits(window) -> [len, vocab]` row-major logits, windows of
/// `window` tokens every `stride` tokens (see [`Args`]), in f64 (log-sum-exp per row).
pub fn score(
    ids: &[u32],
    vocab: usize,
    window: usize,
    stride: usize,
    mut logits: impl FnMut(&[u32]) -> Result<Vec<f64>>,
) -> Result<Score> {
    if window < 2 || stride == 0 || stride >= window {
        bail!("--window {window} --stride {stride}: need window >= 2 and 0 < stride < window");
    }
    if ids.len() < 2 {
        bail!(
            "--text: {} token(s); at least 2 are needed to score one",
            ids.len()
        );
    }
    let (mut sum, mut count, mut scored_until, mut start) = (0f64, 0usize, 1usize, 0usize);
    loop {
        let end = (start + window).min(ids.len());
        let rows = logits(&ids[start..end])?;
        if rows.len() != (end - start) * vocab {
            bail!(
                "the engine returned {} logits for {} positions",
                rows.len(),
                end - start
            );
        }
        for t in scored_until.max(start + 1)..end {
            let row = &rows[(t - 1 - start) * vocab..(t - start) * vocab];
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            sum += lse - row[ids[t] as usize];
            count += 1;
        }
        scored_until = end;
        if end == ids.len() {
            break;
        }
        start += stride;
    }
    let nll = sum / count as f64;
    Ok(Score {
        tokens: count,
        nll,
        perplexity: nll.exp(),
        window,
        stride,
    })
}

pub fn run(a: Args) -> Result<()> {
    let mut model = Model::open(&a.input);
    let vocab_size = model.vocab_size()?;
    let vocab = match &a.vocab {
        Some(p) => Vocab::from_file(p)?,
        None => Vocab::find(&a.input)?.with_context(|| {
            format!(
                "{}: no vocabulary found beside the model; pass --vocab",
                a.input.display()
            )
        })?,
    };
    vocab.check_model_vocab(vocab_size)?;
    let text =
        std::fs::read_to_string(&a.text).with_context(|| format!("--text {}", a.text.display()))?;
    let ids = vocab
        .encode(&text)
        .with_context(|| format!("--text {}", a.text.display()))?;
    let window = match a.window {
        Some(w) => w,
        None => model.checkpoint()?.config.block_size,
    };
    let stride = a.stride.unwrap_or((window / 2).max(1));
    let (engine, precision) = (a.engine, a.precision.into());
    let s = score(&ids, vocab_size, window, stride, |w| {
        model.logits(engine, w, precision)
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!(
            "{}: {} tokens scored by {} (window {}, stride {}): mean NLL {:.6} nats, perplexity {:.6}",
            a.text.display(),
            s.tokens,
            engine.name(),
            s.window,
            s.stride,
            s.nll,
            s.perplexity
        );
    }
    Ok(())
}
