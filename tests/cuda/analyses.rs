//! Detection and the analyses on the device against the CPU, on planted models.

use super::*;

/// Detection on the device finds exactly what the CPU finds on planted models: the same
/// candidates (coordinates, iteration, token positions), the same confirmed set, perplexity
/// ratios within 1e-3 (f32 weights) or 5e-2 (bf16, against the CPU on the same bf16-rounded
/// weights), and every weight restored (device checksum unchanged).
#[test]
fn detection_matches_cpu_on_planted_models() {
    if !gpu() {
        return;
    }
    let spec = planted_spec();
    for seed in [3, 11] {
        let (m, truth) = planted(&spec, seed, &Plant::standard(&spec)).expect("planted");
        let prompts = [truth.prompt.clone()];
        let cfg = DetectConfig::default();
        let windows = swk::eval::ppl::windows(&m, &truth.confirm, cfg.confirm_context).unwrap();
        for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
            let mut host = rounded_to(&m, dtype);
            let want = detect_with(&mut host, &prompts, &windows, &cfg, |_, _, _| {}).unwrap();
            let mut g = CudaModel::new(&m, &CudaOptions { dtype, ..Default::default() }).unwrap();
            let before = g.checksum().unwrap();
            let got = detect_with(&mut g, &prompts, &windows, &cfg, |_, _, _| {}).unwrap();
            assert_eq!(g.checksum().unwrap(), before, "seed {seed} {}: restored", dtype.name());
            let tol = if dtype == WeightDtype::Bf16 { 5e-2 } else { 1e-3 };
            for (what, a, b) in [
                ("confirmed", &got.super_weights, &want.super_weights),
                ("rejected", &got.rejected, &want.rejected),
            ] {
                let key = |v: &Vec<swk::detect::SuperWeight>| -> Vec<_> {
                    v.iter()
                        .map(|s| {
                            (
                                s.layer,
                                s.row,
                                s.col,
                                s.iteration,
                                s.token_position,
                                s.output_token_position,
                            )
                        })
                        .collect()
                };
                assert_eq!(key(a), key(b), "seed {seed} {} {what}", dtype.name());
                for (x, y) in a.iter().zip(b.iter()) {
                    assert_eq!(x.value.to_bits(), y.value.to_bits());
                    let (rx, ry) = (x.perplexity_ratio.unwrap(), y.perplexity_ratio.unwrap());
                    assert!((rx / ry - 1.0).abs() <= tol, "ratio {rx} vs cpu {ry}");
                    assert!((x.input_activation / y.input_activation - 1.0).abs() <= tol as f32);
                }
            }
            assert!(!got.super_weights.is_empty(), "the planted super weight is confirmed");
            for p in &truth.super_weights {
                assert!(
                    got.super_weights
                        .iter()
                        .any(|s| (s.layer, s.row, s.col) == (p.layer, p.row, p.col)),
                    "seed {seed} {}: planted {:?} not confirmed on the device",
                    dtype.name(),
                    (p.layer, p.row, p.col)
                );
            }
            eprintln!(
                "detection seed {seed} {}: {} confirmed, {} rejected, baseline ppl {:.4} (cpu {:.4}), {:.3} s (cpu {:.3} s)",
                dtype.name(),
                got.super_weights.len(),
                got.rejected.len(),
                got.baseline_perplexity.unwrap(),
                want.baseline_perplexity.unwrap(),
                got.seconds,
                want.seconds
            );
        }
    }
}

