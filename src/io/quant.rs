//! GGML tensor element types and dequantization of GGUF block formats to `f32`.
//!
//! Block layouts follow ggml (all multi-byte fields little-endian). The arithmetic of every
//! dequantizer mirrors the reference order of operations (scale products first, then
//! `scale * q - min`, no fused multiply-add), so results are bit-identical to the reference
//! implementation in the `gguf` Python package.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// GGML tensor element types (numeric ids as in the GGUF spec).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE half float.
    F16,
    /// 4-bit blocks of 32: one f16 scale, `x = (q - 8) * d`.
    Q4_0,
    /// 4-bit blocks of 32: f16 scale and min, `x = q * d + m`.
    Q4_1,
    /// 5-bit blocks of 32: one f16 scale, `x = (q - 16) * d`.
    Q5_0,
    /// 5-bit blocks of 32: f16 scale and min, `x = q * d + m`.
    Q5_1,
    /// 8-bit blocks of 32: one f16 scale, `x = q * d`.
    Q8_0,
    /// 8-bit blocks of 32 with a block sum (an intermediate type; not dequantized here).
    Q8_1,
    /// 2-bit k-quant super-blocks of 256.
    Q2_K,
    /// 3-bit k-quant super-blocks of 256.
    Q3_K,
    /// 4-bit k-quant super-blocks of 256.
    Q4_K,
    /// 5-bit k-quant super-blocks of 256.
    Q5_K,
    /// 6-bit k-quant super-blocks of 256.
    Q6_K,
    /// 8-bit k-quant super-blocks of 256 (an intermediate type; not dequantized here).
    Q8_K,
    /// 8-bit signed integer.
    I8,
    /// 16-bit signed integer.
    I16,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// 64-bit IEEE float.
    F64,
    /// bfloat16.
    BF16,
}

/// All types, in id order.
const ALL_TYPES: [GgmlType; 20] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
    GgmlType::I8,
    GgmlType::I16,
    GgmlType::I32,
    GgmlType::I64,
    GgmlType::F64,
    GgmlType::BF16,
];

/// Elements per k-quant super-block.
const QK_K: usize = 256;

impl GgmlType {
    /// The type with GGUF numeric id `id`, or `None` for unknown (or unsupported) ids.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        ALL_TYPES.iter().copied().find(|t| t.id() == id)
    }

    /// The GGUF numeric id of this type.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::Q8_K => 15,
            GgmlType::I8 => 24,
            GgmlType::I16 => 25,
            GgmlType::I32 => 26,
            GgmlType::I64 => 27,
            GgmlType::F64 => 28,
            GgmlType::BF16 => 30,
        }
    }

    /// The ggml name of this type: "F32", "Q4_1", "Q6_K", ...
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::Q8_K => "Q8_K",
            GgmlType::I8 => "I8",
            GgmlType::I16 => "I16",
            GgmlType::I32 => "I32",
            GgmlType::I64 => "I64",
            GgmlType::F64 => "F64",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Elements per block: 1 for plain types, 32 for the legacy quants, 256 for k-quants.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::F64
            | GgmlType::I8
            | GgmlType::I16
            | GgmlType::I32
            | GgmlType::I64 => 1,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1 => 32,
            GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::Q8_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 => 2,
            GgmlType::BF16 => 2,
            GgmlType::F64 => 8,
            GgmlType::I8 => 1,
            GgmlType::I16 => 2,
            GgmlType::I32 => 4,
            GgmlType::I64 => 8,
            // {f16 d; u8 qs[16]}
            GgmlType::Q4_0 => 18,
            // {f16 d; f16 m; u8 qs[16]}
            GgmlType::Q4_1 => 20,
            // {f16 d; u8 qh[4]; u8 qs[16]}
            GgmlType::Q5_0 => 22,
            // {f16 d; f16 m; u8 qh[4]; u8 qs[16]}
            GgmlType::Q5_1 => 24,
            // {f16 d; i8 qs[32]}
            GgmlType::Q8_0 => 34,
            // {f16 d; f16 s; i8 qs[32]} (ggml's block_q8_1)
            GgmlType::Q8_1 => 36,
            // {u8 scales[16]; u8 qs[64]; f16 d; f16 dmin}
            GgmlType::Q2_K => 84,
            // {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}
            GgmlType::Q3_K => 110,
            // {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}
            GgmlType::Q4_K => 144,
            // {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}
            GgmlType::Q5_K => 176,
            // {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}
            GgmlType::Q6_K => 210,
            // {f32 d; i8 qs[256]; i16 bsums[16]}
            GgmlType::Q8_K => 292,
        }
    }

    /// True for the types [`dequantize`] supports.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::F64
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q8_0
                | GgmlType::Q2_K
                | GgmlType::Q3_K
                | GgmlType::Q4_K
                | GgmlType::Q5_K
                | GgmlType::Q6_K
        )
    }

    /// Bytes needed for `n` elements; None if n is not a multiple of block_size or overflows.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let bs = self.block_size();
        if n % bs != 0 {
            return None;
        }
        (n / bs).checked_mul(self.type_size())
    }
}

