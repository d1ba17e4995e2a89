//! The real device, through cudarc: driver and cuBLAS presence checks, one context and
//! stream, the embedded kernels loaded as a module, buffers, copies, graph capture, kernel
//! launches and the cuBLAS products. `device.rs` and `products.rs` build the typed launchers
//! on top; `emu.rs` is the same surface emulated on the CPU (feature `cuda-emu`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::{
    self, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, DevicePtr, DeviceRepr,
    DriverError, LaunchArgs, PushKernelArg, ValidAsZeroBits,
};
pub use cudarc::driver::{CudaGraph, CudaSlice, PinnedHostSlice};

use super::kernels::{self, Launch, KERNELS};
use super::profile::{self, gemm_name, Profile, Totals, GRAPH_REPLAY};
use super::{be, BlasGemm, FATBIN};
use crate::{Error, Result};

/// A launch being profiled: its name and the events recorded before and after it.
type TimedLaunch = (&'static str, CudaEvent, CudaEvent);

/// Events that record time (the default flags; cudarc's own default disables timing).
const TIMING_EVENT: driver::sys::CUevent_flags = driver::sys::CUevent_flags::CU_EVENT_DEFAULT;

/// Timed launches kept as events before they are read into totals (a wait for the stream):
/// bounds the events a long profiled run holds.
const PENDING_LAUNCHES: usize = 4096;

/// A device's profile: launches whose events are still to be read, and the totals of those
/// read.
#[derive(Default)]
struct Timings {
    pending: Vec<TimedLaunch>,
    totals: Totals,
}

impl Timings {
    /// Read every pending launch's time into the totals (waits for each end event).
    fn fold(&mut self) -> std::result::Result<(), DriverError> {
        for (name, start, end) in self.pending.drain(..) {
            self.totals.add(name, start.elapsed_ms(&end)? as f64);
        }
        Ok(())
    }
}

/// Page-locked host memory that a streamed layer is staged in, so that its upload is one
/// DMA (from pageable memory the driver first copies it through buffers of its own). Its
/// last upload's end is recorded: the next write waits for it, and so does dropping it.
pub struct StagingBuffer {
    host: PinnedHostSlice<u8>,
    uploaded: Option<CudaEvent>,
}

impl StagingBuffer {
    /// Its size in bytes.
    pub(crate) fn len(&self) -> usize {
        self.host.len()
    }

    /// Its bytes, once the last upload from them has finished.
    pub(crate) fn writable(&mut self) -> Result<&mut [u8]> {
        if let Some(done) = self.uploaded.take() {
            done.synchronize().map_err(be("waiting for a staging buffer"))?;
        }
        self.host.as_mut_slice().map_err(be("pinned host memory"))
    }
}

impl Drop for StagingBuffer {
    /// Waits for the last upload before the memory is freed.
    fn drop(&mut self) {
        if let Some(done) = self.uploaded.take() {
            // Nothing to report to: a failed wait means the context is already broken.
            let _ = done.synchronize();
        }
    }
}

/// Allocates [`StagingBuffer`]s in a device's context, from any thread.
#[derive(Clone)]
pub struct HostAllocator {
    ctx: Arc<CudaContext>,
}

impl HostAllocator {
    /// A page-locked buffer of `len` bytes (zeroed).
    pub(crate) fn staging(&self, len: usize) -> Result<StagingBuffer> {
        // SAFETY: flags 0 = plain page-locked memory (not write-combined, so host reads of
        // it stay fast); it is zeroed before use below.
        let mut host = unsafe { self.ctx.alloc_pinned_with_flags::<u8>(len.max(1), 0) }
            .map_err(be("allocating pinned host memory"))?;
        host.as_mut_slice().map_err(be("pinned host memory"))?.fill(0);
        Ok(StagingBuffer { host, uploaded: None })
    }
}

/// Whether the CUDA driver library (libcuda) can be loaded. Never panics.
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the library under its known names.
    *PRESENT.get_or_init(|| unsafe { driver::sys::is_culib_present() })
}

/// Whether cuBLAS (libcublas) can be loaded. Never panics.
pub fn cublas_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the library under its known names.
    *PRESENT.get_or_init(|| unsafe { cublas::sys::is_culib_present() })
}

