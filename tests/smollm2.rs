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
    assert_eq!(
        m.weights.get("model.layers.0.mlp.down_proj.weight").unwrap().shape,
        vec![576, 1536]
    );
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
    for (pos, (top_ids, top_logits)) in p["top5_ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(p["top5_logits"].as_array().unwrap())
        .enumerate()
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
        assert!(
            (lse - lse_want).abs() / lse_want.abs().max(1.0) < 1e-3,
            "position {pos}: logsumexp {lse} vs {lse_want}"
        );
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
    eprintln!(
        "SmolLM2 perplexity {:.4} (transformers {want_ppl:.4}), {:.2} s",
        got.perplexity, got.seconds
    );
    assert_eq!(got.tokens_scored as u64, want["tokens_scored"].as_u64().unwrap());
    assert!(
        (got.perplexity / want_ppl - 1.0).abs() < 0.005,
        "perplexity {} vs {want_ppl}",
        got.perplexity
    );
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

/// The paper's first pass, layer by layer, equals transformers' (same channels and token
/// positions; signed maxima within 1e-3 relative).
#[test]
fn spike_maxima_match_transformers() {
    let Some(m) = common::smollm2_model() else { return };
    let r = common::json("smollm2/reference.json");
    let sw = &r["super_weight"];
    let tokens = ids(&sw["prompt_ids"]);
    let c = &m.config;
    let mut stats = swk::hooks::SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    swk::detect::collect_stats(m, &tokens, &mut stats).unwrap();
    for rec in sw["layers"].as_array().unwrap() {
        let l = rec["layer"].as_u64().unwrap() as usize;
        let (i, o) =
            (stats.layers[l].input_peak().unwrap(), stats.layers[l].output_peak().unwrap());
        assert_eq!(i.channel as u64, rec["in_col"].as_u64().unwrap(), "layer {l} input column");
        assert_eq!(o.channel as u64, rec["out_row"].as_u64().unwrap(), "layer {l} output row");
        assert_eq!(
            i.max.position as u64,
            rec["in_pos"].as_u64().unwrap(),
            "layer {l} input position"
        );
        assert_eq!(
            o.max.position as u64,
            rec["out_pos"].as_u64().unwrap(),
            "layer {l} output position"
        );
        for (got, want) in [(i.max.value, &rec["max_in"]), (o.max.value, &rec["max_out"])] {
            let want = want.as_f64().unwrap() as f32;
            assert!((got - want).abs() <= 1e-3 * want.abs().max(1.0), "layer {l}: {got} vs {want}");
        }
    }
}

fn detect_json(
    m: &mut swk::Model,
    cfg: &swk::detect::DetectConfig,
) -> (swk::detect::Detection, String) {
    let d = swk::detect::detect(m, cfg, |_, _, _| {}).unwrap();
    let mut j = serde_json::to_value(&d).unwrap();
    j.as_object_mut().unwrap().remove("seconds");
    (d, j.to_string())
}

/// `swk detect` on the real model: a confirmed super weight whose zeroing raises perplexity on
/// the confirmation text more than 10x (layer 11, [507, 1229], as transformers' run of the
/// paper's method found), late-layer spikes rejected, weights restored bit-exactly, and the
/// report identical run to run and across thread counts.
#[test]
fn detect_finds_and_confirms_the_super_weight() {
    let Some(path) = common::smollm2() else { return };
    let mut m = swk::Model::load(path.to_str().unwrap()).unwrap();
    let before = m.weights.checksum();
    let cfg = swk::detect::DetectConfig::default();
    let (d, _) = detect_json(&mut m, &cfg);
    assert_eq!(m.weights.checksum(), before, "weights restored bit-exactly");
    let top = d
        .super_weights
        .iter()
        .find(|s| (s.layer, s.row, s.col) == (11, 507, 1229))
        .expect("layer 11 [507, 1229] confirmed");
    let ratio = top.perplexity_ratio.unwrap();
    eprintln!(
        "SmolLM2 super weight: ppl x{ratio:.2}; {} confirmed, {} rejected",
        d.super_weights.len(),
        d.rejected.len()
    );
    assert!(ratio > 10.0, "zeroing it raises perplexity only x{ratio}");
    assert_eq!(top.iteration, 1);
    assert!(
        (top.value - 5.8757324).abs() < 1e-6
            && top.input_activation > 2900.0
            && top.output_activation > 23000.0
    );
    // Every first-iteration candidate of the reference run is found; late layers are rejected.
    let r = common::json("smollm2/reference.json");
    for c in r["super_weight"]["iterations"][0]["candidates"].as_array().unwrap() {
        let key = (
            c["layer"].as_u64().unwrap() as usize,
            c["row"].as_u64().unwrap() as usize,
            c["col"].as_u64().unwrap() as usize,
        );
        let found =
            d.super_weights.iter().chain(&d.rejected).any(|s| (s.layer, s.row, s.col) == key);
        assert!(found, "reference candidate {key:?} not found");
    }
    assert!(
        d.rejected.iter().filter(|s| s.layer >= 27).count() >= 3,
        "late-layer spikes are rejected"
    );
    assert!(d.super_weights.iter().all(|s| s.layer < 27));

    // Reproducible run to run and across thread counts (one iteration to keep CI short).
    let cfg = swk::detect::DetectConfig { max_iterations: 1, ..Default::default() };
    let runs: Vec<String> = [1, 2, 2]
        .into_iter()
        .map(|n| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
            pool.install(|| detect_json(&mut m, &cfg).1)
        })
        .collect();
    assert_eq!(runs[1], runs[2], "run to run");
    assert_eq!(runs[0], runs[1], "1 thread vs 2 threads");
}
