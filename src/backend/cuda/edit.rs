//! In-place edits of device weights through the crate's [`EditTarget`] trait, and device
//! checksums that prove bit-exact restoration.
//!
//! Element bits cross the trait as f32 bits. For bf16 and f16 storage (documented contract):
//! * `read_bits` returns the stored bits widened to f32 bits (exact);
//! * `write_bits` rounds the f32 value to the dtype, nearest even (what the device can hold);
//!   a value f16 cannot hold (beyond ±65 504) is an error, and nothing is written.
//!
//! So an edit's recorded `original_bits` are exactly representable in the dtype and
//! [`EditGuard`](crate::edit::EditGuard)'s restore writes the stored bits back unchanged:
//! restoration is bit-exact in every dtype, and [`CudaModel::checksum`] shows it.

use super::model::{CudaModel, DevData, WeightDtype};
use crate::edit::EditTarget;
use crate::model::weights::fnv1a;
use crate::{Error, Result};

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn term(i: u64, bits: u64) -> u64 {
    mix64(((i << 32) | bits).wrapping_add(GOLDEN))
}

/// Host mirror of `swk_checksum_u32` (kernels/checksum.cu): the wrapping sum over elements of
/// `mix64(((i << 32) | bits_i) + φ)`. Equal for equal bit patterns, order-sensitive, and the
/// same whatever the device's launch shape.
pub fn checksum_bits_u32(bits: &[u32]) -> u64 {
    use rayon::prelude::*;
    bits.par_iter()
        .enumerate()
        .map(|(i, &b)| term(i as u64, b as u64))
        .reduce(|| 0, u64::wrapping_add)
}

/// Host mirror of `swk_checksum_u16` for bf16 and f16 storage (bits zero-extended).
pub fn checksum_bits_u16(bits: &[u16]) -> u64 {
    use rayon::prelude::*;
    bits.par_iter()
        .enumerate()
        .map(|(i, &b)| term(i as u64, b as u64))
        .reduce(|| 0, u64::wrapping_add)
}

/// Combine per-tensor checksums into one model checksum: FNV-1a over each name and its
/// checksum, in the given (sorted) order.
pub fn combine_checksums<'a>(per_tensor: impl IntoIterator<Item = (&'a str, u64)>) -> u64 {
    per_tensor.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, (name, c)| {
        let h = fnv1a(h, name.as_bytes());
        fnv1a(h, &c.to_le_bytes())
    })
}

impl CudaModel {
    /// Checksum of one device tensor's stored bits (see [`checksum_bits_u32`]).
    pub fn tensor_checksum(&self, name: &str) -> Result<u64> {
        self.dev.bind()?;
        let (t, data) = self.storage(name)?;
        let out = self.dev.zeros::<u64>(1)?;
        let (ptr, is_u16) = (data.ptr_at(&self.dev, t.offset), data.dtype().is_half());
        self.dev.checksum(ptr, is_u16, t.len(), self.dev.ptr(&out))?;
        Ok(self.dev.download(&out, 0, 1)?[0])
    }

    /// Checksum of every tensor on the device (name order, [`combine_checksums`]). Equal
    /// before and after an edit session proves the weights were restored bit for bit.
    ///
    /// A streamed model's layers are not on the device: its checksum covers the resident
    /// tensors and the edit overlay (see [`CudaModel::streamed`](super::CudaModel::streamed)),
    /// whose digest is 0 once every edit is restored, because the files are never written.
    pub fn checksum(&self) -> Result<u64> {
        let mut per = Vec::with_capacity(self.tensors.len() + 1);
        for name in self.tensors.keys() {
            per.push((name.as_str(), self.tensor_checksum(name)?));
        }
        if let Some(st) = &self.stream {
            per.push(("<streamed layer edits>", st.overlay.digest()));
        }
        Ok(combine_checksums(per))
    }

