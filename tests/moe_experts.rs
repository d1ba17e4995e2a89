//! Router statistics and super experts (`swk::analysis::experts`) on a synthetic MoE with a
//! planted super expert (`swk::synth::planted_moe`): the planted expert is the one reported,
//! its ablation raises perplexity, and router frequencies add up.

mod common;

use swk::analysis::experts::{experts, ExpertsConfig};
use swk::hooks::{HookKind, HookPoint};
use swk::synth::{planted, planted_moe, Plant, SynthSpec};

#[test]
fn planted_super_expert_is_found_and_matters() {
    let spec = SynthSpec::tiny();
    let plant = Plant::standard(&spec);
    let (mut m, truth, site) = planted_moe(&spec, 11, &plant, 4, 2, 1).unwrap();
    let sw = truth.super_weights[0];
    assert_eq!((site.layer, site.expert), (sw.layer, 1));

    // The massive activation the dense model writes at BOS survives the routing (weight ~1).
    let point = HookPoint { layer: sw.layer, kind: HookKind::ResidPost };
    let moe_x = swk::analysis::capture(&m, &truth.prompt, &[point]).unwrap()[&point][sw.row];
    let (dense, _) = planted(&spec, 11, &plant).unwrap();
    let dense_x = swk::analysis::capture(&dense, &truth.prompt, &[point]).unwrap()[&point][sw.row];
    assert!(moe_x.abs() > 1000.0, "massive activation {moe_x}");
    assert!((moe_x - dense_x).abs() <= 1e-3 * dense_x.abs(), "{moe_x} vs dense {dense_x}");

    let before = m.weights.checksum();
    let samples = vec![truth.prompt.clone(), truth.confirm.clone()];
    let cfg = ExpertsConfig { context: truth.confirm.len(), ..Default::default() };
    let r = experts(&mut m, &samples, &truth.confirm, &cfg, |_, _, _| {}).unwrap();
    assert_eq!(m.weights.checksum(), before, "weights not restored");

    // Router statistics: one MoE layer; frequencies sum to top-k, shares to 1.
    assert_eq!(r.layers.len(), 1);
    assert_eq!(r.layers[0].layer, sw.layer);
    let tokens = (truth.prompt.len() + truth.confirm.len()) as u64;
    assert_eq!(r.layers[0].tokens, tokens);
    assert!(r.layers[0].mean_entropy > 0.0 && r.layers[0].mean_entropy <= 4f64.ln() + 1e-9);
    assert_eq!(r.experts.len(), 4);
    let selected: u64 = r.experts.iter().map(|e| e.selected).sum();
    assert_eq!(selected, 2 * tokens);
    let freq: f64 = r.experts.iter().map(|e| e.frequency).sum();
    let share: f64 = r.experts.iter().map(|e| e.share).sum();
    assert!((freq - 2.0).abs() < 1e-12, "frequencies sum to {freq}");
    assert!((share - 1.0).abs() < 1e-12, "shares sum to {share}");
    // BOS (twice, one per sample) always picks the super expert.
    assert!(r.experts[1].selected >= 2);

    // Exactly the planted expert is a super expert: its down_proj writes the massive
    // activation (row, BOS), and ablating it raises perplexity far above 2x.
    assert_eq!(r.super_experts.len(), 1, "{:?}", r.super_experts);
    let s = &r.super_experts[0];
    assert_eq!((s.layer, s.expert), (sw.layer, 1));
    assert_eq!((s.max_output_row, s.max_output_position), (sw.row, 0));
    assert!((s.max_output - sw.output).abs() <= 0.05 * sw.output.abs(), "{}", s.max_output);
    let e1 = &r.experts[1];
    assert_eq!((e1.max_input_col, e1.max_input_position), (sw.col, 0));
    let ratio = s.perplexity_ratio.unwrap();
    eprintln!(
        "super expert L{} E{}: max output {:.1}, ppl {:.2} -> {:.2} (x{ratio:.1})",
        s.layer,
        s.expert,
        s.max_output,
        r.baseline_perplexity.unwrap(),
        s.ablated_perplexity.unwrap()
    );
    assert!(ratio > 5.0, "ablation ratio {ratio}");
}

