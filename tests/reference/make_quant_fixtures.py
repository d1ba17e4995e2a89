#!/usr/bin/env python3
"""Make the dequantization fixtures in tests/fixtures/quant/ from the `gguf` package.

For each type NAME this writes NAME.bin (raw little-endian block bytes, as stored in a GGUF
file) and NAME.f32 (the expected little-endian f32 values), computed by gguf.quants.dequantize
(or numpy's own conversion for F32 / F64, which gguf does not handle).

Run from the repository root: python3 tests/reference/make_quant_fixtures.py
The output is deterministic (fixed seed); rerunning it reproduces the committed files.
"""

from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
import gguf.quants

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "quant"
rng = np.random.default_rng(20240917)


def f16_bytes(values) -> np.ndarray:
    return np.asarray(values, dtype="<f2").view(np.uint8)


def sane_scales(n: int, signed: bool = False) -> np.ndarray:
    """f16 scales with magnitude in [1e-3, 1e-1] (log-uniform)."""
    mag = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), size=n))
    if signed:
        mag *= rng.choice([-1.0, 1.0], size=n)
    return mag.astype("<f2")


def random_blocks(qtype: T, n_blocks: int, f16_fields: dict[int, bool]) -> np.ndarray:
    """Random raw blocks; the f16 fields at the given byte offsets get sane scales
    (value: whether the scale may be negative)."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off, signed in f16_fields.items():
        blocks[:, off:off + 2] = sane_scales(n_blocks, signed).view(np.uint8).reshape(n_blocks, 2)
    return blocks


def weights(n_blocks: int, block: int, extreme: bool) -> np.ndarray:
    """LLM-like weights; with `extreme`, the last block holds one super weight."""
    w = rng.normal(0.0, 0.02, size=(n_blocks, block)).astype(np.float32)
    if extreme:
        w[-1, 7] = -2.75  # ~100x its neighbours, like a super weight
        w[-2, 30] = 40.0  # a huge outlier in f16 range
    return w.reshape(-1)


def write(name: str, raw: np.ndarray, expected: np.ndarray) -> None:
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    expected = np.ascontiguousarray(expected, dtype="<f4").reshape(-1)
    (OUT / f"{name}.bin").write_bytes(raw.tobytes())
    (OUT / f"{name}.f32").write_bytes(expected.tobytes())
    print(f"{name}: {raw.size} bytes -> {expected.size} values")


def deq(raw: np.ndarray, qtype: T) -> np.ndarray:
    return gguf.quants.dequantize(np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1), qtype)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)

    # Plain float types.
    specials = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan]
    f32 = np.concatenate([rng.normal(0, 1, 249).astype(np.float32), np.float32(specials),
                          np.float32([1e-45, 3.4028235e38])])
    write("F32", f32.astype("<f4").view(np.uint8), f32)

    f16_bits = rng.integers(0, 0x7C00, size=240, dtype=np.uint16)  # finite, incl. subnormals
    f16_bits |= rng.integers(0, 2, size=240, dtype=np.uint16) << 15
    f16_bits = np.concatenate([f16_bits, np.uint16([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF,
                                                   0x0400, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00,
                                                   0x7E00, 0x3C00, 0xBC00, 0x3555, 0x0200,
                                                   0x8200])])
    raw = f16_bits.astype("<u2").view(np.uint8)
    write("F16", raw, deq(raw, T.F16))

    bf16_bits = rng.integers(0, 0x7F80, size=240, dtype=np.uint16)
    bf16_bits |= rng.integers(0, 2, size=240, dtype=np.uint16) << 15
    bf16_bits = np.concatenate([bf16_bits, np.uint16([0x0000, 0x8000, 0x0001, 0x007F, 0x0080,
                                                     0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0,
                                                     0x3F80, 0xBF80, 0x3EAB, 0x4049, 0xC2F7,
                                                     0x0040])])
    raw = bf16_bits.astype("<u2").view(np.uint8)
    write("BF16", raw, deq(raw, T.BF16))

    f64 = np.concatenate([rng.normal(0, 1, 240), rng.normal(0, 1e-3, 4), np.float64([
        0.0, -0.0, 1.0 + 2.0**-24, 1.0 + 3 * 2.0**-24, 1e300, -1e300, 1e-300, 3.4028235677973366e38,
        1.401298464324817e-45, 7e-46, np.inf, -np.inf])])
    with np.errstate(over="ignore"):
        write("F64", f64.astype("<f8").view(np.uint8), f64.astype(np.float32))

    # Legacy 32-element quants: quantized LLM-like weights, then random raw blocks.
    legacy = {
        T.Q4_0: {0: True},
        T.Q4_1: {0: False, 2: True},
        T.Q5_0: {0: True},
        T.Q5_1: {0: False, 2: True},
        T.Q8_0: {0: True},
    }
    for qtype, fields in legacy.items():
        extreme = qtype in (T.Q4_1, T.Q8_0)
        quantized = gguf.quants.quantize(weights(4, 32, extreme), qtype).reshape(4, -1)
        raw = np.concatenate([quantized, random_blocks(qtype, 4, fields)])
        write(qtype.name, raw, deq(raw, qtype))

    # K-quants: gguf cannot quantize these, so random raw blocks with sane f16 scales.
    kquants = {
        T.Q2_K: {80: False, 82: False},
        T.Q3_K: {108: True},
        T.Q4_K: {0: False, 2: False},
        T.Q5_K: {0: False, 2: False},
        T.Q6_K: {208: True},
    }
    for qtype, fields in kquants.items():
        raw = random_blocks(qtype, 6, fields)
        write(qtype.name, raw, deq(raw, qtype))

    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"total {total} bytes")
    assert total < 200_000


if __name__ == "__main__":
    main()
