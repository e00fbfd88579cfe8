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

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::{result as blas_result, sys as blas};
use cudarc::driver::{
    result as cu_result, sys as cu, CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule,
    CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use ngpt_schemas::plan::{self as pb, arg, operand, step};

use super::persistent::{self, PdOp};
use crate::contract::{self, Bound, Slot};
use crate::options::{Attention, Barrier, Bf16Gemm, CudaOptions, PdAttention};
use crate::cpu::ProgramKind;
use crate::error::{Error, Result};
use crate::plan::{eval, LoadedPlan, WeightData};

/// Every CUDA executor of the process holds this while it works with the device
/// (construction, each run, drop, its fields' drops included): their work never
/// overlaps. On the H200, with executors in parallel threads of one process (the tests),
/// decode graph captures failed (`CUDA_ERROR_STREAM_CAPTURE_INVALIDATED`, cuBLAS GEMMs
/// with `CUBLAS_STATUS_EXECUTION_FAILED`) while another executor's memory, stream and
/// modules were freed; the last such failures came from fields dropped after `Drop`
/// released this lock (RELIABILITY.md). It also keeps `decode_persistent`, whose grid
/// barrier needs every block resident, from sharing the device with another executor's
/// kernels. A batch in one session is the way to share a GPU.
static DEVICE_WORK: Mutex<()> = Mutex::new(());

fn device_turn() -> MutexGuard<'static, ()> {
    DEVICE_WORK.lock().unwrap_or_else(|e| e.into_inner())
}

/// cuBLAS workspace: 32 MiB, NVIDIA's recommendation for Hopper. Set explicitly so that
/// no GEMM allocates while a graph is being captured.
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// What a traced run calls after each step: (step name, row width, rows written).
type OnStep<'a> = &'a mut dyn FnMut(&str, usize, &[f32]);

/// A quiet NaN: what every activation and output element holds before a run writes it.
const POISON: u32 = 0x7fc0_0000;

/// Dynamic shared memory a kernel gets without opting in.
const DEFAULT_SHARED_LIMIT: u32 = 48 << 10;

/// The widest GEMM (columns, i.e. activation rows) that runs as a `gemv_*` kernel.
const GEMV_MAX_N: usize = 8;

/// Output rows per block of a `gemv_*` kernel (one warp each).
const GEMV_ROWS_PER_BLOCK: u32 = 8;

/// Clock cycles of the spin kernel before a profiled run: 40 ms at 2 GHz, long enough to
/// queue a whole program (a few hundred launches) behind it.
const PROFILE_SPIN_CYCLES: i64 = 80_000_000;


fn plan_cuda_err(problem: impl Into<String>) -> Error {
    Error::Request {
        what: "plan-cuda".into(),
        problem: problem.into(),
    }
}

fn step_err(step: &str, problem: impl Into<String>) -> Error {
    Error::Step {
        step: step.to_string(),
        problem: problem.into(),
    }
}

/// A driver error as its CUDA name and description.
fn drv(e: DriverError) -> String {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(s) => format!("{name} ({})", s.to_string_lossy()),
        Err(_) => name,
    }
}

fn blas_msg(e: blas_result::CublasError) -> String {
    format!("{:?}", e.0)
}

/// The problem of a decode step whose cooperative `decode_persistent` launch the driver
/// refused; `run_program` falls back to launch by launch on it.
const COOPERATIVE_REFUSED: &str =
    "the driver refused decode_persistent's cooperative launch (not every block can be resident at once here)";

/// Setup failures: `what` failed with a driver error.
fn setup(what: &str) -> impl Fn(DriverError) -> Error + '_ {
    move |e| plan_cuda_err(format!("{what}: {}", drv(e)))
}

/// NVRTC's name for a compute capability.
fn arch_name(major: i32, minor: i32) -> Option<&'static str> {
    const ARCHS: [(i32, i32, &str); 12] = [
        (7, 5, "sm_75"),
        (8, 0, "sm_80"),
        (8, 6, "sm_86"),
        (8, 7, "sm_87"),
        (8, 9, "sm_89"),
        (9, 0, "sm_90"),
        (10, 0, "sm_100"),
        (10, 3, "sm_103"),
        (11, 0, "sm_110"),
        (12, 0, "sm_120"),
        (12, 1, "sm_121"),
        (12, 2, "sm_122"),
    ];
    ARCHS
        .iter()
        .find(|(a, b, _)| (*a, *b) == (major, minor))
        .map(|(_, _, n)| *n)
}

/// A device allocation and its address.
struct Dev<T> {
    slice: CudaSlice<T>,
    ptr: u64,
}

impl<T: DeviceRepr + ValidAsZeroBits> Dev<T> {
    /// `len` zeroed elements (at least one: the driver refuses empty allocations).
    fn zeros(stream: &Arc<CudaStream>, len: usize, what: &str) -> Result<Dev<T>> {
        let slice = stream.alloc_zeros::<T>(len.max(1)).map_err(|e| {
            plan_cuda_err(format!(
                "cannot allocate {what} ({} bytes): {}",
                len.saturating_mul(std::mem::size_of::<T>()),
                drv(e)
            ))
        })?;
        Ok(Self::wrap(slice, stream))
    }

    fn upload(stream: &Arc<CudaStream>, data: &[T], what: &str) -> Result<Dev<T>> {
        if data.is_empty() {
            return Self::zeros(stream, 0, what);
        }
        let slice = stream.clone_htod(data).map_err(|e| {
            plan_cuda_err(format!(
                "cannot upload {what} ({} bytes): {}",
                std::mem::size_of_val(data),
                drv(e)
            ))
        })?;
        Ok(Self::wrap(slice, stream))
    }

    fn wrap(slice: CudaSlice<T>, stream: &Arc<CudaStream>) -> Dev<T> {
        // Event tracking is off for this context, so the guard records nothing.
        let ptr = {
            let (ptr, _guard) = slice.device_ptr(stream);
            ptr
        };
        Dev { slice, ptr }
    }

    fn len(&self) -> usize {
        self.slice.len()
    }
}

/// Makes `slot` hold at least `len` zeroed-when-new elements, freeing the old allocation
/// first (so peak memory stays the new size); returns whether it moved (a captured graph
/// holds its address).
fn grow<T: DeviceRepr + ValidAsZeroBits>(
    slot: &mut Option<Dev<T>>,
    len: usize,
    stream: &Arc<CudaStream>,
    what: &str,
) -> Result<bool> {
    if slot.as_ref().map_or(0, Dev::len) >= len {
        return Ok(false);
    }
    *slot = None;
    *slot = Some(Dev::zeros(stream, len, what)?);
    Ok(true)
}

/// A weight on the device.
struct DevWeight {
    /// Elements (the product of its shape).
    elems: usize,
    /// As the plan stores it: f32, or bf16 bits.
    f32: Option<Dev<f32>>,
    bf16: Option<Dev<u16>>,
}

impl DevWeight {
    /// The f32 form kernels read (F32 weights, or the f32 copy of a BF16 one).
    fn f32_ptr(&self) -> Option<u64> {
        self.f32.as_ref().map(|d| d.ptr)
    }
}

/// A plan buffer on the device.
enum Mem {
    F32(Dev<f32>),
    I32(Dev<i32>),
}

struct DevBuffer {
    name: String,
    int32: bool,
    cache: bool,
    /// Filled with NaN before each run (activations and outputs).
    poison: bool,
    mem: Option<Mem>,
    /// Elements this call needs (the plan's affine size); bounds are checked against it,
    /// as the CPU executor sizes its buffers to exactly this.
    need: usize,
}

impl DevBuffer {
    fn capacity(&self) -> usize {
        match &self.mem {
            Some(Mem::F32(d)) => d.len(),
            Some(Mem::I32(d)) => d.len(),
            None => 0,
        }
    }
    fn ptr(&self) -> u64 {
        match &self.mem {
            Some(Mem::F32(d)) => d.ptr,
            Some(Mem::I32(d)) => d.ptr,
            None => 0,
        }
    }
}

/// A kernel parameter, by value.
#[derive(Debug, Clone, Copy)]
enum Param {
    Ptr(u64),
    I32(i32),
    F32(f32),
}

/// A GEMM operand as cuBLAS will read it.
#[derive(Debug, Clone, Copy)]
enum GemmIn {
    F32(u64),
    Bf16(u64),
    /// An f32 operand of a bf16 GEMM: `n` elements from `src`, rounded into scratch slot
    /// `slot` first.
    ToBf16 {
        src: u64,
        n: usize,
        slot: usize,
    },
}

/// One step, resolved to device addresses and checked.
#[derive(Debug, Clone)]
enum Op {
    Launch {
        step: usize,
        func: usize,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared: u32,
        params: Vec<Param>,
    },
    Gemm {
        step: usize,
        trans_a: bool,
        trans_b: bool,
        mnk: (i32, i32, i32),
        ld: (i32, i32, i32),
        alpha: f32,
        beta: f32,
        a: GemmIn,
        b: GemmIn,
        c: u64,
    },
    /// A GEMM with m or n zero: nothing to compute (the CPU executor skips it too).
    Nothing,
    /// The whole decode program as one `decode_persistent` launch over `n_ops` table
    /// entries (the steps it replaced are in the table, in order).
    Persistent { n_ops: usize },
}

