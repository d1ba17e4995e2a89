//! The host side of layer streaming, for backends whose memory cannot hold every layer at
//! once (the CUDA backend's streamed mode): which tensors a Llama-family layer has
//! ([`layer_plan`]), where each lies in one device slot ([`SlotLayout`]), the weight edits
//! that must survive every re-upload ([`Overlay`]), and one layer's bytes ready to copy
//! ([`stage_layer`]), read from a [`LazyModel`]'s mapped files: copied as they are when the
//! file stores a tensor in the slot's dtype, else converted from f32.
//!
//! Everything here is plain host code, tested without a GPU.

use std::collections::BTreeMap;
use std::ops::Range;

use rayon::prelude::*;

use super::WeightDtype;
use crate::io::quant;
use crate::io::safetensors::Fp8Tensor;
use crate::model::config::{DeepseekParams, MoeParams};
use crate::model::{Architecture, LazyModel, ModelConfig};
use crate::{Error, Result};

/// Byte alignment of each tensor inside a slot (cuBLAS and vector loads want 256).
pub const SLOT_ALIGN: usize = 256;

/// The tensors of layer `l` of a family the CUDA backend runs (Llama, Mistral, Qwen2, Qwen3,
/// Phi-3, OLMo, OLMo 2, Gemma, Gemma 2, Gemma 3, GPT-2, GPT-NeoX, and the mixtures of experts
/// Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE): (name after `model.layers.{l}.`, HF shape, whether
/// it is a matrix stored in the weight dtype; norms, biases, routers and the shared-expert
/// gate stay f32). Only the MLP of a mixture of experts depends on `l` (its dense layers).
pub fn layer_plan(c: &ModelConfig, l: usize) -> Vec<(String, Vec<usize>, bool)> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    if let Some(d) = &c.family.deepseek {
        return deepseek_plan(c, d, l);
    }
    let mut v = match c.architecture {
        // OLMo's LayerNorms have no parameters.
        Architecture::Olmo => vec![],
        // OLMo 2 norms what attention and the MLP produce, and q and k whole.
        Architecture::Olmo2 => vec![
            ("post_attention_layernorm.weight".to_string(), vec![h], false),
            ("post_feedforward_layernorm.weight".to_string(), vec![h], false),
            ("self_attn.q_norm.weight".to_string(), vec![qd], false),
            ("self_attn.k_norm.weight".to_string(), vec![kvd], false),
        ],
        _ => vec![
            ("input_layernorm.weight".to_string(), vec![h], false),
            ("post_attention_layernorm.weight".to_string(), vec![h], false),
        ],
    };
    if matches!(c.architecture, Architecture::Gemma2 | Architecture::Gemma3) {
        // Gemma 2/3: post_attention_layernorm norms attention's output; these the MLP's.
        v.push(("pre_feedforward_layernorm.weight".to_string(), vec![h], false));
        v.push(("post_feedforward_layernorm.weight".to_string(), vec![h], false));
    }
    if matches!(c.architecture, Architecture::Gpt2 | Architecture::GptNeoX) {
        // LayerNorms with biases, fused q/k/v, an un-gated MLP with biases.
        let mut v = Vec::new();
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            v.push((format!("{norm}.weight"), vec![h], false));
            v.push((format!("{norm}.bias"), vec![h], false));
        }
        v.push(("self_attn.qkv_proj.weight".to_string(), vec![qd + 2 * kvd, h], true));
        if has_qkv_bias(c) {
            v.push(("self_attn.qkv_proj.bias".to_string(), vec![qd + 2 * kvd], false));
        }
        v.push(("self_attn.o_proj.weight".to_string(), vec![h, qd], true));
        if has_o_proj_bias(c) {
            v.push(("self_attn.o_proj.bias".to_string(), vec![h], false));
        }
        v.push(("mlp.up_proj.weight".to_string(), vec![i, h], true));
        v.push(("mlp.up_proj.bias".to_string(), vec![i], false));
        v.push(("mlp.down_proj.weight".to_string(), vec![h, i], true));
        v.push(("mlp.down_proj.bias".to_string(), vec![h], false));
        return v;
    }
    if c.architecture == Architecture::Phi3 {
        // Fused projections (no biases on Phi-3).
        v.push(("self_attn.qkv_proj.weight".to_string(), vec![qd + 2 * kvd, h], true));
        v.push(("self_attn.o_proj.weight".to_string(), vec![h, qd], true));
        v.push(("mlp.gate_up_proj.weight".to_string(), vec![2 * i, h], true));
        v.push(("mlp.down_proj.weight".to_string(), vec![h, i], true));
        return v;
    }
    v.push(("self_attn.q_proj.weight".to_string(), vec![qd, h], true));
    v.push(("self_attn.k_proj.weight".to_string(), vec![kvd, h], true));
    v.push(("self_attn.v_proj.weight".to_string(), vec![kvd, h], true));
    if has_qkv_bias(c) {
        v.push(("self_attn.q_proj.bias".to_string(), vec![qd], false));
        v.push(("self_attn.k_proj.bias".to_string(), vec![kvd], false));
        v.push(("self_attn.v_proj.bias".to_string(), vec![kvd], false));
    }
    match c.architecture {
        Architecture::Qwen3 | Architecture::Gemma3 | Architecture::Qwen3Moe => {
            v.push(("self_attn.q_norm.weight".to_string(), vec![c.head_dim], false));
            v.push(("self_attn.k_norm.weight".to_string(), vec![c.head_dim], false));
        }
        Architecture::Olmoe => {
            v.push(("self_attn.q_norm.weight".to_string(), vec![qd], false));
            v.push(("self_attn.k_norm.weight".to_string(), vec![kvd], false));
        }
        _ => {}
    }
    v.push(("self_attn.o_proj.weight".to_string(), vec![h, qd], true));
    if has_o_proj_bias(c) {
        v.push(("self_attn.o_proj.bias".to_string(), vec![h], false));
    }
    match c.family.moe.as_ref().filter(|m| m.is_sparse(l)) {
        Some(moe) => v.extend(sparse_mlp_plan(moe, h, false)),
        None => {
            v.push(("mlp.gate_proj.weight".to_string(), vec![i, h], true));
            v.push(("mlp.up_proj.weight".to_string(), vec![i, h], true));
            v.push(("mlp.down_proj.weight".to_string(), vec![h, i], true));
        }
    }
    v
}

