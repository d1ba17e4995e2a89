//! `--device cuda|cpu|auto`: which backend runs the forward passes.

use std::sync::Arc;

use swk::backend::WeightDtype;
use swk::model::LazyModel;
use swk::{Error, Model, Result};

/// The `--device` flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// CUDA when a device is usable, else CPU (saying which).
    Auto,
    /// The CPU backend.
    Cpu,
    /// The CUDA backend (error when no device is usable).
    Cuda,
}

/// The backend chosen for this run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// CPU.
    Cpu,
    /// CUDA device 0.
    Cuda,
}

/// Whether CUDA can run; `explicit` when `--device cuda` asked for it (the CPU emulator of a
/// `cuda-emu` build runs only when asked for).
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn cuda_usable(explicit: bool) -> std::result::Result<(), String> {
    if swk::backend::cuda::EMULATED && !explicit {
        Err("this swk's CUDA backend is the CPU emulator (feature cuda-emu), used only with --device cuda".into())
    } else if swk::backend::cuda::cuda_available() {
        Ok(())
    } else {
        Err("no usable CUDA device (driver library or device missing)".into())
    }
}

#[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
fn cuda_usable(_explicit: bool) -> std::result::Result<(), String> {
    Err("this swk was built without the `cuda` feature (cargo build --release --features cuda)"
        .into())
}

/// Resolve the flag (the CUDA backend runs every family); `auto` reports its choice on
/// stderr unless `quiet`.
pub fn choose(arg: DeviceArg, quiet: bool) -> Result<Backend> {
    match (arg, cuda_usable(arg == DeviceArg::Cuda)) {
        (DeviceArg::Cpu, _) => Ok(Backend::Cpu),
        (DeviceArg::Cuda, Ok(())) => Ok(Backend::Cuda),
        (DeviceArg::Cuda, Err(why)) => Err(Error::Backend(format!("--device cuda: {why}"))),
        (DeviceArg::Auto, Ok(())) => {
            if !quiet {
                eprintln!("swk: device: cuda");
            }
            Ok(Backend::Cuda)
        }
        (DeviceArg::Auto, Err(why)) => {
            if !quiet {
                eprintln!("swk: device: cpu ({why})");
            }
            Ok(Backend::Cpu)
        }
    }
}

/// `swk report` runs no model: it says so when CUDA was asked for explicitly.
pub fn require_no_model(arg: DeviceArg) -> Result<()> {
    if arg == DeviceArg::Cuda {
        return Err(Error::Invalid(
            "report renders a saved research session and runs no model, so --device cuda does \
             not apply (every command that runs a model takes it)"
                .into(),
        ));
    }
    Ok(())
}

/// Weight storage on the device (`--gpu-dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuDtype {
    /// The checkpoint's own 16-bit storage when all its matrices share one (f16 or bf16:
    /// their values exact), else bf16. For streamed layers, judged on the tensors loaded
    /// whole (embedding, LM head).
    Auto,
    /// bfloat16 matrices (norms stay f32).
    Bf16,
    /// IEEE half matrices (norms stay f32): exact for models stored in f16; a weight beyond
    /// ±65504 is refused.
    F16,
    /// float32 everywhere.
    F32,
}

impl GpuDtype {
    /// The storage for `model` (see [`GpuDtype::Auto`]), judged on every matrix of `files`
    /// (their headers) when the layers are read from them, else of `model`.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    pub fn resolve(self, model: &Model, files: Option<&Files>) -> Result<WeightDtype> {
        Ok(match self {
            GpuDtype::Auto => match files {
                Some(f) => {
                    let lazy = &f.lazy;
                    let matrices =
                        lazy.names().filter(|n| lazy.shape(n).is_ok_and(|s| s.len() == 2));
                    let stored =
                        matrices.map(|n| lazy.source_dtype(n)).collect::<Result<Vec<_>>>()?;
                    WeightDtype::matching_stored(stored.iter().map(String::as_str))
                }
                None => WeightDtype::matching(&model.weights),
            },
            GpuDtype::Bf16 => WeightDtype::Bf16,
            GpuDtype::F16 => WeightDtype::F16,
            GpuDtype::F32 => WeightDtype::F32,
        })
    }

    /// The storage whose size decides whether the weights fit (before any is read: `auto`
    /// is 2 bytes a weight whichever it picks).
    fn sized(self) -> WeightDtype {
        if self == GpuDtype::F32 {
            WeightDtype::F32
        } else {
            WeightDtype::Bf16
        }
    }
}

