//! A model on the device and its forward pass, mirroring `model::arch::llama::forward` (and
//! `phi3::forward`, the same block with fused projections, and `olmo::forward`):
//!
//! ```text
//! x = E[tokens]
//! per block l:
//!   xn = rmsnorm(x) ⊙ w_attn_norm       (OLMo: LayerNorm without parameters; OLMo 2: xn = x)
//!   q = xn·W_qᵀ (+b_q); k, v = xn·W_{k,v}ᵀ (+b) written straight into the cache rows pos0..
//!   (Phi-3: W_q, W_k, W_v are the row blocks of qkv_proj; W_gate, W_up of gate_up_proj)
//!   (Qwen3: rmsnorm over each head of q and k; OLMo 2: over all of q and of k; OLMo:
//!   q, k, v clamped to ±clip_qkv; OLMoE: whole-q/k norms, then the clamp)
//!   rope(q), rope(k rows of the cache)                   (Phi: maybe over the first dims only)
//!   att = softmax(q·kᵀ·scale + causal/window mask)·v     (swk_attention)
//!   x += att·W_oᵀ (+b_o: Llama, Qwen3, OLMo with attention_bias) (OLMo 2: rmsnorm of it)
//!   xn = rmsnorm(x) ⊙ w_mlp_norm
//!   a = silu(xn·W_gateᵀ) ⊙ (xn·W_upᵀ)                    (+ per-column max |a|: spike input)
//!   x += a·W_downᵀ (OLMo 2: rmsnorm of it)               (+ per-column max |y|: spike output)
//!   (a sparse layer of a mixture of experts: x += Σ_e w_e · expert_e(xn), see moe.rs)
//!   (DeepSeek: latent attention in place of q/k/v, see mla.rs)
//! logits = rmsnorm(x[rows asked]) ⊙ w_norm · W_headᵀ
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::driver::{CudaSlice, PinnedHostSlice};

use super::driver::{cuda_available, CudaDevice};
use super::family::{Block, Norm, QkNorm};
use super::kernels;
use super::mla::{MlaActs, MlaRope};
use super::moe::{KeyLayout, MoeActs};
use super::streamed::Streamed;
use crate::backend::stream::{layer_plan, split_layer_name, stage_layer, Overlay, SlotLayout};
use crate::eval::ppl::Perplexity;
use crate::hooks::SpikeStats;
use crate::model::arch::{self, llama, Logits};
use crate::model::{Architecture, LazyModel, Model, ModelConfig};
use crate::{Error, Result};

/// How weight matrices (projections, embedding, LM head) are stored on the device. Norm
/// weights, biases and RoPE frequencies are always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    /// 4 bytes per weight: the host's values exactly.
    F32,
    /// 2 bytes per weight, rounded to nearest even (exact for models stored in bf16).
    Bf16,
}

impl WeightDtype {
    /// Bytes per stored weight.
    pub fn bytes(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::Bf16 => 2,
        }
    }
    /// Lowercase name (`f32`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
        }
    }
}

/// Who computes the matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmEngine {
    /// cuBLAS when libcublas loads, else swk's kernels.
    Auto,
    /// cuBLAS SGEMM in f32 (bf16 weights are widened exactly to f32 chunk by chunk first):
    /// the CPU backend's math.
    Cublas,
    /// cuBLAS GemmEx on bf16 inputs with f32 accumulation: activations are rounded to bf16
    /// before each product. Fastest, least exact. Needs [`WeightDtype::Bf16`].
    CublasBf16,
    /// cuBLAS GemmEx on bf16 weights and two-term bf16 activations (x = hi + lo, stacked as
    /// twice the rows, the two products summed in f32): about f32 accuracy, reading the bf16
    /// weights once. The default for bf16 weights. Needs [`WeightDtype::Bf16`].
    CublasSplit,
    /// swk's own tiled GEMM / warp GEMV kernels (f32 math; bf16 weights widened as loaded).
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

/// Elements of the f32 scratch used to widen bf16 weights for cuBLAS SGEMM (128 MiB).
const WIDEN_SCRATCH: usize = 1 << 25;

