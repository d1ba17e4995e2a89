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
// Rows with more keys than that fit run `swk_attention_tiled` instead (below): the same
// attention with the softmax taken online over tiles of keys, in a fixed shared memory.
// With `pattern` non-null, the weights are also written there (the `attn.hook_pattern` hook
// point): pattern[(t * n_heads + h) * (pos0 + rows) + j] for every key j < pos0 + rows, 0 for
// the keys outside the causal (or sliding) window. With `split` not null, out's two bf16 terms
// also go there ([2 * rows * n_heads * hd], write_split): the o_proj's input under the
// `cublas-split` engine.
#include "common.cuh"

// Output dims each thread of swk_attention_tiled accumulates: head_dim <= ATTENTION_DIMS *
// blockDim.x (the host's kernels::ATTENTION_DIMS).
#define ATTENTION_DIMS 8

// The block of query row t, head h, of either kernel: its position p, kv head, cache row width,
// first key and key count. Constructing it loads the head's query into qs (shared memory; a
// barrier must follow before other threads read it).
struct AttentionRow {
    int p;
    int kvh;
    int kv_w;
    int first;
    int nk;
    __device__ AttentionRow(const float* q, float* qs, int t, int h, int pos0, int n_heads, int n_kv, int hd,
                            int window)
        : p(pos0 + t),
          kvh(h / (n_heads / n_kv)),
          kv_w(n_kv * hd),
          first(window > 0 ? max(0, pos0 + t + 1 - window) : 0),
          nk(pos0 + t + 1 - first) {
        const float* qh = q + ((size_t)t * n_heads + h) * hd;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) {
            qs[d] = qh[d];
        }
    }
};

// One key's score: the sequential f32 dot of the query (in shared memory) with key row kj,
// times scale, soft-capped when softcap > 0.
__device__ __forceinline__ float attention_score(const float* qs, const float* kj, int hd, float scale,
                                                 float softcap) {
    float dot = 0.0f;
    for (int d = 0; d < hd; ++d) {
        dot = __fadd_rn(dot, __fmul_rn(qs[d], kj[d]));
    }
    float s = __fmul_rn(dot, scale);
    if (softcap > 0.0f) {
        s = __fmul_rn(softcap, tanhf(__fdiv_rn(s, softcap)));
    }
    return s;
}