/// Who multiplies the matrices on CUDA (`--gpu-gemm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuGemm {
    /// cublas-split for bf16 weights, cublas for f32, swk's kernels for f16 (and wherever
    /// libcublas is not found).
    #[default]
    Auto,
    /// cuBLAS in f32 (2-byte weights widened first): the CPU backend's math.
    Cublas,
    /// cuBLAS on bf16 activations: fastest, least exact (bf16 weights).
    CublasBf16,
    /// cuBLAS on the activations' two bf16 terms: about f32 accuracy (bf16 weights).
    CublasSplit,
    /// swk's tensor-core product for products of at most 16 rows, about f32 accuracy (bf16
    /// or f16 weights); cublas-split (bf16) or swk's kernels (f16) for longer ones.
    Mma,
    /// swk's own GEMM kernels (f32 math).
    Kernels,
}

/// `--profile`: time every kernel of every CUDA device this run opens (nothing without CUDA
/// support).
pub fn start_profile() {
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    swk::backend::cuda::profile_process(true);
}

/// `--profile`'s report, for stderr: the device time per kernel of the run (its `top` most
/// costly kernels) against the run's wall time `wall_ms`, or why there is none.
pub fn profile_report(wall_ms: f64, top: usize) -> String {
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    if let Some(p) = swk::backend::cuda::process_profile() {
        return format!(
            "device profile (--profile): {} launches timed, {:.1} ms of the run's {wall_ms:.1} ms wall time\n{}",
            p.launches(),
            p.total_ms(),
            p.table(wall_ms, top)
        );
    }
    let _ = (wall_ms, top);
    if cfg!(any(feature = "cuda", feature = "cuda-emu")) {
        "device profile (--profile): no CUDA device ran".into()
    } else {
        "device profile (--profile): this swk has no CUDA support (build with --features cuda)"
            .into()
    }
}

/// `--gpu-gemm` for this run, set once by the command line (as `--threads` sets rayon's pool).
static GEMM: std::sync::OnceLock<GpuGemm> = std::sync::OnceLock::new();

/// Record `--gpu-gemm` (the first call wins).
pub fn set_gemm(gemm: GpuGemm) {
    let _ = GEMM.set(gemm);
}

/// The CUDA options of this run: `dtype` weights on device 0, the `--gpu-gemm` engine.
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub fn cuda_options(dtype: WeightDtype) -> swk::backend::cuda::CudaOptions {
    use swk::backend::cuda::GemmEngine;
    let gemm = match GEMM.get().copied().unwrap_or_default() {
        GpuGemm::Auto => GemmEngine::Auto,
        GpuGemm::Cublas => GemmEngine::Cublas,
        GpuGemm::CublasBf16 => GemmEngine::CublasBf16,
        GpuGemm::CublasSplit => GemmEngine::CublasSplit,
        GpuGemm::Mma => GemmEngine::Mma,
        GpuGemm::Kernels => GemmEngine::Kernels,
    };
    swk::backend::cuda::CudaOptions { dtype, gemm, ..Default::default() }
}

/// The `--stream` flag: whether a CUDA run keeps the model's layers in its files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StreamArg {
    /// Stream when the weights do not fit the device's free memory (with headroom).
    Auto,
    /// Always stream (one layer on the device at a time).
    Always,
    /// Never stream (error when the weights do not fit).
    Never,
}

