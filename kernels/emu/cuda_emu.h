// The CUDA dialect of kernels/*.cu as plain C++, for swk's CPU emulator (cargo feature
// `cuda-emu`, see kernels/emu/emu.cpp). Included before the kernels, it maps every CUDA
// keyword and intrinsic they use onto host C++:
//
// - __global__ / __device__ functions are ordinary functions; `__shared__` variables are
//   `static` (the emulator runs one block at a time, so a static is exactly one block's
//   shared memory); dynamic shared memory is the launch's buffer (SWK_DYNAMIC_SHARED).
// - threadIdx / blockIdx / blockDim / gridDim are globals the scheduler sets before it resumes
//   each emulated thread.
// - __syncthreads, __syncwarp and the warp shuffles are barriers of the scheduler: every
//   thread of the block (or of the warp) runs until it reaches them, then all go on.
// - The `_rn` arithmetic intrinsics are plain IEEE f32 and f64 operations (compiled with
//   -ffp-contract=off, so nothing is fused behind the kernel's back); fmaf is a true fma.
//   expf/exp/log/sin/cos come from the host's libm and may differ from CUDA's in the last
//   bits: the emulator checks logic, not the GPU's exact rounding of transcendentals.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define SWK_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(swk_emu::dynamic_shared())

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};

extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

namespace swk_emu {
// Wait until every live thread of the block reaches this barrier.
void barrier_block();
// Exchange `size` bytes with lane (own lane ^ lane_mask) of the same warp.
void shuffle_xor(const void* in, void* out, std::size_t size, int lane_mask);
// Every lane of the warp deposits `size` bytes (at most 32); each receives all 32 lanes'
// deposits at `all`, in lane order.
void warp_all(const void* in, void* all, std::size_t size);
// The launch's dynamic shared memory.
void* dynamic_shared();
}  // namespace swk_emu

// Marks the emulator's build for the kernels (which then use the emulated warp-collective
// instructions below in place of inline PTX).
#define SWK_CUDA_EMU 1

inline void __syncthreads() { swk_emu::barrier_block(); }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
    T out;
    swk_emu::shuffle_xor(&v, &out, sizeof(T), lane_mask);
    return out;
}

// __syncwarp: a warp barrier (a shuffle of nothing with one's own lane).
inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) {
    char in = 0, out = 0;
    swk_emu::shuffle_xor(&in, &out, 1, 0);
}

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __longlong_as_double(long long u) {
    double d;
    std::memcpy(&d, &u, sizeof d);
    return d;
}
inline long long __double_as_longlong(double d) {
    long long u;
    std::memcpy(&u, &d, sizeof u);
    return u;
}
inline double cospi(double x) { return std::cos(3.14159265358979323846 * x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// Emulated threads never run at the same time, so the atomics are plain read-modify-writes.
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
    const unsigned long long old = *p;
    if (v > old) {
        *p = v;
    }
    return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    const unsigned long long old = *p;
    *p = old + v;
    return old;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    const unsigned old = *p;
    *p = old + v;
    return old;
}
// One block runs at a time and memory is the host's: fences have nothing to order.
inline void __threadfence() {}
// A load that bypasses L1 on the device: a plain load here.
template <typename T>
inline T __ldcg(const T* p) {
    return *p;
}

// An IEEE half's bits as f32 (exact), for the emulated f16 mma below.
inline float swk_emu_f16_to_f32(unsigned h) {
    const unsigned sign = (h & 0x8000u) << 16;
    const unsigned e = (h >> 10) & 0x1fu;
    const unsigned m = h & 0x3ffu;
    if (e == 0x1fu) {
        return __uint_as_float(sign | 0x7f800000u | (m << 13));
    }
    if (e != 0u) {
        return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
    }
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;
    return sign != 0u ? -v : v;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (f16: IEEE half inputs),
// D = A·B + D, emulated across the warp with the PTX ISA's fragment layout
// (lane = 4 · group + t, group = lane / 4, t = lane % 4):
// - A (16 × 16, row-major) word r of a lane: row group + 8 · (r % 2), k 2t + 8 · (r / 2)
//   (low 16 bits) and the k after it (high 16 bits);
// - B (16 × 8) word r: column group, k 2t + 8r and the k after it;
// - D (16 × 8) element r: row group + 8 · (r / 2), column 2t + r % 2.
// Products of bf16 or f16 values are exact in f32; this adds them to D's element in k order
// with an fma. The tensor cores' own order and rounding of the sum may differ in the last
// bits.
inline void swk_emu_mma_16816(float* d, const unsigned* a, const unsigned* b, bool f16) {
    struct Frag {
        unsigned a[4];
        unsigned b[2];
    };
    Frag mine;
    std::memcpy(mine.a, a, sizeof mine.a);
    std::memcpy(mine.b, b, sizeof mine.b);
    Frag all[32];
    swk_emu::warp_all(&mine, all, sizeof(Frag));
    const unsigned lane = threadIdx.x & 31u;
    const unsigned group = lane >> 2;
    const unsigned t = lane & 3u;
    auto term = [f16](unsigned word, unsigned k) {
        const unsigned bits = k % 2 == 0 ? word & 0xffffu : word >> 16;
        return f16 ? swk_emu_f16_to_f32(bits) : __uint_as_float(bits << 16);
    };
    for (unsigned r = 0; r < 4; ++r) {
        const unsigned row = group + 8 * (r / 2);
        const unsigned col = 2 * t + r % 2;
        float acc = d[r];
        for (unsigned k = 0; k < 16; ++k) {
            const unsigned owner = (k % 8) / 2;  // t of the lanes holding this k
            const float av = term(all[(row % 8) * 4 + owner].a[row / 8 + 2 * (k / 8)], k);
            const float bv = term(all[col * 4 + owner].b[k / 8], k);
            acc = std::fma(av, bv, acc);
        }
        d[r] = acc;
    }
}
