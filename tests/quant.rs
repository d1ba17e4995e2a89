//! Dequantization against fixtures made by `tests/reference/make_quant_fixtures.py` (the
//! numpy reference in the `gguf` Python package), plus error handling.
//!
//! Tolerance: bit-exact. The dequantizers evaluate the same f32 expressions in the same order
//! as the reference (`(d * scale) * q - dmin * min`, no fused multiply-add), so every value
//! must have identical bits; NaN matches any NaN (payloads may be quieted).

use std::path::PathBuf;

use swk::io::quant::{dequantize, GgmlType};

/// Types with fixtures, i.e. every type `dequantize` supports.
const FIXTURE_TYPES: [GgmlType; 14] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::F64,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

fn fixture(ty: GgmlType) -> (Vec<u8>, Vec<f32>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant");
    let read = |ext: &str| {
        let path = dir.join(format!("{}.{ext}", ty.name()));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let raw = read("bin");
    let expected =
        read("f32").chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    (raw, expected)
}

fn assert_same(ty: GgmlType, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{}: length", ty.name());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{} element {i}: got {g:e} ({:#010x}), want {w:e} ({:#010x})",
            ty.name(),
            g.to_bits(),
            w.to_bits()
        );
    }
}

#[test]
fn matches_reference_fixtures() {
    for ty in FIXTURE_TYPES {
        assert!(ty.can_dequantize(), "{}", ty.name());
        let (raw, want) = fixture(ty);
        assert_eq!(ty.bytes_for(want.len()), Some(raw.len()), "{}: fixture size", ty.name());
        assert!(want.len() >= 4 * ty.block_size(), "{}: at least 4 blocks", ty.name());
        let mut got = vec![f32::NAN; want.len()];
        dequantize(ty, &raw, &mut got).unwrap_or_else(|e| panic!("{}: {e}", ty.name()));
        assert_same(ty, &got, &want);
    }
}

/// Large inputs take the parallel path: tile each fixture past several rayon tasks with a
/// partial last task, and from an odd address so the source is unaligned.
#[test]
fn matches_reference_fixtures_parallel_unaligned() {
    for ty in FIXTURE_TYPES {
        let (raw, want) = fixture(ty);
        let reps = 50_000 / want.len() + 3;
        let mut src = vec![0u8; 1];
        for _ in 0..reps {
            src.extend_from_slice(&raw);
        }
        let want: Vec<f32> = want.iter().copied().cycle().take(want.len() * reps).collect();
        let mut got = vec![f32::NAN; want.len()];
        dequantize(ty, &src[1..], &mut got).unwrap_or_else(|e| panic!("{}: {e}", ty.name()));
        assert_same(ty, &got, &want);
    }
}

#[test]
fn super_weight_survives() {
    // The fixtures put a -2.75 "super weight" at element 7 of the last quantized block (3) and
    // 40.0 at element 30 of block 2, among weights of about 0.02.
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
        let (raw, want) = fixture(ty);
        let mut got = vec![0f32; want.len()];
        dequantize(ty, &raw, &mut got).expect("dequantize");
        assert!((got[3 * 32 + 7] + 2.75).abs() < 0.01, "{}: {}", ty.name(), got[3 * 32 + 7]);
        assert!((got[2 * 32 + 30] - 40.0).abs() < 0.01, "{}: {}", ty.name(), got[2 * 32 + 30]);
    }
}

#[test]
fn empty_input_is_ok() {
    for ty in FIXTURE_TYPES {
        assert_eq!(dequantize(ty, &[], &mut []), Ok(()), "{}", ty.name());
    }
}

#[test]
fn wrong_src_length_is_err() {
    for ty in FIXTURE_TYPES {
        let (raw, want) = fixture(ty);
        let mut dst = vec![0f32; want.len()];
        assert!(dequantize(ty, &raw[..raw.len() - 1], &mut dst).is_err(), "{}", ty.name());
        let mut longer = raw.clone();
        longer.push(0);
        assert!(dequantize(ty, &longer, &mut dst).is_err(), "{}", ty.name());
        assert!(dequantize(ty, &[], &mut dst).is_err(), "{}", ty.name());
        // One block fewer in dst than in src.
        let mut short = vec![0f32; want.len() - ty.block_size()];
        assert!(dequantize(ty, &raw, &mut short).is_err(), "{}", ty.name());
    }
}

#[test]
fn dst_not_multiple_of_block_is_err() {
    for ty in FIXTURE_TYPES.into_iter().filter(|t| t.block_size() > 1) {
        for n in [1, ty.block_size() - 1, ty.block_size() + 1, 3 * ty.block_size() / 2] {
            let mut dst = vec![0f32; n];
            let src = vec![0u8; ty.type_size() * (n / ty.block_size() + 1)];
            let err = dequantize(ty, &src, &mut dst).expect_err(ty.name());
            assert!(err.contains("multiple"), "{}: {err}", ty.name());
            assert_eq!(ty.bytes_for(n), None);
        }
    }
}