/// The device flags of the commands that can run on CUDA.
#[derive(Clone, Copy, Debug)]
pub struct DeviceOpts {
    /// `--device`.
    pub device: DeviceArg,
    /// `--stream`.
    pub stream: StreamArg,
    /// KV-cache positions the run holds at once (a perplexity window, generated tokens),
    /// counted with the weights when `--stream auto` decides; 0 for short passes, which the
    /// headroom covers.
    pub positions: usize,
}

impl DeviceOpts {
    /// These options for a run that holds `positions` KV-cache positions at once.
    pub fn holding(self, positions: usize) -> Self {
        DeviceOpts { positions, ..self }
    }
}

/// Device memory left free for activations and the KV cache when deciding to stream.
const HEADROOM: usize = 2 << 30;

/// A model's files as a CUDA run reads them ([`load`]): its layers streamed on every pass, or
/// uploaded whole once, a buffer group at a time.
#[derive(Clone)]
// Read only by the CUDA backend's constructors (a build without it never has files).
#[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(dead_code))]
pub struct Files {
    /// The lazily read files.
    pub lazy: Arc<LazyModel>,
    /// Whether the layers are streamed (else uploaded whole from the files).
    pub streamed: bool,
}

/// The backend for `spec` (per the flags), and the model as that backend needs it: the
/// whole [`Model`] for the CPU, or for CUDA the model without its layer tensors (tokenizer,
/// config, embedding, head) and its files (`Some`), from which the layers are streamed or
/// uploaded (so the host never holds every layer as f32). Checkpoints LazyModel cannot open
/// (GPT-2, GPT-NeoX, Gemma 3 safetensors) load whole for a resident CUDA run (`None`).
pub fn load(
    spec: &str,
    quiet: bool,
    dev: DeviceOpts,
    dtype: GpuDtype,
) -> Result<(Backend, Model, Option<Files>)> {
    load_for(spec, quiet, dev, dtype, false)
}

/// [`load`] for a command that reads every layer tensor on the host when the model is
/// resident on the device (`quantize-study` lists and rewrites them): a resident CUDA run
/// gets the whole [`Model`].
pub fn load_whole(
    spec: &str,
    quiet: bool,
    dev: DeviceOpts,
    dtype: GpuDtype,
) -> Result<(Backend, Model, Option<Files>)> {
    load_for(spec, quiet, dev, dtype, true)
}

/// [`load`], or [`load_whole`] when `whole`.
fn load_for(
    spec: &str,
    quiet: bool,
    dev: DeviceOpts,
    dtype: GpuDtype,
    whole: bool,
) -> Result<(Backend, Model, Option<Files>)> {
    let backend = choose(dev.device, quiet)?;
    if backend == Backend::Cpu {
        return Ok((backend, super::load_model(spec, quiet)?, None));
    }
    let streamed = streams(spec, dev.stream, dtype.sized(), dev.positions)?;
    if !streamed && (whole || !LazyModel::can_open(spec)?) {
        return Ok((backend, super::load_model(spec, quiet)?, None));
    }
    let lazy = LazyModel::open(spec)?;
    if !quiet && streamed {
        eprintln!(
            "swk: streaming layers from {} ({:.2} GiB of f32 weights; one layer on the device at a time)",
            lazy.source.path.display(),
            lazy.f32_bytes() as f64 / (1u64 << 30) as f64
        );
    }
    let outside = lazy.materialize(|n| swk::backend::stream::split_layer_name(n).is_none())?;
    Ok((backend, outside, Some(Files { lazy: Arc::new(lazy), streamed })))
}

/// Whether a CUDA run streams `spec`'s layers per `--stream` (`auto`: when the weights and a
/// KV cache of `positions` do not fit, decided from the config alone; checkpoints LazyModel
/// cannot stream still load whole).
fn streams(spec: &str, stream: StreamArg, dtype: WeightDtype, positions: usize) -> Result<bool> {
    Ok(match stream {
        StreamArg::Never => false,
        StreamArg::Auto => !fits(&swk::model::load::read_config(spec)?, dtype, positions)?,
        StreamArg::Always => true,
    })
}

