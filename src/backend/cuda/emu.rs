//! The device emulated on the CPU (feature `cuda-emu` without `cuda`): the same surface as
//! `driver.rs`, so the whole CUDA backend (forward passes, statistics, edits, streaming,
//! graphs) runs its real code on machines without a GPU.
//!
//! * Device memory is host memory, 256-byte aligned like the driver's allocations, and
//!   device addresses are host addresses. Fresh buffers are filled with 0xff bytes (NaN as
//!   f32 or bf16), so a read of memory nothing wrote shows up in the results. Each buffer is
//!   followed by a red zone of signaling NaNs (f32 bits 0x7fa5a5a5), checked after every
//!   operation: a kernel (or copy, or product) that writes past a buffer's end fails with an
//!   error naming it, where a GPU would silently corrupt a neighbour. (Arithmetic on a
//!   signaling NaN yields a quiet one, so even `zone += x` changes the bits.) A launch's
//!   dynamic shared memory starts as 0xff bytes too, followed by a red zone reaching past
//!   the device's limit: a kernel that writes beyond its launch's bytes fails (a GPU faults
//!   there).
//! * Kernels are `kernels/*.cu` themselves, compiled as C++ by build.rs and run by the
//!   emulator in `kernels/emu/emu.cpp`, which checks every launch's parameter count and sizes
//!   against the kernel's signature.
//! * cuBLAS is a column-major reference GEMM with the same parameters (f64 accumulation).
//! * Work runs when it is queued (the stream is synchronous). A graph capture records the
//!   launches, zeroings, device copies and products, with their parameters by value as the
//!   driver does, and a replay runs them again. Host transfers, allocations and
//!   synchronization during a capture are errors, as on a GPU stream being captured.
//!
//! It checks the backend's logic and the kernels' arithmetic, not the GPU's timing, memory
//! model or its exact rounding of transcendental functions.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::kernels::{self, Launch, KERNELS};
use super::profile::{self, gemm_name, Profile, Totals, GRAPH_REPLAY};
use super::BlasGemm;
use crate::{Error, Result};

