// ngpt kernels: the launch steps of a plan, besides the cuBLAS GEMMs.
//
// Specialized by a generated prelude that defines NGPT_C (n_embd), NGPT_H (n_head),
// NGPT_D (head_dim), NGPT_V (vocab), NGPT_MAX_SEQ (KV capacity) and NGPT_KV_TILE.
// Activations are f32 row-major [rows, width]; the KV cache is [batch, H, MAX_SEQ, D].
// Row r belongs to sequence r / tokens and sits at absolute position positions[r].
// Every entry has a Rust twin in runtime/src/cpu/kernels.rs with the same semantics.

#define NGPT_P (NGPT_D / 2)

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float v) {
    __shared__ float warp_sums[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    int n_warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < n_warps) ? warp_sums[threadIdx.x] : 0.0f;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) warp_sums[0] = v;
    }
    __syncthreads();
    float total = warp_sums[0];
    __syncthreads();
    return total;
}

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
// and v written into the caches at the row's position. qkv is [rows, 3C].
// Grid: (rows, H); block: at least P threads, a multiple of 32.
extern "C" __global__ void pos_norm(const float* qkv, const int* positions, const float* table,
                                    const float* q_scale, const float* k_scale, float* q_out,
                                    float* k_cache, float* v_cache, int rows, int tokens) {
    int r = blockIdx.x, head = blockIdx.y;
    if (r >= rows) return;
    int b = r / tokens, pos = positions[r];
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

// Causal attention for prefill, one block per (query row, head): keys 0..=pos of the
// row's sequence, in tiles of NGPT_KV_TILE staged in shared memory, online softmax.
// Softmax scale 1 (folded into q). Grid: (rows, H); block: 128.
extern "C" __global__ void attention_prefill(const float* q, const float* k_cache, const float* v_cache,
                                             const int* positions, float* out, int rows, int tokens) {
    extern __shared__ float tile[];  // [2][NGPT_KV_TILE][NGPT_D]
    __shared__ float scores[NGPT_KV_TILE];
    int r = blockIdx.x, head = blockIdx.y;
    if (r >= rows) return;
    int b = r / tokens, pos = positions[r];
    const float* qr = q + (long long)r * NGPT_C + head * NGPT_D;
    long long base = ((long long)b * NGPT_H + head) * NGPT_MAX_SEQ * NGPT_D;
    float* kt = tile;
    float* vt = tile + NGPT_KV_TILE * NGPT_D;
    float run_max = -3.402823466e38f, run_sum = 0.0f;
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
#define NGPT_DEC_TILE 128
extern "C" __global__ void attention_decode(const float* q, const float* k_cache, const float* v_cache,
                                            const int* positions, float* out, int rows, int tokens) {
    __shared__ float scores[NGPT_DEC_TILE];
    __shared__ float red[NGPT_DEC_TILE];
    int r = blockIdx.x, head = blockIdx.y, t = threadIdx.x;
    if (r >= rows) return;
    int b = r / tokens, pos = positions[r];
    const float* qr = q + (long long)r * NGPT_C + head * NGPT_D;
    long long base = ((long long)b * NGPT_H + head) * NGPT_MAX_SEQ * NGPT_D;
    float run_max = -3.402823466e38f, run_sum = 0.0f;
    float acc[(NGPT_D + NGPT_DEC_TILE - 1) / NGPT_DEC_TILE];
    for (int i = 0; i < (NGPT_D + NGPT_DEC_TILE - 1) / NGPT_DEC_TILE; ++i) acc[i] = 0.0f;
    for (int start = 0; start <= pos; start += NGPT_DEC_TILE) {
        int n = min(NGPT_DEC_TILE, pos + 1 - start);
        float s = -3.402823466e38f;
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

// Greedy (temperature 0) or top-k sampling of one token per row of logits [rows, V].
// uniform[r] in [0, 1) is drawn by the host. Grid: rows; block: 1 (vocabularies are
// sampled once per token; the GEMM before dominates).
extern "C" __global__ void sample_topk(const float* logits, const float* uniform, int* out, int rows,
                                       int k, float temperature) {
    int r = blockIdx.x;
    if (r >= rows || threadIdx.x != 0) return;
    const float* row = logits + (long long)r * NGPT_V;
    if (temperature <= 0.0f || k == 1) {
        int best = 0;
        for (int v = 1; v < NGPT_V; ++v) if (row[v] > row[best]) best = v;
        out[r] = best;
        return;
    }
    // Threshold: the k-th largest logit, found by k passes (k is small).
    float hi = 3.402823466e38f, kth = -3.402823466e38f;
    for (int i = 0; i < k; ++i) {
        float m = -3.402823466e38f;
        for (int v = 0; v < NGPT_V; ++v) if (row[v] < hi && row[v] > m) m = row[v];
        kth = m;
        hi = m;
    }
    float top = -3.402823466e38f;
    for (int v = 0; v < NGPT_V; ++v) top = fmaxf(top, row[v]);
    float z = 0.0f;
    for (int v = 0; v < NGPT_V; ++v) if (row[v] >= kth) z += expf((row[v] - top) / temperature);
    float target = uniform[r] * z, c = 0.0f;
    int pick = 0;
    for (int v = 0; v < NGPT_V; ++v) {
        if (row[v] < kth) continue;
        c += expf((row[v] - top) / temperature);
        pick = v;
        if (c > target) break;
    }
    out[r] = pick;
}
