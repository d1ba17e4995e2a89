// swk's own matrix products, used when cuBLAS is not installed (or when asked for):
//   y[t, o] = sum_i x[t, i] * W[o, i]      x [rows, k] f32, W [n, k] f32, bf16 or f16,
//                                          y [rows, n]
// f32 accumulation in all; bf16 and f16 weights are widened exactly as they are loaded.
//
// swk_gemm_*: 64x64 output tiles, k in steps of 16 through shared memory, 256 threads each
//             computing a 4x4 sub-tile (rows ty + 16a, columns tx + 16b).
//             Grid (ceil(n / 64), ceil(rows / 64)), block 256.
// swk_gemv_*: for rows <= 16 (decode, detection prompts): a block computes 32 output
//             columns, one per lane, for every row; its 8 warps split k in steps of 128
//             bytes of weights per lane (16-byte loads), and x is read warp-uniformly (one
//             broadcast load for all lanes). Each weight is read once; the 8 warps' partial
//             sums are added in warp order through shared memory, so a row's value does not
//             depend on how many rows are computed with it. Grid ceil(n / 32), block 256.
#include "common.cuh"

#define GEMM_TILE 64
#define GEMM_BK 16
#define GEMV_MAX_ROWS 16
#define GEMV_COLS 32
#define GEMV_WARPS 8
#define GEMV_LANE_BYTES 128


// The 64x64 tile (tile_o, tile_t) of y: columns tile_o * 64.., rows tile_t * 64...
template <typename WT>
__device__ __forceinline__ void gemm_tiled(const float* x, const WT* w, float* y, int rows, int n, int k,
                                           int tile_o, int tile_t) {
    __shared__ float xs[GEMM_BK][GEMM_TILE + 1];
    __shared__ float ws[GEMM_BK][GEMM_TILE + 1];
    const int tid = threadIdx.x;
    const int tx = tid % 16;
    const int ty = tid / 16;
    const int o0 = tile_o * GEMM_TILE;
    const int t0 = tile_t * GEMM_TILE;
    float acc[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            acc[a][b] = 0.0f;
        }
    }
    for (int k0 = 0; k0 < k; k0 += GEMM_BK) {
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const int e = tid + 256 * m;
            const int r = e / GEMM_BK;
            const int kk = e % GEMM_BK;
            const int gk = k0 + kk;
            const int gt = t0 + r;
            const int go = o0 + r;
            xs[kk][r] = (gt < rows && gk < k) ? x[(u64)gt * k + gk] : 0.0f;
            ws[kk][r] = (go < n && gk < k) ? load_w(w, (u64)go * k + gk) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GEMM_BK; ++kk) {
            float xa[4];
            float wb[4];
#pragma unroll
            for (int a = 0; a < 4; ++a) {
                xa[a] = xs[kk][ty + 16 * a];
            }
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                wb[b] = ws[kk][tx + 16 * b];
            }
#pragma unroll
            for (int a = 0; a < 4; ++a) {
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    acc[a][b] = fmaf(xa[a], wb[b], acc[a][b]);
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int t = t0 + ty + 16 * a;
        if (t >= rows) {
            continue;
        }
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            const int o = o0 + tx + 16 * b;
            if (o < n) {
                y[(u64)t * n + o] = acc[a][b];
            }
        }
    }
}