/// Dequantize `dst.len()` elements stored as `ty` in `src` into `dst`. Errors (as a human-readable
/// String, the caller adds the file/tensor name) when `ty` is unsupported, when dst.len() is not a
/// multiple of the block size, or when src.len() != bytes_for(dst.len()).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), String> {
    if !ty.can_dequantize() {
        return Err(format!("dequantization of {} tensors is not supported", ty.name()));
    }
    let n = dst.len();
    let bs = ty.block_size();
    if n % bs != 0 {
        return Err(format!("{n} elements is not a multiple of the {} block size {bs}", ty.name()));
    }
    match ty.bytes_for(n) {
        Some(need) if need == src.len() => {}
        Some(need) => {
            return Err(format!("{n} {} elements need {need} bytes, got {}", ty.name(), src.len()));
        }
        None => return Err(format!("{n} {} elements overflow the byte count", ty.name())),
    }
    match ty {
        GgmlType::F32 => run_blocks::<1, 4, _>(src, dst, |x, y| y[0] = f32::from_le_bytes(*x)),
        GgmlType::F64 => {
            run_blocks::<1, 8, _>(src, dst, |x, y| y[0] = f64::from_le_bytes(*x) as f32)
        }
        GgmlType::BF16 => run_blocks::<1, 2, _>(src, dst, |x, y| {
            y[0] = bf16::from_bits(u16::from_le_bytes(*x)).to_f32()
        }),
        GgmlType::F16 => run_chunks(src, dst, 1, 2, f16_chunk),
        GgmlType::Q4_0 => run_blocks(src, dst, block_q4_0),
        GgmlType::Q4_1 => run_blocks(src, dst, block_q4_1),
        GgmlType::Q5_0 => run_blocks(src, dst, block_q5_0),
        GgmlType::Q5_1 => run_blocks(src, dst, block_q5_1),
        GgmlType::Q8_0 => run_blocks(src, dst, block_q8_0),
        GgmlType::Q2_K => run_blocks(src, dst, block_q2_k),
        GgmlType::Q3_K => run_blocks(src, dst, block_q3_k),
        GgmlType::Q4_K => run_blocks(src, dst, block_q4_k),
        GgmlType::Q5_K => run_blocks(src, dst, block_q5_k),
        GgmlType::Q6_K => run_blocks(src, dst, block_q6_k),
        GgmlType::Q8_1
        | GgmlType::Q8_K
        | GgmlType::I8
        | GgmlType::I16
        | GgmlType::I32
        | GgmlType::I64 => {
            return Err(format!("dequantization of {} tensors is not supported", ty.name()));
        }
    }
    Ok(())
}

/// Output elements per rayon task; inputs no larger than this run on the calling thread.
const TASK_ELEMS: usize = 16384;

/// Runs `f(src_chunk, dst_chunk)` over chunks of [`TASK_ELEMS`] output elements (and
/// `TASK_ELEMS * bytes / elems` input bytes), in parallel when there is more than one chunk.
/// `bytes / elems` is the byte count per `elems` elements (one block); the caller has checked
/// that `src` and `dst` hold the same number of blocks.
fn run_chunks<F>(src: &[u8], dst: &mut [f32], elems: usize, bytes: usize, f: F)
where
    F: Fn(&[u8], &mut [f32]) + Sync,
{
    if dst.len() <= TASK_ELEMS {
        f(src, dst);
    } else {
        dst.par_chunks_mut(TASK_ELEMS)
            .zip(src.par_chunks(TASK_ELEMS / elems * bytes))
            .for_each(|(y, x)| f(x, y));
    }
}

