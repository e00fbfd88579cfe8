//! The endpoints: `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`,
//! `/metrics`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;
use ngpt_runtime::engine::{Generated, SamplingParams};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::api::{ApiError, ChatRequest, CompletionRequest, Params, Prompt};
use super::stream::{drive, submit, Ending, Outcome, Piece};
use super::{AppState, Phase};

type Shared = State<Arc<AppState>>;

pub async fn health(State(s): Shared) -> Response {
    match s.phase() {
        Phase::Ready => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Phase::Loading => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response(),
        Phase::Draining => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response(),
    }
}

fn model_card(s: &AppState) -> Value {
    json!({
        "id": s.model_id,
        "object": "model",
        "created": s.created,
        "owned_by": "ngpt",
        "max_model_len": s.capacity,
    })
}

pub async fn models(State(s): Shared) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_card(&s)]}))
}

pub async fn model(State(s): Shared, Path(id): Path<String>) -> Response {
    if id == s.model_id {
        Json(model_card(&s)).into_response()
    } else {
        ApiError::model_not_found(&id, &s.model_id).into_response()
    }
}

pub async fn metrics(State(s): Shared) -> Response {
    if let Some(engine) = s.engine.get() {
        let st = engine.stats();
        s.metrics.running.set(st.running as i64);
        s.metrics.waiting.set(st.waiting as i64);
        s.metrics.slots_in_use.set(st.running as i64);
        s.metrics.slots.set(st.max_batch as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; this server answers /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics")
}

/// The body as a JSON object: over the size limit is a 413, anything else unreadable a 400.
fn body_object(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<serde_json::Map<String, Value>, ApiError> {
    match body {
        Ok(bytes) => super::api::parse_object(&bytes),
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::too_large(limit)),
        Err(r) => Err(ApiError::malformed(format!(
            "the request body could not be read: {}",
            r.body_text()
        ))),
    }
}

fn check_model(s: &AppState, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        Some(m) if *m != s.model_id => Err(ApiError::model_not_found(m, &s.model_id)),
        _ => Ok(()),
    }
}

/// Token ids checked against the model, each error naming `param`.
fn checked_ids(s: &AppState, ids: &[i64], param: &str) -> Result<Vec<u32>, ApiError> {
    ids.iter()
        .map(|&t| {
            if t < 0 || t as u64 >= s.vocab_size as u64 {
                Err(ApiError::invalid(
                    param,
                    format!(
                        "{param}: token id {t} is outside the vocabulary 0..{}",
                        s.vocab_size
                    ),
                ))
            } else {
                Ok(t as u32)
            }
        })
        .collect()
}

/// The engine's parameters for a prompt of `prompt_len` tokens: max_tokens defaults to
/// `default_max` (at most the context left), and must fit the KV capacity with the prompt.
fn sampling(
    s: &AppState,
    p: &Params,
    prompt_len: usize,
    default_max: Option<usize>,
) -> Result<SamplingParams, ApiError> {
    let left = s.capacity.saturating_sub(prompt_len);
    if left == 0 {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "prompt: {prompt_len} tokens leave no room to generate in the model's context of {} tokens",
                s.capacity
            ),
        ));
    }
    let max_tokens = match p.max_tokens {
        Some(n) if n > left => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "max_tokens: the prompt ({prompt_len} tokens) plus max_tokens {n} exceeds the model's context of {} tokens",
                    s.capacity
                ),
            ))
        }
        Some(n) => n,
        None => default_max.unwrap_or(left).min(left),
    };
    let stop_token_ids = checked_ids(s, &p.stop_token_ids, "stop_token_ids")?;
    let seed = p.seed.unwrap_or_else(|| {
        // A seed of the server's choosing, as OpenAI samples without one.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ s.next_id.fetch_add(1, Ordering::Relaxed).rotate_left(32)
    });
    Ok(SamplingParams {
        max_tokens,
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        seed,
        stop_token_ids,
        ignore_eos: p.ignore_eos,
        logprobs: p.logprobs,
    })
}

/// The text of one token, for logprobs.
fn token_text(s: &AppState, id: u32) -> String {
    match &s.vocab {
        Some(v) => v.decode(&[id]),
        None => id.to_string(),
    }
}

