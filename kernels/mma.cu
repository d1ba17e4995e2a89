// swk's tensor-core products for a few rows (the `mma` GEMM engine: detection prompts,
// decoding), reading each bf16 or f16 weight once:
//
//   y[t, o] = sum_i x[t, i] * W[o, i]      x [rows, k] f32 (rows <= 16), W [n, k] bf16 or
//                                          f16, y rows ldy apart
//
// x enters as two terms in the weights' type, both multiplied and accumulated in f32 on the
// tensor cores (mma.sync m16n8k16: 16 weight rows × 16 k against 16 k × 8 rows of x's
// terms). bf16: hi = bf16(x), lo = bf16(x - hi), as the `cublas-split` engine splits it.
// f16: the same in f16 of x / s, s a power of two per row (and per slab) that puts the row's
// largest |x| in [2^14, 2^15), the sums multiplied back by s: 22 bits of each value, and no
// value past f16's range.
//
// swk_gemm_mma_*: grid (ceil(n / 128), slabs), 256 threads. Block (b, s) covers the weight
// rows b·128.., 16 per warp, over the k range of slab s, [s·slab, min(k, (s + 1)·slab)). The
// block stages that range of x's two terms in shared memory, `stage` k at a time (in rounds
// when the slab is longer). Against each round, each lane reads its two weight rows (group
// and group + 8 of its warp's 16) 16 bytes at a time straight from global memory. A sum
// does not care in which order its k come, so a lane's 16-byte run of a weight row (8
// consecutive k) fills the k slots the fragment layout gives the lane in the two mma's of a
// 32-k chunk, and its 16-byte run of x's terms the same slots (see mma_16816). With one
// slab the warps write y. With several, each block writes its partial sums (`partial`,
// [slab][row][column]); the last block of a column range to finish (a counter per range in
// `counters`, which that block sets back to 0) adds them in slab order, so the result does
// not depend on which block finishes last.
//
// The down projection's x can be the MLP's activation, made from the gate and up products as
// it is staged, with its spike statistics (MmaX): no activation launch, no activation buffer.
//
// swk_gemm_mma_grouped_*: a mixture of experts' products, one weight per group of rows
// (grid z); a block covers its columns' whole k, stage by stage. swk_gemm_mma_act_grouped_*:
// the experts' down products, their activation made as it is staged.
//
// Needs k % 8 == 0 and W 16-byte aligned (the host checks, and otherwise uses another path);
// x has no alignment requirement.
#include "common.cuh"

#define MMA_MAX_ROWS 16
#define MMA_WARPS 8
#define MMA_COLS (16 * MMA_WARPS)
#define MMA_UNROLL 4

// What a product reads as x: row r's element i, rows `ld` apart. With ACT it is the MLP's
// activation `act`, made as it is read exactly as swk_act_mul makes it: act(gate) · up (x
// holds up), or act(up) without gate.
template <bool ACT>
struct MmaX {
    const float* x;
    const float* gate;
    int ld;
    int act;
    __device__ __forceinline__ float at(int r, int i) const {
        const u64 j = (u64)r * ld + i;
        if (!ACT) {
            return x[j];
        }
        return gate != nullptr ? __fmul_rn(gated_act(gate[j], act), x[j]) : gated_act(x[j], act);
    }
};

// D += A·B, one warp-wide mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32
// (F16: IEEE half inputs, else bf16). Fragments (lane = 4 · group + t): A's words a0..a3
// hold rows group, group + 8, group, group + 8 at k slots (2t, 2t + 1), (2t, 2t + 1),
// (2t + 8, 2t + 9), (2t + 8, 2t + 9); B's words b0, b1 hold column group at slots
// (2t, 2t + 1), (2t + 8, 2t + 9); D's d0..d3 are rows group, group, group + 8, group + 8 at
// columns 2t, 2t + 1, 2t, 2t + 1. Under swk's CPU emulator the warp's lanes exchange their
// fragments and each computes its own four sums.
template <bool F16>
__device__ __forceinline__ void mma_16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if defined(SWK_CUDA_EMU)
    const u32 a[4] = {a0, a1, a2, a3};
    const u32 b[2] = {b0, b1};
    swk_emu_mma_16816(d, a, b, F16);
#else
    if (F16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
            "{%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
            "{%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
#endif
}

