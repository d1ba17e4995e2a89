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
// out [rows, n_heads*hd]; pattern null or [rows, n_heads, pos0+rows]. Grid (rows, n_heads),
// block 128. The last parameter is swk_attention_tiled's tile, unused here (the two kernels
// share one launcher).
extern "C" __global__ void swk_attention(const float* q, const float* kc, const float* vc, float* out,
                                         float* pattern, int rows, int pos0, int n_heads, int n_kv, int hd,
                                         int window, float scale, float softcap, u16* split, int) {
    SWK_DYNAMIC_SHARED(float, smem);
    float* red = smem;            // 32 floats of reduction scratch
    float* qs = smem + 32;        // this head's query
    float* sc = smem + 32 + hd;   // scores, then weights
    const int t = blockIdx.x;
    const int h = blockIdx.y;
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

// The online softmax of one block's (row, head) over the keys j_begin <= j < j_end of its
// window (j counts from the window's first key), in tiles of `tile` keys. Over each tile: its
// scores; the running max m grows to m' = max(m, the tile's max); the running sum and each
// output dim's accumulator are scaled by exp(m - m') and add the tile's e_j = exp(s_j - m')
// and e_j * v_j[d]. Thread x owns dims x, x + blockDim.x, ... (acc[i]). With prow, the raw
// scores are also written at their key positions. sc holds `tile` floats of shared memory,
// red 32; qs (the query) must be visible to every thread. An empty range leaves m = -inf,
// sum = 0, acc = 0.
struct OnlineSoftmax {
    float m;
    float sum;
    float acc[ATTENTION_DIMS];
    __device__ OnlineSoftmax() : m(-INFINITY), sum(0.0f) {
#pragma unroll
        for (int i = 0; i < ATTENTION_DIMS; ++i) {
            acc[i] = 0.0f;
        }
    }
    __device__ void attend(const AttentionRow& a, const float* qs, const float* kc, const float* vc, float* sc,
                           float* red, int hd, float scale, float softcap, int j_begin, int j_end, int tile,
                           float* prow) {
        for (int j0 = j_begin; j0 < j_end; j0 += tile) {
            const int n = min(tile, j_end - j0);
            float local_max = -INFINITY;
            for (int j = threadIdx.x; j < n; j += blockDim.x) {
                const float* kj = kc + (size_t)(a.first + j0 + j) * a.kv_w + (size_t)a.kvh * hd;
                const float s = attention_score(qs, kj, hd, scale, softcap);
                sc[j] = s;
                local_max = fmaxf(local_max, s);
                if (prow != nullptr) {
                    prow[a.first + j0 + j] = s;
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
            const float* v0 = vc + (size_t)(a.first + j0) * a.kv_w + (size_t)a.kvh * hd;
#pragma unroll
            for (int i = 0; i < ATTENTION_DIMS; ++i) {
                const int d = threadIdx.x + i * blockDim.x;
                if (d < hd) {
                    float x = __fmul_rn(acc[i], rescale);
                    const float* vd = v0 + d;
                    for (int j = 0; j < n; ++j) {
                        x = __fadd_rn(x, __fmul_rn(sc[j], vd[(size_t)j * a.kv_w]));
                    }
                    acc[i] = x;
                }
            }
            __syncthreads();  // the next tile overwrites sc (and, with prow, this tile's scores are written)
        }
    }
};

// Row t, head h of `out` (and its bf16 terms into `split` when not null): v(d) for the dims d
// thread x owns, as OnlineSoftmax lays them out.
template <typename F>
__device__ __forceinline__ void write_head(float* out, u16* split, int rows, int n_heads, int hd, int t, int h,
                                           F v) {
    const u64 base = ((u64)t * n_heads + h) * hd;
#pragma unroll
    for (int i = 0; i < ATTENTION_DIMS; ++i) {
        const int d = threadIdx.x + i * blockDim.x;
        if (d < hd) {
            const float x = v(i, d);
            out[base + d] = x;
            if (split != nullptr) {
                write_split(split, (u64)rows * n_heads * hd, base + d, x);
            }
        }
    }
}

// swk_attention for rows whose keys do not fit its shared memory: the keys in tiles of `tile`
// and the softmax online (OnlineSoftmax), then out[d] = acc[d] / sum. Mathematically
// swk_attention's result; in f32 it rounds differently (the division comes last, and one
// rescaling per tile). With `pattern`, the tiles write the raw scores there and the end turns
// them into the weights exp(s_j - m) / sum.
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
    const int t = blockIdx.x;
    const int h = blockIdx.y;
    if (t >= rows) {
        return;
    }
    const AttentionRow a(q, qs, t, h, pos0, n_heads, n_kv, hd, window);
    const int kv_total = pos0 + rows;
    float* prow = pattern != nullptr ? pattern + ((size_t)t * n_heads + h) * kv_total : nullptr;
    __syncthreads();

    OnlineSoftmax o;
    o.attend(a, qs, kc, vc, sc, red, hd, scale, softcap, 0, a.nk, tile, prow);
    write_head(out, split, rows, n_heads, hd, t, h, [&](int i, int) { return __fdiv_rn(o.acc[i], o.sum); });
    if (prow != nullptr) {
        for (int j = threadIdx.x; j < kv_total; j += blockDim.x) {
            prow[j] = (j >= a.first && j <= a.p) ? __fdiv_rn(expf(prow[j] - o.m), o.sum) : 0.0f;
        }
    }
}

// Decoding (a few rows, no pattern hook) with many keys, split across blocks so that a step
// fills the device: block (t, h, s) runs OnlineSoftmax over keys s * chunk .. (s + 1) * chunk
// of row t's window in tiles of `tile`, and writes its running max, sum and unnormalized
// accumulators to part[((t * n_heads + h) * splits + s) * (hd + 2) + (0, 1, 2 + d)] (an empty
// range writes -inf, 0, 0). swk_attention_merge combines them. swk_attention's q, kc, vc and
// shape parameters; grid (rows, n_heads, splits), block 128, shared (32 + hd + tile) floats.
extern "C" __global__ void swk_attention_split(const float* q, const float* kc, const float* vc, float* part,
                                               int rows, int pos0, int n_heads, int n_kv, int hd, int window,
                                               float scale, float softcap, int tile, int chunk) {
    SWK_DYNAMIC_SHARED(float, smem);
    float* red = smem;
    float* qs = smem + 32;
    float* sc = smem + 32 + hd;
    const int t = blockIdx.x;
    const int h = blockIdx.y;
    const int s = blockIdx.z;
    if (t >= rows) {
        return;
    }
    const AttentionRow a(q, qs, t, h, pos0, n_heads, n_kv, hd, window);
    __syncthreads();
    OnlineSoftmax o;
    const int j_begin = min(a.nk, s * chunk);
    o.attend(a, qs, kc, vc, sc, red, hd, scale, softcap, j_begin, min(a.nk, j_begin + chunk), tile, nullptr);
    float* pp = part + (((size_t)t * n_heads + h) * gridDim.z + s) * (hd + 2);
    if (threadIdx.x == 0) {
        pp[0] = o.m;
        pp[1] = o.sum;
    }
#pragma unroll
    for (int i = 0; i < ATTENTION_DIMS; ++i) {
        const int d = threadIdx.x + i * blockDim.x;
        if (d < hd) {
            pp[2 + d] = o.acc[i];
        }
    }
}

// The rows of swk_attention_split's `splits` partial results combined, in split order:
// M = max m_s, sum = sum of sum_s * exp(m_s - M), out[d] = (sum of acc_s[d] * exp(m_s - M)) / sum
// (a split that saw no key has m_s = -inf and weighs 0); out's bf16 terms into `split` when not
// null. Grid (rows, n_heads), block 128; hd <= ATTENTION_DIMS * 128.
extern "C" __global__ void swk_attention_merge(const float* part, float* out, u16* split, int rows, int n_heads,
                                               int hd, int splits) {
    const int t = blockIdx.x;
    const int h = blockIdx.y;
    if (t >= rows) {
        return;
    }
    const float* pp = part + ((size_t)t * n_heads + h) * splits * (hd + 2);
    float m = -INFINITY;
    for (int s = 0; s < splits; ++s) {
        m = fmaxf(m, pp[(size_t)s * (hd + 2)]);
    }
    float sum = 0.0f;
    float acc[ATTENTION_DIMS];
#pragma unroll
    for (int i = 0; i < ATTENTION_DIMS; ++i) {
        acc[i] = 0.0f;
    }
    for (int s = 0; s < splits; ++s) {
        const float* ps = pp + (size_t)s * (hd + 2);
        if (ps[0] == -INFINITY) {
            continue;
        }
        const float w = expf(ps[0] - m);
        sum = __fadd_rn(sum, __fmul_rn(ps[1], w));
#pragma unroll
        for (int i = 0; i < ATTENTION_DIMS; ++i) {
            const int d = threadIdx.x + i * blockDim.x;
            if (d < hd) {
                acc[i] = __fadd_rn(acc[i], __fmul_rn(ps[2 + d], w));
            }
        }
    }
    write_head(out, split, rows, n_heads, hd, t, h, [&](int i, int) { return __fdiv_rn(acc[i], sum); });
}

// Queries per block of swk_attention_rows (the host's kernels::ATTENTION_ROWS).
#define ATTENTION_ROWS 16
// Output dims per thread of swk_attention_rows: head_dim <= ATTENTION_ROW_DIMS * blockDim.x;
// of swk_attention_rows_wide, ATTENTION_WIDE_DIMS (DeepSeek's 576-wide latent rows).
#define ATTENTION_ROW_DIMS 2
#define ATTENTION_WIDE_DIMS 5

// Attention for queries that share their keys, ATTENTION_ROWS (16) of them a block: `group`
// heads of one KV head (grouped-query attention; `group` divides n_heads / n_kv) times
// 16 / group consecutive rows. Each tile of `tile` keys (a power of two, at most 32) and its
// values is read once into shared memory for all of them, where swk_attention reads them
// again for every row and head. The softmax is online per query, as in swk_attention_tiled:
// per tile,
//   1. the scores of every (query, key) pair, each the sequential f32 dot of swk_attention
//      (the same bits), masked to -inf outside the query's causal (or sliding) window;
//   2. per query, the running max m grows to m' = max(m, the tile's max); the running sum and
//      the query's accumulators are scaled by exp(m - m') and take e_j = exp(s_j - m') (a
//      query that has seen no key yet keeps m = -inf and adds nothing);
//   3. each thread adds e_j * v_j[d] over the tile to its dims d of every query.
// Without `part`: out = acc / sum, and its bf16 terms into `split` when not null. With `part`
// (decoding split over blocks): block z takes keys chunk * z .. chunk * (z + 1) of the block's
// range and writes each query's m, sum and acc to part as swk_attention_split does, for
// swk_attention_merge.
// When vc == kc (latent attention: the values are the cache rows the keys are), a tile's rows
// are read once and serve as both.
// swk_attention's parameters (pattern must be null), `tile`, `group`, `chunk` and `part`; grid
// (ceil(rows / (16 / group)), n_heads / group, splits), block 128; hd <= DIMS * 128.
// Shared memory, in floats: the queries ATTENTION_ROWS * (hd + 1), the keys tile * (hd + 1),
// the values tile * hd (none when vc == kc), the weights ATTENTION_ROWS * tile, and per query
// its max, sum and rescaling (3 * ATTENTION_ROWS); the +1 pads rows read across threads onto
// different banks.
// `smem` is the launch's dynamic shared memory (declared by the kernels that call this).
template <int DIMS>
__device__ __forceinline__ void attention_rows(float* smem, const float* q, const float* kc, const float* vc,
                                               float* out, int rows, int pos0, int n_heads, int n_kv, int hd,
                                               int window, float scale, float softcap, u16* split, int tile,
                                               int group, int chunk, float* part) {
    const int lq = hd + 1;
    const bool same = vc == kc;                   // the values are the keys' rows
    const int lv = same ? lq : hd;                // a value row's stride in shared memory
    float* qs = smem;                             // [ATTENTION_ROWS][lq]
    float* ks = qs + ATTENTION_ROWS * lq;         // [tile][lq]
    float* vs = same ? ks : ks + tile * lq;       // [tile][lv]
    float* ps = same ? vs + tile * lq : vs + tile * hd;  // [ATTENTION_ROWS][tile]
    float* row_max = ps + ATTENTION_ROWS * tile; // [ATTENTION_ROWS]
    float* row_sum = row_max + ATTENTION_ROWS;
    float* row_rescale = row_sum + ATTENTION_ROWS;
    // Query v of the block: row r0 + v / group, head h0 + v % group.
    const int per_block = ATTENTION_ROWS / group;
    const int r0 = blockIdx.x * per_block;
    const int h0 = blockIdx.y * group;
    const int n_rows = min(per_block, rows - r0);
    if (n_rows <= 0) {
        return;
    }
    const int n_q = n_rows * group;
    const int kvh = h0 / (n_heads / n_kv);
    const int kv_w = n_kv * hd;
    for (int i = threadIdx.x; i < ATTENTION_ROWS * hd; i += blockDim.x) {
        const int v = i / hd, d = i % hd;
        const size_t at = ((size_t)(r0 + v / group) * n_heads + h0 + v % group) * hd + d;
        qs[v * lq + d] = v < n_q ? q[at] : 0.0f;
    }
    if (threadIdx.x < ATTENTION_ROWS) {
        row_max[threadIdx.x] = -INFINITY;
        row_sum[threadIdx.x] = 0.0f;
    }
    // The keys any of the queries sees: from the first row's window start to the last row;
    // with `part`, this block's chunk of them.
    const int p_first = pos0 + r0;
    int k_begin = window > 0 ? max(0, p_first + 1 - window) : 0;
    int k_end = pos0 + r0 + n_rows;  // exclusive
    if (part != nullptr) {
        const int from = min(k_end, k_begin + (int)blockIdx.z * chunk);
        k_end = min(k_end, from + chunk);
        k_begin = from;
    }
    float acc[ATTENTION_ROWS][DIMS];
#pragma unroll
    for (int v = 0; v < ATTENTION_ROWS; ++v) {
#pragma unroll
        for (int i = 0; i < DIMS; ++i) {
            acc[v][i] = 0.0f;
        }
    }
    const int pairs = ATTENTION_ROWS * tile;
    for (int k0 = k_begin; k0 < k_end; k0 += tile) {
        const int n = min(tile, k_end - k0);
        __syncthreads();  // the previous tile's keys, values and weights are read
        for (int i = threadIdx.x; i < tile * hd; i += blockDim.x) {
            const int j = i / hd, d = i % hd;
            const size_t at = (size_t)(k0 + j) * kv_w + (size_t)kvh * hd + d;
            ks[j * lq + d] = j < n ? kc[at] : 0.0f;
            if (!same) {
                vs[j * hd + d] = j < n ? vc[at] : 0.0f;
            }
        }
        __syncthreads();
        // Scores and the online softmax: the pairs of a query are `tile` adjacent lanes of one
        // warp (tile a power of two <= 32), reduced with shuffles.
        for (int i0 = 0; i0 < pairs; i0 += blockDim.x) {
            const int i = i0 + threadIdx.x;
            const int v = i / tile, j = i % tile;
            const int p = pos0 + r0 + v / group;
            const int kp = k0 + j;
            const bool seen = i < pairs && v < n_q && j < n && kp <= p &&
                              (window <= 0 || kp > p - window);
            float s = -INFINITY;
            if (seen) {
                s = attention_score(qs + v * lq, ks + j * lq, hd, scale, softcap);
            }
            float tmax = s;
            for (int o = tile / 2; o > 0; o >>= 1) {
                tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
            }
            const float m_old = i < pairs ? row_max[v] : -INFINITY;
            const float m_new = fmaxf(m_old, tmax);
            const bool none = m_new == -INFINITY;  // the query has seen no key yet
            const float e = (seen && !none) ? expf(s - m_new) : 0.0f;
            float tsum = e;
            for (int o = tile / 2; o > 0; o >>= 1) {
                tsum += __shfl_xor_sync(0xffffffffu, tsum, o);
            }
            if (i < pairs) {
                ps[v * tile + j] = e;
                if (j == 0) {
                    const float rescale = none ? 1.0f : expf(m_old - m_new);
                    row_rescale[v] = rescale;
                    row_sum[v] = __fadd_rn(__fmul_rn(row_sum[v], rescale), tsum);
                    row_max[v] = m_new;
                }
            }
        }
        __syncthreads();
#pragma unroll
        for (int di = 0; di < DIMS; ++di) {
            const int d = threadIdx.x + di * blockDim.x;
            if (d < hd) {
#pragma unroll
                for (int v = 0; v < ATTENTION_ROWS; ++v) {
                    float a = __fmul_rn(acc[v][di], row_rescale[v]);
                    for (int j = 0; j < n; ++j) {
                        a = __fadd_rn(a, __fmul_rn(ps[v * tile + j], vs[j * lv + d]));
                    }
                    acc[v][di] = a;
                }
            }
        }
    }
    __syncthreads();
    const u64 total = (u64)rows * n_heads * hd;
#pragma unroll
    for (int di = 0; di < DIMS; ++di) {
        const int d = threadIdx.x + di * blockDim.x;
        if (d < hd) {
#pragma unroll
            for (int v = 0; v < ATTENTION_ROWS; ++v) {  // unrolled: acc stays in registers
                if (v >= n_q) {
                    break;
                }
                const u64 th = (u64)(r0 + v / group) * n_heads + h0 + v % group;
                if (part != nullptr) {
                    float* pp = part + (th * gridDim.z + blockIdx.z) * (hd + 2);
                    if (d == 0) {
                        pp[0] = row_max[v];
                        pp[1] = row_sum[v];
                    }
                    pp[2 + d] = acc[v][di];
                } else {
                    const float x = __fdiv_rn(acc[v][di], row_sum[v]);
                    out[th * hd + d] = x;
                    if (split != nullptr) {
                        write_split(split, total, th * hd + d, x);
                    }
                }
            }
        }
    }
}

extern "C" __global__ void swk_attention_rows(const float* q, const float* kc, const float* vc, float* out,
                                              float* pattern, int rows, int pos0, int n_heads, int n_kv,
                                              int hd, int window, float scale, float softcap, u16* split,
                                              int tile, int group, int chunk, float* part) {
    (void)pattern;
    SWK_DYNAMIC_SHARED(float, smem);
    attention_rows<ATTENTION_ROW_DIMS>(smem, q, kc, vc, out, rows, pos0, n_heads, n_kv, hd, window, scale,
                                       softcap, split, tile, group, chunk, part);
}

// swk_attention_rows for head dims past ATTENTION_ROW_DIMS * 128, up to ATTENTION_WIDE_DIMS * 128
// (its accumulators take more registers, so the narrow kernel stays separate).
extern "C" __global__ void swk_attention_rows_wide(const float* q, const float* kc, const float* vc, float* out,
                                                   float* pattern, int rows, int pos0, int n_heads, int n_kv,
                                                   int hd, int window, float scale, float softcap, u16* split,
                                                   int tile, int group, int chunk, float* part) {
    (void)pattern;
    SWK_DYNAMIC_SHARED(float, smem);
    attention_rows<ATTENTION_WIDE_DIMS>(smem, q, kc, vc, out, rows, pos0, n_heads, n_kv, hd, window, scale,
                                        softcap, split, tile, group, chunk, part);
}