/// Number of CUDA devices, or why there are none.
fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(Error::Backend(
            "no CUDA driver: libcuda.so could not be loaded (install the NVIDIA driver, or run on a machine with a GPU)"
                .into(),
        ));
    }
    driver::result::init().map_err(be("cuInit"))?;
    let n = driver::result::device::get_count().map_err(be("cuDeviceGetCount"))?;
    if n <= 0 {
        return Err(Error::Backend("the CUDA driver reports no devices".into()));
    }
    Ok(n as usize)
}

/// Whether a CUDA device can be used: the driver loads and reports at least one device.
/// Never panics (checks for libcuda before touching it).
pub fn cuda_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| device_count().is_ok())
}

/// One line per device: name, compute capability, memory; then the driver version, whether
/// cuBLAS loads, and what the embedded kernels were built for. Errors (never panics) when no
/// device is usable.
pub fn device_info() -> Result<String> {
    let n = device_count()?;
    let mut out = String::new();
    for i in 0..n {
        let ctx = CudaContext::new(i).map_err(be("creating a context"))?;
        let name = ctx.name().map_err(be("device name"))?;
        let (major, minor) = ctx.compute_capability().map_err(be("compute capability"))?;
        let mem = ctx.total_mem().map_err(be("device memory"))?;
        out.push_str(&format!(
            "cuda:{i}: {name} (sm_{major}{minor}, {:.1} GiB)\n",
            mem as f64 / (1u64 << 30) as f64
        ));
    }
    let mut v = 0i32;
    // SAFETY: the driver is loaded (device_count succeeded); v is a valid out pointer.
    let driver =
        unsafe { driver::sys::cuDriverGetVersion(&mut v) }.result().map(|_| v).unwrap_or(0);
    out.push_str(&format!("driver: CUDA {}.{}\n", driver / 1000, (driver % 1000) / 10));
    out.push_str(&format!(
        "cuBLAS: {}\n",
        if cublas_present() { "present" } else { "not found (swk's own GEMM kernels are used)" }
    ));
    out.push_str(&format!(
        "kernels: cubins {}, PTX ISA {} (compute_80), built with nvcc {}",
        super::CUBIN_ARCHS,
        super::PTX_ISA,
        super::NVCC_VERSION
    ));
    Ok(out)
}

/// A CUDA device ready to run swk's kernels: context, one stream (all work is ordered on
/// it), the embedded kernel module, and a cuBLAS handle when libcublas is installed.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    funcs: HashMap<&'static str, CudaFunction>,
    blas: Option<CudaBlas>,
    name: String,
    capability: (i32, i32),
    pub(super) shared_limit: usize,
    /// Whether attention without the pattern hook may run in row blocks (prefill) and splits
    /// (decoding); on by default, see [`super::CudaModel::set_attention_blocks`].
    pub(super) attention_blocks: AtomicBool,
    /// Keys per block of a split decode at least ([`kernels::ATTENTION_SPLIT_KEYS`]).
    pub(super) split_keys: usize,
    /// Whether small heads take `swk_attention_rows` (tests turn it off to run
    /// `swk_attention_rows_wide` on them).
    pub(super) narrow_rows: bool,
    sm_count: usize,
    /// While profiling, what it has timed.
    profile: Mutex<Option<Timings>>,
    /// Whether a graph capture is in progress (its launches are not timed).
    capturing: AtomicBool,
}

impl Drop for CudaDevice {
    /// A device profiled for the whole process ([`profile::profile_process`]) adds what it
    /// timed to the process-wide totals (launches whose time cannot be read are left out).
    fn drop(&mut self) {
        if let Some(mut t) = self.profile.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            if profile::profiling_process() && self.stream.synchronize().is_ok() && t.fold().is_ok()
            {
                profile::add_to_process(t.totals);
            }
        }
    }
}

