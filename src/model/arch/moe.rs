//! Mixture-of-experts families: Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE.
//!
//! Pre-norm blocks. Attention as in the dense relative: Mixtral as Mistral (optional sliding
//! window), OLMoE with RMSNorm over the whole q and k projections (OLMo 2 style) and optional
//! q/k/v clipping, Qwen2-MoE with q/k/v biases, Qwen3-MoE with RMSNorm on each q/k head. Then,
//! on `h = rmsnorm(x)` (`post_attention_layernorm`):
//!
//! * router: `p = softmax(h · W_gateᵀ)` over the experts (`mlp.gate.weight`, `[E, hidden]`);
//!   each token goes to the `top_k` experts of largest `p` with weights `p_e`, divided by
//!   their sum when `norm_topk_prob` (always for Mixtral);
//! * expert `e`: `y_e = down_e(silu(gate_e(h)) ⊙ up_e(h))`; the block writes
//!   `Σ_e w_e · y_e` into the residual stream;
//! * Qwen2-MoE adds a shared expert on every token, scaled by
//!   `sigmoid(h · shared_expert_gateᵀ)`;
//! * layers that are not sparse (Qwen's `mlp_only_layers`, `decoder_sparse_step`) run a dense
//!   MLP (`mlp.gate_proj/up_proj/down_proj`).
//!
//! Weights are held per expert under Hugging Face's per-expert names,
//! `model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`, so that an edit addresses one
//! expert's weight. [`normalize_hf`] maps the other layouts onto these names: Mixtral's
//! legacy `block_sparse_moe.experts.E.w1/w3/w2` and transformers 5's fused 3-D
//! `mlp.experts.gate_up_proj` `[E, 2I, H]` (gate first) / `mlp.experts.down_proj` `[E, H, I]`.
//!
//! Hooks in a sparse layer: `hook_resid_pre`, `attn.hook_pattern`, `hook_attn_out`,
//! `hook_resid_mid`, `hook_mlp_out` (the block's whole output) and `hook_resid_post`; the
//! `mlp.hook_pre/_pre_linear/_post` points have no single tensor there and do not fire.
//! Spike statistics of a sparse layer: `output` is what the block writes (fused into the
//! residual add), `input` stays empty; per expert, [`ExpertSpikes`] count the tokens routed to
//! it and take the max |down_proj input| per column and max |down_proj output| per row (before
//! the routing weight), and the layer sums the router's entropy.
//!
//! [`ExpertSpikes`]: crate::hooks::ExpertSpikes

use crate::backend::cpu::{self, AttnParams};
use crate::hooks::{ChannelMax, ExpertSpikes, HookKind};
use crate::model::arch::shared::{self, hook};
use crate::model::arch::{ForwardOptions, Input, KvCache};
use crate::model::config::MoeParams;
use crate::model::{Architecture, Model, ModelConfig, Tensor, Weights};
use crate::{Error, Result};

/// The name of expert `e`'s projection `what` (`gate_proj`, `up_proj`, `down_proj`) in layer
/// `l`: `model.layers.{l}.mlp.experts.{e}.{what}.weight`.
pub fn expert_name(l: usize, e: usize, what: &str) -> String {
    format!("model.layers.{l}.mlp.experts.{e}.{what}.weight")
}

/// The shared experts' down_proj of layer `l`: DeepSeek's `mlp.shared_experts`, Qwen2-MoE's
/// `mlp.shared_expert`.
pub fn shared_down_name(arch: Architecture, l: usize) -> String {
    let part = if arch.is_deepseek() { "shared_experts" } else { "shared_expert" };
    format!("model.layers.{l}.mlp.{part}.down_proj.weight")
}