// q [rows, n_heads*hd] at positions pos0..pos0+rows; kc, vc the cache [>= pos0+rows, n_kv*hd];
// out [rows, n_heads*hd]; pattern null or [rows, n_heads, pos0+rows]. Grid (n_heads, rows),
// block 128. The last parameter is swk_attention_tiled's tile, unused here (the two kernels
// share one launcher).
extern "C" __global__ void swk_attention(const float* q, const float* kc, const float* vc, float* out,
                                         float* pattern, int rows, int pos0, int n_heads, int n_kv, int hd,
                                         int window, float scale, float softcap, u16* split, int) {
    SWK_DYNAMIC_SHARED(float, smem);
    float* red = smem;            // 32 floats of reduction scratch
    float* qs = smem + 32;        // this head's query
    float* sc = smem + 32 + hd;   // scores, then weights
    const int h = blockIdx.x;
    const int t = blockIdx.y;
    if (t >= rows) {
        return;
    }
    const AttentionRow a(q, qs, t, h, pos0, n_heads, n_kv, hd, window);
    const int p = a.p, kvh = a.kvh, kv_w = a.kv_w, first = a.first, nk = a.nk;
    __syncthreads();

    float local_max = -INFINITY;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) {
        const float* kj = kc + (size_t)(first + j) * kv_w + (size_t)kvh * hd;
        const float s = attention_score(qs, kj, hd, scale, softcap);
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

// swk_attention for rows whose keys do not fit its shared memory: the keys in tiles of `tile`
// and the softmax online. Over each tile: its scores; the running max m grows
// to m' = max(m, the tile's max); the running sum and each output dim's accumulator are scaled
// by exp(m - m') and add the tile's e_j = exp(s_j - m') and e_j * v_j[d]. At the end
// out[d] = acc[d] / sum. Mathematically swk_attention's result; in f32 it rounds differently
// (the division comes last, and one rescaling per tile). With `pattern`, the tiles write the
// raw scores there and the end turns them into the weights exp(s_j - m) / sum.
// swk_attention's parameters and grid, and `tile`; shared memory (32 + hd + tile) floats whatever
// the row's length; hd <= ATTENTION_DIMS * blockDim.x.
extern "C" __global__ void swk_attention_tiled(const float* q, const float* kc, const float* vc, float* out,
                                               float* pattern, int rows, int pos0, int n_heads, int n_kv,
                                               int hd, int window, float scale, float softcap, u16* split,
                                               int tile) {
    SWK_DYNAMIC_SHARED(float, smem);
    float* red = smem;
    float* qs = smem + 32;
    float* sc = smem + 32 + hd;  // one tile's scores, then its e_j
    const int h = blockIdx.x;
    const int t = blockIdx.y;
    if (t >= rows) {
        return;
    }
    const AttentionRow a(q, qs, t, h, pos0, n_heads, n_kv, hd, window);
    const int p = a.p, kvh = a.kvh, kv_w = a.kv_w, first = a.first, nk = a.nk;
    const int kv_total = pos0 + rows;
    float* prow = pattern != nullptr ? pattern + ((size_t)t * n_heads + h) * kv_total : nullptr;
    __syncthreads();

    float m = -INFINITY;
    float sum = 0.0f;
    float acc[ATTENTION_DIMS];
#pragma unroll
    for (int i = 0; i < ATTENTION_DIMS; ++i) {
        acc[i] = 0.0f;
    }
    for (int j0 = 0; j0 < nk; j0 += tile) {
        const int n = min(tile, nk - j0);
        float local_max = -INFINITY;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const float* kj = kc + (size_t)(first + j0 + j) * kv_w + (size_t)kvh * hd;
            const float s = attention_score(qs, kj, hd, scale, softcap);
            sc[j] = s;
            local_max = fmaxf(local_max, s);
            if (prow != nullptr) {
                prow[first + j0 + j] = s;
            }
        }
        const float m_new = fmaxf(m, block_reduce(local_max, MaxOp(), red));
        const float rescale = expf(m - m_new);  // 0 on the first tile (m = -inf)
        float local_sum = 0.0f;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const float e = expf(sc[j] - m_new);
            sc[j] = e;
            local_sum += e;
        }
        // block_reduce's second barrier comes after every e_j is written: sc is visible.
        sum = __fadd_rn(__fmul_rn(sum, rescale), block_reduce(local_sum, SumOp(), red));
        m = m_new;
        const float* v0 = vc + (size_t)(first + j0) * kv_w + (size_t)kvh * hd;
#pragma unroll
        for (int i = 0; i < ATTENTION_DIMS; ++i) {
            const int d = threadIdx.x + i * blockDim.x;
            if (d < hd) {
                float a = __fmul_rn(acc[i], rescale);
                const float* vd = v0 + d;
                for (int j = 0; j < n; ++j) {
                    a = __fadd_rn(a, __fmul_rn(sc[j], vd[(size_t)j * kv_w]));
                }
                acc[i] = a;
            }
        }
        __syncthreads();  // the next tile overwrites sc (and, with a pattern, this tile's scores are written)
    }

    float* o = out + ((size_t)t * n_heads + h) * hd;
#pragma unroll
    for (int i = 0; i < ATTENTION_DIMS; ++i) {
        const int d = threadIdx.x + i * blockDim.x;
        if (d < hd) {
            const float v = __fdiv_rn(acc[i], sum);
            o[d] = v;
            if (split != nullptr) {
                const u64 n = (u64)rows * n_heads * hd;
                write_split(split, n, ((u64)t * n_heads + h) * hd + d, v);
            }
        }
    }
    if (prow != nullptr) {
        for (int j = threadIdx.x; j < kv_total; j += blockDim.x) {
            prow[j] = (j >= first && j <= p) ? __fdiv_rn(expf(prow[j] - m), sum) : 0.0f;
        }
    }
}
