//! The forward pass of a [`CudaModel`] (its weights: model.rs; its matrix products:
//! linear.rs; perplexity and generation over it: eval.rs), mirroring
//! `model::arch::llama::forward` (and `phi3::forward`, the same block with fused projections,
//! `olmo::forward`, and the other dense families' switches, family.rs), as `layers` runs it
//! (attention in `attention`, the MLP in `dense_mlp`):
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
//!
//! Launches: with [`CudaModel::set_fused_launches`] (the default), neighbouring steps share a
//! launch where that keeps every value's bits: `x += att·W_oᵀ` and the MLP's RMSNorm; q, k,
//! v and RoPE; and with `cublas-split`, each product's split and sum (see linear.rs). With
//! [`CudaModel::set_grouped_products`], q/k/v and gate/up are one product each. A Llama block
//! is then 10 launches: 4 products and 6 kernels.

use super::driver::{CudaDevice, CudaSlice};
use super::family::{Norm, QkNorm};
use super::linear::{Input, Product, Scratch};
use super::mla::MlaActs;
use super::model::{CudaModel, WeightRef};
use super::moe::{KeyLayout, MoeActs};
use super::streamed::Staged;
use super::taps::Taps;
use crate::backend::memory::kv_cache_widths;
use crate::hooks::{HookKind, SpikeStats};
use crate::model::arch::Logits;
use crate::model::ModelConfig;
use crate::{Error, Result};

/// The most rows a pass with spike statistics may have for a block's last residual add to
/// also write the next block's input norm: that launch folds each element's statistic with
/// its own atomic (one a row per column, where `swk_add_residual` issues one a column per
/// group of rows), so longer passes keep the two launches. Detection prompts are shorter.
const NORM_NEXT_KEY_ROWS: usize = 64;

/// Device logits `[rows, vocab]` and their row count, when a pass asked for any.
pub(crate) type DeviceLogits = Option<(CudaSlice<f32>, usize)>;

/// Keys and values of past positions on the device, for one [`CudaModel`]: per layer
/// `[capacity, width]` keys and values, the widths of [`kv_cache_widths`] (latent attention:
/// keys alone). Grows (doubling, copying on the device) as positions are added.
pub struct CudaKvCache {
    layers: Vec<(CudaSlice<f32>, Option<CudaSlice<f32>>)>,
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

impl CudaModel {
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

    /// A copy of `cache` on the device (its positions copied into fresh buffers).
    pub fn fork_cache(&self, cache: &CudaKvCache) -> Result<CudaKvCache> {
        if cache.model_id != self.id {
            return Err(Error::Invalid("this KV cache belongs to another CudaModel".into()));
        }
        self.dev.bind()?;
        let mut out = CudaKvCache::new(self);
        if cache.len == 0 {
            return Ok(out);
        }
        self.reserve(&mut out, cache.len)?;
        for (to, from) in out.layers.iter_mut().zip(&cache.layers) {
            self.copy_cache_layer(from, to, cache.len)?;
        }
        out.len = cache.len;
        Ok(out)
    }

    /// Make room for `needed` positions in `cache` (doubling, copying what it holds).
    pub(crate) fn reserve(&self, cache: &mut CudaKvCache, needed: usize) -> Result<()> {
        if needed <= cache.capacity && cache.layers.len() == self.config.num_layers {
            return Ok(());
        }
        let (kw, vw) = kv_cache_widths(&self.config);
        let cap = needed.max(cache.capacity * 2).max(16).next_multiple_of(16);
        let mut layers = Vec::with_capacity(self.config.num_layers);
        for l in 0..self.config.num_layers {
            let k = self.dev.alloc::<f32>(cap * kw)?;
            let v = if vw > 0 { Some(self.dev.alloc::<f32>(cap * vw)?) } else { None };
            let mut layer = (k, v);
            if let Some(old) = cache.layers.get(l) {
                self.copy_cache_layer(old, &mut layer, cache.len)?;
            }
            layers.push(layer);
        }
        cache.layers = layers;
        cache.capacity = cap;
        Ok(())
    }

    /// Copy the first `positions` rows of one layer's cache into another's.
    fn copy_cache_layer(
        &self,
        (k, v): &(CudaSlice<f32>, Option<CudaSlice<f32>>),
        (to_k, to_v): &mut (CudaSlice<f32>, Option<CudaSlice<f32>>),
        positions: usize,
    ) -> Result<()> {
        let (kw, vw) = kv_cache_widths(&self.config);
        self.dev.copy(k, to_k, positions * kw)?;
        match (v, to_v) {
            (Some(v), Some(to_v)) => self.dev.copy(v, to_v, positions * vw),
            _ => Ok(()),
        }
    }