/// Screening on the device (`screen_with`, its candidates from `detected_edits_with` on the
/// device) ranks what the CPU ranks on a planted model: the same raw candidates, the same
/// entries in the same order with the same sources and weight values (f32 weights: bit for
/// bit; bf16: the stored bf16 value), perplexities within 1e-4 (f32) or 5e-2 (bf16, against
/// the CPU on the same bf16-rounded weights), the planted super weight first, and every
/// weight restored (device checksum unchanged).
#[test]
fn screening_matches_cpu_on_a_planted_model() {
    use swk::analysis::screen::{largest_down_proj, screen_with, ScreenConfig};
    use swk::analysis::{detected_config, detected_edits_with};
    if !gpu() {
        return;
    }
    let spec = planted_spec();
    let (m, truth) = planted(&spec, 5, &Plant::standard(&spec)).expect("planted");
    let cfg = ScreenConfig { top_largest: 4, context: 16 };
    let windows = swk::eval::ppl::windows(&m, &truth.confirm, cfg.context).unwrap();
    let largest = largest_down_proj(&m, cfg.top_largest).unwrap();
    let inputs =
        swk::detect::DetectInputs { prompts: vec![truth.prompt.clone()], windows: Vec::new() };
    assert!(detected_config(true).skip_confirmation, "raw candidates need no windows");
    let sw = truth.super_weights[0];
    for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
        let mut host = rounded_to(&m, dtype);
        let cands = detected_edits_with(&mut host, &inputs, true, |_, _, _| {}).unwrap();
        let want = screen_with(&mut host, &windows, &cands, &largest, &cfg, |_, _, _| {}).unwrap();
        let mut g = CudaModel::new(&m, &CudaOptions { dtype, ..Default::default() }).unwrap();
        let before = g.checksum().unwrap();
        let got_cands = detected_edits_with(&mut g, &inputs, true, |_, _, _| {}).unwrap();
        assert_eq!(got_cands, cands, "{}: raw candidates", dtype.name());
        let got = screen_with(&mut g, &windows, &cands, &largest, &cfg, |_, _, _| {}).unwrap();
        assert_eq!(g.checksum().unwrap(), before, "{}: restored", dtype.name());
        let key = |r: &swk::analysis::screen::ScreenReport| -> Vec<_> {
            r.entries
                .iter()
                .map(|e| (e.rank, e.edit.to_string(), e.source, e.value.to_bits()))
                .collect()
        };
        assert_eq!(key(&got), key(&want), "{}: ranking", dtype.name());
        let tol = if dtype == WeightDtype::Bf16 { 5e-2 } else { 1e-4 };
        let rel = |a: f64, b: f64| (a / b - 1.0).abs();
        assert!(rel(got.baseline_perplexity, want.baseline_perplexity) <= tol);
        assert_eq!(got.tokens_scored, want.tokens_scored);
        for (x, y) in got.entries.iter().zip(&want.entries) {
            assert!(rel(x.perplexity, y.perplexity) <= tol, "{}: {x:?} vs {y:?}", dtype.name());
        }
        assert_eq!(got.entries[0].coords, Some((sw.layer, sw.row, sw.col)), "planted first");
        assert!(got.entries[0].ratio > 5.0, "{:?}", got.entries[0]);
        eprintln!(
            "screening {}: {} entries, top ratio {:.2} (cpu {:.2})",
            dtype.name(),
            got.entries.len(),
            got.entries[0].ratio,
            want.entries[0].ratio
        );
    }
}

/// Multiple-choice items the planted super weight decides (its likely tokens against
/// unlikely ones), with multi-token continuations so the device's forked caches are used.
fn planted_items(truth: &swk::synth::PlantTruth) -> Vec<swk::eval::choice::TokenItem> {
    let likely = &truth.likely_tokens[0];
    let unlikely: Vec<u32> =
        (1..320).filter(|t| !likely.contains(t) && *t != truth.bos).take(3).collect();
    (0..3)
        .map(|k| swk::eval::choice::TokenItem {
            context: truth.confirm[..4 + k].to_vec(),
            continuations: vec![vec![likely[k % likely.len()], likely[0]], unlikely.clone()],
            lengths: vec![2, 3],
            label: 0,
        })
        .collect()
}

