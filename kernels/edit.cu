// In-place element edits of device weights: swap in new bits, hand back the old ones.
// A single thread does the read-modify-write, so the old bits are exactly what was stored
// just before this write in stream order.
#include "common.cuh"

// f32 storage: w[idx] = new_bits; *old_bits = previous bits. Grid 1, block 32.
extern "C" __global__ void swk_edit_f32(u32* w, u64 idx, u32 new_bits, u32* old_bits) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        const u32 o = w[idx];
        w[idx] = new_bits;
        *old_bits = o;
    }
}

// bf16 storage (raw u16 bits): w[idx] = low 16 bits of new_bits; *old_bits = previous u16
// bits zero-extended. The host rounds f32 values to bf16 (nearest even) before calling and
// widens the old bits (<< 16) to f32 bits.
extern "C" __global__ void swk_edit_bf16(u16* w, u64 idx, u32 new_bits, u32* old_bits) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        const u32 o = (u32)w[idx];
        w[idx] = (u16)(new_bits & 0xffffu);
        *old_bits = o;
    }
}
