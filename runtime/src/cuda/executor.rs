//! The CUDA executor: a plan's programs on device 0, through cudarc's driver API and
//! cuBLAS, with the decode program captured once in a CUDA graph and replayed.
//!
//! What it does, in order (ARCHITECTURE.md, runtime `cuda/`, says it in short):
//! - [`CudaExecutor::new`] probes for the libraries before touching any of them (cudarc
//!   panics when one is missing), retains device 0's primary context, makes one stream,
//!   compiles the plan's kernel modules with NVRTC for the device's own architecture
//!   (through the kernel cache), uploads every weight once (F32 as f32; BF16 GEMM weights
//!   stay BF16 on the device) and allocates the KV caches.
//! - Each run checks the request on the host (token ids, positions), sizes the per-call
//!   buffers (grown, never shrunk), checks every step against the kernel contract (the
//!   sizes each kernel reads and writes, the block shapes it assumes) and the GEMM extents,
//!   fills every activation and output buffer with NaN, then enqueues the steps: kernel
//!   launches with the plan's grid, block and shared memory; GEMMs through cuBLAS exactly
//!   as the plan states them (column-major, transposes, leading dimensions, alpha, beta).
//! - GEMMs: f32 x f32 is `cublasSgemm` (default math mode: no TF32). A BF16 weight is
//!   multiplied by `cublasGemmEx` with both operands BF16, f32 accumulation
//!   (`CUBLAS_COMPUTE_32F`) and an f32 C: cuBLAS has no bf16 x f32 form, so the f32
//!   operand (the activation) is rounded to bf16 (nearest even) into a scratch buffer by a
//!   small runtime kernel first. The option `bf16_gemm=f32` instead keeps an f32 copy of
//!   every BF16 weight on the device and runs Sgemm: the CPU executor's numbers, twice the
//!   weight memory.
//! - GEMMs of at most 8 columns in the weight form (op(A) = T, op(B) = N: every weight
//!   product of a decode step) run instead as the runtime's own `gemv_*` kernels
//!   (helpers.cu): one warp per output row streams the weight once, f32 activations, no
//!   rounding to bf16. cuBLAS ran these shapes at a few percent of the memory bandwidth
//!   on an H200 (BENCHMARKS.md); the CPU executor's dot products are the same idea.
//!   The option `gemv=off` sends them to cuBLAS again.
//! - Decode as one launch (`decode_persistent`, helpers.cu): when every step of the
//!   decode program is one of the plan kernels or a gemv, the resolved steps become a
//!   table (`PdOp` in persistent.rs, 128 bytes each) and one grid of as many blocks as
//!   fit on the device at once walks it, every block doing its share of each step and all
//!   of them meeting at a grid barrier between steps; attention is split across the KV
//!   length (32 warps per row and head) and combined after a barrier. `persistent::fuse`
//!   folds lerp_norm and swiglu into the gemv after them and pos_norm into attention.
//!   This replaces about 220 launches per token. The option `persistent=off` (or
//!   `set_persistent`) launches the steps one by one instead; traced runs always do.
//! - Checks: every driver and cuBLAS status is checked. Launch configuration errors come
//!   back from `cuLaunchKernel` itself; errors of a running kernel surface at the next
//!   synchronization. In check mode (option `check=on`, the default in debug builds,
//!   tests included) the stream is synchronized after
//!   every step, so an error names its step, and the logits are scanned for NaN (an
//!   element no step wrote). Release builds synchronize once per run, before the logits
//!   are copied back.
//! - Decode (one row per sequence) runs step by step on its first call (a warm-up: cuBLAS
//!   and the driver finish their lazy setup outside any capture), is captured into a CUDA
//!   graph on its second and replayed after (tokens and positions are read from device
//!   buffers, so the graph is the same every step); a buffer that grows (a longer prefill)
//!   drops the graph and decode warms up and captures again. The option `graph=off` runs
//!   decode step by step instead. Prefill always runs step by step.
//! - The option `profile=on`: every run goes step by step behind a short spin kernel (so
//!   that all of it is queued before the GPU starts and the events between steps time the
//!   kernels, not the host), and dropping the executor prints the GPU time per kernel and
//!   GEMM shape to stderr. Timings of a profiled process are not the executor's speed.

