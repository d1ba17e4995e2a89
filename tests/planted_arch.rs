//! Planted super weights on every dense family swk runs (`swk::synth::families::plant_arch`,
//! planted into the tiny fixtures' random weights through each family's own tensors; Llama
//! too, for comparison): detection must confirm exactly the planted coordinate, and zeroing it
//! must raise the perplexity of the confirmation sequence by a large factor (measured here
//! independently of detection), while a planted decoy that spikes as much is named and
//! rejected; the same on the llama.cpp-style GGUF copies. A planted group (two members, none
//! decisive alone) must be found by group screening on every dense family.
//!
//! What the group runs show: the planted activation is present at every position, so
//! screening studies the position where it is largest (3 or 5 here, not BOS); in the
//! post-norm families (gemma2, olmo2) the residual value is exactly twice the per-block target
//! (−2700) at every position because each post-MLP norm saturates on the planted row, and the
//! members' screened contributions (down_proj terms before that norm) are about half of it,
//! because the plant sets the norm's gain so that each block writes what its term is. Single
//! ratios are within 0.3% of 1, joint ratios 48x (qwen2) .. 216x (gpt_neox). GPT-2 is a group
//! only because the plant cancels its MLP LayerNorm's bias in the source dim: without that,
//! the layer-1 member's normalized source changed sign when the layer-0 member was zeroed,
//! its GELU channel went silent and that member alone was decisive (83x; see the module docs
//! of `swk::synth::families`).

mod common;

use swk::analysis::groups::{groups, GroupsConfig, Verdict};
use swk::detect::{detect_tokens, DetectConfig};
use swk::model::arch::{ForwardOptions, KvCache, Logits};
use swk::synth::families::{plant_arch, ArchPlant, ArchTruth};
use swk::synth::PlantSite;
use swk::Model;

