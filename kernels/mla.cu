// DeepSeek's multi-head latent attention (MLA) around the ordinary attention kernel,
// mirroring model::arch::deepseek::mla: RoPE on the rope dims only, and the copies that
// assemble per-head q, k, v padded with zeros to head_dim (and take the v dims back out).
#include "common.cuh"

// dst[r * dst_stride + j] = j < cols ? src[(r / src_repeat) * src_stride + j] : 0 for
// r < rows, j < width: a strided copy of `cols` columns, zero-padded to `width`, where
// src_repeat consecutive dst rows read one src row (MLA's rope key, shared by every head).
// One thread per (r, j): grid ceil(rows * width / 256), block 256.
extern "C" __global__ void swk_copy_rows(const float* src, int src_stride, int src_repeat, float* dst,
                                         int dst_stride, int rows, int cols, int width) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * width) {
        return;
    }
    const u64 r = i / width;
    const int j = (int)(i % width);
    dst[r * dst_stride + j] = j < cols ? src[(r / src_repeat) * src_stride + j] : 0.0f;
}

// RoPE on the 2 * half dims at offset `at` of every `stride`-wide chunk of x (`heads` chunks
// per row, row t at position pos0 + t): pairs (2i, 2i + 1) when `interleave`, else (i, i + half);
// cos and sin (f64 of the f32 angle pos * inv_freq[i], rounded to f32) times `factor` (YaRN's
// attention factor, else 1), as deepseek::rope computes them.
// One thread per (row, head, i < half): grid ceil(rows * heads * half / 256), block 256.
extern "C" __global__ void swk_rope_at(float* x, const float* inv_freq, int rows, int heads, int stride, int at,
                                       int half, int pos0, int interleave, float factor) {
    const u64 total = (u64)rows * heads * half;
    const u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) {
        return;
    }
    const int i = (int)(idx % half);
    const u64 th = idx / half;
    const u64 t = th / heads;
    const float pos = (float)(pos0 + (int)t);
    const double a = (double)__fmul_rn(pos, inv_freq[i]);
    const float c = __fmul_rn((float)cos(a), factor);
    const float s = __fmul_rn((float)sin(a), factor);
    float* r = x + th * stride + at;
    const int ia = interleave ? 2 * i : i;
    const int ib = interleave ? 2 * i + 1 : i + half;
    const float x0 = r[ia];
    const float x1 = r[ib];
    r[ia] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    r[ib] = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
}

// The absorbed form of latent attention (the device's KV cache holds, per position, only
// [c (kv_lora_rank) | k_rope (d_rope)]): kv_b_proj's rows for head h are
// [W_UK_h (d_nope rows) | W_UV_h (d_v rows)], each row kv_lora_rank wide, so
//   q_nope_h · k_nope_h(s) = (q_nope_h · W_UK_h) · c(s)      (swk_mla_absorb_q_*)
//   Σ_s p_s v_h(s) = W_UV_h · (Σ_s p_s c(s))                  (swk_mla_absorb_v_*)
// Both walk MLA_ROWS query rows at once, so each weight is read once per MLA_ROWS rows.
#define MLA_ROWS 16

// out[r * out_stride + j] = Σ_{i < nope} q[r * q_stride + i] · W[(h·(nope + vd) + i)·kvr + j]
// for rows r = t·heads + h (t < rows), j < kvr: each head's q_nope times its W_UK.
// One thread per j; grid (ceil(kvr / 256), heads, ceil(rows / MLA_ROWS)), block 256.
template <typename WT>
__device__ __forceinline__ void mla_absorb_q(const float* q, int q_stride, const WT* w, float* out, int out_stride,
                                             int rows, int heads, int nope, int vd, int kvr) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int h = blockIdx.y;
    const int t0 = blockIdx.z * MLA_ROWS;
    if (j >= kvr) {
        return;
    }
    const int nr = min(MLA_ROWS, rows - t0);
    float acc[MLA_ROWS];
#pragma unroll
    for (int a = 0; a < MLA_ROWS; ++a) {
        acc[a] = 0.0f;
    }
    const WT* wh = w + (u64)h * (nope + vd) * kvr + j;
    for (int i = 0; i < nope; ++i) {
        const float wv = load_w(wh, (u64)i * kvr);
#pragma unroll
        for (int a = 0; a < MLA_ROWS; ++a) {
            if (a < nr) {
                acc[a] = fmaf(q[((u64)(t0 + a) * heads + h) * q_stride + i], wv, acc[a]);
            }
        }
    }
