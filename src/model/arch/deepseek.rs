//! DeepSeek-V2 and DeepSeek-V3: multi-head latent attention (MLA) and mixture-of-experts MLPs
//! with always-on shared experts, as transformers 5.24 computes them.
//!
//! Pre-norm blocks. Attention on `xn = rmsnorm(x)` (`input_layernorm`), per head `n` of
//! `num_heads` (`d_nope = qk_nope_head_dim`, `d_rope = qk_rope_head_dim`, `d_v = v_head_dim`):
//!
//! * `q = q_b_proj(rmsnorm(q_a_proj(xn)))` (`q_a_layernorm`), or `q_proj(xn)` when
//!   `q_lora_rank` is null; each head is `[q_nope (d_nope) | q_rope (d_rope)]`;
//! * `[c (kv_lora_rank) | k_rope (d_rope)] = kv_a_proj_with_mqa(xn)`; `c` is normalized
//!   (`kv_a_layernorm`) and `kv_b_proj(c)` gives per head `[k_nope (d_nope) | v (d_v)]`; the
//!   rope key `k_rope` is shared by every head;
//! * RoPE (base `rope_theta`, over `d_rope` dims) rotates `q_rope` and `k_rope` only, on the
//!   interleaved pairs `(2i, 2i+1)` (V2 always, V3 with `rope_interleave`; otherwise on the
//!   halves `(i, i + d_rope/2)`). transformers' V3 writes the rotated pairs de-interleaved,
//!   the same permutation for q and k, which leaves every score unchanged;
//! * `att = softmax(q·k / √(d_nope + d_rope) + causal mask) · v`, then `o_proj`. With YaRN
//!   `rope_scaling` ([`Yarn`]) the frequencies are blended, the rotated dims scaled by the
//!   attention factor and the softmax scale by `mscale(factor, mscale_all_dim)²`.
//!   The two small norms use transformers' fixed epsilon 1e-6. The KV cache holds the
//!   expanded per-head keys and values, each padded with zeros to `head_dim = max(d_nope +
//!   d_rope, d_v)` so that the shared attention step runs MLA as ordinary attention.
//!
//! MLP on `h = rmsnorm(x)` (`post_attention_layernorm`): the first `first_k_dense_replace`
//! layers run a dense SwiGLU (`mlp.gate_proj/up_proj/down_proj`). The others route:
//!
//! * router logits `z = h · W_gateᵀ` (`mlp.gate.weight`); V2 scores `s = softmax(z)`, V3
//!   `s = sigmoid(z)`, selected on `s + b` with V3's `mlp.gate.e_score_correction_bias` `b`;
//! * groups (V2 `topk_method: group_limited_greedy`: a group scores its best expert; V3: the
//!   sum of its two best): only the `topk_group` best of `n_group` groups compete;
//! * top-k experts; weights `s_e` (renormalized, plus 1e-20 in the divisor, with V3's
//!   `norm_topk_prob`; transformers' V2 router never renormalizes), times
//!   `routed_scaling_factor`;
//! * the block writes `Σ_e w_e · down_e(silu(gate_e(h)) ⊙ up_e(h))` plus the shared experts'
//!   SwiGLU `mlp.shared_experts.{gate,up,down}_proj` (`n_shared_experts ·
//!   moe_intermediate_size` wide, no gate).
//!
//! Routed experts live under the per-expert names of [`moe::expert_name`] (transformers 5
//! saves them so; a fused `gate_up_proj`/`down_proj` is split on load by
//! [`moe::normalize_hf`]), llama.cpp's split `attn_k_b`/`attn_v_b` are merged back into
//! `kv_b_proj` ([`merge_kv_b`]), so `--edit model.layers.L.mlp.experts.E.down_proj.weight[R,C]` and
//! `model.layers.L.mlp.shared_experts.down_proj.weight[R,C]` address single weights.
//!
//! Hooks and spike statistics as in [`moe`]: dense layers report `mlp.hook_pre/_pre_linear/
//! _post` and the usual down_proj input/output statistics; a sparse layer's `output` is the
//! block's whole write, its `input` stays empty, per routed expert [`ExpertSpikes`] carry
//! the expert index, and `shared` holds the same maxima for the shared experts' down_proj
//! (input per column, output per row before the sum). The router's entropy is that of the
//! scores `s` normalized to sum to 1.
//!
//! [`ExpertSpikes`]: crate::hooks::ExpertSpikes
//! [`Yarn`]: crate::model::config::Yarn

