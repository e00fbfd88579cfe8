//! The CPU executor: runs a plan's steps over its buffer table.

mod attend;
pub mod bf16;
pub mod kernels;
pub mod quant;
mod quant_act;
mod sum_tree;
pub mod tiles;
pub mod weight_gemm;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use kernels::Threading;

use ngpt_schemas::plan::{self as pb, arg, operand, step};

use crate::contract::{self, Bound};
use crate::error::{Error, Result};
use crate::plan::{LoadedPlan, WeightData};
use crate::rows::Rows;

/// A buffer's storage.
#[derive(Debug, Clone)]
pub enum Buf {
    /// An f32 buffer's elements: activations, KV caches, logits.
    F32(Vec<f32>),
    /// An i32 buffer's elements: token ids, positions, slots.
    I32(Vec<i32>),
}

impl Default for Buf {
    fn default() -> Self {
        Buf::F32(vec![])
    }
}

impl Buf {
    /// Resizes to `n` elements (new ones zero); an allocation that fails is an error, not
    /// an abort, so a request too large for this machine is refused cleanly.
    fn resize(&mut self, n: usize, name: &str, request: &str) -> Result<()> {
        fn grow<T: ZeroIsValid>(v: &mut Vec<T>, n: usize, zero: T) -> bool {
            if v.is_empty() && n > 0 {
                // A first allocation (every KV cache) comes zeroed from the allocator: fresh
                // pages the kernel zeroes on first touch, so cache slots no sequence
                // reaches are never written or committed.
                return match zeroed(n) {
                    Some(z) => {
                        *v = z;
                        true
                    }
                    None => false,
                };
            }
            if n > v.len() && v.try_reserve_exact(n - v.len()).is_err() {
                return false;
            }
            v.resize(n, zero);
            true
        }
        let ok = match self {
            Buf::F32(v) => grow(v, n, 0.0),
            Buf::I32(v) => grow(v, n, 0),
        };
        if ok {
            Ok(())
        } else {
            Err(Error::Request {
                what: format!("buffer `{name}`"),
                problem: format!(
                    "cannot allocate {n} elements ({} bytes) for {request}",
                    n.saturating_mul(4)
                ),
            })
        }
    }
}

/// Element types whose all-zero bit pattern is the value zero.
trait ZeroIsValid: Copy {}
impl ZeroIsValid for f32 {}
impl ZeroIsValid for i32 {}

/// `n` zeros (`n > 0`), allocated fallibly and zeroed by the allocator (for a large
/// buffer, `calloc` hands out fresh pages without writing them); `None` when the
/// allocation fails.
fn zeroed<T: ZeroIsValid>(n: usize) -> Option<Vec<T>> {
    let layout = std::alloc::Layout::array::<T>(n).ok()?;
    if layout.size() == 0 {
        return Some(Vec::new());
    }
    // SAFETY: the layout has a non-zero size. A non-null result is a block of the global
    // allocator with `T`'s alignment and room for exactly `n` elements, all of whose bytes
    // are zero, which for `ZeroIsValid` types (f32, i32) are `n` valid zeros; `Vec` frees it
    // with the same layout (capacity `n`, the global allocator).
    unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<T>();
        (!p.is_null()).then(|| Vec::from_raw_parts(p, n, n))
    }
}

/// Which program to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramKind {
    /// The plan's prefill program: any rows (prompt chunks), each written into its slot's
    /// KV cache at its position, with logits for every row.
    Prefill,
    /// The plan's decode program: any rows (one per sequence, typically), each written into
    /// its slot's KV cache at its position and attending to that cache up to it.
    Decode,
}