/// Fold the shared experts' down_proj input `a` (`[t, si]`) and output `y` (`[t, h]`, before
/// any gate) into layer `l`'s `shared` statistics, when statistics are gathered.
pub(crate) fn shared_stats(
    opts: &mut ForwardOptions<'_, '_>,
    l: usize,
    a: &[f32],
    y: &[f32],
    (si, h): (usize, usize),
    pos0: usize,
) {
    let Some(s) = opts.stats.as_deref_mut() else { return };
    let t = y.len() / h.max(1);
    let sh = s.layers[l].shared.get_or_insert_with(|| ExpertSpikes {
        input: vec![ChannelMax::default(); si],
        output: vec![ChannelMax::default(); h],
        ..Default::default()
    });
    sh.selected += t as u64;
    sh.weight_sum += t as f64;
    cpu::column_max(a, si, pos0, &mut sh.input);
    cpu::column_max(y, h, pos0, &mut sh.output);
}

/// The router weight of layer `l`: `model.layers.{l}.mlp.gate.weight`, `[experts, hidden]`.
pub fn router_name(l: usize) -> String {
    format!("model.layers.{l}.mlp.gate.weight")
}

/// The MoE settings of a model, or an error for a dense one.
pub fn params(c: &ModelConfig) -> Result<&MoeParams> {
    c.family.moe.as_ref().ok_or_else(|| {
        Error::Invalid(format!("{} is not a mixture-of-experts model", c.architecture.name()))
    })
}

/// One tensor swk holds, cut from a checkpoint tensor ([`hf_parts`]): its name, shape, and
/// the element of the stored tensor it starts at.
#[derive(Debug, Clone, PartialEq)]
pub struct HfPart {
    /// swk's (HF per-expert) name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its first element's index in the stored tensor (its elements follow contiguously).
    pub offset: usize,
}

/// What swk holds of a checkpoint tensor `name` of shape `shape`, in the per-expert names
/// above: Mixtral's `block_sparse_moe.gate` and `block_sparse_moe.experts.E.w1/w3/w2` are
/// `mlp.gate` and `mlp.experts.E.gate_proj/up_proj/down_proj`; a fused
/// `mlp.experts.gate_up_proj` `[E, 2I, H]` is each expert's gate then up, a fused
/// `mlp.experts.down_proj` `[E, H, I]` each expert's down, every part a contiguous run of the
/// stored elements. Every other tensor is itself. Errors for a fused tensor of other shape.
pub fn hf_parts(c: &ModelConfig, name: &str, shape: &[usize]) -> Result<Vec<HfPart>> {
    let whole = |name: String| vec![HfPart { name, shape: shape.to_vec(), offset: 0 }];
    let renamed = name
        .replace(".block_sparse_moe.gate.", ".mlp.gate.")
        .replace(".block_sparse_moe.experts.", ".mlp.experts.");
    let fused = crate::backend::stream::split_layer_name(&renamed)
        .and_then(|(l, suffix)| Some((l, suffix.strip_prefix("mlp.experts.")?)))
        .filter(|(_, what)| matches!(*what, "gate_up_proj" | "down_proj"));
    let (Some((l, what)), Some(moe)) = (fused, c.family.moe.as_ref()) else {
        if !renamed.contains(".mlp.experts.") {
            return Ok(whole(renamed));
        }
        return Ok(whole(
            renamed
                .replace(".w1.weight", ".gate_proj.weight")
                .replace(".w3.weight", ".up_proj.weight")
                .replace(".w2.weight", ".down_proj.weight"),
        ));
    };
    let (h, ei, n) = (c.hidden_size, moe.expert_intermediate, moe.num_experts);
    let (want, parts): ([usize; 3], &[&str]) = match what {
        "gate_up_proj" => ([n, 2 * ei, h], &["gate_proj", "up_proj"]),
        _ => ([n, h, ei], &["down_proj"]),
    };
    if shape != want {
        return Err(Error::tensor(name, format!("expected shape {want:?}, found {shape:?}")));
    }
    let per = ei * h;
    let part_shape = if what == "down_proj" { vec![h, ei] } else { vec![ei, h] };
    let mut out = Vec::with_capacity(n * parts.len());
    for e in 0..n {
        for (j, p) in parts.iter().enumerate() {
            let offset = (e * parts.len() + j) * per;
            out.push(HfPart { name: expert_name(l, e, p), shape: part_shape.clone(), offset });
        }
    }
    Ok(out)
}