#pragma unroll
    for (int a = 0; a < MLA_ROWS; ++a) {
        if (a < nr) {
            out[((u64)(t0 + a) * heads + h) * out_stride + j] = acc[a];
        }
    }
}

// out[r · vd + d] = Σ_{j < kvr} ctx[r · ctx_stride + j] · W[(h·(nope + vd) + nope + d)·kvr + j]
// for rows r = t·heads + h (t < rows), d < vd: each head's attended latent times its W_UV.
// One warp per d (lanes split j, then a butterfly sum); grid (ceil(vd / 8), heads,
// ceil(rows / MLA_ROWS)), block 256.
template <typename WT>
__device__ __forceinline__ void mla_absorb_v(const float* ctx, int ctx_stride, const WT* w, float* out, int rows,
                                             int heads, int nope, int vd, int kvr) {
    const int lane = threadIdx.x & 31;
    const int d = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int h = blockIdx.y;
    const int t0 = blockIdx.z * MLA_ROWS;
    if (d >= vd) {
        return;  // a whole warp: the shuffles below are between live lanes only
    }
    const int nr = min(MLA_ROWS, rows - t0);
    float acc[MLA_ROWS];
#pragma unroll
    for (int a = 0; a < MLA_ROWS; ++a) {
        acc[a] = 0.0f;
    }
    const WT* wr = w + ((u64)h * (nope + vd) + nope + d) * kvr;
    for (int j = lane; j < kvr; j += 32) {
        const float wv = load_w(wr, (u64)j);
#pragma unroll
        for (int a = 0; a < MLA_ROWS; ++a) {
            if (a < nr) {
                acc[a] = fmaf(ctx[((u64)(t0 + a) * heads + h) * ctx_stride + j], wv, acc[a]);
            }
        }
    }
#pragma unroll
    for (int a = 0; a < MLA_ROWS; ++a) {
        float v = acc[a];
        for (int o = 16; o > 0; o >>= 1) {
            v += __shfl_xor_sync(0xffffffffu, v, o);
        }
        if (lane == 0 && a < nr) {
            out[((u64)(t0 + a) * heads + h) * vd + d] = v;
        }
    }
}

extern "C" __global__ void swk_mla_absorb_q_f32(const float* q, int q_stride, const float* w, float* out,
                                                int out_stride, int rows, int heads, int nope, int vd, int kvr) {
    mla_absorb_q<float>(q, q_stride, w, out, out_stride, rows, heads, nope, vd, kvr);
}

extern "C" __global__ void swk_mla_absorb_v_f32(const float* ctx, int ctx_stride, const float* w, float* out,
                                                int rows, int heads, int nope, int vd, int kvr) {
    mla_absorb_v<float>(ctx, ctx_stride, w, out, rows, heads, nope, vd, kvr);
}

extern "C" __global__ void swk_mla_absorb_q_bf16(const float* q, int q_stride, const u16* w, float* out,
                                                int out_stride, int rows, int heads, int nope, int vd, int kvr) {
    mla_absorb_q<u16>(q, q_stride, w, out, out_stride, rows, heads, nope, vd, kvr);
}

extern "C" __global__ void swk_mla_absorb_v_bf16(const float* ctx, int ctx_stride, const u16* w, float* out,
                                                int rows, int heads, int nope, int vd, int kvr) {
    mla_absorb_v<u16>(ctx, ctx_stride, w, out, rows, heads, nope, vd, kvr);
}

extern "C" __global__ void swk_mla_absorb_q_f16(const float* q, int q_stride, const f16w* w, float* out,
                                                int out_stride, int rows, int heads, int nope, int vd, int kvr) {
    mla_absorb_q<f16w>(q, q_stride, w, out, out_stride, rows, heads, nope, vd, kvr);
}

extern "C" __global__ void swk_mla_absorb_v_f16(const float* ctx, int ctx_stride, const f16w* w, float* out,
                                                int rows, int heads, int nope, int vd, int kvr) {
    mla_absorb_v<f16w>(ctx, ctx_stride, w, out, rows, heads, nope, vd, kvr);
}