/// Runs plans on the CPU. Holds the buffers (KV caches included) of one batch.
///
/// GEMMs and the heavy kernel twins run on rayon's global pool; [`Threading`] changes how
/// the twins use it, never what they compute.
///
/// ```no_run
/// use std::sync::Arc;
/// use ngpt_runtime::cpu::{CpuExecutor, ProgramKind, Threading};
/// use ngpt_runtime::plan::LoadedPlan;
/// let plan = Arc::new(LoadedPlan::load("out/nv-tiny".as_ref())?);
/// use ngpt_runtime::Rows;
/// let mut exec = CpuExecutor::new(plan, 1)?; // one KV slot
/// exec.set_threading(Threading::Sequential); // the same bits, on one thread
/// let rows = Rows { tokens: &[45, 64, 77], positions: &[0, 1, 2], slots: &[0, 0, 0] };
/// let logits = exec.run(ProgramKind::Prefill, &rows)?;
/// assert_eq!(logits.len(), 3 * exec.plan.dims().vocab);
/// # Ok::<(), ngpt_runtime::Error>(())
/// ```
pub struct CpuExecutor {
    /// The plan this executor runs.
    pub plan: Arc<LoadedPlan>,
    /// KV slots (sequences, B) this executor holds caches for, as given to
    /// [`CpuExecutor::new`]: every row's slot is below it.
    pub batch: usize,
    buffers: Vec<Buf>,
    threading: Threading,
    /// f32 copies of the bf16 weights some step reads as f32 ([`LoadedPlan::f32_weight_reads`]:
    /// kernel arguments such as the embedding table); None for the rest.
    widened: Vec<Option<Vec<f32>>>,
    /// Rows of logits the last run computed.
    logits_rows: usize,
}

/// A step tracer: called with (step name, row width, rows x width values) after each step.
pub type StepTrace<'a> = &'a mut dyn FnMut(&str, usize, &[f32]);

fn step_err(step: &str, problem: impl Into<String>) -> Error {
    Error::Step {
        step: step.to_string(),
        problem: problem.into(),
    }
}

impl CpuExecutor {
    /// Allocates the caches for `batch` KV slots; activations grow per call.
    pub fn new(plan: Arc<LoadedPlan>, batch: usize) -> Result<CpuExecutor> {
        if batch == 0 {
            return Err(Error::EmptyBatch);
        }
        let mut buffers = Vec::with_capacity(plan.plan.buffers.len());
        for (i, b) in plan.plan.buffers.iter().enumerate() {
            let n = if b.kind == pb::BufferKind::Cache as i32 {
                plan.buffer_len(i, 0, batch)?
            } else {
                0
            };
            let mut buf = if b.dtype == pb::DType::I32 as i32 {
                Buf::I32(vec![])
            } else {
                Buf::F32(vec![])
            };
            buf.resize(n, &b.name, &format!("batch {batch}"))?;
            buffers.push(buf);
        }
        let reads = plan.f32_weight_reads();
        let widened = plan
            .weights
            .iter()
            .enumerate()
            .map(|(i, w)| match w {
                WeightData::Bf16(_) if reads.contains(&i) => Some(w.to_f32().into_owned()),
                _ => None,
            })
            .collect();
        Ok(CpuExecutor {
            plan,
            batch,
            buffers,
            threading: Threading::Auto,
            widened,
            logits_rows: 0,
        })
    }

    /// How the kernel twins use threads (default [`Threading::Auto`]). Results are bitwise
    /// the same in every mode.
    pub fn set_threading(&mut self, threading: Threading) {
        self.threading = threading;
    }

    /// Rows of logits the last run computed: every row, or for [`CpuExecutor::run_rows`]
    /// the chosen ones when the lm_head GEMM could be narrowed to them.
    pub fn logits_rows_computed(&self) -> usize {
        self.logits_rows
    }

    /// The current [`Threading`].
    pub fn threading(&self) -> Threading {
        self.threading
    }

