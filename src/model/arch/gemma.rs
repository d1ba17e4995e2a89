//! The Gemma family: Gemma, Gemma 2, Gemma 3 (text).
//!
//! Every RMSNorm multiplies by `1 + w` (the stored weight is centered on 0), the embedding is
//! scaled by `√hidden`, and the MLP is GeGLU with the tanh GELU:
//! `down_proj(gelu_tanh(gate_proj(h)) ⊙ up_proj(h))`.
//!
//! - Gemma: Llama's pre-norm block (`input_layernorm` before attention,
//!   `post_attention_layernorm` before the MLP).
//! - Gemma 2: a norm before *and after* each of attention and MLP:
//!   `x += post_attention_layernorm(attn(input_layernorm(x)))`, then
//!   `x += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))`. Attention scores are
//!   scaled by `query_pre_attn_scalar^-1/2`, soft-capped to `cap · tanh(s / cap)`; the final
//!   logits too. Layers alternate sliding-window (even) and global attention.
//! - Gemma 3: Gemma 2 plus QK-norm (a `(1 + w)` RMSNorm on each q and k head before RoPE),
//!   no attention soft-cap, a pattern of sliding layers (5 of 6) whose RoPE uses the local
//!   base (`rope_local_base_freq`, unscaled) while global layers use `rope_theta` with the
//!   configured scaling.
//!
//! Spike statistics: the down_proj input is reduced inside the GeGLU kernel; the output side
//! is what the MLP writes into the residual stream — the down_proj output for Gemma, the
//! `post_feedforward_layernorm` output for Gemma 2/3 (reduced inside the residual add). The
//! `hook_attn_out` / `hook_mlp_out` hooks likewise see the post-norm outputs (as in
//! TransformerLens), and detected coordinates are those of `mlp.down_proj.weight`.

use crate::backend::cpu::{self, AttnParams};
use crate::hooks::HookKind;
use crate::model::arch::shared::{self, hook, one_plus};
use crate::model::arch::{ForwardOptions, Input, KvCache};
use crate::model::config::HiddenAct;
use crate::model::{Architecture, Model, Weights};
use crate::Result;

/// Tensor names of one block.
struct Names {
    input_norm: String,
    post_attn_norm: String,
    pre_ffn_norm: String,
    post_ffn_norm: String,
    q: String,
    k: String,
    v: String,
    o: String,
    q_norm: String,
    k_norm: String,
    gate: String,
    up: String,
    down: String,
}

impl Names {
    fn new(l: usize) -> Self {
        let p = format!("model.layers.{l}");
        Names {
            input_norm: format!("{p}.input_layernorm.weight"),
            post_attn_norm: format!("{p}.post_attention_layernorm.weight"),
            pre_ffn_norm: format!("{p}.pre_feedforward_layernorm.weight"),
            post_ffn_norm: format!("{p}.post_feedforward_layernorm.weight"),
            q: format!("{p}.self_attn.q_proj.weight"),
            k: format!("{p}.self_attn.k_proj.weight"),
            v: format!("{p}.self_attn.v_proj.weight"),
            o: format!("{p}.self_attn.o_proj.weight"),
            q_norm: format!("{p}.self_attn.q_norm.weight"),
            k_norm: format!("{p}.self_attn.k_norm.weight"),
            gate: format!("{p}.mlp.gate_proj.weight"),
            up: format!("{p}.mlp.up_proj.weight"),
            down: format!("{p}.mlp.down_proj.weight"),
        }
    }
}

