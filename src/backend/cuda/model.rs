//! A model's weights on the device: how they are stored ([`WeightDtype`]), who multiplies
//! them ([`GemmEngine`]), and [`CudaModel`]'s constructors: an upload of a host model
//! ([`CudaModel::new`]), layers streamed from the model's files ([`CudaModel::streamed`]), or
//! random weights made on the device for timing ([`CudaModel::random`]). The forward pass
//! that reads them is in forward.rs.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::driver::{cuda_available, CudaDevice, CudaSlice};
use super::family::Block;
use super::linear::Scratch;
use super::mla::MlaRope;
use super::moe::KeyLayout;
use super::route::DeviceRouter;
use super::streamed::Streamed;
use crate::backend::memory::{check_shapes, plan_shapes, resident_bytes, weight_bytes};
use crate::backend::stream::{copy_parallel, split_layer_name, stored_bytes, SlotLayout};
use crate::model::arch::{self, llama};
use crate::model::{LazyModel, Model, ModelConfig};
use crate::{Error, Result};

pub use crate::backend::dtype::WeightDtype;

/// Who computes the matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmEngine {
    /// cuBLAS when libcublas loads (`cublas-split` for bf16 weights, `cublas` for f32), else
    /// swk's kernels; swk's kernels for f16 weights.
    Auto,
    /// cuBLAS SGEMM in f32 (bf16 and f16 weights are widened exactly to f32 chunk by chunk
    /// first): the CPU backend's math.
    Cublas,
    /// cuBLAS GemmEx on bf16 inputs with f32 accumulation: activations are rounded to bf16
    /// before each product. Fastest, least exact. Needs [`WeightDtype::Bf16`].
    CublasBf16,
    /// cuBLAS GemmEx on bf16 weights and two-term bf16 activations (x = hi + lo, stacked as
    /// twice the rows, the two products summed in f32): about f32 accuracy, reading the bf16
    /// weights once. The default for bf16 weights. Needs [`WeightDtype::Bf16`].
    CublasSplit,
    /// swk's tensor-core product (`kernels/mma.cu`) for products of at most 16 rows
    /// (detection prompts, decoding), reading each weight once, with f32 accumulation: bf16
    /// weights against x's two bf16 terms, as `cublas-split` computes them (`cublas-split`
    /// for longer products, so cuBLAS is needed); f16 weights against two f16 terms of x
    /// scaled per row by a power of two (22 bits of each value; swk's kernels for longer
    /// products). Needs [`WeightDtype::Bf16`] or [`WeightDtype::F16`].
    Mma,
    /// swk's own tiled GEMM / warp GEMV kernels (f32 math; bf16 and f16 weights widened as
    /// loaded). The default for f16 weights.
    Kernels,
}

impl GemmEngine {
    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            GemmEngine::Auto => "auto",
            GemmEngine::Cublas => "cublas",
            GemmEngine::CublasBf16 => "cublas-bf16",
            GemmEngine::CublasSplit => "cublas-split",
            GemmEngine::Mma => "mma",
            GemmEngine::Kernels => "kernels",
        }
    }
}

/// Options of [`CudaModel::new`].
#[derive(Debug, Clone)]
pub struct CudaOptions {
    /// Device ordinal.
    pub device: usize,
    /// Storage of weight matrices.
    pub dtype: WeightDtype,
    /// Matrix product engine.
    pub gemm: GemmEngine,
}

impl Default for CudaOptions {
    /// Device 0, bf16 weights, cuBLAS (f32 math) when present.
    fn default() -> Self {
        CudaOptions { device: 0, dtype: WeightDtype::Bf16, gemm: GemmEngine::Auto }
    }
}

/// Device storage of one tensor.
pub(crate) enum DevData {
    F32(CudaSlice<f32>),
    /// A 2-byte dtype's raw bits ([`WeightDtype::Bf16`] or [`WeightDtype::F16`]).
    Half(CudaSlice<u16>, WeightDtype),
}

impl DevData {
    /// The device address of element `i`.
    pub(crate) fn ptr_at(&self, dev: &CudaDevice, i: usize) -> u64 {
        match self {
            DevData::F32(d) => dev.ptr(d) + (4 * i) as u64,
            DevData::Half(d, _) => dev.ptr(d) + (2 * i) as u64,
        }
    }
    /// How the elements are stored.
    pub(crate) fn dtype(&self) -> WeightDtype {
        match self {
            DevData::F32(_) => WeightDtype::F32,
            DevData::Half(_, dt) => *dt,
        }
    }
}

/// A tensor on the device: HF shape, and where its elements lie: from element `offset` of the
/// model's buffer number `buffer`. A layer's q, k and v projections share one buffer, back to
/// back, and its gate and up projections another ([`buffer_groups`]), so that each group is
/// one matrix product; every other tensor has a buffer of its own.
pub(crate) struct DevTensor {
    pub(crate) shape: Vec<usize>,
    pub(crate) buffer: usize,
    pub(crate) offset: usize,
}

impl DevTensor {
    pub(crate) fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A weight as the forward pass reads it: resident, or in the streamed layer's slot.
pub(crate) struct WeightRef {
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) ptr: u64,
    pub(crate) dtype: WeightDtype,
}

