// Runtime-side helper kernels of the CUDA executor (not part of any plan).
//
// f32_to_bf16: y[i] = bf16(x[i]), round to nearest even (NaN stays NaN), for the
// activation operand of a GEMM whose weight is BF16: cuBLAS multiplies bf16 by bf16 with
// f32 accumulation and f32 output (cublasGemmEx, CUBLAS_COMPUTE_32F); it has no
// bf16 x f32 form. Grid-stride loop: any grid covers any n.
__device__ __forceinline__ unsigned short bf16_bits(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

extern "C" __global__ void f32_to_bf16(const float* x, unsigned short* y, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) y[i] = bf16_bits(x[i]);
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

// Eight bf16 values, as 16 bytes, widened.
__device__ __forceinline__ void unpack8(uint4 u, float* w) {
    w[0] = bf16_lo(u.x); w[1] = bf16_hi(u.x); w[2] = bf16_lo(u.y); w[3] = bf16_hi(u.y);
    w[4] = bf16_lo(u.z); w[5] = bf16_hi(u.z); w[6] = bf16_lo(u.w); w[7] = bf16_hi(u.w);
}
__device__ __forceinline__ void load8(const unsigned short* p, float* w) {
    unpack8(__ldg(reinterpret_cast<const uint4*>(p)), w);
}
__device__ __forceinline__ void load8(const float* p, float* w) {
    float4 a = __ldg(reinterpret_cast<const float4*>(p));
    float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
}
__device__ __forceinline__ float load1(const unsigned short* p) { return bf16_lo(*p); }
__device__ __forceinline__ float load1(const float* p) { return *p; }
// The same from shared memory (decode_persistent's streamed weights): plain loads, since
// the read-only path is for global memory only.
__device__ __forceinline__ void load8_shared(const unsigned short* p, float* w) {
    unpack8(*reinterpret_cast<const uint4*>(p), w);
}
__device__ __forceinline__ void load8_shared(const float* p, float* w) {
    float4 a = reinterpret_cast<const float4*>(p)[0];
    float4 b = reinterpret_cast<const float4*>(p)[1];
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
}

// Activation loads: through the read-only data path (NC), or plain, for data written
// earlier in the same launch (the persistent kernel below), which that path may not see.
template <bool NC>
__device__ __forceinline__ float4 act4(const float* p) {
    return NC ? __ldg(reinterpret_cast<const float4*>(p)) : *reinterpret_cast<const float4*>(p);
}

// Output row i of a gemv, computed by one warp (lane = threadIdx.x % 32), from the
// weight row at `row` (in shared memory when SHARED, and then `vec`). U: 16-byte loads per
// lane in flight (the loop's unroll).
template <typename W, int N, bool NC, int U = 4, bool SHARED = false>
__device__ __forceinline__ void gemv_row_at(const W* row, const float* b, float* c, int i, int k, int ldb,
                                            int ldc, float alpha, float beta, int vec, int lane) {
    float acc[N];
#pragma unroll
    for (int j = 0; j < N; ++j) acc[j] = 0.0f;
    if (vec) {
#pragma unroll U
        for (int kk = lane * 8; kk < k; kk += 256) {
            float w[8];
            if (SHARED)
                load8_shared(row + kk, w);
            else
                load8(row + kk, w);
#pragma unroll
            for (int j = 0; j < N; ++j) {
                const float* x = b + (long long)j * ldb + kk;
                float4 x0 = act4<NC>(x), x1 = act4<NC>(x + 4);
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

template <typename W, int N, bool NC, int U = 4>
__device__ __forceinline__ void gemv_row(const W* a, const float* b, float* c, int i, int k, int lda,
                                         int ldb, int ldc, float alpha, float beta, int vec, int lane) {
    gemv_row_at<W, N, NC, U>(a + (long long)i * lda, b, c, i, k, ldb, ldc, alpha, beta, vec, lane);
}

template <typename W, int N>
__device__ void gemv_body(const W* a, const float* b, float* c, int m, int k, int lda, int ldb,
                          int ldc, float alpha, float beta, int vec) {
    int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (i >= m) return;
    gemv_row<W, N, true>(a, b, c, i, k, lda, ldb, ldc, alpha, beta, vec, threadIdx.x & 31);
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

// gemv_i8_<N> and gemv_i4_<N>: the gemv_<w>_<N> product with a weight-only quantized weight
// (issue 23; runtime/src/plan.rs QuantWeight): row i's integers at a + i * row_bytes (I8:
// signed bytes; I4: q + 8 in nibbles, element 2j in the low nibble of byte j), its f16
// block scales at scales + i * ceil(k / block), value (i, kk) = f32(scale[kk / block]) * q,
// exactly the plan's dequantized value. `flags`: bit 0 `vec`, bits 8 and up log2(block).
// One warp per output row, as gemv_*. With `vec` (rows and B 16-byte aligned, k a multiple
// of 16 (I8) or 32 (I4), ldb a multiple of 4) each lane loads 16 bytes at a time, so a warp
// reads 512 contiguous bytes of the row per load (16 I8 or 32 I4 weights a lane), turns
// the integers into floats in registers exactly (2^23 + u as float bits, minus 2^23 + the
// offset: one logic op and one add a weight), sums q * x over each run of 16 weights (a
// run never spans two blocks: blocks are powers of two >= 16 and runs start at multiples
// of 16) and multiplies that sum by its block's scale once. Otherwise one element a lane,
// dequantized f32(scale) * q first (the CPU executor's order). f32 accumulation; the
// scales are read through the read-only path (1/16 of an I4 row's bytes at block 32).
// Grid: ceil(m / 8); block: 256 (8 warps).

// An f16's bits as f32, exactly (normal and subnormal; the plan refuses infinite and NaN
// scales at load).
__device__ __forceinline__ float q_scale(unsigned short h) {
    unsigned int e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    float v = e ? __uint_as_float(((e + 112u) << 23) | (m << 13)) : (float)m * 5.9604644775390625e-8f;
    return (h & 0x8000u) ? -v : v;
}
// The four signed bytes of u, as floats (element 0 the low byte).
__device__ __forceinline__ void q8_unpack4(unsigned int u, float* w) {
    u ^= 0x80808080u;  // q + 128, as unsigned bytes
#pragma unroll
    for (int e = 0; e < 4; ++e) w[e] = __uint_as_float(0x4b000000u | ((u >> (8 * e)) & 0xffu)) - 8388736.0f;
}
// The eight nibbles of u (each q + 8), as the floats q (element 0 the low nibble).
__device__ __forceinline__ void q4_unpack8(unsigned int u, float* w) {
#pragma unroll
    for (int e = 0; e < 8; ++e) w[e] = __uint_as_float(0x4b000000u | ((u >> (4 * e)) & 0xfu)) - 8388616.0f;
}
// Integer kk of a quantized row, as a float.
template <int BITS>
__device__ __forceinline__ float q_int(const unsigned char* row, int kk) {
    if (BITS == 8) return (float)(int)(signed char)row[kk];
    return (float)((int)((row[kk >> 1] >> (4 * (kk & 1))) & 0xfu) - 8);
}

// Writes a warp's N accumulators (each lane's part) to output row i: the sums over the
// warp, alpha and beta as cuBLAS applies them.
template <int N>
__device__ __forceinline__ void gemv_store(float* acc, float* c, int i, int ldc, float alpha, float beta, int lane) {
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

// Output row i of a quantized gemv by one warp: the row's integers at `row` (in shared
// memory when SHARED, and then `vec`), its scales at `srow`. U: 16-byte loads per lane in
// flight.
template <int BITS, int N, bool NC, int U = 2, bool SHARED = false>
__device__ __forceinline__ void qgemv_row_at(const unsigned char* row, const unsigned short* srow, const float* b,
                                             float* c, int i, int k, int ldb, int ldc, float alpha, float beta,
                                             int flags, int lane) {
    const int lb = flags >> 8;
    float acc[N];
#pragma unroll
    for (int j = 0; j < N; ++j) acc[j] = 0.0f;
    if (flags & 1) {
        constexpr int E = BITS == 8 ? 16 : 32;  // weights a 16-byte load holds
#pragma unroll U
        for (int kk = lane * E; kk < k; kk += 32 * E) {
            const uint4* p = reinterpret_cast<const uint4*>(row + kk / (8 / BITS));
            uint4 u = SHARED ? *p : __ldg(p);
            const unsigned int words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int h = 0; h < E / 16; ++h) {
                float w[16];
                if (BITS == 8) {
#pragma unroll
                    for (int q = 0; q < 4; ++q) q8_unpack4(words[q], w + 4 * q);
                } else {
                    q4_unpack8(words[2 * h], w);
                    q4_unpack8(words[2 * h + 1], w + 8);
                }
                const int k0 = kk + 16 * h;
                const float s = q_scale(__ldg(srow + (k0 >> lb)));
#pragma unroll
                for (int j = 0; j < N; ++j) {
                    const float* x = b + (long long)j * ldb + k0;
                    float4 x0 = act4<NC>(x), x1 = act4<NC>(x + 4), x2 = act4<NC>(x + 8), x3 = act4<NC>(x + 12);
                    float d = w[0] * x0.x + w[1] * x0.y + w[2] * x0.z + w[3] * x0.w;
                    d += w[4] * x1.x + w[5] * x1.y + w[6] * x1.z + w[7] * x1.w;
                    d += w[8] * x2.x + w[9] * x2.y + w[10] * x2.z + w[11] * x2.w;
                    d += w[12] * x3.x + w[13] * x3.y + w[14] * x3.z + w[15] * x3.w;
                    acc[j] += s * d;
                }
            }
        }
    } else {
        for (int kk = lane; kk < k; kk += 32) {
            float w = q_scale(__ldg(srow + (kk >> lb))) * q_int<BITS>(row, kk);
#pragma unroll
            for (int j = 0; j < N; ++j) acc[j] += w * b[(long long)j * ldb + kk];
        }
    }
    gemv_store<N>(acc, c, i, ldc, alpha, beta, lane);
}

// Scales a row of a quantized weight of k entries in blocks of 2^lb.
__device__ __forceinline__ int q_blocks(int k, int lb) { return (k + (1 << lb) - 1) >> lb; }

template <int BITS, int N>
__device__ void qgemv_body(const unsigned char* a, const float* b, float* c, int m, int k, int row_bytes, int ldb,
                           int ldc, float alpha, float beta, int flags, const unsigned short* scales) {
    int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (i >= m) return;
    qgemv_row_at<BITS, N, true>(a + (long long)i * row_bytes, scales + (long long)i * q_blocks(k, flags >> 8), b, c,
                                i, k, ldb, ldc, alpha, beta, flags, threadIdx.x & 31);
}

#define NGPT_QGEMV(BITS, N)                                                                                    \
    extern "C" __global__ void gemv_i##BITS##_##N(const unsigned char* a, const float* b, float* c, int m,      \
                                                  int k, int row_bytes, int ldb, int ldc, float alpha,          \
                                                  float beta, int flags, const unsigned short* scales) {       \
        qgemv_body<BITS, N>(a, b, c, m, k, row_bytes, ldb, ldc, alpha, beta, flags, scales);                    \
    }
#define NGPT_QGEMV_ALL(BITS)                                                                \
    NGPT_QGEMV(BITS, 1) NGPT_QGEMV(BITS, 2) NGPT_QGEMV(BITS, 3) NGPT_QGEMV(BITS, 4) \
    NGPT_QGEMV(BITS, 5) NGPT_QGEMV(BITS, 6) NGPT_QGEMV(BITS, 7) NGPT_QGEMV(BITS, 8)
NGPT_QGEMV_ALL(8)
NGPT_QGEMV_ALL(4)

// dequant_rows: `rows` rows of a quantized weight (as gemv_i*: `bits` 8 or 4, row_bytes a
// row, its scales, blocks of 2^lb) into out, k floats a row: f32(scale) * q, exactly the
// plan's values. The prefill GEMM over a quantized weight dequantizes a tile of rows with
// this, then multiplies by cublasSgemm (gemm.rs). Grid: (ceil(k / 256), any); block 256.
extern "C" __global__ void dequant_rows(const unsigned char* a, const unsigned short* scales, float* out, int rows,
                                        int k, int row_bytes, int lb, int bits) {
    const int kk = blockIdx.x * blockDim.x + threadIdx.x;
    if (kk >= k) return;
    const int nb = q_blocks(k, lb);
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const unsigned char* row = a + (long long)r * row_bytes;
        float q = bits == 8 ? q_int<8>(row, kk) : q_int<4>(row, kk);
        out[(long long)r * k + kk] = q_scale(__ldg(scales + (long long)r * nb + (kk >> lb))) * q;
    }
}

// spin: keeps the stream busy for `cycles` clock cycles. NGPT_CUDA_PROFILE puts one
// before each profiled run, so that every launch is queued before the first kernel runs
// and the events between kernels time the kernels, not the host's launch rate.
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {
    }
}

// ---------------------------------------------------------------------------------------
// decode_persistent: a whole decode step in one launch. The executor turns the steps of a
// plan's decode program (embed, norm_rows, the weight GEMMs as gemv, pos_norm,
// attention_decode, lerp_norm, swiglu) into a table of PdOp, and one grid of
// (SMs x blocks that fit per SM) blocks walks it: every block takes its share of each
// step (grid-stride over rows, elements, warps), then all blocks meet at a grid barrier
// before the next step, as the separate launches met at kernel boundaries. While waiting
// there, warps ask L2 for the weight rows of the next gemv (`prefetch`). With `timer`
// non-null, block 0 records the GPU clock after each entry (NGPT_CUDA_PROFILE). Semantics are
// those of the ngpt.cu kernels of the same names (the CPU executor's twins), with the
// attention split across the KV length: PD_SPLITS warps per (row, head) each fold a run
// of 32-key tiles with an online softmax into a partial (max, sum, acc[D]) in `part`;
// after a barrier one warp per (row, head) combines the partials.
//
// Activations written during the launch are read with plain loads (not __ldg), weights
// through the read-only path. The grid barrier: `bar` = {arrivals, unused, failed},
// zeroed by the executor before each launch; a block that waits longer than
// PD_SPIN_LIMIT cycles (a grid that is not all resident) sets `failed` and traps, so the
// run fails instead of hanging. Block: PD_THREADS.
#define PD_THREADS 512
#define PD_WARPS (PD_THREADS / 32)
#define PD_MAX_D 128
#define PD_SPLITS 32
#define PD_PART (PD_MAX_D + 2)
#define PD_SPIN_LIMIT 8000000000LL
#define PD_NEG_BIG (-3.402823466e38f)
// The executor compiles this module with the plan's n_embd and head_dim defined
// (NGPT_PD_C, NGPT_PD_D), so that the loops over them unroll and their loads are in flight
// together; without them (NVRTC checks) the kernel takes any width at run time.
#ifdef NGPT_PD_C
#define PD_C_OR(x) NGPT_PD_C
#else
#define PD_C_OR(x) (x)
#endif
#ifdef NGPT_PD_D
#define PD_D_OR(x) NGPT_PD_D
#else
#define PD_D_OR(x) (x)
#endif

enum PdKind {
    PD_EMBED = 0,
    PD_NORM_ROWS = 1,
    PD_LERP_NORM = 2,
    PD_SWIGLU = 3,
    PD_POS_NORM = 4,
    PD_ATTENTION = 5,
    PD_GEMV_BF16 = 6,
    PD_GEMV_F32 = 7,
    // pos_norm folded into attention_decode's partials (the executor's fusion).
    PD_POS_ATTENTION = 8,
    // Weight-only quantized gemvs (gemv_i8_N, gemv_i4_N): p[7] holds the block scales,
    // i[2] the bytes of a weight row, i[5] the flags (bit 0 vec, bits 8.. log2 block).
    PD_GEMV_I8 = 9,
    PD_GEMV_I4 = 10,
};

// Where a gemv step's activations come from (PdOp.i[7]): the B operand in global memory,
// or rows staged by each block in its shared memory (`xs`) from a step the executor
// folded in: lerp_norm (p[3] h_in, p[4] branch, p[5] lr; block 0 also writes the result
// to p[6] h_out, a different buffer, since other blocks still read h_in) or swiglu
// (p[3] fc). Staged rows are the B operand with ldb = their width.
enum PdInput { PD_IN_GLOBAL = 0, PD_IN_LERP = 1, PD_IN_SWIGLU = 2 };

// One step: device addresses, ints and floats as each kind reads them (see the cases of
// decode_persistent), 128 bytes; the executor writes the same layout (PdOp in
// persistent.rs).
struct PdOp {
    unsigned long long p[10];
    int i[8];
    float f[2];
    int kind;
    int pad;
};

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (PD_THREADS threads, all of which call it).
__device__ float pd_block_sum(float v) {
    __shared__ float parts[PD_WARPS];
    v = warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) parts[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = 0.0f;
#pragma unroll
    for (int w = 0; w < PD_WARPS; ++w) t += parts[w];
    return t;
}

// Sums of v[0..8) over the block, each (PD_THREADS threads, all of which call it).
__device__ void pd_block_sum8(float* v) {
    __shared__ float parts8[PD_WARPS][8];
#pragma unroll
    for (int r = 0; r < 8; ++r) v[r] = warp_sum(v[r]);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int r = 0; r < 8; ++r) parts8[threadIdx.x >> 5][r] = v[r];
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 8; ++r) {
        float t = 0.0f;
#pragma unroll
        for (int w = 0; w < PD_WARPS; ++w) t += parts8[w][r];
        v[r] = t;
    }
}

// Barriers this block has passed in the current launch (zeroed at its start).
__shared__ unsigned int pd_epoch;

// Arrival at, and the arrival count of, the grid barrier below. By default a fence then an
// atomic add, and volatile reads then a fence once the count is reached (as cooperative
// groups' grid sync does). With NGPT_PD_ACQREL (NGPT_CUDA_PD_BARRIER=acqrel, opt-in until
// measured on a GPU): a release reduction and acquire loads at GPU scope, as CUTLASS's
// inter-block barrier does; the __syncthreads around them carry the other threads' writes
// and reads (release and acquire are cumulative), and no full fence is waited for.
#ifndef NGPT_HOST_EMULATION
#if defined(NGPT_PD_ACQREL) && __CUDA_ARCH__ >= 700
__device__ __forceinline__ void pd_arrive(unsigned int* bar) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(bar) : "memory");
}
__device__ __forceinline__ unsigned int pd_arrivals(const unsigned int* bar) {
    unsigned int v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
    return v;
}
__device__ __forceinline__ void pd_arrived() {}
#else
__device__ __forceinline__ void pd_arrive(unsigned int* bar) {
    __threadfence();
    atomicAdd(bar, 1u);
}
__device__ __forceinline__ unsigned int pd_arrivals(const unsigned int* bar) {
    return *reinterpret_cast<const volatile unsigned int*>(bar);
}
__device__ __forceinline__ void pd_arrived() { __threadfence(); }
#endif
#endif

