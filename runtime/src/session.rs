//! A generation session: B sequences, their KV caches, prefill then decode.
//!
//! The request logic (ragged right padding, positions, capacity checks) lives here once;
//! the executor that runs the plan's programs is behind [`Executor`]: the CPU executor
//! ([`Session::new`]) or, with the `cuda` feature, the CUDA executor ([`Session::cuda`]).

use std::sync::Arc;

use crate::cpu::{CpuExecutor, ProgramKind};
use crate::error::{Error, Result};
use crate::plan::LoadedPlan;
use crate::rows::{gather_rows, Rows};

/// What a session needs from an executor: run a program over rows, each `(slot, token,
/// position)` ([`Rows`]), and return the logits, `[rows, vocab]`. Rows of different slots
/// and programs can be mixed freely between calls (a continuous-batching scheduler's
/// calls); within a call no two rows write the same (slot, position).
pub trait Executor: Send {
    /// The plan this executor runs.
    fn plan(&self) -> &Arc<LoadedPlan>;
    /// KV slots (sequences, B) this executor holds caches for; every row's slot is below
    /// it.
    fn batch(&self) -> usize;
    /// One line naming the executor and where it runs (e.g. `plan-cpu`).
    fn describe(&self) -> String;
    /// Runs `kind` over `rows`; see [`CpuExecutor::run`].
    fn run(&mut self, kind: ProgramKind, rows: &Rows<'_>) -> Result<&[f32]>;
    /// Runs `kind`, calling `on_step(step, width, rows)` after each step with what it
    /// wrote; see [`CpuExecutor::run_traced`].
    fn run_traced(
        &mut self,
        kind: ProgramKind,
        rows: &Rows<'_>,
        on_step: &mut dyn FnMut(&str, usize, &[f32]),
    ) -> Result<&[f32]>;
    /// Runs `kind` and returns the logits of the `chosen` rows only,
    /// `[chosen.len(), vocab]`, in the order given (each an index into `rows`). This
    /// default runs everything and copies the rows out; an executor may skip the work no
    /// chosen row needs.
    fn run_rows(
        &mut self,
        kind: ProgramKind,
        rows: &Rows<'_>,
        chosen: &[usize],
    ) -> Result<Vec<f32>> {
        let v = self.plan().dims.vocab;
        let all = self.run(kind, rows)?;
        gather_rows(all, v, chosen)
    }
}

impl Executor for CpuExecutor {
    fn plan(&self) -> &Arc<LoadedPlan> {
        &self.plan
    }
    fn batch(&self) -> usize {
        self.batch
    }
    fn describe(&self) -> String {
        "plan-cpu".into()
    }
    fn run(&mut self, kind: ProgramKind, rows: &Rows<'_>) -> Result<&[f32]> {
        CpuExecutor::run(self, kind, rows)
    }
    fn run_traced(
        &mut self,
        kind: ProgramKind,
        rows: &Rows<'_>,
        on_step: &mut dyn FnMut(&str, usize, &[f32]),
    ) -> Result<&[f32]> {
        CpuExecutor::run_traced(self, kind, rows, on_step)
    }
    fn run_rows(
        &mut self,
        kind: ProgramKind,
        rows: &Rows<'_>,
        chosen: &[usize],
    ) -> Result<Vec<f32>> {
        CpuExecutor::run_rows(self, kind, rows, chosen)
    }
}

/// B sequences sharing one executor and its KV caches.
///
/// ```no_run
/// use std::sync::Arc;
/// use ngpt_runtime::{plan::LoadedPlan, session::Session};
/// let plan = Arc::new(LoadedPlan::load("out/nv-tiny".as_ref())?);
/// let mut s = Session::new(plan, 2)?; // two sequences
/// let logits = s.prefill(&[vec![45, 64, 77], vec![12]])?; // ragged: padded to T = 3
/// assert_eq!(logits.len(), 2 * 3 * s.vocab());
/// assert_eq!(s.lens(), [3, 1]);
/// let next = s.decode(&[12, 7])?; // one token per sequence
/// assert_eq!(next.len(), 2 * s.vocab());
/// assert_eq!(s.lens(), [4, 2]);
/// # Ok::<(), ngpt_runtime::Error>(())
/// ```
pub struct Session {
    exec: Box<dyn Executor>,
    /// Tokens held in each sequence's cache.
    lens: Vec<usize>,
}

impl Session {
    /// A session for `batch` sequences on the CPU executor.
    pub fn new(plan: Arc<LoadedPlan>, batch: usize) -> Result<Session> {
        Ok(Session::with_executor(Box::new(CpuExecutor::new(
            plan, batch,
        )?)))
    }