/// For a CUDA run that also keeps the whole model on the host (`swk research`, whose other
/// analyses run on the CPU): `spec`'s files to stream the device's layers from, when
/// `--stream` says to stream.
pub fn stream_files(spec: &str, stream: StreamArg, dtype: GpuDtype) -> Result<Option<Files>> {
    if streams(spec, stream, dtype.sized(), 0)? {
        Ok(Some(Files { lazy: Arc::new(LazyModel::open(spec)?), streamed: true }))
    } else {
        Ok(None)
    }
}

/// Whether `config`'s weights in `dtype` and a KV cache of `positions` fit device 0 whole,
/// with the headroom ([`room_beside`], which `swk info` reports by).
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn fits(config: &swk::model::ModelConfig, dtype: WeightDtype, positions: usize) -> Result<bool> {
    use swk::backend::memory::{kv_cache_bytes, weight_bytes};
    let (_, free) = cuda_free_memory()?;
    let room = room_beside(weight_bytes(config, dtype), free);
    Ok(room.is_some_and(|r| kv_cache_bytes(config, positions) <= r))
}

#[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
fn fits(_: &swk::model::ModelConfig, _: WeightDtype, _: usize) -> Result<bool> {
    Ok(true)
}

/// Device bytes left for the KV cache beside resident weights of `bytes` when `free` bytes
/// are free and `--stream auto`'s headroom is kept; `None` when the weights do not fit (it
/// streams).
pub fn room_beside(bytes: usize, free: usize) -> Option<usize> {
    free.checked_sub(bytes.saturating_add(HEADROOM))
}

/// The name and free memory of the CUDA device `--device` picks (quietly); `None` when it
/// picks the CPU.
pub fn free_memory(arg: DeviceArg) -> Result<Option<(String, usize)>> {
    if choose(arg, true)? == Backend::Cpu {
        return Ok(None);
    }
    cuda_free_memory().map(Some)
}

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn cuda_free_memory() -> Result<(String, usize)> {
    swk::backend::cuda::CudaModel::free_memory(0)
}

#[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
fn cuda_free_memory() -> Result<(String, usize)> {
    Err(Error::Backend(cuda_usable(true).err().unwrap_or_default()))
}

/// The model on CUDA device 0: `files`' layers streamed or uploaded from them, else `model`
/// uploaded whole.
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub fn cuda_model(
    model: &Model,
    files: Option<Files>,
    opts: &swk::backend::cuda::CudaOptions,
) -> Result<swk::backend::cuda::CudaModel> {
    use swk::backend::cuda::CudaModel;
    match files {
        Some(f) if f.streamed => CudaModel::streamed(f.lazy, opts),
        Some(f) => CudaModel::from_lazy(&f.lazy, opts),
        None => CudaModel::new(model, opts),
    }
}

/// The model on CUDA device 0 with `dtype` weights ([`cuda_model`]: streamed or uploaded
/// from `lazy`'s files, else uploaded from `model`), and the description reports carry: `cuda: NAME (DTYPE weights, ENGINE[, layers
/// streamed])`.
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub fn cuda_session(
    model: &Model,
    lazy: Option<Files>,
    dtype: GpuDtype,
) -> Result<(swk::backend::cuda::CudaModel, String)> {
    let dtype = dtype.resolve(model, lazy.as_ref())?;
    let gpu = cuda_model(model, lazy, &cuda_options(dtype))?;
    let streamed = if gpu.is_streamed() { ", layers streamed" } else { "" };
    let what = format!(
        "cuda: {} ({} weights, {}{streamed})",
        gpu.device().name(),
        dtype.name(),
        gpu.gemm().name()
    );
    Ok((gpu, what))
}
