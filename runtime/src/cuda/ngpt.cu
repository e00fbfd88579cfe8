// ngpt kernels: the launch steps of a plan, besides the cuBLAS GEMMs.
//
// Specialized by a generated prelude that defines NGPT_C (n_embd), NGPT_H (n_head),
// NGPT_D (head_dim), NGPT_V (vocab), NGPT_MAX_SEQ (KV capacity), NGPT_KV_TILE and NGPT_I
// (the MLP's hidden width).
// Activations are f32 row-major [rows, width]; the KV cache is [slots, H, MAX_SEQ, D].
// Row r belongs to KV-cache slot slots[r] and sits at absolute position positions[r] there
// (kernel ABI 3; the executors check every slot and position, and that no two rows of a
// call share a (slot, position), before anything runs).
// Every entry has a Rust twin in runtime/src/cpu/kernels.rs with the same semantics, and a
// contract (argument slots, lengths, launch shapes) in runtime/src/contract.rs. Plans name
// these entries; the runtime compiles this file itself (a plan carries no code).

#define NGPT_P (NGPT_D / 2)
// Threads per block, and keys per tile, of attention_decode.
#define NGPT_DEC_TILE 128

// The lowest finite float: the running maximum before any key, and masked scores.
#define NGPT_NEG_BIG (-3.402823466e38f)

template <bool MAX>
__device__ __forceinline__ float block_combine(float a, float b) { return MAX ? fmaxf(a, b) : a + b; }

// Sum (MAX false) or maximum (MAX true) of v over the block (blockDim.x a multiple of 32,
// at most 1024): within each warp by shuffles, then across the warps' results.
template <bool MAX>
__device__ float block_reduce(float v) {
    __shared__ float warp_parts[32];
    for (int o = 16; o > 0; o >>= 1) v = block_combine<MAX>(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) warp_parts[warp] = v;
    __syncthreads();
    int n_warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < n_warps) ? warp_parts[threadIdx.x] : (MAX ? NGPT_NEG_BIG : 0.0f);
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v = block_combine<MAX>(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) warp_parts[0] = v;
    }
    __syncthreads();
    float total = warp_parts[0];
    __syncthreads();
    return total;
}

__device__ float block_sum(float v) { return block_reduce<false>(v); }
__device__ float block_max(float v) { return block_reduce<true>(v); }

// out[r, :] = wte[tokens[r], :]. Grid: rows.
extern "C" __global__ void embed(const int* tokens, const float* wte, float* out, int rows) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* src = wte + (long long)tokens[r] * NGPT_C;
    for (int c = threadIdx.x; c < NGPT_C; c += blockDim.x) out[(long long)r * NGPT_C + c] = src[c];
}

// out[r, :] = x[r, :] / ||x[r, :]||. Grid: rows.
extern "C" __global__ void norm_rows(const float* x, float* out, int rows) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* row = x + (long long)r * NGPT_C;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < NGPT_C; c += blockDim.x) ss += row[c] * row[c];
    float inv = rsqrtf(block_sum(ss));
    for (int c = threadIdx.x; c < NGPT_C; c += blockDim.x) out[(long long)r * NGPT_C + c] = row[c] * inv;
}

// h[r] = Norm(h[r] + lr * (Norm(branch[r]) - h[r])), in place. Grid: rows.
extern "C" __global__ void lerp_norm(float* h, const float* branch, const float* lr, int rows) {
    int r = blockIdx.x;
    if (r >= rows) return;
    float* hr = h + (long long)r * NGPT_C;
    const float* br = branch + (long long)r * NGPT_C;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < NGPT_C; c += blockDim.x) ss += br[c] * br[c];
    float inv_b = rsqrtf(block_sum(ss));
    float ss2 = 0.0f;
    for (int c = threadIdx.x; c < NGPT_C; c += blockDim.x) {
        float m = hr[c] + lr[c] * (br[c] * inv_b - hr[c]);
        ss2 += m * m;
    }
    float inv_m = rsqrtf(block_sum(ss2));
    for (int c = threadIdx.x; c < NGPT_C; c += blockDim.x) {
        float m = hr[c] + lr[c] * (br[c] * inv_b - hr[c]);
        hr[c] = m * inv_m;
    }
}