//!
//! Where each part lives (this file is the orchestration: the executor's state,
//! construction, `run_program`/`run_once`, the options' setters and getters, the
//! `Executor` impl):
//! - `lock.rs`: the device lock every executor of the process takes turns with, and why
//!   the state is dropped by hand under it.
//! - `errors.rs`: the one-line errors of driver failures, setup and steps.
//! - `device.rs`: device memory (allocations, weights, buffers), sizing the per-call
//!   buffers, uploading the inputs, the NaN poison, copying the logits back.
//! - `modules.rs`: architecture names, loading the compiled kernel modules and the plan's
//!   kernels with their shared memory limits.
//! - `resolve.rs`: a program's steps resolved into [`Op`]s and checked against the kernel
//!   contract or the GEMM's extents; which GEMMs run as `gemv_*`.
//! - `enqueue.rs`: resolved ops on the stream, the check-mode synchronization, tracing.
//! - `gemm.rs`: the cuBLAS handle and calls, the bf16 rounding of activations, the
//!   `gemv_*` kernels' loading.
//! - `graph.rs`: capturing the decode program into a CUDA graph.
//! - `persistent_launch.rs`: decode as one `decode_persistent` launch (persistent.rs is
//!   its step table and folding pass).
//! - `profile.rs`: the option `profile` and its report.

use std::cell::RefCell;
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use cudarc::driver::{sys as cu, CudaContext, CudaFunction, CudaModule, CudaStream};

use super::device::{plan_buffers, upload_weights, Dev, DevBuffer, DevWeight};
use super::errors::{drv, plan_cuda_err, setup, step_err};
use super::gemm::{create_blas, load_gemv, BlasHandle};
use super::graph::DecodeGraph;
use super::lock::device_turn;
use super::modules::{arch_name, load_functions, load_ptx, used_functions};
use super::persistent;
use super::persistent_launch::{self, load_persistent, Persistent, COOPERATIVE_REFUSED};
use super::profile::Profile;
use super::resolve::{Op, GEMV_FAMILIES, GEMV_MAX_N};
use crate::contract;
use crate::cpu::ProgramKind;
use crate::error::{Error, Result};
use crate::options::{Attention, Bf16Gemm, CudaOptions};
use crate::plan::{LoadedPlan, WeightData};
use crate::rows::Rows;

/// What a traced run calls after each step: (step name, row width, rows written).
pub(super) type OnStep<'a> = &'a mut dyn FnMut(&str, usize, &[f32]);

/// Runs plans on an NVIDIA GPU. Holds the device copies of the weights, the buffers and
/// the KV caches of its slots, and the decode graph.
///
/// ```no_run
/// use std::sync::Arc;
/// use ngpt_runtime::cpu::ProgramKind;
/// use ngpt_runtime::cuda::CudaExecutor;
/// use ngpt_runtime::plan::LoadedPlan;
/// let plan = Arc::new(LoadedPlan::load("out/nv-tiny".as_ref())?);
/// use ngpt_runtime::Rows;
/// let mut exec = CudaExecutor::new(plan, 1)?; // an error, not a panic, without CUDA
/// let rows = Rows { tokens: &[45, 64, 77], positions: &[0, 1, 2], slots: &[0, 0, 0] };
/// let logits = exec.run(ProgramKind::Prefill, &rows)?;
/// assert_eq!(logits.len(), 3 * exec.plan.dims().vocab);
/// # Ok::<(), ngpt_runtime::Error>(())
/// ```
pub struct CudaExecutor {
    /// Dropped by hand in `Drop`, while this executor holds the device lock: freeing
    /// memory, unloading modules and destroying the stream are device work too.
    pub(super) state: ManuallyDrop<State>,
}