// All blocks meet: each adds one to the arrival count bar[0], which only grows during a
// launch, and waits until it reaches (barriers passed) x (blocks). One atomic per block
// and no reset, so the last arrival releases everyone at once.
__device__ void pd_barrier(unsigned int* bar) {
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int target = (++pd_epoch) * gridDim.x;
        pd_arrive(bar);
        long long t0 = clock64();
        while (pd_arrivals(bar) < target) {
            if (clock64() - t0 > PD_SPIN_LIMIT) {
                atomicExch(bar + 2, 1u);
                __threadfence();
                __trap();
            }
        }
        pd_arrived();
    }
    __syncthreads();
}

// The few PTX instructions decode_persistent uses, which the host emulation
// (runtime/tests/host_emulation/warp.hpp) provides in its own way.
#ifndef NGPT_HOST_EMULATION
__device__ __forceinline__ void pd_prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
__device__ __forceinline__ unsigned long long pd_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// 16 bytes from global to shared memory without passing through registers; the copies a
// thread issued since its last commit form a group, and wait(n) returns once at most n of
// its groups are still in flight.
// Before sm_80 (no cp.async) the copy is a plain one and groups are always complete.
#if __CUDA_ARCH__ >= 800
__device__ __forceinline__ void pd_copy16_async(void* shared_dst, const void* global_src) {
    unsigned int dst = (unsigned int)__cvta_generic_to_shared(shared_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(global_src) : "memory");
}
__device__ __forceinline__ void pd_copy_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void pd_copy_wait1() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }
__device__ __forceinline__ void pd_copy_wait0() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }
#else
__device__ __forceinline__ void pd_copy16_async(void* shared_dst, const void* global_src) {
    *reinterpret_cast<uint4*>(shared_dst) = *reinterpret_cast<const uint4*>(global_src);
}
__device__ __forceinline__ void pd_copy_commit() {}
__device__ __forceinline__ void pd_copy_wait1() {}
__device__ __forceinline__ void pd_copy_wait0() {}
#endif
#endif

