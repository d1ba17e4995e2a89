// Log-softmax / negative log-likelihood per row, for perplexity on the device without
// downloading the logits. Mirrors eval::ppl::nll: max in f32, log-sum-exp in f64,
// nll = max + ln(sum exp(l - max)) - l[target].
#include "common.cuh"

// logits [rows, vocab]; targets [rows]; out [rows] (f64). Grid (rows), block 256.
extern "C" __global__ void swk_nll(const float* logits, const u32* targets, double* out, int vocab) {
    __shared__ float fscratch[32];
    __shared__ double dscratch[32];
    const float* l = logits + (size_t)blockIdx.x * vocab;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        m = fmaxf(m, l[i]);
    }
    m = block_reduce(m, MaxOp(), fscratch);
    double s = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        s += exp((double)l[i] - (double)m);
    }
    s = block_reduce(s, SumOp(), dscratch);
    if (threadIdx.x == 0) {
        out[blockIdx.x] = (double)m + log(s) - (double)l[targets[blockIdx.x]];
    }
}
