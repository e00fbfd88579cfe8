//! The decode program in a CUDA graph: captured once per shape (after a warm-up run) and
//! replayed; `run_once` (executor.rs) decides when.

use cudarc::driver::{sys as cu, CudaGraph};

use super::errors::{drv, step_err};
use super::executor::CudaExecutor;
use super::resolve::Op;
use crate::cpu::ProgramKind;
use crate::error::Result;

/// A captured decode program and what it was captured for.
pub(super) struct DecodeGraph {
    pub(super) graph: CudaGraph,
    pub(super) rows: usize,
    pub(super) generation: u64,
}

impl CudaExecutor {
    /// Captures the decode program (poison included) into a graph.
    pub(super) fn capture(&mut self, ops: &[Op], rows: usize) -> Result<()> {
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
            generation: self.generation,
        });
        Ok(())
    }
}