// Whether an entry is a gemv (bf16, f32, int8 or int4 weights), and a quantized one.
__device__ __forceinline__ bool pd_is_quant(int kind) { return kind == PD_GEMV_I8 || kind == PD_GEMV_I4; }
__device__ __forceinline__ bool pd_is_gemv(int kind) {
    return kind == PD_GEMV_BF16 || kind == PD_GEMV_F32 || pd_is_quant(kind);
}
// Bytes of one weight row a gemv entry reads (k elements), and between consecutive rows
// (lda elements; a quantized entry's i[2] is already in bytes, its rows are whole).
__device__ __forceinline__ long long pd_row_bytes(const PdOp& op) {
    return pd_is_quant(op.kind) ? op.i[2] : (long long)op.i[1] * (op.kind == PD_GEMV_BF16 ? 2 : 4);
}
__device__ __forceinline__ long long pd_row_stride(const PdOp& op) {
    return pd_is_quant(op.kind) ? op.i[2] : (long long)op.i[2] * (op.kind == PD_GEMV_BF16 ? 2 : 4);
}

// Asks L2 for the weight rows of the next gemv entry (within the next two) that this warp
// will read, so that they stream in while the blocks wait at the barrier. Skipped for
// weights larger than PD_PREFETCH_MAX (they would not stay in L2).
#define PD_PREFETCH_MAX (32LL << 20)

__device__ void pd_prefetch_next(const PdOp* ops, int o, int n_ops, int gwarp, int nwarps, int lane) {
    for (int x = o + 1; x < n_ops && x <= o + 2; ++x) {
        const PdOp& nx = ops[x];
        if (!pd_is_gemv(nx.kind)) continue;
        long long row_bytes = pd_row_bytes(nx), stride = pd_row_stride(nx);
        if ((long long)nx.i[0] * row_bytes > PD_PREFETCH_MAX) return;
        const char* a = reinterpret_cast<const char*>(nx.p[0]);
        for (int i = gwarp; i < nx.i[0]; i += nwarps) {
            const char* row = a + (long long)i * stride;
            for (long long off = (long long)lane * 128; off < row_bytes; off += 32 * 128) pd_prefetch_l2(row + off);
        }
        return;
    }
}

template <typename W, int N>
__device__ void pd_gemv_n(const PdOp& op, const float* b, int ldb, int gwarp, int nwarps, int lane) {
    const W* a = reinterpret_cast<const W*>(op.p[0]);
    float* c = reinterpret_cast<float*>(op.p[2]);
    // Few warps per SM here (the whole grid fits at once): more loads in flight per warp,
    // where the columns leave registers for them.
    constexpr int U = N <= 2 ? 8 : 4;
    for (int i = gwarp; i < op.i[0]; i += nwarps)
        gemv_row<W, N, false, U>(a, b, c, i, op.i[1], op.i[2], ldb, op.i[4], op.f[0], op.f[1], op.i[5], lane);
}

// The same for a quantized entry (BITS 8 or 4): row i's integers at p[0] + i * i[2] bytes,
// its scales at p[7] + i * ceil(k / block).
template <int BITS, int N>
__device__ void pd_qgemv_n(const PdOp& op, const float* b, int ldb, int gwarp, int nwarps, int lane) {
    const unsigned char* a = reinterpret_cast<const unsigned char*>(op.p[0]);
    const unsigned short* s = reinterpret_cast<const unsigned short*>(op.p[7]);
    float* c = reinterpret_cast<float*>(op.p[2]);
    const int k = op.i[1], nb = q_blocks(k, op.i[5] >> 8);
    constexpr int U = N <= 2 ? 2 : 1;
    for (int i = gwarp; i < op.i[0]; i += nwarps)
        qgemv_row_at<BITS, N, false, U>(a + (long long)i * op.i[2], s + (long long)i * nb, b, c, i, k, ldb, op.i[4],
                                        op.f[0], op.f[1], op.i[5], lane);
}

// Runs CALL with the constant PD_N = n, 1 to 8 (more: 8): the gemv bodies are compiled for
// each column count. (A macro: NVRTC takes no device lambdas without --extended-lambda.)
#define PD_WITH_COLS(n, CALL)                         \
    switch (n) {                                      \
    case 1: { constexpr int PD_N = 1; CALL; } break;  \
    case 2: { constexpr int PD_N = 2; CALL; } break;  \
    case 3: { constexpr int PD_N = 3; CALL; } break;  \
    case 4: { constexpr int PD_N = 4; CALL; } break;  \
    case 5: { constexpr int PD_N = 5; CALL; } break;  \
    case 6: { constexpr int PD_N = 6; CALL; } break;  \
    case 7: { constexpr int PD_N = 7; CALL; } break;  \
    default: { constexpr int PD_N = 8; CALL; } break; \
    }

