//! The streamed mode of a [`CudaModel`](super::CudaModel): layers stay in the model's files
//! and pass through one device slot on every forward pass; edits of layer weights live in a
//! host [`Overlay`] that every upload applies. Reading and editing a streamed weight reads
//! its tensor from the files (a full tensor; edits are rare next to passes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::driver::{CudaDevice, CudaSlice};
use super::CudaModel;

use crate::backend::stream::{
    split_layer_name, stage_part, LayerPart, Overlay, SlotEntry, SlotLayout, StagedLayer,
};
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
    /// Whether a pass of a mixture of experts that routes fewer rows than a layer has
    /// experts reads each routed expert only once routing has chosen it
    /// ([`CudaModel::set_selective_experts`]).
    pub(crate) select_experts: bool,
    /// What has been copied into the slot: bytes, and routed experts read alone.
    pub(crate) staged: [AtomicU64; 2],
}

impl Streamed {
    /// The layers and edits of `lazy` streamed through `slot`.
    pub(crate) fn new(lazy: Arc<LazyModel>, layouts: Vec<SlotLayout>, slot: CudaSlice<u8>) -> Self {
        Streamed {
            lazy,
            layouts,
            overlay: Overlay::default(),
            slot: Mutex::new(slot),
            select_experts: true,
            staged: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// Whether a pass that routes `rows` token-expert pairs reads routed experts alone: when
    /// on, and fewer rows than the experts of a layer (so some surely stay unread).
    pub(crate) fn selects_experts(&self, rows: usize) -> bool {
        let experts = self.layouts.iter().map(SlotLayout::experts).max().unwrap_or(0);
        self.select_experts && rows < experts
    }

    /// What a pass reads of layer `l` ahead of running it: all of it, or without its routed
    /// experts (`select`).
    pub(crate) fn stage_ahead(&self, l: usize, select: bool) -> Result<StagedLayer> {
        let layout = &self.layouts[l];
        let part = if select && layout.experts() > 0 { LayerPart::Base } else { LayerPart::Whole };
        stage_part(&self.lazy, l, layout, part, &self.overlay)
    }

    /// Copy `staged` into its place in `slot`, in stream order, and count its bytes.
    pub(crate) fn upload(
        &self,
        dev: &CudaDevice,
        staged: &StagedLayer,
        slot: &mut CudaSlice<u8>,
    ) -> Result<()> {
        dev.upload_at(&staged.bytes, slot, staged.offset)?;
        self.staged[0].fetch_add(staged.bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Read routed experts `experts` of layer `l` from the files into their places in `slot`
    /// (stream-ordered before the products that read them), skipping those already read for
    /// this layer in this pass (`read`, one flag per expert). With more than one to read, a
    /// scoped thread stages the next expert while this one uploads the last, one staged
    /// expert in flight, so the host's copy out of the files overlaps the copy to the device.
    pub(crate) fn fetch_experts(
        &self,
        dev: &CudaDevice,
        l: usize,
        experts: &[usize],
        read: &mut [bool],
        slot: &mut CudaSlice<u8>,
    ) -> Result<()> {
        let mut todo = Vec::with_capacity(experts.len());
        for &e in experts {
            let flag = read.get_mut(e).ok_or_else(|| {
                Error::Backend(format!("layer {l}: routed to expert {e}, which it does not have"))
            })?;
            if !*flag && !todo.contains(&e) {
                todo.push(e);
            }
        }
        let stage = |e: usize| {
            stage_part(&self.lazy, l, &self.layouts[l], LayerPart::Expert(e), &self.overlay)
        };
        let mut put = |e: usize, staged: StagedLayer| -> Result<()> {
            self.upload(dev, &staged, slot)?;
            self.staged[1].fetch_add(1, Ordering::Relaxed);
            read[e] = true;
            Ok(())
        };
        if todo.len() < 2 {
            return todo.iter().try_for_each(|&e| put(e, stage(e)?));
        }
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Result<StagedLayer>)>(1);
            let order = &todo;
            scope.spawn(move || {
                for &e in order {
                    let staged = stage(e);
                    let failed = staged.is_err();
                    // A closed channel means the uploads stopped on an error: stop too.
                    if tx.send((e, staged)).is_err() || failed {
                        break;
                    }
                }
            });
            // Every expert arrives in `todo`'s order, or an error ends the loop (dropping
            // `rx`, which ends the stager).
            let mut done = 0;
            for (e, staged) in rx.iter() {
                put(e, staged?)?;
                done += 1;
            }
            match todo.get(done) {
                Some(e) => Err(Error::Backend(format!(
                    "layer {l}: expert {e} was never staged (the staging thread stopped)"
                ))),
                None => Ok(()),
            }
        })
    }

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

impl CudaModel {
    /// In a streamed mixture of experts, read each routed expert from the files only once
    /// routing has chosen it, in passes that route fewer token-expert pairs than a layer has
    /// experts (decoding, short prompts on models with many experts); longer passes read
    /// every layer whole, ahead, as a dense model does (on by default; no effect on a resident
    /// model). Selected experts are read while the device waits, so this trades the overlap
    /// of reading with computing for reading less. Results are bit-identical either way.
    pub fn set_selective_experts(&mut self, on: bool) {
        if let Some(st) = self.stream.as_mut() {
            st.select_experts = on;
        }
    }

    /// What a streamed model has copied into its slot since it was made: (bytes, routed
    /// experts read alone); zeros for a resident model.
    pub fn streamed_bytes(&self) -> (u64, u64) {
        self.stream.as_ref().map_or((0, 0), |st| {
            (st.staged[0].load(Ordering::Relaxed), st.staged[1].load(Ordering::Relaxed))
        })
    }
}
