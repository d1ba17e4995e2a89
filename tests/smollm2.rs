//! The real model, SmolLM2-135M-Instruct (GGUF Q4_1), against transformers' GGUF loader
//! (tests/fixtures/smollm2/reference.json). Skipped, with a message, when the model file is
//! absent (scripts/fetch-models.sh fetches it; CI does).
//!
//! Tolerances: top-5 logits at every prompt position within 1e-3 relative; perplexity within
//! 0.5 %.

mod common;

use swk::eval::ppl;

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

#[test]
fn config_from_gguf_metadata() {
    let Some(m) = common::smollm2_model() else { return };
    let c = &m.config;
    assert_eq!((c.num_layers, c.hidden_size, c.intermediate_size), (30, 576, 1536));
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size), (9, 3, 64, 49152));
    assert_eq!(c.rope_theta, 100000.0);
    assert!(c.tie_word_embeddings);
    assert_eq!(m.weights.get("model.layers.0.mlp.down_proj.weight").unwrap().shape, vec![576, 1536]);
    assert_eq!(m.weights.get("model.layers.0.mlp.down_proj.weight").unwrap().source_dtype, "Q4_1");
    assert_eq!(m.weights.get("model.embed_tokens.weight").unwrap().source_dtype, "Q8_0");
}

#[test]
fn prompt_logits_match_transformers() {
    let Some(m) = common::smollm2_model() else { return };
    let r = common::json("smollm2/reference.json");
    let p = &r["prompt"];
    let tokens = ids(&p["ids"]);
    assert_eq!(m.tokenizer().unwrap().encode(p["text"].as_str().unwrap(), true).unwrap(), tokens);
    let logits = m.logits(&tokens).unwrap();
    let v = m.config.vocab_size;
    let mut worst = 0f32;
    for (pos, (top_ids, top_logits)) in
        p["top5_ids"].as_array().unwrap().iter().zip(p["top5_logits"].as_array().unwrap()).enumerate()
    {
        let row = &logits[pos * v..(pos + 1) * v];
        let want_ids = ids(top_ids);
        let mut order: Vec<u32> = (0..v as u32).collect();
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        assert_eq!(order[0], want_ids[0], "position {pos}: argmax");
        for (id, want) in want_ids.iter().zip(top_logits.as_array().unwrap()) {
            let want = want.as_f64().unwrap() as f32;
            let got = row[*id as usize];
            let rel = (got - want).abs() / want.abs().max(1.0);
            worst = worst.max(rel);
        }
        let lse_want = p["logsumexp"][pos].as_f64().unwrap();
        let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
        let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        assert!((lse - lse_want).abs() / lse_want.abs().max(1.0) < 1e-3, "position {pos}: logsumexp {lse} vs {lse_want}");
    }
    eprintln!("SmolLM2 top-5 logits: max rel err {worst:.2e}");
    assert!(worst <= 1e-3, "top-5 logits rel err {worst} > 1e-3");
}

#[test]
fn perplexity_matches_transformers() {
    let Some(m) = common::smollm2_model() else { return };
    let r = common::json("smollm2/reference.json");
    let want = &r["perplexity"];
    let text = std::fs::read_to_string(common::fixture("text/ppl.txt")).unwrap();
    let tokens = ppl::text_tokens(m, &text).unwrap();
    assert_eq!(tokens.len() as u64, want["n_text_tokens"].as_u64().unwrap());
    let got = ppl::perplexity(m, &tokens, 512, |_, _| {}).unwrap();
    let want_ppl = want["perplexity"].as_f64().unwrap();
    eprintln!("SmolLM2 perplexity {:.4} (transformers {want_ppl:.4}), {:.2} s", got.perplexity, got.seconds);
    assert_eq!(got.tokens_scored as u64, want["tokens_scored"].as_u64().unwrap());
    assert!((got.perplexity / want_ppl - 1.0).abs() < 0.005, "perplexity {} vs {want_ppl}", got.perplexity);
}

#[test]
fn tokenizer_ids_match_transformers() {
    let Some(m) = common::smollm2_model() else { return };
    let r = common::json("smollm2/reference.json");
    let tok = m.tokenizer().unwrap();
    assert!(!tok.adds_bos());
    for case in r["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids(&case["ids"]), "ids of {text:?}");
    }
}
