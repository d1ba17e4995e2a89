// The router of a mixture-of-experts layer on the device (CudaModel::sparse_mlp in moe.rs), for
// passes of at most 16 tokens (detection prompts, decoding), or of at most 2048 with swk's own
// GEMM kernels, which group experts of any row count (route.rs decides). One launch (two for
// more than 16 tokens: swk_moe_route_tokens spreads the tokens over many blocks first) turns
// the router logits into the layer's dispatch, so the pass never waits for the host between
// its kernels (and a CUDA graph can hold it). It mirrors, bit for bit where the arithmetic is
// the same IEEE operations:
//   model::arch::moe::route       softmax, top-k (ties to the lower index), renormalization;
//   model::arch::deepseek::route  softmax or sigmoid scores, V3's selection bias, expert
//                                 groups ranked by their best or best two, top-k, the
//                                 renormalization (+ 1e-20) and routed_scaling_factor;
//   Dispatch::new (route.rs)      rows grouped by expert (experts ascending, tokens ascending
//                                 within one), each token's k slots by ascending expert, and
//                                 the grouped expert kernels' groups (the experts with rows,
//                                 padded with empty groups to min(experts, tokens·k), so that
//                                 the host sizes the launches without the routes);
//   the router counters           tokens, entropy sum, per expert its tokens and the sum of
//                                 their weights (f64, in token order), as LayerTally keeps them.
// An expert no token chose is in no group, so the grouped kernels neither read its weights
// nor launch blocks for it. Sums the host does in order (the softmax's denominator, the
// entropy, the renormalization, the weight sums) are done in the same order by one lane or
// thread. expf and log are the device's, which may differ from the host's libm in the last
// bit.
#include "common.cuh"

// How a token's scores are made (`scoring`).
#define SWK_ROUTE_SOFTMAX 0            // moe::route: softmax, entropy of the f32 probabilities
#define SWK_ROUTE_DEEPSEEK_SOFTMAX 1   // deepseek::route, softmax scores
#define SWK_ROUTE_DEEPSEEK_SIGMOID 2   // deepseek::route, sigmoid scores (V3)

// How an expert group is scored (`group_score`; 0: no groups), as config::GroupScore.
#define SWK_GROUP_MAX 1
#define SWK_GROUP_TOP2_SUM 2

// Rust's f32::total_cmp as an unsigned key (a larger key sorts first), the low half ~index so
// that equal values sort the lower index first: the hosts' `sort_by(total_cmp desc, index
// asc)`. Never 0 for an index below 2^32 - 1, so 0 can stand for "none".
__device__ __forceinline__ u64 rank_key(float v, u32 index) {
    u32 b = __float_as_uint(v);
    b ^= ((u32)((int)b >> 31)) >> 1;  // negative: flip the magnitude bits (the i32 total order)
    b ^= 0x80000000u;                 // the i32 order as the u32 order
    return ((u64)b << 32) | (u64)(~index);
}

__device__ __forceinline__ u32 key_index(u64 key) { return ~(u32)key; }

__device__ __forceinline__ u64 warp_max_u64(u64 v) {
    for (int m = 16; m > 0; m >>= 1) {
        const u64 o = __shfl_xor_sync(0xffffffffu, v, m);
        v = o > v ? o : v;
    }
    return v;
}

__device__ __forceinline__ float warp_max_f32(float v) {
    for (int m = 16; m > 0; m >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
    }
    return v;
}

// Lane 0's bits in every lane (the other lanes pass 0).
__device__ __forceinline__ u32 warp_from_lane0(u32 bits) {
    for (int m = 16; m > 0; m >>= 1) {
        bits |= __shfl_xor_sync(0xffffffffu, bits, m);
    }
    return bits;
}

__device__ __forceinline__ double f64_at(const u64* p) { return __longlong_as_double((long long)*p); }

__device__ __forceinline__ void add_f64_at(u64* p, double v) {
    *p = (u64)__double_as_longlong(__dadd_rn(f64_at(p), v));
}

