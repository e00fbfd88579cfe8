//! The option `profile`: a spin kernel ahead of each profiled run (so the whole program is
//! queued before the GPU starts), events between the steps, the times inside
//! `decode_persistent` from its entry timers, and the report printed when the executor is
//! dropped.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{result as cu_result, sys as cu, CudaContext, CudaEvent, CudaStream};

use super::errors::{drv, setup, step_err};
use super::executor::CudaExecutor;
use super::resolve::{GemmIn, Op, Param};
use crate::error::Result;

/// Clock cycles of the spin kernel before a profiled run: 40 ms at 2 GHz, long enough to
/// queue a whole program (a few hundred launches) behind it.
pub(super) const PROFILE_SPIN_CYCLES: i64 = 80_000_000;

/// The option `profile`: events between the steps of the current run, and GPU time per
/// (program, kernel or GEMM shape) over the executor's life.
pub(super) struct Profile {
    /// Reused timing events; `marks` of them are recorded in the current run.
    pub(super) events: Vec<CudaEvent>,
    pub(super) labels: Vec<String>,
    pub(super) marks: usize,
    /// (program, label) -> (calls, milliseconds).
    pub(super) totals: BTreeMap<(String, String), (u64, f64)>,
    /// Programs whose first run was seen (and left out of `totals`).
    pub(super) warmed: Vec<&'static str>,
}

impl Profile {
    /// No events, no times yet.
    pub(super) fn new() -> Profile {
        Profile {
            events: vec![],
            labels: vec![],
            marks: 0,
            totals: BTreeMap::new(),
            warmed: vec![],
        }
    }

    pub(super) fn mark(
        &mut self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
        label: String,
    ) -> Result<()> {
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
    pub(super) fn collect(&mut self, program: &'static str) -> Result<()> {
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
    pub(super) fn add(&mut self, program: &str, label: &str, ms: f64) {
        let e = self
            .totals
            .entry((program.to_string(), label.to_string()))
            .or_insert((0, 0.0));
        e.0 += 1;
        e.1 += ms;
    }

    pub(super) fn report(&self) -> String {
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

impl CudaExecutor {
    /// Before a profiled run's steps: the spin kernel, then the first mark.
    pub(super) fn start_profile(&self, p: &RefCell<Profile>) -> Result<()> {
        let stream = self.stream.cu_stream();
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
        Ok(())
    }

    /// Under the option `profile`, after a decode run (synchronized): the time of each entry
    /// inside `decode_persistent`, added to the profile as program `decode.pd` (the first
    /// decode run left out, as the profile leaves it out).
    pub(super) fn collect_entry_times(&self) -> Result<()> {
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

    /// What a profile calls `op`: the kernel (with the shape, for gemv) or the GEMM shape.
    pub(super) fn op_label(&self, op: &Op) -> String {
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
                match a {
                    GemmIn::F32(_) => "s",
                    GemmIn::Dequant { bits: 8, .. } => "s (int8 dequantized) ",
                    GemmIn::Dequant { .. } => "s (int4 dequantized) ",
                    _ => "bf16 ",
                },
                mnk.0,
                mnk.1,
                mnk.2
            ),
            Op::Nothing => "nothing".into(),
        }
    }
}
