// LayerNorm: out = (x - mean) / sqrt(var + eps) per row, mean and (biased) variance
// accumulated in f64 and the result rounded to f32, then times w and plus b when given
// (GPT-2, GPT-NeoX; OLMo has neither), as cpu::layernorm.
#include "common.cuh"

// x, out [rows, n] (may alias); w, b [n] or null. Grid rows, block 256.
extern "C" __global__ void swk_layernorm(const float* x, const float* w, const float* b, float* out, int n,
                                         double eps) {
    __shared__ double scratch[32];
    const float* xr = x + (size_t)blockIdx.x * n;
    float* o = out + (size_t)blockIdx.x * n;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        s += (double)xr[i];
    }
    const double mean = block_reduce(s, SumOp(), scratch) / (double)n;
    double v = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const double d = (double)xr[i] - mean;
        v += d * d;
    }
    const double var = block_reduce(v, SumOp(), scratch) / (double)n;
    const double inv = 1.0 / sqrt(var + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float y = (float)(((double)xr[i] - mean) * inv);
        if (w != nullptr) {
            y = __fmul_rn(y, w[i]);
        }
        if (b != nullptr) {
            y = __fadd_rn(y, b[i]);
        }
        o[i] = y;
    }
}

// x = clamp(x, -c, c) over n elements, NaN kept (OLMo's clip_qkv). Grid-stride, block 256.
extern "C" __global__ void swk_clamp(float* x, u64 n, float c) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float v = x[i];
        x[i] = v < -c ? -c : (v > c ? c : v);
    }
}