// Where the work buffer's arrays lie: per token its entropy (f64), per token and expert the
// entropy terms (f64), scores and choice values (f32), per token and group the group scores
// (f32), per token its k chosen experts (u32) and weights (f32), per expert its row count and
// first row (u32).
struct RouteWork {
    double* entropy;
    double* terms;
    float* scores;
    float* choice;
    float* groups;
    u32* chosen;
    float* weight;
    u32* rows;
    u32* row0;
    __device__ RouteWork(void* work, int t, int ne, int k, int n_group) {
        entropy = (double*)work;
        terms = entropy + t;
        scores = (float*)(terms + (u64)t * ne);
        choice = scores + (u64)t * ne;
        groups = choice + (u64)t * ne;
        chosen = (u32*)(groups + (u64)t * n_group);
        weight = (float*)(chosen + (u64)t * k);
        rows = (u32*)(weight + (u64)t * k);
        row0 = rows + ne;
    }
};

// One token's route, by one warp: scores, entropy, choice, group limit, top-k, weights.
__device__ void route_token(const float* z, const float* bias, int tok, int ne, int k, int scoring,
                            int n_group, int topk_group, int group_score, int renorm, float eps, float scale,
                            bool entropy, const RouteWork& w) {
    const int lane = threadIdx.x & 31;
    const float* zt = z + (u64)tok * ne;
    float* sc = w.scores + (u64)tok * ne;
    float* ch = w.choice + (u64)tok * ne;
    double* terms = w.terms + (u64)tok * ne;

    // Scores: softmax (max, exp, the sum in expert order by lane 0, division) or sigmoid.
    if (scoring == SWK_ROUTE_DEEPSEEK_SIGMOID) {
        for (int e = lane; e < ne; e += 32) {
            sc[e] = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-zt[e])));
        }
    } else {
        float m = __uint_as_float(0xff800000u);  // -inf
        for (int e = lane; e < ne; e += 32) {
            m = fmaxf(m, zt[e]);
        }
        m = warp_max_f32(m);
        for (int e = lane; e < ne; e += 32) {
            sc[e] = expf(__fsub_rn(zt[e], m));
        }
        __syncwarp();
        u32 sum_bits = 0u;
        if (lane == 0) {
            float sum = -0.0f;
            for (int e = 0; e < ne; ++e) {
                sum = __fadd_rn(sum, sc[e]);
            }
            sum_bits = __float_as_uint(sum);
        }
        const float sum = __uint_as_float(warp_from_lane0(sum_bits));
        for (int e = lane; e < ne; e += 32) {
            sc[e] = __fdiv_rn(sc[e], sum);
        }
    }
    __syncwarp();

    // The router's entropy in nats over all experts (moe::route: of the f32 probabilities;
    // deepseek::route: of the scores over their f64 sum).
    if (entropy) {
        double total = 1.0;
        if (scoring != SWK_ROUTE_SOFTMAX) {
            if (lane == 0) {
                double s = -0.0;
                for (int e = 0; e < ne; ++e) {
                    s = __dadd_rn(s, (double)sc[e]);
                }
                w.entropy[tok] = s;
            }
            __syncwarp();
            total = w.entropy[tok];
        }
        // The terms of p > 0 only (a NaN marks the others: p · ln p is NaN for no p > 0).
        for (int e = lane; e < ne; e += 32) {
            const double p = scoring == SWK_ROUTE_SOFTMAX ? (double)sc[e] : __ddiv_rn((double)sc[e], total);
            terms[e] = p > 0.0 ? __dmul_rn(p, log(p)) : __longlong_as_double(0x7ff8000000000000ll);
        }
        __syncwarp();
        if (lane == 0) {
            double s = -0.0;
            for (int e = 0; e < ne; ++e) {
                if (terms[e] == terms[e]) {
                    s = __dadd_rn(s, terms[e]);
                }
            }
            w.entropy[tok] = -s;
        }
    }

    // What the choice ranks: the scores, plus V3's selection bias.
    for (int e = lane; e < ne; e += 32) {
        ch[e] = bias != nullptr ? __fadd_rn(sc[e], bias[e]) : sc[e];
    }
    __syncwarp();

    // The group limit: keep the topk_group best groups (by their best value, or the sum of
    // their best two), mask the others' experts (-inf with sigmoid scores, 0 with softmax).
    if (group_score != 0 && n_group > 1) {
        const int per = ne / n_group;
        float* gs = w.groups + (u64)tok * n_group;
        for (int g = lane; g < n_group; g += 32) {
            u64 first = 0ull, second = 0ull;
            for (int e = g * per; e < (g + 1) * per; ++e) {
                const u64 key = rank_key(ch[e], (u32)e);
                if (key > first) {
                    second = first;
                    first = key;
                } else if (key > second) {
                    second = key;
                }
            }
            float s = ch[key_index(first)];
            if (group_score == SWK_GROUP_TOP2_SUM && per > 1) {
                s = __fadd_rn(s, ch[key_index(second)]);
            }
            gs[g] = s;
        }
        __syncwarp();
        const int keep = min(topk_group, n_group);
        const float masked = scoring == SWK_ROUTE_DEEPSEEK_SIGMOID ? __uint_as_float(0xff800000u) : 0.0f;
        for (int g = lane; g < n_group; g += 32) {
            const u64 mine = rank_key(gs[g], (u32)g);
            int rank = 0;
            for (int o = 0; o < n_group; ++o) {
                rank += rank_key(gs[o], (u32)o) > mine ? 1 : 0;
            }
            if (rank >= keep) {
                for (int e = g * per; e < (g + 1) * per; ++e) {
                    ch[e] = masked;
                }
            }
        }
        __syncwarp();
    }

    // Top-k: the j-th pick is the largest key below the (j - 1)-th.
    u64 prev = 0ull;
    for (int j = 0; j < k; ++j) {
        u64 best = 0ull;
        for (int e = lane; e < ne; e += 32) {
            const u64 key = rank_key(ch[e], (u32)e);
            if ((j == 0 || key < prev) && key > best) {
                best = key;
            }
        }
        best = warp_max_u64(best);
        prev = best;
        if (lane == 0) {
            const u32 e = key_index(best);
            w.chosen[(u64)tok * k + j] = e;
            w.weight[(u64)tok * k + j] = sc[e];
        }
    }

    // The weights: renormalized over the k (their sum in pick order, plus eps), then scaled.
    if (lane == 0) {
        float* wt = w.weight + (u64)tok * k;
        if (renorm != 0) {
            float s = -0.0f;
            for (int j = 0; j < k; ++j) {
                s = __fadd_rn(s, wt[j]);
            }
            s = __fadd_rn(s, eps);
            for (int j = 0; j < k; ++j) {
                wt[j] = __fdiv_rn(wt[j], s);
            }
        }
        for (int j = 0; j < k; ++j) {
            wt[j] = __fmul_rn(wt[j], scale);
        }
    }
}