// x's two terms in the weights' 16-bit type, packed two k per word: bf16 hi = bf16(v),
// lo = bf16(v - hi); f16 the same of v · inv (inv a power of two that keeps the row's values
// within f16's range: see mma_row_scale).
template <bool F16>
__device__ __forceinline__ void mma_terms(float v, float inv, u16& hi, u16& lo) {
    if (F16) {
        const float u = __fmul_rn(v, inv);
        hi = f32_to_f16_bits(u);
        lo = f32_to_f16_bits(__fsub_rn(u, f16_bits_to_f32(hi)));
    } else {
        hi = f32_to_bf16_bits(v);
        lo = f32_to_bf16_bits(__fsub_rn(v, bf16_bits_to_f32(hi)));
    }
}

// Fold v's spike key (position pos) into *key.
__device__ __forceinline__ void mma_key(u64* key, float v, u32 pos) {
    const u64 k = spike_key(v, pos);
    if (k != 0ull) {
        atomicMax(key, k);
    }
}

// The power of two s by which a row of x whose largest |value| is `m` is divided before its
// f16 terms are taken (and its products multiplied back): m / s in [2^14, 2^15), so the
// terms stay finite and hold 22 bits of each value; 1 for a row of zeros, infinities or NaN
// (which then reach the sums as they are).
__device__ __forceinline__ float mma_row_scale(float m) {
    const u32 bits = __float_as_uint(m);
    if (m == 0.0f || bits >= 0x7f800000u) {
        return 1.0f;
    }
    int e = (int)(bits >> 23) - 127 - 14;
    e = e < -126 ? -126 : e;
    return __uint_as_float((u32)(e + 127) << 23);
}

// Elements from one staged row of x's terms to the next: the slab, padded so that the rows
// read by one quarter of a warp (two rows, 64 bytes each) fall on different banks. The host
// mirror is kernels::mma_stage_row.
__device__ __forceinline__ int mma_stage_row(int slab) {
    return (slab & 63) == 0 ? slab + 32 : slab;
}

// The 32-k chunk c of the slab, for the lane's runs of its two weight rows (wa, wb) and the
// staged terms (hi, lo, rows srow apart): both
// terms of x's row tiles (8 rows each) into acc.
template <bool F16>
__device__ __forceinline__ void mma_chunk(const v16& wa, const v16& wb, const u16* hi, const u16* lo, int srow,
                                          int c, int tiles, float acc[2][4]) {
    const int lane = threadIdx.x & 31;
    const int group = lane >> 2;
    const int t = lane & 3;
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {
        if (tile >= tiles) {
            break;
        }
        const int at = (tile * 8 + group) * srow + c * 32 + t * 8;
#pragma unroll
        for (int term = 0; term < 2; ++term) {
            const v16 xv = *(const v16*)((term == 0 ? hi : lo) + at);
            // k = c·32 + 8t + 0..3 in the first mma's slots, 8t + 4..7 in the second's.
            mma_16816<F16>(acc[tile], wa.u[0], wb.u[0], wa.u[1], wb.u[1], xv.u[0], xv.u[1]);
            mma_16816<F16>(acc[tile], wa.u[2], wb.u[2], wa.u[3], wb.u[3], xv.u[2], xv.u[3]);
        }
    }
}

