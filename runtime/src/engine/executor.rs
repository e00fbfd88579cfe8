//! The engine on a plan executor: [`Backend`] over [`Executor`].

use std::sync::Arc;

use super::{Backend, Engine, EngineOptions, StepRows};
use crate::cpu::ProgramKind;
use crate::error::{Error, Result};
use crate::plan::LoadedPlan;
use crate::rows::Rows;
use crate::session::Executor;

/// An executor as the engine drives it.
pub(crate) struct OnExecutor {
    exec: Box<dyn Executor>,
    /// Slots the engine uses (the executor may hold one more, `fixed`'s spare).
    slots: usize,
    /// Where decode runs one fixed shape (CUDA: a captured graph and the persistent kernel
    /// are made for one row count): the rows of every decode call, and the spare slot the
    /// padding rows write (at positions 0, 1, ..., where no request reads).
    fixed: Option<(usize, usize)>,
}

impl Backend for OnExecutor {
    fn vocab(&self) -> usize {
        self.exec.plan().dims.vocab
    }
    fn capacity(&self) -> usize {
        self.exec.plan().dims.max_seq_len
    }
    fn slots(&self) -> usize {
        self.slots
    }
    fn describe(&self) -> String {
        self.exec.describe()
    }
    fn mixes_rows(&self) -> bool {
        self.fixed.is_none()
    }
    fn run(&mut self, decode: bool, rows: &StepRows, chosen: &[usize]) -> Result<Vec<f32>> {
        let kind = if decode {
            ProgramKind::Decode
        } else {
            ProgramKind::Prefill
        };
        let padded;
        let rows = match self.fixed {
            Some((n, spare)) if decode && rows.len() < n => {
                let mut r = rows.clone();
                for k in 0..n - rows.len() {
                    r.slots.push(spare as i32);
                    r.tokens.push(0);
                    r.positions.push(k as i32);
                }
                padded = r;
                &padded
            }
            _ => rows,
        };
        let view = Rows {
            tokens: &rows.tokens,
            positions: &rows.positions,
            slots: &rows.slots,
        };
        self.exec.run_rows(kind, &view, chosen)
    }
}

impl Engine {
    /// An engine on the CPU executor with `opts.max_batch` slots.
    pub fn cpu(plan: Arc<LoadedPlan>, opts: EngineOptions) -> Result<Engine> {
        let exec = crate::cpu::CpuExecutor::new(plan, opts.max_batch)?;
        Engine::on_executor(Box::new(exec), opts)
    }

    /// An engine on the CUDA executor (device 0) with `opts.max_batch` slots and one spare
    /// slot: decode runs one fixed shape of `max_batch` rows, the rows no request fills
    /// writing the spare slot, so its CUDA graph is captured once.
    #[cfg(feature = "cuda")]
    pub fn cuda(
        plan: Arc<LoadedPlan>,
        opts: EngineOptions,
        cuda: &crate::options::CudaOptions,
    ) -> Result<Engine> {
        let cap = plan.dims.max_seq_len;
        if opts.max_batch > cap {
            return Err(Error::Request {
                what: "max_batch".into(),
                problem: format!(
                    "{} is above the KV capacity {cap}: decode's padding rows take one position each of the spare slot",
                    opts.max_batch
                ),
            });
        }
        let exec = crate::cuda::CudaExecutor::with_options(plan, opts.max_batch + 1, cuda)?;
        let backend = OnExecutor {
            exec: Box::new(exec),
            slots: opts.max_batch,
            fixed: Some((opts.max_batch, opts.max_batch)),
        };
        Engine::with_backend(Box::new(backend), opts)
    }

    /// An engine on any executor, using all its slots, rows of decode and prefill mixed in
    /// calls.
    pub fn on_executor(exec: Box<dyn Executor>, opts: EngineOptions) -> Result<Engine> {
        let slots = exec.batch();
        Engine::with_backend(
            Box::new(OnExecutor {
                exec,
                slots,
                fixed: None,
            }),
            opts,
        )
    }
}