    /// The forward pass; returns the device logits and their row count (None for
    /// `Logits::None` or no tokens).
    pub(crate) fn run(
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
    pub(crate) fn run_many(
        &self,
        seqs: &mut [(&[u32], &mut CudaKvCache)],
        stats: Option<&mut SpikeStats>,
        logits: Logits,
    ) -> Result<Vec<DeviceLogits>> {
        self.run_tapped(seqs, stats, logits, None)
    }

    /// [`Self::run_many`], copying activations out at the points of `taps` (one sequence
    /// only: see taps.rs).
    pub(crate) fn run_tapped(
        &self,
        seqs: &mut [(&[u32], &mut CudaKvCache)],
        stats: Option<&mut SpikeStats>,
        logits: Logits,
        taps: Option<&Taps>,
    ) -> Result<Vec<DeviceLogits>> {
        let c = &self.config;
        if taps.is_some() && seqs.len() != 1 {
            return Err(Error::Backend(
                "activations are tapped from one sequence at a time".into(),
            ));
        }
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
        let acts = Acts::alloc(dev, c, (t_max, self.device_route_limit()), stats.is_some())?;
        // The GEMM scratch persists across calls (one pass at a time: the device has one stream).
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let sc = &mut *guard;
        let passes: Vec<Pass<'_>> = seqs
            .iter()
            .zip(&xs)
            .map(|((tokens, cache), x)| Pass { t: tokens.len(), x: dev.ptr(x), cache })
            .collect();
        self.layers(&passes, &acts, sc, taps)?;
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
    /// addresses from `param("weight" | "bias")`, an RMSNorm also writing the two-term split
    /// to `split` unless it is 0; returns the product input it made (`x` itself for
    /// [`Norm::Identity`]).
    fn norm_into(
        &self,
        norm: Norm,
        param: impl Fn(&str) -> Result<u64>,
        x: u64,
        (out, split): (u64, u64),
        rows: usize,
    ) -> Result<Input> {
        let (h, eps) = (self.config.hidden_size, self.config.rms_norm_eps);
        match norm {
            Norm::Identity => return Ok(Input::new(x, 0)),
            Norm::Rms { plus_one } => {
                self.dev.rmsnorm(x, param("weight")?, (out, split), rows, h, eps, plus_one)?;
                return Ok(Input::new(out, split));
            }
            Norm::Layer { affine: false } => self.dev.layernorm(x, 0, 0, out, rows, h, eps)?,
            Norm::Layer { affine: true } => {
                self.dev.layernorm(x, param("weight")?, param("bias")?, out, rows, h, eps)?
            }
        }
        Ok(Input::new(out, 0))
    }

    /// x `[t, hidden]` = E[tok] · scale (device token ids at `tok`, the first at position
    /// `pos0`), plus GPT-2's learned positions.
    pub(crate) fn embed_into(&self, tok: u64, x: u64, t: usize, pos0: usize) -> Result<()> {
        let c = &self.config;
        let emb = self.weight("model.embed_tokens.weight")?;
        let h = c.hidden_size;
        self.dev.embed(emb.ptr, emb.dtype, tok, x, t, h, self.block.embed_scale)?;
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
        self.dev.add_residual(x, Product::Whole(wpe + (pos0 * h * 4) as u64), t, h, pos0, 0)
    }

    /// Every block on every pass, layer-major (see [`Self::run_many`]); spike keys into
    /// `acts.keys` when present; activations copied out at the points of `taps`. Each pass's
    /// cache must hold room for its tokens.
    pub(crate) fn layers(
        &self,
        passes: &[Pass<'_>],
        acts: &Acts,
        sc: &mut Scratch,
        taps: Option<&Taps>,
    ) -> Result<()> {
        let c = &self.config;
        let dev = &self.dev;
        let h = c.hidden_size;
        let (kw, vw) = kv_cache_widths(c);
        let (xnp, projp) = (dev.ptr(&acts.xn), dev.ptr(&acts.proj));
        // Spike keys: per layer [intermediate] inputs then [hidden] outputs (then a sparse
        // layer's experts': see KeyLayout).
        let keys_at = |l: usize, out: bool| -> u64 {
            let (ki, ko) = self.key_layout.dense(l);
            acts.keys.as_ref().map_or(0, |k| dev.ptr(k) + ((if out { ko } else { ki }) * 8) as u64)
        };
        let all_keys = acts.keys.as_ref().map_or(0, |k| dev.ptr(k));
        // The family's switches (see family.rs); p1: Gemma's `1 + w` RMSNorm weights.
        let b = &self.block;
        let p1 = b.norm == Norm::Rms { plus_one: true };
        // Products may be left where the engine puts them (cublas-split's halves, a group's
        // shared rows) for the kernel after them when nothing reads the product in between
        // (no tapped activations).
        let lean = self.keeps_products() && taps.is_none();
        // With one sequence and the layers resident, the residual add that ends a layer also
        // writes the next layer's input norm (RMSNorm) and its split: one launch fewer a layer.
        // Several sequences share xn, and a streamed layer's norm arrives with its layer, so
        // they keep the two launches.
        let live = passes.iter().filter(|p| p.t > 0).count();
        let norm_next = match b.norm {
            Norm::Rms { plus_one } if self.fused_launches && !b.parallel => {
                (live == 1 && self.stream.is_none()).then_some(plus_one)
            }
            _ => None,
        };
        // What attention's products read: its input's split (none for latent attention).
        let attn_split = |sc: &mut Scratch, t: usize| match acts.mla {
            Some(_) => Ok(0),
            None => self.split_target(sc, t * h),
        };
        // Layer l's attention input when the previous layer's last add made it.
        let mut normed: Option<Input> = None;

        // Streamed layers: a host thread reads and converts layer l + 1 from the model's
        // files (into a page-locked buffer when the pool has room) while the device runs
        // layer l; each is copied into the one device slot (stream-ordered after the previous
        // layer's kernels, so the slot is free by then).
        // A mixture of experts routing few rows reads a sparse layer's routed experts only
        // once routing has chosen them (`fetch`, below).
        let slot = std::cell::RefCell::new(
            self.stream.as_ref().map(|st| st.slot.lock().unwrap_or_else(|p| p.into_inner())),
        );
        let rows = passes.iter().map(|p| p.t).sum::<usize>()
            * c.family.moe.as_ref().map_or(0, |m| m.top_k);
        // (Only the host router hands its choice to `fetch`; a streamed model has no other.)
        let select = self.device_router.is_none()
            && self.stream.as_ref().is_some_and(|st| st.selects_experts(rows));
        std::thread::scope(|scope| -> Result<()> {
            let staged = self.stream.as_ref().map(|st| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Staged<'_>>>(1);
                scope.spawn(move || {
                    for l in 0..c.num_layers {
                        let staged = st.stage_ahead(l, select);
                        let failed = staged.is_err();
                        if tx.send(staged).is_err() || failed {
                            break;
                        }
                    }
                });
                rx
            });
            for l in 0..c.num_layers {
                let base = match (&staged, &self.stream, slot.borrow_mut().as_deref_mut()) {
                    (Some(rx), Some(st), Some(buf)) => {
                        let layer = rx.recv().map_err(|_| {
                            Error::Backend(format!(
                                "the layer streaming thread stopped before layer {l}"
                            ))
                        })??;
                        st.upload(dev, layer, buf)?;
                        Some(dev.ptr(buf))
                    }
                    _ => None,
                };
                // Which routed experts of this layer were read alone into the slot.
                let experts = self.stream.as_ref().map_or(0, |st| st.layouts[l].experts());
                let read = std::cell::RefCell::new(vec![false; experts]);
                let fetch = |experts: &[usize]| -> Result<()> {
                    match (&self.stream, slot.borrow_mut().as_deref_mut()) {
                        (Some(st), Some(buf)) if select => {
                            st.fetch_experts(dev, l, experts, &mut read.borrow_mut(), buf)
                        }
                        _ => Ok(()),
                    }
                };
                let w = |suffix: &str| self.layer_weight(l, suffix, base);
                for p in passes.iter().filter(|p| p.t > 0) {
                    let (t, pos0, xp) = (p.t, p.cache.len, p.x);
                    // The layer's cache and its rows from pos0 (0 for latent attention's
                    // values: it keeps none).
                    let (kc, vc) = &p.cache.layers[l];
                    let kcp = dev.ptr(kc);
                    let vcp = vc.as_ref().map_or(0, |v| dev.ptr(v));
                    let k_new = kcp + (pos0 * kw * 4) as u64;
                    let v_new = if vcp == 0 { 0 } else { vcp + (pos0 * vw * 4) as u64 };
                    let cache = [kcp, vcp, k_new, v_new];
                    // Copy out the activation `kind` (`t` rows of `width` at `at`), if tapped.
                    let tap = |kind: HookKind, at: u64, width: usize| match taps {
                        Some(tp) => tp.copy(dev, l, kind, at, t, width),
                        None => Ok(()),
                    };
                    tap(HookKind::ResidPre, xp, h)?;

                    // What attention and the MLP read: x through the norm `name` (OLMo 2: x),
                    // its two-term split into `split` unless 0.
                    let pre_norm = |name: &str, split: u64| -> Result<Input> {
                        let p = |kind: &str| w(&format!("{name}.{kind}"))?.f32_ptr();
                        self.norm_into(b.norm, p, xp, (xnp, split), t)
                    };

                    // Attention: x += attention(norm(x))·W_oᵀ (+b_o) (Gemma 2/3, OLMo 2: the
                    // product normed first).
                    let a_in = match normed.take() {
                        Some(a_in) => a_in,
                        None => pre_norm("input_layernorm", attn_split(sc, t)?)?,
                    };
                    let pattern = match taps {
                        Some(tp) => {
                            let width = c.num_heads * (pos0 + t);
                            tp.slot(dev, l, HookKind::AttnPattern, t, width)?
                        }
                        None => 0,
                    };
                    let outs = [dev.ptr(&acts.q), dev.ptr(&acts.att), projp, pattern];
                    let proj = match acts.mla.as_ref() {
                        // DeepSeek's latent attention (mla.rs), o_proj included.
                        Some(ml) => {
                            self.mla_attention(l, &w, a_in.x, (t, pos0), cache, outs, ml, sc)?;
                            Product::Whole(projp)
                        }
                        None => self.attention(l, &w, a_in, (t, pos0), cache, outs, lean, sc)?,
                    };
                    if b.o_bias {
                        dev.add_bias(projp, w("self_attn.o_proj.bias")?.f32_ptr()?, t, h)?;
                    }
                    if b.post_norms {
                        let norm = w("post_attention_layernorm.weight")?.f32_ptr()?;
                        dev.rmsnorm(projp, norm, (projp, 0), t, h, c.rms_norm_eps, p1)?;
                    }
                    tap(HookKind::AttnOut, projp, h)?;
                    // x += proj, and m = the MLP's pre-norm of x (GPT-NeoX's parallel
                    // residual: of the block input, before the add; with an RMSNorm and the
                    // launches fused, the add and the norm are one launch).
                    let sparse = acts.moe.is_some() && self.key_layout.is_sparse(l);
                    let split = if sparse { 0 } else { self.split_target(sc, t * h)? };
                    let m_in = match b.norm {
                        _ if b.parallel => {
                            let m = pre_norm(b.mlp_norm, split)?;
                            dev.add_residual(xp, proj, t, h, pos0, 0)?;
                            m
                        }
                        Norm::Rms { plus_one } if self.fused_launches => {
                            let nw = w(&format!("{}.weight", b.mlp_norm))?.f32_ptr()?;
                            let (out, eps) = ((xnp, split), c.rms_norm_eps);
                            dev.add_rmsnorm(xp, proj, nw, out, t, h, eps, plus_one, (pos0, 0))?;
                            tap(HookKind::ResidMid, xp, h)?;
                            Input::new(xnp, split)
                        }
                        _ => {
                            dev.add_residual(xp, proj, t, h, pos0, 0)?;
                            tap(HookKind::ResidMid, xp, h)?;
                            pre_norm(b.mlp_norm, split)?
                        }
                    };

                    // MLP: x += mlp(m), with the spike statistics fused into the activation
                    // (inputs) and into this add (outputs).
                    let out = match acts.moe.as_ref().filter(|_| sparse) {
                        Some(ma) => {
                            // A mixture of experts: Σ_e w_e · expert_e(m) (+ shared expert).
                            self.sparse_mlp(l, &w, m_in.x, (t, pos0), ma, all_keys, &fetch, sc)?;
                            Product::Whole(dev.ptr(&ma.out))
                        }
                        None => {
                            let keys = keys_at(l, false);
                            self.dense_mlp(&w, m_in, (t, pos0), acts, keys, &tap, lean, sc)?
                        }
                    };
                    if let Product::Whole(out) = out {
                        tap(HookKind::MlpOut, out, h)?;
                    }
                    // x += out with its spike statistics (and the next layer's input norm:
                    // its launch folds each element's key with an atomic, so only short
                    // passes take it with statistics).
                    let keys = keys_at(l, true);
                    let short = keys == 0 || t <= NORM_NEXT_KEY_ROWS;
                    match norm_next.filter(|_| l + 1 < c.num_layers && short) {
                        Some(plus_one) => {
                            let nw = self.layer_weight(l + 1, "input_layernorm.weight", None)?;
                            let split = attn_split(sc, t)?;
                            let (nw, eps) = (nw.f32_ptr()?, c.rms_norm_eps);
                            let at = (pos0, keys);
                            dev.add_rmsnorm(xp, out, nw, (xnp, split), t, h, eps, plus_one, at)?;
                            normed = Some(Input::new(xnp, split));
                        }
                        None => dev.add_residual(xp, out, t, h, pos0, keys)?,
                    }
                    tap(HookKind::ResidPost, xp, h)?;
                }
            }
            Ok(())
        })
    }

    /// Layer `l`'s attention over `t` tokens at `pos0` on `xn`, into `proj`: q = xn·W_qᵀ (+b)
    /// into `q`; k, v likewise straight into the cache rows (`cache` = the layer's key and
    /// value caches, then the addresses of their rows `pos0..`); the family's clamp and
    /// QK-norm; RoPE; causal (or windowed) softmax attention into `att` (its weights into
    /// `pattern` unless 0); proj = att·W_oᵀ, returned (as cublas-split's halves when `lean`
    /// and nothing is added to it here).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        l: usize,
        w: &dyn Fn(&str) -> Result<WeightRef>,
        xn: Input,
        (t, pos0): (usize, usize),
        [kc, vc, k_new, v_new]: [u64; 4],
        [q, att, proj, pattern]: [u64; 4],
        lean: bool,
        sc: &mut Scratch,
    ) -> Result<Product> {
        let c = &self.config;
        let (dev, b) = (&self.dev, &self.block);
        let h = c.hidden_size;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (qd, kvd) = (nh * hd, nkv * hd);

        // q, k, v = xn·Wᵀ (Phi-3: the row blocks of qkv_proj).
        let qkv = [("q_proj", q, qd), ("k_proj", k_new, kvd), ("v_proj", v_new, kvd)];
        let outs = if b.fused_qkv {
            let f = w("self_attn.qkv_proj.weight")?;
            vec![
                (f.rows(0, qd)?, q, qd),
                (f.rows(qd, kvd)?, k_new, kvd),
                (f.rows(qd + kvd, kvd)?, v_new, kvd),
            ]
        } else {
            qkv.iter()
                .map(|&(n, out, width)| Ok((w(&format!("self_attn.{n}.weight"))?, out, width)))
                .collect::<Result<Vec<_>>>()?
        };
        // RoPE's frequencies (Gemma 3's sliding layers rotate with the local base).
        let (window, scale) = (c.layer_window(l), c.attention_scale(l));
        let inv = match (&self.inv_local, window) {
            (Some(local), Some(_)) => dev.ptr(local),
            _ => dev.ptr(&self.inv_freq),
        };
        // Nothing between the products and RoPE: one launch adds cublas-split's halves and
        // rotates.
        let plain = b.rope && !b.qkv_bias && b.clip_qkv.is_none() && b.qk_norm == QkNorm::None;
        let ps = self.products(xn, &outs, t, h, sc, plain && self.keeps_products())?;
        if let [pq @ (Product::Halves(..) | Product::Rows(..)), pk, pv] = ps[..] {
            let dims = (nh, nkv, hd);
            dev.qkv_rope([pq, pk, pv], [q, k_new, v_new], inv, t, dims, self.rot_half, pos0)?;
        } else {
            self.qkv_finish(w, (t, pos0), [q, k_new, v_new], inv)?;
        }
        let (split, softcap) = (self.split_target(sc, t * qd)?, b.attn_softcap);
        let out = (att, pattern, split);
        let shape = super::kernels::AttentionShape {
            rows: t,
            pos0,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            window,
            values_are_keys: false,
        };
        let part = |n| sc.attention(dev, n);
        dev.attention((q, kc, vc), out, &shape, nkv, (scale, softcap), part)?;
        let o = w("self_attn.o_proj.weight")?;
        let halves = lean && !b.o_bias && !b.post_norms;
        self.product(Input::new(att, split), o, proj, t, (qd, h), sc, halves)
    }

    /// What happens to q, k and v (written whole at `q`, `k_new`, `v_new`) between their
    /// products and attention: biases, OLMo's clamp, QK-norm, RoPE (frequencies `inv`).
    fn qkv_finish(
        &self,
        w: &dyn Fn(&str) -> Result<WeightRef>,
        (t, pos0): (usize, usize),
        [q, k_new, v_new]: [u64; 3],
        inv: u64,
    ) -> Result<()> {
        let c = &self.config;
        let (dev, b) = (&self.dev, &self.block);
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let p1 = b.norm == Norm::Rms { plus_one: true };
        let qkv = [("q_proj", q, qd), ("k_proj", k_new, kvd), ("v_proj", v_new, kvd)];
        if b.qkv_bias {
            let fused_bias = if b.fused_qkv { Some(w("self_attn.qkv_proj.bias")?) } else { None };
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
                    dev.clamp(q, t * qd, clip)?;
                    dev.clamp(k_new, t * kvd, clip)?;
                    dev.clamp(v_new, t * kvd, clip)
                }
                _ => Ok(()),
            }
        };
        clip(false)?;
        // QK-norm, in place: per row of whole q and k (OLMo 2) or per head (Qwen3, Gemma 3).
        let qk_rows = match b.qk_norm {
            QkNorm::None => None,
            QkNorm::Whole => Some(((t, qd), (t, kvd))),
            QkNorm::PerHead => Some(((t * nh, hd), (t * nkv, hd))),
        };
        if let Some(((qr, qw), (kr, kw))) = qk_rows {
            let qn = w("self_attn.q_norm.weight")?.f32_ptr()?;
            dev.rmsnorm(q, qn, (q, 0), qr, qw, c.rms_norm_eps, p1)?;
            let kn = w("self_attn.k_norm.weight")?.f32_ptr()?;
            dev.rmsnorm(k_new, kn, (k_new, 0), kr, kw, c.rms_norm_eps, p1)?;
        }
        clip(true)?;
        if b.rope {
            dev.rope(q, inv, t, nh, hd, self.rot_half, pos0)?;
            dev.rope(k_new, inv, t, nkv, hd, self.rot_half, pos0)?;
        }
        Ok(())
    }

