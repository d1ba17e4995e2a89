//! GGUF loading for the dense families beyond Llama and Gemma 3: llama.cpp-style GGUF copies
//! of the tiny qwen2, qwen3, phi3, olmo2, gemma, gemma2, olmo, gpt2 and gpt_neox fixtures
//! (written by tests/reference/make_tiny_dense_gguf.py with the `gguf` package's tensor-name
//! map and llama.cpp's converter changes: Gemma's `1 + w` norms, OLMo's Q/K permutation,
//! GPT-2's transposed Conv1D, GPT-NeoX's regrouped qkv) load to the same config and the same
//! tensors, bit for bit and under the same names, as the safetensors directories, and their
//! logits match transformers' within 1e-4 (max relative error in f32, scaled by
//! max(|reference|, 1)). The one inexact step is Gemma's norm: the GGUF holds `fl(1 + w)`, swk
//! keeps `fl(1 + w) - 1` (exact subtraction), so the forward's `1 + w` is the same float
//! llama.cpp multiplies by.

mod common;

use swk::model::Architecture;
use swk::Model;

fn load(spec: &std::path::Path) -> Model {
    Model::load(spec.to_str().unwrap()).unwrap_or_else(|e| panic!("{}: {e}", spec.display()))
}

/// Load `tiny/{src}_gguf/model.gguf` and `tiny/{src}`, compare them, and return the GGUF
/// model with its max relative logit error against `tiny/{src}/reference.json`.
fn check_gguf(src: &str, arch: Architecture) -> (Model, f32) {
    let g = load(&common::fixture(&format!("tiny/{src}_gguf/model.gguf")));
    let hf = load(&common::fixture(&format!("tiny/{src}")));
    assert_eq!(g.config.architecture, arch);
    assert_eq!(g.source.format, swk::model::Format::Gguf);

    // GGUF stores the norm epsilon and Gemma 2's attention scale as f32; everything else must
    // agree exactly.
    let eps = (g.config.rms_norm_eps, hf.config.rms_norm_eps);
    assert!((eps.0 - eps.1).abs() <= 1e-7 * eps.1, "{src}: eps {eps:?}");
    let mut gc = g.config.clone();
    gc.rms_norm_eps = hf.config.rms_norm_eps;
    if let (Some(a), Some(b)) =
        (g.config.family.query_pre_attn_scalar, hf.config.family.query_pre_attn_scalar)
    {
        assert!((a - b).abs() <= 1e-6 * b, "{src}: query_pre_attn_scalar {a} vs {b}");
        gc.family.query_pre_attn_scalar = Some(b);
    }
    assert_eq!(gc, hf.config, "{src}: config");

    let names = |m: &Model| m.weights.names().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(names(&g), names(&hf), "{src}: tensor names");
    let gemma = matches!(arch, Architecture::Gemma | Architecture::Gemma2);
    for (name, t) in hf.weights.iter() {
        let gt = g.weights.get(name).unwrap();
        assert_eq!(gt.shape, t.shape, "{src}: {name} shape");
        // Gemma norms went through f32 `1 + w` in the converter and `- 1` in the loader.
        let want =
            |v: f32| if gemma && name.ends_with("norm.weight") { (1.0 + v) - 1.0 } else { v };
        assert!(
            gt.data.iter().map(|v| v.to_bits()).eq(t.data.iter().map(|&v| want(v).to_bits())),
            "{src}: {name} differs"
        );
    }

    let r = common::json(&format!("tiny/{src}/reference.json"));
    let tokens = common::tokens(&r);
    let text = r["text"].as_str().unwrap();
    assert_eq!(g.tokenizer().unwrap().encode(text, false).unwrap(), tokens, "{src}: tokens");
    let want = common::logits(&r);
    let err = common::max_rel_err(&g.logits(&tokens).unwrap(), &want, 1.0);
    eprintln!("{src} gguf: max rel err {err:.2e} over {} logits", want.len());
    assert!(err <= 1e-4, "{src} gguf: max rel err {err} > 1e-4");
    (g, err)
}

/// Q/K/V biases; no Q/K row permutation (llama.cpp uses NeoX rotation for qwen2).
#[test]
fn qwen2_gguf() {
    let (m, _) = check_gguf("qwen2", Architecture::Qwen2);
    assert!(m.config.attention_bias);
    assert!(m.weights.contains("model.layers.0.self_attn.q_proj.bias"));
}

