// One attention kernel on the CPU (runtime/tests/host_emulation.rs writes kernel.inc: the
// kernel's source behind its prelude, and NGPT_EMU_KERNEL, NGPT_EMU_SHARED (dynamic shared
// memory bytes), NGPT_EMU_C, NGPT_EMU_D and NGPT_EMU_MAX_SEQ for this harness). Every
// attention kernel of the runtime has the same arguments: q [rows, C], the caches
// [slots, H, MAX_SEQ, D], positions [rows], out [rows, C], rows, slots [rows]; grid
// (rows, H), 128 threads.
//
//   attention CHUNKS SEED
//
// CHUNKS is `slot:start:len,...`: the call's rows, chunk after chunk, each `len` rows of
// KV slot `slot` at positions start, start + 1, ... (a prefill chunk, or one decode row);
// the slots held are the largest named plus one. Random q and caches (the cache holds keys
// before each chunk's start, as after earlier calls). The output is poisoned with NaN
// first. Prints the relative error against exact causal attention (float64) over keys
// 0..=position of the row's slot, the worst (row, head)'s, and how many outputs were left
// unwritten.
#include <cstdio>
#include <cstdlib>
#include <random>

#include "warp.hpp"
#include "kernel.inc"
// Arguments a kernel takes after the plan's (attention_prefill_mma: the KV capacity).
#ifndef NGPT_EMU_EXTRA_ARGS
#define NGPT_EMU_EXTRA_ARGS
#endif

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s SLOT:START:LEN,... SEED\n", argv[0]);
        return 2;
    }
    const int C = NGPT_EMU_C, D = NGPT_EMU_D, H = C / D, S = NGPT_EMU_MAX_SEQ;
    std::vector<int> pos, slot;
    int batch = 0;
    for (const char* c = argv[1]; *c;) {
        int sl, start, len, used = 0;
        if (std::sscanf(c, "%d:%d:%d%n", &sl, &start, &len, &used) != 3 || sl < 0 || start < 0 || len < 1 ||
            start + len > S)
            return 2;
        for (int i = 0; i < len; ++i) {
            slot.push_back(sl);
            pos.push_back(start + i);
        }
        batch = std::max(batch, sl + 1);
        c += used;
        if (*c == ',') ++c;
    }
    const int rows = (int)pos.size();
    std::mt19937 rng(std::atoi(argv[2]));
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> q((size_t)rows * C), kc((size_t)batch * H * S * D), vc(kc.size());
    std::vector<float> out((size_t)rows * C, NAN);
    for (auto& x : q) x = 0.6f * u(rng);
    for (auto& x : kc) x = u(rng);
    for (auto& x : vc) x = u(rng);

    launch(Dim3{(unsigned)rows, (unsigned)H, 1}, 128, NGPT_EMU_SHARED,
           [&] { NGPT_EMU_KERNEL(q.data(), kc.data(), vc.data(), pos.data(), out.data(), rows, slot.data() NGPT_EMU_EXTRA_ARGS); });

    double num = 0, den = 0, worst = 0;
    long unwritten = 0;
    for (int r = 0; r < rows; ++r) {
        int b = slot[r];
        for (int h = 0; h < H; ++h) {
            const float* qr = &q[(size_t)r * C + h * D];
            const float* kb = &kc[((size_t)b * H + h) * S * D];
            const float* vb = &vc[((size_t)b * H + h) * S * D];
            std::vector<double> sc(pos[r] + 1);
            double m = -1e300;
            for (int j = 0; j <= pos[r]; ++j) {
                double s = 0;
                for (int d = 0; d < D; ++d) s += (double)qr[d] * kb[(size_t)j * D + d];
                sc[j] = s;
                m = std::max(m, s);
            }
            double z = 0;
            for (auto& s : sc) z += (s = std::exp(s - m));
            double rn = 0, rd = 0;
            for (int d = 0; d < D; ++d) {
                double want = 0;
                for (int j = 0; j <= pos[r]; ++j) want += sc[j] * vb[(size_t)j * D + d];
                want /= z;
                double got = out[(size_t)r * C + h * D + d];
                if (std::isnan(got)) {
                    ++unwritten;
                    continue;
                }
                rn += (got - want) * (got - want);
                rd += want * want;
            }
            num += rn;
            den += rd;
            worst = std::max(worst, std::sqrt(rn / std::max(rd, 1e-300)));
        }
    }
    std::printf("rel_err %.6e worst_row %.6e unwritten %ld\n", std::sqrt(num / den), worst, unwritten);
    return 0;
}
