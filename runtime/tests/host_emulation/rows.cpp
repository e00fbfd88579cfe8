// The plan's row kernels from runtime/src/cuda/ngpt.cu on the CPU: embed, norm_rows,
// lerp_norm, swiglu and pos_norm, and the Hugging Face family's embed_pos,
// lerp_norm_bias, swiglu_bias and rotary_norm (launched as plans launch them), each against
// float64 arithmetic on random inputs (runtime/tests/host_emulation.rs writes kernel.inc:
// ngpt.cu behind a plan's prelude). Outputs are poisoned with NaN first.
//
//   rows ROWS TOKENS
//
// Prints the worst relative error of any float output and how many outputs were left
// unwritten.
#include <cstdio>
#include <cstdlib>
#include <random>

#include "warp.hpp"
#include "check.hpp"
#include "kernel.inc"

static std::vector<float> filled(size_t n, float scale) {
    std::vector<float> v(n);
    for (auto& x : v) x = scale * uni();
    return v;
}
static std::vector<double> normed(const double* x, int n) {
    double ss = 0;
    for (int i = 0; i < n; ++i) ss += x[i] * x[i];
    std::vector<double> out(x, x + n);
    for (auto& v : out) v /= std::sqrt(ss);
    return out;
}

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    rng.seed(11);
    const int rows = std::atoi(argv[1]), tokens = std::atoi(argv[2]);
    const int C = NGPT_C, H = NGPT_H, D = NGPT_D, V = NGPT_V, S = NGPT_MAX_SEQ, P = D / 2;
    const unsigned grid = (unsigned)rows;

    // embed
    std::vector<int> tok(rows);
    for (int r = 0; r < rows; ++r) tok[r] = (r * 7 + 3) % V;
    auto wte = filled((size_t)V * C, 1.0f);
    std::vector<float> x0((size_t)rows * C, NAN);
    launch(Dim3{grid, 1, 1}, 256, 0, [&] { embed(tok.data(), wte.data(), x0.data(), rows); });
    std::vector<double> want((size_t)rows * C);
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < C; ++c) want[(size_t)r * C + c] = wte[(size_t)tok[r] * C + c];
    compare(x0.data(), want);

    // norm_rows
    auto x = filled((size_t)rows * C, 2.0f);
    std::vector<float> h((size_t)rows * C, NAN);
    launch(Dim3{grid, 1, 1}, 256, 0, [&] { norm_rows(x.data(), h.data(), rows); });
    for (int r = 0; r < rows; ++r) {
        std::vector<double> xr(x.begin() + (size_t)r * C, x.begin() + (size_t)(r + 1) * C);
        auto n = normed(xr.data(), C);
        std::copy(n.begin(), n.end(), want.begin() + (size_t)r * C);
    }
    compare(h.data(), want);

    // lerp_norm (in place on h)
    auto branch = filled((size_t)rows * C, 1.5f);
    auto lr = filled(C, 0.4f);
    std::vector<double> h0(h.begin(), h.end());
    launch(Dim3{grid, 1, 1}, 256, 0, [&] { lerp_norm(h.data(), branch.data(), lr.data(), rows); });
    for (int r = 0; r < rows; ++r) {
        std::vector<double> br(branch.begin() + (size_t)r * C, branch.begin() + (size_t)(r + 1) * C);
        auto b = normed(br.data(), C);
        std::vector<double> m(C);
        for (int c = 0; c < C; ++c) m[c] = h0[(size_t)r * C + c] + lr[c] * (b[c] - h0[(size_t)r * C + c]);
        auto n = normed(m.data(), C);
        std::copy(n.begin(), n.end(), want.begin() + (size_t)r * C);
    }
    compare(h.data(), want);

    // swiglu
    auto fc = filled((size_t)rows * 8 * C, 3.0f);
    std::vector<float> act((size_t)rows * 4 * C, NAN);
    launch(Dim3{grid, 1, 1}, 256, 0, [&] { swiglu(fc.data(), act.data(), rows); });
    std::vector<double> want_act((size_t)rows * 4 * C);
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < 4 * C; ++j) {
            double u = fc[(size_t)r * 8 * C + j], v = fc[(size_t)r * 8 * C + 4 * C + j];
            want_act[(size_t)r * 4 * C + j] = u * (v / (1.0 + std::exp(-v)));
        }
    compare(act.data(), want_act);

    // pos_norm: row r of sequence r / tokens at position 3 + r % tokens, in KV slot
    // seqs - 1 - r / tokens (the sequences' slots in reverse order)
    auto qkv = filled((size_t)rows * 3 * C, 1.0f);
    auto table = filled((size_t)S * D, 1.0f);
    auto q_scale = filled(C, 2.0f), k_scale = filled(C, 2.0f);
    int seqs = (rows + tokens - 1) / tokens;
    std::vector<int> pos(rows);
    std::vector<int> slot(rows);
    for (int r = 0; r < rows; ++r) {
        pos[r] = 3 + r % tokens;
        slot[r] = seqs - 1 - r / tokens;
    }
    std::vector<float> q((size_t)rows * C, NAN), kc((size_t)seqs * H * S * D, NAN), vc(kc.size(), NAN);
    unsigned block = (unsigned)(std::max(1, (P + 31) / 32) * 32);
    launch(Dim3{grid, (unsigned)H, 1}, block, 0, [&] {
        pos_norm(qkv.data(), pos.data(), table.data(), q_scale.data(), k_scale.data(), q.data(), kc.data(),
                 vc.data(), rows, slot.data());
    });
    std::vector<double> want_q((size_t)rows * C), want_kv;
    std::vector<float> got_kv;
    for (int r = 0; r < rows; ++r) {
        int b = slot[r];
        for (int hd = 0; hd < H; ++hd) {
            std::vector<double> qh(D), kh(D);
            for (int j = 0; j < D; ++j) {
                int col = hd * D + j;
                qh[j] = (double)qkv[(size_t)r * 3 * C + col] * table[(size_t)pos[r] * D + j];
                kh[j] = (double)qkv[(size_t)r * 3 * C + C + col] * table[(size_t)pos[r] * D + j];
            }
            auto qn = normed(qh.data(), D), kn = normed(kh.data(), D);
            size_t at = (((size_t)b * H + hd) * S + pos[r]) * D;
            for (int j = 0; j < D; ++j) {
                int col = hd * D + j;
                want_q[(size_t)r * C + col] = qn[j] * q_scale[col];
                want_kv.push_back(kn[j] * k_scale[col]);
                want_kv.push_back(qkv[(size_t)r * 3 * C + 2 * C + col]);
                got_kv.push_back(kc[at + j]);
                got_kv.push_back(vc[at + j]);
            }
        }
    }
    compare(q.data(), want_q);
    compare(got_kv.data(), want_kv);

    // embed_pos: the token row plus the learned position row
    {
        auto wpe = filled((size_t)S * C, 1.0f);
        std::vector<float> e((size_t)rows * C, NAN);
        launch(Dim3{grid, 1, 1}, 256, 0,
               [&] { embed_pos(tok.data(), pos.data(), wte.data(), wpe.data(), e.data(), rows); });
        std::vector<double> want_e((size_t)rows * C);
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < C; ++c)
                want_e[(size_t)r * C + c] = (double)wte[(size_t)tok[r] * C + c] + wpe[(size_t)pos[r] * C + c];
        compare(e.data(), want_e);
    }

    // lerp_norm_bias (in place on h): the branch's bias added before its norm
    {
        auto bias = filled(C, 0.3f);
        std::vector<double> hb0(h.begin(), h.end());
        launch(Dim3{grid, 1, 1}, 256, 0,
               [&] { lerp_norm_bias(h.data(), branch.data(), bias.data(), lr.data(), rows); });
        for (int r = 0; r < rows; ++r) {
            std::vector<double> br(C);
            for (int c = 0; c < C; ++c) br[c] = (double)branch[(size_t)r * C + c] + bias[c];
            auto b = normed(br.data(), C);
            std::vector<double> m(C);
            for (int c = 0; c < C; ++c) m[c] = hb0[(size_t)r * C + c] + lr[c] * (b[c] - hb0[(size_t)r * C + c]);
            auto n = normed(m.data(), C);
            std::copy(n.begin(), n.end(), want.begin() + (size_t)r * C);
        }
        compare(h.data(), want);
    }

    // swiglu_bias: halves of NGPT_I columns, each with its bias
    {
        const int I = NGPT_I;
        auto uv = filled((size_t)rows * 2 * I, 3.0f);
        auto bias = filled((size_t)2 * I, 0.5f);
        std::vector<float> a((size_t)rows * I, NAN);
        launch(Dim3{grid, 1, 1}, 256, 0, [&] { swiglu_bias(uv.data(), bias.data(), a.data(), rows); });
        std::vector<double> want_a((size_t)rows * I);
        for (int r = 0; r < rows; ++r)
            for (int j = 0; j < I; ++j) {
                double u = (double)uv[(size_t)r * 2 * I + j] + bias[j];
                double v = (double)uv[(size_t)r * 2 * I + I + j] + bias[I + j];
                want_a[(size_t)r * I + j] = u * (v / (1.0 + std::exp(-v)));
            }
        compare(a.data(), want_a);
    }

    // rotary_norm: bias, the rotation of interleaved pairs by a cos/sin table (angles in
    // float64, rounded once, as the compiler writes it), the per-head norm, the q scale;
    // k and v into the caches at (slot, position)
    {
        auto bias = filled((size_t)3 * C, 0.3f);
        std::vector<float> rt((size_t)S * D);
        for (int t = 0; t < S; ++t)
            for (int i = 0; i < P; ++i) {
                double a = t * std::pow(10000.0, -(2.0 * i) / D);
                rt[(size_t)t * D + 2 * i] = (float)std::cos(a);
                rt[(size_t)t * D + 2 * i + 1] = (float)std::sin(a);
            }
        std::vector<float> rq((size_t)rows * C, NAN), rk(kc.size(), NAN), rv(kc.size(), NAN);
        launch(Dim3{grid, (unsigned)H, 1}, block, 0, [&] {
            rotary_norm(qkv.data(), pos.data(), rt.data(), bias.data(), q_scale.data(), rq.data(), rk.data(),
                        rv.data(), rows, slot.data());
        });
        std::vector<double> want_rq((size_t)rows * C), want_rkv;
        std::vector<float> got_rkv;
        for (int r = 0; r < rows; ++r) {
            int b = slot[r];
            const float* m = rt.data() + (size_t)pos[r] * D;
            for (int hd = 0; hd < H; ++hd) {
                std::vector<double> qh(D), kh(D);
                for (int i = 0; i < P; ++i) {
                    int col = hd * D + 2 * i;
                    const float* row = qkv.data() + (size_t)r * 3 * C;
                    double a = (double)row[col] + bias[col], e = (double)row[col + 1] + bias[col + 1];
                    qh[2 * i] = a * m[2 * i] - e * m[2 * i + 1];
                    qh[2 * i + 1] = e * m[2 * i] + a * m[2 * i + 1];
                    a = (double)row[C + col] + bias[C + col];
                    e = (double)row[C + col + 1] + bias[C + col + 1];
                    kh[2 * i] = a * m[2 * i] - e * m[2 * i + 1];
                    kh[2 * i + 1] = e * m[2 * i] + a * m[2 * i + 1];
                }
                auto qn = normed(qh.data(), D), kn = normed(kh.data(), D);
                size_t at = (((size_t)b * H + hd) * S + pos[r]) * D;
                for (int j = 0; j < D; ++j) {
                    int col = hd * D + j;
                    want_rq[(size_t)r * C + col] = qn[j] * q_scale[col];
                    want_rkv.push_back(kn[j]);
                    want_rkv.push_back((double)qkv[(size_t)r * 3 * C + 2 * C + col] + bias[2 * C + col]);
                    got_rkv.push_back(rk[at + j]);
                    got_rkv.push_back(rv[at + j]);
                }
            }
        }
        compare(rq.data(), want_rq);
        compare(got_rkv.data(), want_rkv);
    }

    std::printf("worst_rel_err %.6e unwritten %ld\n", worst, unwritten);
    return 0;
}