    fn buffer_index(&self, name: &str) -> Result<usize> {
        self.plan
            .plan
            .buffers
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| Error::Plan {
                path: "model.plan".into(),
                problem: format!("no buffer named `{name}`"),
            })
    }

    /// Runs `kind` on `rows` (checked by [`Rows::check`] first) and returns the logits
    /// buffer, `[rows, vocab]`.
    pub fn run(&mut self, kind: ProgramKind, rows: &Rows<'_>) -> Result<&[f32]> {
        self.run_program(kind, rows, None, None)
    }

    /// As [`CpuExecutor::run`], returning only the logits of the `chosen` rows,
    /// `[chosen.len(), vocab]` ([`crate::session::Executor::run_rows`]). When the program's
    /// last step is the lm_head GEMM (weight form, beta 0), only those rows are multiplied:
    /// their final hidden states are gathered to the front of the GEMM's input first.
    pub fn run_rows(
        &mut self,
        kind: ProgramKind,
        rows: &Rows<'_>,
        chosen: &[usize],
    ) -> Result<Vec<f32>> {
        let v = self.plan.dims.vocab;
        let out = self.run_program(kind, rows, None, Some(chosen))?;
        // Every row computed (the lm_head could not be narrowed): pick the rows out.
        if out.len() == rows.len() * v {
            crate::rows::gather_rows(out, v, chosen)
        } else {
            Ok(out.to_vec())
        }
    }

    /// As [`CpuExecutor::run`], calling `on_step(step name, row width, rows)` after each
    /// step with what it wrote: its first output buffer (a launch's first `Out` slot, a
    /// GEMM's C), `rows x width` values. The trace `ngpt bisect` compares; `run` pays
    /// nothing for it.
    pub fn run_traced(
        &mut self,
        kind: ProgramKind,
        rows: &Rows<'_>,
        on_step: &mut dyn FnMut(&str, usize, &[f32]),
    ) -> Result<&[f32]> {
        self.run_program(kind, rows, Some(on_step), None)
    }

    /// Runs a program and returns the logits it computed: every row, or with `select`
    /// only those rows (in order) where the last step can be narrowed to them.
    fn run_program(
        &mut self,
        kind: ProgramKind,
        request: &Rows<'_>,
        on_step: Option<StepTrace<'_>>,
        select: Option<&[usize]>,
    ) -> Result<&[f32]> {
        let d = self.plan.dims;
        let rows = request.check(self.batch, d.max_seq_len, d.vocab)?;
        let plan = Arc::clone(&self.plan);
        // Size the per-call buffers.
        for (i, b) in plan.plan.buffers.iter().enumerate() {
            if b.kind == pb::BufferKind::Cache as i32 {
                continue;
            }
            let n = plan.buffer_len(i, rows, self.batch)?;
            self.buffers[i].resize(n, &b.name, &format!("{rows} rows (batch {})", self.batch))?;
        }
        for (name, src) in [
            ("tokens", request.tokens),
            ("positions", request.positions),
            ("slots", request.slots),
        ] {
            let i = self.buffer_index(name)?;
            match &mut self.buffers[i] {
                Buf::I32(v) if v.len() >= rows => v[..rows].copy_from_slice(src),
                _ => {
                    return Err(step_err(
                        "inputs",
                        "the tokens/positions/slots buffers are not int32 [rows]",
                    ))
                }
            }
        }
        let program = match kind {
            ProgramKind::Prefill => plan.plan.prefill.as_ref(),
            ProgramKind::Decode => plan.plan.decode.as_ref(),
        };
        let program = program.ok_or_else(|| step_err("program", "missing"))?;
        // The steps run on one of the pool's threads: every GEMM and kernel twin inside
        // then splits its work among threads that are already awake, where from any other
        // thread each parallel step would be handed to the pool and waited for (tens of
        // microseconds each, hundreds of times a decode step). A tracer stays on the
        // caller's thread (it need not be Send); so does a call already on the pool.
        let out_rows = match on_step {
            None if rayon::current_thread_index().is_none() => {
                let done = AtomicBool::new(false);
                rayon::scope(|scope| {
                    // Dropped however the steps end (an error or a panic included): the
                    // scope waits for the spinners, which end on it.
                    let _stop = Stop::new(&done);
                    keep_awake(scope, &done);
                    self.run_steps(program, rows, None, select)
                })?
            }
            on_step => self.run_steps(program, rows, on_step, select)?,
        };
        self.logits_rows = out_rows;
        let li = self.buffer_index("logits")?;
        let want = out_rows * plan.dims.vocab;
        match &self.buffers[li] {
            Buf::F32(v) if v.len() >= want => Ok(&v[..want]),
            Buf::F32(v) => Err(step_err(
                "logits",
                format!(
                    "the logits buffer holds {} elements, {rows} rows x vocab {} need {want}",
                    v.len(),
                    plan.dims.vocab
                ),
            )),
            Buf::I32(_) => Err(step_err("logits", "logits buffer is not f32")),
        }
    }

    /// Runs `program`'s steps on `rows` (sized and filled by [`CpuExecutor::run_program`])
    /// and returns the rows of logits computed.
    fn run_steps(
        &mut self,
        program: &pb::Program,
        rows: usize,
        mut on_step: Option<StepTrace<'_>>,
        select: Option<&[usize]>,
    ) -> Result<usize> {
        let plan = Arc::clone(&self.plan);
        let last = program.steps.len().saturating_sub(1);
        let mut out_rows = rows;
        for (si, s) in program.steps.iter().enumerate() {
            match s.kind.as_ref() {
                Some(step::Kind::Launch(l)) => {
                    // A twin's bounds error names the kernel's operand; add the step.
                    self.launch(&s.name, l, rows).map_err(|e| match e {
                        Error::Step { step, problem } if step != s.name => Error::Step {
                            step: s.name.clone(),
                            problem: format!("{step}: {problem}"),
                        },
                        e => e,
                    })?
                }
                Some(step::Kind::Gemm(g)) => match select.filter(|_| si == last) {
                    Some(sel) if self.gather_final_rows(g, rows, sel)? => {
                        out_rows = sel.len();
                        // No row chosen (a prompt chunk that does not end its prompt):
                        // the lm_head has nothing to compute.
                        if out_rows > 0 {
                            self.gemm(&s.name, g, out_rows)?
                        }
                    }
                    _ => self.gemm(&s.name, g, rows)?,
                },
                None => return Err(step_err(&s.name, "empty step")),
            }
            if let Some(f) = on_step.as_mut() {
                if let Some(b) = crate::plan::written_buffer(s) {
                    let width = plan.plan.buffers[b]
                        .elements
                        .as_ref()
                        .map_or(0, |e| e.c_rows as usize);
                    if let Buf::F32(v) = &self.buffers[b] {
                        if width > 0 && v.len() >= rows * width {
                            f(&s.name, width, &v[..rows * width]);
                        }
                    }
                }
            }
        }
        Ok(out_rows)
    }

    /// For [`CpuExecutor::run_rows`]: when `g` (a program's last step) is the lm_head
    /// GEMM in the weight form (C the logits, B an activation buffer whose row r is
    /// column r, beta 0, n = rows), moves rows `sel` of B to its front, so that the same
    /// GEMM with n = sel.len() computes just their logits. `sel` must be strictly
    /// increasing (each row then moves towards the front over rows already read).
    /// Returns whether it did.
    fn gather_final_rows(&mut self, g: &pb::Gemm, rows: usize, sel: &[usize]) -> Result<bool> {
        let src = |o: Option<&pb::Operand>| o.and_then(|o| o.source);
        let (Some(operand::Source::Buffer(bi)), Some(operand::Source::Buffer(ci))) =
            (src(g.b.as_ref()), src(g.c.as_ref()))
        else {
            return Ok(false);
        };
        let increasing = sel.windows(2).all(|w| w[0] < w[1]);
        let fits = sel.last().is_none_or(|&r| r < rows);
        if !(g.trans_a && !g.trans_b && g.beta == 0.0 && increasing && fits)
            || ci as usize != self.buffer_index("logits")?
            || bi == ci
        {
            return Ok(false);
        }
        if sel.is_empty() {
            return Ok(true); // nothing to move; the caller skips the GEMM
        }
        let (Ok(full), Ok(part)) = (
            crate::plan::gemm_extents(g, rows, self.batch),
            crate::plan::gemm_extents(g, sel.len(), self.batch),
        ) else {
            return Ok(false);
        };
        if full.n != rows || part.n != sel.len() || full.ldb != part.ldb {
            return Ok(false);
        }
        let (ldb, k) = (full.ldb, full.k);
        let Some(Buf::F32(b)) = self.buffers.get_mut(bi as usize) else {
            return Ok(false);
        };
        if b.len() < full.need_b {
            return Ok(false);
        }
        for (i, &r) in sel.iter().enumerate() {
            if r != i {
                b.copy_within(r * ldb..r * ldb + k, i * ldb);
            }
        }
        Ok(true)
    }

    /// Checks a launch against the kernel contract (`crate::contract`), as the CUDA
    /// executor does: dtypes, the elements each argument must hold for this call, distinct
    /// buffers. The twins check every index they take besides.
    fn check_contract(&self, name: &str, l: &pb::Launch, rows: usize) -> Result<()> {
        let entry = contract::entry(&l.entry).ok_or_else(|| {
            step_err(
                name,
                format!("kernel entry `{}` has no CPU twin in programs", l.entry),
            )
        })?;
        let mut bound = Vec::with_capacity(l.args.len());
        for a in &l.args {
            bound.push(match a.value.as_ref() {
                Some(arg::Value::Buffer(b)) => {
                    let b = *b as usize;
                    let (int32, len) = match self.buffers.get(b) {
                        Some(Buf::F32(v)) => (false, v.len()),
                        Some(Buf::I32(v)) => (true, v.len()),
                        None => return Err(step_err(name, format!("buffer {b} does not exist"))),
                    };
                    let bname = self
                        .plan
                        .plan
                        .buffers
                        .get(b)
                        .map_or("?", |x| x.name.as_str());
                    Bound::Buffer {
                        index: b,
                        name: bname,
                        int32,
                        len,
                    }
                }
                Some(arg::Value::Weight(w)) => Bound::Weight {
                    index: *w as usize,
                    len: self.plan.weights.get(*w as usize).map_or(0, |x| x.len()),
                },
                Some(arg::Value::Symbol(s)) => Bound::Int(match pb::Symbol::try_from(*s) {
                    Ok(pb::Symbol::Rows) => rows as i64,
                    Ok(pb::Symbol::Batch) => self.batch as i64,
                    _ => return Err(step_err(name, format!("bad symbol {s}"))),
                }),
                Some(arg::Value::IntConst(c)) => Bound::Int(*c),
                Some(arg::Value::FloatConst(_)) => Bound::Float,
                None => return Err(step_err(name, "an argument is empty")),
            });
        }
        entry
            .check_args(&self.plan.dims, &bound, self.batch)
            .map_err(|p| step_err(name, p))
    }

    fn launch(&mut self, name: &str, l: &pb::Launch, rows: usize) -> Result<()> {
        let plan = Arc::clone(&self.plan);
        let d = &plan.dims;
        let threading = self.threading;
        self.check_contract(name, l, rows)?;
        let bufi = |i: usize| -> Result<usize> {
            match l.args.get(i).and_then(|a| a.value.as_ref()) {
                Some(arg::Value::Buffer(b)) => Ok(*b as usize),
                _ => Err(step_err(name, format!("argument {i} is not a buffer"))),
            }
        };
        let widened = &self.widened;
        let weight = |i: usize| -> Result<&[f32]> {
            match l.args.get(i).and_then(|a| a.value.as_ref()) {
                Some(arg::Value::Weight(w)) => f32_weight(&plan, widened, *w as usize)
                    .ok_or_else(|| step_err(name, "bad weight")),
                _ => Err(step_err(name, format!("argument {i} is not a weight"))),
            }
        };
        // Outputs are taken out of the table while the twin runs, then put back.
        let take = |bufs: &mut Vec<Buf>, i: usize| -> Result<Vec<f32>> {
            match std::mem::take(&mut bufs[i]) {
                Buf::F32(v) => Ok(v),
                other => {
                    bufs[i] = other;
                    Err(step_err(name, format!("buffer {i} should be f32")))
                }
            }
        };
        fn f32_of<'b>(name: &str, bufs: &'b [Buf], i: usize) -> Result<&'b [f32]> {
            match &bufs[i] {
                Buf::F32(v) => Ok(v),
                Buf::I32(_) => Err(step_err(name, format!("buffer {i} should be f32"))),
            }
        }
        fn i32_of<'b>(name: &str, bufs: &'b [Buf], i: usize) -> Result<&'b [i32]> {
            match &bufs[i] {
                Buf::I32(v) => Ok(v),
                Buf::F32(_) => Err(step_err(name, format!("buffer {i} should be int32"))),
            }
        }
        let bufs = &mut self.buffers;
        macro_rules! with_out {
            ($out:expr, |$o:ident| $body:expr) => {{
                let oi = $out;
                let mut $o = take(bufs, oi)?;
                let r = $body;
                bufs[oi] = Buf::F32($o);
                r
            }};
        }
        match l.entry.as_str() {
            "embed" => {
                let (t, o) = (bufi(0)?, bufi(2)?);
                with_out!(o, |out| kernels::embed(
                    d,
                    i32_of(name, bufs, t)?,
                    weight(1)?,
                    &mut out,
                    rows
                ))
            }
            "norm_rows" => {
                let (x, o) = (bufi(0)?, bufi(1)?);
                with_out!(o, |out| kernels::norm_rows(
                    d,
                    f32_of(name, bufs, x)?,
                    &mut out,
                    rows,
                    threading
                ))
            }
            "lerp_norm" => {
                let (h, b) = (bufi(0)?, bufi(1)?);
                with_out!(h, |hv| kernels::lerp_norm(
                    d,
                    &mut hv,
                    f32_of(name, bufs, b)?,
                    weight(2)?,
                    rows,
                    threading
                ))
            }
            "swiglu" => {
                let (x, o) = (bufi(0)?, bufi(1)?);
                with_out!(o, |out| kernels::swiglu(
                    d,
                    f32_of(name, bufs, x)?,
                    &mut out,
                    rows,
                    threading
                ))
            }
            "pos_norm" => {
                let (qkv, pos, qo, kc, vc) = (bufi(0)?, bufi(1)?, bufi(5)?, bufi(6)?, bufi(7)?);
                let sl = bufi(9)?;
                let mut q = take(bufs, qo)?;
                let mut k = take(bufs, kc)?;
                let mut v = take(bufs, vc)?;
                let r = kernels::pos_norm(
                    d,
                    f32_of(name, bufs, qkv)?,
                    i32_of(name, bufs, pos)?,
                    weight(2)?,
                    weight(3)?,
                    weight(4)?,
                    &mut q,
                    &mut k,
                    &mut v,
                    rows,
                    i32_of(name, bufs, sl)?,
                    threading,
                );
                bufs[qo] = Buf::F32(q);
                bufs[kc] = Buf::F32(k);
                bufs[vc] = Buf::F32(v);
                r
            }
            "embed_pos" => {
                let (t, p, o) = (bufi(0)?, bufi(1)?, bufi(4)?);
                with_out!(o, |out| kernels::embed_pos(
                    d,
                    i32_of(name, bufs, t)?,
                    i32_of(name, bufs, p)?,
                    weight(2)?,
                    weight(3)?,
                    &mut out,
                    rows
                ))
            }
            "lerp_norm_bias" => {
                let (h, b) = (bufi(0)?, bufi(1)?);
                with_out!(h, |hv| kernels::lerp_norm_bias(
                    d,
                    &mut hv,
                    f32_of(name, bufs, b)?,
                    weight(2)?,
                    weight(3)?,
                    rows,
                    threading
                ))
            }
            "swiglu_bias" => {
                let (x, o) = (bufi(0)?, bufi(2)?);
                with_out!(o, |out| kernels::swiglu_bias(
                    d,
                    f32_of(name, bufs, x)?,
                    weight(1)?,
                    &mut out,
                    rows,
                    threading
                ))
            }
            "rotary_norm" => {
                let (qkv, pos, qo, kc, vc) = (bufi(0)?, bufi(1)?, bufi(5)?, bufi(6)?, bufi(7)?);
                let sl = bufi(9)?;
                let mut q = take(bufs, qo)?;
                let mut k = take(bufs, kc)?;
                let mut v = take(bufs, vc)?;
                let r = kernels::rotary_norm(
                    d,
                    f32_of(name, bufs, qkv)?,
                    i32_of(name, bufs, pos)?,
                    weight(2)?,
                    weight(3)?,
                    weight(4)?,
                    &mut q,
                    &mut k,
                    &mut v,
                    rows,
                    i32_of(name, bufs, sl)?,
                    threading,
                );
                bufs[qo] = Buf::F32(q);
                bufs[kc] = Buf::F32(k);
                bufs[vc] = Buf::F32(v);
                r
            }
            "attention_prefill" | "attention_decode" => {
                let (q, kc, vc, pos, o) = (bufi(0)?, bufi(1)?, bufi(2)?, bufi(3)?, bufi(4)?);
                let sl = bufi(6)?;
                with_out!(o, |out| kernels::attention(
                    d,
                    f32_of(name, bufs, q)?,
                    f32_of(name, bufs, kc)?,
                    f32_of(name, bufs, vc)?,
                    i32_of(name, bufs, pos)?,
                    &mut out,
                    rows,
                    i32_of(name, bufs, sl)?,
                    threading
                ))
            }
            other => Err(step_err(
                name,
                format!("kernel entry `{other}` has no CPU twin in programs"),
            )),
        }
    }

    /// A GEMM as cuBLAS computes it: column-major `C = alpha op(A) op(B) + beta C`.
    fn gemm(&mut self, name: &str, g: &pb::Gemm, rows: usize) -> Result<()> {
        let plan = Arc::clone(&self.plan);
        let batch = self.batch;
        let crate::plan::GemmExtents {
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
            need_a,
            need_b,
            need_c,
        } = crate::plan::gemm_extents(g, rows, batch).map_err(|p| step_err(name, p))?;
        let src = |o: Option<&pb::Operand>| o.and_then(|o| o.source);
        let ci = match src(g.c.as_ref()) {
            Some(operand::Source::Buffer(b)) => b as usize,
            _ => return Err(step_err(name, "GEMM c must be a buffer")),
        };
        let mut c = match std::mem::take(&mut self.buffers[ci]) {
            Buf::F32(v) => v,
            other => {
                self.buffers[ci] = other;
                return Err(step_err(name, "GEMM c must be f32"));
            }
        };
        let result = (|| -> Result<()> {
            let operand = |s: Option<operand::Source>, what: &str| -> Result<&[f32]> {
                match s {
                    Some(operand::Source::Weight(w)) => {
                        f32_weight(&plan, &self.widened, w as usize)
                    }
                    Some(operand::Source::Buffer(b)) if b as usize != ci => {
                        match self.buffers.get(b as usize) {
                            Some(Buf::F32(v)) => Some(v.as_slice()),
                            _ => None,
                        }
                    }
                    _ => None,
                }
                .ok_or_else(|| {
                    step_err(
                        name,
                        format!("GEMM {what} is not an f32 buffer or weight distinct from c"),
                    )
                })
            };
            // A bf16 weight in the weight form is read as bf16; every other operand as f32.
            // In the weight form (W rows and x rows both contiguous) a bf16 weight is read
            // as bf16; every other operand as f32.
            let weight_form = g.trans_a && !g.trans_b;
            let a = match (src(g.a.as_ref()), weight_form) {
                (Some(operand::Source::Weight(w)), true) => match plan.weights.get(w as usize) {
                    Some(WeightData::Bf16(bits)) => GemmA::Bf16(bits),
                    Some(WeightData::Quant(q)) => GemmA::Quant(q),
                    _ => GemmA::F32(operand(src(g.a.as_ref()), "a")?),
                },
                (s, _) => GemmA::F32(operand(s, "a")?),
            };
            let a_len = match a {
                GemmA::Bf16(v) => v.len(),
                GemmA::F32(v) => v.len(),
                GemmA::Quant(q) => {
                    // The plan's validation holds this; a GEMM that reads a quantized
                    // weight other than by whole rows is refused, never guessed at.
                    if k != q.k || lda != q.k || m > q.rows {
                        return Err(step_err(
                            name,
                            format!(
                                "GEMM over a quantized [{}, {}] weight must read whole rows: m {m}, k {k}, lda {lda}",
                                q.rows, q.k
                            ),
                        ));
                    }
                    q.rows * q.k
                }
            };
            let b = operand(src(g.b.as_ref()), "b")?;
            if a_len < need_a || b.len() < need_b || c.len() < need_c {
                return Err(step_err(
                    name,
                    format!("GEMM operands too small: a {a_len}/{need_a}, b {}/{need_b}, c {}/{need_c} elements", b.len(), c.len()),
                ));
            }
            if m == 0 || n == 0 {
                return Ok(());
            }
            let shape = weight_gemm::Shape {
                m,
                n,
                k,
                lda,
                ldb,
                ldc,
                alpha: g.alpha,
                beta: g.beta,
            };
            let a = match a {
                GemmA::Bf16(w) => {
                    bf16::gemm(shape, w, b, &mut c);
                    return Ok(());
                }
                GemmA::Quant(w) => {
                    quant::gemm(shape, w, b, &mut c);
                    return Ok(());
                }
                GemmA::F32(a) => a,
            };
            if weight_form && n <= tiles::GEMM_MAX_N {
                // Decode steps, prompt chunks, short prompts: register tiles, each row's
                // result independent of the others (batch invariance).
                tiles::gemm(shape, a, b, &mut c);
                return Ok(());
            }
            let (a_rs, a_cs) = if g.trans_a {
                (lda as isize, 1)
            } else {
                (1, lda as isize)
            };
            let (b_rs, b_cs) = if g.trans_b {
                (ldb as isize, 1)
            } else {
                (1, ldb as isize)
            };
            // SAFETY: every element the GEMM touches lies inside a, b and c: checked above
            // from the same m, n, k and leading dimensions. c is a distinct allocation.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    ldc as isize,
                    1,
                    g.beta != 0.0,
                    a.as_ptr(),
                    a_cs,
                    a_rs,
                    b.as_ptr(),
                    b_cs,
                    b_rs,
                    g.beta,
                    g.alpha,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
            Ok(())
        })();
        self.buffers[ci] = Buf::F32(c);
        result
    }
}