// out[r, j] = u * SiLU(v) with u = fc[r, j], v = fc[r, 4C + j]. Grid: rows.
extern "C" __global__ void swiglu(const float* fc, float* out, int rows) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* row = fc + (long long)r * 8 * NGPT_C;
    for (int j = threadIdx.x; j < 4 * NGPT_C; j += blockDim.x) {
        float v = row[4 * NGPT_C + j];
        out[(long long)r * 4 * NGPT_C + j] = row[j] * (v / (1.0f + expf(-v)));
    }
}

// Per (row, head): q = Norm(M_pos * q) * q_scale into q_out; k = Norm(M_pos * k) * k_scale
// and v written into the caches at the row's (slot, position). qkv is [rows, 3C].
// Grid: (rows, H); block: at least P threads, a multiple of 32.
extern "C" __global__ void pos_norm(const float* qkv, const int* positions, const float* table,
                                    const float* q_scale, const float* k_scale, float* q_out,
                                    float* k_cache, float* v_cache, int rows, const int* slots) {
    int r = blockIdx.x, head = blockIdx.y;
    if (r >= rows) return;
    int b = slots[r], pos = positions[r];
    const float* row = qkv + (long long)r * 3 * NGPT_C;
    const float* m = table + (long long)pos * NGPT_D;
    long long cache = (((long long)b * NGPT_H + head) * NGPT_MAX_SEQ + pos) * NGPT_D;
    float q0 = 0, q1 = 0, k0 = 0, k1 = 0;
    int j = threadIdx.x;
    int c = head * NGPT_D + 2 * j;
    if (j < NGPT_P) {
        q0 = row[c] * m[2 * j];
        q1 = row[c + 1] * m[2 * j + 1];
        k0 = row[NGPT_C + c] * m[2 * j];
        k1 = row[NGPT_C + c + 1] * m[2 * j + 1];
    }
    float inv_q = rsqrtf(block_sum(q0 * q0 + q1 * q1));
    float inv_k = rsqrtf(block_sum(k0 * k0 + k1 * k1));
    if (j < NGPT_P) {
        q_out[(long long)r * NGPT_C + c] = q0 * inv_q * q_scale[c];
        q_out[(long long)r * NGPT_C + c + 1] = q1 * inv_q * q_scale[c + 1];
        k_cache[cache + 2 * j] = k0 * inv_k * k_scale[c];
        k_cache[cache + 2 * j + 1] = k1 * inv_k * k_scale[c + 1];
        v_cache[cache + 2 * j] = row[2 * NGPT_C + c];
        v_cache[cache + 2 * j + 1] = row[2 * NGPT_C + c + 1];
    }
}

// The Hugging Face (NousResearch) family's entries. NGPT_I is the MLP's hidden width (the
// prelude defines it for every plan; 4 * NGPT_C for NVIDIA's, whose entries do not read it).

// out[r, :] = wte[tokens[r], :] + wpe[positions[r], :] (learned positions). Grid: rows.
extern "C" __global__ void embed_pos(const int* tokens, const int* positions, const float* wte,
                                     const float* wpe, float* out, int rows) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* t = wte + (long long)tokens[r] * NGPT_C;
    const float* p = wpe + (long long)positions[r] * NGPT_C;
    for (int c = threadIdx.x; c < NGPT_C; c += blockDim.x) out[(long long)r * NGPT_C + c] = t[c] + p[c];
}

// lerp_norm with the branch's GEMM bias added first:
// h[r] = Norm(h[r] + lr * (Norm(branch[r] + bias) - h[r])), in place. Grid: rows.
extern "C" __global__ void lerp_norm_bias(float* h, const float* branch, const float* bias,
                                          const float* lr, int rows) {
    int r = blockIdx.x;
    if (r >= rows) return;
    float* hr = h + (long long)r * NGPT_C;
    const float* br = branch + (long long)r * NGPT_C;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < NGPT_C; c += blockDim.x) {
        float b = br[c] + bias[c];
        ss += b * b;
    }
    float inv_b = rsqrtf(block_sum(ss));
    float ss2 = 0.0f;
    for (int c = threadIdx.x; c < NGPT_C; c += blockDim.x) {
        float m = hr[c] + lr[c] * ((br[c] + bias[c]) * inv_b - hr[c]);
        ss2 += m * m;
    }
    float inv_m = rsqrtf(block_sum(ss2));
    for (int c = threadIdx.x; c < NGPT_C; c += blockDim.x) {
        float m = hr[c] + lr[c] * ((br[c] + bias[c]) * inv_b - hr[c]);
        hr[c] = m * inv_m;
    }
}