/// Runs the per-block dequantizer `f` over all blocks of `BS` elements / `TS` bytes, in parallel
/// over ranges of blocks. The caller has checked `src.len() == dst.len() / BS * TS`.
fn run_blocks<const BS: usize, const TS: usize, F>(src: &[u8], dst: &mut [f32], f: F)
where
    F: Fn(&[u8; TS], &mut [f32; BS]) + Sync,
{
    const { assert!(TASK_ELEMS % BS == 0) };
    run_chunks(src, dst, BS, TS, |x, y| {
        for (yb, xb) in y.chunks_exact_mut(BS).zip(x.chunks_exact(TS)) {
            // Always Ok: chunks_exact yields exactly BS / TS long slices.
            if let (Ok(yb), Ok(xb)) = (<&mut [f32; BS]>::try_from(yb), <&[u8; TS]>::try_from(xb)) {
                f(xb, yb);
            }
        }
    });
}

/// Converts little-endian f16 bytes to f32 (`x.len() == 2 * y.len()`), with half's SIMD
/// slice conversion (F16C when the CPU has it).
fn f16_chunk(x: &[u8], y: &mut [f32]) {
    if cfg!(target_endian = "little") {
        if let Ok(h) = bytemuck::try_cast_slice::<u8, f16>(x) {
            if h.len() == y.len() {
                h.convert_to_f32_slice(y);
                return;
            }
        }
    }
    // Unaligned source: go through an aligned stack buffer.
    const N: usize = 1024;
    let mut buf = [f16::ZERO; N];
    for (yc, xc) in y.chunks_mut(N).zip(x.chunks(2 * N)) {
        for (b, p) in buf.iter_mut().zip(xc.chunks_exact(2)) {
            *b = f16::from_bits(u16::from_le_bytes([p[0], p[1]]));
        }
        if let Some(h) = buf.get(..yc.len()) {
            h.convert_to_f32_slice(yc);
        }
    }
}

/// Reads the little-endian f16 at `b[i..i + 2]` as f32.
#[inline(always)]
fn f16_at<const TS: usize>(b: &[u8; TS], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Q4_0 {f16 d; u8 qs[16]}: element j < 16 is the low nibble of qs[j], j >= 16 the high
/// nibble of qs[j - 16]; x = (q - 8) * d.
#[inline(always)]
fn block_q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = d * ((q & 0x0F) as i32 - 8) as f32;
        y[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1 {f16 d; f16 m; u8 qs[16]}: nibbles as in Q4_0; x = q * d + m.
#[inline(always)]
fn block_q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = d * (q & 0x0F) as f32 + m;
        y[j + 16] = d * (q >> 4) as f32 + m;
    }
}

/// Q5_0 {f16 d; u8 qh[4]; u8 qs[16]}: low 4 bits as in Q4_0, bit 4 of element j is bit j of
/// the little-endian u32 qh; x = (q - 16) * d.
#[inline(always)]
fn block_q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let q = b[6 + j] as u32;
        let lo = (q & 0x0F) | (((qh >> j) & 1) << 4);
        let hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (lo as i32 - 16) as f32;
        y[j + 16] = d * (hi as i32 - 16) as f32;
    }
}

/// Q5_1 {f16 d; f16 m; u8 qh[4]; u8 qs[16]}: bits as in Q5_0; x = q * d + m.
#[inline(always)]
fn block_q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let q = b[8 + j] as u32;
        let lo = (q & 0x0F) | (((qh >> j) & 1) << 4);
        let hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4);
        y[j] = d * lo as f32 + m;
        y[j + 16] = d * hi as f32 + m;
    }
}

/// Q8_0 {f16 d; i8 qs[32]}: x = q * d.
#[inline(always)]
fn block_q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = d * (b[2 + j] as i8) as f32;
    }
}

/// Q2_K {u8 scales[16]; u8 qs[64]; f16 d; f16 dmin}: 16 sub-blocks of 16 with 4-bit scale
/// (low nibble) and 4-bit min (high nibble). Element `128 h + 32 s + l` (h < 2, s < 4, l < 32)
/// is bits `2s..2s+2` of qs[32 h + l]; x = (d * scale) * q - dmin * min.
#[inline(always)]
fn block_q2_k(b: &[u8; 84], y: &mut [f32; 256]) {
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    for h in 0..2 {
        for s in 0..4 {
            for half in 0..2 {
                let sc = b[h * 8 + s * 2 + half];
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                let qs = 16 + h * 32 + half * 16;
                let out = h * 128 + s * 32 + half * 16;
                for l in 0..16 {
                    let q = (b[qs + l] >> (2 * s)) & 3;
                    y[out + l] = dl * q as f32 - ml;
                }
            }
        }
    }
}

