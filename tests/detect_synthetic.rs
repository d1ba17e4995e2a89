//! Detection end to end on synthetic models with planted super weights (see `swk::synth` for
//! the mechanism), reproducibility across runs and thread counts, and spike statistics checked
//! against a float64 reference of the MLP.
//!
//! Iteration: a super weight that only spikes once another is zeroed cannot also be confirmed
//! by zeroing it alone (with the other in place it is below the threshold, so removing it does
//! nothing). The iterative part is therefore checked on a planted *backup*: found in iteration
//! 2, after the super weight is zeroed, and rejected by confirmation; the super weight itself
//! stays confirmed because the backup writes a dim that nothing reads.

use swk::detect::{detect_tokens, DetectConfig, Detection, SuperWeight};
use swk::hooks::{HookKind, HookPoint, Hooks, SpikeStats};
use swk::model::arch::{ForwardOptions, KvCache, Logits};
use swk::synth::{planted, random_llama, Plant, PlantSite, PlantTruth, PlantedWeight, SynthSpec};
use swk::Model;

/// Model A: multi-head attention, two chained super weights in layers 1 and 2, a decoy in the
/// last layer that cancels part of the first massive activation.
fn model_a(seed: u64) -> (Model, PlantTruth) {
    let spec = SynthSpec {
        hidden: 64,
        intermediate: 192,
        layers: 6,
        heads: 4,
        kv_heads: 4,
        vocab: 256,
        tie_embeddings: false,
    };
    let plant = Plant {
        super_weights: vec![
            PlantSite { layer: 1, row: 17, col: 101, activation: -900.0, weight: 1.5 },
            PlantSite { layer: 2, row: 40, col: 33, activation: 700.0, weight: -1.25 },
        ],
        backup: None,
        decoy: Some(PlantSite { layer: 5, row: 17, col: 150, activation: 500.0, weight: 1.0 }),
        copy_layer: 4,
        bos: 0,
        likely_per_weight: 4,
        prompt_len: 12,
        confirm_len: 32,
    };
    planted(&spec, seed, &plant).expect("plant A")
}

/// Model B: grouped-query attention (6 query heads, 2 kv heads), the standard plant: one super
/// weight, a backup that appears in iteration 2, a decoy.
fn model_b(seed: u64) -> (Model, PlantTruth) {
    let spec = SynthSpec {
        hidden: 96,
        intermediate: 256,
        layers: 5,
        heads: 6,
        kv_heads: 2,
        vocab: 320,
        tie_embeddings: false,
    };
    planted(&spec, seed, &Plant::standard(&spec)).expect("plant B")
}

fn detect(model: &mut Model, truth: &PlantTruth) -> Detection {
    let prompts = [truth.prompt.clone()];
    detect_tokens(model, &prompts, &truth.confirm, &DetectConfig::default(), |_, _, _| {})
        .expect("detection")
}

fn key(sw: &SuperWeight) -> (usize, usize, usize) {
    (sw.layer, sw.row, sw.col)
}

/// A detected weight matches its planted truth: coordinates, exact value, signs, positions,
/// iteration, and activations near their design.
fn assert_matches(got: &SuperWeight, want: &PlantedWeight, what: &str) {
    assert_eq!(key(got), (want.layer, want.row, want.col), "{what}: coordinates");
    assert_eq!(got.tensor, format!("model.layers.{}.mlp.down_proj.weight", want.layer));
    assert_eq!(got.value.to_bits(), want.value.to_bits(), "{what}: value");
    assert_eq!(got.input_activation.signum(), want.input.signum(), "{what}: input sign");
    assert_eq!(got.output_activation.signum(), want.output.signum(), "{what}: output sign");
    let near = |a: f32, b: f32| (a / b - 1.0).abs() < 0.01;
    assert!(
        near(got.input_activation, want.input),
        "{what}: input {} vs {}",
        got.input_activation,
        want.input
    );
    assert!(
        near(got.output_activation, want.output),
        "{what}: output {} vs {}",
        got.output_activation,
        want.output
    );
    assert_eq!(got.token_position, want.position, "{what}: input position");
    assert_eq!(got.output_token_position, want.position, "{what}: output position");
    assert_eq!(got.iteration, want.iteration, "{what}: iteration");
    assert_eq!((got.prompt, got.prompts_fired), (0, 1), "{what}: prompt");
}

