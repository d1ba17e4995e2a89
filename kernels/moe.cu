// The routed-expert MLP of a mixture-of-experts layer, mirroring model::arch::moe on the CPU.
// The router (route.cu on the device for passes of at most 16 tokens, else the host) gathers
// each expert's tokens into consecutive rows (experts ascending, tokens ascending within
// one); each expert's SwiGLU runs on its rows, and then:
//   swk_column_max   folds an expert's down_proj output rows into its spike keys (per row the
//                    token position it came from), before the routing weight;
// When every expert has at most 16 rows (detection prompts, decoding), or at any row count
// with swk's own GEMM kernels, the experts run together instead: swk_gemm_grouped_* (gemm.cu)
// for gate and up (one launch for both) and down, swk_act_mul_grouped (act.cu) and
// swk_column_max_grouped, one launch each for the whole layer.
//   swk_moe_combine  writes each token's weighted sum of its experts' outputs, in the CPU's
//                    order (experts ascending, `acc += y * w` from 0);
//   swk_sigmoid_gate_add  adds Qwen2-MoE's shared expert scaled by sigmoid(its gate logit).
#include "common.cuh"

// keys[col] = max over rows of spike_key(y[r, col], position of r), position pos[r] when pos
// is not null, else pos0 + r. y [rows, n]. Grid (ceil(n / 256), ceil(rows / rows_per_block)),
// block 256, as swk_add_residual's statistics.
__device__ __forceinline__ void column_max_rows(const float* y, int rows, int n, int rows_per_block, int pos0,
                                                const u32* pos, u64* keys) {
    ColumnWalk w(rows, rows_per_block);
    if (w.col >= n) {
        return;
    }
    for (int r = w.r0; r < w.r1; ++r) {
        w.see(y[(size_t)r * n + w.col], ColumnWalk::position(pos, pos0, r));
    }
    w.commit(keys);
}

extern "C" __global__ void swk_column_max(const float* y, int rows, int n, int rows_per_block, int pos0,
                                          const u32* pos, u64* keys) {
    column_max_rows(y, rows, n, rows_per_block, pos0, pos, keys);
}

// swk_column_max over the experts of a sparse layer in one launch: group g folds the rows
// row0[g] .. row0[g] + rows[g] of y (positions pos from its first row) into keys + key_at[g].
// Grid (ceil(n / 256), ceil(max rows / rows_per_block), groups), block 256.
extern "C" __global__ void swk_column_max_grouped(const float* y, const u32* row0, const u32* rows, int n,
                                                  int rows_per_block, const u32* pos, u64* keys,
                                                  const u32* key_at) {
    const u32 g = blockIdx.z;
    column_max_rows(y + (u64)row0[g] * n, (int)rows[g], n, rows_per_block, 0, pos + row0[g],
                    keys + key_at[g]);
}

// out[t, c] = sum over j < k of ys[slot[t * k + j], c] * w[t * k + j], accumulated from 0 in j
// order (the host lists each token's slots by ascending expert). ys [*, n], out [tokens, n].
// One thread per element of out, block 256.
extern "C" __global__ void swk_moe_combine(const float* ys, const u32* slot, const float* w, float* out,
                                           int tokens, int k, int n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)tokens * n) {
        return;
    }
    const u64 t = i / n;
    const u64 c = i % n;
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) {
        const u64 s = t * k + j;
        acc = __fadd_rn(acc, __fmul_rn(ys[(u64)slot[s] * n + c], w[s]));
    }
    out[i] = acc;
}

// out[t, c] += sigmoid(z[t]) * y[t, c], sigmoid(z) = 1 / (1 + exp(-z)). out, y [rows, n].
// One thread per element, block 256.
extern "C" __global__ void swk_sigmoid_gate_add(float* out, const float* y, const float* z, int rows, int n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * n) {
        return;
    }
    const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-z[i / n])));
    out[i] = __fadd_rn(out[i], __fmul_rn(s, y[i]));
}
