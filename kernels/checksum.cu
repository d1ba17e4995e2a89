// Order-sensitive, parallel checksums of device buffers, for proving bit-exact restoration.
//
// checksum = sum over elements i (wrapping, mod 2^64) of mix64(((i << 32) | bits_i) + GOLDEN)
// where bits_i are the element's raw bits (u32 for f32 storage, u16 zero-extended for bf16)
// and mix64 is SplitMix64's finalizer (a bijection). For i < 2^32 distinct (index, bits)
// pairs hash to distinct terms, so any changed, moved or swapped element changes the sum
// except with probability ~2^-64; wrapping addition is associative and commutative, so the
// result is identical whatever the launch shape or the order of the atomics. The host mirror
// `checksum_bits` in src/backend/cuda/edit.rs computes the same value on the CPU.
#include "common.cuh"

#define SWK_GOLDEN 0x9e3779b97f4a7c15ull

// Grid-stride over n elements; per-block sum, then one atomicAdd into *out (start it at 0).
extern "C" __global__ void swk_checksum_u32(const u32* data, u64 n, u64* out) {
    __shared__ u64 scratch[32];
    u64 s = 0ull;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        s += mix64(((i << 32) | (u64)data[i]) + SWK_GOLDEN);
    }
    s = block_reduce(s, SumOp(), scratch);
    if (threadIdx.x == 0) {
        atomicAdd(out, s);
    }
}

extern "C" __global__ void swk_checksum_u16(const u16* data, u64 n, u64* out) {
    __shared__ u64 scratch[32];
    u64 s = 0ull;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        s += mix64(((i << 32) | (u64)data[i]) + SWK_GOLDEN);
    }
    s = block_reduce(s, SumOp(), scratch);
    if (threadIdx.x == 0) {
        atomicAdd(out, s);
    }
}
