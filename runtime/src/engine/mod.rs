//! The generation engine: one executor, its KV caches as slots, and a scheduler that
//! admits a request into a free slot at any step and retires it at any step (continuous
//! batching). `ngpt generate` and `ngpt serve` both generate through it: there is one
//! generation loop.
//!
//! Each [`Engine::step`] runs the decode rows of every sequence that has its prompt in
//! the cache, plus prefill rows of newly admitted prompts under a per-step budget (chunked
//! prefill, so a long prompt does not stall everybody's next token), as executor calls of
//! rows that each carry their (slot, token, position). Each request samples with its own
//! seeded sampler, so its tokens do not depend on the traffic beside it; on the CPU, with
//! [`EngineOptions::invariant`] (the default), its logits do not either, to the bit
//! (RELIABILITY.md).
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use ngpt_runtime::engine::{Engine, EngineOptions, Event, Request, SamplingParams};
//! use ngpt_runtime::plan::LoadedPlan;
//! let plan = Arc::new(LoadedPlan::load("out/nv-tiny".as_ref())?);
//! let mut engine = Engine::cpu(plan, EngineOptions::new(4))?;
//! let tokens = Arc::new(Mutex::new(vec![]));
//! let sink = Arc::clone(&tokens);
//! let params = SamplingParams { max_tokens: 8, temperature: 0.0, ..SamplingParams::default() };
//! engine.submit(
//!     Request { prompt: vec![45, 64, 77], params },
//!     Box::new(move |e| {
//!         if let Event::Token(g) = e {
//!             sink.lock().expect("not poisoned").push(g.token);
//!         }
//!         true // still listening
//!     }),
//! )?;
//! while engine.step() {}
//! assert_eq!(tokens.lock().expect("not poisoned").len(), 8);
//! # Ok::<(), ngpt_runtime::Error>(())
//! ```

mod executor;
mod handle;
mod schedule;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub use handle::EngineHandle;
pub use schedule::{Backend, StepRows};

use crate::error::{Error, Result};
use crate::sample::{logprobs, Sampler, Sampling};

/// How one request samples and when it stops.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Tokens to generate, at least 1 (OpenAI's default: 16).
    pub max_tokens: usize,
    /// 0 is greedy; finite and at least 0.
    pub temperature: f32,
    /// Sample among the k most likely tokens; 0 is all.
    pub top_k: usize,
    /// Nucleus sampling, in (0, 1]; 1 is all.
    pub top_p: f32,
    /// The seed of this request's sampler: same seed, same prompt, same tokens.
    pub seed: u64,
    /// Token ids that end the request (finish [`Finish::Stop`]); the stop token is not
    /// emitted.
    pub stop_token_ids: Vec<u32>,
    /// Goes on past the end-of-sequence tokens ([`EngineOptions::eos`]).
    pub ignore_eos: bool,
    /// With `Some(n)`, each token comes with its log-probability and the `n` most likely
    /// tokens' (at most [`MAX_LOGPROBS`]).
    pub logprobs: Option<usize>,
}

/// The most alternatives [`SamplingParams::logprobs`] may ask for (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;

