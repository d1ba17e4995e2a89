//! Steps the family forward passes share: hook calls, the attention step (KV-cache append,
//! attention, the `attn.hook_pattern` hook), the MLP activation with its fused spike
//! statistics, the MLP's write into the residual stream, and the LM head.

use crate::backend::cpu::{self, Act, AttnParams};
use crate::hooks::{Activation, HookKind, HookPoint, Hooks};
use crate::model::arch::{ForwardOptions, Input, KvCache, Logits};
use crate::model::config::HiddenAct;
use crate::model::{Model, ModelConfig, Weights};
use crate::Result;

/// Run the hooks registered at `(layer, kind)`, if any.
pub(crate) fn hook(
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

/// Whether a hook is registered at `(layer, kind)`.
pub(crate) fn hooked(hooks: &Option<&mut Hooks<'_>>, layer: usize, kind: HookKind) -> bool {
    hooks.as_ref().is_some_and(|h| h.has(HookPoint { layer, kind }))
}

/// The LM head's tensor: `lm_head.weight`, or the embedding when tied.
pub(crate) fn head_name(model: &Model) -> &'static str {
    if model.weights.contains("lm_head.weight") {
        "lm_head.weight"
    } else {
        "model.embed_tokens.weight"
    }
}

/// Check the embedding's shape, and the LM head's when untied (or present anyway).
pub(crate) fn validate_embed_and_head(w: &Weights, c: &ModelConfig) -> Result<()> {
    w.get_shaped("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
    if !c.tie_word_embeddings || w.contains("lm_head.weight") {
        w.get_shaped("lm_head.weight", &[c.vocab_size, c.hidden_size])?;
    }
    Ok(())
}

/// The residual stream a pass starts from, its first position and its first block: the
/// token embeddings `x[t] = E[token[t]]` at the cache's end for [`Input::Tokens`], or the
/// given stream entering `layer` for [`Input::Residual`].
pub(crate) fn input_stream(
    w: &Weights,
    input: Input<'_>,
    cache_len: usize,
    h: usize,
) -> Result<(Vec<f32>, usize, usize)> {
    Ok(match input {
        Input::Tokens(tokens) => (embed(w, "model.embed_tokens.weight", tokens, h)?, cache_len, 0),
        Input::Residual { layer, x, pos0 } => (x.to_vec(), pos0, layer),
    })
}

/// `x[t] = E[token[t]]`, row by row.
pub(crate) fn embed(w: &Weights, name: &str, tokens: &[u32], h: usize) -> Result<Vec<f32>> {
    let emb = &w.get(name)?.data;
    let mut x = Vec::with_capacity(tokens.len() * h);
    for &tok in tokens {
        x.extend_from_slice(&emb[tok as usize * h..][..h]);
    }
    Ok(x)
}

/// RoPE inverse frequencies over the first `c.rotary_dim()` dims of a head, for base
/// `theta`, with the configured scaling when `scaled`.
pub(crate) fn inv_freq(c: &ModelConfig, theta: f64, scaled: bool) -> Vec<f32> {
    let mut rc = c.clone();
    rc.head_dim = c.rotary_dim();
    rc.rope_theta = theta;
    if !scaled {
        rc.rope_scaling = None;
    }
    crate::model::arch::llama::inv_freq(&rc, None)
}

/// `1 + w`: Gemma's RMSNorm multiplies by it.
pub(crate) fn one_plus(w: &[f32]) -> Vec<f32> {
    w.iter().map(|v| 1.0 + v).collect()
}

/// Append this call's keys and values (rows at `pos0..`) to layer `l`'s cache, dropping any
/// positions past `pos0`, then `att = softmax(scores(q, k))·v` per head (see
/// [`cpu::attention_with`]). The softmax weights go to `attn.hook_pattern` when a hook is
/// registered there.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    opts: &mut ForwardOptions<'_, '_>,
    cache: &mut KvCache,
    c: &ModelConfig,
    l: usize,
    pos0: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    att: &mut [f32],
    params: AttnParams,
) {
    let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let kvd = nkv * hd;
    let rows = q.len() / (nh * hd);
    let (kc, vc) = &mut cache.layers[l];
    kc.truncate(pos0 * kvd);
    vc.truncate(pos0 * kvd);
    kc.extend_from_slice(k);
    vc.extend_from_slice(v);
    if hooked(&opts.hooks, l, HookKind::AttnPattern) {
        let width = nh * (pos0 + rows);
        let mut pattern = vec![0f32; rows * width];
        cpu::attention_with(q, kc, vc, att, rows, pos0, nh, nkv, hd, params, Some(&mut pattern));
        hook(&mut opts.hooks, l, HookKind::AttnPattern, &mut pattern, width, pos0);
    } else {
        cpu::attention_with(q, kc, vc, att, rows, pos0, nh, nkv, hd, params, None);
    }
}

