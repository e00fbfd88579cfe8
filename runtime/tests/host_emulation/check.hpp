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
