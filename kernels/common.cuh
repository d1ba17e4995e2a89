// Shared device helpers for swk's kernels: integer types, bf16 and f16 bit conversions, the packed
// spike key, hashing, and block reductions.
//
// Conventions of every kernel in kernels/*.cu:
// - extern "C", names prefixed `swk_`, so the host loads them by plain name.
// - Activations are f32, row-major `[rows, width]`, rows are tokens.
// - Weights are f32, bf16 or f16 (the 2-byte ones stored as raw u16 bits), Hugging Face
//   layout `[out, in]`.
// - Block sizes are multiples of 32 (the reductions below rely on whole warps).
#pragma once

// Dynamic shared memory of a launch, as an array `name` of T. Under swk's CPU emulator
// (kernels/emu) the emulator hands out the launch's buffer instead.
#ifndef SWK_DYNAMIC_SHARED
#define SWK_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

// bf16 -> f32 is exact: the bf16 bits are the high half of the f32.
__device__ __forceinline__ float bf16_bits_to_f32(u16 b) {
    return __uint_as_float(((u32)b) << 16);
}

// f32 -> bf16, round to nearest even; NaN stays a quiet NaN. Mirrors half::bf16::from_f32
// (the host-side mirror `f32_to_bf16_bits` in src/backend/cuda/kernels.rs is unit tested).
__device__ __forceinline__ u16 f32_to_bf16_bits(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((x >> 16) | 0x0040u);
    }
    u32 round_bit = 0x00008000u;
    if ((x & round_bit) != 0u && (x & (3u * round_bit - 1u)) != 0u) {
        return (u16)((x >> 16) + 1u);
    }
    return (u16)(x >> 16);
}

// The `cublas-split` engine's two bf16 terms of v (see split.cu), written at split[i] (hi)
// and split[n + i] (lo) of a [2n] bf16 buffer. Kernels that produce a product's input write
// them beside their f32 output, so the engine needs no split launch of its own.
__device__ __forceinline__ void write_split(u16* split, u64 n, u64 i, float v) {
    const u16 hi = f32_to_bf16_bits(v);
    split[i] = hi;
    split[n + i] = f32_to_bf16_bits(__fsub_rn(v, bf16_bits_to_f32(hi)));
}

// A product's value at i: y[i], or y[i] + lo[i] when the `cublas-split` engine left its two
// terms for this kernel to add (lo not null), the sum swk_add_halves would have written.
__device__ __forceinline__ float product_at(const float* y, const float* lo, u64 i) {
    return lo != nullptr ? __fadd_rn(y[i], lo[i]) : y[i];
}

// f16 (IEEE half) -> f32 is exact. Written out (not cuda_fp16.h) so that swk's CPU emulator
// compiles it too; mirrors half::f16::to_f32 (host: WeightDtype::decode in
// src/backend/dtype.rs).
__device__ __forceinline__ float f16_bits_to_f32(u16 h) {
#if defined(__CUDA_ARCH__)
    // The hardware's widening (exact) for every finite value; inf and NaN take the path
    // below, which keeps a NaN's payload as the host does.
    if (((u32)h & 0x7c00u) != 0x7c00u) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    }
#endif
    const u32 sign = ((u32)h & 0x8000u) << 16;
    const u32 e = ((u32)h >> 10) & 0x1fu;
    const u32 m = (u32)h & 0x3ffu;
    if (e == 0x1fu) {
        return __uint_as_float(sign | 0x7f800000u | (m << 13));  // inf, NaN (payload kept)
    }
    if (e != 0u) {
        return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
    }
    const float v = (float)m * 5.9604644775390625e-8f;  // subnormal or zero: m * 2^-24, exact
    return sign != 0u ? -v : v;
}

// f32 -> f16, round to nearest even; a finite value from 65520 up becomes infinity; NaN stays a
// quiet NaN. Mirrors half::f16::from_f32 (the device tests compare them).
__device__ __forceinline__ u16 f32_to_f16_bits(float f) {
    const u32 x = __float_as_uint(f);
    const u32 sign = (x >> 16) & 0x8000u;
    const u32 ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) {
        return (u16)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    }
    if (ax >= 0x477ff000u) {
        return (u16)(sign | 0x7c00u);  // 65520 and up (and infinity) round to infinity
    }
    if (ax >= 0x38800000u) {  // a normal f16: rebias the exponent, round 23 -> 10 mantissa bits
        const u32 r = ax - 0x38000000u;
        u32 h = r >> 13;
        const u32 rem = r & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u) != 0u)) {
            h += 1u;  // a carry into the exponent is the right result
        }
        return (u16)(sign | h);
    }
    if (ax < 0x33000000u) {
        return (u16)sign;  // below 2^-25: rounds to zero
    }
    // A subnormal f16: m = mantissa * 2^(e - 126), rounded to nearest even.
    const u32 e = ax >> 23;
    const u32 mant = (ax & 0x7fffffu) | 0x800000u;
    const u32 shift = 126u - e;  // 14 ..= 24
    u32 h = mant >> shift;
    const u32 rem = mant & ((1u << shift) - 1u);
    const u32 half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u) != 0u)) {
        h += 1u;
    }
    return (u16)(sign | h);
}

// A stored weight widened to f32 (exact), by storage type: f32; bf16 as raw u16 bits; f16 as
// raw u16 bits under their own type `f16w`, so that templates over the storage tell the two
// 2-byte types apart.
struct f16w {
    u16 bits;
};
__device__ __forceinline__ float load_w(const float* w, u64 i) { return w[i]; }
__device__ __forceinline__ float load_w(const u16* w, u64 i) { return bf16_bits_to_f32(w[i]); }
__device__ __forceinline__ float load_w(const f16w* w, u64 i) { return f16_bits_to_f32(w[i].bits); }

