// decode_persistent (runtime/src/cuda/helpers.cu) on the CPU, on a table of gemv entries:
// runtime/tests/host_emulation.rs writes kernel.inc (helpers.cu behind the executor's
// prelude, its streaming build: NGPT_PD_STREAM) with NGPT_EMU_SLICE and NGPT_EMU_RING (the
// buffers' size, small enough that a slice holds only part of a block's rows, and offset)
// and NGPT_EMU_SHARED (dynamic shared memory bytes).
//
//   persistent gemv ROWS BLOCKS STREAM
//   persistent attention ROWS BLOCKS FOLD
//
// gemv: a bf16 gemv with padded rows; an f32 gemv whose input is a folded lerp_norm;
// swiglu; a bf16 gemv whose input is a folded swiglu, with beta != 0; a bf16 gemv that is
// not `vec` (k not a multiple of 8); an f32 gemv of 1,000 rows; then the weight-only
// quantized entries (check.hpp's quant_mat): int8 of 600 rows (slices hold part of a
// block's rows), int4 in blocks of 16 on a folded lerp_norm, int4 in blocks of 64 on a
// folded swiglu with beta != 0, and element-wise ones (not `vec`): int4 of odd k 45 and
// int8 of k 60 (a short last block).
// attention: one decode row per sequence at positions 5, 1,100 (more 32-key tiles than
// splits), 40, 31 (one whole tile), ..., row r in KV slot (r + 1) % ROWS (not the row's own
// index), the caches random before them: pos_norm then
// attention as two entries, or folded into one (FOLD 1). The same with NGPT_PD_WIDE
// defined (the wide build: splits over all the grid's warps, its float4 P.V where the
// head dim allows, a block per (row, head) combining).
// Every output is compared with float64 arithmetic on the same inputs. Prints the worst
// relative error of any output and how many outputs were left unwritten (poisoned with
// NaN first).
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "warp.hpp"
#include "check.hpp"
#include "kernel.inc"

static unsigned short to_bf16(float x) { return (unsigned short)(__float_as_uint(x) >> 16); }
static double wide(unsigned short b) { return __uint_as_float((unsigned)b << 16); }
static double wide(float f) { return f; }

struct Gemv {
    int kind, m, k, lda, ldb, ldc, vec, mode;
    float alpha, beta;
    int block;  // quantized kinds: entries a block along k
    void* a;
    float *b, *c, *c0;
    QuantMat q;
};
static bool quantized(int kind) { return kind == PD_GEMV_I8 || kind == PD_GEMV_I4; }