// Block `block` of the gemv: the columns block * 32 + lane, lane < 32, for all `rows` rows.
// Lane sums run over k in ascending order within each warp's steps (the 16-byte vector path
// and the element-wise path for unaligned or ragged k add in the same order).
template <typename WT>
__device__ __forceinline__ void gemv_cols(const float* x, const WT* w, float* y, int rows, int n, int k,
                                          int block) {
    constexpr int E = 16 / (int)sizeof(WT);        // weights per 16-byte vector
    constexpr int V = GEMV_LANE_BYTES / 16;        // vectors per lane per step
    constexpr int STEP = E * V;                    // weights per lane per step
    __shared__ float part[GEMV_WARPS][GEMV_MAX_ROWS][GEMV_COLS];
    if (block * GEMV_COLS >= n) {
        return;  // the whole block (a group's surplus block): before the barrier
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int o = block * GEMV_COLS + lane;
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
        acc[r] = 0.0f;
    }
    if (o < n) {
        const WT* wr = w + (u64)o * k;
        // 16-byte loads need every row of W and x to start 16-byte aligned.
        const bool vec = (k % E) == 0 && ((u64)w % 16) == 0 && ((u64)x % 16) == 0;
        for (int c = warp * STEP; c < k; c += GEMV_WARPS * STEP) {
            if (vec && c + STEP <= k) {
                v16 pk[V];
                const v16* src = (const v16*)(wr + c);
#pragma unroll
                for (int q = 0; q < V; ++q) {
                    pk[q] = src[q];
                }
#pragma unroll
                for (int q = 0; q < V; ++q) {
                    float wv[E];
                    widen_v16(pk[q], wv, w);
#pragma unroll
                    for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
                        if (r < rows) {
                            const v16* xs = (const v16*)(x + (u64)r * k + c + q * E);
#pragma unroll
                            for (int h = 0; h < E / 4; ++h) {
                                const v16 xv = xs[h];
#pragma unroll
                                for (int j = 0; j < 4; ++j) {
                                    acc[r] = fmaf(__uint_as_float(xv.u[j]), wv[4 * h + j], acc[r]);
                                }
                            }
                        }
                    }
                }
            } else {
                const int end = min(c + STEP, k);
                for (int i = c; i < end; ++i) {
                    const float wv = load_w(wr, (u64)i);
#pragma unroll
                    for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
                        if (r < rows) {
                            acc[r] = fmaf(x[(u64)r * k + i], wv, acc[r]);
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
        if (r < rows) {
            part[warp][r][lane] = acc[r];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < rows * GEMV_COLS; i += blockDim.x) {
        const int r = i / GEMV_COLS;
        const int col = i % GEMV_COLS;
        const int oc = block * GEMV_COLS + col;
        if (oc < n) {
            float s = part[0][r][col];
#pragma unroll
            for (int wp = 1; wp < GEMV_WARPS; ++wp) {
                s += part[wp][r][col];
            }
            y[(u64)r * n + oc] = s;
        }
    }
}

extern "C" __global__ void swk_gemm_f32(const float* x, const float* w, float* y, int rows, int n, int k) {
    gemm_tiled<float>(x, w, y, rows, n, k, blockIdx.x, blockIdx.y);
}

extern "C" __global__ void swk_gemm_bf16(const float* x, const u16* w, float* y, int rows, int n, int k) {
    gemm_tiled<u16>(x, w, y, rows, n, k, blockIdx.x, blockIdx.y);
}

extern "C" __global__ void swk_gemm_f16(const float* x, const f16w* w, float* y, int rows, int n, int k) {
    gemm_tiled<f16w>(x, w, y, rows, n, k, blockIdx.x, blockIdx.y);
}

extern "C" __global__ void swk_gemv_f32(const float* x, const float* w, float* y, int rows, int n, int k) {
    gemv_cols<float>(x, w, y, rows, n, k, blockIdx.x);
}

extern "C" __global__ void swk_gemv_bf16(const float* x, const u16* w, float* y, int rows, int n, int k) {
    gemv_cols<u16>(x, w, y, rows, n, k, blockIdx.x);
}

extern "C" __global__ void swk_gemv_f16(const float* x, const f16w* w, float* y, int rows, int n, int k) {
    gemv_cols<f16w>(x, w, y, rows, n, k, blockIdx.x);
}

// The experts of a sparse MoE layer (see moe.cu): group g multiplies the rows row0[g] ..
// row0[g] + rows[g] of x by its own weight w[g] (a device address, `[n, k]`), y[r] = x[r]·W_gᵀ,
// each group with the kernel swk_gemm_* / swk_gemv_* would give it alone, so that each group's
// values are bit for bit those of its own launch. Two kernels, each skipping the other's
// groups at once: swk_gemv_grouped_* takes the groups of at most 16 rows, swk_gemm_grouped_*
// the larger ones in 64x64 tiles (numbered column-major: tile b is columns (b % tiles_o) * 64..,
// rows (b / tiles_o) * 64..). Apart, each keeps its own register count: one kernel holding
// both paths took the gemv's (150 to 168 registers against the tiles' 53 to 60 on sm_90), which
// cut the tiles' occupancy four-fold. Grid (blocks of the largest group, weights), block 256;
// a group's surplus blocks return at once, before any barrier.
// `pair` (not 0): two weights per group (common.cuh's pair_group).

template <typename WT>
__device__ __forceinline__ void gemv_group(const float* x, const u64* w, const u32* row0, const u32* rows,
                                           float* y, int n, int k, u64 pair) {
    const u32 s = blockIdx.y;
    const u32 g = pair_group(s, gridDim.y, pair, y);
    const int r = (int)rows[g];
    if (r == 0 || r > GEMV_MAX_ROWS) {
        return;  // the other kernel's group, or an expert no token chose: its weight unread
    }
    const u64 r0 = row0[g];
    gemv_cols<WT>(x + r0 * k, (const WT*)w[s], y + r0 * n, r, n, k, blockIdx.x);
}

template <typename WT>
__device__ __forceinline__ void gemm_group(const float* x, const u64* w, const u32* row0, const u32* rows,
                                           float* y, int n, int k, u64 pair) {
    const u32 s = blockIdx.y;
    const u32 g = pair_group(s, gridDim.y, pair, y);
    const int r = (int)rows[g];
    if (r <= GEMV_MAX_ROWS) {
        return;
    }
    const u64 r0 = row0[g];
    const int b = blockIdx.x;
    const int tiles_o = (n + GEMM_TILE - 1) / GEMM_TILE;
    const int tiles_t = (r + GEMM_TILE - 1) / GEMM_TILE;
    if (b >= tiles_o * tiles_t) {
        return;
    }
    gemm_tiled<WT>(x + r0 * k, (const WT*)w[s], y + r0 * n, r, n, k, b % tiles_o, b / tiles_o);
}

extern "C" __global__ void swk_gemv_grouped_f32(const float* x, const u64* w, const u32* row0, const u32* rows,
                                                float* y, int n, int k, u64 pair) {
    gemv_group<float>(x, w, row0, rows, y, n, k, pair);
}

extern "C" __global__ void swk_gemv_grouped_bf16(const float* x, const u64* w, const u32* row0, const u32* rows,
                                                 float* y, int n, int k, u64 pair) {
    gemv_group<u16>(x, w, row0, rows, y, n, k, pair);
}

extern "C" __global__ void swk_gemv_grouped_f16(const float* x, const u64* w, const u32* row0, const u32* rows,
                                                float* y, int n, int k, u64 pair) {
    gemv_group<f16w>(x, w, row0, rows, y, n, k, pair);
}

extern "C" __global__ void swk_gemm_grouped_f32(const float* x, const u64* w, const u32* row0, const u32* rows,
                                                float* y, int n, int k, u64 pair) {
    gemm_group<float>(x, w, row0, rows, y, n, k, pair);
}

extern "C" __global__ void swk_gemm_grouped_bf16(const float* x, const u64* w, const u32* row0, const u32* rows,
                                                 float* y, int n, int k, u64 pair) {
    gemm_group<u16>(x, w, row0, rows, y, n, k, pair);
}

extern "C" __global__ void swk_gemm_grouped_f16(const float* x, const u64* w, const u32* row0, const u32* rows,
                                                float* y, int n, int k, u64 pair) {
    gemm_group<f16w>(x, w, row0, rows, y, n, k, pair);
}