// out[r, j] = u * SiLU(v) with u = uv[r, j] + bias[j], v = uv[r, I + j] + bias[I + j];
// uv is [rows, 2I], out [rows, I]. Grid: rows.
extern "C" __global__ void swiglu_bias(const float* uv, const float* bias, float* out, int rows) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* row = uv + (long long)r * 2 * NGPT_I;
    for (int j = threadIdx.x; j < NGPT_I; j += blockDim.x) {
        float u = row[j] + bias[j];
        float v = row[NGPT_I + j] + bias[NGPT_I + j];
        out[(long long)r * NGPT_I + j] = u * (v / (1.0f + expf(-v)));
    }
}

// Per (row, head): q = Norm(Rot(q + b_q)) * q_scale into q_out; k = Norm(Rot(k + b_k)) and
// v + b_v written into the caches at the row's (slot, position). Rot turns each interleaved
// pair (a, b) to (a cos - b sin, b cos + a sin), cos = table[pos, 2j], sin = table[pos, 2j+1].
// qkv is [rows, 3C], bias [3C]. Grid: (rows, H); block: at least P threads, a multiple of 32.
extern "C" __global__ void rotary_norm(const float* qkv, const int* positions, const float* table,
                                       const float* bias, const float* q_scale, float* q_out,
                                       float* k_cache, float* v_cache, int rows, const int* slots) {
    int r = blockIdx.x, head = blockIdx.y;
    if (r >= rows) return;
    int b = slots[r], pos = positions[r];
    const float* row = qkv + (long long)r * 3 * NGPT_C;
    const float* m = table + (long long)pos * NGPT_D;
    long long cache = (((long long)b * NGPT_H + head) * NGPT_MAX_SEQ + pos) * NGPT_D;
    float q0 = 0, q1 = 0, k0 = 0, k1 = 0;
    int j = threadIdx.x;
    int c = head * NGPT_D + 2 * j;
    if (j < NGPT_P) {
        float cs = m[2 * j], sn = m[2 * j + 1];
        float a = row[c] + bias[c], e = row[c + 1] + bias[c + 1];
        q0 = a * cs - e * sn;
        q1 = e * cs + a * sn;
        a = row[NGPT_C + c] + bias[NGPT_C + c];
        e = row[NGPT_C + c + 1] + bias[NGPT_C + c + 1];
        k0 = a * cs - e * sn;
        k1 = e * cs + a * sn;
    }
    float inv_q = rsqrtf(block_sum(q0 * q0 + q1 * q1));
    float inv_k = rsqrtf(block_sum(k0 * k0 + k1 * k1));
    if (j < NGPT_P) {
        q_out[(long long)r * NGPT_C + c] = q0 * inv_q * q_scale[c];
        q_out[(long long)r * NGPT_C + c + 1] = q1 * inv_q * q_scale[c + 1];
        k_cache[cache + 2 * j] = k0 * inv_k;
        k_cache[cache + 2 * j + 1] = k1 * inv_k;
        v_cache[cache + 2 * j] = row[2 * NGPT_C + c] + bias[2 * NGPT_C + c];
        v_cache[cache + 2 * j + 1] = row[2 * NGPT_C + c + 1] + bias[2 * NGPT_C + c + 1];
    }
}

