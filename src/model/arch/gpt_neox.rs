//! GPT-NeoX and Pythia (`GPTNeoXForCausalLM`).
//!
//! LayerNorms with weight and bias, biases on every linear, partial RoPE (only the first
//! `rotary_pct · head_dim` dims of each head rotate, base `rotary_emb_base`), an un-gated MLP
//! `dense_4h_to_h(gelu(dense_h_to_4h(·)))` (exact GELU unless `hidden_act` says otherwise).
//! With `use_parallel_residual` (Pythia) attention and MLP both read the block input:
//! `x = x + attn(ln₁(x)) + mlp(ln₂(x))`; otherwise `x += attn(ln₁(x))`, then
//! `x += mlp(ln₂(x))`. Logits `= final_layer_norm(x) · embed_outᵀ`.
//!
//! Loading renames the tensors into swk's layout and reorders the fused
//! `query_key_value` rows, which HF interleaves per head (`[q₀ k₀ v₀ q₁ k₁ v₁ …]`, `head_dim`
//! rows each), into `[q; k; v]` (llama.cpp's converter does the same, so GGUF files already
//! have that order):
//!
//! | HF | swk |
//! |---|---|
//! | `gpt_neox.embed_in`, `embed_out` | `model.embed_tokens`, `lm_head` |
//! | `gpt_neox.layers.L.input_layernorm`, `…post_attention_layernorm` | same names under `model.layers.L` |
//! | `…attention.query_key_value` (reordered) | `model.layers.L.self_attn.qkv_proj` |
//! | `…attention.dense` | `model.layers.L.self_attn.o_proj` |
//! | `…mlp.dense_h_to_4h` | `model.layers.L.mlp.up_proj` |
//! | `…mlp.dense_4h_to_h` | `model.layers.L.mlp.down_proj` |
//! | `gpt_neox.final_layer_norm` | `model.norm` |
//!
//! `dense_4h_to_h` is an ordinary linear, so `down_proj.weight[row, col]` is
//! `dense_4h_to_h.weight[row, col]`. Spike statistics: the down-projection input inside the
//! activation kernel, its output (bias included) inside the residual add. With the parallel
//! residual there is no `hook_resid_mid`; `mlp.hook_pre` is the `dense_h_to_4h` output and
//! there is no `hook_pre_linear`.

use crate::backend::cpu::{self, AttnParams};
use crate::hooks::HookKind;
use crate::model::arch::shared::{self, hook};
use crate::model::arch::{ForwardOptions, Input, KvCache};
use crate::model::{Model, ModelConfig, Tensor, Weights};
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

/// Reorder the rows of a per-head interleaved `[q₀ k₀ v₀ q₁ …]` tensor (`head_dim` rows each,
/// `cols` values per row) into `[q; k; v]`.
fn deinterleave(name: &str, t: &Tensor, n_heads: usize) -> Result<Tensor> {
    let rows = t.shape.first().copied().unwrap_or(0);
    let cols = t.data.len().checked_div(rows).unwrap_or(0);
    if rows == 0 || rows % (3 * n_heads) != 0 {
        return Err(Error::tensor(name, format!("{rows} rows are not 3 × {n_heads} heads")));
    }
    let hd = rows / (3 * n_heads);
    let mut out = vec![0f32; t.data.len()];
    for h in 0..n_heads {
        for part in 0..3 {
            let src = (h * 3 + part) * hd * cols;
            let dst = (part * n_heads + h) * hd * cols;
            out[dst..dst + hd * cols].copy_from_slice(&t.data[src..src + hd * cols]);
        }
    }
    Tensor::new(name, t.shape.clone(), out, &t.source_dtype)
}

