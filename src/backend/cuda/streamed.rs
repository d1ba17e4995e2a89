//! The streamed mode of a [`CudaModel`](super::CudaModel): layers stay in the model's files
//! and pass through one device slot on every forward pass; edits of layer weights live in a
//! host [`Overlay`] that every upload applies. Reading and editing a streamed weight reads
//! its tensor from the files (a full tensor; edits are rare next to passes). Layers are
//! staged in page-locked buffers ([`StagingPool`]) when host memory allows, so that their
//! uploads run at the bus's rate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::driver::{CudaDevice, CudaSlice, HostAllocator, StagingBuffer};
use super::CudaModel;

use crate::backend::stream::{
    split_layer_name, stage_part, stage_part_into, LayerPart, Overlay, SlotEntry, SlotLayout,
    StagedLayer,
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
    /// What has been copied into the slot: bytes, routed experts read alone, and the bytes
    /// uploaded from page-locked staging buffers.
    pub(crate) staged: [AtomicU64; 3],
    /// The page-locked buffers layers are staged in.
    pub(crate) pool: StagingPool,
}

/// A layer part read for the slot: in a page-locked buffer of the pool, or in pageable
/// memory when the pool's budget has no room for it.
pub(crate) enum Staged<'a> {
    /// `len` bytes for the slot from byte `offset` on, at the start of `buf`.
    Pinned { offset: usize, len: usize, buf: Pooled<'a> },
    /// In pageable memory.
    Pageable(StagedLayer),
}

/// Page-locked host buffers for staging layers, reused from pass to pass, holding at most
/// `budget` bytes in all. A streamed pass has at most five in use: the one the streaming
/// thread fills, the one waiting in its channel, the one being uploaded (each upload is
/// asynchronous; the next write to its buffer waits for it), and, while routed experts are
/// read once chosen, two more for the expert thread (the one it fills, the one waiting). A
/// request that the budget has no room for gets `None`: that part is staged in pageable
/// memory, as every part was before (never a wait, never an error).
pub(crate) struct StagingPool {
    alloc: HostAllocator,
    state: Mutex<PoolState>,
}

struct PoolState {
    free: Vec<StagingBuffer>,
    /// Bytes allocated, free or in use.
    live: usize,
    budget: usize,
}

/// A buffer taken from a [`StagingPool`]; it goes back when dropped (or is freed, if the
/// budget has shrunk below what the pool holds).
pub(crate) struct Pooled<'a> {
    buf: Option<StagingBuffer>,
    pool: &'a StagingPool,
}

impl Pooled<'_> {
    fn get(&mut self) -> Result<&mut StagingBuffer> {
        self.buf.as_mut().ok_or_else(|| Error::Backend("a staging buffer given back".into()))
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            let mut s = self.pool.lock();
            if s.live <= s.budget {
                s.free.push(b);
            } else {
                s.live -= b.len();
            }
        }
    }
}