use crate::backend::cpu::{self, AttnParams};
use crate::hooks::HookKind;
use crate::model::arch::moe::{self, Route};
use crate::model::arch::shared::{self, hook};
use crate::model::arch::{ForwardOptions, Input, KvCache};
use crate::model::config::{DeepseekParams, GroupScore, MoeParams};
use crate::model::{Model, ModelConfig, Tensor, Weights};
use crate::{Error, Result};

/// Epsilon of `q_a_layernorm` and `kv_a_layernorm` (transformers builds them with its
/// default, not `rms_norm_eps`).
pub(crate) const LATENT_NORM_EPS: f64 = 1e-6;

/// The DeepSeek settings of a model, or an error for another family.
pub fn params(c: &ModelConfig) -> Result<&DeepseekParams> {
    c.family
        .deepseek
        .as_ref()
        .ok_or_else(|| Error::Invalid(format!("{} is not a DeepSeek model", c.architecture.name())))
}

/// The selection bias of layer `l`'s router (DeepSeek-V3):
/// `model.layers.{l}.mlp.gate.e_score_correction_bias`, `[experts]`.
pub fn bias_name(l: usize) -> String {
    format!("model.layers.{l}.mlp.gate.e_score_correction_bias")
}

/// `(layer, is_k)` of llama.cpp's split MLA tensors `blk.L.attn_k_b.weight` (`true`) and
/// `blk.L.attn_v_b.weight` (`false`).
pub fn split_kv_b_name(gguf_name: &str) -> Option<(usize, bool)> {
    let (layer, rest) = gguf_name.strip_prefix("blk.")?.split_once('.')?;
    let is_k = match rest {
        "attn_k_b.weight" => true,
        "attn_v_b.weight" => false,
        _ => return None,
    };
    Some((layer.parse().ok()?, is_k))
}

/// Rebuild HF's `kv_b_proj` (`[heads · (d_nope + d_v), kv_lora_rank]`, per head k_nope rows
/// then v rows) from llama.cpp's split `k_b` (`[heads, kv_lora_rank, d_nope]`, transposed per
/// head) and `v_b` (`[heads, d_v, kv_lora_rank]`) of every layer in `parts`; errors name
/// `path`.
pub fn merge_kv_b(
    c: &ModelConfig,
    parts: std::collections::BTreeMap<usize, (Option<Tensor>, Option<Tensor>)>,
    w: &mut Weights,
    path: &std::path::Path,
) -> Result<()> {
    for (l, (k, v)) in parts {
        let (Some(k), Some(v)) = (k, v) else {
            return Err(Error::format(
                path,
                format!("layer {l} has only one of attn_k_b / attn_v_b"),
            ));
        };
        let t = merge_kv_b_layer(c, l, &k, &v, path)?;
        w.insert(format!("model.layers.{l}.self_attn.kv_b_proj.weight"), t);
    }
    Ok(())
}

/// Layer `l`'s `kv_b_proj` from its split `k` and `v` (see [`merge_kv_b`]); errors name
/// `path`.
pub fn merge_kv_b_layer(
    c: &ModelConfig,
    l: usize,
    k: &Tensor,
    v: &Tensor,
    path: &std::path::Path,
) -> Result<Tensor> {
    let d = params(c)?;
    let (nh, nope, vd, kvr) = (c.num_heads, d.qk_nope_head_dim, d.v_head_dim, d.kv_lora_rank);
    if k.shape != [nh, kvr, nope] || v.shape != [nh, vd, kvr] {
        return Err(Error::format(
            path,
            format!(
                "layer {l}: attn_k_b {:?} / attn_v_b {:?}, expected {:?} / {:?}",
                k.shape,
                v.shape,
                [nh, kvr, nope],
                [nh, vd, kvr]
            ),
        ));
    }
    let mut data = Vec::with_capacity(nh * (nope + vd) * kvr);
    for n in 0..nh {
        let kh = &k.data[n * kvr * nope..(n + 1) * kvr * nope];
        for j in 0..nope {
            data.extend((0..kvr).map(|r| kh[r * nope + j]));
        }
        data.extend_from_slice(&v.data[n * vd * kvr..(n + 1) * vd * kvr]);
    }
    let name = format!("model.layers.{l}.self_attn.kv_b_proj.weight");
    Tensor::new(&name, vec![nh * (nope + vd), kvr], data, &k.source_dtype)
}