impl Default for SamplingParams {
    /// OpenAI's defaults: 16 tokens, temperature 1, every token.
    fn default() -> SamplingParams {
        SamplingParams {
            max_tokens: 16,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop_token_ids: vec![],
            ignore_eos: false,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// The sampler settings.
    pub fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |what: &str, problem: String| Error::Request {
            what: what.into(),
            problem,
        };
        if self.max_tokens == 0 {
            return Err(bad("max_tokens", "0; expected at least 1".into()));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(bad(
                "temperature",
                format!(
                    "{}; expected a finite number, at least 0 (0 is greedy)",
                    self.temperature
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad(
                "top_p",
                format!("{}; expected a number in (0, 1]", self.top_p),
            ));
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_LOGPROBS) {
            return Err(bad(
                "logprobs",
                format!("{n}; expected at most {MAX_LOGPROBS}"),
            ));
        }
        Ok(())
    }
}

/// A prompt and how to continue it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Token ids, at least one, each below the plan's vocabulary.
    pub prompt: Vec<u32>,
    /// Sampling and stopping.
    pub params: SamplingParams,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The token id.
    pub token: u32,
    /// Its log-probability under the raw logits (temperature 1), when asked for (else 0).
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, when asked for.
    pub top: Vec<(u32, f32)>,
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The end-of-sequence token or a stop token id came.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The receiver said it is gone ([`Sink`] returned false) or the engine shut down.
    Cancelled,
}

/// What a request's [`Sink`] receives: tokens, then `Finished` or `Failed`.
#[derive(Debug, Clone)]
pub enum Event {
    /// The next token.
    Token(Generated),
    /// The request ended; no further events.
    Finished {
        /// Why.
        reason: Finish,
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Tokens emitted.
        completion_tokens: usize,
    },
    /// The executor failed on a step that held this request; no further events. The
    /// engine goes on serving the others.
    Failed(Arc<Error>),
}

/// Receives a request's events on the engine's thread. Returning false says the receiver
/// is gone (a client disconnected, or matched a stop string): the request is retired at
/// once and its slot is free for the next step.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// How the engine batches.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineOptions {
    /// Sequences running at once: the KV-cache slots.
    pub max_batch: usize,
    /// Requests waiting for a slot before [`Error::QueueFull`].
    pub max_queue: usize,
    /// Prefill rows per step, beside the decode rows (at least one chunk always runs).
    pub step_prefill_rows: usize,
    /// On (default): every executor call has at most [`MAX_INVARIANT_ROWS`] rows and
    /// prompts are prefilled in chunks of [`INVARIANT_CHUNK`], so on the CPU a request's
    /// logits are bitwise the same alone or amid any traffic. Off: a prompt is prefilled in
    /// one call (the GEMM path; faster for long prompts, not batch-invariant).
    pub invariant: bool,
    /// The end-of-sequence tokens, where the tokenizer defines them (a char-level
    /// vocabulary defines none).
    pub eos: Vec<u32>,
}

/// The most rows an invariant call takes: the CPU's weight GEMMs of this many rows give
/// every row the bits it gets alone (`cpu::tiles` for f32 and bf16 weights, up to 512
/// rows; `cpu::quant`'s int8/int4 dot path, up to 32).
pub const MAX_INVARIANT_ROWS: usize = crate::cpu::weight_gemm::MAX_N;
/// The prompt rows an invariant step takes per request and call.
pub const INVARIANT_CHUNK: usize = 16;

impl EngineOptions {
    /// `max_batch` slots, a queue of 4x that, invariant batching, no EOS.
    pub fn new(max_batch: usize) -> EngineOptions {
        EngineOptions {
            max_batch,
            max_queue: 4 * max_batch.max(1),
            step_prefill_rows: MAX_INVARIANT_ROWS,
            invariant: true,
            eos: vec![],
        }
    }

    fn chunk(&self) -> usize {
        if self.invariant {
            INVARIANT_CHUNK
        } else {
            usize::MAX
        }
    }

    fn call_rows(&self) -> usize {
        if self.invariant {
            MAX_INVARIANT_ROWS
        } else {
            usize::MAX
        }
    }
}

/// A snapshot of the engine's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Requests in a slot (prefilling or decoding).
    pub running: usize,
    /// Requests waiting for a slot.
    pub waiting: usize,
    /// Slots the engine has.
    pub max_batch: usize,
}

/// Counters the engine updates and other threads read ([`EngineHandle::stats`]).
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) running: AtomicUsize,
    /// Submitted and not yet in a slot (in the handle's channel too).
    pub(crate) waiting: AtomicUsize,
}

struct Seq {
    slot: usize,
    prompt: Vec<u32>,
    /// Prompt tokens in the cache.
    prefilled: usize,
    /// Tokens emitted.
    emitted: usize,
    /// The last sampled token, not yet in the cache.
    last: Option<u32>,
    params: SamplingParams,
    sampler: Sampler,
    sink: Sink,
}

/// One executor, its KV-cache slots, and the requests in and waiting for them.
pub struct Engine {
    backend: Box<dyn Backend>,
    opts: EngineOptions,
    /// Free slots, the lowest last (taken first).
    free: Vec<usize>,
    waiting: VecDeque<Seq>,
    /// In a slot, in admission order.
    running: Vec<Seq>,
    shared: Arc<Shared>,
}