fn ratio(sw: &SuperWeight) -> f64 {
    sw.perplexity_ratio.expect("confirmation ran")
}

#[test]
fn finds_two_chained_super_weights_and_rejects_the_decoy() {
    for seed in [1u64, 2] {
        let (mut model, truth) = model_a(seed);
        let before = model.weights.checksum();
        let det = detect(&mut model, &truth);
        assert_eq!(model.weights.checksum(), before, "seed {seed}: weights changed");
        assert_eq!(det.weights_checksum, format!("{before:016x}"));

        let found: Vec<_> = det.super_weights.iter().map(key).collect();
        let want: Vec<_> = truth.super_weights.iter().map(|w| (w.layer, w.row, w.col)).collect();
        assert_eq!(found, want, "seed {seed}: confirmed super weights");
        for (got, want) in det.super_weights.iter().zip(&truth.super_weights) {
            assert_matches(got, want, &format!("seed {seed} super weight"));
            assert!(got.confirmed);
            assert!(got.input_ratio_to_median > 100.0 && got.output_ratio_to_median > 100.0);
            assert!(ratio(got) > 10.0, "seed {seed}: ratio {}", ratio(got));
        }
        let decoy = truth.decoy.expect("a decoy");
        assert_eq!(det.rejected.len(), 1, "seed {seed}: rejected {:?}", det.rejected);
        assert_matches(&det.rejected[0], &decoy, &format!("seed {seed} decoy"));
        assert!(!det.rejected[0].confirmed);
        assert!(
            ratio(&det.rejected[0]) < 1.1,
            "seed {seed}: decoy ratio {}",
            ratio(&det.rejected[0])
        );

        let base = det.baseline_perplexity.expect("baseline");
        assert!(base < 2.0 * 8.0, "seed {seed}: baseline perplexity {base}");
        assert_eq!(det.confirm_tokens, truth.confirm.len() - 1);
        // First-pass maxima show the planted spikes.
        let l1 = &det.layers[truth.super_weights[0].layer];
        assert_eq!(
            (l1.input_col, l1.output_row),
            (truth.super_weights[0].col, truth.super_weights[0].row)
        );
        println!(
            "model A seed {seed}: baseline ppl {base:.3}; ratios: super weights {:?}, decoy {:.4}",
            det.super_weights.iter().map(ratio).collect::<Vec<_>>(),
            ratio(&det.rejected[0])
        );
    }
}

#[test]
fn gqa_model_backup_appears_in_iteration_two() {
    for seed in [3u64, 4] {
        let (mut model, truth) = model_b(seed);
        assert!(model.config.num_kv_heads < model.config.num_heads);
        let before = model.weights.checksum();
        let det = detect(&mut model, &truth);
        assert_eq!(model.weights.checksum(), before, "seed {seed}: weights changed");

        assert_eq!(det.super_weights.len(), 1, "seed {seed}: {:?}", det.super_weights);
        assert_matches(&det.super_weights[0], &truth.super_weights[0], "super weight");
        assert!(ratio(&det.super_weights[0]) > 10.0);

        let backup = truth.backup.expect("a backup");
        let decoy = truth.decoy.expect("a decoy");
        let mut rejected = det.rejected.clone();
        rejected.sort_by_key(|s| s.iteration);
        assert_eq!(rejected.len(), 2, "seed {seed}: rejected {rejected:?}");
        assert_matches(&rejected[0], &decoy, "decoy");
        assert_matches(&rejected[1], &backup, "backup");
        assert_eq!(rejected[1].iteration, 2);
        for r in &rejected {
            assert!(!r.confirmed && ratio(r) < 1.1, "seed {seed}: {r:?}");
        }
        println!(
            "model B seed {seed}: baseline ppl {:.3}; super weight ratio {:.2}; decoy {:.4}; backup {:.4}",
            det.baseline_perplexity.unwrap_or(f64::NAN),
            ratio(&det.super_weights[0]),
            ratio(&rejected[0]),
            ratio(&rejected[1]),
        );
    }
}