#[test]
fn unsupported_types_are_err() {
    let unsupported =
        [GgmlType::Q8_1, GgmlType::Q8_K, GgmlType::I8, GgmlType::I16, GgmlType::I32, GgmlType::I64];
    for ty in unsupported {
        assert!(!ty.can_dequantize());
        let n = ty.block_size();
        let src = vec![0u8; ty.type_size()];
        let mut dst = vec![0f32; n];
        let err = dequantize(ty, &src, &mut dst).expect_err(ty.name());
        assert!(err.contains(ty.name()), "{err}");
    }
}

#[test]
fn ids_and_names() {
    let table: [(GgmlType, u32, &str); 20] = [
        (GgmlType::F32, 0, "F32"),
        (GgmlType::F16, 1, "F16"),
        (GgmlType::Q4_0, 2, "Q4_0"),
        (GgmlType::Q4_1, 3, "Q4_1"),
        (GgmlType::Q5_0, 6, "Q5_0"),
        (GgmlType::Q5_1, 7, "Q5_1"),
        (GgmlType::Q8_0, 8, "Q8_0"),
        (GgmlType::Q8_1, 9, "Q8_1"),
        (GgmlType::Q2_K, 10, "Q2_K"),
        (GgmlType::Q3_K, 11, "Q3_K"),
        (GgmlType::Q4_K, 12, "Q4_K"),
        (GgmlType::Q5_K, 13, "Q5_K"),
        (GgmlType::Q6_K, 14, "Q6_K"),
        (GgmlType::Q8_K, 15, "Q8_K"),
        (GgmlType::I8, 24, "I8"),
        (GgmlType::I16, 25, "I16"),
        (GgmlType::I32, 26, "I32"),
        (GgmlType::I64, 27, "I64"),
        (GgmlType::F64, 28, "F64"),
        (GgmlType::BF16, 30, "BF16"),
    ];
    for (ty, id, name) in table {
        assert_eq!(ty.id(), id);
        assert_eq!(ty.name(), name);
        assert_eq!(GgmlType::from_id(id), Some(ty));
    }
    // Removed (Q4_2, Q4_3), i-quants, and out-of-range ids are unknown.
    for id in [4, 5, 16, 17, 18, 19, 20, 21, 22, 23, 29, 31, 34, 39, 40, 1000, u32::MAX] {
        assert_eq!(GgmlType::from_id(id), None, "id {id}");
    }
}

#[test]
fn block_and_type_sizes() {
    let table: [(GgmlType, usize, usize); 20] = [
        (GgmlType::F32, 1, 4),
        (GgmlType::F16, 1, 2),
        (GgmlType::Q4_0, 32, 18),
        (GgmlType::Q4_1, 32, 20),
        (GgmlType::Q5_0, 32, 22),
        (GgmlType::Q5_1, 32, 24),
        (GgmlType::Q8_0, 32, 34),
        (GgmlType::Q8_1, 32, 36),
        (GgmlType::Q2_K, 256, 84),
        (GgmlType::Q3_K, 256, 110),
        (GgmlType::Q4_K, 256, 144),
        (GgmlType::Q5_K, 256, 176),
        (GgmlType::Q6_K, 256, 210),
        (GgmlType::Q8_K, 256, 292),
        (GgmlType::I8, 1, 1),
        (GgmlType::I16, 1, 2),
        (GgmlType::I32, 1, 4),
        (GgmlType::I64, 1, 8),
        (GgmlType::F64, 1, 8),
        (GgmlType::BF16, 1, 2),
    ];
    for (ty, bs, ts) in table {
        assert_eq!((ty.block_size(), ty.type_size()), (bs, ts), "{}", ty.name());
    }
}

#[test]
fn bytes_for_values() {
    assert_eq!(GgmlType::F32.bytes_for(0), Some(0));
    assert_eq!(GgmlType::F32.bytes_for(7), Some(28));
    assert_eq!(GgmlType::F16.bytes_for(4096), Some(8192));
    assert_eq!(GgmlType::BF16.bytes_for(3), Some(6));
    assert_eq!(GgmlType::F64.bytes_for(5), Some(40));
    assert_eq!(GgmlType::Q4_0.bytes_for(4096), Some(128 * 18));
    assert_eq!(GgmlType::Q8_0.bytes_for(64), Some(68));
    assert_eq!(GgmlType::Q8_0.bytes_for(33), None);
    assert_eq!(GgmlType::Q4_K.bytes_for(4096 * 4096), Some(65536 * 144));
    assert_eq!(GgmlType::Q6_K.bytes_for(256), Some(210));
    assert_eq!(GgmlType::Q6_K.bytes_for(128), None);
    assert_eq!(GgmlType::Q2_K.bytes_for(512), Some(168));
    assert_eq!(GgmlType::Q3_K.bytes_for(768), Some(330));
    // Overflow.
    assert_eq!(GgmlType::F32.bytes_for(usize::MAX), None);
    assert_eq!(GgmlType::F64.bytes_for(usize::MAX / 4), None);
    assert_eq!(GgmlType::Q8_0.bytes_for(usize::MAX / 32 * 32), None);
    // Q6_K stores fewer bytes than elements, so the largest multiple of 256 still fits.
    assert_eq!(GgmlType::Q6_K.bytes_for(usize::MAX / 256 * 256), Some(usize::MAX / 256 * 210));
    assert_eq!(GgmlType::I8.bytes_for(usize::MAX), Some(usize::MAX));
}
