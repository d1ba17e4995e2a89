//! The research analyses on planted synthetic models, whose outcome is known (see `swk::synth`),
//! and one quick check on the real SmolLM2 (skipped when absent).

mod common;

use swk::analysis::{self, cascade, compare, quantize, screen, trace, vocab};
use swk::edit::{EditOp, WeightEdit};
use swk::hooks::{HookKind, HookPoint, Hooks};
use swk::model::arch::{ForwardOptions, KvCache, Logits};
use swk::synth::{planted, Plant, PlantTruth, PlantedWeight, SynthSpec};
use swk::Model;

/// Grouped-query attention, the standard plant: one super weight in layer 1, a backup, a decoy
/// in the last layer, the sink head in the second-last.
fn planted_model(seed: u64) -> (Model, PlantTruth) {
    let spec = SynthSpec {
        hidden: 96,
        intermediate: 256,
        layers: 5,
        heads: 6,
        kv_heads: 2,
        vocab: 320,
        tie_embeddings: false,
    };
    planted(&spec, seed, &Plant::standard(&spec)).expect("plant")
}

fn zero(w: &PlantedWeight) -> WeightEdit {
    WeightEdit::down_proj(w.layer, w.row, w.col, EditOp::Zero)
}

#[test]
fn cascade_follows_the_planted_row() {
    let (mut model, truth) = planted_model(11);
    let sw = truth.super_weights[0];
    let before = model.weights.checksum();
    let r = cascade::cascade(&mut model, &truth.prompt, &[zero(&sw)], &Default::default())
        .expect("cascade");
    assert_eq!(model.weights.checksum(), before, "weights restored");
    assert_eq!(r.config.rows, vec![sw.row], "follows the edited row by default");
    let s = &r.summary[0];
    // Massive from the super weight's layer on (the decoy only cancels part of it).
    let want: Vec<usize> = (sw.layer..model.config.num_layers).collect();
    assert_eq!(s.massive_layers_base, want, "{s:?}");
    assert!(s.massive_layers_edited.is_empty(), "{s:?}");
    assert!((s.peak_base / sw.output.abs() - 1.0).abs() < 0.02, "peak {}", s.peak_base);
    assert!(s.peak_edited < 1.0, "edited peak {}", s.peak_edited);
    // The layer's largest massive activation is the planted row at BOS.
    let l = &r.layers[sw.layer];
    assert_eq!((l.base.top[0].dim, l.base.top[0].position), (sw.row, 0));
    assert_eq!(l.rows[0].base[0], l.base.top[0].value);
    assert!(l.base.top[0].ratio_to_median > 1000.0);
    assert_eq!(l.edited.count, 0);
    assert_eq!(r.layers[0].base.count, 0, "nothing massive before the super weight");
    let svg = tempfile::Builder::new().suffix(".svg").tempfile().expect("tmp");
    cascade::plot(&r, svg.path()).expect("plot");
    let text = std::fs::read_to_string(svg.path()).expect("svg");
    assert!(text.starts_with("<svg") && text.contains("<polyline"), "an SVG line plot");
}