    /// The checksum [`CudaModel::checksum`] must give right after uploading `model` in
    /// `dtype` (computed on the host): proves the upload itself was bit-exact.
    pub fn expected_checksum(model: &crate::Model, dtype: WeightDtype) -> Result<u64> {
        let probe = super::model::upload_plan(model);
        let mut per = Vec::with_capacity(probe.len());
        for (name, matrix) in &probe {
            let t = model.weights.get(name)?;
            let c = if *matrix && dtype.is_half() {
                use rayon::prelude::*;
                let bits = t
                    .data
                    .par_iter()
                    .map(|&v| dtype.encode_or_err(v, name).map(|raw| raw as u16))
                    .collect::<Result<Vec<u16>>>()?;
                checksum_bits_u16(&bits)
            } else {
                checksum_bits_u32(bytemuck::cast_slice(&t.data))
            };
            per.push((name.as_str(), c));
        }
        per.sort_by(|a, b| a.0.cmp(b.0));
        Ok(combine_checksums(per))
    }
}

impl CudaModel {
    /// Whether `tensor` belongs to a streamed layer (edited in the host overlay).
    fn in_stream(&self, tensor: &str) -> bool {
        self.stream.as_ref().is_some_and(|st| st.entry(tensor).is_some())
    }
}

impl EditTarget for CudaModel {
    fn shape_of(&self, tensor: &str) -> Result<Vec<usize>> {
        if let Some(e) = self.stream.as_ref().and_then(|st| st.entry(tensor)) {
            return Ok(e.shape.clone());
        }
        Ok(self.tensor(tensor)?.shape.clone())
    }

    /// The element's bits as f32 bits (bf16 and f16 storage: widened, exact).
    fn read_bits(&self, tensor: &str, flat: usize) -> Result<u32> {
        if let Some(st) = self.stream.as_ref().filter(|st| st.entry(tensor).is_some()) {
            return st.read_bits(tensor, flat);
        }
        self.dev.bind()?;
        let (t, data) = self.storage(tensor)?;
        if flat >= t.len() {
            return Err(Error::tensor(
                tensor,
                format!("index {flat} out of range ({} elements)", t.len()),
            ));
        }
        match data {
            DevData::F32(d) => Ok(self.dev.download(d, t.offset + flat, 1)?[0].to_bits()),
            DevData::Half(d, dt) => {
                Ok(dt.decode(self.dev.download(d, t.offset + flat, 1)?[0] as u32))
            }
        }
    }

    /// Write f32 bits (bf16 and f16 storage: rounded to nearest even; beyond f16's range an
    /// error). Synchronizes, so a failed write is reported here rather than by a later pass.
    fn write_bits(&mut self, tensor: &str, flat: usize, bits: u32) -> Result<()> {
        if let Some(st) = self.stream.as_mut().filter(|st| st.entry(tensor).is_some()) {
            return st.write_bits(tensor, flat, bits);
        }
        self.dev.bind()?;
        let old = self.dev.ptr(&self.edit_scratch);
        let (t, data) = self.storage(tensor)?;
        if flat >= t.len() {
            return Err(Error::tensor(
                tensor,
                format!("index {flat} out of range ({} elements)", t.len()),
            ));
        }
        let ptr = data.ptr_at(&self.dev, t.offset);
        match data {
            DevData::F32(_) => self.dev.edit(ptr, WeightDtype::F32, flat, bits, old)?,
            DevData::Half(_, dt) => {
                let raw = dt.encode_or_err(f32::from_bits(bits), tensor)?;
                self.dev.edit(ptr, *dt, flat, raw, old)?
            }
        }
        self.dev.synchronize()
    }

    /// One gather launch for the whole batch (a streamed layer's tensors: read from the files
    /// once, on the host).
    fn read_many(&self, tensor: &str, flats: &[usize]) -> Result<Vec<u32>> {
        if let Some(st) = self.stream.as_ref().filter(|st| st.entry(tensor).is_some()) {
            return st.read_many(tensor, flats);
        }
        if flats.len() < 2 {
            return flats.iter().map(|&f| self.read_bits(tensor, f)).collect();
        }
        self.dev.bind()?;
        let w = self.weight(tensor)?;
        let idx = self.dev.upload(&batch_indices(tensor, flats, w.len(), false)?)?;
        let out = self.dev.alloc::<u32>(flats.len())?;
        self.dev.gather(w.ptr, w.dtype, self.dev.ptr(&idx), self.dev.ptr(&out), flats.len())?;
        let bits = self.dev.download(&out, 0, flats.len())?;
        Ok(bits.into_iter().map(|b| w.dtype.decode(b)).collect())
    }

