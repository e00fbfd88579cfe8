//! One request's generation as the HTTP side sees it: submitted to the engine with a sink
//! that forwards its events to this request's task, turned into text (whole characters),
//! cut at stop strings, and timed for the metrics.
//!
//! The sink runs on the engine's thread and only forwards: it returns false (the engine
//! then retires the request within one step) once the task has gone (the client hung up)
//! or has matched a stop string.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ngpt_runtime::engine::{Event, Finish, Generated, Request, SamplingParams};
use tokio::sync::mpsc;

use super::api::ApiError;
use super::AppState;

/// How a generation ended, in OpenAI's words where the client sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// max_tokens.
    Length,
    /// The client went away (nobody reads this).
    Cancelled,
    /// The engine failed on this request.
    Failed(String),
}

impl Ending {
    /// `finish_reason`, and the metric's label.
    pub fn reason(&self) -> &'static str {
        match self {
            Ending::Stop => "stop",
            Ending::Length => "length",
            Ending::Cancelled => "cancelled",
            Ending::Failed(_) => "error",
        }
    }
}

/// Text and the tokens it came from, as they arrive.
#[derive(Debug, Default)]
pub struct Piece {
    /// New text (may be empty: held back for a stop string or half a character).
    pub text: String,
    pub tokens: Vec<Generated>,
}

/// A submitted request whose events have not been read yet.
pub struct Running {
    rx: mpsc::UnboundedReceiver<(Instant, Event)>,
    cancel: Arc<AtomicBool>,
    arrived: Instant,
    pub prompt_tokens: usize,
}

/// What [`drive`] returns once the generation ended.
#[derive(Debug)]
pub struct Outcome {
    pub ending: Ending,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Submits `prompt` with `params`: the engine's refusals become the API's errors
/// (429 for a full queue, 503 while draining, 400 naming the field otherwise).
pub fn submit(
    state: &AppState,
    prompt: Vec<u32>,
    params: SamplingParams,
    arrived: Instant,
) -> Result<Running, ApiError> {
    let engine = state.engine()?;
    let (tx, rx) = mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&cancel);
    let prompt_tokens = prompt.len();
    let sink = Box::new(move |e: Event| {
        !stopped.load(Ordering::SeqCst) && tx.send((Instant::now(), e)).is_ok()
    });
    engine
        .submit(Request { prompt, params }, sink)
        .map_err(|e| engine_error(&e))?;
    state.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
    Ok(Running {
        rx,
        cancel,
        arrived,
        prompt_tokens,
    })
}

/// The API's answer to an engine refusal.
pub fn engine_error(e: &ngpt_runtime::Error) -> ApiError {
    use ngpt_runtime::Error as E;
    match e {
        E::QueueFull { limit } => ApiError::queue_full(*limit),
        E::ShuttingDown => ApiError::unavailable("the server is shutting down"),
        E::TokenOutsideVocabulary { .. } | E::SequenceTooLong { .. } | E::EmptyBatch => {
            ApiError::invalid("prompt", format!("prompt: {e}"))
        }
        E::RequestTooLong { .. } => ApiError::invalid("max_tokens", e.to_string()),
        E::Request { what, .. } => ApiError::invalid(what, e.to_string()),
        other => ApiError::internal(other.to_string()),
    }
}

/// Holds back text that may be the start of a stop string; finds the first stop string.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher {
            stops: stops.to_vec(),
            pending: String::new(),
        }
    }

    /// Adds `text`; returns what can be sent now and whether a stop string ended it (the
    /// text before the stop string is returned, the stop string and what follows are not).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.pending), false);
        }
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest tail that begins some stop string.
        let hold = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let rest = self.pending.split_off(hold);
        (std::mem::replace(&mut self.pending, rest), false)
    }

    /// The held-back text, at the end of the generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Reads `run`'s events to the end, handing text to `emit` as it comes; `emit` returning
/// false (the client is gone) cancels the generation. Updates the metrics.
pub async fn drive(
    state: &AppState,
    mut run: Running,
    stops: &[String],
    mut emit: impl FnMut(Piece) -> bool,
) -> Outcome {
    let m = &state.metrics;
    let mut text = state.vocab.as_deref().map(|v| v.stream());
    let mut matcher = StopMatcher::new(stops);
    let mut last: Option<Instant> = None;
    let mut completion_tokens = 0usize;
    let ending = loop {
        let Some((at, event)) = run.rx.recv().await else {
            // The engine dropped the sink without a last event: it stopped.
            break Ending::Failed("the engine stopped".into());
        };
        match event {
            Event::Token(g) => {
                match last {
                    None => m.ttft.observe((at - run.arrived).as_secs_f64()),
                    Some(prev) => m.itl.observe((at - prev).as_secs_f64()),
                }
                last = Some(at);
                m.generated_tokens.inc();
                completion_tokens += 1;
                let new = text
                    .as_mut()
                    .map(|t| t.push(&[g.token]))
                    .unwrap_or_default();
                let (out, stopped) = matcher.push(&new);
                let piece = Piece {
                    text: out,
                    tokens: vec![g],
                };
                if stopped {
                    run.cancel.store(true, Ordering::SeqCst);
                    emit(piece);
                    break Ending::Stop;
                }
                if !emit(piece) {
                    run.cancel.store(true, Ordering::SeqCst);
                    break Ending::Cancelled;
                }
            }
            Event::Finished { reason, .. } => {
                let tail = text.as_mut().map(|t| t.finish()).unwrap_or_default();
                let (mut out, stopped) = matcher.push(&tail);
                if !stopped {
                    out.push_str(&matcher.finish());
                }
                if !out.is_empty() {
                    emit(Piece {
                        text: out,
                        tokens: vec![],
                    });
                }
                break match (stopped, reason) {
                    (true, _) | (_, Finish::Stop) => Ending::Stop,
                    (_, Finish::Length) => Ending::Length,
                    (_, Finish::Cancelled) => Ending::Cancelled,
                };
            }
            Event::Failed(e) => break Ending::Failed(e.to_string()),
        }
    };
    if let Some(at) = last {
        m.e2e.observe((at - run.arrived).as_secs_f64());
    }
    m.finished.with_label_values(&[ending.reason()]).inc();
    Outcome {
        ending,
        prompt_tokens: run.prompt_tokens,
        completion_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], chunks: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for c in chunks {
            let (text, stopped) = m.push(c);
            out.push_str(&text);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_strings_across_chunks() {
        assert_eq!(run(&[], &["ab", "c"]), ("abc".into(), false));
        assert_eq!(run(&["cd"], &["ab", "c", "de"]), ("ab".into(), true));
        assert_eq!(run(&["xyz"], &["ab", "xy", "q"]), ("abxyq".into(), false));
        assert_eq!(run(&["é!"], &["aé", "é!"]), ("aé".into(), true));
        assert_eq!(run(&["b", "abc"], &["xab"]), ("xa".into(), true));
    }

    #[test]
    fn held_back_text_is_not_sent_early() {
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("x"), ("ENx".to_string(), false));
    }
}
