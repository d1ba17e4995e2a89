//! Logits and spike-statistics parity with Hugging Face transformers for the non-Llama
//! families, on tiny random models recorded by tests/reference/make_tiny_arch_models.py.
//! Tolerance: max relative error <= 1e-4 in f32, the error scaled by max(|reference|, 1).

mod common;

use swk::hooks::{HookKind, HookPoint, Hooks, SpikeStats};
use swk::model::arch::{ForwardOptions, Input, KvCache, Logits};
use swk::model::Architecture;
use swk::Model;

fn load(name: &str) -> Model {
    let dir = common::fixture(&format!("tiny/{name}"));
    let spec = if dir.join("model.gguf").is_file() { dir.join("model.gguf") } else { dir };
    Model::load(spec.to_str().unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Load fixture `name`, compare its logits with transformers' and its spike statistics with
/// the down-projection maxima transformers' hooks saw. Returns the model and the max error.
fn check(name: &str) -> (Model, f32) {
    let m = load(name);
    let r = common::json(&format!("tiny/{name}/reference.json"));
    let tokens = common::tokens(&r);
    let text = r["text"].as_str().unwrap();
    assert_eq!(m.tokenizer().unwrap().encode(text, false).unwrap(), tokens, "{name}: token ids");
    let want = common::logits(&r);
    let got = m.logits(&tokens).unwrap();
    let err = common::max_rel_err(&got, &want, 1.0);
    eprintln!("{name}: max rel err {err:.2e} over {} logits", want.len());
    assert!(err <= 1e-4, "{name}: max rel err {err} > 1e-4");

    let c = &m.config;
    let mut stats = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    let mut cache = KvCache::new(&m);
    m.forward(
        &tokens,
        &mut cache,
        ForwardOptions { stats: Some(&mut stats), logits: Logits::None, hooks: None },
    )
    .unwrap();
    for (key, is_input) in [("hidden_mlp_down_in_max", true), ("hidden_mlp_down_out_max", false)] {
        for rec in r[key].as_array().unwrap() {
            let l = rec["layer"].as_u64().unwrap() as usize;
            let peak =
                if is_input { stats.layers[l].input_peak() } else { stats.layers[l].output_peak() }
                    .unwrap();
            let channel =
                rec.get("channel").or_else(|| rec.get("row")).unwrap().as_u64().unwrap() as usize;
            assert_eq!(peak.channel, channel, "{name} {key} layer {l} channel");
            let pos = rec["position"].as_u64().unwrap() as usize;
            assert_eq!(peak.max.position, pos, "{name} {key} layer {l} position");
            let v = rec["value"].as_f64().unwrap() as f32;
            assert!(
                (peak.max.value - v).abs() <= 1e-4 * v.abs().max(1.0),
                "{name} {key} layer {l}: {} vs {v}",
                peak.max.value
            );
        }
    }
    (m, err)
}

/// Incremental decoding with the KV cache equals one full pass, and a pass started from the
/// residual stream entering block 1 (the confirmation path) equals the full pass.
fn check_cache_and_residual_start(name: &str) {
    let m = load(name);
    let tokens: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 300).collect();
    let full = m.logits(&tokens).unwrap();
    let v = m.config.vocab_size;
    let mut cache = KvCache::new(&m);
    let mut inc = m.forward(&tokens[..11], &mut cache, ForwardOptions::default()).unwrap();
    for &t in &tokens[11..] {
        inc.extend(m.forward(&[t], &mut cache, ForwardOptions::default()).unwrap());
    }
    assert_eq!(inc.len(), 20 * v);
    let err = common::max_rel_err(&inc, &full, 1.0);
    assert!(err <= 1e-5, "{name}: incremental vs full {err}");

    // Capture the residual entering block 1, then re-run only blocks 1.. from it.
    let captured = std::sync::Mutex::new(Vec::new());
    let mut hooks = Hooks::new();
    hooks.add(HookPoint { layer: 1, kind: HookKind::ResidPre }, |_, a| {
        captured.lock().unwrap().extend_from_slice(a.data)
    });
    let mut cache = KvCache::new(&m);
    let base = m
        .forward(
            &tokens,
            &mut cache,
            ForwardOptions { hooks: Some(&mut hooks), stats: None, logits: Logits::All },
        )
        .unwrap();
    drop(hooks);
    let x = captured.into_inner().unwrap();
    let mut c2 = cache.clone();
    let again = m
        .forward_input(
            Input::Residual { layer: 1, x: &x, pos0: 0 },
            &mut c2,
            ForwardOptions::default(),
        )
        .unwrap();
    let err = common::max_rel_err(&again, &base, 1.0);
    assert!(err <= 1e-6, "{name}: residual start vs full {err}");
}

/// Every hook point fires once per layer with the right width; an identity hook on the MLP
/// input leaves the logits unchanged and the statistics equal to the fused ones.
fn check_hooks(name: &str) {
    let m = load(name);
    let c = m.config.clone();
    let tokens: Vec<u32> = (0..9).map(|i| (i * 11 + 5) % 300).collect();
    let base = m.logits(&tokens).unwrap();
    let seen = std::sync::Mutex::new(Vec::new());
    let mut hooks = Hooks::new();
    for l in 0..c.num_layers {
        for kind in [
            HookKind::ResidPre,
            HookKind::AttnOut,
            HookKind::ResidMid,
            HookKind::MlpPre,
            HookKind::MlpPreLinear,
            HookKind::MlpPost,
            HookKind::MlpOut,
            HookKind::ResidPost,
        ] {
            let seen = &seen;
            hooks.add(HookPoint { layer: l, kind }, move |p, a| {
                seen.lock().unwrap().push((p, a.rows, a.cols));
            });
        }
    }
    let mut stats = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    let hooked = m
        .forward(
            &tokens,
            &mut KvCache::new(&m),
            ForwardOptions {
                hooks: Some(&mut hooks),
                stats: Some(&mut stats),
                logits: Logits::All,
            },
        )
        .unwrap();
    drop(hooks);
    assert_eq!(hooked, base, "{name}: read-only hooks changed the logits");
    let mut plain = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    m.forward(
        &tokens,
        &mut KvCache::new(&m),
        ForwardOptions { hooks: None, stats: Some(&mut plain), logits: Logits::None },
    )
    .unwrap();
    for l in 0..c.num_layers {
        assert_eq!(stats.layers[l].input, plain.layers[l].input, "{name} layer {l} input stats");
        assert_eq!(stats.layers[l].output, plain.layers[l].output, "{name} layer {l} output");
    }
    let seen = seen.into_inner().unwrap();
    for l in 0..c.num_layers {
        let at = |kind| seen.iter().filter(|(p, ..)| *p == HookPoint { layer: l, kind }).count();
        for kind in [HookKind::ResidPre, HookKind::AttnOut, HookKind::MlpPre, HookKind::MlpPost] {
            assert_eq!(at(kind), 1, "{name}: {kind:?} at layer {l}");
        }
        let gated = c.architecture.gated_mlp();
        assert_eq!(at(HookKind::MlpPreLinear), usize::from(gated), "{name}: pre_linear");
        // A parallel-residual block has no residual stream between attention and MLP.
        assert_eq!(at(HookKind::ResidMid), usize::from(!c.family.parallel_residual));
        for (p, rows, cols) in &seen {
            if p.layer == l {
                assert_eq!(*rows, tokens.len());
                let want = match p.kind {
                    HookKind::MlpPre | HookKind::MlpPreLinear | HookKind::MlpPost => {
                        c.intermediate_size
                    }
                    _ => c.hidden_size,
                };
                assert_eq!(*cols, want, "{name}: width at {p}");
            }
        }
    }
}

fn check_all(name: &str) -> Model {
    let (m, _) = check(name);
    check_cache_and_residual_start(name);
    check_hooks(name);
    m
}

#[test]
fn qwen3_qk_norm() {
    let m = check_all("qwen3");
    assert_eq!(m.config.architecture, Architecture::Qwen3);
    assert!(m.weights.contains("model.layers.0.self_attn.q_norm.weight"));
}

#[test]
fn gemma_geglu_scaled_embedding() {
    let m = check_all("gemma");
    assert_eq!(m.config.architecture, Architecture::Gemma);
    assert!(m.config.tie_word_embeddings);
}

#[test]
fn gemma2_softcaps_and_alternating_windows() {
    let m = check_all("gemma2");
    let f = &m.config.family;
    assert_eq!(f.sliding_layers, vec![true, false]);
    assert_eq!((f.attn_logit_softcapping, f.final_logit_softcapping), (Some(2.0), Some(3.0)));
    assert_eq!(f.query_pre_attn_scalar, Some(24.0));
    assert_eq!((m.config.layer_window(0), m.config.layer_window(1)), (Some(4), None));
}

#[test]
fn gemma3_qk_norm_local_rope_classic_config() {
    let m = check_all("gemma3");
    let f = &m.config.family;
    assert_eq!(f.sliding_layers, vec![true, false]);
    assert_eq!(f.rope_local_theta, Some(10000.0));
    assert_eq!(m.config.rope_theta, 1e6);
    assert!(m.config.rope_scaling.is_some());
    assert_eq!(f.attn_logit_softcapping, None);
}

/// A Gemma 3 written with llama.cpp's tensor names and its `1 + w` norm convention.
#[test]
fn gemma3_gguf() {
    let m = check_all("gemma3_gguf");
    assert_eq!(m.config.architecture, Architecture::Gemma3);
    assert_eq!(m.config.family.sliding_layers, vec![true, false]);
    assert_eq!(m.config.layer_window(0), Some(4));
    assert!(m.weights.contains("model.layers.1.post_feedforward_layernorm.weight"));
    assert!(m.weights.contains("model.layers.0.self_attn.k_norm.weight"));
}

#[test]
fn phi3_fused_projections_partial_rotary() {
    let m = check_all("phi3");
    assert_eq!(m.config.rotary_dim(), 12);
    assert_eq!(m.config.sliding_window, Some(5));
    assert!(m.weights.contains("model.layers.0.mlp.gate_up_proj.weight"));
    assert!(m.weights.contains("model.layers.0.mlp.down_proj.weight"));
}

#[test]
fn olmo_parameter_free_layernorm_clip_qkv() {
    let m = check_all("olmo");
    assert_eq!(m.config.family.clip_qkv, Some(0.5));
    assert!(!m.weights.names().any(|n| n.contains("norm")));
}

#[test]
fn olmo2_post_norms_full_qk_norm() {
    let m = check_all("olmo2");
    assert_eq!(m.weights.get("model.layers.0.self_attn.q_norm.weight").unwrap().shape, [64]);
    assert_eq!(m.weights.get("model.layers.0.self_attn.k_norm.weight").unwrap().shape, [32]);
}

#[test]
fn gpt2_conv1d_learned_positions() {
    let m = check_all("gpt2");
    // c_proj ([in, out] = [256, 64] in the file) became down_proj [hidden, intermediate].
    assert_eq!(m.weights.get("model.layers.0.mlp.down_proj.weight").unwrap().shape, [64, 256]);
    assert!(!m.weights.names().any(|n| n.ends_with("attn.bias")));
    // Positions past n_positions are an error, not a panic.
    let e = m.logits(&[5; 65]).unwrap_err().to_string();
    assert!(e.contains("64"), "{e}");
    // Generation stops when prompt and continuation fill the 64 positions: 4 tokens after 60,
    // the last one chosen from the logits of the full 63 before it.
    let prompt: Vec<u32> = (0..60).map(|i| (i * 7 % 50) + 1).collect();
    let out = swk::eval::generate::greedy_with(&m, &prompt, 10, &[], |_, _| {}).unwrap();
    assert_eq!(out.len(), 4);
    let seq: Vec<u32> = prompt.iter().chain(&out[..3]).copied().collect();
    let logits = m.logits(&seq).unwrap();
    let last = &logits[logits.len() - m.config.vocab_size..];
    assert_eq!(swk::eval::generate::argmax(last), out[3]);
}

#[test]
fn gpt_neox_parallel_residual_partial_rotary() {
    let m = check_all("gpt_neox");
    assert!(m.config.family.parallel_residual);
    assert_eq!(m.config.rotary_dim(), 4);
}

#[test]
fn gpt_neox_sequential() {
    let m = check_all("gpt_neox_seq");
    assert!(!m.config.family.parallel_residual);
    assert_eq!(m.config.rotary_dim(), 8);
}

/// `attn.hook_pattern` holds the softmax weights: each head's row sums to 1 and is zero
/// outside the causal (and sliding) window.
#[test]
fn attention_pattern_hook_respects_windows() {
    for name in ["gemma2", "gpt2", "phi3"] {
        let m = load(name);
        let c = m.config.clone();
        let tokens: Vec<u32> = (0..10).map(|i| (i * 13 + 2) % 300).collect();
        let got = std::sync::Mutex::new(Vec::new());
        let mut hooks = Hooks::new();
        for l in 0..c.num_layers {
            let got = &got;
            hooks.add(HookPoint { layer: l, kind: HookKind::AttnPattern }, move |p, a| {
                got.lock().unwrap().push((p.layer, a.rows, a.cols, a.data.to_vec()));
            });
        }
        let hooked = m
            .forward(
                &tokens,
                &mut KvCache::new(&m),
                ForwardOptions { hooks: Some(&mut hooks), stats: None, logits: Logits::All },
            )
            .unwrap();
        drop(hooks);
        assert_eq!(hooked, m.logits(&tokens).unwrap(), "{name}: pattern hook changed logits");
        let got = got.into_inner().unwrap();
        assert_eq!(got.len(), c.num_layers);
        for (l, rows, cols, data) in got {
            let kv = tokens.len();
            assert_eq!((rows, cols), (tokens.len(), c.num_heads * kv), "{name} layer {l}");
            let window = c.layer_window(l);
            for (t, row) in data.chunks(cols).enumerate() {
                for head in row.chunks(kv) {
                    let sum: f32 = head.iter().sum();
                    assert!((sum - 1.0).abs() < 1e-5, "{name} layer {l}: sum {sum}");
                    for (j, &w) in head.iter().enumerate() {
                        let visible = j <= t && window.is_none_or(|w| t - j < w);
                        assert!(
                            visible || w == 0.0,
                            "{name} layer {l}: weight on key {j} from {t}"
                        );
                    }
                }
            }
        }
    }
}

/// An unknown `model_type` names the supported families.
#[test]
fn unknown_architecture_lists_the_families() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "mamba", "hidden_size": 8}"#)
        .unwrap();
    let e = Model::load(dir.path().to_str().unwrap()).err().unwrap().to_string();
    for arch in ["mamba", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "gpt2", "gptneox"] {
        assert!(e.contains(arch), "{e}");
    }
}