    /// The dense MLP on m (`t` rows at `m`, positions from `pos0`), into `acts.proj`:
    /// a = act(m·W_gateᵀ) ⊙ (m·W_upᵀ) (Phi-3: gate_up_proj's row blocks; GPT-2, GPT-NeoX
    /// un-gated: act(m·W_upᵀ + b)), its per-column maxima into the input keys at `keys`
    /// (0: none); proj = a·W_downᵀ (+b) (Gemma 2/3, OLMo 2: then normed, since the output
    /// statistic is what the MLP writes). `tap(kind, at, width)` copies out the MLP's hook
    /// points (the pre-activations and a). Returns proj, as cublas-split's halves when
    /// `lean` (nothing taps the products) and nothing is applied to it here; with `lean`
    /// the gate and up products are added where the activation reads them, and the `mma`
    /// engine's down product makes a (and its statistics) as it reads it.
    #[allow(clippy::too_many_arguments)]
    fn dense_mlp(
        &self,
        w: &dyn Fn(&str) -> Result<WeightRef>,
        m: Input,
        (t, pos0): (usize, usize),
        acts: &Acts,
        keys: u64,
        tap: &dyn Fn(HookKind, u64, usize) -> Result<()>,
        lean: bool,
        sc: &mut Scratch,
    ) -> Result<Product> {
        let c = &self.config;
        let (dev, b) = (&self.dev, &self.block);
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (gate, up, act) = (dev.ptr(&acts.gate), dev.ptr(&acts.up), dev.ptr(&acts.act));
        let proj = dev.ptr(&acts.proj);
        let down = w("mlp.down_proj.weight")?;
        if !b.gated {
            let up = self.product(m, w("mlp.up_proj.weight")?, up, t, (h, i), sc, false)?;
            let Product::Whole(up) = up else {
                return Err(Error::Backend("the un-gated up_proj was not written whole".into()));
            };
            dev.add_bias(up, w("mlp.up_proj.bias")?.f32_ptr()?, t, i)?;
            tap(HookKind::MlpPre, up, i)?;
            let split = self.split_target(sc, t * i)?;
            let at = (pos0, 0);
            dev.act_mul(None, Product::Whole(up), (act, split), t, i, at, keys, b.act)?;
            tap(HookKind::MlpPost, act, i)?;
            self.product(Input::new(act, split), down, proj, t, (i, h), sc, false)?;
            dev.add_bias(proj, w("mlp.down_proj.bias")?.f32_ptr()?, t, h)?;
            return Ok(Product::Whole(proj));
        }
        let outs = if b.fused_gate_up {
            let f = w("mlp.gate_up_proj.weight")?;
            [(f.rows(0, i)?, gate, i), (f.rows(i, i)?, up, i)]
        } else {
            [(w("mlp.gate_proj.weight")?, gate, i), (w("mlp.up_proj.weight")?, up, i)]
        };
        let [g, u] = self.products(m, &outs, t, h, sc, lean)?[..] else {
            return Err(Error::Backend("gate and up: two products expected".into()));
        };
        if !lean {
            tap(HookKind::MlpPre, gate, i)?;
            tap(HookKind::MlpPreLinear, up, i)?;
        }
        // The tensor cores' down product makes the activation as it reads it, when nothing
        // taps it; otherwise the activation is a launch (and a buffer) of its own.
        let at = (pos0, keys);
        let proj = if lean && self.mma_activated((g, u), b.act, &down, proj, t, (i, h), at, sc)? {
            Product::Whole(proj)
        } else {
            let split = self.split_target(sc, t * i)?;
            dev.act_mul(Some(g), u, (act, split), t, i, (pos0, 0), keys, b.act)?;
            tap(HookKind::MlpPost, act, i)?;
            let keep = lean && !b.post_norms;
            self.product(Input::new(act, split), down, proj, t, (i, h), sc, keep)?
        };
        if let (true, Product::Whole(proj)) = (b.post_norms, proj) {
            let norm = w("post_feedforward_layernorm.weight")?.f32_ptr()?;
            let p1 = b.norm == Norm::Rms { plus_one: true };
            dev.rmsnorm(proj, norm, (proj, 0), t, h, c.rms_norm_eps, p1)?;
        }
        Ok(proj)
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
        let split = self.split_target(sc, n * h)?;
        let xf = self.norm_into(self.block.final_norm, p, first, (xf, split), n)?;
        let head = self.weight(&self.head)?;
        self.product(xf, head, out, n, (h, c.vocab_size), sc, false)?;
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
    /// Buffers for up to `t` tokens; zeroed spike keys when `stats`; a mixture of experts'
    /// device router's arrays when `t` is at most `route_limit`
    /// ([`CudaModel::device_route_limit`]).
    pub(crate) fn alloc(
        dev: &CudaDevice,
        c: &ModelConfig,
        (t, route_limit): (usize, usize),
        stats: bool,
    ) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        // Attention's queries and outputs per token: per head head_dim, or latent
        // attention's absorbed rows (see mla.rs).
        let qd = match &c.family.deepseek {
            Some(d) => c.num_heads * (d.kv_lora_rank + d.qk_rope_head_dim),
            None => c.num_heads * c.head_dim,
        };
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
                Some(m) => Some(MoeActs::alloc(dev, c, m, (t, route_limit), stats)?),
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

#[cfg(all(test, feature = "cuda-emu", not(feature = "cuda")))]
mod tests {
    use super::*;
    use crate::backend::cuda::{CudaOptions, GemmEngine, WeightDtype};
    use crate::model::Model;

    /// Launches a pass of `tokens` queues (no logits), and its last row's logits as bits.
    fn pass(g: &CudaModel, tokens: &[u32], stats: bool) -> (usize, Vec<u32>) {
        let c = &g.config;
        let mut s = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
        let before = g.dev.launches();
        let stats = if stats { Some(&mut s) } else { None };
        g.forward(tokens, &mut CudaKvCache::new(g), stats, Logits::None).expect("pass");
        let n = g.dev.launches() - before;
        let logits = g.forward(tokens, &mut CudaKvCache::new(g), None, Logits::Last);
        (n, logits.expect("logits").iter().map(|v| v.to_bits()).collect())
    }

    /// With cublas-split's split and sum fused into the kernels around the products, a Llama
    /// block queues 12 launches instead of 26: its 7 products and 5 other kernels (q/k/v with
    /// RoPE, attention, the residual add with the MLP's RMSNorm, the activation, the residual
    /// add with the spike statistics and the next block's RMSNorm; the first block adds its
    /// own RMSNorm), where the unfused block adds 4 splits, 7 sums of halves, RoPE's second
    /// launch and two launches between adds and norms. With q/k/v and gate/up as one product
    /// each, 9. The logits keep their bits (the emulator's products are exact sums, so
    /// grouping cannot change them here), with and without spike statistics. The `mma`
    /// engine's block is 8: its down product makes the activation as it reads it.
    #[test]
    fn fused_launches_more_than_halve_a_llama_block() {
        let m = Model::load(&super::super::tiny_fixture("llama")).expect("tiny fixture");
        let opts = CudaOptions {
            dtype: WeightDtype::Bf16,
            gemm: GemmEngine::CublasSplit,
            ..Default::default()
        };
        let mut g = CudaModel::new(&m, &opts).expect("upload");
        let tokens = [1, 5, 9, 2, 7];
        let layers = m.config.num_layers;
        for stats in [false, true] {
            let grouped = pass(&g, &tokens, stats);
            g.set_grouped_products(false);
            let fused = pass(&g, &tokens, stats);
            g.set_fused_launches(false);
            let plain = pass(&g, &tokens, stats);
            g.set_fused_launches(true);
            g.set_grouped_products(true);
            // One embedding gather and the first block's norm, then the blocks.
            assert_eq!(grouped.0, 2 + 9 * layers, "fused and grouped, stats {stats}");
            assert_eq!(fused.0, 2 + 12 * layers, "fused, stats {stats}");
            assert_eq!(plain.0, 1 + 26 * layers, "unfused, stats {stats}");
            assert!(fused.1 == plain.1, "the fused launches change the logits (stats {stats})");
            assert!(grouped.1 == plain.1, "grouped products change the logits (stats {stats})");
        }
        // The tensor-core engine: its products are whole (no halves to add), grouped alike,
        // and the down product makes its input; unfused, the same bits.
        g.set_gemm(GemmEngine::Mma).expect("mma engine");
        for stats in [false, true] {
            let fused = pass(&g, &tokens, stats);
            g.set_fused_launches(false);
            let plain = pass(&g, &tokens, stats);
            g.set_fused_launches(true);
            assert_eq!(fused.0, 2 + 8 * layers, "mma, stats {stats}");
            assert!(fused.1 == plain.1, "mma: the fused launches change the logits");
        }
        // A pass too long to fold its statistics into the next norm's launch: with statistics,
        // each block has its own norm (10 launches); without, 9 as before.
        let long: Vec<u32> =
            (0..NORM_NEXT_KEY_ROWS as u32 + 1).map(|i| (i * 7 + 3) % 320).collect();
        assert_eq!(pass(&g, &long, true).0, 1 + 10 * layers, "a long pass with statistics");
        assert_eq!(pass(&g, &long, false).0, 2 + 9 * layers, "a long pass without");
    }

    /// With the `mma` engine and fused launches, each sparse layer's grouped down product
    /// makes the experts' activation as it stages it (`swk_gemm_mma_act_grouped_*`, one launch
    /// fewer per layer: no `swk_act_mul_grouped`), and the shared expert's and the dense
    /// layers' down products theirs (no `swk_act_mul` at all); unfused, each activation is
    /// its own launch.
    /// Both give the same logits and spike statistics (experts' and router counters
    /// included), bit for bit, for a prefill routed on the device and on the host, bf16 and
    /// f16.
    #[test]
    fn mma_down_makes_the_experts_activation() {
        for name in ["mixtral", "qwen2_moe", "deepseek_v3"] {
            let m = Model::load(&super::super::tiny_fixture(name)).expect("tiny fixture");
            let c = &m.config;
            let sparse = (0..c.num_layers).filter(|&l| is_sparse(&m, l)).count();
            assert!(sparse > 0, "{name}: no sparse layer");
            for dtype in [WeightDtype::Bf16, WeightDtype::F16] {
                let opts = CudaOptions { dtype, gemm: GemmEngine::Mma, ..Default::default() };
                let mut g = CudaModel::new(&m, &opts).expect("upload");
                let fused_kernel = match dtype {
                    WeightDtype::F16 => "swk_gemm_mma_act_grouped_f16",
                    _ => "swk_gemm_mma_act_grouped_bf16",
                };
                for on_device in [true, false] {
                    g.set_device_routing(on_device);
                    let at = format!("{name} {dtype:?}, routed on the device {on_device}");
                    let run = |g: &CudaModel| {
                        let count = |g: &CudaModel| {
                            let n = |k: &str| g.dev.launches_of(k);
                            [n(fused_kernel), n("swk_act_mul_grouped"), n("swk_act_mul")]
                        };
                        let before = count(g);
                        let mut s =
                            SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
                        let logits = g
                            .forward(
                                &[1, 5, 9, 2, 7],
                                &mut CudaKvCache::new(g),
                                Some(&mut s),
                                Logits::All,
                            )
                            .expect("pass");
                        let after = count(g);
                        let counts: Vec<usize> =
                            after.iter().zip(&before).map(|(a, b)| a - b).collect();
                        let bits: Vec<u32> = logits.iter().map(|v| v.to_bits()).collect();
                        (counts, bits, format!("{:?}", s.layers))
                    };
                    let fused = run(&g);
                    g.set_fused_launches(false);
                    let plain = run(&g);
                    g.set_fused_launches(true);
                    assert_eq!(fused.0[..2], [sparse, 0], "{at}: fused launches");
                    assert_eq!(fused.0[2], 0, "{at}: fused, an activation launched alone");
                    assert_eq!(plain.0[..2], [0, sparse], "{at}: unfused launches");
                    // The dense layers' and the shared experts' activations.
                    let shared = if c
                        .family
                        .moe
                        .as_ref()
                        .is_some_and(|m| m.shared_expert_intermediate.is_some())
                    {
                        sparse
                    } else {
                        0
                    };
                    let alone = c.num_layers - sparse + shared;
                    assert_eq!(plain.0[2], alone, "{at}: unfused activations");
                    assert!(fused.1 == plain.1, "{at}: the fused activation changes the logits");
                    assert!(
                        fused.2 == plain.2,
                        "{at}: the fused activation changes the statistics"
                    );
                }
            }
        }
    }

    /// A profile times every launch of a pass under its kernel's name (as many as the
    /// emulator's counters saw), each cuBLAS product under its own, and a graph replay as one
    /// entry (the capture itself untimed); once finished, nothing more is timed.
    #[test]
    fn profiles_time_every_launch_by_kernel() {
        use super::super::kernels::KERNELS;
        use super::super::profile::Profile;
        let m = Model::load(&super::super::tiny_fixture("llama")).expect("tiny fixture");
        let c = &m.config;
        let opts = CudaOptions {
            dtype: WeightDtype::Bf16,
            gemm: GemmEngine::Cublas,
            ..Default::default()
        };
        let mut g = CudaModel::new(&m, &opts).expect("upload");
        let tokens = [1, 5, 9, 2, 7];
        let counts = |g: &CudaModel| -> Vec<usize> {
            KERNELS.iter().map(|k| g.dev.launches_of(k)).collect()
        };
        let launches_in = |p: &Profile, name: &str| {
            p.kernels.iter().find(|k| k.name == name).map_or(0, |k| k.launches)
        };
        let (before, all_before) = (counts(&g), g.dev.launches());
        g.dev.start_profile();
        let mut s = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
        g.forward(&tokens, &mut CudaKvCache::new(&g), Some(&mut s), Logits::All).expect("pass");
        let p = g.dev.finish_profile().expect("profile");
        let mut kernels = 0;
        for ((k, b), a) in KERNELS.iter().zip(&before).zip(counts(&g)) {
            assert_eq!(launches_in(&p, k), a - b, "launches of {k}");
            kernels += a - b;
        }
        let products = g.dev.launches() - all_before - kernels;
        assert!(products > 0 && kernels > 0);
        assert_eq!(launches_in(&p, "cublas_gemm_f32"), products, "the cuBLAS products");
        assert_eq!(p.launches(), kernels + products);
        assert!(p.kernels.iter().all(|k| k.ms >= 0.0) && p.total_ms() > 0.0);
        assert!(p.kernels.windows(2).all(|w| w[0].ms >= w[1].ms), "most time first");
        // Finished: the next pass is not timed.
        g.forward(&tokens, &mut CudaKvCache::new(&g), None, Logits::Last).expect("pass");
        assert_eq!(g.dev.finish_profile().expect("empty").launches(), 0);
        // A graph: the first call runs the pass, captures it (untimed) and replays it; the
        // second only replays.
        g.set_graphs(true);
        for (call, runs_the_pass) in [(0, true), (1, false)] {
            g.dev.start_profile();
            let ran = g.run_graph(&tokens, None, Logits::None, |_| Ok(())).expect("graph");
            assert!(ran.is_some(), "call {call}: no graph ({:?})", g.graph_error());
            let p = g.dev.finish_profile().expect("profile");
            assert_eq!(launches_in(&p, "graph_replay"), 1, "call {call}");
            assert_eq!(p.launches() > 1, runs_the_pass, "call {call}: {:?}", p.kernels);
        }
    }

    /// Whether layer `l` of `m` is a sparse (mixture-of-experts) layer.
    fn is_sparse(m: &Model, l: usize) -> bool {
        super::super::moe::KeyLayout::of(&m.config).is_sparse(l)
    }
}

/// Tests that run on the emulator and on a GPU alike.
#[cfg(test)]
mod device_tests {
    use super::*;
    use crate::backend::cuda::driver::cuda_available;
    use crate::backend::cuda::{CudaOptions, WeightDtype};
    use crate::hooks::HookPoint;
    use crate::model::Model;

    /// Rows with more keys than the device's shared memory holds run `swk_attention_tiled`,
    /// the softmax online over tiles of keys. With the limit lowered to tiles of 3 keys (and
    /// one-pass rows of at most 3), the prefill's logits, a token-by-token decode's (its
    /// early rows one-pass, its later ones tiled) and the attention pattern match the
    /// one-pass kernel's within 1e-5 (f32 weights; they differ only by rounding: the tiled
    /// kernel divides last and rescales at each tile): every attention family, with sliding
    /// windows (Mistral, Gemma 2 and 3), soft-capping (Gemma 2) and absorbed latent
    /// attention (DeepSeek-V3). On the emulator, threads and blocks run in reverse order give
    /// the tiled kernel's bits (no race). The limit back, the one-pass kernel's bits come back.
    #[test]
    fn tiled_attention_matches_the_one_pass_kernel() {
        if !cuda_available() {
            eprintln!("skipped: no CUDA device");
            return;
        }
        const TILE: usize = 3;
        let names = ["llama", "mistral", "gemma2", "gemma3", "gpt2", "phi3", "deepseek_v3"];
        for name in names {
            let m = Model::load(&super::super::tiny_fixture(name)).expect("tiny fixture");
            let c = &m.config;
            let v = c.vocab_size as u32;
            let tokens: Vec<u32> = (0..13).map(|i| (i * 37 + 11) % v).collect();
            let points: Vec<HookPoint> = (0..c.num_layers)
                .map(|layer| HookPoint { layer, kind: HookKind::AttnPattern })
                .collect();
            let opts = CudaOptions { dtype: WeightDtype::F32, ..Default::default() };
            let mut g = CudaModel::new(&m, &opts).expect("upload");
            let run = |g: &CudaModel| {
                let all = g.forward(&tokens, &mut CudaKvCache::new(g), None, Logits::All);
                let mut cache = CudaKvCache::new(g);
                let mut decode = g.forward(&tokens[..2], &mut cache, None, Logits::Last);
                for &t in &tokens[2..] {
                    let row = g.forward(&[t], &mut cache, None, Logits::Last).expect("decode");
                    decode.as_mut().expect("decode").extend(row);
                }
                let pattern = g.capture(&tokens, &points).expect("capture");
                let mut pattern: Vec<_> = pattern.into_iter().collect();
                pattern.sort_by_key(|(p, _)| p.layer);
                (all.expect("prefill"), decode.expect("decode"), pattern)
            };
            let want = run(&g);
            #[cfg(not(feature = "cuda"))]
            let tiled = |g: &CudaModel| g.dev.launches_of("swk_attention_tiled");
            #[cfg(not(feature = "cuda"))]
            assert_eq!(tiled(&g), 0, "{name}: the one-pass kernel holds these rows");
            assert!(!want.2.is_empty(), "{name}: no pattern captured");
            let width = c
                .family
                .deepseek
                .as_ref()
                .map_or(c.head_dim, |d| d.kv_lora_rank + d.qk_rope_head_dim);
            let limit = g.dev.shared_limit;
            g.dev.shared_limit = (32 + width + TILE) * 4;
            let got = run(&g);
            #[cfg(not(feature = "cuda"))]
            {
                assert!(tiled(&g) > 0, "{name}: the tiled kernel never ran");
                super::super::emulate_in_reverse(true);
                let reverse = run(&g);
                super::super::emulate_in_reverse(false);
                let same = reverse.0 == got.0 && reverse.1 == got.1 && reverse.2 == got.2;
                assert!(same, "{name}: the tiled kernel depends on the thread order");
            }
            g.dev.shared_limit = limit;
            let close = |what: &str, a: &[f32], b: &[f32]| {
                assert_eq!(a.len(), b.len(), "{name} {what}");
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    let err = (x - y).abs() / y.abs().max(1.0);
                    assert!(err <= 1e-5, "{name} {what} [{i}]: {x} against {y}");
                }
            };
            close("prefill", &got.0, &want.0);
            close("decode", &got.1, &want.1);
            for ((p, a), (_, b)) in got.2.iter().zip(&want.2) {
                close(&p.to_string(), a, b);
            }
            let back = run(&g);
            assert!(back.0 == want.0 && back.1 == want.1, "{name}: the one-pass bits");
        }
    }

    /// Attention without the pattern hook runs `swk_attention_rows` wherever a block has more
    /// than one query: a prefill (16 queries a block: the heads of a KV head times rows), and
    /// decoding with grouped KV heads (each tile of keys and values read once for the block's
    /// queries). A 41-token prefill (blocks of several rows, the last one partial), a 5-token
    /// one continued by 36 more, decoding token by token, and the prefill with tiles of 16 and
    /// 8 keys (the shared memory of a 256-wide head: two and four queries to a warp) all give
    /// the logits of decoding with a block per row and head (`set_attention_blocks(false)`:
    /// `swk_attention`) within 1e-5 (f32 weights): sliding windows of 4 and 5 keys (Mistral,
    /// Gemma 2 and 3, Phi-3), soft-capping (Gemma 2), two heads a KV head, GPT-2's learned
    /// positions and separate heads, DeepSeek's latent rows (four heads sharing one row that
    /// is also the value, read once). So do prefill and decoding in `swk_attention_rows_wide`
    /// (the kernel of heads past 256 wide, run here on small ones). On the emulator, threads
    /// and blocks in reverse order give the same bits (no race).
    #[test]
    fn row_blocks_match_a_block_a_row() {
        if !cuda_available() {
            eprintln!("skipped: no CUDA device");
            return;
        }
        let families = [
            "llama",
            "mistral",
            "gemma2",
            "gemma3",
            "phi3",
            "gpt2",
            "qwen2",
            "olmo2",
            "deepseek_v3",
        ];
        for name in families {
            let m = Model::load(&super::super::tiny_fixture(name)).expect("tiny fixture");
            let v = m.config.vocab_size as u32;
            let tokens: Vec<u32> = (0..41).map(|i| (i * 37 + 11) % v).collect();
            let opts = CudaOptions { dtype: WeightDtype::F32, ..Default::default() };
            let mut g = CudaModel::new(&m, &opts).expect("upload");
            // A head's width in the cache, and whether its values are its keys (latent rows).
            let (hd, values_are_keys) = match kv_cache_widths(&m.config) {
                (k, 0) => (k, true),
                _ => (m.config.head_dim, false),
            };
            let decode = |g: &CudaModel| {
                let mut cache = CudaKvCache::new(g);
                let mut rows = Vec::new();
                for &t in &tokens {
                    rows.extend(g.forward(&[t], &mut cache, None, Logits::Last).expect("decode"));
                }
                rows
            };
            let prefill = |g: &CudaModel| {
                g.forward(&tokens, &mut CudaKvCache::new(g), None, Logits::All).expect("prefill")
            };
            #[cfg(not(feature = "cuda"))]
            let row_blocks = |g: &CudaModel| g.dev.launches_of("swk_attention_rows");
            g.set_attention_blocks(false);
            #[cfg(not(feature = "cuda"))]
            let before = row_blocks(&g);
            let want = decode(&g);
            let off = prefill(&g);
            #[cfg(not(feature = "cuda"))]
            assert_eq!(row_blocks(&g), before, "{name}: row blocks while off");
            g.set_attention_blocks(true);
            let whole = prefill(&g);
            #[cfg(not(feature = "cuda"))]
            assert!(row_blocks(&g) > before, "{name}: no row blocks");
            let mut cache = CudaKvCache::new(&g);
            let mut parts = g.forward(&tokens[..5], &mut cache, None, Logits::All).expect("5");
            parts.extend(g.forward(&tokens[5..], &mut cache, None, Logits::All).expect("36"));
            let stepped = decode(&g);
            #[cfg(not(feature = "cuda"))]
            {
                super::super::emulate_in_reverse(true);
                let reverse = (prefill(&g), decode(&g));
                super::super::emulate_in_reverse(false);
                let same = reverse.0 == whole && reverse.1 == stepped;
                assert!(same, "{name}: depends on the thread order");
            }
            // Less shared memory: tiles of 16 and of 8 keys.
            let limit = g.dev.shared_limit;
            let mut smaller = Vec::new();
            for tile in [16, 8] {
                g.dev.shared_limit =
                    super::super::kernels::attention_rows_shared_bytes(hd, tile, values_are_keys);
                smaller.push(prefill(&g));
            }
            g.dev.shared_limit = limit;
            // The wide kernel.
            g.dev.narrow_rows = false;
            #[cfg(not(feature = "cuda"))]
            let before = g.dev.launches_of("swk_attention_rows_wide");
            let wide = (prefill(&g), decode(&g));
            #[cfg(not(feature = "cuda"))]
            {
                let launched = g.dev.launches_of("swk_attention_rows_wide") > before;
                assert!(launched, "{name}: the wide kernel did not run");
                super::super::emulate_in_reverse(true);
                let reverse = (prefill(&g), decode(&g));
                super::super::emulate_in_reverse(false);
                assert!(reverse == wide, "{name}: the wide kernel depends on the thread order");
            }
            g.dev.narrow_rows = true;
            let runs = [
                ("one prefill", &whole),
                ("5 + 36", &parts),
                ("decoding", &stepped),
                ("a block per row", &off),
                ("tiles of 16", &smaller[0]),
                ("tiles of 8", &smaller[1]),
                ("wide kernel prefill", &wide.0),
                ("wide kernel decoding", &wide.1),
            ];
            for (what, got) in runs {
                assert_eq!(got.len(), want.len(), "{name} {what}");
                for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                    let err = (x - y).abs() / y.abs().max(1.0);
                    assert!(err <= 1e-5, "{name} {what} [{i}]: {x} against {y}");
                }
            }
        }
    }