/// A research session on the device (`research_on`: every analysis there) records what the
/// CPU session records: the same super weights, screening ranking (ratios within 1e-4),
/// vocabulary KL (1e-3), cascade, trace and the quantization study (every number within
/// 1e-4, the rest equal), greedy continuations and multiple-choice scores (1e-4), says where
/// each analysis ran, and leaves every weight of both models restored.
/// The `swk research --device cuda` CLI names the device in session.json too.
#[test]
fn research_runs_on_the_device() {
    use swk::analysis::research::{research_inputs, research_on, Device, Inputs, ResearchConfig};
    if !gpu() {
        return;
    }
    let spec = planted_spec();
    let (mut m, truth) = planted(&spec, 7, &Plant::standard(&spec)).expect("planted");
    let cfg = ResearchConfig {
        top_largest: 3,
        screen_context: 16,
        max_new_tokens: 4,
        quantize: swk::analysis::quantize::StudyConfig {
            block_sizes: vec![64, 4096],
            context: 32,
            kl_positions: 16,
            ..Default::default()
        },
        ..Default::default()
    };
    let inputs = Inputs {
        prompts: vec![truth.prompt.clone()],
        prompt: truth.prompt.clone(),
        confirm: truth.confirm.clone(),
        text: truth.confirm.clone(),
        vocab_samples: vec![truth.confirm[..24].to_vec()],
        study: vec![],
        mc: ("planted".into(), planted_items(&truth)),
    };
    let dir = tempfile::tempdir().expect("tmp");
    let want = research_inputs(&mut m, "planted", &cfg, &inputs, dir.path(), |_, _, _| {})
        .expect("cpu session");
    let opts = CudaOptions { dtype: WeightDtype::F32, ..Default::default() };
    let mut g = CudaModel::new(&m, &opts).unwrap();
    let (before, host_before) = (g.checksum().unwrap(), m.weights.checksum());
    let device = Device { backend: &mut g, name: "cuda: test", streamed: false };
    let got = research_on(&mut m, Some(device), "planted", &cfg, &inputs, dir.path(), |_, _, _| {})
        .expect("device session");
    assert_eq!((g.checksum().unwrap(), m.weights.checksum()), (before, host_before), "restored");
    assert_eq!(got["errors"], serde_json::json!({}), "{}", got["errors"]);
    for (analysis, on) in got["device"].as_object().expect("device map") {
        assert_eq!(on, "cuda: test", "{analysis}");
    }
    assert_eq!(got["detect"]["device"], "cuda: test");
    let coords = |s: &serde_json::Value, list: &str, key: &str| -> Vec<String> {
        let v = s[list][key].as_array().cloned().unwrap_or_default();
        v.iter().map(|e| format!("{} {} {}", e["layer"], e["row"], e["col"])).collect()
    };
    let found = coords(&got, "detect", "super_weights");
    assert_eq!(found, coords(&want, "detect", "super_weights"), "confirmed");
    let sw = truth.super_weights[0];
    assert_eq!(found[0], format!("{} {} {}", sw.layer, sw.row, sw.col));
    let ranking = |s: &serde_json::Value| -> Vec<(String, f64)> {
        let v = s["screen"]["entries"].as_array().cloned().unwrap_or_default();
        v.iter().map(|e| (e["coords"].to_string(), e["ratio"].as_f64().unwrap_or(0.0))).collect()
    };
    let (a, b) = (ranking(&got), ranking(&want));
    assert!(!a.is_empty());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.0, y.0, "screening ranking");
        assert!((x.1 / y.1 - 1.0).abs() <= 1e-4, "ratio {} vs cpu {}", x.1, y.1);
    }
    let num = |s: &serde_json::Value, path: &[&str]| -> f64 {
        path.iter().fold(s, |v, k| &v[*k]).as_f64().unwrap_or(f64::NAN)
    };
    let (kg, kw) = (num(&got, &["vocab", "mean_kl"]), num(&want, &["vocab", "mean_kl"]));
    assert!(kw > 1.0 && (kg / kw - 1.0).abs() <= 1e-3, "vocab mean KL {kg} vs cpu {kw}");
    let top = |s: &serde_json::Value| s["vocab"]["prob_losers"][0]["id"].clone();
    assert_eq!(top(&got), top(&want), "the token losing most probability");
    let conts = |s: &serde_json::Value| -> Vec<String> {
        let v = s["compare_generate"]["prompts"][0]["continuations"].as_array().cloned();
        v.unwrap_or_default().iter().map(|c| format!("{} {}", c["label"], c["tokens"])).collect()
    };
    assert_eq!(conts(&got), conts(&want), "greedy continuations");
    assert_eq!(got["mc"]["baseline"]["acc"], want["mc"]["baseline"]["acc"]);
    assert_eq!(got["mc"]["edited"]["acc"], want["mc"]["edited"]["acc"]);
    let lps = |s: &serde_json::Value, run: &str| -> Vec<f64> {
        let items = s["mc"][run].as_array().cloned().unwrap_or_default();
        items
            .iter()
            .flat_map(|i| i["logprobs"].as_array().cloned().unwrap_or_default())
            .map(|x| x.as_f64().unwrap_or(f64::NAN))
            .collect()
    };
    for run in ["items_baseline", "items_edited"] {
        let (x, y) = (lps(&got, run), lps(&want, run));
        assert_eq!(x.len(), y.len());
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{run}: {a} vs cpu {b}");
        }
    }
    for analysis in ["trace", "cascade", "quantize_study"] {
        assert!(want[analysis].is_object(), "{analysis} ran on the CPU");
        assert_json_close(&got[analysis], &want[analysis], 1e-4, analysis);
    }
    let massive = &got["cascade"]["summary"][0]["massive_layers_base"];
    assert!(!massive.as_array().is_some_and(Vec::is_empty), "a massive activation: {massive}");

    // The CLI: `--device cuda` on the tiny fixture names the device in session.json.
    let llama = fixtures_root().join("tiny").join("llama");
    let out = dir.path().join("cli");
    let o = out.to_string_lossy().to_string();
    let more = ["--out", o.as_str(), "--threshold", "1", "--skip", "vocab,cascade,trace"];
    let skip = ["--skip", "compare-generate,quantize-study", "--json"];
    let more: Vec<&str> = more.iter().chain(&skip).copied().collect();
    swk_json(&["--device", "cuda", "research"], &llama, &more);
    let text = std::fs::read_to_string(out.join("session.json")).expect("session.json");
    let s: serde_json::Value = serde_json::from_str(&text).expect("json");
    let on = s["device"]["detect"].as_str().unwrap_or_default();
    assert!(on.starts_with("cuda"), "{}", s["device"]);
    assert_eq!(s["device"]["cascade"], on, "cascade runs on the device too");
    assert_eq!(s["device"]["quantize-study"], on, "layers resident: quantize-study too");
}