// 16 bytes loaded as one vector (one 128-bit load on the device when 16-byte aligned).
struct alignas(16) v16 {
    u32 u[4];
};

// The weights of one 16-byte vector widened to f32, in address order (4 f32, or 8 bf16 or
// f16: the element at the lower address is the low half of each 32-bit word). The pointer
// argument only selects the storage type.
__device__ __forceinline__ void widen_v16(const v16& v, float* out, const float*) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        out[j] = __uint_as_float(v.u[j]);
    }
}
__device__ __forceinline__ void widen_v16(const v16& v, float* out, const u16*) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        out[2 * j] = __uint_as_float(v.u[j] << 16);
        out[2 * j + 1] = __uint_as_float(v.u[j] & 0xffff0000u);
    }
}
__device__ __forceinline__ void widen_v16(const v16& v, float* out, const f16w*) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        out[2 * j] = f16_bits_to_f32((u16)(v.u[j] & 0xffffu));
        out[2 * j + 1] = f16_bits_to_f32((u16)(v.u[j] >> 16));
    }
}

// The packed spike key of one activation value at token position `pos`:
//
//   bits 63..33  |v| as f32 bits (31 bits: the sign bit is always 0 for |v|)
//   bits 32..1   ~pos (so that on equal |v| the EARLIEST position has the larger key)
//   bit  0       sign of v (1 = negative), to recover the signed value
//
// Unsigned comparison of keys orders by |v| first, then by earliest position, exactly the
// CPU backend's rule (`|v| > current` replaces, ties keep the earlier position). Zero and
// NaN give key 0, which means "nothing seen" (the CPU never records them either: its
// comparison `|v| > 0` is false for both). +-inf is recorded, as on the CPU.
__device__ __forceinline__ u64 spike_key(float v, u32 pos) {
    u32 bits = __float_as_uint(v);
    u32 abs_bits = bits & 0x7fffffffu;
    if (abs_bits == 0u || abs_bits > 0x7f800000u) {
        return 0ull;
    }
    return ((u64)abs_bits << 33) | ((u64)(~pos) << 1) | (u64)(bits >> 31);
}

// The MLP's activation of g (swk_act_mul, and the `mma` product that makes its input as it
// stages it), mirroring cpu::silu_mul / cpu::gelu_tanh_mul / cpu::activate:
//   act 0: silu(g) = g / (1 + exp(-g));
//   act 1: gelu_tanh(g) = (0.5 g) (1 + tanh(0.7978846 (g + ((0.044715 g) g) g)));
//   act 2: gelu(g) = 0.5 g (1 + erf(g / sqrt 2)) in f64.
__device__ __forceinline__ float gated_act(float g, int act) {
    if (act == 1) {
        const float cube = __fmul_rn(__fmul_rn(__fmul_rn(0.044715f, g), g), g);
        const float t = tanhf(__fmul_rn(0.7978846f, __fadd_rn(g, cube)));
        return __fmul_rn(__fmul_rn(0.5f, g), __fadd_rn(1.0f, t));
    }
    if (act == 2) {
        const double x = (double)g;
        return (float)(0.5 * x * (1.0 + erf(x / 1.41421356237309504880)));
    }
    return __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
}

// SplitMix64's finalizer: a bijection on 64-bit values.
__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// What one thread of a fused-statistics launch walks (swk_act_mul, swk_add_residual,
// swk_column_max): column `col` (grid x over columns) of the rows [r0, r1) of its group (grid
// y over groups of rows_per_block rows), folding each value's spike key into `best`; commit
// issues the thread's one atomicMax. Past the last column (col >= n) there is nothing to walk.
struct ColumnWalk {
    int col;
    int r0;
    int r1;
    u64 best;
    __device__ ColumnWalk(int rows, int rows_per_block)
        : col(blockIdx.x * blockDim.x + threadIdx.x),
          r0(blockIdx.y * rows_per_block),
          r1(min(rows, (int)(blockIdx.y * rows_per_block) + rows_per_block)),
          best(0ull) {}
    // Row r's position: pos[r] when pos is not null (an expert's gathered tokens), else pos0 + r.
    __device__ static u32 position(const u32* pos, int pos0, int r) {
        return pos != nullptr ? pos[r] : (u32)(pos0 + r);
    }
    __device__ void see(float v, u32 position) {
        const u64 k = spike_key(v, position);
        best = k > best ? k : best;
    }
    __device__ void commit(u64* keys) const {
        if (keys != nullptr && best != 0ull) {
            atomicMax(keys + col, best);
        }
    }
};

// The grouped products (an expert per group of rows) multiply group g's rows by weight w[s],
// s the grid index along the weights. With `pair` (not 0) each group has two weights (an
// expert's gate and up), w holding the groups' first weights then their second ones (so the
// grid spans 2 · groups weights, `weights` of them): weight s ≥ groups multiplies the rows
// of group s - groups into y + pair (an offset in floats). One launch for both products,
// each value as its own launch gives it. Returns g (and moves y for a second weight).
__device__ __forceinline__ u32 pair_group(u32 s, u32 weights, u64 pair, float*& y) {
    if (pair != 0ull && s >= weights / 2) {
        y += pair;
        return s - weights / 2;
    }
    return s;
}

struct SumOp {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduce `v` over the whole block; every thread gets the same result (each thread folds the
// per-warp partials in the same order, so the result is deterministic). `scratch` holds at
// least 32 values of T in shared memory. blockDim.x must be a multiple of 32.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    T r = scratch[0];
    for (int i = 1; i < warps; ++i) {
        r = op(r, scratch[i]);
    }
    return r;
}
