// Gated activation with fused spike statistics of the down_proj input.
//
// out = act(gate) * up, row by row, mirroring cpu::silu_mul / cpu::gelu_tanh_mul, with act
// (gated_act in common.cuh) 0: silu; 1: gelu_tanh (Gemma, GPT-2); 2: gelu (GPT-NeoX).
// With gate null the MLP is un-gated (GPT-2, GPT-NeoX): out = act(up), as cpu::activate.
// When `keys` is not null, each column's max |out| over the rows of this launch is reduced
// into keys[col] as a packed spike key (see spike_key in common.cuh): largest |value| wins,
// ties keep the earliest position (pos0 + row), the sign is kept. keys must start at 0 for a
// fresh reduction; the host decodes them and merges them into its SpikeStats with the CPU
// rule (a new maximum replaces the old only when strictly larger). With `pos` not null, row
// r's position is pos[r] (an expert's gathered tokens) instead of pos0 + r.
// The `cublas-split` engine's terms (swk_act_mul only): with gate_lo / up_lo not null, gate and
// up are the sums gate + gate_lo and up + up_lo (product_at); with split not null, out's two
// bf16 terms also go there ([2 * rows * n], write_split), the down_proj's input. Rows of gate
// and up (and of their lo terms) are `ld` elements apart: n, or 2n when gate and up are the
// two column blocks of one [rows, 2n] product.
#include "common.cuh"

// gate, up, out [rows, n]. Grid (ceil(n / 256), ceil(rows / rows_per_block)), block 256:
// each thread walks `rows_per_block` rows of one column (coalesced across the warp) and
// issues at most one atomicMax.
__device__ __forceinline__ void act_rows(const float* gate, const float* up, float* out, int rows, int n,
                                         int rows_per_block, int pos0, const u32* pos, u64* keys, int act,
                                         const float* gate_lo, const float* up_lo, u16* split, int ld) {
    ColumnWalk w(rows, rows_per_block);
    if (w.col >= n) {
        return;
    }
    for (int r = w.r0; r < w.r1; ++r) {
        const size_t i = (size_t)r * n + w.col;
        const size_t at = (size_t)r * ld + w.col;
        const float u = product_at(up, up_lo, at);
        const float v = gate != nullptr ? __fmul_rn(gated_act(product_at(gate, gate_lo, at), act), u)
                                        : gated_act(u, act);
        out[i] = v;
        if (split != nullptr) {
            write_split(split, (u64)rows * n, i, v);
        }
        if (keys != nullptr) {
            w.see(v, ColumnWalk::position(pos, pos0, r));
        }
    }
    w.commit(keys);
}

extern "C" __global__ void swk_act_mul(const float* gate, const float* up, float* out, int rows, int n,
                                       int rows_per_block, int pos0, const u32* pos, u64* keys,
                                       int act, const float* gate_lo, const float* up_lo, u16* split,
                                       int ld) {
    act_rows(gate, up, out, rows, n, rows_per_block, pos0, pos, keys, act, gate_lo, up_lo, split, ld);
}

// swk_act_mul over the experts of a sparse MoE layer in one launch (gated): group g owns the
// rows row0[g] .. row0[g] + rows[g] of gate, up and out (positions pos from its first row) and
// its spike keys at keys + key_at[g] (keys null: no statistics). Grid (ceil(n / 256),
// ceil(max rows / rows_per_block), groups), block 256.
extern "C" __global__ void swk_act_mul_grouped(const float* gate, const float* up, float* out,
                                               const u32* row0, const u32* rows, int n, int rows_per_block,
                                               const u32* pos, u64* keys, const u32* key_at, int act) {
    const u32 g = blockIdx.z;
    const u64 o = (u64)row0[g] * n;
    u64* k = keys != nullptr ? keys + key_at[g] : nullptr;
    act_rows(gate + o, up + o, out + o, (int)rows[g], n, rows_per_block, 0, pos + row0[g], k, act, nullptr, nullptr,
             nullptr, n);
}

// x = cap * tanh(x / cap) over n elements (Gemma 2's final logit soft-cap), as cpu::softcap.
extern "C" __global__ void swk_softcap(float* x, u64 n, float cap) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        x[i] = __fmul_rn(cap, tanhf(__fdiv_rn(x[i], cap)));
    }
}