// The groups of the grouped expert kernels: at most min(ne, tokens·k) experts have rows.
__device__ __forceinline__ int route_groups(int tokens, int ne, int k) {
    return (u64)tokens * k < (u64)ne ? tokens * k : ne;
}

// Route `tokens` tokens (router logits z `[tokens, ne]`, the first at position pos0) to k of
// ne experts and lay out the layer's dispatch in `out` (as route.rs's RouteLayout):
//   token [tokens·k]     per gathered row, its token (u32);
//   position [tokens·k]  per row, pos0 + its token (u32);
//   slot [tokens·k]      per token, its k rows by ascending expert (u32);
//   weight [tokens·k]    the routing weights of slot (f32);
//   then the G = min(ne, tokens·k) groups of the grouped expert kernels, the experts with rows
//   ascending, then groups of no rows: first row [G], row count [G], input keys [G] and output
//   keys [G] (u32 offsets in the pass's key buffer: key_first + e·key_stride, and key_width
//   after that), and, 8-byte aligned, the weights' addresses [3, G] (u64: gate, up, down),
//   taken from the layer's table `weights` [3, ne].
// `bias`: V3's selection bias [ne] or null. `tally` (null: none) accumulates the layer's
// router counters: [0] tokens, [1] entropy sum (f64 bits), [2 + e] expert e's tokens,
// [2 + ne + e] the sum of their weights (f64 bits). `work`: RouteWork's arrays.
// One block of 32 · W threads. With `routed` 0 its W warps first route the tokens (warp w
// the tokens w, w + W, ..); with `routed` 1 swk_moe_route_tokens has routed them into `work`.
extern "C" __global__ void swk_moe_route(const float* z, const float* bias, int tokens, int ne, int k, int pos0,
                                         int scoring, int n_group, int topk_group, int group_score, int renorm,
                                         float eps, float scale, u32 key_first, u32 key_stride, u32 key_width,
                                         const u64* weights, void* work, u32* out, u64* tally, int routed) {
    const RouteWork w(work, tokens, ne, k, n_group);
    if (routed == 0) {
        const int warps = (int)(blockDim.x >> 5);
        for (int tok = (int)(threadIdx.x >> 5); tok < tokens; tok += warps) {
            route_token(z, bias, tok, ne, k, scoring, n_group, topk_group, group_score, renorm, eps, scale,
                        tally != nullptr, w);
        }
        __syncthreads();
    }

    const u64 tk = (u64)tokens * k;
    u32* token = out;
    u32* position = out + tk;
    u32* slot = out + 2 * tk;
    float* weight = (float*)(out + 3 * tk);
    const int groups = route_groups(tokens, ne, k);
    u32* g_row0 = out + 4 * tk;
    u32* g_rows = g_row0 + groups;
    u32* g_key_in = g_rows + groups;
    u32* g_key_out = g_key_in + groups;
    u64* g_weights = (u64*)(out + ((4 * tk + 4 * (u64)groups + 1) & ~1ull));

    // Each expert's row count, then (one thread, experts ascending) its first row and, for an
    // expert with rows, its group.
    for (int e = (int)threadIdx.x; e < ne; e += (int)blockDim.x) {
        u32 n = 0u;
        for (u64 i = 0; i < tk; ++i) {
            n += w.chosen[i] == (u32)e ? 1u : 0u;
        }
        w.rows[e] = n;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 at = 0u;
        int g = 0;
        for (int e = 0; e < ne; ++e) {
            const u32 n = w.rows[e];
            w.row0[e] = at;
            if (n != 0u) {
                g_row0[g] = at;
                g_rows[g] = n;
                g_key_in[g] = key_first + (u32)e * key_stride;
                g_key_out[g] = g_key_in[g] + key_width;
                for (int j = 0; j < 3; ++j) {
                    g_weights[(u64)j * groups + g] = weights[(u64)j * ne + e];
                }
                g += 1;
            }
            at += n;
        }
        for (; g < groups; ++g) {
            g_row0[g] = at;
            g_rows[g] = 0u;
            g_key_in[g] = 0u;
            g_key_out[g] = 0u;
            for (int j = 0; j < 3; ++j) {
                g_weights[(u64)j * groups + g] = 0ull;
            }
        }
    }
    __syncthreads();

    // Each expert's rows, tokens ascending; the token's slot is the expert's rank among its k.
    for (int e = (int)threadIdx.x; e < ne; e += (int)blockDim.x) {
        u32 r = w.row0[e];
        double sum = -0.0;
        for (int tok = 0; tok < tokens; ++tok) {
            const u32* picks = w.chosen + (u64)tok * k;
            for (int j = 0; j < k; ++j) {
                if (picks[j] != (u32)e) {
                    continue;
                }
                int below = 0;
                for (int o = 0; o < k; ++o) {
                    below += picks[o] < (u32)e ? 1 : 0;
                }
                const u64 s = (u64)tok * k + below;
                const float wt = w.weight[(u64)tok * k + j];
                slot[s] = r;
                weight[s] = wt;
                token[r] = (u32)tok;
                position[r] = (u32)(pos0 + tok);
                sum = __dadd_rn(sum, (double)wt);
                r += 1u;
            }
        }
        if (tally != nullptr && w.rows[e] != 0u) {
            tally[2 + e] += w.rows[e];
            add_f64_at(tally + 2 + ne + e, sum);
        }
    }
    if (tally != nullptr && threadIdx.x == 0) {
        double s = -0.0;
        for (int tok = 0; tok < tokens; ++tok) {
            s = __dadd_rn(s, w.entropy[tok]);
        }
        tally[0] += (u64)tokens;
        add_f64_at(tally + 1, s);
    }
}

// The first half of swk_moe_route for a longer pass, over many blocks: each warp routes the
// tokens (its global index), (its index + all warps), .. into `work` (with the entropy when
// `entropy`), so that one block need not walk them all; swk_moe_route (`routed` 1) then lays
// out the dispatch. The same parameters as swk_moe_route's.
extern "C" __global__ void swk_moe_route_tokens(const float* z, const float* bias, int tokens, int ne, int k,
                                                int scoring, int n_group, int topk_group, int group_score,
                                                int renorm, float eps, float scale, void* work, int entropy) {
    const RouteWork w(work, tokens, ne, k, n_group);
    const int warps = (int)((gridDim.x * blockDim.x) >> 5);
    for (int tok = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5); tok < tokens; tok += warps) {
        route_token(z, bias, tok, ne, k, scoring, n_group, topk_group, group_score, renorm, eps, scale,
                    entropy != 0, w);
    }
}
