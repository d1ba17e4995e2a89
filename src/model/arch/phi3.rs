//! Phi-3 (Phi-3 mini/medium, Phi-4-mini): a Llama block with fused projections.
//!
//! `self_attn.qkv_proj` (`[q_dim + 2 kv_dim, hidden]`) yields q, k, v in that order;
//! `mlp.gate_up_proj` (`[2 · intermediate, hidden]`) yields gate (the FIRST half) and up:
//! `x += o_proj(attn(rope(q), rope(k), v))` on `rmsnorm(x)`, then
//! `x += down_proj(act(gate) ⊙ up)` on `rmsnorm(x)`. RoPE may be partial
//! (`partial_rotary_factor`: only the first dims of each head rotate); a configured
//! `sliding_window` applies to every layer.
//!
//! Spike statistics: the down_proj input (`act(gate) ⊙ up`, width intermediate) inside the
//! activation kernel, its output inside the residual add. `mlp.down_proj` is a plain linear,
//! so coordinates are HF `down_proj.weight[row, col]` with col indexing the intermediate
//! channels (the up half of `gate_up_proj`).

use crate::backend::cpu::{self, AttnParams};
use crate::hooks::HookKind;
use crate::model::arch::shared::{self, hook};
use crate::model::arch::{ForwardOptions, Input, KvCache};
use crate::model::Model;
use crate::Result;

/// Tensor names of one block.
struct Names {
    attn_norm: String,
    qkv: String,
    o: String,
    mlp_norm: String,
    gate_up: String,
    down: String,
}

impl Names {
    fn new(l: usize) -> Self {
        let p = format!("model.layers.{l}");
        Names {
            attn_norm: format!("{p}.input_layernorm.weight"),
            qkv: format!("{p}.self_attn.qkv_proj.weight"),
            o: format!("{p}.self_attn.o_proj.weight"),
            mlp_norm: format!("{p}.post_attention_layernorm.weight"),
            gate_up: format!("{p}.mlp.gate_up_proj.weight"),
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
    if c.attention_bias {
        return Err(crate::Error::Invalid("Phi-3 with attention biases is not supported".into()));
    }
    for l in 0..c.num_layers {
        let n = Names::new(l);
        w.get_shaped(&n.attn_norm, &[h])?;
        w.get_shaped(&n.mlp_norm, &[h])?;
        w.get_shaped(&n.qkv, &[qd + 2 * kvd, h])?;
        w.get_shaped(&n.o, &[h, qd])?;
        w.get_shaped(&n.gate_up, &[2 * i, h])?;
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
    let inv_freq = shared::inv_freq(c, c.rope_theta, true);

    // Embedding: x[t] = E[token[t]] (or the given residual stream entering `first`).
    let (mut x, pos0, first) = shared::input_stream(w, input, cache.len, h)?;
    let t = x.len() / h;

    let mut xn = vec![0f32; t * h];
    let mut qkv = vec![0f32; t * (qd + 2 * kvd)];
    let (mut q, mut k, mut v) = (vec![0f32; t * qd], vec![0f32; t * kvd], vec![0f32; t * kvd]);
    let mut att = vec![0f32; t * qd];
    let mut proj = vec![0f32; t * h];
    let mut gate_up = vec![0f32; t * 2 * i];
    let (mut gate, mut up, mut act) = (vec![0f32; t * i], vec![0f32; t * i], vec![0f32; t * i]);

    for l in first..c.num_layers {
        let n = Names::new(l);
        hook(&mut opts.hooks, l, HookKind::ResidPre, &mut x, h, pos0);

        // Attention: xn = rmsnorm(x); [q | k | v] = xn·W_qkvᵀ; rope on the rotary dims.
        cpu::rmsnorm(&x, &w.get(&n.attn_norm)?.data, eps, &mut xn, h);
        cpu::linear(&xn, &w.get(&n.qkv)?.data, None, &mut qkv, t, h, qd + 2 * kvd);
        shared::split_rows(&qkv, t, &mut [&mut q, &mut k, &mut v]);
        cpu::rope_partial(&mut q, &inv_freq, pos0, nh, hd);
        cpu::rope_partial(&mut k, &inv_freq, pos0, nkv, hd);

        // att = softmax(q·kᵀ/√d + causal/window mask)·v per head; x += att·W_oᵀ.
        let params =
            AttnParams { scale: c.attention_scale(l), window: c.layer_window(l), softcap: None };
        shared::attend(&mut opts, cache, c, l, pos0, &q, &k, &v, &mut att, params);
        cpu::linear(&att, &w.get(&n.o)?.data, None, &mut proj, t, qd, h);
        hook(&mut opts.hooks, l, HookKind::AttnOut, &mut proj, h, pos0);
        cpu::add_residual(&mut x, &proj, h, pos0, None);
        hook(&mut opts.hooks, l, HookKind::ResidMid, &mut x, h, pos0);

        // MLP: [gate | up] = xn·W_gate_upᵀ on xn = rmsnorm(x); a = act(gate) ⊙ up (input
        // statistics fused); x += a·W_downᵀ (output statistics fused into the add).
        cpu::rmsnorm(&x, &w.get(&n.mlp_norm)?.data, eps, &mut xn, h);
        cpu::linear(&xn, &w.get(&n.gate_up)?.data, None, &mut gate_up, t, h, 2 * i);
        shared::split_rows(&gate_up, t, &mut [&mut gate, &mut up]);
        hook(&mut opts.hooks, l, HookKind::MlpPre, &mut gate, i, pos0);
        hook(&mut opts.hooks, l, HookKind::MlpPreLinear, &mut up, i, pos0);
        shared::mlp_act(&mut opts, l, c.family.hidden_act, Some(&gate), &up, &mut act, i, pos0);
        cpu::linear(&act, &w.get(&n.down)?.data, None, &mut proj, t, i, h);
        shared::mlp_write(&mut opts, l, &mut x, &mut proj, h, pos0);
        hook(&mut opts.hooks, l, HookKind::ResidPost, &mut x, h, pos0);
    }
    cache.len = pos0 + t;

    // Final norm and LM head, only for the rows asked for.
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
