//! The device lock: the CUDA executors of one process take turns with the device.
//!
//! Each executor holds [`DEVICE_WORK`] (through [`device_turn`]) while it is constructed,
//! while it runs, and while it is dropped. The drop is the subtle part: the executor's
//! state sits in a `ManuallyDrop` (`CudaExecutor::state`, executor.rs) so that its `Drop`
//! frees the device memory, the cuBLAS handle, the stream and the modules by hand while
//! it still holds the lock; fields dropped after `Drop` returned would do that device work
//! outside it.

use std::sync::{Mutex, MutexGuard};

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

pub(super) fn device_turn() -> MutexGuard<'static, ()> {
    DEVICE_WORK.lock().unwrap_or_else(|e| e.into_inner())
}