impl StagingPool {
    /// A pool of at most `budget` bytes.
    pub(crate) fn new(alloc: HostAllocator, budget: usize) -> Self {
        StagingPool { alloc, state: Mutex::new(PoolState { free: Vec::new(), live: 0, budget }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Set the budget, freeing the free buffers (those in use are freed as they come back
    /// while the pool holds more than the budget).
    pub(crate) fn set_budget(&self, budget: usize) {
        let mut s = self.lock();
        s.budget = budget;
        let freed: usize = s.free.drain(..).map(|b| b.len()).sum();
        s.live -= freed;
    }

    /// A free buffer of at least `len` bytes, or a new one in place of a smaller free one
    /// (so the pool has no more buffers than were ever in use at once) if the budget allows,
    /// freeing more of the smaller ones to make room; `None` when it does not, or
    /// allocation fails.
    pub(crate) fn take(&self, len: usize) -> Option<Pooled<'_>> {
        let mut s = self.lock();
        if let Some(i) = s.free.iter().position(|b| b.len() >= len) {
            let buf = s.free.swap_remove(i);
            return Some(Pooled { buf: Some(buf), pool: self });
        }
        if let Some(small) = s.free.pop() {
            s.live -= small.len();
        }
        while s.live + len > s.budget {
            let b = s.free.pop()?;
            s.live -= b.len();
        }
        s.live += len;
        drop(s);
        match self.alloc.staging(len) {
            Ok(buf) => Some(Pooled { buf: Some(buf), pool: self }),
            Err(_) => {
                self.lock().live -= len;
                None
            }
        }
    }

    /// Bytes of page-locked memory the pool holds.
    pub(crate) fn live(&self) -> usize {
        self.lock().live
    }
}

/// The page-locked staging a streamed model may hold by default: a quarter of the host's
/// memory (`/proc/meminfo`), or 2 GiB where that cannot be read.
pub(crate) fn default_staging_budget() -> usize {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        line.split_whitespace().nth(1)?.parse::<usize>().ok()
    });
    total.map_or(2 << 30, |kib| kib.saturating_mul(1024) / 4)
}

impl Streamed {
    /// The layers and edits of `lazy` streamed through `slot`, staged in page-locked
    /// memory of `alloc` up to the default budget.
    pub(crate) fn new(
        lazy: Arc<LazyModel>,
        layouts: Vec<SlotLayout>,
        slot: CudaSlice<u8>,
        alloc: HostAllocator,
    ) -> Self {
        Streamed {
            lazy,
            layouts,
            overlay: Overlay::default(),
            slot: Mutex::new(slot),
            select_experts: true,
            staged: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            pool: StagingPool::new(alloc, default_staging_budget()),
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
    pub(crate) fn stage_ahead(&self, l: usize, select: bool) -> Result<Staged<'_>> {
        let layout = &self.layouts[l];
        let part = if select && layout.experts() > 0 { LayerPart::Base } else { LayerPart::Whole };
        self.stage(l, part)
    }

    /// Part `part` of layer `l`, read from the files with the edits applied: into a
    /// page-locked buffer when the pool has room, else into pageable memory.
    pub(crate) fn stage(&self, l: usize, part: LayerPart) -> Result<Staged<'_>> {
        let layout = &self.layouts[l];
        let range = layout.part_range(part).unwrap_or(0..0);
        match self.pool.take(range.len()) {
            Some(mut buf) => {
                let (offset, len) = (range.start, range.len());
                let out = buf.get()?.writable()?;
                stage_part_into(&self.lazy, l, layout, part, &self.overlay, &mut out[..len])?;
                Ok(Staged::Pinned { offset, len, buf })
            }
            None => Ok(Staged::Pageable(stage_part(&self.lazy, l, layout, part, &self.overlay)?)),
        }
    }

    /// Copy `staged` into its place in `slot`, in stream order, and count its bytes (a
    /// page-locked buffer goes back to the pool, its upload still in flight).
    pub(crate) fn upload(
        &self,
        dev: &CudaDevice,
        staged: Staged<'_>,
        slot: &mut CudaSlice<u8>,
    ) -> Result<()> {
        let len = match staged {
            Staged::Pinned { offset, len, mut buf } => {
                dev.upload_staged(buf.get()?, len, slot, offset)?;
                self.staged[2].fetch_add(len as u64, Ordering::Relaxed);
                len
            }
            Staged::Pageable(s) => {
                dev.upload_at(&s.bytes, slot, s.offset)?;
                s.bytes.len()
            }
        };
        self.staged[0].fetch_add(len as u64, Ordering::Relaxed);
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
        let stage = |e: usize| self.stage(l, LayerPart::Expert(e));
        let mut put = |e: usize, staged: Staged<'_>| -> Result<()> {
            self.upload(dev, staged, slot)?;
            self.staged[1].fetch_add(1, Ordering::Relaxed);
            read[e] = true;
            Ok(())
        };
        if todo.len() < 2 {
            return todo.iter().try_for_each(|&e| put(e, stage(e)?));
        }
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Result<Staged<'_>>)>(1);
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

    /// Of [`Self::streamed_bytes`]' bytes, those uploaded from page-locked staging buffers.
    pub fn streamed_pinned_bytes(&self) -> u64 {
        self.stream.as_ref().map_or(0, |st| st.staged[2].load(Ordering::Relaxed))
    }

    /// The page-locked host memory a streamed model may hold for staging its layers (by
    /// default a quarter of the host's memory; 0: none, every layer is staged in pageable
    /// memory). A layer staged in page-locked memory is uploaded by one DMA, which the
    /// driver cannot do from pageable memory; results are bit-identical either way. A part
    /// that does not fit is staged in pageable memory. No effect on a resident model.
    pub fn set_pinned_staging(&self, bytes: usize) {
        if let Some(st) = self.stream.as_ref() {
            st.pool.set_budget(bytes);
        }
    }

    /// The page-locked staging memory a streamed model holds now (0 for a resident model).
    pub fn pinned_staging_bytes(&self) -> usize {
        self.stream.as_ref().map_or(0, |st| st.pool.live())
    }
}
