//! Group screening (`swk::analysis::groups`): a massive activation written jointly by three
//! down_proj weights in different layers (`swk::synth::planted_group`), none decisive alone.
//! The group must be found with exactly the planted members, each single ratio < 2, the joint
//! ratio > 2; weights restored. On SmolLM2 (skipped when absent): the report runs and its
//! known super weight (11, 507, 1229) is classified as decisive alone.

mod common;

use swk::analysis::groups::{groups, GroupsConfig, Verdict};
use swk::synth::{planted_group, PlantSite, SynthSpec};

#[test]
fn planted_group_is_found() {
    let spec = SynthSpec { layers: 5, ..SynthSpec::tiny() };
    let (h, i) = (spec.hidden, spec.intermediate);
    let row = h * 3 / 8 + 1;
    let site = |layer, col| PlantSite { layer, row, col, activation: -300.0, weight: 1.5 };
    let members = [site(1, i / 5 + 3), site(2, i / 2 + 1), site(3, i * 4 / 5 + 2)];
    let (mut m, truth) = planted_group(&spec, 5, &members, 4).unwrap();
    let before = m.weights.checksum();
    let cfg = GroupsConfig { context: truth.confirm.len(), ..Default::default() };
    let r = groups(&mut m, std::slice::from_ref(&truth.prompt), &truth.confirm, &cfg, |_, _, _| {})
        .unwrap();
    assert_eq!(m.weights.checksum(), before, "weights not restored");

    let g = r
        .activations
        .iter()
        .find(|g| g.activation.dim == row)
        .unwrap_or_else(|| panic!("no massive activation in dim {row}: {:#?}", r.activations));
    eprintln!(
        "dim {row}: value {:.1} at position {} (layers {}..{}), joint ratio {:.2}, singles {:?}",
        g.activation.value,
        g.activation.position,
        g.activation.first_layer,
        g.activation.peak_layer,
        g.joint_ratio.unwrap(),
        g.members.iter().map(|m| (m.layer, m.col, m.single_ratio)).collect::<Vec<_>>()
    );
    assert_eq!(g.activation.position, 0);
    assert_eq!(g.activation.first_layer, 1);
    assert!(g.activation.value < -1000.0, "{}", g.activation.value);
    assert_eq!(g.verdict, Verdict::Group);
    let mut got: Vec<(usize, usize, usize)> =
        g.members.iter().map(|m| (m.layer, m.row, m.col)).collect();
    got.sort();
    let want: Vec<(usize, usize, usize)> =
        members.iter().map(|s| (s.layer, s.row, s.col)).collect();
    assert_eq!(got, want);
    for mem in &g.members {
        assert!(mem.single_ratio < 2.0, "member {mem:?} decisive alone");
        assert!(mem.contribution < -100.0, "member {mem:?} contribution");
        assert_eq!(mem.value, 1.5);
    }
    let joint = g.joint_ratio.unwrap();
    assert!(joint > 2.0, "joint ratio {joint}");
    // Pruning keeps a decisive subset of at least two planted members.
    let mg = g.minimal.clone().unwrap();
    let (minimal, ratio) = (mg.members, mg.ratio);
    eprintln!("minimal decisive subset {minimal:?}: ratio {ratio:.2}");
    assert!(minimal.len() >= 2 && minimal.iter().all(|c| want.contains(c)), "{minimal:?}");
    assert!(ratio > 2.0);
    assert_eq!(r.groups, 1);
}

#[test]
fn smollm2_groups() {
    let Some(path) = common::smollm2() else {
        eprintln!("SKIPPED: SmolLM2 GGUF not found (run scripts/fetch-models.sh)");
        return;
    };
    let mut m = swk::Model::load(path.to_str().unwrap()).unwrap();
    let tok = m.tokenizer().unwrap();
    let prompt = tok.encode(swk::detect::DEFAULT_PROMPT, true).unwrap();
    let text = tok.encode(swk::detect::DEFAULT_CONFIRM_TEXT, false).unwrap();
    let r = groups(&mut m, &[prompt], &text, &GroupsConfig::default(), |_, _, _| {}).unwrap();
    for g in &r.activations {
        eprintln!(
            "dim {} pos {} layers {}..{} value {:.1} verdict {:?} joint {:?} members {:?} minimal {:?}",
            g.activation.dim,
            g.activation.position,
            g.activation.first_layer,
            g.activation.peak_layer,
            g.activation.value,
            g.verdict,
            g.joint_ratio,
            g.members
                .iter()
                .map(|m| (m.layer, m.col, m.contribution, m.single_ratio))
                .collect::<Vec<_>>(),
            g.minimal
        );
    }
    eprintln!("{} perplexity runs in {:.1} s", r.perplexity_runs, r.seconds);
    let g = r.activations.iter().find(|g| g.activation.dim == 507).expect("dim 507 is massive");
    assert_eq!(g.verdict, Verdict::Single);
    let sw = g.members.iter().find(|m| (m.layer, m.col) == (11, 1229)).expect("(11, 507, 1229)");
    assert!(sw.single_ratio > 2.0, "{}", sw.single_ratio);
}

/// `swk groups --json` on the tiny fixture: one JSON object naming the device that ran the
/// ablations, with the baseline and the activations found (none need be massive there).
#[test]
fn cli_groups_json_names_its_device() {
    let model = common::fixture("tiny/llama");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_swk"))
        .args(["--device", "cpu", "groups"])
        .arg(&model)
        .args(["--context", "16", "--json"])
        .output()
        .expect("run swk");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(j["device"], "cpu");
    assert!(j["baseline_perplexity"].as_f64().is_some_and(|p| p > 1.0), "{j}");
    assert!(j["activations"].is_array(), "{j}");
}