/// Config parsing corner cases: Gemma 3 multimodal `text_config` with defaults, Qwen's
/// `max_window_layers`, GPT-2's key names and defaults, a disabled soft-cap (`null`).
#[test]
fn config_layouts() {
    use swk::model::ModelConfig;
    let p = std::path::Path::new("config.json");
    let g3: serde_json::Value = serde_json::from_str(
        r#"{"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
              "model_type": "gemma3_text", "num_hidden_layers": 34,
              "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
            "vision_config": {"hidden_size": 1152}}"#,
    )
    .unwrap();
    let c = ModelConfig::from_hf_value(p, &g3).unwrap();
    assert_eq!(c.architecture, Architecture::Gemma3);
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size), (8, 4, 256, 262_208));
    // One global layer in each 6 (layers 5, 11, ..., 29); the others slide.
    assert_eq!(c.family.sliding_layers.iter().filter(|&&s| !s).count(), 5);
    assert!(c.family.sliding_layers[4] && !c.family.sliding_layers[5]);
    assert_eq!(c.family.rope_local_theta, Some(10000.0));
    assert_eq!((c.rope_theta, c.family.query_pre_attn_scalar), (1e6, Some(256.0)));

    let qwen: serde_json::Value = serde_json::from_str(
        r#"{"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 10,
            "rms_norm_eps": 1e-6, "use_sliding_window": true, "sliding_window": 8,
            "max_window_layers": 2}"#,
    )
    .unwrap();
    let c = ModelConfig::from_hf_value(p, &qwen).unwrap();
    let windows: Vec<_> = (0..4).map(|l| c.layer_window(l)).collect();
    assert_eq!(windows, [None, None, Some(8), Some(8)]);

    let gpt2: serde_json::Value = serde_json::from_str(
        r#"{"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
            "n_positions": 1024, "vocab_size": 50257, "n_inner": null}"#,
    )
    .unwrap();
    let c = ModelConfig::from_hf_value(p, &gpt2).unwrap();
    assert_eq!((c.hidden_size, c.intermediate_size, c.head_dim), (768, 3072, 64));
    assert!(c.tie_word_embeddings && c.attention_bias);
    assert_eq!(c.max_position_embeddings, 1024);

    let gemma2: serde_json::Value = serde_json::from_str(
        r#"{"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 16, "vocab_size": 10,
            "rms_norm_eps": 1e-6, "final_logit_softcapping": null, "sliding_window": 4096}"#,
    )
    .unwrap();
    let c = ModelConfig::from_hf_value(p, &gemma2).unwrap();
    assert_eq!(c.family.final_logit_softcapping, None);
    assert_eq!(c.family.attn_logit_softcapping, Some(50.0));
    assert_eq!(c.family.sliding_layers, [true, false]);
}

