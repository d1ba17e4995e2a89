// RoPE, Hugging Face "rotate_half" layout: within each head the pairs are (i, i + r/2) for
// the first r = 2 * rot_half dims (r = head_dim unless RoPE is partial, as in Phi); the other
// dims pass through. angle = pos * inv_freq[i] (f32 product), cos/sin in f64 then rounded to
// f32, exactly as cpu::rope / cpu::rope_partial compute them.
#include "common.cuh"

// One pair (x0, x1) = (head[i], head[i + half]) at position `pos` rotated by the angle
// pos * inv_freq (f32 product; cos and sin in f64, rounded to f32).
__device__ __forceinline__ void rotate_pair(float pos, float inv_freq, float& x0, float& x1) {
    const double a = (double)__fmul_rn(pos, inv_freq);
    const float c = (float)cos(a);
    const float s = (float)sin(a);
    const float r0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    const float r1 = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
    x0 = r0;
    x1 = r1;
}

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
    float* hp = x + (t * n_heads + h) * head_dim;
    float x0 = hp[i];
    float x1 = hp[i + half];
    rotate_pair((float)(pos0 + (int)t), inv_freq[i], x0, x1);
    hp[i] = x0;
    hp[i + half] = x1;
}

// q, k and v of the `cublas-split` engine in one launch, in place of three swk_add_halves and
// two swk_rope: q = q_hi + q_lo, k = k_hi + k_lo, v = v_hi + v_lo (product_at; a null lo means
// the product was written whole), then q and k rotated exactly as swk_rope does. Each output
// is [rows, heads * head_dim] (q: n_heads heads; k, v: n_kv), row t at position pos0 + t, and
// may be the cache rows the keys and values belong in; the rows of each source (hi and lo)
// are q_ld, k_ld, v_ld elements apart (wider than heads * head_dim when q, k and v are parts
// of one product).
// Grid (ceil(rows * max(n_heads, n_kv) * (head_dim - rot_half) / 256), 3), block 256:
// blockIdx.y picks q, k or v; one thread per (row, head, j < head_dim - rot_half) takes the
// pair (j, j + rot_half) when j < rot_half, else the unrotated dim j + rot_half of a partial
// RoPE.
extern "C" __global__ void swk_qkv_rope(const float* q_hi, const float* q_lo, const float* k_hi, const float* k_lo,
                                        const float* v_hi, const float* v_lo, float* q, float* k, float* v,
                                        const float* inv_freq, int rows, int n_heads, int n_kv, int head_dim,
                                        int rot_half, int pos0, int q_ld, int k_ld, int v_ld) {
    const int which = blockIdx.y;
    const float* hi = which == 0 ? q_hi : (which == 1 ? k_hi : v_hi);
    const float* lo = which == 0 ? q_lo : (which == 1 ? k_lo : v_lo);
    float* out = which == 0 ? q : (which == 1 ? k : v);
    const int heads = which == 0 ? n_heads : n_kv;
    const int ld = which == 0 ? q_ld : (which == 1 ? k_ld : v_ld);
    const int per = head_dim - rot_half;
    const u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (u64)rows * heads * per) {
        return;
    }
    const int j = (int)(idx % per);
    const u64 th = idx / per;  // row * heads + head
    const u64 t = th / heads;
    const u64 base = th * head_dim;                                     // in the output
    const u64 src = t * (u64)ld + (th - t * heads) * (u64)head_dim;    // in the sources
    if (j >= rot_half) {
        out[base + j + rot_half] = product_at(hi, lo, src + j + rot_half);
        return;
    }
    float x0 = product_at(hi, lo, src + j);
    float x1 = product_at(hi, lo, src + j + rot_half);
    if (which < 2) {
        rotate_pair((float)(pos0 + (int)t), inv_freq[j], x0, x1);
    }
    out[base + j] = x0;
    out[base + j + rot_half] = x1;
}
