//! The Llama family: Llama 1/2/3, SmolLM, Mistral (sliding window), Qwen2 (q/k/v biases),
//! Qwen3 (QK-norm).
//!
//! Pre-norm blocks: `x += o_proj(attn(rope(q), rope(k), v))` on `rmsnorm(x)`, then
//! `x += down_proj(silu(gate_proj(h)) ⊙ up_proj(h))` on `h = rmsnorm(x)`. Qwen3 normalizes
//! each head of q and k with RMSNorm (`self_attn.q_norm`/`k_norm`, width head_dim) before RoPE.
//! Spike statistics: the down_proj input inside the SiLU·mul kernel, its output inside the
//! residual add.

use crate::backend::cpu;
use crate::hooks::{Activation, HookKind, HookPoint, Hooks};
use crate::model::arch::{shared, ForwardOptions, Input, KvCache, Logits};
use crate::model::config::{HiddenAct, RopeScaling};
use crate::model::{Architecture, Model, ModelConfig};
use crate::Result;

/// Tensor names of one block.
struct Names {
    attn_norm: String,
    q: String,
    k: String,
    v: String,
    o: String,
    q_norm: String,
    k_norm: String,
    mlp_norm: String,
    gate: String,
    up: String,
    down: String,
}

impl Names {
    fn new(l: usize) -> Self {
        let p = format!("model.layers.{l}");
        Names {
            attn_norm: format!("{p}.input_layernorm.weight"),
            q: format!("{p}.self_attn.q_proj"),
            k: format!("{p}.self_attn.k_proj"),
            v: format!("{p}.self_attn.v_proj"),
            o: format!("{p}.self_attn.o_proj.weight"),
            q_norm: format!("{p}.self_attn.q_norm.weight"),
            k_norm: format!("{p}.self_attn.k_norm.weight"),
            mlp_norm: format!("{p}.post_attention_layernorm.weight"),
            gate: format!("{p}.mlp.gate_proj.weight"),
            up: format!("{p}.mlp.up_proj.weight"),
            down: format!("{p}.mlp.down_proj.weight"),
        }
    }
}

/// Check names and shapes of every tensor the forward pass reads.
pub fn validate(model: &Model) -> Result<()> {
    let c = &model.config;
    let w = &model.weights;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    shared::validate_embed_and_head(w, c)?;
    w.get_shaped("model.norm.weight", &[h])?;
    if c.family.hidden_act != HiddenAct::Silu || c.family.rotary_dim.is_some() {
        return Err(crate::Error::Invalid(format!(
            "{}: only SiLU MLPs with full RoPE are supported",
            c.architecture.name()
        )));
    }
    for l in 0..c.num_layers {
        let n = Names::new(l);
        w.get_shaped(&n.attn_norm, &[h])?;
        w.get_shaped(&n.mlp_norm, &[h])?;
        w.get_shaped(&format!("{}.weight", n.q), &[qd, h])?;
        w.get_shaped(&format!("{}.weight", n.k), &[kvd, h])?;
        w.get_shaped(&format!("{}.weight", n.v), &[kvd, h])?;
        if c.attention_bias {
            w.get_shaped(&format!("{}.bias", n.q), &[qd])?;
            w.get_shaped(&format!("{}.bias", n.k), &[kvd])?;
            w.get_shaped(&format!("{}.bias", n.v), &[kvd])?;
        }
        w.get_shaped(&n.o, &[h, qd])?;
        let o_bias = n.o.replace(".weight", ".bias");
        if w.contains(&o_bias) {
            w.get_shaped(&o_bias, &[h])?;
        }
        if c.architecture == Architecture::Qwen3 {
            w.get_shaped(&n.q_norm, &[c.head_dim])?;
            w.get_shaped(&n.k_norm, &[c.head_dim])?;
        }
        w.get_shaped(&n.gate, &[i, h])?;
        w.get_shaped(&n.up, &[i, h])?;
        w.get_shaped(&n.down, &[h, i])?;
    }
    if let Ok(f) = w.get("rope_freqs.weight") {
        if f.data.len() != c.head_dim / 2 {
            return Err(crate::Error::tensor(
                "rope_freqs.weight",
                format!("expected {} values", c.head_dim / 2),
            ));
        }
    }
    Ok(())
}