#[test]
fn vocab_shift_is_large_with_the_edit_and_exactly_zero_without() {
    let (mut model, truth) = planted_model(12);
    let sw = truth.super_weights[0];
    let samples = vec![truth.confirm.clone(), truth.prompt.clone()];
    let cfg = vocab::VocabConfig { top_k: 4, include_all: true };
    let before = model.weights.checksum();

    let none = vocab::vocab_effects(&mut model, &samples, &[], &cfg, |_, _| {}).expect("no edit");
    assert_eq!(none.positions, samples.iter().map(|s| s.len() - 1).sum::<usize>());
    assert_eq!(none.mean_kl, 0.0);
    assert_eq!(none.max_kl, 0.0);
    assert_eq!(none.mean_abs_logprob_change, 0.0);
    assert_eq!(none.top1_agreement, 1.0);
    assert_eq!(none.base_perplexity, none.edited_perplexity);
    assert!(none.logprob_change.as_ref().expect("all tokens").iter().all(|&d| d == 0.0));
    assert!(none.gainers.iter().chain(&none.losers).all(|t| t.mean_logprob_change == 0.0));

    let r =
        vocab::vocab_effects(&mut model, &samples, &[zero(&sw)], &cfg, |_, _| {}).expect("edit");
    assert_eq!(model.weights.checksum(), before, "weights restored");
    assert!(r.mean_kl > 1.0, "mean KL {}", r.mean_kl);
    assert!(r.edited_perplexity > 3.0 * r.base_perplexity, "{r:?}");
    // The probability the super weight gave its likely tokens is what is lost.
    let likely = &truth.likely_tokens[0];
    for t in &r.prob_losers {
        assert!(likely.contains(&t.id), "loser {} is not a likely token", t.id);
        assert!(t.mean_prob_edited < t.mean_prob_base);
    }
    assert!(r.target_losers.iter().all(|t| likely.contains(&t.id)), "{:?}", r.target_losers);
    assert!(r.losers[0].mean_logprob_change < -1.0);
    let svg = tempfile::Builder::new().suffix(".svg").tempfile().expect("tmp");
    vocab::plot(&r, svg.path()).expect("plot");
    assert!(std::fs::read_to_string(svg.path()).expect("svg").contains("<rect"));
    // PNG: decodes, has the SVG's size, white background, blue bars and dark text.
    let dir = tempfile::tempdir().expect("tmp");
    let png = dir.path().join("v.png");
    vocab::plot(&r, &png).expect("png plot");
    let (w, h, rgb) = common::decode_png(&png);
    let bars = r.prob_gainers.len() + r.prob_losers.len();
    assert_eq!((w, h), ((120 + 28 * bars).max(640) as u32, 520), "{bars} bars");
    let white = common::count_color(&rgb, [255, 255, 255]);
    assert!(white > (w * h / 2) as usize && white < (w * h) as usize, "mostly white, not blank");
    let red = common::count_color(&rgb, [214, 39, 40]);
    assert!(red > 500, "losing tokens drawn as red bars: {red} pixels");
    let caption = &rgb[..(w * 40 * 3) as usize];
    let dark = caption.chunks_exact(3).filter(|p| p.iter().all(|&c| c < 100)).count();
    assert!(dark > 50, "the caption's glyphs are rasterized: {dark} dark pixels");
    assert!(vocab::plot(&r, &dir.path().join("v.jpg")).is_err(), "only .svg and .png");
}

#[test]
fn trace_finds_the_planted_column_token_and_sink() {
    let (model, truth) = planted_model(13);
    let sw = truth.super_weights[0];
    let r = trace::trace(&model, &truth.prompt, sw.layer, sw.row, sw.col).expect("trace");
    assert_eq!(r.spike_position, 0, "the spike sits on BOS");
    assert_eq!(r.weight, sw.value);
    let x = r.positions[0].activation;
    assert!((x / sw.input - 1.0).abs() < 0.01, "activation {x} vs {}", sw.input);
    assert!((r.product - x * sw.value).abs() < 1e-3);
    assert!((r.product_share - 1.0).abs() < 0.01, "w*x is the row output: {r:?}");
    assert!((r.row_output - r.mlp_out_row).abs() < 1e-2 * r.mlp_out_row.abs());
    assert!(r.amplification.ratio_to_other_positions > 1000.0);
    assert_eq!(r.gate_contributors[0].dim, truth.bias_dim, "the gate reads the bias dim");
    assert_eq!(r.attention.len(), model.config.num_layers - sw.layer - 1);
    assert_eq!(r.top_sink_layers[0], truth.copy_layer, "{:?}", r.attention);
    let sink = r.attention.iter().find(|a| a.layer == truth.copy_layer).expect("copy layer");
    assert_eq!(sink.max_head, 0);
    assert!(sink.max_head_weight > 0.9, "{sink:?}");
}