/// `decode_persistent`'s launch and memory: the function, the grid (blocks that fit on the
/// device at once), the step table, the attention partials and the grid barrier.
struct Persistent {
    func: CudaFunction,
    blocks: u32,
    /// Dynamic shared memory per block for staged gemv inputs (`persistent::stage_bytes`).
    stage: usize,
    /// Registers per thread (they decide how many blocks fit on an SM).
    regs: i32,
    /// Whether entries are folded (`persistent::fuse`; the option `fuse=off` turns it off).
    fuse: bool,
    /// What the last table folded.
    fused: persistent::Fused,
    table_host: Vec<u8>,
    table: Option<Dev<u8>>,
    part: Option<Dev<f32>>,
    /// The second buffer for rows a folded lerp_norm updates.
    shadow: Option<Dev<f32>>,
    /// Whether warps prefetch the next gemv's weights into L2 at each barrier
    /// (the option `prefetch=off` turns it off).
    prefetch: bool,
    /// Bytes of each weight-streaming buffer (0: they do not fit in shared memory).
    slice: usize,
    /// Whether gemv weights stream into shared memory ahead of their entries
    /// (`experimental.pd_stream=on` turns it on; off until measured on a GPU).
    stream: bool,
    /// The build of decode_persistent with weight streaming, compiled when first asked for.
    streamed: Option<StreamedKernel>,
    /// The helpers module's source (the streaming build adds a define to it).
    helpers_source: String,
    sms: i32,
    /// Under the option `profile`: the GPU clock after each entry, and the entries' labels.
    timer: Option<Dev<u64>>,
    labels: Vec<String>,
    barrier: Dev<u32>,
    /// Decode runs that went through it.
    runs: u64,
    /// Whether the decode program last resolved (and so the captured graph) uses it.
    active: bool,
    /// Whether it is launched cooperatively (the option `cooperative`, default on).
    cooperative: bool,
    /// The option `blocks_per_sm`.
    blocks_cap: Option<u32>,
}

/// `decode_persistent` built with weight streaming (`NGPT_PD_STREAM`): its module, the
/// function and how many of its blocks are resident at once with both buffers.
struct StreamedKernel {
    _module: Arc<CudaModule>,
    func: CudaFunction,
    blocks: u32,
}

/// How many blocks of `decode_persistent` (`func`) are resident at once with `dynamic`
/// bytes of dynamic shared memory: the grid its barrier needs every block of; 0 where the
/// plan does not fit it. `cap` (the option `blocks_per_sm`) caps the blocks per SM.
fn resident_blocks(
    func: &CudaFunction,
    dynamic: usize,
    sms: i32,
    fits: bool,
    cap: Option<u32>,
) -> Result<u32> {
    if dynamic > DEFAULT_SHARED_LIMIT as usize {
        func.set_attribute(
            cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            dynamic as i32,
        )
        .map_err(setup("raising decode_persistent's shared memory limit"))?;
    }
    let mut per_sm = func
        .occupancy_max_active_blocks_per_multiprocessor(persistent::THREADS, dynamic, None)
        .map_err(setup("reading decode_persistent's occupancy"))?;
    if let Some(cap) = cap {
        per_sm = per_sm.min(cap);
    }
    Ok(if fits {
        (sms.max(0) as u32).saturating_mul(per_sm)
    } else {
        0
    })
}

/// A captured decode program and what it was captured for.
struct DecodeGraph {
    graph: CudaGraph,
    rows: usize,
    per_seq: usize,
    generation: u64,
}

/// The option `profile`: events between the steps of the current run, and GPU time per
/// (program, kernel or GEMM shape) over the executor's life.
struct Profile {
    /// Reused timing events; `marks` of them are recorded in the current run.
    events: Vec<CudaEvent>,
    labels: Vec<String>,
    marks: usize,
    /// (program, label) -> (calls, milliseconds).
    totals: BTreeMap<(String, String), (u64, f64)>,
    /// Programs whose first run was seen (and left out of `totals`).
    warmed: Vec<&'static str>,
}

