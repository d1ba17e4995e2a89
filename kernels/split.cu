// Two-term bf16 activations for the `cublas-split` GEMM engine.
//
// x = hi + lo with hi = bf16(x) and lo = bf16(x - hi) (x - hi is exact in f32), so hi + lo
// carries about 16 significant bits of x. One bf16 GEMM over the stacked [hi; lo] rows reads
// the bf16 weights once and gives W·hi and W·lo with f32 accumulation; their f32 sum is the
// product to about f32 accuracy at bf16 weight bandwidth.
#include "common.cuh"

// x [n] f32 -> out [2n] bf16 bits: out[i] = hi(x[i]), out[n + i] = lo(x[i]). Grid-stride loop.
extern "C" __global__ void swk_split_bf16(const float* x, u16* out, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        write_split(out, n, i, x[i]);
    }
}

// y[i] = y2[i] + y2[n + i] for i < n (W·hi + W·lo). Grid-stride loop.
extern "C" __global__ void swk_add_halves(const float* y2, float* y, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        y[i] = product_at(y2, y2 + n, i);
    }
}
