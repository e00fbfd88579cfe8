//! The GPU's own limits, measured: device-to-device copy bandwidth and the cuBLAS bf16
//! GEMM rate, for `ngpt bench --engine plan-cuda`'s floors.

use std::ffi::c_void;
use std::time::Instant;

use cudarc::cublas::{result as blas_result, sys as blas};
use cudarc::driver::{CudaContext, DevicePtr};

use crate::error::{Error, Result};

/// What the device measured.
#[derive(Debug, Clone, Copy)]
pub struct DeviceRates {
    /// Bytes read plus written per second by a device-to-device copy.
    pub bandwidth: f64,
    /// FLOP/s of a square bf16 x bf16 -> f32 cublasGemmEx with f32 accumulation.
    pub gemm_bf16: f64,
}

fn err(what: &str, detail: impl std::fmt::Debug) -> Error {
    Error::Request {
        what: "plan-cuda".into(),
        problem: format!("measuring the device: {what}: {detail:?}"),
    }
}

/// Measures device 0: the best of `runs` copies of `bytes` and GEMMs of `size`^3.
pub fn device_rates(bytes: usize, size: usize, runs: usize) -> Result<DeviceRates> {
    if let Some(why) = super::unavailable() {
        return Err(Error::Request {
            what: "plan-cuda".into(),
            problem: why,
        });
    }
    let ctx = CudaContext::new(0).map_err(|e| err("context", e))?;
    let stream = ctx.new_stream().map_err(|e| err("stream", e))?;
    let src = stream
        .alloc_zeros::<u8>(bytes)
        .map_err(|e| err("allocating", e))?;
    let mut dst = stream
        .alloc_zeros::<u8>(bytes)
        .map_err(|e| err("allocating", e))?;
    let mut best = f64::INFINITY;
    for _ in 0..runs.max(1) + 1 {
        stream.synchronize().map_err(|e| err("sync", e))?;
        let t0 = Instant::now();
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| err("copy", e))?;
        stream.synchronize().map_err(|e| err("sync", e))?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    let bandwidth = 2.0 * bytes as f64 / best;
    drop((src, dst));

    let n = size.max(16);
    let a = stream
        .alloc_zeros::<u16>(n * n)
        .map_err(|e| err("allocating", e))?;
    let b = stream
        .alloc_zeros::<u16>(n * n)
        .map_err(|e| err("allocating", e))?;
    let c = stream
        .alloc_zeros::<f32>(n * n)
        .map_err(|e| err("allocating", e))?;
    let handle = blas_result::create_handle().map_err(|e| err("cublasCreate", e))?;
    let result = (|| -> Result<f64> {
        // SAFETY: a live handle and our stream.
        unsafe { blas_result::set_stream(handle, stream.cu_stream() as blas::cudaStream_t) }
            .map_err(|e| err("cublasSetStream", e))?;
        let (pa, _ga) = a.device_ptr(&stream);
        let (pb, _gb) = b.device_ptr(&stream);
        let (pc, _gc) = c.device_ptr(&stream);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let mut best = f64::INFINITY;
        for _ in 0..runs.max(1) + 1 {
            stream.synchronize().map_err(|e| err("sync", e))?;
            let t0 = Instant::now();
            // SAFETY: a, b are n x n bf16 (as u16 bits), c is n x n f32, all on device;
            // alpha and beta are host f32 scalars for CUBLAS_COMPUTE_32F.
            unsafe {
                blas_result::gemm_ex(
                    handle,
                    blas::cublasOperation_t::CUBLAS_OP_T,
                    blas::cublasOperation_t::CUBLAS_OP_N,
                    n as i32,
                    n as i32,
                    n as i32,
                    &alpha as *const f32 as *const c_void,
                    pa as *const c_void,
                    blas::cudaDataType::CUDA_R_16BF,
                    n as i32,
                    pb as *const c_void,
                    blas::cudaDataType::CUDA_R_16BF,
                    n as i32,
                    &beta as *const f32 as *const c_void,
                    pc as *mut c_void,
                    blas::cudaDataType::CUDA_R_32F,
                    n as i32,
                    blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| err("cublasGemmEx", e))?;
            stream.synchronize().map_err(|e| err("sync", e))?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        Ok(2.0 * (n as f64).powi(3) / best)
    })();
    // SAFETY: created above, destroyed once.
    let _ = unsafe { blas_result::destroy_handle(handle) };
    Ok(DeviceRates {
        bandwidth,
        gemm_bf16: result?,
    })
}