/// Bring MoE checkpoints to the per-expert names above ([`hf_parts`]): renamed tensors move,
/// fused ones are split per expert.
pub fn normalize_hf(c: &ModelConfig, w: &mut Weights) -> Result<()> {
    let names: Vec<String> = w.names().map(str::to_string).collect();
    for name in names {
        let parts = hf_parts(c, &name, &w.get(&name)?.shape)?;
        if parts.len() == 1 && parts[0].name == name {
            continue;
        }
        let Some(t) = w.remove(&name) else { continue };
        for p in parts {
            let len: usize = p.shape.iter().product();
            let data = t.data.get(p.offset..p.offset + len).ok_or_else(|| {
                Error::tensor(&name, format!("has no elements {}..{}", p.offset, p.offset + len))
            })?;
            let piece = Tensor::new(&p.name, p.shape, data.to_vec(), &t.source_dtype)?;
            w.insert(p.name, piece);
        }
    }
    Ok(())
}

/// Check names and shapes of every tensor the forward pass reads.
pub fn validate(model: &Model) -> Result<()> {
    let c = &model.config;
    let w = &model.weights;
    let moe = params(c)?;
    let (h, i, ei) = (c.hidden_size, c.intermediate_size, moe.expert_intermediate);
    let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    if moe.top_k == 0 || moe.top_k > moe.num_experts {
        return Err(Error::Invalid(format!(
            "top-{} routing over {} experts",
            moe.top_k, moe.num_experts
        )));
    }
    shared::validate_embed_and_head(w, c)?;
    w.get_shaped("model.norm.weight", &[h])?;
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        w.get_shaped(&format!("{p}.input_layernorm.weight"), &[h])?;
        w.get_shaped(&format!("{p}.post_attention_layernorm.weight"), &[h])?;
        for (what, rows) in [("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)] {
            w.get_shaped(&format!("{p}.self_attn.{what}.weight"), &[rows, h])?;
            if c.attention_bias {
                w.get_shaped(&format!("{p}.self_attn.{what}.bias"), &[rows])?;
            }
        }
        w.get_shaped(&format!("{p}.self_attn.o_proj.weight"), &[h, qd])?;
        match c.architecture {
            Architecture::Olmoe => {
                w.get_shaped(&format!("{p}.self_attn.q_norm.weight"), &[qd])?;
                w.get_shaped(&format!("{p}.self_attn.k_norm.weight"), &[kvd])?;
            }
            Architecture::Qwen3Moe => {
                w.get_shaped(&format!("{p}.self_attn.q_norm.weight"), &[c.head_dim])?;
                w.get_shaped(&format!("{p}.self_attn.k_norm.weight"), &[c.head_dim])?;
            }
            _ => {}
        }
        if !moe.is_sparse(l) {
            w.get_shaped(&format!("{p}.mlp.gate_proj.weight"), &[i, h])?;
            w.get_shaped(&format!("{p}.mlp.up_proj.weight"), &[i, h])?;
            w.get_shaped(&format!("{p}.mlp.down_proj.weight"), &[h, i])?;
            continue;
        }
        w.get_shaped(&router_name(l), &[moe.num_experts, h])?;
        for e in 0..moe.num_experts {
            w.get_shaped(&expert_name(l, e, "gate_proj"), &[ei, h])?;
            w.get_shaped(&expert_name(l, e, "up_proj"), &[ei, h])?;
            w.get_shaped(&expert_name(l, e, "down_proj"), &[h, ei])?;
        }
        if let Some(si) = moe.shared_expert_intermediate {
            w.get_shaped(&format!("{p}.mlp.shared_expert.gate_proj.weight"), &[si, h])?;
            w.get_shaped(&format!("{p}.mlp.shared_expert.up_proj.weight"), &[si, h])?;
            w.get_shaped(&format!("{p}.mlp.shared_expert.down_proj.weight"), &[h, si])?;
            w.get_shaped(&format!("{p}.mlp.shared_expert_gate.weight"), &[1, h])?;
        }
    }
    Ok(())
}