/// Check names and shapes of every tensor the forward pass reads.
pub fn validate(model: &Model) -> Result<()> {
    let c = &model.config;
    let w = &model.weights;
    let d = params(c)?;
    let m = moe::params(c)?;
    let (h, i, nh) = (c.hidden_size, c.intermediate_size, c.num_heads);
    let qk = d.qk_nope_head_dim + d.qk_rope_head_dim;
    if c.family.hidden_act != crate::model::config::HiddenAct::Silu {
        return Err(Error::Invalid(format!(
            "{}: only SiLU experts are supported",
            c.architecture.name()
        )));
    }
    if m.top_k == 0 || m.top_k > m.num_experts {
        return Err(Error::Invalid(format!(
            "top-{} routing over {} experts",
            m.top_k, m.num_experts
        )));
    }
    shared::validate_embed_and_head(w, c)?;
    w.get_shaped("model.norm.weight", &[h])?;
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let a = format!("{p}.self_attn");
        w.get_shaped(&format!("{p}.input_layernorm.weight"), &[h])?;
        w.get_shaped(&format!("{p}.post_attention_layernorm.weight"), &[h])?;
        match d.q_lora_rank {
            Some(r) => {
                w.get_shaped(&format!("{a}.q_a_proj.weight"), &[r, h])?;
                w.get_shaped(&format!("{a}.q_a_layernorm.weight"), &[r])?;
                w.get_shaped(&format!("{a}.q_b_proj.weight"), &[nh * qk, r])?;
            }
            None => {
                w.get_shaped(&format!("{a}.q_proj.weight"), &[nh * qk, h])?;
            }
        }
        let kvr = d.kv_lora_rank;
        w.get_shaped(&format!("{a}.kv_a_proj_with_mqa.weight"), &[kvr + d.qk_rope_head_dim, h])?;
        w.get_shaped(&format!("{a}.kv_a_layernorm.weight"), &[kvr])?;
        w.get_shaped(
            &format!("{a}.kv_b_proj.weight"),
            &[nh * (d.qk_nope_head_dim + d.v_head_dim), kvr],
        )?;
        w.get_shaped(&format!("{a}.o_proj.weight"), &[h, nh * d.v_head_dim])?;
        if !m.is_sparse(l) {
            w.get_shaped(&format!("{p}.mlp.gate_proj.weight"), &[i, h])?;
            w.get_shaped(&format!("{p}.mlp.up_proj.weight"), &[i, h])?;
            w.get_shaped(&format!("{p}.mlp.down_proj.weight"), &[h, i])?;
            continue;
        }
        let (ne, ei) = (m.num_experts, m.expert_intermediate);
        w.get_shaped(&moe::router_name(l), &[ne, h])?;
        if d.sigmoid && w.contains(&bias_name(l)) {
            w.get_shaped(&bias_name(l), &[ne])?;
        }
        for e in 0..ne {
            w.get_shaped(&moe::expert_name(l, e, "gate_proj"), &[ei, h])?;
            w.get_shaped(&moe::expert_name(l, e, "up_proj"), &[ei, h])?;
            w.get_shaped(&moe::expert_name(l, e, "down_proj"), &[h, ei])?;
        }
        if let Some(si) = m.shared_expert_intermediate {
            w.get_shaped(&format!("{p}.mlp.shared_experts.gate_proj.weight"), &[si, h])?;
            w.get_shaped(&format!("{p}.mlp.shared_experts.up_proj.weight"), &[si, h])?;
            w.get_shaped(&format!("{p}.mlp.shared_experts.down_proj.weight"), &[h, si])?;
        }
    }
    Ok(())
}

