//! The executor's side of decode as one `decode_persistent` launch: loading the kernel
//! and sizing its grid ([`resident_blocks`]), its weight-streaming build
//! ([`StreamedKernel`]), turning the resolved decode steps into the step table
//! (`persistent_ops`; the table's layout and the folding pass are persistent.rs) and
//! launching it, cooperatively by default ([`COOPERATIVE_REFUSED`] when the driver will
//! not).

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{
    result as cu_result, sys as cu, CudaContext, CudaFunction, CudaModule, CudaStream,
};

use super::device::{grow, Dev};
use super::errors::{drv, plan_cuda_err, setup, step_err};
use super::executor::CudaExecutor;
use super::lock::device_turn;
use super::modules::{load_ptx, DEFAULT_SHARED_LIMIT};
use super::persistent::{self, PdOp};
use super::resolve::{Op, Param};
use crate::error::Result;
use crate::options::{Barrier, CudaOptions, PdAttention};
use crate::plan::LoadedPlan;

/// The problem of a decode step whose cooperative `decode_persistent` launch the driver
/// refused; `run_program` falls back to launch by launch on it.
pub(super) const COOPERATIVE_REFUSED: &str =
    "the driver refused decode_persistent's cooperative launch (not every block can be resident at once here)";

/// `decode_persistent`'s launch and memory: the function, the grid (blocks that fit on the
/// device at once), the step table, the attention partials and the grid barrier.
pub(super) struct Persistent {
    pub(super) func: CudaFunction,
    pub(super) blocks: u32,
    /// Dynamic shared memory per block for staged gemv inputs (`persistent::stage_bytes`).
    pub(super) stage: usize,
    /// Registers per thread (they decide how many blocks fit on an SM).
    pub(super) regs: i32,
    /// Whether entries are folded (`persistent::fuse`; the option `fuse=off` turns it off).
    pub(super) fuse: bool,
    /// What the last table folded.
    pub(super) fused: persistent::Fused,
    pub(super) table_host: Vec<u8>,
    pub(super) table: Option<Dev<u8>>,
    pub(super) part: Option<Dev<f32>>,
    /// The second buffer for rows a folded lerp_norm updates.
    pub(super) shadow: Option<Dev<f32>>,
    /// Whether warps prefetch the next gemv's weights into L2 at each barrier
    /// (the option `prefetch=off` turns it off).
    pub(super) prefetch: bool,
    /// Bytes of each weight-streaming buffer (0: they do not fit in shared memory).
    pub(super) slice: usize,
    /// Whether gemv weights stream into shared memory ahead of their entries
    /// (`experimental.pd_stream=on` turns it on; off until measured on a GPU).
    pub(super) stream: bool,
    /// The build of decode_persistent with weight streaming, compiled when first asked for.
    pub(super) streamed: Option<StreamedKernel>,
    /// The helpers module's source (the streaming build adds a define to it).
    pub(super) helpers_source: String,
    pub(super) sms: i32,
    /// Under the option `profile`: the GPU clock after each entry, and the entries' labels.
    pub(super) timer: Option<Dev<u64>>,
    pub(super) labels: Vec<String>,
    pub(super) barrier: Dev<u32>,
    /// Decode runs that went through it.
    pub(super) runs: u64,
    /// Whether the decode program last resolved (and so the captured graph) uses it.
    pub(super) active: bool,
    /// Whether it is launched cooperatively (the option `cooperative`, default on).
    pub(super) cooperative: bool,
    /// The option `blocks_per_sm`.
    pub(super) blocks_cap: Option<u32>,
}

/// `decode_persistent` built with weight streaming (`NGPT_PD_STREAM`): its module, the
/// function and how many of its blocks are resident at once with both buffers.
pub(super) struct StreamedKernel {
    pub(super) _module: Arc<CudaModule>,
    pub(super) func: CudaFunction,
    pub(super) blocks: u32,
}