// Stages the gemv's input rows in xs where the step folded in lerp_norm or swiglu (see
// PdInput); returns the B operand and sets its leading dimension.
__device__ const float* pd_gemv_input(const PdOp& op, float* xs, int c, int* ldb) {
    c = PD_C_OR(c);
    int rows = op.i[6], mode = op.i[7];
    if (mode == PD_IN_LERP) {
        // The whole block on each pass over the rows (at most 8), one block sum per norm.
        const float* h_in = reinterpret_cast<const float*>(op.p[3]);
        const float* branch = reinterpret_cast<const float*>(op.p[4]);
        const float* lr = reinterpret_cast<const float*>(op.p[5]);
        float* h_out = reinterpret_cast<float*>(op.p[6]);
        float ss[8];
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            ss[r] = 0.0f;
            if (r < rows) {
#pragma unroll 4
                for (int j = threadIdx.x; j < c; j += PD_THREADS) {
                    float b = branch[(long long)r * c + j];
                    ss[r] += b * b;
                }
            }
        }
        pd_block_sum8(ss);
        float ss2[8];
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            ss2[r] = 0.0f;
            if (r < rows) {
                float inv_b = rsqrtf(ss[r]);
#pragma unroll 4
                for (int j = threadIdx.x; j < c; j += PD_THREADS) {
                    float h = h_in[(long long)r * c + j];
                    float m = h + __ldg(lr + j) * (branch[(long long)r * c + j] * inv_b - h);
                    xs[r * c + j] = m;
                    ss2[r] += m * m;
                }
            }
        }
        pd_block_sum8(ss2);
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            if (r < rows) {
                float inv_m = rsqrtf(ss2[r]);
#pragma unroll 4
                for (int j = threadIdx.x; j < c; j += PD_THREADS) {
                    float m = xs[r * c + j] * inv_m;
                    xs[r * c + j] = m;
                    if (blockIdx.x == 0) h_out[(long long)r * c + j] = m;
                }
            }
        }
        __syncthreads();
        *ldb = c;
        return xs;
    }
    if (mode == PD_IN_SWIGLU) {
        const float* fc = reinterpret_cast<const float*>(op.p[3]);
        int w4 = 4 * c;
#pragma unroll 4
        for (int e = threadIdx.x; e < rows * w4; e += blockDim.x) {
            int r = e / w4, j = e - r * w4;
            float v = fc[(long long)r * 2 * w4 + w4 + j];
            xs[e] = fc[(long long)r * 2 * w4 + j] * (v / (1.0f + expf(-v)));
        }
        __syncthreads();
        *ldb = w4;
        return xs;
    }
    *ldb = op.i[3];
    return reinterpret_cast<const float*>(op.p[1]);
}

// Weight streaming (NGPT_CUDA_PD_STREAM=1: the executor compiles a second build of this
// module with NGPT_PD_STREAM defined and launches it with `slice_bytes`, the size of each
// of two buffers, and `ring_offset`, where they start in the dynamic shared memory, after
// the staged inputs; the default build has none of this code). A gemv's rows are then
// split into one contiguous range per block, and the first rows of the block's range that
// fit a buffer (its slice) are copied into shared memory with cp.async while the entries
// before it run: the slice of the first gemv after each entry is issued at that entry's
// start, so the weights stream in during the entry and its grid barrier instead of after
// them. Slice k of the launch (gemv entries in table order) goes to buffer k % 2; at most
// two slices are in flight (the current gemv's and the next one's), and slice k + 2 is
// issued only after every thread of the block left gemv k (a grid barrier lies between).
// Rows past the slice, and gemvs that are not `vec`, read global memory as without
// streaming.
#ifdef NGPT_PD_STREAM
// This block's rows [r0, r1) of a gemv with m rows.
__device__ __forceinline__ void pd_block_rows(int m, int* r0, int* r1) {
    *r0 = (int)((long long)m * blockIdx.x / gridDim.x);
    *r1 = (int)((long long)m * (blockIdx.x + 1) / gridDim.x);
}

// How many of rows [r0, r1) of gemv `op` its slice of `slice_bytes` holds.
__device__ __forceinline__ int pd_slice_rows(const PdOp& op, int r0, int r1, int slice_bytes) {
    if (!(op.i[5] & 1)) return 0;
    return (int)min((long long)(r1 - r0), (long long)slice_bytes / pd_row_bytes(op));
}

// Issues the copies of gemv `op`'s slice into `buf` (row after row, each k elements) and
// commits them as one group (an empty one where the slice is empty).
__device__ void pd_issue_slice(const PdOp& op, char* buf, int slice_bytes) {
    int r0, r1;
    pd_block_rows(op.i[0], &r0, &r1);
    int rows = pd_slice_rows(op, r0, r1, slice_bytes);
    int pieces = (int)(pd_row_bytes(op) / 16);
    const char* a = reinterpret_cast<const char*>(op.p[0]);
    long long lda_bytes = pd_row_stride(op);
    for (int e = threadIdx.x; e < rows * pieces; e += blockDim.x) {
        int r = e / pieces, q = e - r * pieces;
        pd_copy16_async(buf + (long long)e * 16, a + (long long)(r0 + r) * lda_bytes + (long long)q * 16);
    }
    pd_copy_commit();
}

template <typename W, int N>
__device__ void pd_gemv_stream_n(const PdOp& op, const float* b, int ldb, const char* slice, int slice_bytes,
                                 int warp, int lane) {
    const W* a = reinterpret_cast<const W*>(op.p[0]);
    const W* sa = reinterpret_cast<const W*>(slice);
    float* c = reinterpret_cast<float*>(op.p[2]);
    constexpr int U = N <= 2 ? 8 : 4;
    int r0, r1;
    pd_block_rows(op.i[0], &r0, &r1);
    int in_slice = pd_slice_rows(op, r0, r1, slice_bytes), k = op.i[1];
    for (int i = r0 + warp; i < r1; i += PD_WARPS) {
        if (i - r0 < in_slice)
            gemv_row_at<W, N, false, U, true>(sa + (long long)(i - r0) * k, b, c, i, k, ldb, op.i[4], op.f[0],
                                              op.f[1], op.i[5], lane);
        else
            gemv_row_at<W, N, false, U>(a + (long long)i * op.i[2], b, c, i, k, ldb, op.i[4], op.f[0], op.f[1],
                                        op.i[5], lane);
    }
}

template <typename W>
__device__ void pd_gemv_stream(const PdOp& op, float* xs, int c, const char* slice, int slice_bytes, int warp,
                               int lane) {
    int ldb;
    const float* b = pd_gemv_input(op, xs, c, &ldb);
    PD_WITH_COLS(op.i[6], (pd_gemv_stream_n<W, PD_N>(op, b, ldb, slice, slice_bytes, warp, lane)));
}

// A quantized gemv streamed: the slice's rows are row_bytes apart in shared memory.
template <int BITS, int N>
__device__ void pd_qgemv_stream_n(const PdOp& op, const float* b, int ldb, const char* slice, int slice_bytes,
                                  int warp, int lane) {
    const unsigned char* a = reinterpret_cast<const unsigned char*>(op.p[0]);
    const unsigned char* sa = reinterpret_cast<const unsigned char*>(slice);
    const unsigned short* s = reinterpret_cast<const unsigned short*>(op.p[7]);
    float* c = reinterpret_cast<float*>(op.p[2]);
    constexpr int U = N <= 2 ? 2 : 1;
    int r0, r1;
    pd_block_rows(op.i[0], &r0, &r1);
    const int in_slice = pd_slice_rows(op, r0, r1, slice_bytes), k = op.i[1], rb = op.i[2];
    const int nb = q_blocks(k, op.i[5] >> 8);
    for (int i = r0 + warp; i < r1; i += PD_WARPS) {
        const unsigned short* srow = s + (long long)i * nb;
        if (i - r0 < in_slice)
            qgemv_row_at<BITS, N, false, U, true>(sa + (long long)(i - r0) * rb, srow, b, c, i, k, ldb, op.i[4],
                                                  op.f[0], op.f[1], op.i[5], lane);
        else
            qgemv_row_at<BITS, N, false, U>(a + (long long)i * rb, srow, b, c, i, k, ldb, op.i[4], op.f[0], op.f[1],
                                            op.i[5], lane);
    }
}

template <int BITS>
__device__ void pd_qgemv_stream(const PdOp& op, float* xs, int c, const char* slice, int slice_bytes, int warp,
                                int lane) {
    int ldb;
    const float* b = pd_gemv_input(op, xs, c, &ldb);
    PD_WITH_COLS(op.i[6], (pd_qgemv_stream_n<BITS, PD_N>(op, b, ldb, slice, slice_bytes, warp, lane)));
}
#endif

template <typename W>
__device__ void pd_gemv(const PdOp& op, float* xs, int c, int gwarp, int nwarps, int lane) {
    int ldb;
    const float* b = pd_gemv_input(op, xs, c, &ldb);
    PD_WITH_COLS(op.i[6], (pd_gemv_n<W, PD_N>(op, b, ldb, gwarp, nwarps, lane)));
}

template <int BITS>
__device__ void pd_qgemv(const PdOp& op, float* xs, int c, int gwarp, int nwarps, int lane) {
    int ldb;
    const float* b = pd_gemv_input(op, xs, c, &ldb);
    PD_WITH_COLS(op.i[6], (pd_qgemv_n<BITS, PD_N>(op, b, ldb, gwarp, nwarps, lane)));
}

