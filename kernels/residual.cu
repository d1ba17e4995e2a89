// Residual add with fused spike statistics of the down_proj output.
//
// x += y row by row, mirroring cpu::add_residual. When `keys` is not null, each column's
// (hidden dim's) max |y| over the rows of this launch is reduced into keys[col] as a packed
// spike key (see spike_key in common.cuh): largest |y| wins, ties keep the earliest position,
// the sign is kept. The same kernel without keys is the attention residual add. With y_lo not
// null, y is the sum of the two terms y + y_lo a `cublas-split` product left (product_at).
#include "common.cuh"

// x, y [rows, n]. Grid (ceil(n / 256), ceil(rows / rows_per_block)), block 256.
extern "C" __global__ void swk_add_residual(float* x, const float* y, int rows, int n, int rows_per_block,
                                            int pos0, u64* keys, const float* y_lo) {
    ColumnWalk w(rows, rows_per_block);
    if (w.col >= n) {
        return;
    }
    for (int r = w.r0; r < w.r1; ++r) {
        const size_t i = (size_t)r * n + w.col;
        const float v = product_at(y, y_lo, i);
        x[i] = __fadd_rn(x[i], v);
        if (keys != nullptr) {
            w.see(v, (u32)(pos0 + r));
        }
    }
    w.commit(keys);
}

// y[t, o] += b[o] for y [rows, n] (q/k/v biases). One thread per element, block 256.
extern "C" __global__ void swk_add_bias(float* y, const float* b, int rows, int n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * n) {
        return;
    }
    y[i] = __fadd_rn(y[i], b[i % n]);
}
