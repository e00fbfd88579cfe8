//! [`CudaSession`]: a [`Session`] whose executor is the CUDA executor. The request logic
//! (ragged right padding, positions, capacity checks) is `Session`'s own; only the
//! executor differs.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use crate::error::Result;
use crate::plan::LoadedPlan;
use crate::session::Session;

/// B sequences on the GPU: [`Session`]'s interface (`vocab`, `lens`, `prefill`, `decode`,
/// `prefill_traced`) through `Deref`, on [`super::CudaExecutor`].
///
/// ```no_run
/// use std::sync::Arc;
/// use ngpt_runtime::{cuda::CudaSession, plan::LoadedPlan};
/// let plan = Arc::new(LoadedPlan::load("out/nv-tiny".as_ref())?);
/// let mut s = CudaSession::new(plan, 1)?; // one line saying why, without CUDA
/// let logits = s.prefill(&[vec![45, 64, 77]])?; // [3, vocab]
/// let next = s.decode(&[12])?; // [1, vocab], a CUDA graph replay
/// # Ok::<(), ngpt_runtime::Error>(())
/// ```
pub struct CudaSession(Session);

impl CudaSession {
    /// A session for `batch` sequences on device 0; see [`Session::cuda`].
    pub fn new(plan: Arc<LoadedPlan>, batch: usize) -> Result<CudaSession> {
        Ok(CudaSession(Session::cuda(plan, batch)?))
    }

    /// As [`CudaSession::new`], with the executor's options.
    pub fn with_options(
        plan: Arc<LoadedPlan>,
        batch: usize,
        options: &crate::options::CudaOptions,
    ) -> Result<CudaSession> {
        Ok(CudaSession(Session::cuda_with(plan, batch, options)?))
    }

    /// The plain [`Session`], for code that takes one.
    pub fn into_session(self) -> Session {
        self.0
    }
}

impl Deref for CudaSession {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.0
    }
}

impl DerefMut for CudaSession {
    fn deref_mut(&mut self) -> &mut Session {
        &mut self.0
    }
}
