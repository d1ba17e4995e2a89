//! OLMo (OLMo-1B/7B, `-0724-hf`) and OLMo 2.
//!
//! - OLMo: Llama's pre-norm block with a LayerNorm that has no weight and no bias
//!   (`(x - mean) / sqrt(var + 1e-5)`), q, k and v optionally clamped to `[-clip_qkv,
//!   clip_qkv]` right after their projections: `x += o_proj(attn(rope(q), rope(k), v))` on
//!   `layernorm(x)`, then `x += down_proj(silu(gate) ⊙ up)` on `layernorm(x)`.
//! - OLMo 2: no pre-norms; RMSNorm on what attention and MLP produce, before each residual
//!   add, and QK-norm over the whole q and k projections (weights `[heads · head_dim]`,
//!   before RoPE): `x += post_attention_layernorm(o_proj(attn(...x...)))`, then
//!   `x += post_feedforward_layernorm(down_proj(silu(gate_proj(x)) ⊙ up_proj(x)))`.
//!
//! Spike statistics: the down_proj input inside the SiLU·mul kernel; the output side is what
//! the MLP writes into the residual stream (reduced inside the add) — the down_proj output
//! for OLMo, the `post_feedforward_layernorm` output for OLMo 2 (`hook_mlp_out` sees the same).

use crate::backend::cpu::{self, AttnParams};
use crate::hooks::HookKind;
use crate::model::arch::shared::{self, hook};
use crate::model::arch::{ForwardOptions, Input, KvCache};
use crate::model::{Architecture, Model};
use crate::Result;

/// Tensor names of one block.
struct Names {
    q: String,
    k: String,
    v: String,
    o: String,
    q_norm: String,
    k_norm: String,
    post_attn_norm: String,
    post_ffn_norm: String,
    gate: String,
    up: String,
    down: String,
}