/// Device storage of one tensor.
pub(crate) enum DevData {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// A tensor on the device: HF shape and storage.
pub(crate) struct DevTensor {
    pub(crate) shape: Vec<usize>,
    pub(crate) data: DevData,
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
    pub(crate) bf16: bool,
}

impl WeightRef {
    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows `start..start + n` of a matrix: one projection of a fused one (Phi-3's
    /// `qkv_proj` and `gate_up_proj` stack theirs by rows, and rows are contiguous).
    /// A vector's elements `start..start + n` likewise (a fused projection's bias).
    fn rows(&self, start: usize, n: usize) -> Result<WeightRef> {
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
        let elem = if self.bf16 { 2 } else { 4 };
        Ok(WeightRef {
            name: format!("{}[{start}..{}]", self.name, start + n),
            shape: if self.shape.len() == 1 { vec![n] } else { vec![n, cols] },
            ptr: self.ptr + (start * cols * elem) as u64,
            bf16: self.bf16,
        })
    }

    /// The address of an f32 tensor (norms and biases).
    pub(crate) fn f32_ptr(&self) -> Result<u64> {
        if self.bf16 {
            return Err(Error::Backend(format!("{} is expected in f32 on the device", self.name)));
        }
        Ok(self.ptr)
    }
}

/// Device logits `[rows, vocab]` and their row count, when a pass asked for any.
type DeviceLogits = Option<(CudaSlice<f32>, usize)>;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A model's weights on a CUDA device, ready to run its family's forward pass (every family
/// swk knows).
pub struct CudaModel {
    pub(crate) dev: CudaDevice,
    pub(crate) config: ModelConfig,
    pub(crate) tensors: BTreeMap<String, DevTensor>,
    inv_freq: CudaSlice<f32>,
    /// RoPE pairs per head (`head_dim / 2` unless RoPE is partial).
    rot_half: usize,
    /// Gemma 3's RoPE frequencies of its sliding layers (local base, unscaled).
    inv_local: Option<CudaSlice<f32>>,
    /// The family's switches of the block.
    block: Block,
    /// Where each layer's spike keys lie in a pass's key buffer.
    pub(crate) key_layout: KeyLayout,
    /// DeepSeek's latent-attention rope.
    pub(crate) mla_rope: Option<MlaRope>,
    /// DeepSeek-V3's router selection biases per sparse layer, kept on the host, which
    /// routes (not uploaded: an edit of one is an error, never silently ignored).
    pub(crate) router_bias: BTreeMap<usize, Vec<f32>>,
    head: String,
    dtype: WeightDtype,
    gemm: GemmEngine,
    pub(crate) edit_scratch: CudaSlice<u32>,
    pub(crate) scratch: Mutex<Scratch>,
    pub(crate) stream: Option<Streamed>,
    pub(crate) graphs: bool,
    pub(crate) graph_cache: super::graph::GraphCache,
    pub(crate) graph_failure: Mutex<Option<String>>,
    id: u64,
}

/// Keys and values of past positions on the device, per layer `[capacity, n_kv * head_dim]`,
/// for one [`CudaModel`]. Grows (doubling, copying on the device) as positions are added.
pub struct CudaKvCache {
    layers: Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
    len: usize,
    capacity: usize,
    model_id: u64,
}

impl CudaKvCache {
    /// An empty cache for `model` (allocates on first use).
    pub fn new(model: &CudaModel) -> Self {
        CudaKvCache { layers: Vec::new(), len: 0, capacity: 0, model_id: model.id }
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Positions the cache holds without growing.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Forget every position (keeps the memory).
    pub fn clear(&mut self) {
        self.len = 0;
    }
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

/// Shapes of every tensor of a Llama with `c`'s shapes (no lm_head when tied).
fn plan_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>, bool)> {
    let h = c.hidden_size;
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h], true)];
    if c.architecture != Architecture::Olmo {
        // OLMo's final LayerNorm has no parameters.
        v.push(("model.norm.weight".to_string(), vec![h], false));
    }
    if matches!(c.architecture, Architecture::Gpt2 | Architecture::GptNeoX) {
        v.push(("model.norm.bias".to_string(), vec![h], false));
    }
    if c.architecture == Architecture::Gpt2 {
        let positions = vec![c.max_position_embeddings, h];
        v.push(("model.embed_positions.weight".to_string(), positions, false));
    }
    if !c.tie_word_embeddings {
        v.push(("lm_head.weight".to_string(), vec![c.vocab_size, h], true));
    }
    for l in 0..c.num_layers {
        for (suffix, shape, matrix) in layer_plan(c, l) {
            v.push((format!("model.layers.{l}.{suffix}"), shape, matrix));
        }
    }
    v
}

/// Device bytes the weights of `c` take in `dtype`.
pub(crate) fn weight_bytes(c: &ModelConfig, dtype: WeightDtype) -> usize {
    plan_shapes(c)
        .iter()
        .map(|(_, s, m)| s.iter().product::<usize>() * if *m { dtype.bytes() } else { 4 })
        .sum()
}

/// Device bytes of the tensors outside the layers (embedding, final norm, LM head).
fn resident_bytes(c: &ModelConfig, dtype: WeightDtype) -> usize {
    plan_shapes(c)
        .iter()
        .filter(|(n, _, _)| split_layer_name(n).is_none())
        .map(|(_, s, m)| s.iter().product::<usize>() * if *m { dtype.bytes() } else { 4 })
        .sum()
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

/// One host tensor on the device: matrices in `dtype`, everything else f32.
fn upload_tensor(
    dev: &CudaDevice,
    t: &crate::model::Tensor,
    matrix: bool,
    dtype: WeightDtype,
) -> Result<DevTensor> {
    let data = if matrix && dtype == WeightDtype::Bf16 {
        use rayon::prelude::*;
        let bits: Vec<u16> = t.data.par_iter().map(|&v| kernels::f32_to_bf16_bits(v)).collect();
        DevData::Bf16(dev.upload(&bits)?)
    } else {
        DevData::F32(dev.upload(&t.data)?)
    };
    Ok(DevTensor { shape: t.shape.clone(), data })
}

/// RoPE inverse frequencies over the rotated dims of a head (all of them unless RoPE is
/// partial), with the configured scaling and GGUF `rope_freqs` factors.
fn rope_inv_freq(c: &ModelConfig, freq_factors: Option<&[f32]>) -> Vec<f32> {
    let mut rc = c.clone();
    rc.head_dim = c.rotary_dim();
    llama::inv_freq(&rc, freq_factors)
}

fn check_engine(dev: &CudaDevice, dtype: WeightDtype, gemm: GemmEngine) -> Result<GemmEngine> {
    let gemm = match gemm {
        GemmEngine::Auto if dev.has_cublas() && dtype == WeightDtype::Bf16 => {
            GemmEngine::CublasSplit
        }
        GemmEngine::Auto if dev.has_cublas() => GemmEngine::Cublas,
        GemmEngine::Auto => GemmEngine::Kernels,
        g => g,
    };
    if matches!(gemm, GemmEngine::Cublas | GemmEngine::CublasBf16 | GemmEngine::CublasSplit)
        && !dev.has_cublas()
    {
        return Err(Error::Backend(format!(
            "GEMM engine `{}` needs cuBLAS, and libcublas.so could not be loaded (add its directory to \
             LD_LIBRARY_PATH, or use the `kernels` engine)",
            gemm.name()
        )));
    }
    if matches!(gemm, GemmEngine::CublasBf16 | GemmEngine::CublasSplit)
        && dtype != WeightDtype::Bf16
    {
        return Err(Error::Invalid(format!("GEMM engine `{}` needs bf16 weights", gemm.name())));
    }
    Ok(gemm)
}

impl CudaModel {
    /// Upload `model`'s weights to the device. Errors (never panics) when no CUDA device is
    /// usable, the model is not a supported architecture, or the weights do not fit.
    pub fn new(model: &Model, opts: &CudaOptions) -> Result<Self> {
        arch::validate(model)?;
        if !cuda_available() {
            // Let the device constructor say precisely why (no driver, no device).
            CudaDevice::new(opts.device)?;
            return Err(Error::Backend("no CUDA device is available".into()));
        }
        let dev = CudaDevice::new(opts.device)?;
        let gemm = check_engine(&dev, opts.dtype, opts.gemm)?;
        Self::check_memory(&dev, &model.config, opts.dtype)?;
        dev.bind()?;
        let mut tensors = BTreeMap::new();
        for (name, matrix) in upload_plan(model) {
            let t = model.weights.get(&name)?;
            tensors.insert(name, upload_tensor(&dev, t, matrix, opts.dtype)?);
        }
        let freqs = model.weights.get("rope_freqs.weight").ok().map(|t| t.data.as_slice());
        let inv = rope_inv_freq(&model.config, freqs);
        let head = if model.weights.contains("lm_head.weight") {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        };
        let mut m = Self::finish(dev, model.config.clone(), tensors, &inv, head, opts.dtype, gemm)?;
        let w = &model.weights;
        m.router_bias = router_biases(&model.config, |n| {
            w.contains(n).then(|| w.get(n).map(|t| t.data.clone())).transpose()
        })?;
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
        let layouts: Vec<SlotLayout> = (0..c.num_layers)
            .map(|l| SlotLayout::new(&c, l, opts.dtype == WeightDtype::Bf16))
            .collect();
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
        if !cuda_available() {
            CudaDevice::new(opts.device)?;
            return Err(Error::Backend("no CUDA device is available".into()));
        }
        let dev = CudaDevice::new(opts.device)?;
        let gemm = check_engine(&dev, opts.dtype, opts.gemm)?;
        let resident = lazy.materialize(|n| split_layer_name(n).is_none())?;
        let need = resident_bytes(&c, opts.dtype) + slot_bytes;
        check_fits(&dev, need, opts.dtype, "the resident weights and one streamed layer")?;
        dev.bind()?;
        let mut tensors = BTreeMap::new();
        for (name, matrix) in
            upload_plan(&resident).into_iter().filter(|(n, _)| split_layer_name(n).is_none())
        {
            let t = resident.weights.get(&name)?;
            tensors.insert(name, upload_tensor(&dev, t, matrix, opts.dtype)?);
        }
        let freqs = resident.weights.get("rope_freqs.weight").ok().map(|t| t.data.as_slice());
        let inv = rope_inv_freq(&c, freqs);
        let head = if resident.weights.contains("lm_head.weight") {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        };
        let slot = dev.alloc::<u8>(slot_bytes)?;
        let mut m = Self::finish(dev, c, tensors, &inv, head, opts.dtype, gemm)?;
        m.router_bias = router_biases(&m.config, |n| {
            lazy.contains(n).then(|| lazy.tensor(n).map(|t| t.data)).transpose()
        })?;
        m.stream =
            Some(Streamed { lazy, layouts, overlay: Overlay::default(), slot: Mutex::new(slot) });
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

    /// Whether the layers are streamed from the model's files ([`CudaModel::streamed`]).
    pub fn is_streamed(&self) -> bool {
        self.stream.is_some()
    }

    /// A Llama of `config`'s shapes with random weights generated on the device (linear
    /// weights and embeddings N(0, 0.02), norm weights 1 + N(0, 0.02), like
    /// `synth::random_llama` but from a device hash, so not the same bits): for timing runs
    /// at real model sizes without building the model in host memory.
    pub fn random(config: &ModelConfig, seed: u64, opts: &CudaOptions) -> Result<Self> {
        if !cuda_available() {
            CudaDevice::new(opts.device)?;
            return Err(Error::Backend("no CUDA device is available".into()));
        }
        let dev = CudaDevice::new(opts.device)?;
        let gemm = check_engine(&dev, opts.dtype, opts.gemm)?;
        Self::check_memory(&dev, config, opts.dtype)?;
        let mut tensors = BTreeMap::new();
        for (k, (name, shape, matrix)) in plan_shapes(config).into_iter().enumerate() {
            let n: usize = shape.iter().product();
            let norm = !matrix && name.contains("norm");
            let (mean, std) = if norm { (1.0, 0.02) } else { (0.0, 0.02) };
            let s = crate::synth::mix(seed, k as u64);
            let data = if matrix && opts.dtype == WeightDtype::Bf16 {
                let d = dev.alloc::<u16>(n)?;
                dev.fill_normal(dev.ptr(&d), true, n, s, mean, std)?;
                DevData::Bf16(d)
            } else {
                let d = dev.alloc::<f32>(n)?;
                dev.fill_normal(dev.ptr(&d), false, n, s, mean, std)?;
                DevData::F32(d)
            };
            tensors.insert(name, DevTensor { shape, data });
        }
        dev.synchronize()?;
        let inv = llama::inv_freq(config, None);
        let head =
            if config.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        Self::finish(dev, config.clone(), tensors, &inv, head, opts.dtype, gemm)
    }

    fn check_memory(dev: &CudaDevice, c: &ModelConfig, dtype: WeightDtype) -> Result<()> {
        check_fits(dev, weight_bytes(c, dtype), dtype, "the weights")
    }

    fn finish(
        dev: CudaDevice,
        config: ModelConfig,
        tensors: BTreeMap<String, DevTensor>,
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
        Ok(())
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

    /// A tensor's values as f32 on the host (bf16 widened exactly).
    pub fn download(&self, name: &str) -> Result<Vec<f32>> {
        self.dev.bind()?;
        let t = self.tensor(name)?;
        match &t.data {
            DevData::F32(d) => self.dev.download(d, 0, t.len()),
            DevData::Bf16(d) => Ok(self
                .dev
                .download(d, 0, t.len())?
                .into_iter()
                .map(|b| f32::from_bits(kernels::bf16_bits_to_f32_bits(b)))
                .collect()),
        }
    }

    pub(crate) fn tensor(&self, name: &str) -> Result<&DevTensor> {
        self.tensors.get(name).ok_or_else(|| {
            Error::tensor(name, "not on the device (the forward pass does not read it)")
        })
    }

    /// A resident tensor as the forward pass reads it.
    pub(crate) fn weight(&self, name: &str) -> Result<WeightRef> {
        let t = self.tensor(name)?;
        let (ptr, bf16) = match &t.data {
            DevData::F32(d) => (self.dev.ptr(d), false),
            DevData::Bf16(d) => (self.dev.ptr(d), true),
        };
        Ok(WeightRef { name: name.to_string(), shape: t.shape.clone(), ptr, bf16 })
    }

    /// Tensor `suffix` of layer `layer`: from the slot at `slot` when the layer is streamed
    /// in, else resident.
    fn layer_weight(&self, layer: usize, suffix: &str, slot: Option<u64>) -> Result<WeightRef> {
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
                    bf16: e.bf16,
                })
            }
            _ => self.weight(&name),
        }
    }