    /// A session for `batch` sequences on the CUDA executor (device 0). Fails with one
    /// line naming what is missing where CUDA is not usable; see
    /// [`crate::cuda::unavailable`].
    #[cfg(feature = "cuda")]
    pub fn cuda(plan: Arc<LoadedPlan>, batch: usize) -> Result<Session> {
        Self::cuda_with(plan, batch, &crate::options::CudaOptions::default())
    }

    /// As [`Session::cuda`], with the executor's options.
    #[cfg(feature = "cuda")]
    pub fn cuda_with(
        plan: Arc<LoadedPlan>,
        batch: usize,
        options: &crate::options::CudaOptions,
    ) -> Result<Session> {
        Ok(Session::with_executor(Box::new(
            crate::cuda::CudaExecutor::with_options(plan, batch, options)?,
        )))
    }

    /// A session over any executor (its caches start empty).
    pub fn with_executor(exec: Box<dyn Executor>) -> Session {
        let lens = vec![0; exec.batch()];
        Session { exec, lens }
    }

    /// The executor, e.g. for [`Executor::describe`].
    pub fn executor(&self) -> &dyn Executor {
        self.exec.as_ref()
    }

    /// Logits per row, the plan's vocabulary size: the width of every logits array this
    /// session returns, and the bound token ids must stay below.
    pub fn vocab(&self) -> usize {
        self.exec.plan().dims.vocab
    }

    /// Tokens held per sequence.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let v = self.vocab();
        match tokens.iter().find(|&&t| t as usize >= v) {
            Some(&t) => Err(Error::TokenOutsideVocabulary {
                token: t as i64,
                vocab: v,
            }),
            None => Ok(()),
        }
    }