/// Cascade and trace on a bf16 device equal the CPU's on the same bf16-rounded weights: the
/// planted super weight's stored value exactly, the spike token and the layers where its
/// massive activation lives, every number within 1e-2 (bf16 weights, f32 activations); the
/// edited cascade leaves the device's weights restored.
#[test]
fn cascade_and_trace_match_cpu_with_bf16_weights() {
    use swk::analysis::{cascade, token_label, trace};
    if !gpu() {
        return;
    }
    let spec = planted_spec();
    let (m, truth) = planted(&spec, 11, &Plant::standard(&spec)).expect("planted");
    let mut rounded = rounded_to_bf16(&m);
    let mut g = CudaModel::new(&m, &CudaOptions::default()).unwrap();
    let before = g.checksum().unwrap();
    let tokens = &truth.prompt;
    let labels: Vec<String> = tokens.iter().map(|&t| token_label(&m, t)).collect();
    let sw = truth.super_weights[0];
    let edit = WeightEdit::down_proj(sw.layer, sw.row, sw.col, EditOp::Zero);
    let cfg = cascade::CascadeConfig::default();
    let want = cascade::cascade(&mut rounded, tokens, std::slice::from_ref(&edit), &cfg).unwrap();
    let got = cascade::cascade_with(&mut g, tokens, &labels, &[edit], &cfg).unwrap();
    assert_eq!(g.checksum().unwrap(), before, "restored");
    assert!(!want.summary[0].massive_layers_base.is_empty(), "a massive activation");
    let (gj, wj) = (serde_json::to_value(&got).unwrap(), serde_json::to_value(&want).unwrap());
    assert_json_close(&gj, &wj, 1e-2, "cascade");
    let want = trace::trace(&rounded, tokens, sw.layer, sw.row, sw.col).unwrap();
    let got = trace::trace_with(&g, tokens, &labels, (sw.layer, sw.row, sw.col)).unwrap();
    assert_eq!(got.weight.to_bits(), want.weight.to_bits(), "the stored bf16 value");
    assert_eq!(got.spike_position, want.spike_position);
    let (gj, wj) = (serde_json::to_value(&got).unwrap(), serde_json::to_value(&want).unwrap());
    assert_json_close(&gj, &wj, 1e-2, "trace");
}