/// Everything a [`CudaExecutor`] owns (reached through `Deref`).
pub struct State {
    /// The plan this executor runs.
    pub plan: Arc<LoadedPlan>,
    /// Sequences per call.
    pub batch: usize,
    // Field order is drop order: the graph and the cuBLAS handle go before the memory
    // they use, the memory before the stream, everything before the context.
    pub(super) graph: Option<DecodeGraph>,
    /// The decode shape (rows, generation) that ran once without a graph: the
    /// next decode of that shape captures.
    pub(super) warmed: Option<(usize, u64)>,
    pub(super) profile: Option<RefCell<Profile>>,
    pub(super) blas: BlasHandle,
    pub(super) weights: Vec<DevWeight>,
    pub(super) buffers: Vec<DevBuffer>,
    pub(super) scratch: [Option<Dev<u16>>; 2],
    /// A quantized weight's dequantized tile (prefill GEMMs over I8/I4 weights, gemm.rs).
    pub(super) dequant: Option<Dev<f32>>,
    pub(super) _workspace: Dev<u8>,
    /// Loaded functions, indexed by `func` in [`Op::Launch`], and their entry names.
    pub(super) functions: Vec<CudaFunction>,
    pub(super) function_names: Vec<String>,
    /// `functions` indices of gemv_{bf16,f32,i8,i4}_1..8 (rows: `resolve::GEMV_FAMILIES`).
    pub(super) gemv: [[usize; GEMV_MAX_N]; GEMV_FAMILIES.len()],
    /// Whether narrow weight GEMMs run as `gemv_*` (the option `gemv=off` turns it off).
    pub(super) use_gemv: bool,
    /// Decode as one `decode_persistent` launch (the option `persistent=off` turns it off).
    pub(super) use_persistent: bool,
    /// Why decode went launch by launch although the options asked for
    /// `decode_persistent` (the device refused a cooperative launch), once it did.
    pub(super) fallback_note: Option<String>,
    pub(super) persistent: Persistent,
    /// `functions` index of `attention_prefill_mma`, where this plan and device can run it.
    pub(super) prefill_mma: Option<usize>,
    /// Prefill attention on the tensor cores (`experimental.prefill_mma=on` turns it on).
    pub(super) use_prefill_mma: bool,
    /// Prefill runs that launched `attention_prefill_mma`.
    pub(super) prefill_mma_runs: u64,
    pub(super) spin: CudaFunction,
    pub(super) function_of: HashMap<(u32, String), usize>,
    pub(super) to_bf16: CudaFunction,
    pub(super) dequant_fn: CudaFunction,
    pub(super) _modules: Vec<Arc<CudaModule>>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) ctx: Arc<CudaContext>,
    /// Bumped whenever a buffer or scratch moves (a captured graph holds addresses).
    pub(super) generation: u64,
    pub(super) captures: u64,
    pub(super) host_logits: Vec<f32>,
    pub(super) tokens_buf: usize,
    pub(super) positions_buf: usize,
    pub(super) slots_buf: usize,
    pub(super) logits_buf: usize,
    pub(super) check: bool,
    pub(super) use_graph: bool,
    pub(super) widen_bf16: bool,
    pub(super) device_name: String,
    pub(super) arch: &'static str,
}

// SAFETY: every CUDA object here belongs to one context, which each entry point makes
// current on the calling thread before using them (cudarc's safe calls do too). The one
// member that is not Send, the CUDA graph, must not be used by two threads at once; it is
// only reached through `&mut self`, so moving the executor to another thread is sound.
unsafe impl Send for CudaExecutor {}

impl Deref for CudaExecutor {
    type Target = State;
    fn deref(&self) -> &State {
        &self.state
    }
}