extern "C" {
    fn swk_emu_set_reverse(on: i32);
    fn swk_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        shared_bytes: u32,
        params: *const *const c_void,
        sizes: *const usize,
        n_params: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// Run the threads of every emulated block, and the blocks of every grid, in reverse order
/// (`true`) or in index order (`false`, the default). Kernels free of races give bit-identical
/// results either way.
pub fn set_reverse_order(on: bool) {
    // SAFETY: sets an atomic flag the emulator reads at each launch.
    unsafe { swk_emu_set_reverse(on as i32) }
}

/// Memory the emulated device reports.
const TOTAL_MEMORY: usize = 16 << 30;
/// Alignment of every emulated device allocation (the driver's is at least 256 bytes).
const ALIGN: usize = 256;
/// Bytes of red zone after every buffer, checked after each operation.
const REDZONE: usize = 256;
/// The red zone's bytes: f32 0x7fa5a5a5 (a signaling NaN), little endian.
const ZONE: [u8; 4] = [0xa5, 0xa5, 0xa5, 0x7f];

/// Fill `REDZONE` bytes at `p` with the red-zone pattern.
///
/// # Safety
/// `p` must address `REDZONE` writable bytes.
unsafe fn fill_zone(p: *mut u8) {
    for i in 0..REDZONE {
        // SAFETY: i < REDZONE.
        unsafe { *p.add(i) = ZONE[i % 4] };
    }
}

/// Every live buffer: address → size in bytes (without its red zone).
static LIVE: Mutex<BTreeMap<u64, usize>> = Mutex::new(BTreeMap::new());

/// An error naming `what` when a live buffer's red zone was written (the zone is refilled,
/// so one overflow is reported once).
fn check_redzones(what: &str) -> Result<()> {
    let live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    for (&addr, &bytes) in live.iter() {
        let zone = (addr as usize + bytes) as *mut u8;
        // SAFETY: every registered buffer owns REDZONE bytes after its `bytes`, and stays
        // allocated while registered (Drop unregisters under this lock before freeing).
        let now = unsafe { std::slice::from_raw_parts(zone, REDZONE) };
        if now.iter().enumerate().any(|(i, &b)| b != ZONE[i % 4]) {
            // SAFETY: as above.
            unsafe { fill_zone(zone) };
            return Err(Error::Backend(format!(
                "{what} wrote past the end of a device buffer of {bytes} bytes (at {addr:#x})"
            )));
        }
    }
    Ok(())
}

/// Always true: the emulator needs no driver.
pub fn driver_present() -> bool {
    true
}

/// Always true: the emulator has its own reference GEMM in place of cuBLAS.
pub fn cublas_present() -> bool {
    true
}

/// Always true: the emulated device is always there.
pub fn cuda_available() -> bool {
    true
}

/// Says that this is the emulator, not a GPU.
pub fn device_info() -> Result<String> {
    Ok(format!(
        "cuda:0: swk-emu: the CUDA backend emulated on the CPU (feature cuda-emu; not a GPU, for tests)\n\
         cuBLAS: emulated (reference GEMM)\n\
         kernels: {} from kernels/*.cu, compiled as C++",
        KERNELS.len()
    ))
}

/// A buffer of `len` elements of the emulated device (host memory).
pub struct CudaSlice<T> {
    ptr: *mut T,
    len: usize,
    layout: std::alloc::Layout,
    used: Arc<AtomicUsize>,
}

// SAFETY: the buffer is owned memory like a Vec<T>; the backend orders all access.
unsafe impl<T: Send> Send for CudaSlice<T> {}
// SAFETY: as above; shared references only read (or hand out addresses).
unsafe impl<T: Sync> Sync for CudaSlice<T> {}

impl<T> CudaSlice<T> {
    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn new(len: usize, fill: u8, used: &Arc<AtomicUsize>) -> Result<Self> {
        let bytes = len.max(1).checked_mul(std::mem::size_of::<T>().max(1));
        let layout = bytes
            .and_then(|b| b.checked_add(REDZONE))
            .and_then(|b| {
                std::alloc::Layout::from_size_align(b, ALIGN.max(std::mem::align_of::<T>())).ok()
            })
            .ok_or_else(|| Error::Backend(format!("allocating {len} elements: too large")))?;
        let free = TOTAL_MEMORY.saturating_sub(used.load(Ordering::Relaxed));
        if layout.size() > free {
            return Err(Error::Backend(format!(
                "allocating {:.1} MiB on the device: out of memory (emulated device of {} GiB)",
                layout.size() as f64 / (1u64 << 20) as f64,
                TOTAL_MEMORY >> 30
            )));
        }
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            return Err(Error::Backend(
                "allocating device memory: the host is out of memory".into(),
            ));
        }
        let data = layout.size() - REDZONE;
        // SAFETY: ptr addresses layout.size() writable bytes: the data, then the red zone.
        unsafe {
            std::ptr::write_bytes(ptr, fill, data);
            fill_zone(ptr.add(data));
        }
        used.fetch_add(layout.size(), Ordering::Relaxed);
        LIVE.lock().unwrap_or_else(|p| p.into_inner()).insert(ptr as u64, data);
        Ok(CudaSlice { ptr: ptr.cast(), len: len.max(1), layout, used: used.clone() })
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl<T: Copy> CudaSlice<T> {
    fn as_slice(&self) -> &[T] {
        // SAFETY: len elements of initialized (filled) memory, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T> Drop for CudaSlice<T> {
    fn drop(&mut self) {
        self.used.fetch_sub(self.layout.size(), Ordering::Relaxed);
        let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        live.remove(&(self.ptr as u64));
        // SAFETY: allocated in `new` with this layout; unregistered above, under the lock
        // that red-zone checks hold.
        unsafe { std::alloc::dealloc(self.ptr.cast(), self.layout) };
    }
}

/// Page-locked host memory stands in as ordinary host memory.
pub struct PinnedHostSlice<T>(CudaSlice<T>);

impl<T> PinnedHostSlice<T> {
    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        self.0.len
    }
}

/// A page-locked staging buffer stands in as host memory; uploads from it finish when
/// they are queued, as every emulated copy does.
pub struct StagingBuffer(Vec<u8>);

impl StagingBuffer {
    /// Its size in bytes.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// Its bytes (no upload from them is ever in flight).
    pub(crate) fn writable(&mut self) -> Result<&mut [u8]> {
        Ok(&mut self.0)
    }
}

/// Allocates [`StagingBuffer`]s, from any thread.
#[derive(Clone)]
pub struct HostAllocator;

impl HostAllocator {
    /// A zeroed buffer of `len` bytes.
    pub(crate) fn staging(&self, len: usize) -> Result<StagingBuffer> {
        Ok(StagingBuffer(vec![0; len.max(1)]))
    }
}

/// One recorded operation of a graph, its parameters held by value.
enum Op {
    Kernel { name: &'static str, launch: Launch, params: Vec<(u64, usize)> },
    Zero { dst: u64, bytes: usize },
    Copy { src: u64, dst: u64, bytes: usize },
    Gemm(BlasGemm),
}

/// A captured graph: the operations a capture recorded, replayed in order.
pub struct CudaGraph {
    ops: Vec<Op>,
}

/// The emulated device.
pub struct CudaDevice {
    pub(super) shared_limit: usize,
    /// Whether attention without the pattern hook may run in row blocks (prefill) and splits
    /// (decoding); on by default, see [`super::CudaModel::set_attention_blocks`].
    pub(super) attention_blocks: AtomicBool,
    /// Keys per block of a split decode at least ([`kernels::ATTENTION_SPLIT_KEYS`]).
    pub(super) split_keys: usize,
    /// Whether small heads take `swk_attention_rows` (tests turn it off to run
    /// `swk_attention_rows_wide` on them).
    pub(super) narrow_rows: bool,
    used: Arc<AtomicUsize>,
    /// The operations of a capture in progress.
    recording: Mutex<Option<Vec<Op>>>,
    /// Kernel launches and products queued so far (see [`Self::launches`]).
    launches: AtomicUsize,
    /// Kernel launches queued so far, by kernel (see [`Self::launches_of`]).
    by_kernel: Mutex<std::collections::HashMap<&'static str, usize>>,
    /// While profiling, the launches timed so far.
    profile: Mutex<Option<Totals>>,
}

impl Drop for CudaDevice {
    /// A device profiled for the whole process ([`profile::profile_process`]) adds what it
    /// timed to the process-wide totals.
    fn drop(&mut self) {
        if let Some(t) = self.profile.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            if profile::profiling_process() {
                profile::add_to_process(t);
            }
        }
    }
}

impl CudaDevice {
    /// The emulated device; only ordinal 0 exists.
    pub fn new(ordinal: usize) -> Result<Self> {
        if ordinal != 0 {
            return Err(Error::Backend(format!("no CUDA device {ordinal} (found 1, emulated)")));
        }
        Ok(CudaDevice {
            shared_limit: kernels::DEFAULT_SHARED_BYTES,
            used: Arc::new(AtomicUsize::new(0)),
            recording: Mutex::new(None),
            launches: AtomicUsize::new(0),
            by_kernel: Mutex::new(std::collections::HashMap::new()),
            profile: Mutex::new(profile::profiling_process().then(Totals::default)),
            attention_blocks: AtomicBool::new(true),
            split_keys: kernels::ATTENTION_SPLIT_KEYS,
            narrow_rows: true,
        })
    }

    /// "swk-emu".
    pub fn name(&self) -> &str {
        "swk-emu (CPU emulation)"
    }

    /// Reported as sm_80.
    pub fn capability(&self) -> (i32, i32) {
        (8, 0)
    }

    /// Reported as 2, so that products are cut into several k ranges even at the tiny
    /// fixtures' shapes (see `kernels::mma`).
    pub fn sm_count(&self) -> usize {
        2
    }

    /// Always true (the reference GEMM).
    pub fn has_cublas(&self) -> bool {
        true
    }

    /// `(free, total)` bytes of the emulated device's 16 GiB.
    pub fn memory(&self) -> Result<(usize, usize)> {
        Ok((TOTAL_MEMORY.saturating_sub(self.used.load(Ordering::Relaxed)), TOTAL_MEMORY))
    }

    fn capturing(&self) -> bool {
        self.recording.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// An error when a capture is in progress: `what` is not allowed while capturing.
    fn not_capturing(&self, what: &str) -> Result<()> {
        if self.capturing() {
            return Err(Error::Backend(format!(
                "{what} during a graph capture (not allowed on a stream being captured)"
            )));
        }
        Ok(())
    }

    /// Kernel launches and cuBLAS products queued on this device so far (a GPU would run
    /// each as one kernel or more): what the fused paths save is counted with it.
    #[cfg(test)]
    pub(crate) fn launches(&self) -> usize {
        self.launches.load(Ordering::Relaxed)
    }

    /// Launches of kernel `name` queued on this device so far.
    #[cfg(test)]
    pub(crate) fn launches_of(&self, name: &str) -> usize {
        let by = self.by_kernel.lock().unwrap_or_else(|p| p.into_inner());
        by.get(name).copied().unwrap_or(0)
    }

    /// Queue `op`: recorded during a capture, else run now.
    fn queue(&self, op: Op) -> Result<()> {
        if matches!(op, Op::Kernel { .. } | Op::Gemm(_)) {
            self.launches.fetch_add(1, Ordering::Relaxed);
        }
        if let Op::Kernel { name, .. } = op {
            let mut by = self.by_kernel.lock().unwrap_or_else(|p| p.into_inner());
            *by.entry(name).or_insert(0) += 1;
        }
        let mut rec = self.recording.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ops) = rec.as_mut() {
            ops.push(op);
            return Ok(());
        }
        drop(rec);
        match op {
            Op::Kernel { name, .. } => self.timed(name, || run(&op)),
            Op::Gemm(g) => self.timed(gemm_name(g.bf16_inputs), || run(&op)),
            _ => run(&op),
        }
    }

    /// Start timing every kernel launch, cuBLAS product and graph replay (see profile.rs),
    /// dropping what an earlier profile had timed.
    pub fn start_profile(&self) {
        *self.profile.lock().unwrap_or_else(|p| p.into_inner()) = Some(Totals::default());
    }

    /// Stop profiling and return the time per kernel (empty when no profile was started).
    pub fn finish_profile(&self) -> Result<Profile> {
        let timed = self.profile.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.synchronize()?;
        Ok(timed.unwrap_or_default().profile())
    }

    /// Run `work` now, timed under `name` when profiling.
    fn timed(&self, name: &'static str, work: impl FnOnce() -> Result<()>) -> Result<()> {
        let on = self.profile.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        let start = std::time::Instant::now();
        work()?;
        if on {
            let ms = start.elapsed().as_secs_f64() * 1e3;
            if let Some(t) = self.profile.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                t.add(name, ms);
            }
        }
        Ok(())
    }

    /// Nothing to wait for (work runs when queued); an error during a capture.
    pub fn synchronize(&self) -> Result<()> {
        self.not_capturing("synchronizing")
    }

    /// Record what `enqueue` queues into a graph, without running it.
    pub(crate) fn capture(&self, enqueue: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
        {
            let mut rec = self.recording.lock().unwrap_or_else(|p| p.into_inner());
            if rec.is_some() {
                return Err(Error::Backend("a graph capture is already in progress".into()));
            }
            *rec = Some(Vec::new());
        }
        let queued = enqueue();
        let ops =
            self.recording.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
        queued?;
        if ops.is_empty() {
            return Err(Error::Backend("the graph capture recorded nothing".into()));
        }
        Ok(CudaGraph { ops })
    }

    /// Replay a captured graph.
    pub(crate) fn launch_graph(&self, g: &CudaGraph) -> Result<()> {
        self.not_capturing("launching a graph")?;
        self.timed(GRAPH_REPLAY, || g.ops.iter().try_for_each(run))
    }

    /// Zero a buffer, in stream order.
    pub(crate) fn memset_zeros<T>(&self, d: &mut CudaSlice<T>) -> Result<()> {
        self.queue(Op::Zero { dst: d.addr(), bytes: d.len * std::mem::size_of::<T>() })
    }

    /// Nothing to bind.
    pub(crate) fn bind(&self) -> Result<()> {
        Ok(())
    }

    /// A buffer of `len` elements (at least one), poisoned with 0xff bytes.
    pub(crate) fn alloc<T>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.not_capturing("allocating")?;
        CudaSlice::new(len, 0xff, &self.used)
    }

    /// A zeroed buffer of `len` elements.
    pub(crate) fn zeros<T>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.not_capturing("allocating")?;
        CudaSlice::new(len, 0, &self.used)
    }

    /// Upload a host slice into a new buffer.
    pub(crate) fn upload<T: Copy>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        let mut d = self.alloc::<T>(host.len())?;
        d.as_mut_slice()[..host.len()].copy_from_slice(host);
        Ok(d)
    }

    /// Copy a host slice into the start of an existing buffer (checked), in stream order:
    /// after the kernels queued before it, before those queued after.
    pub(crate) fn upload_into<T: Copy>(&self, host: &[T], d: &mut CudaSlice<T>) -> Result<()> {
        self.upload_at(host, d, 0)
    }

    /// Copy a host slice into an existing buffer from element `start` on (checked), in
    /// stream order.
    pub(crate) fn upload_at<T: Copy>(
        &self,
        host: &[T],
        d: &mut CudaSlice<T>,
        start: usize,
    ) -> Result<()> {
        self.not_capturing("a host-to-device copy")?;
        let end = start.checked_add(host.len()).filter(|&e| e <= d.len());
        let end = end.ok_or_else(|| {
            Error::Backend(format!(
                "upload of {} elements at {start} into a buffer of {}",
                host.len(),
                d.len()
            ))
        })?;
        d.as_mut_slice()[start..end].copy_from_slice(host);
        Ok(())
    }

    /// Download `len` elements starting at element `start` of a buffer (checked).
    pub(crate) fn download<T: Copy>(
        &self,
        d: &CudaSlice<T>,
        start: usize,
        len: usize,
    ) -> Result<Vec<T>> {
        self.not_capturing("a device-to-host copy")?;
        let end = start.checked_add(len).filter(|&e| e <= d.len());
        let end = end.ok_or_else(|| {
            Error::Backend(format!("download of {start}..+{len} outside a buffer of {}", d.len()))
        })?;
        Ok(d.as_slice()[start..end].to_vec())
    }

    /// Zeroed host memory standing in for pinned memory.
    pub(crate) fn pinned<T>(&self, len: usize) -> Result<PinnedHostSlice<T>> {
        self.not_capturing("allocating pinned host memory")?;
        Ok(PinnedHostSlice(CudaSlice::new(len, 0, &Arc::new(AtomicUsize::new(0)))?))
    }

    /// What allocates staging buffers, from any thread.
    pub(crate) fn host_allocator(&self) -> HostAllocator {
        HostAllocator
    }

    /// Copy the first `len` bytes of `buf` into `d` from byte `start` on (checked), in
    /// stream order.
    pub(crate) fn upload_staged(
        &self,
        buf: &mut StagingBuffer,
        len: usize,
        d: &mut CudaSlice<u8>,
        start: usize,
    ) -> Result<()> {
        let host = buf.0.get(..len).ok_or_else(|| {
            Error::Backend(format!("upload of {len} staged bytes from a buffer of {}", buf.len()))
        })?;
        self.upload_at(host, d, start)
    }

    /// Download `len` elements of `d` into `host`.
    pub(crate) fn download_pinned<'a, T: Copy>(
        &self,
        d: &CudaSlice<T>,
        len: usize,
        host: &'a mut PinnedHostSlice<T>,
    ) -> Result<&'a [T]> {
        self.not_capturing("a device-to-host copy")?;
        if len > d.len() || len > host.len() {
            return Err(Error::Backend(format!(
                "download of {len} elements from a buffer of {} into {}",
                d.len(),
                host.len()
            )));
        }
        let out = &mut host.0.as_mut_slice()[..len];
        out.copy_from_slice(&d.as_slice()[..len]);
        Ok(out)
    }

    /// Copy `len` elements between buffers, in stream order.
    pub(crate) fn copy<T>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<T>,
        len: usize,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        super::check_copy(len, src.len(), dst.len())?;
        let bytes = len * std::mem::size_of::<T>();
        self.queue(Op::Copy { src: src.addr(), dst: dst.addr(), bytes })
    }

    /// The device (here: host) address of a buffer.
    pub(crate) fn ptr<T>(&self, d: &CudaSlice<T>) -> u64 {
        d.addr()
    }

    /// A launch of kernel `name`, its parameters still to be pushed.
    pub(crate) fn launcher(&self, name: &'static str) -> Result<Launcher<'_>> {
        if !KERNELS.contains(&name) {
            return Err(Error::Backend(format!("kernel {name} is not loaded")));
        }
        Ok(Launcher { dev: self, name, params: Vec::new(), too_large: None })
    }

    /// The reference GEMM in cuBLAS's column-major terms (see [`BlasGemm`]).
    pub(crate) fn blas_gemm_tn(&self, g: &BlasGemm) -> Result<()> {
        let bad = |what: &str| Error::Backend(format!("emulated cuBLAS: {what} ({g:?})"));
        if g.m < 0 || g.n < 0 || g.k < 0 {
            return Err(bad("negative dimension"));
        }
        if g.lda < g.k.max(1) || g.ldb < g.k.max(1) || g.ldc < g.m.max(1) {
            return Err(bad("leading dimension too small"));
        }
        self.queue(Op::Gemm(*g))
    }
}