/// The quantization study on the device (`quantize_study_with`: tensors read from the
/// device, quantized on the host, written back whole) equals the CPU's: with f32 weights the
/// same quantization statistics and perplexities and KLs within 1e-4; with bf16 weights the
/// same statistics as the CPU on the bf16-rounded weights (the inputs are the stored values)
/// and perplexities within 2e-2 (the quantized values are rounded to bf16 again as they are
/// stored). Every device weight comes back, also when a variant fails halfway.
#[test]
fn quantize_study_matches_cpu() {
    use swk::analysis::quantize::{
        linear_tensors, quantize_study, quantize_study_with, StudyConfig,
    };
    if !gpu() {
        return;
    }
    let spec = planted_spec();
    let (m, truth) = planted(&spec, 5, &Plant::standard(&spec)).expect("planted");
    let sw = truth.super_weights[0];
    let held = [WeightEdit::down_proj(sw.layer, sw.row, sw.col, EditOp::Zero)];
    let cfg = StudyConfig {
        bits: 3,
        block_sizes: vec![64, 4096],
        clip_z: Some(3.0),
        context: 32,
        only: None,
        kl_positions: 16,
    };
    let tensors = linear_tensors(&m, None);
    for (dtype, tol) in [(WeightDtype::F32, 1e-4), (WeightDtype::Bf16, 2e-2)] {
        let mut host = if dtype == WeightDtype::F32 { copy(&m) } else { rounded_to_bf16(&m) };
        let want = quantize_study(&mut host, &truth.confirm, &held, &cfg, |_, _, _| {}).unwrap();
        let mut g = CudaModel::new(&m, &CudaOptions { dtype, ..Default::default() }).unwrap();
        let before = g.checksum().unwrap();
        let windows = swk::eval::ppl::windows(&m, &truth.confirm, cfg.context).unwrap();
        let got =
            quantize_study_with(&mut g, &windows, &tensors, &held, &cfg, |_, _, _| {}).unwrap();
        assert_eq!(g.checksum().unwrap(), before, "{dtype:?}: restored");
        assert_eq!(got.tokens_scored, want.tokens_scored);
        let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * b.abs().max(1.0);
        assert!(close(got.baseline_perplexity, want.baseline_perplexity, tol));
        for (gr, wr) in got.rows.iter().zip(&want.rows) {
            for (gv, wv) in gr.variants.iter().zip(&wr.variants) {
                let at = format!("{dtype:?} block {} {}", gr.block_size, gv.name);
                let (gs, ws) = (&gv.stats, &wv.stats);
                assert_eq!(
                    (gs.tensors, gs.weights, gs.held_out, gs.clipped),
                    (ws.tensors, ws.weights, ws.held_out, ws.clipped),
                    "{at}"
                );
                assert!(close(gs.mse, ws.mse, 1e-9), "{at}: mse {} vs {}", gs.mse, ws.mse);
                eprintln!("{at}: ppl {:.4} vs cpu {:.4}", gv.perplexity, wv.perplexity);
                assert!(close(gv.perplexity, wv.perplexity, tol), "{at}");
                let (gk, wk) = (gv.mean_kl.unwrap_or(f64::NAN), wv.mean_kl.unwrap_or(f64::NAN));
                assert!((gk - wk).abs() <= tol.max(1e-3) * wk.max(1e-2), "{at}: KL {gk} vs {wk}");
            }
        }
        // A tensor the device lacks, after real ones: the variant fails, every tensor comes
        // back.
        let mut bad = tensors.clone();
        bad.push("model.layers.0.mlp.no_such.weight".into());
        let e = quantize_study_with(&mut g, &windows, &bad, &held, &cfg, |_, _, _| {});
        assert!(e.unwrap_err().to_string().contains("no_such"));
        assert_eq!(g.checksum().unwrap(), before, "{dtype:?}: restored after an error");
    }
}