#[test]
fn without_bos_nothing_spikes() {
    let (mut model, truth) = model_b(3);
    let no_bos = truth.prompt[1..].to_vec();
    let det = detect_tokens(
        &mut model,
        &[no_bos],
        &truth.confirm,
        &DetectConfig::default(),
        |_, _, _| {},
    )
    .unwrap();
    assert!(det.super_weights.is_empty() && det.rejected.is_empty(), "{det:?}");
    assert!(det.baseline_perplexity.is_none());
}

/// Detection as JSON, without the wall time.
fn json(det: &Detection) -> String {
    let mut v = serde_json::to_value(det).unwrap();
    v.as_object_mut().unwrap().remove("seconds");
    serde_json::to_string(&v).unwrap()
}

#[test]
fn detection_is_reproducible_across_runs_and_thread_counts() {
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let (mut a, ta) = model_a(1);
            let (mut b, tb) = model_b(3);
            (
                a.weights.checksum(),
                json(&detect(&mut a, &ta)),
                b.weights.checksum(),
                json(&detect(&mut b, &tb)),
            )
        })
    };
    let one = run(1);
    let two = run(2);
    let again = run(2);
    assert_eq!(one, two, "1 vs 2 threads");
    assert_eq!(two, again, "run to run");
    let (mut a, ta) = model_a(1);
    let first = json(&detect(&mut a, &ta));
    let second = json(&detect(&mut a, &ta));
    assert_eq!(first, second, "same model twice");
    assert_eq!(first, one.1, "default pool");
}

/// Everything the hooks saw in one layer: the MLP-norm input, gate, up, down_proj input and
/// output, each `[tokens, width]`.
#[derive(Default)]
struct Captured {
    resid_mid: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    post: Vec<f32>,
    out: Vec<f32>,
}

/// Run `tokens` with stats and hooks capturing layer `layer` (`hook_post` optional, since its
/// presence switches the statistics to a separate pass).
fn capture(
    model: &Model,
    tokens: &[u32],
    layer: usize,
    hook_post: bool,
) -> (Vec<f32>, SpikeStats, Captured) {
    let c = &model.config;
    let mut stats = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    let mut cap = Captured::default();
    let logits = {
        let Captured { resid_mid, gate, up, post, out } = &mut cap;
        let mut hooks = Hooks::new();
        let p = |kind| HookPoint { layer, kind };
        hooks.add(p(HookKind::ResidMid), |_, a| resid_mid.extend_from_slice(a.data));
        hooks.add(p(HookKind::MlpPre), |_, a| gate.extend_from_slice(a.data));
        hooks.add(p(HookKind::MlpPreLinear), |_, a| up.extend_from_slice(a.data));
        if hook_post {
            hooks
                .add_named(&format!("blocks.{layer}.mlp.hook_post"), |_, a| {
                    post.extend_from_slice(a.data)
                })
                .unwrap();
        }
        hooks
            .add_named(&format!("blocks.{layer}.hook_mlp_out"), |_, a| {
                out.extend_from_slice(a.data)
            })
            .unwrap();
        let opts = ForwardOptions {
            hooks: Some(&mut hooks),
            stats: Some(&mut stats),
            logits: Logits::All,
        };
        model.forward(tokens, &mut KvCache::new(model), opts).unwrap()
    };
    (logits, stats, cap)
}

/// `y = x · Wᵀ` in f64 for `x` `[rows, n_in]`, `w` `[n_out, n_in]`.
fn linear64(x: &[f64], w: &[f32], n_in: usize, n_out: usize) -> Vec<f64> {
    x.chunks(n_in)
        .flat_map(|row| {
            (0..n_out).map(move |o| {
                row.iter().zip(&w[o * n_in..(o + 1) * n_in]).map(|(a, &b)| a * b as f64).sum()
            })
        })
        .collect()
}