// The first attention kernels, kept as the fallback for head_dim > 128 and as
// `NGPT_CUDA_ATTENTION=simple`: a reference on the GPU for the tiled ones below.
//
// Causal attention for prefill, one block per (query row, head): keys 0..=pos of the
// row's slot, in tiles of NGPT_KV_TILE staged in shared memory, online softmax.
// Softmax scale 1 (folded into q). Grid: (rows, H); block: 128.
__device__ void attention_prefill_simple_body(const float* q, const float* k_cache, const float* v_cache,
                                             const int* positions, float* out, int rows, const int* slots) {
    extern __shared__ __align__(16) float tile[];  // [2][NGPT_KV_TILE][NGPT_D]
    __shared__ float scores[NGPT_KV_TILE];
    int r = blockIdx.x, head = blockIdx.y;
    if (r >= rows) return;
    int b = slots[r], pos = positions[r];
    const float* qr = q + (long long)r * NGPT_C + head * NGPT_D;
    long long base = ((long long)b * NGPT_H + head) * NGPT_MAX_SEQ * NGPT_D;
    float* kt = tile;
    float* vt = tile + NGPT_KV_TILE * NGPT_D;
    float run_max = NGPT_NEG_BIG, run_sum = 0.0f;
    // Each thread owns output dims d = threadIdx.x, threadIdx.x + blockDim.x, ...
    float acc[(NGPT_D + 127) / 128];
    for (int i = 0; i < (NGPT_D + 127) / 128; ++i) acc[i] = 0.0f;
    for (int start = 0; start <= pos; start += NGPT_KV_TILE) {
        int n = min(NGPT_KV_TILE, pos + 1 - start);
        for (int e = threadIdx.x; e < n * NGPT_D; e += blockDim.x) {
            kt[e] = k_cache[base + (long long)start * NGPT_D + e];
            vt[e] = v_cache[base + (long long)start * NGPT_D + e];
        }
        __syncthreads();
        for (int u = threadIdx.x; u < n; u += blockDim.x) {
            float s = 0.0f;
            for (int d = 0; d < NGPT_D; ++d) s += qr[d] * kt[u * NGPT_D + d];
            scores[u] = s;
        }
        __syncthreads();
        float tile_max = run_max;
        for (int u = 0; u < n; ++u) tile_max = fmaxf(tile_max, scores[u]);
        float correction = expf(run_max - tile_max);
        run_sum *= correction;
        for (int i = 0; i < (NGPT_D + 127) / 128; ++i) acc[i] *= correction;
        for (int u = 0; u < n; ++u) {
            float p = expf(scores[u] - tile_max);
            run_sum += p;
            for (int i = 0, d = threadIdx.x; d < NGPT_D; ++i, d += blockDim.x) acc[i] += p * vt[u * NGPT_D + d];
        }
        run_max = tile_max;
        __syncthreads();
    }
    for (int i = 0, d = threadIdx.x; d < NGPT_D; ++i, d += blockDim.x)
        out[(long long)r * NGPT_C + head * NGPT_D + d] = acc[i] / run_sum;
}

// Causal attention for decode, one block per (row, head), split across the KV length:
// keys 0..=pos are scored 128 at a time, one key per thread, then every thread folds the
// tile into its own output dims with an online softmax. Grid: (rows, H); block: 128.
__device__ void attention_decode_simple_body(const float* q, const float* k_cache, const float* v_cache,
                                            const int* positions, float* out, int rows, const int* slots) {
    __shared__ float scores[NGPT_DEC_TILE];
    __shared__ float red[NGPT_DEC_TILE];
    int r = blockIdx.x, head = blockIdx.y, t = threadIdx.x;
    if (r >= rows) return;
    int b = slots[r], pos = positions[r];
    const float* qr = q + (long long)r * NGPT_C + head * NGPT_D;
    long long base = ((long long)b * NGPT_H + head) * NGPT_MAX_SEQ * NGPT_D;
    float run_max = NGPT_NEG_BIG, run_sum = 0.0f;
    float acc[(NGPT_D + NGPT_DEC_TILE - 1) / NGPT_DEC_TILE];
    for (int i = 0; i < (NGPT_D + NGPT_DEC_TILE - 1) / NGPT_DEC_TILE; ++i) acc[i] = 0.0f;
    for (int start = 0; start <= pos; start += NGPT_DEC_TILE) {
        int n = min(NGPT_DEC_TILE, pos + 1 - start);
        float s = NGPT_NEG_BIG;
        if (t < n) {
            s = 0.0f;
            const float* kr = k_cache + base + (long long)(start + t) * NGPT_D;
            for (int d = 0; d < NGPT_D; ++d) s += qr[d] * kr[d];
            scores[t] = s;
        }
        red[t] = s;
        __syncthreads();
        for (int w = blockDim.x / 2; w > 0; w >>= 1) {
            if (t < w) red[t] = fmaxf(red[t], red[t + w]);
            __syncthreads();
        }
        float tile_max = fmaxf(run_max, red[0]);
        float correction = expf(run_max - tile_max);
        run_sum *= correction;
        for (int i = 0; i < (NGPT_D + NGPT_DEC_TILE - 1) / NGPT_DEC_TILE; ++i) acc[i] *= correction;
        for (int u = 0; u < n; ++u) {
            float p = expf(scores[u] - tile_max);
            run_sum += p;
            const float* vr = v_cache + base + (long long)(start + u) * NGPT_D;
            for (int i = 0, d = t; d < NGPT_D; ++i, d += blockDim.x) acc[i] += p * vr[d];
        }
        run_max = tile_max;
        __syncthreads();
    }
    for (int i = 0, d = t; d < NGPT_D; ++i, d += blockDim.x)
        out[(long long)r * NGPT_C + head * NGPT_D + d] = acc[i] / run_sum;
}