/// One kernel launch being assembled (parameters by reference, in the kernel's order).
pub(crate) struct Launcher<'a> {
    dev: &'a CudaDevice,
    name: &'static str,
    /// Each parameter's bytes (in the low bytes of a u64, so every one is aligned) and size.
    params: Vec<(u64, usize)>,
    too_large: Option<usize>,
}

impl<'a> Launcher<'a> {
    /// Push the next parameter (copied by value, as the driver does at launch).
    pub(crate) fn arg<T: Copy>(&mut self, v: &'a T) {
        let size = std::mem::size_of::<T>();
        if size > 8 {
            self.too_large = Some(self.params.len());
            return;
        }
        let mut slot = 0u64;
        // SAFETY: size <= 8 bytes are copied from a valid T into a u64.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (v as *const T).cast::<u8>(),
                (&mut slot as *mut u64).cast(),
                size,
            )
        };
        self.params.push((slot, size));
    }

    /// Run (or, during a capture, record) the launch.
    ///
    /// # Safety
    /// As for the driver: the parameters must be the kernel's, and every buffer they address
    /// large enough for the launch (the emulator checks the count and sizes, not the buffers).
    pub(crate) unsafe fn launch(self, cfg: Launch) -> std::result::Result<(), String> {
        if let Some(i) = self.too_large {
            return Err(format!("parameter {i} is larger than 8 bytes"));
        }
        self.dev
            .queue(Op::Kernel { name: self.name, launch: cfg, params: self.params })
            .map_err(|e| e.to_string())
    }
}