/// Column-wise (max |v|, signed v, first row reaching it) of `[rows, n]` values.
fn column_max<T: Copy + Into<f64>>(v: &[T], n: usize) -> Vec<(f64, f64, usize)> {
    let mut m = vec![(0.0f64, 0.0f64, 0usize); n];
    for (r, row) in v.chunks(n).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            let x: f64 = x.into();
            if x.abs() > m[c].0 {
                m[c] = (x.abs(), x, r);
            }
        }
    }
    m
}

fn argmax(v: &[(f64, f64, usize)]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i].0 > v[b].0 { i } else { b })
}

/// Check one layer's statistics against the captured activations (exactly) and against an
/// f64 recomputation of the MLP from the captured MLP input (closely).
fn check_layer(model: &Model, tokens: &[u32], layer: usize) {
    let c = &model.config;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let t = tokens.len();
    let (logits_hooked, stats, cap) = capture(model, tokens, layer, true);
    assert_eq!(cap.post.len(), t * i);
    assert_eq!(cap.out.len(), t * h);

    // Statistics equal what the captured activations imply, bit for bit.
    let s = &stats.layers[layer];
    for (ch, (m, want)) in s.input.iter().zip(column_max(&cap.post, i)).enumerate() {
        assert_eq!(
            (m.abs as f64, m.value as f64, m.position),
            want,
            "layer {layer} input column {ch}"
        );
    }
    for (ch, (m, want)) in s.output.iter().zip(column_max(&cap.out, h)).enumerate() {
        assert_eq!(
            (m.abs as f64, m.value as f64, m.position),
            want,
            "layer {layer} output row {ch}"
        );
    }

    // f64 reference: rmsnorm → gate, up → silu(gate)·up → down_proj.
    let w = |n: &str| &model.weights.get(&format!("model.layers.{layer}.{n}.weight")).unwrap().data;
    let norm = w("post_attention_layernorm");
    let xn: Vec<f64> = cap
        .resid_mid
        .chunks(h)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / h as f64;
            let inv = 1.0 / (ms + c.rms_norm_eps).sqrt();
            row.iter().zip(norm).map(move |(&v, &g)| v as f64 * inv * g as f64).collect::<Vec<_>>()
        })
        .collect();
    let gate = linear64(&xn, w("mlp.gate_proj"), h, i);
    let up = linear64(&xn, w("mlp.up_proj"), h, i);
    let act: Vec<f64> = gate.iter().zip(&up).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
    let out = linear64(&act, w("mlp.down_proj"), i, h);
    let close = |got: &[f32], want: &[f64], what: &str| {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
        for (k, (&g, &r)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - r).abs() <= 1e-4 * scale + 1e-5 * r.abs(),
                "layer {layer} {what}[{k}]: {g} vs {r}"
            );
        }
    };
    close(&cap.gate, &gate, "gate");
    close(&cap.up, &up, "up");
    close(&cap.post, &act, "down_proj input");
    close(&cap.out, &out, "down_proj output");
    let (in_ref, out_ref) = (column_max(&act, i), column_max(&out, h));
    let (ci, co) = (argmax(&in_ref), argmax(&out_ref));
    let (pi, po) = (s.input_peak().unwrap(), s.output_peak().unwrap());
    // The reference agrees on the peaks wherever the runner-up is not within rounding.
    let clear = |v: &[(f64, f64, usize)], best: usize| {
        v.iter().enumerate().all(|(k, m)| k == best || m.0 < v[best].0 * 0.999)
    };
    if clear(&in_ref, ci) {
        assert_eq!((pi.channel, pi.max.position), (ci, in_ref[ci].2), "layer {layer}: input peak");
        assert_eq!(pi.max.value.signum() as f64, in_ref[ci].1.signum());
    }
    if clear(&out_ref, co) {
        assert_eq!(
            (po.channel, po.max.position),
            (co, out_ref[co].2),
            "layer {layer}: output peak"
        );
        assert_eq!(po.max.value.signum() as f64, out_ref[co].1.signum());
    }

    // The fused statistics (no hook at hook_post) equal the separate pass, and stats or hooks
    // do not change the logits.
    let (logits_fused, stats_fused, _) = capture(model, tokens, layer, false);
    let plain = model.logits(tokens).unwrap();
    let mut only_stats = SpikeStats::new(c.num_layers, i, h);
    let opts = ForwardOptions { hooks: None, stats: Some(&mut only_stats), logits: Logits::All };
    let logits_stats = model.forward(tokens, &mut KvCache::new(model), opts).unwrap();
    let as_bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(as_bits(&plain), as_bits(&logits_hooked), "hooks changed the logits");
    assert_eq!(as_bits(&plain), as_bits(&logits_fused), "hooks changed the logits");
    assert_eq!(as_bits(&plain), as_bits(&logits_stats), "statistics changed the logits");
    for (l, ((a, b), d)) in
        stats.layers.iter().zip(&stats_fused.layers).zip(&only_stats.layers).enumerate()
    {
        assert_eq!(a.input, b.input, "layer {l}: fused vs separate input statistics");
        assert_eq!(a.output, b.output, "layer {l}: output statistics");
        assert_eq!(b.input, d.input, "layer {l}: hooks changed input statistics");
        assert_eq!(b.output, d.output, "layer {l}: hooks changed output statistics");
    }
}