/// The MLP tensors of a sparse layer (names as `model::arch::moe` holds them): the router,
/// the shared expert: Qwen2-MoE's `shared_expert` and its gate, DeepSeek's `shared_experts`
/// (`deepseek`), then every routed expert's gate/up/down, last, so that the routed experts
/// follow the rest of the layer in its slot, each in one contiguous range
/// ([`SlotLayout::expert_range`]). DeepSeek-V3's selection bias stays on the host, which
/// routes.
fn sparse_mlp_plan(moe: &MoeParams, h: usize, deepseek: bool) -> Vec<(String, Vec<usize>, bool)> {
    let ei = moe.expert_intermediate;
    let mut v = vec![("mlp.gate.weight".to_string(), vec![moe.num_experts, h], false)];
    if let Some(si) = moe.shared_expert_intermediate {
        let p = if deepseek { "mlp.shared_experts" } else { "mlp.shared_expert" };
        v.push((format!("{p}.gate_proj.weight"), vec![si, h], true));
        v.push((format!("{p}.up_proj.weight"), vec![si, h], true));
        v.push((format!("{p}.down_proj.weight"), vec![h, si], true));
        if !deepseek {
            v.push(("mlp.shared_expert_gate.weight".to_string(), vec![1, h], false));
        }
    }
    for e in 0..moe.num_experts {
        let p = format!("{ROUTED}{e}");
        v.push((format!("{p}.gate_proj.weight"), vec![ei, h], true));
        v.push((format!("{p}.up_proj.weight"), vec![ei, h], true));
        v.push((format!("{p}.down_proj.weight"), vec![h, ei], true));
    }
    v
}

/// The name prefix (after `model.layers.{l}.`) of a routed expert's tensors.
const ROUTED: &str = "mlp.experts.";

/// Layer `l` of DeepSeek-V2/V3: latent attention (`q_a_proj`, `q_a_layernorm`, `q_b_proj`, or
/// `q_proj`; `kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`; `o_proj`) and a dense or
/// sparse MLP.
fn deepseek_plan(c: &ModelConfig, d: &DeepseekParams, l: usize) -> Vec<(String, Vec<usize>, bool)> {
    let (h, i, nh) = (c.hidden_size, c.intermediate_size, c.num_heads);
    let (nope, rd, vd, kvr) =
        (d.qk_nope_head_dim, d.qk_rope_head_dim, d.v_head_dim, d.kv_lora_rank);
    let a = |n: &str| format!("self_attn.{n}.weight");
    let mut v = vec![
        ("input_layernorm.weight".to_string(), vec![h], false),
        ("post_attention_layernorm.weight".to_string(), vec![h], false),
    ];
    match d.q_lora_rank {
        Some(r) => {
            v.push((a("q_a_proj"), vec![r, h], true));
            v.push((a("q_a_layernorm"), vec![r], false));
            v.push((a("q_b_proj"), vec![nh * (nope + rd), r], true));
        }
        None => v.push((a("q_proj"), vec![nh * (nope + rd), h], true)),
    }
    v.push((a("kv_a_proj_with_mqa"), vec![kvr + rd, h], true));
    v.push((a("kv_a_layernorm"), vec![kvr], false));
    v.push((a("kv_b_proj"), vec![nh * (nope + vd), kvr], true));
    v.push((a("o_proj"), vec![h, nh * vd], true));
    match c.family.moe.as_ref().filter(|m| m.is_sparse(l)) {
        Some(moe) => v.extend(sparse_mlp_plan(moe, h, true)),
        None => {
            v.push(("mlp.gate_proj.weight".to_string(), vec![i, h], true));
            v.push(("mlp.up_proj.weight".to_string(), vec![i, h], true));
            v.push(("mlp.down_proj.weight".to_string(), vec![h, i], true));
        }
    }
    v
}

/// Whether q, k and v have biases ([`ModelConfig::has_qkv_bias`]).
pub fn has_qkv_bias(c: &ModelConfig) -> bool {
    c.has_qkv_bias()
}

