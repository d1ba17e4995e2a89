//! How a device stores weight matrices (projections, embedding, LM head), and the host's
//! mirror of its rounding: what a value becomes once stored, and back.

use crate::{Error, Result};

/// How weight matrices are stored on a device. Norm weights, biases and RoPE frequencies are
/// always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    /// 4 bytes per weight: the host's values exactly.
    F32,
    /// 2 bytes per weight, rounded to nearest even (exact for models stored in bf16).
    Bf16,
    /// 2 bytes per weight, IEEE half, rounded to nearest even (exact for models stored in
    /// f16; a finite value beyond ±65 504 has no f16 and is refused).
    F16,
}

/// The largest finite f16.
pub const F16_MAX: f32 = 65504.0;

impl WeightDtype {
    /// Bytes per stored weight.
    pub fn bytes(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::Bf16 | WeightDtype::F16 => 2,
        }
    }

    /// Lowercase name (`f32`, `bf16`, `f16`), also the suffix of its kernels' names.
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::F16 => "f16",
        }
    }

    /// Whether an element takes 2 bytes (bf16 or f16).
    pub fn is_half(self) -> bool {
        self.bytes() == 2
    }

    /// The raw bits `v` is stored as (a 2-byte type's in the low 16 bits), or `None` for a
    /// finite value the type cannot hold (beyond f16's range). Infinities and NaN are kept.
    pub fn encode(self, v: f32) -> Option<u32> {
        match self {
            WeightDtype::F32 => Some(v.to_bits()),
            WeightDtype::Bf16 => Some(half::bf16::from_f32(v).to_bits() as u32),
            WeightDtype::F16 => {
                let h = half::f16::from_f32(v);
                (h.is_finite() || !v.is_finite()).then_some(h.to_bits() as u32)
            }
        }
    }

    /// The f32 bits of stored raw bits (exact: every bf16 and f16 is an f32).
    pub fn decode(self, raw: u32) -> u32 {
        match self {
            WeightDtype::F32 => raw,
            WeightDtype::Bf16 => raw << 16,
            WeightDtype::F16 => half::f16::from_bits(raw as u16).to_f32().to_bits(),
        }
    }

    /// [`Self::encode`], with an error naming `what` (a tensor, an edit) when the value does
    /// not fit.
    pub fn encode_or_err(self, v: f32, what: &str) -> Result<u32> {
        self.encode(v).ok_or_else(|| {
            Error::tensor(
                what,
                format!(
                    "value {v} is outside the range of {} storage (±{F16_MAX}); store the \
                     weights as bf16 or f32 (--gpu-dtype)",
                    self.name()
                ),
            )
        })
    }

    /// Write `values` into `out` as this storage's little-endian bits (`values.len()` times
    /// [`Self::bytes`] bytes), in parallel chunks, each element at its fixed width; the error
    /// names `what` for a value the type cannot hold.
    pub fn encode_slice(self, values: &[f32], out: &mut [u8], what: &str) -> Result<()> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        let width = self.bytes();
        out.par_chunks_mut(CHUNK * width).zip(values.par_chunks(CHUNK)).try_for_each(|(d, src)| {
            if width == 2 {
                for (d, &v) in d.chunks_exact_mut(2).zip(src) {
                    d.copy_from_slice(&(self.encode_or_err(v, what)? as u16).to_le_bytes());
                }
            } else {
                for (d, &v) in d.chunks_exact_mut(4).zip(src) {
                    d.copy_from_slice(&self.encode_or_err(v, what)?.to_le_bytes());
                }
            }
            Ok(())
        })
    }

    /// The storage whose bits are those of a file's dtype (`F32`, `F16`, `BF16`, as a
    /// tensor's `source_dtype` names it), if any.
    pub fn of_stored(source_dtype: &str) -> Option<WeightDtype> {
        match source_dtype {
            "F32" => Some(WeightDtype::F32),
            "F16" => Some(WeightDtype::F16),
            "BF16" => Some(WeightDtype::Bf16),
            _ => None,
        }
    }

    /// The 2-byte storage that keeps a checkpoint's matrices as they are on disk: f16 when
    /// every matrix (2-D tensor) of `weights` was stored as F16, bf16 when every one was BF16;
    /// otherwise (f32 or quantized matrices, or a mix) bf16.
    pub fn matching(weights: &crate::model::Weights) -> WeightDtype {
        let matrices = weights.iter().filter(|(_, t)| t.shape.len() == 2);
        Self::matching_stored(matrices.map(|(_, t)| t.source_dtype.as_str()))
    }

    /// [`Self::matching`] from the stored dtype names of a checkpoint's matrices (as
    /// [`crate::model::LazyModel::source_dtype`] gives them from the headers).
    pub fn matching_stored<'a>(matrices: impl IntoIterator<Item = &'a str>) -> WeightDtype {
        let mut kinds =
            matrices.into_iter().map(|d| WeightDtype::of_stored(d).filter(|d| d.is_half()));
        let first = kinds.next().flatten();
        match first {
            Some(d) if kinds.all(|k| k == Some(d)) => d,
            _ => WeightDtype::Bf16,
        }
    }

    /// The f32 bits `v` has once stored: rounded to the type and widened back, or `None`
    /// where [`Self::encode`] refuses it.
    pub fn stored_bits(self, v: f32) -> Option<u32> {
        self.encode(v).map(|raw| self.decode(raw))
    }

    /// [`Self::stored_bits`], with [`Self::encode_or_err`]'s error naming `what`.
    pub fn stored_bits_or_err(self, v: f32, what: &str) -> Result<u32> {
        self.encode_or_err(v, what).map(|raw| self.decode(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_type_rounds_to_nearest_even_and_widens_exactly() {
        // 1 + 2^-9 is a tie for bf16 (8 mantissa bits: rounds down to 1) but exact in f16.
        let v = 1.0 + 1.0 / 512.0;
        assert_eq!(WeightDtype::Bf16.stored_bits(v), Some(1.0f32.to_bits()));
        assert_eq!(WeightDtype::F16.stored_bits(v), Some(v.to_bits()));
        assert_eq!(WeightDtype::F32.stored_bits(v), Some(v.to_bits()));
        // 1 + 2^-11 is a tie for f16 (10 mantissa bits): down to even.
        assert_eq!(WeightDtype::F16.stored_bits(1.0 + 1.0 / 2048.0), Some(1.0f32.to_bits()));
        assert_eq!(WeightDtype::F16.encode(1.0), Some(0x3c00));
        assert_eq!(WeightDtype::Bf16.encode(1.0), Some(0x3f80));
        // Every f16 round-trips through decode and encode.
        for raw in 0..=u16::MAX as u32 {
            let f = f32::from_bits(WeightDtype::F16.decode(raw));
            if !f.is_nan() {
                assert_eq!(WeightDtype::F16.encode(f), Some(raw), "{raw:#06x}");
            }
        }
    }

    #[test]
    fn matching_keeps_a_checkpoints_own_16_bit_storage() {
        use crate::model::{Tensor, Weights};
        let weights = |dtypes: &[&str]| {
            let mut w = Weights::default();
            for (i, d) in dtypes.iter().enumerate() {
                w.insert(
                    format!("m{i}.weight"),
                    Tensor::new("m", vec![2, 2], vec![0.0; 4], d).unwrap(),
                );
            }
            // Vectors (norms) do not count.
            w.insert("norm.weight", Tensor::new("norm", vec![2], vec![1.0; 2], "F32").unwrap());
            w
        };
        assert_eq!(WeightDtype::matching(&weights(&["F16", "F16"])), WeightDtype::F16);
        assert_eq!(WeightDtype::matching(&weights(&["BF16"])), WeightDtype::Bf16);
        assert_eq!(WeightDtype::matching(&weights(&["F16", "BF16"])), WeightDtype::Bf16);
        assert_eq!(WeightDtype::matching(&weights(&["F16", "Q4_1"])), WeightDtype::Bf16);
        assert_eq!(WeightDtype::matching(&weights(&["F32"])), WeightDtype::Bf16);
        assert_eq!(WeightDtype::matching(&weights(&[])), WeightDtype::Bf16);
    }

    #[test]
    fn f16_refuses_finite_values_past_its_range() {
        let f16 = WeightDtype::F16;
        assert_eq!(f16.encode(F16_MAX), Some(0x7bff));
        assert_eq!(f16.encode(65519.0), Some(0x7bff), "rounds down to the largest f16");
        assert_eq!(f16.encode(65520.0), None, "rounds to infinity: refused");
        assert_eq!(f16.encode(-1e6), None);
        assert_eq!(f16.encode(f32::INFINITY), Some(0x7c00), "infinity is kept");
        assert!(f16.encode(f32::NAN).is_some());
        assert!(WeightDtype::Bf16.encode(1e30).is_some(), "bf16 has f32's range");
        let e = f16.encode_or_err(1e5, "model.layers.0.mlp.down_proj.weight").unwrap_err();
        let e = e.to_string();
        assert!(e.contains("down_proj") && e.contains("f16") && e.contains("65504"), "{e}");
    }

    #[test]
    fn stored_bits_round_to_the_slot_dtype_and_refuse_what_f16_cannot_hold() {
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(
            WeightDtype::Bf16.stored_bits_or_err(1.0 + 1.0 / 256.0, "w").unwrap(),
            0x3f80_0000
        );
        assert_eq!(WeightDtype::F32.stored_bits_or_err(0.1, "w").unwrap(), 0.1f32.to_bits());
        assert!(
            f32::from_bits(WeightDtype::Bf16.stored_bits_or_err(f32::NAN, "w").unwrap()).is_nan()
        );
        let e = WeightDtype::F16.stored_bits_or_err(7e4, "model.layers.2.mlp.down_proj.weight");
        let e = e.unwrap_err().to_string();
        assert!(e.contains("model.layers.2.mlp.down_proj.weight") && e.contains("f16"), "{e}");
    }
}