// acc += this block's products over k0..kend (its warps' weight rows from blockIdx.x · 128),
// x's terms staged in `staged` `stage` k at a time (a multiple of 32, at most the shared
// memory the launch gave: 2 terms × 16 rows × mma_stage_row(stage)). Each stage's sums are
// added to acc (f16: multiplied back by the stage's row scales first). With ACT and `keys`
// not null, each staged x's spike key (row r at position pos[r], or pos0 + r when pos is
// null) is folded into keys[its k] (so only one block of each k range may pass keys).
template <bool F16, bool ACT>
__device__ __forceinline__ void mma_range(const MmaX<ACT>& x, const u16* w, int rows, int n, int k, int k0, int kend,
                                          int stage, u16* staged, u64* keys, const u32* pos, int pos0,
                                          float acc[2][4]) {
    __shared__ float scale[MMA_MAX_ROWS];
    const int srow = mma_stage_row(stage);
    u16* hi = staged;
    u16* lo = staged + MMA_MAX_ROWS * srow;
    const int tiles = rows > 8 ? 2 : 1;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int group = lane >> 2;
    const int t = lane & 3;
    const int ra = blockIdx.x * MMA_COLS + warp * 16 + group;
    const int rb = ra + 8;
    const v16 zero = {{0u, 0u, 0u, 0u}};
    for (int s0 = k0; s0 < kend; s0 += stage) {
        const int s1 = min(kend, s0 + stage);
        const u16* wa = w + (u64)(ra < n ? ra : 0) * k + s0 + t * 8;
        const u16* wb = w + (u64)(rb < n ? rb : 0) * k + s0 + t * 8;
        const int chunks = (s1 - s0 + 31) / 32;
        // The weights of MMA_UNROLL chunks from chunk c: 8 loads in flight a lane. k % 8 == 0,
        // so a lane's run of 8 k lies wholly inside the stage or wholly past it.
        v16 va[MMA_UNROLL];
        v16 vb[MMA_UNROLL];
        auto load = [&](int c) {
#pragma unroll
            for (int u = 0; u < MMA_UNROLL; ++u) {
                const bool in = c + u < chunks && s0 + (c + u) * 32 + t * 8 < s1;
                va[u] = (in && ra < n) ? *(const v16*)(wa + (c + u) * 32) : zero;
                vb[u] = (in && rb < n) ? *(const v16*)(wb + (c + u) * 32) : zero;
            }
        };
        // The first chunks' weights are on their way while the block stages x (not while it
        // makes an activation: that needs their registers).
        if (!ACT) {
            load(0);
        }
        if (s0 > k0) {
            __syncthreads();  // every warp is done with the previous stage's terms and scales
        }
        if (F16) {
            // Each row's scale from its largest |x| over the stage: warp w takes rows 2w, 2w + 1.
            // (With ACT the activation is made here and again when it is staged.)
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int r = 2 * warp + i;
                float m = 0.0f;
                for (int kk = s0 + lane; r < rows && kk < s1; kk += 32) {
                    m = fmaxf(m, fabsf(x.at(r, kk)));
                }
                for (int o = 16; o > 0; o >>= 1) {
                    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
                }
                if (lane == 0 && r < MMA_MAX_ROWS) {
                    scale[r] = mma_row_scale(m);
                }
            }
            __syncthreads();
        }

        // Stage x's two terms for s0..s1, 8 k a thread at a time (zeros past the rows and
        // past s1, which is a multiple of 8 too).
        const int runs = stage / 8;
        for (int e = threadIdx.x; e < tiles * 8 * runs; e += blockDim.x) {
            const int r = e / runs;
            const int kk = (e - r * runs) * 8;
            v16 h = zero;
            v16 l = zero;
            if (r < rows && s0 + kk < s1) {
                const float inv = F16 ? 1.0f / scale[r] : 1.0f;  // a power of two: exact
                // Two values at a time (the first weights' loads hold registers meanwhile).
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int i = s0 + kk + 2 * j;
                    const float v0 = x.at(r, i);
                    const float v1 = x.at(r, i + 1);
                    if (ACT && keys != nullptr) {
                        const u32 p = ColumnWalk::position(pos, pos0, r);
                        mma_key(keys + i, v0, p);
                        mma_key(keys + i + 1, v1, p);
                    }
                    u16 h0, l0, h1, l1;
                    mma_terms<F16>(v0, inv, h0, l0);
                    mma_terms<F16>(v1, inv, h1, l1);
                    h.u[j] = (u32)h0 | ((u32)h1 << 16);
                    l.u[j] = (u32)l0 | ((u32)l1 << 16);
                }
            }
            *(v16*)(hi + r * srow + kk) = h;
            *(v16*)(lo + r * srow + kk) = l;
        }
        __syncthreads();
        if (ACT) {
            load(0);
        }

        float sums[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
        for (int c = 0; c < chunks; c += MMA_UNROLL) {
            if (c > 0) {
                load(c);
            }
#pragma unroll
            for (int u = 0; u < MMA_UNROLL; ++u) {
                if (c + u < chunks) {
                    mma_chunk<F16>(va[u], vb[u], hi, lo, srow, c + u, tiles, sums);
                }
            }
        }
        // Element r of a tile is x row tile·8 + 2t + r % 2 (see mma_each).
#pragma unroll
        for (int tile = 0; tile < 2; ++tile) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int row = tile * 8 + 2 * t + r % 2;
                const float v = F16 && row < rows ? __fmul_rn(sums[tile][r], scale[row]) : sums[tile][r];
                acc[tile][r] = __fadd_rn(acc[tile][r], v);
            }
        }
    }
}