/// Completions' `logprobs` object for `tokens`, their text starting at `offset` bytes.
fn completion_logprobs(s: &AppState, tokens: &[Generated], offset: &mut usize) -> Value {
    let mut texts = vec![];
    let mut lps = vec![];
    let mut tops = vec![];
    let mut offsets = vec![];
    for g in tokens {
        let t = token_text(s, g.token);
        offsets.push(*offset);
        *offset += t.len();
        texts.push(t);
        lps.push(g.logprob);
        let top: serde_json::Map<String, Value> = g
            .top
            .iter()
            .map(|&(id, lp)| (token_text(s, id), json!(lp)))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// Chat's `logprobs.content` entries for `tokens`.
fn chat_logprobs(s: &AppState, tokens: &[Generated]) -> Vec<Value> {
    let entry = |id: u32, lp: f32| {
        let t = token_text(s, id);
        json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
    };
    tokens
        .iter()
        .map(|g| {
            let mut e = entry(g.token, g.logprob);
            e["top_logprobs"] = g.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect()
}

fn usage(o: &Outcome) -> Value {
    json!({
        "prompt_tokens": o.prompt_tokens,
        "completion_tokens": o.completion_tokens,
        "total_tokens": o.prompt_tokens + o.completion_tokens,
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// Everything a response needs besides the generation.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    token_ids: bool,
    include_usage: bool,
    prompt_token_ids: Vec<u32>,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// One streamed choice: `piece`'s text (or the end with `finish`).
    fn chunk(
        &self,
        s: &AppState,
        piece: &Piece,
        finish: Option<&str>,
        offset: &mut usize,
    ) -> Value {
        let mut choice = match self.kind {
            Kind::Completion => {
                json!({"index": 0, "text": piece.text, "logprobs": null, "finish_reason": finish})
            }
            Kind::Chat => {
                let delta = if finish.is_some() && piece.text.is_empty() {
                    json!({})
                } else {
                    json!({"content": piece.text})
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        };
        if self.logprobs && !piece.tokens.is_empty() {
            choice["logprobs"] = match self.kind {
                Kind::Completion => completion_logprobs(s, &piece.tokens, offset),
                Kind::Chat => json!({"content": chat_logprobs(s, &piece.tokens)}),
            };
        }
        if self.token_ids {
            choice["token_ids"] = piece.tokens.iter().map(|g| g.token).collect();
        }
        self.envelope(true, json!([choice]))
    }

    /// The whole answer, not streamed.
    fn full(&self, s: &AppState, text: String, tokens: &[Generated], o: &Outcome) -> Value {
        let finish = o.ending.reason();
        let mut choice = match self.kind {
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
            Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": null, "finish_reason": finish}),
        };
        if self.logprobs {
            choice["logprobs"] = match self.kind {
                Kind::Completion => completion_logprobs(s, tokens, &mut 0),
                Kind::Chat => json!({"content": chat_logprobs(s, tokens)}),
            };
        }
        if self.token_ids {
            choice["token_ids"] = tokens.iter().map(|g| g.token).collect();
        }
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = usage(o);
        if self.token_ids {
            v["prompt_token_ids"] = json!(self.prompt_token_ids);
        }
        v
    }
}

pub async fn completions(State(s): Shared, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let run = || -> Result<(CompletionRequest, Vec<u32>), ApiError> {
        let req = CompletionRequest::parse(&body_object(body, s.max_body)?)?;
        check_model(&s, &req.model)?;
        let ids = match &req.prompt {
            Prompt::Tokens(t) => checked_ids(&s, t, "prompt")?,
            Prompt::Text(text) => {
                let vocab = s.vocab.as_deref().ok_or_else(|| {
                    ApiError::invalid(
                        "prompt",
                        "prompt: the model has no vocabulary (tokenizer.json, vocab.json or meta.pkl); send token ids",
                    )
                })?;
                vocab
                    .encode(text)
                    .map_err(|e| ApiError::invalid("prompt", format!("prompt: {e:#}")))?
            }
        };
        Ok((req, ids))
    };
    match run() {
        Ok((req, ids)) => generate(s, Kind::Completion, ids, req.params, Some(16), arrived).await,
        Err(e) => e.into_response(),
    }
}

pub async fn chat_completions(State(s): Shared, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let run = || -> Result<(ChatRequest, Vec<u32>), ApiError> {
        let req = ChatRequest::parse(&body_object(body, s.max_body)?)?;
        check_model(&s, &req.model)?;
        let (Some(template), Some(vocab)) = (&s.chat, s.vocab.as_deref()) else {
            return Err(ApiError::not_found(format!(
                "the model `{}` has no chat template (chat_template.jinja, or `chat_template` in tokenizer_config.json); use /v1/completions",
                s.model_id
            )));
        };
        let text = template
            .render(&req.messages)
            .map_err(|e| ApiError::invalid("messages", format!("messages: {e}")))?;
        let ids = vocab
            .encode_plain(&text)
            .map_err(|e| ApiError::invalid("messages", format!("messages: {e:#}")))?;
        if ids.is_empty() {
            return Err(ApiError::invalid(
                "messages",
                "messages: the chat template rendered them as no tokens",
            ));
        }
        Ok((req, ids))
    };
    match run() {
        Ok((req, ids)) => generate(s, Kind::Chat, ids, req.params, None, arrived).await,
        Err(e) => e.into_response(),
    }
}

async fn generate(
    s: Arc<AppState>,
    kind: Kind,
    prompt: Vec<u32>,
    p: Params,
    default_max: Option<usize>,
    arrived: Instant,
) -> Response {
    let params = match sampling(&s, &p, prompt.len(), default_max) {
        Ok(params) => params,
        Err(e) => return e.into_response(),
    };
    let reply = Reply {
        kind,
        id: format!(
            "{}-{:x}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            s.next_id.fetch_add(1, Ordering::Relaxed)
        ),
        created: unix_now(),
        model: s.model_id.clone(),
        logprobs: p.logprobs.is_some(),
        token_ids: p.return_token_ids,
        include_usage: p.include_usage,
        prompt_token_ids: if p.return_token_ids {
            prompt.clone()
        } else {
            vec![]
        },
    };
    let run = match submit(&s, prompt, params, arrived) {
        Ok(run) => run,
        Err(e) => return e.into_response(),
    };
    if p.stream {
        return streamed(s, reply, run, p.stop).into_response();
    }
    let mut text = String::new();
    let mut tokens = vec![];
    let outcome = drive(&s, run, &p.stop, |piece| {
        text.push_str(&piece.text);
        tokens.extend(piece.tokens);
        true
    })
    .await;
    match &outcome.ending {
        Ending::Failed(why) => {
            ApiError::internal(format!("generation failed: {why}")).into_response()
        }
        _ => Json(reply.full(&s, text, &tokens, &outcome)).into_response(),
    }
}

/// Server-sent events: a chunk per token (text held back for a stop string or half a
/// character is sent with a later one), the last chunk with the finish reason, usage when
/// asked for, then `data: [DONE]`.
fn streamed(
    s: Arc<AppState>,
    reply: Reply,
    run: super::stream::Running,
    stops: Vec<String>,
) -> impl IntoResponse {
    let (tx, rx) = mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        let mut offset = 0usize;
        if reply.kind == Kind::Chat {
            let mut first = reply.chunk(&s, &Piece::default(), None, &mut offset);
            first["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
            if tx.send(first).is_err() {
                return;
            }
        }
        let quiet = !reply.logprobs && !reply.token_ids;
        let outcome = drive(&s, run, &stops, |piece| {
            if quiet && piece.text.is_empty() {
                return !tx.is_closed();
            }
            tx.send(reply.chunk(&s, &piece, None, &mut offset)).is_ok()
        })
        .await;
        let last = match &outcome.ending {
            Ending::Cancelled => return,
            Ending::Failed(why) => ApiError::internal(format!("generation failed: {why}")).body(),
            ending => reply.chunk(&s, &Piece::default(), Some(ending.reason()), &mut offset),
        };
        if tx.send(last).is_err() {
            return;
        }
        if reply.include_usage {
            let mut u = reply.envelope(true, json!([]));
            u["usage"] = usage(&outcome);
            // The client may be gone by now; nothing is left to tell it.
            let _ = tx.send(u);
        }
    });
    let events = stream::unfold((rx, false), |(mut rx, done)| async move {
        if done {
            return None;
        }
        match rx.recv().await {
            Some(v) => Some((
                Ok::<_, Infallible>(SseEvent::default().data(v.to_string())),
                (rx, false),
            )),
            None => Some((Ok(SseEvent::default().data("[DONE]")), (rx, true))),
        }
    });
    Sse::new(events)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