/// One token's routing: the chosen experts (largest probability first) and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Expert indices, by decreasing router probability.
    pub experts: Vec<usize>,
    /// Their routing weights (the softmax probabilities, renormalized when configured).
    pub weights: Vec<f32>,
    /// Entropy of the router's softmax over all experts, in nats.
    pub entropy: f64,
}

/// Route one token from its router logits: softmax, top-k (ties to the lower index), and
/// renormalization of the kept probabilities when `renormalize`.
pub fn route(logits: &[f32], top_k: usize, renormalize: bool) -> Route {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&z| (z - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    let probs: Vec<f32> = exps.iter().map(|e| e / sum).collect();
    let entropy =
        -probs.iter().filter(|&&p| p > 0.0).map(|&p| p as f64 * (p as f64).ln()).sum::<f64>();
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order.truncate(top_k);
    let mut weights: Vec<f32> = order.iter().map(|&e| probs[e]).collect();
    if renormalize {
        let s: f32 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= s);
    }
    Route { experts: order, weights, entropy }
}

/// `silu(xs · W_gateᵀ) ⊙ (xs · W_upᵀ)` then `· W_downᵀ` for `rows` rows: a SwiGLU MLP of
/// width `i`. Returns (activation `[rows, i]`, output `[rows, h]`).
pub(crate) fn swiglu(
    w: &Weights,
    prefix: &str,
    xs: &[f32],
    rows: usize,
    h: usize,
    i: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (mut g, mut u, mut a) = (vec![0f32; rows * i], vec![0f32; rows * i], vec![0f32; rows * i]);
    cpu::linear(xs, &w.get(&format!("{prefix}.gate_proj.weight"))?.data, None, &mut g, rows, h, i);
    cpu::linear(xs, &w.get(&format!("{prefix}.up_proj.weight"))?.data, None, &mut u, rows, h, i);
    cpu::silu_mul(&g, &u, &mut a, i, 0, None);
    let mut y = vec![0f32; rows * h];
    cpu::linear(&a, &w.get(&format!("{prefix}.down_proj.weight"))?.data, None, &mut y, rows, i, h);
    Ok((a, y))
}

/// Fold one row into per-channel maxima at token position `position`.
fn fold_row(stats: &mut [ChannelMax], row: &[f32], position: usize) {
    cpu::column_max(row, row.len(), position, stats);
}

/// The sparse MLP of layer `l` on normalized rows `xn` (`[t, h]`, first at `pos0`): returns
/// what it writes into the residual stream, and feeds the expert statistics.
fn sparse_mlp(
    model: &Model,
    opts: &mut ForwardOptions<'_, '_>,
    l: usize,
    xn: &[f32],
    pos0: usize,
) -> Result<Vec<f32>> {
    let c = &model.config;
    let w = &model.weights;
    let moe = params(c)?;
    let (h, ne) = (c.hidden_size, moe.num_experts);
    let t = xn.len() / h;
    let mut logits = vec![0f32; t * ne];
    cpu::linear(xn, &w.get(&router_name(l))?.data, None, &mut logits, t, h, ne);
    let routes: Vec<Route> =
        logits.chunks(ne).map(|z| route(z, moe.top_k, moe.norm_topk_prob)).collect();
    let mut out = routed_experts(model, opts, l, xn, pos0, &routes)?;

    if let Some(si) = moe.shared_expert_intermediate {
        let prefix = format!("model.layers.{l}.mlp.shared_expert");
        let (a, y) = swiglu(w, &prefix, xn, t, h, si)?;
        shared_stats(opts, l, &a, &y, (si, h), pos0);
        let mut g = vec![0f32; t];
        let gw = &w.get(&format!("model.layers.{l}.mlp.shared_expert_gate.weight"))?.data;
        cpu::linear(xn, gw, None, &mut g, t, h, 1);
        for (tok, &z) in g.iter().enumerate() {
            let s = 1.0 / (1.0 + (-z).exp());
            let o = &mut out[tok * h..(tok + 1) * h];
            o.iter_mut().zip(&y[tok * h..(tok + 1) * h]).for_each(|(o, y)| *o += s * y);
        }
    }
    Ok(out)
}

