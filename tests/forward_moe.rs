//! Mixture-of-experts forward passes (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) against Hugging Face
//! transformers, on tiny random models recorded by tests/reference/make_tiny_moe_models.py.
//! Logits: max relative error <= 1e-4 in f32, the error scaled by max(|reference|, 1). Router
//! choices per token and per-expert selection counts: exact. Per-expert down_proj maxima:
//! channel/row and position exact, value within 1e-4 relative.

mod common;

use swk::edit::{EditGuard, EditOp, WeightEdit};
use swk::hooks::{HookKind, HookPoint, Hooks, SpikeStats};
use swk::model::arch::{moe, ForwardOptions, Input, KvCache, Logits};
use swk::model::Architecture;
use swk::Model;

fn load(name: &str) -> Model {
    let dir = common::fixture(&format!("tiny/{name}"));
    Model::load(dir.to_str().unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn u(v: &serde_json::Value) -> usize {
    v.as_u64().unwrap() as usize
}

/// Logits, router choices and expert statistics against the reference.
fn check(name: &str, arch: Architecture) -> Model {
    let m = load(name);
    assert_eq!(m.config.architecture, arch);
    let r = common::json(&format!("tiny/{name}/reference.json"));
    let tokens = common::tokens(&r);
    let text = r["text"].as_str().unwrap();
    assert_eq!(m.tokenizer().unwrap().encode(text, false).unwrap(), tokens, "{name}: token ids");
    let want = common::logits(&r);
    // The parameter count from the config equals the tensors loaded.
    assert_eq!(m.config.parameter_count(), m.weights.n_elements() as u64, "{name}: parameters");
    let got = m.logits(&tokens).unwrap();
    let err = common::max_rel_err(&got, &want, 1.0);
    eprintln!("{name}: max rel err {err:.2e} over {} logits", want.len());
    assert!(err <= 1e-4, "{name}: max rel err {err} > 1e-4");

    let c = &m.config;
    let mut stats = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    m.forward(
        &tokens,
        &mut KvCache::new(&m),
        ForwardOptions { stats: Some(&mut stats), logits: Logits::None, hooks: None },
    )
    .unwrap();
    let moe_cfg = c.family.moe.as_ref().unwrap();
    for layer in r["moe_layers"].as_array().unwrap() {
        let l = u(&layer["layer"]);
        assert!(moe_cfg.is_sparse(l), "{name}: layer {l} should be sparse");
        let s = &stats.layers[l];
        assert_eq!(s.routed_tokens, tokens.len() as u64);
        let total: u64 = s.experts.iter().map(|e| e.selected).sum();
        assert_eq!(total, (tokens.len() * moe_cfg.top_k) as u64, "{name}: selections");
        // Router choices token by token, from the router weight itself.
        let router = &m.weights.get(&moe::router_name(l)).unwrap().data;
        let h = c.hidden_size;
        let top: Vec<Vec<usize>> = layer["top_k"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row.as_array().unwrap().iter().map(u).collect())
            .collect();
        let wts: Vec<Vec<f32>> = layer["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect())
            .collect();
        // Recompute the router input (rmsnorm of the residual entering the MLP) by a hook.
        let mid = std::sync::Mutex::new(Vec::new());
        let mut hooks = Hooks::new();
        hooks.add(HookPoint { layer: l, kind: HookKind::ResidMid }, |_, a| {
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
        let norm = &m.weights.get(&format!("model.layers.{l}.post_attention_layernorm.weight"));
        let norm = &norm.as_ref().unwrap().data;
        let mut xn = vec![0f32; x.len()];
        swk::backend::cpu::rmsnorm(&x, norm, c.rms_norm_eps, &mut xn, h);
        let ne = moe_cfg.num_experts;
        let mut logits = vec![0f32; tokens.len() * ne];
        swk::backend::cpu::linear(&xn, router, None, &mut logits, tokens.len(), h, ne);
        for (t, z) in logits.chunks(ne).enumerate() {
            let route = moe::route(z, moe_cfg.top_k, moe_cfg.norm_topk_prob);
            assert_eq!(route.experts, top[t], "{name} layer {l} token {t}: experts");
            for (a, b) in route.weights.iter().zip(&wts[t]) {
                assert!((a - b).abs() <= 1e-5, "{name} layer {l} token {t}: weight {a} vs {b}");
            }
        }
        for e in layer["experts"].as_array().unwrap() {
            let ei = u(&e["expert"]);
            let es = &s.experts[ei];
            assert_eq!(es.selected, e["selected"].as_u64().unwrap(), "{name} L{l} E{ei} count");
            for (key, side, ch) in
                [("down_in_max", &es.input, "channel"), ("down_out_max", &es.output, "row")]
            {
                let Some(rec) = e.get(key) else { continue };
                let (best, m) =
                    side.iter().enumerate().max_by(|a, b| a.1.abs.total_cmp(&b.1.abs)).unwrap();
                assert_eq!(best, u(&rec[ch]), "{name} L{l} E{ei} {key} {ch}");
                assert_eq!(m.position, u(&rec["position"]), "{name} L{l} E{ei} {key} position");
                let v = rec["value"].as_f64().unwrap() as f32;
                assert!(
                    (m.value - v).abs() <= 1e-4 * v.abs().max(1.0),
                    "{name} L{l} E{ei} {key}: {} vs {v}",
                    m.value
                );
            }
        }
    }
    m
}

/// Incremental decoding equals one full pass; a pass from the residual entering block 1
/// equals the full pass; hooks in sparse layers fire where documented.
fn check_cache_residual_hooks(name: &str) {
    let m = load(name);
    let tokens: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 300).collect();
    let full = m.logits(&tokens).unwrap();
    let mut cache = KvCache::new(&m);
    let mut inc = m.forward(&tokens[..11], &mut cache, ForwardOptions::default()).unwrap();
    for &t in &tokens[11..] {
        inc.extend(m.forward(&[t], &mut cache, ForwardOptions::default()).unwrap());
    }
    let err = common::max_rel_err(&inc, &full, 1.0);
    assert!(err <= 1e-5, "{name}: incremental vs full {err}");

    let captured = std::sync::Mutex::new(Vec::new());
    let seen = std::sync::Mutex::new(Vec::new());
    let mut hooks = Hooks::new();
    hooks.add(HookPoint { layer: 1, kind: HookKind::ResidPre }, |_, a| {
        captured.lock().unwrap().extend_from_slice(a.data)
    });
    for l in 0..m.config.num_layers {
        for kind in HookKind::ALL {
            let seen = &seen;
            hooks.add(HookPoint { layer: l, kind }, move |p, a| {
                seen.lock().unwrap().push((p, a.cols));
            });
        }
    }
    let mut cache = KvCache::new(&m);
    let base = m
        .forward(
            &tokens,
            &mut cache,
            ForwardOptions { hooks: Some(&mut hooks), stats: None, logits: Logits::All },
        )
        .unwrap();
    drop(hooks);
    assert_eq!(base, full, "{name}: read-only hooks changed the logits");
    let seen = seen.into_inner().unwrap();
    let moe_cfg = m.config.family.moe.clone().unwrap();
    for l in 0..m.config.num_layers {
        let at = |kind| seen.iter().filter(|(p, _)| *p == HookPoint { layer: l, kind }).count();
        let dense = usize::from(!moe_cfg.is_sparse(l));
        for kind in HookKind::ALL {
            let want = match kind {
                HookKind::MlpPre | HookKind::MlpPreLinear | HookKind::MlpPost => dense,
                _ => 1,
            };
            assert_eq!(at(kind), want, "{name}: {kind:?} at layer {l}");
        }
    }
    let x = captured.into_inner().unwrap();
    let again = m
        .forward_input(
            Input::Residual { layer: 1, x: &x, pos0: 0 },
            &mut cache.clone(),
            ForwardOptions::default(),
        )
        .unwrap();
    let err = common::max_rel_err(&again, &base, 1.0);
    assert!(err <= 1e-6, "{name}: residual start vs full {err}");
}

#[test]
fn mixtral_legacy_layout() {
    let m = check("mixtral", Architecture::Mixtral);
    // w1/w3/w2 were renamed to HF's per-expert names.
    assert!(m.weights.contains(&moe::expert_name(1, 3, "down_proj")));
    assert!(!m.weights.names().any(|n| n.contains("block_sparse_moe")));
    check_cache_residual_hooks("mixtral");
}

#[test]
fn olmoe_fused_layout() {
    let m = check("olmoe", Architecture::Olmoe);
    assert!(!m.weights.names().any(|n| n.ends_with("gate_up_proj")));
    assert_eq!(m.weights.get(&moe::expert_name(0, 2, "down_proj")).unwrap().shape, vec![64, 32]);
    assert!(!m.config.family.moe.as_ref().unwrap().norm_topk_prob);
    check_cache_residual_hooks("olmoe");
}

#[test]
fn qwen2_moe_shared_expert() {
    let m = check("qwen2_moe", Architecture::Qwen2Moe);
    assert_eq!(m.config.family.moe.as_ref().unwrap().shared_expert_intermediate, Some(48));
    check_cache_residual_hooks("qwen2_moe");
}

#[test]
fn qwen3_moe_dense_and_sparse_layers() {
    let m = check("qwen3_moe", Architecture::Qwen3Moe);
    let moe_cfg = m.config.family.moe.as_ref().unwrap();
    assert_eq!(moe_cfg.sparse_layers, vec![false, true]);
    assert!(moe_cfg.norm_topk_prob);
    check_cache_residual_hooks("qwen3_moe");
}

/// A single expert weight is addressable by an edit: zeroing the largest |w| of one expert's
/// down_proj changes the logits of the tokens routed to it, and restoring is bit-exact.
#[test]
fn single_expert_weight_edit() {
    let mut m = load("mixtral");
    let tokens: Vec<u32> = (0..12).map(|i| (i * 5 + 2) % 300).collect();
    let base = m.logits(&tokens).unwrap();
    let before = m.weights.checksum();
    let name = moe::expert_name(0, 2, "down_proj");
    let edit = WeightEdit::parse(&format!("{name}[3,7]=x100")).unwrap();
    {
        let mut g = EditGuard::new(&mut m);
        g.apply(&edit).unwrap();
        let edited = g.logits(&tokens).unwrap();
        assert!(common::max_rel_err(&edited, &base, 1.0) > 1e-3, "the edit did nothing");
    }
    assert_eq!(m.weights.checksum(), before);
    let zero = WeightEdit::new(&name, &[3, 7], EditOp::Zero);
    assert_eq!(zero.to_string(), format!("{name}[3,7]=zero"));
}

/// A llama.cpp-style GGUF of fixture `src` (written by make_tiny_moe_models.py with the gguf
/// package) loads as the same family with the same tensors, bit for bit, under the same
/// names, and its logits match transformers' within 1e-4.
fn check_gguf(src: &str, arch: Architecture) {
    let path = common::fixture(&format!("tiny/{src}_gguf/model.gguf"));
    let g = Model::load(path.to_str().unwrap()).unwrap_or_else(|e| panic!("{src} gguf: {e}"));
    let hf = load(src);
    assert_eq!(g.config.architecture, arch);
    assert_eq!(g.config.family.moe, hf.config.family.moe, "{src}: MoE settings");
    let names = |m: &Model| m.weights.names().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(names(&g), names(&hf), "{src}: tensor names");
    for (name, t) in hf.weights.iter() {
        let gt = g.weights.get(name).unwrap();
        assert_eq!(gt.shape, t.shape, "{name}");
        assert!(gt.data == t.data, "{src}: {name} differs");
    }
    let r = common::json(&format!("tiny/{src}/reference.json"));
    let tokens = common::tokens(&r);
    assert_eq!(g.tokenizer().unwrap().encode(r["text"].as_str().unwrap(), false).unwrap(), tokens);
    let want = common::logits(&r);
    let err = common::max_rel_err(&g.logits(&tokens).unwrap(), &want, 1.0);
    eprintln!("{src} gguf: max rel err {err:.2e}");
    assert!(err <= 1e-4, "{src} gguf: max rel err {err}");
}

#[test]
fn qwen2_moe_gguf() {
    check_gguf("qwen2_moe", Architecture::Qwen2Moe);
}

#[test]
fn olmoe_gguf() {
    check_gguf("olmoe", Architecture::Olmoe);
}

/// Dense layer 0 (transformers' `mlp_only_layers`) is told apart by its missing
/// `ffn_gate_inp`; llama.cpp's own qwen3moe has no dense layers.
#[test]
fn qwen3_moe_gguf() {
    check_gguf("qwen3_moe", Architecture::Qwen3Moe);
}

#[test]
fn mixtral_gguf_is_llama_with_experts() {
    check_gguf("mixtral", Architecture::Mixtral);
}
