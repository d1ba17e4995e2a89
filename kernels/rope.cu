// RoPE, Hugging Face "rotate_half" layout: within each head the pairs are (i, i + r/2) for
// the first r = 2 * rot_half dims (r = head_dim unless RoPE is partial, as in Phi); the other
// dims pass through. angle = pos * inv_freq[i] (f32 product), cos/sin in f64 then rounded to
// f32, exactly as cpu::rope / cpu::rope_partial compute them.
#include "common.cuh"

// In place on x [rows, n_heads * head_dim]; row t is at position pos0 + t.
// One thread per (row, head, i < rot_half): grid ceil(rows*n_heads*rot_half / 256), block 256.
extern "C" __global__ void swk_rope(float* x, const float* inv_freq, int rows, int n_heads, int head_dim, int rot_half,
                                    int pos0) {
    const int half = rot_half;
    const u64 total = (u64)rows * n_heads * half;
    const u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) {
        return;
    }
    const int i = (int)(idx % half);
    const u64 th = idx / half;
    const int h = (int)(th % n_heads);
    const u64 t = th / n_heads;
    const float pos = (float)(pos0 + (int)t);
    const double a = (double)__fmul_rn(pos, inv_freq[i]);
    const float c = (float)cos(a);
    const float s = (float)sin(a);
    float* hp = x + (t * n_heads + h) * head_dim;
    const float x0 = hp[i];
    const float x1 = hp[i + half];
    hp[i] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    hp[i + half] = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
}
