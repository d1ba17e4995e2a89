// RMSNorm: out = w * (x * inv), inv = 1 / sqrt(mean(x^2) + eps), the mean in f64; with
// plus_one (Gemma) the weight is (1 + w), rounded to f32 first.
// Mirrors cpu::rmsnorm: sum of squares in double, inv rounded to f32, then two f32 products.
// With `split` not null, out's two bf16 terms also go there ([2 * rows * n], see write_split):
// the input of a `cublas-split` product.
#include "common.cuh"

// One block per row. Grid (rows), block 256 (any multiple of 32).
extern "C" __global__ void swk_rmsnorm(const float* x, const float* w, float* out, int n, double eps,
                                       int plus_one, u16* split) {
    __shared__ double scratch[32];
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