#[test]
fn spike_statistics_match_a_float64_reference() {
    // A random model (no spikes: the statistics must still be exact) with GQA, 20 tokens
    // (more than one fused-kernel task of 8 rows).
    let spec = SynthSpec {
        hidden: 48,
        intermediate: 136,
        layers: 3,
        heads: 6,
        kv_heads: 3,
        vocab: 100,
        tie_embeddings: false,
    };
    let model = random_llama(&spec, 9).unwrap();
    let tokens: Vec<u32> = (0..20).map(|k| (k * 37 + 5) % 100).collect();
    for layer in 0..spec.layers {
        check_layer(&model, &tokens, layer);
    }
    // A planted model: the spike layers and their neighbours.
    let (model, truth) = model_a(1);
    let mut tokens = truth.prompt.clone();
    tokens.extend(&truth.confirm[1..12]);
    for layer in [0, 1, 2, 5] {
        check_layer(&model, &tokens, layer);
    }
}

#[test]
fn statistics_positions_are_absolute_across_cache_calls() {
    let (model, truth) = model_b(3);
    let c = &model.config;
    let tokens = &truth.prompt;
    let mut whole = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    swk::detect::collect_stats(&model, tokens, &mut whole).unwrap();
    // The same tokens fed in two calls; the maxima of the later rows carry absolute positions.
    let mut split = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    let mut cache = KvCache::new(&model);
    for part in [&tokens[..5], &tokens[5..]] {
        let opts = ForwardOptions { hooks: None, stats: Some(&mut split), logits: Logits::None };
        model.forward(part, &mut cache, opts).unwrap();
    }
    for (l, (a, b)) in whole.layers.iter().zip(&split.layers).enumerate() {
        let (pa, pb) = (a.input_peak().unwrap(), b.input_peak().unwrap());
        assert_eq!((pa.channel, pa.max.position), (pb.channel, pb.max.position), "layer {l}");
        assert!((pa.max.value - pb.max.value).abs() <= 1e-4 * pa.max.abs.max(1.0), "layer {l}");
        for (x, y) in a.output.iter().zip(&b.output) {
            assert!((x.abs - y.abs).abs() <= 1e-4 * x.abs.max(1.0), "layer {l}");
        }
    }
    let sw = truth.super_weights[0];
    let peak = split.layers[sw.layer].input_peak().unwrap();
    assert_eq!((peak.channel, peak.max.position), (sw.col, 0));
}