/// `Σ_e w_e · y_e` per token of `xn` (`[t, h]`, first at `pos0`) over the experts `routes`
/// give it, in layer `l`: each expert runs once on the tokens routed to it. Feeds the layer's
/// router counters (tokens, entropy) and each expert's [`ExpertSpikes`].
pub(crate) fn routed_experts(
    model: &Model,
    opts: &mut ForwardOptions<'_, '_>,
    l: usize,
    xn: &[f32],
    pos0: usize,
    routes: &[Route],
) -> Result<Vec<f32>> {
    let c = &model.config;
    let w = &model.weights;
    let moe = params(c)?;
    let (h, ei, ne) = (c.hidden_size, moe.expert_intermediate, moe.num_experts);
    let t = xn.len() / h;
    let mut stats = opts.stats.as_deref_mut().map(|s| &mut s.layers[l]);
    if let Some(s) = stats.as_deref_mut() {
        if s.experts.len() != ne {
            s.experts = (0..ne)
                .map(|_| ExpertSpikes {
                    input: vec![ChannelMax::default(); ei],
                    output: vec![ChannelMax::default(); h],
                    ..Default::default()
                })
                .collect();
        }
        s.routed_tokens += t as u64;
        s.router_entropy_sum += routes.iter().map(|r| r.entropy).sum::<f64>();
    }

    let mut out = vec![0f32; t * h];
    for e in 0..ne {
        // The tokens routed to e, with their weights.
        let picks: Vec<(usize, f32)> = routes
            .iter()
            .enumerate()
            .filter_map(|(tok, r)| {
                r.experts.iter().position(|&x| x == e).map(|k| (tok, r.weights[k]))
            })
            .collect();
        if picks.is_empty() {
            continue;
        }
        let n = picks.len();
        let mut xs = Vec::with_capacity(n * h);
        for &(tok, _) in &picks {
            xs.extend_from_slice(&xn[tok * h..(tok + 1) * h]);
        }
        let (a, y) = swiglu(w, &format!("model.layers.{l}.mlp.experts.{e}"), &xs, n, h, ei)?;
        if let Some(s) = stats.as_deref_mut() {
            let es = &mut s.experts[e];
            es.selected += n as u64;
            for (r, &(tok, wt)) in picks.iter().enumerate() {
                es.weight_sum += wt as f64;
                fold_row(&mut es.input, &a[r * ei..(r + 1) * ei], pos0 + tok);
                fold_row(&mut es.output, &y[r * h..(r + 1) * h], pos0 + tok);
            }
        }
        for (r, &(tok, wt)) in picks.iter().enumerate() {
            let o = &mut out[tok * h..(tok + 1) * h];
            o.iter_mut().zip(&y[r * h..(r + 1) * h]).for_each(|(o, y)| *o += y * wt);
        }
    }
    Ok(out)
}