/// Gemma 3 multimodal checkpoints (`Gemma3ForConditionalGeneration`): keep the language
/// model under the text model's names (`language_model.model.X` or
/// `model.language_model.X` → `model.X`, `language_model.lm_head` → `lm_head`) and drop the
/// vision tower and projector. Text-only checkpoints are left as they are.
pub fn strip_multimodal(weights: &mut Weights) -> Result<()> {
    let names: Vec<String> = weights.names().map(str::to_string).collect();
    for name in names {
        let renamed = name
            .strip_prefix("language_model.model.")
            .or_else(|| name.strip_prefix("model.language_model."))
            .map(|rest| format!("model.{rest}"))
            .or_else(|| name.strip_prefix("language_model.").map(str::to_string));
        let vision = [
            "vision_tower.",
            "multi_modal_projector.",
            "model.vision_tower.",
            "model.multi_modal_projector.",
        ]
        .iter()
        .any(|p| name.starts_with(p));
        if let Some(new) = renamed {
            if let Some(t) = weights.remove(&name) {
                weights.insert(new, t);
            }
        } else if vision {
            weights.remove(&name);
        }
    }
    Ok(())
}

/// Check names and shapes of every tensor the forward pass reads.
pub fn validate(model: &Model) -> Result<()> {
    let c = &model.config;
    let w = &model.weights;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let v2 = c.architecture != Architecture::Gemma;
    shared::validate_embed_and_head(w, c)?;
    w.get_shaped("model.norm.weight", &[h])?;
    if c.attention_bias {
        return Err(crate::Error::Invalid("Gemma with attention biases is not supported".into()));
    }
    for l in 0..c.num_layers {
        let n = Names::new(l);
        w.get_shaped(&n.input_norm, &[h])?;
        w.get_shaped(&n.post_attn_norm, &[h])?;
        if v2 {
            w.get_shaped(&n.pre_ffn_norm, &[h])?;
            w.get_shaped(&n.post_ffn_norm, &[h])?;
        }
        if c.architecture == Architecture::Gemma3 {
            w.get_shaped(&n.q_norm, &[c.head_dim])?;
            w.get_shaped(&n.k_norm, &[c.head_dim])?;
        }
        w.get_shaped(&n.q, &[qd, h])?;
        w.get_shaped(&n.k, &[kvd, h])?;
        w.get_shaped(&n.v, &[kvd, h])?;
        w.get_shaped(&n.o, &[h, qd])?;
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
    let v2 = c.architecture != Architecture::Gemma;
    let gemma3 = c.architecture == Architecture::Gemma3;
    // RoPE: global layers use rope_theta (scaled); Gemma 3's sliding layers the local base.
    let inv_global = shared::inv_freq(c, c.rope_theta, true);
    let inv_local = c.family.rope_local_theta.map(|t| shared::inv_freq(c, t, false));
    // RMSNorm with weight (1 + w), into `out`.
    let norm = |x: &[f32], name: &str, out: &mut [f32]| -> Result<()> {
        cpu::rmsnorm(x, &one_plus(&w.get(name)?.data), eps, out, h);
        Ok(())
    };

    // Embedding: x[t] = E[token[t]] · √hidden (or the given residual stream entering `first`).
    let (mut x, pos0, first) = match input {
        Input::Tokens(tokens) => {
            let mut x = shared::embed(w, "model.embed_tokens.weight", tokens, h)?;
            let scale = (h as f32).sqrt();
            x.iter_mut().for_each(|v| *v *= scale);
            (x, cache.len, 0)
        }
        Input::Residual { layer, x, pos0 } => (x.to_vec(), pos0, layer),
    };
    let t = x.len() / h;

    let mut xn = vec![0f32; t * h];
    let (mut q, mut k, mut v) = (vec![0f32; t * qd], vec![0f32; t * kvd], vec![0f32; t * kvd]);
    let mut att = vec![0f32; t * qd];
    let (mut proj, mut normed) = (vec![0f32; t * h], vec![0f32; t * h]);
    let (mut gate, mut up, mut act) = (vec![0f32; t * i], vec![0f32; t * i], vec![0f32; t * i]);

    for l in first..c.num_layers {
        let n = Names::new(l);
        hook(&mut opts.hooks, l, HookKind::ResidPre, &mut x, h, pos0);

        // Attention input: xn = rmsnorm₁₊(x); q, k, v = xn·Wᵀ.
        norm(&x, &n.input_norm, &mut xn)?;
        cpu::linear(&xn, &w.get(&n.q)?.data, None, &mut q, t, h, qd);
        cpu::linear(&xn, &w.get(&n.k)?.data, None, &mut k, t, h, kvd);
        cpu::linear(&xn, &w.get(&n.v)?.data, None, &mut v, t, h, kvd);
        // Gemma 3 QK-norm: each head of q and k through rmsnorm₁₊ (weights [head_dim]).
        if gemma3 {
            cpu::rmsnorm_in_place(&mut q, &one_plus(&w.get(&n.q_norm)?.data), eps, hd);
            cpu::rmsnorm_in_place(&mut k, &one_plus(&w.get(&n.k_norm)?.data), eps, hd);
        }
        // rope(q, k) with the local base on Gemma 3's sliding layers.
        let window = c.layer_window(l);
        let inv = match (&inv_local, window) {
            (Some(local), Some(_)) => local,
            _ => &inv_global,
        };
        cpu::rope(&mut q, inv, pos0, nh, hd);
        cpu::rope(&mut k, inv, pos0, nkv, hd);

        // att = softmax(softcap(q·kᵀ · scale) + mask)·v per head; o = att·W_oᵀ.
        let params = AttnParams {
            scale: c.attention_scale(l),
            window,
            softcap: c.family.attn_logit_softcapping.map(|s| s as f32),
        };
        shared::attend(&mut opts, cache, c, l, pos0, &q, &k, &v, &mut att, params);
        cpu::linear(&att, &w.get(&n.o)?.data, None, &mut proj, t, qd, h);
        // Gemma 2/3: o = rmsnorm₁₊(o) before the residual add. x += o.
        let attn_out = if v2 {
            norm(&proj, &n.post_attn_norm, &mut normed)?;
            &mut normed
        } else {
            &mut proj
        };
        hook(&mut opts.hooks, l, HookKind::AttnOut, attn_out, h, pos0);
        cpu::add_residual(&mut x, attn_out, h, pos0, None);
        hook(&mut opts.hooks, l, HookKind::ResidMid, &mut x, h, pos0);

        // MLP: a = gelu_tanh(xn·W_gateᵀ) ⊙ (xn·W_upᵀ) on xn = rmsnorm₁₊(x), with the input
        // statistics fused into the GeGLU kernel; y = a·W_downᵀ.
        let pre = if v2 { &n.pre_ffn_norm } else { &n.post_attn_norm };
        norm(&x, pre, &mut xn)?;
        cpu::linear(&xn, &w.get(&n.gate)?.data, None, &mut gate, t, h, i);
        cpu::linear(&xn, &w.get(&n.up)?.data, None, &mut up, t, h, i);
        hook(&mut opts.hooks, l, HookKind::MlpPre, &mut gate, i, pos0);
        hook(&mut opts.hooks, l, HookKind::MlpPreLinear, &mut up, i, pos0);
        shared::mlp_act(&mut opts, l, HiddenAct::GeluTanh, Some(&gate), &up, &mut act, i, pos0);
        cpu::linear(&act, &w.get(&n.down)?.data, None, &mut proj, t, i, h);
        // Gemma 2/3: y = rmsnorm₁₊(y). x += y, the output statistics fused into the add.
        let mlp_out = if v2 {
            norm(&proj, &n.post_ffn_norm, &mut normed)?;
            &mut normed
        } else {
            &mut proj
        };
        shared::mlp_write(&mut opts, l, &mut x, mlp_out, h, pos0);
        hook(&mut opts.hooks, l, HookKind::ResidPost, &mut x, h, pos0);
    }
    cache.len = pos0 + t;

    // Final rmsnorm₁₊, LM head (tied unless lm_head exists), final soft-cap.
    let final_norm = one_plus(&w.get("model.norm.weight")?.data);
    Ok(shared::lm_head(
        &x,
        h,
        c.vocab_size,
        opts.logits,
        &w.get(shared::head_name(model))?.data,
        None,
        c.family.final_logit_softcapping,
        |x, out| cpu::rmsnorm(x, &final_norm, eps, out, h),
    ))
}