#[test]
fn attention_pattern_hook_is_a_causal_distribution() {
    let (model, truth) = planted_model(14);
    let (nh, t) = (model.config.num_heads, truth.prompt.len());
    let p = HookPoint { layer: truth.copy_layer, kind: HookKind::AttnPattern };
    assert_eq!(p.to_string().parse::<HookPoint>().expect("name"), p);
    let grab = |tokens: &[u32], cache: &mut KvCache, logits: Logits| {
        let mut got = Vec::new();
        let mut hooks = Hooks::new();
        hooks.add(p, |_, a| got.push((a.rows, a.cols, a.pos0, a.data.to_vec())));
        let opts = ForwardOptions { hooks: Some(&mut hooks), logits, stats: None };
        let out = model.forward(tokens, cache, opts).expect("forward");
        drop(hooks);
        (got.remove(0), out)
    };
    let mut cache = KvCache::new(&model);
    let (first, logits) = grab(&truth.prompt[..t - 1], &mut cache, Logits::All);
    assert_eq!(logits, model.logits(&truth.prompt[..t - 1]).expect("plain"), "hook is read-only");
    // Decoding one more token: one query row against every cached key.
    let (second, _) = grab(&truth.prompt[t - 1..], &mut cache, Logits::None);
    let got = [first, second];
    let (rows, cols, pos0, data) = &got[0];
    assert_eq!((*rows, *cols, *pos0), (t - 1, nh * (t - 1), 0));
    for q in 0..t - 1 {
        for h in 0..nh {
            let w = &data[(q * nh + h) * (t - 1)..][..t - 1];
            assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            assert!(w[q + 1..].iter().all(|&x| x == 0.0), "causal");
        }
    }
    let (rows, cols, pos0, data) = &got[1];
    assert_eq!((*rows, *cols, *pos0), (1, nh * t, t - 1));
    assert!(data[..t].iter().sum::<f32>() > 0.99 && data[0] > 0.9, "head 0 sinks into BOS");
}

#[test]
fn screening_ranks_the_planted_weight_first() {
    let (mut model, truth) = planted_model(15);
    let sw = truth.super_weights[0];
    let candidates: Vec<WeightEdit> =
        [truth.decoy, truth.backup, Some(sw)].into_iter().flatten().map(|w| zero(&w)).collect();
    let before = model.weights.checksum();
    let cfg = screen::ScreenConfig { top_largest: 8, context: 32 };
    let r = screen::screen(&mut model, &truth.confirm, &candidates, &cfg, |_, _, _| {})
        .expect("screen");
    assert_eq!(model.weights.checksum(), before);
    assert_eq!(r.entries[0].coords, Some((sw.layer, sw.row, sw.col)), "{:?}", r.entries);
    assert!(r.entries[0].ratio > 10.0);
    assert_eq!(r.entries[0].source, screen::Source::Candidate, "candidates keep their source");
    assert!(r.entries[1..].iter().all(|e| e.ratio < 1.5), "{:?}", r.entries);
    assert!(r.entries.windows(2).all(|w| w[0].ratio >= w[1].ratio));
    assert!(r.entries.iter().enumerate().all(|(i, e)| e.rank == i + 1));
    // The largest |w| are the planted channels' weights (deduplicated against candidates).
    let largest = screen::largest_down_proj(&model, 3).expect("largest");
    assert_eq!(largest[0].index, vec![sw.row, sw.col]);
    assert!(r.entries.len() <= candidates.len() + 8);
}

#[test]
fn generation_changes_when_zeroed_and_not_at_factor_one() {
    let (mut model, truth) = planted_model(16);
    let sw = truth.super_weights[0];
    let cfg = compare::CompareConfig { factors: vec![0.0, 1.0, 2.0], max_new_tokens: 6 };
    let before = model.weights.checksum();
    let prompts = vec![truth.confirm[..8].to_vec()];
    let r = compare::compare_generate(&mut model, &prompts, &[zero(&sw)], &cfg, |_, _| {})
        .expect("compare");
    assert_eq!(model.weights.checksum(), before);
    let c = &r.prompts[0].continuations;
    assert_eq!(
        c.iter().map(|c| c.label.as_str()).collect::<Vec<_>>(),
        ["baseline", "x0", "x1", "x2"]
    );
    assert!(c[0].tokens.iter().all(|t| truth.likely_tokens[0].contains(t)), "{:?}", c[0]);
    assert_ne!(c[1].tokens, c[0].tokens, "zeroed");
    assert!(c[1].first_token_prob < c[0].first_token_prob);
    assert_eq!(c[2].tokens, c[0].tokens, "factor 1 is the baseline");
    assert_eq!(c[2].first_token_prob, c[0].first_token_prob);
}

