// Runtime-side helper kernels of the CUDA executor (not part of any plan).
//
// f32_to_bf16: y[i] = bf16(x[i]), round to nearest even (NaN stays NaN), for the
// activation operand of a GEMM whose weight is BF16: cuBLAS multiplies bf16 by bf16 with
// f32 accumulation and f32 output (cublasGemmEx, CUBLAS_COMPUTE_32F); it has no
// bf16 x f32 form. Grid-stride loop: any grid covers any n.
extern "C" __global__ void f32_to_bf16(const float* x, unsigned short* y, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        unsigned int u = __float_as_uint(x[i]);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            y[i] = (unsigned short)((u >> 16) | 0x40u);
        } else {
            u += 0x7fffu + ((u >> 16) & 1u);
            y[i] = (unsigned short)(u >> 16);
        }
    }
}