/// RoPE inverse frequencies `theta^(-2i/d)`, with the configured scaling.
pub fn inv_freq(c: &ModelConfig, freq_factors: Option<&[f32]>) -> Vec<f32> {
    let d = c.head_dim;
    (0..d / 2)
        .map(|i| {
            let base = 1.0 / c.rope_theta.powf((2 * i) as f64 / d as f64);
            let mut f = match &c.rope_scaling {
                None => base,
                Some(RopeScaling::Linear { factor }) => base / factor,
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: old,
                }) => {
                    let wavelen = 2.0 * std::f64::consts::PI / base;
                    let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
                    if wavelen < high_wl {
                        base
                    } else if wavelen > low_wl {
                        base / factor
                    } else {
                        let s = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - s) * base / factor + s * base
                    }
                }
            };
            if let Some(ff) = freq_factors {
                f /= ff[i] as f64;
            }
            f as f32
        })
        .collect()
}

/// Run a hook point if anything is registered there.
fn hook(
    hooks: &mut Option<&mut Hooks<'_>>,
    layer: usize,
    kind: HookKind,
    data: &mut [f32],
    cols: usize,
    pos0: usize,
) {
    if let Some(h) = hooks.as_deref_mut() {
        if !h.is_empty() {
            let rows = data.len() / cols;
            h.run(HookPoint { layer, kind }, &mut Activation { data, rows, cols, pos0 });
        }
    }
}