/// Rename a GPT-NeoX checkpoint's tensors into swk's layout (see the module docs).
pub fn rename_hf(config: &ModelConfig, weights: &mut Weights) -> Result<()> {
    let names: Vec<String> = weights.names().map(str::to_string).collect();
    for name in names {
        let Some(t) = weights.remove(&name) else { continue };
        let short = name.strip_prefix("gpt_neox.").unwrap_or(&name);
        let new = match short {
            "embed_in.weight" => "model.embed_tokens.weight".to_string(),
            "embed_out.weight" => "lm_head.weight".to_string(),
            "final_layer_norm.weight" => "model.norm.weight".to_string(),
            "final_layer_norm.bias" => "model.norm.bias".to_string(),
            _ => {
                let parsed = short.strip_prefix("layers.").and_then(|r| r.split_once('.'));
                let Some((l, part)) = parsed else {
                    // Buffers such as rotary_emb.inv_freq are recomputed.
                    if !short.ends_with("inv_freq") {
                        weights.insert(name, t);
                    }
                    continue;
                };
                let (module, kind) = part.rsplit_once('.').unwrap_or((part, ""));
                let swk = match module {
                    "input_layernorm" | "post_attention_layernorm" => module,
                    "attention.query_key_value" => "self_attn.qkv_proj",
                    "attention.dense" => "self_attn.o_proj",
                    "mlp.dense_h_to_4h" => "mlp.up_proj",
                    "mlp.dense_4h_to_h" => "mlp.down_proj",
                    // Causal-mask and rotary buffers of old checkpoints.
                    "attention" | "attention.rotary_emb" => continue,
                    _ => {
                        weights.insert(name, t);
                        continue;
                    }
                };
                let new = format!("model.layers.{l}.{swk}.{kind}");
                if swk == "self_attn.qkv_proj" {
                    let t = deinterleave(&new, &t, config.num_heads)?;
                    weights.insert(new, t);
                    continue;
                }
                new
            }
        };
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
    w.get_shaped("model.norm.weight", &[h])?;
    w.get_shaped("model.norm.bias", &[h])?;
    for l in 0..c.num_layers {
        let n = Names::new(l);
        for (name, rows, cols) in [(&n.qkv, 3 * h, h), (&n.o, h, h), (&n.up, i, h), (&n.down, h, i)]
        {
            w.get_shaped(&format!("{name}.weight"), &[rows, cols])?;
            if c.attention_bias || name == &n.up || name == &n.down {
                w.get_shaped(&format!("{name}.bias"), &[rows])?;
            }
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
    let parallel = c.family.parallel_residual;
    let inv_freq = shared::inv_freq(c, c.rope_theta, true);
    let get =
        |name: &str, kind: &str| -> Result<&[f32]> { Ok(&w.get(&format!("{name}.{kind}"))?.data) };
    let attn_bias = |name: &str| -> Result<Option<&[f32]>> {
        Ok(if c.attention_bias { Some(get(name, "bias")?) } else { None })
    };
    let layernorm = |x: &[f32], name: &str, out: &mut [f32]| -> Result<()> {
        cpu::layernorm(x, Some(get(name, "weight")?), Some(get(name, "bias")?), eps, out, h);
        Ok(())
    };

    // Embedding: x[t] = E[token[t]] (or the given residual stream entering `first`).
    let (mut x, pos0, first) = shared::input_stream(w, input, cache.len, h)?;
    let t = x.len() / h;

    let mut xn = vec![0f32; t * h];
    let mut qkv = vec![0f32; t * 3 * h];
    let (mut q, mut k, mut v) = (vec![0f32; t * h], vec![0f32; t * h], vec![0f32; t * h]);
    let mut att = vec![0f32; t * h];
    let (mut attn_out, mut proj) = (vec![0f32; t * h], vec![0f32; t * h]);
    let (mut up, mut act) = (vec![0f32; t * i], vec![0f32; t * i]);

    for l in first..c.num_layers {
        let n = Names::new(l);
        hook(&mut opts.hooks, l, HookKind::ResidPre, &mut x, h, pos0);

        // Attention: xn = layernorm₁(x); [q | k | v] = xn·W_qkvᵀ + b; partial rope(q, k).
        layernorm(&x, &n.ln1, &mut xn)?;
        cpu::linear(&xn, get(&n.qkv, "weight")?, attn_bias(&n.qkv)?, &mut qkv, t, h, 3 * h);
        shared::split_rows(&qkv, t, &mut [&mut q, &mut k, &mut v]);
        cpu::rope_partial(&mut q, &inv_freq, pos0, nh, hd);
        cpu::rope_partial(&mut k, &inv_freq, pos0, nh, hd);

        // o = softmax(q·kᵀ/√d + causal mask)·v per head, then ·W_oᵀ + b.
        let params = AttnParams { scale: c.attention_scale(l), window: None, softcap: None };
        shared::attend(&mut opts, cache, c, l, pos0, &q, &k, &v, &mut att, params);
        cpu::linear(&att, get(&n.o, "weight")?, attn_bias(&n.o)?, &mut attn_out, t, h, h);
        hook(&mut opts.hooks, l, HookKind::AttnOut, &mut attn_out, h, pos0);

        // MLP input: layernorm₂ of the block input (parallel) or of x + o (sequential).
        if parallel {
            layernorm(&x, &n.ln2, &mut xn)?;
            cpu::add_residual(&mut x, &attn_out, h, pos0, None);
        } else {
            cpu::add_residual(&mut x, &attn_out, h, pos0, None);
            hook(&mut opts.hooks, l, HookKind::ResidMid, &mut x, h, pos0);
            layernorm(&x, &n.ln2, &mut xn)?;
        }

        // MLP: u = xn·W_upᵀ + b; a = gelu(u) (input statistics fused); y = a·W_downᵀ + b;
        // x += y (output statistics fused into the add).
        cpu::linear(&xn, get(&n.up, "weight")?, Some(get(&n.up, "bias")?), &mut up, t, h, i);
        hook(&mut opts.hooks, l, HookKind::MlpPre, &mut up, i, pos0);
        shared::mlp_act(&mut opts, l, c.family.hidden_act, None, &up, &mut act, i, pos0);
        cpu::linear(&act, get(&n.down, "weight")?, Some(get(&n.down, "bias")?), &mut proj, t, i, h);
        shared::mlp_write(&mut opts, l, &mut x, &mut proj, h, pos0);
        hook(&mut opts.hooks, l, HookKind::ResidPost, &mut x, h, pos0);
    }
    cache.len = pos0 + t;

    // Final LayerNorm and the LM head (embed_out).
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