/// Route one token from its router logits `z` (and V3's selection bias): scores, group
/// limit, top-k, weights — see the module docs. Ties go to the lower index.
pub fn route(z: &[f32], bias: Option<&[f32]>, d: &DeepseekParams, m: &MoeParams) -> Route {
    let ne = z.len();
    let scores: Vec<f32> = if d.sigmoid {
        z.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect()
    } else {
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = z.iter().map(|&v| (v - max).exp()).collect();
        let s: f32 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    };
    let total: f64 = scores.iter().map(|&s| s as f64).sum();
    let entropy = -scores
        .iter()
        .map(|&s| s as f64 / total)
        .filter(|&p| p > 0.0)
        .map(|p| p * p.ln())
        .sum::<f64>();
    let mut choice: Vec<f32> = match bias {
        Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        None => scores.clone(),
    };
    if d.group_score != GroupScore::None && d.n_group > 1 {
        let per = ne / d.n_group;
        let group_scores: Vec<f32> = choice
            .chunks(per)
            .map(|g| {
                let mut v = g.to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                match d.group_score {
                    GroupScore::Max => v[0],
                    _ => v.iter().take(2).sum(),
                }
            })
            .collect();
        let mut order: Vec<usize> = (0..d.n_group).collect();
        order.sort_by(|&a, &b| group_scores[b].total_cmp(&group_scores[a]).then(a.cmp(&b)));
        // transformers masks dropped experts to 0 (V2, softmax scores) or -inf (V3).
        let masked = if d.sigmoid { f32::NEG_INFINITY } else { 0.0 };
        for &g in &order[d.topk_group.min(d.n_group)..] {
            choice[g * per..(g + 1) * per].iter_mut().for_each(|c| *c = masked);
        }
    }
    let mut experts: Vec<usize> = (0..ne).collect();
    experts.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
    experts.truncate(m.top_k);
    let mut weights: Vec<f32> = experts.iter().map(|&e| scores[e]).collect();
    if m.norm_topk_prob {
        let s: f32 = weights.iter().sum::<f32>() + 1e-20;
        weights.iter_mut().for_each(|w| *w /= s);
    }
    let rsf = d.routed_scaling_factor as f32;
    weights.iter_mut().for_each(|w| *w *= rsf);
    Route { experts, weights, entropy }
}

/// RoPE of the rotated dims: inverse frequencies, and the factor on cos and sin (YaRN's
/// attention factor, else 1).
pub(crate) struct Rotary {
    /// Inverse frequencies over the `d_rope / 2` pairs.
    pub(crate) inv_freq: Vec<f32>,
    /// Factor on cos and sin.
    pub(crate) factor: f32,
}

impl Rotary {
    /// The rope of `c` (YaRN-blended when configured).
    pub(crate) fn new(c: &ModelConfig, d: &DeepseekParams) -> Self {
        let rd = d.qk_rope_head_dim;
        match &d.yarn {
            Some(y) => Rotary {
                inv_freq: y.inv_freq(c.rope_theta, rd),
                factor: y.attention_factor() as f32,
            },
            None => Rotary {
                inv_freq: (0..rd / 2)
                    .map(|k| (1.0 / c.rope_theta.powf((2 * k) as f64 / rd as f64)) as f32)
                    .collect(),
                factor: 1.0,
            },
        }
    }
}

/// Rotate the `d_rope` dims at `x[at..]` of every `stride`-wide chunk of `x` (one chunk per
/// head of a token at position `pos`): pairs `(2i, 2i+1)` when `interleave`, else
/// `(i, i + d/2)`.
fn rope(x: &mut [f32], stride: usize, at: usize, rot: &Rotary, pos: usize, interleave: bool) {
    let half = rot.inv_freq.len();
    let (cos, sin): (Vec<f32>, Vec<f32>) = rot
        .inv_freq
        .iter()
        .map(|&f| {
            let a = (pos as f32 * f) as f64;
            (a.cos() as f32 * rot.factor, a.sin() as f32 * rot.factor)
        })
        .unzip();
    for chunk in x.chunks_mut(stride) {
        let r = &mut chunk[at..at + 2 * half];
        for i in 0..half {
            let (ia, ib) = if interleave { (2 * i, 2 * i + 1) } else { (i, i + half) };
            let (a, b) = (r[ia], r[ib]);
            r[ia] = a * cos[i] - b * sin[i];
            r[ib] = b * cos[i] + a * sin[i];
        }
    }
}

