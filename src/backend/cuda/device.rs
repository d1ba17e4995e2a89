//! The device: driver and cuBLAS presence checks, one context and stream, the embedded
//! kernels loaded as a module, and typed kernel launchers.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::{
    self, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    PinnedHostSlice, PushKernelArg, ValidAsZeroBits,
};

use super::kernels::{self, int, Launch, KERNELS};
use super::{be, FATBIN};
use crate::{Error, Result};

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

/// Launch kernel `$name` on the device's stream with the listed arguments (each pushed by
/// reference: addresses as u64, dimensions as i32/u64/f32/f64 values).
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let name: &'static str = $name;
        let cfg: Launch = $cfg;
        let f = $dev.func(name)?;
        let mut b = $dev.stream.launch_builder(f);
        $( b.arg(&$arg); )+
        // SAFETY: each launcher passes exactly the kernel's parameter list, with buffers sized
        // for the launch by its caller.
        unsafe { b.launch(cfg.into()) }.map(|_| ()).map_err(be(name))
    }};
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
    shared_limit: usize,
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
            let f = &funcs["swk_attention"];
            // Leave room for the kernel's own (tiny) static shared memory.
            let dynamic = (shared_limit - 1024) as i32;
            // SAFETY: f is a loaded function of a live module.
            unsafe {
                driver::result::function::set_function_attribute(
                    f.cu_function(),
                    driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    dynamic,
                )
            }
            .map_err(be("raising the attention kernel's shared memory limit"))?;
        }
        let shared_limit = if shared_limit > kernels::DEFAULT_SHARED_BYTES {
            shared_limit - 1024
        } else {
            shared_limit
        };
        keep_freed_memory(&ctx);
        let blas = if cublas_present() {
            Some(CudaBlas::new(stream.clone()).map_err(be("creating a cuBLAS handle"))?)
        } else {
            None
        };
        Ok(CudaDevice { ctx, stream, _module: module, funcs, blas, name, capability, shared_limit })
    }

    /// The device's name (e.g. "NVIDIA H100 80GB HBM3").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability `(major, minor)`.
    pub fn capability(&self) -> (i32, i32) {
        self.capability
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

    /// Record the work `enqueue` queues on the stream into a graph, without running it.
    /// The capture always ends, also when `enqueue` fails (the stream is usable after).
    pub(crate) fn capture(
        &self,
        enqueue: impl FnOnce() -> Result<()>,
    ) -> Result<driver::CudaGraph> {
        self.stream
            .begin_capture(driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(be("beginning a graph capture"))?;
        let queued = enqueue();
        let graph = self.stream.end_capture(driver::sys::CUgraphInstantiate_flags(0));
        queued?;
        graph
            .map_err(be("ending a graph capture"))?
            .ok_or_else(|| Error::Backend("the graph capture recorded nothing".into()))
    }

    /// Replay a captured graph on the stream.
    pub(crate) fn launch_graph(&self, g: &driver::CudaGraph) -> Result<()> {
        g.launch().map_err(be("launching a graph"))
    }

    /// Zero a buffer, in stream order.
    pub(crate) fn memset_zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        d: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.stream.memset_zeros(d).map_err(be("zeroing a buffer"))
    }

    /// Measured device-to-device copy rate in bytes moved per second (read plus written), over
    /// `reps` copies of a `bytes`-byte buffer after one warm-up: the bandwidth against which
    /// memory-bound passes are judged.
    pub fn measure_copy_rate(&self, bytes: usize, reps: usize) -> Result<f64> {
        self.bind()?;
        let n = bytes / 4;
        let src = self.zeros::<u32>(n)?;
        let mut dst = self.zeros::<u32>(n)?;
        self.copy(&src, &mut dst, n)?;
        self.synchronize()?;
        let t = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            self.copy(&src, &mut dst, n)?;
        }
        self.synchronize()?;
        Ok(2.0 * (n * 4) as f64 * reps.max(1) as f64 / t.elapsed().as_secs_f64())
    }

    /// Measured cuBLAS bf16 GEMM rate (bf16 inputs, f32 accumulation and output) in FLOP/s,
    /// on `n`×`n`×`n` products of random data, `reps` after one warm-up.
    pub fn measure_bf16_gemm_rate(&self, n: usize, reps: usize) -> Result<f64> {
        self.bind()?;
        let a = self.alloc::<u16>(n * n)?;
        let b = self.alloc::<u16>(n * n)?;
        let c = self.alloc::<f32>(n * n)?;
        self.fill_normal(self.ptr(&a), true, n * n, 1, 0.0, 1.0)?;
        self.fill_normal(self.ptr(&b), true, n * n, 2, 0.0, 1.0)?;
        let (pa, pb, pc) = (self.ptr(&a), self.ptr(&b), self.ptr(&c));
        self.gemm_bf16_inputs(pa, pb, pc, n, n, n)?;
        self.synchronize()?;
        let t = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            self.gemm_bf16_inputs(pa, pb, pc, n, n, n)?;
        }
        self.synchronize()?;
        Ok(2.0 * (n as f64).powi(3) * reps.max(1) as f64 / t.elapsed().as_secs_f64())
    }

    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(be("binding the context"))
    }

    pub(crate) fn blas(&self) -> Option<&CudaBlas> {
        self.blas.as_ref()
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
        if host.len() > d.len() {
            return Err(Error::Backend(format!(
                "upload of {} elements into a buffer of {}",
                host.len(),
                d.len()
            )));
        }
        if !host.is_empty() {
            let mut view = d.slice_mut(0..host.len());
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
        if len > src.len() || len > dst.len() {
            return Err(Error::Backend(format!(
                "device copy of {len} elements between buffers of {} and {}",
                src.len(),
                dst.len()
            )));
        }
        let s = src.slice(0..len);
        let mut d = dst.slice_mut(0..len);
        self.stream.memcpy_dtod(&s, &mut d).map_err(be("device copy"))
    }

    /// The device address of a buffer.
    pub(crate) fn ptr<T>(&self, d: &CudaSlice<T>) -> u64 {
        let (p, _sync) = d.device_ptr(&self.stream);
        p
    }

    fn func(&self, name: &'static str) -> Result<&CudaFunction> {
        self.funcs.get(name).ok_or_else(|| Error::Backend(format!("kernel {name} is not loaded")))
    }

    // ---- typed launchers, one per kernel (see kernels/*.cu for the math) ----

    /// x[t] = emb[tokens[t]] for `rows` tokens, embedding width `h`; `bf16` picks the kernel.
    pub(crate) fn embed(
        &self,
        emb: u64,
        bf16: bool,
        tokens: u64,
        x: u64,
        rows: usize,
        h: usize,
    ) -> Result<()> {
        let (rows_i, h_i) = (int(rows, "rows")?, int(h, "hidden")?);
        let name = if bf16 { "swk_embed_bf16" } else { "swk_embed_f32" };
        launch!(self, name, kernels::elementwise((rows * h) as u64)?, emb, tokens, x, rows_i, h_i)
    }

    /// out = rmsnorm(x) ⊙ w per row of width `n`.
    pub(crate) fn rmsnorm(
        &self,
        x: u64,
        w: u64,
        out: u64,
        rows: usize,
        n: usize,
        eps: f64,
    ) -> Result<()> {
        let n_i = int(n, "width")?;
        launch!(self, "swk_rmsnorm", kernels::per_row(rows)?, x, w, out, n_i, eps)
    }

    /// RoPE in place on `rows` rows of `n_heads` heads, first row at `pos0`.
    pub(crate) fn rope(
        &self,
        x: u64,
        inv_freq: u64,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        pos0: usize,
    ) -> Result<()> {
        let (r, h, d, p) = (
            int(rows, "rows")?,
            int(n_heads, "heads")?,
            int(head_dim, "head_dim")?,
            int(pos0, "position")?,
        );
        launch!(
            self,
            "swk_rope",
            kernels::elementwise((rows * n_heads * (head_dim / 2)) as u64)?,
            x,
            inv_freq,
            r,
            h,
            d,
            p
        )
    }

    /// Causal attention of `rows` queries at `pos0..` against the cache.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention(
        &self,
        q: u64,
        kc: u64,
        vc: u64,
        out: u64,
        rows: usize,
        pos0: usize,
        n_heads: usize,
        n_kv: usize,
        hd: usize,
        window: Option<usize>,
    ) -> Result<()> {
        let l = kernels::attention(rows, pos0, n_heads, hd, window, self.shared_limit)?;
        let (r, p, nh, nkv, d) = (
            int(rows, "rows")?,
            int(pos0, "position")?,
            int(n_heads, "heads")?,
            int(n_kv, "kv heads")?,
            int(hd, "head_dim")?,
        );
        let w = int(window.unwrap_or(0), "sliding window")?;
        let scale = 1.0 / (hd as f32).sqrt();
        launch!(self, "swk_attention", l, q, kc, vc, out, r, p, nh, nkv, d, w, scale)
    }

    /// out = silu(gate) ⊙ up; with `keys != 0`, per-column spike keys of out.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn silu_mul(
        &self,
        gate: u64,
        up: u64,
        out: u64,
        rows: usize,
        n: usize,
        pos0: usize,
        keys: u64,
    ) -> Result<()> {
        let (l, per) = kernels::column_stats(rows, n)?;
        let (r, n_i, per_i, p) = (
            int(rows, "rows")?,
            int(n, "width")?,
            int(per, "rows per block")?,
            int(pos0, "position")?,
        );
        launch!(self, "swk_silu_mul", l, gate, up, out, r, n_i, per_i, p, keys)
    }

    /// x += y; with `keys != 0`, per-column spike keys of y.
    pub(crate) fn add_residual(
        &self,
        x: u64,
        y: u64,
        rows: usize,
        n: usize,
        pos0: usize,
        keys: u64,
    ) -> Result<()> {
        let (l, per) = kernels::column_stats(rows, n)?;
        let (r, n_i, per_i, p) = (
            int(rows, "rows")?,
            int(n, "width")?,
            int(per, "rows per block")?,
            int(pos0, "position")?,
        );
        launch!(self, "swk_add_residual", l, x, y, r, n_i, per_i, p, keys)
    }

    /// y[t, o] += bias[o].
    pub(crate) fn add_bias(&self, y: u64, bias: u64, rows: usize, n: usize) -> Result<()> {
        let (r, n_i) = (int(rows, "rows")?, int(n, "width")?);
        launch!(self, "swk_add_bias", kernels::elementwise((rows * n) as u64)?, y, bias, r, n_i)
    }

    /// Per-row NLL of `targets` under `logits` `[rows, vocab]` into `out` (f64).
    pub(crate) fn nll(
        &self,
        logits: u64,
        targets: u64,
        out: u64,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        let v = int(vocab, "vocab")?;
        launch!(self, "swk_nll", kernels::per_row(rows)?, logits, targets, out, v)
    }

    /// f32 → bf16 (round to nearest even) of `n` elements.
    pub(crate) fn f32_to_bf16(&self, src: u64, dst: u64, n: usize) -> Result<()> {
        let n = n as u64;
        launch!(self, "swk_f32_to_bf16", kernels::grid_stride(n)?, src, dst, n)
    }

    /// Split `n` f32 values into bf16 hi and lo terms: `dst[..n]` = hi, `dst[n..2n]` = lo.
    pub(crate) fn split_bf16(&self, src: u64, dst: u64, n: usize) -> Result<()> {
        let n = n as u64;
        launch!(self, "swk_split_bf16", kernels::grid_stride(n)?, src, dst, n)
    }

    /// `y[i] = y2[i] + y2[n + i]` for `i < n`.
    pub(crate) fn add_halves(&self, y2: u64, y: u64, n: usize) -> Result<()> {
        let n = n as u64;
        launch!(self, "swk_add_halves", kernels::grid_stride(n)?, y2, y, n)
    }

    /// bf16 → f32 (exact) of `n` elements.
    pub(crate) fn bf16_to_f32(&self, src: u64, dst: u64, n: usize) -> Result<()> {
        let n = n as u64;
        launch!(self, "swk_bf16_to_f32", kernels::grid_stride(n)?, src, dst, n)
    }

    /// Fill `n` elements with `mean + std · N(0, 1)` from a counter-based hash of `seed`.
    pub(crate) fn fill_normal(
        &self,
        dst: u64,
        bf16: bool,
        n: usize,
        seed: u64,
        mean: f32,
        std: f32,
    ) -> Result<()> {
        let n = n as u64;
        let name = if bf16 { "swk_fill_normal_bf16" } else { "swk_fill_normal_f32" };
        launch!(self, name, kernels::grid_stride(n)?, dst, n, seed, mean, std)
    }

    /// Swap element `idx` of a weight buffer for `new_bits` (u32 for f32 storage, the low 16
    /// bits for bf16); the previous bits land in `old` (one u32 on the device).
    pub(crate) fn edit(
        &self,
        w: u64,
        bf16: bool,
        idx: usize,
        new_bits: u32,
        old: u64,
    ) -> Result<()> {
        let idx = idx as u64;
        let name = if bf16 { "swk_edit_bf16" } else { "swk_edit_f32" };
        launch!(
            self,
            name,
            Launch { grid: (1, 1, 1), block: (32, 1, 1), shared_bytes: 0 },
            w,
            idx,
            new_bits,
            old
        )
    }

    /// Add the checksum of `n` elements (u32 or u16 bits) into `*out` (one u64, zeroed first).
    pub(crate) fn checksum(&self, data: u64, u16_bits: bool, n: usize, out: u64) -> Result<()> {
        let n = n as u64;
        let name = if u16_bits { "swk_checksum_u16" } else { "swk_checksum_u32" };
        launch!(self, name, kernels::grid_stride(n)?, data, n, out)
    }

    /// y = x · Wᵀ with swk's own kernels: `[rows, k] · [n, k]ᵀ → [rows, n]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_kernel(
        &self,
        x: u64,
        w: u64,
        bf16: bool,
        y: u64,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let (r, n_i, k_i) = (int(rows, "rows")?, int(n, "out features")?, int(k, "in features")?);
        let (name, l) = match (rows <= kernels::GEMV_MAX_ROWS, bf16) {
            (true, false) => ("swk_gemv_f32", kernels::gemv(rows, n)?),
            (true, true) => ("swk_gemv_bf16", kernels::gemv(rows, n)?),
            (false, false) => ("swk_gemm_f32", kernels::gemm_tiled(rows, n)?),
            (false, true) => ("swk_gemm_bf16", kernels::gemm_tiled(rows, n)?),
        };
        launch!(self, name, l, x, w, y, r, n_i, k_i)
    }

    /// cuBLAS: y[t, o0 + j] = Σ_i x[t, i] · W[j, i] for j < n (W f32 `[n, k]`), row stride of
    /// y `ldy` (so a chunk of W's rows fills a band of y's columns).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sgemm(
        &self,
        x: u64,
        w: u64,
        y: u64,
        rows: usize,
        n: usize,
        k: usize,
        ldy: usize,
    ) -> Result<()> {
        let blas = self.blas().ok_or_else(|| Error::Backend("cuBLAS is not available".into()))?;
        let (m_i, n_i, k_i, ld) =
            (int(n, "out features")?, int(rows, "rows")?, int(k, "in features")?, int(ldy, "ldy")?);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Column-major view: yᵀ (n × rows, ld ldy) = Wᵀᵀ · xᵀ with W as (k × n, ld k)
        // transposed and x as (k × rows, ld k).
        // SAFETY: pointers address buffers of at least n·k, rows·k and rows·ldy floats.
        unsafe {
            cublas::result::sgemm(
                *blas.handle(),
                cublas::sys::cublasOperation_t::CUBLAS_OP_T,
                cublas::sys::cublasOperation_t::CUBLAS_OP_N,
                m_i,
                n_i,
                k_i,
                &alpha,
                w as *const f32,
                k_i,
                x as *const f32,
                k_i,
                &beta,
                y as *mut f32,
                ld,
            )
        }
        .map_err(be("cublasSgemm"))
    }

    /// cuBLAS GemmEx with bf16 inputs (W `[n, k]` and x `[rows, k]` as bf16 bits), f32 output
    /// and f32 accumulation: y `[rows, n]`.
    pub(crate) fn gemm_bf16_inputs(
        &self,
        x16: u64,
        w16: u64,
        y: u64,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let blas = self.blas().ok_or_else(|| Error::Backend("cuBLAS is not available".into()))?;
        let (m_i, n_i, k_i) = (int(n, "out features")?, int(rows, "rows")?, int(k, "in features")?);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: as in sgemm; types are given explicitly to GemmEx.
        unsafe {
            cublas::result::gemm_ex(
                *blas.handle(),
                cublas::sys::cublasOperation_t::CUBLAS_OP_T,
                cublas::sys::cublasOperation_t::CUBLAS_OP_N,
                m_i,
                n_i,
                k_i,
                (&alpha) as *const f32 as *const _,
                w16 as *const _,
                cublas::sys::cudaDataType_t::CUDA_R_16BF,
                k_i,
                x16 as *const _,
                cublas::sys::cudaDataType_t::CUDA_R_16BF,
                k_i,
                (&beta) as *const f32 as *const _,
                y as *mut _,
                cublas::sys::cudaDataType_t::CUDA_R_32F,
                m_i,
                cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(be("cublasGemmEx"))
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