/// Whether `o_proj` has a bias ([`ModelConfig::has_o_proj_bias`]).
pub fn has_o_proj_bias(c: &ModelConfig) -> bool {
    c.has_o_proj_bias()
}

/// One tensor's place in a slot.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotEntry {
    /// Name after `model.layers.{l}.`.
    pub suffix: String,
    /// HF shape.
    pub shape: Vec<usize>,
    /// How it is stored: f32 for vectors, the model's weight dtype for matrices.
    pub dtype: WeightDtype,
    /// Byte offset in the slot (a multiple of [`SLOT_ALIGN`]).
    pub offset: usize,
}

impl SlotEntry {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes it takes in the slot (without padding).
    pub fn bytes(&self) -> usize {
        self.len() * self.dtype.bytes()
    }
}

/// Where every tensor of a layer lies in one contiguous device buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotLayout {
    /// The tensors, in [`layer_plan`] order, at increasing offsets.
    pub entries: Vec<SlotEntry>,
    /// Total bytes of the slot.
    pub bytes: usize,
}

impl SlotLayout {
    /// The layout of `c`'s layer `l` with matrices stored as `dtype` (vectors in f32).
    pub fn new(c: &ModelConfig, l: usize, dtype: WeightDtype) -> Self {
        let mut offset = 0;
        let entries = layer_plan(c, l)
            .into_iter()
            .map(|(suffix, shape, matrix)| {
                let dtype = if matrix { dtype } else { WeightDtype::F32 };
                let e = SlotEntry { suffix, shape, dtype, offset };
                offset = (offset + e.bytes()).next_multiple_of(SLOT_ALIGN);
                e
            })
            .collect();
        SlotLayout { entries, bytes: offset }
    }
    /// The entry of a name after `model.layers.{l}.`.
    pub fn entry(&self, suffix: &str) -> Option<&SlotEntry> {
        self.entries.iter().find(|e| e.suffix == suffix)
    }

    /// Index of the first routed expert's entry ([`Self::entries`]'s length in a dense
    /// layer): the routed experts' tensors come last, three (gate, up, down) per expert.
    pub fn first_expert_entry(&self) -> usize {
        self.entries.iter().position(|e| e.suffix.starts_with(ROUTED)).unwrap_or(self.entries.len())
    }

    /// How many routed experts the layer holds (0 in a dense layer).
    pub fn experts(&self) -> usize {
        (self.entries.len() - self.first_expert_entry()) / 3
    }

    /// The entries of `part` (a range of [`Self::entries`]); None for an expert the layer
    /// does not have.
    pub fn part_entries(&self, part: LayerPart) -> Option<Range<usize>> {
        let first = self.first_expert_entry();
        match part {
            LayerPart::Whole => Some(0..self.entries.len()),
            LayerPart::Base => Some(0..first),
            LayerPart::Expert(e) if e < self.experts() => Some(first + 3 * e..first + 3 * e + 3),
            LayerPart::Expert(_) => None,
        }
    }

    /// The bytes of the slot that `part` fills: from its first tensor to the next part's
    /// first (the whole slot for [`LayerPart::Whole`]); None for an expert the layer does not
    /// have.
    pub fn part_range(&self, part: LayerPart) -> Option<Range<usize>> {
        let entries = self.part_entries(part)?;
        let at = |k: usize| self.entries.get(k).map_or(self.bytes, |e| e.offset);
        Some(at(entries.start)..at(entries.end))
    }
}

/// A part of a layer that can be staged alone: a streamed mixture of experts reads its
/// routed experts only once routing has chosen them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerPart {
    /// Every tensor of the layer.
    Whole,
    /// Everything but the routed experts (attention, norms, router, shared expert).
    Base,
    /// Routed expert `e`'s gate, up and down weights.
    Expert(usize),
}

/// Split `model.layers.{l}.{suffix}` into `(l, suffix)`.
pub fn split_layer_name(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (l, suffix) = rest.split_once('.')?;
    Some((l.parse().ok()?, suffix))
}

/// Weight edits of a streamed model, kept on the host and applied to every upload of their
/// layer. Values are the stored element bits as f32 bits (bf16 storage: widened bf16 bits,
/// exact). An entry written back to its original bits is dropped, so a restored model has an
/// empty overlay: [`Overlay::digest`] then equals that of a model never edited.
#[derive(Debug, Default, Clone)]
pub struct Overlay {
    /// (tensor, flat index) → (stored bits, original bits).
    edits: BTreeMap<(String, usize), (u32, u32)>,
}