#define NGPT_ATT_ARGS const float* q, const float* k_cache, const float* v_cache, const int* positions, float* out, int rows, const int* slots
#define NGPT_ATT_PASS q, k_cache, v_cache, positions, out, rows, slots

extern "C" __global__ void attention_prefill_simple(NGPT_ATT_ARGS) { attention_prefill_simple_body(NGPT_ATT_PASS); }
extern "C" __global__ void attention_decode_simple(NGPT_ATT_ARGS) { attention_decode_simple_body(NGPT_ATT_PASS); }

#if NGPT_D <= 128
// q . k for one cached key row (16-byte loads where D allows), q in shared memory.
__device__ __forceinline__ float dot_key(const float* qs, const float* kr) {
    float s = 0.0f;
#if NGPT_D % 4 == 0
    const float4* k4 = reinterpret_cast<const float4*>(kr);
#pragma unroll
    for (int d = 0; d < NGPT_D / 4; ++d) {
        float4 kv = k4[d];
        s += qs[4 * d] * kv.x + qs[4 * d + 1] * kv.y + qs[4 * d + 2] * kv.z + qs[4 * d + 3] * kv.w;
    }
#else
    for (int d = 0; d < NGPT_D; ++d) s += qs[d] * kr[d];
#endif
    return s;
}

// Causal attention for decode, one block of 128 threads per (row, head): keys 0..=pos in
// tiles of 128, one key per thread for the scores (online softmax across tiles), then each
// warp folds its 32 keys of the tile into the output dims (lanes over dims, coalesced
// rows of v); the four warps' sums are added at the end. Grid: (rows, H); block: 128.
#define NGPT_DEC_DW ((NGPT_D + 31) / 32)
extern "C" __global__ void attention_decode(NGPT_ATT_ARGS) {
    __shared__ float qs[NGPT_D];
    __shared__ float ps[NGPT_DEC_TILE];
    __shared__ float part[NGPT_DEC_TILE / 32][NGPT_D];
    int r = blockIdx.x, head = blockIdx.y, t = threadIdx.x, lane = t & 31, warp = t >> 5;
    if (r >= rows) return;
    int b = slots[r], pos = positions[r];
    long long base = ((long long)b * NGPT_H + head) * NGPT_MAX_SEQ * NGPT_D;
    if (t < NGPT_D) qs[t] = q[(long long)r * NGPT_C + head * NGPT_D + t];
    __syncthreads();
    float run_max = NGPT_NEG_BIG, run_sum = 0.0f;
    float acc[NGPT_DEC_DW];
#pragma unroll
    for (int i = 0; i < NGPT_DEC_DW; ++i) acc[i] = 0.0f;
    for (int start = 0; start <= pos; start += NGPT_DEC_TILE) {
        int n = min(NGPT_DEC_TILE, pos + 1 - start);
        float s = t < n ? dot_key(qs, k_cache + base + (long long)(start + t) * NGPT_D) : NGPT_NEG_BIG;
        float m_new = fmaxf(run_max, block_max(s));
        float p = t < n ? expf(s - m_new) : 0.0f;
        float corr = expf(run_max - m_new);
        ps[t] = p;
        run_sum = run_sum * corr + block_sum(p);  // block_sum's barriers publish ps
        run_max = m_new;
#pragma unroll
        for (int i = 0; i < NGPT_DEC_DW; ++i) acc[i] *= corr;
        int k1 = min(warp * 32 + 32, n);
#pragma unroll 4
        for (int u = warp * 32; u < k1; ++u) {
            float pu = ps[u];
            const float* vr = v_cache + base + (long long)(start + u) * NGPT_D;
#pragma unroll
            for (int i = 0; i < NGPT_DEC_DW; ++i) {
                int d = lane + 32 * i;
                if (d < NGPT_D) acc[i] += pu * vr[d];
            }
        }
        __syncthreads();  // the next tile rewrites ps
    }
#pragma unroll
    for (int i = 0; i < NGPT_DEC_DW; ++i) {
        int d = lane + 32 * i;
        if (d < NGPT_D) part[warp][d] = acc[i];
    }
    __syncthreads();
    if (t < NGPT_D) {
        float o = 0.0f;
        for (int w = 0; w < NGPT_DEC_TILE / 32; ++w) o += part[w][t];
        out[(long long)r * NGPT_C + head * NGPT_D + t] = o / run_sum;
    }
}