// pos_norm's first half for one (row, head), by one warp: q and k of the head after the
// position step (each pair times the position's table entries; pair j = lane + 32 u in
// q[2u], q[2u + 1]) and their inverse norms (k's only `with_k`, a warp-uniform flag).
// `row` is the row's qkv, `m` its position's table row. Shared by the pos_norm entry and
// the attention it folds into.
__device__ __forceinline__ void pd_pos_step(const float* row, const float* m, int c, int d, int head, int lane,
                                            bool with_k, float* q, float* k, float* inv_q, float* inv_k) {
    float sq = 0.0f, sk = 0.0f;
#pragma unroll
    for (int u = 0; u < PD_MAX_D / 64; ++u) {
        int j = lane + 32 * u, col = head * d + 2 * j;
        q[2 * u] = q[2 * u + 1] = k[2 * u] = k[2 * u + 1] = 0.0f;
        if (j < d / 2) {
            q[2 * u] = row[col] * __ldg(m + 2 * j);
            q[2 * u + 1] = row[col + 1] * __ldg(m + 2 * j + 1);
            k[2 * u] = row[c + col] * __ldg(m + 2 * j);
            k[2 * u + 1] = row[c + col + 1] * __ldg(m + 2 * j + 1);
        }
        sq += q[2 * u] * q[2 * u] + q[2 * u + 1] * q[2 * u + 1];
        sk += k[2 * u] * k[2 * u] + k[2 * u + 1] * k[2 * u + 1];
    }
    *inv_q = rsqrtf(warp_sum(sq));
    *inv_k = with_k ? rsqrtf(warp_sum(sk)) : 0.0f;
}

// How many splits a (row, head) may use, which is also the stride of its partials in
// `part`. By default PD_SPLITS. With NGPT_PD_WIDE (NGPT_CUDA_PD_ATTENTION=wide, opt-in
// until measured on a GPU): every warp of the grid, shared out over the (row, head) pairs,
// so that at long KV lengths a warp folds one 32-key tile rather than PD_SPLITS warps
// folding several each, one after the other. The executor sizes `part` for
// max(rows x heads x PD_SPLITS, warps) partials (persistent::part_floats).
__device__ __forceinline__ int pd_split_cap(int rows_heads, int nwarps) {
#ifdef NGPT_PD_WIDE
    return max(1, nwarps / rows_heads);
#else
    (void)rows_heads;
    (void)nwarps;
    return PD_SPLITS;
#endif
}

// The split of row r's keys 0..=pos into runs of 32-key tiles: how many splits (at most
// `cap`), and how many tiles each.
__device__ __forceinline__ void pd_splits(int pos, int cap, int* n_tiles, int* splits, int* per) {
    *n_tiles = (pos + 1 + 31) / 32;
    *splits = min(*n_tiles, cap);
    *per = (*n_tiles + *splits - 1) / *splits;
}

// Whether the wide build's P.V spreads a tile's value rows over the lanes as float4s
// (d / 4 lanes per row, 32 / (d / 4) rows at once): d a multiple of 4 whose quarter
// divides 32 (4, 8, 16, 32, 64 or 128); other widths keep one row at a time.
__device__ __forceinline__ bool pd_wide_pv(int d) {
#ifdef NGPT_PD_WIDE
    return d % 4 == 0 && 32 % (d / 4) == 0;
#else
    (void)d;
    return false;
#endif
}

// Splits first, first + step, ... (< splits) of a (row, head)'s partials `pp`, each
// weighted by exp(its max - big), summed: acc (lane + 32 u of the head's dims) and the
// softmax total.
__device__ __forceinline__ void pd_fold_partials(const float* pp, int first, int step, int splits, float big,
                                                 int d, int lane, float* acc, float* total) {
    float t = 0.0f;
#pragma unroll
    for (int u = 0; u < PD_MAX_D / 32; ++u) acc[u] = 0.0f;
#pragma unroll 4
    for (int s = first; s < splits; s += step) {
        const float* ps = pp + s * PD_PART;
        float wgt = expf(ps[0] - big);
        t += ps[1] * wgt;
#pragma unroll
        for (int u = 0; u < PD_MAX_D / 32; ++u) {
            int j = lane + 32 * u;
            if (j < d) acc[u] += ps[2 + j] * wgt;
        }
    }
    *total = t;
}

#ifdef NGPT_PD_WIDE
// The wide build's combine: one block per (row, head), its warps taking the splits in
// turn (each warp finds the largest partial max itself, from at most a few hundred
// floats), then their weighted sums added up in shared memory: `qs` and `kvs`, free
// between the split attention and the next entry.
__device__ void pd_combine_block(const float* part, const int* positions, float* out, int rows, int h, int cap,
                                 float (*qs)[PD_MAX_D], float (*kvs)[2][PD_MAX_D], int c, int d) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int rh = blockIdx.x; rh < rows * h; rh += gridDim.x) {
        int r = rh / h, head = rh - r * h, pos = positions[r];
        int n_tiles, splits, per;
        pd_splits(pos, cap, &n_tiles, &splits, &per);
        const float* pp = part + (long long)rh * cap * PD_PART;
        float big = PD_NEG_BIG;
        for (int s = lane; s < splits; s += 32) big = fmaxf(big, pp[s * PD_PART]);
        big = warp_max(big);
        float total, acc[PD_MAX_D / 32];
        pd_fold_partials(pp, warp, PD_WARPS, splits, big, d, lane, acc, &total);
        __syncthreads();  // the previous (row, head)'s sums are read
#pragma unroll
        for (int u = 0; u < PD_MAX_D / 32; ++u) {
            int j = lane + 32 * u;
            if (j < d) qs[warp][j] = acc[u];
        }
        if (lane == 0) kvs[warp][0][0] = total;
        __syncthreads();
        for (int j = threadIdx.x; j < d; j += PD_THREADS) {
            float a = 0.0f, z = 0.0f;
#pragma unroll
            for (int w = 0; w < PD_WARPS; ++w) {
                a += qs[w][j];
                z += kvs[w][0][0];
            }
            out[(long long)r * c + head * d + j] = a / z;
        }
    }
}
#endif