impl Overlay {
    /// The stored bits of an element, if edited.
    pub fn get(&self, tensor: &str, flat: usize) -> Option<u32> {
        self.edits.get(&(tensor.to_string(), flat)).map(|&(b, _)| b)
    }
    /// Record that an element now holds `bits`; `original` gives the unedited bits (asked
    /// only on an element's first edit).
    pub fn set(
        &mut self,
        tensor: &str,
        flat: usize,
        bits: u32,
        original: impl FnOnce() -> Result<u32>,
    ) -> Result<()> {
        let key = (tensor.to_string(), flat);
        let orig = match self.edits.get(&key) {
            Some(&(_, o)) => o,
            None => original()?,
        };
        if bits == orig {
            self.edits.remove(&key);
        } else {
            self.edits.insert(key, (bits, orig));
        }
        Ok(())
    }
    /// Whether no element differs from the model's files.
    pub fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }
    /// Number of edited elements.
    pub fn len(&self) -> usize {
        self.edits.len()
    }
    /// The edits of `tensor`: (flat index, stored bits as f32 bits), by index.
    fn edits_of<'a>(&'a self, tensor: &'a str) -> impl Iterator<Item = (usize, u32)> + 'a {
        self.edits
            .range((tensor.to_string(), 0)..)
            .take_while(move |((name, _), _)| name == tensor)
            .map(|((_, flat), &(bits, _))| (*flat, bits))
    }

    /// Write the edits of `tensor` into its values (f32, the tensor's flat layout).
    pub fn apply(&self, tensor: &str, data: &mut [f32]) -> Result<()> {
        for (flat, bits) in self.edits_of(tensor) {
            let v = data.get_mut(flat).ok_or_else(|| out_of_range(tensor, flat))?;
            *v = f32::from_bits(bits);
        }
        Ok(())
    }

    /// Write the edits of `tensor` into its stored bytes (`dtype`, little-endian, the
    /// tensor's flat layout).
    pub fn apply_stored(&self, tensor: &str, dtype: WeightDtype, bytes: &mut [u8]) -> Result<()> {
        let width = dtype.bytes();
        for (flat, bits) in self.edits_of(tensor) {
            let raw = dtype.encode_or_err(f32::from_bits(bits), tensor)?.to_le_bytes();
            let at = flat.checked_mul(width).and_then(|a| bytes.get_mut(a..a + width));
            at.ok_or_else(|| out_of_range(tensor, flat))?.copy_from_slice(&raw[..width]);
        }
        Ok(())
    }
    /// A checksum of the edits (FNV-1a over names, indices and bits); 0 when empty.
    pub fn digest(&self) -> u64 {
        if self.is_empty() {
            return 0;
        }
        self.edits.iter().fold(0xcbf2_9ce4_8422_2325, |h, ((name, flat), (bits, _))| {
            let h = crate::model::weights::fnv1a(h, name.as_bytes());
            let h = crate::model::weights::fnv1a(h, &(*flat as u64).to_le_bytes());
            crate::model::weights::fnv1a(h, &bits.to_le_bytes())
        })
    }
}

/// FP8 weight `q` (tensor `name`) into `dst` as `dtype`: each value's bits are those of
/// encoding its f32 value `e4m3(code) · scale`, as converting [`LazyModel::tensor`] gives.
/// Per block of rows, the 256 codes' encodings under each column block's scale are worked out
/// once, so a value costs one table lookup. Errors name the tensor for a value `dtype` cannot
/// hold (f16 past its range) or sizes that do not match.
fn stage_fp8(q: &Fp8Tensor<'_>, dtype: WeightDtype, dst: &mut [u8], name: &str) -> Result<()> {
    let ([br, bc], (rows, cols), width) = (q.block, (q.rows, q.cols), dtype.bytes());
    let sc = cols.div_ceil(bc.max(1));
    let sizes_match = br > 0
        && bc > 0
        && q.q.len() == rows * cols
        && dst.len() == rows * cols * width
        && q.scales.len() == rows.div_ceil(br) * sc;
    if !sizes_match || cols == 0 {
        return Err(Error::tensor(name, "FP8 codes, scales and slot sizes do not match"));
    }
    let value = |code: u8, s: f32| quant::e4m3_to_f32(code) * s;
    let blocks = dst.par_chunks_mut(br * cols * width).zip(q.q.par_chunks(br * cols));
    blocks.zip(q.scales.par_chunks(sc)).try_for_each(|((out, codes), scales)| {
        // Each column block's table: the encoded bits of the 256 codes, None where `dtype`
        // cannot hold the value.
        let tables: Vec<[Option<u32>; 256]> = scales
            .iter()
            .map(|&s| std::array::from_fn(|c| dtype.encode_or_err(value(c as u8, s), name).ok()))
            .collect();
        for (out, codes) in out.chunks_mut(cols * width).zip(codes.chunks(cols)) {
            // The row's runs within each column block, with the block's table and scale.
            let runs = out.chunks_mut(bc * width).zip(codes.chunks(bc));
            for ((out, codes), (table, &s)) in runs.zip(tables.iter().zip(scales)) {
                for (o, &code) in out.chunks_exact_mut(width).zip(codes) {
                    let Some(bits) = table[code as usize] else {
                        let v = value(code, s);
                        dtype.encode_or_err(v, name)?;
                        return Err(Error::tensor(name, format!("{v} cannot be stored")));
                    };
                    o.copy_from_slice(&bits.to_le_bytes()[..width]);
                }
            }
        }
        Ok(())
    })
}

/// The error of a tensor whose shape is not the one its slot entry expects.
fn shape_error(name: &str, expected: &[usize], found: &[usize]) -> Error {
    Error::tensor(name, format!("expected shape {expected:?}, found {found:?}"))
}