#[test]
fn quantization_block_math() {
    // 2 bits: min -1, max 2 -> scale 1, zero 1: grid {-1, 0, 1, 2}.
    let mut w = [-1.0f32, 0.4, 0.6, 2.0, 1.2];
    let (clipped, sq) = quantize::quantize_block(&mut w, 2, None, &[]);
    assert_eq!(w, [-1.0, 0.0, 1.0, 2.0, 1.0]);
    assert_eq!(clipped, 0);
    assert!((sq - (0.16 + 0.16 + 0.04)).abs() < 1e-6);
    // Holding out the outlier: the rest gets the whole grid, the outlier stays exact.
    let mut w = [0.1f32, -0.1, 0.05, 100.0];
    let (_, sq) = quantize::quantize_block(&mut w, 2, None, &[3]);
    assert_eq!(w[3], 100.0);
    let step = 0.2 / 3.0;
    assert!(w[..3].iter().zip([0.1, -0.1, 0.05]).all(|(a, b)| (a - b).abs() <= step + 1e-6));
    let mut plain = [0.1f32, -0.1, 0.05, 100.0];
    let (_, sq_plain) = quantize::quantize_block(&mut plain, 2, None, &[]);
    assert_eq!(plain[..3], [0.0; 3], "the outlier's range swallows the small weights");
    assert!(sq < 0.2 * sq_plain, "{sq} vs {sq_plain}");
    // Clipping: 64 small values and one outlier far beyond mean + 3 std of |w|.
    let mut w: Vec<f32> = (0..64).map(|i| if i % 2 == 0 { 0.01 } else { -0.01 }).collect();
    w.push(5.0);
    let (clipped, _) = quantize::quantize_block(&mut w, 4, Some(3.0), &[]);
    assert_eq!(clipped, 1);
    // mean |w| 0.087, std 0.614: clipped to 1.93 (a single outlier inflates the std).
    assert!(w[64] > 1.8 && w[64] < 2.0, "clipped to {}", w[64]);
}

/// Plain min-max RTN keeps a block's extreme almost exactly, so a super weight survives it
/// and what it costs is the resolution of its block's other weights (planted models do not
/// depend on those: holding out lowers the quantization error, not the perplexity). Clipping
/// outliers, the paper's remedy, shrinks the super weight unless it is held out. The planted
/// mechanism is scale-invariant behind RMSNorm (only zeroing breaks it), so the difference
/// shows in KL(unquantized ‖ quantized) rather than in perplexity. Only down_proj is
/// quantized: clipping would also flatten the planted single-entry gate/up/attention rows.
#[test]
fn quantization_holding_out_the_super_weight_wins_and_restores() {
    let (mut model, truth) = planted_model(17);
    let sw = truth.super_weights[0];
    let before = model.weights.checksum();
    {
        let mut snap = quantize::Rewrite::new(&mut model);
        let spec = quantize::QuantSpec { bits: 4, block_size: 1 << 20, clip_z: None };
        let stats =
            quantize::quantize_linear(&mut snap, &spec, &[zero(&sw)], None).expect("quantize");
        assert_eq!(stats.held_out, 1);
        assert_eq!(stats.tensors, 7 * snap.config.num_layers);
        let d = snap.weights.get(&Model::down_proj_name(sw.layer)).expect("down");
        assert_eq!(d.index2(sw.row, sw.col).map(|i| d.data[i]), Some(sw.value), "held out");
        assert!(quantize::quantize_linear(&mut snap, &spec, &[], Some("nothing")).is_err());
    }
    assert_eq!(model.weights.checksum(), before, "restored on drop");

    let cfg = quantize::StudyConfig {
        bits: 3,
        block_sizes: vec![256, 1 << 20],
        clip_z: Some(3.0),
        context: 32,
        only: Some("down_proj".into()),
        kl_positions: 64,
    };
    let r = quantize::quantize_study(&mut model, &truth.confirm, &[zero(&sw)], &cfg, |_, _, _| {})
        .expect("study");
    assert_eq!(model.weights.checksum(), before, "restored after the study");
    let base = r.baseline_perplexity;
    for row in &r.rows {
        let v = |name: &str| row.variants.iter().find(|v| v.name == name).expect(name);
        for name in ["rtn", "rtn+clip", "rtn+holdout", "rtn+holdout+clip"] {
            let x = v(name);
            println!(
                "block {:>7} {name:>16}: ppl {:.3} (base {base:.3}), KL {:.5}, mse {:.3e}",
                row.block_size,
                x.perplexity,
                x.mean_kl.unwrap_or(f64::NAN),
                x.stats.mse
            );
        }
        assert!(v("rtn+clip").stats.clipped > 0);
    }
    // One block spans whole tensors: the super weight stretches its tensor's grid (holding it
    // out lowers the error), and clipping without holding it out shrinks it and shifts the
    // model's predictions; held out, the clipped model predicts like the unquantized one.
    let big = &r.rows[1];
    let v = |name: &str| big.variants.iter().find(|v| v.name == name).expect(name);
    let kl = |name: &str| v(name).mean_kl.expect("KL measured");
    assert!(v("rtn+holdout").stats.mse < 0.8 * v("rtn").stats.mse, "{big:?}");
    assert!(kl("rtn+clip") > 1e-3, "{big:?}");
    assert!(kl("rtn+holdout+clip") < 0.01 * kl("rtn+clip"), "{big:?}");
    assert!((v("rtn+holdout+clip").ratio - 1.0).abs() < 0.01, "{big:?}");
}