/// Q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}: 16 sub-blocks of 16 with signed 6-bit
/// scales (low 4 bits from scales[0..8] nibbles, high 2 bits from scales[8..12]). Element
/// `128 h + 32 s + l` takes its low 2 bits from bits `2s..2s+2` of qs[32 h + l]; bit `4h + s` of
/// hmask[l] set means no offset, clear means subtract 4; x = (d * scale) * q.
#[inline(always)]
fn block_q3_k(b: &[u8; 110], y: &mut [f32; 256]) {
    let d = f16_at(b, 108);
    let mut dl = [0f32; 16];
    for (k, dk) in dl.iter_mut().enumerate() {
        let lo = (b[96 + (k % 8)] >> (4 * (k / 8))) & 0x0F;
        let hi = (b[104 + (k % 4)] >> (2 * (k / 4))) & 0x03;
        let sc = (lo | (hi << 4)) as i32 - 32;
        *dk = d * sc as f32;
    }
    for h in 0..2 {
        for s in 0..4 {
            let shift = h * 4 + s;
            for half in 0..2 {
                let dk = dl[h * 8 + s * 2 + half];
                let qs = 32 + h * 32 + half * 16;
                let out = h * 128 + s * 32 + half * 16;
                for l in 0..16 {
                    let ql = ((b[qs + l] >> (2 * s)) & 3) as i32;
                    let hbit = ((b[half * 16 + l] >> shift) & 1) as i32;
                    let q = ql - ((hbit ^ 1) << 2);
                    y[out + l] = dk * q as f32;
                }
            }
        }
    }
}

/// Unpacks the 6-bit scales and mins of the 8 sub-blocks of Q4_K / Q5_K from `s` (12 bytes):
/// for j < 4 scale = s[j] & 63, min = s[j + 4] & 63; for j >= 4 the low 4 bits come from the
/// nibbles of s[j + 4] and the high 2 bits from the top bits of s[j - 4] (scale) / s[j] (min).
#[inline(always)]
fn k_scales_mins<const TS: usize>(b: &[u8; TS], off: usize) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = b[off + j] & 0x3F;
        mn[j] = b[off + j + 4] & 0x3F;
        sc[j + 4] = (b[off + j + 8] & 0x0F) | ((b[off + j] >> 6) << 4);
        mn[j + 4] = (b[off + j + 8] >> 4) | ((b[off + j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// Q4_K {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}: 8 sub-blocks of 32. Element
/// `64 c + 32 s + l` (c < 4, s < 2, l < 32) is nibble s of qs[32 c + l], sub-block `2c + s`;
/// x = (d * scale) * q - dmin * min.
#[inline(always)]
fn block_q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = k_scales_mins(b, 4);
    for c in 0..4 {
        for s in 0..2 {
            let j = 2 * c + s;
            let dl = d * sc[j] as f32;
            let ml = dmin * mn[j] as f32;
            for l in 0..32 {
                let q = (b[16 + 32 * c + l] >> (4 * s)) & 0x0F;
                y[32 * j + l] = dl * q as f32 - ml;
            }
        }
    }
}

/// Q5_K {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: low 4 bits as in Q4_K, bit 4
/// of element `32 j + l` is bit j of qh[l]; x = (d * scale) * q - dmin * min.
#[inline(always)]
fn block_q5_k(b: &[u8; 176], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = k_scales_mins(b, 4);
    for c in 0..4 {
        for s in 0..2 {
            let j = 2 * c + s;
            let dl = d * sc[j] as f32;
            let ml = dmin * mn[j] as f32;
            for l in 0..32 {
                let lo = (b[48 + 32 * c + l] >> (4 * s)) & 0x0F;
                let hi = (b[16 + l] >> j) & 1;
                let q = lo | (hi << 4);
                y[32 * j + l] = dl * q as f32 - ml;
            }
        }
    }
}

/// Q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: 16 sub-blocks of 16. Element
/// `128 h + 32 r + l` (h < 2, r < 4, l < 32) has low 4 bits = nibble `r / 2` of
/// ql[64 h + 32 (r % 2) + l] and high 2 bits = bits `2r..2r+2` of qh[32 h + l];
/// x = (d * scale) * (q - 32).
#[inline(always)]
fn block_q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
    let d = f16_at(b, 208);
    for h in 0..2 {
        for r in 0..4 {
            for half in 0..2 {
                let k = h * 8 + r * 2 + half;
                let dk = d * (b[192 + k] as i8) as f32;
                let ql = 64 * h + 32 * (r % 2) + 16 * half;
                let qh = 128 + 32 * h + 16 * half;
                let out = 128 * h + 32 * r + 16 * half;
                for l in 0..16 {
                    let lo = (b[ql + l] >> (4 * (r / 2))) & 0x0F;
                    let hi = (b[qh + l] >> (2 * r)) & 0x03;
                    let q = (lo | (hi << 4)) as i32 - 32;
                    y[out + l] = dk * q as f32;
                }
            }
        }
    }
}

/// The value of an FP8 E4M3 byte (`float8_e4m3fn`: sign, 4 exponent bits of bias 7, 3
/// mantissa bits; no infinities, `S.1111.111` is NaN).
pub fn e4m3_to_f32(b: u8) -> f32 {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        std::array::from_fn(|i| {
            let (e, m) = ((i >> 3) & 0xf, (i & 7) as f32);
            let magnitude = match (e, m) {
                (15, 7.0) => f32::NAN,
                (0, _) => m / 8.0 * 2f32.powi(-6),
                _ => (1.0 + m / 8.0) * 2f32.powi(e as i32 - 7),
            };
            if i & 0x80 != 0 {
                -magnitude
            } else {
                magnitude
            }
        })
    })[b as usize]
}

