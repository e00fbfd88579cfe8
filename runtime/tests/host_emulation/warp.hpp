// Just enough CUDA to run one of the runtime's kernels on the CPU, for
// runtime/tests/host_emulation.rs: each block's threads are OS threads, __syncthreads and
// warp collectives are barriers, and mma.sync m16n8k16 (bf16 in, f32 out) is computed
// from the fragments every lane of the warp holds, by the layout in the PTX ISA
// ("Matrix Fragments for mma.m16n8k16 with floating point type"), written out here
// independently of the kernel's own index arithmetic.
#pragma once
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct Dim3 {
    unsigned x, y, z;
};
thread_local Dim3 threadIdx, blockIdx;
static Dim3 blockDim, gridDim;

// Aligned as CUDA's vector types are, so that g++'s -fsanitize=alignment (on in
// host_emulation.rs) stops at a misaligned vector access, a fault on a GPU.
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
using std::max;
using std::min;

#define __device__
#define __forceinline__ inline
#define __global__
#define __launch_bounds__(...)
// One block runs at a time, so a function's static arrays are its block's shared memory.
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __trap() std::abort()

constexpr int kMaxWarps = 32;
static std::barrier<>* g_block;
static std::barrier<>* g_warp[kMaxWarps];
#define __syncthreads() g_block->arrive_and_wait()

static float g_xch[kMaxWarps][32];
// The value lane `src(l)` passed, for every lane l of the warp (all of which call it).
template <typename F>
inline float warp_exchange(float v, F src) {
    int w = threadIdx.x / 32, l = threadIdx.x % 32;
    g_xch[w][l] = v;
    g_warp[w]->arrive_and_wait();
    float r = g_xch[w][src(l) & 31];
    g_warp[w]->arrive_and_wait();
    return r;
}
inline float __shfl_xor_sync(unsigned, float v, int o) {
    return warp_exchange(v, [o](int l) { return l ^ o; });
}
inline float __shfl_sync(unsigned, float v, int src) {
    return warp_exchange(v, [src](int) { return src; });
}
inline void __syncwarp() { g_warp[threadIdx.x / 32]->arrive_and_wait(); }