/// The error of an edit past the end of its tensor.
fn out_of_range(tensor: &str, flat: usize) -> Error {
    Error::tensor(tensor, format!("edited element {flat} is out of range"))
}

/// One layer, or part of one, staged for upload: its slot bytes, and how they were made.
#[derive(Debug)]
pub struct StagedLayer {
    /// Where [`Self::bytes`] go in the slot (0 for a whole layer).
    pub offset: usize,
    /// The slot's bytes from `offset` on ([`SlotLayout::part_range`]).
    pub bytes: Vec<u8>,
    /// Tensors copied as their file stores them (a safetensors checkpoint whose dtype is the
    /// slot's): no conversion through f32.
    pub copied: usize,
    /// Tensors converted to the slot's dtype: read as f32 (GGUF dequantized), or FP8
    /// through a table of its codes' encodings.
    pub converted: usize,
}

/// Bytes per rayon task when copying a stored tensor.
const COPY_CHUNK: usize = 1 << 17;

/// Tensor `name`'s bytes as its safetensors file stores them, when that is `dtype` in
/// `shape` on a little-endian host: bytes a buffer of `dtype` can take as they are (the bits
/// the f32 round trip gives, but for NaN payloads, which they keep). None otherwise.
pub fn stored_bytes<'a>(
    lazy: &'a LazyModel,
    name: &str,
    dtype: WeightDtype,
    shape: &[usize],
) -> Result<Option<&'a [u8]>> {
    let len = shape.iter().product::<usize>() * dtype.bytes();
    Ok(lazy.stored(name)?.and_then(|t| {
        let fits = cfg!(target_endian = "little")
            && WeightDtype::of_stored(t.dtype) == Some(dtype)
            && t.shape == shape
            && t.bytes.len() == len;
        fits.then_some(t.bytes)
    }))
}

/// `dst.copy_from_slice(src)`, in parallel chunks.
pub fn copy_parallel(dst: &mut [u8], src: &[u8]) {
    dst.par_chunks_mut(COPY_CHUNK).zip(src.par_chunks(COPY_CHUNK)).for_each(|(d, s)| {
        d.copy_from_slice(s);
    });
}

/// Layer `layer`'s bytes as the slot holds them (`layout`), read from `lazy`, with the
/// overlay's edits applied. A tensor that its safetensors file stores in the slot's dtype is
/// copied byte for byte (the same bits the f32 round trip gives, but for NaN payloads, which
/// the copy keeps); the others are read as f32 and converted. Errors name a tensor that is
/// missing or of another shape.
pub fn stage_layer(
    lazy: &LazyModel,
    layer: usize,
    layout: &SlotLayout,
    overlay: &Overlay,
) -> Result<StagedLayer> {
    stage_part(lazy, layer, layout, LayerPart::Whole, overlay)
}

/// [`stage_layer`] for one part of the layer (its bytes only: [`SlotLayout::part_range`]).
/// Errors for an expert the layer does not have.
pub fn stage_part(
    lazy: &LazyModel,
    layer: usize,
    layout: &SlotLayout,
    part: LayerPart,
    overlay: &Overlay,
) -> Result<StagedLayer> {
    let range = part_range(layer, layout, part)?;
    let mut bytes = vec![0u8; range.len()];
    let (copied, converted) = stage_part_into(lazy, layer, layout, part, overlay, &mut bytes)?;
    Ok(StagedLayer { offset: range.start, bytes, copied, converted })
}

/// The slot bytes of `part` of layer `layer`, or an error for an expert it does not have.
fn part_range(layer: usize, layout: &SlotLayout, part: LayerPart) -> Result<Range<usize>> {
    layout.part_range(part).ok_or_else(|| {
        Error::Invalid(format!(
            "layer {layer} has no {part:?} ({} routed experts)",
            layout.experts()
        ))
    })
}

