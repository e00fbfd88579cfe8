//! `ngpt serve`: an OpenAI-compatible HTTP server with continuous batching.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ngpt_runtime::engine::{Engine as RuntimeEngine, EngineHandle, EngineOptions};

use super::generate::Engine;
use crate::serve::chat::ChatTemplate;
use crate::serve::{AppState, ServeOptions};
use crate::tokens::Vocab;

/// Serve a model over HTTP: OpenAI's /v1/completions and /v1/chat/completions, with
/// /v1/models, /health and /metrics.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  ngpt serve tests/fixtures/nv-tiny --port 8000\n  ngpt serve out/nous-0.5b --host 0.0.0.0 --max-batch 16 --api-key \"$KEY\"\n  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{\"prompt\": \"Permission is \", \"max_tokens\": 20}'"
)]
pub struct Args {
    /// A checkpoint or a compiled directory.
    input: PathBuf,
    /// The address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// The port (0: any free one; the address bound is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    #[arg(long, value_enum)]
    engine: Option<Engine>,
    /// Sequences generating at once: the KV-cache slots, each of the plan's capacity.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Requests waiting for a slot; past that, 429 (default: 4 x --max-batch).
    #[arg(long)]
    max_queue: Option<usize>,
    /// Every endpoint but /health requires `Authorization: Bearer KEY`.
    #[arg(long)]
    api_key: Option<String>,
    /// The model id /v1/models lists and requests name (default: INPUT's directory name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Vocabulary: as for `ngpt generate` (default: the one found beside the model).
    #[arg(long)]
    vocab: Option<PathBuf>,
    /// Seconds running requests get to finish after SIGTERM or ctrl-c.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
    /// Request bodies over this many bytes get 413.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Prefill long prompts in one call (faster) instead of fixed chunks; a request's
    /// logits then depend on the traffic beside it (see RELIABILITY.md).
    #[arg(long)]
    no_batch_invariance: bool,
}

/// The model's default id: the directory's name (a checkpoint file's directory).
fn model_id(input: &Path) -> String {
    let path = std::fs::canonicalize(input).unwrap_or_else(|_| input.to_path_buf());
    let dir = if path.is_dir() {
        path.as_path()
    } else {
        path.parent().unwrap_or(&path)
    };
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ngpt".into())
}

pub fn run(a: Args) -> Result<()> {
    if a.max_batch == 0 {
        bail!("--max-batch 0: expected at least 1");
    }
    if !(a.drain_timeout.is_finite() && a.drain_timeout >= 0.0) {
        bail!(
            "--drain-timeout {}: expected seconds, at least 0",
            a.drain_timeout
        );
    }
    if a.api_key.as_deref() == Some("") {
        bail!("--api-key: empty");
    }
    let plan = super::input::load_plan(&a.input, 0)?;
    let cuda_missing = crate::engines::cuda_cannot_run(&plan);
    let engine = match (a.engine, &cuda_missing) {
        (Some(Engine::PlanCuda), Some(why)) => bail!("--engine plan-cuda: {why}"),
        (Some(e), _) => e,
        (None, None) => Engine::PlanCuda,
        (None, Some(why)) => {
            eprintln!("engine: plan-cpu ({why})");
            Engine::PlanCpu
        }
    };
    let vocab = match &a.vocab {
        Some(p) => Some(Vocab::from_file(p)?),
        None => Vocab::find(&a.input)?,
    };
    let dims = *plan.dims();
    if let Some(v) = &vocab {
        v.check_model_vocab(dims.vocab)?;
        eprintln!("vocabulary: {}", v.describe());
    }
    let dirs = crate::tokens::model_dirs(&a.input)?;
    let chat = ChatTemplate::find(&dirs)?;
    if let Some(c) = &chat {
        eprintln!("chat template: {}", c.source.display());
    }
    // EOS only where a tokenizer.json defines it (a char-level vocabulary defines none).
    let mut eos = vec![];
    for d in &dirs {
        let special = crate::tokens::files::special_tokens(d, dims.vocab)?;
        if !special.eos.is_empty() {
            eos = special.eos;
            break;
        }
    }
    // The KV caches are committed as sequences grow: a server whose slots do not fit would
    // be killed mid-traffic, so they are checked now.
    if engine == Engine::PlanCpu {
        let per_slot = dims.n_layer as f64
            * 2.0
            * dims.n_head as f64
            * dims.max_seq_len as f64
            * dims.head_dim as f64
            * 4.0;
        let fit = crate::memory::available_bytes()
            .map(|b| (b as f64 / per_slot).floor() as u64)
            .unwrap_or(u64::MAX);
        crate::memory::ensure_fits(
            per_slot * a.max_batch as f64,
            &format!("--max-batch {}", a.max_batch),
            &format!(
                "KV caches of {} tokens x {} layers per slot",
                dims.max_seq_len, dims.n_layer
            ),
            &format!("at most {fit} slots fit; pass a smaller --max-batch or compile with a smaller --max-seq-len"),
        )?;
    }
    let mut opts = EngineOptions::new(a.max_batch);
    if let Some(q) = a.max_queue {
        opts.max_queue = q;
    }
    opts.eos = eos;
    opts.invariant = !a.no_batch_invariance;
    let model_id = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| model_id(&a.input));
    let state = Arc::new(AppState::new(
        model_id,
        a.api_key.clone(),
        vocab,
        chat,
        dims.vocab,
        dims.max_seq_len,
        a.max_body_bytes,
    ));
    let cuda = crate::settings::get().cuda;
    let load = move || -> Result<EngineHandle> {
        let handle = EngineHandle::spawn(move || match engine {
            Engine::PlanCpu => RuntimeEngine::cpu(plan, opts),
            Engine::PlanCuda => RuntimeEngine::cuda(plan, opts, &cuda),
        })
        .context("starting the engine")?;
        Ok(handle)
    };
    crate::serve::serve(
        state,
        ServeOptions {
            addr: SocketAddr::new(a.host, a.port),
            drain: Duration::from_secs_f64(a.drain_timeout),
        },
        load,
    )
}
