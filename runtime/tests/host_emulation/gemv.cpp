// The weight-only quantized gemv kernels of runtime/src/cuda/helpers.cu (gemv_i8_N,
// gemv_i4_N) and its dequant_rows on the CPU: runtime/tests/host_emulation.rs writes
// kernel.inc (helpers.cu as the executor compiles it).
//
//   gemv BITS M K BLOCK N LDB BETA
//
// A random quantized [M, K] weight in blocks of BLOCK (check.hpp's quant_mat), N activation
// rows LDB apart, C with ldc = M + 3 (beta != 0 reads it). The 16-byte path is taken where
// the executor would take it (resolve.rs quant_vec: K a multiple of 16 for 8 bits, 32 for
// 4, LDB a multiple of 4). Every output against float64 arithmetic on the dequantized
// weight; dequant_rows must give the dequantized values exactly. Prints the worst relative
// error, how many outputs were left unwritten, whether the 16-byte path ran and the
// largest difference of dequant_rows from the exact values.
#include <cstdio>
#include <cstdlib>
#include <random>

#include "warp.hpp"
#include "check.hpp"
#include "kernel.inc"

using QGemv = void (*)(const unsigned char*, const float*, float*, int, int, int, int, int, float, float, int,
                       const unsigned short*);
static const QGemv kI8[8] = {gemv_i8_1, gemv_i8_2, gemv_i8_3, gemv_i8_4, gemv_i8_5, gemv_i8_6, gemv_i8_7, gemv_i8_8};
static const QGemv kI4[8] = {gemv_i4_1, gemv_i4_2, gemv_i4_3, gemv_i4_4, gemv_i4_5, gemv_i4_6, gemv_i4_7, gemv_i4_8};

int main(int argc, char** argv) {
    if (argc != 8) return 2;
    const int bits = std::atoi(argv[1]), m = std::atoi(argv[2]), k = std::atoi(argv[3]), block = std::atoi(argv[4]);
    const int n = std::atoi(argv[5]), ldb = std::atoi(argv[6]);
    const float beta = (float)std::atof(argv[7]), alpha = 0.75f;
    if ((bits != 8 && bits != 4) || n < 1 || n > 8 || ldb < k) return 2;
    rng.seed(1000 * bits + 7 * m + k);
    Arena arena(64 << 20);
    QuantMat w = quant_mat(arena, bits, m, k, block);
    const int ldc = m + 3;
    float* b = arena.alloc<float>((size_t)n * ldb);
    for (size_t i = 0; i < (size_t)n * ldb; ++i) b[i] = uni();
    float* c = arena.alloc<float>((size_t)n * ldc);
    std::vector<float> c0((size_t)n * ldc);
    for (size_t i = 0; i < (size_t)n * ldc; ++i) c[i] = c0[i] = beta != 0.0f ? uni() : NAN;
    const bool vec = k % (bits == 8 ? 16 : 32) == 0 && ldb % 4 == 0 && w.row_bytes % 16 == 0;
    const int flags = (vec ? 1 : 0) | w.block_log2 << 8;
    QGemv f = (bits == 8 ? kI8 : kI4)[n - 1];
    launch(Dim3{(unsigned)(m + 7) / 8, 1, 1}, 256, 0,
           [&] { f(w.data, b, c, m, k, w.row_bytes, ldb, ldc, alpha, beta, flags, w.scales); });
    std::vector<double> want((size_t)n * m);
    std::vector<float> got((size_t)n * m);
    for (int j = 0; j < n; ++j) {
        for (int i = 0; i < m; ++i) {
            double acc = 0;
            for (int kk = 0; kk < k; ++kk) acc += w.value[(size_t)i * k + kk] * b[(size_t)j * ldb + kk];
            want[(size_t)j * m + i] = alpha * acc + (beta != 0.0f ? (double)beta * c0[(size_t)j * ldc + i] : 0.0);
            got[(size_t)j * m + i] = c[(size_t)j * ldc + i];
        }
    }
    compare(got.data(), want);
    // Past row m of C: untouched.
    long touched = 0;
    for (int j = 0; j < n; ++j)
        for (int i = m; i < ldc; ++i) {
            float x = c[(size_t)j * ldc + i], y = c0[(size_t)j * ldc + i];
            touched += !(x == y || (std::isnan(x) && std::isnan(y)));
        }

    // dequant_rows, with fewer blocks along y than rows (its row-stride loop).
    float* out = arena.alloc<float>((size_t)m * k);
    for (size_t i = 0; i < (size_t)m * k; ++i) out[i] = NAN;
    launch(Dim3{(unsigned)(k + 255) / 256, (unsigned)std::min(m, 5), 1}, 256, 0,
           [&] { dequant_rows(w.data, w.scales, out, m, k, w.row_bytes, w.block_log2, bits); });
    double dq = 0;
    for (size_t i = 0; i < (size_t)m * k; ++i) {
        double d = std::fabs((double)out[i] - w.value[i]);
        dq = std::isnan(d) ? INFINITY : std::max(dq, d);
    }
    std::printf("worst_rel_err %.6e unwritten %ld vec %d touched %ld dequant_diff %.6e\n", worst, unwritten,
                vec ? 1 : 0, touched, dq);
    return 0;
}