impl Engine {
    /// An engine over any [`Backend`] (tests use a fake one).
    pub fn with_backend(backend: Box<dyn Backend>, opts: EngineOptions) -> Result<Engine> {
        if opts.max_batch == 0 {
            return Err(Error::EmptyBatch);
        }
        if backend.slots() < opts.max_batch {
            return Err(Error::Request {
                what: "max_batch".into(),
                problem: format!(
                    "{} slots asked of an executor that holds {}",
                    opts.max_batch,
                    backend.slots()
                ),
            });
        }
        if opts.step_prefill_rows == 0 {
            return Err(Error::Request {
                what: "step_prefill_rows".into(),
                problem: "0; expected at least 1".into(),
            });
        }
        Ok(Engine {
            free: (0..opts.max_batch).rev().collect(),
            backend,
            opts,
            waiting: VecDeque::new(),
            running: vec![],
            shared: Arc::default(),
        })
    }

    /// The plan's vocabulary: token ids stay below it.
    pub fn vocab(&self) -> usize {
        self.backend.vocab()
    }

    /// Tokens a sequence holds at most: prompt + max_tokens stay within it.
    pub fn capacity(&self) -> usize {
        self.backend.capacity()
    }

    /// The options it batches with.
    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    /// One line naming the executor (e.g. `plan-cpu`).
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// Checks a request against the plan without queueing it: a prompt of at least one
    /// token, each inside the vocabulary; prompt + max_tokens within the KV capacity; the
    /// sampling values in range.
    pub fn check(&self, req: &Request) -> Result<()> {
        check_request(req, self.vocab(), self.capacity())
    }

    /// Queues a request; its events go to `sink` as steps run.
    pub fn submit(&mut self, req: Request, sink: Sink) -> Result<()> {
        self.check(&req)?;
        if self.waiting.len() >= self.opts.max_queue {
            return Err(Error::QueueFull {
                limit: self.opts.max_queue,
            });
        }
        self.shared.waiting.fetch_add(1, Ordering::Relaxed);
        self.enqueue(req, sink);
        Ok(())
    }

    /// Queues a request the caller has checked and counted in `shared.waiting`.
    fn enqueue(&mut self, req: Request, sink: Sink) {
        let sampler = Sampler::new(req.params.sampling(), req.params.seed);
        self.waiting.push_back(Seq {
            slot: usize::MAX,
            prompt: req.prompt,
            prefilled: 0,
            emitted: 0,
            last: None,
            params: req.params,
            sampler,
            sink,
        });
    }

