// Embedding gather and dtype conversions.
#include "common.cuh"

// x[t, :] = emb[tokens[t], :] * scale (sqrt(hidden) for Gemma, else 1) for embeddings
// [vocab, h] stored as WT (f32, bf16 or f16; see load_w), widened exactly. One thread per
// output element.
template <typename WT>
__device__ __forceinline__ void embed_rows(const WT* emb, const u32* tokens, float* x, int rows, int h,
                                           float scale) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * h) {
        return;
    }
    const u64 t = i / h;
    const u64 c = i % h;
    x[i] = __fmul_rn(load_w(emb, (u64)tokens[t] * h + c), scale);
}

extern "C" __global__ void swk_embed_f32(const float* emb, const u32* tokens, float* x, int rows, int h,
                                         float scale) {
    embed_rows<float>(emb, tokens, x, rows, h, scale);
}

extern "C" __global__ void swk_embed_bf16(const u16* emb, const u32* tokens, float* x, int rows, int h,
                                          float scale) {
    embed_rows<u16>(emb, tokens, x, rows, h, scale);
}

extern "C" __global__ void swk_embed_f16(const f16w* emb, const u32* tokens, float* x, int rows, int h,
                                         float scale) {
    embed_rows<f16w>(emb, tokens, x, rows, h, scale);
}

// out[i] = f32(in[i]) (exact) of n 2-byte values. Grid-stride loop: any grid size covers n.
template <typename WT>
__device__ __forceinline__ void widen_all(const WT* in, float* out, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = load_w(in, i);
    }
}

extern "C" __global__ void swk_bf16_to_f32(const u16* in, float* out, u64 n) {
    widen_all<u16>(in, out, n);
}

extern "C" __global__ void swk_f16_to_f32(const f16w* in, float* out, u64 n) {
    widen_all<f16w>(in, out, n);
}

// out[i] = f16(in[i]), round to nearest even. Grid-stride loop.
extern "C" __global__ void swk_f32_to_f16(const float* in, u16* out, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = f32_to_f16_bits(in[i]);
    }
}

// out[i] = bf16(in[i]), round to nearest even. Grid-stride loop.
extern "C" __global__ void swk_f32_to_bf16(const float* in, u16* out, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = f32_to_bf16_bits(in[i]);
    }
}

// Normal(mean, std) values from a counter-based hash (SplitMix64 of seed and index, then
// Box-Muller), for synthetic models filled directly on the device (timing runs). The same
// (seed, n) always gives the same bits; they are NOT the bits of swk::synth::random_llama.
__device__ __forceinline__ float hash_normal(u64 seed, u64 i) {
    const u64 a = mix64(seed ^ mix64(2ull * i + 1ull));
    const u64 b = mix64(seed ^ mix64(2ull * i + 2ull));
    const double u1 = 1.0 - (double)(a >> 11) * (1.0 / 9007199254740992.0);  // (0, 1]
    const double u2 = (double)(b >> 11) * (1.0 / 9007199254740992.0);        // [0, 1)
    return (float)(sqrt(-2.0 * log(u1)) * cospi(2.0 * u2));
}

extern "C" __global__ void swk_fill_normal_f32(float* out, u64 n, u64 seed, float mean, float std) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = mean + std * hash_normal(seed, i);
    }
}

extern "C" __global__ void swk_fill_normal_bf16(u16* out, u64 n, u64 seed, float mean, float std) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = f32_to_bf16_bits(mean + std * hash_normal(seed, i));
    }
}

extern "C" __global__ void swk_fill_normal_f16(u16* out, u64 n, u64 seed, float mean, float std) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = f32_to_f16_bits(mean + std * hash_normal(seed, i));
    }
}