impl CudaDevice {
    /// Open device `ordinal`, load the kernels and (when present) cuBLAS. Errors, never
    /// panics, when there is no driver, no such device, or the kernels do not load.
    pub fn new(ordinal: usize) -> Result<Self> {
        let n = device_count()?;
        if ordinal >= n {
            return Err(Error::Backend(format!("no CUDA device {ordinal} (found {n})")));
        }
        let ctx = CudaContext::new(ordinal).map_err(be("creating a context"))?;
        // SAFETY: swk uses a single stream per device: stream order alone synchronizes every
        // buffer, so cudarc's per-buffer events are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(be("creating a stream"))?;
        let name = ctx.name().map_err(be("device name"))?;
        let capability = ctx.compute_capability().map_err(be("compute capability"))?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec()))
            .map_err(|e| {
                Error::Backend(format!(
                    "loading swk's kernels on {name} (sm_{}{}): {e}; the fatbin holds cubins {} and \
                     PTX ISA {} (needs a driver for CUDA 13.0 or newer)",
                    capability.0,
                    capability.1,
                    super::CUBIN_ARCHS,
                    super::PTX_ISA
                ))
            })?;
        let mut funcs = HashMap::new();
        for &k in KERNELS {
            let f = module.load_function(k).map_err(be(&format!("loading kernel {k}")))?;
            funcs.insert(k, f);
        }
        let optin = ctx
            .attribute(driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(be("shared memory limit"))?;
        let shared_limit = (optin.max(0) as usize).max(kernels::DEFAULT_SHARED_BYTES);
        if shared_limit > kernels::DEFAULT_SHARED_BYTES {
            // Leave room for the kernels' own (tiny) static shared memory.
            let dynamic = (shared_limit - 1024) as i32;
            for k in ["swk_attention", "swk_attention_rows", "swk_attention_rows_wide"] {
                // SAFETY: the function is a loaded function of a live module.
                unsafe {
                    driver::result::function::set_function_attribute(
                        funcs[k].cu_function(),
                        driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        dynamic,
                    )
                }
                .map_err(be(&format!("raising the shared memory limit of {k}")))?;
            }
        }
        let shared_limit = if shared_limit > kernels::DEFAULT_SHARED_BYTES {
            shared_limit - 1024
        } else {
            shared_limit
        };
        let sm_count = ctx
            .attribute(driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(be("multiprocessor count"))?
            .max(1) as usize;
        keep_freed_memory(&ctx);
        let blas = if cublas_present() {
            Some(CudaBlas::new(stream.clone()).map_err(be("creating a cuBLAS handle"))?)
        } else {
            None
        };
        Ok(CudaDevice {
            ctx,
            stream,
            _module: module,
            funcs,
            blas,
            name,
            capability,
            shared_limit,
            sm_count,
            profile: Mutex::new(profile::profiling_process().then(Timings::default)),
            capturing: AtomicBool::new(false),
            attention_blocks: AtomicBool::new(true),
            split_keys: kernels::ATTENTION_SPLIT_KEYS,
            narrow_rows: true,
        })
    }

    /// The device's name (e.g. "NVIDIA H100 80GB HBM3").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability `(major, minor)`.
    pub fn capability(&self) -> (i32, i32) {
        self.capability
    }

    /// Streaming multiprocessors of the device.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// Whether a cuBLAS handle is available.
    pub fn has_cublas(&self) -> bool {
        self.blas.is_some()
    }

    /// `(free, total)` device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.bind()?;
        self.ctx.mem_get_info().map_err(be("memory info"))
    }

    /// Wait until all queued work is done; surfaces asynchronous kernel errors.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(be("synchronizing"))
    }

    /// Start timing every kernel launch, cuBLAS product and graph replay (see profile.rs),
    /// dropping what an earlier profile had timed.
    pub fn start_profile(&self) {
        *self.profile.lock().unwrap_or_else(|p| p.into_inner()) = Some(Timings::default());
    }

    /// Stop profiling: waits for the timed work and returns its time per kernel (empty when
    /// no profile was started).
    pub fn finish_profile(&self) -> Result<Profile> {
        let timed = self.profile.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.synchronize()?;
        let mut t = timed.unwrap_or_default();
        t.fold().map_err(be("timing a launch"))?;
        Ok(t.totals.profile())
    }

    /// While profiling (and not capturing), an event recorded on the stream before a launch.
    fn profile_start(&self) -> std::result::Result<Option<CudaEvent>, DriverError> {
        let on = self.profile.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        if !on || self.capturing.load(Ordering::Relaxed) {
            return Ok(None);
        }
        self.stream.record_event(Some(TIMING_EVENT)).map(Some)
    }

    /// After a launch that `profile_start` timed, its end event, kept under `name`.
    fn profile_end(
        &self,
        name: &'static str,
        start: Option<CudaEvent>,
    ) -> std::result::Result<(), DriverError> {
        let Some(start) = start else { return Ok(()) };
        let end = self.stream.record_event(Some(TIMING_EVENT))?;
        if let Some(t) = self.profile.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            t.pending.push((name, start, end));
            if t.pending.len() >= PENDING_LAUNCHES {
                t.fold()?;
            }
        }
        Ok(())
    }

    /// `queue` between profile events under `name` (when profiling).
    fn timed(&self, name: &'static str, queue: impl FnOnce() -> Result<()>) -> Result<()> {
        let start = self.profile_start().map_err(be(name))?;
        queue()?;
        self.profile_end(name, start).map_err(be(name))
    }

    /// Record the work `enqueue` queues on the stream into a graph, without running it.
    /// The capture always ends, also when `enqueue` fails (the stream is usable after).
    pub(crate) fn capture(&self, enqueue: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
        self.stream
            .begin_capture(driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(be("beginning a graph capture"))?;
        self.capturing.store(true, Ordering::Relaxed);
        let queued = enqueue();
        self.capturing.store(false, Ordering::Relaxed);
        let graph = self.stream.end_capture(driver::sys::CUgraphInstantiate_flags(0));
        queued?;
        graph
            .map_err(be("ending a graph capture"))?
            .ok_or_else(|| Error::Backend("the graph capture recorded nothing".into()))
    }

    /// Replay a captured graph on the stream.
    pub(crate) fn launch_graph(&self, g: &CudaGraph) -> Result<()> {
        self.timed(GRAPH_REPLAY, || g.launch().map_err(be("launching a graph")))
    }

    /// Zero a buffer, in stream order.
    pub(crate) fn memset_zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        d: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.stream.memset_zeros(d).map_err(be("zeroing a buffer"))
    }

    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(be("binding the context"))
    }

    /// An uninitialized buffer of `len` elements (`len` 0 allocates one element, so every
    /// buffer has a valid address).
    pub(crate) fn alloc<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every buffer is written (kernel output or upload) before it is read.
        unsafe { self.stream.alloc::<T>(len.max(1)) }.map_err(|e| oom::<T>(e, len))
    }

    /// A zeroed buffer of `len` elements.
    pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(len.max(1)).map_err(|e| oom::<T>(e, len))
    }

    /// Upload a host slice into a new buffer.
    pub(crate) fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        let mut d = self.alloc::<T>(host.len())?;
        if !host.is_empty() {
            let mut view = d.slice_mut(0..host.len());
            self.stream.memcpy_htod(host, &mut view).map_err(be("upload"))?;
        }
        Ok(d)
    }

    /// Copy a host slice into the start of an existing buffer (checked), in stream order:
    /// after the kernels queued before it, before those queued after.
    pub(crate) fn upload_into<T: DeviceRepr>(
        &self,
        host: &[T],
        d: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.upload_at(host, d, 0)
    }

    /// Copy a host slice into an existing buffer from element `start` on (checked), in
    /// stream order.
    pub(crate) fn upload_at<T: DeviceRepr>(
        &self,
        host: &[T],
        d: &mut CudaSlice<T>,
        start: usize,
    ) -> Result<()> {
        let end = start.checked_add(host.len()).filter(|&e| e <= d.len());
        let end = end.ok_or_else(|| {
            Error::Backend(format!(
                "upload of {} elements at {start} into a buffer of {}",
                host.len(),
                d.len()
            ))
        })?;
        if !host.is_empty() {
            let mut view = d.slice_mut(start..end);
            self.stream.memcpy_htod(host, &mut view).map_err(be("upload"))?;
        }
        Ok(())
    }

    /// Download `len` elements starting at element `start` of a buffer (checked).
    pub(crate) fn download<T: DeviceRepr + Default + Clone>(
        &self,
        d: &CudaSlice<T>,
        start: usize,
        len: usize,
    ) -> Result<Vec<T>> {
        let end = start.checked_add(len).filter(|&e| e <= d.len());
        let end = end.ok_or_else(|| {
            Error::Backend(format!("download of {start}..+{len} outside a buffer of {}", d.len()))
        })?;
        let mut host = vec![T::default(); len];
        if len > 0 {
            let view = d.slice(start..end);
            self.stream.memcpy_dtoh(&view, &mut host[..]).map_err(be("download"))?;
        }
        self.synchronize()?;
        Ok(host)
    }

    /// Page-locked (pinned, cached) host memory of `len` elements, for fast downloads that
    /// the host then reads.
    pub(crate) fn pinned<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<PinnedHostSlice<T>> {
        // SAFETY: flags 0 = plain page-locked memory; it is zeroed before use below.
        let mut p = unsafe { self.ctx.alloc_pinned_with_flags::<T>(len.max(1), 0) }
            .map_err(be("allocating pinned host memory"))?;
        p.as_mut_slice().map_err(be("pinned host memory"))?.fill_with(|| {
            // SAFETY: T is ValidAsZeroBits.
            unsafe { std::mem::zeroed() }
        });
        Ok(p)
    }

    /// What allocates page-locked staging buffers for this device, from any thread.
    pub(crate) fn host_allocator(&self) -> HostAllocator {
        HostAllocator { ctx: self.ctx.clone() }
    }

    /// Copy the first `len` bytes of `buf` into `d` from byte `start` on (checked), in stream
    /// order. The copy is asynchronous (a DMA from page-locked memory): the buffer records
    /// its end, and [`StagingBuffer::writable`] waits for it.
    pub(crate) fn upload_staged(
        &self,
        buf: &mut StagingBuffer,
        len: usize,
        d: &mut CudaSlice<u8>,
        start: usize,
    ) -> Result<()> {
        if len > buf.len() {
            return Err(Error::Backend(format!(
                "upload of {len} staged bytes from a buffer of {}",
                buf.len()
            )));
        }
        let host = buf.host.as_slice().map_err(be("pinned host memory"))?;
        // A plain slice: cudarc neither waits nor records for it; the event below does (it
        // replaces an earlier upload's, which ends before it in stream order).
        self.upload_at(&host[..len], d, start)?;
        buf.uploaded = Some(self.stream.record_event(None).map_err(be("recording an event"))?);
        Ok(())
    }

    /// Download `len` elements of `d` into pinned host memory and wait for them.
    pub(crate) fn download_pinned<'a, T: DeviceRepr + ValidAsZeroBits>(
        &self,
        d: &CudaSlice<T>,
        len: usize,
        host: &'a mut PinnedHostSlice<T>,
    ) -> Result<&'a [T]> {
        if len > d.len() || len > host.len() {
            return Err(Error::Backend(format!(
                "download of {len} elements from a buffer of {} into {}",
                d.len(),
                host.len()
            )));
        }
        let view = d.slice(0..len);
        self.stream.memcpy_dtoh(&view, host).map_err(be("download"))?;
        self.synchronize()?;
        Ok(&host.as_slice().map_err(be("pinned host memory"))?[..len])
    }

    /// Copy `len` elements between buffers on the device.
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
        let s = src.slice(0..len);
        let mut d = dst.slice_mut(0..len);
        self.stream.memcpy_dtod(&s, &mut d).map_err(be("device copy"))
    }

    /// The device address of a buffer.
    pub(crate) fn ptr<T>(&self, d: &CudaSlice<T>) -> u64 {
        let (p, _sync) = d.device_ptr(&self.stream);
        p
    }

    /// A launch of kernel `name` on the stream, its parameters still to be pushed.
    pub(crate) fn launcher(&self, name: &'static str) -> Result<Launcher<'_>> {
        let f = self
            .funcs
            .get(name)
            .ok_or_else(|| Error::Backend(format!("kernel {name} is not loaded")))?;
        Ok(Launcher { args: self.stream.launch_builder(f), dev: self, name })
    }

    /// cuBLAS, column major: C (m × n, ld `ldc`) = op(A) · B with op(A) = Aᵀ for A (k × m,
    /// ld `lda`) and B (k × n, ld `ldb`); f32 or bf16 inputs, f32 output and accumulation.
    pub(crate) fn blas_gemm_tn(&self, g: &BlasGemm) -> Result<()> {
        self.timed(gemm_name(g.bf16_inputs), || self.blas_gemm_untimed(g))
    }

    /// [`Self::blas_gemm_tn`], never profiled.
    fn blas_gemm_untimed(&self, g: &BlasGemm) -> Result<()> {
        let blas =
            self.blas.as_ref().ok_or_else(|| Error::Backend("cuBLAS is not available".into()))?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (t, n) = (
            cublas::sys::cublasOperation_t::CUBLAS_OP_T,
            cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        );
        if !g.bf16_inputs {
            // SAFETY: the caller sized a, b and c for these dimensions and leading dimensions.
            return unsafe {
                cublas::result::sgemm(
                    *blas.handle(),
                    t,
                    n,
                    g.m,
                    g.n,
                    g.k,
                    &alpha,
                    g.a as *const f32,
                    g.lda,
                    g.b as *const f32,
                    g.ldb,
                    &beta,
                    g.c as *mut f32,
                    g.ldc,
                )
            }
            .map_err(be("cublasSgemm"));
        }
        let bf16 = cublas::sys::cudaDataType_t::CUDA_R_16BF;
        // SAFETY: as above; the data types are given explicitly to GemmEx.
        unsafe {
            cublas::result::gemm_ex(
                *blas.handle(),
                t,
                n,
                g.m,
                g.n,
                g.k,
                (&alpha) as *const f32 as *const _,
                g.a as *const _,
                bf16,
                g.lda,
                g.b as *const _,
                bf16,
                g.ldb,
                (&beta) as *const f32 as *const _,
                g.c as *mut _,
                cublas::sys::cudaDataType_t::CUDA_R_32F,
                g.ldc,
                cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(be("cublasGemmEx"))
    }
}

/// One kernel launch being assembled: parameters are pushed by reference, in the kernel's
/// order, then [`Launcher::launch`] queues it on the stream.
pub(crate) struct Launcher<'a> {
    args: LaunchArgs<'a>,
    dev: &'a CudaDevice,
    name: &'static str,
}

impl<'a> Launcher<'a> {
    /// Push the next parameter.
    pub(crate) fn arg<T: DeviceRepr>(&mut self, v: &'a T) {
        self.args.arg(v);
    }

    /// Queue the launch.
    ///
    /// # Safety
    /// The pushed parameters must be exactly the kernel's parameter list, and every buffer
    /// they address must be large enough for the launch.
    pub(crate) unsafe fn launch(mut self, cfg: Launch) -> std::result::Result<(), DriverError> {
        let cfg = driver::LaunchConfig {
            grid_dim: cfg.grid,
            block_dim: cfg.block,
            shared_mem_bytes: cfg.shared_bytes,
        };
        let start = self.dev.profile_start()?;
        // SAFETY: the caller's promise.
        unsafe { self.args.launch(cfg) }?;
        self.dev.profile_end(self.name, start)
    }
}

/// Best effort: let the device's default memory pool keep freed memory instead of returning
/// it to the driver at each synchronization, so the per-call activation buffers of the
/// forward pass are recycled cheaply (stream-ordered allocation). Failure changes only speed.
fn keep_freed_memory(ctx: &CudaContext) {
    if !ctx.has_async_alloc() {
        return;
    }
    let mut pool: driver::sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: pool is a valid out pointer; the attribute takes a pointer to a u64.
    unsafe {
        if driver::sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result().is_ok() {
            let _ = driver::sys::cuMemPoolSetAttribute(
                pool,
                driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            );
        }
    }
}

fn oom<T>(e: driver::DriverError, len: usize) -> Error {
    let bytes = len as f64 * std::mem::size_of::<T>() as f64;
    Error::Backend(format!("allocating {:.1} MiB on the device: {e}", bytes / (1u64 << 20) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine has no GPU (and, on CI, no driver): the checks say so without panicking.
    #[test]
    fn no_device_is_reported_not_panicked() {
        if cuda_available() {
            eprintln!("a CUDA device is present: {}", device_info().unwrap_or_default());
            return;
        }
        let e = device_info().unwrap_err().to_string();
        assert!(e.starts_with("backend: "), "{e}");
        assert!(e.contains("CUDA") || e.contains("libcuda"), "{e}");
        let e = CudaDevice::new(0).err().expect("no device").to_string();
        assert!(e.contains("CUDA") || e.contains("libcuda"), "{e}");
        // Asking twice is fine (cached, still no panic).
        assert!(!cuda_available());
        let _ = cublas_present();
    }
}