    /// One scatter launch for the whole batch, then a synchronization (so a failed write is
    /// reported here). bf16 and f16 storage: values rounded as `write_bits` does; a value f16
    /// cannot hold fails the whole batch before anything is written.
    fn write_many(&mut self, tensor: &str, flats: &[usize], bits: &[u32]) -> Result<()> {
        if flats.len() != bits.len() {
            return Err(Error::tensor(tensor, "write_many: flats and bits differ in length"));
        }
        if let Some(st) = self.stream.as_mut().filter(|st| st.entry(tensor).is_some()) {
            return st.write_many(tensor, flats, bits);
        }
        if flats.len() < 2 {
            return flats.iter().zip(bits).try_for_each(|(&f, &b)| self.write_bits(tensor, f, b));
        }
        self.dev.bind()?;
        let w = self.weight(tensor)?;
        let idx = self.dev.upload(&batch_indices(tensor, flats, w.len(), true)?)?;
        let stored = bits
            .iter()
            .map(|&b| w.dtype.encode_or_err(f32::from_bits(b), tensor))
            .collect::<Result<Vec<u32>>>()?;
        let vals = self.dev.upload(&stored)?;
        self.dev.scatter(w.ptr, w.dtype, self.dev.ptr(&idx), self.dev.ptr(&vals), flats.len())?;
        self.dev.synchronize()
    }

    /// One download of the range (bf16 and f16 widened; streamed tensors: read from the files
    /// once).
    fn read_range(&self, tensor: &str, start: usize, len: usize) -> Result<Vec<u32>> {
        if self.in_stream(tensor) {
            let v = self.download_range(tensor, start, len)?;
            return Ok(v.into_iter().map(f32::to_bits).collect());
        }
        self.dev.bind()?;
        let (t, data) = self.storage(tensor)?;
        check_range(tensor, start, len, t.len())?;
        let at = t.offset + start;
        Ok(match data {
            DevData::F32(d) => self.dev.download(d, at, len)?.iter().map(|v| v.to_bits()).collect(),
            DevData::Half(d, dt) => {
                self.dev.download(d, at, len)?.into_iter().map(|b| dt.decode(b as u32)).collect()
            }
        })
    }

    /// One upload into the range, then a synchronization (bf16 and f16 storage: values
    /// rounded as `write_bits` does; a value f16 cannot hold fails before anything is written).
    fn write_range(&mut self, tensor: &str, start: usize, bits: &[u32]) -> Result<()> {
        if self.in_stream(tensor) {
            let flats: Vec<usize> = (start..start + bits.len()).collect();
            return self.write_many(tensor, &flats, bits);
        }
        self.dev.bind()?;
        let t = self.tensor(tensor)?;
        check_range(tensor, start, bits.len(), t.len())?;
        let (buffer, at) = (t.buffer, t.offset + start);
        let data = self
            .buffers
            .get_mut(buffer)
            .ok_or_else(|| Error::tensor(tensor, "its device buffer is missing"))?;
        match data {
            DevData::F32(d) => {
                let v: &[f32] = bytemuck::cast_slice(bits);
                self.dev.upload_at(v, d, at)?;
            }
            DevData::Half(d, dt) => {
                let v = bits
                    .iter()
                    .map(|&b| dt.encode_or_err(f32::from_bits(b), tensor).map(|raw| raw as u16))
                    .collect::<Result<Vec<u16>>>()?;
                self.dev.upload_at(&v, d, at)?;
            }
        }
        self.dev.synchronize()
    }
}

/// A range edit must lie inside the tensor.
fn check_range(tensor: &str, start: usize, len: usize, size: usize) -> Result<()> {
    if start.checked_add(len).is_none_or(|end| end > size) {
        return Err(Error::tensor(
            tensor,
            format!("elements {start}..+{len} out of range ({size} elements)"),
        ));
    }
    Ok(())
}