    /// y `[rows, n_out]` = x `[rows, n_in]` · Wᵀ with the configured engine.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn linear(
        &self,
        x: u64,
        w: &WeightRef,
        y: u64,
        rows: usize,
        n_in: usize,
        n_out: usize,
        sc: &mut Scratch,
    ) -> Result<()> {
        self.linear_from(x, None, w, y, rows, n_in, n_out, sc)
    }

    /// Several products of one input (q/k/v; gate/up): `outs` = (weight, y, n_out). With
    /// `cublas-split` the input is split into its bf16 terms once for all of them.
    pub(crate) fn linears(
        &self,
        x: u64,
        outs: &[(WeightRef, u64, usize)],
        rows: usize,
        n_in: usize,
        sc: &mut Scratch,
    ) -> Result<()> {
        let split = if self.gemm == GemmEngine::CublasSplit {
            let x16 = sc.x16(&self.dev, 2 * rows * n_in)?;
            self.dev.split_bf16(x, x16, rows * n_in)?;
            Some(x16)
        } else {
            None
        };
        for (w, y, n_out) in outs {
            self.linear_from(x, split, w, *y, rows, n_in, *n_out, sc)?;
        }
        Ok(())
    }

    /// [`Self::linear`], reusing `split` (x already split into bf16 hi/lo terms) when given.
    #[allow(clippy::too_many_arguments)]
    fn linear_from(
        &self,
        x: u64,
        split: Option<u64>,
        w: &WeightRef,
        y: u64,
        rows: usize,
        n_in: usize,
        n_out: usize,
        sc: &mut Scratch,
    ) -> Result<()> {
        if w.shape != [n_out, n_in] {
            return Err(Error::tensor(
                &w.name,
                format!("expected shape [{n_out}, {n_in}] on the device, found {:?}", w.shape),
            ));
        }
        match (w.bf16, self.gemm) {
            (bf16, GemmEngine::Kernels) => {
                self.dev.gemm_kernel(x, w.ptr, bf16, y, rows, n_out, n_in)
            }
            (false, _) => self.dev.sgemm(x, w.ptr, y, rows, n_out, n_in, n_out),
            (true, GemmEngine::CublasBf16) => {
                let x16 = sc.x16(&self.dev, rows * n_in)?;
                self.dev.f32_to_bf16(x, x16, rows * n_in)?;
                self.dev.gemm_bf16_inputs(x16, w.ptr, y, rows, n_out, n_in)
            }
            (true, GemmEngine::CublasSplit) => {
                let x16 = match split {
                    Some(x16) => x16,
                    None => {
                        let x16 = sc.x16(&self.dev, 2 * rows * n_in)?;
                        self.dev.split_bf16(x, x16, rows * n_in)?;
                        x16
                    }
                };
                let y2 = sc.y2(&self.dev, 2 * rows * n_out)?;
                self.dev.gemm_bf16_inputs(x16, w.ptr, y2, 2 * rows, n_out, n_in)?;
                self.dev.add_halves(y2, y, rows * n_out)
            }
            (true, _) => {
                // Widen a band of W's rows to f32, multiply into the matching band of y's columns.
                let wide = sc.wide(&self.dev, n_out, n_in)?;
                for (o0, oc) in kernels::widen_chunks(n_out, n_in, WIDEN_SCRATCH) {
                    self.dev.bf16_to_f32(w.ptr + (o0 * n_in * 2) as u64, wide, oc * n_in)?;
                    self.dev.sgemm(x, wide, y + (o0 * 4) as u64, rows, oc, n_in, n_out)?;
                }
                Ok(())
            }
        }
    }

    /// Run `tokens` (appended after what `cache` holds) through the model; returns logits
    /// `[rows, vocab]` for the rows `logits` asks for, as `Model::forward` does. With `stats`,
    /// every layer's down_proj input/output maxima of this pass are merged into it (same
    /// channels, positions and signed values as the CPU backend; values within float
    /// rounding).
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut CudaKvCache,
        stats: Option<&mut SpikeStats>,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        let Some((d, rows)) = self.run(tokens, cache, stats, logits)? else {
            return Ok(Vec::new());
        };
        self.dev.download(&d, 0, rows * self.config.vocab_size)
    }

    /// Convenience: logits of every position of `tokens`, from an empty cache.
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.forward(tokens, &mut CudaKvCache::new(self), None, Logits::All)
    }

    /// Sum of NLL over a fed sequence (every token after the first is scored), computed on
    /// the device from the logits, as `eval::ppl::score` does on the host. Appends `fed` to
    /// `cache`. Returns (nll sum, tokens scored).
    pub fn score(&self, fed: &[u32], cache: &mut CudaKvCache) -> Result<(f64, usize)> {
        if fed.len() < 2 {
            if !fed.is_empty() {
                self.run(fed, cache, None, Logits::None)?;
            }
            return Ok((0.0, 0));
        }
        let Some((logits, _)) = self.run(fed, cache, None, Logits::All)? else {
            return Ok((0.0, 0));
        };
        self.nll_of(&logits, fed)
    }

    /// NLL sum over `fed[1..]` given the logits of every position of `fed` (≥ 2 tokens).
    fn nll_of(&self, logits: &CudaSlice<f32>, fed: &[u32]) -> Result<(f64, usize)> {
        let n = fed.len() - 1;
        let targets = self.dev.upload(&fed[1..])?;
        let out = self.dev.alloc::<f64>(n)?;
        self.dev.nll(
            self.dev.ptr(logits),
            self.dev.ptr(&targets),
            self.dev.ptr(&out),
            n,
            self.config.vocab_size,
        )?;
        let nll = self.dev.download(&out, 0, n)?;
        Ok((nll.iter().sum(), n))
    }

    /// [`Self::score`] of each window from an empty cache, the windows going through each
    /// layer together ([`Self::run_many`]): a streamed model reads its layers once for all.
    fn score_many(&self, windows: &[&[u32]]) -> Result<Vec<(f64, usize)>> {
        let mut caches: Vec<CudaKvCache> = windows.iter().map(|_| CudaKvCache::new(self)).collect();
        let mut seqs: Vec<(&[u32], &mut CudaKvCache)> =
            windows.iter().copied().zip(caches.iter_mut()).collect();
        let outs = self.run_many(&mut seqs, None, Logits::All)?;
        windows
            .iter()
            .zip(outs)
            .map(|(fed, out)| match out {
                Some((logits, _)) if fed.len() >= 2 => self.nll_of(&logits, fed),
                _ => Ok((0.0, 0)),
            })
            .collect()
    }

    /// How many windows of up to `longest` tokens a streamed model scores together: as many
    /// as half the free device memory holds (KV cache, residual stream and logits of each).
    fn window_batch(&self, longest: usize) -> Result<usize> {
        let c = &self.config;
        let kvd = c.num_kv_heads * c.head_dim;
        let cap = longest.max(16).next_multiple_of(16);
        let per =
            4 * (2 * c.num_layers * cap * kvd + longest * c.hidden_size + longest * c.vocab_size);
        let (free, _) = self.dev.memory()?;
        Ok((free / 2 / per.max(1)).max(1))
    }

    /// Perplexity over `windows` (from `eval::ppl::windows`, which adds BOS per the model's
    /// tokenizer), as `eval::ppl::perplexity` computes it; `on_window(done, total)` after each.
    pub fn perplexity(
        &self,
        windows: &[Vec<u32>],
        context: usize,
        mut on_window: impl FnMut(usize, usize),
    ) -> Result<Perplexity> {
        let start = Instant::now();
        let (mut nll_sum, mut scored) = (0f64, 0usize);
        if self.is_streamed() {
            // Layer-major over batches of windows: one read of the layers per batch.
            let longest = windows.iter().map(Vec::len).max().unwrap_or(0);
            let batch = self.window_batch(longest)?;
            let mut done = 0;
            for group in windows.chunks(batch) {
                let refs: Vec<&[u32]> = group.iter().map(Vec::as_slice).collect();
                for (n, k) in self.score_many(&refs)? {
                    nll_sum += n;
                    scored += k;
                }
                done += group.len();
                on_window(done, windows.len());
            }
        } else {
            let mut cache = CudaKvCache::new(self);
            for (wi, fed) in windows.iter().enumerate() {
                if fed.len() >= 2 {
                    let graphed =
                        self.run_graph(fed, None, Logits::All, |logits| match logits {
                            Some(l) => self.nll_of(l, fed),
                            None => Err(Error::Backend("a scoring graph without logits".into())),
                        })?;
                    let (n, k) = match graphed {
                        Some(r) => r,
                        None => {
                            cache.clear();
                            self.score(fed, &mut cache)?
                        }
                    };
                    nll_sum += n;
                    scored += k;
                }
                on_window(wi + 1, windows.len());
            }
        }
        if scored == 0 {
            return Err(Error::Invalid("the text is too short to score any token".into()));
        }
        Ok(Perplexity {
            perplexity: (nll_sum / scored as f64).exp(),
            tokens_scored: scored,
            nll_sum,
            seconds: start.elapsed().as_secs_f64(),
            context,
            windows: windows.len(),
        })
    }

    /// Greedily extend `prompt` by up to `max_new` tokens, stopping after any of `stops`
    /// (as `eval::generate::greedy`, with the stop ids given by the caller).
    pub fn greedy(
        &self,
        prompt: &[u32],
        max_new: usize,
        stops: &[u32],
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        let mut cache = CudaKvCache::new(self);
        let mut out = Vec::new();
        let mut input = prompt.to_vec();
        for _ in 0..max_new {
            let logits = self.forward(&input, &mut cache, None, Logits::Last)?;
            let next = crate::eval::generate::argmax(&logits);
            out.push(next);
            on_token(next);
            if stops.contains(&next) {
                break;
            }
            input = vec![next];
        }
        Ok(out)
    }

    /// Make room for `needed` positions in `cache` (doubling, copying what it holds).
    pub(crate) fn reserve(&self, cache: &mut CudaKvCache, needed: usize) -> Result<()> {
        if needed <= cache.capacity && cache.layers.len() == self.config.num_layers {
            return Ok(());
        }
        let kvd = self.config.num_kv_heads * self.config.head_dim;
        let cap = needed.max(cache.capacity * 2).max(16).next_multiple_of(16);
        let mut layers = Vec::with_capacity(self.config.num_layers);
        for l in 0..self.config.num_layers {
            let mut k = self.dev.alloc::<f32>(cap * kvd)?;
            let mut v = self.dev.alloc::<f32>(cap * kvd)?;
            if let Some((ok, ov)) = cache.layers.get(l) {
                self.dev.copy(ok, &mut k, cache.len * kvd)?;
                self.dev.copy(ov, &mut v, cache.len * kvd)?;
            }
            layers.push((k, v));
        }
        cache.layers = layers;
        cache.capacity = cap;
        Ok(())
    }

    /// The forward pass; returns the device logits and their row count (None for
    /// `Logits::None` or no tokens).
    fn run(
        &self,
        tokens: &[u32],
        cache: &mut CudaKvCache,
        stats: Option<&mut SpikeStats>,
        logits: Logits,
    ) -> Result<DeviceLogits> {
        let mut out = self.run_many(&mut [(tokens, cache)], stats, logits)?;
        Ok(out.pop().flatten())
    }

    /// The forward pass of several sequences, each appended to its own cache, layer-major:
    /// every sequence goes through layer l before any goes through layer l + 1, so a streamed
    /// model reads its layers once for all of them. Per sequence, the same device logits as
    /// [`Self::run`] (None for `Logits::None` or no tokens). Spike statistics cover them all.
    fn run_many(
        &self,
        seqs: &mut [(&[u32], &mut CudaKvCache)],
        stats: Option<&mut SpikeStats>,
        logits: Logits,
    ) -> Result<Vec<DeviceLogits>> {
        let c = &self.config;
        for (tokens, cache) in seqs.iter() {
            self.check_tokens(tokens)?;
            if cache.model_id != self.id {
                return Err(Error::Invalid("this KV cache belongs to another CudaModel".into()));
            }
        }
        self.check_stats(stats.as_deref())?;
        let t_max = seqs.iter().map(|(tokens, _)| tokens.len()).max().unwrap_or(0);
        if t_max == 0 {
            return Ok(seqs.iter().map(|_| None).collect());
        }
        self.dev.bind()?;
        let dev = &self.dev;
        let h = c.hidden_size;

        // Per sequence: its residual stream x = E[tokens], and room in its cache.
        let mut xs = Vec::with_capacity(seqs.len());
        for (tokens, cache) in seqs.iter_mut() {
            let (t, pos0) = (tokens.len(), cache.len);
            u32::try_from(pos0 + t)
                .map_err(|_| Error::Invalid(format!("position {} is too large", pos0 + t)))?;
            self.reserve(cache, pos0 + t)?;
            let x = dev.alloc::<f32>(t * h)?;
            if t > 0 {
                let tok = dev.upload(tokens)?;
                self.embed_into(dev.ptr(&tok), dev.ptr(&x), t, pos0)?;
            }
            xs.push(x);
        }
        let acts = Acts::alloc(dev, c, t_max, stats.is_some())?;
        // The GEMM scratch persists across calls (one pass at a time: the device has one stream).
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let sc = &mut *guard;
        let passes: Vec<Pass<'_>> = seqs
            .iter()
            .zip(&xs)
            .map(|((tokens, cache), x)| Pass { t: tokens.len(), x: dev.ptr(x), cache })
            .collect();
        self.layers(&passes, &acts, sc)?;
        drop(passes);
        for (tokens, cache) in seqs.iter_mut() {
            cache.len += tokens.len();
        }
        if let Some(s) = stats {
            self.merge_keys(&acts, s, sc)?;
        }

        // Final norm and LM head, only for the rows asked for.
        let mut out = Vec::with_capacity(seqs.len());
        for ((tokens, _), x) in seqs.iter().zip(&xs) {
            let Some(rows) = logit_rows(logits, tokens.len()) else {
                out.push(None);
                continue;
            };
            let d = dev.alloc::<f32>(rows.len() * c.vocab_size)?;
            self.head_into(dev.ptr(x), rows.clone(), dev.ptr(&d), sc)?;
            out.push(Some((d, rows.len())));
        }
        if logits == Logits::None {
            dev.synchronize()?;
        }
        Ok(out)
    }

    /// Error for a token outside the vocabulary.
    pub(crate) fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let v = self.config.vocab_size;
        match tokens.iter().find(|&&t| t as usize >= v) {
            Some(&bad) => {
                Err(Error::Invalid(format!("token id {bad} is outside the vocabulary ({v})")))
            }
            None => Ok(()),
        }
    }

    /// Error for spike statistics sized for another model.
    pub(crate) fn check_stats(&self, stats: Option<&SpikeStats>) -> Result<()> {
        let c = &self.config;
        if let Some(s) = stats {
            if s.layers.len() != c.num_layers
                || s.layers.iter().any(|l| {
                    l.input.len() != c.intermediate_size || l.output.len() != c.hidden_size
                })
            {
                return Err(Error::Invalid("spike statistics sized for another model".into()));
            }
        }
        Ok(())
    }

    /// `rows` rows of x (at `x`, width hidden) through `norm` into `out`, its weight and bias
    /// addresses from `param("weight" | "bias")`; returns where the result is (`x` itself
    /// for [`Norm::Identity`]).
    fn norm_into(
        &self,
        norm: Norm,
        param: impl Fn(&str) -> Result<u64>,
        x: u64,
        out: u64,
        rows: usize,
    ) -> Result<u64> {
        let (h, eps) = (self.config.hidden_size, self.config.rms_norm_eps);
        match norm {
            Norm::Identity => return Ok(x),
            Norm::Rms { plus_one } => {
                self.dev.rmsnorm(x, param("weight")?, out, rows, h, eps, plus_one)?
            }
            Norm::Layer { affine: false } => self.dev.layernorm(x, 0, 0, out, rows, h, eps)?,
            Norm::Layer { affine: true } => {
                self.dev.layernorm(x, param("weight")?, param("bias")?, out, rows, h, eps)?
            }
        }
        Ok(out)
    }

    /// x `[t, hidden]` = E[tok] · scale (device token ids at `tok`, the first at position
    /// `pos0`), plus GPT-2's learned positions.
    pub(crate) fn embed_into(&self, tok: u64, x: u64, t: usize, pos0: usize) -> Result<()> {
        let c = &self.config;
        let emb = self.weight("model.embed_tokens.weight")?;
        let h = c.hidden_size;
        self.dev.embed(emb.ptr, emb.bf16, tok, x, t, h, self.block.embed_scale)?;
        if !self.block.positions {
            return Ok(());
        }
        // GPT-2's learned positions: x[t] += wpe[pos0 + t].
        if pos0 + t > c.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "GPT-2 has {} learned positions; {t} tokens after {pos0} do not fit",
                c.max_position_embeddings
            )));
        }
        let wpe = self.weight("model.embed_positions.weight")?.f32_ptr()?;
        self.dev.add_residual(x, wpe + (pos0 * h * 4) as u64, t, h, pos0, 0)
    }

    /// Every block on every pass, layer-major (see [`Self::run_many`]); spike keys into
    /// `acts.keys` when present. Each pass's cache must hold room for its tokens.
    pub(crate) fn layers(&self, passes: &[Pass<'_>], acts: &Acts, sc: &mut Scratch) -> Result<()> {
        let c = &self.config;
        let dev = &self.dev;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let (xnp, qp, attp, projp) =
            (dev.ptr(&acts.xn), dev.ptr(&acts.q), dev.ptr(&acts.att), dev.ptr(&acts.proj));
        let (gatep, upp, actp) = (dev.ptr(&acts.gate), dev.ptr(&acts.up), dev.ptr(&acts.act));
        // Spike keys: per layer [intermediate] inputs then [hidden] outputs (then a sparse
        // layer's experts': see KeyLayout).
        let keys_at = |l: usize, out: bool| -> u64 {
            let (ki, ko) = self.key_layout.dense(l);
            acts.keys.as_ref().map_or(0, |k| dev.ptr(k) + ((if out { ko } else { ki }) * 8) as u64)
        };
        let all_keys = acts.keys.as_ref().map_or(0, |k| dev.ptr(k));
        let inv_global = dev.ptr(&self.inv_freq);
        let inv_local = self.inv_local.as_ref().map(|b| dev.ptr(b));
        // The family's switches (see family.rs); p1: Gemma's `1 + w` RMSNorm weights.
        let b = &self.block;
        let p1 = b.norm == Norm::Rms { plus_one: true };

        // Streamed layers: a host thread reads and converts layer l + 1 from the model's
        // files while the device runs layer l; each is copied into the one device slot
        // (stream-ordered after the previous layer's kernels, so the slot is free by then).
        let mut slot =
            self.stream.as_ref().map(|st| st.slot.lock().unwrap_or_else(|p| p.into_inner()));
        std::thread::scope(|scope| -> Result<()> {
            let staged = self.stream.as_ref().map(|st| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<u8>>>(1);
                scope.spawn(move || {
                    for l in 0..c.num_layers {
                        let bytes = stage_layer(&st.lazy, l, &st.layouts[l], &st.overlay);
                        let failed = bytes.is_err();
                        if tx.send(bytes).is_err() || failed {
                            break;
                        }
                    }
                });
                rx
            });
            for l in 0..c.num_layers {
                let base = match (&staged, slot.as_deref_mut()) {
                    (Some(rx), Some(buf)) => {
                        let bytes = rx.recv().map_err(|_| {
                            Error::Backend(format!(
                                "the layer streaming thread stopped before layer {l}"
                            ))
                        })??;
                        dev.upload_into(&bytes, buf)?;
                        Some(dev.ptr(buf))
                    }
                    _ => None,
                };
                let w = |suffix: &str| self.layer_weight(l, suffix, base);
                for p in passes.iter().filter(|p| p.t > 0) {
                    let (t, pos0, xp) = (p.t, p.cache.len, p.x);
                    let (kc, vc) = &p.cache.layers[l];
                    let (kcp, vcp) = (dev.ptr(kc), dev.ptr(vc));
                    let (k_new, v_new) =
                        (kcp + (pos0 * kvd * 4) as u64, vcp + (pos0 * kvd * 4) as u64);

                    // What attention and the MLP read: x through the norm `name` (OLMo 2: x).
                    let pre_norm = |name: &str| -> Result<u64> {
                        let p = |kind: &str| w(&format!("{name}.{kind}"))?.f32_ptr();
                        self.norm_into(b.norm, p, xp, xnp, t)
                    };

                    // Attention: xn = rmsnorm(x); q, k, v = xn·Wᵀ (+b), k and v straight into
                    // the cache.
                    let a_in = pre_norm("input_layernorm")?;
                    if let Some(ml) = acts.mla.as_ref() {
                        // DeepSeek's latent attention (mla.rs), o_proj included, into proj.
                        let cache = [kcp, vcp, k_new, v_new];
                        self.mla_attention(
                            l,
                            &w,
                            a_in,
                            (t, pos0),
                            cache,
                            [qp, attp, projp],
                            ml,
                            sc,
                        )?;
                    } else {
                        let qkv =
                            [("q_proj", qp, qd), ("k_proj", k_new, kvd), ("v_proj", v_new, kvd)];
                        let outs = if b.fused_qkv {
                            let f = w("self_attn.qkv_proj.weight")?;
                            vec![
                                (f.rows(0, qd)?, qp, qd),
                                (f.rows(qd, kvd)?, k_new, kvd),
                                (f.rows(qd + kvd, kvd)?, v_new, kvd),
                            ]
                        } else {
                            qkv.iter()
                                .map(|&(n, out, width)| {
                                    Ok((w(&format!("self_attn.{n}.weight"))?, out, width))
                                })
                                .collect::<Result<Vec<_>>>()?
                        };
                        self.linears(a_in, &outs, t, h, sc)?;
                        if b.qkv_bias {
                            let fused_bias = if b.fused_qkv {
                                Some(w("self_attn.qkv_proj.bias")?)
                            } else {
                                None
                            };
                            let mut start = 0;
                            for (n, out, width) in qkv {
                                let bias = match &fused_bias {
                                    Some(b) => b.rows(start, width)?,
                                    None => w(&format!("self_attn.{n}.bias"))?,
                                };
                                dev.add_bias(out, bias.f32_ptr()?, t, width)?;
                                start += width;
                            }
                        }
                        // OLMo's clip_qkv: q, k, v clamped to [-clip, clip] (OLMoE: after QK-norm).
                        let clip = |after_norm: bool| -> Result<()> {
                            match b.clip_qkv {
                                Some(clip) if b.clip_after_qk_norm == after_norm => {
                                    dev.clamp(qp, t * qd, clip)?;
                                    dev.clamp(k_new, t * kvd, clip)?;
                                    dev.clamp(v_new, t * kvd, clip)
                                }
                                _ => Ok(()),
                            }
                        };
                        clip(false)?;
                        // QK-norm, in place: per row of whole q and k (OLMo 2) or per head (Qwen3,
                        // Gemma 3).
                        let qk_rows = match b.qk_norm {
                            QkNorm::None => None,
                            QkNorm::Whole => Some(((t, qd), (t, kvd))),
                            QkNorm::PerHead => Some(((t * nh, hd), (t * nkv, hd))),
                        };
                        if let Some(((qr, qw), (kr, kw))) = qk_rows {
                            let qn = w("self_attn.q_norm.weight")?.f32_ptr()?;
                            dev.rmsnorm(qp, qn, qp, qr, qw, c.rms_norm_eps, p1)?;
                            let kn = w("self_attn.k_norm.weight")?.f32_ptr()?;
                            dev.rmsnorm(k_new, kn, k_new, kr, kw, c.rms_norm_eps, p1)?;
                        }
                        clip(true)?;
                        // Gemma 3's sliding layers rotate with the local base.
                        let (window, scale) = (c.layer_window(l), c.attention_scale(l));
                        let inv = match (inv_local, window) {
                            (Some(local), Some(_)) => local,
                            _ => inv_global,
                        };
                        if b.rope {
                            dev.rope(qp, inv, t, nh, hd, self.rot_half, pos0)?;
                            dev.rope(k_new, inv, t, nkv, hd, self.rot_half, pos0)?;
                        }
                        dev.attention(
                            qp,
                            kcp,
                            vcp,
                            attp,
                            t,
                            pos0,
                            nh,
                            nkv,
                            hd,
                            window,
                            scale,
                            b.attn_softcap,
                        )?;
                        self.linear(attp, &w("self_attn.o_proj.weight")?, projp, t, qd, h, sc)?;
                    }
                    if b.o_bias {
                        dev.add_bias(projp, w("self_attn.o_proj.bias")?.f32_ptr()?, t, h)?;
                    }
                    if b.post_norms {
                        let norm = w("post_attention_layernorm.weight")?.f32_ptr()?;
                        dev.rmsnorm(projp, norm, projp, t, h, c.rms_norm_eps, p1)?;
                    }
                    // GPT-NeoX's parallel residual: the MLP reads the block input.
                    let parallel_in = if b.parallel { Some(pre_norm(b.mlp_norm)?) } else { None };
                    dev.add_residual(xp, projp, t, h, pos0, 0)?;

                    // MLP: a = act(m·W_gateᵀ) ⊙ (m·W_upᵀ) (un-gated: act(m·W_upᵀ + b)) on m the
                    // pre-norm of x; x += a·W_downᵀ (+b), with the spike statistics fused into
                    // act_mul (inputs) and the add (outputs).
                    let m_in = match parallel_in {
                        Some(m) => m,
                        None => pre_norm(b.mlp_norm)?,
                    };
                    if let Some(ma) = acts.moe.as_ref().filter(|_| self.key_layout.is_sparse(l)) {
                        // A mixture of experts: x += Σ_e w_e · expert_e(m) (+ shared expert).
                        self.sparse_mlp(l, &w, m_in, (t, pos0), ma, all_keys, sc)?;
                        dev.add_residual(xp, dev.ptr(&ma.out), t, h, pos0, keys_at(l, true))?;
                        continue;
                    }
                    if !b.gated {
                        // GPT-2, GPT-NeoX: a = act(m·W_upᵀ + b); x += a·W_downᵀ + b.
                        self.linear(m_in, &w("mlp.up_proj.weight")?, upp, t, h, i, sc)?;
                        dev.add_bias(upp, w("mlp.up_proj.bias")?.f32_ptr()?, t, i)?;
                        dev.act_mul(0, upp, actp, t, i, (pos0, 0), keys_at(l, false), b.act)?;
                        self.linear(actp, &w("mlp.down_proj.weight")?, projp, t, i, h, sc)?;
                        dev.add_bias(projp, w("mlp.down_proj.bias")?.f32_ptr()?, t, h)?;
                        dev.add_residual(xp, projp, t, h, pos0, keys_at(l, true))?;
                        continue;
                    }
                    let outs = if b.fused_gate_up {
                        let f = w("mlp.gate_up_proj.weight")?;
                        [(f.rows(0, i)?, gatep, i), (f.rows(i, i)?, upp, i)]
                    } else {
                        [(w("mlp.gate_proj.weight")?, gatep, i), (w("mlp.up_proj.weight")?, upp, i)]
                    };
                    self.linears(m_in, &outs, t, h, sc)?;
                    dev.act_mul(gatep, upp, actp, t, i, (pos0, 0), keys_at(l, false), b.act)?;
                    self.linear(actp, &w("mlp.down_proj.weight")?, projp, t, i, h, sc)?;
                    if b.post_norms {
                        // The output statistic is what the MLP writes: after this norm.
                        let norm = w("post_feedforward_layernorm.weight")?.f32_ptr()?;
                        dev.rmsnorm(projp, norm, projp, t, h, c.rms_norm_eps, p1)?;
                    }
                    dev.add_residual(xp, projp, t, h, pos0, keys_at(l, true))?;
                }
            }
            Ok(())
        })
    }

    /// Download the spike keys of a pass (pinned) and merge them, and a mixture of experts'
    /// router counters, into `stats`.
    pub(crate) fn merge_keys(
        &self,
        acts: &Acts,
        stats: &mut SpikeStats,
        sc: &mut Scratch,
    ) -> Result<()> {
        let Some(k) = acts.keys.as_ref() else { return Ok(()) };
        let n = self.key_layout.total;
        if sc.keys.as_ref().is_none_or(|p| p.len() < n) {
            sc.keys = Some(self.dev.pinned::<u64>(n)?);
        }
        let pinned = sc.keys.as_mut().ok_or_else(|| Error::Backend("no key buffer".into()))?;
        let host = self.dev.download_pinned(k, n, pinned)?;
        let tally = acts.moe.as_ref().and_then(|m| m.tally.as_ref());
        let tally = tally.map(|t| t.lock().unwrap_or_else(|p| p.into_inner()));
        self.key_layout.merge(host, tally.as_deref().map_or(&[], Vec::as_slice), &mut stats.layers);
        Ok(())
    }

    /// Logits of residual rows `rows` of x (at `x`): final norm, LM head, into `out`.
    pub(crate) fn head_into(
        &self,
        x: u64,
        rows: std::ops::Range<usize>,
        out: u64,
        sc: &mut Scratch,
    ) -> Result<()> {
        let c = &self.config;
        let (h, n) = (c.hidden_size, rows.len());
        let xf = sc.xf(&self.dev, n * h)?;
        let first = x + (rows.start * h * 4) as u64;
        let p = |kind: &str| self.weight(&format!("model.norm.{kind}"))?.f32_ptr();
        let xf = self.norm_into(self.block.final_norm, p, first, xf, n)?;
        self.linear(xf, &self.weight(&self.head)?, out, n, h, c.vocab_size, sc)?;
        match self.block.final_softcap {
            Some(cap) => self.dev.softcap(out, n * c.vocab_size, cap),
            None => Ok(()),
        }
    }
}