static int attention(int rows, int blocks, int fold) {
    const int C = NGPT_PD_C, D = NGPT_PD_D, H = C / D, S = 1200;
    const int at[] = {5, 1100, 40, 31, 700, 0, 64, 1000};
    Arena arena(256 << 20);
    auto filled = [&](size_t n, float lo, float hi) {
        float* p = arena.alloc<float>(n);
        for (size_t i = 0; i < n; ++i) p[i] = lo + (hi - lo) * 0.5f * (uni() + 1.0f);
        return p;
    };
    float* qkv = filled((size_t)rows * 3 * C, -1.0f, 1.0f);
    float* table = filled((size_t)S * D, -1.0f, 1.0f);
    float* q_scale = filled(C, 1.0f, 3.0f);
    float* k_scale = filled(C, -2.0f, 2.0f);
    float* kc = filled((size_t)rows * H * S * D, -1.0f, 1.0f);
    float* vc = filled((size_t)rows * H * S * D, -1.0f, 1.0f);
    std::vector<float> kc0(kc, kc + (size_t)rows * H * S * D), vc0(vc, vc + (size_t)rows * H * S * D);
    int* positions = arena.alloc<int>(rows);
    for (int r = 0; r < rows; ++r) positions[r] = at[r % 8];
    int* slots = arena.alloc<int>(rows);
    for (int r = 0; r < rows; ++r) slots[r] = (r + 1) % rows;
    float* q_out = arena.alloc<float>((size_t)rows * C);
    float* out = arena.alloc<float>((size_t)rows * C);
    for (int i = 0; i < rows * C; ++i) out[i] = q_out[i] = NAN;
    // As the executor sizes it (persistent::part_floats): every split either build writes.
    const int pairs = rows * H, warps = blocks * PD_WARPS;
    const int wide = pairs * std::max(1, warps / pairs);
    float* part = arena.alloc<float>((size_t)std::max(pairs * PD_SPLITS, wide) * PD_PART);
    // An entry of one decode row per sequence (ints: rows).
    auto entry = [&](int kind, std::initializer_list<const void*> ptrs) {
        PdOp e{};
        e.kind = kind;
        int i = 0;
        for (const void* p : ptrs) e.p[i++] = (unsigned long long)p;
        e.i[0] = rows;
        return e;
    };
    std::vector<PdOp> t;
    if (fold) {
        t.push_back(entry(PD_POS_ATTENTION, {qkv, positions, table, q_scale, k_scale, kc, vc, out, slots}));
    } else {
        t.push_back(entry(PD_POS_NORM, {qkv, positions, table, q_scale, k_scale, q_out, kc, vc, slots}));
        t.push_back(entry(PD_ATTENTION, {q_out, kc, vc, positions, out, slots}));
    }
    PdOp* ops = arena.alloc<PdOp>(t.size());
    std::copy(t.begin(), t.end(), ops);
    unsigned* bar = arena.alloc<unsigned>(4);
    bar[0] = bar[1] = bar[2] = bar[3] = 0;
    int n_ops = (int)t.size();
    bool ok = launch_resident(Dim3{(unsigned)blocks, 1, 1}, PD_THREADS, NGPT_EMU_SHARED, [&] {
        decode_persistent(ops, n_ops, bar, part, C, H, D, S, 1, 0, 0, nullptr);
    });
    if (!ok) {
        std::printf("a block failed\n");
        return 1;
    }
    std::vector<double> want_out((size_t)rows * C), want_kv, got_kv;
    for (int r = 0; r < rows; ++r) {
        int pos = positions[r];
        for (int h = 0; h < H; ++h) {
            std::vector<double> q(D), k(D), v(D);
            double sq = 0, sk = 0;
            for (int j = 0; j < D; ++j) {
                int col = h * D + j;
                q[j] = (double)qkv[(size_t)r * 3 * C + col] * table[(size_t)pos * D + j];
                k[j] = (double)qkv[(size_t)r * 3 * C + C + col] * table[(size_t)pos * D + j];
                v[j] = qkv[(size_t)r * 3 * C + 2 * C + col];
                sq += q[j] * q[j];
                sk += k[j] * k[j];
            }
            for (int j = 0; j < D; ++j) {
                q[j] = q[j] / std::sqrt(sq) * q_scale[h * D + j];
                k[j] = k[j] / std::sqrt(sk) * k_scale[h * D + j];
            }
            size_t base = ((size_t)slots[r] * H + h) * S * D;
            // The new key and value, as the kernel must have cached them.
            for (int j = 0; j < D; ++j) {
                want_kv.push_back(k[j]);
                want_kv.push_back(v[j]);
                got_kv.push_back(kc[base + (size_t)pos * D + j]);
                got_kv.push_back(vc[base + (size_t)pos * D + j]);
            }
            std::vector<double> sc(pos + 1);
            double m = -1e300;
            for (int key = 0; key <= pos; ++key) {
                double s = 0;
                for (int j = 0; j < D; ++j) s += q[j] * (key == pos ? k[j] : kc0[base + (size_t)key * D + j]);
                sc[key] = s;
                m = std::max(m, s);
            }
            double z = 0;
            for (auto& s : sc) z += (s = std::exp(s - m));
            for (int j = 0; j < D; ++j) {
                double o = 0;
                for (int key = 0; key <= pos; ++key) o += sc[key] * (key == pos ? v[j] : vc0[base + (size_t)key * D + j]);
                want_out[(size_t)r * C + h * D + j] = o / z;
            }
        }
    }
    compare(out, want_out);
    std::vector<float> got_kv_f(got_kv.begin(), got_kv.end());
    compare(got_kv_f.data(), want_kv);
    std::printf("worst_rel_err %.6e unwritten %ld\n", worst, unwritten);
    return 0;
}