// Element r of tile `tile` of a warp's sums: weight row (column of y) o0 + group + 8·(r / 2),
// x row tile·8 + 2t + r % 2; out(row, o, value) writes it when both are in range.
template <typename Out>
__device__ __forceinline__ void mma_each(const float acc[2][4], int rows, int n, Out out) {
    const int lane = threadIdx.x & 31;
    const int group = lane >> 2;
    const int t = lane & 3;
    const int o0 = blockIdx.x * MMA_COLS + (threadIdx.x >> 5) * 16;
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int o = o0 + group + 8 * (r / 2);
            const int row = tile * 8 + 2 * t + r % 2;
            if (o < n && row < rows) {
                out(row, o, acc[tile][r]);
            }
        }
    }
}

template <bool F16, bool ACT>
__device__ __forceinline__ void mma_gemm(const MmaX<ACT>& x, const u16* w, float* y, float* partial, u32* counters, int rows,
                                         int n, int k, int ldy, int slab, int stage, int pos0, u64* keys) {
    SWK_DYNAMIC_SHARED(u16, staged);
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    const int k0 = blockIdx.y * slab;
    // The first column range's blocks fold x's statistics: each k once.
    u64* my_keys = blockIdx.x == 0 ? keys : nullptr;
    mma_range<F16, ACT>(x, w, rows, n, k, k0, min(k, k0 + slab), stage, staged, my_keys, nullptr, pos0, acc);

    if (gridDim.y == 1) {
        mma_each(acc, rows, n, [&](int row, int o, float v) { y[(u64)row * ldy + o] = v; });
        return;
    }
    mma_each(acc, rows, n, [&](int row, int o, float v) { partial[((u64)blockIdx.y * rows + row) * n + o] = v; });

    // The last block of this column range adds the slabs' partial sums, in slab order.
    __shared__ int last;
    __threadfence();  // this block's partial sums, visible to whichever block adds them
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(counters + blockIdx.x, 1u) == gridDim.y - 1 ? 1 : 0;
    }
    __syncthreads();
    if (last == 0) {
        return;
    }
    __threadfence();
    const int col0 = blockIdx.x * MMA_COLS;
    for (int e = threadIdx.x; e < rows * MMA_COLS; e += blockDim.x) {
        const int row = e / MMA_COLS;
        const int o = col0 + (e - row * MMA_COLS);
        if (o >= n) {
            continue;
        }
        // Eight slabs' loads in flight at a time; the sum in slab order all the same.
        const float* p = partial + (u64)row * n + o;
        const u64 step = (u64)rows * n;
        const int slabs = (int)gridDim.y;
        float s = __ldcg(p);
        int sl = 1;
        for (; sl + 8 <= slabs; sl += 8) {
            float v[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                v[j] = __ldcg(p + (u64)(sl + j) * step);
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                s = __fadd_rn(s, v[j]);
            }
        }
        for (; sl < slabs; ++sl) {
            s = __fadd_rn(s, __ldcg(p + (u64)sl * step));
        }
        y[(u64)row * ldy + o] = s;
    }
    if (threadIdx.x == 0) {
        counters[blockIdx.x] = 0u;
    }
}

// At most 80 registers a thread, so that three blocks share a multiprocessor.
extern "C" __global__ void __launch_bounds__(256, 3)
    swk_gemm_mma_bf16(const float* x, const u16* w, float* y, float* partial, u32* counters, int rows, int n, int k,
                      int ldy, int slab, int stage) {
    const MmaX<false> in = {x, nullptr, k, -1};
    mma_gemm<false>(in, w, y, partial, counters, rows, n, k, ldy, slab, stage, 0, nullptr);
}

extern "C" __global__ void __launch_bounds__(256, 3)
    swk_gemm_mma_f16(const float* x, const u16* w, float* y, float* partial, u32* counters, int rows, int n, int k,
                     int ldy, int slab, int stage) {
    const MmaX<false> in = {x, nullptr, k, -1};
    mma_gemm<true>(in, w, y, partial, counters, rows, n, k, ldy, slab, stage, 0, nullptr);
}

// swk_gemm_mma_* of the MLP's activation act(gate) · up (or act(up) without gate; rows ld
// apart; see MmaX), its spike keys (positions pos0..) into keys unless null.
extern "C" __global__ void __launch_bounds__(256, 3)
    swk_gemm_mma_act_bf16(const float* up, const float* gate, int ld, int act, const u16* w, float* y, float* partial,
                          u32* counters, int rows, int n, int k, int ldy, int slab, int stage, int pos0, u64* keys) {
    const MmaX<true> in = {up, gate, ld, act};
    mma_gemm<false>(in, w, y, partial, counters, rows, n, k, ldy, slab, stage, pos0, keys);
}

