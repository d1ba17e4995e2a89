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