/// Multi-head latent attention of layer `l` on `xn` (`[t, h]`, first at `pos0`): appends the
/// expanded keys/values to the cache and returns the `o_proj` input `[t, heads · d_v]`.
fn mla(
    model: &Model,
    opts: &mut ForwardOptions<'_, '_>,
    cache: &mut KvCache,
    l: usize,
    xn: &[f32],
    pos0: usize,
    rot: &Rotary,
) -> Result<Vec<f32>> {
    let c = &model.config;
    let w = &model.weights;
    let d = params(c)?;
    let weight = |name: &str| -> Result<&[f32]> {
        Ok(&w.get(&format!("model.layers.{l}.self_attn.{name}.weight"))?.data)
    };
    let (h, nh, hd) = (c.hidden_size, c.num_heads, c.head_dim);
    let (nope, rd, vd, kvr) =
        (d.qk_nope_head_dim, d.qk_rope_head_dim, d.v_head_dim, d.kv_lora_rank);
    let qk = nope + rd;
    let t = xn.len() / h;

    let mut q = vec![0f32; t * nh * qk];
    match d.q_lora_rank {
        Some(r) => {
            let mut qa = vec![0f32; t * r];
            cpu::linear(xn, weight("q_a_proj")?, None, &mut qa, t, h, r);
            cpu::rmsnorm_in_place(&mut qa, weight("q_a_layernorm")?, LATENT_NORM_EPS, r);
            cpu::linear(&qa, weight("q_b_proj")?, None, &mut q, t, r, nh * qk);
        }
        None => cpu::linear(xn, weight("q_proj")?, None, &mut q, t, h, nh * qk),
    }
    let mut ckv = vec![0f32; t * (kvr + rd)];
    cpu::linear(xn, weight("kv_a_proj_with_mqa")?, None, &mut ckv, t, h, kvr + rd);
    let mut latent = vec![0f32; t * kvr];
    let mut k_rope = vec![0f32; t * rd];
    shared::split_rows(&ckv, t, &mut [&mut latent, &mut k_rope]);
    cpu::rmsnorm_in_place(&mut latent, weight("kv_a_layernorm")?, LATENT_NORM_EPS, kvr);
    let mut kv = vec![0f32; t * nh * (nope + vd)];
    cpu::linear(&latent, weight("kv_b_proj")?, None, &mut kv, t, kvr, nh * (nope + vd));

    // Per head, padded to hd: q = [q_nope | rope(q_rope) | 0], k = [k_nope | rope(k_rope) | 0],
    // v = [v | 0].
    let (mut qp, mut kp, mut vp) =
        (vec![0f32; t * nh * hd], vec![0f32; t * nh * hd], vec![0f32; t * nh * hd]);
    for tok in 0..t {
        let pos = pos0 + tok;
        let qrow = &mut q[tok * nh * qk..(tok + 1) * nh * qk];
        rope(qrow, qk, nope, rot, pos, d.rope_interleave);
        let kr = &mut k_rope[tok * rd..(tok + 1) * rd];
        rope(kr, rd, 0, rot, pos, d.rope_interleave);
        for n in 0..nh {
            let o = (tok * nh + n) * hd;
            qp[o..o + qk].copy_from_slice(&qrow[n * qk..(n + 1) * qk]);
            let kvh = &kv[(tok * nh + n) * (nope + vd)..][..nope + vd];
            kp[o..o + nope].copy_from_slice(&kvh[..nope]);
            kp[o + nope..o + qk].copy_from_slice(kr);
            vp[o..o + vd].copy_from_slice(&kvh[nope..]);
        }
    }
    let mut att = vec![0f32; t * nh * hd];
    let params = AttnParams { scale: c.attention_scale(l), window: None, softcap: None };
    shared::attend(opts, cache, c, l, pos0, &qp, &kp, &vp, &mut att, params);
    let mut out = vec![0f32; t * nh * vd];
    for (o, a) in out.chunks_mut(vd).zip(att.chunks(hd)) {
        o.copy_from_slice(&a[..vd]);
    }
    Ok(out)
}

