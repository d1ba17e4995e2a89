//! GPT-2 (`GPT2LMHeadModel`).
//!
//! `x = wte[token] + wpe[position]`; per block, with LayerNorms that have weight and bias:
//! `x += c_proj(attn(split(c_attn(ln_1(x)))))`, then `x += mlp.c_proj(gelu(c_fc(ln_2(x))))`
//! (every linear has a bias; no RoPE; GELU is `gelu_new`, the tanh approximation, unless
//! `activation_function` says otherwise); logits `= ln_f(x) · wteᵀ` (tied).
//!
//! Loading renames the tensors into swk's layout (the HF `transformer.` prefix is optional, as
//! in openai-community/gpt2) and transposes the Conv1D weights, stored `[in, out]`, into the
//! `[out, in]` of a linear layer:
//!
//! | HF | swk |
//! |---|---|
//! | `wte`, `wpe` | `model.embed_tokens`, `model.embed_positions` |
//! | `h.L.ln_1`, `h.L.ln_2` | `model.layers.L.input_layernorm`, `…post_attention_layernorm` |
//! | `h.L.attn.c_attn` (ᵀ) | `model.layers.L.self_attn.qkv_proj` (rows q, k, v) |
//! | `h.L.attn.c_proj` (ᵀ) | `model.layers.L.self_attn.o_proj` |
//! | `h.L.mlp.c_fc` (ᵀ) | `model.layers.L.mlp.up_proj` |
//! | `h.L.mlp.c_proj` (ᵀ) | `model.layers.L.mlp.down_proj` |
//! | `ln_f` | `model.norm` |
//!
//! (`h.L.attn.bias`/`masked_bias`, causal-mask buffers, are dropped.) So the MLP's `c_proj`
//! is the down-projection: a super weight at `down_proj.weight[row, col]` (row = hidden dim,
//! col = MLP channel) is `mlp.c_proj.weight[col, row]` in the HF file. Spike statistics: the
//! down-projection input `gelu(c_fc(·))` inside the activation kernel, its output (bias
//! included) inside the residual add. `mlp.hook_pre` is the `c_fc` output; there is no
//! `hook_pre_linear`.

use crate::backend::cpu::{self, AttnParams};
use crate::hooks::HookKind;
use crate::model::arch::shared::{self, hook};
use crate::model::arch::{ForwardOptions, Input, KvCache};
use crate::model::{Model, Tensor, Weights};
use crate::{Error, Result};

/// Tensor name prefixes of one block (each has `.weight` and `.bias`).
struct Names {
    ln1: String,
    qkv: String,
    o: String,
    ln2: String,
    up: String,
    down: String,
}

impl Names {
    fn new(l: usize) -> Self {
        let p = format!("model.layers.{l}");
        Names {
            ln1: format!("{p}.input_layernorm"),
            qkv: format!("{p}.self_attn.qkv_proj"),
            o: format!("{p}.self_attn.o_proj"),
            ln2: format!("{p}.post_attention_layernorm"),
            up: format!("{p}.mlp.up_proj"),
            down: format!("{p}.mlp.down_proj"),
        }
    }
}

/// `[rows, cols]` → `[cols, rows]`.
pub(crate) fn transpose(name: &str, t: &Tensor) -> Result<Tensor> {
    let (r, c) = t
        .dims2()
        .ok_or_else(|| Error::tensor(name, format!("expected 2 dims, found {:?}", t.shape)))?;
    let mut out = vec![0f32; t.data.len()];
    for (i, row) in t.data.chunks(c).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            out[j * r + i] = v;
        }
    }
    Tensor::new(name, vec![c, r], out, &t.source_dtype)
}

/// Rename a GPT-2 checkpoint's tensors into swk's layout (see the module docs).
pub fn rename_hf(weights: &mut Weights) -> Result<()> {
    let names: Vec<String> = weights.names().map(str::to_string).collect();
    for name in names {
        let short = name.strip_prefix("transformer.").unwrap_or(&name);
        let Some(t) = weights.remove(&name) else { continue };
        let (new, conv1d) = match short {
            "wte.weight" => ("model.embed_tokens.weight".to_string(), false),
            "wpe.weight" => ("model.embed_positions.weight".to_string(), false),
            "ln_f.weight" | "ln_f.bias" => (format!("model.norm.{}", &short[5..]), false),
            "lm_head.weight" => (short.to_string(), false),
            _ => {
                let Some(rest) = short.strip_prefix("h.") else {
                    weights.insert(name, t);
                    continue;
                };
                let Some((l, part)) = rest.split_once('.') else {
                    weights.insert(name, t);
                    continue;
                };
                let (module, kind) = part.rsplit_once('.').unwrap_or((part, ""));
                let (swk, conv1d) = match module {
                    "ln_1" => ("input_layernorm", false),
                    "ln_2" => ("post_attention_layernorm", false),
                    "attn.c_attn" => ("self_attn.qkv_proj", true),
                    "attn.c_proj" => ("self_attn.o_proj", true),
                    "mlp.c_fc" => ("mlp.up_proj", true),
                    "mlp.c_proj" => ("mlp.down_proj", true),
                    // Causal-mask buffers of old checkpoints.
                    "attn" if kind == "bias" || kind == "masked_bias" => continue,
                    _ => {
                        weights.insert(name, t);
                        continue;
                    }
                };
                (format!("model.layers.{l}.{swk}.{kind}"), conv1d && kind == "weight")
            }
        };
        let t = if conv1d { transpose(&new, &t)? } else { t };
        weights.insert(new, t);
    }
    Ok(())
}