/// A Gemma 3 multimodal checkpoint (language model under `model.language_model.`, a vision
/// tower beside it, `text_config`) runs as its text model.
#[test]
fn gemma3_multimodal_checkpoint() {
    let src = common::fixture("tiny/gemma3");
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut renamed: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n.replacen("model.", "model.language_model.", 1), t))
        .collect();
    let vision = vec![0u8; 16];
    renamed.push((
        "model.vision_tower.patch.weight".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &vision).unwrap(),
    ));
    safetensors::serialize_to_file(renamed, None, &dir.path().join("model.safetensors")).unwrap();
    let text: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let cfg = serde_json::json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text,
        "vision_config": {"hidden_size": 4},
    });
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let m = Model::load(dir.path().to_str().unwrap()).unwrap();
    assert!(!m.weights.names().any(|n| n.contains("vision")));
    let tokens: Vec<u32> = (0..8).collect();
    assert_eq!(m.logits(&tokens).unwrap(), load("gemma3").logits(&tokens).unwrap());
}

/// The exact GELU's erf against reference values (C's erf, via Python's math.erf).
#[test]
fn erf_is_accurate() {
    use swk::backend::cpu::erf;
    for (x, want) in [
        (0.0, 0.0),
        (0.1, 0.112_462_916_018_284_9),
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (2.0, 0.995_322_265_018_952_7),
        (2.9, 0.999_958_902_121_900_5),
        (2.99, 0.999_976_474_396_919_4),
        (3.0, 0.999_977_909_503_001_4),
        (3.5, 0.999_999_256_901_627_7),
        (5.0, 0.999_999_999_998_462_5),
    ] {
        assert!((erf(x) - want).abs() < 1e-14, "erf({x}) = {} vs {want}", erf(x));
        assert!((erf(-x) + want).abs() < 1e-14);
    }
}