// Attention for one decode row per sequence, split across the KV length: one warp per
// (row, head, split) folds its run of 32-key tiles into a partial, then (after a grid
// barrier) one warp per (row, head) combines the partials into out. With qkv non-null,
// pos_norm is folded in: each warp computes its q from qkv (Norm(M_pos q) * q_scale), and
// the warp whose split holds key `pos` also computes k and v, writes them into the
// caches and uses its own copies for that key (no other warp reads it).
__device__ void pd_attention(const float* q_in, const float* qkv, const float* table, const float* q_scale,
                             const float* k_scale, float* k_cache, float* v_cache, const int* positions,
                             float* out, int rows, const int* slots, float* part, unsigned int* bar,
                             float (*qs)[PD_MAX_D], float (*kvs)[2][PD_MAX_D], int c, int h, int d,
                             int max_seq) {
    c = PD_C_OR(c);
    d = PD_D_OR(d);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gwarp = blockIdx.x * PD_WARPS + warp, nwarps = gridDim.x * PD_WARPS;
    const int cap = pd_split_cap(rows * h, nwarps);
    // The wide P.V's lane map: g lanes per value row, each a float4 (chunk `ch`), rows
    // `slot`, slot + 32 / g, ... of a tile.
    const bool wide_pv = pd_wide_pv(d);
    const int g = wide_pv ? d / 4 : 32, ch = lane % g, slot = lane / g;
    for (int item = gwarp; item < rows * h * cap; item += nwarps) {
        int s = item % cap, rh = item / cap;
        int r = rh / h, head = rh - r * h, b = slots[r], pos = positions[r];
        int n_tiles, splits, per;
        pd_splits(pos, cap, &n_tiles, &splits, &per);
        if (s >= splits) continue;
        int t0 = s * per, t1 = min(n_tiles, t0 + per);
        bool own = qkv != nullptr && s == (pos / 32) / per;
        long long base = ((long long)b * h + head) * max_seq * d;
        __syncwarp();
        if (qkv == nullptr) {
            for (int j = lane; j < d; j += 32) qs[warp][j] = q_in[(long long)r * c + head * d + j];
        } else {
            const float* row = qkv + (long long)r * 3 * c;
            float qv[PD_MAX_D / 32], kv[PD_MAX_D / 32], inv_q, inv_k;
            pd_pos_step(row, table + (long long)pos * d, c, d, head, lane, own, qv, kv, &inv_q, &inv_k);
            long long at = base + (long long)pos * d;
#pragma unroll
            for (int u = 0; u < PD_MAX_D / 64; ++u) {
                int j = lane + 32 * u, col = head * d + 2 * j;
                if (j < d / 2) {
                    qs[warp][2 * j] = qv[2 * u] * inv_q * __ldg(q_scale + col);
                    qs[warp][2 * j + 1] = qv[2 * u + 1] * inv_q * __ldg(q_scale + col + 1);
                    if (own) {
                        float k0 = kv[2 * u] * inv_k * __ldg(k_scale + col);
                        float k1 = kv[2 * u + 1] * inv_k * __ldg(k_scale + col + 1);
                        float v0 = row[2 * c + col], v1 = row[2 * c + col + 1];
                        kvs[warp][0][2 * j] = k0;
                        kvs[warp][0][2 * j + 1] = k1;
                        kvs[warp][1][2 * j] = v0;
                        kvs[warp][1][2 * j + 1] = v1;
                        k_cache[at + 2 * j] = k0;
                        k_cache[at + 2 * j + 1] = k1;
                        v_cache[at + 2 * j] = v0;
                        v_cache[at + 2 * j + 1] = v1;
                    }
                }
            }
        }
        __syncwarp();
        float run_max = PD_NEG_BIG, run_sum = 0.0f, acc[PD_MAX_D / 32];
#pragma unroll
        for (int u = 0; u < PD_MAX_D / 32; ++u) acc[u] = 0.0f;
        float4 acc4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int t = t0; t < t1; ++t) {
            int key = t * 32 + lane;
            bool valid = key <= pos;
            float sc = PD_NEG_BIG;
            if (valid) {
                const float* kr = (own && key == pos) ? kvs[warp][0] : k_cache + base + (long long)key * d;
                sc = 0.0f;
                if ((d & 3) == 0) {
#pragma unroll
                    for (int j = 0; j < d; j += 4) {
                        float4 k4 = *reinterpret_cast<const float4*>(kr + j);
                        sc += qs[warp][j] * k4.x + qs[warp][j + 1] * k4.y + qs[warp][j + 2] * k4.z +
                              qs[warp][j + 3] * k4.w;
                    }
                } else {
                    for (int j = 0; j < d; ++j) sc += qs[warp][j] * kr[j];
                }
            }
            float m_new = fmaxf(run_max, warp_max(sc));
            float p = valid ? expf(sc - m_new) : 0.0f;
            float corr = expf(run_max - m_new);
            run_sum = run_sum * corr + warp_sum(p);
            run_max = m_new;
            int nk = min(32, pos + 1 - t * 32);
            if (wide_pv) {
                // Lane (slot, ch) adds p[key] v[key][4 ch .. 4 ch + 4) for the tile's keys
                // slot, slot + 32 / g, ...: g iterations of one independent 16-byte load.
                acc4.x *= corr;
                acc4.y *= corr;
                acc4.z *= corr;
                acc4.w *= corr;
                const int step = 32 / g;
#pragma unroll 8
                for (int i = 0; i < g; ++i) {
                    int key2 = i * step + slot;
                    float pu = __shfl_sync(0xffffffffu, p, key2);
                    if (key2 < nk) {
                        int kk = t * 32 + key2;
                        const float* vr = (own && kk == pos) ? kvs[warp][1] : v_cache + base + (long long)kk * d;
                        float4 v4 = *reinterpret_cast<const float4*>(vr + 4 * ch);
                        acc4.x += pu * v4.x;
                        acc4.y += pu * v4.y;
                        acc4.z += pu * v4.z;
                        acc4.w += pu * v4.w;
                    }
                }
                continue;
            }
#pragma unroll
            for (int u = 0; u < PD_MAX_D / 32; ++u) acc[u] *= corr;
#pragma unroll 8
            for (int key2 = 0; key2 < nk; ++key2) {
                float pu = __shfl_sync(0xffffffffu, p, key2);
                int kk = t * 32 + key2;
                const float* vr = (own && kk == pos) ? kvs[warp][1] : v_cache + base + (long long)kk * d;
#pragma unroll
                for (int u = 0; u < PD_MAX_D / 32; ++u) {
                    int j = lane + 32 * u;
                    if (j < d) acc[u] += pu * vr[j];
                }
            }
        }
        float* pp = part + ((long long)rh * cap + s) * PD_PART;
        if (lane == 0) {
            pp[0] = run_max;
            pp[1] = run_sum;
        }
        if (wide_pv) {
            // The slots' sums of each chunk meet in the lanes of slot 0.
            for (int o = g; o < 32; o <<= 1) {
                acc4.x += __shfl_xor_sync(0xffffffffu, acc4.x, o);
                acc4.y += __shfl_xor_sync(0xffffffffu, acc4.y, o);
                acc4.z += __shfl_xor_sync(0xffffffffu, acc4.z, o);
                acc4.w += __shfl_xor_sync(0xffffffffu, acc4.w, o);
            }
            // Scalar stores: a partial is PD_PART = 130 floats, so pp + 2 is only 8-byte
            // aligned (a float4 store there faults on a GPU).
            if (slot == 0) {
                pp[2 + 4 * ch] = acc4.x;
                pp[3 + 4 * ch] = acc4.y;
                pp[4 + 4 * ch] = acc4.z;
                pp[5 + 4 * ch] = acc4.w;
            }
            continue;
        }
#pragma unroll
        for (int u = 0; u < PD_MAX_D / 32; ++u) {
            int j = lane + 32 * u;
            if (j < d) pp[2 + j] = acc[u];
        }
    }
    pd_barrier(bar);
#ifdef NGPT_PD_WIDE
    pd_combine_block(part, positions, out, rows, h, cap, qs, kvs, c, d);
#else
    // Combine: one warp per (row, head).
    for (int rh = gwarp; rh < rows * h; rh += nwarps) {
        int r = rh / h, head = rh - r * h, pos = positions[r];
        int n_tiles, splits, per;
        pd_splits(pos, cap, &n_tiles, &splits, &per);
        const float* pp = part + (long long)rh * cap * PD_PART;
        float big = PD_NEG_BIG;
#pragma unroll 4
        for (int s = 0; s < splits; ++s) big = fmaxf(big, pp[s * PD_PART]);
        float total, acc[PD_MAX_D / 32];
        pd_fold_partials(pp, 0, 1, splits, big, d, lane, acc, &total);
#pragma unroll
        for (int u = 0; u < PD_MAX_D / 32; ++u) {
            int j = lane + 32 * u;
            if (j < d) out[(long long)r * c + head * d + j] = acc[u] / total;
        }
    }
#endif
}

