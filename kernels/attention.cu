// Causal attention of `rows` new queries against the KV cache, for prefill (rows > 1) and
// decode (rows == 1) alike. Scores are q·k times `scale`, soft-capped to
// softcap · tanh(s / softcap) when softcap > 0 (Gemma 2). GQA: query head h reads kv head
// h / (n_heads / n_kv). Optional sliding window: a query at position p sees keys
// p - window < j <= p (window 0 = none).
//
// A straightforward kernel, one block per (head, query row), mirroring cpu::attention:
//   1. each thread scores whole keys (sequential f32 dot over head_dim, times 1/sqrt(hd));
//   2. block max, exp(s - max), block sum;
//   3. the weights w_j = e_j / sum, then each thread owns output dims d and sums
//      w_j * v_j[d] over keys in order.
// Scores live in dynamic shared memory: (32 + head_dim + max_keys) floats, where max_keys is
// the most keys any row of the launch sees (the host computes it and opts in to more than
// 48 KiB of shared memory when the device allows).
// With `pattern` non-null, the weights are also written there (the `attn.hook_pattern` hook
// point): pattern[(t * n_heads + h) * (pos0 + rows) + j] for every key j < pos0 + rows, 0 for
// the keys outside the causal (or sliding) window. With `split` not null, out's two bf16 terms
// also go there ([2 * rows * n_heads * hd], write_split): the o_proj's input under the
// `cublas-split` engine.
#include "common.cuh"

// q [rows, n_heads*hd] at positions pos0..pos0+rows; kc, vc the cache [>= pos0+rows, n_kv*hd];
// out [rows, n_heads*hd]; pattern null or [rows, n_heads, pos0+rows]. Grid (n_heads, rows),
// block 128.
extern "C" __global__ void swk_attention(const float* q, const float* kc, const float* vc, float* out,
                                         float* pattern, int rows, int pos0, int n_heads, int n_kv, int hd,
                                         int window, float scale, float softcap, u16* split) {
    SWK_DYNAMIC_SHARED(float, smem);
    float* red = smem;            // 32 floats of reduction scratch
    float* qs = smem + 32;        // this head's query
    float* sc = smem + 32 + hd;   // scores, then weights
    const int h = blockIdx.x;
    const int t = blockIdx.y;
    if (t >= rows) {
        return;
    }
    const int p = pos0 + t;
    const int kvh = h / (n_heads / n_kv);
    const int kv_w = n_kv * hd;
    const int first = window > 0 ? max(0, p + 1 - window) : 0;
    const int nk = p + 1 - first;
    const float* qh = q + ((size_t)t * n_heads + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        qs[d] = qh[d];
    }
    __syncthreads();

    float local_max = -INFINITY;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) {
        const float* kj = kc + (size_t)(first + j) * kv_w + (size_t)kvh * hd;
        float dot = 0.0f;
        for (int d = 0; d < hd; ++d) {
            dot = __fadd_rn(dot, __fmul_rn(qs[d], kj[d]));
        }
        float s = __fmul_rn(dot, scale);
        if (softcap > 0.0f) {
            s = __fmul_rn(softcap, tanhf(__fdiv_rn(s, softcap)));
        }
        sc[j] = s;
        local_max = fmaxf(local_max, s);
    }
    const float mx = block_reduce(local_max, MaxOp(), red);

    float local_sum = 0.0f;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) {
        const float e = expf(sc[j] - mx);
        sc[j] = e;
        local_sum += e;
    }
    const float sum = block_reduce(local_sum, SumOp(), red);  // ends with __syncthreads: sc is visible

    // The weights e_j / sum, each divided once here rather than in every thread's loop below
    // (the same divisions, so the same values).
    for (int j = threadIdx.x; j < nk; j += blockDim.x) {
        sc[j] = __fdiv_rn(sc[j], sum);
    }
    __syncthreads();

    if (pattern != nullptr) {
        const int kv_total = pos0 + rows;
        float* row = pattern + ((size_t)t * n_heads + h) * kv_total;
        for (int j = threadIdx.x; j < kv_total; j += blockDim.x) {
            row[j] = (j >= first && j <= p) ? sc[j - first] : 0.0f;
        }
    }

    float* o = out + ((size_t)t * n_heads + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        const float* vd = vc + (size_t)first * kv_w + (size_t)kvh * hd + d;
#pragma unroll 8
        for (int j = 0; j < nk; ++j) {
            acc = __fadd_rn(acc, __fmul_rn(sc[j], vd[(size_t)j * kv_w]));
        }
        o[d] = acc;
        if (split != nullptr) {
            const u64 n = (u64)rows * n_heads * hd;
            write_split(split, n, ((u64)t * n_heads + h) * hd + d, acc);
        }
    }
}
