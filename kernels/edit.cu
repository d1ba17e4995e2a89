// In-place element edits of device weights: swap in new bits, hand back the old ones.
// A single thread does the read-modify-write, so the old bits are exactly what was stored
// just before this write in stream order.
#include "common.cuh"

// f32 storage: w[idx] = new_bits; *old_bits = previous bits. Grid 1, block 32.
extern "C" __global__ void swk_edit_u32(u32* w, u64 idx, u32 new_bits, u32* old_bits) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        const u32 o = w[idx];
        w[idx] = new_bits;
        *old_bits = o;
    }
}

// 2-byte storage (bf16 or f16, raw u16 bits): w[idx] = low 16 bits of new_bits; *old_bits =
// previous u16 bits zero-extended. The host rounds f32 values to the dtype (nearest even)
// before calling and widens the old bits to f32 bits.
extern "C" __global__ void swk_edit_u16(u16* w, u64 idx, u32 new_bits, u32* old_bits) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        const u32 o = (u32)w[idx];
        w[idx] = (u16)(new_bits & 0xffffu);
        *old_bits = o;
    }
}

// Batched edits: one launch reads or writes n elements at distinct indices `idx` (the host
// checks the bounds and that the indices are distinct, so no two threads touch one element).
// Grid-stride over the batch.

// out[i] = w[idx[i]] (f32 storage: raw u32 bits).
extern "C" __global__ void swk_gather_u32(const u32* w, const u64* idx, u32* out, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = w[idx[i]];
    }
}

// out[i] = w[idx[i]] zero-extended (bf16 or f16 storage: raw u16 bits).
extern "C" __global__ void swk_gather_u16(const u16* w, const u64* idx, u32* out, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = (u32)w[idx[i]];
    }
}

// w[idx[i]] = bits[i] (f32 storage).
extern "C" __global__ void swk_scatter_u32(u32* w, const u64* idx, const u32* bits, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        w[idx[i]] = bits[i];
    }
}

// w[idx[i]] = low 16 bits of bits[i] (bf16 or f16 storage; the host rounds first).
extern "C" __global__ void swk_scatter_u16(u16* w, const u64* idx, const u32* bits, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        w[idx[i]] = (u16)(bits[i] & 0xffffu);
    }
}