/// The MLP activation `out = act(gate) ⊙ up` (or `act(up)` with no gate), run through the
/// `mlp.hook_post` hook. Its spike statistics (per column, max |out| and position) are fused
/// into the activation kernel, or taken after the hook when one may have rewritten `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mlp_act(
    opts: &mut ForwardOptions<'_, '_>,
    l: usize,
    act: HiddenAct,
    gate: Option<&[f32]>,
    up: &[f32],
    out: &mut [f32],
    i: usize,
    pos0: usize,
) {
    let post_hooked = hooked(&opts.hooks, l, HookKind::MlpPost);
    let stats = match opts.stats.as_deref_mut() {
        Some(s) if !post_hooked => Some(s.layers[l].input.as_mut_slice()),
        _ => None,
    };
    match (gate, act) {
        (Some(g), HiddenAct::Silu) => cpu::silu_mul(g, up, out, i, pos0, stats),
        (Some(g), HiddenAct::GeluTanh) => cpu::gelu_tanh_mul(g, up, out, i, pos0, stats),
        (Some(g), HiddenAct::Gelu) => cpu::gelu_mul(g, up, out, i, pos0, stats),
        (None, act) => {
            let a = match act {
                HiddenAct::Silu => Act::Silu,
                HiddenAct::GeluTanh => Act::GeluTanh,
                HiddenAct::Gelu => Act::Gelu,
            };
            cpu::activate(up, out, a, i, pos0, stats)
        }
    }
    hook(&mut opts.hooks, l, HookKind::MlpPost, out, i, pos0);
    if post_hooked {
        if let Some(s) = opts.stats.as_deref_mut() {
            cpu::column_max(out, i, pos0, &mut s.layers[l].input);
        }
    }
}

/// What the MLP writes into the residual stream: `hook_mlp_out` on `y`, then `x += y` with
/// the output statistics (per row of the down-projection, max |y| and position) fused into
/// the add.
pub(crate) fn mlp_write(
    opts: &mut ForwardOptions<'_, '_>,
    l: usize,
    x: &mut [f32],
    y: &mut [f32],
    h: usize,
    pos0: usize,
) {
    hook(&mut opts.hooks, l, HookKind::MlpOut, y, h, pos0);
    let stats = opts.stats.as_deref_mut().map(|s| s.layers[l].output.as_mut_slice());
    cpu::add_residual(x, y, h, pos0, stats);
}

/// The dense gated MLP of layer `l` on normalized rows `xn` (`[t, h]`, first at `pos0`),
/// with its hook points and spike input statistic: `down_proj(act(gate_proj(xn)) ⊙
/// up_proj(xn))`, returned for [`mlp_write`]. For the dense layers of the MoE families.
pub(crate) fn gated_mlp(
    w: &Weights,
    opts: &mut ForwardOptions<'_, '_>,
    l: usize,
    xn: &[f32],
    (h, i): (usize, usize),
    act_fn: HiddenAct,
    pos0: usize,
) -> Result<Vec<f32>> {
    let t = xn.len() / h;
    let p = format!("model.layers.{l}.mlp");
    let weight = |name: &str| -> Result<&[f32]> { Ok(&w.get(&format!("{p}.{name}.weight"))?.data) };
    let (mut gate, mut up, mut act) = (vec![0f32; t * i], vec![0f32; t * i], vec![0f32; t * i]);
    cpu::linear(xn, weight("gate_proj")?, None, &mut gate, t, h, i);
    cpu::linear(xn, weight("up_proj")?, None, &mut up, t, h, i);
    hook(&mut opts.hooks, l, HookKind::MlpPre, &mut gate, i, pos0);
    hook(&mut opts.hooks, l, HookKind::MlpPreLinear, &mut up, i, pos0);
    mlp_act(opts, l, act_fn, Some(&gate), &up, &mut act, i, pos0);
    let mut y = vec![0f32; t * h];
    cpu::linear(&act, weight("down_proj")?, None, &mut y, t, i, h);
    Ok(y)
}

/// Logits of the rows `which` asks for: `norm` maps each residual row to the head's input,
/// then `logits = xn · headᵀ`, soft-capped to `cap · tanh(z / cap)` when `softcap` is set.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lm_head(
    x: &[f32],
    h: usize,
    vocab: usize,
    which: Logits,
    head: &[f32],
    bias: Option<&[f32]>,
    softcap: Option<f64>,
    norm: impl Fn(&[f32], &mut [f32]),
) -> Vec<f32> {
    let t = x.len() / h;
    let rows = match which {
        Logits::None => return Vec::new(),
        Logits::All => 0..t,
        Logits::Last => t - 1..t,
    };
    let xr = &x[rows.start * h..rows.end * h];
    let mut xf = vec![0f32; xr.len()];
    norm(xr, &mut xf);
    let mut logits = vec![0f32; rows.len() * vocab];
    cpu::linear(&xf, head, bias, &mut logits, rows.len(), h, vocab);
    if let Some(cap) = softcap {
        cpu::softcap(&mut logits, cap as f32);
    }
    logits
}

/// Split each of the `rows` rows of a fused projection output (`[rows, Σ widths]`) into the
/// buffers `outs` (`[rows, widths[k]]`), in order: q/k/v of a fused `qkv_proj`, gate/up of
/// `gate_up_proj`.
pub(crate) fn split_rows(fused: &[f32], rows: usize, outs: &mut [&mut [f32]]) {
    if rows == 0 {
        return;
    }
    let widths: Vec<usize> = outs.iter().map(|o| o.len() / rows).collect();
    let total: usize = widths.iter().sum();
    debug_assert_eq!(fused.len(), rows * total);
    for (r, row) in fused.chunks(total).enumerate() {
        let mut at = 0;
        for (o, &wd) in outs.iter_mut().zip(&widths) {
            o[r * wd..(r + 1) * wd].copy_from_slice(&row[at..at + wd]);
            at += wd;
        }
    }
}