/// Group screening on the device (`groups_with`: activations captured, writers read and
/// ablations run there) finds the planted three-member group as the CPU does: the same activations,
/// members, verdicts and minimal subsets, every ratio within 1e-4 (f32 weights), the same
/// number of perplexity runs, and every device weight restored.
#[test]
fn groups_match_cpu_on_a_planted_group() {
    use swk::analysis::groups::{groups, groups_with, GroupsConfig, Verdict};
    use swk::synth::{planted_group, PlantSite, SynthSpec};
    if !gpu() {
        return;
    }
    let spec = SynthSpec { layers: 5, ..SynthSpec::tiny() };
    let (h, i) = (spec.hidden, spec.intermediate);
    let row = h * 3 / 8 + 1;
    let site = |layer, col| PlantSite { layer, row, col, activation: -300.0, weight: 1.5 };
    let members = [site(1, i / 5 + 3), site(2, i / 2 + 1), site(3, i * 4 / 5 + 2)];
    let (mut m, truth) = planted_group(&spec, 5, &members, 4).unwrap();
    let cfg = GroupsConfig { context: truth.confirm.len(), ..Default::default() };
    let prompts = std::slice::from_ref(&truth.prompt);
    let want = groups(&mut m, prompts, &truth.confirm, &cfg, |_, _, _| {}).unwrap();
    let windows = swk::eval::ppl::windows(&m, &truth.confirm, cfg.context).unwrap();
    let opts = CudaOptions { dtype: WeightDtype::F32, ..Default::default() };
    let mut g = CudaModel::new(&m, &opts).unwrap();
    let before = g.checksum().unwrap();
    let got = groups_with(&mut g, prompts, &windows, &cfg, |_, _, _| {}).unwrap();
    assert_eq!(g.checksum().unwrap(), before, "restored");
    assert_eq!(got.groups, want.groups);
    assert_eq!(got.perplexity_runs, want.perplexity_runs);
    let rel = |a: f64, b: f64| (a / b - 1.0).abs();
    assert!(rel(got.baseline_perplexity, want.baseline_perplexity) <= 1e-4);
    assert_eq!(got.activations.len(), want.activations.len());
    for (x, y) in got.activations.iter().zip(&want.activations) {
        assert_eq!((x.activation.dim, x.verdict), (y.activation.dim, y.verdict));
        let coords = |a: &swk::analysis::groups::ActivationGroup| -> Vec<_> {
            a.members.iter().map(|m| (m.layer, m.row, m.col)).collect()
        };
        assert_eq!(coords(x), coords(y), "dim {}", x.activation.dim);
        for (a, b) in x.members.iter().zip(&y.members) {
            assert!(rel(a.single_ratio, b.single_ratio) <= 1e-4, "{a:?} vs {b:?}");
        }
        if let (Some(a), Some(b)) = (x.joint_ratio, y.joint_ratio) {
            assert!(rel(a, b) <= 1e-4, "joint {a} vs cpu {b}");
        }
        let minimal = |a: &swk::analysis::groups::ActivationGroup| {
            a.minimal.as_ref().map(|m| m.members.clone())
        };
        assert_eq!(minimal(x), minimal(y));
    }
    assert!(got.activations.iter().any(|a| a.activation.dim == row && a.verdict == Verdict::Group));
}

/// A super weight and a decoy planted ([`swk::synth::families::plant_arch`]) into the tiny
/// fixture of every family the device runs, as `tests/planted_arch.rs` plants them: detection
/// on the device confirms the super weight and rejects the decoy, as the CPU does, with the
/// same coordinates, token positions and weight value, and perplexity ratios within 1e-3
/// (f32 weights), and leaves the weights bit-identical.
#[test]
fn detection_matches_cpu_on_planted_families() {
    if !gpu() {
        return;
    }
    use swk::synth::families::{plant_arch, ArchPlant};
    use swk::synth::PlantSite;
    let names = [
        "gemma", "gemma2", "gemma3", "gpt2", "gpt_neox", "mistral", "olmo", "olmo2", "phi3",
        "qwen2", "qwen3",
    ];
    for name in names {
        let (m, _) = load(name);
        // GELU (un-gated) MLPs only make positive massive activations.
        let sign = if m.config.architecture.gated_mlp() { -1.0 } else { 1.0 };
        let site = PlantSite {
            layer: 0,
            row: 17,
            col: 101,
            activation: 900.0 * sign,
            weight: -1.5 * sign,
        };
        let decoy = PlantSite { layer: 1, row: 40, col: 60, activation: 600.0 * sign, weight: 1.0 };
        let plant = ArchPlant { decoy: Some(decoy), ..ArchPlant::single(site) };
        let (mut m, truth) = plant_arch(m, 7, &plant).unwrap();
        let cfg = DetectConfig::default();
        let windows = swk::eval::ppl::windows(&m, &truth.confirm, truth.confirm.len()).unwrap();
        let prompts = [truth.prompt.clone()];
        let want = detect_with(&mut m, &prompts, &windows, &cfg, |_, _, _| {}).unwrap();
        let opts = CudaOptions { dtype: WeightDtype::F32, ..Default::default() };
        let mut g = CudaModel::new(&m, &opts).unwrap();
        let before = g.checksum().unwrap();
        let got = detect_with(&mut g, &prompts, &windows, &cfg, |_, _, _| {}).unwrap();
        assert_eq!(g.checksum().unwrap(), before, "{name}: restored");
        let key = |v: &[swk::detect::SuperWeight]| -> Vec<_> {
            v.iter().map(|s| (s.layer, s.row, s.col, s.token_position, s.value.to_bits())).collect()
        };
        assert_eq!(key(&got.super_weights), key(&want.super_weights), "{name}: confirmed");
        assert_eq!(key(&got.rejected), key(&want.rejected), "{name}: rejected");
        let coords: Vec<_> = got.super_weights.iter().map(|s| (s.layer, s.row, s.col)).collect();
        assert_eq!(coords, [(0, 17, 101)], "{name}: the planted weight is confirmed");
        let rejected: Vec<_> = got.rejected.iter().map(|s| (s.layer, s.row, s.col)).collect();
        assert_eq!(rejected, [(1, 40, 60)], "{name}: the decoy is rejected");
        for (x, y) in got
            .super_weights
            .iter()
            .chain(&got.rejected)
            .zip(want.super_weights.iter().chain(&want.rejected))
        {
            let (a, b) = (x.perplexity_ratio.unwrap(), y.perplexity_ratio.unwrap());
            assert!((a / b - 1.0).abs() <= 1e-3, "{name}: ratio {a} vs cpu {b}");
        }
        eprintln!(
            "planted {name}: confirmed {coords:?} ratio {:.2} (cpu {:.2}), decoy ratio {:.3}",
            got.super_weights[0].perplexity_ratio.unwrap(),
            want.super_weights[0].perplexity_ratio.unwrap(),
            got.rejected[0].perplexity_ratio.unwrap()
        );
    }
}

