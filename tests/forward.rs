//! Logits parity with Hugging Face transformers on tiny random models (fixtures recorded by
//! tests/reference/make_tiny_models.py). Tolerance: max relative error <= 1e-4 in f32, with
//! relative error measured against max(|reference|, 1e-2 * max|reference row|)... see `check`.

mod common;

use swk::hooks::SpikeStats;
use swk::model::arch::{ForwardOptions, KvCache, Logits};
use swk::Model;

/// Compare swk's logits for the fixture's tokens with transformers' (rel err <= 1e-4, where
/// the error is scaled by max(|ref|, 1): logits near zero are compared absolutely).
fn check(name: &str) -> Model {
    let dir = common::fixture(&format!("tiny/{name}"));
    let m = Model::load(dir.to_str().unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let r = common::json(&format!("tiny/{name}/reference.json"));
    let tokens = common::tokens(&r);
    // The fixture's tokens come from its tokenizer.json: check that too.
    let text = r["text"].as_str().unwrap();
    assert_eq!(m.tokenizer().unwrap().encode(text, false).unwrap(), tokens, "{name}: token ids");
    let want = common::logits(&r);
    let got = m.logits(&tokens).unwrap();
    let err = common::max_rel_err(&got, &want, 1.0);
    eprintln!("{name}: max rel err {err:.2e} over {} logits", want.len());
    assert!(err <= 1e-4, "{name}: max rel err {err} > 1e-4");

    // Spike statistics of the same pass match transformers' down_proj hooks.
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
            assert_eq!(
                peak.max.position,
                rec["position"].as_u64().unwrap() as usize,
                "{name} {key} layer {l} position"
            );
            let v = rec["value"].as_f64().unwrap() as f32;
            assert!(
                (peak.max.value - v).abs() <= 1e-4 * v.abs().max(1.0),
                "{name} {key} layer {l}: {} vs {v}",
                peak.max.value
            );
        }
    }
    m
}

#[test]
fn llama_tied_gqa() {
    check("llama");
}

#[test]
fn llama3_rope_scaling() {
    check("llama3_rope");
}

#[test]
fn mistral_sliding_window() {
    let m = check("mistral");
    assert_eq!(m.config.sliding_window, Some(4));
}

#[test]
fn qwen2_bias() {
    let m = check("qwen2");
    assert!(m.config.attention_bias);
}

#[test]
fn sharded_safetensors() {
    check("llama_sharded");
}

#[test]
fn f16_and_bf16_checkpoints() {
    let a = check("llama_f16");
    let b = check("llama_bf16");
    assert_eq!(a.weights.get("model.norm.weight").unwrap().source_dtype, "F16");
    assert_eq!(b.weights.get("model.norm.weight").unwrap().source_dtype, "BF16");
}

/// Incremental decoding with the KV cache gives the same logits as one full pass.
#[test]
fn kv_cache_matches_full_pass() {
    for name in ["llama", "mistral", "qwen2"] {
        let m = Model::load(common::fixture(&format!("tiny/{name}")).to_str().unwrap()).unwrap();
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
    }
}

/// Out-of-vocabulary token ids are an error, not a panic.
#[test]
fn bad_token_id_is_an_error() {
    let m = Model::load(common::fixture("tiny/llama").to_str().unwrap()).unwrap();
    let e = m.logits(&[1, 999_999]).unwrap_err().to_string();
    assert!(e.contains("999999") && e.contains("vocabulary"), "{e}");
}