/// A GEMM's `a` operand as the executor reads it.
enum GemmA<'a> {
    Bf16(&'a [u16]),
    F32(&'a [f32]),
    /// Only in the weight form (the plan's validation refuses any other use).
    Quant(&'a crate::plan::QuantWeight),
}

/// Weight `w` as f32: its own values, or its widened copy when it is stored in bf16.
fn f32_weight<'a>(
    plan: &'a LoadedPlan,
    widened: &'a [Option<Vec<f32>>],
    w: usize,
) -> Option<&'a [f32]> {
    match plan.weights.get(w)? {
        WeightData::F32(v) => Some(v),
        WeightData::Bf16(_) => widened.get(w)?.as_deref(),
        // Read only by the quantized GEMM (the plan's validation refuses other reads).
        WeightData::F16(_) | WeightData::Quant(_) => None,
    }
}

/// Keeps the pool's other threads awake while a program's steps run on this one: each
/// takes a job that runs whatever work the pool has (`rayon::yield_now`: the steps' GEMM
/// pieces) and spins between, until `done`. Without it a thread that found no work for a
/// few tens of microseconds went to sleep, and waking it for the next step's GEMM took
/// longer than its share of that GEMM (a VM's idle vCPU halts): on the 2-core Zen 4 VM, 96
/// int4 GEMVs of a decode token ran 1.8x faster on two threads than on one back to back,
/// 1.3-1.5x with a few microseconds of one-thread work between them, as a decode step's
/// norms and attention put there.
///
/// A spinner never runs on a thread that is running steps (its job returns at once there):
/// such a thread runs pending jobs while it waits inside a GEMM, and a spinner taken there
/// would wait for `done` above steps that cannot finish beneath it; with several programs
/// running at once on one pool (tests, or callers on their own threads), two such waits
/// could each wait for the other.
fn keep_awake<'s>(scope: &rayon::Scope<'s>, done: &'s AtomicBool) {
    for _ in 1..rayon::current_num_threads() {
        scope.spawn(move |_| {
            if RUNNING_STEPS.get() {
                return;
            }
            while !done.load(Ordering::Acquire) {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::hint::spin_loop();
                }
            }
        });
    }
}

