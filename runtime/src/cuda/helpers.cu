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

// gemv_<w>_<N>: C[i + j*ldc] = alpha * sum_kk A[kk + i*lda] * B[kk + j*ldb] (+ beta * C,
// read only when beta != 0, as cuBLAS does) for i < m, j < N: cuBLAS's GEMM with
// op(A) = T, op(B) = N and n = N <= 8 columns, the form of every weight product of a
// decode step (A the weight, each row of op(A) contiguous; B the f32 activations).
// cuBLAS runs these shapes as tiled GEMMs far from the memory bandwidth they need; here
// one warp owns one output row and streams it once, 16 bytes per lane per load when `vec`
// (A, B 16-byte aligned, lda and ldb multiples of 16 bytes, k a multiple of 8), else one
// element per lane. The weight is widened to f32 (bf16 exactly), products in f32.
// Grid: ceil(m / 8); block: 256 (8 warps).
__device__ __forceinline__ float bf16_lo(unsigned int u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16_hi(unsigned int u) { return __uint_as_float(u & 0xffff0000u); }

__device__ __forceinline__ void load8(const unsigned short* p, float* w) {
    uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = bf16_lo(u.x); w[1] = bf16_hi(u.x); w[2] = bf16_lo(u.y); w[3] = bf16_hi(u.y);
    w[4] = bf16_lo(u.z); w[5] = bf16_hi(u.z); w[6] = bf16_lo(u.w); w[7] = bf16_hi(u.w);
}
__device__ __forceinline__ void load8(const float* p, float* w) {
    float4 a = __ldg(reinterpret_cast<const float4*>(p));
    float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
}
__device__ __forceinline__ float load1(const unsigned short* p) { return bf16_lo(*p); }
__device__ __forceinline__ float load1(const float* p) { return *p; }

template <typename W, int N>
__device__ void gemv_body(const W* a, const float* b, float* c, int m, int k, int lda, int ldb,
                          int ldc, float alpha, float beta, int vec) {
    int lane = threadIdx.x & 31;
    int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (i >= m) return;
    const W* row = a + (long long)i * lda;
    float acc[N];
#pragma unroll
    for (int j = 0; j < N; ++j) acc[j] = 0.0f;
    if (vec) {
#pragma unroll 4
        for (int kk = lane * 8; kk < k; kk += 256) {
            float w[8];
            load8(row + kk, w);
#pragma unroll
            for (int j = 0; j < N; ++j) {
                const float4* x = reinterpret_cast<const float4*>(b + (long long)j * ldb + kk);
                float4 x0 = __ldg(x), x1 = __ldg(x + 1);
                acc[j] += w[0] * x0.x + w[1] * x0.y + w[2] * x0.z + w[3] * x0.w +
                          w[4] * x1.x + w[5] * x1.y + w[6] * x1.z + w[7] * x1.w;
            }
        }
    } else {
        for (int kk = lane; kk < k; kk += 32) {
            float w = load1(row + kk);
#pragma unroll
            for (int j = 0; j < N; ++j) acc[j] += w * b[(long long)j * ldb + kk];
        }
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
        float v = acc[j];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == j) {
            float* out = c + i + (long long)j * ldc;
            *out = beta != 0.0f ? alpha * v + beta * *out : alpha * v;
        }
    }
}

#define NGPT_GEMV(W, NAME, N)                                                                   \
    extern "C" __global__ void gemv_##NAME##_##N(const W* a, const float* b, float* c, int m,   \
                                                 int k, int lda, int ldb, int ldc, float alpha, \
                                                 float beta, int vec) {                         \
        gemv_body<W, N>(a, b, c, m, k, lda, ldb, ldc, alpha, beta, vec);                        \
    }
#define NGPT_GEMV_ALL(W, NAME)                                                              \
    NGPT_GEMV(W, NAME, 1) NGPT_GEMV(W, NAME, 2) NGPT_GEMV(W, NAME, 3) NGPT_GEMV(W, NAME, 4) \
    NGPT_GEMV(W, NAME, 5) NGPT_GEMV(W, NAME, 6) NGPT_GEMV(W, NAME, 7) NGPT_GEMV(W, NAME, 8)
NGPT_GEMV_ALL(unsigned short, bf16)
NGPT_GEMV_ALL(float, f32)

// spin: keeps the stream busy for `cycles` clock cycles. NGPT_CUDA_PROFILE puts one
// before each profiled run, so that every launch is queued before the first kernel runs
// and the events between kernels time the kernels, not the host's launch rate.
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {
    }
}