// Dims: c = n_embd, h = n_head, d = head_dim (even, at most PD_MAX_D), max_seq = KV capacity.
// NGPT_PD_MIN_BLOCKS (from NGPT_CUDA_PD_MIN_BLOCKS): ask the compiler for registers that
// fit that many blocks per SM (an experiment: fewer registers, maybe spills).
#ifdef NGPT_PD_MIN_BLOCKS
#define PD_BOUNDS __launch_bounds__(PD_THREADS, NGPT_PD_MIN_BLOCKS)
#else
#define PD_BOUNDS __launch_bounds__(PD_THREADS)
#endif
extern "C" __global__ void PD_BOUNDS
    decode_persistent(const PdOp* ops, int n_ops, unsigned int* bar, float* part, int c, int h, int d,
                      int max_seq, int prefetch, int slice_bytes, int ring_offset,
                      unsigned long long* timer) {
    __shared__ __align__(16) float qs[PD_WARPS][PD_MAX_D];
    __shared__ __align__(16) float kvs[PD_WARPS][2][PD_MAX_D];
    extern __shared__ __align__(16) float xs[];  // staged gemv inputs (PdInput)
    c = PD_C_OR(c);
    d = PD_D_OR(d);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gwarp = blockIdx.x * PD_WARPS + warp, nwarps = gridDim.x * PD_WARPS;
    const long long gthread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long nthreads = (long long)gridDim.x * blockDim.x;
    if (threadIdx.x == 0) pd_epoch = 0;
    __syncthreads();
    const bool timing = timer != nullptr && blockIdx.x == 0 && threadIdx.x == 0;
    if (timing) timer[0] = pd_now();
#ifdef NGPT_PD_STREAM
    char* ring = reinterpret_cast<char*>(xs) + ring_offset;
    // Slices issued and consumed so far, and the table index of the last gemv issued.
    int issued = 0, consumed = 0, last_issued = -1;
#endif
    for (int o = 0; o < n_ops; ++o) {
        const PdOp& op = ops[o];
#ifdef NGPT_PD_STREAM
        if (slice_bytes > 0) {
            // Every gemv up to the first one after this entry has its slice issued.
            int after = o + 1;
            while (after < n_ops && !pd_is_gemv(ops[after].kind)) ++after;
            for (int x = last_issued + 1; x < n_ops && x <= after; ++x) {
                if (!pd_is_gemv(ops[x].kind)) continue;
                pd_issue_slice(ops[x], ring + (issued & 1) * slice_bytes, slice_bytes);
                ++issued;
                last_issued = x;
            }
        }
        if (slice_bytes > 0 && pd_is_gemv(op.kind)) {
            // This gemv's slice is the oldest in flight; the next one may stay in flight.
            if (issued - consumed >= 2)
                pd_copy_wait1();
            else
                pd_copy_wait0();
            __syncthreads();
            const char* slice = ring + (consumed++ & 1) * slice_bytes;
            if (op.kind == PD_GEMV_BF16)
                pd_gemv_stream<unsigned short>(op, xs, c, slice, slice_bytes, warp, lane);
            else if (op.kind == PD_GEMV_I8)
                pd_qgemv_stream<8>(op, xs, c, slice, slice_bytes, warp, lane);
            else if (op.kind == PD_GEMV_I4)
                pd_qgemv_stream<4>(op, xs, c, slice, slice_bytes, warp, lane);
            else
                pd_gemv_stream<float>(op, xs, c, slice, slice_bytes, warp, lane);
        } else
#endif
        switch (op.kind) {
        case PD_EMBED: {  // tokens, wte, out; rows
            const int* tokens = reinterpret_cast<const int*>(op.p[0]);
            const float* wte = reinterpret_cast<const float*>(op.p[1]);
            float* out = reinterpret_cast<float*>(op.p[2]);
            long long n = (long long)op.i[0] * c;
            for (long long e = gthread; e < n; e += nthreads) {
                long long r = e / c;
                out[e] = wte[(long long)tokens[r] * c + (e - r * c)];
            }
            break;
        }
        case PD_NORM_ROWS: {  // x, out; rows
            const float* x = reinterpret_cast<const float*>(op.p[0]);
            float* out = reinterpret_cast<float*>(op.p[1]);
            for (int r = blockIdx.x; r < op.i[0]; r += gridDim.x) {
                const float* row = x + (long long)r * c;
                float ss = 0.0f;
                for (int j = threadIdx.x; j < c; j += blockDim.x) ss += row[j] * row[j];
                float inv = rsqrtf(pd_block_sum(ss));
                for (int j = threadIdx.x; j < c; j += blockDim.x) out[(long long)r * c + j] = row[j] * inv;
            }
            break;
        }
        case PD_LERP_NORM: {  // h (in place), branch, lr; rows
            float* hh = reinterpret_cast<float*>(op.p[0]);
            const float* branch = reinterpret_cast<const float*>(op.p[1]);
            const float* lr = reinterpret_cast<const float*>(op.p[2]);
            for (int r = blockIdx.x; r < op.i[0]; r += gridDim.x) {
                float* hr = hh + (long long)r * c;
                const float* br = branch + (long long)r * c;
                float ss = 0.0f;
                for (int j = threadIdx.x; j < c; j += blockDim.x) ss += br[j] * br[j];
                float inv_b = rsqrtf(pd_block_sum(ss));
                float ss2 = 0.0f;
                for (int j = threadIdx.x; j < c; j += blockDim.x) {
                    float m = hr[j] + __ldg(lr + j) * (br[j] * inv_b - hr[j]);
                    ss2 += m * m;
                }
                float inv_m = rsqrtf(pd_block_sum(ss2));
                for (int j = threadIdx.x; j < c; j += blockDim.x) {
                    float m = hr[j] + __ldg(lr + j) * (br[j] * inv_b - hr[j]);
                    hr[j] = m * inv_m;
                }
            }
            break;
        }
        case PD_SWIGLU: {  // fc, out; rows
            const float* fc = reinterpret_cast<const float*>(op.p[0]);
            float* out = reinterpret_cast<float*>(op.p[1]);
            long long w4 = 4LL * c, n = op.i[0] * w4;
            for (long long e = gthread; e < n; e += nthreads) {
                long long r = e / w4, j = e - r * w4;
                float v = fc[r * 2 * w4 + w4 + j];
                out[e] = fc[r * 2 * w4 + j] * (v / (1.0f + expf(-v)));
            }
            break;
        }
        case PD_POS_NORM: {  // qkv, positions, table, q_scale, k_scale, q_out, k_cache, v_cache, slots; rows
            const float* qkv = reinterpret_cast<const float*>(op.p[0]);
            const int* positions = reinterpret_cast<const int*>(op.p[1]);
            const float* table = reinterpret_cast<const float*>(op.p[2]);
            const float* q_scale = reinterpret_cast<const float*>(op.p[3]);
            const float* k_scale = reinterpret_cast<const float*>(op.p[4]);
            float* q_out = reinterpret_cast<float*>(op.p[5]);
            float* k_cache = reinterpret_cast<float*>(op.p[6]);
            float* v_cache = reinterpret_cast<float*>(op.p[7]);
            const int* slots = reinterpret_cast<const int*>(op.p[8]);
            int half = d / 2;
            for (int item = gwarp; item < op.i[0] * h; item += nwarps) {
                int r = item / h, head = item - r * h;
                int b = slots[r], pos = positions[r];
                const float* row = qkv + (long long)r * 3 * c;
                long long cache = (((long long)b * h + head) * max_seq + pos) * d;
                float q[PD_MAX_D / 32], k[PD_MAX_D / 32], inv_q, inv_k;
                pd_pos_step(row, table + (long long)pos * d, c, d, head, lane, true, q, k, &inv_q, &inv_k);
#pragma unroll
                for (int u = 0; u < PD_MAX_D / 64; ++u) {
                    int j = lane + 32 * u, col = head * d + 2 * j;
                    if (j < half) {
                        q_out[(long long)r * c + col] = q[2 * u] * inv_q * __ldg(q_scale + col);
                        q_out[(long long)r * c + col + 1] = q[2 * u + 1] * inv_q * __ldg(q_scale + col + 1);
                        k_cache[cache + 2 * j] = k[2 * u] * inv_k * __ldg(k_scale + col);
                        k_cache[cache + 2 * j + 1] = k[2 * u + 1] * inv_k * __ldg(k_scale + col + 1);
                        v_cache[cache + 2 * j] = row[2 * c + col];
                        v_cache[cache + 2 * j + 1] = row[2 * c + col + 1];
                    }
                }
            }
            break;
        }
        case PD_ATTENTION:  // q, k_cache, v_cache, positions, out, slots; rows
            pd_attention(reinterpret_cast<const float*>(op.p[0]), nullptr, nullptr, nullptr, nullptr,
                         reinterpret_cast<float*>(op.p[1]), reinterpret_cast<float*>(op.p[2]),
                         reinterpret_cast<const int*>(op.p[3]), reinterpret_cast<float*>(op.p[4]), op.i[0],
                         reinterpret_cast<const int*>(op.p[5]), part, bar, qs, kvs, c, h, d, max_seq);
            break;
        case PD_POS_ATTENTION:  // qkv, positions, table, q_scale, k_scale, k_cache, v_cache, out, slots; rows
            pd_attention(nullptr, reinterpret_cast<const float*>(op.p[0]), reinterpret_cast<const float*>(op.p[2]),
                         reinterpret_cast<const float*>(op.p[3]), reinterpret_cast<const float*>(op.p[4]),
                         reinterpret_cast<float*>(op.p[5]), reinterpret_cast<float*>(op.p[6]),
                         reinterpret_cast<const int*>(op.p[1]), reinterpret_cast<float*>(op.p[7]), op.i[0],
                         reinterpret_cast<const int*>(op.p[8]), part, bar, qs, kvs, c, h, d, max_seq);
            break;
        case PD_GEMV_BF16: pd_gemv<unsigned short>(op, xs, c, gwarp, nwarps, lane); break;
        case PD_GEMV_F32: pd_gemv<float>(op, xs, c, gwarp, nwarps, lane); break;
        case PD_GEMV_I8: pd_qgemv<8>(op, xs, c, gwarp, nwarps, lane); break;
        case PD_GEMV_I4: pd_qgemv<4>(op, xs, c, gwarp, nwarps, lane); break;
        default: break;
        }
        if (o + 1 < n_ops) {
            if (prefetch) pd_prefetch_next(ops, o, n_ops, gwarp, nwarps, lane);
            pd_barrier(bar);
        }
        // With `timer` (profiling), the end of each entry, barrier included: timer[o + 1].
        if (timing) timer[o + 1] = pd_now();
    }
}

// attention_prefill_mma: causal attention for prefill on the tensor cores, for plans with
// bf16 weights (their tolerance; f32 plans keep attention_prefill's f32 arithmetic). The
// plan's attention_prefill launch as it is: grid (rows, H), 128 threads, the same
// arguments; the block whose row starts a tile of at most AM_QT rows does the tile, the
// others return (the rule of ngpt.cu's attention_prefill: a run of rows of one slot at
// consecutive positions, cut where a position is a multiple of AM_QT). Each of the 4 warps owns 16 query rows. Keys 0..=max
// position of the tile are staged AM_KT at a time in shared memory as bf16 (K as rows,
// V transposed, zeros past the last key), then per warp: S = Q K^T and O += P V with
// mma.sync m16n8k16 (bf16 in, f32 accumulate), online softmax per row in f32, each row
// masked at its own position. Fragment layouts: PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type" (g = lane / 4, tg = lane % 4; A: rows g and
// g + 8, columns 2 tg, 2 tg + 1 and + 8; B: rows 2 tg, 2 tg + 1 and + 8, column g; C: rows
// g and g + 8, columns 2 tg, 2 tg + 1). The S accumulators of two adjacent 8-key tiles are
// the A fragment of P for those 16 keys, so P never leaves registers.
// The executor appends the KV capacity `max_seq` to the plan's arguments. Needs NGPT_PD_C
// and NGPT_PD_D (a multiple of 16, at most 128); sm_80+.
#if defined(NGPT_PD_C) && defined(NGPT_PD_D) && NGPT_PD_D % 16 == 0 && NGPT_PD_D <= 128
#define AM_QT 64
#define AM_KT 64
#define AM_D NGPT_PD_D
#define AM_H (NGPT_PD_C / NGPT_PD_D)
// Row strides (bf16 elements) of the staged tiles: (stride / 2) % 8 == 4 spreads the 32
// lanes of a fragment load over the 32 banks.
#define AM_KS (AM_D + 8)
#define AM_VS (AM_KT + 8)