impl DerefMut for CudaExecutor {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

impl Drop for CudaExecutor {
    fn drop(&mut self) {
        // Dropping the state frees device memory, destroys the cuBLAS handle and the
        // stream and unloads the modules: device work, so under the lock (dropping the
        // fields after this body returned, outside it, invalidated another executor's
        // graph capture on the H200). Make the context current on this thread (the
        // executor may have moved) and let queued work finish first.
        let _guard = device_turn();
        let _ = self.ctx.bind_to_thread();
        let _ = self.stream.synchronize();
        if let Some(p) = &self.profile {
            eprint!("{}", p.borrow().report());
        }
        // SAFETY: the state is dropped once, here, and never used after.
        unsafe { ManuallyDrop::drop(&mut self.state) };
    }
}

impl CudaExecutor {
    /// A CUDA executor for `batch` sequences on device 0. Fails with one line where the
    /// CUDA libraries or a device are missing, never panics.
    pub fn new(plan: Arc<LoadedPlan>, batch: usize) -> Result<CudaExecutor> {
        Self::with_options(plan, batch, &CudaOptions::default())
    }

    /// As [`CudaExecutor::new`], with `options` (the executor reads no environment
    /// variable: a caller that wants `NGPT_CUDA_OPTIONS` passes
    /// [`CudaOptions::from_env`]).
    pub fn with_options(
        plan: Arc<LoadedPlan>,
        batch: usize,
        options: &CudaOptions,
    ) -> Result<CudaExecutor> {
        if batch == 0 {
            return Err(Error::EmptyBatch);
        }
        // Before any device work, so the refusal reads the same with or without a GPU.
        if let Some(why) = super::refuses(&plan) {
            return Err(plan_cuda_err(why));
        }
        if let Some(why) = super::unavailable() {
            return Err(plan_cuda_err(why));
        }
        let _guard = device_turn();
        let ctx = CudaContext::new(0).map_err(setup("creating a context on device 0"))?;
        // One stream, so cudarc's cross-stream events are not needed; they would also
        // put waits on events recorded outside a graph capture into the capture.
        // SAFETY: set before any allocation of this context object; all work goes to one
        // stream.
        unsafe { ctx.disable_event_tracking() };
        let device_name = ctx.name().map_err(setup("reading the device name"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(setup("reading the compute capability"))?;
        let arch = arch_name(major, minor).ok_or_else(|| {
            plan_cuda_err(format!(
                "{device_name}: compute capability {major}.{minor} is not one ngpt compiles for"
            ))
        })?;
        let stream = ctx.new_stream().map_err(setup("creating a stream"))?;

        // The runtime's `ngpt` module, for the plan's widths (checked against its config
        // when the plan was loaded): the plan names kernels, it carries none.
        let used = used_functions(&plan);
        let source = super::module_source(&plan.dims, &plan.module_dims);
        let ngpt_module = load_ptx(
            &ctx,
            contract::MODULE,
            super::compile_module(contract::MODULE, &source, arch)?,
        )?;
        let modules: Vec<Option<Arc<CudaModule>>> = vec![Some(ngpt_module)];
        let optin = ctx
            .attribute(
                cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(setup("reading the shared memory limit"))?;
        // attention=simple: the first, untiled attention kernels (a GPU reference).
        let attention_simple = options.attention == Attention::Simple;
        let (mut functions, function_of) =
            load_functions(&modules, used, attention_simple, optin, &device_name)?;
        let helpers_source = persistent_launch::helpers_source(&plan, options);
        let helpers = load_ptx(
            &ctx,
            "ngpt_runtime_helpers",
            super::compile_module("ngpt_runtime_helpers", &helpers_source, arch)?,
        )?;
        let to_bf16 = helpers
            .load_function("f32_to_bf16")
            .map_err(setup("loading f32_to_bf16"))?;
        let spin = helpers
            .load_function("spin")
            .map_err(setup("loading spin"))?;
        let dequant_fn = helpers
            .load_function("dequant_rows")
            .map_err(setup("loading dequant_rows"))?;
        let (persistent, coop_ok, fallback_note) = load_persistent(
            &ctx,
            &stream,
            &helpers,
            helpers_source,
            &plan,
            batch,
            optin,
            options,
            &device_name,
        )?;
        let mut function_names: Vec<String> = vec![String::new(); functions.len()];
        for ((_, entry), &i) in &function_of {
            function_names[i] = entry.clone();
        }
        let gemv = load_gemv(&helpers, &mut functions, &mut function_names)?;
        // attention_prefill_mma: for plans with bf16 weights (bf16's tolerance), a head dim
        // the kernel is compiled for, and a device with bf16 mma.sync (sm_80 and later).
        let bf16_plan = plan
            .weights
            .iter()
            .any(|w| matches!(w, WeightData::Bf16(_)));
        let hd = plan.dims.head_dim;
        let prefill_mma = if bf16_plan && hd.is_multiple_of(16) && hd <= 128 && major >= 8 {
            let f = helpers
                .load_function("attention_prefill_mma")
                .map_err(setup("loading attention_prefill_mma"))?;
            functions.push(f);
            function_names.push("attention_prefill_mma".into());
            Some(functions.len() - 1)
        } else {
            None
        };
        let mut loaded: Vec<Arc<CudaModule>> = modules.into_iter().flatten().collect();
        loaded.push(helpers);

        // cuBLAS: our stream, an explicit workspace, default math (no TF32).
        let (blas_handle, workspace) = create_blas(&stream)?;

        // Weights: once. F32 as f32; BF16 as its bits, plus an f32 copy where a kernel
        // reads it (or for every one under bf16_gemm=f32); I8/I4 as their integers and
        // f16 scales (no float copy: the gemv kernels dequantize in registers, prefill
        // GEMMs a tile at a time).
        let widen_bf16 = options.bf16_gemm == Bf16Gemm::F32;
        let weights = upload_weights(&plan, &stream, widen_bf16)?;

        // Buffers: the KV caches now, the rest per call.
        let buffers = plan_buffers(&plan, &stream, batch)?;
        let index = |name: &str| -> Result<usize> {
            plan.plan
                .buffers
                .iter()
                .position(|b| b.name == name)
                .ok_or_else(|| Error::Plan {
                    path: "model.plan".into(),
                    problem: format!("no buffer named `{name}`"),
                })
        };
        let (tokens_buf, positions_buf, slots_buf, logits_buf) = (
            index("tokens")?,
            index("positions")?,
            index("slots")?,
            index("logits")?,
        );
        stream
            .synchronize()
            .map_err(setup("uploading the weights"))?;
        let mut executor = CudaExecutor {
            state: ManuallyDrop::new(State {
                batch,
                graph: None,
                warmed: None,
                profile: options.profile.then(|| RefCell::new(Profile::new())),
                blas: blas_handle,
                weights,
                buffers,
                scratch: [None, None],
                dequant: None,
                _workspace: workspace,
                functions,
                function_names,
                gemv,
                use_gemv: options.gemv,
                use_persistent: options.persistent && persistent.blocks > 0 && coop_ok,
                fallback_note,
                persistent,
                use_prefill_mma: options.experimental.prefill_mma && prefill_mma.is_some(),
                prefill_mma,
                prefill_mma_runs: 0,
                spin,
                function_of,
                to_bf16,
                dequant_fn,
                _modules: loaded,
                stream,
                ctx,
                generation: 0,
                captures: 0,
                host_logits: vec![],
                tokens_buf,
                positions_buf,
                slots_buf,
                logits_buf,
                check: options.check,
                use_graph: options.graph,
                widen_bf16,
                device_name,
                arch,
                plan,
            }),
        };
        drop(_guard);
        if options.experimental.pd_stream {
            executor.set_persistent_stream(true)?;
        }
        Ok(executor)
    }

    /// The device's name, e.g. `NVIDIA H200`.
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// The architecture the kernels were compiled for, e.g. `sm_90`.
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    /// Whether decode replays a CUDA graph (the option `graph=off` turns it off).
    pub fn uses_graph(&self) -> bool {
        self.use_graph
    }

    /// Whether every step is synchronized and checked (the option `check`).
    pub fn check_mode(&self) -> bool {
        self.check
    }

    /// Turns the decode graph on or off (the default comes from the option `graph`).
    pub fn set_graph(&mut self, on: bool) {
        self.use_graph = on;
        if !on {
            self.graph = None;
        }
    }

    /// Sends GEMMs of at most 8 columns to the `gemv_*` kernels (on) or to cuBLAS (off);
    /// the default comes from the option `gemv`. Drops a captured decode graph.
    pub fn set_gemv(&mut self, on: bool) {
        self.use_gemv = on;
        self.graph = None;
        self.warmed = None;
    }

    /// Runs decode as one `decode_persistent` launch where the program allows (on) or
    /// launch by launch (off); the default comes from the option `persistent`. Drops a
    /// captured decode graph. A device on which the kernel cannot run stays off.
    pub fn set_persistent(&mut self, on: bool) {
        self.use_persistent = on && self.persistent.blocks > 0;
        self.graph = None;
        self.warmed = None;
    }

    /// Folds steps into their neighbours in `decode_persistent`'s table (on) or keeps one
    /// table entry per step (off); the default comes from the option `fuse`. Drops a
    /// captured decode graph.
    pub fn set_persistent_fusion(&mut self, on: bool) {
        self.persistent.fuse = on;
        self.graph = None;
        self.warmed = None;
    }

    /// What the last decode table folded: (lerp_norm into a gemv, swiglu into a gemv,
    /// pos_norm into attention).
    pub fn persistent_folds(&self) -> (usize, usize, usize) {
        let f = self.persistent.fused;
        (f.lerp_gemv, f.swiglu_gemv, f.pos_attention)
    }

    /// How many decode runs went through `decode_persistent` so far.
    pub fn persistent_runs(&self) -> u64 {
        self.persistent.runs
    }

    /// Runs prefill attention on the tensor cores (`attention_prefill_mma`: bf16 operands,
    /// f32 accumulation and softmax) where the plan has bf16 weights, a head dim that is a
    /// multiple of 16 up to 128 and the device is sm_80 or later (on), or with the plan's
    /// f32 `attention_prefill` (off). The default comes from the option `experimental.prefill_mma`
    /// (off until it has been measured on a GPU). Returns whether it is on.
    pub fn set_prefill_mma(&mut self, on: bool) -> bool {
        self.use_prefill_mma = on && self.prefill_mma.is_some();
        self.use_prefill_mma
    }

    /// How many prefill runs launched `attention_prefill_mma` so far.
    pub fn prefill_mma_runs(&self) -> u64 {
        self.prefill_mma_runs
    }

    /// Turns check mode on or off (the default comes from the option `check`).
    pub fn set_check(&mut self, on: bool) {
        self.check = on;
    }

    /// How many times the decode program was captured into a graph (1 for a session
    /// whose buffers never grew after its first decode).
    pub fn graph_captures(&self) -> u64 {
        self.captures
    }

    /// Runs `kind` on `rows` (checked by [`Rows::check`] first) and returns the logits,
    /// `[rows, vocab]`, as [`crate::cpu::CpuExecutor::run`] does.
    pub fn run(&mut self, kind: ProgramKind, rows: &Rows<'_>) -> Result<&[f32]> {
        self.run_program(kind, rows, None, None)
    }

    /// As [`CudaExecutor::run`], calling `on_step(step name, row width, rows)` after each
    /// step with what it wrote (a launch's first `Out` buffer, a GEMM's C), copied back
    /// from the device; as [`crate::cpu::CpuExecutor::run_traced`]. Never uses the graph.
    /// `on_step` runs while this executor holds the process's device turn: it must not use
    /// another CUDA executor.
    pub fn run_traced(
        &mut self,
        kind: ProgramKind,
        rows: &Rows<'_>,
        on_step: &mut dyn FnMut(&str, usize, &[f32]),
    ) -> Result<&[f32]> {
        self.run_program(kind, rows, Some(on_step), None)
    }

    /// As [`CudaExecutor::run`], copying back only the logits of the `chosen` rows (in
    /// that order), `[chosen.len(), vocab]`: a 2048-token prefill's full logits are 412 MB,
    /// about 400 ms of a 460 ms first token on the H200 (BENCHMARKS.md). Every row is
    /// still computed.
    pub fn run_rows(
        &mut self,
        kind: ProgramKind,
        rows: &Rows<'_>,
        chosen: &[usize],
    ) -> Result<Vec<f32>> {
        Ok(self.run_program(kind, rows, None, Some(chosen))?.to_vec())
    }

    fn run_program(
        &mut self,
        kind: ProgramKind,
        request: &Rows<'_>,
        on_step: Option<OnStep<'_>>,
        fetch: Option<&[usize]>,
    ) -> Result<&[f32]> {
        // decode_persistent is launched cooperatively: the driver runs it only when every
        // block can be resident at once (as its grid barrier needs), else refuses it up
        // front. Refused (MPS, or another process's kernels on the device): decode goes
        // launch by launch from then on, with one line saying so. Nothing ran: the refusal
        // comes before the kernel starts, and the inputs are uploaded again.
        let traced = on_step.is_some();
        match self.run_once(kind, request, on_step, fetch) {
            Err(Error::Step { problem, .. }) if !traced && problem == COOPERATIVE_REFUSED => {
                self.use_persistent = false;
                self.graph = None;
                self.warmed = None;
                let note = format!(
                    "note: plan-cuda on {}: {COOPERATIVE_REFUSED}; decoding launch by launch from now on",
                    self.device_name
                );
                eprintln!("{note}");
                self.fallback_note = Some(note);
                self.run_once(kind, request, None, fetch)?;
            }
            other => other?,
        }
        Ok(&self.host_logits)
    }

    fn run_once(
        &mut self,
        kind: ProgramKind,
        request: &Rows<'_>,
        on_step: Option<OnStep<'_>>,
        fetch: Option<&[usize]>,
    ) -> Result<()> {
        // The kernels index with these without checks: every token, position and slot is
        // checked here, and no two rows write one cache entry.
        let d = self.plan.dims;
        let rows = request.check(self.batch, d.max_seq_len, d.vocab)?;
        if let Some(r) = fetch.and_then(|f| f.iter().find(|&&r| r >= rows)) {
            return Err(Error::Request {
                what: "rows".into(),
                problem: format!("row {r} is outside the {rows} rows of this call"),
            });
        }
        if i32::try_from(rows).is_err() {
            return Err(Error::Request {
                what: "rows".into(),
                problem: format!("{rows} rows exceed the kernels' int range"),
            });
        }
        let _guard = device_turn();
        self.ctx
            .bind_to_thread()
            .map_err(|e| plan_cuda_err(format!("binding the context: {}", drv(e))))?;
        self.size_buffers(rows)?;
        let replay = kind == ProgramKind::Decode
            && self.use_graph
            && on_step.is_none()
            && self.profile.is_none();
        let graph_ready = replay
            && self
                .graph
                .as_ref()
                .is_some_and(|g| (g.rows, g.generation) == (rows, self.generation));
        let ops = if graph_ready {
            vec![]
        } else {
            let ops = self.resolve(kind, rows)?;
            self.size_scratch(&ops)?;
            if let (ProgramKind::Prefill, Some(mma)) = (kind, self.prefill_mma) {
                if ops
                    .iter()
                    .any(|op| matches!(op, Op::Launch { func, .. } if *func == mma))
                {
                    self.prefill_mma_runs += 1;
                }
            }
            let ops = if kind == ProgramKind::Decode && on_step.is_none() && self.use_persistent {
                self.persistent_ops(ops, rows)?
            } else {
                ops
            };
            if kind == ProgramKind::Decode {
                self.persistent.active = matches!(ops.first(), Some(Op::Persistent { .. }));
            }
            ops
        };
        if kind == ProgramKind::Decode && self.persistent.active {
            self.persistent.runs += 1;
        }
        // Rewritten every call at the same addresses, so a captured graph reads this
        // call's rows.
        self.upload_inputs(request)?;
        let capture_now = replay && !graph_ready && self.warmed == Some((rows, self.generation));
        if graph_ready || capture_now {
            if capture_now {
                self.capture(&ops, rows)?;
            }
            let g = self
                .graph
                .as_ref()
                .ok_or_else(|| plan_cuda_err("internal: no decode graph"))?;
            g.graph
                .launch()
                .map_err(|e| step_err("decode graph", format!("cuGraphLaunch: {}", drv(e))))?;
            if self.check {
                self.sync("decode graph")?;
            }
        } else {
            if replay {
                // The warm-up: this shape runs once step by step, the next call captures.
                self.graph = None;
                self.warmed = Some((rows, self.generation));
            }
            self.poison()
                .map_err(|e| step_err("poison", format!("cuMemsetD32Async: {}", drv(e))))?;
            self.enqueue(&ops, kind, rows, false, on_step)?;
        }
        match self.fetch_logits(rows, kind, fetch) {
            // A device error of a decode_persistent run: say which launch it was and how
            // to run without it.
            Err(Error::Step { step, problem })
                if kind == ProgramKind::Decode
                    && self.persistent.active
                    && problem.contains("the device reported") =>
            {
                return Err(step_err(
                    &step,
                    format!(
                        "{problem} (decode ran as one decode_persistent launch, which stops the run if a grid barrier waits more than about 4 s; the option persistent=off decodes launch by launch)"
                    ),
                ));
            }
            fetched => fetched?,
        }
        if kind == ProgramKind::Decode && self.persistent.active {
            self.collect_entry_times()?;
        }
        if let Some(p) = &self.profile {
            p.borrow_mut().collect(program_name(kind))?;
        }
        Ok(())
    }
}

impl crate::session::Executor for CudaExecutor {
    fn plan(&self) -> &Arc<LoadedPlan> {
        &self.plan
    }
    fn batch(&self) -> usize {
        self.batch
    }
    fn describe(&self) -> String {
        // decode_persistent runs gemv steps only: with cuBLAS GEMMs, launch by launch.
        let launches = if self.use_persistent && self.use_gemv {
            format!(
                "as one launch of {} blocks of {} threads, {} registers each{}{}",
                self.persistent.blocks,
                persistent::THREADS,
                self.persistent.regs,
                if self.persistent.fuse {
                    ", steps folded"
                } else {
                    ""
                },
                if self.persistent.stream {
                    format!(
                        ", weights streamed through 2 x {} KiB",
                        self.persistent.slice >> 10
                    )
                } else {
                    String::new()
                }
            )
        } else {
            "launch by launch".into()
        };
        format!(
            "plan-cuda on {} ({}, decode {launches}, {}{})",
            self.device_name,
            self.arch,
            if self.use_prefill_mma {
                "prefill attention on the tensor cores, "
            } else {
                ""
            },
            if self.use_graph {
                "in a CUDA graph"
            } else {
                "no graph"
            }
        )
    }
    fn run(&mut self, kind: ProgramKind, rows: &Rows<'_>) -> Result<&[f32]> {
        CudaExecutor::run(self, kind, rows)
    }
    fn run_traced(
        &mut self,
        kind: ProgramKind,
        rows: &Rows<'_>,
        on_step: &mut dyn FnMut(&str, usize, &[f32]),
    ) -> Result<&[f32]> {
        CudaExecutor::run_traced(self, kind, rows, on_step)
    }
    fn run_rows(
        &mut self,
        kind: ProgramKind,
        rows: &Rows<'_>,
        chosen: &[usize],
    ) -> Result<Vec<f32>> {
        CudaExecutor::run_rows(self, kind, rows, chosen)
    }
}

pub(super) fn program_name(kind: ProgramKind) -> &'static str {
    match kind {
        ProgramKind::Prefill => "prefill",
        ProgramKind::Decode => "decode",
    }
}
