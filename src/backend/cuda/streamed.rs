//! The streamed mode of a [`CudaModel`](super::CudaModel): layers stay in the model's files
//! and pass through one device slot on every forward pass; edits of layer weights live in a
//! host [`Overlay`] that every upload applies. Reading and editing a streamed weight reads
//! its tensor from the files (a full tensor; edits are rare next to passes).

use std::sync::{Arc, Mutex};

use super::driver::CudaSlice;

use crate::backend::stream::{split_layer_name, Overlay, SlotEntry, SlotLayout};
use crate::model::LazyModel;
use crate::{Error, Result};

/// The layers of a streamed model.
pub(crate) struct Streamed {
    /// The model's files.
    pub(crate) lazy: Arc<LazyModel>,
    /// Per layer, where each of its tensors lies in the slot (layers differ only in a
    /// mixture of experts with dense layers).
    pub(crate) layouts: Vec<SlotLayout>,
    /// Edits of layer weights, applied at every upload.
    pub(crate) overlay: Overlay,
    /// The device buffer one layer at a time passes through.
    pub(crate) slot: Mutex<CudaSlice<u8>>,
}

impl Streamed {
    /// The slot entry of a layer tensor's full name, if it names one of this model's layers.
    pub(crate) fn entry(&self, name: &str) -> Option<&SlotEntry> {
        let (l, suffix) = split_layer_name(name)?;
        self.layouts.get(l)?.entry(suffix)
    }

    /// A layer tensor's values as the device holds them during a pass (rounded to the
    /// storage dtype, edits applied), as f32.
    pub(crate) fn values(&self, name: &str) -> Result<Vec<f32>> {
        let e =
            self.entry(name).ok_or_else(|| Error::tensor(name, "not a streamed layer tensor"))?;
        let mut data = self.lazy.tensor(name)?.data;
        for v in data.iter_mut() {
            *v = f32::from_bits(e.dtype.stored_bits_or_err(*v, name)?);
        }
        self.overlay.apply(name, &mut data)?;
        Ok(data)
    }

    /// One element's stored bits as f32 bits.
    pub(crate) fn read_bits(&self, name: &str, flat: usize) -> Result<u32> {
        let e =
            self.entry(name).ok_or_else(|| Error::tensor(name, "not a streamed layer tensor"))?;
        check_index(name, flat, e.len())?;
        if let Some(b) = self.overlay.get(name, flat) {
            return Ok(b);
        }
        e.dtype.stored_bits_or_err(self.lazy.tensor(name)?.data[flat], name)
    }

    /// Several elements' stored bits as f32 bits, the tensor read from the files once.
    pub(crate) fn read_many(&self, name: &str, flats: &[usize]) -> Result<Vec<u32>> {
        let v = self.values(name)?;
        flats
            .iter()
            .map(|&f| {
                check_index(name, f, v.len())?;
                Ok(v[f].to_bits())
            })
            .collect()
    }

    /// Store `bits[i]` at element `flats[i]` (as [`Self::write_bits`]), the tensor read from
    /// the files at most once (for the originals of first edits).
    pub(crate) fn write_many(&mut self, name: &str, flats: &[usize], bits: &[u32]) -> Result<()> {
        let e =
            self.entry(name).ok_or_else(|| Error::tensor(name, "not a streamed layer tensor"))?;
        let (len, dtype) = (e.len(), e.dtype);
        if flats.len() != bits.len() {
            return Err(Error::tensor(name, "write_many: flats and bits differ in length"));
        }
        let mut source: Option<Vec<f32>> = None;
        let lazy = &self.lazy;
        for (&flat, &b) in flats.iter().zip(bits) {
            check_index(name, flat, len)?;
            let stored = dtype.stored_bits_or_err(f32::from_bits(b), name)?;
            self.overlay.set(name, flat, stored, || {
                if source.is_none() {
                    source = Some(lazy.tensor(name)?.data);
                }
                let v = source.as_deref().and_then(|d| d.get(flat)).ok_or_else(|| {
                    Error::tensor(name, format!("element {flat} is not in the file's tensor"))
                })?;
                dtype.stored_bits_or_err(*v, name)
            })?;
        }
        Ok(())
    }

    /// Store `bits` (f32 bits; rounded to the slot's dtype) at one element.
    pub(crate) fn write_bits(&mut self, name: &str, flat: usize, bits: u32) -> Result<()> {
        self.write_many(name, &[flat], &[bits])
    }
}

fn check_index(name: &str, flat: usize, len: usize) -> Result<()> {
    if flat >= len {
        return Err(Error::tensor(name, format!("index {flat} out of range ({len} elements)")));
    }
    Ok(())
}