fn fixture(name: &str) -> Model {
    let p = common::fixture(&format!("tiny/{name}"));
    Model::load(p.to_str().unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Perplexity of `tokens` fed as one window.
fn ppl(m: &Model, tokens: &[u32]) -> f64 {
    let logits = m
        .forward(
            tokens,
            &mut KvCache::new(m),
            ForwardOptions { logits: Logits::All, ..Default::default() },
        )
        .unwrap();
    let (nll, n) = swk::eval::ppl::score(&logits, tokens, m.config.vocab_size);
    (nll / n as f64).exp()
}

/// Perplexity ratio of the confirmation sequence with the planted weights zeroed.
fn zeroed_ratio(m: &mut Model, truth: &ArchTruth, which: &[usize]) -> f64 {
    let base = ppl(m, &truth.confirm);
    let saved: Vec<f32> = which
        .iter()
        .map(|&k| {
            let s = &truth.super_weights[k];
            let t = m.weights.get_mut(&Model::down_proj_name(s.layer)).unwrap();
            let cols = t.shape[1];
            std::mem::replace(&mut t.data[s.row * cols + s.col], 0.0)
        })
        .collect();
    let edited = ppl(m, &truth.confirm);
    for (&k, v) in which.iter().zip(saved) {
        let s = &truth.super_weights[k];
        let t = m.weights.get_mut(&Model::down_proj_name(s.layer)).unwrap();
        let cols = t.shape[1];
        t.data[s.row * cols + s.col] = v;
    }
    edited / base
}

/// Plant one super weight in layer 0 of the `name` fixture and a decoy in layer 1, detect, and
/// check the result: exactly the planted coordinate confirmed, exactly the decoy rejected
/// (its ratio within 20% of 1: it only dilutes the final norm's input), and the ratio of
/// zeroing it (measured here, and by detection) within 1% of `want` (recorded; deterministic
/// for the committed fixtures) and above 20.
fn check_family(name: &str, want: f64) {
    let m = fixture(name);
    let gated = m.config.architecture.gated_mlp();
    // GELU MLPs (GPT-2, GPT-NeoX) only make positive massive activations.
    let (activation, weight) = if gated { (-900.0, 1.5) } else { (900.0, -1.5) };
    let site = PlantSite { layer: 0, row: 17, col: 101, activation, weight };
    let decoy =
        PlantSite { layer: 1, row: 40, col: 60, activation: activation * 2.0 / 3.0, weight: 1.0 };
    let plant = ArchPlant { decoy: Some(decoy), ..ArchPlant::single(site) };
    let (mut m, truth) = plant_arch(m, 7, &plant).unwrap();
    let ratio = zeroed_ratio(&mut m, &truth, &[0]);
    let before = m.weights.checksum();
    let cfg = DetectConfig { confirm_context: truth.confirm.len(), ..Default::default() };
    let d = detect_tokens(
        &mut m,
        std::slice::from_ref(&truth.prompt),
        &truth.confirm,
        &cfg,
        |_, _, _| {},
    )
    .unwrap();
    assert_eq!(m.weights.checksum(), before, "{name}: weights not restored");
    let found: Vec<(usize, usize, usize)> =
        d.super_weights.iter().map(|s| (s.layer, s.row, s.col)).collect();
    let sw = &d.super_weights.first();
    eprintln!(
        "{name}: confirmed {found:?}, input {:?}, output {:?}, detection ratio {:?}, \
         measured ratio {ratio:.1}, rejected {:?}",
        sw.map(|s| s.input_activation),
        sw.map(|s| s.output_activation),
        sw.and_then(|s| s.perplexity_ratio),
        d.rejected.iter().map(|s| (s.layer, s.row, s.col, s.perplexity_ratio)).collect::<Vec<_>>()
    );
    assert_eq!(found, vec![(0, 17, 101)], "{name}: confirmed coordinates");
    assert_eq!(d.super_weights[0].value, weight);
    assert!(d.super_weights[0].input_activation.abs() > 50.0);
    let det = d.super_weights[0].perplexity_ratio.unwrap();
    assert!((det / ratio - 1.0).abs() < 1e-3, "{name}: detection {det} vs measured {ratio}");
    // The decoy spikes (detection names it in layer 1) but removing it does not hurt.
    let rejected: Vec<(usize, usize, usize)> =
        d.rejected.iter().map(|s| (s.layer, s.row, s.col)).collect();
    assert_eq!(rejected, vec![(1, 40, 60)], "{name}: rejected");
    let decoy_ratio = d.rejected[0].perplexity_ratio.unwrap();
    assert!((0.8..1.2).contains(&decoy_ratio), "{name}: zeroing the decoy: ratio {decoy_ratio}");
    assert!(ratio > 20.0, "{name}: zeroing raises perplexity only {ratio}x");
    assert!((ratio / want - 1.0).abs() < 0.01, "{name}: ratio {ratio}, recorded {want}");
}

#[test]
fn gemma() {
    check_family("gemma", 78.60);
}
#[test]
fn gemma2() {
    check_family("gemma2", 65.47);
}
#[test]
fn gemma3() {
    check_family("gemma3", 58.68);
}
#[test]
fn phi3() {
    check_family("phi3", 87.21);
}
#[test]
fn olmo() {
    check_family("olmo", 55.15);
}
#[test]
fn olmo2() {
    check_family("olmo2", 87.77);
}
#[test]
fn qwen2() {
    check_family("qwen2", 176.47);
}
#[test]
fn qwen3() {
    check_family("qwen3", 63.88);
}
#[test]
fn mistral() {
    check_family("mistral", 134.35);
}
#[test]
fn gpt2() {
    check_family("gpt2", 100.96);
}
#[test]
fn gpt_neox() {
    check_family("gpt_neox", 54.45);
}

/// Two members in layers 0 and 1 writing row 17 together; group screening must find exactly
/// them, neither decisive alone (its single ratios equal to the ones measured here), decisive
/// jointly (ratio > 20). In the post-norm families (gemma2, olmo2) screening's contributions
/// are the down_proj terms before the post-MLP norm; the plant sets that norm's gain of row 17
/// so that each block writes the same `A · w` after it, so the pre-norm terms are about half of
/// the residual value each, as in a pre-norm family.
fn check_group(name: &str) {
    let m = fixture(name);
    let gated = m.config.architecture.gated_mlp();
    let (activation, weight) = if gated { (-900.0, 1.5) } else { (900.0, -1.5) };
    let site = |layer, col| PlantSite { layer, row: 17, col, activation, weight };
    let plant =
        ArchPlant { sites: vec![site(0, 33), site(1, 120)], ..ArchPlant::single(site(0, 33)) };
    let (mut m, truth) = plant_arch(m, 11, &plant).unwrap();
    let singles: Vec<f64> = (0..2).map(|k| zeroed_ratio(&mut m, &truth, &[k])).collect();
    let joint = zeroed_ratio(&mut m, &truth, &[0, 1]);
    eprintln!("{name} group: measured singles {singles:?}, joint {joint:.1}");
    let before = m.weights.checksum();
    let cfg = GroupsConfig { context: truth.confirm.len(), ..Default::default() };
    let r = groups(&mut m, std::slice::from_ref(&truth.prompt), &truth.confirm, &cfg, |_, _, _| {})
        .unwrap();
    assert_eq!(m.weights.checksum(), before, "{name}: weights not restored");
    let g =
        r.activations.iter().find(|g| g.activation.dim == 17).unwrap_or_else(|| {
            panic!("{name}: no massive activation in dim 17: {:#?}", r.activations)
        });
    eprintln!(
        "{name} group: value {:.1} at position {} (layers {}..{}), verdict {:?}, joint {:?}, members {:?}",
        g.activation.value,
        g.activation.position,
        g.activation.first_layer,
        g.activation.peak_layer,
        g.verdict,
        g.joint_ratio,
        g.members.iter().map(|m| (m.layer, m.row, m.col, m.contribution, m.single_ratio)).collect::<Vec<_>>()
    );
    assert_eq!(g.verdict, Verdict::Group, "{name}");
    let mut got: Vec<(usize, usize, usize)> =
        g.members.iter().map(|m| (m.layer, m.row, m.col)).collect();
    got.sort();
    assert_eq!(got, vec![(0, 17, 33), (1, 17, 120)], "{name}: members");
    for mem in &g.members {
        assert!(mem.single_ratio < 2.0, "{name}: member {mem:?} decisive alone");
        let k = usize::from(mem.layer == 1);
        assert!(
            (mem.single_ratio / singles[k] - 1.0).abs() < 1e-3,
            "{name}: {mem:?} vs {singles:?}"
        );
    }
    assert!((g.joint_ratio.unwrap() / joint - 1.0).abs() < 1e-3, "{name}: joint vs {joint}");
    assert!(g.joint_ratio.unwrap() > 20.0, "{name}: joint ratio {:?}", g.joint_ratio);
}

#[test]
fn group_qwen2() {
    check_group("qwen2");
}
#[test]
fn group_gemma2() {
    check_group("gemma2");
}
#[test]
fn group_olmo2() {
    check_group("olmo2");
}
#[test]
fn group_gpt_neox() {
    check_group("gpt_neox");
}
#[test]
fn group_gemma() {
    check_group("gemma");
}
#[test]
fn group_gemma3() {
    check_group("gemma3");
}
#[test]
fn group_phi3() {
    check_group("phi3");
}
#[test]
fn group_olmo() {
    check_group("olmo");
}
#[test]
fn group_qwen3() {
    check_group("qwen3");
}
#[test]
fn group_mistral() {
    check_group("mistral");
}
#[test]
fn group_gpt2() {
    check_group("gpt2");
}
#[test]
fn group_llama() {
    check_group("llama");
}

/// The same mechanism on the Llama fixture (Llama itself also has `swk::synth::planted`).
#[test]
fn llama() {
    check_family("llama", 85.00);
}

/// Clear errors: MoE models, negative activations in GELU MLPs, shared layers, mixed rows,
/// sites outside the model.
#[test]
fn bad_plants_are_refused() {
    let site = PlantSite { layer: 0, row: 17, col: 101, activation: -900.0, weight: 1.5 };
    let err = |name: &str, plant: &ArchPlant| match plant_arch(fixture(name), 1, plant) {
        Ok(_) => panic!("{name}: {plant:?} was planted"),
        Err(e) => e.to_string(),
    };
    let e = err("mixtral", &ArchPlant::single(site));
    assert!(e.contains("mixture of experts"), "{e}");
    let e = err("gpt2", &ArchPlant::single(site));
    assert!(e.contains("negative activation"), "{e}");
    let two = |a: PlantSite, b: PlantSite| ArchPlant { sites: vec![a, b], ..ArchPlant::single(a) };
    let e = err("qwen2", &two(site, PlantSite { col: 5, ..site }));
    assert!(e.contains("distinct layers"), "{e}");
    let decoy =
        ArchPlant { decoy: Some(PlantSite { layer: 1, ..site }), ..ArchPlant::single(site) };
    assert!(err("qwen2", &decoy).contains("row of its own"));
    let e = err("qwen2", &two(site, PlantSite { layer: 1, row: 18, ..site }));
    assert!(e.contains("share one row"), "{e}");
    let e = err("qwen2", &ArchPlant::single(PlantSite { col: 160, ..site }));
    assert!(e.contains("outside the model"), "{e}");
    // A positive planted value moves GPT-2's LayerNorm mean past the source: the layer-1
    // member would fire only while the layer-0 one does (not a group).
    let up = PlantSite { activation: 900.0, weight: 1.5, ..site };
    let e = err("gpt2", &two(PlantSite { col: 33, ..up }, PlantSite { layer: 1, col: 120, ..up }));
    assert!(e.contains("group member in layer 1 (channel 120)"), "{e}");
}

/// The GGUF copies (tests/gguf_arch.rs) plant and detect to the same coordinates and ratios
/// as their safetensors sources: llama.cpp's names, Gemma's `1 + w` norms, OLMo's Q/K
/// permutation, GPT-2's transposed Conv1D and NeoX's regrouped qkv are all undone on load.
#[test]
fn gguf_copies() {
    for (name, want) in [
        ("gemma2", 65.47),
        ("olmo", 55.15),
        ("olmo2", 87.77),
        ("phi3", 87.21),
        ("gpt2", 100.96),
        ("gpt_neox", 54.45),
    ] {
        check_family(&format!("{name}_gguf/model.gguf"), want);
    }
}