/// Per-head QK-norm from `attn_q_norm` / `attn_k_norm`.
#[test]
fn qwen3_gguf() {
    let (m, _) = check_gguf("qwen3", Architecture::Qwen3);
    assert_eq!(m.weights.get("model.layers.1.self_attn.q_norm.weight").unwrap().shape, [16]);
    assert_eq!(m.weights.get("model.layers.1.self_attn.k_norm.weight").unwrap().shape, [16]);
}

/// Fused `attn_qkv`, gate and up stacked in `ffn_up`, partial rotary from
/// `rope.dimension_count`, the sliding window from `attention.sliding_window`.
#[test]
fn phi3_gguf() {
    let (m, _) = check_gguf("phi3", Architecture::Phi3);
    assert_eq!(m.config.rotary_dim(), 12);
    assert_eq!(m.config.sliding_window, Some(5));
    assert_eq!(m.weights.get("model.layers.0.self_attn.qkv_proj.weight").unwrap().shape, [128, 64]);
    assert_eq!(m.weights.get("model.layers.0.mlp.gate_up_proj.weight").unwrap().shape, [320, 64]);
}

/// Post-norms only (`post_attention_norm`, `post_ffw_norm`), QK-norm over whole projections.
#[test]
fn olmo2_gguf() {
    let (m, _) = check_gguf("olmo2", Architecture::Olmo2);
    assert!(!m.weights.names().any(|n| n.contains("input_layernorm")));
    assert!(m.weights.contains("model.layers.1.post_feedforward_layernorm.weight"));
    assert_eq!(m.weights.get("model.layers.0.self_attn.q_norm.weight").unwrap().shape, [64]);
    assert_eq!(m.weights.get("model.layers.0.self_attn.k_norm.weight").unwrap().shape, [32]);
}

/// `1 + w` norms undone, no rope keys (base 10000), tied head (no `output.weight`).
#[test]
fn gemma_gguf() {
    let (m, _) = check_gguf("gemma", Architecture::Gemma);
    assert!(m.config.tie_word_embeddings);
    assert_eq!(m.config.rope_theta, 10000.0);
    assert!(!m.weights.contains("lm_head.weight"));
}

/// Four norms per block (`ffn_norm` is the pre-FFN norm), soft-capping, the sliding window
/// on alternate layers (llama.cpp's gemma2 default), the attention scale from
/// `gemma2.attention.scale` (24^-1/2 stored as f32).
#[test]
fn gemma2_gguf() {
    let (m, _) = check_gguf("gemma2", Architecture::Gemma2);
    let f = &m.config.family;
    assert!((f.query_pre_attn_scalar.unwrap() - 24.0).abs() < 1e-5);
    assert_eq!((f.attn_logit_softcapping, f.final_logit_softcapping), (Some(2.0), Some(3.0)));
    assert_eq!(f.sliding_layers, vec![true, false]);
    assert_eq!((m.config.layer_window(0), m.config.layer_window(1)), (Some(4), None));
    assert!(m.weights.contains("model.layers.1.pre_feedforward_layernorm.weight"));
    assert!(m.weights.contains("model.layers.1.post_feedforward_layernorm.weight"));
}

/// Q/K rows un-permuted (llama.cpp's LLAMA rope), no norm tensors, `clamp_kqv`.
#[test]
fn olmo_gguf() {
    let (m, _) = check_gguf("olmo", Architecture::Olmo);
    assert_eq!(m.config.family.clip_qkv, Some(0.5));
    assert!(!m.weights.names().any(|n| n.contains("norm")));
}

/// Conv1D weights transposed by the converter, learned positions, biases, tied head.
#[test]
fn gpt2_gguf() {
    let (m, _) = check_gguf("gpt2", Architecture::Gpt2);
    assert_eq!(m.weights.get("model.embed_positions.weight").unwrap().shape, [64, 64]);
    assert_eq!(m.weights.get("model.layers.0.self_attn.qkv_proj.weight").unwrap().shape, [192, 64]);
    assert_eq!(m.weights.get("model.layers.0.mlp.down_proj.weight").unwrap().shape, [64, 256]);
    assert!(m.config.tie_word_embeddings);
}

/// qkv regrouped by the converter as swk does, partial rotary from `rope.dimension_count`,
/// the parallel residual, an untied `output.weight`.
#[test]
fn gpt_neox_gguf() {
    let (m, _) = check_gguf("gpt_neox", Architecture::GptNeoX);
    assert_eq!(m.config.rotary_dim(), 4);
    assert!(m.config.family.parallel_residual);
    assert!(!m.config.tie_word_embeddings);
    assert!(m.weights.contains("model.layers.1.self_attn.qkv_proj.bias"));
}
