//! `ngpt generate`: prefill, then KV-cache decode, streaming tokens as they come.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use std::sync::mpsc;

use anyhow::{bail, Context, Result};
use ngpt_runtime::engine::{Event, Finish, Request, SamplingParams};

use crate::tokens::{parse_tokens, Vocab};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// The launch plan on the CPU executor.
    PlanCpu,
    /// The launch plan on an NVIDIA GPU.
    PlanCuda,
}

/// Generate tokens: prefill the prompt, then decode with the KV cache, through the same
/// engine `ngpt serve` runs (a request's tokens are the same here and there).
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  ngpt generate tests/fixtures/nv-tiny --prompt \"Permission is \" --max-new-tokens 40\n  ngpt generate out/nv-tiny --tokens 45,64,77 --max-new-tokens 8 --temperature 0.8 --top-k 5 --seed 1 --json\n  ngpt generate out/shakespeare --vocab data/shakespeare_char/meta.pkl --prompt \"ROMEO:\" --max-new-tokens 200"
)]
pub struct Args {
    /// A checkpoint or a compiled directory.
    input: PathBuf,
    /// Comma-separated prompt token ids.
    #[arg(long, allow_hyphen_values = true, conflicts_with_all = ["prompt", "prompts"])]
    tokens: Option<String>,
    /// Prompt text (needs a vocabulary).
    #[arg(long, conflicts_with = "prompts")]
    prompt: Option<String>,
    /// A file with one prompt per line (token ids, or text with a vocabulary).
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample among the most likely tokens whose probabilities add up to p (1: all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// The sampler's seed; sequence i of a batch samples with SEED + i, so each gets the
    /// tokens it would get alone.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Go on past the tokenizer's end-of-sequence token (a tokenizer.json's; a char-level
    /// vocabulary defines none).
    #[arg(long)]
    ignore_eos: bool,
    /// Sequences: the prompt B times, or with --prompts one per line.
    #[arg(long)]
    batch: Option<usize>,
    /// Vocabulary: a nanoGPT meta.pkl, a vocab.json or a Hugging Face tokenizer.json
    /// (default: the first of tokenizer.json, vocab.json, meta.pkl in the compiled
    /// directory, then beside the checkpoint).
    #[arg(long)]
    vocab: Option<PathBuf>,
    #[arg(long, value_enum)]
    engine: Option<Engine>,
    /// The last line of stdout is one JSON object.
    #[arg(long)]
    json: bool,
}

/// The vocabulary: --vocab, else one found beside the model (`Vocab::find`).
fn find_vocab(a: &Args) -> Result<Option<Vocab>> {
    match &a.vocab {
        Some(p) => Vocab::from_file(p).map(Some),
        None => Vocab::find(&a.input),
    }
}

pub fn run(a: Args) -> Result<()> {
    // NaN would sample the last token every time; a negative temperature reads as a typo.
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        bail!(
            "--temperature {}: expected a finite number, at least 0 (0 is greedy)",
            a.temperature
        );
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p {}: expected a number in (0, 1]", a.top_p);
    }
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens 0: expected at least 1");
    }
    // Default: the GPU where CUDA is usable and the CUDA executor takes the plan, else the
    // CPU (said once the request is known to be servable). Asked for explicitly, plan-cuda
    // without a GPU is an error.
    let plan = super::input::load_plan(&a.input, 0)?;
    let cuda_missing = crate::engines::cuda_cannot_run(&plan);
    let engine = match (a.engine, &cuda_missing) {
        (Some(e), _) => e,
        (None, None) => Engine::PlanCuda,
        (None, Some(_)) => Engine::PlanCpu,
    };
    let runtime_engine = match engine {
        Engine::PlanCpu => crate::engines::Engine::PlanCpu,
        Engine::PlanCuda => crate::engines::Engine::PlanCuda,
    };
    let engine_name = runtime_engine.name();
    let vocab = find_vocab(&a)?;
    let v = plan.dims().vocab;
    if let Some(voc) = &vocab {
        voc.check_model_vocab(v)?;
    }
    let parse_line = |line: &str| -> Result<Vec<u32>> {
        let looks_numeric = line
            .trim()
            .chars()
            .all(|c| c.is_ascii_digit() || c == ',' || c == ' ' || c == '-');
        match (&vocab, looks_numeric) {
            (_, true) => parse_tokens(line, v),
            (Some(voc), false) => voc.encode(line),
            (None, false) => bail!(
                "prompt {line:?} is text but no vocabulary was found; pass --vocab or --tokens"
            ),
        }
    };
    let mut prompts: Vec<Vec<u32>> = match (&a.tokens, &a.prompt, &a.prompts) {
        (Some(t), _, _) => vec![parse_tokens(t, v)?],
        (_, Some(p), _) => {
            let voc = vocab
                .as_ref()
                .context("--prompt needs a vocabulary: pass --vocab FILE or use --tokens")?;
            vec![voc.encode(p)?]
        }
        (_, _, Some(f)) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading --prompts {}", f.display()))?;
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            if lines.is_empty() {
                bail!("--prompts {}: holds no prompt", f.display());
            }
            lines.into_iter().map(parse_line).collect::<Result<_>>()?
        }
        _ => bail!("give a prompt: --tokens, --prompt or --prompts"),
    };
    if prompts.iter().any(Vec::is_empty) {
        bail!("a prompt is empty; expected at least one token");
    }
    if let Some(b) = a.batch {
        if b == 0 {
            bail!("--batch 0: expected at least 1");
        }
        if prompts.len() == 1 {
            prompts = vec![prompts[0].clone(); b];
        } else if prompts.len() != b {
            bail!("--batch {b} but --prompts holds {} prompts", prompts.len());
        }
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let cap = plan.dims().max_seq_len;
    if longest
        .checked_add(a.max_new_tokens)
        .is_none_or(|n| n > cap)
    {
        bail!("prompt ({longest} tokens) plus --max-new-tokens {} exceeds the KV capacity {cap} (--max-seq-len at compile time)", a.max_new_tokens);
    }
    let b = prompts.len();
    let eos = end_of_sequence(&a, v)?;
    let mut opts = ngpt_runtime::engine::EngineOptions::new(b);
    opts.max_queue = b;
    opts.eos = eos;
    let mut gen = crate::engines::plan_engine(runtime_engine, plan, opts)?;
    // Said once the request is known to be servable, so a refused one prints only its error.
    if a.engine.is_none() && !a.json {
        match &cuda_missing {
            Some(why) => eprintln!("engine: plan-cpu ({why})"),
            None => eprintln!("engine: {}", gen.describe()),
        }
    }
    if let (Some(voc), false) = (&vocab, a.json) {
        eprintln!("vocabulary: {}", voc.describe());
    }
    let (tx, rx) = mpsc::channel::<(usize, Event)>();
    for (i, p) in prompts.iter().enumerate() {
        let tx = tx.clone();
        gen.submit(
            Request {
                prompt: p.clone(),
                params: SamplingParams {
                    max_tokens: a.max_new_tokens,
                    temperature: a.temperature,
                    top_k: a.top_k,
                    top_p: a.top_p,
                    seed: a.seed.wrapping_add(i as u64),
                    ignore_eos: a.ignore_eos,
                    ..SamplingParams::default()
                },
            },
            Box::new(move |e| tx.send((i, e)).is_ok()),
        )?;
    }
    drop(tx);
    let stream = b == 1 && !a.json;
    let mut out = std::io::stdout();
    let mut text_stream = vocab.as_ref().map(Vocab::stream);
    if stream {
        if let Some(ts) = &mut text_stream {
            print!("{}", ts.push(&prompts[0]));
        }
    }
    let mut generated: Vec<Vec<u32>> = vec![vec![]; b];
    let mut finish: Vec<Option<Finish>> = vec![None; b];
    let t0 = Instant::now();
    // When every sequence had its first token: the end of prefill.
    let mut prefill_s = None;
    loop {
        let more = gen.step();
        for (i, e) in rx.try_iter() {
            match e {
                Event::Token(g) => {
                    if stream {
                        match &mut text_stream {
                            Some(ts) => print!("{}", ts.push(&[g.token])),
                            None => print!(
                                "{}{}",
                                if generated[i].is_empty() { "" } else { "," },
                                g.token
                            ),
                        }
                        out.flush().ok();
                    }
                    generated[i].push(g.token);
                }
                Event::Finished { reason, .. } => finish[i] = Some(reason),
                Event::Failed(err) => bail!("sequence {i}: {err}"),
            }
        }
        if prefill_s.is_none()
            && generated
                .iter()
                .zip(&finish)
                .all(|(g, f)| !g.is_empty() || f.is_some())
        {
            prefill_s = Some(t0.elapsed().as_secs_f64());
        }
        if !more {
            break;
        }
    }
    let total_s = t0.elapsed().as_secs_f64();
    let prefill_s = prefill_s.unwrap_or(total_s);
    let decode_s = total_s - prefill_s;
    let prefill_tps = (b * longest) as f64 / prefill_s.max(1e-9);
    let decode_tokens: usize = generated.iter().map(|g| g.len().saturating_sub(1)).sum();
    let decode_tps = decode_tokens as f64 / decode_s.max(1e-9);
    if stream {
        if let Some(ts) = &mut text_stream {
            print!("{}", ts.finish());
        }
        println!();
    } else if !a.json {
        for g in &generated {
            match &vocab {
                Some(voc) => println!("{}", voc.decode(g)),
                None => println!(
                    "{}",
                    g.iter()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            }
        }
    }
    let reasons: Vec<&str> = finish
        .iter()
        .map(|f| match f {
            Some(Finish::Stop) => "stop",
            Some(Finish::Length) => "length",
            Some(Finish::Cancelled) | None => "cancelled",
        })
        .collect();
    if a.json {
        let one = |x: serde_json::Value| -> serde_json::Value {
            match x {
                serde_json::Value::Array(mut v) if b == 1 => v.remove(0),
                other => other,
            }
        };
        let mut obj = serde_json::json!({
            "prompt_tokens": one(serde_json::json!(prompts)),
            "tokens": one(serde_json::json!(generated)),
            "finish_reason": one(serde_json::json!(reasons)),
            "prefill_tokens_per_s": prefill_tps,
            "decode_tokens_per_s": decode_tps,
            "engine": engine_name,
        });
        if let Some(voc) = &vocab {
            let text: Vec<String> = generated.iter().map(|g| voc.decode(g)).collect();
            obj["text"] = one(serde_json::json!(text));
        }
        println!("{obj}");
    } else {
        eprintln!("prefill {prefill_tps:.1} tokens/s, decode {decode_tps:.1} tokens/s ({engine_name}, batch {b})");
    }
    Ok(())
}

/// The end-of-sequence tokens: those the tokenizer files beside the vocabulary define
/// (`--vocab`'s directory, else INPUT's), none for a char-level vocabulary.
fn end_of_sequence(a: &Args, vocab: usize) -> Result<Vec<u32>> {
    let dir = match &a.vocab {
        Some(p) => p.parent().map(std::path::Path::to_path_buf),
        None if a.input.is_dir() => Some(a.input.clone()),
        None => a.input.parent().map(std::path::Path::to_path_buf),
    };
    match dir {
        Some(d) => Ok(crate::tokens::files::special_tokens(&d, vocab)?.eos),
        None => Ok(vec![]),
    }
}
