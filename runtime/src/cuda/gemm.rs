//! GEMMs: the cuBLAS handle and its workspace, the `cublasSgemm` / `cublasGemmEx` calls
//! (with the f32 operand of a bf16 GEMM rounded to bf16 into a scratch slot by
//! `f32_to_bf16` first), and the `gemv_*` kernels that narrow weight GEMMs run as instead
//! (which GEMM goes where is decided when a step is resolved, resolve.rs).

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{result as blas_result, sys as blas};
use cudarc::driver::{result as cu_result, CudaFunction, CudaModule, CudaStream};

use super::device::{grow, Dev};
use super::errors::{drv, plan_cuda_err, step_err};
use super::executor::CudaExecutor;
use super::resolve::{GemmIn, Op, GEMV_MAX_N};
use crate::error::Result;

/// cuBLAS workspace: 32 MiB, NVIDIA's recommendation for Hopper. Set explicitly so that
/// no GEMM allocates while a graph is being captured.
pub(super) const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

pub(super) fn blas_msg(e: blas_result::CublasError) -> String {
    format!("{:?}", e.0)
}

/// A cuBLAS handle destroyed without panicking (cudarc's `CudaBlas` unwraps on drop,
/// which would abort a process whose context already failed).
pub(super) struct BlasHandle(pub(super) blas::cublasHandle_t);

impl Drop for BlasHandle {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the handle came from cublasCreate and is destroyed once.
            let _ = unsafe { blas_result::destroy_handle(self.0) };
        }
    }
}

/// A cuBLAS handle on `stream` and its workspace: an explicit workspace, default math (no
/// TF32).
pub(super) fn create_blas(stream: &Arc<CudaStream>) -> Result<(BlasHandle, Dev<u8>)> {
    let handle = blas_result::create_handle()
        .map_err(|e| plan_cuda_err(format!("cublasCreate: {}", blas_msg(e))))?;
    let blas_handle = BlasHandle(handle);
    let workspace = Dev::<u8>::zeros(stream, CUBLAS_WORKSPACE_BYTES, "the cuBLAS workspace")?;
    // SAFETY: a live handle, our stream and a workspace that outlives the handle (the
    // handle is dropped first). cublasSetStream resets the workspace, so it goes first.
    unsafe {
        blas_result::set_stream(handle, stream.cu_stream() as blas::cudaStream_t)
            .map_err(|e| plan_cuda_err(format!("cublasSetStream: {}", blas_msg(e))))?;
        blas::cublasSetWorkspace_v2(handle, workspace.ptr as *mut c_void, CUBLAS_WORKSPACE_BYTES)
            .result()
            .map_err(|e| plan_cuda_err(format!("cublasSetWorkspace: {}", blas_msg(e))))?;
        blas::cublasSetMathMode(handle, blas::cublasMath_t::CUBLAS_DEFAULT_MATH)
            .result()
            .map_err(|e| plan_cuda_err(format!("cublasSetMathMode: {}", blas_msg(e))))?;
    }
    Ok((blas_handle, workspace))
}

/// Loads gemv_bf16_1..8 and gemv_f32_1..8 from the helpers module, appending them to
/// `functions` and `function_names`; returns their indices there.
pub(super) fn load_gemv(
    helpers: &Arc<CudaModule>,
    functions: &mut Vec<CudaFunction>,
    function_names: &mut Vec<String>,
) -> Result<[[usize; GEMV_MAX_N]; 2]> {
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
    Ok(gemv)
}

impl CudaExecutor {
    /// Grows the bf16 scratch slots to what `ops` convert.
    pub(super) fn size_scratch(&mut self, ops: &[Op]) -> Result<()> {
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

    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
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
}