/// Attention weights `[rows, n_heads, pos0 + rows]` (the `attn.hook_pattern` layout), with
/// the same scores, mask and softmax as [`cpu::attention`].
#[allow(clippy::too_many_arguments)]
fn attention_pattern(
    q: &[f32],
    k: &[f32],
    rows: usize,
    pos0: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let kv_len = pos0 + rows;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; rows * nh * kv_len];
    for (idx, o) in out.chunks_mut(kv_len).enumerate() {
        let (t, h) = (idx / nh, idx % nh);
        let (p, kvh) = (pos0 + t, h / (nh / nkv));
        let qh = &q[(t * nh + h) * hd..][..hd];
        let first = window.map_or(0, |w| (p + 1).saturating_sub(w));
        for j in first..=p {
            let kj = &k[(j * nkv + kvh) * hd..][..hd];
            o[j] = qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
        }
        let max = o[first..=p].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = o[first..=p]
            .iter_mut()
            .map(|s| {
                *s = (*s - max).exp();
                *s
            })
            .sum();
        o[first..=p].iter_mut().for_each(|s| *s /= sum);
    }
    out
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
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let (qd, kvd) = (nh * hd, nkv * hd);
    let inv_freq = inv_freq(c, w.get("rope_freqs.weight").ok().map(|t| t.data.as_slice()));
    let bias = |name: &str| -> Result<Option<&[f32]>> {
        Ok(if c.attention_bias {
            Some(w.get(&format!("{name}.bias"))?.data.as_slice())
        } else {
            None
        })
    };

    // Embedding: x[t] = E[token[t]] (or the given residual stream entering `first`).
    let (mut x, pos0, first) = shared::input_stream(w, input, cache.len, h)?;
    let t = x.len() / h;

    let mut xn = vec![0f32; t * h];
    let (mut q, mut k, mut v) = (vec![0f32; t * qd], vec![0f32; t * kvd], vec![0f32; t * kvd]);
    let mut att = vec![0f32; t * qd];
    let mut proj = vec![0f32; t * h];
    let (mut gate, mut up, mut act) = (vec![0f32; t * i], vec![0f32; t * i], vec![0f32; t * i]);

    for l in first..c.num_layers {
        let n = Names::new(l);
        hook(&mut opts.hooks, l, HookKind::ResidPre, &mut x, h, pos0);

        // Attention: xn = rmsnorm(x); q,k,v = xn·Wᵀ (+b); rope(q, k); append k,v to the cache.
        cpu::rmsnorm(&x, &w.get(&n.attn_norm)?.data, c.rms_norm_eps, &mut xn, h);
        cpu::linear(&xn, &w.get(&format!("{}.weight", n.q))?.data, bias(&n.q)?, &mut q, t, h, qd);
        cpu::linear(&xn, &w.get(&format!("{}.weight", n.k))?.data, bias(&n.k)?, &mut k, t, h, kvd);
        cpu::linear(&xn, &w.get(&format!("{}.weight", n.v))?.data, bias(&n.v)?, &mut v, t, h, kvd);
        if c.architecture == Architecture::Qwen3 {
            // Qwen3 QK-norm: every head of q and k is RMS-normalized (weights [head_dim]).
            cpu::rmsnorm_in_place(&mut q, &w.get(&n.q_norm)?.data, c.rms_norm_eps, hd);
            cpu::rmsnorm_in_place(&mut k, &w.get(&n.k_norm)?.data, c.rms_norm_eps, hd);
        }
        cpu::rope(&mut q, &inv_freq, pos0, nh, hd);
        cpu::rope(&mut k, &inv_freq, pos0, nkv, hd);
        let (kc, vc) = &mut cache.layers[l];
        kc.truncate(pos0 * kvd);
        vc.truncate(pos0 * kvd);
        kc.extend_from_slice(&k);
        vc.extend_from_slice(&v);

        // att = softmax(q·kᵀ/√d + causal mask)·v per head; x += att·W_oᵀ.
        cpu::attention(&q, kc, vc, &mut att, t, pos0, nh, nkv, hd, c.layer_window(l));
        let pattern_point = HookPoint { layer: l, kind: HookKind::AttnPattern };
        if opts.hooks.as_ref().is_some_and(|hk| hk.has(pattern_point)) {
            let mut p = attention_pattern(&q, kc, t, pos0, nh, nkv, hd, c.layer_window(l));
            hook(&mut opts.hooks, l, HookKind::AttnPattern, &mut p, nh * (pos0 + t), pos0);
        }
        // o_proj has a bias in Llama/Qwen3 checkpoints with attention_bias (not in Qwen2;
        // `backend::stream::has_o_proj_bias` is the same rule from the config).
        let o_bias = w.get(&n.o.replace(".weight", ".bias")).ok().map(|b| b.data.as_slice());
        cpu::linear(&att, &w.get(&n.o)?.data, o_bias, &mut proj, t, qd, h);
        hook(&mut opts.hooks, l, HookKind::AttnOut, &mut proj, h, pos0);
        cpu::add_residual(&mut x, &proj, h, pos0, None);
        hook(&mut opts.hooks, l, HookKind::ResidMid, &mut x, h, pos0);

        // MLP: a = silu(xn·W_gateᵀ) ⊙ (xn·W_upᵀ) on xn = rmsnorm(x); x += a·W_downᵀ.
        // Spike statistics ride along: max |a| per column in silu_mul, max |y| per row in the add.
        cpu::rmsnorm(&x, &w.get(&n.mlp_norm)?.data, c.rms_norm_eps, &mut xn, h);
        cpu::linear(&xn, &w.get(&n.gate)?.data, None, &mut gate, t, h, i);
        cpu::linear(&xn, &w.get(&n.up)?.data, None, &mut up, t, h, i);
        hook(&mut opts.hooks, l, HookKind::MlpPre, &mut gate, i, pos0);
        hook(&mut opts.hooks, l, HookKind::MlpPreLinear, &mut up, i, pos0);
        let post_hooked = opts
            .hooks
            .as_ref()
            .is_some_and(|hk| hk.has(HookPoint { layer: l, kind: HookKind::MlpPost }));
        let spikes = opts.stats.as_deref_mut().map(|s| &mut s.layers[l]);
        match spikes {
            Some(s) if !post_hooked => {
                cpu::silu_mul(&gate, &up, &mut act, i, pos0, Some(&mut s.input))
            }
            _ => cpu::silu_mul(&gate, &up, &mut act, i, pos0, None),
        }
        hook(&mut opts.hooks, l, HookKind::MlpPost, &mut act, i, pos0);
        if post_hooked {
            if let Some(s) = opts.stats.as_deref_mut() {
                cpu::column_max(&act, i, pos0, &mut s.layers[l].input);
            }
        }
        cpu::linear(&act, &w.get(&n.down)?.data, None, &mut proj, t, i, h);
        hook(&mut opts.hooks, l, HookKind::MlpOut, &mut proj, h, pos0);
        let out_stats = opts.stats.as_deref_mut().map(|s| s.layers[l].output.as_mut_slice());
        cpu::add_residual(&mut x, &proj, h, pos0, out_stats);
        hook(&mut opts.hooks, l, HookKind::ResidPost, &mut x, h, pos0);
    }
    cache.len = pos0 + t;

    // Final norm and LM head, only for the rows asked for.
    let rows = match opts.logits {
        Logits::None => return Ok(Vec::new()),
        Logits::All => 0..t,
        Logits::Last => t - 1..t,
    };
    let xr = &x[rows.start * h..rows.end * h];
    let mut xf = vec![0f32; xr.len()];
    cpu::rmsnorm(xr, &w.get("model.norm.weight")?.data, c.rms_norm_eps, &mut xf, h);
    let mut logits = vec![0f32; rows.len() * c.vocab_size];
    cpu::linear(
        &xf,
        &w.get(shared::head_name(model))?.data,
        None,
        &mut logits,
        rows.len(),
        h,
        c.vocab_size,
    );
    Ok(logits)
}