/// The forward pass. See the module docs for the math of one block.
pub fn forward(
    model: &Model,
    input: Input<'_>,
    cache: &mut KvCache,
    mut opts: ForwardOptions<'_, '_>,
) -> Result<Vec<f32>> {
    let c = &model.config;
    let w = &model.weights;
    let moe = params(c)?;
    let (h, i, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps);
    let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let (qd, kvd) = (nh * hd, nkv * hd);
    let inv_freq = shared::inv_freq(c, c.rope_theta, true);
    let weight = |name: &str| -> Result<&[f32]> { Ok(&w.get(&format!("{name}.weight"))?.data) };
    let bias = |name: &str| -> Result<Option<&[f32]>> {
        Ok(if c.attention_bias { Some(&w.get(&format!("{name}.bias"))?.data) } else { None })
    };

    let (mut x, pos0, first) = shared::input_stream(w, input, cache.len, h)?;
    let t = x.len() / h;
    let mut xn = vec![0f32; t * h];
    let (mut q, mut k, mut v) = (vec![0f32; t * qd], vec![0f32; t * kvd], vec![0f32; t * kvd]);
    let mut att = vec![0f32; t * qd];
    let mut proj = vec![0f32; t * h];

    for l in first..c.num_layers {
        let p = format!("model.layers.{l}");
        let (qn, kn, vn) = (
            format!("{p}.self_attn.q_proj"),
            format!("{p}.self_attn.k_proj"),
            format!("{p}.self_attn.v_proj"),
        );
        hook(&mut opts.hooks, l, HookKind::ResidPre, &mut x, h, pos0);

        // Attention: q, k, v of rmsnorm(x), family QK-norm / clipping, RoPE, softmax attention.
        cpu::rmsnorm(&x, weight(&format!("{p}.input_layernorm"))?, eps, &mut xn, h);
        cpu::linear(&xn, weight(&qn)?, bias(&qn)?, &mut q, t, h, qd);
        cpu::linear(&xn, weight(&kn)?, bias(&kn)?, &mut k, t, h, kvd);
        cpu::linear(&xn, weight(&vn)?, bias(&vn)?, &mut v, t, h, kvd);
        match c.architecture {
            Architecture::Olmoe => {
                cpu::rmsnorm_in_place(&mut q, weight(&format!("{p}.self_attn.q_norm"))?, eps, qd);
                cpu::rmsnorm_in_place(&mut k, weight(&format!("{p}.self_attn.k_norm"))?, eps, kvd);
            }
            Architecture::Qwen3Moe => {
                cpu::rmsnorm_in_place(&mut q, weight(&format!("{p}.self_attn.q_norm"))?, eps, hd);
                cpu::rmsnorm_in_place(&mut k, weight(&format!("{p}.self_attn.k_norm"))?, eps, hd);
            }
            _ => {}
        }
        if let Some(clip) = c.family.clip_qkv {
            for buf in [&mut q, &mut k, &mut v] {
                cpu::clamp(buf, clip as f32);
            }
        }
        cpu::rope(&mut q, &inv_freq, pos0, nh, hd);
        cpu::rope(&mut k, &inv_freq, pos0, nkv, hd);
        let params =
            AttnParams { scale: c.attention_scale(l), window: c.layer_window(l), softcap: None };
        shared::attend(&mut opts, cache, c, l, pos0, &q, &k, &v, &mut att, params);
        cpu::linear(&att, weight(&format!("{p}.self_attn.o_proj"))?, None, &mut proj, t, qd, h);
        hook(&mut opts.hooks, l, HookKind::AttnOut, &mut proj, h, pos0);
        cpu::add_residual(&mut x, &proj, h, pos0, None);
        hook(&mut opts.hooks, l, HookKind::ResidMid, &mut x, h, pos0);

        // MLP on rmsnorm(x): routed experts (plus the shared expert), or a dense SwiGLU.
        cpu::rmsnorm(&x, weight(&format!("{p}.post_attention_layernorm"))?, eps, &mut xn, h);
        let mut y = if moe.is_sparse(l) {
            sparse_mlp(model, &mut opts, l, &xn, pos0)?
        } else {
            shared::gated_mlp(w, &mut opts, l, &xn, (h, i), c.family.hidden_act, pos0)?
        };
        shared::mlp_write(&mut opts, l, &mut x, &mut y, h, pos0);
        hook(&mut opts.hooks, l, HookKind::ResidPost, &mut x, h, pos0);
    }
    cache.len = pos0 + t;

    let final_norm = &w.get("model.norm.weight")?.data;
    Ok(shared::lm_head(
        &x,
        h,
        c.vocab_size,
        opts.logits,
        &w.get(shared::head_name(model))?.data,
        None,
        None,
        |x, out| cpu::rmsnorm(x, final_norm, eps, out, h),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_picks_top_k_and_renormalizes() {
        let r = route(&[0.0, 2.0, 1.0, -1.0], 2, false);
        assert_eq!(r.experts, vec![1, 2]);
        let z: f32 = [0.0f32, 2.0, 1.0, -1.0].iter().map(|v| v.exp()).sum();
        assert!((r.weights[0] - 2f32.exp() / z).abs() < 1e-6);
        assert!((r.weights[1] - 1f32.exp() / z).abs() < 1e-6);
        let n = route(&[0.0, 2.0, 1.0, -1.0], 2, true);
        assert!((n.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((n.weights[0] / n.weights[1] - 1f32.exp()).abs() < 1e-5);
        // Uniform logits: entropy ln(4), ties go to the lower index.
        let u = route(&[0.5; 4], 3, true);
        assert_eq!(u.experts, vec![0, 1, 2]);
        assert!((u.entropy - 4f64.ln()).abs() < 1e-6);
    }

    /// Checkpoint tensors map onto per-expert names: Mixtral's renamed, fused stacks cut into
    /// contiguous runs (gate before up), the rest as stored; a fused stack of other shape is
    /// refused by name.
    #[test]
    fn hf_parts_rename_and_cut() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/olmoe/config.json");
        let c = ModelConfig::from_hf_json(std::path::Path::new(root)).unwrap();
        let m = c.family.moe.clone().unwrap();
        let (h, ei, n) = (c.hidden_size, m.expert_intermediate, m.num_experts);
        let one = |name: &str, shape: &[usize]| {
            let p = hf_parts(&c, name, shape).unwrap();
            assert_eq!(p.len(), 1, "{name}");
            (p[0].name.clone(), p[0].shape.clone(), p[0].offset)
        };
        let w2 = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
        assert_eq!(one(w2, &[h, ei]), (expert_name(1, 3, "down_proj"), vec![h, ei], 0));
        let gate = "model.layers.0.block_sparse_moe.gate.weight";
        assert_eq!(one(gate, &[n, h]).0, "model.layers.0.mlp.gate.weight");
        let q = "model.layers.0.self_attn.q_proj.weight";
        assert_eq!(one(q, &[h, h]), (q.to_string(), vec![h, h], 0));

        let gu = hf_parts(&c, "model.layers.1.mlp.experts.gate_up_proj", &[n, 2 * ei, h]).unwrap();
        assert_eq!(gu.len(), 2 * n);
        assert_eq!(
            (gu[2].name.as_str(), gu[2].offset),
            (expert_name(1, 1, "gate_proj").as_str(), 2 * ei * h)
        );
        assert_eq!(
            (gu[3].name.as_str(), gu[3].offset),
            (expert_name(1, 1, "up_proj").as_str(), 3 * ei * h)
        );
        assert!(gu.iter().all(|p| p.shape == [ei, h]));
        let down = hf_parts(&c, "model.layers.1.mlp.experts.down_proj", &[n, h, ei]).unwrap();
        assert_eq!(down.len(), n);
        assert_eq!(
            (down[n - 1].offset, down[n - 1].shape.clone()),
            ((n - 1) * h * ei, vec![h, ei])
        );
        let e = hf_parts(&c, "model.layers.1.mlp.experts.down_proj", &[n, ei, h]).unwrap_err();
        assert!(
            e.to_string().contains("mlp.experts.down_proj")
                && e.to_string().contains("expected shape"),
            "{e}"
        );
    }
}
