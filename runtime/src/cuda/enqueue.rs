//! Running resolved [`Op`]s on the executor's one stream: kernel launches with their
//! parameters, GEMMs (gemm.rs), the `decode_persistent` launch (persistent_launch.rs),
//! profile marks between steps (profile.rs); in check mode a synchronization after every
//! step, so an error names its step; a traced run's copy back of what each step wrote.

use std::ffi::c_void;

use cudarc::driver::result as cu_result;
use ngpt_schemas::plan as pb;

use super::errors::{drv, step_err};
use super::executor::{CudaExecutor, OnStep};
use super::resolve::{Op, Param};
use crate::cpu::ProgramKind;
use crate::error::Result;

impl CudaExecutor {
    pub(super) fn sync(&self, after: &str) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| step_err(after, format!("the device reported {}", drv(e))))?;
        self.ctx
            .check_err()
            .map_err(|e| step_err(after, format!("the device reported {}", drv(e))))
    }

    /// Enqueues `ops` on the stream. With `capturing`, nothing synchronizes.
    pub(super) fn enqueue(
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
            self.start_profile(p)?;
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
    pub(super) fn trace_step(
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
}