/// One sequence of a pass: its new tokens' count, its residual stream (device address,
/// `[t, hidden]`), its cache (positions `cache.len..` are written).
pub(crate) struct Pass<'a> {
    pub(crate) t: usize,
    pub(crate) x: u64,
    pub(crate) cache: &'a CudaKvCache,
}

/// Activation buffers of a pass, sized for its longest sequence, and its spike keys.
pub(crate) struct Acts {
    xn: CudaSlice<f32>,
    q: CudaSlice<f32>,
    att: CudaSlice<f32>,
    proj: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    act: CudaSlice<f32>,
    pub(crate) keys: Option<CudaSlice<u64>>,
    /// The sparse layers' buffers (mixtures of experts).
    pub(crate) moe: Option<MoeActs>,
    /// Latent attention's buffers (DeepSeek).
    pub(crate) mla: Option<MlaActs>,
}

impl Acts {
    /// Buffers for up to `t` tokens; zeroed spike keys when `stats`.
    pub(crate) fn alloc(dev: &CudaDevice, c: &ModelConfig, t: usize, stats: bool) -> Result<Self> {
        let (h, i, qd) = (c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim);
        Ok(Acts {
            xn: dev.alloc::<f32>(t * h)?,
            q: dev.alloc::<f32>(t * qd)?,
            att: dev.alloc::<f32>(t * qd)?,
            proj: dev.alloc::<f32>(t * h)?,
            gate: dev.alloc::<f32>(t * i)?,
            up: dev.alloc::<f32>(t * i)?,
            act: dev.alloc::<f32>(t * i)?,
            keys: if stats { Some(dev.zeros::<u64>(KeyLayout::of(c).total)?) } else { None },
            moe: match &c.family.moe {
                Some(m) => Some(MoeActs::alloc(dev, c, m, t, stats)?),
                None => None,
            },
            mla: match &c.family.deepseek {
                Some(d) => Some(MlaActs::alloc(dev, c, d, t)?),
                None => None,
            },
        })
    }
}