/// [`stage_part`] into `out`, which must be exactly the part's bytes long (a reused buffer,
/// such as a page-locked staging buffer: every byte is written, the alignment gaps between
/// tensors with zeros, so the result is [`stage_part`]'s whatever `out` held). Returns the
/// tensors (copied as stored, converted): [`StagedLayer::copied`], [`StagedLayer::converted`].
pub fn stage_part_into(
    lazy: &LazyModel,
    layer: usize,
    layout: &SlotLayout,
    part: LayerPart,
    overlay: &Overlay,
    out: &mut [u8],
) -> Result<(usize, usize)> {
    let range = part_range(layer, layout, part)?;
    let entries = layout.part_entries(part).unwrap_or(0..0);
    if out.len() != range.len() {
        return Err(Error::Invalid(format!(
            "layer {layer}: staging {part:?} ({} bytes) into a buffer of {}",
            range.len(),
            out.len()
        )));
    }
    let base = range.start;
    let mut converted = 0;
    let mut written = 0; // bytes of `out` written so far, gaps included
    for e in &layout.entries[entries.clone()] {
        let name = format!("model.layers.{layer}.{}", e.suffix);
        out[written..e.offset - base].fill(0);
        written = e.offset - base + e.bytes();
        let dst = &mut out[e.offset - base..written];
        if let Some(bytes) = stored_bytes(lazy, &name, e.dtype, &e.shape)? {
            copy_parallel(dst, bytes);
            overlay.apply_stored(&name, e.dtype, dst)?;
            continue;
        }
        if let Some(q) = lazy.fp8(&name)? {
            // FP8: straight into the slot's bytes (the bits of the f32 route, without the f32
            // matrix), then the edits.
            if [q.rows, q.cols] != e.shape[..] {
                return Err(shape_error(&name, &e.shape, &[q.rows, q.cols]));
            }
            stage_fp8(&q, e.dtype, dst, &name)?;
            overlay.apply_stored(&name, e.dtype, dst)?;
            converted += 1;
            continue;
        }
        let mut t = lazy.tensor(&name)?;
        if t.shape != e.shape {
            return Err(shape_error(&name, &e.shape, &t.shape));
        }
        overlay.apply(&name, &mut t.data)?;
        e.dtype.encode_slice(&t.data, dst, &name)?;
        converted += 1;
    }
    out[written..].fill(0);
    Ok((entries.len() - converted, converted))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let root = std::env::var("SWK_FIXTURES")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures").to_string());
        format!("{root}/tiny/{name}")
    }

    #[test]
    fn layout_is_aligned_ordered_and_covers_every_tensor() {
        let c = crate::synth::SynthSpec::llama2_7b().config().unwrap();
        for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
            let l = SlotLayout::new(&c, 0, dtype);
            assert_eq!(l.entries.len(), 9);
            let mut end = 0;
            for e in &l.entries {
                assert_eq!(e.offset % SLOT_ALIGN, 0, "{}", e.suffix);
                assert!(e.offset >= end, "{} overlaps the previous tensor", e.suffix);
                end = e.offset + e.bytes();
            }
            assert!(l.bytes >= end && l.bytes - end < SLOT_ALIGN);
            // 7B: 4·4096² + 3·4096·11008 matrix weights per layer, plus two f32 norms.
            let matrices = 4 * 4096 * 4096 + 3 * 4096 * 11008;
            let want = matrices * dtype.bytes() + 2 * 4096 * 4;
            assert!(l.bytes >= want && l.bytes < want + 9 * SLOT_ALIGN, "{} vs {want}", l.bytes);
            let down = l.entry("mlp.down_proj.weight").unwrap();
            assert_eq!((down.shape.clone(), down.dtype), (vec![4096, 11008], dtype));
            assert_eq!(l.entry("input_layernorm.weight").unwrap().dtype, WeightDtype::F32);
        }
    }

    /// The plan names exactly the layer tensors of each Llama-family and mixture-of-experts
    /// fixture (Qwen3-MoE's layer 0 is dense), with their shapes.
    #[test]
    fn layer_plan_matches_the_llama_family_fixtures() {
        let moe =
            ["mixtral_gguf", "olmoe_gguf", "qwen2_moe_gguf", "qwen3_moe_gguf", "deepseek_v2_gguf"]
                .map(|n| format!("{n}/model.gguf"));
        let dense = ["llama", "llama3_rope", "mistral", "qwen2", "qwen3"].map(String::from);
        for name in dense.iter().chain(&moe) {
            let lazy = LazyModel::open(&fixture(name)).unwrap();
            for l in 0..lazy.config.num_layers {
                let mut want: Vec<(String, Vec<usize>)> = lazy
                    .layer_names(l)
                    .into_iter()
                    .map(|n| {
                        let (_, suffix) = split_layer_name(n).unwrap();
                        (suffix.to_string(), lazy.shape(n).unwrap().to_vec())
                    })
                    .collect();
                let mut got: Vec<(String, Vec<usize>)> =
                    layer_plan(&lazy.config, l).into_iter().map(|(n, s, _)| (n, s)).collect();
                want.sort();
                got.sort();
                assert_eq!(got, want, "{name} layer {l}");
            }
        }
    }

    #[test]
    fn layer_names_split() {
        assert_eq!(
            split_layer_name("model.layers.12.mlp.down_proj.weight"),
            Some((12, "mlp.down_proj.weight"))
        );
        assert_eq!(split_layer_name("model.norm.weight"), None);
        assert_eq!(split_layer_name("model.layers.x.mlp"), None);
    }

    #[test]
    fn overlay_drops_edits_written_back_to_their_original() {
        let mut o = Overlay::default();
        let mut asked = 0;
        let mut orig = || {
            asked += 1;
            Ok(7u32)
        };
        o.set("w", 3, 0, &mut orig).unwrap();
        assert_eq!((o.get("w", 3), o.len()), (Some(0), 1));
        let d1 = o.digest();
        assert_ne!(d1, 0);
        o.set("w", 3, 5, || panic!("the original is known")).unwrap();
        assert_ne!(o.digest(), d1);
        o.set("w", 3, 7, || panic!("the original is known")).unwrap();
        assert!(o.is_empty());
        assert_eq!(o.digest(), 0);
        assert_eq!(asked, 1);
        // A failing original read leaves nothing behind.
        assert!(o.set("w", 1, 2, || Err(Error::Invalid("boom".into()))).is_err());
        assert!(o.is_empty());
    }

    #[test]
    fn overlay_applies_only_its_tensor() {
        let mut o = Overlay::default();
        o.set("a", 1, 2.5f32.to_bits(), || Ok(0)).unwrap();
        o.set("ab", 0, 9f32.to_bits(), || Ok(0)).unwrap();
        o.set("b", 0, 4f32.to_bits(), || Ok(0)).unwrap();
        let mut a = vec![0f32; 3];
        o.apply("a", &mut a).unwrap();
        assert_eq!(a, [0.0, 2.5, 0.0]);
        let mut b = vec![1f32; 1];
        o.apply("b", &mut b).unwrap();
        assert_eq!(b, [4.0]);
        // The same edits on stored bytes: bf16 2.5 is 0x4020, f32 4.0 is 0x40800000.
        let mut a16 = vec![0xffu8; 6];
        o.apply_stored("a", WeightDtype::Bf16, &mut a16).unwrap();
        assert_eq!(a16, [0xff, 0xff, 0x20, 0x40, 0xff, 0xff]);
        let mut b32 = vec![0u8; 4];
        o.apply_stored("b", WeightDtype::F32, &mut b32).unwrap();
        assert_eq!(b32, 4f32.to_le_bytes());
        let e = o.apply_stored("a", WeightDtype::F16, &mut [0u8; 2]).unwrap_err().to_string();
        assert!(e.contains("out of range") && e.contains('a'), "{e}");
        let mut big = Overlay::default();
        big.set("w", 0, 1e6f32.to_bits(), || Ok(0)).unwrap();
        let e = big.apply_stored("w", WeightDtype::F16, &mut [0u8; 2]).unwrap_err().to_string();
        assert!(e.contains("f16"), "{e}");
        let mut short = vec![0f32; 1];
        let e = o.apply("a", &mut short).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn staged_layer_holds_the_models_bits_and_the_edits() {
        // GGUF mixtures of experts: each expert comes out of its llama.cpp stack.
        // Safetensors in f32, bf16 and f16: a tensor stored in the slot's dtype is copied
        // as it is (all of an f32 checkpoint's into f32 slots, its norms otherwise; a 2-byte
        // checkpoint's 7 matrices into slots of its own dtype), the rest converted.
        for path in [
            "llama",
            "llama_bf16",
            "llama_f16",
            "mixtral_gguf/model.gguf",
            "qwen2_moe_gguf/model.gguf",
            "deepseek_v2_gguf/model.gguf",
        ]
        .map(fixture)
        {
            let lazy = LazyModel::open(&path).unwrap();
            let eager = crate::Model::load(&path).unwrap();
            for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
                let want_copied = match (path.rsplit('/').next().unwrap(), dtype) {
                    ("llama", WeightDtype::F32) => 9,
                    ("llama", _) => 2,
                    ("llama_bf16", WeightDtype::Bf16) | ("llama_f16", WeightDtype::F16) => 7,
                    _ => 0,
                };
                let layout = SlotLayout::new(&lazy.config, 1, dtype);
                // Edit the last down_proj of the layer (an expert's in a mixture).
                let down = layout
                    .entries
                    .iter()
                    .rev()
                    .find(|e| e.suffix.ends_with("down_proj.weight"))
                    .unwrap()
                    .suffix
                    .clone();
                let mut overlay = Overlay::default();
                let edited = format!("model.layers.1.{down}");
                let minus3 = dtype.stored_bits_or_err(-3.0, &edited).unwrap();
                overlay.set(&edited, 5, minus3, || Ok(0)).unwrap();
                let staged = stage_layer(&lazy, 1, &layout, &overlay).unwrap();
                assert_eq!(
                    (staged.copied, staged.converted),
                    (want_copied, layout.entries.len() - want_copied),
                    "{path} {dtype:?}"
                );
                let bytes = staged.bytes;
                assert_eq!(bytes.len(), layout.bytes);
                for e in &layout.entries {
                    let want =
                        &eager.weights.get(&format!("model.layers.1.{}", e.suffix)).unwrap().data;
                    let at = &bytes[e.offset..e.offset + e.bytes()];
                    for (k, &w) in want.iter().enumerate() {
                        let w = if e.suffix == down && k == 5 { -3.0 } else { w };
                        let got = if e.dtype.is_half() {
                            u16::from_le_bytes([at[2 * k], at[2 * k + 1]]) as u32
                        } else {
                            u32::from_le_bytes(at[4 * k..4 * k + 4].try_into().unwrap())
                        };
                        let want = e.dtype.stored_bits(w).unwrap();
                        assert_eq!(e.dtype.decode(got), want, "{path} {} [{k}]", e.suffix);
                    }
                }
            }
        }
    }

    /// A mixture of experts' layer stages in parts (the base, then each routed expert) that
    /// cover the slot and equal the whole layer's bytes, an edited expert's edit included;
    /// a dense layer's base is all of it.
    #[test]
    fn layer_parts_tile_the_whole_layer() {
        for name in ["qwen2_moe_gguf", "deepseek_v2_gguf", "mixtral_gguf", "qwen3_moe_gguf"] {
            let lazy = LazyModel::open(&fixture(&format!("{name}/model.gguf"))).unwrap();
            let c = &lazy.config;
            let moe = c.family.moe.clone().unwrap();
            for l in 0..c.num_layers {
                let layout = SlotLayout::new(c, l, WeightDtype::Bf16);
                let sparse = moe.is_sparse(l);
                assert_eq!(layout.experts(), if sparse { moe.num_experts } else { 0 }, "{name}");
                let mut overlay = Overlay::default();
                if sparse {
                    let edited = format!("model.layers.{l}.mlp.experts.1.down_proj.weight");
                    overlay.set(&edited, 3, 0x4040_0000, || Ok(0)).unwrap();
                }
                let whole = stage_layer(&lazy, l, &layout, &overlay).unwrap();
                let mut parts = vec![LayerPart::Base];
                parts.extend((0..layout.experts()).map(LayerPart::Expert));
                let mut end = 0;
                for part in parts {
                    let range = layout.part_range(part).unwrap();
                    assert_eq!(range.start, end, "{name} layer {l} {part:?}: parts are contiguous");
                    end = range.end;
                    let staged = stage_part(&lazy, l, &layout, part, &overlay).unwrap();
                    assert_eq!(staged.offset, range.start);
                    assert!(staged.bytes == whole.bytes[range], "{name} layer {l} {part:?}");
                    let tensors = layout.part_entries(part).unwrap().len();
                    assert_eq!(staged.copied + staged.converted, tensors);
                    if let LayerPart::Expert(e) = part {
                        assert_eq!(tensors, 3);
                        let first = &layout.entries[layout.part_entries(part).unwrap().start];
                        assert_eq!(first.suffix, format!("mlp.experts.{e}.gate_proj.weight"));
                    }
                }
                assert_eq!(end, layout.bytes, "{name} layer {l}: the parts cover the slot");
                let past = LayerPart::Expert(layout.experts());
                assert_eq!(layout.part_range(past), None);
                let e = stage_part(&lazy, l, &layout, past, &Overlay::default()).unwrap_err();
                assert!(e.to_string().contains(&format!("layer {l} has no Expert")), "{e}");
            }
        }
    }

    /// Staging into a buffer that held other bytes (a reused page-locked buffer) writes
    /// every byte: the result is a fresh buffer's, alignment gaps zero (between tensors and
    /// at a part's end: the synthetic model's odd widths leave one there); a buffer of
    /// another length is an error naming the layer.
    #[test]
    fn staging_into_a_used_buffer_writes_every_byte() {
        let odd = crate::synth::SynthSpec {
            hidden: 36,
            intermediate: 50,
            layers: 2,
            heads: 2,
            kv_heads: 2,
            vocab: 64,
            tie_embeddings: false,
        };
        let mut models = vec![(
            "synthetic".to_string(),
            LazyModel::from_model(crate::synth::random_llama(&odd, 3).unwrap()),
        )];
        for name in ["qwen2", "qwen2_moe_gguf/model.gguf", "deepseek_v2_gguf/model.gguf"] {
            models.push((name.to_string(), LazyModel::open(&fixture(name)).unwrap()));
        }
        let (mut inner, mut tail) = (0, 0);
        for (name, lazy) in &models {
            let layout = SlotLayout::new(&lazy.config, 1, WeightDtype::Bf16);
            let overlay = Overlay::default();
            let mut parts = vec![LayerPart::Whole, LayerPart::Base];
            parts.extend((0..layout.experts()).map(LayerPart::Expert));
            for part in parts {
                let entries = &layout.entries[layout.part_entries(part).unwrap()];
                let range = layout.part_range(part).unwrap();
                let gap = |w: &[SlotEntry]| w[1].offset > w[0].offset + w[0].bytes();
                inner += entries.windows(2).filter(|w| gap(w)).count();
                tail += entries.last().is_some_and(|e| e.offset + e.bytes() < range.end) as usize;
                let fresh = stage_part(lazy, 1, &layout, part, &overlay).unwrap();
                let mut used = vec![0xA5u8; fresh.bytes.len()];
                let counts = stage_part_into(lazy, 1, &layout, part, &overlay, &mut used).unwrap();
                assert!(used == fresh.bytes, "{name} {part:?}");
                assert_eq!(counts, (fresh.copied, fresh.converted), "{name} {part:?}");
                let mut short = vec![0u8; fresh.bytes.len() - 1];
                let e = stage_part_into(lazy, 1, &layout, part, &overlay, &mut short).unwrap_err();
                assert!(e.to_string().contains("layer 1: staging"), "{e}");
            }
        }
        assert!(inner > 0 && tail > 0, "gaps checked: {inner} between tensors, {tail} at the end");
    }

    #[test]
    fn staging_a_model_of_other_shapes_names_the_tensor() {
        let lazy = LazyModel::open(&fixture("llama")).unwrap();
        let mut c = lazy.config.clone();
        c.intermediate_size += 1;
        let e =
            stage_layer(&lazy, 0, &SlotLayout::new(&c, 0, WeightDtype::Bf16), &Overlay::default())
                .unwrap_err()
                .to_string();
        assert!(e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("shape"), "{e}");
        let layout = SlotLayout::new(&lazy.config, 7, WeightDtype::Bf16);
        let e = stage_layer(&lazy, 7, &layout, &Overlay::default()).unwrap_err().to_string();
        assert!(e.contains("model.layers.7."), "{e}");
    }
}