thread_local! {
    /// Whether this thread is running a program's steps ([`keep_awake`]).
    static RUNNING_STEPS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, this thread is running steps; dropped, it sets the flag that ends
/// [`keep_awake`]'s spinners and restores the thread's former state.
struct Stop<'a> {
    done: &'a AtomicBool,
    was: bool,
}

impl<'a> Stop<'a> {
    fn new(done: &'a AtomicBool) -> Stop<'a> {
        Stop {
            done,
            was: RUNNING_STEPS.replace(true),
        }
    }
}

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        RUNNING_STEPS.set(self.was);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_grow_zeroed_and_refuse_impossible_sizes() {
        // A first allocation comes zeroed from the allocator, a later growth is filled.
        let mut b = Buf::F32(vec![]);
        b.resize(1 << 20, "kv", "test").unwrap();
        let Buf::F32(v) = &mut b else { panic!() };
        assert!(v.len() == 1 << 20 && v.iter().all(|&x| x.to_bits() == 0));
        v[7] = 3.0;
        b.resize((1 << 20) + 5, "kv", "test").unwrap();
        let Buf::F32(v) = &b else { panic!() };
        assert!(v[7] == 3.0 && v[1 << 20..].iter().all(|&x| x.to_bits() == 0));
        let mut i = Buf::I32(vec![]);
        i.resize(3, "tokens", "test").unwrap();
        assert!(matches!(&i, Buf::I32(v) if v == &[0, 0, 0]));
        // Beyond any address space: an error naming the buffer, not an abort.
        for mut b in [Buf::F32(vec![]), Buf::F32(vec![1.0])] {
            let e = b.resize(usize::MAX / 2, "kv", "batch 9").unwrap_err();
            assert!(e.to_string().contains("buffer `kv`"), "{e}");
        }
    }
}