/// How many blocks of `decode_persistent` (`func`) are resident at once with `dynamic`
/// bytes of dynamic shared memory: the grid its barrier needs every block of; 0 where the
/// plan does not fit it. `cap` (the option `blocks_per_sm`) caps the blocks per SM.
pub(super) fn resident_blocks(
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

/// The helpers module's source for `plan`: `decode_persistent` specialized to the plan's
/// widths and to the experimental options, then [`super::HELPERS_CU`].
pub(super) fn helpers_source(plan: &LoadedPlan, options: &CudaOptions) -> String {
    // Specialized to the plan's widths (decode_persistent's loops unroll over them).
    let min_blocks = options
        .experimental
        .pd_min_blocks
        .filter(|&n| n > 1)
        .map_or(String::new(), |n| {
            format!("#define NGPT_PD_MIN_BLOCKS {n}\n")
        });
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
    helpers_source
}

/// `decode_persistent` from the `helpers` module (built from `helpers_source`) with its
/// grid and memory for `batch` sequences; whether cooperative launches can be used, and
/// if the options asked for them where they cannot, the note saying so (printed).
#[allow(clippy::too_many_arguments)]
pub(super) fn load_persistent(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    helpers: &Arc<CudaModule>,
    helpers_source: String,
    plan: &LoadedPlan,
    batch: usize,
    optin: i32,
    options: &CudaOptions,
    device_name: &str,
) -> Result<(Persistent, bool, Option<String>)> {
    // decode_persistent's dynamic shared memory: staged gemv inputs, then (where they
    // fit, for weight streaming) two buffers of `slice` bytes.
    let stage = persistent::stage_bytes(batch, plan.dims.n_embd);
    let slice = persistent::stream_slice(optin.max(0) as usize, stage);
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
        barrier: Dev::zeros(stream, 4, "the decode grid barrier")?,
        runs: 0,
        active: false,
        cooperative: options.cooperative,
        blocks_cap: options.blocks_per_sm,
    };
    Ok((persistent, coop_ok, fallback_note))
}

impl CudaExecutor {
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

    /// The decode program as one `decode_persistent` launch: its table built from `ops`
    /// (already resolved and checked) and uploaded, the partials sized for `rows`. Returns
    /// `ops` unchanged when a step is not one the kernel runs (a cuBLAS GEMM, another
    /// kernel).
    pub(super) fn persistent_ops(&mut self, ops: Vec<Op>, rows: usize) -> Result<Vec<Op>> {
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
            if persistent::is_gemv_kind(kind) {
                // The gemv's column count, from its name (gemv_bf16_N).
                let n = name.rsplit('_').next().and_then(|n| n.parse::<i32>().ok());
                e.i[6] = n.ok_or_else(|| plan_cuda_err(format!("internal: `{name}`")))?;
            }
            if kind == persistent::kind::GEMV_I8 || kind == persistent::kind::GEMV_I4 {
                // gemv_i*'s fourth address (its scales) goes past the staged inputs' slots.
                e.p[persistent::QUANT_SCALES_SLOT] = std::mem::take(&mut e.p[3]);
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

    /// Zeroes the grid barrier and launches `decode_persistent` over the table.
    pub(super) fn launch_persistent(&self, n_ops: usize) -> Result<()> {
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
        // Cooperatively where the option says so (the default): co-residency is then the
        // driver's guarantee, not the occupancy calculation's.
        let launch = if pd.cooperative {
            cu_result::launch_cooperative_kernel
        } else {
            cu_result::launch_kernel
        };
        // SAFETY: decode_persistent(const PdOp*, int, unsigned*, float*, int, int, int,
        // int, int, int, int, unsigned long long*): slice_bytes is non-zero only for the
        // streaming build, whose two buffers lie at ring_offset inside `dynamic`; the
        // timer, when not null, holds n_ops + 1; the table holds n_ops entries built from
        // steps checked in `resolve`; the partials `part_floats` (every split either build
        // writes; head_dim <= MAX_D was checked at construction); staged rows fit `stage`
        // bytes (checked by `fuse`); `blocks` blocks of that build are resident at once.
        let launched = unsafe {
            launch(
                func.cu_function(),
                (blocks, 1, 1),
                (persistent::THREADS, 1, 1),
                dynamic as u32,
                stream,
                &mut args,
            )
        };
        launched.map_err(|e| {
            if pd.cooperative && e.0 == cu::CUresult::CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE {
                step_err(what, COOPERATIVE_REFUSED)
            } else {
                step_err(what, format!("cuLaunchKernel: {}", drv(e)))
            }
        })
    }
}