/// The flat offsets of a batch as the gather/scatter kernels take them, after checking each
/// is below `len` and, for writes, that no two are equal (two threads would race).
fn batch_indices(tensor: &str, flats: &[usize], len: usize, distinct: bool) -> Result<Vec<u64>> {
    if let Some(&bad) = flats.iter().find(|&&f| f >= len) {
        return Err(Error::tensor(tensor, format!("index {bad} out of range ({len} elements)")));
    }
    if distinct {
        let mut sorted = flats.to_vec();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::tensor(
                tensor,
                format!("index {} appears twice in one batched write", w[0]),
            ));
        }
    }
    Ok(flats.iter().map(|&f| f as u64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_mirror_sees_every_change() {
        let mut rng = crate::synth::SplitMix64::new(3);
        let a: Vec<u32> = (0..10_000).map(|_| rng.next_u64() as u32).collect();
        let base = checksum_bits_u32(&a);
        assert_eq!(base, checksum_bits_u32(&a.clone()), "deterministic");
        // One flipped bit anywhere.
        for i in [0usize, 1, 4999, 9999] {
            for bit in [0, 15, 31] {
                let mut b = a.clone();
                b[i] ^= 1 << bit;
                assert_ne!(checksum_bits_u32(&b), base, "element {i} bit {bit}");
            }
        }
        // Swapping two elements (same multiset of values) changes it: it is order-sensitive.
        let mut b = a.clone();
        b.swap(10, 20);
        assert_ne!(checksum_bits_u32(&b), base);
        // A zero and a negative zero differ (bits, not values).
        assert_ne!(
            checksum_bits_u32(&[0.0f32.to_bits()]),
            checksum_bits_u32(&[(-0.0f32).to_bits()])
        );
        // u16 and u32 storage of the same small values agree term by term.
        let small: Vec<u16> = (0..100).collect();
        let wide: Vec<u32> = small.iter().map(|&v| v as u32).collect();
        assert_eq!(checksum_bits_u16(&small), checksum_bits_u32(&wide));
        assert_eq!(checksum_bits_u32(&[]), 0);
    }

    #[test]
    fn batch_indices_are_checked() {
        assert_eq!(batch_indices("t", &[3, 0, 2], 4, true).unwrap(), vec![3, 0, 2]);
        let e = batch_indices("t", &[3, 4], 4, false).unwrap_err().to_string();
        assert!(e.contains("t") && e.contains("index 4 out of range (4 elements)"), "{e}");
        let e = batch_indices("t", &[1, 2, 1], 4, true).unwrap_err().to_string();
        assert!(e.contains("index 1 appears twice"), "{e}");
        assert!(batch_indices("t", &[1, 1], 4, false).is_ok(), "reads may repeat");
    }

    #[test]
    fn combined_checksum_depends_on_names_and_values() {
        let a = combine_checksums([("a", 1), ("b", 2)]);
        assert_ne!(a, combine_checksums([("a", 1), ("b", 3)]));
        assert_ne!(a, combine_checksums([("a", 1), ("c", 2)]));
        assert_eq!(a, combine_checksums([("a", 1), ("b", 2)]));
    }

    /// An edit/restore cycle through the guard on bf16 or f16 storage is bit-exact: the
    /// recorded original bits survive the f32 → dtype rounding of the restore write.
    #[test]
    fn half_restore_bits_survive_rounding() {
        let mut rng = crate::synth::SplitMix64::new(5);
        for (dtype, finite) in [(WeightDtype::Bf16, 0x7f7f), (WeightDtype::F16, 0x7bff)] {
            for _ in 0..100_000 {
                let stored = (rng.next_u64() as u32) & finite; // finite values of the dtype
                let read = dtype.decode(stored);
                assert_eq!(dtype.encode(f32::from_bits(read)), Some(stored), "{dtype:?}");
            }
        }
    }

    /// The host mirror is exactly what the device computes: fixed values from the formula,
    /// so a change to either side that alters the scheme fails here too.
    #[test]
    fn checksum_known_values() {
        assert_eq!(checksum_bits_u32(&[0]), mix64(GOLDEN));
        assert_eq!(
            checksum_bits_u32(&[7, 9]),
            mix64(7 + GOLDEN).wrapping_add(mix64((1 << 32 | 9) + GOLDEN))
        );
    }
}
