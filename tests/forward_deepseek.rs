//! DeepSeek-V2 / DeepSeek-V3 (multi-head latent attention, shared experts) against Hugging Face
//! transformers, on tiny random models recorded by tests/reference/make_tiny_deepseek_models.py:
//! logits within 1e-4 relative (error scaled by max(|reference|, 1)), each token's routed
//! experts exact and their weights within 1e-5; the llama.cpp-style GGUF of the V3 fixture has
//! the same config and bit-identical tensors; edits of routed and shared expert weights change
//! the logits and restore bit-exactly; `swk info` names the family and `swk experts` runs.

mod common;

use swk::edit::{EditGuard, WeightEdit};
use swk::hooks::{HookKind, HookPoint, Hooks, SpikeStats};
use swk::model::arch::{deepseek, moe, ForwardOptions, KvCache, Logits};
use swk::model::config::GroupScore;
use swk::model::{Architecture, Format};
use swk::Model;

fn load(path: &str) -> Model {
    Model::load(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn tiny(name: &str) -> String {
    common::fixture(&format!("tiny/{name}")).to_str().unwrap().to_string()
}

/// Logits and router choices of `m` against `tiny/{src}/reference.json`; returns the max
/// relative logit error.
fn check_reference(m: &Model, src: &str) -> f32 {
    let r = common::json(&format!("tiny/{src}/reference.json"));
    let tokens = common::tokens(&r);
    let text = r["text"].as_str().unwrap();
    assert_eq!(m.tokenizer().unwrap().encode(text, false).unwrap(), tokens, "{src}: token ids");
    assert_eq!(m.config.parameter_count(), m.weights.n_elements() as u64, "{src}: parameters");
    let want = common::logits(&r);
    let err = common::max_rel_err(&m.logits(&tokens).unwrap(), &want, 1.0);
    assert!(err <= 1e-4, "{src}: max rel err {err} > 1e-4");

    // Router choices, token by token, from the router input captured by a hook.
    let c = &m.config;
    let (d, mp) = (deepseek::params(c).unwrap(), moe::params(c).unwrap());
    let h = c.hidden_size;
    for layer in r["moe_layers"].as_array().unwrap() {
        let l = layer["layer"].as_u64().unwrap() as usize;
        assert!(mp.is_sparse(l), "{src}: layer {l} should be sparse");
        let mid = std::sync::Mutex::new(Vec::new());
        let mut hooks = Hooks::new();
        hooks.add(HookPoint { layer: l, kind: HookKind::ResidMid }, |_, a| {
            mid.lock().unwrap().extend_from_slice(a.data)
        });
        m.forward(
            &tokens,
            &mut KvCache::new(m),
            ForwardOptions { hooks: Some(&mut hooks), stats: None, logits: Logits::None },
        )
        .unwrap();
        drop(hooks);
        let x = mid.into_inner().unwrap();
        let norm = &m.weights.get(&format!("model.layers.{l}.post_attention_layernorm.weight"));
        let norm = &norm.as_ref().unwrap().data;
        let router = &m.weights.get(&moe::router_name(l)).unwrap().data;
        let bias = m.weights.get(&deepseek::bias_name(l)).ok().map(|b| b.data.as_slice());
        for (tok, want) in layer["routes"].as_array().unwrap().iter().enumerate() {
            let row = &x[tok * h..(tok + 1) * h];
            let rms = (row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / h as f64
                + c.rms_norm_eps)
                .sqrt();
            let xn: Vec<f32> =
                row.iter().zip(norm).map(|(v, w)| (*v as f64 / rms) as f32 * w).collect();
            let z: Vec<f32> =
                router.chunks(h).map(|w| w.iter().zip(&xn).map(|(a, b)| a * b).sum()).collect();
            let got = deepseek::route(&z, bias, d, mp);
            let mut pairs: Vec<(usize, f32)> =
                got.experts.iter().copied().zip(got.weights.iter().copied()).collect();
            pairs.sort_by_key(|p| p.0);
            let ids: Vec<usize> = want["experts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(pairs.iter().map(|p| p.0).collect::<Vec<_>>(), ids, "{src} L{l} t{tok}");
            for (p, w) in pairs.iter().zip(want["weights"].as_array().unwrap()) {
                let w = w.as_f64().unwrap() as f32;
                assert!(
                    (p.1 - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{src} L{l} t{tok}: {p:?} vs {w}"
                );
            }
        }
    }
    err
}

#[test]
fn deepseek_v2_matches_transformers() {
    let m = load(&tiny("deepseek_v2"));
    let c = &m.config;
    assert_eq!(c.architecture, Architecture::DeepseekV2);
    let d = deepseek::params(c).unwrap();
    assert_eq!(d.q_lora_rank, Some(32));
    assert_eq!(
        (d.kv_lora_rank, d.qk_nope_head_dim, d.qk_rope_head_dim, d.v_head_dim),
        (24, 12, 8, 10)
    );
    assert!(d.rope_interleave && !d.sigmoid);
    assert_eq!((d.group_score, d.n_group, d.topk_group), (GroupScore::Max, 2, 1));
    assert_eq!((d.routed_scaling_factor, d.n_shared_experts), (1.5, 2));
    let mp = moe::params(c).unwrap();
    assert_eq!((mp.num_experts, mp.top_k, mp.expert_intermediate), (6, 2, 16));
    assert_eq!(mp.shared_expert_intermediate, Some(32));
    assert!(!mp.norm_topk_prob);
    assert_eq!(mp.sparse_layers, vec![true, true]);
    assert_eq!((c.num_kv_heads, c.head_dim), (4, 20));
    // YaRN: factor 4, mscale_all_dim 0.8 scales the softmax by (0.1·0.8·ln 4 + 1)².
    let y = d.yarn.as_ref().unwrap();
    assert_eq!((y.factor, y.original_max_position_embeddings), (4.0, 32.0));
    assert_eq!((y.mscale, y.mscale_all_dim), (Some(1.0), Some(0.8)));
    let ms = 0.1 * 0.8 * 4f64.ln() + 1.0;
    assert!((y.attention_factor() - (0.1 * 4f64.ln() + 1.0) / ms).abs() < 1e-12);
    let want = (ms * ms / 20f64.sqrt()) as f32;
    assert!((c.attention_scale(0) - want).abs() < 1e-7, "{}", c.attention_scale(0));
    let err = check_reference(&m, "deepseek_v2");
    eprintln!("deepseek_v2: max rel err {err:.2e}");
}

#[test]
fn deepseek_v3_matches_transformers() {
    let m = load(&tiny("deepseek_v3"));
    let c = &m.config;
    assert_eq!(c.architecture, Architecture::DeepseekV3);
    let d = deepseek::params(c).unwrap();
    assert_eq!(d.q_lora_rank, None);
    assert!(d.yarn.is_none());
    assert!((c.attention_scale(0) - 1.0 / 20f32.sqrt()).abs() < 1e-7);
    assert!(d.rope_interleave && d.sigmoid);
    assert_eq!((d.group_score, d.n_group, d.topk_group), (GroupScore::Top2Sum, 4, 2));
    assert_eq!((d.routed_scaling_factor, d.n_shared_experts), (2.5, 1));
    let mp = moe::params(c).unwrap();
    assert_eq!((mp.num_experts, mp.top_k, mp.shared_expert_intermediate), (8, 3, Some(16)));
    assert!(mp.norm_topk_prob);
    assert_eq!(mp.sparse_layers, vec![false, true]);
    assert!(m.weights.contains(&deepseek::bias_name(1)));
    let err = check_reference(&m, "deepseek_v3");
    eprintln!("deepseek_v3: max rel err {err:.2e}");
}

/// The llama.cpp-style GGUF (`deepseek2`, sigmoid gating, split `attn_k_b`/`attn_v_b`) loads
/// as DeepSeek-V3 with the same config and the same tensors, bit for bit, and the same logits.
#[test]
fn deepseek_v3_gguf_is_the_same_model() {
    same_gguf_model("deepseek_v3_gguf", "deepseek_v3", Architecture::DeepseekV3);
}

/// The V2 that llama.cpp can express (softmax greedy routing, q_lora, no YaRN) matches
/// transformers, and its GGUF (`deepseek2`, softmax gating, the older single `attn_kv_b`)
/// is the same model: config, tensors bit for bit, logits.
#[test]
fn deepseek_v2_gguf_is_the_same_model() {
    let m = load(&tiny("deepseek_v2_greedy"));
    let d = deepseek::params(&m.config).unwrap();
    assert_eq!((d.q_lora_rank, d.sigmoid, d.n_shared_experts), (Some(32), false, 2));
    let err = check_reference(&m, "deepseek_v2_greedy");
    eprintln!("deepseek_v2_greedy: max rel err {err:.2e}");
    same_gguf_model("deepseek_v2_gguf", "deepseek_v2_greedy", Architecture::DeepseekV2);
}

fn same_gguf_model(gguf_dir: &str, src: &str, arch: Architecture) {
    let g = load(&format!("{}/model.gguf", tiny(gguf_dir)));
    let hf = load(&tiny(src));
    assert_eq!(g.source.format, Format::Gguf);
    assert_eq!(g.config.architecture, arch);
    let eps = (g.config.rms_norm_eps, hf.config.rms_norm_eps);
    assert!((eps.0 - eps.1).abs() <= 1e-7 * eps.1, "eps {eps:?}");
    let mut gc = g.config.clone();
    gc.rms_norm_eps = hf.config.rms_norm_eps;
    assert_eq!(gc, hf.config);
    let names = |m: &Model| m.weights.names().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(names(&g), names(&hf));
    for (name, t) in hf.weights.iter() {
        let gt = g.weights.get(name).unwrap();
        assert_eq!(gt.shape, t.shape, "{name} shape");
        assert!(
            gt.data.iter().map(|v| v.to_bits()).eq(t.data.iter().map(|v| v.to_bits())),
            "{name} differs"
        );
    }
    let err = check_reference(&g, src);
    eprintln!("{gguf_dir}: max rel err {err:.2e}");
}

/// Edits of a routed expert's and a shared expert's down_proj weight change the logits, and
/// the weights come back bit-exactly.
#[test]
fn expert_and_shared_expert_edits_apply_and_restore() {
    let mut m = load(&tiny("deepseek_v3"));
    let r = common::json("tiny/deepseek_v3/reference.json");
    let tokens = common::tokens(&r);
    let base = m.logits(&tokens).unwrap();
    let before = m.weights.checksum();
    // The lowest expert of layer 1 that some token chooses, so that editing it matters.
    let routes = r["moe_layers"][0]["routes"].as_array().unwrap();
    let chosen =
        |e: usize| routes.iter().any(|t| t["experts"].as_array().unwrap().contains(&e.into()));
    let e = (0..8).find(|&e| chosen(e)).unwrap();
    for name in [
        moe::expert_name(1, e, "down_proj"),
        "model.layers.1.mlp.shared_experts.down_proj.weight".to_string(),
    ] {
        let edit = WeightEdit::parse(&format!("{name}[3,7]=x1000")).unwrap();
        {
            let mut g = EditGuard::new(&mut m);
            g.apply(&edit).unwrap();
            let edited = g.logits(&tokens).unwrap();
            assert!(
                common::max_rel_err(&edited, &base, 1.0) > 1e-3,
                "{name}: the edit did nothing"
            );
        }
        assert_eq!(m.weights.checksum(), before, "{name}: not restored");
        assert_eq!(m.logits(&tokens).unwrap(), base);
    }
}

/// Spike statistics: the dense layer fills the down_proj input/output maxima, the sparse
/// layer each routed expert's (selections sum to tokens · top-k).
#[test]
fn spike_statistics_cover_dense_and_expert_down_projections() {
    let m = load(&tiny("deepseek_v3"));
    let tokens = common::tokens(&common::json("tiny/deepseek_v3/reference.json"));
    let c = &m.config;
    let mut stats = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    m.forward(
        &tokens,
        &mut KvCache::new(&m),
        ForwardOptions { stats: Some(&mut stats), logits: Logits::None, hooks: None },
    )
    .unwrap();
    let dense = &stats.layers[0];
    assert!(dense.experts.is_empty());
    assert!(dense.input_peak().unwrap().max.abs > 0.0);
    assert!(dense.output_peak().unwrap().max.abs > 0.0);
    let sparse = &stats.layers[1];
    assert_eq!(sparse.experts.len(), 8);
    assert_eq!(sparse.routed_tokens, tokens.len() as u64);
    let picks: u64 = sparse.experts.iter().map(|e| e.selected).sum();
    assert_eq!(picks, 3 * tokens.len() as u64);
    for e in sparse.experts.iter().filter(|e| e.selected > 0) {
        assert_eq!((e.input.len(), e.output.len()), (16, 64));
        assert!(e.output.iter().any(|m| m.abs > 0.0));
    }
    assert!(dense.shared.is_none());
    let sh = sparse.shared.as_ref().unwrap();
    assert_eq!(sh.selected, tokens.len() as u64);
    assert_eq!((sh.input.len(), sh.output.len()), (16, 64));

    // The shared experts' maxima are those of their down_proj, recomputed here.
    let w = |n: &str| m.weights.get(&format!("model.layers.1.mlp.shared_experts.{n}.weight"));
    let (gate, up, down) =
        (&w("gate_proj").unwrap().data, &w("up_proj").unwrap().data, &w("down_proj").unwrap().data);
    let mid = std::sync::Mutex::new(Vec::new());
    let mut hooks = Hooks::new();
    hooks.add(HookPoint { layer: 1, kind: HookKind::ResidMid }, |_, a| {
        mid.lock().unwrap().extend_from_slice(a.data)
    });
    m.forward(
        &tokens,
        &mut KvCache::new(&m),
        ForwardOptions { hooks: Some(&mut hooks), stats: None, logits: Logits::None },
    )
    .unwrap();
    drop(hooks);
    let x = mid.into_inner().unwrap();
    let norm = &m.weights.get("model.layers.1.post_attention_layernorm.weight").unwrap().data;
    let h = c.hidden_size;
    let (mut best_in, mut best_out) = ((0f32, 0usize, 0usize), (0f32, 0usize, 0usize));
    for (tok, row) in x.chunks(h).enumerate() {
        let rms = (row.iter().map(|v| v * v).sum::<f32>() / h as f32 + 1e-6).sqrt();
        let xn: Vec<f32> = row.iter().zip(norm).map(|(v, w)| v / rms * w).collect();
        let dot = |w: &[f32], x: &[f32]| w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>();
        let a: Vec<f32> = gate
            .chunks(h)
            .zip(up.chunks(h))
            .map(|(g, u)| {
                let g = dot(g, &xn);
                g / (1.0 + (-g).exp()) * dot(u, &xn)
            })
            .collect();
        for (col, v) in a.iter().enumerate() {
            if v.abs() > best_in.0 {
                best_in = (v.abs(), tok, col);
            }
        }
        for (r, wr) in down.chunks(16).enumerate() {
            let y = dot(wr, &a);
            if y.abs() > best_out.0 {
                best_out = (y.abs(), tok, r);
            }
        }
    }
    let peak = |v: &[swk::hooks::ChannelMax]| {
        let (i, m) = v.iter().enumerate().max_by(|a, b| a.1.abs.total_cmp(&b.1.abs)).unwrap();
        (m.abs, m.position, i)
    };
    for (got, want) in [(peak(&sh.input), best_in), (peak(&sh.output), best_out)] {
        assert_eq!((got.1, got.2), (want.1, want.2));
        assert!((got.0 - want.0).abs() <= 1e-4 * want.0, "{got:?} vs {want:?}");
    }
}

fn swk(args: &[&str]) -> (bool, String, String) {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_swk")).args(args).output().expect("run swk");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Running the tokens in two calls through the KV cache gives the logits of one call.
#[test]
fn kv_cache_continuation_matches_one_pass() {
    for name in ["deepseek_v2", "deepseek_v3"] {
        let m = load(&tiny(name));
        let tokens = common::tokens(&common::json(&format!("tiny/{name}/reference.json")));
        let full = m.logits(&tokens).unwrap();
        let mut cache = KvCache::new(&m);
        let split = tokens.len() / 2;
        let mut got = m.forward(&tokens[..split], &mut cache, ForwardOptions::default()).unwrap();
        got.extend(m.forward(&tokens[split..], &mut cache, ForwardOptions::default()).unwrap());
        let err = common::max_rel_err(&got, &full, 1.0);
        assert!(err <= 1e-5, "{name}: {err}");
    }
}

/// Resuming at block 1 from its input residual stream and a cache of the unedited run gives
/// the logits of the full pass (what ablation re-runs rely on).
#[test]
fn residual_resume_matches_full_pass() {
    use swk::model::arch::Input;
    for name in ["deepseek_v2", "deepseek_v3"] {
        let m = load(&tiny(name));
        let tokens = common::tokens(&common::json(&format!("tiny/{name}/reference.json")));
        let x1 = std::sync::Mutex::new(Vec::new());
        let mut hooks = Hooks::new();
        hooks.add(HookPoint { layer: 1, kind: HookKind::ResidPre }, |_, a| {
            x1.lock().unwrap().extend_from_slice(a.data)
        });
        let mut cache = KvCache::new(&m);
        let full = m
            .forward(
                &tokens,
                &mut cache,
                ForwardOptions { hooks: Some(&mut hooks), stats: None, logits: Logits::All },
            )
            .unwrap();
        drop(hooks);
        let x = x1.into_inner().unwrap();
        let input = Input::Residual { layer: 1, x: &x, pos0: 0 };
        let got = m.forward_input(input, &mut cache.clone(), ForwardOptions::default()).unwrap();
        assert_eq!(got, full, "{name}");
    }
}

/// `swk info` names the family; `swk experts` reports router statistics on both.
#[test]
fn cli_info_and_experts() {
    let (ok, out, err) = swk(&["info", &tiny("deepseek_v2")]);
    assert!(ok, "{err}");
    assert!(out.contains("architecture  deepseek2"), "{out}");
    assert!(
        out.contains(
            "6 per MoE layer, top-2, 16 wide, shared expert 32 wide; 2 of 2 layers sparse"
        ),
        "{out}"
    );
    let (ok, out, err) = swk(&["info", &format!("{}/model.gguf", tiny("deepseek_v3_gguf"))]);
    assert!(ok, "{err}");
    assert!(out.contains("architecture  deepseek3"), "{out}");
    let (ok, out, err) = swk(&["info", &tiny("deepseek_v3"), "--json"]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["architecture"], "deepseek3");
    assert_eq!(j["config"]["architecture"], "deepseek3");
    assert_eq!(j["config"]["family"]["deepseek"]["group_score"], "top2_sum");
    assert_eq!(j["config"]["family"]["deepseek"]["kv_lora_rank"], 24);

    for (name, top_k, experts, layers) in [("deepseek_v2", 2, 6, 2), ("deepseek_v3", 3, 8, 1)] {
        let (ok, out, err) =
            swk(&["experts", &tiny(name), "--router-samples", "2", "--no-ablate", "--json"]);
        assert!(ok, "{name}: {err}");
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(j["top_k"], top_k);
        let list = j["experts"].as_array().unwrap();
        assert_eq!(list.len(), experts * layers, "{name}");
        let f: f64 =
            list.iter().filter(|e| e["layer"] == 1).map(|e| e["frequency"].as_f64().unwrap()).sum();
        assert!((f - top_k as f64).abs() < 1e-9, "{name}: {f}");
    }
}

/// A classic hub-style config (`rope_scaling` of `type: yarn`, as DeepSeek-V2-Lite ships)
/// parses; unsupported settings are refused with the file named.
#[test]
fn classic_config_and_bad_settings() {
    use swk::model::ModelConfig;
    let path = std::path::Path::new("x/config.json");
    let mut j = serde_json::json!({
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "first_k_dense_replace": 1, "kv_lora_rank": 512, "q_lora_rank": null,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 10000, "routed_scaling_factor": 1.0,
        "topk_method": "greedy", "vocab_size": 102400, "max_position_embeddings": 163840,
        "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096}
    });
    let c = ModelConfig::from_hf_value(path, &j).unwrap();
    assert_eq!(c.architecture, Architecture::DeepseekV2);
    assert_eq!((c.head_dim, c.num_kv_heads), (192, 16));
    let d = c.family.deepseek.as_ref().unwrap();
    assert_eq!(d.q_lora_rank, None);
    let y = d.yarn.as_ref().unwrap();
    assert_eq!((y.factor, y.attention_factor()), (40.0, 1.0));
    let m = c.family.moe.as_ref().unwrap();
    assert_eq!(m.shared_expert_intermediate, Some(2816));
    assert_eq!(m.sparse_layers.iter().filter(|&&s| s).count(), 26);

    j["topk_method"] = "noaux_tc".into();
    let e = ModelConfig::from_hf_value(path, &j).unwrap_err().to_string();
    assert!(e.contains("x/config.json") && e.contains("noaux_tc"), "{e}");
    j["topk_method"] = "greedy".into();
    j["rope_scaling"]["type"] = "dynamic".into();
    let e = ModelConfig::from_hf_value(path, &j).unwrap_err().to_string();
    assert!(e.contains("x/config.json") && e.contains("dynamic"), "{e}");
}

/// llama.cpp's DeepSeek tensor names, including the older unsplit `attn_kv_b`, map to the HF
/// names; a split MLA layer with only one half is refused naming the file.
#[test]
fn gguf_names_and_split_kv_b_errors() {
    use swk::model::arch::deepseek::merge_kv_b;
    use swk::model::load::hf_name_for;
    let a = Architecture::DeepseekV2;
    for (g, hf) in [
        ("blk.3.attn_kv_b.weight", "model.layers.3.self_attn.kv_b_proj.weight"),
        ("blk.3.attn_q_a.weight", "model.layers.3.self_attn.q_a_proj.weight"),
        ("blk.3.attn_q_a_norm.weight", "model.layers.3.self_attn.q_a_layernorm.weight"),
        ("blk.3.attn_q_b.weight", "model.layers.3.self_attn.q_b_proj.weight"),
        ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
        ("blk.3.attn_kv_a_mqa.weight", "model.layers.3.self_attn.kv_a_proj_with_mqa.weight"),
        ("blk.3.attn_kv_a_norm.weight", "model.layers.3.self_attn.kv_a_layernorm.weight"),
        ("blk.3.exp_probs_b.bias", "model.layers.3.mlp.gate.e_score_correction_bias"),
        ("blk.3.ffn_down_shexp.weight", "model.layers.3.mlp.shared_experts.down_proj.weight"),
        ("blk.3.ffn_gate_inp.weight", "model.layers.3.mlp.gate.weight"),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
    ] {
        assert_eq!(hf_name_for(a, g).as_deref(), Some(hf), "{g}");
    }
    assert_eq!(deepseek::split_kv_b_name("blk.12.attn_k_b.weight"), Some((12, true)));
    assert_eq!(deepseek::split_kv_b_name("blk.12.attn_v_b.weight"), Some((12, false)));

    let mut m = load(&tiny("deepseek_v3"));
    let k = swk::model::Tensor::new("k", vec![4, 24, 12], vec![0.0; 4 * 24 * 12], "F32").unwrap();
    let parts = std::collections::BTreeMap::from([(1, (Some(k), None))]);
    let path = std::path::Path::new("some/model.gguf");
    let e = merge_kv_b(&m.config, parts, &mut m.weights, path).unwrap_err().to_string();
    assert!(e.contains("some/model.gguf") && e.contains("attn_v_b"), "{e}");
}