/// The residual rows `logits` asks for out of `t` (None: no logits).
pub(crate) fn logit_rows(logits: Logits, t: usize) -> Option<std::ops::Range<usize>> {
    match logits {
        _ if t == 0 => None,
        Logits::None => None,
        Logits::All => Some(0..t),
        Logits::Last => Some(t - 1..t),
    }
}

/// Scratch buffers of the GEMM paths, allocated on first use and kept by the model.
#[derive(Default)]
pub(crate) struct Scratch {
    wide: Option<CudaSlice<f32>>,
    xf: Option<CudaSlice<f32>>,
    x16: Option<CudaSlice<u16>>,
    y2: Option<CudaSlice<f32>>,
    keys: Option<PinnedHostSlice<u64>>,
}

impl Scratch {
    /// The f32 widening scratch for a `[n_out, n_in]` weight: at most [`WIDEN_SCRATCH`]
    /// elements (fewer for small weights), but always at least one row.
    fn wide(&mut self, dev: &CudaDevice, n_out: usize, n_in: usize) -> Result<u64> {
        let want = (n_out * n_in).min(WIDEN_SCRATCH).max(n_in);
        if self.wide.as_ref().is_none_or(|b| b.len() < want) {
            self.wide =
                Some(dev.alloc::<f32>(want.max(self.wide.as_ref().map_or(0, |b| b.len())))?);
        }
        Ok(self.wide.as_ref().map_or(0, |b| dev.ptr(b)))
    }
    /// The final-norm output of at least `want` elements.
    fn xf(&mut self, dev: &CudaDevice, want: usize) -> Result<u64> {
        if self.xf.as_ref().is_none_or(|b| b.len() < want) {
            self.xf = Some(dev.alloc::<f32>(want)?);
        }
        Ok(self.xf.as_ref().map_or(0, |b| dev.ptr(b)))
    }
    /// The stacked two-term product scratch of at least `want` elements.
    fn y2(&mut self, dev: &CudaDevice, want: usize) -> Result<u64> {
        if self.y2.as_ref().is_none_or(|b| b.len() < want) {
            self.y2 = Some(dev.alloc::<f32>(want)?);
        }
        Ok(self.y2.as_ref().map_or(0, |b| dev.ptr(b)))
    }
    /// The bf16 activation scratch of at least `want` elements.
    fn x16(&mut self, dev: &CudaDevice, want: usize) -> Result<u64> {
        if self.x16.as_ref().is_none_or(|b| b.len() < want) {
            self.x16 = Some(dev.alloc::<u16>(want)?);
        }
        Ok(self.x16.as_ref().map_or(0, |b| dev.ptr(b)))
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
        for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
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