extern "C" __global__ void __launch_bounds__(256, 3)
    swk_gemm_mma_act_f16(const float* up, const float* gate, int ld, int act, const u16* w, float* y, float* partial,
                         u32* counters, int rows, int n, int k, int ldy, int slab, int stage, int pos0, u64* keys) {
    const MmaX<true> in = {up, gate, ld, act};
    mma_gemm<true>(in, w, y, partial, counters, rows, n, k, ldy, slab, stage, pos0, keys);
}

// The grouped product of a mixture of experts' layer (swk_gemm_grouped_* with the `mma`
// engine): group g = blockIdx.z multiplies its rows row0[g].. (rows[g] of them, at most 16)
// of x by its own weight ws[g] into the same rows of y (`[.., n]`), over all of k, staged
// `stage` k at a time (one block covers its columns' whole k range: the groups give the grid
// its breadth, so no partial sums). Grid (ceil(n / 128), 1, weights); `pair` (not 0): two
// weights per group, as swk_gemv_grouped_* takes them (gemm.cu's pair_group). With ACT, x is
// the experts' activation made as it is staged (x.x: up, x.gate: gate, rows x.ld apart), and
// with `keys` not null the first column range's block of group g folds its spike keys into
// keys + key_at[g] (row r's position pos[row0[g] + r]), as swk_act_mul_grouped would.
template <bool F16, bool ACT>
__device__ __forceinline__ void mma_grouped(MmaX<ACT> x, const u64* ws, float* y, const u32* row0, const u32* rows,
                                            int n, int k, int stage, u64 pair, const u32* pos, u64* keys,
                                            const u32* key_at) {
    SWK_DYNAMIC_SHARED(u16, staged);
    const u32 s = blockIdx.z;
    const u32 g = pair_group(s, gridDim.z, pair, y);
    const int count = (int)rows[g];
    if (count == 0) {
        return;  // the whole block: before any barrier
    }
    const u64 at = (u64)row0[g] * x.ld;
    x.x += at;
    x.gate = x.gate != nullptr ? x.gate + at : nullptr;
    u64* my_keys = ACT && keys != nullptr && blockIdx.x == 0 ? keys + key_at[g] : nullptr;
    const u32* my_pos = pos != nullptr ? pos + row0[g] : nullptr;
    float* yg = y + (u64)row0[g] * n;
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    mma_range<F16, ACT>(x, (const u16*)ws[s], count, n, k, 0, k, stage, staged, my_keys, my_pos, 0, acc);
    mma_each(acc, count, n, [&](int row, int o, float v) { yg[(u64)row * n + o] = v; });
}

extern "C" __global__ void __launch_bounds__(256, 3)
    swk_gemm_mma_grouped_bf16(const float* x, const u64* ws, float* y, const u32* row0, const u32* rows, int n, int k,
                              int stage, u64 pair) {
    const MmaX<false> in = {x, nullptr, k, -1};
    mma_grouped<false>(in, ws, y, row0, rows, n, k, stage, pair, nullptr, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(256, 3)
    swk_gemm_mma_grouped_f16(const float* x, const u64* ws, float* y, const u32* row0, const u32* rows, int n, int k,
                             int stage, u64 pair) {
    const MmaX<false> in = {x, nullptr, k, -1};
    mma_grouped<true>(in, ws, y, row0, rows, n, k, stage, pair, nullptr, nullptr, nullptr);
}

// swk_gemm_mma_grouped_* of the experts' activation act(gate) · up (gate null: act(up); gate
// and up `[.., k]`), one weight per group: the down products of a sparse layer, with their
// input spike keys (keys null: none).
extern "C" __global__ void __launch_bounds__(256, 3)
    swk_gemm_mma_act_grouped_bf16(const float* up, const float* gate, int act, const u64* ws, float* y,
                                  const u32* row0, const u32* rows, int n, int k, int stage, const u32* pos,
                                  u64* keys, const u32* key_at) {
    const MmaX<true> in = {up, gate, k, act};
    mma_grouped<false>(in, ws, y, row0, rows, n, k, stage, 0ull, pos, keys, key_at);
}

extern "C" __global__ void __launch_bounds__(256, 3)
    swk_gemm_mma_act_grouped_f16(const float* up, const float* gate, int act, const u64* ws, float* y,
                                 const u32* row0, const u32* rows, int n, int k, int stage, const u32* pos,
                                 u64* keys, const u32* key_at) {
    const MmaX<true> in = {up, gate, k, act};
    mma_grouped<true>(in, ws, y, row0, rows, n, k, stage, 0ull, pos, keys, key_at);
}