/// The sparse MLP of layer `l` on normalized rows `xn`: routed experts plus shared experts.
fn sparse_mlp(
    model: &Model,
    opts: &mut ForwardOptions<'_, '_>,
    l: usize,
    xn: &[f32],
    pos0: usize,
) -> Result<Vec<f32>> {
    let c = &model.config;
    let w = &model.weights;
    let (d, m) = (params(c)?, moe::params(c)?);
    let (h, ne) = (c.hidden_size, m.num_experts);
    let t = xn.len() / h;
    let mut logits = vec![0f32; t * ne];
    cpu::linear(xn, &w.get(&moe::router_name(l))?.data, None, &mut logits, t, h, ne);
    let bias = if d.sigmoid { w.get(&bias_name(l)).ok().map(|b| b.data.as_slice()) } else { None };
    let routes: Vec<Route> = logits.chunks(ne).map(|z| route(z, bias, d, m)).collect();
    let mut out = moe::routed_experts(model, opts, l, xn, pos0, &routes)?;
    if let Some(si) = m.shared_expert_intermediate {
        let prefix = format!("model.layers.{l}.mlp.shared_experts");
        let (a, y) = moe::swiglu(w, &prefix, xn, t, h, si)?;
        moe::shared_stats(opts, l, &a, &y, (si, h), pos0);
        out.iter_mut().zip(&y).for_each(|(o, y)| *o += y);
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
    let (d, m) = (params(c)?, moe::params(c)?);
    let (h, i, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps);
    let rot = Rotary::new(c, d);
    let weight = |name: &str| -> Result<&[f32]> { Ok(&w.get(&format!("{name}.weight"))?.data) };

    let (mut x, pos0, first) = shared::input_stream(w, input, cache.len, h)?;
    let t = x.len() / h;
    let mut xn = vec![0f32; t * h];
    let mut proj = vec![0f32; t * h];
    for l in first..c.num_layers {
        let p = format!("model.layers.{l}");
        hook(&mut opts.hooks, l, HookKind::ResidPre, &mut x, h, pos0);
        cpu::rmsnorm(&x, weight(&format!("{p}.input_layernorm"))?, eps, &mut xn, h);
        let att = mla(model, &mut opts, cache, l, &xn, pos0, &rot)?;
        let vw = c.num_heads * d.v_head_dim;
        cpu::linear(&att, weight(&format!("{p}.self_attn.o_proj"))?, None, &mut proj, t, vw, h);
        hook(&mut opts.hooks, l, HookKind::AttnOut, &mut proj, h, pos0);
        cpu::add_residual(&mut x, &proj, h, pos0, None);
        hook(&mut opts.hooks, l, HookKind::ResidMid, &mut x, h, pos0);

        cpu::rmsnorm(&x, weight(&format!("{p}.post_attention_layernorm"))?, eps, &mut xn, h);
        let mut y = if m.is_sparse(l) {
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

    fn cfg(sigmoid: bool, group_score: GroupScore) -> (DeepseekParams, MoeParams) {
        let d = DeepseekParams {
            sigmoid,
            group_score,
            n_group: 2,
            topk_group: 1,
            routed_scaling_factor: 2.0,
            ..Default::default()
        };
        let m =
            MoeParams { num_experts: 4, top_k: 2, norm_topk_prob: sigmoid, ..Default::default() };
        (d, m)
    }

    #[test]
    fn softmax_routing_greedy_and_group_limited() {
        let z = [0.0f32, 2.0, 1.5, -1.0];
        let (d, m) = cfg(false, GroupScore::None);
        let r = route(&z, None, &d, &m);
        assert_eq!(r.experts, vec![1, 2]);
        let sum: f32 = z.iter().map(|v| v.exp()).sum();
        assert!((r.weights[0] - 2.0 * 2f32.exp() / sum).abs() < 1e-6);
        // Groups {0,1} and {2,3}: the best group holds expert 1, so 2 is out and 0 is in.
        let (d, m) = cfg(false, GroupScore::Max);
        assert_eq!(route(&z, None, &d, &m).experts, vec![1, 0]);
    }

    #[test]
    fn sigmoid_routing_uses_bias_for_choice_only() {
        let z = [0.0f32, 2.0, 1.5, -1.0];
        let (d, m) = cfg(true, GroupScore::Top2Sum);
        // The bias moves group {2,3} ahead and expert 3 above 2; weights stay sigmoid(z).
        let b = [0.0f32, 0.0, 0.5, 3.0];
        let r = route(&z, Some(&b), &d, &m);
        assert_eq!(r.experts, vec![3, 2]);
        let sg = |v: f32| 1.0 / (1.0 + (-v).exp());
        let s = sg(-1.0) + sg(1.5);
        assert!((r.weights[0] - 2.0 * sg(-1.0) / s).abs() < 1e-6);
        assert!((r.weights[1] - 2.0 * sg(1.5) / s).abs() < 1e-6);
    }
}