/// Check names and shapes of every tensor the forward pass reads.
pub fn validate(model: &Model) -> Result<()> {
    let c = &model.config;
    let w = &model.weights;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    shared::validate_embed_and_head(w, c)?;
    w.get_shaped("model.embed_positions.weight", &[c.max_position_embeddings, h])?;
    w.get_shaped("model.norm.weight", &[h])?;
    w.get_shaped("model.norm.bias", &[h])?;
    for l in 0..c.num_layers {
        let n = Names::new(l);
        for (name, rows, cols) in [(&n.qkv, 3 * h, h), (&n.o, h, h), (&n.up, i, h), (&n.down, h, i)]
        {
            w.get_shaped(&format!("{name}.weight"), &[rows, cols])?;
            w.get_shaped(&format!("{name}.bias"), &[rows])?;
        }
        for name in [&n.ln1, &n.ln2] {
            w.get_shaped(&format!("{name}.weight"), &[h])?;
            w.get_shaped(&format!("{name}.bias"), &[h])?;
        }
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
    let (nh, hd) = (c.num_heads, c.head_dim);
    let get =
        |name: &str, kind: &str| -> Result<&[f32]> { Ok(&w.get(&format!("{name}.{kind}"))?.data) };
    let layernorm = |x: &[f32], name: &str, out: &mut [f32]| -> Result<()> {
        cpu::layernorm(x, Some(get(name, "weight")?), Some(get(name, "bias")?), eps, out, h);
        Ok(())
    };

    // Embedding: x[t] = wte[token[t]] + wpe[pos0 + t] (or the residual stream entering `first`).
    let (mut x, pos0, first) = match input {
        Input::Tokens(tokens) => {
            let pos0 = cache.len;
            if pos0 + tokens.len() > c.max_position_embeddings {
                return Err(Error::Invalid(format!(
                    "GPT-2 has {} learned positions; {} tokens after {pos0} do not fit",
                    c.max_position_embeddings,
                    tokens.len()
                )));
            }
            let mut x = shared::embed(w, "model.embed_tokens.weight", tokens, h)?;
            let wpe = &w.get("model.embed_positions.weight")?.data[pos0 * h..];
            x.iter_mut().zip(wpe).for_each(|(x, p)| *x += p);
            (x, pos0, 0)
        }
        Input::Residual { layer, x, pos0 } => (x.to_vec(), pos0, layer),
    };
    let t = x.len() / h;

    let mut xn = vec![0f32; t * h];
    let mut qkv = vec![0f32; t * 3 * h];
    let (mut q, mut k, mut v) = (vec![0f32; t * h], vec![0f32; t * h], vec![0f32; t * h]);
    let mut att = vec![0f32; t * h];
    let mut proj = vec![0f32; t * h];
    let (mut up, mut act) = (vec![0f32; t * i], vec![0f32; t * i]);

    for l in first..c.num_layers {
        let n = Names::new(l);
        hook(&mut opts.hooks, l, HookKind::ResidPre, &mut x, h, pos0);

        // Attention: xn = layernorm₁(x); [q | k | v] = xn·W_qkvᵀ + b.
        layernorm(&x, &n.ln1, &mut xn)?;
        cpu::linear(&xn, get(&n.qkv, "weight")?, Some(get(&n.qkv, "bias")?), &mut qkv, t, h, 3 * h);
        shared::split_rows(&qkv, t, &mut [&mut q, &mut k, &mut v]);

        // att = softmax(q·kᵀ/√d + causal mask)·v per head (no RoPE); x += att·W_oᵀ + b.
        let params = AttnParams { scale: c.attention_scale(l), window: None, softcap: None };
        shared::attend(&mut opts, cache, c, l, pos0, &q, &k, &v, &mut att, params);
        cpu::linear(&att, get(&n.o, "weight")?, Some(get(&n.o, "bias")?), &mut proj, t, nh * hd, h);
        hook(&mut opts.hooks, l, HookKind::AttnOut, &mut proj, h, pos0);
        cpu::add_residual(&mut x, &proj, h, pos0, None);
        hook(&mut opts.hooks, l, HookKind::ResidMid, &mut x, h, pos0);

        // MLP: u = layernorm₂(x)·W_fcᵀ + b; a = gelu(u) (input statistics fused);
        // x += a·W_downᵀ + b (output statistics fused into the add).
        layernorm(&x, &n.ln2, &mut xn)?;
        cpu::linear(&xn, get(&n.up, "weight")?, Some(get(&n.up, "bias")?), &mut up, t, h, i);
        hook(&mut opts.hooks, l, HookKind::MlpPre, &mut up, i, pos0);
        shared::mlp_act(&mut opts, l, c.family.hidden_act, None, &up, &mut act, i, pos0);
        cpu::linear(&act, get(&n.down, "weight")?, Some(get(&n.down, "bias")?), &mut proj, t, i, h);
        shared::mlp_write(&mut opts, l, &mut x, &mut proj, h, pos0);
        hook(&mut opts.hooks, l, HookKind::ResidPost, &mut x, h, pos0);
    }
    cache.len = pos0 + t;

    // Final LayerNorm and the (tied) LM head.
    let (fw, fb) = (get("model.norm", "weight")?, get("model.norm", "bias")?);
    Ok(shared::lm_head(
        &x,
        h,
        c.vocab_size,
        opts.logits,
        &w.get(shared::head_name(model))?.data,
        None,
        None,
        |x, out| cpu::layernorm(x, Some(fw), Some(fb), eps, out, h),
    ))
}