#[test]
fn edits_from_a_detection_report() {
    let json = r#"{"super_weights": [{"layer": 2, "row": 5, "col": 7}],
                   "rejected": [{"layer": 4, "row": 1, "col": 3}]}"#;
    let e = analysis::edits_from_detect_json(json, false).expect("parse");
    assert_eq!(e, vec![WeightEdit::down_proj(2, 5, 7, EditOp::Zero)]);
    assert_eq!(analysis::down_proj_coords(&e[0]), Some((2, 5, 7)));
    assert_eq!(analysis::edits_from_detect_json(json, true).expect("parse").len(), 2);
    assert!(analysis::edits_from_detect_json("{}", false).is_err());
    assert!(
        analysis::edits_from_detect_json(r#"{"super_weights": [{"layer": -1}]}"#, false).is_err()
    );
    assert!(analysis::edits_from_detect_json("not json", false).is_err());
}

/// SmolLM2's super weight (layer 11, row 507, col 1229) writes a massive activation into dim
/// 507 from layer 11 on; zeroing it collapses the activation.
#[test]
fn smollm2_cascade_collapses_when_the_super_weight_is_zeroed() {
    let Some(m) = common::smollm2_model() else { return };
    let start = std::time::Instant::now();
    // The shared model is read-only here: the cascade edits a private copy of its weights.
    let mut model = Model {
        config: m.config.clone(),
        weights: m.weights.clone(),
        tokenizer: m.tokenizer.clone(),
        source: m.source.clone(),
    };
    let tokens =
        model.tokenizer().unwrap().encode(swk::detect::DEFAULT_PROMPT, true).expect("encode");
    let edit = WeightEdit::down_proj(11, 507, 1229, EditOp::Zero);
    let r = cascade::cascade(&mut model, &tokens, &[edit], &Default::default()).expect("cascade");
    let s = &r.summary[0];
    println!(
        "SmolLM2 dim 507: peak {:.1} -> {:.1}; massive in {:?} -> {:?} ({:.1} s)",
        s.peak_base,
        s.peak_edited,
        s.massive_layers_base,
        s.massive_layers_edited,
        start.elapsed().as_secs_f64()
    );
    // Massive at the first token from layer 11 until the late layers that cancel it.
    let mid: Vec<usize> = (11..=27).collect();
    assert_eq!(s.massive_layers_base, mid, "{s:?}");
    assert!(s.peak_base > 20_000.0);
    // Zeroed: the rest of row 507 (other channels of layer 11) still writes about a quarter.
    for l in &r.layers[11..=27] {
        let (b, e) = (l.rows[0].base[0], l.rows[0].edited[0]);
        assert!(e.abs() < 0.35 * b.abs(), "layer {}: {b} -> {e}", l.layer);
    }
    let l11 = &r.layers[11];
    assert_eq!((l11.base.top[0].dim, l11.base.top[0].position), (507, 0));
    let t = trace::trace(&model, &tokens, 11, 507, 1229).expect("trace");
    println!(
        "SmolLM2 trace: x {:.1} at {} ({}), w*x {:.1}, rest {:.1}, sink layers {:?}",
        t.positions[t.spike_position].activation,
        t.spike_position,
        t.spike_token,
        t.product,
        t.rest_of_row,
        t.top_sink_layers
    );
    assert_eq!(t.spike_position, 0);
    assert!(t.product.abs() > 2.0 * t.rest_of_row.abs(), "{t:?}");
}

