// What the emulation programs of runtime/tests/host_emulation.rs share to check a kernel:
// random inputs, and outputs against float64 values (each output's relative error; the
// worst of them, and how many outputs were left unwritten, i.e. still NaN).
#pragma once
#include <cmath>
#include <random>
#include <vector>

static std::mt19937 rng;
static float uni() { return std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng); }

static double worst = 0;
static long unwritten = 0;
static void compare(const float* got, const std::vector<double>& want) {
    double num = 0, den = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        if (std::isnan(got[i])) {
            ++unwritten;
            continue;
        }
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    worst = std::max(worst, std::sqrt(num / std::max(den, 1e-300)));
}

// A weight-only quantized [m, k] matrix as runtime/src/plan.rs's QuantWeight stores it
// (needs warp.hpp's Arena): integers (8 bits: signed bytes; 4 bits: q + 8 in nibbles,
// element 2j in the low nibble of byte j, ceil(k / 2) bytes a row, the pad nibble of an
// odd k random), f16 block scales (ceil(k / block) a row; one subnormal), and its values in
// float64, scale * q, decoded from the bits here independently of the kernels.
struct QuantMat {
    int bits, m, k, block, row_bytes, nb, block_log2;
    unsigned char* data;
    unsigned short* scales;
    std::vector<double> value;  // [m, k]
};
static double f16_value(unsigned short h) {
    int e = (h >> 10) & 31, mant = h & 1023;
    double v = e ? std::ldexp(1024.0 + mant, e - 25) : std::ldexp((double)mant, -24);
    return (h & 0x8000) ? -v : v;
}
static QuantMat quant_mat(Arena& arena, int bits, int m, int k, int block) {
    QuantMat w{bits, m, k, block, bits == 8 ? k : (k + 1) / 2, (k + block - 1) / block, 0, nullptr, nullptr, {}};
    while ((1 << w.block_log2) < block) ++w.block_log2;
    w.data = arena.alloc<unsigned char>((size_t)m * w.row_bytes);
    w.scales = arena.alloc<unsigned short>((size_t)m * w.nb);
    std::uniform_int_distribution<int> byte(0, 255), expo(8, 16), mant(0, 1023);
    for (size_t i = 0; i < (size_t)m * w.row_bytes; ++i) w.data[i] = (unsigned char)byte(rng);
    for (size_t i = 0; i < (size_t)m * w.nb; ++i)
        w.scales[i] = (unsigned short)((byte(rng) & 0x80) << 8 | expo(rng) << 10 | mant(rng));
    w.scales[0] = (unsigned short)(1 + mant(rng) % 1023);  // a subnormal scale
    w.value.resize((size_t)m * k);
    for (int r = 0; r < m; ++r) {
        for (int j = 0; j < k; ++j) {
            unsigned char b = w.data[(size_t)r * w.row_bytes + (bits == 8 ? j : j / 2)];
            int q = bits == 8 ? (int)(signed char)b : (int)((j % 2 ? b >> 4 : b) & 15) - 8;
            w.value[(size_t)r * k + j] = f16_value(w.scales[(size_t)r * w.nb + j / block]) * q;
        }
    }
    return w;
}