impl Profile {
    fn mark(&mut self, ctx: &Arc<CudaContext>, stream: &CudaStream, label: String) -> Result<()> {
        if self.marks == self.events.len() {
            let e = ctx
                .new_event(Some(cu::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(setup("creating a profiling event"))?;
            self.events.push(e);
            self.labels.push(String::new());
        }
        self.events[self.marks]
            .record(stream)
            .map_err(setup("recording a profiling event"))?;
        self.labels[self.marks] = label;
        self.marks += 1;
        Ok(())
    }

    /// Adds the time between consecutive marks to the label of the later one. The first
    /// run of each program is left out: its first launches load modules lazily (cuBLAS's
    /// kernels took hundreds of microseconds more per GEMM there on the H200).
    fn collect(&mut self, program: &'static str) -> Result<()> {
        if !self.warmed.contains(&program) {
            self.warmed.push(program);
            self.marks = 0;
            return Ok(());
        }
        for i in 1..self.marks {
            let ms = self.events[i - 1]
                .elapsed_ms(&self.events[i])
                .map_err(setup("reading a profiling event"))?;
            let e = self
                .totals
                .entry((program.to_string(), self.labels[i].clone()))
                .or_insert((0, 0.0));
            e.0 += 1;
            e.1 += ms as f64;
        }
        self.marks = 0;
        Ok(())
    }

    /// Adds `ms` to (program, label).
    fn add(&mut self, program: &str, label: &str, ms: f64) {
        let e = self
            .totals
            .entry((program.to_string(), label.to_string()))
            .or_insert((0, 0.0));
        e.0 += 1;
        e.1 += ms;
    }

    fn report(&self) -> String {
        let mut rows: Vec<_> = self.totals.iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let mut out = String::from(
            "plan-cuda profile (option profile=on): GPU time per program and kernel or GEMM shape, first run of each program left out\n",
        );
        for program in ["prefill", "decode", "decode.pd"] {
            let total: f64 = rows
                .iter()
                .filter(|r| r.0 .0 == program)
                .map(|r| r.1 .1)
                .sum();
            for ((p, label), (calls, ms)) in rows.iter().filter(|r| r.0 .0 == program) {
                out.push_str(&format!(
                    "  {p:<9} {label:<40} {calls:>7} calls {ms:>10.3} ms {:>9.2} us/call {:>5.1}%\n",
                    1e3 * ms / *calls as f64,
                    100.0 * ms / total.max(1e-12)
                ));
            }
        }
        out
    }
}


/// Runs plans on an NVIDIA GPU. Holds the device copies of the weights, the buffers and
/// KV caches of one batch, and the decode graph.
///
/// ```no_run
/// use std::sync::Arc;
/// use ngpt_runtime::cpu::ProgramKind;
/// use ngpt_runtime::cuda::CudaExecutor;
/// use ngpt_runtime::plan::LoadedPlan;
/// let plan = Arc::new(LoadedPlan::load("out/nv-tiny".as_ref())?);
/// let mut exec = CudaExecutor::new(plan, 1)?; // an error, not a panic, without CUDA
/// let logits = exec.run(ProgramKind::Prefill, &[45, 64, 77], &[0, 1, 2], 3)?;
/// assert_eq!(logits.len(), 3 * exec.plan.dims.vocab);
/// # Ok::<(), ngpt_runtime::Error>(())
/// ```
pub struct CudaExecutor {
    /// Dropped by hand in `Drop`, while this executor holds the device lock: freeing
    /// memory, unloading modules and destroying the stream are device work too.
    state: ManuallyDrop<State>,
}

/// Everything a [`CudaExecutor`] owns (reached through `Deref`).
pub struct State {
    /// The plan this executor runs.
    pub plan: Arc<LoadedPlan>,
    /// Sequences per call.
    pub batch: usize,
    // Field order is drop order: the graph and the cuBLAS handle go before the memory
    // they use, the memory before the stream, everything before the context.
    graph: Option<DecodeGraph>,
    /// The decode shape (rows, per_seq, generation) that ran once without a graph: the
    /// next decode of that shape captures.
    warmed: Option<(usize, usize, u64)>,
    profile: Option<RefCell<Profile>>,
    blas: BlasHandle,
    weights: Vec<DevWeight>,
    buffers: Vec<DevBuffer>,
    scratch: [Option<Dev<u16>>; 2],
    _workspace: Dev<u8>,
    /// Loaded functions, indexed by `func` in [`Op::Launch`], and their entry names.
    functions: Vec<CudaFunction>,
    function_names: Vec<String>,
    /// `functions` indices of gemv_bf16_1..8 and gemv_f32_1..8.
    gemv: [[usize; GEMV_MAX_N]; 2],
    /// Whether narrow weight GEMMs run as `gemv_*` (the option `gemv=off` turns it off).
    use_gemv: bool,
    /// Decode as one `decode_persistent` launch (the option `persistent=off` turns it off).
    use_persistent: bool,
    /// Why decode went launch by launch although the options asked for
    /// `decode_persistent` (the device refused a cooperative launch), once it did.
    fallback_note: Option<String>,
    persistent: Persistent,
    /// `functions` index of `attention_prefill_mma`, where this plan and device can run it.
    prefill_mma: Option<usize>,
    /// Prefill attention on the tensor cores (`experimental.prefill_mma=on` turns it on).
    use_prefill_mma: bool,
    /// Prefill runs that launched `attention_prefill_mma`.
    prefill_mma_runs: u64,
    spin: CudaFunction,
    function_of: HashMap<(u32, String), usize>,
    to_bf16: CudaFunction,
    _modules: Vec<Arc<CudaModule>>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    /// Bumped whenever a buffer or scratch moves (a captured graph holds addresses).
    generation: u64,
    captures: u64,
    host_logits: Vec<f32>,
    tokens_buf: usize,
    positions_buf: usize,
    logits_buf: usize,
    check: bool,
    use_graph: bool,
    widen_bf16: bool,
    device_name: String,
    arch: &'static str,
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

/// A cuBLAS handle destroyed without panicking (cudarc's `CudaBlas` unwraps on drop,
/// which would abort a process whose context already failed).
struct BlasHandle(blas::cublasHandle_t);

impl Drop for BlasHandle {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the handle came from cublasCreate and is destroyed once.
            let _ = unsafe { blas_result::destroy_handle(self.0) };
        }
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
            return Err(Error::Request {
                what: "--batch".into(),
                problem: "must be at least 1".into(),
            });
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
        let mut functions = vec![];
        let mut function_of = HashMap::new();
        let optin = ctx
            .attribute(
                cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(setup("reading the shared memory limit"))?;
        // attention=simple: the first, untiled attention kernels (a GPU reference).
        let attention_simple = options.attention == Attention::Simple;
        let mut sorted: Vec<_> = used.into_iter().collect();
        sorted.sort();
        for ((m, entry), shared) in sorted {
            let module = modules[m as usize]
                .as_ref()
                .ok_or_else(|| plan_cuda_err("internal: module not loaded"))?;
            let loaded_entry = if attention_simple && entry.starts_with("attention_") {
                format!("{entry}_simple")
            } else {
                entry.clone()
            };
            let f = module.load_function(&loaded_entry).map_err(|e| {
                plan_cuda_err(format!(
                    "kernel `{entry}` of module `{}`: {}",
                    contract::MODULE,
                    drv(e)
                ))
            })?;
            if shared > DEFAULT_SHARED_LIMIT {
                if shared as i64 > optin as i64 {
                    return Err(plan_cuda_err(format!(
                        "kernel `{entry}` asks for {shared} bytes of shared memory; {device_name} allows {optin}"
                    )));
                }
                f.set_attribute(
                    cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared as i32,
                )
                .map_err(setup("raising a kernel's shared memory limit"))?;
            }
            function_of.insert((m, entry), functions.len());
            functions.push(f);
        }
        // Specialized to the plan's widths (decode_persistent's loops unroll over them).
        let min_blocks = options
            .experimental
            .pd_min_blocks
            .filter(|&n| n > 1)
            .map_or(String::new(), |n| {
                format!("#define NGPT_PD_MIN_BLOCKS {n}\n")
            });
        // decode_persistent's dynamic shared memory: staged gemv inputs, then (where they
        // fit, for weight streaming) two buffers of `slice` bytes.
        let stage = persistent::stage_bytes(batch, plan.dims.n_embd);
        let slice = persistent::stream_slice(optin.max(0) as usize, stage);
        // experimental.pd_barrier=acqrel: the grid barrier with release and acquire
        // operations instead of full fences (opt-in until measured on a GPU).
        let barrier = if options.experimental.pd_barrier == Barrier::AcqRel {
            "#define NGPT_PD_ACQREL 1\n"
        } else {
            ""
        };
        // experimental.pd_attention=wide: decode attention split over every warp of the
        // grid, float4 P.V and a block per (row, head) combining (opt-in until measured on
        // a GPU).
        let wide = if options.experimental.pd_attention == PdAttention::Wide {
            "#define NGPT_PD_WIDE 1\n"
        } else {
            ""
        };
        let helpers_source = format!(
            "#define NGPT_PD_C {}\n#define NGPT_PD_D {}\n{min_blocks}{barrier}{wide}{}",
            plan.dims.n_embd,
            plan.dims.head_dim,
            super::HELPERS_CU
        );
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
        // decode_persistent: as many blocks as are resident at once (its grid barrier
        // needs every block running); none where the head dim is beyond its registers.
        let pd_func = helpers
            .load_function("decode_persistent")
            .map_err(setup("loading decode_persistent"))?;
        let sms = ctx
            .attribute(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(setup("reading the multiprocessor count"))?;
        let d = plan.dims;
        let pd_regs = pd_func.num_regs().unwrap_or(0);
        let blocks = resident_blocks(
            &pd_func,
            stage,
            sms,
            persistent::fits(d.head_dim),
            options.blocks_per_sm,
        )?;
        // A cooperative launch needs the device's support (every GPU ngpt compiles for
        // has it; MPS clients may not).
        let coop_ok = !options.cooperative
            || ctx
                .attribute(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH)
                .map_err(setup("reading cooperative launch support"))?
                == 1;
        let fallback_note = (!coop_ok && options.persistent).then(|| {
            let note = format!(
                "note: plan-cuda on {device_name}: no cooperative launches here; decoding launch by launch"
            );
            eprintln!("{note}");
            note
        });
        let persistent = Persistent {
            func: pd_func,
            blocks,
            stage,
            slice,
            stream: false,
            streamed: None,
            helpers_source,
            sms,
            regs: pd_regs,
            fuse: options.fuse,
            fused: persistent::Fused::default(),
            shadow: None,
            prefetch: options.prefetch,
            timer: None,
            labels: vec![],
            table_host: vec![],
            table: None,
            part: None,
            barrier: Dev::zeros(&stream, 4, "the decode grid barrier")?,
            runs: 0,
            active: false,
            cooperative: options.cooperative,
            blocks_cap: options.blocks_per_sm,
        };
        let mut function_names: Vec<String> = vec![String::new(); functions.len()];
        for ((_, entry), &i) in &function_of {
            function_names[i] = entry.clone();
        }
        let mut gemv = [[0usize; GEMV_MAX_N]; 2];
        for (wi, w) in ["bf16", "f32"].iter().enumerate() {
            for (n, slot) in gemv[wi].iter_mut().enumerate() {
                let entry = format!("gemv_{w}_{}", n + 1);
                let f = helpers
                    .load_function(&entry)
                    .map_err(|e| plan_cuda_err(format!("loading {entry}: {}", drv(e))))?;
                *slot = functions.len();
                functions.push(f);
                function_names.push(entry);
            }
        }
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
        let handle = blas_result::create_handle()
            .map_err(|e| plan_cuda_err(format!("cublasCreate: {}", blas_msg(e))))?;
        let blas_handle = BlasHandle(handle);
        let workspace = Dev::<u8>::zeros(&stream, CUBLAS_WORKSPACE_BYTES, "the cuBLAS workspace")?;
        // SAFETY: a live handle, our stream and a workspace that outlives the handle (the
        // handle is dropped first). cublasSetStream resets the workspace, so it goes first.
        unsafe {
            blas_result::set_stream(handle, stream.cu_stream() as blas::cudaStream_t)
                .map_err(|e| plan_cuda_err(format!("cublasSetStream: {}", blas_msg(e))))?;
            blas::cublasSetWorkspace_v2(
                handle,
                workspace.ptr as *mut c_void,
                CUBLAS_WORKSPACE_BYTES,
            )
            .result()
            .map_err(|e| plan_cuda_err(format!("cublasSetWorkspace: {}", blas_msg(e))))?;
            blas::cublasSetMathMode(handle, blas::cublasMath_t::CUBLAS_DEFAULT_MATH)
                .result()
                .map_err(|e| plan_cuda_err(format!("cublasSetMathMode: {}", blas_msg(e))))?;
        }

        // Weights: once. F32 as f32; BF16 as its bits, plus an f32 copy where a kernel
        // reads it (or for every one under bf16_gemm=f32).
        let widen_bf16 = options.bf16_gemm == Bf16Gemm::F32;
        let f32_reads = plan.f32_weight_reads();
        let mut weights = Vec::with_capacity(plan.weights.len());
        for (i, (w, values)) in plan.plan.weights.iter().zip(&plan.weights).enumerate() {
            let what = format!("weight `{}`", w.name);
            let dw = match values {
                WeightData::Bf16(bits) => {
                    let f32_copy = if widen_bf16 || f32_reads.contains(&i) {
                        Some(Dev::upload(&stream, &values.to_f32(), &what)?)
                    } else {
                        None
                    };
                    DevWeight {
                        elems: bits.len(),
                        f32: f32_copy,
                        bf16: Some(Dev::upload(&stream, bits, &what)?),
                    }
                }
                WeightData::F32(v) => DevWeight {
                    elems: v.len(),
                    f32: Some(Dev::upload(&stream, v, &what)?),
                    bf16: None,
                },
            };
            weights.push(dw);
        }

        // Buffers: the KV caches now, the rest per call.
        let mut buffers = Vec::with_capacity(plan.plan.buffers.len());
        for (i, b) in plan.plan.buffers.iter().enumerate() {
            let cache = b.kind == pb::BufferKind::Cache as i32;
            let int32 = b.dtype == pb::DType::I32 as i32;
            let mut buf = DevBuffer {
                name: b.name.clone(),
                int32,
                cache,
                poison: !int32
                    && (b.kind == pb::BufferKind::Activation as i32
                        || b.kind == pb::BufferKind::Output as i32),
                mem: None,
                need: 0,
            };
            if cache {
                let n = plan.buffer_len(i, 0, batch)?;
                let what = format!("buffer `{}` (batch {batch})", b.name);
                buf.mem = Some(if int32 {
                    Mem::I32(Dev::zeros(&stream, n, &what)?)
                } else {
                    Mem::F32(Dev::zeros(&stream, n, &what)?)
                });
                buf.need = n;
            }
            buffers.push(buf);
        }
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
        let (tokens_buf, positions_buf, logits_buf) =
            (index("tokens")?, index("positions")?, index("logits")?);
        stream
            .synchronize()
            .map_err(setup("uploading the weights"))?;
        let mut executor = CudaExecutor {
            state: ManuallyDrop::new(State {
                batch,
                graph: None,
                warmed: None,
                profile: options.profile.then(|| {
                        RefCell::new(Profile {
                            events: vec![],
                            labels: vec![],
                            marks: 0,
                            totals: BTreeMap::new(),
                            warmed: vec![],
                        })
                    }),
                blas: blas_handle,
                weights,
                buffers,
                scratch: [None, None],
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
                _modules: loaded,
                stream,
                ctx,
                generation: 0,
                captures: 0,
                host_logits: vec![],
                tokens_buf,
                positions_buf,
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

    /// Streams each gemv's weights into shared memory while the entries before it run
    /// (on), or reads them when the gemv starts (off); the default comes from
    /// the option `experimental.pd_stream` (off until measured on a GPU). The first time it is turned on,
    /// compiles the kernel's streaming build. Returns whether it is on: only where the
    /// buffers fit in shared memory beside the staged rows and a grid of the streaming
    /// build is resident. Drops a captured decode graph.
    pub fn set_persistent_stream(&mut self, on: bool) -> Result<bool> {
        self.graph = None;
        self.warmed = None;
        let pd = &self.state.persistent;
        if on && pd.slice > 0 && pd.streamed.is_none() {
            let _device = device_turn();
            self.ctx
                .bind_to_thread()
                .map_err(setup("making the context current"))?;
            let source = format!("#define NGPT_PD_STREAM 1\n{}", pd.helpers_source);
            let module = load_ptx(
                &self.ctx,
                "ngpt_runtime_helpers_streamed",
                super::compile_module("ngpt_runtime_helpers_streamed", &source, self.arch)?,
            )?;
            let func = module
                .load_function("decode_persistent")
                .map_err(setup("loading decode_persistent (streaming)"))?;
            let dynamic = persistent::ring_offset(pd.stage) + 2 * pd.slice;
            let fits = persistent::fits(self.plan.dims.head_dim);
            let blocks = resident_blocks(&func, dynamic, pd.sms, fits, pd.blocks_cap)?;
            self.state.persistent.streamed = Some(StreamedKernel {
                _module: module,
                func,
                blocks,
            });
        }
        let pd = &mut self.state.persistent;
        pd.stream = on && pd.streamed.as_ref().is_some_and(|k| k.blocks > 0);
        Ok(pd.stream)
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

    /// Runs `kind` on `tokens`/`positions` (`rows = batch x per_seq` entries each) and
    /// returns the logits, `[rows, vocab]`, as [`crate::cpu::CpuExecutor::run`] does.
    pub fn run(
        &mut self,
        kind: ProgramKind,
        tokens: &[i32],
        positions: &[i32],
        per_seq: usize,
    ) -> Result<&[f32]> {
        self.run_program(kind, tokens, positions, per_seq, None, None)
    }

    /// As [`CudaExecutor::run`], calling `on_step(step name, row width, rows)` after each
    /// step with what it wrote (a launch's first `Out` buffer, a GEMM's C), copied back
    /// from the device; as [`crate::cpu::CpuExecutor::run_traced`]. Never uses the graph.
    /// `on_step` runs while this executor holds the process's device turn: it must not use
    /// another CUDA executor.
    pub fn run_traced(
        &mut self,
        kind: ProgramKind,
        tokens: &[i32],
        positions: &[i32],
        per_seq: usize,
        on_step: &mut dyn FnMut(&str, usize, &[f32]),
    ) -> Result<&[f32]> {
        self.run_program(kind, tokens, positions, per_seq, Some(on_step), None)
    }

    /// As [`CudaExecutor::run`], copying back only the logits of `rows` (in that order),
    /// `[rows.len(), vocab]`: a 2048-token prefill's full logits are 412 MB, about 400 ms
    /// of a 460 ms first token on the H200 (BENCHMARKS.md). Every row is still computed.
    pub fn run_rows(
        &mut self,
        kind: ProgramKind,
        tokens: &[i32],
        positions: &[i32],
        per_seq: usize,
        rows: &[usize],
    ) -> Result<Vec<f32>> {
        Ok(self
            .run_program(kind, tokens, positions, per_seq, None, Some(rows))?
            .to_vec())
    }

    fn run_program(
        &mut self,
        kind: ProgramKind,
        tokens: &[i32],
        positions: &[i32],
        per_seq: usize,
        on_step: Option<OnStep<'_>>,
        fetch: Option<&[usize]>,
    ) -> Result<&[f32]> {
        // decode_persistent is launched cooperatively: the driver runs it only when every
        // block can be resident at once (as its grid barrier needs), else refuses it up
        // front. Refused (MPS, or another process's kernels on the device): decode goes
        // launch by launch from then on, with one line saying so. Nothing ran: the refusal
        // comes before the kernel starts, and the inputs are uploaded again.
        let traced = on_step.is_some();
        match self.run_once(kind, tokens, positions, per_seq, on_step, fetch) {
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
                self.run_once(kind, tokens, positions, per_seq, None, fetch)?;
            }
            other => other?,
        }
        Ok(&self.host_logits)
    }

    fn run_once(
        &mut self,
        kind: ProgramKind,
        tokens: &[i32],
        positions: &[i32],
        per_seq: usize,
        on_step: Option<OnStep<'_>>,
        fetch: Option<&[usize]>,
    ) -> Result<()> {
        let rows = crate::plan::request_rows(self.batch, per_seq, tokens, positions)?;
        if let Some(r) = fetch.and_then(|f| f.iter().find(|&&r| r >= rows)) {
            return Err(Error::Request {
                what: "rows".into(),
                problem: format!("row {r} is outside the {rows} rows of this call"),
            });
        }
        // The kernels index with these without checks: check them here.
        let d = self.plan.dims;
        if let Some(t) = tokens.iter().find(|&&t| t < 0 || t as usize >= d.vocab) {
            return Err(Error::Request {
                what: "tokens".into(),
                problem: format!("token id {t} is outside 0..{}", d.vocab),
            });
        }
        if let Some(p) = positions
            .iter()
            .find(|&&p| p < 0 || p as usize >= d.max_seq_len)
        {
            return Err(Error::Request {
                what: "positions".into(),
                problem: format!(
                    "position {p} is outside the KV capacity 0..{}",
                    d.max_seq_len
                ),
            });
        }
        if i32::try_from(rows).is_err() {
            return Err(Error::Request {
                what: "tokens".into(),
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
            && self.graph.as_ref().is_some_and(|g| {
                (g.rows, g.per_seq, g.generation) == (rows, per_seq, self.generation)
            });
        let ops = if graph_ready {
            vec![]
        } else {
            let ops = self.resolve(kind, rows, per_seq)?;
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
        self.upload_inputs(tokens, positions)?;
        let capture_now =
            replay && !graph_ready && self.warmed == Some((rows, per_seq, self.generation));
        if graph_ready || capture_now {
            if capture_now {
                self.capture(&ops, rows, per_seq)?;
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
                self.warmed = Some((rows, per_seq, self.generation));
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

    /// Grows every per-call buffer to what `rows` rows need (zeroed when new).
    fn size_buffers(&mut self, rows: usize) -> Result<()> {
        let st = &mut *self.state;
        for i in 0..st.buffers.len() {
            if st.buffers[i].cache {
                continue;
            }
            let need = st.plan.buffer_len(i, rows, st.batch)?;
            let buf = &mut st.buffers[i];
            if need > buf.capacity() || buf.mem.is_none() {
                let what = format!("buffer `{}` for {rows} rows", buf.name);
                // The old allocation goes first, so peak memory stays the new size.
                buf.mem = None;
                buf.mem = Some(if buf.int32 {
                    Mem::I32(Dev::zeros(&st.stream, need, &what)?)
                } else {
                    Mem::F32(Dev::zeros(&st.stream, need, &what)?)
                });
                st.generation += 1;
            }
            buf.need = need;
        }
        Ok(())
    }

    /// Grows the bf16 scratch slots to what `ops` convert.
    fn size_scratch(&mut self, ops: &[Op]) -> Result<()> {
        let mut want = [0usize; 2];
        for op in ops {
            if let Op::Gemm { a, b, .. } = op {
                for g in [a, b] {
                    if let GemmIn::ToBf16 { n, slot, .. } = *g {
                        want[slot] = want[slot].max(n);
                    }
                }
            }
        }
        let st = &mut *self.state;
        for (slot, &n) in want.iter().enumerate() {
            if grow(&mut st.scratch[slot], n, &st.stream, "bf16 GEMM scratch")? {
                st.generation += 1;
            }
        }
        Ok(())
    }

    fn upload_inputs(&mut self, tokens: &[i32], positions: &[i32]) -> Result<()> {
        for (bi, src) in [(self.tokens_buf, tokens), (self.positions_buf, positions)] {
            let buf = &self.buffers[bi];
            if !buf.int32 || buf.need < src.len() || buf.capacity() < src.len() {
                return Err(step_err(
                    "inputs",
                    "the tokens/positions buffers are not int32 [rows]",
                ));
            }
            // SAFETY: the destination holds at least src.len() i32 (checked above); the
            // copy from pageable memory is staged before this call returns.
            unsafe { cu_result::memcpy_htod_async(buf.ptr(), src, self.stream.cu_stream()) }
                .map_err(|e| step_err("inputs", format!("cuMemcpyHtoDAsync: {}", drv(e))))?;
        }
        Ok(())
    }

    /// NaN into every activation and output element this call uses.
    fn poison(&self) -> std::result::Result<(), DriverError> {
        for b in &self.buffers {
            if b.poison && b.need > 0 && b.mem.is_some() {
                // SAFETY: need <= capacity elements of 4 bytes at ptr.
                unsafe {
                    cu::cuMemsetD32Async(b.ptr(), POISON, b.need, self.stream.cu_stream())
                        .result()?
                };
            }
        }
        Ok(())
    }

    fn sync(&self, after: &str) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| step_err(after, format!("the device reported {}", drv(e))))?;
        self.ctx
            .check_err()
            .map_err(|e| step_err(after, format!("the device reported {}", drv(e))))
    }

    /// Captures the decode program (poison included) into a graph.
    fn capture(&mut self, ops: &[Op], rows: usize, per_seq: usize) -> Result<()> {
        self.graph = None;
        self.stream
            .begin_capture(cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| step_err("decode graph", format!("cuStreamBeginCapture: {}", drv(e))))?;
        let recorded = self
            .poison()
            .map_err(|e| step_err("poison", format!("cuMemsetD32Async: {}", drv(e))))
            .and_then(|()| self.enqueue(ops, ProgramKind::Decode, rows, true, None));
        // Always end the capture, so the stream leaves capture mode even on an error.
        let ended = self
            .stream
            .end_capture(cu::CUgraphInstantiate_flags(0))
            .map_err(|e| {
                step_err(
                    "decode graph",
                    format!(
                        "capturing the decode program failed: {} (the option graph=off runs decode without a graph)",
                        drv(e)
                    ),
                )
            });
        recorded?;
        let graph = ended?.ok_or_else(|| step_err("decode graph", "the capture is empty"))?;
        graph
            .upload()
            .map_err(|e| step_err("decode graph", format!("cuGraphUpload: {}", drv(e))))?;
        self.captures += 1;
        self.graph = Some(DecodeGraph {
            graph,
            rows,
            per_seq,
            generation: self.generation,
        });
        Ok(())
    }

    /// Enqueues `ops` on the stream. With `capturing`, nothing synchronizes.
    fn enqueue(
        &self,
        ops: &[Op],
        kind: ProgramKind,
        rows: usize,
        capturing: bool,
        mut on_step: Option<OnStep<'_>>,
    ) -> Result<()> {
        let steps = &self.program(kind)?.steps;
        let stream = self.stream.cu_stream();
        let profile = self.profile.as_ref().filter(|_| !capturing);
        if let Some(p) = profile {
            let mut cycles = PROFILE_SPIN_CYCLES;
            let mut args = [&mut cycles as *mut i64 as *mut c_void];
            // SAFETY: spin(long long) reads its one argument.
            unsafe {
                cu_result::launch_kernel(
                    self.spin.cu_function(),
                    (1, 1, 1),
                    (1, 1, 1),
                    0,
                    stream,
                    &mut args,
                )
            }
            .map_err(|e| step_err("profile", format!("cuLaunchKernel spin: {}", drv(e))))?;
            p.borrow_mut()
                .mark(&self.ctx, &self.stream, "start".into())?;
        }
        for op in ops {
            let si = match op {
                Op::Launch { step, .. } | Op::Gemm { step, .. } => Some(*step),
                Op::Nothing | Op::Persistent { .. } => None,
            };
            match op {
                Op::Nothing => {}
                Op::Persistent { n_ops } => {
                    self.launch_persistent(*n_ops)?;
                    if self.check && !capturing {
                        self.sync("decode (decode_persistent)")?;
                    }
                }
                Op::Launch {
                    step,
                    func,
                    grid,
                    block,
                    shared,
                    params,
                } => {
                    let name = &steps[*step].name;
                    let mut args: Vec<*mut c_void> = params
                        .iter()
                        .map(|p| match p {
                            Param::Ptr(v) => v as *const u64 as *mut c_void,
                            Param::I32(v) => v as *const i32 as *mut c_void,
                            Param::F32(v) => v as *const f32 as *mut c_void,
                        })
                        .collect();
                    // SAFETY: the function's parameters are these, in this order (the
                    // kernel ABI, checked at load), and every address and extent it
                    // touches was checked in `resolve`; `params` outlives the call.
                    unsafe {
                        cu_result::launch_kernel(
                            self.functions[*func].cu_function(),
                            *grid,
                            *block,
                            *shared,
                            stream,
                            &mut args,
                        )
                    }
                    .map_err(|e| step_err(name, format!("cuLaunchKernel: {}", drv(e))))?;
                }
                Op::Gemm {
                    step,
                    trans_a,
                    trans_b,
                    mnk,
                    ld,
                    alpha,
                    beta,
                    a,
                    b,
                    c,
                } => {
                    let name = &steps[*step].name;
                    self.gemm(
                        name,
                        (*trans_a, *trans_b),
                        *mnk,
                        *ld,
                        (*alpha, *beta),
                        (*a, *b),
                        *c,
                    )?;
                }
            }
            if let Some(p) = profile {
                p.borrow_mut()
                    .mark(&self.ctx, &self.stream, self.op_label(op))?;
            }
            if let Some(si) = si {
                let name = &steps[si].name;
                if self.check && !capturing {
                    self.sync(name)?;
                }
                if let Some(f) = on_step.as_mut() {
                    self.trace_step(&steps[si], rows, &mut **f)?;
                }
            }
        }
        Ok(())
    }

    /// Copies what a step wrote back and hands it to `on_step`.
    fn trace_step(
        &self,
        s: &pb::Step,
        rows: usize,
        on_step: &mut dyn FnMut(&str, usize, &[f32]),
    ) -> Result<()> {
        let Some(bi) = crate::plan::written_buffer(s) else {
            return Ok(());
        };
        let buf = &self.buffers[bi];
        let width = self.plan.plan.buffers[bi]
            .elements
            .as_ref()
            .map_or(0, |e| e.c_rows as usize);
        let n = rows.saturating_mul(width);
        if buf.int32 || width == 0 || buf.need < n {
            return Ok(());
        }
        let mut host = vec![0f32; n];
        self.sync(&s.name)?;
        // SAFETY: n <= need <= capacity f32 elements at ptr; synchronized after.
        unsafe { cu_result::memcpy_dtoh_async(&mut host, buf.ptr(), self.stream.cu_stream()) }
            .map_err(|e| step_err(&s.name, format!("cuMemcpyDtoHAsync: {}", drv(e))))?;
        self.sync(&s.name)?;
        on_step(&s.name, width, &host);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        name: &str,
        (trans_a, trans_b): (bool, bool),
        (m, n, k): (i32, i32, i32),
        (lda, ldb, ldc): (i32, i32, i32),
        (alpha, beta): (f32, f32),
        (a, b): (GemmIn, GemmIn),
        c: u64,
    ) -> Result<()> {
        let op = |t: bool| {
            if t {
                blas::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let stream = self.stream.cu_stream();
        // Rounds an f32 operand into its scratch slot; returns the bf16 address.
        let bf16_of = |g: GemmIn| -> Result<Option<u64>> {
            match g {
                GemmIn::F32(_) => Ok(None),
                GemmIn::Bf16(p) => Ok(Some(p)),
                GemmIn::ToBf16 { src, n, slot } => {
                    let dst = self.scratch[slot]
                        .as_ref()
                        .filter(|d| d.len() >= n)
                        .ok_or_else(|| step_err(name, "internal: bf16 scratch too small"))?
                        .ptr;
                    let blocks = n.div_ceil(256).clamp(1, 4096) as u32;
                    let (mut s_arg, mut d_arg, mut n_arg) = (src, dst, n as i64);
                    let mut args = [
                        &mut s_arg as *mut u64 as *mut c_void,
                        &mut d_arg as *mut u64 as *mut c_void,
                        &mut n_arg as *mut i64 as *mut c_void,
                    ];
                    // SAFETY: f32_to_bf16(const float*, unsigned short*, long long):
                    // src holds n f32 (checked in resolve), dst n u16 (checked above).
                    unsafe {
                        cu_result::launch_kernel(
                            self.to_bf16.cu_function(),
                            (blocks, 1, 1),
                            (256, 1, 1),
                            0,
                            stream,
                            &mut args,
                        )
                    }
                    .map_err(|e| {
                        step_err(name, format!("cuLaunchKernel f32_to_bf16: {}", drv(e)))
                    })?;
                    Ok(Some(dst))
                }
            }
        };
        let fptr = |g: GemmIn| match g {
            GemmIn::F32(p) => p,
            _ => 0,
        };
        let (a16, b16) = (bf16_of(a)?, bf16_of(b)?);
        let status = match (a16, b16) {
            (None, None) => {
                // SAFETY: every operand's extent for these m, n, k and leading dimensions
                // was checked in `resolve`; alpha and beta are host scalars.
                unsafe {
                    blas_result::sgemm(
                        self.blas.0,
                        op(trans_a),
                        op(trans_b),
                        m,
                        n,
                        k,
                        &alpha,
                        fptr(a) as *const f32,
                        lda,
                        fptr(b) as *const f32,
                        ldb,
                        &beta,
                        c as *mut f32,
                        ldc,
                    )
                }
            }
            (Some(pa), Some(pb_)) => {
                // SAFETY: as above; both operands bf16, C f32, f32 compute and scalars.
                unsafe {
                    blas_result::gemm_ex(
                        self.blas.0,
                        op(trans_a),
                        op(trans_b),
                        m,
                        n,
                        k,
                        &alpha as *const f32 as *const c_void,
                        pa as *const c_void,
                        blas::cudaDataType::CUDA_R_16BF,
                        lda,
                        pb_ as *const c_void,
                        blas::cudaDataType::CUDA_R_16BF,
                        ldb,
                        &beta as *const f32 as *const c_void,
                        c as *mut c_void,
                        blas::cudaDataType::CUDA_R_32F,
                        ldc,
                        blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
            }
            _ => return Err(step_err(name, "internal: mixed GEMM operand types")),
        };
        status.map_err(|e| step_err(name, format!("cuBLAS GEMM: {}", blas_msg(e))))
    }

    /// Copies the logits back (all `rows`, or only `fetch`'s, in its order), synchronizing
    /// the stream, and checks them in check mode.
    fn fetch_logits(
        &mut self,
        rows: usize,
        kind: ProgramKind,
        fetch: Option<&[usize]>,
    ) -> Result<()> {
        let v = self.plan.dims.vocab;
        let want = rows * v;
        let st = &mut *self.state;
        let buf = &st.buffers[st.logits_buf];
        if buf.int32 {
            return Err(step_err("logits", "logits buffer is not f32"));
        }
        if buf.need < want || buf.capacity() < want {
            return Err(step_err(
                "logits",
                format!(
                    "the logits buffer holds {} elements, {rows} rows x vocab {v} need {want}",
                    buf.need
                ),
            ));
        }
        let what = program_name(kind);
        let stream = st.stream.cu_stream();
        let copy_err = |e| step_err(what, format!("copying the logits back: {}", drv(e)));
        match fetch {
            None => {
                st.host_logits.resize(want, 0.0);
                // SAFETY: want <= capacity f32 elements at ptr; the stream is synchronized
                // below before the host reads them.
                unsafe { cu_result::memcpy_dtoh_async(&mut st.host_logits, buf.ptr(), stream) }
                    .map_err(copy_err)?;
            }
            Some(sel) => {
                st.host_logits.resize(sel.len() * v, 0.0);
                for (dst, &r) in st.host_logits.chunks_exact_mut(v).zip(sel) {
                    // SAFETY: r < rows (checked in run_program), so row r's v elements lie
                    // within the want <= capacity f32 elements at ptr; synchronized below.
                    let src = buf.ptr() + (r * v * std::mem::size_of::<f32>()) as u64;
                    unsafe { cu_result::memcpy_dtoh_async(dst, src, stream) }.map_err(copy_err)?;
                }
            }
        }
        self.sync(what)?;
        if self.check {
            if let Some(i) = self.host_logits.iter().position(|x| x.is_nan()) {
                return Err(step_err(
                    what,
                    format!(
                        "logits row {} column {} is NaN: no step wrote it (outputs are poisoned with NaN before each run)",
                        i / v,
                        i % v
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The decode program as one `decode_persistent` launch: its table built from `ops`
    /// (already resolved and checked) and uploaded, the partials sized for `rows`. Returns
    /// `ops` unchanged when a step is not one the kernel runs (a cuBLAS GEMM, another
    /// kernel).
    fn persistent_ops(&mut self, ops: Vec<Op>, rows: usize) -> Result<Vec<Op>> {
        let mut table = Vec::with_capacity(ops.len());
        for op in &ops {
            let (func, params) = match op {
                Op::Nothing => continue,
                Op::Launch { func, params, .. } => (*func, params),
                Op::Gemm { .. } | Op::Persistent { .. } => return Ok(ops),
            };
            let name = self.function_names[func].as_str();
            let Some(kind) = persistent::kind_of(name) else {
                return Ok(ops);
            };
            let mut e = PdOp {
                kind,
                ..PdOp::default()
            };
            // Addresses, ints and floats, each in parameter order.
            let (mut np, mut ni, mut nf) = (0, 0, 0);
            for p in params {
                let room = match p {
                    Param::Ptr(v) => e.p.get_mut(np).map(|x| *x = *v).map(|()| np += 1),
                    Param::I32(v) => e.i.get_mut(ni).map(|x| *x = *v).map(|()| ni += 1),
                    Param::F32(v) => e.f.get_mut(nf).map(|x| *x = *v).map(|()| nf += 1),
                };
                if room.is_none() {
                    return Err(plan_cuda_err(format!(
                        "internal: `{name}` has more arguments than a decode_persistent step holds"
                    )));
                }
            }
            if kind == persistent::kind::GEMV_BF16 || kind == persistent::kind::GEMV_F32 {
                // The gemv's column count, from its name (gemv_bf16_N).
                let n = name.rsplit('_').next().and_then(|n| n.parse::<i32>().ok());
                e.i[6] = n.ok_or_else(|| plan_cuda_err(format!("internal: `{name}`")))?;
            }
            table.push(e);
        }
        let st = &mut *self.state;
        let pd = &mut st.persistent;
        let c = st.plan.dims.n_embd;
        if pd.fuse
            && grow(
                &mut pd.shadow,
                rows * c,
                &st.stream,
                "decode rows (second buffer)",
            )?
        {
            st.generation += 1;
        }
        let table = match (&pd.shadow, pd.fuse) {
            (Some(shadow), true) => {
                let (fused_table, fused) = persistent::fuse(&table, rows, c, pd.stage, shadow.ptr);
                pd.fused = fused;
                fused_table
            }
            _ => {
                pd.fused = persistent::Fused::default();
                table
            }
        };
        pd.table_host.clear();
        for e in &table {
            e.write(&mut pd.table_host);
        }
        if st.profile.is_some() {
            // Only a profile reads them (decode without a graph rebuilds the table each
            // step). Not in a graph (profiled runs are not captured): no generation to bump.
            pd.labels = table.iter().map(persistent::label).collect();
            grow(
                &mut pd.timer,
                table.len() + 1,
                &st.stream,
                "decode entry timers",
            )?;
        }
        // Enough for the grid of either build (the streaming one may have fewer blocks).
        let grid = pd.blocks.max(pd.streamed.as_ref().map_or(0, |k| k.blocks));
        let part_len = persistent::part_floats(rows, st.plan.dims.n_head, grid as usize);
        let moved = grow(
            &mut pd.part,
            part_len,
            &st.stream,
            "decode attention partials",
        )?;
        let table_len = pd.table_host.len();
        if grow(
            &mut pd.table,
            table_len,
            &st.stream,
            "the decode step table",
        )? || moved
        {
            st.generation += 1;
        }
        let dst = pd.table.as_ref().map_or(0, |d| d.ptr);
        // SAFETY: the table holds at least table_host.len() bytes; table_host is not
        // touched again before the stream is synchronized at the end of this run.
        unsafe { cu_result::memcpy_htod_async(dst, &pd.table_host, st.stream.cu_stream()) }
            .map_err(|e| step_err("decode", format!("uploading the step table: {}", drv(e))))?;
        debug_assert_eq!(pd.table_host.len(), table.len() * PdOp::BYTES);
        Ok(vec![Op::Persistent { n_ops: table.len() }])
    }

    /// Under the option `profile`, after a decode run (synchronized): the time of each entry
    /// inside `decode_persistent`, added to the profile as program `decode.pd` (the first
    /// decode run left out, as the profile leaves it out).
    fn collect_entry_times(&self) -> Result<()> {
        let (Some(p), Some(timer)) = (&self.profile, &self.persistent.timer) else {
            return Ok(());
        };
        let mut p = p.borrow_mut();
        if !p.warmed.contains(&"decode") {
            return Ok(());
        }
        let labels = &self.persistent.labels;
        let mut clock = vec![0u64; labels.len() + 1];
        if timer.len() < clock.len() {
            return Ok(());
        }
        // SAFETY: the timer holds at least labels.len() + 1 u64; synchronized below.
        unsafe { cu_result::memcpy_dtoh_async(&mut clock, timer.ptr, self.stream.cu_stream()) }
            .map_err(|e| step_err("profile", format!("reading decode timers: {}", drv(e))))?;
        self.sync("profile")?;
        for (label, w) in labels.iter().zip(clock.windows(2)) {
            p.add("decode.pd", label, w[1].saturating_sub(w[0]) as f64 * 1e-6);
        }
        Ok(())
    }

    /// Zeroes the grid barrier and launches `decode_persistent` over the table.
    fn launch_persistent(&self, n_ops: usize) -> Result<()> {
        let pd = &self.persistent;
        let what = "decode (decode_persistent)";
        let stream = self.stream.cu_stream();
        let (Some(table), Some(part)) = (&pd.table, &pd.part) else {
            return Err(step_err(what, "internal: the step table is not uploaded"));
        };
        // SAFETY: the barrier holds 4 u32.
        unsafe { cu::cuMemsetD32Async(pd.barrier.ptr, 0, 4, stream).result() }
            .map_err(|e| step_err(what, format!("cuMemsetD32Async: {}", drv(e))))?;
        let d = self.plan.dims;
        let int = |v: usize| i32::try_from(v).map_err(|_| step_err(what, "a dim exceeds int"));
        let (mut t, mut n, mut bar, mut part_p) =
            (table.ptr, int(n_ops)?, pd.barrier.ptr, part.ptr);
        let mut prefetch = i32::from(pd.prefetch);
        // The streaming build with its buffers, or the default one.
        let (func, blocks, mut slice_bytes, mut ring_offset, dynamic) =
            match (pd.stream, &pd.streamed) {
                (true, Some(k)) => {
                    let ring = persistent::ring_offset(pd.stage);
                    (
                        &k.func,
                        k.blocks,
                        int(pd.slice)?,
                        int(ring)?,
                        ring + 2 * pd.slice,
                    )
                }
                _ => (&pd.func, pd.blocks, 0, 0, pd.stage),
            };
        let mut timer = match (&self.profile, &pd.timer) {
            (Some(_), Some(t)) => t.ptr,
            _ => 0u64,
        };
        let (mut c, mut h, mut hd, mut ms) = (
            int(d.n_embd)?,
            int(d.n_head)?,
            int(d.head_dim)?,
            int(d.max_seq_len)?,
        );
        let mut args = [
            &mut t as *mut u64 as *mut c_void,
            &mut n as *mut i32 as *mut c_void,
            &mut bar as *mut u64 as *mut c_void,
            &mut part_p as *mut u64 as *mut c_void,
            &mut c as *mut i32 as *mut c_void,
            &mut h as *mut i32 as *mut c_void,
            &mut hd as *mut i32 as *mut c_void,
            &mut ms as *mut i32 as *mut c_void,
            &mut prefetch as *mut i32 as *mut c_void,
            &mut slice_bytes as *mut i32 as *mut c_void,
            &mut ring_offset as *mut i32 as *mut c_void,
            &mut timer as *mut u64 as *mut c_void,
        ];
        // SAFETY: decode_persistent(const PdOp*, int, unsigned*, float*, int, int, int,
        // int, int, int, int, unsigned long long*): slice_bytes is non-zero only for the
        // streaming build, whose two buffers lie at ring_offset inside `dynamic`; the
        // timer, when not null, holds n_ops + 1; the table holds n_ops entries built from
        // steps checked in `resolve`; the partials `part_floats` (every split either build
        // writes; head_dim <= MAX_D was checked at construction); staged rows fit `stage`
        // bytes (checked by `fuse`); `blocks` blocks of that build are resident at once.
        // Cooperatively where the option says so (the default): co-residency is then the
        // driver's guarantee, not the occupancy calculation's.
        let launched = unsafe {
            if pd.cooperative {
                cu_result::launch_cooperative_kernel(
                    func.cu_function(),
                    (blocks, 1, 1),
                    (persistent::THREADS, 1, 1),
                    dynamic as u32,
                    stream,
                    &mut args,
                )
            } else {
                cu_result::launch_kernel(
                    func.cu_function(),
                    (blocks, 1, 1),
                    (persistent::THREADS, 1, 1),
                    dynamic as u32,
                    stream,
                    &mut args,
                )
            }
        };
        launched.map_err(|e| {
            if pd.cooperative && e.0 == cu::CUresult::CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE {
                step_err(what, COOPERATIVE_REFUSED)
            } else {
                step_err(what, format!("cuLaunchKernel: {}", drv(e)))
            }
        })
    }

    /// What a profile calls `op`: the kernel (with the shape, for gemv) or the GEMM shape.
    fn op_label(&self, op: &Op) -> String {
        match op {
            Op::Persistent { .. } => "decode_persistent".into(),
            Op::Launch { func, params, .. } => {
                let name = &self.function_names[*func];
                match (name.starts_with("gemv_"), params.get(3), params.get(4)) {
                    (true, Some(Param::I32(m)), Some(Param::I32(k))) => {
                        format!("{name} m{m} k{k}")
                    }
                    _ => name.clone(),
                }
            }
            Op::Gemm { mnk, a, .. } => format!(
                "cublas {}gemm m{} n{} k{}",
                if matches!(a, GemmIn::F32(_)) {
                    "s"
                } else {
                    "bf16 "
                },
                mnk.0,
                mnk.1,
                mnk.2
            ),
            Op::Nothing => "nothing".into(),
        }
    }

    fn program(&self, kind: ProgramKind) -> Result<&pb::Program> {
        match kind {
            ProgramKind::Prefill => self.plan.plan.prefill.as_ref(),
            ProgramKind::Decode => self.plan.plan.decode.as_ref(),
        }
        .ok_or_else(|| step_err("program", "missing"))
    }

    /// Resolves every step of `kind` for `rows` rows to device addresses, checking each
    /// against its kernel's contract or the GEMM's extents.
    fn resolve(&self, kind: ProgramKind, rows: usize, per_seq: usize) -> Result<Vec<Op>> {
        let program = self.program(kind)?;
        let mut ops = Vec::with_capacity(program.steps.len());
        for (si, s) in program.steps.iter().enumerate() {
            let op = match s.kind.as_ref() {
                Some(step::Kind::Launch(l)) => {
                    self.resolve_launch(si, &s.name, l, rows, per_seq)?
                }
                Some(step::Kind::Gemm(g)) => self.resolve_gemm(si, &s.name, g, rows)?,
                None => return Err(step_err(&s.name, "empty step")),
            };
            ops.push(op);
        }
        Ok(ops)
    }

    fn resolve_launch(
        &self,
        si: usize,
        name: &str,
        l: &pb::Launch,
        rows: usize,
        per_seq: usize,
    ) -> Result<Op> {
        let plan = &self.plan;
        let d = plan.dims;
        let entry = contract::entry(&l.entry)
            .ok_or_else(|| step_err(name, format!("unknown kernel entry `{}`", l.entry)))?;
        if entry.args.len() != l.args.len() {
            return Err(step_err(name, "argument count differs from the kernel contract"));
        }
        let func = *self
            .function_of
            .get(&(l.module, l.entry.clone()))
            .ok_or_else(|| step_err(name, format!("kernel `{}` is not loaded", l.entry)))?;
        // Arguments: device addresses and symbol values, and what each is bound to for the
        // contract check.
        let mut params = Vec::with_capacity(l.args.len());
        let mut bound = Vec::with_capacity(l.args.len());
        for (i, (spec, a)) in entry.args.iter().zip(&l.args).enumerate() {
            match (spec.slot, a.value.as_ref()) {
                (Slot::In | Slot::Out, Some(arg::Value::Buffer(b))) => {
                    let b = *b as usize;
                    let buf = self
                        .buffers
                        .get(b)
                        .ok_or_else(|| step_err(name, format!("buffer {b} does not exist")))?;
                    bound.push(Bound::Buffer {
                        index: b,
                        name: &buf.name,
                        int32: buf.int32,
                        len: buf.need.min(buf.capacity()),
                    });
                    params.push(Param::Ptr(buf.ptr()));
                }
                (Slot::Weight, Some(arg::Value::Weight(w))) => {
                    let dw = self.weights.get(*w as usize);
                    let ptr = dw.and_then(DevWeight::f32_ptr).ok_or_else(|| {
                        step_err(name, format!("weight {w} has no f32 form on the device"))
                    })?;
                    bound.push(Bound::Weight {
                        index: *w as usize,
                        len: dw.map_or(0, |dw| dw.elems),
                    });
                    params.push(Param::Ptr(ptr));
                }
                (Slot::Symbol, Some(arg::Value::Symbol(s))) => {
                    let v = match pb::Symbol::try_from(*s) {
                        Ok(pb::Symbol::Rows) => rows,
                        Ok(pb::Symbol::Batch) => self.batch,
                        Ok(pb::Symbol::Tokens) => per_seq,
                        _ => return Err(step_err(name, format!("bad symbol {s}"))),
                    };
                    let v32 = i32::try_from(v)
                        .map_err(|_| step_err(name, format!("{v} exceeds the int range")))?;
                    bound.push(Bound::Int(v as i64));
                    params.push(Param::I32(v32));
                }
                _ => {
                    return Err(step_err(
                        name,
                        format!("argument {i} does not fit its slot"),
                    ))
                }
            }
        }
        let grid = dim3(l.grid.as_ref(), rows, self.batch)
            .ok_or_else(|| step_err(name, "grid is missing or overflows"))?;
        let block = dim3(l.block.as_ref(), rows, self.batch)
            .ok_or_else(|| step_err(name, "block is missing or overflows"))?;
        // The kernel contract: what each entry reads and writes for these arguments, and
        // the launch shapes its kernel takes.
        entry
            .check_grid(&d, grid)
            .and_then(|()| entry.check_block(&d, plan.module_dims.kv_tile, block, l.shared_bytes))
            .and_then(|()| entry.check_args(&d, &bound))
            .map_err(|p| step_err(name, p))?;
        // The tensor-core prefill attention takes the same launch (its tiles are static
        // shared memory, so the dynamic part is dropped) and the KV capacity after the
        // plan's arguments.
        if let (true, Some(mma), "attention_prefill", (128, 1, 1)) = (
            self.use_prefill_mma,
            self.prefill_mma,
            l.entry.as_str(),
            block,
        ) {
            let mut params = params;
            params
                .push(Param::I32(i32::try_from(d.max_seq_len).map_err(|_| {
                    step_err(name, "max_seq_len exceeds the int range")
                })?));
            return Ok(Op::Launch {
                step: si,
                func: mma,
                grid,
                block,
                shared: 0,
                params,
            });
        }
        Ok(Op::Launch {
            step: si,
            func,
            grid,
            block,
            shared: l.shared_bytes,
            params,
        })
    }

    fn resolve_gemm(&self, si: usize, name: &str, g: &pb::Gemm, rows: usize) -> Result<Op> {
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
        let cbuf = self
            .buffers
            .get(ci)
            .filter(|b| !b.int32)
            .ok_or_else(|| step_err(name, "GEMM c must be f32"))?;
        // (address, elements, bf16?)
        let operand = |s: Option<operand::Source>, what: &str| -> Result<(u64, usize, bool)> {
            let bad = || {
                step_err(
                    name,
                    format!("GEMM {what} is not an f32 buffer or weight distinct from c"),
                )
            };
            match s {
                Some(operand::Source::Weight(w)) => {
                    let dw = self.weights.get(w as usize).ok_or_else(bad)?;
                    match (&dw.bf16, &dw.f32) {
                        (Some(_), Some(f)) if self.widen_bf16 => Ok((f.ptr, dw.elems, false)),
                        (Some(b16), _) => Ok((b16.ptr, dw.elems, true)),
                        (None, Some(f)) => Ok((f.ptr, dw.elems, false)),
                        (None, None) => Err(bad()),
                    }
                }
                Some(operand::Source::Buffer(b)) if b as usize != ci => {
                    let buf = self.buffers.get(b as usize).filter(|x| !x.int32);
                    let buf = buf.ok_or_else(bad)?;
                    Ok((buf.ptr(), buf.need, false))
                }
                _ => Err(bad()),
            }
        };
        let (pa, la, a16) = operand(src(g.a.as_ref()), "a")?;
        let (pb_, lb, b16) = operand(src(g.b.as_ref()), "b")?;
        if la < need_a || lb < need_b || cbuf.need < need_c {
            return Err(step_err(
                name,
                format!(
                    "GEMM operands too small: a {la}/{need_a}, b {lb}/{need_b}, c {}/{need_c} elements",
                    cbuf.need
                ),
            ));
        }
        if m == 0 || n == 0 {
            return Ok(Op::Nothing);
        }
        let int = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| {
                step_err(
                    name,
                    format!("GEMM {what} = {v} exceeds cuBLAS's int range"),
                )
            })
        };
        let (m32, n32, k32) = (int(m, "m")?, int(n, "n")?, int(k, "k")?);
        let (lda32, ldb32, ldc32) = (int(lda, "lda")?, int(ldb, "ldb")?, int(ldc, "ldc")?);
        if self.use_gemv && g.trans_a && !g.trans_b && !b16 && n <= GEMV_MAX_N {
            // The weight form: row i of op(A) is A[i * lda ..][..k], column j of B is
            // B[j * ldb ..][..k]; 16-byte loads where both line up.
            let esize = if a16 { 2 } else { 4 };
            let vec = pa % 16 == 0
                && (lda * esize) % 16 == 0
                && k % 8 == 0
                && pb_ % 16 == 0
                && ldb % 4 == 0;
            let blocks = u32::try_from(m.div_ceil(GEMV_ROWS_PER_BLOCK as usize))
                .map_err(|_| step_err(name, format!("GEMM m = {m} is too large")))?;
            return Ok(Op::Launch {
                step: si,
                func: self.gemv[usize::from(!a16)][n - 1],
                grid: (blocks, 1, 1),
                block: (32 * GEMV_ROWS_PER_BLOCK, 1, 1),
                shared: 0,
                params: vec![
                    Param::Ptr(pa),
                    Param::Ptr(pb_),
                    Param::Ptr(cbuf.ptr()),
                    Param::I32(m32),
                    Param::I32(k32),
                    Param::I32(lda32),
                    Param::I32(ldb32),
                    Param::I32(ldc32),
                    Param::F32(g.alpha),
                    Param::F32(g.beta),
                    Param::I32(i32::from(vec)),
                ],
            });
        }
        let bf16 = a16 || b16;
        let input = |p: u64, is16: bool, n_el: usize, slot: usize| {
            if is16 {
                GemmIn::Bf16(p)
            } else if bf16 {
                GemmIn::ToBf16 {
                    src: p,
                    n: n_el,
                    slot,
                }
            } else {
                GemmIn::F32(p)
            }
        };
        Ok(Op::Gemm {
            step: si,
            trans_a: g.trans_a,
            trans_b: g.trans_b,
            mnk: (m32, n32, k32),
            ld: (lda32, ldb32, ldc32),
            alpha: g.alpha,
            beta: g.beta,
            a: input(pa, a16, need_a, 0),
            b: input(pb_, b16, need_b, 1),
            c: cbuf.ptr(),
        })
    }
}

/// A launch dimension evaluated for this request, if every component fits u32.
fn dim3(d: Option<&pb::Dim3>, rows: usize, batch: usize) -> Option<(u32, u32, u32)> {
    let d = d?;
    let one = |a: Option<&pb::Affine>| -> Option<u32> {
        match a {
            None => Some(1),
            Some(_) => u32::try_from(eval(a, rows, batch)?).ok(),
        }
    };
    d.x.as_ref()?;
    Some((one(d.x.as_ref())?, one(d.y.as_ref())?, one(d.z.as_ref())?))
}

/// Every (module, entry) the programs launch, with the most dynamic shared memory a
/// launch of it asks for.
fn used_functions(plan: &LoadedPlan) -> HashMap<(u32, String), u32> {
    let mut used: HashMap<(u32, String), u32> = HashMap::new();
    for program in [&plan.plan.prefill, &plan.plan.decode]
        .into_iter()
        .flatten()
    {
        for s in &program.steps {
            if let Some(step::Kind::Launch(l)) = s.kind.as_ref() {
                let e = used.entry((l.module, l.entry.clone())).or_insert(0);
                *e = (*e).max(l.shared_bytes);
            }
        }
    }
    used
}

fn load_ptx(ctx: &Arc<CudaContext>, name: &str, ptx: String) -> Result<Arc<CudaModule>> {
    if ptx.contains('\0') {
        return Err(plan_cuda_err(format!(
            "kernel module `{name}`: the cached PTX holds a NUL byte (clear the kernel cache, {})",
            super::cache_dir().map_or("none".into(), |p| p.display().to_string())
        )));
    }
    ctx.load_module(Ptx::from_src(ptx)).map_err(|e| {
        plan_cuda_err(format!(
            "loading kernel module `{name}`: {} (a stale kernel cache? {})",
            drv(e),
            super::cache_dir().map_or("none".into(), |p| p.display().to_string())
        ))
    })
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
    fn run(
        &mut self,
        kind: ProgramKind,
        tokens: &[i32],
        positions: &[i32],
        per_seq: usize,
    ) -> Result<&[f32]> {
        CudaExecutor::run(self, kind, tokens, positions, per_seq)
    }
    fn run_traced(
        &mut self,
        kind: ProgramKind,
        tokens: &[i32],
        positions: &[i32],
        per_seq: usize,
        on_step: &mut dyn FnMut(&str, usize, &[f32]),
    ) -> Result<&[f32]> {
        CudaExecutor::run_traced(self, kind, tokens, positions, per_seq, on_step)
    }
    fn run_rows(
        &mut self,
        kind: ProgramKind,
        tokens: &[i32],
        positions: &[i32],
        per_seq: usize,
        rows: &[usize],
    ) -> Result<Vec<f32>> {
        CudaExecutor::run_rows(self, kind, tokens, positions, per_seq, rows)
    }
}

fn program_name(kind: ProgramKind) -> &'static str {
    match kind {
        ProgramKind::Prefill => "prefill",
        ProgramKind::Decode => "decode",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archs_are_named() {
        assert_eq!(arch_name(9, 0), Some("sm_90"));
        assert_eq!(arch_name(8, 6), Some("sm_86"));
        assert_eq!(arch_name(1, 0), None);
    }

    #[test]
    fn dims_need_x() {
        let a = |c0| {
            Some(pb::Affine {
                c0,
                c_rows: 0,
                c_batch: 0,
            })
        };
        let d = pb::Dim3 {
            x: Some(pb::Affine {
                c0: 0,
                c_rows: 1,
                c_batch: 0,
            }),
            y: a(4),
            z: None,
        };
        assert_eq!(dim3(Some(&d), 7, 1), Some((7, 4, 1)));
        let no_x = pb::Dim3 {
            x: None,
            y: a(1),
            z: a(1),
        };
        assert_eq!(dim3(Some(&no_x), 7, 1), None);
    }
}