// Two floats as bf16x2, round to nearest even: lo in the low half (the lower index).
__device__ __forceinline__ unsigned int am_pack(float lo, float hi) {
    return (unsigned int)bf16_bits(lo) | ((unsigned int)bf16_bits(hi) << 16);
}

// d += a b for one m16n8k16 tile (bf16 inputs, f32 accumulators). A host test
// (runtime/tests/host_emulation.rs) runs this kernel on the CPU with its own am_mma.
#ifndef NGPT_HOST_MMA
__device__ __forceinline__ void am_mma(float* d, const unsigned int* a, unsigned int b0, unsigned int b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}
#endif

// Whether row r continues row r - 1's tile of AM_QT rows (ngpt.cu's ngpt_tile_continues).
__device__ __forceinline__ bool am_continues(const int* slots, const int* positions, int r) {
    return r > 0 && slots[r - 1] == slots[r] && positions[r - 1] == positions[r] - 1 && positions[r] % AM_QT != 0;
}

extern "C" __global__ void __launch_bounds__(128)
    attention_prefill_mma(const float* q, const float* k_cache, const float* v_cache, const int* positions,
                          float* out, int rows, const int* slots, int max_seq) {
    __shared__ __align__(16) unsigned short ks[AM_KT * AM_KS];  // [key][dim]
    __shared__ __align__(16) unsigned short vt[AM_D * AM_VS];   // [dim][key]
    __shared__ int row_pos[AM_QT];
    int r = blockIdx.x, head = blockIdx.y, t = threadIdx.x;
    if (r >= rows || am_continues(slots, positions, r)) return;
    int b = slots[r], nq = 1;
    while (nq < AM_QT && r + nq < rows && am_continues(slots, positions, r + nq)) ++nq;
    int lane = t & 31, warp = t >> 5, g = lane >> 2, tg = lane & 3;
    long long base = ((long long)b * AM_H + head) * max_seq * AM_D;
    if (t < AM_QT) row_pos[t] = t < nq ? positions[r + t] : -1;
    __syncthreads();
    int max_pos = -1, warp_max = -1;
    for (int i = 0; i < nq; ++i) max_pos = max(max_pos, row_pos[i]);
    for (int i = 16 * warp; i < 16 * warp + 16; ++i) warp_max = max(warp_max, row_pos[i]);
    // This thread's two rows of the warp's sixteen.
    int i0 = 16 * warp + g, i1 = i0 + 8;
    int pos0 = row_pos[i0], pos1 = row_pos[i1];
    // Q as A fragments, one per 16 dims (rows past the tile's end are zeros).
    unsigned int qa[AM_D / 16][4];
    {
        const float* q0 = q + (long long)(r + i0) * NGPT_PD_C + head * AM_D + 2 * tg;
        const float* q1 = q + (long long)(r + i1) * NGPT_PD_C + head * AM_D + 2 * tg;
        float2 zero = make_float2(0.0f, 0.0f);
#pragma unroll
        for (int kc = 0; kc < AM_D / 16; ++kc) {
            float2 a = i0 < nq ? *reinterpret_cast<const float2*>(q0 + 16 * kc) : zero;
            float2 c = i0 < nq ? *reinterpret_cast<const float2*>(q0 + 16 * kc + 8) : zero;
            float2 bq = i1 < nq ? *reinterpret_cast<const float2*>(q1 + 16 * kc) : zero;
            float2 dq = i1 < nq ? *reinterpret_cast<const float2*>(q1 + 16 * kc + 8) : zero;
            qa[kc][0] = am_pack(a.x, a.y);
            qa[kc][1] = am_pack(bq.x, bq.y);
            qa[kc][2] = am_pack(c.x, c.y);
            qa[kc][3] = am_pack(dq.x, dq.y);
        }
    }
    float o[AM_D / 8][4];
#pragma unroll
    for (int dn = 0; dn < AM_D / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
    // Running maximum and (this thread's part of the) sum of each of the two rows.
    float m0 = PD_NEG_BIG, m1 = PD_NEG_BIG, l0 = 0.0f, l1 = 0.0f;
    for (int start = 0; start <= max_pos; start += AM_KT) {
        int n = min(AM_KT, max_pos + 1 - start);
        __syncthreads();  // every warp is done with the previous tile
        {
            const float4* k4 = reinterpret_cast<const float4*>(k_cache + base + (long long)start * AM_D);
            const float4* v4 = reinterpret_cast<const float4*>(v_cache + base + (long long)start * AM_D);
            float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
            for (int e = t; e < AM_KT * (AM_D / 4); e += 128) {
                int key = e / (AM_D / 4), d = 4 * (e - key * (AM_D / 4));
                float4 kv = key < n ? k4[e] : zero;
                float4 vv = key < n ? v4[e] : zero;
                *reinterpret_cast<uint2*>(ks + key * AM_KS + d) = make_uint2(am_pack(kv.x, kv.y), am_pack(kv.z, kv.w));
                vt[(d + 0) * AM_VS + key] = bf16_bits(vv.x);
                vt[(d + 1) * AM_VS + key] = bf16_bits(vv.y);
                vt[(d + 2) * AM_VS + key] = bf16_bits(vv.z);
                vt[(d + 3) * AM_VS + key] = bf16_bits(vv.w);
            }
        }
        __syncthreads();
        if (start > warp_max) continue;  // every key of the tile is after this warp's rows
        // S = Q K^T for the warp's 16 rows and the tile's 64 keys: 8 tiles of 8 keys.
        float s[AM_KT / 8][4];
#pragma unroll
        for (int j = 0; j < AM_KT / 8; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
            const unsigned short* kr = ks + (8 * j + g) * AM_KS + 2 * tg;
#pragma unroll
            for (int kc = 0; kc < AM_D / 16; ++kc) {
                unsigned int b0 = *reinterpret_cast<const unsigned int*>(kr + 16 * kc);
                unsigned int b1 = *reinterpret_cast<const unsigned int*>(kr + 16 * kc + 8);
                am_mma(s[j], qa[kc], b0, b1);
            }
        }
        // Online softmax: the tile's maximum of each row over its 4 threads, then
        // p = exp(s - max), zero where the key is after the row's position.
        float mx0 = PD_NEG_BIG, mx1 = PD_NEG_BIG;
#pragma unroll
        for (int j = 0; j < AM_KT / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                int key = start + 8 * j + 2 * tg + e;
                if (key <= pos0) mx0 = fmaxf(mx0, s[j][e]);
                if (key <= pos1) mx1 = fmaxf(mx1, s[j][2 + e]);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        float c0 = expf(m0 - n0), c1 = expf(m1 - n1);
        m0 = n0;
        m1 = n1;
        l0 *= c0;
        l1 *= c1;
#pragma unroll
        for (int j = 0; j < AM_KT / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                int key = start + 8 * j + 2 * tg + e;
                float p0 = key <= pos0 ? expf(s[j][e] - n0) : 0.0f;
                float p1 = key <= pos1 ? expf(s[j][2 + e] - n1) : 0.0f;
                s[j][e] = p0;
                s[j][2 + e] = p1;
                l0 += p0;
                l1 += p1;
            }
        }
#pragma unroll
        for (int dn = 0; dn < AM_D / 8; ++dn) {
            o[dn][0] *= c0;
            o[dn][1] *= c0;
            o[dn][2] *= c1;
            o[dn][3] *= c1;
        }
        // O += P V, 16 keys at a time: P's A fragment is the S tiles 2 kk and 2 kk + 1.
#pragma unroll
        for (int kk = 0; kk < AM_KT / 16; ++kk) {
            unsigned int pa[4] = {am_pack(s[2 * kk][0], s[2 * kk][1]), am_pack(s[2 * kk][2], s[2 * kk][3]),
                                  am_pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  am_pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            const unsigned short* vr = vt + g * AM_VS + 16 * kk + 2 * tg;
#pragma unroll
            for (int dn = 0; dn < AM_D / 8; ++dn) {
                unsigned int b0 = *reinterpret_cast<const unsigned int*>(vr + 8 * dn * AM_VS);
                unsigned int b1 = *reinterpret_cast<const unsigned int*>(vr + 8 * dn * AM_VS + 8);
                am_mma(o[dn], pa, b0, b1);
            }
        }
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    float* out0 = out + (long long)(r + i0) * NGPT_PD_C + head * AM_D + 2 * tg;
    float* out1 = out + (long long)(r + i1) * NGPT_PD_C + head * AM_D + 2 * tg;
#pragma unroll
    for (int dn = 0; dn < AM_D / 8; ++dn) {
        if (i0 < nq) {
            out0[8 * dn] = o[dn][0] / l0;
            out0[8 * dn + 1] = o[dn][1] / l0;
        }
        if (i1 < nq) {
            out1[8 * dn] = o[dn][2] / l1;
            out1[8 * dn + 1] = o[dn][3] / l1;
        }
    }
}
#endif
