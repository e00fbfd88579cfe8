//! `ngpt serve`'s HTTP server: an OpenAI-compatible API over one engine
//! ([`ngpt_runtime::engine::EngineHandle`]), on tokio and axum.
//!
//! - `api.rs`: error objects and request validation.
//! - `routes.rs`: the endpoints and the response objects.
//! - `stream.rs`: one request's generation (text, stop strings, timing).
//! - `chat.rs`: Hugging Face chat templates.
//! - `metrics.rs`: the Prometheus registry.
//!
//! Lifecycle ([`serve`]): bind, print the address, answer `/health` with 503 while the
//! engine loads and warms up, then 200; on SIGTERM or ctrl-c, 503 again while the running
//! and queued requests finish (new ones get 503), at most `drain` long, then exit.

pub mod api;
pub mod chat;
pub mod metrics;
pub mod routes;
pub mod stream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ngpt_runtime::engine::EngineHandle;

use crate::tokens::Vocab;
use api::ApiError;
use chat::ChatTemplate;
use metrics::Metrics;

/// Where the server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Bound; the engine is loading or warming up.
    Loading,
    Ready,
    /// Shutting down: finishing what runs, taking nothing new.
    Draining,
}

/// What every handler shares.
pub struct AppState {
    /// The id `/v1/models` lists and `model` must name.
    pub model_id: String,
    pub api_key: Option<String>,
    pub vocab: Option<Arc<Vocab>>,
    pub chat: Option<ChatTemplate>,
    /// Logits per position.
    pub vocab_size: usize,
    /// KV capacity per sequence: prompt plus generated tokens.
    pub capacity: usize,
    /// Request bodies above this many bytes get 413.
    pub max_body: usize,
    pub metrics: Metrics,
    /// Set once the engine is loaded.
    pub engine: OnceLock<EngineHandle>,
    pub created: u64,
    pub next_id: AtomicU64,
    phase: AtomicU8,
}

impl AppState {
    /// A server for a model; `engine` is set once it is loaded.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model_id: String,
        api_key: Option<String>,
        vocab: Option<Vocab>,
        chat: Option<ChatTemplate>,
        vocab_size: usize,
        capacity: usize,
        max_body: usize,
    ) -> AppState {
        AppState {
            model_id,
            api_key,
            vocab: vocab.map(Arc::new),
            chat,
            vocab_size,
            capacity,
            max_body,
            metrics: Metrics::new(),
            engine: OnceLock::new(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            next_id: AtomicU64::new(0),
            phase: AtomicU8::new(Phase::Loading as u8),
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Loading,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::SeqCst);
    }

    /// The engine, if it takes requests now.
    pub fn engine(&self) -> Result<&EngineHandle, ApiError> {
        match (self.phase(), self.engine.get()) {
            (Phase::Ready, Some(e)) => Ok(e),
            (Phase::Draining, _) => Err(ApiError::unavailable("the server is shutting down")),
            _ => Err(ApiError::unavailable("the model is still loading")),
        }
    }
}

/// The endpoint label of the request metrics (a fixed set, whatever the path).
fn endpoint(path: &str) -> &'static str {
    match path {
        "/v1/completions" => "completions",
        "/v1/chat/completions" => "chat_completions",
        "/health" => "health",
        "/metrics" => "metrics",
        p if p == "/v1/models" || p.starts_with("/v1/models/") => "models",
        _ => "other",
    }
}

/// Every endpoint but /health needs the API key, when there is one; every answer is
/// counted by endpoint and status.
async fn guard(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let label = endpoint(req.uri().path());
    let response = match &s.api_key {
        Some(key) if label != "health" => {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if given.map(str::trim) == Some(key.as_str()) {
                next.run(req).await
            } else {
                ApiError::unauthorized().into_response()
            }
        }
        _ => next.run(req).await,
    };
    s.metrics
        .requests
        .with_label_values(&[label, response.status().as_str()])
        .inc();
    response
}

/// The router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body;
    Router::new()
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/models", get(routes::models))
        .route("/v1/models/{id}", get(routes::model))
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), guard))
        .with_state(state)
}

/// How the server runs.
pub struct ServeOptions {
    pub addr: SocketAddr,
    /// How long running requests may take to finish after SIGTERM.
    pub drain: Duration,
}

/// Resolves on SIGTERM or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = async {
        // Without a handler there is nothing to wait for but SIGTERM.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Binds, prints `listening on http://ADDR` on stdout, loads the engine with `load` (on a
/// thread of its own, while /health answers 503), serves until SIGTERM or ctrl-c, drains,
/// and returns. A `load` that fails stops the server with its error.
pub fn serve(
    state: Arc<AppState>,
    opts: ServeOptions,
    load: impl FnOnce() -> Result<EngineHandle> + Send + 'static,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ngpt-http")
        .build()
        .context("starting the server's runtime")?;
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.addr)
            .await
            .with_context(|| format!("binding {}", opts.addr))?;
        let bound = listener.local_addr().context("reading the bound address")?;
        {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on http://{bound}").context("writing to stdout")?;
            out.flush().context("writing to stdout")?;
        }
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let app = router(Arc::clone(&state));
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // Either the sender says stop or it is gone: both mean stop.
                    let _ = stop_rx.wait_for(|&stop| stop).await;
                })
                .await
        });
        let loaded = tokio::task::spawn_blocking(load);
        tokio::pin!(loaded);
        let signal = shutdown_signal();
        tokio::pin!(signal);
        // Load, unless a signal comes first.
        let failure = tokio::select! {
            l = &mut loaded => match l {
                Ok(Ok(engine)) => {
                    eprintln!("engine: {}", engine.describe());
                    let _ = state.engine.set(engine);
                    state.set_phase(Phase::Ready);
                    eprintln!("ready: {} on http://{bound}", state.model_id);
                    None
                }
                Ok(Err(e)) => Some(e),
                Err(e) => Some(anyhow::anyhow!("loading the engine: {e}")),
            },
            _ = &mut signal => None,
        };
        if failure.is_none() && state.phase() == Phase::Ready {
            signal.await;
        }
        state.set_phase(Phase::Draining);
        if let Some(engine) = state.engine.get() {
            let st = engine.stats();
            if failure.is_none() && st.running + st.waiting > 0 {
                eprintln!(
                    "draining: {} running, {} waiting (at most {:.0} s)",
                    st.running,
                    st.waiting,
                    opts.drain.as_secs_f64()
                );
            }
            let s = Arc::clone(&state);
            let drain = opts.drain;
            tokio::task::spawn_blocking(move || {
                if let Some(e) = s.engine.get() {
                    e.drain(drain);
                }
            })
            .await
            .ok();
        }
        // Let the last streams write their final events, then close the connections.
        let _ = stop_tx.send(true);
        match tokio::time::timeout(Duration::from_secs(5), server).await {
            Ok(Ok(r)) => r.context("serving")?,
            Ok(Err(e)) => return Err(anyhow::anyhow!("the server task failed: {e}")),
            Err(_) => {} // Connections still open after the drain: closed with the process.
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    });
    // An engine still loading when the signal came is not waited for.
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}