impl Names {
    fn new(l: usize) -> Self {
        let p = format!("model.layers.{l}");
        Names {
            q: format!("{p}.self_attn.q_proj"),
            k: format!("{p}.self_attn.k_proj"),
            v: format!("{p}.self_attn.v_proj"),
            o: format!("{p}.self_attn.o_proj"),
            q_norm: format!("{p}.self_attn.q_norm.weight"),
            k_norm: format!("{p}.self_attn.k_norm.weight"),
            post_attn_norm: format!("{p}.post_attention_layernorm.weight"),
            post_ffn_norm: format!("{p}.post_feedforward_layernorm.weight"),
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
    let olmo2 = c.architecture == Architecture::Olmo2;
    shared::validate_embed_and_head(w, c)?;
    if olmo2 {
        w.get_shaped("model.norm.weight", &[h])?;
    }
    for l in 0..c.num_layers {
        let n = Names::new(l);
        for (name, rows) in [(&n.q, qd), (&n.k, kvd), (&n.v, kvd)] {
            w.get_shaped(&format!("{name}.weight"), &[rows, h])?;
            if c.attention_bias {
                w.get_shaped(&format!("{name}.bias"), &[rows])?;
            }
        }
        w.get_shaped(&format!("{}.weight", n.o), &[h, qd])?;
        if c.attention_bias {
            w.get_shaped(&format!("{}.bias", n.o), &[h])?;
        }
        if olmo2 {
            w.get_shaped(&n.q_norm, &[qd])?;
            w.get_shaped(&n.k_norm, &[kvd])?;
            w.get_shaped(&n.post_attn_norm, &[h])?;
            w.get_shaped(&n.post_ffn_norm, &[h])?;
        }
        w.get_shaped(&n.gate, &[i, h])?;
        w.get_shaped(&n.up, &[i, h])?;
        w.get_shaped(&n.down, &[h, i])?;
    }
    Ok(())
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
    let (h, i, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps);
    let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let (qd, kvd) = (nh * hd, nkv * hd);
    let olmo2 = c.architecture == Architecture::Olmo2;
    let inv_freq = shared::inv_freq(c, c.rope_theta, true);
    let weight = |name: &str| -> Result<&[f32]> { Ok(&w.get(&format!("{name}.weight"))?.data) };
    let bias = |name: &str| -> Result<Option<&[f32]>> {
        Ok(if c.attention_bias { Some(&w.get(&format!("{name}.bias"))?.data) } else { None })
    };
    // OLMo's norm: LayerNorm without parameters.
    let layernorm = |x: &[f32], out: &mut [f32]| cpu::layernorm(x, None, None, eps, out, h);

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

        // Attention input: OLMo xn = layernorm(x); OLMo 2 reads x itself.
        let a_in: &[f32] = if olmo2 {
            &x
        } else {
            layernorm(&x, &mut xn);
            &xn
        };
        cpu::linear(a_in, weight(&n.q)?, bias(&n.q)?, &mut q, t, h, qd);
        cpu::linear(a_in, weight(&n.k)?, bias(&n.k)?, &mut k, t, h, kvd);
        cpu::linear(a_in, weight(&n.v)?, bias(&n.v)?, &mut v, t, h, kvd);
        // OLMo: q, k, v = clamp(·, -clip, clip). OLMo 2: q = rmsnorm(q), k = rmsnorm(k) over
        // the whole projection width.
        if let Some(clip) = c.family.clip_qkv {
            for buf in [&mut q, &mut k, &mut v] {
                cpu::clamp(buf, clip as f32);
            }
        }
        if olmo2 {
            cpu::rmsnorm_in_place(&mut q, &w.get(&n.q_norm)?.data, eps, qd);
            cpu::rmsnorm_in_place(&mut k, &w.get(&n.k_norm)?.data, eps, kvd);
        }
        cpu::rope(&mut q, &inv_freq, pos0, nh, hd);
        cpu::rope(&mut k, &inv_freq, pos0, nkv, hd);

        // att = softmax(q·kᵀ/√d + causal mask)·v per head; o = att·W_oᵀ (+ b).
        let params =
            AttnParams { scale: c.attention_scale(l), window: c.layer_window(l), softcap: None };
        shared::attend(&mut opts, cache, c, l, pos0, &q, &k, &v, &mut att, params);
        cpu::linear(&att, weight(&n.o)?, bias(&n.o)?, &mut proj, t, qd, h);
        // OLMo 2: o = rmsnorm(o). x += o.
        if olmo2 {
            cpu::rmsnorm_in_place(&mut proj, &w.get(&n.post_attn_norm)?.data, eps, h);
        }
        hook(&mut opts.hooks, l, HookKind::AttnOut, &mut proj, h, pos0);
        cpu::add_residual(&mut x, &proj, h, pos0, None);
        hook(&mut opts.hooks, l, HookKind::ResidMid, &mut x, h, pos0);

        // MLP: a = silu(m·W_gateᵀ) ⊙ (m·W_upᵀ) with m = layernorm(x) (OLMo) or x (OLMo 2),
        // input statistics fused; y = a·W_downᵀ.
        let m_in: &[f32] = if olmo2 {
            &x
        } else {
            layernorm(&x, &mut xn);
            &xn
        };
        cpu::linear(m_in, &w.get(&n.gate)?.data, None, &mut gate, t, h, i);
        cpu::linear(m_in, &w.get(&n.up)?.data, None, &mut up, t, h, i);
        hook(&mut opts.hooks, l, HookKind::MlpPre, &mut gate, i, pos0);
        hook(&mut opts.hooks, l, HookKind::MlpPreLinear, &mut up, i, pos0);
        shared::mlp_act(&mut opts, l, c.family.hidden_act, Some(&gate), &up, &mut act, i, pos0);
        cpu::linear(&act, &w.get(&n.down)?.data, None, &mut proj, t, i, h);
        // OLMo 2: y = rmsnorm(y). x += y, the output statistics fused into the add.
        if olmo2 {
            cpu::rmsnorm_in_place(&mut proj, &w.get(&n.post_ffn_norm)?.data, eps, h);
        }
        shared::mlp_write(&mut opts, l, &mut x, &mut proj, h, pos0);
        hook(&mut opts.hooks, l, HookKind::ResidPost, &mut x, h, pos0);
    }
    cache.len = pos0 + t;

    // Final norm (OLMo: parameter-free LayerNorm; OLMo 2: RMSNorm) and LM head.
    let final_norm = if olmo2 { Some(&w.get("model.norm.weight")?.data) } else { None };
    Ok(shared::lm_head(
        &x,
        h,
        c.vocab_size,
        opts.logits,
        &w.get(shared::head_name(model))?.data,
        None,
        None,
        |x, out| match final_norm {
            Some(fw) => cpu::rmsnorm(x, fw, eps, out, h),
            None => layernorm(x, out),
        },
    ))
}