fn swk(args: &[&str]) -> (bool, String, String) {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_swk")).args(args).output().expect("run swk");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Every analysis subcommand on the tiny Llama fixture with an explicit edit: valid JSON with
/// the expected keys, plots written, a detection report accepted, bad input refused.
#[test]
fn cli_subcommands_print_json_and_write_plots() {
    let model = common::fixture("tiny/llama");
    let model = model.to_str().expect("utf-8");
    let dir = tempfile::tempdir().expect("tmp");
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "The crew checked the sails, then the boat left the harbour. ".repeat(8))
        .expect("write");
    let text = text.to_str().expect("utf-8");
    let svg = |name: &str| dir.path().join(name).to_str().expect("utf-8").to_string();
    let edit = ["--edit", "zero:1,3,7"];
    let cases: Vec<(Vec<String>, &str, Option<String>)> = vec![
        (
            vec!["vocab", model, "--text", text, "--samples", "2", "--out", &svg("v.svg")]
                .into_iter()
                .map(String::from)
                .collect(),
            "mean_kl",
            Some(svg("v.svg")),
        ),
        (
            vec!["cascade", model, "--prompt", "the boat", "--out", &svg("c.svg"), "--png"]
                .into_iter()
                .map(String::from)
                .collect(),
            "summary",
            Some(svg("c.svg")),
        ),
        (
            vec!["trace", model, "--prompt", "the boat left"]
                .into_iter()
                .map(String::from)
                .collect(),
            "spike_position",
            None,
        ),
        (
            vec!["compare-generate", model, "--prompt", "the", "--max-new-tokens", "3"]
                .into_iter()
                .map(String::from)
                .collect(),
            "prompts",
            None,
        ),
        (
            vec![
                "quantize-study",
                model,
                "--text",
                text,
                "--block-size",
                "64",
                "--context",
                "16",
                "--out",
                &svg("q.svg"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "baseline_perplexity",
            Some(svg("q.svg")),
        ),
        (
            vec!["screen", model, "--text", text, "--top-largest", "2"]
                .into_iter()
                .map(String::from)
                .collect(),
            "entries",
            None,
        ),
    ];
    for (args, key, plot) in cases {
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend(edit);
        args.push("--json");
        let (ok, out, err) = swk(&args);
        assert!(ok, "{args:?}: {err}");
        let j: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
        assert!(j.get(key).is_some(), "{args:?}: no `{key}` in {out}");
        if ["screen", "vocab", "compare-generate", "cascade", "trace"].contains(&args[0]) {
            assert_eq!(j["device"], "cpu", "{}: says which backend ran it", args[0]);
        }
        if let Some(p) = plot {
            let s = std::fs::read_to_string(&p).expect("plot written");
            assert!(s.starts_with("<svg"), "{p}");
            if args.contains(&"--png") {
                let (w, h, _) = common::decode_png(&std::path::Path::new(&p).with_extension("png"));
                assert_eq!((w, h), (900, 540), "--png writes the line chart next to the SVG");
            }
        }
        // The readable table works too.
        args.pop();
        let (ok, out, err) = swk(&args);
        assert!(ok && !out.is_empty(), "{args:?}: {err}");
    }
    // A detection report supplies the edits; a bad one and a PNG plot are refused.
    let report = dir.path().join("d.json");
    std::fs::write(&report, r#"{"super_weights": [{"layer": 1, "row": 3, "col": 7}]}"#)
        .expect("write");
    let report = report.to_str().expect("utf-8");
    let (ok, out, err) = swk(&["cascade", model, "--from-detect", report, "--json"]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(j["config"]["rows"], serde_json::json!([3]));
    let (ok, _, err) = swk(&["cascade", model, "--from-detect", text, "--json"]);
    assert!(!ok && err.contains("not JSON"), "{err}");
    let (ok, _, err) = swk(&["vocab", model, "--edit", "zero:1,3,7", "--out", "x.jpg"]);
    assert!(!ok && err.contains(".svg or .png"), "{err}");
    let (ok, _, err) = swk(&["trace", model, "--weight", "9,0,0"]);
    assert!(!ok && err.contains("outside the model"), "{err}");
}