// Global memory: loads through the read-only path are plain loads; atomics and fences are
// the compiler's (blocks may be processes sharing one mapping, see launch_resident).
template <typename T>
inline T __ldg(const T* p) {
    return *p;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
// A clock that lets other threads run: spin loops read it on every pass.
inline long long clock64() {
    std::this_thread::yield();
    return std::chrono::steady_clock::now().time_since_epoch().count();
}

// The PTX helpers of decode_persistent (helpers.cu): a sequentially consistent grid
// barrier, no L2 to prefetch into, no timer, and cp.async as a plain copy, complete at
// once (so a missing wait cannot show here).
#define NGPT_HOST_EMULATION 1
inline void pd_arrive(unsigned* bar) { __atomic_fetch_add(bar, 1u, __ATOMIC_SEQ_CST); }
inline unsigned pd_arrivals(const unsigned* bar) { return __atomic_load_n(bar, __ATOMIC_SEQ_CST); }
inline void pd_arrived() {}
inline void pd_prefetch_l2(const void*) {}
inline unsigned long long pd_now() { return 0; }
inline void pd_copy16_async(void* dst, const void* src) { std::memcpy(dst, src, 16); }
inline void pd_copy_commit() {}
inline void pd_copy_wait1() {}
inline void pd_copy_wait0() {}

// helpers.cu leaves am_mma to this file.
#define NGPT_HOST_MMA 1

struct MmaIn {
    unsigned a[4], b[2];
};
static MmaIn g_mma[kMaxWarps][32];
inline float bf16_value(unsigned reg, int high) { return __uint_as_float((high ? reg >> 16 : reg & 0xffffu) << 16); }

// d += A B for the warp's m16n8k16 tile; every lane of the warp calls it together.
// A (16 x 16): a_i in register i / 2, half i % 2; rows g (i in 0,1,4,5) or g + 8, columns
// 2 tg + i % 2 (+ 8 for i >= 4). B (16 x 8): b_i in register i / 2, half i % 2; row
// 2 tg + i % 2 (+ 8 for i >= 2), column g. C (16 x 8): c_i row g (i < 2) or g + 8, column
// 2 tg + i % 2. With g = lane / 4, tg = lane % 4.
inline void am_mma(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    int w = threadIdx.x / 32, l = threadIdx.x % 32;
    g_mma[w][l] = MmaIn{{a[0], a[1], a[2], a[3]}, {b0, b1}};
    g_warp[w]->arrive_and_wait();
    int g = l / 4, tg = l % 4;
    for (int i = 0; i < 4; ++i) {
        int row = i < 2 ? g : g + 8, col = 2 * tg + i % 2;
        double acc = d[i];
        for (int k = 0; k < 16; ++k) {
            // A(row, k): a_i with i = 2 * (row >= 8) + 4 * (k >= 8) + k % 2, held by lane
            // 4 * (row % 8) + (k % 8) / 2.
            const MmaIn& ha = g_mma[w][4 * (row % 8) + (k % 8) / 2];
            float av = bf16_value(ha.a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2);
            // B(k, col): b_i with i = 2 * (k >= 8) + k % 2, held by lane 4 * col + (k % 8) / 2.
            const MmaIn& hb = g_mma[w][4 * col + (k % 8) / 2];
            float bv = bf16_value(hb.b[k >= 8 ? 1 : 0], k % 2);
            acc += (double)av * bv;
        }
        d[i] = (float)acc;
    }
    g_warp[w]->arrive_and_wait();
}

// The block's dynamic shared memory (`extern __shared__` arrays are declared as pointers
// to it: host_emulation.rs rewrites those declarations).
static float* g_dynamic_smem;

// Runs block `block_idx` of `body`: `threads` OS threads, with the block and warp barriers.
inline void run_block(Dim3 block_idx, unsigned threads, const std::function<void()>& body) {
    std::barrier<> block(threads);
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    for (unsigned w = 0; w < threads / 32; ++w) {
        warps.push_back(std::make_unique<std::barrier<>>(32));
        g_warp[w] = warps.back().get();
    }
    g_block = &block;
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            threadIdx = Dim3{t, 0, 0};
            blockIdx = block_idx;
            body();
        });
    }
    for (auto& th : pool) th.join();
}

// Device memory for launch_resident: one shared mapping, so that every block (a process)
// sees the same buffers; allocations are never freed.
struct Arena {
    char* base = nullptr;
    size_t used = 0, size = 0;
    explicit Arena(size_t bytes) : size(bytes) {
        void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) std::abort();
        base = static_cast<char*>(p);
    }
    template <typename T>
    T* alloc(size_t n) {
        used = (used + 255) / 256 * 256;
        T* p = reinterpret_cast<T*>(base + used);
        used += n * sizeof(T);
        if (used > size) std::abort();
        return p;
    }
};

// Runs `body` as a grid whose blocks are all resident at once, as decode_persistent's grid
// barrier needs: each block is a process (forked after the arena was filled, so its
// static "__shared__" variables are its own) with `threads` threads. Returns whether every
// block exited normally.
inline bool launch_resident(Dim3 grid, unsigned threads, size_t shared, const std::function<void()>& body) {
    std::fflush(nullptr);
    std::vector<pid_t> pids;
    for (unsigned bx = 0; bx < grid.x; ++bx) {
        pid_t pid = fork();
        if (pid == 0) {
            std::vector<float> dynamic(shared / sizeof(float) + 4);
            g_dynamic_smem = dynamic.data();
            gridDim = grid;
            blockDim = Dim3{threads, 1, 1};
            run_block(Dim3{bx, 0, 0}, threads, body);
            _exit(0);
        }
        pids.push_back(pid);
    }
    bool ok = true;
    for (pid_t pid : pids) {
        int status = 0;
        waitpid(pid, &status, 0);
        ok = ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    }
    return ok;
}

// Runs `body` as a grid of blocks of `threads` threads (a multiple of 32) with `shared`
// bytes of dynamic shared memory, one block at a time.
inline void launch(Dim3 grid, unsigned threads, size_t shared, const std::function<void()>& body) {
    std::vector<float> dynamic(shared / sizeof(float) + 4);
    g_dynamic_smem = dynamic.data();
    gridDim = grid;
    blockDim = Dim3{threads, 1, 1};
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) run_block(Dim3{bx, by, 0}, threads, body);
    }
}