    /// Runs the prompts (one per sequence, ragged allowed; the cache restarts) and returns
    /// the logits of every position, `[B x T, vocab]` with T the longest prompt; row
    /// `b * T + i` is prompt b's position i (rows past a prompt's end are padding).
    pub fn prefill(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<f32>> {
        self.prefill_with(prompts, None)
    }

    /// As [`Session::prefill`], returning only each prompt's last position, `[B, vocab]`:
    /// what generation needs. The executors skip the lm_head rows nobody reads (and the
    /// GPU copies back B rows, not B x T), so the first token comes sooner; the values are
    /// those rows of [`Session::prefill`] up to the GEMM's summation order.
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use ngpt_runtime::sample::argmax;
    /// use ngpt_runtime::{plan::LoadedPlan, session::Session};
    /// let plan = Arc::new(LoadedPlan::load("out/nv-tiny".as_ref())?);
    /// let mut s = Session::new(plan, 1)?;
    /// let mut logits = s.prefill_last(&[vec![45, 64, 77]])?; // [1, vocab]
    /// let mut generated = vec![];
    /// for _ in 0..8 {
    ///     let next = argmax(&logits); // greedy
    ///     generated.push(next);
    ///     logits = s.decode(&[next])?;
    /// }
    /// assert_eq!(s.lens(), [3 + 8]);
    /// # Ok::<(), ngpt_runtime::Error>(())
    /// ```
    pub fn prefill_last(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<f32>> {
        let (tokens, positions, slots, t) = self.prefill_request(prompts)?;
        let last: Vec<usize> = prompts
            .iter()
            .enumerate()
            .map(|(b, p)| b * t + p.len() - 1)
            .collect();
        let rows = Rows {
            tokens: &tokens,
            positions: &positions,
            slots: &slots,
        };
        let out = self.exec.run_rows(ProgramKind::Prefill, &rows, &last)?;
        self.lens = prompts.iter().map(Vec::len).collect();
        Ok(out)
    }

    /// Prefills one sequence (batch 1 sessions), calling `on_step(step, width, values)`
    /// after each plan step with what it wrote (see [`Executor::run_traced`]).
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use ngpt_runtime::{plan::LoadedPlan, session::Session};
    /// let plan = Arc::new(LoadedPlan::load("out/nv-tiny".as_ref())?);
    /// let mut s = Session::new(plan, 1)?;
    /// let mut steps = vec![];
    /// let logits = s.prefill_traced(&[45, 64, 77], &mut |step, width, values| {
    ///     assert_eq!(values.len(), 3 * width); // one row per prompt token
    ///     steps.push(step.to_string());
    /// })?;
    /// assert_eq!(logits.len(), 3 * s.vocab());
    /// assert!(!steps.is_empty());
    /// # Ok::<(), ngpt_runtime::Error>(())
    /// ```
    pub fn prefill_traced(
        &mut self,
        tokens: &[u32],
        on_step: &mut dyn FnMut(&str, usize, &[f32]),
    ) -> Result<Vec<f32>> {
        if self.exec.batch() != 1 {
            return Err(Error::Request {
                what: "prompts".into(),
                problem: "tracing runs one sequence in a batch-1 session".into(),
            });
        }
        self.prefill_with(&[tokens.to_vec()], Some(on_step))
    }

    fn prefill_with(
        &mut self,
        prompts: &[Vec<u32>],
        on_step: Option<crate::cpu::StepTrace<'_>>,
    ) -> Result<Vec<f32>> {
        let (tokens, positions, slots, _) = self.prefill_request(prompts)?;
        let rows = Rows {
            tokens: &tokens,
            positions: &positions,
            slots: &slots,
        };
        let out = match on_step {
            None => self.exec.run(ProgramKind::Prefill, &rows)?,
            Some(f) => self.exec.run_traced(ProgramKind::Prefill, &rows, f)?,
        }
        .to_vec();
        self.lens = prompts.iter().map(Vec::len).collect();
        Ok(out)
    }

    /// The tokens, positions and slots of a prefill (right-padded to the longest prompt,
    /// T; sequence b is slot b) and T.
    #[allow(clippy::type_complexity)]
    fn prefill_request(
        &self,
        prompts: &[Vec<u32>],
    ) -> Result<(Vec<i32>, Vec<i32>, Vec<i32>, usize)> {
        let b = self.exec.batch();
        if prompts.len() != b {
            return Err(Error::Request {
                what: "prompts".into(),
                problem: format!("expected {b}, found {}", prompts.len()),
            });
        }
        let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if prompts.iter().any(Vec::is_empty) {
            return Err(Error::Request {
                what: "prompts".into(),
                problem: "a prompt is empty; expected at least one token".into(),
            });
        }
        let cap = self.exec.plan().dims.max_seq_len;
        if t > cap {
            return Err(Error::SequenceTooLong {
                tokens: t,
                capacity: cap,
            });
        }
        let mut tokens = Vec::with_capacity(b * t);
        let mut positions = Vec::with_capacity(b * t);
        let mut slots = Vec::with_capacity(b * t);
        for (slot, p) in prompts.iter().enumerate() {
            self.check_tokens(p)?;
            // Right padding: pad rows write cache slots past the prompt, which decode
            // overwrites before any query can reach them.
            tokens.extend((0..t).map(|i| p.get(i).copied().unwrap_or(0) as i32));
            positions.extend((0..t).map(|i| i as i32));
            slots.extend(std::iter::repeat_n(slot as i32, t));
        }
        Ok((tokens, positions, slots, t))
    }

    /// Appends one token to each sequence and returns their logits, `[B, vocab]`.
    pub fn decode(&mut self, next: &[u32]) -> Result<Vec<f32>> {
        let b = self.exec.batch();
        if next.len() != b {
            return Err(Error::Request {
                what: "tokens".into(),
                problem: format!("expected one per sequence ({b}), found {}", next.len()),
            });
        }
        self.check_tokens(next)?;
        let cap = self.exec.plan().dims.max_seq_len;
        if let Some(full) = self.lens.iter().position(|&l| l >= cap || l == 0) {
            if self.lens[full] == 0 {
                return Err(Error::Request {
                    what: format!("sequence {full}"),
                    problem: "has no prefill yet".into(),
                });
            }
            return Err(Error::KvCacheFull {
                sequence: full,
                capacity: cap,
            });
        }
        let tokens: Vec<i32> = next.iter().map(|&t| t as i32).collect();
        let positions: Vec<i32> = self.lens.iter().map(|&l| l as i32).collect();
        let slots: Vec<i32> = (0..b as i32).collect();
        let rows = Rows {
            tokens: &tokens,
            positions: &positions,
            slots: &slots,
        };
        let out = self.exec.run(ProgramKind::Decode, &rows)?.to_vec();
        self.lens.iter_mut().for_each(|l| *l += 1);
        Ok(out)
    }
}