impl WeightRef {
    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows `start..start + n` of a matrix: one projection of a fused one (Phi-3's
    /// `qkv_proj` and `gate_up_proj` stack theirs by rows, and rows are contiguous).
    /// A vector's elements `start..start + n` likewise (a fused projection's bias).
    pub(crate) fn rows(&self, start: usize, n: usize) -> Result<WeightRef> {
        let (total, cols) = match self.shape[..] {
            [total, cols] => (total, cols),
            [total] => (total, 1),
            _ => return Err(Error::tensor(&self.name, format!("not a matrix: {:?}", self.shape))),
        };
        if start + n > total {
            return Err(Error::tensor(
                &self.name,
                format!("rows {start}..{} of a [{total}, {cols}] matrix", start + n),
            ));
        }
        let elem = self.dtype.bytes();
        Ok(WeightRef {
            name: format!("{}[{start}..{}]", self.name, start + n),
            shape: if self.shape.len() == 1 { vec![n] } else { vec![n, cols] },
            ptr: self.ptr + (start * cols * elem) as u64,
            dtype: self.dtype,
        })
    }

    /// The address of an f32 tensor (norms and biases).
    pub(crate) fn f32_ptr(&self) -> Result<u64> {
        if self.dtype != WeightDtype::F32 {
            return Err(Error::Backend(format!("{} is expected in f32 on the device", self.name)));
        }
        Ok(self.ptr)
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A model's weights on a CUDA device, ready to run its family's forward pass (every family
/// swk knows).
pub struct CudaModel {
    pub(crate) dev: CudaDevice,
    pub(crate) config: ModelConfig,
    pub(crate) tensors: BTreeMap<String, DevTensor>,
    /// The device buffers the tensors lie in.
    pub(crate) buffers: Vec<DevData>,
    pub(crate) inv_freq: CudaSlice<f32>,
    /// RoPE pairs per head (`head_dim / 2` unless RoPE is partial).
    pub(crate) rot_half: usize,
    /// Gemma 3's RoPE frequencies of its sliding layers (local base, unscaled).
    pub(crate) inv_local: Option<CudaSlice<f32>>,
    /// The family's switches of the block.
    pub(crate) block: Block,
    /// Where each layer's spike keys lie in a pass's key buffer.
    pub(crate) key_layout: KeyLayout,
    /// DeepSeek's latent-attention rope.
    pub(crate) mla_rope: Option<MlaRope>,
    /// DeepSeek-V3's router selection biases per sparse layer, kept on the host, which
    /// routes (not uploaded: an edit of one is an error, never silently ignored).
    pub(crate) router_bias: BTreeMap<usize, Vec<f32>>,
    pub(crate) head: String,
    dtype: WeightDtype,
    pub(crate) gemm: GemmEngine,
    pub(crate) edit_scratch: CudaSlice<u32>,
    pub(crate) scratch: Mutex<Scratch>,
    pub(crate) stream: Option<Streamed>,
    pub(crate) graphs: bool,
    /// Whether neighbouring launches are fused: `cublas-split`'s split and sum into the
    /// kernels around each product (linear.rs), attention's residual add into the MLP's
    /// norm (forward.rs; on by default).
    pub(crate) fused_launches: bool,
    /// Whether products of one input whose weights lie back to back (a layer's q/k/v and
    /// gate/up) run as one product when their halves are fused (linear.rs; on by default).
    pub(crate) grouped_products: bool,
    /// Whether a sparse layer whose experts have at most `GEMV_MAX_ROWS` rows each runs them
    /// all in one launch per step (moe.rs; on by default).
    pub(crate) grouped_experts: bool,
    /// Sparse layers run with their experts grouped, since the upload.
    pub(crate) grouped_layers: std::sync::atomic::AtomicU64,
    /// A resident mixture of experts' router on the device (route.rs, route.cu).
    pub(crate) device_router: Option<DeviceRouter>,
    /// Whether short passes route on the device (on by default).
    pub(crate) device_routing: bool,
    /// Sparse layers routed on the device, since the upload.
    pub(crate) device_routed: std::sync::atomic::AtomicU64,
    pub(crate) graph_cache: super::graph::GraphCache,
    pub(crate) graph_failure: Mutex<Option<String>>,
    pub(crate) id: u64,
}

/// Every tensor the forward pass reads: (name, whether it is a matrix stored in the weight
/// dtype). Norms and biases stay f32.
pub(crate) fn upload_plan(model: &Model) -> Vec<(String, bool)> {
    plan_shapes(&model.config)
        .into_iter()
        .filter(|(n, _, _)| n != "lm_head.weight" || model.weights.contains(n))
        .map(|(n, _, matrix)| (n, matrix))
        .collect()
}

/// `plan` (name, whether a matrix) with each tensor's shape in `host`.
fn with_shapes(
    plan: Vec<(String, bool)>,
    host: &crate::model::Weights,
) -> Result<Vec<(String, Vec<usize>, bool)>> {
    plan.into_iter()
        .map(|(name, matrix)| {
            let shape = host.get(&name)?.shape.clone();
            Ok((name, shape, matrix))
        })
        .collect()
}

/// DeepSeek-V3's router selection biases by layer, read with `read(name)` (None: absent).
fn router_biases(
    c: &ModelConfig,
    read: impl Fn(&str) -> Result<Option<Vec<f32>>>,
) -> Result<BTreeMap<usize, Vec<f32>>> {
    let mut out = BTreeMap::new();
    let (Some(d), Some(m)) = (&c.family.deepseek, &c.family.moe) else { return Ok(out) };
    for l in (0..c.num_layers).filter(|&l| d.sigmoid && m.is_sparse(l)) {
        let name = arch::deepseek::bias_name(l);
        if let Some(b) = read(&name)? {
            if b.len() != m.num_experts {
                return Err(Error::tensor(
                    &name,
                    format!("{} values for {} experts", b.len(), m.num_experts),
                ));
            }
            out.insert(l, b);
        }
    }
    Ok(out)
}

/// Error unless `need` bytes are free on the device.
fn check_fits(dev: &CudaDevice, need: usize, dtype: WeightDtype, what: &str) -> Result<()> {
    let (free, total) = dev.memory()?;
    if need > free {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        return Err(Error::Backend(format!(
            "{what} need {:.2} GiB in {} and {} has {:.2} GiB free of {:.2} GiB",
            gib(need),
            dtype.name(),
            dev.name(),
            gib(free),
            gib(total)
        )));
    }
    Ok(())
}

/// The tensors of `plan` (name, shape, whether a matrix stored in the weight dtype) as device
/// buffers: the indices of each buffer's tensors, in order. A layer's q/k/v projections
/// share one buffer, as do its gate/up projections, when all of the group are matrices of one
/// width; every other tensor has its own.
pub(crate) fn buffer_groups(plan: &[(String, Vec<usize>, bool)]) -> Vec<Vec<usize>> {
    const GROUPS: [&[&str]; 2] = [
        &[".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight"],
        &[".mlp.gate_proj.weight", ".mlp.up_proj.weight"],
    ];
    let index: BTreeMap<&str, usize> =
        plan.iter().enumerate().map(|(i, (n, _, _))| (n.as_str(), i)).collect();
    let mut taken = vec![false; plan.len()];
    let mut groups = Vec::with_capacity(plan.len());
    for (i, (name, shape, _)) in plan.iter().enumerate() {
        if taken[i] {
            continue;
        }
        let siblings = GROUPS.iter().find_map(|g| {
            let stem = name.strip_suffix(g[0])?;
            let members: Option<Vec<usize>> =
                g.iter().map(|s| index.get(format!("{stem}{s}").as_str()).copied()).collect();
            members.filter(|m| {
                m.iter().all(|&j| !taken[j] && plan[j].2 && plan[j].1.len() == 2)
                    && m.iter().all(|&j| plan[j].1[1] == shape[1])
            })
        });
        let members = siblings.unwrap_or_else(|| vec![i]);
        for &j in &members {
            taken[j] = true;
        }
        groups.push(members);
    }
    groups
}

/// Host tensors `(name, tensor, whether a matrix)` on the device in one buffer, back to back:
/// matrices in `dtype`, everything else f32. A value `dtype` cannot hold (f16's range) is an
/// error naming the tensor.
fn upload_group(
    dev: &CudaDevice,
    members: &[(&str, &crate::model::Tensor, bool)],
    dtype: WeightDtype,
) -> Result<DevData> {
    use rayon::prelude::*;
    if members.iter().all(|&(_, _, matrix)| matrix && dtype.is_half()) {
        // Each member encoded straight into its place in the buffer's bits.
        let mut bits = vec![0u16; members.iter().map(|(_, t, _)| t.data.len()).sum()];
        let mut rest = bits.as_mut_slice();
        for (name, t, _) in members {
            let (part, tail) = rest.split_at_mut(t.data.len());
            part.par_iter_mut().zip(t.data.par_iter()).try_for_each(|(b, &v)| {
                *b = dtype.encode_or_err(v, name)? as u16;
                Ok::<(), Error>(())
            })?;
            rest = tail;
        }
        return Ok(DevData::Half(dev.upload(&bits)?, dtype));
    }
    match members {
        [(_, t, _)] => Ok(DevData::F32(dev.upload(&t.data)?)),
        _ => {
            let data: Vec<f32> =
                members.iter().flat_map(|(_, t, _)| t.data.iter().copied()).collect();
            Ok(DevData::F32(dev.upload(&data)?))
        }
    }
}

/// Where a resident upload reads its tensors: a model in memory, or files read a tensor at a
/// time.
enum HostSource<'a> {
    Loaded(&'a crate::model::Weights),
    Files(&'a LazyModel),
}

impl HostSource<'_> {
    /// Whether it holds tensor `name`.
    fn contains(&self, name: &str) -> bool {
        match self {
            HostSource::Loaded(w) => w.contains(name),
            HostSource::Files(lazy) => lazy.contains(name),
        }
    }

    /// Tensor `name` as f32.
    fn get(&self, name: &str) -> Result<Cow<'_, crate::model::Tensor>> {
        match self {
            HostSource::Loaded(w) => w.get(name).map(Cow::Borrowed),
            HostSource::Files(lazy) => lazy.tensor(name).map(Cow::Owned),
        }
    }
}

/// The tensors of `plan` from `host` on the device, in the buffers of [`buffer_groups`]; a
/// group's tensors are read from `host` only when it is uploaded (so files are read one group
/// at a time). A group of matrices that the files store in `dtype` (a bf16 checkpoint
/// uploaded as bf16) is copied as stored ([`stored_group`]), else read as f32 and encoded.
fn upload_all(
    dev: &CudaDevice,
    plan: &[(String, Vec<usize>, bool)],
    host: &HostSource<'_>,
    dtype: WeightDtype,
) -> Result<(BTreeMap<String, DevTensor>, Vec<DevData>)> {
    let (mut tensors, mut buffers) = (BTreeMap::new(), Vec::new());
    // Reused from group to group: a fresh buffer's pages fault in on their first write.
    let mut staging = Vec::new();
    for group in buffer_groups(plan) {
        let shapes = match stored_group(host, plan, &group, dtype, &mut staging)? {
            Some(n) => {
                buffers.push(DevData::Half(dev.upload(&staging[..n])?, dtype));
                group.iter().map(|&i| (plan[i].0.as_str(), plan[i].1.clone())).collect()
            }
            None => {
                let read = group
                    .iter()
                    .map(|&i| Ok((plan[i].0.as_str(), host.get(&plan[i].0)?, plan[i].2)))
                    .collect::<Result<Vec<_>>>()?;
                let members: Vec<_> = read.iter().map(|(n, t, m)| (*n, t.as_ref(), *m)).collect();
                buffers.push(upload_group(dev, &members, dtype)?);
                members.iter().map(|(n, t, _)| (*n, t.shape.clone())).collect::<Vec<_>>()
            }
        };
        let (buffer, mut offset) = (buffers.len() - 1, 0);
        for (name, shape) in shapes {
            let len = shape.iter().product::<usize>();
            tensors.insert(name.to_string(), DevTensor { shape, buffer, offset });
            offset += len;
        }
    }
    Ok((tensors, buffers))
}

/// The bits of buffer group `group` of `plan` in `staging` (its first n elements, n
/// returned), copied as the files store them, when `host` is files that store every member
/// as a matrix in `dtype`, a half type ([`stored_bytes`]). None otherwise.
fn stored_group(
    host: &HostSource<'_>,
    plan: &[(String, Vec<usize>, bool)],
    group: &[usize],
    dtype: WeightDtype,
    staging: &mut Vec<u16>,
) -> Result<Option<usize>> {
    let HostSource::Files(lazy) = host else { return Ok(None) };
    if !dtype.is_half() {
        return Ok(None);
    }
    let mut stored = Vec::with_capacity(group.len());
    for &i in group {
        let (name, shape, matrix) = &plan[i];
        match stored_bytes(lazy, name, dtype, shape)? {
            Some(bytes) if *matrix => stored.push(bytes),
            _ => return Ok(None),
        }
    }
    let n = stored.iter().map(|b| b.len() / 2).sum::<usize>();
    if staging.len() < n {
        staging.resize(n, 0);
    }
    let mut rest = bytemuck::cast_slice_mut::<u16, u8>(&mut staging[..n]);
    for bytes in stored {
        let (part, tail) = rest.split_at_mut(bytes.len());
        copy_parallel(part, bytes);
        rest = tail;
    }
    Ok(Some(n))
}

/// RoPE inverse frequencies over the rotated dims of a head (all of them unless RoPE is
/// partial), with the configured scaling and GGUF `rope_freqs` factors.
fn rope_inv_freq(c: &ModelConfig, freq_factors: Option<&[f32]>) -> Vec<f32> {
    let mut rc = c.clone();
    rc.head_dim = c.rotary_dim();
    llama::inv_freq(&rc, freq_factors)
}

/// Device `opts.device` and the GEMM engine `opts` resolves to there. Errors (never panics)
/// when no CUDA device is usable, saying why (no driver, no device).
fn open_device(opts: &CudaOptions) -> Result<(CudaDevice, GemmEngine)> {
    if !cuda_available() {
        // Let the device constructor say precisely why.
        CudaDevice::new(opts.device)?;
        return Err(Error::Backend("no CUDA device is available".into()));
    }
    let dev = CudaDevice::new(opts.device)?;
    let gemm = check_engine(&dev, opts.dtype, opts.gemm)?;
    Ok((dev, gemm))
}

fn check_engine(dev: &CudaDevice, dtype: WeightDtype, gemm: GemmEngine) -> Result<GemmEngine> {
    let gemm = match gemm {
        GemmEngine::Auto if dev.has_cublas() && dtype == WeightDtype::Bf16 => {
            GemmEngine::CublasSplit
        }
        // cuBLAS has no f16 × f32 product: its SGEMM would need every weight widened first.
        GemmEngine::Auto if dtype == WeightDtype::F16 => GemmEngine::Kernels,
        GemmEngine::Auto if dev.has_cublas() => GemmEngine::Cublas,
        GemmEngine::Auto => GemmEngine::Kernels,
        g => g,
    };
    // mma's longer products take cublas-split's path for bf16 weights, swk's kernels for f16.
    let mma_blas = gemm == GemmEngine::Mma && dtype == WeightDtype::Bf16;
    let bf16_blas = matches!(gemm, GemmEngine::CublasSplit | GemmEngine::CublasBf16);
    if (mma_blas || bf16_blas || gemm == GemmEngine::Cublas) && !dev.has_cublas() {
        return Err(Error::Backend(format!(
            "GEMM engine `{}` needs cuBLAS, and libcublas.so could not be loaded (add its directory to \
             LD_LIBRARY_PATH, or use the `kernels` engine)",
            gemm.name()
        )));
    }
    if bf16_blas && dtype != WeightDtype::Bf16 {
        return Err(Error::Invalid(format!("GEMM engine `{}` needs bf16 weights", gemm.name())));
    }
    if gemm == GemmEngine::Mma && !dtype.is_half() {
        return Err(Error::Invalid("GEMM engine `mma` needs bf16 or f16 weights".into()));
    }
    Ok(gemm)
}

impl CudaModel {
    /// Upload `model`'s weights to the device. Errors (never panics) when no CUDA device is
    /// usable, the model is not a supported architecture, or the weights do not fit.
    pub fn new(model: &Model, opts: &CudaOptions) -> Result<Self> {
        arch::validate(model)?;
        Self::upload(&model.config, &HostSource::Loaded(&model.weights), opts)
    }

    /// Upload `lazy`'s weights to the device, reading them from its files one buffer group at
    /// a time (q/k/v together, gate/up together, else a tensor alone), so the host holds at
    /// most one group as f32 rather than the whole model: for models that fit the device but
    /// whose f32 weights the host could not hold. The device model is [`CudaModel::new`]'s
    /// on the loaded model (the same bits). Errors as [`CudaModel::new`], and when a tensor
    /// the config implies is missing or of another shape (checked before any upload).
    pub fn from_lazy(lazy: &LazyModel, opts: &CudaOptions) -> Result<Self> {
        check_shapes(lazy)?;
        Self::upload(&lazy.config, &HostSource::Files(lazy), opts)
    }

    /// Every weight of a model of `c`'s shapes (checked) from `host` on the device.
    fn upload(c: &ModelConfig, host: &HostSource<'_>, opts: &CudaOptions) -> Result<Self> {
        let (dev, gemm) = open_device(opts)?;
        Self::check_memory(&dev, c, opts.dtype)?;
        dev.bind()?;
        let head_stored = host.contains("lm_head.weight");
        let plan: Vec<_> = plan_shapes(c)
            .into_iter()
            .filter(|(n, _, _)| n != "lm_head.weight" || head_stored)
            .collect();
        let stored = upload_all(&dev, &plan, host, opts.dtype)?;
        let read = |n: &str| {
            host.contains(n).then(|| host.get(n).map(|t| t.into_owned().data)).transpose()
        };
        let freqs = read("rope_freqs.weight")?;
        let inv = rope_inv_freq(c, freqs.as_deref());
        let head = if head_stored { "lm_head.weight" } else { "model.embed_tokens.weight" };
        let mut m = Self::finish(dev, c.clone(), stored, &inv, head, opts.dtype, gemm)?;
        m.router_bias = router_biases(c, read)?;
        m.device_router = DeviceRouter::build(&m)?;
        Ok(m)
    }

    /// Keep `lazy`'s layers in its files and stream them through one device slot, layer by
    /// layer, on every pass: for models whose weights do not fit the device. Only the
    /// embedding, final norm and LM head stay resident. A host thread reads and converts
    /// layer l + 1 while the device runs layer l, so a pass costs about the model's size over
    /// the slower of file reading (or GGUF dequantization) and the host-to-device copy.
    /// Edits are kept on the host and applied to every upload (bit-exact restore as for a
    /// resident model). Errors as [`CudaModel::new`], and when a layer tensor is missing or
    /// of another shape (checked here, before any pass).
    pub fn streamed(lazy: Arc<LazyModel>, opts: &CudaOptions) -> Result<Self> {
        let c = lazy.config.clone();
        let layouts: Vec<SlotLayout> =
            (0..c.num_layers).map(|l| SlotLayout::new(&c, l, opts.dtype)).collect();
        let slot_bytes = layouts.iter().map(|s| s.bytes).max().unwrap_or(0);
        for (l, layout) in layouts.iter().enumerate() {
            for e in &layout.entries {
                let name = format!("model.layers.{l}.{}", e.suffix);
                let shape = lazy.shape(&name)?;
                if shape != e.shape.as_slice() {
                    return Err(Error::tensor(
                        &name,
                        format!("expected shape {:?}, found {shape:?}", e.shape),
                    ));
                }
            }
        }
        let (dev, gemm) = open_device(opts)?;
        let resident = lazy.materialize(|n| split_layer_name(n).is_none())?;
        let need = resident_bytes(&c, opts.dtype) + slot_bytes;
        check_fits(&dev, need, opts.dtype, "the resident weights and one streamed layer")?;
        dev.bind()?;
        let plan =
            upload_plan(&resident).into_iter().filter(|(n, _)| split_layer_name(n).is_none());
        let plan = with_shapes(plan.collect(), &resident.weights)?;
        let stored = upload_all(&dev, &plan, &HostSource::Loaded(&resident.weights), opts.dtype)?;
        let freqs = resident.weights.get("rope_freqs.weight").ok().map(|t| t.data.as_slice());
        let inv = rope_inv_freq(&c, freqs);
        let head = if resident.weights.contains("lm_head.weight") {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        };
        let slot = dev.alloc::<u8>(slot_bytes)?;
        let mut m = Self::finish(dev, c, stored, &inv, head, opts.dtype, gemm)?;
        m.router_bias = router_biases(&m.config, |n| {
            lazy.contains(n).then(|| lazy.tensor(n).map(|t| t.data)).transpose()
        })?;
        let alloc = m.dev.host_allocator();
        m.stream = Some(Streamed::new(lazy, layouts, slot, alloc));
        Ok(m)
    }

    /// Whether a model of `config`'s shapes fits device `opts.device` whole in `opts.dtype`,
    /// leaving `headroom` bytes free for activations and the KV cache (else
    /// [`CudaModel::streamed`] runs it).
    pub fn fits(config: &ModelConfig, opts: &CudaOptions, headroom: usize) -> Result<bool> {
        let dev = CudaDevice::new(opts.device)?;
        let (free, _) = dev.memory()?;
        Ok(weight_bytes(config, opts.dtype) + headroom <= free)
    }

    /// Device `device`'s name and free memory in bytes.
    pub fn free_memory(device: usize) -> Result<(String, usize)> {
        let dev = CudaDevice::new(device)?;
        let (free, _) = dev.memory()?;
        Ok((dev.name().to_string(), free))
    }

    /// Whether the layers are streamed from the model's files ([`CudaModel::streamed`]).
    pub fn is_streamed(&self) -> bool {
        self.stream.is_some()
    }

    /// A Llama of `config`'s shapes with random weights generated on the device (linear
    /// weights and embeddings N(0, 0.02), norm weights 1 + N(0, 0.02), like
    /// `synth::random_llama` but from a device hash, so not the same bits): for timing runs
    /// at real model sizes without building the model in host memory.
    pub fn random(config: &ModelConfig, seed: u64, opts: &CudaOptions) -> Result<Self> {
        let (dev, gemm) = open_device(opts)?;
        Self::check_memory(&dev, config, opts.dtype)?;
        let (mut tensors, mut buffers) = (BTreeMap::new(), Vec::new());
        let plan = plan_shapes(config);
        for group in buffer_groups(&plan) {
            let len = |k: usize| plan[k].1.iter().product::<usize>();
            let n: usize = group.iter().map(|&k| len(k)).sum();
            let data = if plan[group[0]].2 && opts.dtype.is_half() {
                DevData::Half(dev.alloc::<u16>(n)?, opts.dtype)
            } else {
                DevData::F32(dev.alloc::<f32>(n)?)
            };
            let mut offset = 0;
            for &k in &group {
                let (name, shape, matrix) = &plan[k];
                let norm = !matrix && name.contains("norm");
                let (mean, std) = if norm { (1.0, 0.02) } else { (0.0, 0.02) };
                let s = crate::synth::mix(seed, k as u64);
                dev.fill_normal(data.ptr_at(&dev, offset), data.dtype(), len(k), s, mean, std)?;
                let t = DevTensor { shape: shape.clone(), buffer: buffers.len(), offset };
                tensors.insert(name.clone(), t);
                offset += len(k);
            }
            buffers.push(data);
        }
        dev.synchronize()?;
        let stored = (tensors, buffers);
        let inv = llama::inv_freq(config, None);
        let head =
            if config.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        let mut m = Self::finish(dev, config.clone(), stored, &inv, head, opts.dtype, gemm)?;
        m.device_router = DeviceRouter::build(&m)?;
        Ok(m)
    }

    fn check_memory(dev: &CudaDevice, c: &ModelConfig, dtype: WeightDtype) -> Result<()> {
        check_fits(dev, weight_bytes(c, dtype), dtype, "the weights")
    }

    fn finish(
        dev: CudaDevice,
        config: ModelConfig,
        (tensors, buffers): (BTreeMap<String, DevTensor>, Vec<DevData>),
        inv: &[f32],
        head: &str,
        dtype: WeightDtype,
        gemm: GemmEngine,
    ) -> Result<Self> {
        let inv_freq = dev.upload(inv)?;
        let rot_half = inv.len();
        let block = Block::of(&config);
        let key_layout = KeyLayout::of(&config);
        let mla_rope = MlaRope::of(&dev, &config)?;
        let inv_local = match config.family.rope_local_theta {
            Some(theta) => {
                let mut rc = config.clone();
                rc.rope_theta = theta;
                rc.rope_scaling = None;
                Some(dev.upload(&rope_inv_freq(&rc, None))?)
            }
            None => None,
        };
        let edit_scratch = dev.zeros::<u32>(1)?;
        dev.synchronize()?;
        Ok(CudaModel {
            dev,
            config,
            tensors,
            buffers,
            inv_freq,
            rot_half,
            inv_local,
            block,
            key_layout,
            mla_rope,
            router_bias: BTreeMap::new(),
            head: head.to_string(),
            dtype,
            gemm,
            edit_scratch,
            scratch: Mutex::new(Scratch::default()),
            stream: None,
            graphs: false,
            fused_launches: true,
            grouped_products: true,
            grouped_experts: true,
            grouped_layers: Default::default(),
            device_router: None,
            device_routing: true,
            device_routed: Default::default(),
            graph_cache: Default::default(),
            graph_failure: Mutex::new(None),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    /// The device.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }
    /// Storage of the weight matrices.
    pub fn dtype(&self) -> WeightDtype {
        self.dtype
    }
    /// The GEMM engine in use (never `Auto`).
    pub fn gemm(&self) -> GemmEngine {
        self.gemm
    }
    /// Switch the GEMM engine (e.g. to compare engines on one upload). Errors when the
    /// engine needs cuBLAS and it is absent, or `cublas-bf16` is asked with f32 weights.
    pub fn set_gemm(&mut self, gemm: GemmEngine) -> Result<()> {
        self.gemm = check_engine(&self.dev, self.dtype, gemm)?;
        self.forget_graphs();
        Ok(())
    }
    /// Fuse neighbouring launches of a pass (on by default; the same bits, fewer launches):
    /// `cublas-split`'s splitting of each product's input into the kernel that writes the
    /// input, and the sum of its two halves into the kernel that reads the result; q, k and
    /// v made and rotated in one launch; attention's residual add and the MLP's RMSNorm in
    /// one; with the `mma` engine, the MLP's activation (dense, and the grouped experts') made
    /// by the down product as it reads it. Off: a launch per step, the baseline the timing
    /// tests compare with.
    pub fn set_fused_launches(&mut self, on: bool) {
        self.fused_launches = on;
        self.forget_graphs();
    }
    /// Let attention without the pattern hook spread its work as the pass suits (on by
    /// default): a prefill 16 query rows a block (`swk_attention_rows`: keys and values read
    /// once a tile for all of them), a decode step past 512 keys split over several blocks a
    /// row (`swk_attention_split`, `swk_attention_merge`). Off: a block per query row and
    /// head, the baseline the timing tests compare with.
    pub fn set_attention_blocks(&mut self, on: bool) {
        self.dev.attention_blocks.store(on, std::sync::atomic::Ordering::Relaxed);
        self.forget_graphs();
    }

    /// With the launches fused ([`Self::set_fused_launches`]) and `cublas-split`, run the q/k/v
    /// products of a layer as one product, and its gate/up products as one (their weights lie back
    /// to back on the device; on by default; the values are those of the separate products to
    /// cuBLAS's rounding). Off: a product per weight, the baseline the timing tests compare with.
    pub fn set_grouped_products(&mut self, on: bool) {
        self.grouped_products = on;
        self.forget_graphs();
    }
    /// Device bytes held by the weights.
    pub fn weight_bytes(&self) -> usize {
        weight_bytes(&self.config, self.dtype)
    }
    /// Names of the tensors on the device, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
    /// Wait for all queued device work.
    pub fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    /// A tensor's values as f32 on the host (bf16 and f16 widened exactly).
    pub fn download(&self, name: &str) -> Result<Vec<f32>> {
        self.dev.bind()?;
        let (t, data) = self.storage(name)?;
        match data {
            DevData::F32(d) => self.dev.download(d, t.offset, t.len()),
            DevData::Half(d, dt) => Ok(self
                .dev
                .download(d, t.offset, t.len())?
                .into_iter()
                .map(|b| f32::from_bits(dt.decode(b as u32)))
                .collect()),
        }
    }

    /// A resident tensor and the buffer it lies in (from element `offset`).
    pub(crate) fn storage(&self, name: &str) -> Result<(&DevTensor, &DevData)> {
        let t = self.tensor(name)?;
        let data = self
            .buffers
            .get(t.buffer)
            .ok_or_else(|| Error::tensor(name, "its device buffer is missing"))?;
        Ok((t, data))
    }

    pub(crate) fn tensor(&self, name: &str) -> Result<&DevTensor> {
        self.tensors.get(name).ok_or_else(|| {
            Error::tensor(name, "not on the device (the forward pass does not read it)")
        })
    }

    /// A resident tensor as the forward pass reads it.
    pub(crate) fn weight(&self, name: &str) -> Result<WeightRef> {
        let (t, data) = self.storage(name)?;
        let (ptr, dtype) = (data.ptr_at(&self.dev, t.offset), data.dtype());
        Ok(WeightRef { name: name.to_string(), shape: t.shape.clone(), ptr, dtype })
    }

    /// Tensor `suffix` of layer `layer`: from the slot at `slot` when the layer is streamed
    /// in, else resident.
    pub(crate) fn layer_weight(
        &self,
        layer: usize,
        suffix: &str,
        slot: Option<u64>,
    ) -> Result<WeightRef> {
        let name = format!("model.layers.{layer}.{suffix}");
        match (slot, &self.stream) {
            (Some(base), Some(st)) => {
                let e = st
                    .layouts
                    .get(layer)
                    .and_then(|s| s.entry(suffix))
                    .ok_or_else(|| Error::tensor(&name, "not in the streamed layer layout"))?;
                Ok(WeightRef {
                    name,
                    shape: e.shape.clone(),
                    ptr: base + e.offset as u64,
                    dtype: e.dtype,
                })
            }
            _ => self.weight(&name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny Llama fixture (see [`super::super::tiny_fixture`]).
    fn tiny() -> Model {
        Model::load(&super::super::tiny_fixture("llama")).expect("tiny fixture")
    }

    #[test]
    fn new_without_a_device_is_a_clear_error() {
        if cuda_available() {
            return;
        }
        let m = tiny();
        for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
            let opts = CudaOptions { dtype, ..Default::default() };
            let e = CudaModel::new(&m, &opts).err().expect("no device here").to_string();
            assert!(e.starts_with("backend: "), "{e}");
            assert!(e.contains("CUDA") || e.contains("libcuda"), "{e}");
        }
        let c = crate::synth::SynthSpec::tiny().config().unwrap();
        let e = CudaModel::random(&c, 1, &CudaOptions::default())
            .err()
            .expect("no device here")
            .to_string();
        assert!(e.contains("CUDA") || e.contains("libcuda"), "{e}");
    }

    #[test]
    fn upload_plan_matches_the_model() {
        let m = tiny();
        let names: Vec<String> = upload_plan(&m).into_iter().map(|(n, _)| n).collect();
        for n in &names {
            assert!(m.weights.contains(n), "{n}");
        }
        // The plan from shapes names the same tensors with the model's shapes.
        let shaped = plan_shapes(&m.config);
        let mut a: Vec<&String> = names.iter().collect();
        let mut b: Vec<&String> = shaped.iter().map(|(n, _, _)| n).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
        for (n, shape, _) in &shaped {
            assert_eq!(&m.weights.get(n).unwrap().shape, shape, "{n}");
        }
        // Every tensor the CPU forward pass validates is uploaded.
        for (n, _) in m.weights.iter() {
            if n != "rope_freqs.weight" {
                assert!(names.iter().any(|x| x == n), "{n} would not be on the device");
            }
        }
    }

    /// A layer's q/k/v and gate/up share a buffer each, in that order; every other tensor
    /// has its own; a group whose widths differ, or with a member missing or not a matrix in
    /// the weight dtype, is not formed.
    #[test]
    fn buffer_groups_join_qkv_and_gate_up() {
        let m = tiny();
        let plan = with_shapes(upload_plan(&m), &m.weights).unwrap();
        let names = |g: &[usize]| -> Vec<&str> { g.iter().map(|&i| plan[i].0.as_str()).collect() };
        let groups = buffer_groups(&plan);
        let layers = m.config.num_layers;
        assert_eq!(groups.len(), plan.len() - 3 * layers, "5 tensors in 2 buffers per layer");
        let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..plan.len()).collect::<Vec<_>>(), "each tensor once");
        for l in 0..layers {
            let p = format!("model.layers.{l}.");
            let qkv = ["q_proj", "k_proj", "v_proj"].map(|n| format!("{p}self_attn.{n}.weight"));
            let gu = ["gate_proj", "up_proj"].map(|n| format!("{p}mlp.{n}.weight"));
            assert!(groups.iter().any(|g| names(g) == qkv), "layer {l} q/k/v");
            assert!(groups.iter().any(|g| names(g) == gu), "layer {l} gate/up");
        }
        // Another width, or a member kept in f32 (not a matrix of the weight dtype): alone.
        let mut odd = plan.clone();
        let k = odd.iter().position(|(n, _, _)| n.ends_with("0.self_attn.k_proj.weight")).unwrap();
        odd[k].1[1] += 1;
        let u = odd.iter().position(|(n, _, _)| n.ends_with("1.mlp.up_proj.weight")).unwrap();
        odd[u].2 = false;
        let groups = buffer_groups(&odd);
        assert_eq!(groups.len(), plan.len() - 3 * layers + 2 + 1);
        assert!(groups.iter().any(|g| g == &[k]) && groups.iter().any(|g| g == &[u]));
    }

    /// A bf16 checkpoint's matrix groups uploaded as bf16 are copied as stored: the bits of
    /// reading them as f32 and encoding them, group by group into one reused buffer (that
    /// held other bits before). Norms, other dtypes, a model in memory and an f32
    /// checkpoint take the f32 route.
    #[test]
    fn stored_groups_are_the_f32_routes_bits() {
        let lazy = LazyModel::open(&super::super::tiny_fixture("llama_bf16")).expect("fixture");
        let plan = plan_shapes(&lazy.config);
        let host = HostSource::Files(&lazy);
        let mut staging = vec![0xabcd_u16; 7];
        let (mut copied, mut other) = (0, 0);
        for group in buffer_groups(&plan) {
            let matrices = group.iter().all(|&i| plan[i].2);
            let Some(n) =
                stored_group(&host, &plan, &group, WeightDtype::Bf16, &mut staging).expect("read")
            else {
                assert!(!matrices, "{}: not copied", plan[group[0]].0);
                other += 1;
                continue;
            };
            assert!(matrices, "{}", plan[group[0]].0);
            let want: Vec<u16> = group
                .iter()
                .flat_map(|&i| lazy.tensor(&plan[i].0).expect("tensor").data)
                .map(|v| WeightDtype::Bf16.encode_or_err(v, "t").expect("bf16") as u16)
                .collect();
            assert!(staging[..n] == want[..], "{}", plan[group[0]].0);
            copied += 1;
        }
        assert!(copied >= 2 * lazy.config.num_layers && other > 0, "{copied} copied, {other} not");
        let group = buffer_groups(&plan).into_iter().find(|g| plan[g[0]].2).expect("a matrix");
        let f16 = stored_group(&host, &plan, &group, WeightDtype::F16, &mut staging).unwrap();
        assert_eq!(f16, None, "bf16 stored, f16 wanted");
        let f32_files = LazyModel::open(&super::super::tiny_fixture("llama")).expect("fixture");
        let host = HostSource::Files(&f32_files);
        let none = stored_group(&host, &plan, &group, WeightDtype::Bf16, &mut staging).unwrap();
        assert_eq!(none, None, "f32 stored");
        let m = tiny();
        let host = HostSource::Loaded(&m.weights);
        let none = stored_group(&host, &plan, &group, WeightDtype::Bf16, &mut staging).unwrap();
        assert_eq!(none, None, "a model in memory");
    }

    #[test]
    fn weight_bytes_of_7b() {
        let c = crate::synth::SynthSpec::llama2_7b().config().unwrap();
        let params = c.parameter_count() as usize;
        let bf16 = weight_bytes(&c, WeightDtype::Bf16);
        let f32 = weight_bytes(&c, WeightDtype::F32);
        // Norms stay f32: a little over 2 bytes per parameter.
        assert!(bf16 > 2 * params && bf16 < 2 * params + 4 * 100 * 4096, "{bf16}");
        assert_eq!(f32, 4 * params);
        assert!(bf16 < 14 << 30, "7B in bf16 fits an 80 GB GPU many times over: {bf16}");
    }

    #[test]
    fn default_options() {
        let o = CudaOptions::default();
        assert_eq!((o.device, o.dtype, o.gemm), (0, WeightDtype::Bf16, GemmEngine::Auto));
        assert_eq!(GemmEngine::CublasBf16.name(), "cublas-bf16");
        assert_eq!(WeightDtype::Bf16.bytes(), 2);
    }
}
