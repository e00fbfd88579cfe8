//! GEMMs: the cuBLAS handle and its workspace, the `cublasSgemm` / `cublasGemmEx` calls
//! (with the f32 operand of a bf16 GEMM rounded to bf16 into a scratch slot by
//! `f32_to_bf16` first), and the `gemv_*` kernels that narrow weight GEMMs run as instead
//! (which GEMM goes where is decided when a step is resolved, resolve.rs).
//!
//! A GEMM over a weight-only quantized weight that is not a gemv (prefill, decode of more
//! than 8 rows, `gemv=off`) dequantizes the weight's rows to f32 with `dequant_rows`, a
//! tile of at most [`super::resolve::DEQUANT_TILE_FLOATS`] floats at a time, into a scratch
//! slot and multiplies each tile by `cublasSgemm` into its rows of C. f32, not bf16: the
//! dequantized values f32(scale) * q are exact in f32 and not in bf16 (an int8 times an f16
//! scale needs up to 19 significant bits), so the GPU multiplies by the very weights the
//! file states, as the CPU executor does, within f32 rounding of its result; and the
//! scratch stays one tile (32 MiB) instead of a whole dequantized lm_head.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{result as blas_result, sys as blas};
use cudarc::driver::{result as cu_result, CudaFunction, CudaModule, CudaStream};

use super::device::{grow, Dev};
use super::errors::{drv, plan_cuda_err, step_err};
use super::executor::CudaExecutor;
use super::resolve::{GemmIn, Op, GEMV_FAMILIES, GEMV_MAX_N};
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

/// Loads gemv_{bf16,f32,i8,i4}_1..8 from the helpers module, appending them to
/// `functions` and `function_names`; returns their indices there, a row per family
/// ([`GEMV_FAMILIES`]).
pub(super) fn load_gemv(
    helpers: &Arc<CudaModule>,
    functions: &mut Vec<CudaFunction>,
    function_names: &mut Vec<String>,
) -> Result<[[usize; GEMV_MAX_N]; GEMV_FAMILIES.len()]> {
    let mut gemv = [[0usize; GEMV_MAX_N]; GEMV_FAMILIES.len()];
    for (wi, w) in GEMV_FAMILIES.iter().enumerate() {
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
    /// Grows the bf16 scratch slots to what `ops` convert, and the dequantization scratch
    /// to the largest tile they dequantize (before any capture: nothing allocates during
    /// one).
    pub(super) fn size_scratch(&mut self, ops: &[Op]) -> Result<()> {
        let mut want = [0usize; 2];
        let mut tile = 0usize;
        for op in ops {
            if let Op::Gemm { a, b, mnk, .. } = op {
                for g in [a, b] {
                    if let GemmIn::ToBf16 { n, slot, .. } = *g {
                        want[slot] = want[slot].max(n);
                    }
                    if let GemmIn::Dequant { tile_rows, .. } = *g {
                        tile = tile.max(tile_rows * mnk.2.max(0) as usize);
                    }
                }
            }
        }
        let st = &mut *self.state;
        if tile > 0 && grow(&mut st.dequant, tile, &st.stream, "dequantized weight tile")? {
            st.generation += 1;
        }
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
                GemmIn::F32(_) | GemmIn::Dequant { .. } => Ok(None),
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
        if let GemmIn::Dequant { .. } = a {
            return self.dequant_gemm(name, (m, n, k), (ldb, ldc), (alpha, beta), a, fptr(b), c);
        }
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

impl CudaExecutor {
    /// `C = alpha * dequant(A)^T B + beta * C` for a quantized `a` ([`GemmIn::Dequant`]):
    /// each tile of rows of A dequantized into the scratch slot by `dequant_rows`, then
    /// `cublasSgemm` of that tile into its rows of C (column-major: row offset `i0`, the
    /// same ldc). Extents were checked in `resolve`.
    #[allow(clippy::too_many_arguments)]
    fn dequant_gemm(
        &self,
        name: &str,
        (m, n, k): (i32, i32, i32),
        (ldb, ldc): (i32, i32),
        (alpha, beta): (f32, f32),
        a: GemmIn,
        b: u64,
        c: u64,
    ) -> Result<()> {
        let GemmIn::Dequant {
            data,
            scales,
            bits,
            row_bytes,
            block_log2,
            tile_rows,
        } = a
        else {
            return Err(step_err(name, "internal: not a quantized operand"));
        };
        let (mu, ku) = (m.max(0) as usize, k.max(0) as usize);
        let tile = self
            .dequant
            .as_ref()
            .filter(|d| d.len() >= tile_rows * ku)
            .ok_or_else(|| step_err(name, "internal: dequantization scratch too small"))?
            .ptr;
        let stream = self.stream.cu_stream();
        let n_blocks = ku.div_ceil(1usize << block_log2);
        let mut i0 = 0usize;
        while i0 < mu {
            let rows = tile_rows.min(mu - i0);
            let rows32 = i32::try_from(rows).map_err(|_| step_err(name, "tile rows exceed int"))?;
            let (mut a_arg, mut s_arg, mut o_arg) = (
                data + (i0 * row_bytes) as u64,
                scales + (i0 * n_blocks * 2) as u64,
                tile,
            );
            let (mut r_arg, mut k_arg, mut rb_arg, mut lb_arg, mut bits_arg) = (
                rows32,
                k,
                i32::try_from(row_bytes).map_err(|_| step_err(name, "row bytes exceed int"))?,
                block_log2 as i32,
                bits as i32,
            );
            let mut args = [
                &mut a_arg as *mut u64 as *mut c_void,
                &mut s_arg as *mut u64 as *mut c_void,
                &mut o_arg as *mut u64 as *mut c_void,
                &mut r_arg as *mut i32 as *mut c_void,
                &mut k_arg as *mut i32 as *mut c_void,
                &mut rb_arg as *mut i32 as *mut c_void,
                &mut lb_arg as *mut i32 as *mut c_void,
                &mut bits_arg as *mut i32 as *mut c_void,
            ];
            let grid = (
                ku.div_ceil(256).max(1) as u32,
                rows.clamp(1, 65_535) as u32,
                1,
            );
            // SAFETY: dequant_rows(const u8*, const u16*, float*, int, int, int, int, int):
            // rows i0..i0 + rows of the weight (m <= its rows, checked in resolve) hold
            // row_bytes bytes and n_blocks scales each; the tile holds rows x k floats
            // (checked above).
            unsafe {
                cu_result::launch_kernel(
                    self.dequant_fn.cu_function(),
                    grid,
                    (256, 1, 1),
                    0,
                    stream,
                    &mut args,
                )
            }
            .map_err(|e| step_err(name, format!("cuLaunchKernel dequant_rows: {}", drv(e))))?;
            // SAFETY: A is the tile (rows x k, lda k), B and C were checked in resolve for
            // m x n x k; C's rows i0.. start i0 floats in (column-major, ldc unchanged).
            unsafe {
                blas_result::sgemm(
                    self.blas.0,
                    blas::cublasOperation_t::CUBLAS_OP_T,
                    blas::cublasOperation_t::CUBLAS_OP_N,
                    rows32,
                    n,
                    k,
                    &alpha,
                    tile as *const f32,
                    k,
                    b as *const f32,
                    ldb,
                    &beta,
                    (c + (i0 * std::mem::size_of::<f32>()) as u64) as *mut f32,
                    ldc,
                )
            }
            .map_err(|e| step_err(name, format!("cuBLAS GEMM: {}", blas_msg(e))))?;
            i0 += rows;
        }
        Ok(())
    }
}