int main(int argc, char** argv) {
    if (argc != 5) return 2;
    rng.seed(7);
    const int rows = std::atoi(argv[2]), blocks = std::atoi(argv[3]), stream = std::atoi(argv[4]);
    if (std::string(argv[1]) == "attention") return attention(rows, blocks, stream);
    const int C = NGPT_PD_C;
    Arena arena(64 << 20);
    auto filled = [&](size_t n, float scale) {
        float* p = arena.alloc<float>(n);
        for (size_t i = 0; i < n; ++i) p[i] = scale * uni();
        return p;
    };
    auto weight = [&](int kind, int m, int lda) -> void* {
        if (kind == PD_GEMV_F32) return filled((size_t)m * lda, 0.5f);
        unsigned short* w = arena.alloc<unsigned short>((size_t)m * lda);
        for (size_t i = 0; i < (size_t)m * lda; ++i) w[i] = to_bf16(0.5f * uni());
        return w;
    };
    auto out = [&](size_t n) {
        float* p = arena.alloc<float>(n);
        for (size_t i = 0; i < n; ++i) p[i] = NAN;
        return p;
    };
    float* x = filled((size_t)rows * C, 1.0f);
    float* h_in = filled((size_t)rows * C, 1.0f);
    float* branch = filled((size_t)rows * C, 1.0f);
    float* lr = filled(C, 0.3f);
    float* h_out = out((size_t)rows * C);
    float* fc = filled((size_t)rows * 8 * C, 1.5f);
    float* sw = out((size_t)rows * 4 * C);

    std::vector<Gemv> gemvs = {
        {PD_GEMV_BF16, 301, C, C + 8, C, 301, 1, PD_IN_GLOBAL, 0.5f, 0.0f},
        {PD_GEMV_F32, 77, C, C, 0, 77, 1, PD_IN_LERP, 1.0f, 0.0f},
        {PD_GEMV_BF16, 50, 4 * C, 4 * C, 0, 53, 1, PD_IN_SWIGLU, 0.75f, 0.25f},
        {PD_GEMV_BF16, 40, 60, 61, 60, 40, 0, PD_IN_GLOBAL, 1.0f, 0.0f},
        {PD_GEMV_F32, 1000, C, C, C, 1000, 1, PD_IN_GLOBAL, 1.0f, 0.0f},
        {PD_GEMV_I8, 600, C, 0, C, 600, 1, PD_IN_GLOBAL, 1.0f, 0.0f, 32},
        {PD_GEMV_I4, 131, C, 0, 0, 131, 1, PD_IN_LERP, 1.0f, 0.0f, 16},
        {PD_GEMV_I4, 50, 4 * C, 0, 0, 53, 1, PD_IN_SWIGLU, 0.75f, 0.25f, 64},
        {PD_GEMV_I4, 29, 45, 0, 45, 29, 0, PD_IN_GLOBAL, 1.0f, 0.0f, 16},
        {PD_GEMV_I8, 40, 60, 0, 60, 40, 0, PD_IN_GLOBAL, 1.0f, 0.0f, 32},
    };
    float* x60 = filled((size_t)rows * 60, 1.0f);
    float* x45 = filled((size_t)rows * 45, 1.0f);
    for (auto& g : gemvs) {
        if (quantized(g.kind)) {
            g.q = quant_mat(arena, g.kind == PD_GEMV_I8 ? 8 : 4, g.m, g.k, g.block);
            g.a = g.q.data;
            g.lda = g.q.row_bytes;
        } else {
            g.a = weight(g.kind, g.m, g.lda);
        }
        g.b = g.k == 60 ? x60 : g.k == 45 ? x45 : x;
        g.c = out((size_t)rows * g.ldc);
        g.c0 = nullptr;
        if (g.beta != 0.0f) {
            g.c0 = arena.alloc<float>((size_t)rows * g.ldc);
            for (size_t i = 0; i < (size_t)rows * g.ldc; ++i) g.c[i] = g.c0[i] = uni();
        }
    }

    // The table, with swiglu between the second and third gemv (a non-gemv entry).
    std::vector<PdOp> table;
    auto gemv_op = [&](const Gemv& g) {
        PdOp e{};
        e.kind = g.kind;
        e.p[0] = (unsigned long long)g.a;
        e.p[1] = (unsigned long long)g.b;
        e.p[2] = (unsigned long long)g.c;
        e.i[0] = g.m;
        e.i[1] = g.k;
        e.i[2] = g.lda;
        e.i[3] = g.ldb;
        e.i[4] = g.ldc;
        e.i[5] = g.vec;
        e.i[6] = rows;
        e.i[7] = g.mode;
        e.f[0] = g.alpha;
        e.f[1] = g.beta;
        if (quantized(g.kind)) {  // as persistent_launch.rs moves gemv_i*'s scales
            e.p[7] = (unsigned long long)g.q.scales;
            e.i[5] = g.vec | g.q.block_log2 << 8;
        }
        if (g.mode == PD_IN_LERP) {
            e.p[3] = (unsigned long long)h_in;
            e.p[4] = (unsigned long long)branch;
            e.p[5] = (unsigned long long)lr;
            e.p[6] = (unsigned long long)h_out;
        }
        if (g.mode == PD_IN_SWIGLU) e.p[3] = (unsigned long long)fc;
        return e;
    };
    table.push_back(gemv_op(gemvs[0]));
    table.push_back(gemv_op(gemvs[1]));
    PdOp swiglu{};
    swiglu.kind = PD_SWIGLU;
    swiglu.p[0] = (unsigned long long)fc;
    swiglu.p[1] = (unsigned long long)sw;
    swiglu.i[0] = rows;
    table.push_back(swiglu);
    for (int g = 2; g < (int)gemvs.size(); ++g) table.push_back(gemv_op(gemvs[g]));
    PdOp* ops = arena.alloc<PdOp>(table.size());
    std::copy(table.begin(), table.end(), ops);
    unsigned* bar = arena.alloc<unsigned>(4);
    bar[0] = bar[1] = bar[2] = bar[3] = 0;
    float* part = arena.alloc<float>(16);
    int n_ops = (int)table.size();

    bool ok = launch_resident(Dim3{(unsigned)blocks, 1, 1}, PD_THREADS, NGPT_EMU_SHARED, [&] {
        decode_persistent(ops, n_ops, bar, part, C, 1, 16, 32, 1, stream ? NGPT_EMU_SLICE : 0, NGPT_EMU_RING, nullptr);
    });
    if (!ok) {
        std::printf("a block failed\n");
        return 1;
    }

    // Float64 references of the staged inputs, then of every output.
    std::vector<double> lerp((size_t)rows * C), swi((size_t)rows * 4 * C);
    for (int r = 0; r < rows; ++r) {
        double sb = 0, sm = 0;
        for (int j = 0; j < C; ++j) sb += (double)branch[r * C + j] * branch[r * C + j];
        for (int j = 0; j < C; ++j) {
            double h = h_in[r * C + j];
            lerp[r * C + j] = h + lr[j] * (branch[r * C + j] / std::sqrt(sb) - h);
            sm += lerp[r * C + j] * lerp[r * C + j];
        }
        for (int j = 0; j < C; ++j) lerp[r * C + j] /= std::sqrt(sm);
        for (int j = 0; j < 4 * C; ++j) {
            double u = fc[(size_t)r * 8 * C + j], v = fc[(size_t)r * 8 * C + 4 * C + j];
            swi[r * 4 * C + j] = u * (v / (1.0 + std::exp(-v)));
        }
    }
    compare(h_out, lerp);
    compare(sw, swi);
    for (auto& g : gemvs) {
        std::vector<double> want((size_t)rows * g.m);
        std::vector<float> got((size_t)rows * g.m);
        for (int j = 0; j < rows; ++j) {
            for (int i = 0; i < g.m; ++i) {
                double acc = 0;
                for (int kk = 0; kk < g.k; ++kk) {
                    double w = quantized(g.kind)      ? g.q.value[(size_t)i * g.k + kk]
                               : g.kind == PD_GEMV_F32 ? wide(((float*)g.a)[(size_t)i * g.lda + kk])
                                                       : wide(((unsigned short*)g.a)[(size_t)i * g.lda + kk]);
                    double in = g.mode == PD_IN_LERP     ? lerp[j * C + kk]
                                : g.mode == PD_IN_SWIGLU ? swi[j * 4 * C + kk]
                                                         : g.b[(size_t)j * g.ldb + kk];
                    acc += w * in;
                }
                double v = g.alpha * acc;
                if (g.beta != 0.0f) v += g.beta * g.c0[(size_t)j * g.ldc + i];
                want[(size_t)j * g.m + i] = v;
                got[(size_t)j * g.m + i] = g.c[(size_t)j * g.ldc + i];
            }
        }
        compare(got.data(), want);
    }
    std::printf("worst_rel_err %.6e unwritten %ld\n", worst, unwritten);
    return 0;
}