    /// DeepSeek's real latent rows: 576 wide (kv_lora_rank 512 + rope 64), past
    /// `swk_attention_rows`' 256, so `swk_attention_rows_wide` runs them, the four heads of
    /// the one shared row in a block, each tile read once for keys and values. A random
    /// model of those widths (hidden 64, 2 layers, f32): a 20-token prefill, then decoding
    /// with splits of at least 3 keys, give the logits of a block per row and head
    /// (`set_attention_blocks(false)`) within 1e-4 of the largest logit; on the emulator
    /// the wide kernel runs and reversed thread order gives the same bits.
    #[test]
    fn wide_latent_rows_match_a_block_a_row() {
        if !cuda_available() {
            eprintln!("skipped: no CUDA device");
            return;
        }
        let dir = tempfile::tempdir().expect("temporary directory");
        let tiny = super::super::tiny_fixture("deepseek_v3");
        let text = std::fs::read_to_string(format!("{tiny}/config.json")).expect("config");
        let mut json: serde_json::Value = serde_json::from_str(&text).expect("json");
        json["kv_lora_rank"] = 512.into();
        json["qk_rope_head_dim"] = 64.into();
        json["qk_head_dim"] = (json["qk_nope_head_dim"].as_u64().expect("nope") + 64).into();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json.to_string()).expect("config written");
        let c = crate::model::ModelConfig::from_hf_json(&path).expect("config");
        assert_eq!(kv_cache_widths(&c), (576, 0));
        let opts = CudaOptions { dtype: WeightDtype::F32, ..Default::default() };
        let mut g = CudaModel::random(&c, 7, &opts).expect("random model");
        let v = c.vocab_size as u32;
        let tokens: Vec<u32> = (0..26).map(|i| (i * 37 + 11) % v).collect();
        let run = |g: &CudaModel| {
            let mut cache = CudaKvCache::new(g);
            let mut rows = g.forward(&tokens[..20], &mut cache, None, Logits::All).expect("20");
            for &t in &tokens[20..] {
                rows.extend(g.forward(&[t], &mut cache, None, Logits::Last).expect("decode"));
            }
            rows
        };
        g.set_attention_blocks(false);
        let want = run(&g);
        g.set_attention_blocks(true);
        g.dev.split_keys = 3;
        #[cfg(not(feature = "cuda"))]
        let before = g.dev.launches_of("swk_attention_rows_wide");
        let got = run(&g);
        #[cfg(not(feature = "cuda"))]
        {
            assert!(g.dev.launches_of("swk_attention_rows_wide") > before, "no wide row blocks");
            super::super::emulate_in_reverse(true);
            let reverse = run(&g);
            super::super::emulate_in_reverse(false);
            assert!(reverse == got, "the wide kernel depends on the thread order");
        }
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = got.iter().zip(&want).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
        assert!(scale > 0.0 && err <= 1e-4, "max error {err:.2e} of the largest logit {scale}");
    }

    /// Decoding with more keys than a split holds splits each row's keys over blocks
    /// (`swk_attention_split`, or `swk_attention_rows` for the heads of a KV head) and merges
    /// them (`swk_attention_merge`): with splits of at least 3 keys, a token-by-token decode
    /// of 17 tokens (up to 6 splits) gives the logits of a block per row and head
    /// (`set_attention_blocks(false)`) within 1e-5 (f32 weights): sliding windows (Mistral,
    /// Gemma 2, Phi-3), soft-capping, two heads a KV head, separate heads (GPT-2), and
    /// DeepSeek-V3's absorbed latent attention (its heads grouped on their one shared row),
    /// in `swk_attention_rows` and in `swk_attention_rows_wide`. On the emulator the split
    /// runs, and reversed thread order gives the same bits.
    #[test]
    fn split_decoding_matches_a_block_a_row() {
        if !cuda_available() {
            eprintln!("skipped: no CUDA device");
            return;
        }
        for name in ["llama", "mistral", "gemma2", "phi3", "gpt2", "deepseek_v3"] {
            let m = Model::load(&super::super::tiny_fixture(name)).expect("tiny fixture");
            let v = m.config.vocab_size as u32;
            let tokens: Vec<u32> = (0..17).map(|i| (i * 37 + 11) % v).collect();
            let opts = CudaOptions { dtype: WeightDtype::F32, ..Default::default() };
            let mut g = CudaModel::new(&m, &opts).expect("upload");
            let decode = |g: &CudaModel| {
                let mut cache = CudaKvCache::new(g);
                let mut rows = g.forward(&tokens[..2], &mut cache, None, Logits::Last);
                for &t in &tokens[2..] {
                    let row = g.forward(&[t], &mut cache, None, Logits::Last).expect("decode");
                    rows.as_mut().expect("prefill").extend(row);
                }
                rows.expect("prefill")
            };
            g.set_attention_blocks(false);
            let want = decode(&g);
            g.set_attention_blocks(true);
            let default_keys = g.dev.split_keys;
            g.dev.split_keys = 3;
            #[cfg(not(feature = "cuda"))]
            let before = g.dev.launches_of("swk_attention_merge");
            let got = decode(&g);
            #[cfg(not(feature = "cuda"))]
            {
                assert!(g.dev.launches_of("swk_attention_merge") > before, "{name}: no split");
                super::super::emulate_in_reverse(true);
                let reverse = decode(&g);
                super::super::emulate_in_reverse(false);
                assert!(reverse == got, "{name}: the split depends on the thread order");
            }
            g.dev.narrow_rows = false;
            let wide = decode(&g);
            g.dev.narrow_rows = true;
            g.dev.split_keys = default_keys;
            for (what, got) in [("split", &got), ("wide kernel split", &wide)] {
                assert_eq!(got.len(), want.len(), "{name} {what}");
                for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                    let err = (x - y).abs() / y.abs().max(1.0);
                    assert!(err <= 1e-5, "{name} {what} [{i}]: {x} against {y}");
                }
            }
        }
    }
}
