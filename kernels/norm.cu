// RMSNorm: out = w * (x * inv), inv = 1 / sqrt(mean(x^2) + eps), the mean in f64; with
// plus_one (Gemma) the weight is (1 + w), rounded to f32 first.
// Mirrors cpu::rmsnorm: sum of squares in double, inv rounded to f32, then two f32 products.
// With `split` not null, out's two bf16 terms also go there ([2 * rows * n], see write_split):
// the input of a `cublas-split` product.
#include "common.cuh"

// Row blockIdx.x of x (width n) through RMSNorm into the same row of out, its two-term split
// into split ([2 * gridDim.x * n]) unless null. `scratch`: 32 doubles of shared memory. Each
// thread reads the elements i = threadIdx.x + k * blockDim.x of the row.
__device__ __forceinline__ void rmsnorm_row(const float* x, const float* w, float* out, int n, double eps,
                                            int plus_one, u16* split, double* scratch) {
    const float* xr = x + (size_t)blockIdx.x * n;
    float* o = out + (size_t)blockIdx.x * n;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        double v = (double)xr[i];
        s += v * v;
    }
    s = block_reduce(s, SumOp(), scratch);
    const float inv = (float)(1.0 / sqrt(s / (double)n + eps));
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float wi = plus_one ? __fadd_rn(1.0f, w[i]) : w[i];
        const float v = __fmul_rn(wi, __fmul_rn(xr[i], inv));
        o[i] = v;
        if (split != nullptr) {
            write_split(split, (u64)gridDim.x * n, (u64)blockIdx.x * n + i, v);
        }
    }
}

// One block per row. Grid (rows), block 256 (any multiple of 32).
extern "C" __global__ void swk_rmsnorm(const float* x, const float* w, float* out, int n, double eps,
                                       int plus_one, u16* split) {
    __shared__ double scratch[32];
    rmsnorm_row(x, w, out, n, eps, plus_one, split, scratch);
}

// x += y, then out = rmsnorm(x) as swk_rmsnorm computes it: a residual add (y whole, or the
// `cublas-split` terms y + y_lo, product_at) and the norm after it in one launch, the same
// values as swk_add_residual then swk_rmsnorm. Each thread adds the elements it then reads,
// so the row needs no barrier in between. With `keys` not null, each y's spike key (position
// pos0 + row) is also folded into keys[column] as swk_add_residual folds it: one atomicMax
// an element, the same maxima (a key holds its position, so order does not matter). Used for
// attention's add with the MLP's norm, and the MLP's add (its output statistics) with the
// next layer's input norm.
// One block per row. Grid (rows), block 256 (any multiple of 32).
extern "C" __global__ void swk_add_rmsnorm(float* x, const float* y, const float* y_lo, const float* w, float* out,
                                           int n, double eps, int plus_one, u16* split, int pos0, u64* keys) {
    __shared__ double scratch[32];
    const u64 row = (u64)blockIdx.x * n;
    const u32 pos = (u32)(pos0 + (int)blockIdx.x);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = product_at(y, y_lo, row + i);
        x[row + i] = __fadd_rn(x[row + i], v);
        if (keys != nullptr) {
            const u64 key = spike_key(v, pos);
            if (key != 0ull) {
                atomicMax(keys + i, key);
            }
        }
    }
    rmsnorm_row(x, w, out, n, eps, plus_one, split, scratch);
}