/// One pass's spike statistics on the device.
fn device_stats(g: &CudaModel, tokens: &[u32]) -> SpikeStats {
    let c = g.config();
    let mut s = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    g.forward(tokens, &mut CudaKvCache::new(g), Some(&mut s), Logits::None).unwrap();
    s
}

/// A synthetic mixture of experts with a planted super expert ([`swk::synth::planted_moe`]):
/// detection on the device names the planted weight inside its expert, as the CPU does
/// (same coordinates, expert, positions and value; perplexity ratios within 1e-3 for f32
/// weights), the per-expert statistics agree, and the weights come back bit-identical.
#[test]
fn detection_matches_cpu_on_a_planted_super_expert() {
    if !gpu() {
        return;
    }
    let spec = planted_spec();
    let plant = Plant::standard(&spec);
    let (m, truth, site) = swk::synth::planted_moe(&spec, 11, &plant, 4, 2, 1).unwrap();
    let cfg = DetectConfig::default();
    let windows = swk::eval::ppl::windows(&m, &truth.confirm, cfg.confirm_context).unwrap();
    let prompts = [truth.prompt.clone()];
    let want = detect_with(&mut copy(&m), &prompts, &windows, &cfg, |_, _, _| {}).unwrap();
    let opts = CudaOptions { dtype: WeightDtype::F32, ..Default::default() };
    let mut g = CudaModel::new(&m, &opts).unwrap();
    assert!(!g.graphs(), "a mixture of experts routes on the host: no graphs");
    let stats = (device_stats(&g, &truth.prompt), cpu_stats(&m, &truth.prompt));
    assert_stats_match("planted moe", &stats.0, &stats.1);
    let before = g.checksum().unwrap();
    let got = detect_with(&mut g, &prompts, &windows, &cfg, |_, _, _| {}).unwrap();
    assert_eq!(g.checksum().unwrap(), before, "restored");
    let key = |v: &[swk::detect::SuperWeight]| -> Vec<_> {
        v.iter()
            .map(|s| (s.layer, s.expert, s.row, s.col, s.token_position, s.value.to_bits()))
            .collect()
    };
    assert_eq!(key(&got.super_weights), key(&want.super_weights), "confirmed");
    assert_eq!(key(&got.rejected), key(&want.rejected), "rejected");
    let sw = truth.super_weights[0];
    let planted = (sw.layer, Some(site.expert), sw.row, sw.col);
    assert!(
        got.super_weights.iter().any(|s| (s.layer, s.expert, s.row, s.col) == planted),
        "the planted weight {planted:?} is confirmed: {:?}",
        key(&got.super_weights)
    );
    for (x, y) in got.super_weights.iter().zip(&want.super_weights) {
        let (a, b) = (x.perplexity_ratio.unwrap(), y.perplexity_ratio.unwrap());
        assert!((a / b - 1.0).abs() <= 1e-3, "ratio {a} vs cpu {b}");
    }
    eprintln!(
        "planted super expert: confirmed {:?}, ratio {:.2} (cpu {:.2})",
        key(&got.super_weights),
        got.super_weights[0].perplexity_ratio.unwrap(),
        want.super_weights[0].perplexity_ratio.unwrap()
    );
}

