// Residual add with fused spike statistics of the down_proj output.
//
// x += y row by row, mirroring cpu::add_residual. When `keys` is not null, each column's
// (hidden dim's) max |y| over the rows of this launch is reduced into keys[col] as a packed
// spike key (see spike_key in common.cuh): largest |y| wins, ties keep the earliest position,
// the sign is kept. The same kernel without keys is the attention residual add.
#include "common.cuh"

// x, y [rows, n]. Grid (ceil(n / 256), ceil(rows / rows_per_block)), block 256.
extern "C" __global__ void swk_add_residual(float* x, const float* y, int rows, int n, int rows_per_block,
                                            int pos0, u64* keys) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= n) {
        return;
    }
    const int r0 = blockIdx.y * rows_per_block;
    const int r1 = min(rows, r0 + rows_per_block);
    u64 best = 0ull;
    for (int r = r0; r < r1; ++r) {
        const size_t i = (size_t)r * n + col;
        const float v = y[i];
        x[i] = __fadd_rn(x[i], v);
        if (keys != nullptr) {
            const u64 k = spike_key(v, (u32)(pos0 + r));
            best = k > best ? k : best;
        }
    }
    if (keys != nullptr && best != 0ull) {
        atomicMax(keys + col, best);
    }
}

// y[t, o] += b[o] for y [rows, n] (q/k/v biases). One thread per element, block 256.
extern "C" __global__ void swk_add_bias(float* y, const float* b, int rows, int n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * n) {
        return;
    }
    y[i] = __fadd_rn(y[i], b[i % n]);
}