/// Run one operation, then check every buffer's red zone.
fn run(op: &Op) -> Result<()> {
    run_op(op)?;
    check_redzones(&match op {
        Op::Kernel { name, .. } => format!("kernel {name}"),
        Op::Zero { .. } => "a zeroing".into(),
        Op::Copy { .. } => "a device copy".into(),
        Op::Gemm(_) => "the emulated cuBLAS product".into(),
    })
}

fn run_op(op: &Op) -> Result<()> {
    match op {
        Op::Kernel { name, launch, params } => run_kernel(name, launch, params),
        Op::Zero { dst, bytes } => {
            // SAFETY: dst addresses a live buffer of at least `bytes` bytes (checked at queueing).
            unsafe { std::ptr::write_bytes(*dst as *mut u8, 0, *bytes) };
            Ok(())
        }
        Op::Copy { src, dst, bytes } => {
            // SAFETY: both buffers hold at least `bytes` bytes (checked at queueing); a copy
            // between distinct buffers does not overlap.
            unsafe { std::ptr::copy(*src as *const u8, *dst as *mut u8, *bytes) };
            Ok(())
        }
        Op::Gemm(g) => {
            reference_gemm(g);
            Ok(())
        }
    }
}

fn run_kernel(name: &str, l: &Launch, params: &[(u64, usize)]) -> Result<()> {
    let cname =
        CString::new(name).map_err(|_| Error::Backend(format!("bad kernel name {name}")))?;
    let ptrs: Vec<*const c_void> = params.iter().map(|(v, _)| (v as *const u64).cast()).collect();
    let sizes: Vec<usize> = params.iter().map(|&(_, s)| s).collect();
    let grid = [l.grid.0, l.grid.1, l.grid.2];
    let block = [l.block.0, l.block.1, l.block.2];
    let mut err = [0 as c_char; 512];
    // SAFETY: every pointer is valid for the call; the emulator checks the parameter count
    // and sizes against the kernel before reading them, and writes at most err.len() bytes.
    let rc = unsafe {
        swk_emu_launch(
            cname.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            l.shared_bytes,
            ptrs.as_ptr(),
            sizes.as_ptr(),
            ptrs.len(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 {
        // SAFETY: the emulator wrote a NUL-terminated message.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
        return Err(Error::Backend(format!("emulated kernel launch failed: {msg}")));
    }
    Ok(())
}

/// C (m × n, ld ldc) = Aᵀ · B, column major, accumulated in f64, one thread per column of C.
fn reference_gemm(g: &BlasGemm) {
    let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
    let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
    let load = |base: u64, i: usize| -> f64 {
        if g.bf16_inputs {
            // SAFETY: the caller sized the buffer for every index the product reads.
            let b = unsafe { *(base as *const u16).add(i) };
            f32::from_bits((b as u32) << 16) as f64
        } else {
            // SAFETY: as above.
            unsafe { *(base as *const f32).add(i) as f64 }
        }
    };
    let c = g.c;
    (0..n).into_par_iter().for_each(|j| {
        for i in 0..m {
            let acc: f64 = (0..k).map(|p| load(g.a, p + i * lda) * load(g.b, p + j * ldb)).sum();
            // SAFETY: column j of C is written by this thread only; C holds n·ldc floats.
            unsafe { *(c as *mut f32).add(i + j * ldc) = acc as f32 };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// y += b through the real `swk_add_bias` kernel on the emulator.
    fn add_bias(
        dev: &CudaDevice,
        y: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        rows: i32,
        n: i32,
    ) -> Result<()> {
        let (yp, bp) = (dev.ptr(y), dev.ptr(b));
        let mut l = dev.launcher("swk_add_bias")?;
        l.arg(&yp);
        l.arg(&bp);
        l.arg(&rows);
        l.arg(&n);
        // SAFETY: y holds rows·n floats and b holds n.
        unsafe { l.launch(kernels::elementwise((rows * n) as u64)?) }.map_err(Error::Backend)
    }

    #[test]
    fn kernels_run_and_launches_are_checked_against_the_signature() {
        let dev = CudaDevice::new(0).unwrap();
        let y = dev.upload(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let b = dev.upload(&[10.0f32, 20.0, 30.0]).unwrap();
        add_bias(&dev, &y, &b, 2, 3).unwrap();
        assert_eq!(dev.download(&y, 0, 6).unwrap(), [11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);

        let (yp, bp, rows) = (dev.ptr(&y), dev.ptr(&b), 2i32);
        let mut l = dev.launcher("swk_add_bias").unwrap();
        l.arg(&yp);
        l.arg(&bp);
        l.arg(&rows);
        // SAFETY: rejected before the kernel runs.
        let e = unsafe { l.launch(kernels::elementwise(6).unwrap()) }.unwrap_err();
        assert!(e.contains("takes 4 parameters, launched with 3"), "{e}");

        let wide = 3u64; // the kernel's n is an int
        let mut l = dev.launcher("swk_add_bias").unwrap();
        l.arg(&yp);
        l.arg(&bp);
        l.arg(&rows);
        l.arg(&wide);
        // SAFETY: rejected before the kernel runs.
        let e = unsafe { l.launch(kernels::elementwise(6).unwrap()) }.unwrap_err();
        assert!(e.contains("parameter 3 is 4 bytes, launched with 8"), "{e}");
        assert!(dev.launcher("swk_nonexistent").is_err());
        // Nothing ran: y is unchanged.
        assert_eq!(dev.download(&y, 0, 6).unwrap(), [11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
    }

    #[test]
    fn writes_past_a_buffer_end_are_reported() {
        let dev = CudaDevice::new(0).unwrap();
        let y = dev.upload(&[1.0f32; 6]).unwrap();
        let b = dev.upload(&[1.0f32; 4]).unwrap();
        // rows 2 × n 4 = 8 floats into a buffer of 6.
        let e = add_bias(&dev, &y, &b, 2, 4).unwrap_err().to_string();
        assert!(
            e.contains("kernel swk_add_bias wrote past the end of a device buffer of 24 bytes"),
            "{e}"
        );
        // Reported once; an in-bounds launch after it is fine.
        add_bias(&dev, &y, &b, 1, 4).unwrap();
    }

    /// A kernel writing past the dynamic shared memory of its launch is an error naming it
    /// (a GPU faults there): `swk_attention` over 8 keys keeps their scores after the query,
    /// (32 + 4 + 8) floats, launched with room for 32 + 4; with its room, it runs.
    #[test]
    fn writes_past_dynamic_shared_memory_are_reported() {
        let dev = CudaDevice::new(0).unwrap();
        let q = dev.upload(&[0.5f32; 4]).unwrap();
        let kv = dev.upload(&[0.25f32; 32]).unwrap();
        let out = dev.zeros::<f32>(4).unwrap();
        let (qp, kp, op, null) = (dev.ptr(&q), dev.ptr(&kv), dev.ptr(&out), 0u64);
        let (rows, pos0, heads, hd, window) = (1i32, 7i32, 1i32, 4i32, 0i32);
        let (scale, softcap, tile) = (0.5f32, 0.0f32, 0i32);
        let run = |floats: u32| {
            let mut l = dev.launcher("swk_attention").unwrap();
            for p in [&qp, &kp, &kp, &op, &null] {
                l.arg(p);
            }
            for v in [&rows, &pos0, &heads, &heads, &hd, &window] {
                l.arg(v);
            }
            l.arg(&scale);
            l.arg(&softcap);
            l.arg(&null);
            l.arg(&tile);
            let cfg = Launch { grid: (1, 1, 1), block: (128, 1, 1), shared_bytes: floats * 4 };
            // SAFETY: every pointer addresses a live buffer of the sizes the kernel reads.
            unsafe { l.launch(cfg) }
        };
        let e = run(32 + 4).unwrap_err();
        assert!(e.contains("swk_attention: wrote past its 144 bytes of dynamic shared"), "{e}");
        run(32 + 4 + 8).unwrap();
        // Equal keys and values: the output is the value.
        assert_eq!(dev.download(&out, 0, 4).unwrap(), [0.25; 4]);
    }

    #[test]
    fn fresh_buffers_are_poisoned_and_memory_is_accounted() {
        let dev = CudaDevice::new(0).unwrap();
        assert!(CudaDevice::new(1).is_err());
        let (free0, total) = dev.memory().unwrap();
        let d = dev.alloc::<f32>(1000).unwrap();
        assert!(dev.download(&d, 0, 1000).unwrap().iter().all(|v| v.is_nan()));
        assert_eq!(dev.ptr(&d) % ALIGN as u64, 0);
        assert!(dev.memory().unwrap().0 <= free0 - 4000);
        drop(d);
        assert_eq!(dev.memory().unwrap(), (free0, total));
        let z = dev.zeros::<u64>(3).unwrap();
        assert_eq!(dev.download(&z, 0, 3).unwrap(), [0, 0, 0]);
        assert!(dev.download(&z, 2, 2).is_err());
        assert!(dev.alloc::<f32>(TOTAL_MEMORY).is_err());
    }

    #[test]
    fn graphs_record_by_value_replay_and_refuse_host_transfers() {
        let dev = CudaDevice::new(0).unwrap();
        let y = dev.zeros::<f32>(4).unwrap();
        let b = dev.upload(&[1.0f32, 2.0]).unwrap();
        let g = dev.capture(|| add_bias(&dev, &y, &b, 2, 2)).unwrap();
        // Captured, not run.
        assert_eq!(dev.download(&y, 0, 4).unwrap(), [0.0; 4]);
        dev.launch_graph(&g).unwrap();
        dev.launch_graph(&g).unwrap();
        assert_eq!(dev.download(&y, 0, 4).unwrap(), [2.0, 4.0, 2.0, 4.0]);

        let mut y2 = dev.zeros::<f32>(4).unwrap();
        let e = dev.capture(|| dev.upload_into(&[1.0f32], &mut y2)).err().unwrap().to_string();
        assert!(e.contains("during a graph capture"), "{e}");
        assert!(dev.capture(|| dev.alloc::<f32>(1).map(|_| ())).is_err());
        assert!(dev.capture(|| dev.synchronize()).is_err());
        assert!(dev.capture(|| Ok(())).is_err(), "an empty capture is an error");
        // The device is usable after failed captures.
        dev.upload_into(&[7.0f32], &mut y2).unwrap();
        assert_eq!(dev.download(&y2, 0, 1).unwrap(), [7.0]);
    }

    #[test]
    fn reference_gemm_follows_cublas_column_major_conventions() {
        let dev = CudaDevice::new(0).unwrap();
        // x [2, 3], W [2, 3] (out 2, in 3): y[t, o] = Σ_i x[t, i] W[o, i], y's row stride 5.
        let x = dev.upload(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let w = dev.upload(&[1.0f32, 0.0, -1.0, 0.5, 0.5, 0.5]).unwrap();
        let y = dev.zeros::<f32>(10).unwrap();
        let g = BlasGemm {
            m: 2,
            n: 2,
            k: 3,
            a: dev.ptr(&w),
            lda: 3,
            b: dev.ptr(&x),
            ldb: 3,
            c: dev.ptr(&y),
            ldc: 5,
            bf16_inputs: false,
        };
        dev.blas_gemm_tn(&g).unwrap();
        assert_eq!(
            dev.download(&y, 0, 10).unwrap(),
            [-2.0, 3.0, 0.0, 0.0, 0.0, -2.0, 7.5, 0.0, 0.0, 0.0]
        );
        assert!(dev.blas_gemm_tn(&BlasGemm { ldc: 1, ..g }).is_err());
    }
}