/// Dequantize an FP8 E4M3 matrix `q` (`rows × cols`, row-major) with one scale per block of
/// `[br, bc]` (`scales`: `[⌈rows/br⌉, ⌈cols/bc⌉]`, row-major): `w[r, c] = e4m3(q[r, c]) ·
/// scales[r / br, c / bc]`. The caller checks the sizes.
pub fn dequantize_fp8_blocks(
    q: &[u8],
    (rows, cols): (usize, usize),
    scales: &[f32],
    [br, bc]: [usize; 2],
) -> Vec<f32> {
    let sc = cols.div_ceil(bc);
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(cols.max(1)).zip(q.par_chunks(cols.max(1))).enumerate().for_each(
        |(r, (o, q))| {
            let s = &scales[(r / br) * sc..(r / br + 1) * sc];
            for (c, (o, &q)) in o.iter_mut().zip(q).enumerate() {
                *o = e4m3_to_f32(q) * s[c / bc];
            }
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    #[test]
    fn f16_all_bit_patterns() {
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        let src: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let mut dst = vec![0f32; bits.len()];
        dequantize(GgmlType::F16, &src, &mut dst).expect("dequantize F16");
        for (&b, &x) in bits.iter().zip(&dst) {
            let h = f16::from_bits(b);
            assert!(same(x, h.to_f32()), "f16 {b:#06x} -> {x}");
            if !h.is_nan() {
                // Round trip: every f16 is exactly representable as f32.
                assert_eq!(f16::from_f32(x).to_bits(), b);
            }
        }
        // Unaligned source goes through the copying path.
        let mut shifted = vec![0u8; src.len() + 1];
        shifted[1..].copy_from_slice(&src);
        let mut dst2 = vec![0f32; bits.len()];
        dequantize(GgmlType::F16, &shifted[1..], &mut dst2).expect("dequantize F16 unaligned");
        assert!(dst.iter().zip(&dst2).all(|(&a, &b)| same(a, b)));
    }

    #[test]
    fn bf16_all_bit_patterns() {
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        let src: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let mut dst = vec![0f32; bits.len()];
        dequantize(GgmlType::BF16, &src, &mut dst).expect("dequantize BF16");
        for (&b, &x) in bits.iter().zip(&dst) {
            let h = bf16::from_bits(b);
            if h.is_nan() {
                assert!(x.is_nan());
            } else {
                // bf16 is the top half of an f32.
                assert_eq!(x.to_bits(), (b as u32) << 16);
                assert_eq!(bf16::from_f32(x).to_bits(), b);
            }
        }
    }

    #[test]
    fn f16_bf16_round_trip_values() {
        let vals = [0.0f32, -0.0, 1.0, -2.5, 65504.0, 6.1035156e-5, 5.9604645e-8, 0.333_251_95];
        let src: Vec<u8> = vals.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
        let mut dst = [0f32; 8];
        dequantize(GgmlType::F16, &src, &mut dst).expect("F16");
        assert_eq!(dst.map(f32::to_bits), vals.map(f32::to_bits));

        let vals = [0.0f32, -0.0, 1.0, -2.5, 3.389_531_4e38, 1.0e-38, 0.333_984_38, -1.5e10];
        let src: Vec<u8> = vals.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect();
        dequantize(GgmlType::BF16, &src, &mut dst).expect("BF16");
        for (&x, &v) in dst.iter().zip(&vals) {
            assert_eq!(x, bf16::from_f32(v).to_f32());
        }
        assert_eq!(dst[..4], vals[..4]);
    }

    #[test]
    fn ids_round_trip() {
        for t in ALL_TYPES {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(t.bytes_for(t.block_size()), Some(t.type_size()));
        }
    }
}