// Causal attention for prefill, tiled as flash attention is: the block whose row starts a
// query tile does the whole tile, the other blocks of the plan's (rows, H) grid return at
// once. The tile rule is local (ngpt_tile_continues): a tile is a run of rows of one slot
// at consecutive positions, cut where a position is a multiple of NGPT_QT, so at most
// NGPT_QT rows; every row is in exactly one tile, and a rectangle of prompts from position
// 0 gets the tiles of NGPT_QT rows of one sequence it always had. Keys 0..=max position of the tile
// are staged NGPT_KV_TILE at a time in the dynamic shared memory the plan gives
// ([2][KV_TILE][D]), each row masked at its own position, online softmax per row.
// Scores: thread -> (key t % KV_TILE, rows t / KV_TILE + 4 i), dims walked from the key
// index on (no shared-memory bank conflicts); softmax: 128 / QT threads per row; P.V:
// thread -> (dim t % D, rows t / D + (128 / D) i). Grid: (rows, H); block: 128.
#define NGPT_QT (NGPT_D <= 64 ? 32 : 16)
#define NGPT_QSTEP (128 / NGPT_KV_TILE)
#define NGPT_TPR (128 / NGPT_QT)
#define NGPT_PV_G (128 / NGPT_D)
#define NGPT_PV_Q ((NGPT_QT + NGPT_PV_G - 1) / NGPT_PV_G)
// Whether row r continues row r - 1's query tile of `qt` rows: same slot, the next
// position, and not a multiple of qt (where a tile starts).
__device__ __forceinline__ bool ngpt_tile_continues(const int* slots, const int* positions, int r, int qt) {
    return r > 0 && slots[r - 1] == slots[r] && positions[r - 1] == positions[r] - 1 && positions[r] % qt != 0;
}
extern "C" __global__ void attention_prefill(NGPT_ATT_ARGS) {
    extern __shared__ __align__(16) float tile[];  // [2][NGPT_KV_TILE][NGPT_D]
    __shared__ float qs[NGPT_QT * NGPT_D];
    __shared__ float sc[NGPT_QT][NGPT_KV_TILE + 1];
    __shared__ float row_max[NGPT_QT], row_sum[NGPT_QT], row_corr[NGPT_QT];
    __shared__ int row_pos[NGPT_QT];
    int r = blockIdx.x, head = blockIdx.y, t = threadIdx.x;
    if (r >= rows || ngpt_tile_continues(slots, positions, r, NGPT_QT)) return;
    int b = slots[r], nq = 1;
    while (nq < NGPT_QT && r + nq < rows && ngpt_tile_continues(slots, positions, r + nq, NGPT_QT)) ++nq;
    long long base = ((long long)b * NGPT_H + head) * NGPT_MAX_SEQ * NGPT_D;
    float* kt = tile;
    float* vt = tile + NGPT_KV_TILE * NGPT_D;
    for (int e = t; e < NGPT_QT * NGPT_D; e += blockDim.x) {
        int i = e / NGPT_D, d = e - i * NGPT_D;
        qs[e] = i < nq ? q[(long long)(r + i) * NGPT_C + head * NGPT_D + d] : 0.0f;
    }
    if (t < NGPT_QT) {
        row_pos[t] = t < nq ? positions[r + t] : -1;
        row_max[t] = NGPT_NEG_BIG;
        row_sum[t] = 0.0f;
    }
    __syncthreads();
    int max_pos = -1;
    for (int i = 0; i < nq; ++i) max_pos = max(max_pos, row_pos[i]);
    int pv_d = t % NGPT_D, pv_g = t / NGPT_D;
    float acc[NGPT_PV_Q];
#pragma unroll
    for (int i = 0; i < NGPT_PV_Q; ++i) acc[i] = 0.0f;
    for (int start = 0; start <= max_pos; start += NGPT_KV_TILE) {
        int n = min(NGPT_KV_TILE, max_pos + 1 - start);
        // The tile's keys and values are n * D contiguous floats in each cache: 16-byte
        // loads where D allows, unrolled so that they are all in flight at once.
#if NGPT_D % 4 == 0
        {
            const float4* k4 = reinterpret_cast<const float4*>(k_cache + base + (long long)start * NGPT_D);
            const float4* v4 = reinterpret_cast<const float4*>(v_cache + base + (long long)start * NGPT_D);
            float4* kt4 = reinterpret_cast<float4*>(kt);
            float4* vt4 = reinterpret_cast<float4*>(vt);
#pragma unroll 8
            for (int e = t; e < n * (NGPT_D / 4); e += blockDim.x) {
                kt4[e] = k4[e];
                vt4[e] = v4[e];
            }
        }
#else
#pragma unroll 8
        for (int e = t; e < n * NGPT_D; e += blockDim.x) {
            kt[e] = k_cache[base + (long long)start * NGPT_D + e];
            vt[e] = v_cache[base + (long long)start * NGPT_D + e];
        }
#endif
        __syncthreads();
        {
            int kj = t % NGPT_KV_TILE, q0 = t / NGPT_KV_TILE;
            float s[NGPT_QT / NGPT_QSTEP];
#pragma unroll
            for (int i = 0; i < NGPT_QT / NGPT_QSTEP; ++i) s[i] = 0.0f;
            if (kj < n) {
                for (int dd = 0; dd < NGPT_D; ++dd) {
                    int d = (dd + kj) % NGPT_D;
                    float kv = kt[kj * NGPT_D + d];
#pragma unroll
                    for (int i = 0; i < NGPT_QT / NGPT_QSTEP; ++i)
                        s[i] += qs[(q0 + NGPT_QSTEP * i) * NGPT_D + d] * kv;
                }
            }
#pragma unroll
            for (int i = 0; i < NGPT_QT / NGPT_QSTEP; ++i) sc[q0 + NGPT_QSTEP * i][kj] = s[i];
        }
        __syncthreads();
        {
            int qi = t / NGPT_TPR, part = t % NGPT_TPR, pos_i = row_pos[qi];
            float m = NGPT_NEG_BIG;
            for (int kj = part; kj < n; kj += NGPT_TPR)
                if (start + kj <= pos_i) m = fmaxf(m, sc[qi][kj]);
            for (int o = NGPT_TPR / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
            float m_old = row_max[qi];
            float m_new = fmaxf(m_old, m);
            float sum = 0.0f;
            for (int kj = part; kj < NGPT_KV_TILE; kj += NGPT_TPR) {
                float p = (kj < n && start + kj <= pos_i) ? expf(sc[qi][kj] - m_new) : 0.0f;
                sc[qi][kj] = p;
                sum += p;
            }
            for (int o = NGPT_TPR / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            if (part == 0) {
                float c = expf(m_old - m_new);
                row_corr[qi] = c;
                row_sum[qi] = row_sum[qi] * c + sum;
                row_max[qi] = m_new;
            }
        }
        __syncthreads();
        if (pv_g < NGPT_PV_G) {
#pragma unroll
            for (int i = 0; i < NGPT_PV_Q; ++i) {
                int qi = pv_g + NGPT_PV_G * i;
                if (qi < NGPT_QT) acc[i] *= row_corr[qi];
            }
            for (int kj = 0; kj < n; ++kj) {
                float vv = vt[kj * NGPT_D + pv_d];
#pragma unroll
                for (int i = 0; i < NGPT_PV_Q; ++i) {
                    int qi = pv_g + NGPT_PV_G * i;
                    if (qi < NGPT_QT) acc[i] += sc[qi][kj] * vv;
                }
            }
        }
        __syncthreads();  // the next tile rewrites kt, vt and sc
    }
    if (pv_g < NGPT_PV_G) {
#pragma unroll
        for (int i = 0; i < NGPT_PV_Q; ++i) {
            int qi = pv_g + NGPT_PV_G * i;
            if (qi < nq) out[(long long)(r + qi) * NGPT_C + head * NGPT_D + pv_d] = acc[i] / row_sum[qi];
        }
    }
}
#else
extern "C" __global__ void attention_prefill(NGPT_ATT_ARGS) { attention_prefill_simple_body(NGPT_ATT_PASS); }
extern "C" __global__ void attention_decode(NGPT_ATT_ARGS) { attention_decode_simple_body(NGPT_ATT_PASS); }
#endif