    /// The engine's load now.
    pub fn stats(&self) -> Stats {
        Stats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            max_batch: self.opts.max_batch,
        }
    }

    /// Whether nothing is running or waiting.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Ends every request (running and waiting) with [`Finish::Cancelled`].
    pub fn cancel_all(&mut self) {
        for s in self.take_all() {
            self.finish(s, Finish::Cancelled);
        }
    }

    /// Takes every request out (slots freed, counters updated).
    fn take_all(&mut self) -> Vec<Seq> {
        self.shared
            .waiting
            .fetch_sub(self.waiting.len(), Ordering::Relaxed);
        let all: Vec<Seq> = self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .collect();
        self.free = (0..self.opts.max_batch).rev().collect();
        self.publish();
        all
    }

    /// Admits waiting requests into free slots, runs one step, delivers its events.
    /// Returns whether requests remain (running or waiting).
    pub fn step(&mut self) -> bool {
        self.admit();
        if self.running.is_empty() {
            return !self.waiting.is_empty();
        }
        let plan = schedule::plan_step(
            self.running.iter().map(|s| schedule::SeqView {
                slot: s.slot,
                prompt: &s.prompt,
                prefilled: s.prefilled,
                emitted: s.emitted,
                last: s.last,
            }),
            self.opts.step_prefill_rows,
            self.opts.chunk(),
            self.opts.call_rows(),
            self.backend.mixes_rows(),
        );
        // Prompt progress is recorded before the calls run: a failed call retires the
        // sequences it held, whatever it wrote.
        for (i, n) in &plan.prefill {
            self.running[*i].prefilled += n;
        }
        let mut failed: Vec<(usize, Arc<Error>)> = vec![];
        let mut picks: Vec<(usize, Vec<f32>)> = vec![];
        for call in &plan.calls {
            if call.seqs.iter().any(|s| failed.iter().any(|f| f.0 == *s)) {
                // A sequence of this call failed earlier in the step: its rows would read
                // what the failed call did not write.
                let err = failed
                    .iter()
                    .find(|f| call.seqs.contains(&f.0))
                    .map(|f| Arc::clone(&f.1));
                if let Some(err) = err {
                    for &s in &call.seqs {
                        if !failed.iter().any(|f| f.0 == s) {
                            failed.push((s, Arc::clone(&err)));
                        }
                    }
                }
                continue;
            }
            match self.backend.run(call.decode, &call.rows, &call.chosen) {
                Ok(logits) => {
                    let v = self.backend.vocab();
                    for (k, &s) in call.chosen_seq.iter().enumerate() {
                        picks.push((s, logits[k * v..(k + 1) * v].to_vec()));
                    }
                }
                Err(e) => {
                    let e = Arc::new(e);
                    for &s in &call.seqs {
                        if !failed.iter().any(|f| f.0 == s) {
                            failed.push((s, Arc::clone(&e)));
                        }
                    }
                }
            }
        }
        let mut retire: Vec<(usize, Option<Finish>)> = vec![];
        for (i, row) in picks {
            if failed.iter().any(|f| f.0 == i) {
                continue;
            }
            let s = &mut self.running[i];
            let token = s.sampler.pick(&row);
            let stop = s.params.stop_token_ids.contains(&token)
                || (!s.params.ignore_eos && self.opts.eos.contains(&token));
            if stop {
                retire.push((i, Some(Finish::Stop)));
                continue;
            }
            let (logprob, top) = match s.params.logprobs {
                Some(n) => logprobs(&row, token, n),
                None => (0.0, vec![]),
            };
            s.emitted += 1;
            if !(s.sink)(Event::Token(Generated {
                token,
                logprob,
                top,
            })) {
                retire.push((i, None));
            } else if s.emitted >= s.params.max_tokens {
                retire.push((i, Some(Finish::Length)));
            } else {
                s.last = Some(token);
            }
        }
        // Retire from the back so indices stay valid.
        let mut ends: Vec<(usize, End)> = retire
            .into_iter()
            .map(|(i, f)| (i, End::Finish(f)))
            .chain(failed.into_iter().map(|(i, e)| (i, End::Failed(e))))
            .collect();
        ends.sort_by_key(|e| std::cmp::Reverse(e.0));
        ends.dedup_by_key(|e| e.0);
        let mut ended = Vec::with_capacity(ends.len());
        for (i, end) in ends {
            let s = self.running.remove(i);
            self.free.push(s.slot);
            ended.push((s, end));
        }
        // Lowest free slot first: a lone request always runs in slot 0.
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        // The counts first, then the last events: whoever sees a request end (its stream
        // closing) sees the engine without it.
        self.publish();
        for (mut s, end) in ended {
            match end {
                End::Finish(Some(f)) => self.finish(s, f),
                End::Finish(None) => {} // the receiver is gone
                End::Failed(e) => {
                    (s.sink)(Event::Failed(e));
                }
            }
        }
        !self.is_idle()
    }

    fn finish(&self, mut s: Seq, reason: Finish) {
        let prompt_tokens = s.prompt.len();
        (s.sink)(Event::Finished {
            reason,
            prompt_tokens,
            completion_tokens: s.emitted,
        });
    }

    fn admit(&mut self) {
        while !self.waiting.is_empty() {
            let Some(slot) = self.free.pop() else { break };
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            s.slot = slot;
            self.running.push(s);
            self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        self.publish();
    }

    fn publish(&self) {
        self.shared
            .running
            .store(self.running.len(), Ordering::Relaxed);
    }
}

enum End {
    Finish(Option<Finish>),
    Failed(Arc<Error>),
}

/// [`Engine::check`]'s rules, for callers that hold only the plan's numbers.
pub fn check_request(req: &Request, vocab: usize, capacity: usize) -> Result<()> {
    if req.prompt.is_empty() {
        return Err(Error::Request {
            what: "prompt".into(),
            problem: "empty; expected at least one token".into(),
        });
    }
    if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::TokenOutsideVocabulary {
            token: t as i64,
            vocab,
        });
    }
    req.params.check()?;
    if req
        .prompt
        .len()
        .checked_add(req.params.max_tokens)
        .is_none_or(|n| n > capacity)
    {
        return Err(Error::RequestTooLong {
            prompt: req.prompt.len(),
            max_tokens: req.params.max_tokens,
            capacity,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