#[test]
fn dense_models_are_refused() {
    let mut m = swk::synth::random_llama(&SynthSpec { layers: 2, ..SynthSpec::tiny() }, 1).unwrap();
    let err =
        experts(&mut m, &[vec![1, 2, 3]], &[1, 2, 3], &ExpertsConfig::default(), |_, _, _| {})
            .unwrap_err();
    assert!(err.to_string().contains("not a mixture-of-experts"), "{err}");
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

fn fixture(name: &str) -> String {
    common::fixture(&format!("tiny/{name}")).to_str().expect("utf-8 path").to_string()
}

/// `swk experts --json` on the tiny Mixtral: every layer's frequencies sum to top-k, and the
/// selection counts of the reference text's routing are what transformers recorded.
#[test]
fn cli_experts_json_and_info_and_expert_edit() {
    let (ok, out, err) =
        swk(&["experts", &fixture("mixtral"), "--router-samples", "3", "--no-ablate", "--json"]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["top_k"], 2);
    assert_eq!(j["samples"], 3);
    assert_eq!(j["device"], "cpu");
    let (ok, _, err) = swk(&["experts", &fixture("llama"), "--no-ablate"]);
    assert!(!ok && err.contains("not a mixture-of-experts model"), "{err}");
    let experts = j["experts"].as_array().unwrap();
    assert_eq!(experts.len(), 8);
    for l in 0..2 {
        let f: f64 = experts
            .iter()
            .filter(|e| e["layer"] == l)
            .map(|e| e["frequency"].as_f64().unwrap())
            .sum();
        assert!((f - 2.0).abs() < 1e-9, "layer {l}: {f}");
    }
    assert!(!j["super_experts"].as_array().unwrap().is_empty());

    let (ok, out, err) = swk(&["info", &fixture("qwen3_moe")]);
    assert!(ok, "{err}");
    assert!(out.contains("architecture  qwen3moe"), "{out}");
    assert!(out.contains("4 per MoE layer, top-2 renormalized, 32 wide; 1 of 2 layers sparse"));

    // --edit addresses one expert's weight.
    let text = format!("{}/tests/fixtures/text/ppl.txt", env!("CARGO_MANIFEST_DIR"));
    let ppl = |edit: Option<&str>| {
        let mut args = vec!["ppl", &fixture("olmoe")[..], "--text", &text, "--json"]
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>();
        if let Some(e) = edit {
            args.extend(["--edit".to_string(), e.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, err) = swk(&args);
        assert!(ok, "{err}");
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        j["perplexity"].as_f64().unwrap()
    };
    let base = ppl(None);
    let edited = ppl(Some("model.layers.0.mlp.experts.2.down_proj.weight[4,8]=x1000"));
    assert!((edited / base - 1.0).abs() > 1e-3, "{base} vs {edited}");
    // A whole expert ablated by one block edit (`[*]`) and by its row blocks (`[r,*]`, one
    // per row) gives the same perplexity; the log has one record per block.
    let whole = ppl(Some("model.layers.0.mlp.experts.2.down_proj.weight[*]=zero"));
    assert!((whole / base - 1.0).abs() > 1e-4, "{base} vs {whole}");
    let config = common::json("tiny/olmoe/config.json");
    let hidden = config["hidden_size"].as_u64().expect("hidden_size") as usize;
    let mut args: Vec<String> =
        ["ppl", &fixture("olmoe"), "--text", &text, "--json"].map(str::to_string).to_vec();
    for r in 0..hidden {
        let spec = format!("model.layers.0.mlp.experts.2.down_proj.weight[{r},*]=zero");
        args.extend(["--edit".into(), spec]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = swk(&args);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["perplexity"].as_f64().unwrap().to_bits(), whole.to_bits());
    assert_eq!(j["edits"].as_array().unwrap().len(), hidden);
}

/// `detect` looks inside routed experts: the planted super weight of the super expert is
/// found in its expert's down_proj (tensor and coordinates exact) and confirmed; the dense
/// decoy is rejected.
#[test]
fn detect_finds_super_weight_inside_expert() {
    use swk::detect::{detect_tokens, DetectConfig};
    let spec = SynthSpec::tiny();
    let plant = Plant::standard(&spec);
    let (mut m, truth, site) = planted_moe(&spec, 11, &plant, 4, 2, 1).unwrap();
    let sw = truth.super_weights[0];
    let cfg = DetectConfig { confirm_context: truth.confirm.len(), ..Default::default() };
    let d = detect_tokens(
        &mut m,
        std::slice::from_ref(&truth.prompt),
        &truth.confirm,
        &cfg,
        |_, _, _| {},
    )
    .unwrap();
    assert_eq!(d.super_weights.len(), 1, "{:#?}", d.super_weights);
    let s = &d.super_weights[0];
    assert_eq!((s.layer, s.expert, s.row, s.col), (sw.layer, Some(site.expert), sw.row, sw.col));
    assert_eq!(s.tensor, format!("model.layers.{}.mlp.experts.1.down_proj.weight", sw.layer));
    assert_eq!(s.value, sw.value);
    assert!(s.perplexity_ratio.unwrap() > 5.0);
    let decoy = plant.decoy.unwrap();
    assert!(d
        .rejected
        .iter()
        .any(|r| (r.layer, r.row, r.col, r.expert) == (decoy.layer, decoy.row, decoy.col, None)));
    // The JSON form of the report turns back into the same edit.
    let j = serde_json::json!({ "super_weights": [s], "rejected": [] }).to_string();
    let edits = swk::analysis::edits_from_detect_json(&j, false).unwrap();
    assert_eq!(edits[0].tensor, s.tensor);
    assert_eq!(edits[0].index, vec![s.row, s.col]);
}

/// A spike written by a shared expert (DeepSeek's `mlp.shared_experts`, Qwen2-MoE's
/// `mlp.shared_expert`) is named in that tensor: channel `c` of layer 1's shared experts is
/// made to fire (gate row = up row, both ×40, so `silu(g)·u ≈ 1600·u²`) and to write only row
/// `r` (column `c` of down_proj is 1 at `r`, 0 elsewhere); detection (no confirmation) reports exactly that weight,
/// flagged `shared_expert`, and zeroing it through the reported tensor removes the spike.
#[test]
fn detect_names_spikes_in_shared_experts() {
    use swk::detect::{detect_tokens, DetectConfig};
    use swk::edit::{EditOp, WeightEdit};
    for (name, part) in [("deepseek_v3", "shared_experts"), ("qwen2_moe", "shared_expert")] {
        let mut m = swk::Model::load(&fixture(name)).unwrap();
        let (l, r, c) = (1, 17, 5);
        let prefix = format!("model.layers.{l}.mlp.{part}");
        let h = m.config.hidden_size;
        let up = m.weights.get(&format!("{prefix}.up_proj.weight")).unwrap().data.clone();
        for proj in ["gate_proj", "up_proj"] {
            let w = m.weights.get_mut(&format!("{prefix}.{proj}.weight")).unwrap();
            for k in 0..h {
                w.data[c * h + k] = 40.0 * up[c * h + k];
            }
        }
        let down = m.weights.get_mut(&format!("{prefix}.down_proj.weight")).unwrap();
        let cols = down.shape[1];
        for row in 0..h {
            down.data[row * cols + c] = if row == r { 1.0 } else { 0.0 };
        }
        let r_json = common::json(&format!("tiny/{name}/reference.json"));
        let tokens = common::tokens(&r_json);
        let cfg = DetectConfig { skip_confirmation: true, threshold: 50.0, ..Default::default() };
        let d = detect_tokens(&mut m, std::slice::from_ref(&tokens), &tokens, &cfg, |_, _, _| {})
            .unwrap();
        let tensor = format!("{prefix}.down_proj.weight");
        let s = d.super_weights.iter().find(|s| s.shared_expert).unwrap_or_else(|| {
            panic!("{name}: no shared-expert candidate in {:#?}", d.super_weights)
        });
        assert_eq!((s.layer, s.row, s.col, s.expert), (l, r, c, None), "{name}");
        assert_eq!(s.tensor, tensor, "{name}");
        assert_eq!(s.value, 1.0);
        assert!(s.input_activation.abs() > 50.0 && s.output_activation.abs() > 50.0, "{s:?}");
        let j = serde_json::to_value(s).unwrap();
        assert_eq!(j["shared_expert"], true);
        assert!(j.get("expert").is_none());
        // Zeroing the reported weight removes the output spike of that row.
        let edit = WeightEdit::new(s.tensor.clone(), &[s.row, s.col], EditOp::Zero);
        let after = swk::edit::with_edits(&mut m, &[edit], |m| {
            let c = &m.config;
            let mut st = swk::hooks::SpikeStats::new(c.num_layers, c.intermediate_size, h);
            swk::detect::collect_stats(m, &tokens, &mut st)?;
            Ok(st)
        })
        .unwrap();
        let out = after.layers[l].shared.as_ref().unwrap().output[r].abs;
        assert!(out < 0.05 * s.output_activation.abs(), "{name}: row {r} still at {out}");
    }
}

/// `SpikeStats::merge` of two separate runs equals one accumulation over both runs without a
/// reset (what `experts` relied on before it ran per-sample passes on any backend): dense
/// channels, routed and shared experts' maxima with positions, router counters.
#[test]
fn merged_statistics_equal_accumulated_ones() {
    use swk::hooks::SpikeStats;
    use swk::model::arch::{ForwardOptions, KvCache, Logits};
    for name in ["mixtral", "qwen2_moe", "deepseek_v3"] {
        let m = swk::Model::load(&fixture(name)).unwrap();
        let c = &m.config;
        let run = |tokens: &[u32], stats: &mut SpikeStats| {
            let opts = ForwardOptions { stats: Some(stats), logits: Logits::None, hooks: None };
            m.forward(tokens, &mut KvCache::new(&m), opts).unwrap();
        };
        let (a, b): (Vec<u32>, Vec<u32>) =
            ((1..12).collect(), (0..9).map(|i| (i * 7 + 3) % 60).collect());
        let mut both = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
        run(&a, &mut both);
        run(&b, &mut both);
        let mut merged = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
        run(&a, &mut merged);
        let mut second = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
        run(&b, &mut second);
        merged.merge(&second);
        let json = |s: &SpikeStats| serde_json::to_string(s).unwrap();
        assert_eq!(json(&merged), json(&both), "{name}");
        assert!(both.layers.iter().any(|l| !l.experts.is_empty()), "{name}: experts seen");
        assert_ne!(json(&merged), json(&second), "{name}: the first run counts");
    }
}