/// `swk::analysis::experts` on the device (router statistics merged over samples, super
/// experts, ablation of a whole expert through batched device edits) reports what the CPU
/// reports on a planted super expert: the same routing counts, the same per-expert maxima
/// (channels, positions, values), the same super experts, ablation perplexities within 1e-3
/// (f32 weights); and the weights come back bit-identical.
#[test]
fn experts_match_cpu_on_a_planted_super_expert() {
    use swk::analysis::experts::{experts_with, ExpertsConfig};
    if !gpu() {
        return;
    }
    let spec = planted_spec();
    let plant = Plant::standard(&spec);
    let (m, truth, site) = swk::synth::planted_moe(&spec, 11, &plant, 4, 2, 1).unwrap();
    let cfg = ExpertsConfig { context: 16, ..Default::default() };
    let windows = swk::eval::ppl::windows(&m, &truth.confirm, cfg.context).unwrap();
    let samples =
        [truth.prompt.clone(), truth.confirm[..20].to_vec(), truth.confirm[20..].to_vec()];
    let want = experts_with(&mut copy(&m), &samples, &windows, &cfg, |_, _, _| {}).unwrap();
    let opts = CudaOptions { dtype: WeightDtype::F32, ..Default::default() };
    let mut g = CudaModel::new(&m, &opts).unwrap();
    let before = g.checksum().unwrap();
    let got = experts_with(&mut g, &samples, &windows, &cfg, |_, _, _| {}).unwrap();
    assert_eq!(g.checksum().unwrap(), before, "restored");
    let routing = |r: &swk::analysis::experts::ExpertsReport| -> Vec<_> {
        r.experts
            .iter()
            .map(|e| {
                let ins = (
                    e.max_input_col,
                    e.max_input_position,
                    e.max_output_row,
                    e.max_output_position,
                );
                (e.layer, e.expert, e.selected, ins)
            })
            .collect()
    };
    assert_eq!(routing(&got), routing(&want), "routing and spike channels");
    for (x, y) in got.experts.iter().zip(&want.experts) {
        assert!((x.mean_weight - y.mean_weight).abs() <= 1e-5, "{x:?} vs {y:?}");
        assert!((x.max_output - y.max_output).abs() <= 1e-4 * y.max_output.abs(), "{x:?} vs {y:?}");
        assert!((x.max_input - y.max_input).abs() <= 1e-4 * y.max_input.abs(), "{x:?} vs {y:?}");
    }
    let supers = |r: &swk::analysis::experts::ExpertsReport| -> Vec<_> {
        r.super_experts.iter().map(|s| (s.layer, s.expert, s.max_output_row)).collect()
    };
    assert_eq!(supers(&got), supers(&want));
    assert!(supers(&got).iter().any(|&(l, e, _)| (l, e) == (site.layer, site.expert)));
    let (a, b) = (got.baseline_perplexity.unwrap(), want.baseline_perplexity.unwrap());
    assert!((a / b - 1.0).abs() <= 1e-4, "baseline {a} vs cpu {b}");
    for (x, y) in got.super_experts.iter().zip(&want.super_experts) {
        let (a, b) = (x.ablated_perplexity.unwrap(), y.ablated_perplexity.unwrap());
        assert!((a / b - 1.0).abs() <= 1e-3, "ablated {a} vs cpu {b}");
    }
    let top = &got.super_experts[0];
    eprintln!(
        "experts on the device: super expert layer {} expert {}, ablated ppl x {:.2} (cpu x {:.2})",
        top.layer,
        top.expert,
        top.perplexity_ratio.unwrap(),
        want.super_experts[0].perplexity_ratio.unwrap()
    );
}
